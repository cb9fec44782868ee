"""The database the demo runs on: chosen, migrated, checked for others' data, cleared.

``DATABASE_URL`` (or ``DATABASE_URL_FILE``, read by ``relay.settings.database_url``) when it
is set; otherwise the embedded server in ``--data-dir``, in a database of its own
(``DEMO_DATABASE``), so the demo never shares a database with ``relay run --embedded``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from relay import queries as q
from relay.demo.funnels import EVENT_PREFIX
from relay.errors import ConfigError

DEMO_DATABASE: Final = "relay_demo"


@dataclass
class Database:
    dsn: str
    where: str
    embedded: bool
    server: Any = None  # keeps the embedded server's handle for the life of the command
    ready_s: float = 0.0


def prepare_database(args: argparse.Namespace) -> Database:
    """Connect, migrate if needed, refuse unsafe databases, remove a previous run's rows."""
    from relay.db import connect, redact_dsn
    from relay.migrate import upgrade
    from relay.settings import database_url

    t0 = time.monotonic()
    dsn = database_url()
    if dsn:
        db = Database(dsn, f"DATABASE_URL {redact_dsn(dsn)}", embedded=False)
    else:
        from relay.embedded import DEFAULT_DATA_DIR, EmbeddedPostgres

        data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
        server = EmbeddedPostgres(data_dir)
        dsn = server.ensure_database(DEMO_DATABASE)
        db = Database(
            dsn,
            f"embedded PostgreSQL in {data_dir}, database {DEMO_DATABASE}",
            embedded=True,
            server=server,
        )
    with connect(dsn) as conn:
        row = conn.execute(q.SCHEMA_REVISION).fetchone()
    # The demo's own database follows the code's schema; someone else's is migrated only when
    # it has no outbox at all, since schema changes there are its operator's decision.
    if db.embedded or not (row and row[0]):
        upgrade(dsn)
    refuse_unsafe(dsn, force=args.force)
    remove_previous_run(dsn)
    db.ready_s = time.monotonic() - t0
    return db


def refuse_unsafe(dsn: str, *, force: bool) -> None:
    """Raise ``ConfigError`` when running the demo here could harm real data.

    The demo's relay delivers whatever is due in this outbox to the local stand-in and marks
    it delivered, and another relay on this database would deliver the demo's messages to a
    real workspace. Either would be a silent loss or a pollution, so both are refused always;
    finished messages of others are merely mixed into the tables, which ``--force`` allows.
    """
    from relay.db import connect

    with connect(dsn) as conn:
        relays = conn.execute(q.SESSION_DEMO_OTHER_RELAYS).fetchone()
        counts = conn.execute(q.OUTBOX_DEMO_COUNT_OTHERS, {"prefix": EVENT_PREFIX + "%"}).fetchone()
    assert relays is not None and counts is not None
    if relays[0]:
        raise ConfigError(
            f"another relay is connected to this database ({relays[0]}); it would deliver the "
            "demo's messages to its own Customer.io workspace. Stop it, or point DATABASE_URL "
            "at another database."
        )
    unfinished, foreign = counts
    assert isinstance(unfinished, int) and isinstance(foreign, int)
    if unfinished:
        raise ConfigError(
            f"relay_outbox holds {unfinished} undelivered messages that are not the demo's; "
            "the demo's relay would send them to its local stand-in and mark them delivered. "
            "Point DATABASE_URL at an empty database (--force does not override this)."
        )
    if foreign and not force:
        raise ConfigError(
            f"relay_outbox holds {foreign} messages that are not the demo's; the demo runs on "
            "an empty outbox. Point DATABASE_URL at an empty database, or add --force to run "
            "beside them (they are left untouched)."
        )


def remove_previous_run(dsn: str) -> None:
    """Delete the rows an earlier demo left, so that its events can be recorded afresh.

    Without this, the same event ids would map to the same messageIds and be skipped as
    duplicates of the earlier run.
    """
    from relay.db import connect

    with connect(dsn) as conn, conn.transaction():
        conn.execute(q.OUTBOX_DEMO_DELETE, {"prefix": EVENT_PREFIX + "%"})
