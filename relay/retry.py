"""Retry decisions: what an answer from Customer.io means, and when to try again.

Pure functions. The current time and the jitter draw are arguments, so a test can pin both and
the daemon passes ``datetime.now(UTC)`` and ``random.random()``.

The classification follows Customer.io's official clients (see ``classify``) except where they
drop data: a 4xx that says nothing about the message is retried, not discarded.

A transient failure (5xx, 429, network, timeout) never makes a message dead by itself: the
relay retries it until its **age** limit (``max_age_s``, a day by default), whatever the number
of attempts, because an outage of Customer.io says nothing about the message. (A count limit
made messages dead minutes into an outage: 12 attempts under a 300 s cap add up to about
1,100 s.) Backoff grows exponentially with full jitter up to ``cap_s`` (minutes, not hours), so
delivery resumes within one cap of Customer.io coming back. ``Retry-After`` is honoured but
capped, so a broken header cannot park a customer for days.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class Outcome(enum.Enum):
    """What the relay does with a message after one delivery attempt."""

    DELIVERED = "delivered"
    RETRY = "retry"
    REJECTED = "rejected"
    UNAUTHORIZED = "unauthorized"


def classify(status_code: int | None, error_kind: str | None) -> Outcome:
    """Map one HTTP attempt to an outcome.

    ``status_code`` is the response status, or ``None`` when no response arrived; then
    ``error_kind`` says why (``"timeout"``, ``"connect"``, ``"protocol"``).

    ====================================  ==============  =========================================
    Status                                Outcome         Why
    ====================================  ==============  =========================================
    200-299                               DELIVERED       Only meaningful with ``X-Strict-Mode: 1``;
                                                          without it Customer.io answers 200 and
                                                          drops invalid bodies.
    408, 429                              RETRY           The server is busy or slow, not the
                                                          message wrong.
    500-599                               RETRY           Server-side failure.
    None (timeout / connect / protocol)   RETRY           No answer: nothing says the message is
                                                          bad. Any other or missing ``error_kind``
                                                          is retried for the same reason.
    401, 403                              UNAUTHORIZED    The write key is wrong. The caller pauses
                                                          the destination; retrying would burn
                                                          every message's attempts on a config
                                                          error.
    400, 413                              REJECTED        Strict mode says the body is invalid or
                                                          too large. The caller bisects the batch to
                                                          isolate the bad messages.
    anything else (1xx, 3xx, 404, 405,    RETRY           A wrong base URL or a proxy in the way,
    other 4xx, out-of-range codes)                        not a bad message. Rejecting would lose
                                                          data over a config error; the attempt and
                                                          age limits still end these messages.
    ====================================  ==============  =========================================

    When a status is present it decides alone; ``error_kind`` is then ignored (a response that
    arrived is evidence enough, even if reading its body failed afterwards).
    """
    if status_code is None:
        return Outcome.RETRY
    if 200 <= status_code <= 299:
        return Outcome.DELIVERED
    if status_code in (401, 403):
        return Outcome.UNAUTHORIZED
    if status_code in (400, 413):
        return Outcome.REJECTED
    return Outcome.RETRY


@dataclass(frozen=True)
class RetryPolicy:
    """Limits for retrying one message.

    ``cap_s`` bounds a single backoff, ``max_age_s`` bounds how long after it was written a
    message may still be retried (the only limit on transient failures), and
    ``retry_after_cap_s`` bounds how long a ``Retry-After`` header can make the relay wait
    (Customer.io's Node client uses the same 300 s).
    """

    base_s: float = 1.0
    cap_s: float = 300.0
    max_age_s: float = 86400.0
    retry_after_cap_s: float = 300.0

    def __post_init__(self) -> None:
        for name in ("base_s", "cap_s", "max_age_s", "retry_after_cap_s"):
            value = getattr(self, name)
            # ``not value > 0`` also rejects NaN, which compares false with everything and would
            # otherwise slip through every later min()/max().
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not value > 0
                or not math.isfinite(value)
            ):
                raise ValueError(f"RetryPolicy.{name} must be a finite number > 0, got {value!r}")


# Beyond this many doublings any positive float base (the smallest is 2**-1074) exceeds the
# largest float, so the backoff is the cap whatever the policy. Clamping the exponent keeps
# ldexp from being asked for absurd powers when a counter has run away.
_MAX_DOUBLINGS = 2200


def backoff_s(attempt: int, policy: RetryPolicy, rand: float) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 = the first failure).

    Full jitter: ``rand * min(cap_s, base_s * 2 ** (attempt - 1))`` with ``rand`` in [0, 1).
    Drawing the whole delay at random, not adding a little noise to a fixed one, spreads the
    relays that failed together (one outage hits every in-flight batch at once) across the
    window instead of sending them back in lockstep.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt!r}")
    if not 0.0 <= rand < 1.0:
        raise ValueError(f"rand must be in [0, 1), got {rand!r}")
    try:
        ceiling = min(policy.cap_s, math.ldexp(policy.base_s, min(attempt - 1, _MAX_DOUBLINGS)))
    except OverflowError:
        ceiling = policy.cap_s
    return rand * ceiling


# RFC 9110 delta-seconds is digits only; a decimal fraction is accepted because some servers
# send one. Signs, exponents, "inf" and "nan" are not delays.
_DELTA_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds the server asked to wait, from a ``Retry-After`` header value.

    Accepts delta-seconds (``"120"``, ``"1.5"``) or an HTTP-date (``"Wed, 21 Oct 2026 07:28:00
    GMT"``), measured from ``now``. A date in the past gives ``0.0``. A missing or unreadable
    value gives ``None``: a broken header must never fail a delivery, it only loses its hint.
    The result is not capped here; ``decide`` applies the policy's cap.

    ``now`` must be timezone-aware: a naive ``now`` is a programming error, reported as
    ``ValueError`` on every call (not only when a date arrives) so that it shows up in tests.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if value is None:
        return None
    text = value.strip()
    if _DELTA_SECONDS.fullmatch(text):
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        # parsedate_to_datetime returns a naive datetime for a "-0000" zone; HTTP-dates are
        # always GMT.
        when = when.replace(tzinfo=UTC)
    try:
        delta = (when - now).total_seconds()
    except OverflowError:
        return None
    return max(0.0, delta)


@dataclass(frozen=True)
class RetryDecision:
    """What to do with a message whose attempt failed with a retryable outcome.

    ``dead`` means stop: the message is marked dead and kept for an operator to re-queue.
    Otherwise retry after ``delay_s`` seconds. ``reason`` is one line for logs and the
    attempt record.
    """

    dead: bool
    delay_s: float
    reason: str


def decide(
    attempts: int,
    age_s: float,
    retry_after_s: float | None,
    policy: RetryPolicy,
    rand: float,
) -> RetryDecision:
    """Decide between another attempt and giving up.

    ``attempts`` counts the attempts made so far, including the one that just failed.
    ``age_s`` is how long ago the message was written. ``retry_after_s`` is the parsed
    ``Retry-After`` of the failed response, if any. ``rand`` in [0, 1) is the jitter draw.

    The age limit is checked before any delay is computed, so a message past it is never
    scheduled once more; the attempt count only lengthens the backoff. A ``Retry-After``
    only lengthens the delay: the server asked for at least that long, and the cap keeps a
    hostile or broken header from parking the customer's queue for longer than
    ``retry_after_cap_s``.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1 (it includes the failed one), got {attempts!r}")
    if age_s >= policy.max_age_s:
        return RetryDecision(
            dead=True,
            delay_s=0.0,
            reason=f"gave up after message age {age_s:.0f}s >= limit {policy.max_age_s:.0f}s",
        )
    delay = backoff_s(attempts, policy, rand)
    # ``> 0`` also drops NaN; a zero or negative hint cannot lengthen the delay anyway.
    if retry_after_s is not None and retry_after_s > 0:
        floor = min(retry_after_s, policy.retry_after_cap_s)
        if floor > delay:
            return RetryDecision(
                dead=False,
                delay_s=floor,
                reason=f"retry in {floor:.1f}s (Retry-After, attempt {attempts})",
            )
    return RetryDecision(
        dead=False, delay_s=delay, reason=f"retry in {delay:.1f}s (backoff, attempt {attempts})"
    )
