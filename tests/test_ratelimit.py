"""Tests for relay.ratelimit: the token bucket core, the limiter shell, Customer.io's budget."""

from __future__ import annotations

import copy
import itertools
import math
import sys
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.ratelimit import (
    CUSTOMERIO_REQUESTS,
    CUSTOMERIO_WINDOW_S,
    AcquireStopped,
    RateLimiter,
    TokenBucket,
    default_min_refill,
    pause_after_429,
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


# --- throttles: the pure core --------------------------------------------------------------


def drain(bucket: TokenBucket, start: float, n: int) -> list[float]:
    """Grant times of ``n`` callers that each go when told and come straight back."""
    now, grants = start, []
    for _ in range(n):
        now += bucket.reserve(now)
        grants.append(now)
    return grants


@pytest.mark.parametrize("offset", [0.0, 0.5, 2.5, 4.999])
def test_no_token_is_granted_during_a_pause(offset: float) -> None:
    bucket = TokenBucket(capacity=10, refill_per_s=100)
    bucket.throttle(20.0, 5)
    now = 20.0 + offset
    ends = [now + bucket.reserve(now) for _ in range(5)]
    assert min(ends) >= 25.0
    assert ends == sorted(ends)


def test_throttle_pushes_back_reservations_already_queued() -> None:
    bucket = TokenBucket(capacity=1, refill_per_s=10, min_refill_per_s=1)
    tickets = [bucket.reserve_ticket(0.0) for _ in range(5)]
    before = [bucket.wait_for(t, 0.0) for t in tickets]
    assert before == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])

    bucket.throttle(0.15, 2)  # ticket 2 was supplied at 0.1; tickets 3..5 were not
    waits = [bucket.wait_for(t, 0.15) for t in tickets]
    # Even the supplied tickets wait for the pause (their callers had not sent yet).
    assert min(waits) >= 2.0 - 1e-9
    assert waits[:2] == pytest.approx([2.0, 2.0])
    # The queued ones come after the pause at the halved rate (5/s, recovering slowly), in order.
    assert waits[2] == pytest.approx(2.0 + 0.5 / 5, rel=0.02)  # half a token was owed
    assert waits[2:] == sorted(waits[2:])
    gaps = [b - a for a, b in itertools.pairwise(waits[2:])]
    assert all(0.19 < g <= 0.2 for g in gaps)


def test_rate_halves_and_recovers_monotonically_to_the_configured_rate() -> None:
    bucket = TokenBucket(capacity=5, refill_per_s=80, recovery_s=10)
    bucket.throttle(100.0, 3)
    assert bucket.effective_rate(100.0) == pytest.approx(40)
    assert bucket.effective_rate(103.0) == pytest.approx(40)  # recovery starts after the pause
    assert bucket.effective_rate(108.0) == pytest.approx(40 * math.sqrt(2))
    samples = [bucket.effective_rate(100.0 + i * 0.1) for i in range(300)]
    assert samples == sorted(samples)
    assert max(samples) == 80
    assert bucket.effective_rate(113.0) == 80
    assert bucket.effective_rate(1e9) == 80


def test_refill_follows_the_effective_rate() -> None:
    bucket = TokenBucket(capacity=3, refill_per_s=50, recovery_s=2, initial_tokens=0)
    bucket.throttle(0.0, 1)
    grants = drain(bucket, 0.0, 400)
    assert grants[0] > 1.0
    # The number granted by time t is the integral of the rate from the end of the pause.
    for t in (1.5, 2.0, 3.0, 5.0, 7.0):
        steps = 20_000
        h = (t - 1.0) / steps
        integral = sum(bucket.effective_rate(1.0 + (i + 0.5) * h) * h for i in range(steps))
        granted = sum(1 for g in grants if g <= t)
        assert abs(granted - integral) <= 1.01
    # Back at full rate the grants are 1/50 s apart.
    tail = [b - a for a, b in itertools.pairwise(grants[-50:])]
    assert tail == pytest.approx([0.02] * 49)


