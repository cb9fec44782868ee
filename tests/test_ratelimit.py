"""Tests for relay.ratelimit: the token bucket core, the limiter shell, Customer.io's budget."""

from __future__ import annotations

import itertools
import math
import sys
import threading
from collections.abc import Iterator

import pytest

from relay.ratelimit import (
    CUSTOMERIO_REQUESTS,
    CUSTOMERIO_WINDOW_S,
    RateLimiter,
    TokenBucket,
)


def test_capacity_is_granted_at_once_then_spaced_at_refill_interval() -> None:
    bucket = TokenBucket(capacity=5, refill_per_s=10)
    assert [bucket.reserve(0.0) for _ in range(5)] == [0.0] * 5

    # A caller that goes when told to, and comes straight back, is paced at 1/refill.
    now, grants = 0.0, []
    for _ in range(20):
        now += bucket.reserve(now)
        grants.append(now)
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert grants[0] == pytest.approx(0.1)
    assert gaps == pytest.approx([0.1] * 19)


def test_waits_accumulate_for_queued_callers() -> None:
    bucket = TokenBucket(capacity=3, refill_per_s=4)
    waits = [bucket.reserve(10.0) for _ in range(7)]
    assert waits == pytest.approx([0, 0, 0, 0.25, 0.5, 0.75, 1.0])


def test_later_caller_waits_behind_earlier_reservations() -> None:
    bucket = TokenBucket(capacity=1, refill_per_s=1)
    assert bucket.reserve(0.0) == 0.0
    assert bucket.reserve(0.0) == pytest.approx(1.0)
    assert bucket.reserve(0.0) == pytest.approx(2.0)
    # Half a second later the queue is 1.5 s long for a newcomer.
    assert bucket.reserve(0.5) == pytest.approx(2.5)


def test_refill_is_capped_at_capacity() -> None:
    bucket = TokenBucket(capacity=4, refill_per_s=2)
    for _ in range(4):
        bucket.reserve(0.0)
    waits = [bucket.reserve(1000.0) for _ in range(6)]
    assert waits == pytest.approx([0, 0, 0, 0, 0.5, 1.0])


def test_partial_refill() -> None:
    bucket = TokenBucket(capacity=10, refill_per_s=10, initial_tokens=0)
    assert bucket.reserve(0.0) == pytest.approx(0.1)
    # By 0.35 s, 3.5 tokens have arrived and one was owed: 2 whole ones are free.
    waits = [bucket.reserve(0.35) for _ in range(3)]
    assert waits == pytest.approx([0, 0, 0.05])


def test_initial_tokens_limits_the_cold_start_burst() -> None:
    bucket = TokenBucket(capacity=100, refill_per_s=10, initial_tokens=2)
    assert [bucket.reserve(0.0) for _ in range(3)] == pytest.approx([0, 0, 0.1])


def test_earlier_timestamp_gets_no_tokens_and_waits_from_its_own_now() -> None:
    bucket = TokenBucket(capacity=1, refill_per_s=1)
    assert bucket.reserve(5.0) == 0.0
    # Read the clock at 4.5 but reserved after the caller at 5.0: its token is ready at 6.0.
    assert bucket.reserve(4.5) == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("capacity", "refill", "initial"),
    [
        (0, 1, None),
        (0.5, 1, None),
        (math.inf, 1, None),
        (1, 0, None),
        (1, -1, None),
        (1, math.nan, None),
        (5, 1, 6),
        (5, 1, -1),
    ],
)
def test_bucket_rejects_bad_parameters(
    capacity: float, refill: float, initial: float | None
) -> None:
    with pytest.raises(ValueError):
        TokenBucket(capacity, refill, initial)


# --- RateLimiter --------------------------------------------------------------------------


