"""Pacing requests to Customer.io: a token bucket per destination.

Customer.io allows 3000 requests per 3 seconds per workspace, "not strictly enforced": beyond
it data may be throttled or dropped. A token bucket of capacity ``C`` refilled at ``r`` per
second grants at most ``C + r * T`` requests in any interval of length ``T`` (a full bucket
spent at once, then the refill). Honouring "3000 per 3 s" in every window therefore needs
``C + 3 r <= 3000``: a bucket of 3000 refilled at 1000/s would allow 6000 in the 3 s after any
idle spell. ``RateLimiter.for_customerio`` keeps a small burst and gives the rest of the budget
to the steady rate, so a backlog drains at nearly 1000 requests/s without crossing the limit.

``TokenBucket`` is the pure core (time is passed in); ``RateLimiter`` adds the clock, the
sleeping and a lock.
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
    "RateLimiter",
    "TokenBucket",
]

CUSTOMERIO_REQUESTS: Final = 3000
CUSTOMERIO_WINDOW_S: Final = 3.0
# Large enough that a handful of sender threads starting together do not wait on each other,
# small enough to cost only 2% of the steady rate (refill = (3000 - 60) / 3 = 980/s).
CUSTOMERIO_BURST: Final = 60


@dataclass
class TokenBucket:
    """Token bucket with reservations; every method takes the current time as an argument.

    ``reserve`` always takes a token, going into debt when none is left, and says how long the
    caller must wait for it. Callers arriving at the same instant therefore queue up in order,
    each waiting one refill interval longer than the one before.

    The bucket starts with ``initial_tokens`` (default: full) at the time of the first
    ``reserve``, and never holds more than ``capacity``.
    """

    capacity: float
    refill_per_s: float
    initial_tokens: InitVar[float | None] = None
    _tokens: float = field(init=False, repr=False)
    _last: float | None = field(init=False, default=None, repr=False)

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
        self._tokens = tokens

    def reserve(self, now: float) -> float:
        """Take one token; return the seconds to wait before using it (0.0 if available now)."""
        if self._last is None:
            self._last = now
        elif now > self._last:
            refill = (now - self._last) * self.refill_per_s
            self._tokens = min(self.capacity, self._tokens + refill)
            self._last = now
        # A ``now`` earlier than the last update (a caller that read the clock before another
        # one took its turn) adds no tokens; its wait is still measured from its own ``now``.
        self._tokens -= 1
        if self._tokens >= 0:
            return 0.0
        ready_at = self._last + (-self._tokens) / self.refill_per_s
        return max(0.0, ready_at - now)


class RateLimiter:
    """Thread-safe pacing for one destination: ``acquire`` before each request.

    The lock covers only the reservation; the wait happens outside it, so queued callers sleep
    concurrently, each until its own slot. ``clock`` and ``sleep`` default to the real monotonic
    clock and ``time.sleep``; tests pass fakes.
    """

    def __init__(
        self,
        capacity: float,
        refill_per_s: float,
        *,
        initial_tokens: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._bucket = TokenBucket(capacity, refill_per_s, initial_tokens)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()

    @classmethod
    def for_customerio(
        cls,
        *,
        requests: int = CUSTOMERIO_REQUESTS,
        window_s: float = CUSTOMERIO_WINDOW_S,
        burst: int = CUSTOMERIO_BURST,
        initial_tokens: float | None = None,
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
            clock=clock,
            sleep=sleep,
        )

    @property
    def capacity(self) -> float:
        return self._bucket.capacity

    @property
    def refill_per_s(self) -> float:
        return self._bucket.refill_per_s

    def acquire(self) -> float:
        """Wait for this caller's slot; return the seconds waited."""
        with self._lock:
            # Reading the clock under the lock keeps reservations in time order.
            wait = self._bucket.reserve(self._clock())
        if wait > 0:
            self._sleep(wait)
        return wait
