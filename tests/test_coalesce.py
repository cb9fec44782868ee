from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.coalesce import Claimed, Outgoing, Plan, coalesce, merge_traits

T0 = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)


def ts(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def identify(
    row_id: int,
    traits: Mapping[str, Any],
    *,
    at: str | None = None,
    attempts: int = 0,
    user_id: str = "cust-1",
) -> Claimed:
    body = {
        "type": "identify",
        "userId": user_id,
        "traits": dict(traits),
        "timestamp": at if at is not None else ts(row_id),
        "messageId": f"msg-{row_id}",
    }
    return Claimed(row_id=row_id, kind="identify", body=body, attempts=attempts)


def track(row_id: int, event: str = "page.view", *, attempts: int = 0) -> Claimed:
    body = {
        "type": "track",
        "userId": "cust-1",
        "event": event,
        "properties": {"n": row_id},
        "timestamp": ts(row_id),
        "messageId": f"msg-{row_id}",
    }
    return Claimed(row_id=row_id, kind="track", body=body, attempts=attempts)


def sent_ids(plan: Plan) -> list[int]:
    return [out.row_id for out in plan.send]


def assert_every_row_once(rows: list[Claimed], plan: Plan) -> None:
    ids = sent_ids(plan) + list(plan.coalesced_into)
    assert sorted(ids) == sorted(row.row_id for row in rows)
    assert len(ids) == len(set(ids))
    assert set(plan.coalesced_into.values()) <= set(sent_ids(plan))


def test_interleaved_identifies_and_tracks_become_one_identify_then_the_tracks() -> None:
    rows: list[Claimed] = []
    for n in range(10):
        traits: dict[str, Any] = {"email": "a@example.com", "step": n, f"answer_{n}": n * 10}
        if n % 3 == 0:
            traits["funnelData"] = {"quiz": {"q": n}}
        rows.append(identify(2 * n + 1, traits))
        rows.append(track(2 * n + 2, f"event.{n}"))

    plan = coalesce(rows)

    expected_traits: dict[str, Any] = {}
    for row in rows:
        if row.kind == "identify":
            expected_traits.update(row.body["traits"])

    # The first identify carries the merge: it is already first in write order, so a retry
    # of the same rows sends them in the same order.
    first = plan.send[0]
    assert first.row_id == 1
    assert first.body["type"] == "identify"
    assert first.body["messageId"] == "msg-1"
    assert first.body["userId"] == "cust-1"
    assert first.body["traits"] == expected_traits
    # The newest nested object wins whole: no deep merge.
    assert first.body["traits"]["funnelData"] == {"quiz": {"q": 9}}
    assert first.body["timestamp"] == ts(19)

    assert sent_ids(plan)[1:] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert [out.body for out in plan.send[1:]] == [row.body for row in rows if row.kind == "track"]
    assert plan.coalesced_into == {n: 1 for n in (3, 5, 7, 9, 11, 13, 15, 17, 19)}
    assert plan.rewritten == {1: first.body}
    assert_every_row_once(rows, plan)


def test_a_retry_of_an_attempted_carrier_keeps_it_before_the_tracks() -> None:
    # The reported break: the merged identify went out first, its request failed, and the
    # retry sent the attempted rows in write order with the carrier (then the last identify)
    # after three tracks. With the first identify as carrier the order survives the retry.
    rows = [identify(1, {"email": "a@x"}), track(2), identify(3, {"name": "A"}), track(4)]
    first = coalesce(rows)
    assert sent_ids(first) == [1, 2, 4]
    carrier = first.send[0]
    retried = [
        Claimed(1, "identify", carrier.body, 1),
        Claimed(2, "track", rows[1].body, 1),
        Claimed(4, "track", rows[3].body, 1),
    ]
    again = coalesce(retried)
    assert sent_ids(again) == [1, 2, 4]
    assert again.send[0].body["traits"] == {"email": "a@x", "name": "A"}


def test_newest_timestamp_is_compared_as_an_instant_and_kept_as_written() -> None:
    rows = [
        # 12:00+02:00 is 10:00Z: older than the carrier's 10:30Z, though it sorts later as text.
        identify(1, {"a": 1}, at="2026-11-29T12:00:00+02:00"),
        identify(2, {"a": 2}, at="2026-11-29T11:00:00+00:00"),
        identify(3, {"b": 3}, at="2026-11-29T10:30:00Z"),
    ]
    plan = coalesce(rows)
    assert plan.send[0].body["timestamp"] == "2026-11-29T11:00:00+00:00"
    assert plan.send[0].body["traits"] == {"a": 2, "b": 3}


def test_merged_body_takes_the_newest_context_under_the_carriers_message_id() -> None:
    carrier = identify(1, {"a": 1})
    newest = identify(2, {"b": 2})
    newest_body = dict(newest.body, context={"ip": "203.0.113.7"})
    newest = Claimed(row_id=2, kind="identify", body=newest_body, attempts=0)
    body = coalesce([carrier, newest]).send[0].body
    assert body["context"] == {"ip": "203.0.113.7"}
    assert body["messageId"] == "msg-1"


def test_merged_body_is_json_encodable() -> None:
    plan = coalesce([identify(1, {"a": 1}), identify(2, {"b": 2})])
    assert json.loads(json.dumps(plan.send[0].body))["traits"] == {"a": 1, "b": 2}
    assert json.loads(json.dumps(plan.rewritten[1]))["traits"] == {"a": 1, "b": 2}


def test_attempted_rows_are_sent_as_they_are_and_only_later_identifies_merge() -> None:
    attempted_identify = identify(1, {"plan": "free"}, attempts=2)
    attempted_track = track(2, attempts=1)
    rows = [
        attempted_identify,
        attempted_track,
        identify(3, {"plan": "pro"}),
        track(4),
        identify(5, {"seats": 3}),
    ]
    plan = coalesce(rows)

    assert plan.send[0] == Outgoing(1, attempted_identify.body)
    assert plan.send[1] == Outgoing(2, attempted_track.body)
    assert plan.send[0].body is attempted_identify.body
    assert sent_ids(plan) == [1, 2, 3, 4]
    # The attempted identify's traits are not folded into the fresh one either.
    assert plan.send[2].body["traits"] == {"plan": "pro", "seats": 3}
    assert plan.coalesced_into == {5: 3}
    assert set(plan.rewritten) == {3}
    assert_every_row_once(rows, plan)


def test_a_fresh_identify_before_an_attempted_row_is_not_merged() -> None:
    # Only an operator's re-queue makes a fresh row precede an attempted one; merging across
    # the attempted row could send older traits after newer ones.
    rows = [identify(1, {"a": 1}), identify(2, {"a": 2}, attempts=1), identify(3, {"a": 3})]
    plan = coalesce(rows)
    assert sent_ids(plan) == [1, 2, 3]
    assert plan.coalesced_into == {}


def test_only_attempted_rows_are_sent_as_they_are() -> None:
    rows = [
        identify(1, {"a": 1}, attempts=1),
        identify(2, {"a": 2}, attempts=3),
        track(3, attempts=1),
    ]
    plan = coalesce(rows)
    assert plan.send == tuple(Outgoing(row.row_id, row.body) for row in rows)
    assert plan.coalesced_into == {}
    assert plan.rewritten == {}


def test_a_single_identify_keeps_its_place_in_write_order() -> None:
    only = identify(3, {"a": 1})
    rows = [track(1), track(2), only, track(4)]
    plan = coalesce(rows)
    assert sent_ids(plan) == [1, 2, 3, 4]
    assert plan.send[2].body is only.body
    assert plan.rewritten == {}
    assert plan.coalesced_into == {}


def test_identifies_that_change_nothing_are_coalesced_without_a_rewrite() -> None:
    same_at = ts(0)
    rows = [identify(1, {"a": 1}, at=same_at), identify(2, {"a": 1}, at=same_at)]
    plan = coalesce(rows)
    assert sent_ids(plan) == [1]
    assert plan.coalesced_into == {2: 1}
    assert plan.rewritten == {}


def test_no_identifies_keeps_everything_in_order() -> None:
    rows = [track(1), track(2, attempts=1), track(3)]
    plan = coalesce(rows)
    assert sent_ids(plan) == [1, 2, 3]
    assert plan.coalesced_into == {}
    assert plan.rewritten == {}


def test_empty_input() -> None:
    assert coalesce([]) == Plan(send=(), coalesced_into={}, rewritten={})


def test_input_is_not_mutated() -> None:
    rows = [identify(1, {"a": 1}), identify(2, {"b": 2})]
    before = [json.dumps(row.body, sort_keys=True) for row in rows]
    coalesce(rows)
    assert [json.dumps(row.body, sort_keys=True) for row in rows] == before


def test_plan_mappings_are_read_only() -> None:
    plan = coalesce([identify(1, {"a": 1}), identify(2, {"b": 2})])
    with pytest.raises(TypeError):
        plan.coalesced_into[5] = 6  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.rewritten[5] = {}  # type: ignore[index]


@pytest.mark.parametrize(
    "second",
    [
        identify(2, {"a": 2}, user_id="someone-else"),
        identify(2, {"a": 2}, at="yesterday"),
        identify(2, {"a": 2}, at="2026-11-29T10:00:00"),
        Claimed(2, "identify", {"type": "identify", "userId": "cust-1", "traits": {}}, 0),
        Claimed(
            2,
            "identify",
            {"type": "identify", "userId": "cust-1", "traits": ["x"], "timestamp": ts(2)},
            0,
        ),
    ],
    ids=["other-user", "bad-timestamp", "naive-timestamp", "no-timestamp", "traits-not-object"],
)
def test_identifies_that_cannot_be_merged_safely_are_sent_as_written(second: Claimed) -> None:
    rows = [identify(1, {"a": 1}), track(3), second, track(4)]
    plan = coalesce(rows)
    assert plan.send == tuple(Outgoing(row.row_id, row.body) for row in rows)
    assert plan.coalesced_into == {}
    assert plan.rewritten == {}


def test_duplicate_row_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1 appears twice"):
        coalesce([track(1), track(1)])


def test_negative_attempts_are_refused() -> None:
    with pytest.raises(ValueError, match="row 1"):
        coalesce([track(1, attempts=-1)])


def test_merge_traits_is_shallow_and_newest_wins() -> None:
    bodies = [
        {"traits": {"a": 1, "funnelData": {"x": 1, "y": 2}}},
        {},
        {"traits": {"a": 2, "funnelData": {"x": 3}}},
    ]
    assert merge_traits(bodies) == {"a": 2, "funnelData": {"x": 3}}
    assert merge_traits([]) == {}


def test_merge_traits_refuses_a_non_object() -> None:
    with pytest.raises(TypeError, match="traits"):
        merge_traits([{"traits": "nope"}])


# --- property -------------------------------------------------------------------------------

trait_keys = st.sampled_from(["email", "name", "plan", "funnelData", "seats", "country"])
trait_values = (
    st.none()
    | st.integers()
    | st.text(max_size=5)
    | st.dictionaries(st.sampled_from(["q1", "q2"]), st.integers(), max_size=2)
)
row_specs = st.lists(
    st.tuples(
        st.sampled_from(["identify", "track"]),
        st.dictionaries(trait_keys, trait_values, max_size=4),
        st.integers(min_value=-3600, max_value=3600),
        st.integers(min_value=0, max_value=2),
    ),
    max_size=30,
)


@given(row_specs)
def test_any_interleaving(specs: list[tuple[str, dict[str, Any], int, int]]) -> None:
    rows: list[Claimed] = []
    for n, (kind, traits, offset, attempts) in enumerate(specs, start=100):
        if kind == "identify":
            rows.append(identify(n, traits, at=ts(offset), attempts=attempts))
        else:
            rows.append(track(n, attempts=attempts))

    plan = coalesce(rows)
    assert_every_row_once(rows, plan)

    # Everything goes out in write order (coalesced identifies left out).
    assert sent_ids(plan) == sorted(sent_ids(plan))
    last_attempted = max((n for n, row in enumerate(rows) if row.attempts > 0), default=-1)
    before, after = rows[: last_attempted + 1], rows[last_attempted + 1 :]
    # Rows up to the last attempted one go byte for byte.
    by_id = {out.row_id: out for out in plan.send}
    for row in before:
        assert by_id[row.row_id].body is row.body
    fresh_identifies = [row for row in after if row.kind == "identify"]
    for row in after:
        if row.kind == "track":
            assert by_id[row.row_id].body is row.body

    if len(fresh_identifies) < 2:
        assert plan.coalesced_into == {}
        assert plan.rewritten == {}
        return

    carrier = fresh_identifies[0]
    merged = by_id[carrier.row_id]
    assert merged.body["messageId"] == carrier.body["messageId"]

    # Sending the identifies one by one leaves exactly these traits in Customer.io.
    profile: dict[str, Any] = {}
    for row in fresh_identifies:
        profile.update(row.body["traits"])
    assert merged.body.get("traits", {}) == profile

    newest = max(datetime.fromisoformat(row.body["timestamp"]) for row in fresh_identifies)
    assert datetime.fromisoformat(merged.body["timestamp"]) == newest

    assert plan.coalesced_into == {row.row_id: carrier.row_id for row in fresh_identifies[1:]}
    if carrier.row_id in plan.rewritten:
        assert plan.rewritten[carrier.row_id] == merged.body
        assert merged.body != carrier.body
    else:
        assert merged.body == carrier.body
    assert set(plan.rewritten) <= {carrier.row_id}

    # The guarantee itself: every track follows an identify holding every trait written
    # before it (each identify's traits reach Customer.io at or before its own position).
    held: dict[str, Any] = {}
    written: dict[str, Any] = {}
    sent = iter(plan.send)
    for row in rows:
        if row.kind == "identify":
            written.update(row.body["traits"])
        if row.row_id in by_id:
            out = next(sent)
            assert out.row_id == row.row_id
            if row.kind == "identify":
                held.update(out.body.get("traits", {}))
        if row.kind == "track":
            assert set(written) <= set(held)
