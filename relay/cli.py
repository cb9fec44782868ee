"""``relay``: the daemon and the operator's commands.

Every command reads DATABASE_URL (or the file DATABASE_URL_FILE names) and the CUSTOMERIO_*
settings where it needs them, and checks every setting before it starts anything. ``relay
run`` never picks a database by itself: without DATABASE_URL it refuses to start, unless
``--embedded`` asks for the embedded PostgreSQL in ./.relay-data (a local try-out); ``relay
demo`` uses that one by default.

A refusal is one line on stderr; the exit status says which kind (docs/reference.md, "The command
line", has the same table)::

    0    done
    1    any other failure (a permission the role lacks, a failed migration, a demo check)
    2    a bad or missing setting, flag or argument; nothing was started or changed
    3    the database cannot be reached
    4    run --drain: the timeout passed with messages still to send
    5    the database's schema is not this relay's: relay migrate (or a newer relay)
    130  interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import io
import json
import logging
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

from relay import logs
from relay.errors import ConfigError, DatabaseUnavailable, NotMigrated, RelayError

if TYPE_CHECKING:
    from relay.daemon import Relay

log = logging.getLogger("relay")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_TIMEOUT = 4
EXIT_NOT_MIGRATED = 5
EXIT_INTERRUPTED = 130

DISTRIBUTION = "appfunnel-cio-relay"


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a checkout that was never installed
        return "unknown"


def _database_url(args: argparse.Namespace, *, embedded_ok: bool) -> str:
    """DATABASE_URL (or DATABASE_URL_FILE), checked; with ``embedded_ok`` and neither set, the
    embedded server in ``args.data_dir``, started and migrated."""
    from relay.settings import database_url

    url = database_url()
    if url:
        return url
    if not embedded_ok:
        raise ConfigError("DATABASE_URL is not set (postgresql://user@host:port/dbname)")
    return _embedded_database(getattr(args, "data_dir", None))


def _embedded_database(data_dir_arg: str | None) -> str:
    from relay.embedded import DEFAULT_DATA_DIR, EmbeddedPostgres
    from relay.migrate import upgrade

    data_dir = Path(data_dir_arg or DEFAULT_DATA_DIR)
    log.info("using the embedded PostgreSQL in %s (a local try-out)", data_dir)
    server = EmbeddedPostgres(data_dir)
    dsn = server.ensure_database("relay")
    upgrade(dsn)
    return dsn


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=str))


# --- the schema the relay runs on ----------------------------------------------------------


def _schema(
    dsn: str, doing: str = "cannot connect to the database at"
) -> tuple[tuple[str, ...], bool]:
    """(the revisions ``relay_alembic_version`` holds, whether ``relay_outbox`` exists).

    The revisions are () when the version table is missing, and also when this role may not
    read it (relay_worker is not granted it): the catalog still shows the tables. An
    unreachable database is ``DatabaseUnavailable``: "``doing`` <the DSN>: <why>"."""
    import psycopg
    import sqlalchemy.exc
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import create_engine, inspect, pool

    from relay.db import first_line, redact_dsn, sqlalchemy_url
    from relay.migrate import VERSION_TABLE

    engine = create_engine(
        sqlalchemy_url(dsn),
        poolclass=pool.NullPool,
        connect_args={"connect_timeout": 10, "application_name": "relay schema check"},
    )
    # Alembic announces its context at INFO on every configure: noise before a daemon starts.
    quiet = logging.getLogger("alembic.runtime.migration")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with engine.connect() as conn:
            has_outbox = inspect(conn).has_table("relay_outbox")
            ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            try:
                return tuple(ctx.get_current_heads()), has_outbox
            except sqlalchemy.exc.ProgrammingError as exc:
                if isinstance(exc.orig, psycopg.errors.InsufficientPrivilege):
                    return (), has_outbox
                raise
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"{doing} {redact_dsn(dsn)}: {first_line(str(exc.orig or exc))}"
        ) from exc
    finally:
        quiet.setLevel(level)
        engine.dispose()


def _require_migrated(dsn: str) -> None:
    """``NotMigrated`` unless the database holds this relay's head revision.

    Read from ``relay_outbox``'s comment (``relay.migrate.schema_problem``), which every role
    may read and every way of migrating writes.
    """
    import psycopg

    from relay import queries as q
    from relay.db import first_line, redact_dsn
    from relay.migrate import schema_problem

    try:
        with psycopg.connect(
            dsn, connect_timeout=10, application_name="relay schema check", autocommit=True
        ) as conn:
            row = conn.execute(q.SCHEMA_REVISION).fetchone()
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(
            f"cannot connect to the database at {redact_dsn(dsn)}: {first_line(str(exc))}"
        ) from exc
    assert row is not None
    problem = schema_problem(row[0], row[1])
    if problem:
        raise NotMigrated(problem)


# --- migrate --------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    import sqlalchemy.exc
    from alembic.util import CommandError

    from relay import migrate
    from relay.db import first_line, redact_dsn

    if args.sql:
        if args.json:
            raise ConfigError("--json reports a migration that ran; --sql only prints one")
        # Offline: the SQL on stdout for a DBA; no DATABASE_URL is read and nothing connects.
        # Printed once complete, so a bad revision leaves no partial script behind.
        script = io.StringIO()
        try:
            migrate.upgrade_sql(script, args.revision)
        except CommandError as exc:
            raise ConfigError(f"revision {args.revision!r}: {first_line(str(exc))}") from exc
        sys.stdout.write(script.getvalue())
        return EXIT_OK
    if ":" in args.revision:
        raise ConfigError(f"revision {args.revision!r}: a start:end range needs --sql")
    dsn = _database_url(args, embedded_ok=False)
    before, _ = _schema(dsn, "migrating")
    try:
        migrate.upgrade(dsn, args.revision)
    except CommandError as exc:
        raise ConfigError(f"revision {args.revision!r}: {first_line(str(exc))}") from exc
    except sqlalchemy.exc.OperationalError as exc:
        raise DatabaseUnavailable(
            f"migrating {redact_dsn(dsn)}: {first_line(str(exc.orig or exc))}"
        ) from exc
    except sqlalchemy.exc.DBAPIError as exc:
        raise RelayError(f"migration failed: {first_line(str(exc.orig or exc))}") from exc
    after, _ = _schema(dsn, "migrating")
    if args.json:
        _print_json({"target": args.revision, "from": sorted(before), "revision": sorted(after)})
    else:
        print(f"migrated to {args.revision} ({', '.join(sorted(after)) or 'base'})")
    return EXIT_OK


# --- run ------------------------------------------------------------------------------------


class DrainProgress:
    """``drain: delivered N, remaining M, R msg/s`` redrawn in place on stderr, for a person
    watching a terminal: at most ``1 / REDRAW_S`` times a second. The remaining count is read
    every ``COUNT_EVERY_S`` on a connection of its own (never the relay's: those belong to the
    delivery loop's threads); in between, what this relay finished since is taken off it, so
    the line moves at every redraw and other relays' work is caught up at the next count. The
    line is cleared on exit, before the summary."""

    REDRAW_S = 0.25
    COUNT_EVERY_S = 2.0

    def __init__(self, relay: Relay, dsn: str, out: Any = None) -> None:
        self.relay = relay
        self.dsn = dsn
        self.out = out if out is not None else sys.stderr
        self.counted: int | None = None
        self.finished_at_count = 0
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-progress", daemon=True)
        self._conn: Any = None

    def __enter__(self) -> DrainProgress:
        from relay.db import connect

        try:
            self._conn = connect(self.dsn, autocommit=True, application_name="relay progress")
        except DatabaseUnavailable:
            self._conn = None  # the drain reports the outage; the line shows "remaining ?"
        self._count()
        self.started = time.monotonic()
        self._draw()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.out.write("\r\x1b[K")
        self.out.flush()
        if self._conn is not None:
            self._conn.close()

    def _outcomes(self, *outcomes: str) -> int:
        """Messages this relay finished with one of ``outcomes`` (its metrics, thread-safe)."""
        total = 0.0
        for metric in self.relay.metrics.messages.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") in outcomes:
                    total += sample.value
        return int(total)

    def delivered(self) -> int:
        return self._outcomes("delivered")

    def finished(self) -> int:
        merged = 0.0
        for metric in self.relay.metrics.coalesced.collect():
            merged += sum(s.value for s in metric.samples if s.name.endswith("_total"))
        return self._outcomes("delivered", "dead") + int(merged)

    def remaining(self) -> int | None:
        if self.counted is None:
            return None
        return max(0, self.counted - (self.finished() - self.finished_at_count))

    def line(self) -> str:
        delivered = self.delivered()
        rate = delivered / max(time.monotonic() - self.started, 1e-3)
        remaining = self.remaining()
        left = "?" if remaining is None else str(remaining)
        return f"drain: delivered {delivered}, remaining {left}, {rate:.1f} msg/s"

    def _count(self) -> None:
        import psycopg

        from relay import queries as q

        if self._conn is None:
            return
        finished = self.finished()
        try:
            row = self._conn.execute(q.OUTBOX_COUNT_ACTIVE).fetchone()
        except psycopg.Error:
            return  # the estimate goes on; the drain itself reports a lost database
        if row is not None:
            self.counted, self.finished_at_count = int(row[0]), finished

    def _draw(self) -> None:
        self.out.write("\r\x1b[K" + self.line())
        self.out.flush()

    def _run(self) -> None:
        counted = time.monotonic()
        while not self._stop.wait(self.REDRAW_S):
            if time.monotonic() - counted >= self.COUNT_EVERY_S:
                self._count()
                counted = time.monotonic()
            self._draw()


def _check_run_flags(args: argparse.Namespace) -> None:
    from relay.settings import check_number

    if args.timeout is not None:
        if not args.drain:
            raise ConfigError("--timeout bounds a drain: use it with --drain")
        check_number("--timeout", args.timeout, 0, 7 * 86400, False)
    if args.json and not args.drain:
        raise ConfigError("--json reports a drain: use it with --drain")
    if args.data_dir and not args.embedded:
        raise ConfigError(
            "--data-dir is the folder of the embedded PostgreSQL: add --embedded, or drop it"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from relay import settings as settings_mod
    from relay.daemon import Relay
    from relay.service import Service, drain

    _check_run_flags(args)
    settings = settings_mod.from_env().with_overrides(
        batch_size=args.batch_size,
        concurrency=args.concurrency,
        poll_interval_s=args.poll_interval,
        lease_s=args.lease,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        instance=args.instance,
    )
    if args.insecure_skip_tls_verify:
        settings = settings.with_overrides(verify_tls=False)
        log.warning("TLS certificate verification is OFF (--insecure-skip-tls-verify)")
    logs.register_secret(settings.write_key)
    settings.require_write_key()
    if args.embedded and settings.database_url:
        raise ConfigError(
            "--embedded runs on a database of its own, but DATABASE_URL is set: unset it "
            "for the try-out, or drop --embedded"
        )
    if not args.embedded and not settings.database_url:
        raise ConfigError(
            "DATABASE_URL is not set: it names the application's database, whose outbox the "
            "relay delivers (postgresql://user@host:port/dbname); for a local try-out on an "
            "embedded PostgreSQL in ./.relay-data, run relay run --embedded"
        )
    dsn = _database_url(args, embedded_ok=args.embedded)
    log.debug("settings: %r", settings)
    _require_migrated(dsn)
    relay = Relay(settings, dsn)
    relay.refresh_destinations()  # fails fast, as one line, when the database is unreachable
    if args.drain:
        return _drain(relay, dsn, args, drain)
    service = Service(relay)
    if settings.metrics_port is not None:
        from relay.health import serve_metrics

        # A port in use or a host that cannot be bound is a ConfigError: one line, exit 2.
        serve_metrics(relay, settings.metrics_port, settings.metrics_host, loop=service.loop)
    return service.run_forever()


def _drain(relay: Relay, dsn: str, args: argparse.Namespace, drain: Any) -> int:
    started = time.monotonic()
    if sys.stderr.isatty():
        with DrainProgress(relay, dsn):
            ok, totals = drain(relay, args.timeout)
    else:
        # A log file or a pipe gets no redrawn line: only the summary below.
        ok, totals = drain(relay, args.timeout)
    if args.json:
        report = {"complete": ok, **dataclasses.asdict(totals)}
        report["elapsed_s"] = round(time.monotonic() - started, 3)
        _print_json(report)
    else:
        summary = (
            f"drain {'complete' if ok else 'TIMED OUT'}: {totals.delivered} delivered, "
            f"{totals.dead} dead, {totals.coalesced} coalesced, {totals.requests} requests"
        )
        print(summary, file=sys.stderr)
    return EXIT_OK if ok else EXIT_TIMEOUT


# --- the parser -----------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """A usage error is one line and exit 2, like every other refusal."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_CONFIG, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_global_options(p: argparse.ArgumentParser) -> None:
    """--log-level and --log-format, on the top parser and on every subcommand's, so that
    they may follow the subcommand (``relay run --log-level DEBUG``). Unset stays unset (the
    environment's value applies), so a later, empty subcommand cannot undo an earlier flag."""
    if "--log-level" in p._option_string_actions:
        return
    p.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        metavar="LEVEL",
        help="DEBUG, INFO, WARNING, ERROR or CRITICAL (RELAY_LOG_LEVEL; default INFO)",
    )
    p.add_argument(
        "--log-format",
        default=argparse.SUPPRESS,
        metavar="FORMAT",
        help="text or json, one object a line (RELAY_LOG_FORMAT; default text)",
    )


