"""The relay: one process's connections, destinations, leases, and its delivery cycle.

One delivery cycle (``Relay.deliver_once``):

1. **Claim**, in one short transaction: lock the first due message of up to ``batch_size``
   customers whose earlier messages are all finished (``OUTBOX_CLAIM_HEADS``), then each such
   customer's following rows (``OUTBOX_CLAIM_FOLLOWERS``). ``relay.plan.plan_claim`` (pure)
   decides what to send, merge, hold or declare dead; the claim marks it all, in flight under
   a lease with a token unique to this claim. Commit. No transaction is open from here on.
2. **Send** (``relay.send``), per destination, chains of batches several at a time, each
   request recorded in one short transaction fenced on the claim's token.
3. Meanwhile ``relay.lease.LeaseKeeper`` renews the claim's open rows, and each request first
   checks that its rows stay ours for longer than the request can take.

``deliver_once`` is the two steps on the caller's thread. The delivery loop
(``relay.service.DeliveryLoop``) runs up to ``RELAY_CLAIMS_IN_FLIGHT`` claims at once
(``deliver_claim``), each on a thread and claiming connection of its own, their chains sharing
the sending threads: the next claim is made while earlier claims' chains are in flight. Why
order and leases still hold is told there.

Where each piece lives: ``plan.py`` (pure planning), ``coalesce.py`` (pure merging),
``send.py`` (requests and outcomes), ``lease.py`` (leases), ``maintenance.py`` (rescue, held
release, vacuum, metrics), ``service.py`` (the loop and the scheduler), ``queries.py`` (SQL),
``db.py`` (connections and database errors).

Delivery is at-least-once: a relay that dies after sending but before recording leaves rows in
flight; the lease expires, a rescue makes them claimable, and they are sent again under the
same messageId.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from relay import maintenance
from relay import queries as q
from relay.client import CustomerIOClient, Destination
from relay.db import Conn, database_errors, relay_connection
from relay.destinations import DEFAULT, Route, Router
from relay.lease import UNBOUNDED_SPAN, Lease, LeaseKeeper, span_params
from relay.metrics import Metrics
from relay.plan import ClaimedRow, ClaimPlan, plan_claim
from relay.ratelimit import RateLimiter
from relay.retry import RetryPolicy
from relay.send import ChainResult, Sender
from relay.settings import Settings

log = logging.getLogger("relay")

THROTTLE_READ_EVERY_S = 0.25
"""How often a relay reads the pauses other relays recorded after a 429 (relay_throttle)."""

SEND_CONN_CHECK_AFTER_S = 5.0
"""A sending thread's connection idle longer than this is checked before use (see send_conn)."""


@dataclass
class CycleResult(ChainResult):
    """One cycle (or a run of them): what was claimed and merged, and what sending did."""

    claimed: int = 0
    coalesced: int = 0

    def add(self, other: ChainResult) -> None:
        super().add(other)
        if isinstance(other, CycleResult):
            self.claimed += other.claimed
            self.coalesced += other.coalesced


@dataclass
class Claim:
    """One claim between its two steps: what claiming did, the plan, and the claim's lease."""

    result: CycleResult
    plan: ClaimPlan
    lease: Lease


