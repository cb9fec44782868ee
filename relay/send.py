"""Sending one claim's work to one destination: chains of batches, each request's outcome.

``judge`` is the pure part: one request's ``SendResult`` and its items in, a ``Judgement`` out
(what to record on each row, as typed values). ``Sender`` is the shell: the rate limiter, the
lease check before each request, the HTTP call, and one short transaction per request that
records the attempt row and every row's outcome.

Per-customer order inside a claim: chains share no customer (``plan_chains``) and run
concurrently; within a chain batches go one after another. A customer whose message failed
(retrying, lost to a rescue, or skipped) is *blocked* for the rest of the chain: its later
messages are handed back unsent, so nothing overtakes the failed one.

Several claims may be sending at once (``RELAY_CLAIMS_IN_FLIGHT``): their chains share this
sender's ``concurrency`` threads, so the relay never has more requests in flight than that, and
its destinations' rate limiters, so a 429 met by one claim pauses the others' requests too. A
401/403 stops every chain of the claim that met it at once, and the chains of other claims
before their next request, as soon as the router shows the destination paused.

A 400 (or 413) means something in the batch is bad: the halves are queued back at the front
of the chain and sent one after the other (each through the same rate limit and lease check)
until every bad message stands alone and is dead with Customer.io's text.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg

from relay import queries as q
from relay.batching import bisect, plan_chains
from relay.client import SendResult
from relay.destinations import DEFAULT, Route
from relay.lease import Lease, span_params
from relay.limits import MAX_BATCH_BYTES
from relay.plan import DestinationWork, Item
from relay.ratelimit import AcquireStopped
from relay.retry import Outcome, RetryPolicy, classify, decide, parse_retry_after

log = logging.getLogger("relay")

Conn = psycopg.Connection[tuple[Any, ...]]

_DEADLOCK_RETRIES = 3


@dataclass(frozen=True)
class RowOutcome:
    """What one request decided for one row."""

    row_id: int
    state: str  # delivered | retrying | dead | held
    attempted: int  # 1 when the attempt counts, 0 when it does not (a refused key)
    delay_s: float
    error: str | None


@dataclass(frozen=True)
class Judgement:
    """One request's meaning: the attempt's outcome and every row's new state.

    ``rows`` is empty for a rejected batch of several messages: nothing is decided for them
    yet, the halves are sent next.
    """

    outcome: Outcome
    attempt_outcome: str
    error: str | None
    rows: tuple[RowOutcome, ...]
    retry_after_s: float | None


def describe(res: SendResult) -> str | None:
    """One line for the attempt row and the outbox's last_error."""
    if res.status_code is None:
        return f"{res.error_kind}: {res.error}"
    if 200 <= res.status_code < 300:
        return None
    snippet = res.response_snippet.strip()
    return f"HTTP {res.status_code}" + (f": {snippet[:200]}" if snippet else "")


def judge(
    res: SendResult,
    items: Sequence[Item],
    policy: RetryPolicy,
    jitter: float,
    now: datetime,
    *,
    uncertain_floor_s: float = 0.0,
) -> Judgement:
    """What one request's result means for each of its rows (pure).

    After a failure that leaves it unknown whether Customer.io got the request (a timeout,
    or the connection dropped after sending), the retry waits at least ``uncertain_floor_s``:
    a request Customer.io applies late, after its own retry and the newer messages that
    followed it, would set the profile back to the older traits it carries. The floor gives
    such a request that much longer to land first; it cannot rule it out.
    """
    outcome = classify(res.status_code, res.error_kind)
    error = describe(res)
    if outcome is Outcome.DELIVERED:
        rows = tuple(RowOutcome(i.row_id, "delivered", 1, 0.0, None) for i in items)
        return Judgement(outcome, "delivered", error, rows, None)
    if outcome is Outcome.RETRY:
        retry_after = parse_retry_after(res.retry_after, now)
        # One jitter draw per request: a customer's messages in this batch then come due
        # together and go out together, instead of one by one in their order.
        out = []
        uncertain = res.status_code is None and res.error_kind != "connect"
        floor = uncertain_floor_s if uncertain else 0.0
        for i in items:
            d = decide(i.attempts + 1, i.age_s, retry_after, policy, jitter)
            if d.dead:
                out.append(RowOutcome(i.row_id, "dead", 1, 0.0, f"{error}; {d.reason}"))
            else:
                out.append(RowOutcome(i.row_id, "retrying", 1, max(d.delay_s, floor), error))
        return Judgement(outcome, "retry", error, tuple(out), retry_after)
    if outcome is Outcome.UNAUTHORIZED:
        reason = (
            f"destination paused: Customer.io answered {res.status_code}: the write key was refused"
        )
        rows = tuple(RowOutcome(i.row_id, "held", 0, 0.0, reason) for i in items)
        return Judgement(outcome, "unauthorized", error, rows, None)
    if len(items) == 1:
        reason = f"rejected by Customer.io ({res.status_code}): {res.response_snippet}"
        rows = (RowOutcome(items[0].row_id, "dead", 1, 0.0, reason),)
        return Judgement(outcome, "rejected", error, rows, None)
    return Judgement(outcome, "rejected", error, (), None)


