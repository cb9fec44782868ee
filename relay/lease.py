"""Leases: which claimed rows this relay still holds, renewed until each one's outcome is written.

A claim marks its rows in flight under a lease: owner, expiry and a token unique to the claim.
Three rules keep a relay from sending or recording what it no longer owns:

1. **Renew every claimed row until its outcome is written.** ``LeaseKeeper`` renews all open
   rows of all live claims every ``lease_s / 3`` on a connection of its own, however long a
   chain waits for a sending thread. (Renewing from the chain, as before, left chains queued
   behind ``RELAY_CONCURRENCY`` to expire, and another relay sent them too.)
2. **Check what the renewal touched.** ``OUTBOX_EXTEND_LEASE`` returns the rows still held; a
   row it did not return was taken by a rescue and is *lost*: it is never sent.
3. **Send only under a lease that outlives the request.** Before each request the sending
   thread asks ``Lease.ensure``: every row of the batch must be held for at least the HTTP
   deadline plus a margin, judged by this relay's monotonic clock from the moment *before*
   the renewal statement ran (the database set the expiry later than that, never earlier).
   If not, the thread renews those rows itself first. A request therefore always ends, one
   way or another, while its rows are still ours; and outcomes are fenced on the token, so a
   late record after all (a stalled database) changes nothing another claim owns.

Race windows, and why they are safe: a row finished by a sending thread while the keeper
renews is not returned and is marked lost; it is never sent again anyway. A rescue that takes
a row between the check and the request cannot happen, because the check guarantees the
lease outlives the request.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from relay import queries as q

log = logging.getLogger("relay")

Conn = Any  # psycopg.Connection; kept loose so this module stays importable without a driver


UNBOUNDED_SPAN: tuple[Any, Any] = (q.ANY_SPAN["occ_lo"], q.ANY_SPAN["occ_hi"])
"""A span of occurred_at (``Lease.span``) that holds rows of any day: right, only slower."""


class Lease:
    """One claim's hold on its in-flight rows.

    ``open`` rows are in flight under this claim and not yet recorded or handed back;
    ``renewed_at[id]`` is the monotonic time just before the statement that last set the row's
    expiry; ``lost`` rows were found taken by a rescue. Thread-safe: the keeper and the
    claim's sending threads share it.
    """

    def __init__(
        self,
        ids: Iterable[int],
        lease_s: float,
        *,
        claimed_at: float,
        clock: Callable[[], float] = time.monotonic,
        span: tuple[Any, Any] = UNBOUNDED_SPAN,
    ) -> None:
        self.token = secrets.randbits(63)
        # The earliest and latest occurred_at of the claim's rows: every statement that names
        # them by id passes it (queries.SPAN), so only those days' partitions are read. The
        # default (unbounded) is right for any rows, only slower.
        self.span = span
        self.lease_s = lease_s
        self.clock = clock
        self._lock = threading.Lock()
        self.open: set[int] = set(ids)
        self.renewed_at: dict[int, float] = dict.fromkeys(self.open, claimed_at)
        self.lost: set[int] = set()
        # Rows a request carried (marked before it left): once sent, a row may be held by
        # Customer.io, so it is never handed back as unsent (see ``split_open``).
        self.sent: set[int] = set()

    def mark_sent(self, ids: Iterable[int]) -> None:
        with self._lock:
            self.sent.update(ids)

    def split_open(self) -> tuple[list[int], list[int]]:
        """The rows still open: (never sent, maybe sent). What a cycle that died leaves."""
        with self._lock:
            unsent = sorted(i for i in self.open if i not in self.sent)
            maybe = sorted(i for i in self.open if i in self.sent)
        return unsent, maybe

    def snapshot(self) -> list[int]:
        with self._lock:
            return sorted(self.open)

    def finished(self, ids: Iterable[int]) -> None:
        """Outcomes (or releases) of these rows are written: stop renewing them."""
        with self._lock:
            for i in ids:
                self.open.discard(i)
                self.renewed_at.pop(i, None)

    def renewed(self, asked: Sequence[int], held: Iterable[int], at: float) -> None:
        held_set = set(held)
        with self._lock:
            for i in asked:
                if i in held_set:
                    if i in self.open:
                        self.renewed_at[i] = at
                elif i in self.open:
                    self.open.discard(i)
                    self.renewed_at.pop(i, None)
                    self.lost.add(i)

    def held_until(self, ids: Iterable[int]) -> float:
        """The monotonic time until which every one of ``ids`` is surely ours (-inf if any is
        lost or finished)."""
        with self._lock:
            times = [self.renewed_at.get(i) for i in ids]
        if any(t is None for t in times):
            return float("-inf")
        return min(t for t in times if t is not None) + self.lease_s if times else float("inf")

    def is_lost(self, row_id: int) -> bool:
        with self._lock:
            return row_id in self.lost

    def ensure(self, conn: Conn, ids: Sequence[int], need_s: float) -> list[int]:
        """Of ``ids``, the rows that are ours for at least ``need_s`` more seconds.

        Renews on ``conn`` when the keeper's last renewal leaves too little; rows the renewal
        does not return are lost and left out. The caller sends only what this returns.
        """
        if self.held_until(ids) - self.clock() >= need_s:
            return list(ids)
        renew(conn, [self], only=ids)
        with self._lock:
            return [i for i in ids if i in self.open and i not in self.lost]


def renew(
    conn: Conn,
    leases: Sequence[Lease],
    *,
    only: Sequence[int] | None = None,
    log_fields: Mapping[str, Any] | None = None,
) -> int:
    """Renew the open rows of ``leases`` (or just ``only``) in one statement; mark the lost.

    ``log_fields`` go with the warning about lost rows (``extra=``, see ``relay.logs``)."""
    asked: list[tuple[Lease, list[int]]] = []
    for lease in leases:
        ids = lease.snapshot()
        if only is not None:
            wanted = set(only)
            ids = [i for i in ids if i in wanted]
        if ids:
            asked.append((lease, ids))
    if not asked:
        return 0
    all_ids = sorted(i for _, ids in asked for i in ids)
    lease_s = max(lease.lease_s for lease, _ in asked)
    at = asked[0][0].clock()
    with conn.transaction():
        rows = conn.execute(
            q.OUTBOX_EXTEND_LEASE,
            {
                "ids": all_ids,
                "tokens": [lease.token for lease, _ in asked],
                "lease_s": lease_s,
                **span_params([lease for lease, _ in asked]),
            },
        ).fetchall()
    held: dict[int, set[int]] = {}
    for row_id, token in rows:
        held.setdefault(token, set()).add(row_id)
    lost = 0
    for lease, ids in asked:
        before = len(lease.lost)
        lease.renewed(ids, held.get(lease.token, set()), at)
        lost += len(lease.lost) - before
    if lost:
        log.warning(
            "%d claimed messages were taken by a lease rescue; they are not sent",
            lost,
            extra={**(log_fields or {}), "messages": lost},
        )
    return lost


def span_params(leases: Sequence[Lease]) -> dict[str, Any]:
    """``occ_lo`` and ``occ_hi`` (queries.SPAN) covering every lease in ``leases``."""
    los = [lease.span[0] for lease in leases]
    his = [lease.span[1] for lease in leases]
    if all(isinstance(v, datetime) for v in (*los, *his)):
        return {"occ_lo": min(los), "occ_hi": max(his)}
    return dict(q.ANY_SPAN)


class LeaseKeeper(threading.Thread):
    """Renews every live claim's open rows every ``lease_s / 3`` on its own connection.

    ``connect`` opens that connection (and maps driver errors); a database error drops it and
    the next turn reconnects. A renewal that keeps failing lets the leases run out: the sending
    threads' own check (``Lease.ensure``) then renews or skips before each request.
    """

    def __init__(
        self,
        connect: Callable[[], Conn],
        lease_s: float,
        log_fields: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(name="relay-lease", daemon=True)
        self._log_fields = dict(log_fields or {})
        self._connect = connect
        self._every = max(0.05, lease_s / 3)
        self._leases: dict[int, Lease] = {}
        self._lock = threading.Lock()
        self._conn: Conn | None = None
        self._closed = threading.Event()

    def add(self, lease: Lease) -> None:
        with self._lock:
            self._leases[lease.token] = lease

    def remove(self, lease: Lease) -> None:
        with self._lock:
            self._leases.pop(lease.token, None)

    def live(self) -> list[Lease]:
        with self._lock:
            return list(self._leases.values())

    def run(self) -> None:
        while not self._closed.wait(self._every):
            leases = self.live()
            if not leases:
                continue
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self._connect()
                renew(self._conn, leases, log_fields=self._log_fields)
            except Exception as exc:
                log.warning(
                    "lease renewal failed (%s); retrying in %.1fs",
                    exc,
                    self._every,
                    extra=self._log_fields,
                )
                if self._conn is not None:
                    self._conn.close()
                self._conn = None

    def close(self) -> None:
        self._closed.set()
        if self.is_alive():
            self.join(timeout=5.0)
        if self._conn is not None and not self._conn.closed:
            self._conn.close()
        self._conn = None
