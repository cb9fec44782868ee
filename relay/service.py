"""Running the relay: APScheduler jobs, the LISTEN wake-up, signals, and drain mode.

Jobs (APScheduler ``BackgroundScheduler``):

- ``deliver`` every poll interval (one worker thread): cycles until nothing is claimable and no
  wake-up arrived meanwhile. A notification (the outbox trigger's NOTIFY) runs it at once, so a
  message committed while the relay is idle goes out within milliseconds; the interval is the
  fallback for poolers in transaction mode, which drop LISTEN.
- ``rescue`` every lease/3: rows whose lease expired become claimable again.
- ``release_held`` every 5 s: held rows whose destination became usable go back to the queue
  (this also refreshes the destinations table).
- ``metrics`` every 5 s: backlog gauges.
- ``retention`` hourly, when RELAY_RETENTION_DAYS is set.

SIGTERM/SIGINT: stop taking work, let the request in flight finish and be recorded, hand back
what is still claimed, exit 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from datetime import UTC, datetime
from types import FrameType
from typing import Any

import psycopg
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler

from relay import queries as q
from relay.daemon import CycleResult, Relay
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
    """A job that logs database outages as one line and everything else with its traceback."""

    def job() -> None:
        try:
            fn()
        except DatabaseUnavailable as exc:
            log.error("%s: %s", name, exc)
        except Exception:
            log.exception("%s failed", name)

    job.__name__ = name
    return job


class Service:
    """``relay run``: the scheduled daemon."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.totals = CycleResult()
        self._delivering = threading.Lock()
        self.scheduler = BackgroundScheduler(
            executors={
                "default": ThreadPoolExecutor(1),
                "deliver": ThreadPoolExecutor(1),
            },
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )
        self.listener = Listener(relay, self._notified)

    def _notified(self) -> None:
        self.relay.wake()
        if not self._delivering.locked():
            job = self.scheduler.get_job("deliver")
            if job is not None:
                job.modify(next_run_time=datetime.now(UTC))

    def deliver(self) -> None:
        with self._delivering:
            while not self.relay.stopping.is_set():
                self.relay.wakeup.clear()
                result = self.relay.deliver_once()
                self.totals.add(result)
                if result.claimed == 0 and not self.relay.wakeup.is_set():
                    return

    def start(self) -> None:
        s = self.relay.settings
        self.relay.refresh_destinations()
        sch = self.scheduler
        sch.add_job(
            _guard("deliver", self.deliver),
            "interval",
            seconds=s.poll_interval_s,
            id="deliver",
            executor="deliver",
            # A wake-up that lands after a run has finished its loop but before APScheduler has
            # counted it finished would be skipped with max_instances=1 and wait a whole poll
            # interval. Two instances on a one-thread executor queue it instead; the
            # _delivering lock keeps runs one at a time.
            max_instances=2,
            next_run_time=datetime.now(UTC),
        )
        sch.add_job(
            _guard("rescue", self.relay.rescue),
            "interval",
            seconds=max(0.5, s.lease_s / 3),
            id="rescue",
            next_run_time=datetime.now(UTC),
        )
        sch.add_job(
            _guard("release_held", self.relay.release_held), "interval", seconds=5, id="release"
        )
        if s.vacuum_interval_s > 0:
            sch.add_job(
                _guard("vacuum", self.relay.vacuum_if_needed),
                "interval",
                seconds=max(1.0, s.vacuum_interval_s / 2),
                id="vacuum",
            )
        sch.add_job(
            _guard("metrics", self.relay.refresh_metrics), "interval", seconds=5, id="metrics"
        )
        if s.retention_days:
            from relay.retention import purge

            days = s.retention_days
            sch.add_job(
                _guard("retention", lambda: purge(self.relay.dsn, days * 86400.0)),
                "interval",
                hours=1,
                id="retention",
            )
        sch.start()
        self.listener.start()

    def stop(self) -> None:
        self.relay.stopping.set()
        self.relay.wake()
        # wait=True: the request in flight finishes and is recorded before we go on.
        self.scheduler.shutdown(wait=True)
        self.listener.join(timeout=2.0)
        try:
            released = self.relay.release_all()
            if released:
                log.info("released %d claimed messages on shutdown", released)
        except DatabaseUnavailable as exc:
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
        )
        return 0


def drain(relay: Relay, timeout_s: float | None) -> tuple[bool, CycleResult]:
    """Deliver until nothing is pending, retrying or in flight; False if ``timeout_s`` passed.

    Held messages (no usable destination) are not waited for: they are reported.
    """
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    totals = CycleResult()
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        relay.stopping.set()
        stop.set()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
    listener = Listener(relay, relay.wake)
    listener.start()
    last_services = 0.0
    try:
        while not relay.stopping.is_set():
            try:
                now = time.monotonic()
                if now - last_services >= min(1.0, relay.settings.lease_s / 3):
                    relay.rescue()
                    relay.release_held()
                    relay.vacuum_if_needed()
                    last_services = now
                relay.wakeup.clear()
                result = relay.deliver_once()
                totals.add(result)
                if result.claimed:
                    continue
                active, _held = relay.count_active()
            except DatabaseUnavailable as exc:
                # A restart or a terminated backend: reconnect on the next turn; what we had
                # in flight is rescued when its lease expires.
                log.error("drain: %s", exc)
                if deadline is not None and time.monotonic() >= deadline:
                    return False, totals
                relay.stopping.wait(relay.settings.poll_interval_s)
                continue
            if active == 0:
                return True, totals
            if deadline is not None and time.monotonic() >= deadline:
                return False, totals
            wait = relay.settings.poll_interval_s
            if deadline is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            relay.wakeup.wait(wait)
        return False, totals
    finally:
        relay.stopping.set()
        with contextlib.suppress(DatabaseUnavailable):
            relay.release_all()
        relay.close()
        # The listener is a daemon thread that notices `stopping` within its 0.5 s poll and
        # exits quietly; waiting for it would add that much to every drain.
