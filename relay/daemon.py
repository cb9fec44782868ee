"""The relay daemon: claim, coalesce, batch, deliver, record; plus its background services.

One delivery cycle (``Relay.deliver_once``):

1. **Claim**, in one short transaction: lock the first due message of up to ``batch_size``
   customers whose earlier messages are all finished (``OUTBOX_CLAIM_HEADS``), then each such
   customer's following due messages (``OUTBOX_CLAIM_FOLLOWERS``). Route each to its
   destination; coalesce each customer's fresh identifies; mark the rows in flight under a lease
   (or held, when their destination is unusable). Commit. No transaction is open from here on.
2. **Send**, per destination, in batches (<= ``batch_size`` items, <= 475,000 bytes), customers
   kept in write order. After each request, one short transaction records the attempt row and
   every message's outcome.
3. A customer whose message failed in this cycle has its later messages handed back unsent
   (``OUTBOX_RELEASE``): they may not overtake it.

Outcomes (see relay/retry.py for the table): 2xx delivered; 408/429/5xx/transport errors
retried with backoff and jitter (Retry-After honoured) until the attempt or age limit, then
dead; 400 bisected until the bad messages are found, which are dead with Customer.io's text;
401/403 pause the destination and hold its messages without counting an attempt.

Delivery is at-least-once: a relay that dies after sending but before recording leaves rows in
flight; the lease expires, ``OUTBOX_RESCUE_EXPIRED`` makes them claimable, and they are sent
again under the same messageId.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, cast

import psycopg

from relay import queries as q
from relay.batching import MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, bisect, plan_chains
from relay.client import CustomerIOClient, Destination, SendResult
from relay.coalesce import Claimed, Outgoing, Plan, coalesce
from relay.db import first_line, redact_dsn
from relay.destinations import DEFAULT, Route, Router
from relay.errors import DatabaseUnavailable
from relay.metrics import Metrics
from relay.ratelimit import RateLimiter
from relay.retry import Outcome, RetryPolicy, classify, decide, parse_retry_after
from relay.settings import Settings

log = logging.getLogger("relay")

SEND_CONN_CHECK_AFTER_S = 5.0
"""A sending thread's connection idle longer than this is checked before use (see _send_conn)."""

Conn = psycopg.Connection[tuple[Any, ...]]


@dataclass
class Item:
    """One message of a cycle, ready to send."""

    row_id: int
    customer_key: str
    event: str
    kind: str
    encoded: bytes
    attempts: int
    age_s: float


@dataclass
class CycleResult:
    claimed: int = 0
    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    held: int = 0
    coalesced: int = 0
    released: int = 0
    requests: int = 0

    def add(self, other: CycleResult) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class _Work:
    """What one claim gave one destination: items in send order."""

    route: Route
    items: list[Item] = field(default_factory=list)