def _subparsers(p: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                out += [child, *_subparsers(child)]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="relay",
        description="Transactional outbox relay from PostgreSQL to Customer.io's CDP API.",
    )
    p.add_argument("--version", action="version", version=f"relay {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser("migrate", help="apply the schema migrations to DATABASE_URL")
    m.add_argument(
        "revision",
        nargs="?",
        default="head",
        help="target revision (default head); with --sql also a START:END range",
    )
    m.add_argument(
        "--sql",
        action="store_true",
        help="print the SQL instead of running it (no database needed; for a DBA)",
    )
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(func=cmd_migrate)

    r = sub.add_parser("run", help="run the relay daemon (or --drain and exit)")
    r.add_argument("--drain", action="store_true", help="deliver everything due, then exit 0")
    r.add_argument("--timeout", type=float, help="with --drain: give up after SECONDS (exit 4)")
    r.add_argument(
        "--json",
        action="store_true",
        help="with --drain: print one JSON object (the totals) on stdout instead of the summary",
    )
    r.add_argument("--batch-size", type=int, help="messages per request (RELAY_BATCH_SIZE)")
    r.add_argument("--concurrency", type=int, help="requests in flight at once (RELAY_CONCURRENCY)")
    r.add_argument("--poll-interval", type=float, help="seconds (RELAY_POLL_INTERVAL)")
    r.add_argument("--lease", type=float, help="lease seconds (RELAY_LEASE_SECONDS)")
    r.add_argument(
        "--metrics-port",
        type=int,
        help="serve /metrics, /livez and /readyz on this port (RELAY_METRICS_PORT)",
    )
    r.add_argument(
        "--metrics-host",
        help="address to serve them on (RELAY_METRICS_HOST; default 127.0.0.1; 0.0.0.0 or :: "
        "for every address, so other containers can scrape)",
    )
    r.add_argument("--instance", help="this relay's name in leases and attempts")
    r.add_argument(
        "--embedded",
        action="store_true",
        help="a local try-out without DATABASE_URL: an embedded PostgreSQL in ./.relay-data "
        "(or --data-dir), created and migrated as needed",
    )
    r.add_argument("--data-dir", help="with --embedded: the embedded PostgreSQL's folder")
    r.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        help="turn off TLS certificate checks towards Customer.io (logged loudly)",
    )
    r.set_defaults(func=cmd_run)

    from relay import demo, operator_cli

    operator_cli.register(sub)
    demo.register(sub)
    for parser in [p, *_subparsers(p)]:
        _add_global_options(parser)
    return p


