"""record_event: the application's write path, on all three connection kinds, on real PostgreSQL."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine, pool, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from relay import InvalidEvent, record_event, record_events
from relay.db import sqlalchemy_url
from relay.mapping import MappingConfig

EVENT: dict[str, Any] = {
    "id": "evt_1",
    "type": "purchase.complete",
    "occurred_at": "2026-11-28T10:00:00Z",
    "customer": {
        "id": "cus_42",
        "email": "ada@example.com",
        "name": "Ada",
        "project_id": "prj_1",
        "marketing_consent": True,
        "created_at": 1764316800,
    },
    "properties": {"amount": 4999, "currency": "USD"},
}


def event(**changes: Any) -> dict[str, Any]:
    e = copy.deepcopy(EVENT)
    e.update(changes)
    return e


def rows(dsn: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as c:
        return c.execute(
            "SELECT kind, customer_key, project_id, event_type, state, attempts, message_id,"
            " body->>'type', body->>'messageId' FROM relay_outbox ORDER BY id"
        ).fetchall()


@pytest.fixture
def engine(dsn: str) -> Iterator[Engine]:
    eng = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    with eng.begin() as c:
        c.execute(text("CREATE TABLE orders (id serial PRIMARY KEY, note text)"))
    yield eng
    eng.dispose()


def test_psycopg_connection_commit_writes_identify_then_track(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        result = record_event(conn, EVENT)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    assert result.written == 2 and result.skipped is None and result.recorded
    got = rows(dsn)
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in got] == [
        ("identify", "cus_42", "prj_1", "purchase.complete", "pending", 0),
        ("track", "cus_42", "prj_1", "purchase.complete", "pending", 0),
    ]
    # the stored body is the Customer.io message, carrying the row's messageId
    assert [r[7] for r in got] == ["identify", "track"]
    assert all(r[6] == r[8] for r in got)
    assert list(result.message_ids) == [r[6] for r in got]


def test_psycopg_connection_rollback_leaves_no_row(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        record_event(conn, EVENT)
        conn.rollback()
    assert rows(dsn) == []


def test_sqlalchemy_session_shares_the_business_transaction(engine: Engine, dsn: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders (note) VALUES ('order 1')"))
        record_event(session, EVENT)
    assert len(rows(dsn)) == 2
    with pytest.raises(RuntimeError), Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders (note) VALUES ('order 2')"))
        record_event(session, event(id="evt_2"))
        raise RuntimeError("the application fails after writing")
    assert len(rows(dsn)) == 2
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM orders")).scalar() == 1


def test_sqlalchemy_connection_commit_and_rollback(engine: Engine, dsn: str) -> None:
    with engine.begin() as c:
        record_event(c, EVENT)
    with engine.connect() as c:
        record_event(c, event(id="evt_2"))
        c.rollback()
    from relay.mapping import map_event

    assert [r[6] for r in rows(dsn)] == [m.message_id for m in map_event(EVENT)]


def test_recording_the_same_event_twice_writes_nothing_the_second_time(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        first = record_event(conn, EVENT)
        conn.commit()
        second = record_event(conn, EVENT)
        conn.commit()
    assert first.written == 2
    assert second.written == 0 and second.skipped == "duplicate"
    assert second.message_ids == first.message_ids
    assert len(rows(dsn)) == 2


def test_anonymous_visitor_writes_nothing_and_says_so(dsn: str) -> None:
    anon = event(type="page.view", customer={"id": "cus_anon", "email": None})
    with psycopg.connect(dsn) as conn:
        result = record_event(conn, anon)
        conn.commit()
    assert result.written == 0 and result.skipped == "anonymous" and not result.recorded
    assert rows(dsn) == []


def test_dropped_event_type_writes_nothing(dsn: str) -> None:
    config = MappingConfig(event_names={"page.view": None})
    with psycopg.connect(dsn) as conn:
        result = record_event(conn, event(type="page.view"), mapping=config)
        conn.commit()
    assert result.skipped == "dropped"
    assert rows(dsn) == []


def test_renamed_event_is_tracked_under_its_new_name(dsn: str) -> None:
    config = MappingConfig(event_names={"purchase.complete": "Order Completed"})
    with psycopg.connect(dsn) as conn:
        record_event(conn, EVENT, mapping=config)
        conn.commit()
        name = conn.execute(
            "SELECT body->>'event' FROM relay_outbox WHERE kind = 'track'"
        ).fetchone()
    assert name == ("Order Completed",)


BAD_EVENTS = [
    ("type", event(type="purchase.refunded")),
    ("id", {k: v for k, v in EVENT.items() if k != "id"}),
    ("type", {k: v for k, v in EVENT.items() if k != "type"}),
    ("occurred_at", event(occurred_at="yesterday at noon")),
    ("properties.when", event(properties={"when": object()})),
    (
        "customer.marketing_consent",
        event(customer={**EVENT["customer"], "marketing_consent": "yes"}),
    ),
    ("customer.created_at", event(customer={**EVENT["customer"], "created_at": "soon"})),
    ("properties", event(properties={"blob": "x" * 33_000})),
    ("customer.name", event(customer={**EVENT["customer"], "name": "A\x00da"})),
]


@pytest.mark.parametrize(("field", "bad"), BAD_EVENTS, ids=[f for f, _ in BAD_EVENTS])
def test_bad_input_names_the_field_and_leaves_the_transaction_usable(
    dsn: str, field: str, bad: dict[str, Any]
) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE orders (id serial PRIMARY KEY)")
        conn.execute("INSERT INTO orders DEFAULT VALUES")
        with pytest.raises(InvalidEvent) as info:
            record_event(conn, bad)
        assert info.value.field.startswith(field)
        assert info.value.reason
        # the caller's transaction is intact: its own work and a good event still commit
        record_event(conn, EVENT)
        conn.commit()
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (1,)
    assert len(rows(dsn)) == 2


def test_bad_input_in_a_sqlalchemy_session_leaves_it_usable(engine: Engine, dsn: str) -> None:
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders (note) VALUES ('kept')"))
        with pytest.raises(InvalidEvent):
            record_event(session, event(type="nope"))
        record_event(session, EVENT)
    assert len(rows(dsn)) == 2


def test_record_events_is_all_or_nothing_on_bad_input(dsn: str) -> None:
    events = [event(id=f"evt_{i}") for i in range(5)]
    events[3] = event(id="evt_3", occurred_at="not a time")
    with psycopg.connect(dsn) as conn:
        with pytest.raises(InvalidEvent) as info:
            record_events(conn, events)
        assert info.value.field == "events[3].occurred_at"
        conn.commit()
    assert rows(dsn) == []


def test_record_events_writes_many_in_order_and_reports_each(dsn: str) -> None:
    events = [event(id=f"evt_{i}") for i in range(50)]
    events.append(event(id="evt_anon", customer={"id": "c2"}))
    with psycopg.connect(dsn) as conn:
        record_event(conn, events[0])
        results = record_events(conn, events)
        conn.commit()
    assert results[0].skipped == "duplicate"
    assert all(r.written == 2 for r in results[1:50])
    assert results[50].skipped == "anonymous"
    got = rows(dsn)
    assert len(got) == 100
    assert [r[0] for r in got] == ["identify", "track"] * 50


def test_rejects_unknown_connection_types(dsn: str) -> None:
    with pytest.raises(TypeError, match="SQLAlchemy Session or Connection"):
        record_event(object(), EVENT)
