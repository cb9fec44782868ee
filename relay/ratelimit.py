"""Pacing requests to Customer.io: a token bucket per destination, slowed down by 429s.

Customer.io allows 3000 requests per 3 seconds per workspace, "not strictly enforced": beyond
it data may be throttled or dropped. A token bucket of capacity ``C`` refilled at ``r`` per
second grants at most ``C + r * T`` requests in any interval of length ``T`` (a full bucket
spent at once, then the refill). Honouring "3000 per 3 s" in every window therefore needs
``C + 3 r <= 3000``: a bucket of 3000 refilled at 1000/s would allow 6000 in the 3 s after any
idle spell. ``RateLimiter.for_customerio`` keeps a small burst and gives the rest of the budget
to the steady rate, so a backlog drains at nearly 1000 requests/s without crossing the limit.

Back-pressure. A ``429`` says the *workspace* is over its limit, whichever batch drew it, so it
throttles the whole destination: every sending thread (they share one ``RateLimiter``) and,
through ``resume_at``/``throttle_until``, other relays sending to the same workspace. Delaying
only the batch that got the 429 would leave every other customer's batches going at full
rate into the limit. A throttle:

* pauses: no token is granted before the pause ends (a later throttle extends it, none
  shortens it), and reservations already queued are pushed back behind it;
* drops the stored burst to zero, so the resumption does not burst into the limit again;
* halves the refill rate (floor ``min_refill_per_s``), at most once per pause: 429s arriving
  while a pause is in force answer requests sent before it, the same overload counted once;
* then lets the rate recover gradually, doubling every ``recovery_s`` from the end of the
  pause until it is back at the configured rate; a throttle during recovery halves the rate
  reached so far.

Halving with gradual recovery (AIMD-like, as in TCP) finds a rate the server accepts without
guessing it: a fixed pause followed by full speed would hit the limit again at once, and a
permanent cut would waste the budget once the overload (often other senders) has gone.

``TokenBucket`` is the pure core (time is passed in); ``RateLimiter`` adds the clock, the
sleeping, the lock and the count of consecutive 429s. ``pause_after_429`` chooses a pause.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import InitVar, dataclass, field
from typing import Final

__all__ = [
    "CUSTOMERIO_BURST",
    "CUSTOMERIO_REQUESTS",
    "CUSTOMERIO_WINDOW_S",
    "DEFAULT_PAUSE_BASE_S",
    "DEFAULT_PAUSE_CAP_S",
    "DEFAULT_RECOVERY_S",
    "AcquireStopped",
    "RateLimiter",
    "TokenBucket",
    "default_min_refill",
    "pause_after_429",
]

CUSTOMERIO_REQUESTS: Final = 3000
CUSTOMERIO_WINDOW_S: Final = 3.0
# Large enough that a handful of sender threads starting together do not wait on each other,
# small enough to cost only 2% of the steady rate (refill = (3000 - 60) / 3 = 980/s).
CUSTOMERIO_BURST: Final = 60

# The rate doubles every this many seconds after a pause until it is back to the configured one.
DEFAULT_RECOVERY_S: Final = 10.0
# Pause after a 429 without Retry-After: 1, 2, 4, ... seconds, never more than 300 s (the cap
# Customer.io's Node client puts on Retry-After; RetryPolicy.retry_after_cap_s uses it too).
DEFAULT_PAUSE_BASE_S: Final = 1.0
DEFAULT_PAUSE_CAP_S: Final = 300.0

# Beyond this many doublings any positive float exceeds the largest float (see relay.retry).
_MAX_DOUBLINGS: Final = 2200


def default_min_refill(refill_per_s: float) -> float:
    """The rate floor when none is given: 1% of ``refill_per_s`` but at least 1 request/s.

    1% bounds the recovery from the floor to ``log2(100) = 6.6`` doublings (66 s with the
    default ``recovery_s``); the 1/s minimum keeps a small destination from crawling along at
    one request a minute. A configured rate below 1/s is its own floor: throttles then only
    pause it.
    """
    return min(refill_per_s, max(1.0, refill_per_s / 100))


def _finite_positive(name: str, value: float) -> None:
    # ``not value > 0`` also rejects NaN, which compares false with everything.
    if isinstance(value, bool) or not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def pause_after_429(
    retry_after_s: float | None, consecutive: int, *, base_s: float, cap_s: float
) -> float:
    """Seconds to pause a destination after a 429.

    ``retry_after_s`` is the parsed ``Retry-After`` (``relay.retry.parse_retry_after``), or None.
    When it is a positive number it is honoured, capped at ``cap_s`` (``+inf`` gives ``cap_s``).
    Otherwise (None, zero, negative, NaN: no usable advice) the pause is exponential in
    ``consecutive``, the number of 429s since the last success (>= 1):
    ``min(cap_s, base_s * 2 ** (consecutive - 1))``. There is no jitter: the pause is shared
    by every sender of the destination, so there is no herd of independent retries to spread.

    Raises ValueError when ``base_s`` or ``cap_s`` is not a finite number > 0, or
    ``consecutive`` is not an integer >= 1 (those are the caller's own values, not the server's).
    """
    _finite_positive("base_s", base_s)
    _finite_positive("cap_s", cap_s)
    if isinstance(consecutive, bool) or not isinstance(consecutive, int) or consecutive < 1:
        raise ValueError(f"consecutive must be an integer >= 1, got {consecutive!r}")
    if retry_after_s is not None and retry_after_s > 0:  # NaN compares false: ignored
        return min(cap_s, float(retry_after_s))
    try:
        return min(cap_s, math.ldexp(base_s, min(consecutive - 1, _MAX_DOUBLINGS)))
    except OverflowError:
        return cap_s


@dataclass
class TokenBucket:
    """Token bucket with reservations and throttles; every method takes the current time.

    ``reserve`` always takes a token, going into debt when none is left, and says how long the
    caller must wait for it. Callers arriving at the same instant therefore queue up in order,
    each waiting one refill interval longer than the one before.

    The bucket starts with ``initial_tokens`` (default: full) at the time of the first
    ``reserve``, and never holds more than ``capacity``.

    Throttles (see the module docstring) change the refill from then on. A reservation is a
    ticket: the ``n``-th token ever reserved is usable once ``n`` tokens have been supplied and
    no pause is in force. A throttle supplies fewer tokens, later, so every ticket not yet
    supplied when it arrives moves back. The wait ``reserve`` returned is therefore only good
    until the next throttle: a caller that can be overtaken by one reserves with
    ``reserve_ticket`` and asks ``wait_for`` again after sleeping (``RateLimiter`` does).

    During a pause nothing is refilled; after it the refill rate is
    ``min(refill_per_s, base * 2 ** ((t - resume_at) / recovery_s))``, ``base`` being the
    rate the last throttle left (never below ``min_refill_per_s``, default
    ``default_min_refill(refill_per_s)``).
    """

    capacity: float
    refill_per_s: float
    initial_tokens: InitVar[float | None] = None
    min_refill_per_s: float | None = field(default=None, kw_only=True)
    recovery_s: float = field(default=DEFAULT_RECOVERY_S, kw_only=True)
    _tokens: float = field(init=False, repr=False)
    _last: float | None = field(init=False, default=None, repr=False)
    _issued: int = field(init=False, default=0, repr=False)
    _floor: float = field(init=False, repr=False)
    # The refill restarts at _resume_at at rate _base and doubles every recovery_s from there.
    # Before the first throttle there is no pause and the rate is the configured one.
    _resume_at: float = field(init=False, default=-math.inf, repr=False)
    _base: float = field(init=False, repr=False)
    _halved_this_pause: bool = field(init=False, default=False, repr=False)

    def __post_init__(self, initial_tokens: float | None) -> None:
        if not (math.isfinite(self.capacity) and self.capacity >= 1):
            raise ValueError(f"capacity must be a finite number >= 1, got {self.capacity!r}")
        if not (math.isfinite(self.refill_per_s) and self.refill_per_s > 0):
            raise ValueError(
                f"refill_per_s must be a finite positive number, got {self.refill_per_s!r}"
            )
        tokens = self.capacity if initial_tokens is None else initial_tokens
        if not (math.isfinite(tokens) and 0 <= tokens <= self.capacity):
            raise ValueError(f"initial_tokens must be within [0, capacity], got {tokens!r}")
        _finite_positive("recovery_s", self.recovery_s)
        floor = (
            default_min_refill(self.refill_per_s)
            if self.min_refill_per_s is None
            else self.min_refill_per_s
        )
        if not (math.isfinite(floor) and 0 < floor <= self.refill_per_s):
            raise ValueError(
                f"min_refill_per_s must be within (0, refill_per_s], got {self.min_refill_per_s!r}"
            )
        self._floor = floor
        self._tokens = tokens
        self._base = self.refill_per_s

    # --- the refill as a function of time ---------------------------------------------------

    @property
    def min_rate(self) -> float:
        """The floor the refill rate never goes below."""
        return self._floor

    @property
    def resume_at(self) -> float:
        """The end of the latest pause (``-inf`` before the first throttle)."""
        return self._resume_at

    def effective_rate(self, now: float) -> float:
        """The refill rate at ``now``; during a pause, the rate the refill will resume at."""
        rate, base = self.refill_per_s, self._base
        if base >= rate:
            return rate
        x = (now - self._resume_at) / self.recovery_s
        if x <= 0:
            return base
        if x >= math.log2(rate / base):
            return rate
        return base * math.exp2(x)

    def _full_rate_at(self) -> float:
        """When the recovery reaches the configured rate (``-inf`` if it has)."""
        if self._base >= self.refill_per_s:
            return -math.inf
        return self._resume_at + self.recovery_s * math.log2(self.refill_per_s / self._base)

    def _refill(self, t0: float, t1: float) -> float:
        """Tokens supplied between ``t0`` and ``t1`` by the current refill function."""
        start = max(t0, self._resume_at)
        if t1 <= start:
            return 0.0
        full_at = self._full_rate_at()
        total = 0.0
        if start < full_at:
            # The integral of an exponential rate is recovery_s / ln 2 times its increase.
            end = min(t1, full_at)
            end_rate = self.refill_per_s if end >= full_at else self.effective_rate(end)
            total += (end_rate - self.effective_rate(start)) * self.recovery_s / math.log(2)
            start = end
        if t1 > start:
            total += (t1 - start) * self.refill_per_s
        return total

    def _supplied_by(self, t0: float, need: float) -> float:
        """The earliest time from ``t0`` by which ``need`` (> 0) more tokens are supplied."""
        start = max(t0, self._resume_at)
        full_at = self._full_rate_at()
        if start < full_at:
            r0 = self.effective_rate(start)
            exp_part = (self.refill_per_s - r0) * self.recovery_s / math.log(2)
            if need <= exp_part:
                r1 = r0 + need * math.log(2) / self.recovery_s
                return min(full_at, start + self.recovery_s * math.log2(r1 / r0))
            need -= exp_part
            start = full_at
        return start + need / self.refill_per_s

    def _advance(self, now: float) -> None:
        if self._last is None:
            self._last = now
        elif now > self._last:
            refill = self._refill(self._last, now)
            self._tokens = min(self.capacity, self._tokens + refill)
            self._last = now
        # A ``now`` earlier than the last update (a caller that read the clock before another
        # one took its turn) adds no tokens; its wait is still measured from its own ``now``.

    # --- reservations ------------------------------------------------------------------------

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0.0 if available now).

        The answer holds until the next throttle; see ``reserve_ticket``.
        """
        return self.wait_for(self.reserve_ticket(now), now)

    def reserve_ticket(self, now: float) -> int:
        """Take one token; return its ticket (1, 2, ...) for ``wait_for``."""
        self._advance(now)
        self._tokens -= 1
        self._issued += 1
        return self._issued

    def wait_for(self, ticket: int, now: float) -> float:
        """Seconds from ``now`` until ``ticket`` may be used, under the throttles known so far.

        A ticket already supplied waits only for a pause in force: a caller that overslept its
        slot and woke during a pause that began after it still waits for the pause to end.
        """
        if not 1 <= ticket <= self._issued:
            raise ValueError(f"ticket {ticket!r} was never issued (issued: {self._issued})")
        assert self._last is not None
        # Tickets up to issued + tokens have been supplied by _last.
        need = (ticket - self._issued) - self._tokens
        ready_at = self._resume_at if need <= 0 else self._supplied_by(self._last, need)
        return max(0.0, ready_at - now)

    # --- throttles ---------------------------------------------------------------------------

    def throttle_halves(self, now: float) -> bool:
        """Whether ``throttle(now, ...)`` would halve the rate: not if this pause already did."""
        return not (now < self._resume_at and self._halved_this_pause)

    def throttle(self, now: float, pause_s: float, *, halve: bool = True) -> None:
        """Back off after a 429: pause ``pause_s`` from ``now``, drop the burst, halve the rate.

        The pause ends at the later of its own end and the one already in force. The rate is
        halved (not below the floor) unless ``halve`` is False or this pause already halved it.
        Raises ValueError unless ``pause_s`` is a finite number >= 0.
        """
        if not (math.isfinite(pause_s) and pause_s >= 0):
            raise ValueError(f"pause_s must be a finite number >= 0, got {pause_s!r}")
        self._apply(now, now + pause_s, halve=halve)

    def throttle_until(self, now: float, until: float, *, halve: bool = False) -> None:
        """Apply a pause ending at ``until`` (learned from another relay sharing the workspace).

        Without ``halve`` the rate is kept as it is at ``now`` and resumes from there after the
        pause, and a pause that ends no later than the one in force (or at all, by ``now``)
        changes nothing. With ``halve`` it is ``throttle`` with that end.
        Raises ValueError unless ``until`` is finite.
        """
        if not math.isfinite(until):
            raise ValueError(f"until must be a finite time, got {until!r}")
        self._apply(now, until, halve=halve)

    def _apply(self, now: float, until: float, *, halve: bool) -> None:
        halves = halve and self.throttle_halves(now)
        if not halves and until <= max(now, self._resume_at):
            return
        self._advance(now)  # the tokens so far were supplied under the old refill function
        until = max(until, now)
        current = self.effective_rate(now)
        extends = until > self._resume_at
        if extends:
            if not now < self._resume_at:
                self._halved_this_pause = False  # a new pause, not an extension of one
            self._resume_at = until
        if halves:
            self._base = max(self._floor, current / 2)
            self._halved_this_pause = True
        else:
            # The rate at ``now`` holds through the pause and recovers from its end.
            self._base = current
        # Keep the debt (queued tickets are pushed back), drop the burst.
        self._tokens = min(self._tokens, 0.0)


