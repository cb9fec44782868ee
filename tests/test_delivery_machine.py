"""The delivery guarantees as a stateful property: any interleaving of writes, claims, faults,
lease expiry, kills and database session kills, checked after every step.

Hypothesis drives a ``RuleBasedStateMachine`` over a real PostgreSQL and a real local
Customer.io stand-in (``FakeCustomerIO``, strict mode). Two relays share the database under
the SAME instance name (a relay restarted after a kill keeps its name), so only the per-claim
lease token tells their claims apart. A claim can be taken in one step and sent in a later one,
with anything in between: another relay's claims, lease expiry and rescue, more writes. The
relays' own delivery loop runs too (``run_loop``), claiming while its earlier claims are still
sending (relay 0 claims up to 4 customers at a time and keeps up to 2 claims in flight on one
sending thread; relay 1 claims 2 customers at a time, so the four customers make two claims,
and keeps up to 3 in flight on two threads), and is stopped at any point as SIGTERM stops it.

The outbox is partitioned by day (migration relay_0006): writes are dated today, days back or
ahead (``AGES``), so a customer's messages lie in several days' partitions and in the DEFAULT
one; ``advance_floor`` raises the claim's floor one step at a time, ``create_days`` creates
days ahead, moving rows (some in flight) out of the DEFAULT partition, and a late write lowers
the floor again. The invariants below are the same whatever the partitions do.

Time is the relays' fake monotonic clock plus back-dated database columns, never sleeps:
``expire_leases`` moves the relays' clock past the lease and back-dates every in-flight lease
in the database, as if the lease period had passed.

After every step (``invariant``): per customer, accepted messages in write order; every track
accepted after an identify holding every trait written before it; duplicates only with the
same body; nothing from a rolled-back transaction; every row the database calls delivered was
accepted by the server. At the end (``teardown``) the server turns healthy, the relays drain,
and every committed message was accepted at least once (or merged into one that was), except
the poison rows, which are dead with a reason.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
)

from relay import queries as q
from relay import record_event
from relay.daemon import Relay
from relay.errors import DatabaseUnavailable
from relay.lease import Lease
from relay.plan import ClaimPlan
from relay.service import DeliveryLoop
from relay.testing.fakecio import FakeCustomerIO
from tests import invariants
from tests.relay_helpers import KEY, funnel_event, settings_for, wait_until

LEASE_S = 5.0
FAULTS = (
    "ok",
    "500",
    "503",
    "429",
    "drop",
    "reset",
    "hang",
    "slow",
    "timeout_edge",
    "trickle",
)
CUSTOMERS = ("c1", "c2", "c3", "c4")
# How many days before today a write is dated: today, days with a partition, days older than
# every partition (DEFAULT), days ahead of them (DEFAULT until create_days).
AGES = (0, 0, 1, 3, 9, 40, -6)
POISON = ("[1, 2]", "null", '"x"', '{"type": "identify"}', '{"type": "track", "userId": "c"}')


class Killed(Exception):
    """A relay process dying at this point (kill -9): nothing after it runs."""


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class DeliveryMachine(RuleBasedStateMachine):
    dsn: str = ""
    claims = Bundle("claims")

    def __init__(self) -> None:
        super().__init__()
        self.cio = FakeCustomerIO(write_keys={KEY}).start()
        # Every timing against the relays' 0.2 s request deadline: "slow" stores after it,
        # "timeout_edge" just before it, "trickle" answers 200 in time and then trickles the
        # body past it, "hang" never answers within it.
        self.cio.slow_s = 0.3
        self.cio.edge_s = 0.15
        self.cio.trickle_s = 0.4
        self.cio.trickle_interval_s = 0.1
        self.cio.hang_s = 0.4
        self.cio.retry_after_s = 0
        self.cio.reject = lambda item: (
            "property 'reject' is refused" if item.get("properties", {}).get("reject") else None
        )
        self.clock = FakeClock()
        self.relays: list[Relay] = []
        self.written: list[invariants.Written] = []
        self.rolled_back: set[str] = set()
        self.poison: set[str] = set()
        self.rejected: set[str] = set()
        self.n = 0
        with psycopg.connect(self.dsn) as conn:
            conn.execute("TRUNCATE relay_outbox, relay_attempt, relay_throttle RESTART IDENTITY")
            conn.execute(
                "UPDATE relay_outbox_floor SET unfinished_from = '-infinity',"
                " raising_to = '-infinity', raise_xmax = NULL"
            )
            conn.execute(
                "SELECT relay_partition_create('relay_outbox', d::date)"
                " FROM generate_series((now() AT TIME ZONE 'UTC')::date - 12,"
                " (now() AT TIME ZONE 'UTC')::date, interval '1 day') AS d"
            )

    def new_relay(self, index: int) -> Relay:
        # Relay 0: claims of 4 customers, two in flight on one sending thread. Relay 1: claims
        # of 2 customers (and batches of 2 messages), three in flight on two threads.
        settings = settings_for(
            self.cio,
            lease_s=LEASE_S,
            http_timeout_s=0.2,
            backoff_base_s=0.01,
            backoff_cap_s=0.02,
            retry_after_cap_s=0.05,
            batch_size=4 - 2 * index,
            concurrency=1 + index,
            claims_in_flight=2 + index,
            instance="relay-1",
        )
        return Relay(settings, self.dsn, rand=lambda: 0.5, clock=self.clock)

    @initialize()
    def start_relays(self) -> None:
        self.relays = [self.new_relay(0), self.new_relay(1)]

    def teardown(self) -> None:
        try:
            if self.relays:
                self.final_drain()
        finally:
            for r in self.relays:
                r.close()
            self.cio.stop()

    # --- writes -----------------------------------------------------------------------------

    @rule(
        customer=st.sampled_from(CUSTOMERS),
        events=st.integers(1, 3),
        rollback=st.booleans(),
        reject=st.booleans(),
        age=st.sampled_from(AGES),
    )
    def write(self, customer: str, events: int, rollback: bool, reject: bool, age: int) -> None:
        batch = []
        when = datetime.now(UTC) - timedelta(days=age)
        for _ in range(events):
            self.n += 1
            extra = {"reject": True} if reject and self.n % 4 == 0 else {}
            e = funnel_event(customer, self.n, **extra)
            e["occurred_at"] = (when + timedelta(seconds=self.n)).isoformat()
            e["id"] = f"evt_{uuid.uuid4().hex[:8]}"
            e["customer"]["name"] = f"Name {self.n}"
            e["customer"]["city"] = f"City {self.n % 3}"
            batch.append(e)
        with psycopg.connect(self.dsn) as conn:
            for e in batch:
                record_event(conn, e)
            rows = conn.execute(
                "SELECT id, message_id, customer_key, kind, body FROM relay_outbox"
                " WHERE event_id = ANY(%s) ORDER BY id",
                ([e["id"] for e in batch],),
            ).fetchall()
            if rollback:
                conn.rollback()
                self.rolled_back.update(r[1] for r in rows)
                return
            conn.commit()
        for r in rows:
            self.written.append(invariants.Written(r[0], r[1], r[2], r[3], r[4]))
            if r[3] == "track" and r[4].get("properties", {}).get("reject"):
                self.rejected.add(r[1])

    @rule(customer=st.sampled_from(CUSTOMERS), body=st.sampled_from(POISON))
    def write_poison(self, customer: str, body: str) -> None:
        self.n += 1
        mid = f"poison-{self.n}"
        kind = "track" if '"track"' in body else "identify"
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute(
                "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key,"
                " event_type, body, occurred_at) VALUES (%s, %s, %s, %s, 'page.view',"
                " %s::jsonb, now()) RETURNING id, body",
                (mid, mid, kind, customer, body),
            ).fetchone()
            conn.commit()
        assert row is not None
        self.written.append(invariants.Written(row[0], mid, customer, kind, row[1]))
        self.poison.add(mid)

    # --- partitions and the claim's floor ------------------------------------------------------

    @rule()
    def advance_floor(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(q.FLOOR_ADVANCE)

    @rule(ahead=st.integers(3, 8))
    def create_days(self, ahead: int) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            conn.execute(q.PARTITIONS_ENSURE, {"ahead_days": ahead})

    # --- relays -----------------------------------------------------------------------------

    def _script(self, faults: list[str]) -> None:
        """The next requests' faults, and no others (leftovers of a step that sent nothing
        would otherwise hit a later step's requests)."""
        self.cio.clear_script()
        self.cio.script(faults)

    def _settle(self) -> None:
        # A "slow" fault stores its items after the client gave up; let the server finish
        # before the next step, so the late acceptance lands now rather than at random.
        self.cio.wait_for(lambda: len(self.cio.requests) >= self.cio.requests_arrived, 5.0)

    @rule(relay=st.integers(0, 1), faults=st.lists(st.sampled_from(FAULTS), max_size=4))
    def deliver(self, relay: int, faults: list[str]) -> None:
        self._script(faults)
        try:
            self.relays[relay].deliver_once()
        except DatabaseUnavailable:
            pass
        finally:
            self.cio.clear_script()
            self._settle()

    @rule(target=claims, relay=st.integers(0, 1))
    def claim(self, relay: int) -> Any:
        """Claim now, send in a later step: anything may happen in between.

        A claim that took nothing (or met a database error) is kept too, as nothing to send:
        what a claim finds depends on the timing of the threads of earlier steps, and the
        number of claims held must not, or Hypothesis could not replay a sequence of steps.
        """
        r = self.relays[relay]
        try:
            with r._work() as conn:
                _, plan, lease = r._claim(conn)
        except DatabaseUnavailable:
            return (relay, r, None, None)
        return (relay, r, plan, lease)

    @rule(
        held=consumes(claims),
        faults=st.lists(st.sampled_from(FAULTS), max_size=3),
    )
    def send_claimed(
        self, held: tuple[int, Relay, ClaimPlan | None, Lease | None], faults: list[str]
    ) -> None:
        _, r, plan, lease = held
        if r not in self.relays:
            return  # that relay was killed: its claim died with it
        if plan is None or lease is None:
            return  # the claim took nothing
        self._script(faults)
        try:
            with r._work() as conn:
                for unit in plan.work.values():
                    r.sender.send_destination(conn, unit, lease)
        except DatabaseUnavailable:
            pass
        finally:
            self.cio.clear_script()
            self._settle()

    @rule(
        relay=st.integers(0, 1),
        where=st.sampled_from(["after_claim", "after_send"]),
        faults=st.lists(st.sampled_from(FAULTS), max_size=2),
    )
    def kill(self, relay: int, where: str, faults: list[str]) -> None:
        """kill -9 mid-cycle; a new process takes the dead one's place (same name)."""
        r = self.relays[relay]
        if where == "after_claim":

            def die(*_: Any, **__: Any) -> Any:
                raise Killed

            r.sender.send_destination = die  # type: ignore[method-assign]
        else:

            def die_after(*_: Any, **__: Any) -> None:
                raise Killed

            r.sender._record = die_after  # type: ignore[method-assign]
        self._script(faults)
        try:
            r.deliver_once()
        except (Killed, DatabaseUnavailable):
            pass
        finally:
            self.cio.clear_script()
            self._settle()
        r.close()  # a dead process hands nothing back
        self.relays[relay] = self.new_relay(relay)

    @rule(
        relay=st.integers(0, 1),
        faults=st.lists(st.sampled_from(FAULTS), max_size=4),
        stop_after=st.integers(1, 6),
        burst=st.lists(st.sampled_from(CUSTOMERS), max_size=len(CUSTOMERS), unique=True),
    )
    def run_loop(self, relay: int, faults: list[str], stop_after: int, burst: list[str]) -> None:
        """A burst of writes for several customers (enough for more than one claim), then the
        delivery loop, its claims overlapping, until ``stop_after`` requests reached the server
        (or it is idle); then SIGTERM, as ``Service.stop`` handles it."""
        for customer in burst:
            self.write(customer, 1, rollback=False, reject=False, age=0)
        r = self.relays[relay]
        self._script(faults)
        loop = DeliveryLoop(r)
        before = self.cio.requests_arrived
        thread = threading.Thread(
            target=loop.run, kwargs={"until_idle": True, "deadline": time.monotonic() + 1.5}
        )
        thread.start()
        try:
            wait_until(
                lambda: (
                    self.cio.requests_arrived - before >= stop_after
                    or loop.idle.is_set()
                    or not thread.is_alive()
                ),
                timeout=2.0,
                every=0.01,
            )
        finally:
            r.stopping.set()
            r.wake()
            thread.join()
        # The loop returned only once every claim's chains had stopped.
        assert loop.claims_in_flight == 0
        with contextlib.suppress(DatabaseUnavailable):
            r.release_all()
        self.cio.clear_script()
        self._settle()
        # The same process goes on (a restart would keep its name, and lose nothing more).
        r.stopping.clear()

    @rule()
    def expire_leases(self) -> None:
        """The lease period passes: leases run out in the database and on the relays' clock."""
        self.clock.t += LEASE_S + 1.0
        with psycopg.connect(self.dsn) as conn:
            conn.execute(
                "UPDATE relay_outbox SET lease_expires_at = now() - interval '1 second'"
                " WHERE state = 'in_flight'"
            )
            conn.commit()

    @rule(pick=st.integers(0, 50))
    def expire_one_lease(self, pick: int) -> None:
        """One in-flight row's lease runs out in the database while its siblings' do not."""
        with psycopg.connect(self.dsn) as conn:
            conn.execute(
                "UPDATE relay_outbox SET lease_expires_at = now() - interval '1 second'"
                " WHERE id = (SELECT id FROM relay_outbox WHERE state = 'in_flight'"
                " ORDER BY id OFFSET %s LIMIT 1)",
                (pick % 4,),
            )
            conn.commit()

    @rule(relay=st.integers(0, 1))
    def rescue(self, relay: int) -> None:
        with contextlib.suppress(DatabaseUnavailable):
            self.relays[relay].rescue()

    @rule()
    def time_passes(self) -> None:
        """Backoffs run out: retrying rows are due."""
        with psycopg.connect(self.dsn) as conn:
            conn.execute("UPDATE relay_outbox SET next_attempt_at = now() WHERE state = 'retrying'")
            conn.execute("UPDATE relay_throttle SET resume_at = now()")
            conn.commit()

    @precondition(lambda self: bool(self.relays))
    @rule(relay=st.integers(0, 1))
    def kill_database_sessions(self, relay: int) -> None:
        """An operator (or a failover) ends the relay's database sessions."""
        with psycopg.connect(self.dsn, autocommit=True) as admin:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'relay %%'"
                " AND pid <> pg_backend_pid()"
            )

    # --- the guarantees ---------------------------------------------------------------------

    def _accepted(self) -> list[dict[str, Any]]:
        return self.cio.accepted_items()

    @invariant()
    def delivery_is_in_order_and_identified(self) -> None:
        verdict = invariants.check(self.written, self._accepted(), exempt=self.poison)
        assert verdict.ok, verdict.summary()

    @invariant()
    def nothing_rolled_back_is_sent(self) -> None:
        sent = {i.get("messageId") for i in self._accepted()}
        assert not (sent & self.rolled_back)
        assert not (sent & self.poison)

    @invariant()
    def delivered_means_accepted(self) -> None:
        sent = {i.get("messageId") for i in self._accepted()}
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT message_id FROM relay_outbox WHERE state = 'delivered'"
            ).fetchall()
        missing = [r[0] for r in rows if r[0] not in sent]
        assert not missing, f"delivered in the outbox, never accepted: {missing[:5]}"

    def final_drain(self) -> None:
        self.cio.clear_script()
        self.cio.set_fault_rates({})
        relay = self.relays[0]
        for _ in range(200):
            self.time_passes()
            self.expire_leases()
            try:
                relay.rescue()
                relay.release_held()
                result = relay.deliver_once()
                self._settle()
                if result.claimed == 0 and relay.count_active() == (0, 0):
                    break
            except DatabaseUnavailable:
                continue
        self._settle()
        with psycopg.connect(self.dsn) as conn:
            rows = conn.execute(
                "SELECT id, message_id, state, coalesced_into, last_error FROM relay_outbox"
            ).fetchall()
        by_id = {r[0]: r for r in rows}
        sent = {i.get("messageId") for i in self._accepted()}
        for row_id, mid, state, _into, error in rows:
            if mid in self.poison:
                assert state == "dead" and error, (mid, state, error)
                continue
            if mid in self.rejected:
                assert state == "dead" and "reject" in (error or ""), (mid, state, error)
                continue
            chain = [row_id]
            while by_id[chain[-1]][2] == "coalesced":
                chain.append(by_id[chain[-1]][3])
            assert by_id[chain[-1]][1] in sent, f"lost: {mid} ({state}, {error})"
        verdict = invariants.check(self.written, self._accepted(), exempt=self.poison)
        assert verdict.ok, verdict.summary()
        wrong = invariants.final_profiles(self.written, self._accepted(), exempt=self.poison)
        assert not wrong, wrong


@pytest.fixture
def machine_dsn(dsn: str) -> Iterator[str]:
    yield dsn


def test_delivery_guarantees_hold_under_any_interleaving(machine_dsn: str) -> None:
    DeliveryMachine.dsn = machine_dsn
    DeliveryMachine.TestCase.settings = settings(
        max_examples=int(os.environ.get("RELAY_MACHINE_EXAMPLES", "25")),
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )
    DeliveryMachine.TestCase().runTest()
