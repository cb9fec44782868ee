"""Leases on a real database (relay.lease): renewal, loss to a rescue, the token fence."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any

import psycopg
import pytest

from relay import queries as q
from relay.lease import Lease, LeaseKeeper, renew
from tests.relay_helpers import funnel_event, wait_until, write_events

Conn = psycopg.Connection[tuple[Any, ...]]


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class CountingConn:
    """Counts the statements run through it; transactions go to the real connection."""

    def __init__(self, conn: Conn) -> None:
        self.conn = conn
        self.executed = 0

    def execute(self, *args: Any, **kw: Any) -> Any:
        self.executed += 1
        return self.conn.execute(*args, **kw)

    def transaction(self) -> AbstractContextManager[Any]:
        return self.conn.transaction()


@pytest.fixture
def db(dsn: str) -> Iterator[Conn]:
    write_events(dsn, [funnel_event("c1", 1), funnel_event("c2", 2)])  # four rows
    with psycopg.connect(dsn, autocommit=True) as conn:
        yield conn


def all_ids(conn: Conn) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM relay_outbox ORDER BY id").fetchall()]


def claim(conn: Conn, ids: Sequence[int], lease: Lease, *, owner: str = "relay-1") -> None:
    """Mark ``ids`` in flight under ``lease`` (as the claim transaction does)."""
    conn.execute(
        q.OUTBOX_CLAIM_MARK,
        {
            "ids": list(ids),
            "states": ["in_flight"] * len(ids),
            "into_ids": [None] * len(ids),
            "bodies": "[" + ",".join(["null"] * len(ids)) + "]",
            "errors": [None] * len(ids),
            "owner": owner,
            "token": lease.token,
            "lease_s": lease.lease_s,
            **q.ANY_SPAN,
        },
    )


def expiries(conn: Conn, ids: Sequence[int]) -> dict[int, datetime | None]:
    rows = conn.execute(
        "SELECT id, lease_expires_at FROM relay_outbox WHERE id = ANY(%s)", [list(ids)]
    ).fetchall()
    return {r[0]: r[1] for r in rows}


def later(a: datetime | None, b: datetime | None) -> bool:
    return a is not None and b is not None and a > b


def rows_state(conn: Conn, ids: Sequence[int]) -> dict[int, tuple[str, int | None, int]]:
    rows = conn.execute(
        "SELECT id, state, lease_token, attempts FROM relay_outbox WHERE id = ANY(%s)", [list(ids)]
    ).fetchall()
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


def rescue(conn: Conn, ids: Sequence[int]) -> set[int]:
    """Let the leases of ``ids`` run out, then run the rescue; the ids it took."""
    conn.execute(
        "UPDATE relay_outbox SET lease_expires_at = now() - interval '1 second' WHERE id = ANY(%s)",
        [list(ids)],
    )
    return {r[0] for r in conn.execute(q.OUTBOX_RESCUE_EXPIRED).fetchall()}


def record_delivered(conn: Conn, ids: Sequence[int], token: int) -> int:
    cur = conn.execute(
        q.OUTBOX_RECORD_OUTCOMES,
        {
            "ids": sorted(ids),
            "states": ["delivered"] * len(ids),
            "attempted": [1] * len(ids),
            "delays": [0.0] * len(ids),
            "errors": [None] * len(ids),
            "token": token,
            **q.ANY_SPAN,
        },
    )
    return cur.rowcount


def test_renew_extends_the_lease_and_loses_nothing(db: Conn) -> None:
    ids = all_ids(db)
    assert len(ids) == 4
    clock = FakeClock()
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    before = expiries(db, ids)
    # The renewal asks for a longer lease, so the expiry moves even within one clock tick.
    lease.lease_s = 60.0
    clock.now += 5.0

    assert renew(db, [lease]) == 0

    after = expiries(db, ids)
    assert all(later(after[i], before[i]) for i in ids)
    assert lease.lost == set()
    assert lease.snapshot() == ids
    assert lease.renewed_at == dict.fromkeys(ids, 1005.0)
    assert lease.held_until(ids) == 1065.0


def test_rows_a_rescue_took_are_lost_and_ensure_leaves_them_out(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    taken = rescue(db, ids[:2])
    assert taken == set(ids[:2])
    assert {i: s[0] for i, s in rows_state(db, ids[:2]).items()} == dict.fromkeys(
        ids[:2], "retrying"
    )

    clock.now += 31.0  # past the lease: ensure must ask the database
    before = expiries(db, ids[2:])
    assert lease.ensure(db, ids, need_s=5.0) == ids[2:]

    assert lease.lost == set(ids[:2])
    assert lease.snapshot() == ids[2:]
    assert lease.is_lost(ids[0]) and not lease.is_lost(ids[2])
    after = expiries(db, ids[2:])
    for i in ids[2:]:
        b, a = before[i], after[i]
        assert b is not None and a is not None and a >= b
    assert lease.held_until(ids[2:]) == clock.now + 30.0
    # The rescued rows stay the rescue's: nothing gave them back a lease.
    assert expiries(db, ids[:2]) == dict.fromkeys(ids[:2], None)


def test_renew_reports_exactly_the_rows_a_rescue_took(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    taken = rescue(db, [ids[2], ids[3]])  # every row of customer c2

    assert renew(db, [lease]) == 2
    assert lease.lost == taken == {ids[2], ids[3]}
    assert lease.snapshot() == [ids[0], ids[1]]
    # A second renewal finds nothing new.
    assert renew(db, [lease]) == 0
    assert lease.lost == taken


def test_recorded_rows_are_neither_renewed_nor_lost(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    assert record_delivered(db, ids[:2], lease.token) == 2
    lease.finished(ids[:2])

    asked: list[Any] = []
    counting = CountingConn(db)
    real_execute = counting.execute

    def spy(sql: Any, params: Any = None) -> Any:
        asked.append(params)
        return real_execute(sql, params)

    counting.execute = spy  # type: ignore[method-assign]
    assert renew(counting, [lease]) == 0

    assert asked[0]["ids"] == ids[2:]
    assert lease.lost == set()
    assert lease.snapshot() == ids[2:]
    state = rows_state(db, ids)
    assert [state[i][0] for i in ids] == ["delivered", "delivered", "in_flight", "in_flight"]
    assert expiries(db, ids[:2]) == dict.fromkeys(ids[:2], None)
    assert lease.held_until(ids[:2]) == float("-inf")


def test_renewal_does_not_touch_another_claims_rows(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    first = Lease(ids[:2], 30.0, claimed_at=clock(), clock=clock)
    second = Lease(ids[2:], 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids[:2], first)
    claim(db, ids[2:], second)
    theirs = expiries(db, ids[2:])
    first.lease_s = 600.0

    # Asked for the other claim's rows too (as a confused caller might): only ours move.
    assert renew(db, [first], only=ids) == 0
    assert expiries(db, ids[2:]) == theirs
    ours = expiries(db, ids[:2])
    assert all(later(ours[i], theirs[ids[2]]) for i in ids[:2])
    state = rows_state(db, ids)
    assert {state[i][1] for i in ids[2:]} == {second.token}


def test_a_row_reclaimed_by_another_claim_is_lost_to_the_first(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    first = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, first)
    rescue(db, ids[:2])
    second = Lease(ids[:2], 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids[:2], second, owner="relay-2")
    theirs = expiries(db, ids[:2])
    first.lease_s = 600.0

    assert renew(db, [first]) == 2
    assert first.lost == set(ids[:2])
    assert expiries(db, ids[:2]) == theirs
    assert second.lost == set()


def test_a_joint_renewal_still_reports_a_row_lost_to_another_claim(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    first = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, first)
    rescue(db, ids[:2])
    second = Lease(ids[:2], 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids[:2], second, owner="relay-2")

    # What LeaseKeeper does with every live claim of this relay.
    renew(db, [first, second])

    assert first.lost == set(ids[:2])
    assert first.snapshot() == ids[2:]


def test_an_outcome_under_a_stale_token_changes_nothing(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock()
    first = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, first)
    rescue(db, ids[:2])
    after_rescue = rows_state(db, ids[:2])
    assert record_delivered(db, ids[:2], first.token) == 0
    assert rows_state(db, ids[:2]) == after_rescue

    second = Lease(ids[:2], 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids[:2], second, owner="relay-2")
    reclaimed = rows_state(db, ids[:2])
    assert record_delivered(db, ids[:2], first.token) == 0
    assert rows_state(db, ids[:2]) == reclaimed
    assert {s[0] for s in reclaimed.values()} == {"in_flight"}
    # The current claim's record does land.
    assert record_delivered(db, ids[:2], second.token) == 2
    # And rows the first claim still holds take its record.
    assert record_delivered(db, ids[2:], first.token) == 2


def test_ensure_renews_only_when_the_last_renewal_leaves_too_little(db: Conn) -> None:
    ids = all_ids(db)
    clock = FakeClock(1000.0)
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    counting = CountingConn(db)

    clock.now = 1020.0  # held until 1030: 10 s left
    assert lease.ensure(counting, ids, need_s=10.0) == ids
    assert lease.ensure(counting, ids[1:3], need_s=5.0) == ids[1:3]
    assert counting.executed == 0

    clock.now = 1021.0  # 9 s left, 10 needed: one renewal of just the rows asked for
    before = expiries(db, ids)
    assert lease.ensure(counting, ids[:2], need_s=10.0) == ids[:2]
    assert counting.executed == 1
    after = expiries(db, ids)
    assert after[ids[2]] == before[ids[2]] and after[ids[3]] == before[ids[3]]
    assert lease.held_until(ids[:2]) == 1051.0
    assert lease.held_until(ids) == 1030.0

    clock.now = 1040.0  # the renewed rows are still good for 11 s
    assert lease.ensure(counting, ids[:2], need_s=10.0) == ids[:2]
    assert counting.executed == 1
    # A finished row is never "ours" again, and asking costs a renewal of the rest.
    lease.finished(ids[:1])
    assert lease.ensure(counting, ids[:2], need_s=10.0) == ids[1:2]
    assert counting.executed == 2


def test_the_keeper_renews_in_the_background_and_stops_promptly(dsn: str, db: Conn) -> None:
    ids = all_ids(db)
    lease = Lease(ids, 0.3, claimed_at=time.monotonic())
    claim(db, ids, lease)
    first = expiries(db, ids)
    keeper = LeaseKeeper(lambda: psycopg.connect(dsn), 0.3)
    keeper.start()
    try:
        keeper.add(lease)
        assert keeper.live() == [lease]

        def moved() -> bool:
            now = expiries(db, ids)
            return all(later(now[i], first[i]) for i in ids)

        assert wait_until(moved, timeout=5.0, every=0.02)
        assert lease.lost == set()
        keeper.remove(lease)
        assert keeper.live() == []
    finally:
        t0 = time.monotonic()
        keeper.close()
        took = time.monotonic() - t0
    assert not keeper.is_alive()
    assert took < 1.0


def test_a_rescue_takes_a_claims_rows_of_one_customer_together_or_not_at_all(db: Conn) -> None:
    # Taking c1's identify while its track stays in flight (and is delivered by the claim)
    # would have the identify re-sent after the track: the rescue waits for both.
    ids = all_ids(db)
    clock = FakeClock()
    lease = Lease(ids, 30.0, claimed_at=clock(), clock=clock)
    claim(db, ids, lease)
    assert rescue(db, [ids[0]]) == set()
    assert rescue(db, [ids[0], ids[1]]) == {ids[0], ids[1]}
