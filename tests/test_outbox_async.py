"""record_event_async / record_events_async on every asyncio connection kind, on real PostgreSQL.

Each kind is one way an asyncio application holds a transaction: a SQLAlchemy ``AsyncSession``
or ``AsyncConnection`` on the asyncpg and on the psycopg driver, a psycopg 3
``AsyncConnection``, and a raw asyncpg connection (alone or from a pool). The tests are plain
functions that drive their coroutine with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
import psycopg
import pytest
from sqlalchemy import URL, pool, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from relay import (
    InvalidEvent,
    record_event,
    record_event_async,
    record_events,
    record_events_async,
)
from relay.mapping import map_event
from relay.outbox import _restyle
from relay.queries import OUTBOX_INSERT_MESSAGES
from tests.test_outbox import EVENT, event, rows


def _connect_args(dsn: str) -> dict[str, Any]:
    """The libpq URL's parts (a host may be a socket directory, given as ?host=)."""
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    return {
        "host": parts.hostname or query.get("host", ["127.0.0.1"])[0],
        "port": parts.port or int(query.get("port", ["5432"])[0]),
        "user": parts.username or "postgres",
        "password": parts.password,
        "database": parts.path.lstrip("/"),
    }


def sqlalchemy_async_url(dsn: str, driver: str) -> URL:
    a = _connect_args(dsn)
    return URL.create(
        f"postgresql+{driver}",
        username=a["user"],
        password=a["password"],
        host=a["host"],
        port=a["port"],
        database=a["database"],
    )


@dataclass
class App:
    """An application's open transaction: what it hands the relay, and its own controls."""

    conn: Any
    execute: Callable[[str], Awaitable[object]]
    commit: Callable[[], Awaitable[object]]
    rollback: Callable[[], Awaitable[object]]


@asynccontextmanager
async def sqlalchemy_session(dsn: str, driver: str) -> AsyncIterator[App]:
    engine = create_async_engine(sqlalchemy_async_url(dsn, driver), poolclass=pool.NullPool)
    try:
        async with AsyncSession(engine) as session:

            async def execute(sql: str) -> object:
                return await session.execute(text(sql))

            yield App(session, execute, session.commit, session.rollback)
    finally:
        await engine.dispose()


@asynccontextmanager
async def sqlalchemy_connection(dsn: str, driver: str) -> AsyncIterator[App]:
    engine = create_async_engine(sqlalchemy_async_url(dsn, driver), poolclass=pool.NullPool)
    try:
        async with engine.connect() as conn:

            async def execute(sql: str) -> object:
                return await conn.execute(text(sql))

            yield App(conn, execute, conn.commit, conn.rollback)
    finally:
        await engine.dispose()


@asynccontextmanager
async def psycopg_async(dsn: str) -> AsyncIterator[App]:
    conn = await psycopg.AsyncConnection.connect(dsn)
    try:
        yield App(conn, conn.execute, conn.commit, conn.rollback)
    finally:
        await conn.close()  # closing with a transaction open discards it


class AsyncpgTransactions:
    """asyncpg has no implicit transaction: open one, and a new one after each commit."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.tr: Any = None

    async def begin(self) -> None:
        self.tr = self.conn.transaction()
        await self.tr.start()

    async def commit(self) -> None:
        await self.tr.commit()
        await self.begin()

    async def rollback(self) -> None:
        await self.tr.rollback()
        await self.begin()


@asynccontextmanager
async def asyncpg_connection(dsn: str) -> AsyncIterator[App]:
    conn = await asyncpg.connect(**_connect_args(dsn))
    try:
        txn = AsyncpgTransactions(conn)
        await txn.begin()
        yield App(conn, conn.execute, txn.commit, txn.rollback)
    finally:
        await conn.close()


@asynccontextmanager
async def asyncpg_pool(dsn: str) -> AsyncIterator[App]:
    async with (
        asyncpg.create_pool(**_connect_args(dsn), min_size=1, max_size=1) as p,
        p.acquire() as conn,
    ):
        txn = AsyncpgTransactions(conn)
        await txn.begin()
        try:
            yield App(conn, conn.execute, txn.commit, txn.rollback)
        finally:
            await txn.tr.rollback()


KINDS: dict[str, Callable[[str], Any]] = {
    "sa-session-asyncpg": lambda dsn: sqlalchemy_session(dsn, "asyncpg"),
    "sa-session-psycopg": lambda dsn: sqlalchemy_session(dsn, "psycopg"),
    "sa-connection-asyncpg": lambda dsn: sqlalchemy_connection(dsn, "asyncpg"),
    "sa-connection-psycopg": lambda dsn: sqlalchemy_connection(dsn, "psycopg"),
    "psycopg-async": psycopg_async,
    "asyncpg": asyncpg_connection,
    "asyncpg-pool": asyncpg_pool,
}
kinds = pytest.mark.parametrize("kind", list(KINDS))


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def db(dsn: str) -> Iterator[str]:
    """A fresh migrated database with the application's own table."""
    with psycopg.connect(dsn) as c:
        c.execute("CREATE TABLE orders (id serial PRIMARY KEY, note text)")
    yield dsn


