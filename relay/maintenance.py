"""The relay's background services: lease rescue, held release, partitions and the claim's
floor, vacuum, backlog metrics.

Each is one function of the relay, run periodically by the scheduler (``relay.service``) on
the services connection. None of them sends anything; they only make rows claimable again or
report. The lease *renewal* of the relay's own claims is not here: it must never wait behind
a slow service, so it runs on a thread and connection of its own (``relay.lease``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

import psycopg

from relay import queries as q
from relay.db import connect, first_line
from relay.errors import DatabaseUnavailable
from relay.models.states import UNFINISHED_STATES

if TYPE_CHECKING:
    from relay.daemon import Relay

log = logging.getLogger("relay")


def rescue(relay: Relay) -> int:
    """Make rows whose lease expired claimable again (their relay died or stalled)."""
    with relay.svc() as conn, conn.transaction():
        rows = conn.execute(q.OUTBOX_RESCUE_EXPIRED).fetchall()
    if rows:
        log.warning(
            "rescued %d in-flight messages whose lease expired",
            len(rows),
            extra=relay.log_fields(messages=len(rows)),
        )
        relay.metrics.rescues.inc(len(rows))
        relay.wake()
    return len(rows)


def release_held(relay: Relay) -> int:
    """Send held rows back to the queue once their destination is usable."""
    with relay.svc() as conn:
        relay.refresh_destinations(conn)
        with conn.transaction():
            rows = conn.execute(q.OUTBOX_RELEASE_HELD, relay.router.release_params()).fetchall()
    if rows:
        log.info(
            "released %d held messages: their destination is usable again",
            len(rows),
            extra=relay.log_fields(messages=len(rows)),
        )
        relay.wake()
    return len(rows)


PARTITION_AHEAD_DAYS = 3
"""Days of partitions kept ready beyond today: a relay down for longer leaves the events of
the days after in the DEFAULT partition, from where the next run's creation moves them."""


FLOOR_WAIT_S: Final = 2.0
"""How long one run of the partitions job waits for the transactions a floor raise noted to
end, before it leaves the raise to the next run (``waiting``)."""
FLOOR_WAIT_POLL_S: Final = 0.05


def manage_partitions(relay: Relay) -> dict[str, Any]:
    """Create the coming days' partitions, then take the claim's floor up to three steps on
    (publish, note the running transactions, raise: each its own transaction, see
    ``relay_outbox_floor_advance``). Returns ``{"created": n, "floor": [steps]}``."""
    done: dict[str, Any] = {"created": 0, "floor": []}
    if relay.partitions_disabled:
        return done
    try:
        # Autocommit: each call's locks (the floor row, a partition being attached) end with
        # the statement on the server, even if this process stalls before it could COMMIT;
        # an application inserting a late event may be waiting for that floor row.
        with connect(
            relay.dsn, autocommit=True, application_name=f"relay partitions {relay.instance}"
        ) as conn:
            row = conn.execute(q.PARTITIONS_ENSURE, {"ahead_days": PARTITION_AHEAD_DAYS}).fetchone()
            done["created"] = cast(int, row[0]) if row else 0
            deadline = time.monotonic() + FLOOR_WAIT_S
            while len(done["floor"]) < 3:
                row = conn.execute(q.FLOOR_ADVANCE).fetchone()
                step = row[0] if row else None
                if step == "waiting" and time.monotonic() < deadline:
                    # The transactions noted one step ago are the application's, usually
                    # milliseconds long: wait them out here rather than a whole job interval,
                    # or the floor trails the backlog by a minute and the claim reads a day
                    # more than it needs to.
                    time.sleep(FLOOR_WAIT_POLL_S)
                    continue
                done["floor"].append(step)
                if step in ("unchanged", "waiting", "raised"):
                    break
    except psycopg.errors.InsufficientPrivilege as exc:
        relay.partitions_disabled = True
        log.warning(
            "not managing partitions (%s): grant relay_worker EXECUTE on "
            "relay_partitions_ensure and relay_outbox_floor_advance (migration relay_0006)",
            first_line(str(exc)),
            extra=relay.log_fields(),
        )
        return done
    except psycopg.errors.LockNotAvailable as exc:
        # A long transaction held the DEFAULT partition, or the floor row (an application
        # transaction that wrote a late event): the next run tries again.
        log.warning("partitions: waited too long for a lock: %s", first_line(str(exc)))
        return done
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"partitions: {first_line(str(exc))}") from exc
    if done["created"]:
        log.info("created %d day partitions", done["created"], extra=relay.log_fields())
    return done


def refresh_metrics(relay: Relay) -> dict[str, Any]:
    with relay.svc() as conn, conn.transaction():
        rows = conn.execute(q.OUTBOX_BACKLOG).fetchall()
    oldest = 0.0
    for state in UNFINISHED_STATES:
        relay.metrics.backlog.labels(state).set(0)
    for state, n, oldest_s in rows:
        relay.metrics.backlog.labels(state).set(n)
        oldest = max(oldest, oldest_s or 0.0)
    relay.metrics.oldest.set(oldest)
    return {state: n for state, n, _ in rows}


def count_active(relay: Relay) -> tuple[int, int]:
    """(pending + retrying + in flight, held): what a drain still waits for, and reports."""
    with relay.svc() as conn, conn.transaction():
        row = conn.execute(q.OUTBOX_COUNT_ACTIVE).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def vacuum_if_needed(relay: Relay) -> bool:
    """VACUUM the outbox when its dead tuples pile up and nothing else has vacuumed it.

    Autovacuum is the first line (the table's own settings make it eager); this covers
    servers where it is off or behind, where the claim otherwise slows as dead index
    entries accumulate (measured: p50 commit-to-received 2.3 s at 500 events/s with
    autovacuum off, 3 ms with a vacuum every second). Returns whether it vacuumed.
    """
    if relay.vacuum_disabled:
        return False
    s = relay.settings
    with relay.svc() as conn, conn.transaction():
        row = conn.execute(q.OUTBOX_VACUUM_STATS).fetchone()
    if row is None:
        return False
    dead, since_s, _autovacuum = row
    if dead < s.vacuum_min_dead or (since_s is not None and since_s < s.vacuum_interval_s):
        return False
    try:
        with psycopg.connect(
            relay.dsn, autocommit=True, application_name=f"relay vacuum {relay.instance}"
        ) as conn:
            got = conn.execute(q.OUTBOX_VACUUM_TRY_LOCK).fetchone()
            if not got or not got[0]:
                return False
            try:
                conn.execute(q.OUTBOX_VACUUM)
            finally:
                conn.execute(q.OUTBOX_VACUUM_UNLOCK)
    except psycopg.errors.InsufficientPrivilege as exc:
        relay.vacuum_disabled = True
        log.warning("not vacuuming relay_outbox (%s); leaving it to autovacuum", exc)
        return False
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"vacuum: {first_line(str(exc))}") from exc
    log.debug("vacuumed relay_outbox (%d dead tuples)", dead)
    return True