def test_throttle_drops_the_burst() -> None:
    bucket = TokenBucket(capacity=20, refill_per_s=10, min_refill_per_s=1, recovery_s=1e6)
    bucket.throttle(50.0, 2)
    # A full bucket of 20 would have let 20 go at once at 52; instead they are paced at 5/s.
    grants = drain(bucket, 52.0, 5)
    assert grants == pytest.approx([52.2, 52.4, 52.6, 52.8, 53.0], abs=1e-4)


def test_idle_bucket_refills_after_recovery() -> None:
    bucket = TokenBucket(capacity=4, refill_per_s=10, recovery_s=1)
    bucket.throttle(0.0, 1)
    assert [bucket.reserve(100.0) for _ in range(5)] == pytest.approx([0, 0, 0, 0, 0.1])


def test_a_later_throttle_extends_the_pause_an_earlier_one_never_shortens_it() -> None:
    bucket = TokenBucket(capacity=5, refill_per_s=100)
    bucket.throttle(0.0, 10)
    bucket.throttle(1.0, 2)
    assert bucket.resume_at == 10.0
    bucket.throttle(2.0, 20)
    assert bucket.resume_at == 22.0
    bucket.throttle_until(3.0, 5.0)
    assert bucket.resume_at == 22.0
    assert 3.0 + bucket.reserve(3.0) >= 22.0


def test_nested_throttles_halve_once_per_pause_and_again_during_recovery() -> None:
    bucket = TokenBucket(capacity=5, refill_per_s=100, min_refill_per_s=1, recovery_s=10)
    assert bucket.throttle_halves(0.0)
    bucket.throttle(0.0, 5)
    assert bucket.effective_rate(0.0) == pytest.approx(50)
    # A 429 arriving during the pause answers a request sent before it: extend, don't halve.
    assert not bucket.throttle_halves(2.0)
    bucket.throttle(2.0, 10)
    assert bucket.resume_at == 12.0
    assert bucket.effective_rate(12.0) == pytest.approx(50)
    # During recovery a throttle halves the rate reached so far.
    reached = bucket.effective_rate(17.0)
    assert reached == pytest.approx(50 * math.sqrt(2))
    assert bucket.throttle_halves(17.0)
    bucket.throttle(17.0, 1)
    assert bucket.effective_rate(17.0) == pytest.approx(reached / 2)
    assert bucket.resume_at == 18.0
    # And so down to the floor, never below it.
    now = 18.0
    for _ in range(20):
        bucket.throttle(now, 0.5)
        now += 0.5
    assert bucket.effective_rate(now) == 1.0
    assert bucket.min_rate == 1.0


def test_throttle_until_keeps_the_rate_unless_asked_to_halve() -> None:
    bucket = TokenBucket(capacity=5, refill_per_s=100, recovery_s=10)
    bucket.throttle(0.0, 1)  # 50/s, recovering from 1.0
    rate = bucket.effective_rate(6.0)
    bucket.throttle_until(6.0, 9.0)
    assert bucket.resume_at == 9.0
    # The rate reached at 6.0 holds through the pause and recovers from its end.
    assert bucket.effective_rate(9.0) == pytest.approx(rate)
    assert bucket.effective_rate(19.0) == pytest.approx(min(100, 2 * rate))
    # A pause that is over, or ends before the one in force, changes nothing.
    state = copy.deepcopy(bucket)
    bucket.throttle_until(9.5, 8.0)
    bucket.throttle_until(9.5, 9.5)
    assert bucket == state
    bucket.throttle_until(9.5, 12.0, halve=True)
    assert bucket.effective_rate(9.5) == pytest.approx(state.effective_rate(9.5) / 2)