def orders(dsn: str) -> list[str]:
    with psycopg.connect(dsn) as c:
        return [r[0] for r in c.execute("SELECT note FROM orders ORDER BY id")]


@kinds
def test_commit_writes_the_messages_with_the_business_change(db: str, kind: str) -> None:
    async def scenario() -> Any:
        async with KINDS[kind](db) as app:
            await app.execute("INSERT INTO orders (note) VALUES ('order 1')")
            result = await record_event_async(app.conn, EVENT)
            # still the caller's open transaction: nothing is visible from outside yet
            assert rows(db) == [] and orders(db) == []
            await app.commit()
            return result

    result = run(scenario())
    assert result.written == 2 and result.skipped is None and result.recorded
    got = rows(db)
    assert [(r[0], r[1], r[3], r[4]) for r in got] == [
        ("identify", "cus_42", "purchase.complete", "pending"),
        ("track", "cus_42", "purchase.complete", "pending"),
    ]
    expected_ids = [m.message_id for m in map_event(EVENT)]
    assert list(result.message_ids) == [r[6] for r in got] == expected_ids
    assert all(r[6] == r[8] for r in got)  # the body carries the row's messageId
    assert orders(db) == ["order 1"]


@kinds
def test_rollback_leaves_no_row(db: str, kind: str) -> None:
    async def scenario() -> None:
        async with KINDS[kind](db) as app:
            await app.execute("INSERT INTO orders (note) VALUES ('order 1')")
            result = await record_event_async(app.conn, EVENT)
            assert result.written == 2
            await app.rollback()

    run(scenario())
    assert rows(db) == [] and orders(db) == []


@kinds
def test_the_same_event_twice_is_a_duplicate(db: str, kind: str) -> None:
    async def scenario() -> tuple[Any, Any]:
        async with KINDS[kind](db) as app:
            first = await record_event_async(app.conn, EVENT)
            await app.commit()
            second = await record_event_async(app.conn, EVENT)
            await app.commit()
            return first, second

    first, second = run(scenario())
    assert first.written == 2 and first.skipped is None
    assert second.written == 0 and second.skipped == "duplicate" and not second.recorded
    assert second.message_ids == first.message_ids
    assert len(rows(db)) == 2


@kinds
def test_invalid_event_raises_before_sql_and_leaves_the_transaction_usable(
    db: str, kind: str
) -> None:
    async def scenario() -> None:
        async with KINDS[kind](db) as app:
            await app.execute("INSERT INTO orders (note) VALUES ('kept')")
            with pytest.raises(InvalidEvent) as info:
                await record_event_async(app.conn, event(occurred_at="yesterday at noon"))
            assert info.value.field == "occurred_at" and info.value.reason
            with pytest.raises(InvalidEvent) as many:
                await record_events_async(app.conn, [event(id="evt_ok"), event(type="nope")])
            assert many.value.field == "events[1].type"
            # a failed statement would have aborted the transaction; these still run
            assert (await record_event_async(app.conn, EVENT)).written == 2
            await app.commit()

    run(scenario())
    assert orders(db) == ["kept"]
    assert [r[6] for r in rows(db)] == [m.message_id for m in map_event(EVENT)]


