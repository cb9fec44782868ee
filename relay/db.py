"""Connections: DSN handling and the relay's own psycopg connections.

Database errors are translated here, once (``database_errors``), with the psycopg error as
``__cause__``: ``DatabaseUnavailable`` when the session or the server is gone, so the daemon
reconnects; ``StatementFailed`` when the server refused one statement (a data error, a
constraint, an index limit, a timeout, a deadlock) and the session goes on, so the daemon
reports it as that, naming the SQLSTATE and the statement, and keeps its connections.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Final, Self, cast
from urllib.parse import urlsplit

import psycopg
from psycopg.abc import Params, Query
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from relay.errors import ConfigError, DatabaseUnavailable, RelayError


class StatementFailed(RelayError):
    """A statement the database refused for what it did (its data, a constraint, a limit, a
    timeout, a deadlock), its session still usable: not an outage."""

    def __init__(self, sqlstate: str | None, statement: str | None, message: str) -> None:
        self.sqlstate = sqlstate
        self.statement = statement
        super().__init__(message)


def sqlalchemy_url(dsn: str) -> str:
    """``postgresql://...`` as SQLAlchemy wants it for psycopg 3 (``postgresql+psycopg://``)."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        raise ConfigError("DATABASE_URL must look like postgresql://user@host:port/dbname")
    if scheme in ("postgres", "postgresql", "postgresql+psycopg"):
        return "postgresql+psycopg://" + rest
    raise ConfigError(f"DATABASE_URL has scheme {scheme!r}; expected postgresql://")


def check_dsn(dsn: str, name: str = "DATABASE_URL") -> str:
    """Validate a DSN's shape without connecting; returns it unchanged.

    libpq parses it as ``connect`` would, so a malformed URL, an unknown query option or a bad
    percent-escape is a ``ConfigError`` naming ``name`` here rather than a traceback later.
    The password never appears in the message, even when libpq quotes the token it choked on.
    """
    usage = f"{name} must be a URL starting with postgresql:// (postgresql://user@host:port/db)"
    try:
        scheme = urlsplit(dsn).scheme
    except ValueError as exc:  # an unclosed IPv6 bracket
        raise ConfigError(f"{usage}; {redact_dsn(dsn)} is not a valid URL: {exc}") from None
    if scheme not in ("postgres", "postgresql"):
        raise ConfigError(usage)
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        reason = _without_passwords(first_line(str(exc)), dsn)
        raise ConfigError(f"{name} {redact_dsn(dsn)}: {reason}") from None
    for port in str(params.get("port") or "").split(","):
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError(
                f"{name} {redact_dsn(dsn)}: port {port!r} is not a number from 1 to 65535"
            )
    return dsn


