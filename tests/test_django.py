"""record_event in a Django application: ``django.db.connection`` under ``transaction.atomic()``.

Django is configured here with minimal settings (no apps, one PostgreSQL database on psycopg
3). Settings can be configured once per process, so this module shares one fresh database
across its tests and empties the tables before each.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import django
import psycopg
import pytest
from django.conf import settings
from django.db import connection, connections, transaction
from django.db.utils import InternalError, ProgrammingError
from pytest_postgresql.janitor import DatabaseJanitor

from relay import InvalidEvent, record_event, record_event_async, record_events
from relay.mapping import map_event
from tests.conftest import Server
from tests.test_outbox import EVENT, event, rows


@pytest.fixture(scope="module")
def django_dsn(pg_server: Server, pg_template: str) -> Iterator[str]:
    name = f"relay_dj_{uuid.uuid4().hex[:12]}"
    janitor = DatabaseJanitor(
        user=pg_server.user,
        host=pg_server.host,
        port=pg_server.port,
        password=pg_server.password,
        dbname=name,
        template_dbname=pg_template,
    )
    with janitor:
        database = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": pg_server.user,
            "PASSWORD": pg_server.password or "",
            "HOST": pg_server.host,
            "PORT": str(pg_server.port),
        }
        settings.configure(DATABASES={"default": database}, INSTALLED_APPS=[], USE_TZ=True)
        django.setup()
        dsn = pg_server.dsn(name)
        with psycopg.connect(dsn) as c:
            c.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
        try:
            yield dsn
        finally:
            connections.close_all()


@pytest.fixture
def db(django_dsn: str) -> str:
    with psycopg.connect(django_dsn) as c:
        c.execute("TRUNCATE relay_outbox, orders")
    return django_dsn


def orders(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("SELECT note FROM orders ORDER BY id")]


def place_order(note: str) -> None:
    with connection.cursor() as cur:
        cur.execute("INSERT INTO orders (note) VALUES (%s)", [note])


def test_django_runs_on_psycopg_3(db: str) -> None:
    connection.ensure_connection()
    assert isinstance(connection.connection, psycopg.Connection)


def test_events_commit_with_the_business_write(db: str) -> None:
    with transaction.atomic():
        place_order("order 1")
        result = record_event(connection, EVENT)
        assert rows(db) == []  # inside the atomic block: not committed yet
    assert result.written == 2 and result.skipped is None
    assert orders(db) == ["order 1"]
    assert [r[6] for r in rows(db)] == [m.message_id for m in map_event(EVENT)]


def test_events_vanish_when_the_atomic_block_rolls_back(db: str) -> None:
    with pytest.raises(RuntimeError, match="payment declined"), transaction.atomic():
        place_order("order 1")
        assert record_event(connection, EVENT).written == 2
        raise RuntimeError("payment declined")
    assert rows(db) == [] and orders(db) == []


def test_a_rolled_back_savepoint_takes_its_events_with_it(db: str) -> None:
    with transaction.atomic():
        place_order("order 1")
        record_event(connection, EVENT)
        with pytest.raises(RuntimeError), transaction.atomic():
            record_event(connection, event(id="evt_2"))
            raise RuntimeError("inner step failed")
    assert [r[6] for r in rows(db)] == [m.message_id for m in map_event(EVENT)]
    assert orders(db) == ["order 1"]


@pytest.mark.parametrize(
    "handle",
    [
        pytest.param(lambda: connection, id="django.db.connection"),
        pytest.param(lambda: connections["default"], id="connections[alias]"),
        pytest.param(lambda: connection.cursor().connection, id="the psycopg connection"),
    ],
)
def test_every_handle_on_the_connection_shares_the_atomic_block(
    db: str, handle: Callable[[], Any]
) -> None:
    with pytest.raises(RuntimeError), transaction.atomic():
        place_order("order 1")
        record_event(handle(), EVENT)
        raise RuntimeError("rolled back")
    assert rows(db) == []
    with transaction.atomic():
        place_order("order 2")
        record_event(handle(), EVENT)
    assert len(rows(db)) == 2 and orders(db) == ["order 2"]


def test_the_statement_goes_through_djangos_cursor(db: str) -> None:
    """Execute wrappers (APM, query counting) see the insert like any other query."""
    seen: list[str] = []

    def spy(execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with transaction.atomic(), connection.execute_wrapper(spy):
        record_event(connection, EVENT)
    assert any("INSERT INTO relay_outbox" in sql for sql in seen)


def test_duplicate_and_invalid_events_inside_an_atomic_block(db: str) -> None:
    with transaction.atomic():
        place_order("order 1")
        first = record_event(connection, EVENT)
        with pytest.raises(InvalidEvent) as info:
            record_event(connection, event(id="evt_bad", occurred_at="soon"))
        assert info.value.field == "occurred_at"
        again = record_events(connection, [EVENT, event(id="evt_2")])
    assert first.written == 2
    assert again[0].skipped == "duplicate" and again[0].message_ids == first.message_ids
    assert again[1].written == 2
    assert len(rows(db)) == 4 and orders(db) == ["order 1"]


def test_after_a_database_error_only_a_savepoint_keeps_the_block_usable(db: str) -> None:
    with transaction.atomic():
        place_order("order 1")
        # the inner block is a savepoint
        with pytest.raises(ProgrammingError), transaction.atomic(), connection.cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
        assert record_event(connection, EVENT).written == 2
    assert len(rows(db)) == 2 and orders(db) == ["order 1"]

    # Without one, PostgreSQL has aborted the transaction: the event is refused with the
    # error Django raises for any statement there, and the block rolls back as a whole.
    with pytest.raises(InternalError, match="aborted"), transaction.atomic():
        place_order("order 2")
        with pytest.raises(ProgrammingError), connection.cursor() as cur:
            cur.execute("SELECT * FROM no_such_table")
        record_event(connection, event(id="evt_2"))
    assert len(rows(db)) == 2 and orders(db) == ["order 1"]


def test_the_async_api_points_django_at_record_event(db: str) -> None:
    with pytest.raises(TypeError, match=r"blocking connection .*use record_event\("):
        asyncio.run(record_event_async(connection, EVENT))
    assert rows(db) == []
