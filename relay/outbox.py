"""The application's write API: record AppFunnel events in the caller's own transaction.

``record_event`` maps the event (pure, may raise ``InvalidEvent`` before any SQL runs) and
writes its messages with ONE statement on the caller's connection. It never commits, rolls
back or opens a connection: the business change and the messages commit together or not at
all. A validation error leaves the caller's transaction untouched and usable; a database error
aborts it, as any failed statement does.

Accepted connections (``record_event`` / ``record_events``): a SQLAlchemy ``Session`` or
``Connection`` (psycopg or psycopg2 driver), a psycopg 3 ``Connection``, and Django's
connection (``django.db.connection`` or ``connections[alias]``, PostgreSQL backend)::

    with transaction.atomic():
        order.save()
        record_event(django.db.connection, event)

asyncio applications await ``record_event_async`` / ``record_events_async``, with the same
semantics and results, on a SQLAlchemy ``AsyncSession`` or ``AsyncConnection`` (the
``postgresql+asyncpg`` or ``postgresql+psycopg`` driver), a psycopg 3 ``AsyncConnection`` or
an asyncpg ``Connection`` (also one from an asyncpg pool)::

    async with async_session.begin():
        async_session.add(order)
        await record_event_async(async_session, event)

    async with pool.acquire() as conn, conn.transaction():   # asyncpg
        await record_event_async(conn, event)

An asyncpg connection outside ``conn.transaction()`` commits each statement on its own, as
asyncpg does; so does a psycopg connection in autocommit mode and Django outside
``transaction.atomic()``.
"""

from __future__ import annotations

import functools
import json
import re
import sys
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from relay.errors import InvalidEvent
from relay.mapping import Event, MappingConfig, OutboxMessage, map_event_explained
from relay.queries import OUTBOX_INSERT_MESSAGES

Skipped = Literal["anonymous", "dropped", "duplicate"]
Mapped = tuple[list[OutboxMessage], str | None]

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
    inserted = _execute(conn, _insert_params(messages), "record_event") if messages else []
    return _result(messages, reason, inserted)


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
    mapped = _map_all(events, mapping)
    everything = [m for messages, _ in mapped for m in messages]
    inserted = (
        set(_execute(conn, _insert_params(everything), "record_events")) if everything else set()
    )
    return [_result(messages, reason, inserted) for messages, reason in mapped]


async def record_event_async(
    conn: Any, event: Mapping[str, Any] | Event, *, mapping: MappingConfig = DEFAULT_MAPPING
) -> RecordResult:
    """``record_event`` for asyncio connections: the same rows, checks and result."""
    messages, reason = map_event_explained(event, mapping)
    inserted = (
        await _execute_async(conn, _insert_params(messages), "record_event_async")
        if messages
        else []
    )
    return _result(messages, reason, inserted)


async def record_events_async(
    conn: Any,
    events: Iterable[Mapping[str, Any] | Event],
    *,
    mapping: MappingConfig = DEFAULT_MAPPING,
) -> list[RecordResult]:
    """``record_events`` for asyncio connections: all or nothing on bad input, one statement."""
    mapped = _map_all(events, mapping)
    everything = [m for messages, _ in mapped for m in messages]
    inserted = (
        set(await _execute_async(conn, _insert_params(everything), "record_events_async"))
        if everything
        else set()
    )
    return [_result(messages, reason, inserted) for messages, reason in mapped]


# --- the pure part, shared by both paths ------------------------------------------------------


def _map_all(events: Iterable[Mapping[str, Any] | Event], mapping: MappingConfig) -> list[Mapped]:
    mapped: list[Mapped] = []
    for i, event in enumerate(events):
        try:
            mapped.append(map_event_explained(event, mapping))
        except InvalidEvent as exc:
            raise InvalidEvent(f"events[{i}].{exc.field}", exc.reason) from exc
    return mapped