@dataclass
class ChainResult:
    """What sending did: messages by outcome, requests made (summed over chains and cycles)."""

    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    held: int = 0
    released: int = 0
    lost: int = 0
    requests: int = 0

    def add(self, other: ChainResult) -> None:
        for name in ChainResult.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


class Sender:
    """Sends chains of batches for a relay; see the module docstring.

    ``relay`` provides: settings, instance, router, metrics, policy, rand, stopping, and
    ``send_conn()`` (this thread's own connection, a context manager) and ``pause(conn,
    route, reason)``.
    """

    def __init__(self, relay: Any) -> None:
        self.relay = relay
        s = relay.settings
        self.need_s = s.http_timeout_s + min(1.0, (s.lease_s - s.http_timeout_s) / 2)
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def _threads(self) -> ThreadPoolExecutor:
        """The sending threads, made once and shared by every claim in flight."""
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    self.relay.settings.concurrency, thread_name_prefix="relay-send"
                )
            return self._pool

    def send_destination(
        self, conn: Conn | None, unit: DestinationWork, lease: Lease
    ) -> ChainResult:
        """Send one destination's share of a claim: chains of batches, several at once.

        With ``conn`` (the caller's connection, which nothing else uses meanwhile) and room for
        one chain at a time only, the chains go one after another on the caller's thread;
        otherwise every chain goes to the sending threads, each on its thread's connection.
        """
        items = unit.items
        total = ChainResult()
        if not items:
            return total
        s = self.relay.settings
        chains = plan_chains(
            [i.customer_key for i in items],
            [i.size for i in items],
            max_items=s.batch_size,
            max_bytes=MAX_BATCH_BYTES,
        )
        paused = threading.Event()  # set by the first 401/403: every chain stops
        plans = [[[items[j] for j in r] for r in chain] for chain in chains]
        if conn is not None and min(s.concurrency, len(plans)) <= 1:
            for p in plans:
                total.add(self.send_chain(conn, unit.route, p, paused, lease))
            return total
        pool = self._threads()
        # A chain that fails (its database session died) stops the others before their next
        # request, and every chain is waited for: no thread may go on sending for a cycle
        # that has ended, whose lease nobody renews any more.
        abort = threading.Event()
        futures = [
            pool.submit(self._send_chain_own_conn, unit.route, p, paused, lease, abort)
            for p in plans
        ]
        failure: BaseException | None = None
        for f in futures:
            try:
                total.add(f.result())
            except BaseException as exc:  # re-raised below, once every chain has stopped
                failure = failure or exc
        if failure is not None:
            raise failure
        return total

    def _send_chain_own_conn(
        self,
        route: Route,
        batches: list[list[Item]],
        paused: threading.Event,
        lease: Lease,
        abort: threading.Event,
    ) -> ChainResult:
        try:
            with self.relay.send_conn() as conn:
                return self.send_chain(conn, route, batches, paused, lease, abort)
        except BaseException:
            abort.set()
            raise

    def send_chain(
        self,
        conn: Conn,
        route: Route,
        batches: list[list[Item]],
        paused: threading.Event,
        lease: Lease,
        abort: threading.Event | None = None,
    ) -> ChainResult:
        relay = self.relay
        result = ChainResult()
        blocked: set[str] = set()  # customers with a failed, lost or skipped message
        leftovers: list[int] = []
        queue: deque[list[Item]] = deque(batches)
        dest = route.destination
        assert dest is not None
        client, limiter = relay.router.client(dest)
        held_because: str | None = None  # the destination stopped: leftovers are held
        while queue:
            batch = queue.popleft()
            held_because = self._stopped(route, paused)
            if held_because or relay.stopping.is_set() or (abort and abort.is_set()):
                leftovers.extend(i.row_id for i in batch)
                leftovers.extend(i.row_id for b in queue for i in b)
                break
            ready = [i for i in batch if i.customer_key not in blocked]
            leftovers.extend(i.row_id for i in batch if i.customer_key in blocked)
            if not ready:
                continue
            # The destination's pace, and any 429 pause (this relay's or another's).
            try:
                limiter.acquire(stop=relay.stopping)
            except AcquireStopped:
                queue.appendleft(ready)
                continue
            # Only rows that stay ours for the whole request may go.
            ours = set(lease.ensure(conn, [i.row_id for i in ready], self.need_s))
            for i in ready:
                if i.row_id not in ours:
                    blocked.add(i.customer_key)
                    result.lost += 1
            ready = [i for i in ready if i.row_id in ours and i.customer_key not in blocked]
            if not ready:
                continue
            verdict = self._request(conn, route, client, limiter, ready, lease, result)
            if verdict.outcome is Outcome.UNAUTHORIZED:
                paused.set()
                held_because = self._stopped(route, paused)
                blocked.update(i.customer_key for i in ready)
            elif verdict.outcome is Outcome.RETRY:
                blocked.update(
                    i.customer_key
                    for i, r in zip(ready, verdict.rows, strict=True)
                    if r.state == "retrying"
                )
            elif verdict.outcome is Outcome.REJECTED and not verdict.rows:
                left, right = bisect(len(ready))
                queue.appendleft([ready[j] for j in right])
                queue.appendleft([ready[j] for j in left])
        if leftovers:
            with conn.transaction():
                if held_because:
                    conn.execute(
                        q.OUTBOX_HOLD_CLAIMED,
                        {
                            "ids": leftovers,
                            "token": lease.token,
                            "reason": held_because,
                            **span_params([lease]),
                        },
                    )
                else:
                    conn.execute(
                        q.OUTBOX_RELEASE,
                        {
                            "ids": leftovers,
                            "token": lease.token,
                            "delay_s": 0.0,
                            **span_params([lease]),
                        },
                    )
            lease.finished(leftovers)
            result.released += len(leftovers)
            log.debug(
                "handed back %d unsent messages of this claim",
                len(leftovers),
                extra=self.relay.log_fields(destination=route.pause_key, messages=len(leftovers)),
            )
        return result

    def _stopped(self, route: Route, paused: threading.Event) -> str | None:
        """Why nothing more of this chain may go to its destination, or None: this claim met a
        401/403 (``paused``), or the router now shows the destination unusable (another
        claim's 401/403 paused it, or an operator disabled it)."""
        if paused.is_set():
            return f"destination {route.pause_key} is paused"
        now = self.relay.router.route(None if route.pause_key == DEFAULT else route.pause_key)
        if now.destination is None:
            return now.reason or f"destination {route.pause_key} is paused"
        return None

    def _request(
        self,
        conn: Conn,
        route: Route,
        client: Any,
        limiter: Any,
        items: list[Item],
        lease: Lease,
        result: ChainResult,
    ) -> Judgement:
        relay = self.relay
        name = route.pause_key
        lease.mark_sent(i.row_id for i in items)
        res: SendResult = client.send_batch([i.encoded for i in items])
        result.requests += 1
        verdict = judge(
            res,
            items,
            relay.policy,
            relay.rand(),
            datetime.now(UTC),
            uncertain_floor_s=relay.settings.http_timeout_s,
        )
        relay.metrics.requests.labels(name, str(res.status_code or res.error_kind)).inc()
        relay.metrics.latency.labels(name).observe(res.latency_s)
        relay.metrics.batch_size.observe(len(items))
        throttle_s = None
        # The fields a log collector filters on (JSON log lines carry them as keys).
        fields = relay.log_fields(
            destination=name,
            status=res.status_code if res.status_code is not None else res.error_kind,
            messages=len(items),
            attempt=1 + max(i.attempts for i in items),
        )
        if res.status_code == 429:
            # Back-pressure on the whole workspace: every sending thread of this relay waits
            # (the limiter halves its rate and pauses), and so does every other relay (the
            # throttle row, read before each claim's requests).
            throttle_s = limiter.note_429(verdict.retry_after_s)
            log.warning(
                "destination %s: 429, pausing it for %.1fs",
                name,
                throttle_s,
                extra={**fields, "pause_s": round(throttle_s, 3)},
            )
        elif verdict.outcome is Outcome.DELIVERED:
            limiter.note_success()
        self._record(conn, route, res, verdict, items, lease, throttle_s)
        for r, i in zip(verdict.rows, items, strict=False):
            relay.metrics.messages.labels(name, i.event, i.kind, r.state).inc()
        for r in verdict.rows:
            if r.state == "delivered":
                result.delivered += 1
            elif r.state == "retrying":
                result.retrying += 1
            elif r.state == "dead":
                result.dead += 1
            elif r.state == "held":
                result.held += 1
        if verdict.outcome is Outcome.RETRY:
            log.warning(
                "destination %s: %s; %d messages to retry",
                name,
                verdict.error,
                len(items),
                extra={**fields, "error": verdict.error},
            )
        elif verdict.outcome is Outcome.REJECTED and verdict.rows:
            log.error(
                "destination %s: message row %d is dead: %s",
                name,
                items[0].row_id,
                verdict.rows[0].error,
                extra={**fields, "row_id": items[0].row_id, "error": verdict.rows[0].error},
            )
        elif verdict.outcome is Outcome.UNAUTHORIZED:
            relay.pause(conn, route, verdict.rows[0].error or "write key refused")
        return verdict

    def _record(
        self,
        conn: Conn,
        route: Route,
        res: SendResult,
        verdict: Judgement,
        items: Sequence[Item],
        lease: Lease,
        throttle_s: float | None,
    ) -> None:
        """One transaction: the attempt row, every row's new state, the throttle if any."""
        rows = sorted(verdict.rows, key=lambda r: r.row_id)
        for attempt in range(_DEADLOCK_RETRIES):
            try:
                with conn.transaction():
                    conn.execute(
                        q.ATTEMPT_INSERT,
                        {
                            "relay_instance": self.relay.instance,
                            "destination": route.pause_key,
                            "started_at": res.started_at,
                            "latency_ms": res.latency_s * 1000.0,
                            "status_code": res.status_code,
                            "outcome": verdict.attempt_outcome,
                            "error": verdict.error,
                            "response_snippet": res.response_snippet[:500] or None,
                            "request_bytes": res.request_bytes,
                            "message_count": len(items),
                            "message_ids": [i.row_id for i in items],
                        },
                    )
                    if rows:
                        record_outcomes(conn, rows, lease)
                    if throttle_s is not None:
                        conn.execute(
                            q.THROTTLE_SET,
                            {
                                "destination": route.pause_key,
                                "pause_s": throttle_s,
                                "reason": verdict.error,
                            },
                        )
                break
            except psycopg.errors.DeadlockDetected:
                # Only the lease renewal and a rescue touch these rows besides us; both lock
                # in id order too, so this is rare. The transaction rolled back whole.
                if attempt == _DEADLOCK_RETRIES - 1:
                    raise
        lease.finished(r.row_id for r in rows)


def record_outcomes(conn: Conn, rows: Sequence[RowOutcome], lease: Lease) -> None:
    """OUTBOX_RECORD_OUTCOMES for ``rows`` (sorted by id), fenced on the claim's token."""
    conn.execute(
        q.OUTBOX_RECORD_OUTCOMES,
        {
            "ids": [r.row_id for r in rows],
            "states": [r.state for r in rows],
            "attempted": [r.attempted for r in rows],
            "delays": [r.delay_s for r in rows],
            "errors": [r.error for r in rows],
            "token": lease.token,
            **span_params([lease]),
        },
    )