def test_default_floor() -> None:
    assert default_min_refill(980) == pytest.approx(9.8)
    assert default_min_refill(50) == 1.0
    assert default_min_refill(0.5) == 0.5
    assert TokenBucket(10, 980).min_rate == pytest.approx(9.8)
    # A configured rate at the floor is only paused by a throttle, not slowed.
    bucket = TokenBucket(1, 0.5)
    bucket.throttle(0.0, 1)
    assert bucket.effective_rate(0.0) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_refill_per_s": 0},
        {"min_refill_per_s": -1},
        {"min_refill_per_s": 11},
        {"min_refill_per_s": math.nan},
        {"recovery_s": 0},
        {"recovery_s": math.inf},
        {"recovery_s": math.nan},
    ],
)
def test_bucket_rejects_bad_throttle_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TokenBucket(5, 10, **kwargs)


@pytest.mark.parametrize("pause", [-1.0, math.nan, math.inf])
def test_throttle_rejects_bad_pauses(pause: float) -> None:
    bucket = TokenBucket(5, 10)
    with pytest.raises(ValueError):
        bucket.throttle(0.0, pause)


@pytest.mark.parametrize("until", [math.nan, math.inf, -math.inf])
def test_throttle_until_rejects_bad_times(until: float) -> None:
    with pytest.raises(ValueError):
        TokenBucket(5, 10).throttle_until(0.0, until)


def test_wait_for_rejects_unknown_tickets() -> None:
    bucket = TokenBucket(5, 10)
    with pytest.raises(ValueError):
        bucket.wait_for(1, 0.0)
    ticket = bucket.reserve_ticket(0.0)
    with pytest.raises(ValueError):
        bucket.wait_for(ticket + 1, 0.0)
    with pytest.raises(ValueError):
        bucket.wait_for(0, 0.0)


# --- throttles: properties -----------------------------------------------------------------

_reserve = st.tuples(st.just("reserve"), st.floats(0, 2), st.integers(1, 6), st.just(False))
_throttle = st.tuples(st.just("throttle"), st.floats(0, 2), st.floats(0, 5), st.booleans())
_until = st.tuples(st.just("until"), st.floats(0, 2), st.floats(-2, 6), st.booleans())


def upper_supply(snapshot: TokenBucket, start: float, times: list[float]) -> list[float]:
    """An upper bound of the tokens ``snapshot`` supplies from ``start`` to each of ``times``.

    Nothing is supplied before the pause ends; after it the rate never decreases (until the
    next throttle), so a right-endpoint sum of ``effective_rate`` bounds the integral above.
    """
    out, total, t = [], 0.0, max(start, snapshot.resume_at)
    for end in times:
        if end > t:
            h = (end - t) / 8
            total += sum(snapshot.effective_rate(t + (i + 1) * h) * h for i in range(8))
            t = end
        out.append(total)
    return out


