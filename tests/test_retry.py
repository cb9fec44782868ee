from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.retry import (
    Outcome,
    RetryDecision,
    RetryPolicy,
    backoff_s,
    classify,
    decide,
    parse_retry_after,
)

NOW = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)


# --- classify -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 202, 204, 299])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(status, None) is Outcome.DELIVERED


@pytest.mark.parametrize("status", [408, 429, 500, 501, 502, 503, 504, 522, 524, 599])
def test_busy_and_server_errors_are_retried(status: int) -> None:
    assert classify(status, None) is Outcome.RETRY


@pytest.mark.parametrize("kind", ["timeout", "connect", "protocol"])
def test_transport_failures_are_retried(kind: str) -> None:
    assert classify(None, kind) is Outcome.RETRY


@pytest.mark.parametrize("kind", [None, "something-new"])
def test_no_response_of_any_kind_is_retried(kind: str | None) -> None:
    assert classify(None, kind) is Outcome.RETRY


@pytest.mark.parametrize("status", [401, 403])
def test_bad_key_is_unauthorized(status: int) -> None:
    assert classify(status, None) is Outcome.UNAUTHORIZED


@pytest.mark.parametrize("status", [400, 413])
def test_bad_body_is_rejected(status: int) -> None:
    assert classify(status, None) is Outcome.REJECTED


@pytest.mark.parametrize(
    "status", [100, 101, 199, 300, 301, 302, 304, 307, 308, 402, 404, 405, 409, 410, 422, 451, 600]
)
def test_other_statuses_are_retried_not_rejected(status: int) -> None:
    # A wrong base URL or a proxy in the way: killing messages for it would lose data.
    assert classify(status, None) is Outcome.RETRY


def test_status_decides_over_error_kind() -> None:
    assert classify(200, "timeout") is Outcome.DELIVERED
    assert classify(400, "protocol") is Outcome.REJECTED


# --- RetryPolicy ----------------------------------------------------------------------------


def test_policy_defaults() -> None:
    policy = RetryPolicy()
    assert (policy.base_s, policy.cap_s) == (1.0, 300.0)
    assert (policy.max_age_s, policy.retry_after_cap_s) == (86400.0, 300.0)


@pytest.mark.parametrize("field", ["base_s", "cap_s", "max_age_s", "retry_after_cap_s"])
@pytest.mark.parametrize("value", [0, 0.0, -1.0, math.nan, math.inf])
def test_policy_rejects_non_positive_or_non_finite(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=rf"RetryPolicy\.{field}"):
        kwargs: dict[str, Any] = {field: value}
        RetryPolicy(**kwargs)


def test_policy_is_frozen() -> None:
    policy = RetryPolicy()
    with pytest.raises(AttributeError):
        policy.cap_s = 1.0  # type: ignore[misc]


# --- backoff_s ------------------------------------------------------------------------------


def test_backoff_doubles_until_the_cap() -> None:
    policy = RetryPolicy(base_s=1.0, cap_s=300.0)
    just_under_one = math.nextafter(1.0, 0.0)
    ceilings = [backoff_s(n, policy, just_under_one) for n in range(1, 12)]
    expected = [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]
    assert ceilings == pytest.approx(expected)


def test_full_jitter_can_be_zero() -> None:
    assert backoff_s(5, RetryPolicy(), 0.0) == 0.0


def test_jitter_scales_the_whole_delay() -> None:
    assert backoff_s(3, RetryPolicy(base_s=2.0), 0.5) == pytest.approx(4.0)


@given(
    attempt=st.integers(min_value=1, max_value=10_000),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
    base_s=st.floats(min_value=0.001, max_value=60.0),
    cap_s=st.floats(min_value=0.001, max_value=86400.0),
)
def test_backoff_bounds(attempt: int, rand: float, base_s: float, cap_s: float) -> None:
    policy = RetryPolicy(base_s=base_s, cap_s=cap_s)
    ceiling = min(cap_s, base_s * 2.0 ** min(attempt - 1, 1000))
    delay = backoff_s(attempt, policy, rand)
    assert 0.0 <= delay < ceiling


@pytest.mark.parametrize("attempt", [1025, 1026, 2000, 2201, 10**6, 10**18, 2**70])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    # 2 ** 1024 no longer fits a float: past it the delay must come out as the cap.
    assert backoff_s(attempt, RetryPolicy(), 0.5) == pytest.approx(150.0)


@pytest.mark.parametrize("attempt", [2000, 2201, 10**6, 2**70])
def test_huge_attempt_numbers_reach_even_a_huge_cap(attempt: int) -> None:
    policy = RetryPolicy(base_s=1e-300, cap_s=1e300)
    assert backoff_s(attempt, policy, 0.5) == pytest.approx(0.5e300)


