"""Connections: DSN handling and the relay's own psycopg connections.

Database errors are translated here, once, into ``DatabaseUnavailable`` (with the psycopg
error as ``__cause__``) so the daemon can tell "the database went away" from a bug.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg

from relay.errors import ConfigError, DatabaseUnavailable


def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://...`` as SQLAlchemy wants it for psycopg 3 (``postgresql+psycopg://``)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL must look like postgresql://user@host:port/dbname")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg://" + rest
    raise ConfigError(f"DATABASE_URL has scheme {scheme!r}; expected postgresql://")


def check_dsn(dsn: str) -> str:
    """Validate a DSN's shape without connecting; returns it unchanged."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("postgres", "postgresql"):
        raise ConfigError("DATABASE_URL must start with postgresql:// (got a malformed URL)")
    return dsn


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for log lines."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def connect(
    dsn: str, *, autocommit: bool = False, application_name: str = "relay"
) -> psycopg.Connection[tuple[object, ...]]:
    """A relay connection. Bookkeeping commits asynchronously (see queries.py)."""
    try:
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_dsn(dsn)}: {first_line(str(exc))}"
        ) from exc


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


Conn = psycopg.Connection[tuple[Any, ...]]


def relay_connection(dsn: str, purpose: str, instance: str) -> Conn:
    """One of the relay's own connections (claim, send, services, lease, listen).

    Its bookkeeping commits asynchronously (``SESSION_ASYNC_COMMIT``). Every failure to get a
    working session is ``DatabaseUnavailable``: the session can also be cut between connect and
    its first statement (a restart, ``pg_terminate_backend``), which is an outage, not a crash.
    """
    from relay import queries as q

    try:
        conn = psycopg.connect(
            dsn, application_name=f"relay {purpose} {instance}", connect_timeout=10
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to {redact_dsn(dsn)}: {first_line(str(exc))}"
        ) from exc
    try:
        conn.execute(q.SESSION_ASYNC_COMMIT)
        conn.commit()
    except psycopg.OperationalError as exc:
        conn.close()
        raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
    return conn


@contextmanager
def database_errors(conn: Conn, on_lost: Callable[[], None] | None = None) -> Iterator[Conn]:
    """Use ``conn``; a lost session becomes ``DatabaseUnavailable`` (the psycopg error as its
    ``__cause__``), after closing it and calling ``on_lost``. The one place the relay maps
    psycopg's connection errors, the way httpx maps httpcore's."""
    try:
        yield conn
    except psycopg.OperationalError as exc:
        if isinstance(exc, psycopg.errors.DeadlockDetected | psycopg.errors.SerializationFailure):
            raise
        conn.close()
        if on_lost is not None:
            on_lost()
        raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