@settings(max_examples=300, deadline=None)
@given(
    ops=st.lists(st.one_of(_reserve, _reserve, _throttle, _until), max_size=40),
    capacity=st.integers(1, 5),
    refill=st.floats(1, 30),
    floor_share=st.floats(0.01, 1),
    recovery_s=st.floats(0.2, 5),
)
def test_properties_of_random_reserve_and_throttle_sequences(
    ops: list[tuple[str, float, float, bool]],
    capacity: int,
    refill: float,
    floor_share: float,
    recovery_s: float,
) -> None:
    floor = refill * floor_share
    bucket = TokenBucket(capacity, refill, min_refill_per_s=floor, recovery_s=recovery_s)
    now = 0.0
    pending: list[int] = []
    grants: list[float] = []
    pauses: list[tuple[float, float]] = []
    # (time, bucket right after) for each throttle that took effect: tokens zeroed there.
    segments: list[tuple[float, TokenBucket]] = []

    def grant_until(limit: float) -> None:
        # Callers whose slot comes before ``limit`` go at their slot (nothing moves it before).
        while pending:
            ready = now + bucket.wait_for(pending[0], now)
            if ready > limit:
                break
            grants.append(ready)
            pending.pop(0)

    for kind, dt, arg, halve in ops:
        grant_until(now + dt)
        now += dt
        if kind == "reserve":
            pending.extend(bucket.reserve_ticket(now) for _ in range(int(arg)))
            continue
        until = now + arg
        halving = (kind == "throttle" or halve) and bucket.throttle_halves(now)
        before_rate, before_resume = bucket.effective_rate(now), bucket.resume_at
        if kind == "throttle":
            bucket.throttle(now, arg)
        else:
            bucket.throttle_until(now, until, halve=halve)
        assert bucket.resume_at >= before_resume  # never shortened
        if until > now:
            assert bucket.resume_at >= until
        if halving:
            assert bucket.effective_rate(now) == pytest.approx(max(floor, before_rate / 2))
        else:
            assert bucket.effective_rate(now) == pytest.approx(before_rate)
        if halving or until > max(now, before_resume):
            pauses.append((now, bucket.resume_at))
            segments.append((now, copy.deepcopy(bucket)))
        rate = bucket.effective_rate(now)
        assert floor * (1 - 1e-9) <= rate <= refill

    grant_until(math.inf)
    assert not pending
    assert grants == sorted(grants)

    # No grant inside a pause.
    for start, end in pauses:
        assert not [g for g in grants if start < g < end - 1e-9]

    # Never more than the configured rate allows (a full bucket, then the refill) ...
    assert max_in_any_window(grants, 1.0 - 1e-9) <= capacity + refill * 1.0 + 1e-6
    # ... and after a throttle, never more than the reduced rate has supplied since: the burst
    # is gone, and tickets owed from before come out of the new supply. (The part of a token
    # supplied before the throttle towards the next ticket is kept: hence "< 1 more".)
    bounds = [start for start, _ in segments[1:]] + [math.inf] * bool(segments)
    for (start, snapshot), end in zip(segments, bounds, strict=True):
        mine = [g for g in grants if start < g <= end]
        for count, supplied in enumerate(upper_supply(snapshot, start, mine), start=1):
            assert count < supplied + 1 + 1e-6


# --- pause_after_429 -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("retry_after", "consecutive", "expected"),
    [
        (7.0, 1, 7.0),
        (7.0, 5, 7.0),  # the server's word, not the exponential
        (0.25, 3, 0.25),
        (1000.0, 1, 300.0),  # capped
        (math.inf, 1, 300.0),
        (None, 1, 1.0),
        (None, 2, 2.0),
        (None, 3, 4.0),
        (None, 9, 256.0),
        (None, 10, 300.0),
        (None, 10**6, 300.0),  # a runaway counter is just the cap
        (0.0, 3, 4.0),  # no usable advice: exponential
        (-5.0, 3, 4.0),
        (math.nan, 3, 4.0),
        (-math.inf, 1, 1.0),
    ],
)
def test_pause_after_429(retry_after: float | None, consecutive: int, expected: float) -> None:
    pause = pause_after_429(retry_after, consecutive, base_s=1.0, cap_s=300.0)
    assert pause == expected


def test_pause_after_429_with_a_tiny_base_and_huge_count() -> None:
    assert pause_after_429(None, 5000, base_s=5e-324, cap_s=60.0) == 60.0
    assert pause_after_429(None, 1, base_s=0.5, cap_s=0.2) == 0.2


@pytest.mark.parametrize(
    ("consecutive", "base_s", "cap_s"),
    [
        (0, 1.0, 10.0),
        (-1, 1.0, 10.0),
        (True, 1.0, 10.0),
        (1.5, 1.0, 10.0),
        (1, 0.0, 10.0),
        (1, -1.0, 10.0),
        (1, math.nan, 10.0),
        (1, math.inf, 10.0),
        (1, 1.0, 0.0),
        (1, 1.0, math.nan),
        (1, 1.0, math.inf),
    ],
)
def test_pause_after_429_rejects_bad_arguments(
    consecutive: int, base_s: float, cap_s: float
) -> None:
    with pytest.raises(ValueError):
        pause_after_429(None, consecutive, base_s=base_s, cap_s=cap_s)


# --- RateLimiter: throttles ----------------------------------------------------------------