class FakeTime:
    """A monotonic clock and sleep for one thread: sleeping moves the clock forward."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_rate_limiter_sleeps_the_reserved_wait() -> None:
    fake = FakeTime()
    limiter = RateLimiter(2, 5, clock=fake.clock, sleep=fake.sleep)
    waited = [limiter.acquire() for _ in range(5)]
    assert waited == pytest.approx([0, 0, 0.2, 0.2, 0.2])
    assert fake.sleeps == pytest.approx([0.2, 0.2, 0.2])
    assert fake.now == pytest.approx(100.6)


def test_rate_limiter_does_not_sleep_when_tokens_are_available() -> None:
    fake = FakeTime()
    limiter = RateLimiter(3, 1, clock=fake.clock, sleep=fake.sleep)
    assert [limiter.acquire() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert fake.sleeps == []


def test_for_customerio_parameters() -> None:
    limiter = RateLimiter.for_customerio()
    assert limiter.capacity + limiter.refill_per_s * CUSTOMERIO_WINDOW_S == pytest.approx(
        CUSTOMERIO_REQUESTS
    )
    assert limiter.refill_per_s >= 950
    assert limiter.capacity < 1000


@pytest.mark.parametrize(
    ("burst", "window_s"), [(0, 3.0), (3000, 3.0), (4000, 3.0), (60, 0.0), (60, math.inf)]
)
def test_for_customerio_rejects_bad_parameters(burst: int, window_s: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter.for_customerio(burst=burst, window_s=window_s)


def max_in_any_window(grants: list[float], window: float) -> int:
    """The most grants in any half-open interval [t, t + window)."""
    best, start = 0, 0
    for end, t in enumerate(grants):
        while grants[start] <= t - window:
            start += 1
        best = max(best, end - start + 1)
    return best


def test_for_customerio_drains_a_backlog_within_3000_per_3_seconds() -> None:
    fake = FakeTime()
    limiter = RateLimiter.for_customerio(clock=fake.clock, sleep=fake.sleep)
    grants: list[float] = []

    def drain(n: int) -> None:
        for _ in range(n):
            limiter.acquire()
            grants.append(fake.now)

    drain(15_000)
    fake.now += 60.0  # idle: the bucket refills completely
    drain(15_000)

    # A hair of slack for float rounding at the window boundary.
    assert max_in_any_window(grants, CUSTOMERIO_WINDOW_S - 1e-9) <= CUSTOMERIO_REQUESTS
    first_run = grants[:15_000]
    rate = (len(first_run) - 1) / (first_run[-1] - first_run[0])
    assert rate >= 950


# --- concurrency --------------------------------------------------------------------------


class SharedFakeTime:
    """A clock shared by threads: every reading advances it a little; sleeps don't block.

    Each thread's grant time is the clock reading taken inside ``acquire`` plus the wait it
    was given, so the reading is remembered per thread.
    """

    def __init__(self, step: float) -> None:
        self._now = 0.0
        self._step = step
        self._lock = threading.Lock()
        self._local = threading.local()

    def clock(self) -> float:
        with self._lock:
            self._now += self._step
            now = self._now
        self._local.last = now
        return now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0

    def last_reading(self) -> float:
        value: float = self._local.last
        return value

    @property
    def now(self) -> float:
        return self._now


@pytest.fixture
def fast_thread_switching() -> Iterator[None]:
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.mark.usefixtures("fast_thread_switching")
def test_concurrent_callers_never_exceed_capacity_plus_refill() -> None:
    capacity, refill = 50.0, 1000.0
    clock = SharedFakeTime(step=1e-5)
    limiter = RateLimiter(capacity, refill, clock=clock.clock, sleep=clock.sleep)
    grants: list[float] = []
    grants_lock = threading.Lock()
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        mine = []
        for _ in range(2000):
            waited = limiter.acquire()
            mine.append(clock.last_reading() + waited)
        with grants_lock:
            grants.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(grants) == 16_000
    grants.sort()
    t0 = grants[0]
    for count, granted_at in enumerate(grants, start=1):
        assert count <= capacity + refill * (granted_at - t0) + 1e-6

    # Every reservation consumed exactly one token: past the burst, grants are one refill
    # interval apart, never two in the same slot.
    tail = grants[int(capacity) :]
    gaps = [b - a for a, b in itertools.pairwise(tail)]
    assert min(gaps) >= 1 / refill - 1e-9