def _encode(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class Relay:
    """One relay process's state: its connections, destinations and settings.

    ``deliver_once`` runs on one thread at a time (the scheduler's delivery executor has one
    worker, and drain mode runs on the caller's thread); the background services run on
    another thread with their own connection, since a psycopg connection serialises its users.
    Connections: one for claiming, one for the services, and one per sending thread (up to
    ``concurrency``) for the outcomes of the batches that thread sends.
    """

    def __init__(
        self,
        settings: Settings,
        dsn: str,
        *,
        transport_factory: Callable[[Destination], Any] | None = None,
        rand: Callable[[], float] = random.random,
        limiter_factory: Callable[[], RateLimiter] | None = None,
    ) -> None:
        self.settings = settings
        self.dsn = dsn
        self.instance = settings.instance
        self.metrics = Metrics()
        self.policy = RetryPolicy(
            base_s=settings.backoff_base_s,
            cap_s=settings.backoff_cap_s,
            max_attempts=settings.max_attempts,
            max_age_s=settings.max_age_s,
            retry_after_cap_s=settings.retry_after_cap_s,
        )
        self._rand = rand
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
            )

        per_window = max(2, int(settings.rate_per_s * 3))
        self.router = Router(
            default,
            client_factory=make_client,
            limiter_factory=limiter_factory
            or (
                lambda: RateLimiter.for_customerio(
                    requests=per_window, burst=max(1, min(60, per_window // 2))
                )
            ),
        )
        self.stopping = threading.Event()
        self.wakeup = threading.Event()
        self._work_conn: Conn | None = None
        self._svc_conn: Conn | None = None
        self._svc_lock = threading.Lock()
        # Sending threads that pause a destination refresh the router one at a time. Each
        # connection is used by one thread only (the delivery connection by the delivery
        # thread, each sending thread's by that thread), so transactions need no lock.
        self._db_lock = threading.RLock()
        self._pool: ThreadPoolExecutor | None = None
        # Each sending thread's own connection (see _send_conn), and all of them for close().
        self._local = threading.local()
        self._send_conns: list[Conn] = []
        self._send_conns_lock = threading.Lock()
        self._vacuum_disabled = settings.vacuum_interval_s <= 0
        self._destinations_at = 0.0

    # --- connections -------------------------------------------------------------------------

    def _connect(self, purpose: str) -> Conn:
        try:
            conn = psycopg.connect(
                self.dsn, application_name=f"relay {purpose} {self.instance}", connect_timeout=10
            )
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(
                f"cannot connect to {redact_dsn(self.dsn)}: {first_line(str(exc))}"
            ) from exc
        try:
            conn.execute(q.SESSION_ASYNC_COMMIT)
            conn.commit()
        except psycopg.OperationalError as exc:
            # The session can be cut between connect and its first statement (a restart,
            # pg_terminate_backend): still an outage, not a crash.
            conn.close()
            raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
        return conn

    @contextmanager
    def _work(self) -> Iterator[Conn]:
        """The delivery connection; dropped on a database error so the next cycle reconnects."""
        if self._work_conn is None or self._work_conn.closed:
            self._work_conn = self._connect("deliver")
        try:
            yield self._work_conn
        except psycopg.OperationalError as exc:
            self._work_conn.close()
            self._work_conn = None
            # Whatever ended this session (most often a server restart) ended the sending
            # threads' too; they are idle now (a cycle waits for its chains) and reconnect.
            self._close_send_conns()
            raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc

    @contextmanager
    def _svc(self) -> Iterator[Conn]:
        with self._svc_lock:
            if self._svc_conn is None or self._svc_conn.closed:
                self._svc_conn = self._connect("services")
            try:
                yield self._svc_conn
            except psycopg.OperationalError as exc:
                self._svc_conn.close()
                self._svc_conn = None
                raise DatabaseUnavailable(
                    f"database connection lost: {first_line(str(exc))}"
                ) from exc

    @contextmanager
    def _send_conn(self) -> Iterator[Conn]:
        """This sending thread's own connection, for the outcomes of the chains it sends.

        With one shared connection the threads' outcome writes ran one at a time (a psycopg
        connection runs one transaction at a time), and with a fast server they spent most of
        their time waiting for it. Dropped on a database error, like the delivery connection;
        the chain's rows stay leased to this relay and are rescued when the lease expires.
        A connection idle for more than ``SEND_CONN_CHECK_AFTER_S`` is checked first, so a
        session the server ended meanwhile is replaced before the request, not found dead
        after it.
        """
        conn: Conn | None = getattr(self._local, "conn", None)
        idle_s = time.monotonic() - getattr(self._local, "used_at", 0.0)
        if conn is not None and not conn.closed and idle_s > SEND_CONN_CHECK_AFTER_S:
            try:
                with conn.transaction():
                    conn.execute(q.SESSION_CHECK)
            except psycopg.OperationalError:
                conn.close()
        if conn is None or conn.closed:
            conn = self._connect("send")
            self._local.conn = conn
            with self._send_conns_lock:
                self._send_conns = [c for c in self._send_conns if not c.closed] + [conn]
        try:
            yield conn
        except psycopg.OperationalError as exc:
            conn.close()
            self._local.conn = None
            raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc
        finally:
            self._local.used_at = time.monotonic()

    def _close_send_conns(self) -> None:
        with self._send_conns_lock:
            conns, self._send_conns = self._send_conns, []
        for conn in conns:
            if not conn.closed:
                conn.close()

    def close(self) -> None:
        # The pool first: a sending thread may still be using its connection.
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self._close_send_conns()
        for conn in (self._work_conn, self._svc_conn):
            if conn is not None and not conn.closed:
                conn.close()
        self._work_conn = self._svc_conn = None
        self.router.close()

    # --- destinations ------------------------------------------------------------------------

    def refresh_destinations(self, conn: Conn | None = None) -> None:
        if conn is None:
            with self._svc() as svc:
                self.refresh_destinations(svc)
                return
        with conn.transaction():
            rows = conn.execute(q.DESTINATION_LIST_WITH_KEY).fetchall()
        self.router.refresh(rows)
        self._destinations_at = time.monotonic()
        self.metrics.paused.set(len(self.router.paused))

    # --- background services ----------------------------------------------------------------

    def rescue(self) -> int:
        """Make rows whose lease expired claimable again (their relay died mid-cycle)."""
        with self._svc() as conn, conn.transaction():
            rows = conn.execute(q.OUTBOX_RESCUE_EXPIRED).fetchall()
        if rows:
            log.warning("rescued %d in-flight messages whose lease expired", len(rows))
            self.metrics.rescues.inc(len(rows))
            self.wake()
        return len(rows)

    def release_held(self) -> int:
        """Send held rows back to the queue once their destination is usable."""
        with self._svc() as conn:
            self.refresh_destinations(conn)
            with conn.transaction():
                rows = conn.execute(q.OUTBOX_RELEASE_HELD, self.router.release_params()).fetchall()
        if rows:
            log.info("released %d held messages: their destination is usable again", len(rows))
            self.wake()
        return len(rows)

    def refresh_metrics(self) -> dict[str, Any]:
        with self._svc() as conn, conn.transaction():
            rows = conn.execute(q.OUTBOX_BACKLOG).fetchall()
        oldest = 0.0
        for state in ("pending", "retrying", "in_flight", "held"):
            self.metrics.backlog.labels(state).set(0)
        for state, n, oldest_s in rows:
            self.metrics.backlog.labels(state).set(n)
            oldest = max(oldest, oldest_s or 0.0)
        self.metrics.oldest.set(oldest)
        return {state: n for state, n, _ in rows}

    def vacuum_if_needed(self) -> bool:
        """VACUUM the outbox when its dead tuples pile up and nothing else has vacuumed it.

        Autovacuum is the first line (the table's own settings make it eager); this covers
        servers where it is off or behind, where the claim otherwise slows as dead index
        entries accumulate (measured: p50 commit-to-received 2.3 s at 500 events/s with
        autovacuum off, 3 ms with a vacuum every second). Returns whether it vacuumed.
        """
        if self._vacuum_disabled:
            return False
        s = self.settings
        with self._svc() as conn, conn.transaction():
            row = conn.execute(q.OUTBOX_VACUUM_STATS).fetchone()
        if row is None:
            return False
        dead, since_s, _autovacuum = row
        if dead < s.vacuum_min_dead or (since_s is not None and since_s < s.vacuum_interval_s):
            return False
        try:
            with psycopg.connect(
                self.dsn, autocommit=True, application_name=f"relay vacuum {self.instance}"
            ) as conn:
                got = conn.execute(q.OUTBOX_VACUUM_TRY_LOCK).fetchone()
                if not got or not got[0]:
                    return False
                try:
                    conn.execute(q.OUTBOX_VACUUM)
                finally:
                    conn.execute(q.OUTBOX_VACUUM_UNLOCK)
        except psycopg.errors.InsufficientPrivilege as exc:
            self._vacuum_disabled = True
            log.warning("not vacuuming relay_outbox (%s); leaving it to autovacuum", exc)
            return False
        except psycopg.OperationalError as exc:
            raise DatabaseUnavailable(f"vacuum: {first_line(str(exc))}") from exc
        log.debug("vacuumed relay_outbox (%d dead tuples)", dead)
        return True

    def count_active(self) -> tuple[int, int]:
        with self._svc() as conn, conn.transaction():
            row = conn.execute(q.OUTBOX_COUNT_ACTIVE).fetchone()
        assert row is not None
        return int(row[0]), int(row[1])

    def wake(self) -> None:
        self.wakeup.set()

    # --- one delivery cycle ------------------------------------------------------------------

    def deliver_once(self) -> CycleResult:
        with self._work() as conn:
            if time.monotonic() - self._destinations_at > 5.0:
                self.refresh_destinations(conn)
            claimed_at = time.monotonic()
            result, work = self._claim(conn)
            # If sending fails midway (a bug, the database went away), rows still in flight
            # stay leased to us and are rescued when the lease expires.
            for unit in work.values():
                self._send_destination(conn, unit, result, claimed_at)
            return result

    def _claim(self, conn: Conn) -> tuple[CycleResult, dict[str, _Work]]:
        result = CycleResult()
        size = self.settings.batch_size
        work: dict[str, _Work] = {}
        with conn.transaction():
            heads = conn.execute(q.OUTBOX_CLAIM_HEADS, {"customers": size}).fetchall()
            if not heads:
                return result, work
            fetched = conn.execute(
                q.OUTBOX_CLAIM_FOLLOWERS,
                {
                    "head_ids": [h[0] for h in heads],
                    "customer_keys": [h[1] for h in heads],
                    "per_customer": size,
                },
            ).fetchall()
            by_customer: dict[str, list[_Row]] = defaultdict(list)
            for values in fetched:
                row = _Row(*values)
                by_customer[row.customer_key].append(row)

            in_flight: list[int] = []
            held: dict[str, list[int]] = defaultdict(list)
            coalesced: dict[int, int] = {}
            rewritten: dict[int, bytes] = {}
            oversize: list[int] = []
            # Everything fetched is taken: rows locked and then left unused would only have
            # cost a fetch (measured: that was most of a cycle's time).
            for _head_id, customer in heads:
                run = _due_run(by_customer.get(customer, []))
                if not run:
                    continue
                result.claimed += len(run)
                route = self.router.route(run[0].project_id)
                if route.destination is None:
                    held[route.reason or "no destination"].extend(r.id for r in run)
                    continue
                plan = _coalesce(run)
                unit = work.setdefault(route.pause_key, _Work(route))
                by_id = {r.id: r for r in run}
                for out in plan.send:
                    row = by_id[out.row_id]
                    if out.row_id in plan.rewritten:
                        encoded = rewritten[out.row_id] = _encode(out.body)
                    else:
                        # The stored text is sent as it is: no parse and re-encode per message.
                        encoded = row.body_text.encode()
                        if len(encoded) > MAX_MESSAGE_BYTES:
                            # jsonb's text has a space after every ':' and ','; the limit is
                            # judged on the compact form Customer.io would measure.
                            encoded = _encode(json.loads(row.body_text))
                    in_flight.append(row.id)
                    if len(encoded) > MAX_MESSAGE_BYTES:
                        oversize.append(row.id)
                        continue
                    unit.items.append(
                        Item(
                            row.id, customer, row.event, row.kind, encoded, row.attempts, row.age_s
                        )
                    )
                coalesced.update(plan.coalesced_into)
                if plan.coalesced_into:
                    self.metrics.coalesced.labels(route.pause_key).inc(len(plan.coalesced_into))

            marks = [(i, "in_flight", None, rewritten.get(i)) for i in in_flight] + [
                (i, "coalesced", into, None) for i, into in coalesced.items()
            ]
            if marks:
                conn.execute(
                    q.OUTBOX_CLAIM_MARK,
                    {
                        "ids": [m[0] for m in marks],
                        "states": [m[1] for m in marks],
                        "into_ids": [m[2] for m in marks],
                        "bodies": [m[3].decode() if m[3] is not None else None for m in marks],
                        "owner": self.instance,
                        "lease_s": self.settings.lease_s,
                    },
                )
            for reason, ids in held.items():
                conn.execute(q.OUTBOX_MARK_HELD, {"ids": ids, "reason": reason})
                log.warning("holding %d messages: %s", len(ids), reason)
            if oversize:
                # Never reaches the network: Customer.io would reject it, and so would every retry.
                reason = f"message is over Customer.io's {MAX_MESSAGE_BYTES}-byte limit"
                self._record_outcomes(conn, [(i, "dead", 0, 0.0, reason) for i in oversize])
        result.coalesced = len(coalesced)
        result.held = sum(len(v) for v in held.values())
        result.dead = len(oversize)
        return result, work

    # --- sending -----------------------------------------------------------------------------

    def _send_destination(
        self, conn: Conn, unit: _Work, result: CycleResult, claimed_at: float
    ) -> None:
        """Send one destination's share of a claim: chains of batches, several at a time.

        Chains share no customer (``plan_chains``), so running them concurrently keeps every
        customer's order while hiding the request latency; within a chain, batches go one
        after another, and a customer whose message failed has its later ones handed back.
        """
        items = unit.items
        chains = plan_chains(
            [i.customer_key for i in items],
            [len(i.encoded) for i in items],
            max_items=self.settings.batch_size,
            max_bytes=MAX_BATCH_BYTES,
        )
        paused = threading.Event()  # set by the first 401/403: every chain stops
        plans = [[[items[j] for j in r] for r in chain] for chain in chains]
        workers = min(self.settings.concurrency, len(plans))
        if workers <= 1:
            parts = [self._send_chain(conn, unit.route, p, paused, claimed_at) for p in plans]
        else:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.settings.concurrency, thread_name_prefix="relay-send"
                )
            futures = [
                self._pool.submit(self._send_chain_own_conn, unit.route, p, paused, claimed_at)
                for p in plans
            ]
            parts = [f.result() for f in futures]
        for part in parts:
            result.add(part)

    def _send_chain_own_conn(
        self, route: Route, batches: list[list[Item]], paused: threading.Event, claimed_at: float
    ) -> CycleResult:
        with self._send_conn() as conn:
            return self._send_chain(conn, route, batches, paused, claimed_at)

    def _send_chain(
        self,
        conn: Conn,
        route: Route,
        batches: list[list[Item]],
        paused: threading.Event,
        claimed_at: float,
    ) -> CycleResult:
        result = CycleResult()
        blocked: set[str] = set()  # customers with a failed message in this chain
        leftovers: list[int] = []
        # The lease runs from the claim, not from when this chain got a worker: a chain that
        # waited behind slow ones renews before its first request.
        lease_renewed = claimed_at
        for n, batch in enumerate(batches):
            if paused.is_set() or self.stopping.is_set():
                leftovers.extend(i.row_id for b in batches[n:] for i in b)
                break
            ready = [i for i in batch if i.customer_key not in blocked]
            leftovers.extend(i.row_id for i in batch if i.customer_key in blocked)
            if not ready:
                continue
            if time.monotonic() - lease_renewed > self.settings.lease_s / 3:
                rest = [i.row_id for b in batches[n:] for i in b]
                with conn.transaction():
                    conn.execute(
                        q.OUTBOX_EXTEND_LEASE,
                        {"ids": rest, "owner": self.instance, "lease_s": self.settings.lease_s},
                    )
                lease_renewed = time.monotonic()
            if self._send(conn, route, ready, blocked, result) == Outcome.UNAUTHORIZED:
                paused.set()
        if leftovers:
            with conn.transaction():
                conn.execute(
                    q.OUTBOX_RELEASE, {"ids": leftovers, "owner": self.instance, "delay_s": 0.0}
                )
            result.released += len(leftovers)
            if paused.is_set():
                self._hold_paused(conn, route, leftovers)
        return result

    def _send(
        self,
        conn: Conn,
        route: Route,
        items: list[Item],
        blocked: set[str],
        result: CycleResult,
    ) -> Outcome:
        dest = route.destination
        assert dest is not None
        client, limiter = self.router.client(dest)
        limiter.acquire()
        res = client.send_batch([i.encoded for i in items])
        result.requests += 1
        outcome = classify(res.status_code, res.error_kind)
        name = route.pause_key
        self.metrics.requests.labels(name, str(res.status_code or res.error_kind)).inc()
        self.metrics.latency.labels(name).observe(res.latency_s)
        self.metrics.batch_size.observe(len(items))
        error = self._describe(res)

        if outcome is Outcome.DELIVERED:
            self._record(
                conn,
                route,
                res,
                "delivered",
                items,
                [(i.row_id, "delivered", 1, 0.0, None) for i in items],
            )
            result.delivered += len(items)
            self._count(name, items, "delivered")
            return outcome

        if outcome is Outcome.RETRY:
            retry_after = parse_retry_after(res.retry_after, datetime.now(UTC))
            # One jitter draw per request: a customer's messages in this batch then come due
            # together and go out together, instead of one by one in their order.
            jitter = self._rand()
            rows: list[tuple[int, str, int, float, str | None]] = []
            for i in items:
                d = decide(i.attempts + 1, i.age_s, retry_after, self.policy, jitter)
                if d.dead:
                    rows.append((i.row_id, "dead", 1, 0.0, f"{error}; {d.reason}"))
                    result.dead += 1
                    self._count(name, [i], "dead")
                else:
                    rows.append((i.row_id, "retrying", 1, d.delay_s, error))
                    blocked.add(i.customer_key)
                    result.retrying += 1
                    self._count(name, [i], "retrying")
            self._record(conn, route, res, "retry", items, rows)
            log.warning("destination %s: %s; %d messages to retry", name, error, len(items))
            return outcome

        if outcome is Outcome.UNAUTHORIZED:
            reason = f"Customer.io answered {res.status_code}: the write key was refused"
            self._record(
                conn,
                route,
                res,
                "unauthorized",
                items,
                [(i.row_id, "held", 0, 0.0, f"destination paused: {reason}") for i in items],
            )
            self._pause(conn, route, reason)
            for i in items:
                blocked.add(i.customer_key)
            result.held += len(items)
            self._count(name, items, "held")
            return outcome

        # REJECTED: something in the batch is bad. Customer.io rejects the whole request, so
        # bisect until each bad message stands alone; the good ones are delivered on the way.
        if len(items) == 1:
            i = items[0]
            reason = f"rejected by Customer.io ({res.status_code}): {res.response_snippet}"
            self._record(conn, route, res, "rejected", items, [(i.row_id, "dead", 1, 0.0, reason)])
            result.dead += 1
            self._count(name, items, "dead")
            log.error("destination %s: message row %d is dead: %s", name, i.row_id, reason)
            return outcome
        self._record(conn, route, res, "rejected", items, [])
        left, right = bisect(len(items))
        for half in (left, right):
            part = [items[j] for j in half if items[j].customer_key not in blocked]
            skipped = [items[j].row_id for j in half if items[j].customer_key in blocked]
            if skipped:
                with conn.transaction():
                    conn.execute(
                        q.OUTBOX_RELEASE,
                        {"ids": skipped, "owner": self.instance, "delay_s": 0.0},
                    )
                result.released += len(skipped)
            if part and self._send(conn, route, part, blocked, result) is Outcome.UNAUTHORIZED:
                return Outcome.UNAUTHORIZED
        return outcome

    def _count(self, destination: str, items: Sequence[Item], outcome: str) -> None:
        for i in items:
            self.metrics.messages.labels(destination, i.event, i.kind, outcome).inc()

    @staticmethod
    def _describe(res: SendResult) -> str | None:
        if res.status_code is None:
            return f"{res.error_kind}: {res.error}"
        if 200 <= res.status_code < 300:
            return None
        snippet = res.response_snippet.strip()
        return f"HTTP {res.status_code}" + (f": {snippet[:200]}" if snippet else "")

    def _record(
        self,
        conn: Conn,
        route: Route,
        res: SendResult,
        outcome: str,
        items: Sequence[Item],
        rows: Sequence[tuple[int, str, int, float, str | None]],
    ) -> None:
        """One transaction: the attempt row and every message's new state."""
        with conn.transaction():
            conn.execute(
                q.ATTEMPT_INSERT,
                {
                    "relay_instance": self.instance,
                    "destination": route.pause_key,
                    "started_at": res.started_at,
                    "latency_ms": res.latency_s * 1000.0,
                    "status_code": res.status_code,
                    "outcome": outcome,
                    "error": self._describe(res),
                    "response_snippet": res.response_snippet[:500] or None,
                    "request_bytes": res.request_bytes,
                    "message_count": len(items),
                    "message_ids": [i.row_id for i in items],
                },
            )
            if rows:
                self._record_outcomes(conn, rows)

    def _record_outcomes(
        self, conn: Conn, rows: Sequence[tuple[int, str, int, float, str | None]]
    ) -> None:
        conn.execute(
            q.OUTBOX_RECORD_OUTCOMES,
            {
                "ids": [r[0] for r in rows],
                "states": [r[1] for r in rows],
                "attempted": [r[2] for r in rows],
                "delays": [r[3] for r in rows],
                "errors": [r[4] for r in rows],
                "owner": self.instance,
            },
        )

    def _pause(self, conn: Conn, route: Route, reason: str) -> None:
        dest = route.destination
        assert dest is not None
        log.error(
            "DESTINATION PAUSED: %s (%s). Nothing more is sent to it until its key is fixed "
            "(relay destinations set, or CUSTOMERIO_WRITE_KEY and a restart).",
            route.pause_key,
            reason,
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

    def _hold_paused(self, conn: Conn, route: Route, ids: list[int]) -> None:
        with conn.transaction():
            conn.execute(
                q.OUTBOX_MARK_HELD,
                {"ids": ids, "reason": f"destination {route.pause_key} is paused"},
            )

    # --- release on shutdown ------------------------------------------------------------------

    def release_all(self) -> int:
        """Hand back anything still leased to this instance (used at shutdown)."""
        with self._svc() as conn, conn.transaction():
            cur = conn.execute(
                "UPDATE relay_outbox SET state = CASE WHEN attempts > 0 THEN 'retrying' "
                "ELSE 'pending' END, lease_owner = NULL, lease_expires_at = NULL, "
                "updated_at = now() WHERE state = 'in_flight' AND lease_owner = %(owner)s",
                {"owner": self.instance},
            )
            return cur.rowcount


@dataclass(frozen=True)
class _Row:
    """A row of OUTBOX_CLAIM_FOLLOWERS, in its column order."""

    id: int
    customer_key: str
    kind: str
    project_id: str | None
    event: str
    body_text: str
    attempts: int
    state: str
    due: bool
    age_s: float


def _due_run(rows: Sequence[_Row]) -> list[_Row]:
    """The customer's leading rows that can go now, all to the same project.

    Stops at the first row that is held, in flight or not yet due (a later retry): nothing
    after it may overtake it.
    """
    run: list[_Row] = []
    for row in rows:
        if row.state not in ("pending", "retrying") or not row.due:
            break
        if run and row.project_id != run[0].project_id:
            break
        run.append(row)
    return run


def _coalesce(run: Sequence[_Row]) -> Plan:
    """Coalesce a customer's run; only identifies are parsed (tracks are sent as stored)."""
    claimed = [
        Claimed(
            r.id,
            cast(Literal["identify", "track"], r.kind),
            json.loads(r.body_text) if r.kind == "identify" else {},
            r.attempts,
        )
        for r in run
    ]
    plan = coalesce(claimed)
    # A merged identify that grows past Customer.io's limit would be dead while each of its
    # parts would have gone through: send the parts instead.
    if any(len(_encode(b)) > MAX_MESSAGE_BYTES for b in plan.rewritten.values()):
        return Plan(tuple(Outgoing(c.row_id, c.body) for c in claimed), {}, {})
    return plan
