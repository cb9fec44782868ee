"""The application's write API: record AppFunnel events in the caller's own transaction.

``record_event`` maps the event (pure, may raise ``InvalidEvent`` before any SQL runs) and
writes its messages with ONE statement on the caller's connection. It never commits, rolls
back or opens a connection: the business change and the messages commit together or not at
all. A validation error leaves the caller's transaction untouched and usable; a database error
aborts it, as any failed statement does.

Accepted connections: a SQLAlchemy ``Session`` or ``Connection`` (on the psycopg or psycopg2
driver) and a psycopg 3 ``Connection``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.mapping import Event, MappingConfig, OutboxMessage, map_event_explained
from relay.queries import OUTBOX_INSERT_MESSAGES

Skipped = Literal["anonymous", "dropped", "duplicate"]

DEFAULT_MAPPING = MappingConfig()


@dataclass(frozen=True)
class RecordResult:
    """What ``record_event`` did with one event.

    ``written`` rows were inserted (0 or 2 today: identify then track). When nothing was
    written, ``skipped`` says why: ``anonymous`` (no email: nothing goes to Customer.io),
    ``dropped`` (the event type is mapped to nothing) or ``duplicate`` (this event id was
    recorded before). ``message_ids`` are the Customer.io messageIds of the event's messages.
    """

    written: int
    skipped: Skipped | None
    message_ids: tuple[str, ...]

    @property
    def recorded(self) -> bool:
        return self.written > 0


def record_event(
    conn: Any, event: Mapping[str, Any] | Event, *, mapping: MappingConfig = DEFAULT_MAPPING
) -> RecordResult:
    """Write ``event``'s Customer.io messages into the outbox, inside the caller's transaction."""
    messages, reason = map_event_explained(event, mapping)
    if not messages:
        return RecordResult(0, "anonymous" if reason == "anonymous" else "dropped", ())
    inserted = _insert(conn, messages)
    ids = tuple(m.message_id for m in messages)
    if not inserted:
        return RecordResult(0, "duplicate", ids)
    return RecordResult(len(inserted), None, ids)


def record_events(
    conn: Any,
    events: Iterable[Mapping[str, Any] | Event],
    *,
    mapping: MappingConfig = DEFAULT_MAPPING,
) -> list[RecordResult]:
    """Like ``record_event`` for many events, in one statement.

    Every event is validated first; if any is invalid, ``InvalidEvent`` is raised (its field is
    prefixed ``events[i].``) and nothing is written.
    """
    from relay.errors import InvalidEvent

    mapped: list[tuple[list[OutboxMessage], str | None]] = []
    for i, event in enumerate(events):
        try:
            mapped.append(map_event_explained(event, mapping))
        except InvalidEvent as exc:
            raise InvalidEvent(f"events[{i}].{exc.field}", exc.reason) from exc
    everything = [m for messages, _ in mapped for m in messages]
    inserted = set(_insert(conn, everything)) if everything else set()
    results = []
    for messages, reason in mapped:
        ids = tuple(m.message_id for m in messages)
        if not messages:
            results.append(RecordResult(0, "anonymous" if reason == "anonymous" else "dropped", ()))
            continue
        written = sum(1 for i in ids if i in inserted)
        results.append(RecordResult(written, None if written else "duplicate", ids))
    return results


def _insert(conn: Any, messages: Sequence[OutboxMessage]) -> list[str]:
    # One JSON array for all rows; each message's already-encoded body is spliced in as is
    # rather than encoded a second time.
    parts = []
    for ord_, m in enumerate(messages):
        head = json.dumps(
            {
                "ord": ord_,
                "message_id": m.message_id,
                "event_id": m.event_id,
                "kind": m.kind,
                "customer_key": m.customer_key,
                "project_id": m.project_id,
                "event_type": m.event_type,
                "occurred_at": m.occurred_at.isoformat(),
            },
            ensure_ascii=False,
        )
        parts.append(head[:-1] + ',"body":' + m.encoded.decode() + "}")
    rows = "[" + ",".join(parts) + "]"
    return [row[0] for row in _execute(conn, OUTBOX_INSERT_MESSAGES, {"rows": rows})]


def _execute(conn: Any, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
    """Run ``sql`` on whatever connection the application handed us, in its transaction."""
    # SQLAlchemy first: a Session hands out the Connection bound to its current transaction
    # (beginning one if the caller has not), and exec_driver_sql passes %(name)s through to the
    # DBAPI driver untouched.
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, SAConnection):
        return [tuple(r) for r in conn.exec_driver_sql(sql, params).fetchall()]

    import psycopg

    if isinstance(conn, psycopg.Connection):
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())
    raise TypeError(
        "record_event needs a SQLAlchemy Session or Connection, or a psycopg 3 Connection; "
        f"got {type(conn).__name__}"
    )