def _log_options(args: argparse.Namespace) -> tuple[str, str]:
    """(level, format) from the flags, else RELAY_LOG_LEVEL / RELAY_LOG_FORMAT, checked."""
    import os

    flag_level = getattr(args, "log_level", None)
    flag_format = getattr(args, "log_format", None)
    level = (
        logs.check_level(flag_level, "--log-level")
        if flag_level is not None
        else logs.check_level(os.environ.get("RELAY_LOG_LEVEL") or "INFO", "RELAY_LOG_LEVEL")
    )
    fmt = (
        logs.check_format(flag_format, "--log-format")
        if flag_format is not None
        else logs.check_format(os.environ.get("RELAY_LOG_FORMAT") or "text", "RELAY_LOG_FORMAT")
    )
    return level, fmt


def _one_line(text: str) -> str:
    """An error for stderr: one line, secrets, emails and database passwords masked."""
    from relay.db import redact_dsn

    return redact_dsn(logs.redact(" ".join(text.split())))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.log_level, args.log_format = _log_options(args)
        logs.setup(args.log_level, args.log_format)
        from relay.settings import warn_unknown_variables

        warn_unknown_variables()
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: configuration error: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except DatabaseUnavailable as exc:
        print(f"relay: database unavailable: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_DATABASE
    except NotMigrated as exc:
        print(f"relay: database schema: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_NOT_MIGRATED
    except RelayError as exc:
        print(f"relay: {_one_line(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
