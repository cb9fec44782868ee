"""``relay``: the daemon and the operator's commands.

Every command reads DATABASE_URL (and the CUSTOMERIO_* settings where it needs them); with no
DATABASE_URL, ``run`` and ``demo`` use an embedded PostgreSQL kept in ./.relay-data. A bad
setting is one line on stderr and exit status 2; an unreachable database is one line and 3.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import logs
from relay.errors import ConfigError, DatabaseUnavailable, RelayError

log = logging.getLogger("relay")

EXIT_CONFIG = 2
EXIT_DATABASE = 3
EXIT_TIMEOUT = 4


def _database_url(args: argparse.Namespace, *, embedded_ok: bool) -> str:
    url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    if url:
        from relay.db import check_dsn

        return check_dsn(url)
    if not embedded_ok:
        raise ConfigError("DATABASE_URL is not set (postgresql://user@host:port/dbname)")
    from relay.embedded import DEFAULT_DATA_DIR, EmbeddedPostgres
    from relay.migrate import upgrade

    data_dir = Path(getattr(args, "data_dir", None) or DEFAULT_DATA_DIR)
    log.info("DATABASE_URL is not set: using the embedded PostgreSQL in %s", data_dir)
    server = EmbeddedPostgres(data_dir)
    dsn = server.ensure_database("relay")
    upgrade(dsn)
    return dsn


def cmd_migrate(args: argparse.Namespace) -> int:
    import sqlalchemy.exc
    from alembic.util import CommandError

    from relay import migrate
    from relay.db import first_line, redact_dsn

    if args.sql:
        # Offline: the SQL on stdout for a DBA; no DATABASE_URL is read and nothing connects.
        # Printed once complete, so a bad revision leaves no partial script behind.
        script = io.StringIO()
        try:
            migrate.upgrade_sql(script, args.revision)
        except CommandError as exc:
            raise ConfigError(f"revision {args.revision!r}: {first_line(str(exc))}") from exc
        sys.stdout.write(script.getvalue())
        return 0
    if ":" in args.revision:
        raise ConfigError(f"revision {args.revision!r}: a start:end range needs --sql")
    dsn = _database_url(args, embedded_ok=False)
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
    print(f"migrated to {args.revision}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from relay import settings as settings_mod
    from relay.daemon import Relay
    from relay.service import Service, drain

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
    dsn = _database_url(args, embedded_ok=True)
    relay = Relay(settings, dsn)
    relay.refresh_destinations()  # fails fast, as one line, when the database is unreachable
    if args.drain:
        ok, totals = drain(relay, args.timeout)
        summary = (
            f"drain {'complete' if ok else 'TIMED OUT'}: {totals.delivered} delivered, "
            f"{totals.dead} dead, {totals.coalesced} coalesced, {totals.requests} requests"
        )
        print(summary, file=sys.stderr)
        return 0 if ok else EXIT_TIMEOUT
    service = Service(relay)
    if settings.metrics_port is not None:
        from relay.health import serve_metrics

        # A port in use or a host that cannot be bound is a ConfigError: one line, exit 2.
        serve_metrics(relay, settings.metrics_port, settings.metrics_host, loop=service.loop)
    return service.run_forever()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay",
        description="Transactional outbox relay from PostgreSQL to Customer.io's CDP API.",
    )
    p.add_argument("--log-level", default=os.environ.get("RELAY_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("RELAY_LOG_FORMAT", "text"),
    )
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
    m.set_defaults(func=cmd_migrate)

    r = sub.add_parser("run", help="run the relay daemon (or --drain and exit)")
    r.add_argument("--drain", action="store_true", help="deliver everything due, then exit 0")
    r.add_argument("--timeout", type=float, help="with --drain: give up after SECONDS (exit 4)")
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
    r.add_argument("--data-dir", help="embedded PostgreSQL folder when DATABASE_URL is unset")
    r.add_argument(
        "--insecure-skip-tls-verify",
        action="store_true",
        help="turn off TLS certificate checks towards Customer.io (logged loudly)",
    )
    r.set_defaults(func=cmd_run)

    from relay import demo, operator_cli

    operator_cli.register(sub)
    demo.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"relay: configuration error: {logs.redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    except DatabaseUnavailable as exc:
        print(f"relay: database unavailable: {logs.redact(str(exc))}", file=sys.stderr)
        return EXIT_DATABASE
    except RelayError as exc:
        print(f"relay: {logs.redact(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