class AcquireStopped(Exception):
    """``RateLimiter.acquire(stop=...)`` was interrupted: ``stop`` was set before the slot.

    The caller must not send. The token it had reserved is not given back (it cannot be, the
    reservations behind it are already counted); at shutdown that costs nothing.
    """


class RateLimiter:
    """Thread-safe pacing for one destination: ``acquire`` before each request.

    The lock covers only the reservation; the wait happens outside it, so queued callers sleep
    concurrently, each until its own slot. ``clock`` and ``sleep`` default to the real monotonic
    clock and ``time.sleep``; tests pass fakes.

    After a 429 the caller calls ``note_429`` (which pauses and slows every caller of this
    limiter, see the module docstring) and after a success ``note_success``; the count of
    consecutive 429s, which sizes the pause when there is no Retry-After, lives here. Every
    pause is capped at ``pause_cap_s``, also one learned from elsewhere (``throttle_until``).

    A caller sleeping towards its slot when a throttle arrives is not woken: throttles only
    ever move slots later, so it checks again when it wakes and sleeps on if its slot (or the
    pause) is now later. So no ``acquire`` returns inside a pause set before its last look
    under the lock; a throttle landing between that look and the request going out is the
    same race as a 429 for a request already in flight.
    """

    def __init__(
        self,
        capacity: float,
        refill_per_s: float,
        *,
        initial_tokens: float | None = None,
        min_refill_per_s: float | None = None,
        recovery_s: float = DEFAULT_RECOVERY_S,
        pause_base_s: float = DEFAULT_PAUSE_BASE_S,
        pause_cap_s: float = DEFAULT_PAUSE_CAP_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._bucket = TokenBucket(
            capacity,
            refill_per_s,
            initial_tokens,
            min_refill_per_s=min_refill_per_s,
            recovery_s=recovery_s,
        )
        _finite_positive("pause_base_s", pause_base_s)
        _finite_positive("pause_cap_s", pause_cap_s)
        self._pause_base_s = pause_base_s
        self._pause_cap_s = pause_cap_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Bumped by every throttle, so a caller that slept knows whether to look again.
        self._throttles = 0
        self._consecutive = 0

    @classmethod
    def for_customerio(
        cls,
        *,
        requests: int = CUSTOMERIO_REQUESTS,
        window_s: float = CUSTOMERIO_WINDOW_S,
        burst: int = CUSTOMERIO_BURST,
        initial_tokens: float | None = None,
        min_refill_per_s: float | None = None,
        recovery_s: float = DEFAULT_RECOVERY_S,
        pause_base_s: float = DEFAULT_PAUSE_BASE_S,
        pause_cap_s: float = DEFAULT_PAUSE_CAP_S,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> RateLimiter:
        """A limiter that never grants more than ``requests`` in any ``window_s`` interval.

        The burst is spent first and the remainder of the budget is spread evenly over the
        window. Several relay processes sharing one workspace should each pass their share of
        ``requests``. A restart grants at most one extra burst in the window spanning it; pass
        ``initial_tokens=0`` to rule that out.
        """
        if not 1 <= burst < requests:
            raise ValueError(f"burst must be within [1, requests), got {burst!r}")
        if not (math.isfinite(window_s) and window_s > 0):
            raise ValueError(f"window_s must be a finite positive number, got {window_s!r}")
        return cls(
            burst,
            (requests - burst) / window_s,
            initial_tokens=initial_tokens,
            min_refill_per_s=min_refill_per_s,
            recovery_s=recovery_s,
            pause_base_s=pause_base_s,
            pause_cap_s=pause_cap_s,
            clock=clock,
            sleep=sleep,
        )

    @property
    def capacity(self) -> float:
        return self._bucket.capacity

    @property
    def refill_per_s(self) -> float:
        """The configured rate (the one recovery returns to)."""
        return self._bucket.refill_per_s

    @property
    def consecutive_429s(self) -> int:
        with self._lock:
            return self._consecutive

    def effective_refill_per_s(self) -> float:
        """The refill rate now (during a pause: the rate sending will resume at)."""
        with self._lock:
            return self._bucket.effective_rate(self._clock())

    def resume_at(self) -> float | None:
        """The monotonic time (of ``clock``) before which nothing may be sent.

        None before the first throttle; a past time once the last pause is over. Comparable
        only with this process's clock (``time.monotonic`` is per host and per boot); to share
        a pause with other hosts, share ``pause_remaining()`` or a wall-clock time instead.
        """
        with self._lock:
            resume_at = self._bucket.resume_at
        return None if resume_at == -math.inf else resume_at

    def pause_remaining(self) -> float:
        """Seconds until the pause in force ends (0.0 when there is none)."""
        with self._lock:
            return max(0.0, self._bucket.resume_at - self._clock())

    def acquire(self, stop: threading.Event | None = None) -> float:
        """Wait for this caller's slot; return the seconds waited.

        With ``stop``, the waiting is ``stop.wait(...)`` (not ``sleep``), so setting ``stop``
        interrupts it: ``AcquireStopped`` is raised when ``stop`` is set before the slot
        (also when it is set on entry: nothing is reserved then), and the caller must not send.
        """
        if stop is not None and stop.is_set():
            raise AcquireStopped("stopped before acquiring a slot")
        with self._lock:
            # Reading the clock under the lock keeps reservations in time order.
            now = self._clock()
            ticket = self._bucket.reserve_ticket(now)
            wait = self._bucket.wait_for(ticket, now)
            seen = self._throttles
        waited = 0.0
        while wait > 0:
            if stop is None:
                self._sleep(wait)
            elif stop.wait(wait):
                raise AcquireStopped("stopped while waiting for a slot")
            waited += wait
            with self._lock:
                if self._throttles == seen:
                    break  # nothing moved this slot: it has come
                seen = self._throttles
                now = self._clock()
                wait = self._bucket.wait_for(ticket, now)
        return waited

    def throttle(self, pause_s: float, *, halve: bool = True) -> None:
        """Pause the destination for ``pause_s`` (capped at ``pause_cap_s``) and slow it down.

        See ``TokenBucket.throttle``. ``pause_s`` may be ``inf`` (the cap); NaN or a negative
        pause raises ValueError.
        """
        if not pause_s >= 0:
            raise ValueError(f"pause_s must be a number >= 0, got {pause_s!r}")
        with self._lock:
            self._bucket.throttle(self._clock(), min(pause_s, self._pause_cap_s), halve=halve)
            self._throttles += 1

    def throttle_until(self, monotonic_t: float, *, halve: bool = False) -> None:
        """Apply a pause ending at ``monotonic_t`` (this process's clock), learned elsewhere.

        Extends the pause in force (never shortens it) without halving the rate again unless
        ``halve``; ends at most ``pause_cap_s`` from now. NaN raises ValueError.
        """
        if math.isnan(monotonic_t):
            raise ValueError("monotonic_t must be a time, got nan")
        with self._lock:
            now = self._clock()
            until = min(monotonic_t, now + self._pause_cap_s)
            self._bucket.throttle_until(now, until, halve=halve)
            self._throttles += 1

    def note_429(self, retry_after_s: float | None = None) -> float:
        """Record a 429 and throttle the destination; return the pause applied (seconds).

        ``retry_after_s`` is the parsed ``Retry-After`` or None; the pause is
        ``pause_after_429`` of it and the count of consecutive 429s. A 429 arriving while a pause
        this limiter has already halved for is in force answers a request sent before that pause:
        it may extend the pause but counts (and halves) no more.
        """
        with self._lock:
            now = self._clock()
            if self._consecutive == 0 or self._bucket.throttle_halves(now):
                self._consecutive += 1
            pause = pause_after_429(
                retry_after_s,
                self._consecutive,
                base_s=self._pause_base_s,
                cap_s=self._pause_cap_s,
            )
            self._bucket.throttle(now, pause)
            self._throttles += 1
        return pause

    def note_success(self) -> None:
        """Record a successful request: the next 429 starts the exponential pause afresh."""
        with self._lock:
            self._consecutive = 0