@kinds
def test_record_events_async_writes_many_in_order_and_reports_each(db: str, kind: str) -> None:
    events = [event(id=f"evt_{i}") for i in range(5)]
    events.append(event(id="evt_anon", customer={"id": "cus_anon"}))

    async def scenario() -> list[Any]:
        async with KINDS[kind](db) as app:
            await record_event_async(app.conn, events[2])
            results = await record_events_async(app.conn, events)
            await app.commit()
            return results

    results = run(scenario())
    assert [(r.written, r.skipped) for r in results] == [
        (2, None),
        (2, None),
        (0, "duplicate"),
        (2, None),
        (2, None),
        (0, "anonymous"),
    ]
    assert results[5].message_ids == ()
    got = rows(db)
    assert [r[0] for r in got] == ["identify", "track"] * 5
    written_order = [events[2], events[0], events[1], events[3], events[4]]
    assert [r[6] for r in got] == [m.message_id for e in written_order for m in map_event(e)]


def test_async_and_sync_paths_write_the_same_rows(dsn: str) -> None:
    """The async path is the sync one with another shell: same messages, same bodies."""
    other = event(id="evt_2")

    async def scenario() -> None:
        async with psycopg_async(dsn) as app:
            await record_event_async(app.conn, EVENT)
            await app.commit()

    run(scenario())
    with psycopg.connect(dsn) as conn:
        record_event(conn, other)
        conn.commit()
        bodies = conn.execute(
            "SELECT event_id, kind, body - 'messageId' - 'userId' FROM relay_outbox ORDER BY id"
        ).fetchall()
    assert [(b[0], b[1]) for b in bodies] == [
        ("evt_1", "identify"),
        ("evt_1", "track"),
        ("evt_2", "identify"),
        ("evt_2", "track"),
    ]
    assert bodies[0][2] == bodies[2][2] and bodies[1][2] == bodies[3][2]


def test_sync_record_event_works_inside_run_sync_on_asyncpg(db: str) -> None:
    """Code that still calls the blocking API through AsyncSession.run_sync keeps working."""

    async def scenario() -> Any:
        async with sqlalchemy_session(db, "asyncpg") as app:
            session = app.conn
            await app.execute("INSERT INTO orders (note) VALUES ('order 1')")
            result = await session.run_sync(lambda s: record_event(s, EVENT))
            many = await session.run_sync(lambda s: record_events(s, [event(id="evt_2")]))
            await app.commit()
            return result, many

    result, many = run(scenario())
    assert result.written == 2 and many[0].written == 2
    assert len(rows(db)) == 4 and orders(db) == ["order 1"]


@kinds
def test_the_blocking_api_names_the_async_one_when_handed_an_async_connection(
    dsn: str, kind: str
) -> None:
    async def scenario() -> None:
        async with KINDS[kind](dsn) as app:
            with pytest.raises(TypeError, match=r"asyncio connection.*await record_event_async"):
                record_event(app.conn, EVENT)
            with pytest.raises(TypeError, match=r"await record_events_async"):
                record_events(app.conn, [EVENT])

    run(scenario())
    assert rows(dsn) == []


def test_the_async_api_names_the_blocking_one_when_handed_a_blocking_connection(
    dsn: str,
) -> None:
    with psycopg.connect(dsn) as conn:
        with pytest.raises(TypeError, match=r"blocking connection .*use record_event\("):
            run(record_event_async(conn, EVENT))
        with pytest.raises(TypeError, match=r"use record_events\("):
            run(record_events_async(conn, [EVENT]))
    with pytest.raises(TypeError, match=r"AsyncSession or AsyncConnection.*got object"):
        run(record_event_async(object(), EVENT))
    assert rows(dsn) == []


def test_the_numbered_form_is_derived_from_the_one_statement() -> None:
    numbered, order = _restyle(OUTBOX_INSERT_MESSAGES, "numeric_dollar")
    assert order == ("rows",)
    assert "jsonb_to_recordset($1::jsonb)" in numbered
    assert "%" not in numbered
    assert numbered == OUTBOX_INSERT_MESSAGES.replace("%(rows)s", "$1")
    # a repeated name keeps its number; other positional styles repeat the value
    sql = "SELECT %(a)s, %(b)s, %(a)s, '100%%'"
    assert _restyle(sql, "numeric_dollar") == ("SELECT $1, $2, $1, '100%'", ("a", "b"))
    assert _restyle(sql, "format") == ("SELECT %s, %s, %s, '100%%'", ("a", "b", "a"))
    assert _restyle(sql, "named") == ("SELECT :a, :b, :a, '100%'", None)
    assert _restyle(sql, "pyformat") == (sql, None)
    with pytest.raises(ValueError, match="paramstyle 'dollar'"):
        _restyle(sql, "dollar")