def dsn_password(dsn: str) -> str | None:
    """The password a DSN carries (in the user info or as ``?password=``), or None."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        return None
    return str(password) if password else None


# Where a password sits in a DSN, whatever its form, so that any text quoting one is masked:
# the user info of a URL (``//user:secret@``), a URL's query (``?password=secret``) and a
# key=value conninfo string (``password=secret`` or ``password = 'se cret'``). ``sslpassword``
# (the passphrase of a client key) is masked as well.
_URL_USERINFO = re.compile(r"(\w://[^/?#@\s:]*:)[^/?#\s]*(@)")
_URL_QUERY = re.compile(r"([?&](?:ssl)?password=)[^&#\s]*")
_KEYWORD = re.compile(r"(?<![?&\w])((?:ssl)?password\s*=\s*)(?:'(?:[^'\\]|\\.)*'|[^\s']+)")


def redact_dsn(text: str) -> str:
    """``text`` (a DSN, or a message quoting one) with every password shown as ``***``."""
    text = _URL_USERINFO.sub(r"\1***\2", text)
    text = _URL_QUERY.sub(r"\1***", text)
    return _KEYWORD.sub(r"\1***", text)


def _without_passwords(message: str, dsn: str) -> str:
    """``message`` with the raw password texts of ``dsn`` masked (libpq quotes bad tokens)."""
    raw = [m.group(0).split("=", 1)[1] for m in _URL_QUERY.finditer(dsn)]
    userinfo = _URL_USERINFO.search(dsn)
    if userinfo:
        raw.append(dsn[userinfo.end(1) : userinfo.start(2)])
    for secret in sorted((r for r in raw if r), key=len, reverse=True):
        message = message.replace(secret, "***")
    return redact_dsn(message)


def connect(
    dsn: str, *, autocommit: bool = False, application_name: str = "relay"
) -> psycopg.Connection[tuple[object, ...]]:
    """A connection of the relay's commands (purge, the operator commands), JIT off
    (``queries.SESSION_NO_JIT``)."""
    from relay import queries as q

    try:
        conn = psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_dsn(dsn)}: {first_line(str(exc))}"
        ) from exc
    try:
        conn.execute(q.SESSION_NO_JIT)
        if not autocommit:
            conn.commit()
    except psycopg.OperationalError as exc:
        conn.close()
        raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
    return conn


def first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else text


Conn = psycopg.Connection[tuple[Any, ...]]


def relay_connection(dsn: str, purpose: str, instance: str) -> Conn:
    """One of the relay's own connections (claim, send, services, lease, listen).

    Its bookkeeping commits asynchronously, and JIT is off (``SESSION_ASYNC_COMMIT``). Every
    failure to get a working session is ``DatabaseUnavailable``: the session can also be cut
    between connect and its first statement (a restart, ``pg_terminate_backend``), which is an
    outage, not a crash.
    """
    from relay import queries as q

    try:
        conn = psycopg.connect(
            dsn,
            application_name=f"relay {purpose} {instance}",
            connect_timeout=10,
            cursor_factory=NamingCursor,
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


# What says the session or the server is gone, rather than one statement refused: connection
# exceptions (class 08), the server shutting down or not yet accepting sessions (57P01..57P03),
# the database dropped under the session (57P04), a session or idle-transaction timeout that
# ended the session (57P05, 25P03). Anything else the server answered left the session usable.
_SESSION_GONE: Final = frozenset({"57P01", "57P02", "57P03", "57P04", "57P05", "25P03"})


def session_lost(exc: psycopg.Error, conn: Conn) -> bool:
    """Whether ``exc`` means ``conn``'s session (or the server) is gone, not that one statement
    failed: the connection is closed or broken, the error carries a connection or shutdown
    SQLSTATE, or psycopg raised an operational error without one (the link failed before the
    server could answer)."""
    if conn.closed or conn.broken:
        return True
    sqlstate = exc.sqlstate
    if sqlstate is None:
        return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError)
    return sqlstate.startswith("08") or sqlstate in _SESSION_GONE


@functools.cache
def _statement_names() -> dict[str, str]:
    from relay import queries as q

    return {v: k for k, v in vars(q).items() if k.isupper() and isinstance(v, str)}


def statement_name(query: object) -> str | None:
    """The name of a statement of ``relay.queries`` (``OUTBOX_CLAIM_MARK``), or None."""
    return _statement_names().get(query) if isinstance(query, str) else None


class NamingCursor(psycopg.Cursor[Any]):
    """The relay's cursors: an error from a statement of ``relay.queries`` carries the
    statement's name (``relay_statement``), which is all a log line needs to place it."""

    def execute(
        self,
        query: Query,
        params: Params | None = None,
        *,
        prepare: bool | None = None,
        binary: bool | None = None,
    ) -> Self:
        try:
            # One call for both of psycopg's overloads (a Template takes no params).
            run = cast("Callable[..., Self]", super().execute)
            return run(query, params, prepare=prepare, binary=binary)
        except psycopg.Error as exc:
            exc.relay_statement = statement_name(query)  # type: ignore[attr-defined]
            raise


def statement_failed(exc: psycopg.Error) -> StatementFailed:
    """``exc`` as one line: the statement, the SQLSTATE and its name, the server's message."""
    name: str | None = getattr(exc, "relay_statement", None)
    message = exc.diag.message_primary or first_line(str(exc)) or type(exc).__name__
    code = f"SQLSTATE {exc.sqlstate}" if exc.sqlstate else "no SQLSTATE (raised by the driver)"
    return StatementFailed(
        exc.sqlstate,
        name,
        f"statement {name or '(unnamed)'} failed: {code} ({type(exc).__name__}): {message}",
    )


@contextmanager
def database_errors(conn: Conn, on_lost: Callable[[], None] | None = None) -> Iterator[Conn]:
    """Use ``conn``; translate what psycopg raises (the psycopg error as ``__cause__``).

    A lost session becomes ``DatabaseUnavailable``, after closing ``conn`` and calling
    ``on_lost``. A statement the server refused becomes ``StatementFailed`` and ``conn`` stays
    open, rolled back if the error left it in a failed transaction: a data error is not an
    outage, and reconnecting would only meet it again. The one place the relay maps psycopg's
    errors, the way httpx maps httpcore's."""
    try:
        yield conn
    except psycopg.Error as exc:
        if not session_lost(exc, conn):
            try:
                if conn.info.transaction_status == TransactionStatus.INERROR:
                    conn.rollback()
            except psycopg.Error:
                pass  # the rollback found the session gone: an outage after all
            else:
                raise statement_failed(exc) from exc
        conn.close()
        if on_lost is not None:
            on_lost()
        raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