def test_limiter_note_429_pauses_and_slows_every_caller() -> None:
    fake = FakeTime()
    limiter = RateLimiter(10, 100, clock=fake.clock, sleep=fake.sleep)
    assert limiter.resume_at() is None
    assert limiter.pause_remaining() == 0.0
    assert limiter.note_429(3.0) == 3.0
    assert limiter.resume_at() == 103.0
    assert limiter.pause_remaining() == 3.0
    assert limiter.effective_refill_per_s() == pytest.approx(50)
    limiter.acquire()
    assert fake.now == pytest.approx(103.02)  # no burst: the first token after one interval


def test_limiter_counts_consecutive_429s_once_per_pause() -> None:
    fake = FakeTime()
    limiter = RateLimiter(10, 100, min_refill_per_s=1, clock=fake.clock, sleep=fake.sleep)
    assert limiter.note_429() == 1.0
    # Three more 429s for requests already in flight: the same overload.
    assert [limiter.note_429() for _ in range(3)] == [1.0, 1.0, 1.0]
    assert limiter.consecutive_429s == 1
    assert limiter.effective_refill_per_s() == pytest.approx(50)
    fake.now += 1.0
    assert limiter.note_429() == 2.0
    fake.now += 2.0
    assert limiter.note_429() == 4.0
    assert limiter.consecutive_429s == 3
    assert limiter.effective_refill_per_s() == pytest.approx(12.5)
    limiter.note_success()
    assert limiter.consecutive_429s == 0
    # A success during a pause resets the count; the next 429 counts from 1 but does not
    # halve again within this pause.
    assert limiter.note_429() == 1.0
    assert limiter.effective_refill_per_s() == pytest.approx(12.5)
    assert limiter.resume_at() == pytest.approx(fake.now + 4.0)


def test_limiter_throttle_until_extends_without_halving_and_is_capped() -> None:
    fake = FakeTime()
    limiter = RateLimiter(10, 100, pause_cap_s=60, clock=fake.clock, sleep=fake.sleep)
    limiter.throttle_until(105.0)
    assert limiter.resume_at() == 105.0
    assert limiter.effective_refill_per_s() == 100
    limiter.throttle_until(102.0)
    assert limiter.resume_at() == 105.0
    limiter.throttle_until(1e12)
    assert limiter.resume_at() == 160.0
    limiter.throttle_until(math.inf)
    assert limiter.resume_at() == 160.0
    limiter.throttle_until(150.0, halve=True)
    assert limiter.effective_refill_per_s() == pytest.approx(50)
    limiter.throttle(math.inf)
    assert limiter.resume_at() == 160.0
    with pytest.raises(ValueError):
        limiter.throttle_until(math.nan)
    for bad in (-1.0, math.nan):
        with pytest.raises(ValueError):
            limiter.throttle(bad)
    assert limiter.acquire() >= 60.0


def test_a_caller_sleeping_when_a_throttle_arrives_waits_for_it() -> None:
    fake = FakeTime()
    limiter: RateLimiter

    def sleep_then_throttle(seconds: float) -> None:
        if not fake.sleeps:
            limiter.throttle(5.0)  # arrives while the caller sleeps towards its slot
        fake.sleep(seconds)

    limiter = RateLimiter(1, 10, clock=fake.clock, sleep=sleep_then_throttle)
    limiter.acquire()
    waited = limiter.acquire()
    assert fake.now >= 105.0
    assert waited == pytest.approx(fake.now - 100.0)
    assert len(fake.sleeps) == 2


def test_a_caller_that_overslept_its_slot_still_waits_out_a_pause() -> None:
    fake = FakeTime()
    limiter: RateLimiter

    def oversleep(seconds: float) -> None:
        fake.sleep(seconds + 1.0)
        if len(fake.sleeps) == 1:
            limiter.throttle(5.0)  # after the slot, before the caller checked

    limiter = RateLimiter(1, 10, clock=fake.clock, sleep=oversleep)
    limiter.acquire()
    limiter.acquire()
    assert fake.now >= 101.1 + 5.0