def _result(
    messages: Sequence[OutboxMessage], reason: str | None, inserted: Container[str]
) -> RecordResult:
    if not messages:
        return RecordResult(0, "anonymous" if reason == "anonymous" else "dropped", ())
    ids = tuple(m.message_id for m in messages)
    written = sum(1 for i in ids if i in inserted)
    return RecordResult(written, None if written else "duplicate", ids)


def _insert_params(messages: Sequence[OutboxMessage]) -> dict[str, str]:
    """OUTBOX_INSERT_MESSAGES's one parameter: every row in one JSON array."""
    # Each message's already-encoded body is spliced in as is rather than encoded again.
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
    return {"rows": "[" + ",".join(parts) + "]"}


_PYFORMAT_PARAM = re.compile(r"%\((\w+)\)s|%%")


@functools.cache
def _restyle(sql: str, paramstyle: str) -> tuple[str, tuple[str, ...] | None]:
    """``sql``, written with psycopg's ``%(name)s`` parameters, in another DB-API paramstyle.

    Returns the statement and, for the positional styles, the parameter names in the order
    the driver takes their values (``None`` for the styles that take a mapping). The queries
    module keeps one text per statement; this is the one place that rewrites it for drivers
    that number their parameters (asyncpg: ``numeric_dollar``, ``$1``).
    """
    if paramstyle == "pyformat":
        return sql, None
    order: list[str] = []

    def placeholder(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:  # a literal %, doubled only for the percent styles
            return "%%" if paramstyle == "format" else "%"
        if paramstyle == "named":
            return f":{name}"
        if paramstyle in ("numeric", "numeric_dollar"):
            if name not in order:
                order.append(name)
            return (":" if paramstyle == "numeric" else "$") + str(order.index(name) + 1)
        if paramstyle in ("format", "qmark"):
            order.append(name)
            return "%s" if paramstyle == "format" else "?"
        raise ValueError(f"unknown DB-API paramstyle {paramstyle!r}")

    text = _PYFORMAT_PARAM.sub(placeholder, sql)
    return text, (None if paramstyle == "named" else tuple(order))


def _bind(
    sql: str, paramstyle: str, params: Mapping[str, Any]
) -> tuple[str, Mapping[str, Any] | tuple[Any, ...]]:
    text, order = _restyle(sql, paramstyle)
    return text, (params if order is None else tuple(params[name] for name in order))


# asyncpg takes $n parameters only; derived from the one statement text.
_INSERT_NUMBERED, _INSERT_NUMBERED_ORDER = _restyle(OUTBOX_INSERT_MESSAGES, "numeric_dollar")


# --- the shell: run the statement on the caller's connection ---------------------------------


def _execute(conn: Any, params: Mapping[str, Any], caller: str) -> list[str]:
    """Run the insert on whatever connection the application handed us, in its transaction.

    Returns the message ids the statement inserted.
    """
    # SQLAlchemy first: a Session hands out the Connection bound to its current transaction
    # (beginning one if the caller has not). exec_driver_sql hands the text to the DBAPI
    # driver untouched, so it must be in the driver's own paramstyle (psycopg and psycopg2:
    # %(name)s; asyncpg under AsyncSession.run_sync: $1).
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    if isinstance(conn, Session):
        conn = conn.connection()
    if isinstance(conn, SAConnection):
        sql, args = _bind(OUTBOX_INSERT_MESSAGES, conn.dialect.paramstyle, params)
        return [r[0] for r in conn.exec_driver_sql(sql, args).fetchall()]

    import psycopg

    if isinstance(conn, psycopg.Connection):
        with conn.cursor() as cur:
            cur.execute(OUTBOX_INSERT_MESSAGES, params)
            return [r[0] for r in cur.fetchall()]

    if _is_django_connection(conn):
        # Through Django's own cursor, not the psycopg connection under it: its execute
        # wrappers and query log see the statement, its errors arrive as django.db errors,
        # and it refuses to run inside an atomic block already marked for rollback.
        if conn.vendor != "postgresql":
            raise TypeError(f"{caller} needs PostgreSQL; this Django connection is {conn.vendor}")
        with conn.cursor() as cur:
            cur.execute(OUTBOX_INSERT_MESSAGES, params)
            return [r[0] for r in cur.fetchall()]

    kind = _async_kind(conn)
    if kind is not None:
        raise TypeError(
            f"{caller} got {kind}, an asyncio connection: use `await {caller}_async(...)` "
            "on it instead"
        )
    raise TypeError(
        f"{caller} needs a SQLAlchemy Session or Connection, a psycopg 3 Connection or Django's "
        f"connection (asyncio connections: {caller}_async); got {type(conn).__name__}"
    )


async def _execute_async(conn: Any, params: Mapping[str, Any], caller: str) -> list[str]:
    """``_execute`` for asyncio connections."""
    # Only the libraries the application already imported can have made ``conn``; looking
    # them up in sys.modules keeps asyncpg and SQLAlchemy's asyncio extension optional.
    sa_async = sys.modules.get("sqlalchemy.ext.asyncio")
    if sa_async is not None:
        if isinstance(conn, sa_async.AsyncSession):
            conn = await conn.connection()
        if isinstance(conn, sa_async.AsyncConnection):
            sql, args = _bind(OUTBOX_INSERT_MESSAGES, conn.dialect.paramstyle, params)
            result = await conn.exec_driver_sql(sql, args)
            return [r[0] for r in result.fetchall()]

    import psycopg

    if isinstance(conn, psycopg.AsyncConnection):
        async with conn.cursor() as cur:
            await cur.execute(OUTBOX_INSERT_MESSAGES, params)
            return [r[0] for r in await cur.fetchall()]

    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(
        conn, (asyncpg.Connection, asyncpg.pool.PoolConnectionProxy)
    ):
        values = [params[name] for name in _INSERT_NUMBERED_ORDER or ()]
        return [r[0] for r in await conn.fetch(_INSERT_NUMBERED, *values)]

    sync = caller.removesuffix("_async")
    if _is_sync_connection(conn):
        raise TypeError(
            f"{caller} got a blocking connection ({type(conn).__name__}): use {sync}(...) on it"
        )
    raise TypeError(
        f"{caller} needs a SQLAlchemy AsyncSession or AsyncConnection, a psycopg 3 "
        f"AsyncConnection or an asyncpg Connection (blocking connections: {sync}); "
        f"got {type(conn).__name__}"
    )


def _is_django_connection(conn: Any) -> bool:
    """A Django connection: ``connections[alias]``, or ``django.db.connection`` (a proxy)."""
    # Looked up in sys.modules: an application that holds one has imported Django, and the
    # relay must not import it (or fail without it) for everybody else.
    proxies = sys.modules.get("django.utils.connection")
    base = sys.modules.get("django.db.backends.base.base")
    return (proxies is not None and isinstance(conn, proxies.ConnectionProxy)) or (
        base is not None and isinstance(conn, base.BaseDatabaseWrapper)
    )


def _async_kind(conn: Any) -> str | None:
    """What kind of asyncio connection ``conn`` is, if it is one."""
    import psycopg

    if isinstance(conn, psycopg.AsyncConnection):
        return "a psycopg AsyncConnection"
    sa_async = sys.modules.get("sqlalchemy.ext.asyncio")
    if sa_async is not None and isinstance(conn, (sa_async.AsyncSession, sa_async.AsyncConnection)):
        return f"a SQLAlchemy {type(conn).__name__}"
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is not None and isinstance(
        conn, (asyncpg.Connection, asyncpg.pool.PoolConnectionProxy)
    ):
        return "an asyncpg connection"
    return None


def _is_sync_connection(conn: Any) -> bool:
    import psycopg
    from sqlalchemy.engine import Connection as SAConnection
    from sqlalchemy.orm import Session

    return isinstance(conn, SAConnection | Session | psycopg.Connection) or _is_django_connection(
        conn
    )
