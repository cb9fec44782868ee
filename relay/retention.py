"""Retention: delete finished messages and old attempt rows, in short batches.

``purge`` is run by ``relay purge`` and, hourly, by the daemon when RELAY_RETENTION_DAYS is
set. It is safe while relays work: every batch is one short autocommit statement touching at
most ``batch_size`` rows, and it only deletes rows no relay will touch again.

What is deleted, given a cutoff of now minus ``older_than_s``:

- whole days first (migration relay_0006 partitions both tables by UTC day): a day of the
  outbox wholly older than the cutoff is dropped when none of its messages is unfinished
  (pending, retrying, in flight, held) nor dead (unless ``include_dead``); a day of attempt
  rows wholly older than the cutoff is dropped whatever its messages became. A drop costs the
  same for ten rows or ten million, and leaves no dead tuples behind. A day holding an
  unfinished message stays whole until that message is finished: the claim still reaches it
  (the claim's floor is at or below its day). A day holding a dead message stays until the
  message is retried, cancelled, or purged with ``include_dead``.
- then, row by row, what the drops left: messages that are delivered, coalesced or cancelled
  (and dead ones with ``include_dead``) and last changed before the cutoff. A coalesced message is
  kept while the message carrying its traits is unfinished. Pending, retrying, in-flight and held
  messages are never deleted.
- attempt rows started before the cutoff, whatever became of their messages.

The rows left are walked in id windows of ``batch_size`` rows, so each statement reads a bounded
range of the primary key; the walk ends at the first window written entirely after the cutoff.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, Final

import psycopg

from relay import queries as q
from relay.db import connect, first_line
from relay.errors import ConfigError, DatabaseUnavailable

log = logging.getLogger("relay.retention")

PURGEABLE_STATES: Final = ("delivered", "coalesced", "cancelled")
DEFAULT_BATCH_SIZE: Final = 5000
MAX_BATCH_SIZE: Final = 100_000

_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION: Final = re.compile(r"(\d+(?:\.\d+)?)([smhd])")

Progress = Callable[[dict[str, int]], None]


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m`` or ``3600s``.

    A unit is required: a bare ``30`` meant as days but read as seconds would purge nearly
    everything.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"{text!r} is not a duration: use a number and a unit, e.g. 30d, 12h")
    seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds <= 0:
        raise ConfigError(f"duration {text!r} must be greater than zero")
    return seconds


def purge(
    dsn: str,
    older_than_s: float,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    *,
    include_dead: bool = False,
) -> dict[str, int]:
    """Delete finished messages and attempt rows older than ``older_than_s`` seconds.

    Returns ``{"messages": n, "attempts": m, "partitions": p, "partition_rows": r}``: the rows
    deleted one by one, the day partitions dropped, and the rows those held (estimated from the
    planner's statistics: counting them would read them). ``progress``, if given, is called
    after every batch that deleted something with the running totals (same keys).
    Raises ``DatabaseUnavailable`` when the database cannot be reached.
    """
    if not older_than_s > 0:
        raise ConfigError(f"retention must be greater than zero seconds, got {older_than_s!r}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"batch size must be between 1 and {MAX_BATCH_SIZE}, got {batch_size}")
    states = [*PURGEABLE_STATES, "dead"] if include_dead else list(PURGEABLE_STATES)
    totals = {"messages": 0, "attempts": 0, "partitions": 0, "partition_rows": 0}
    with connect(dsn, autocommit=True, application_name="relay purge") as conn:
        # Each window runs with different parameters; a prepared generic plan would gain
        # nothing and could lose the primary-key range scan.
        conn.prepare_threshold = None
        try:
            _purge(conn, older_than_s, batch_size, states, totals, progress)
        except psycopg.OperationalError as exc:
            # Batches already committed stay deleted; the next run carries on from there.
            raise DatabaseUnavailable(
                f"purge interrupted after {totals['messages']} messages and "
                f"{totals['attempts']} attempts: {first_line(str(exc))}"
            ) from exc
    if totals["messages"] or totals["attempts"]:
        log.info(
            "retention: deleted %d messages and %d attempt rows older than %.0f s",
            totals["messages"],
            totals["attempts"],
            older_than_s,
        )
    return totals


def _purge(
    conn: Any,
    older_than_s: float,
    batch_size: int,
    states: list[str],
    totals: dict[str, int],
    progress: Progress | None,
) -> None:
    cutoff: datetime = _one(conn, q.RETENTION_CUTOFF, {"older_than_s": older_than_s})[0]

    try:
        dropped = conn.execute(
            q.PARTITIONS_DROP, {"cutoff": cutoff, "include_dead": "dead" in states}
        ).fetchall()
    except psycopg.errors.LockNotAvailable as exc:
        # A transaction held the outbox for over a second (lock_timeout): dropping would have
        # queued every insert and claim behind it. The days wait for the next purge.
        log.warning("retention: no day dropped this time: %s", first_line(str(exc)))
        dropped = []
    if dropped:
        totals["partitions"] += len(dropped)
        totals["partition_rows"] += sum(int(n) for _, n in dropped)
        log.info(
            "retention: dropped %d day partitions (%s), about %d rows",
            len(dropped),
            ", ".join(name for name, _ in dropped),
            totals["partition_rows"],
        )
        _report(progress, totals)

    after = 0
    while True:
        last_id, oldest_written, deleted = _one(
            conn,
            q.OUTBOX_PURGE_WINDOW,
            {"after": after, "batch": batch_size, "states": states, "cutoff": cutoff},
        )
        if deleted:
            totals["messages"] += int(deleted)
            _report(progress, totals)
        if last_id is None or oldest_written >= cutoff:
            break
        after = int(last_id)

    after_t: Any = "-infinity"
    after_id = 0
    while True:
        last_t, last_id, deleted = _one(
            conn,
            q.ATTEMPT_PURGE_BATCH,
            {"cutoff": cutoff, "after_t": after_t, "after_id": after_id, "batch": batch_size},
        )
        if deleted:
            totals["attempts"] += int(deleted)
            _report(progress, totals)
        if last_t is None:
            break
        after_t, after_id = last_t, int(last_id)


def _one(conn: Any, sql: str, params: dict[str, Any]) -> tuple[Any, ...]:
    row = conn.execute(sql, params).fetchone()
    assert row is not None  # each statement returns exactly one summary row
    return tuple(row)


def _report(progress: Progress | None, totals: dict[str, int]) -> None:
    if progress is not None:
        progress(dict(totals))