@pytest.mark.parametrize("attempt", [0, -1])
def test_backoff_rejects_attempts_below_one(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_s(attempt, RetryPolicy(), 0.5)


@pytest.mark.parametrize("rand", [-0.1, 1.0, 1.5, math.nan])
def test_backoff_rejects_rand_outside_unit_interval(rand: float) -> None:
    with pytest.raises(ValueError, match="rand"):
        backoff_s(1, RetryPolicy(), rand)


# --- parse_retry_after ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("0", 0.0), (" 7 ", 7.0), ("1.5", 1.5), ("0.25", 0.25)],
)
def test_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW) == expected


def test_retry_after_http_date() -> None:
    assert parse_retry_after("Sun, 29 Nov 2026 10:02:00 GMT", NOW) == 120.0


def test_retry_after_http_date_is_measured_from_an_aware_now_in_any_zone() -> None:
    now = NOW.astimezone(timezone(timedelta(hours=5)))
    assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 GMT", now) == 30.0


def test_retry_after_minus_zero_zone_is_read_as_gmt() -> None:
    assert parse_retry_after("Sun, 29 Nov 2026 10:00:30 -0000", NOW) == 30.0


def test_retry_after_past_date_is_zero() -> None:
    assert parse_retry_after("Sat, 28 Nov 2026 10:00:00 GMT", NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "soon",
        "-5",
        "+5",
        "1e3",
        "inf",
        "nan",
        "1.",
        ".5",
        "12abc",
        "Sun, 99 Nov 2026 10:00:00 GMT",
        "Sun, 29 Foo 2026 10:00:00 GMT",
        "Sun, 29 Nov 99999999999 10:00:00 GMT",
        "\x00",
    ],
)
def test_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW) is None


@given(st.text())
def test_retry_after_never_raises(value: str) -> None:
    result = parse_retry_after(value, NOW)
    assert result is None or result >= 0.0


def test_retry_after_requires_an_aware_now() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        parse_retry_after("5", datetime(2026, 11, 29, 10, 0, 0))


# --- decide ---------------------------------------------------------------------------------


def test_decide_retries_with_backoff() -> None:
    decision = decide(3, 10.0, None, RetryPolicy(), 0.5)
    assert decision == RetryDecision(dead=False, delay_s=2.0, reason=decision.reason)
    assert "backoff" in decision.reason


def test_no_number_of_transient_failures_makes_a_message_dead() -> None:
    # An outage says nothing about the message: only its age ends the retries.
    policy = RetryPolicy()
    for attempts in (12, 100, 10_000):
        decision = decide(attempts, 3600.0, None, policy, 0.999)
        assert not decision.dead
        assert decision.delay_s <= policy.cap_s


def test_decide_gives_up_at_the_age_limit() -> None:
    policy = RetryPolicy(max_age_s=3600.0)
    assert not decide(1, 3599.9, None, policy, 0.5).dead
    decision = decide(1, 3600.0, None, policy, 0.5)
    assert decision.dead
    assert "message age 3600s" in decision.reason
    assert "limit 3600s" in decision.reason


def test_the_age_limit_wins_over_retry_after() -> None:
    assert decide(2, 86400.0, 5.0, RetryPolicy(), 0.5).dead


def test_retry_after_is_a_floor() -> None:
    decision = decide(1, 0.0, 60.0, RetryPolicy(), 0.5)
    assert decision.delay_s == 60.0
    assert "Retry-After" in decision.reason


def test_retry_after_shorter_than_backoff_keeps_backoff() -> None:
    policy = RetryPolicy(base_s=100.0, cap_s=300.0)
    assert decide(2, 0.0, 5.0, policy, 0.5).delay_s == pytest.approx(100.0)


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(retry_after_cap_s=300.0)
    assert decide(1, 0.0, 86400.0 * 30, policy, 0.0).delay_s == 300.0
    assert decide(1, 0.0, math.inf, policy, 0.0).delay_s == 300.0


@pytest.mark.parametrize("retry_after", [0.0, -10.0, math.nan])
def test_meaningless_retry_after_is_ignored(retry_after: float) -> None:
    assert decide(1, 0.0, retry_after, RetryPolicy(), 0.5).delay_s == 0.5


def test_decide_rejects_zero_attempts() -> None:
    with pytest.raises(ValueError, match="attempts"):
        decide(0, 0.0, None, RetryPolicy(), 0.5)


@given(
    attempts=st.integers(min_value=1, max_value=50),
    age_s=st.floats(min_value=0.0, max_value=200_000.0),
    retry_after=st.none() | st.floats(min_value=0.0, max_value=1e9),
    rand=st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
)
def test_decide_delay_stays_within_the_policy(
    attempts: int, age_s: float, retry_after: float | None, rand: float
) -> None:
    policy = RetryPolicy()
    decision = decide(attempts, age_s, retry_after, policy, rand)
    assert decision.dead == (age_s >= policy.max_age_s)
    if not decision.dead:
        assert 0.0 <= decision.delay_s <= max(policy.cap_s, policy.retry_after_cap_s)
        if retry_after is not None:
            assert decision.delay_s >= min(retry_after, policy.retry_after_cap_s)
