"""What one request's result means for its rows (relay.send.judge, describe): pure."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.client import ErrorKind, SendResult
from relay.plan import Item
from relay.retry import Outcome, RetryPolicy, backoff_s, decide
from relay.send import Judgement, RowOutcome, describe, judge

NOW = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
POLICY = RetryPolicy(base_s=1.0, cap_s=300.0, max_age_s=86400.0, retry_after_cap_s=300.0)


def result(
    status: int | None,
    *,
    error_kind: ErrorKind | None = None,
    error: str | None = None,
    retry_after: str | None = None,
    snippet: str = "",
) -> SendResult:
    return SendResult(
        status_code=status,
        error_kind=error_kind,
        error=error,
        retry_after=retry_after,
        response_snippet=snippet,
        latency_s=0.05,
        request_bytes=300,
        started_at=NOW,
    )


def item(row_id: int, *, attempts: int = 0, age_s: float = 10.0, customer: str = "c1") -> Item:
    return Item(
        row_id=row_id,
        customer_key=customer,
        event="checkout.start",
        kind="track",
        encoded=b'{"type":"track"}',
        attempts=attempts,
        age_s=age_s,
    )


ITEMS = [item(1), item(2, attempts=3), item(3, customer="c2")]
TIMEOUT = result(None, error_kind="timeout", error="ReadTimeout: timed out")


def states(j: Judgement) -> list[str]:
    return [r.state for r in j.rows]


# --- delivered --------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [200, 201, 204, 299])
def test_a_2xx_delivers_every_row(status: int) -> None:
    j = judge(result(status, snippet="{}"), ITEMS, POLICY, 0.5, NOW)
    assert j.outcome is Outcome.DELIVERED
    assert j.attempt_outcome == "delivered"
    assert j.error is None
    assert j.retry_after_s is None
    assert j.rows == tuple(RowOutcome(i.row_id, "delivered", 1, 0.0, None) for i in ITEMS)


# --- retrying ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "res",
    [
        result(500, snippet="internal"),
        result(502),
        result(503),
        result(599),
        result(408),
        result(429),
        result(404, snippet="not found"),
        TIMEOUT,
        result(None, error_kind="connect", error="ConnectError: refused"),
    ],
)
def test_a_transient_failure_retries_every_row_with_the_backoff(res: SendResult) -> None:
    j = judge(res, ITEMS, POLICY, 0.5, NOW)
    assert j.outcome is Outcome.RETRY
    assert j.attempt_outcome == "retry"
    assert j.error == describe(res)
    assert states(j) == ["retrying"] * 3
    for r, i in zip(j.rows, ITEMS, strict=True):
        assert r.row_id == i.row_id
        assert r.attempted == 1
        assert r.error == j.error
        # The attempt that just failed counts: attempts + 1.
        assert r.delay_s == decide(i.attempts + 1, i.age_s, None, POLICY, 0.5).delay_s
        assert r.delay_s == backoff_s(i.attempts + 1, POLICY, 0.5)


def test_a_timeout_is_described_by_its_kind() -> None:
    j = judge(TIMEOUT, ITEMS[:1], POLICY, 0.0, NOW)
    assert j.error == "timeout: ReadTimeout: timed out"
    assert j.rows[0].error == "timeout: ReadTimeout: timed out"


def test_one_jitter_draw_gives_a_customers_rows_the_same_delay() -> None:
    rows = [item(1), item(2), item(3)]
    j = judge(result(503), rows, POLICY, 0.7, NOW)
    assert len({r.delay_s for r in j.rows}) == 1


def test_retry_after_is_a_floor() -> None:
    j = judge(result(429, retry_after="120"), ITEMS, POLICY, 0.0, NOW)
    assert j.retry_after_s == 120.0
    assert [r.delay_s for r in j.rows] == [120.0] * 3
    # A backoff longer than the hint wins.
    late = [item(1, attempts=20)]
    j = judge(result(429, retry_after="2"), late, POLICY, 0.9, NOW)
    assert j.rows[0].delay_s == pytest.approx(0.9 * POLICY.cap_s)


def test_retry_after_as_an_http_date() -> None:
    header = "Sun, 29 Nov 2026 10:01:30 GMT"
    j = judge(result(503, retry_after=header), ITEMS[:1], POLICY, 0.0, NOW)
    assert j.retry_after_s == 90.0
    assert j.rows[0].delay_s == 90.0


def test_retry_after_is_capped() -> None:
    policy = RetryPolicy(retry_after_cap_s=60.0)
    j = judge(result(429, retry_after="86400"), ITEMS, policy, 0.0, NOW)
    # The judgement reports what the server asked; the rows wait at most the cap.
    assert j.retry_after_s == 86400.0
    assert [r.delay_s for r in j.rows] == [60.0] * 3
    assert states(j) == ["retrying"] * 3


def test_an_unreadable_retry_after_is_only_a_lost_hint() -> None:
    j = judge(result(429, retry_after="soon"), ITEMS[:1], POLICY, 0.25, NOW)
    assert j.retry_after_s is None
    assert j.rows[0].delay_s == backoff_s(1, POLICY, 0.25)


def test_any_number_of_attempts_is_retried_while_the_message_is_young() -> None:
    rows = [item(1, attempts=1000, age_s=POLICY.max_age_s - 1)]
    j = judge(TIMEOUT, rows, POLICY, 0.5, NOW)
    assert states(j) == ["retrying"]
    assert j.rows[0].delay_s <= POLICY.cap_s


def test_only_age_makes_a_failing_row_dead() -> None:
    rows = [
        item(1, attempts=0, age_s=POLICY.max_age_s),
        item(2, attempts=1000, age_s=5.0),
        item(3, attempts=2, age_s=POLICY.max_age_s + 3600),
    ]
    j = judge(result(503, snippet="down"), rows, POLICY, 0.5, NOW)
    assert j.outcome is Outcome.RETRY
    assert states(j) == ["dead", "retrying", "dead"]
    dead = j.rows[0]
    assert dead.attempted == 1
    assert dead.delay_s == 0.0
    assert dead.error is not None
    assert dead.error.startswith("HTTP 503: down; ")
    assert "age" in dead.error


@given(
    status=st.sampled_from([None, 408, 429, 500, 503]),
    attempts=st.integers(0, 10_000),
    age_s=st.floats(0.0, 2 * POLICY.max_age_s),
    jitter=st.floats(0.0, 1.0, exclude_max=True),
    retry_after=st.none() | st.integers(0, 10**7).map(str),
)
def test_retrying_rows_follow_decide(
    status: int | None, attempts: int, age_s: float, jitter: float, retry_after: str | None
) -> None:
    res = result(status, error_kind="timeout" if status is None else None, retry_after=retry_after)
    j = judge(res, [item(1, attempts=attempts, age_s=age_s)], POLICY, jitter, NOW)
    (r,) = j.rows
    assert r.attempted == 1
    if age_s >= POLICY.max_age_s:
        assert r.state == "dead"
        return
    assert r.state == "retrying"
    expected = backoff_s(attempts + 1, POLICY, jitter)
    if retry_after is not None:
        expected = max(expected, min(float(retry_after), POLICY.retry_after_cap_s))
    assert r.delay_s == expected
    assert r.delay_s <= max(POLICY.cap_s, POLICY.retry_after_cap_s)


# --- unauthorized -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_key_holds_every_row_without_counting_an_attempt(status: int) -> None:
    j = judge(result(status, snippet="bad key"), ITEMS, POLICY, 0.5, NOW)
    assert j.outcome is Outcome.UNAUTHORIZED
    assert j.attempt_outcome == "unauthorized"
    assert j.error == f"HTTP {status}: bad key"
    assert states(j) == ["held"] * 3
    for r in j.rows:
        assert r.attempted == 0
        assert r.delay_s == 0.0
        assert r.error is not None
        assert str(status) in r.error
        assert "paused" in r.error


# --- rejected ---------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 413])
def test_a_rejected_single_message_is_dead_with_customer_ios_text(status: int) -> None:
    snippet = '{"errors":[{"field":"traits","message":"must be an object"}]}'
    j = judge(result(status, snippet=snippet), [item(7, attempts=2)], POLICY, 0.5, NOW)
    assert j.outcome is Outcome.REJECTED
    assert j.attempt_outcome == "rejected"
    assert j.rows == (
        RowOutcome(7, "dead", 1, 0.0, f"rejected by Customer.io ({status}): {snippet}"),
    )
    assert j.error == f"HTTP {status}: {snippet}"


@pytest.mark.parametrize("status", [400, 413])
def test_a_rejected_batch_decides_nothing_yet(status: int) -> None:
    j = judge(result(status, snippet="bad"), ITEMS, POLICY, 0.5, NOW)
    assert j.outcome is Outcome.REJECTED
    assert j.attempt_outcome == "rejected"
    assert j.rows == ()
    assert j.error == f"HTTP {status}: bad"


# --- describe ---------------------------------------------------------------------------------


def test_describe() -> None:
    assert describe(result(200, snippet="{}")) is None
    assert describe(result(204)) is None
    assert describe(result(500)) == "HTTP 500"
    assert describe(result(500, snippet="  \n ")) == "HTTP 500"
    assert describe(result(503, snippet="  busy\n")) == "HTTP 503: busy"
    long = describe(result(400, snippet="x" * 1000))
    assert long == "HTTP 400: " + "x" * 200
    assert describe(TIMEOUT) == "timeout: ReadTimeout: timed out"
    assert (
        describe(result(None, error_kind="connect", error="ConnectError: refused"))
        == "connect: ConnectError: refused"
    )


def test_judge_needs_an_aware_now_for_retry_after() -> None:
    with pytest.raises(ValueError):
        judge(result(503), ITEMS, POLICY, 0.5, datetime(2026, 11, 29, 10, 0, 0))


@pytest.mark.parametrize(
    ("res", "floored"),
    [
        (TIMEOUT, True),
        (result(None, error_kind="protocol", error="RemoteProtocolError: hung up"), True),
        (result(None, error_kind="connect", error="ConnectError: refused"), False),
        (result(503, snippet="busy"), False),
    ],
    ids=["timeout", "protocol", "connect", "503"],
)
def test_a_retry_after_an_uncertain_failure_waits_at_least_the_floor(
    res: SendResult, floored: bool
) -> None:
    # The request may still be applied by Customer.io after the relay gave up on it; its
    # retry waits long enough for that to land first. A refused connection or an answer
    # says the request is done with, so no floor.
    j = judge(res, ITEMS, POLICY, 0.0, NOW, uncertain_floor_s=7.0)
    delays = [r.delay_s for r in j.rows]
    if floored:
        assert delays == [7.0, 7.0, 7.0]
    else:
        assert all(d < 7.0 for d in delays)