def test_for_customerio_passes_the_throttle_settings() -> None:
    limiter = RateLimiter.for_customerio(
        min_refill_per_s=5, recovery_s=2, pause_base_s=0.5, pause_cap_s=10
    )
    assert limiter.note_429(None) == 0.5
    assert limiter.note_429(100) == 10
    assert limiter.effective_refill_per_s() == pytest.approx(490)


@pytest.mark.parametrize(("base_s", "cap_s"), [(0.0, 10.0), (1.0, math.inf), (math.nan, 10.0)])
def test_limiter_rejects_bad_pause_settings(base_s: float, cap_s: float) -> None:
    with pytest.raises(ValueError):
        RateLimiter(5, 10, pause_base_s=base_s, pause_cap_s=cap_s)


# --- RateLimiter: threads and stop ---------------------------------------------------------


@pytest.mark.usefixtures("fast_thread_switching")
def test_no_acquire_returns_during_a_pause_set_by_another_thread() -> None:
    limiter = RateLimiter(2, 400, min_refill_per_s=100)
    pause_s = 0.3
    returns: list[float] = []
    lock = threading.Lock()
    go = threading.Barrier(5)
    done = threading.Event()

    def worker() -> None:
        go.wait()
        while not done.is_set():
            limiter.acquire()
            t = time.monotonic()
            with lock:
                returns.append(t)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    go.wait()
    time.sleep(0.05)
    limiter.throttle(pause_s)
    thrown = time.monotonic()
    resume = limiter.resume_at()
    assert resume is not None
    time.sleep(pause_s + 0.1)
    done.set()
    for t in threads:
        t.join()

    assert any(t < thrown for t in returns) and any(t >= resume for t in returns)
    # A caller that passed its last check just before the throttle may record its time a
    # little after it; none may return well inside the pause.
    inside = [t for t in returns if thrown + pause_s / 3 < t < resume]
    assert inside == []
    after = sorted(t for t in returns if t >= resume)
    # The rate is halved after the pause and the burst is gone: about 200/s, far below 400/s.
    assert len([t for t in after if t < resume + 0.05]) <= 2 + 0.05 * 400 / 2 + 2


def test_stop_interrupts_a_long_wait_promptly() -> None:
    limiter = RateLimiter(1, 0.01)  # the second slot is 100 s away
    stop = threading.Event()
    assert limiter.acquire(stop) == 0.0
    outcome: list[BaseException | float] = []

    def wait() -> None:
        try:
            outcome.append(limiter.acquire(stop))
        except AcquireStopped as exc:
            outcome.append(exc)

    thread = threading.Thread(target=wait)
    started = time.monotonic()
    thread.start()
    time.sleep(0.02)
    stop.set()
    thread.join(timeout=2)
    assert not thread.is_alive()
    assert time.monotonic() - started < 1.0
    assert len(outcome) == 1 and isinstance(outcome[0], AcquireStopped)


def test_stop_interrupts_a_pause() -> None:
    limiter = RateLimiter(10, 100)
    limiter.throttle(60.0)
    stop = threading.Event()
    timer = threading.Timer(0.02, stop.set)
    timer.start()
    started = time.monotonic()
    with pytest.raises(AcquireStopped):
        limiter.acquire(stop)
    assert time.monotonic() - started < 1.0
    timer.join()


def test_stop_already_set_reserves_nothing() -> None:
    fake = FakeTime()
    limiter = RateLimiter(1, 1, clock=fake.clock, sleep=fake.sleep)
    stop = threading.Event()
    stop.set()
    with pytest.raises(AcquireStopped):
        limiter.acquire(stop)
    assert limiter.acquire() == 0.0  # the token is still there


def test_acquire_with_stop_waits_for_a_short_slot() -> None:
    limiter = RateLimiter(1, 100)
    stop = threading.Event()
    assert limiter.acquire(stop) == 0.0
    started = time.monotonic()
    waited = limiter.acquire(stop)
    assert 0 < waited <= 0.011
    assert time.monotonic() - started >= waited * 0.9