class Relay:
    """One relay process's state: its connections, destinations, leases and settings.

    Claims (``claim``, ``deliver_once``, ``deliver_claim``) may run on several threads at once,
    each thread claiming on a connection of its own; their chains run on the sender's
    ``concurrency`` threads. The background services run on another thread with their own
    connection, since a psycopg connection serialises its users. Connections: one per claiming
    thread (up to ``claims_in_flight``), one for the services, one for the lease keeper, and
    one per sending thread (up to ``concurrency``).
    """

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        transport_factory: Callable[[Destination], Any] | None = None,
        rand: Callable[[], float] = random.random,
        limiter_factory: Callable[[], RateLimiter] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        # The monotonic clock leases are judged by (tests pass a fake to expire them).
        self.clock = clock
        self.dsn = dsn
        self.instance = settings.instance
        self.metrics = Metrics()
        self.policy = RetryPolicy(
            base_s=settings.backoff_base_s,
            cap_s=settings.backoff_cap_s,
            max_age_s=settings.max_age_s,
            retry_after_cap_s=settings.retry_after_cap_s,
        )
        self.rand = rand
        default = (
            Destination(DEFAULT, settings.base_url, settings.write_key)
            if settings.write_key
            else None
        )

        def make_client(dest: Destination) -> CustomerIOClient:
            transport = transport_factory(dest) if transport_factory else None
            return CustomerIOClient(
                dest,
                timeout_s=settings.http_timeout_s,
                verify_tls=settings.verify_tls,
                transport=transport,
                gzip_min_bytes=settings.gzip_min_bytes,
            )

        per_window = max(2, int(settings.rate_per_s * 3))
        self.router = Router(
            default,
            client_factory=make_client,
            limiter_factory=limiter_factory
            or (
                lambda: RateLimiter.for_customerio(
                    requests=per_window,
                    burst=max(1, min(60, per_window // 2)),
                    pause_base_s=settings.backoff_base_s,
                    pause_cap_s=settings.retry_after_cap_s,
                )
            ),
        )
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self.vacuum_disabled = settings.vacuum_interval_s <= 0
        # Set when this login may not run the partition functions (see maintenance).
        self.partitions_disabled = False
        # Each claiming thread's connection, with the thread.
        self._work_conns: list[tuple[threading.Thread, Conn]] = []
        self._svc_conn: Conn | None = None
        self._svc_lock = threading.Lock()
        # Sending threads that pause a destination refresh the router one at a time.
        self._db_lock = threading.RLock()
        self._local = threading.local()
        self._send_conns: list[Conn] = []
        self._conns_lock = threading.Lock()
        # Bumped when the claiming session is found gone: each sending thread then checks its
        # own session before its next use (see send_conn).
        self._send_epoch = 0
        self._destinations_at = 0.0
        self._throttles_at = float("-inf")
        # Leases of claims that ended with rows still open (a database error mid-claim):
        # handed back at the next claim or at shutdown, else rescued when they expire. Claims
        # end on their own threads; the next claim (on whichever thread) hands them back.
        self._orphans: list[Lease] = []
        self._orphans_lock = threading.Lock()
        # The claim's floor as last seen (queries.FLOOR_HINT), as text. -infinity prunes
        # nothing; the first claim returns the real floor. Shared by the claiming threads: a
        # stale value is safe (the claim's gate refuses it), so no lock.
        self._floor = "-infinity"
        self._keeper: LeaseKeeper | None = None
        self._keeper_lock = threading.Lock()
        self.sender = Sender(self)

    # --- connections -------------------------------------------------------------------------

    def _connect(self, purpose: str) -> Conn:
        return relay_connection(self.dsn, purpose, self.instance)

    @contextmanager
    def _work(self) -> Iterator[Conn]:
        """This thread's claiming connection; dropped on a database error so the next claim
        reconnects."""
        conn: Conn | None = getattr(self._local, "work_conn", None)
        if conn is None or conn.closed:
            conn = self._connect("deliver")
            self._local.work_conn = conn
            with self._conns_lock:
                self._work_conns = [(t, c) for t, c in self._work_conns if not c.closed] + [
                    (threading.current_thread(), conn)
                ]
        # Whatever ended this session (most often a server restart) most likely ended the
        # sending threads' too. Some may be in use by other claims, so they are not closed
        # from here: each is checked before its next use, and replaced if it is gone.
        with database_errors(conn, self._distrust_send_conns) as c:
            yield c

    @contextmanager
    def svc(self) -> Iterator[Conn]:
        """The services connection, one user at a time."""
        with self._svc_lock:
            if self._svc_conn is None or self._svc_conn.closed:
                self._svc_conn = self._connect("services")
            with database_errors(self._svc_conn) as conn:
                yield conn

    @contextmanager
    def send_conn(self) -> Iterator[Conn]:
        """This sending thread's own connection, for the outcomes of the chains it sends.

        With one shared connection the threads' outcome writes ran one at a time. A
        connection idle for more than ``SEND_CONN_CHECK_AFTER_S``, or last used before the
        claiming session was found gone, is checked first, so a session the server ended
        meanwhile is replaced before the request, not found dead after it. On a database error
        it is dropped; the chain's rows stay leased to this claim until the keeper stops
        renewing them, then a rescue makes them claimable.
        """
        conn: Conn | None = getattr(self._local, "conn", None)
        idle_s = time.monotonic() - getattr(self._local, "used_at", 0.0)
        epoch = self._send_epoch
        stale = getattr(self._local, "epoch", epoch) != epoch
        self._local.epoch = epoch
        if conn is not None and not conn.closed and (idle_s > SEND_CONN_CHECK_AFTER_S or stale):
            try:
                with database_errors(conn), conn.transaction():
                    conn.execute(q.SESSION_CHECK)
            except Exception:
                conn.close()
        if conn is None or conn.closed:
            conn = self._connect("send")
            self._local.conn = conn
            with self._conns_lock:
                self._send_conns = [c for c in self._send_conns if not c.closed] + [conn]
        try:
            with database_errors(conn) as c:
                yield c
        finally:
            self._local.used_at = time.monotonic()

    def _distrust_send_conns(self) -> None:
        self._send_epoch += 1

    def close_ended_claiming_conns(self) -> None:
        """Close the claiming connections of threads that have ended (a delivery loop's claim
        threads, once it returned)."""
        with self._conns_lock:
            ended = [c for t, c in self._work_conns if not t.is_alive()]
            self._work_conns = [(t, c) for t, c in self._work_conns if t.is_alive()]
        for conn in ended:
            if not conn.closed:
                conn.close()

    def _close_conns(self) -> None:
        with self._conns_lock:
            conns = self._send_conns + [c for _, c in self._work_conns]
            self._send_conns, self._work_conns = [], []
        for conn in conns:
            if not conn.closed:
                conn.close()

    def _lease_keeper(self) -> LeaseKeeper:
        with self._keeper_lock:
            if self._keeper is None or not self._keeper.is_alive():
                self._keeper = LeaseKeeper(
                    lambda: self._connect("lease"), self.settings.lease_s, self.log_fields()
                )
                self._keeper.start()
            return self._keeper

    def close(self) -> None:
        # The senders first: a sending thread may still be using its connection.
        self.sender.close()
        if self._keeper is not None:
            self._keeper.close()
            self._keeper = None
        self._close_conns()
        if self._svc_conn is not None and not self._svc_conn.closed:
            self._svc_conn.close()
        self._svc_conn = None
        self.router.close()

    # --- destinations ------------------------------------------------------------------------

    def refresh_destinations(self, conn: Conn | None = None) -> None:
        if conn is None:
            with self.svc() as svc:
                self.refresh_destinations(svc)
                return
        with conn.transaction():
            rows = conn.execute(q.DESTINATION_LIST_WITH_KEY).fetchall()
        self.router.refresh(rows)
        self._destinations_at = time.monotonic()
        self.metrics.paused.set(len(self.router.paused))

    def _apply_throttles(self, conn: Conn) -> None:
        """Pauses other relays recorded after a 429 (relay_throttle) apply here too.

        Read at most every ``THROTTLE_READ_EVERY_S``: a drain runs cycles back to back, and a
        pause learned a quarter of a second late costs at most that many requests.
        """
        now = time.monotonic()
        if now - self._throttles_at < THROTTLE_READ_EVERY_S:
            return
        self._throttles_at = now
        with conn.transaction():
            rows = conn.execute(q.THROTTLE_ACTIVE).fetchall()
        for destination, wait_s in rows:
            route = self.router.route(None if destination == DEFAULT else destination)
            if route.destination is not None and wait_s and wait_s > 0:
                _, limiter = self.router.client(route.destination)
                limiter.throttle_until(now + min(wait_s, self.settings.retry_after_cap_s))

    def log_fields(self, **fields: Any) -> dict[str, Any]:
        """``extra=`` for a log call: ``fields`` and this relay's instance name, which JSON log
        lines carry as keys (``relay.logs``)."""
        return {"instance": self.instance, **fields}

    def pause(self, conn: Conn, route: Route, reason: str) -> None:
        """A 401/403: stop sending to this destination until its key changes."""
        dest = route.destination
        assert dest is not None
        log.error(
            "DESTINATION PAUSED: %s (%s). Nothing more is sent to it until its key is fixed "
            "(relay destinations set, or CUSTOMERIO_WRITE_KEY and a restart).",
            route.pause_key,
            reason,
            extra=self.log_fields(destination=route.pause_key, error=reason),
        )
        if route.pause_key == DEFAULT:
            self.router.pause_default(reason)
        else:
            with conn.transaction():
                conn.execute(
                    q.DESTINATION_PAUSE,
                    {"project_id": route.pause_key, "write_key": dest.write_key, "reason": reason},
                )
            with self._db_lock:
                self.refresh_destinations(conn)
        self.metrics.paused.set(len(self.router.paused))

    # --- background services (relay.maintenance) ---------------------------------------------

    def rescue(self) -> int:
        return maintenance.rescue(self)

    def release_held(self) -> int:
        return maintenance.release_held(self)

    def refresh_metrics(self) -> dict[str, Any]:
        return maintenance.refresh_metrics(self)

    def vacuum_if_needed(self) -> bool:
        return maintenance.vacuum_if_needed(self)

    def manage_partitions(self) -> dict[str, Any]:
        return maintenance.manage_partitions(self)

    def count_active(self) -> tuple[int, int]:
        return maintenance.count_active(self)

    def wake(self) -> None:
        self.wakeup.set()

    def release_all(self) -> int:
        """Hand back what this process's dead cycles left in flight (used at shutdown).

        Only rows of this process's own claims, and only as far as it knows them: rows it never
        sent go back as they were; rows a request carried whose outcome was never recorded
        count an attempt (Customer.io may hold them), like a lease rescue. Rows of an earlier
        process under the same name are left to the lease rescue: nothing here knows whether
        they went out.
        """
        with self.svc() as conn:
            return self._release_orphans(conn)

    def _release_orphans(self, conn: Conn) -> int:
        released = 0
        while True:
            # Taken off the list first, so two claiming threads never hand back one lease.
            with self._orphans_lock:
                if not self._orphans:
                    break
                lease = self._orphans.pop(0)
            unsent, maybe_sent = lease.split_open()
            try:
                with conn.transaction():
                    if unsent:
                        released += conn.execute(
                            q.OUTBOX_RELEASE,
                            {
                                "ids": unsent,
                                "token": lease.token,
                                "delay_s": 0.0,
                                **span_params([lease]),
                            },
                        ).rowcount
                    if maybe_sent:
                        released += conn.execute(
                            q.OUTBOX_RELEASE_MAYBE_SENT,
                            {"ids": maybe_sent, "token": lease.token, **span_params([lease])},
                        ).rowcount
            except BaseException:
                with self._orphans_lock:
                    self._orphans.insert(0, lease)
                raise
            lease.finished(unsent + maybe_sent)
            log.warning(
                "a cycle ended early: handed back %d unsent messages, and %d whose request may "
                "have reached Customer.io (their attempt counts)",
                len(unsent),
                len(maybe_sent),
                extra=self.log_fields(messages=len(unsent) + len(maybe_sent)),
            )
        return released

    # --- one delivery cycle ------------------------------------------------------------------

    def deliver_once(self) -> CycleResult:
        """One claim, sent before this returns (a claim's chains may then use the claiming
        connection: nothing else does meanwhile)."""
        with self._work() as conn:
            claim = self._begin(conn)
            if claim is None:
                return CycleResult()
            return self.send_claim(claim, conn)

    def deliver_claim(
        self, claimed: Callable[[bool], None] | None = None, *, hand_back: bool = True
    ) -> CycleResult:
        """One claim on this thread's claiming connection, its chains sent by the sending
        threads: what the delivery loop runs several of at once. ``claimed`` is told, as soon
        as the claim is made, whether it took anything; ``hand_back`` as for ``claim``."""
        claim = self.claim(hand_back=hand_back)
        if claimed is not None:
            claimed(claim is not None and claim.result.claimed > 0)
        if claim is None:
            return CycleResult()
        return self.send_claim(claim)

    def claim(self, *, hand_back: bool = True) -> Claim | None:
        """Claim the next batch of customers and give the claim's lease to the keeper; None
        when nothing is claimable. ``send_claim`` must follow: it sends the rows and ends the
        keeper's renewal of them. With ``hand_back``, what claims that ended early left in
        flight is handed back first (see ``release_all``)."""
        with self._work() as conn:
            return self._begin(conn, hand_back=hand_back)

    def _begin(self, conn: Conn, *, hand_back: bool = True) -> Claim | None:
        if time.monotonic() - self._destinations_at > 5.0:
            self.refresh_destinations(conn)
        self._apply_throttles(conn)
        if hand_back and self._orphans:
            self._release_orphans(conn)
        result, plan, lease = self._claim(conn)
        if lease is None:
            return None
        self._lease_keeper().add(lease)
        return Claim(result, plan, lease)

    def send_claim(self, claim: Claim, conn: Conn | None = None) -> CycleResult:
        """Send what ``claim`` took; returns what claiming and sending did. With ``conn`` None
        every chain goes to the sending threads (so no claim has more requests in flight than
        they are), and no connection of the caller's is used."""
        result, lease = claim.result, claim.lease
        try:
            for unit in claim.plan.work.values():
                result.add(self.sender.send_destination(conn, unit, lease))
        finally:
            # Rows still open here (the database went away mid-claim, a bug) are handed back
            # by the next claim or at shutdown, or rescued when their lease expires.
            if self._keeper is not None:
                self._keeper.remove(lease)
            if lease.open:
                with self._orphans_lock:
                    self._orphans.append(lease)
        return result

    def _take(self, conn: Conn, size: int) -> tuple[list[Any], list[Any]] | None:
        """Lock the heads and their followers, in the caller's transaction: (heads, rows), both
        empty when nothing is claimable; None when the floor fell below the value passed (a
        late insert), so that nothing was taken and the claim must be made again."""
        heads = conn.execute(
            q.OUTBOX_CLAIM_HEADS, {"customers": size, "floor": self._floor}
        ).fetchall()
        if not heads:
            # Nothing due, or the gate refused a stale floor: the floor now tells which.
            return None if self._floor_lowered(conn) else ([], [])
        self._floor = heads[0][2]
        fetched = conn.execute(
            q.OUTBOX_CLAIM_FOLLOWERS,
            {
                "head_ids": [h[0] for h in heads],
                "customer_keys": [h[1] for h in heads],
                "per_customer": size,
                "floor": self._floor,
            },
        ).fetchall()
        if not fetched:
            # Every head is among its own followers unless the gate refused: the floor fell
            # between the two statements. Their locks go with this transaction.
            self._floor_lowered(conn)
            return None
        return heads, fetched

    def _floor_lowered(self, conn: Conn) -> bool:
        """Read the floor into the value the claim passes; whether it was below that value."""
        row = conn.execute(q.FLOOR_NOW, {"floor": self._floor}).fetchone()
        if row is None:  # the migration writes the one row; without it no claim takes anything
            return False
        self._floor = str(row[0])
        return bool(row[1])

    def _claim(self, conn: Conn) -> tuple[CycleResult, ClaimPlan, Lease | None]:
        result = CycleResult()
        size = self.settings.batch_size
        # Taken before the claim transaction: the database sets the expiry later than this,
        # so "claimed_at + lease" never overstates how long the rows are ours.
        claimed_at = self.clock()
        # Twice at most: a second time only when a late insert lowered the floor below the
        # value this relay passed (the claim's gate then took nothing); a third such race in a
        # row is left to the next cycle.
        for _ in range(2):
            with conn.transaction():
                taken = self._take(conn, size)
                if taken is None:
                    continue
                heads, fetched = taken
                if not heads:
                    return result, ClaimPlan(), None
                rows = [ClaimedRow(*v) for v in fetched]
                plan = plan_claim([h[1] for h in heads], rows, self.router.route)
                occurred = [r.occurred_at for r in rows if r.occurred_at is not None]
                span = (min(occurred), max(occurred)) if occurred else UNBOUNDED_SPAN
                lease = Lease(
                    plan.in_flight,
                    self.settings.lease_s,
                    claimed_at=claimed_at,
                    clock=self.clock,
                    span=span,
                )
                in_span = {"occ_lo": span[0], "occ_hi": span[1]}
                marks: list[tuple[int, str, int | None, bytes | None, str | None]] = [
                    (i, "in_flight", None, plan.rewritten.get(i), None) for i in plan.in_flight
                ]
                marks += [(i, "coalesced", into, None, None) for i, into in plan.coalesced.items()]
                marks += [(i, "dead", None, None, why) for i, why in plan.dead.items()]
                if marks:
                    conn.execute(
                        q.OUTBOX_CLAIM_MARK,
                        {
                            "ids": [m[0] for m in marks],
                            "states": [m[1] for m in marks],
                            "into_ids": [m[2] for m in marks],
                            "bodies": (
                                b"["
                                + b",".join(m[3] if m[3] is not None else b"null" for m in marks)
                                + b"]"
                            ).decode(),
                            "errors": [m[4] for m in marks],
                            "owner": self.instance,
                            "token": lease.token,
                            "lease_s": self.settings.lease_s,
                            **in_span,
                        },
                    )
                for reason, ids in plan.held.items():
                    conn.execute(q.OUTBOX_MARK_HELD, {"ids": ids, "reason": reason, **in_span})
                    log.warning(
                        "holding %d messages: %s",
                        len(ids),
                        reason,
                        extra=self.log_fields(messages=len(ids), reason=reason),
                    )
            break
        else:
            return result, ClaimPlan(), None
        if plan.dead:
            # Counted with the outcomes of requests, so the dead-message rate (and its alert)
            # sees a body Customer.io could never accept as well as one it rejected.
            by_id = {row.id: row for row in rows}
            for row_id, why in plan.dead.items():
                row = by_id[row_id]
                route = self.router.route(row.project_id)
                name = route.destination.name if route.destination else route.pause_key
                log.error(
                    "message row %d is dead: %s",
                    row_id,
                    why,
                    extra=self.log_fields(destination=name, row_id=row_id, error=why),
                )
                self.metrics.messages.labels(name, row.event, row.kind, "dead").inc()
        for name, n in plan.coalesced_by_destination.items():
            self.metrics.coalesced.labels(name).inc(n)
        result.claimed = plan.claimed
        result.coalesced = len(plan.coalesced)
        result.held = sum(len(v) for v in plan.held.values())
        result.dead = len(plan.dead)
        return result, plan, lease
