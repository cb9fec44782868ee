"""Running the relay: one delivery loop, the scheduled maintenance, LISTEN, signals.

``relay run`` and ``relay run --drain`` run the same ``DeliveryLoop``: claim and send until
nothing is claimable, then wait for a notification (the outbox trigger's NOTIFY, through
``Listener``) or the poll interval, whichever comes first. The interval is the fallback for
poolers in transaction mode, which drop LISTEN. A drain returns once nothing is pending,
retrying or in flight (held messages are reported, not waited for).

APScheduler runs only the periodic maintenance, each job on an executor of its own kind so a
long purge or VACUUM never delays lease rescue:

- ``rescue`` (executor ``rescue``) every lease/3, at most 5 s: rows whose lease expired
  become claimable again.
- ``release_held`` and ``metrics`` (executor ``default``) every 5 s.
- ``vacuum`` and ``retention`` (executor ``slow``).

The relay's own lease renewal is not a job: it runs on a thread of its own
(``relay.lease.LeaseKeeper``), so nothing the scheduler does can delay it.

SIGTERM/SIGINT: stop taking work, let the requests in flight (of every claim) finish and be
recorded, hand back what is still claimed, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psycopg
from apscheduler.executors.pool import ThreadPoolExecutor as JobExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from relay import queries as q
from relay.daemon import CycleResult, Relay
from relay.db import StatementFailed
from relay.errors import DatabaseUnavailable

log = logging.getLogger("relay")


class Listener(threading.Thread):
    """LISTENs on the outbox channel and wakes the relay; reconnects when the link drops."""

    def __init__(self, relay: Relay, on_notify: Any) -> None:
        super().__init__(name="relay-listen", daemon=True)
        self.relay = relay
        self.on_notify = on_notify
        self.connected = threading.Event()

    def run(self) -> None:
        while not self.relay.stopping.is_set():
            try:
                with psycopg.connect(
                    self.relay.dsn,
                    autocommit=True,
                    application_name=f"relay listen {self.relay.instance}",
                    connect_timeout=10,
                ) as conn:
                    conn.execute(q.LISTEN)
                    self.connected.set()
                    while not self.relay.stopping.is_set():
                        for _ in conn.notifies(timeout=0.5, stop_after=1):
                            self.on_notify()
            except psycopg.Error as exc:
                self.connected.clear()
                if self.relay.stopping.is_set():
                    return  # shutting down: the connection went with the database or us
                log.warning("LISTEN connection lost (%s); polling until it is back", exc)
                self.relay.stopping.wait(self.relay.settings.poll_interval_s)


def _guard(name: str, fn: Any) -> Any:
    """A job that logs database outages and refused statements as one line each, and
    everything else with its traceback."""

    def job() -> None:
        try:
            fn()
        except (DatabaseUnavailable, StatementFailed) as exc:
            log.error("%s: %s", name, exc)
        except Exception:
            log.exception("%s failed", name)

    job.__name__ = name
    return job


def _log_failure(exc: BaseException, fields: dict[str, Any]) -> None:
    if isinstance(exc, DatabaseUnavailable):
        # A restart or a terminated backend: reconnect on the next turn; what we had in
        # flight is rescued when its lease expires.
        log.error("deliver: %s", exc, extra=fields)
    elif isinstance(exc, StatementFailed):
        # The database is up and refused one statement (a claim that meets an index limit, a
        # timeout): the same session tries again on the next turn.
        log.error("deliver: %s", exc, extra=fields)
    else:
        log.error("deliver failed", exc_info=exc, extra=fields)


# Claims in flight (RELAY_CLAIMS_IN_FLIGHT, default 2). With one, a cycle is claim, send, wait
# for every chain's outcome, claim again, all on the loop's thread: the sending threads idle
# while a claim is made and while a claim's last chains finish, and the claim (a few database
# round trips and the planning) is most of a cycle. With N, the loop keeps up to N claims in
# flight, each claimed and sent on a thread of its own (``Relay.deliver_claim``), on a
# claiming connection of its own; when one ends, the next starts. Claims therefore overlap
# each other's database work and each other's requests, as the claims of N relays would.
# After a wait (nothing was claimable) one claim goes first, and the others start only once
# it found something: an idle relay woken by a notification claims once, as with one.
# Why the guarantees hold, whatever the number:
#
# - Per-customer order is the database's. A customer is claimable only when it has no earlier
#   unfinished row (OUTBOX_CLAIM_HEADS, FOR UPDATE SKIP LOCKED: two claims being made at once
#   never take the same head), and a claim's rows stay in flight until their outcome is
#   recorded or they are handed back, so no claim can take a customer another claim of this
#   relay (or of any relay) still holds. A chain blocked by a failure records the failed row
#   first and hands the customer's later rows back after it, so the customer's first
#   unfinished row is still the failed one; a later claim takes the customer from there, in
#   write order. Nothing relies on claims being made one at a time: claims in flight here are
#   what the claims of several relays always were.
# - Leases: each claim has its own Lease and token; the keeper renews every open lease,
#   including those of chains still waiting for a sending thread behind another claim's;
#   each request first makes sure its rows stay ours (Lease.ensure); every outcome and
#   hand-back is fenced on its claim's token.
# - Concurrency: chains of every claim in flight share the sender's RELAY_CONCURRENCY
#   threads, so requests in flight stay at that number; a claim's own thread claims and
#   waits for its chains.
# - 429 and 401/403: the rate limiter is per destination, shared by every claim, so a pause
#   holds back every claim's next request; a destination paused by one claim's 401/403 is
#   seen by the other claims' chains before their next request (relay.send), which hold
#   their rows instead of sending.
# - Stopping and draining: the loop never returns with a claim in flight. On SIGTERM every
#   chain stops before its next request and hands back what it never sent, and the loop
#   waits for them all; a drain ends only when nothing is in flight here and nothing is
#   active in the table. Memory stays bounded by N claims' rows.
class DeliveryLoop:
    """Claim and send until stopped (or, for a drain, until nothing is left to send).

    A database outage is one log line and a wait; so is a statement the database refused
    (``StatementFailed``: SQLSTATE and statement named), which keeps the connections, since
    the database is up; any other error is logged with its traceback and the loop goes on:
    one bad cycle never stops delivery for everyone. See the comment above for how claims
    overlap.
    """

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.totals = CycleResult()
        # Monotonic time the last cycle finished (at first: when the loop was made). /livez
        # (relay.health) reports the loop stuck when it stops moving.
        self.last_cycle_finished = time.monotonic()
        # Set while the loop waits for a notification or the poll interval (nothing claimable
        # and nothing in flight).
        self.idle = threading.Event()
        # Claims in flight, each with the number of the wait it was started after: a claim
        # that found nothing holds the loop back only if no wait has passed since it started.
        self._in_flight: dict[Future[CycleResult], int] = {}
        self._waits = 0
        # The next claim goes alone (see the comment above): at the start and after a wait.
        self._alone = True

    @property
    def claims_in_flight(self) -> int:
        return len(self._in_flight)

    def _collect(self, *, block: bool) -> tuple[bool, bool]:
        """Add the finished claims' results to the totals (waiting for one first if
        ``block``). Returns (a claim failed, a claim started since the last wait found
        nothing to claim): either way the loop waits before claiming again."""
        if block and self._in_flight:
            wait(list(self._in_flight), return_when=FIRST_COMPLETED)
        failed = empty = False
        for done in [f for f in self._in_flight if f.done()]:
            started_after = self._in_flight.pop(done)
            exc = done.exception()
            if exc is not None:
                _log_failure(exc, self.relay.log_fields())
                failed = True
            else:
                result = done.result()
                self.totals.add(result)
                empty |= not result.claimed and started_after == self._waits
            self.last_cycle_finished = time.monotonic()
        return failed, empty

    def _start(self, claims: ThreadPoolExecutor | None) -> bool:
        """Start a claim (with no claim threads: claim and send it here); whether to start
        another at once."""
        relay = self.relay
        if claims is None:
            result = relay.deliver_once()
            self.totals.add(result)
            return bool(result.claimed)
        made = threading.Event()
        found: list[bool] = []

        def claimed(anything: bool) -> None:
            found.append(anything)
            made.set()

        def ended(f: Future[CycleResult]) -> None:
            made.set()  # also when the claim itself failed
            # A claim that sent something may have handed rows back, or freed a customer;
            # one that failed is logged: either way the loop looks again.
            if f.exception() is not None or f.result().claimed:
                relay.wake()

        # Only a claim that goes alone hands back what failed claims left: as with one claim
        # at a time, that happens after the loop has waited, not at once, from a claim that
        # was already under way.
        claim = claims.submit(relay.deliver_claim, claimed, hand_back=self._alone)
        claim.add_done_callback(ended)
        self._in_flight[claim] = self._waits
        if not self._alone:
            return True
        made.wait()
        if found and found[0]:
            self._alone = False
            return True
        # Nothing to claim (or the claim failed): it ends at once; collected now, so that a
        # drain that is done sees nothing in flight.
        claim.exception()
        self._collect(block=False)
        return False

    def run(self, *, until_idle: bool = False, deadline: float | None = None) -> bool:
        relay = self.relay
        poll = relay.settings.poll_interval_s
        depth = relay.settings.claims_in_flight
        claims = ThreadPoolExecutor(depth, thread_name_prefix="relay-claim") if depth > 1 else None
        try:
            while not relay.stopping.is_set():
                try:
                    relay.wakeup.clear()
                    failed, empty = self._collect(block=len(self._in_flight) >= depth)
                    if not (failed or empty) and self._start(claims):
                        continue
                    if (
                        not failed
                        and not self._in_flight
                        and until_idle
                        and relay.count_active()[0] == 0
                    ):
                        return True
                except Exception as exc:
                    _log_failure(exc, self.relay.log_fields())
                finally:
                    # A cycle that failed also finished: the loop itself is alive.
                    self.last_cycle_finished = time.monotonic()
                wait_s = poll
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    wait_s = min(wait_s, left)
                if not self._in_flight:
                    self.idle.set()
                relay.wakeup.wait(wait_s)
                self.idle.clear()
                self._waits += 1
                self._alone = True
            return False
        finally:
            # Every claim's chains finish (on SIGTERM: their requests in flight, then they
            # hand back the rest) before the loop returns and anything is released or closed.
            while self._in_flight:
                self._collect(block=True)
            if claims is not None:
                claims.shutdown(wait=True)
                relay.close_ended_claiming_conns()


class Service:
    """The relay as a process: the delivery loop, the scheduler, the listener."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.loop = DeliveryLoop(relay)
        self.scheduler = BackgroundScheduler(
            executors={
                "default": JobExecutor(1),
                "rescue": JobExecutor(1),
                "slow": JobExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self.listener = Listener(relay, relay.wake)
        self._thread: threading.Thread | None = None

    @property
    def totals(self) -> CycleResult:
        return self.loop.totals

    def start_maintenance(self) -> None:
        s = self.relay.settings
        sch = self.scheduler
        now = datetime.now(UTC)
        sch.add_job(
            _guard("rescue", self.relay.rescue),
            "interval",
            seconds=max(0.2, min(5.0, s.lease_s / 3)),
            id="rescue",
            executor="rescue",
            next_run_time=now,
        )
        sch.add_job(
            _guard("release_held", self.relay.release_held),
            "interval",
            seconds=5,
            id="release",
            next_run_time=now,
        )
        if s.vacuum_interval_s > 0:
            sch.add_job(
                _guard("vacuum", self.relay.vacuum_if_needed),
                "interval",
                seconds=max(1.0, s.vacuum_interval_s / 2),
                id="vacuum",
                executor="slow",
            )
        sch.add_job(
            _guard("metrics", self.relay.refresh_metrics), "interval", seconds=5, id="metrics"
        )
        # Partitions ahead and the claim's floor: a floor raise takes two runs at least (it
        # waits out the transactions running when it was published).
        sch.add_job(
            _guard("partitions", self.relay.manage_partitions),
            "interval",
            seconds=30,
            id="partitions",
            executor="slow",
            next_run_time=now,
        )
        if s.retention_days:
            from relay.retention import purge

            days = s.retention_days
            sch.add_job(
                _guard("retention", lambda: purge(self.relay.dsn, days * 86400.0)),
                "interval",
                hours=1,
                id="retention",
                executor="slow",
            )
        sch.start()
        self.listener.start()

    def start(self) -> None:
        self.relay.refresh_destinations()
        self.start_maintenance()
        self._thread = threading.Thread(target=self.loop.run, name="relay-deliver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.relay.stopping.set()
        self.relay.wake()
        # The requests in flight finish and are recorded before we go on.
        if self._thread is not None:
            self._thread.join()
        self.scheduler.shutdown(wait=True)
        self.listener.join(timeout=2.0)
        try:
            released = self.relay.release_all()
            if released:
                log.info(
                    "released %d claimed messages on shutdown",
                    released,
                    extra=self.relay.log_fields(messages=released),
                )
        except (DatabaseUnavailable, StatementFailed) as exc:
            log.error("could not release claimed messages (their lease will expire): %s", exc)
        self.relay.close()

    def run_forever(self) -> int:
        done = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            log.info("received %s: finishing the batch in flight", signal.Signals(signum).name)
            done.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        log.info(
            "relay %s running (batch %d, poll %.1fs, lease %.0fs)",
            self.relay.instance,
            self.relay.settings.batch_size,
            self.relay.settings.poll_interval_s,
            self.relay.settings.lease_s,
            extra=self.relay.log_fields(),
        )
        done.wait()
        self.stop()
        log.info(
            "relay %s stopped: %d delivered, %d retrying, %d dead, %d coalesced",
            self.relay.instance,
            self.totals.delivered,
            self.totals.retrying,
            self.totals.dead,
            self.totals.coalesced,
            extra=self.relay.log_fields(
                delivered=self.totals.delivered,
                retrying=self.totals.retrying,
                dead=self.totals.dead,
                coalesced=self.totals.coalesced,
            ),
        )
        return 0


def drain(relay: Relay, timeout_s: float | None) -> tuple[bool, CycleResult]:
    """Deliver until nothing is pending, retrying or in flight; False if ``timeout_s`` passed.

    The same loop as ``relay run``, on the caller's thread, with the same maintenance jobs.
    Held messages (no usable destination) are not waited for: they are reported.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    service = Service(relay)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        relay.stopping.set()
        relay.wake()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    try:
        service.start_maintenance()
        ok = service.loop.run(until_idle=True, deadline=deadline)
        return ok, service.totals
    finally:
        relay.stopping.set()
        relay.wake()
        if service.scheduler.running:
            service.scheduler.shutdown(wait=True)
        with contextlib.suppress(DatabaseUnavailable, StatementFailed):
            relay.release_all()
        relay.close()
        # The listener is a daemon thread that notices `stopping` within its 0.5 s poll and
        # exits quietly; waiting for it would add that much to every drain.
