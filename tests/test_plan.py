"""The claim planner (relay.plan): pure, no database.

Rows are built the way OUTBOX_CLAIM_FOLLOWERS returns them: the body as jsonb's text, which
has a space after every ':' and ',' (``json.dumps`` with its default separators).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb

from relay import queries as q
from relay.client import Destination
from relay.destinations import Route
from relay.limits import MAX_MESSAGE_BYTES, MAX_PROJECT_ID_BYTES, text_size
from relay.plan import ClaimedRow, ClaimPlan, Item, body_problem, due_run, encode, plan_claim

T0 = datetime(2026, 11, 29, 10, 0, 0, tzinfo=UTC)
DEST = Destination("default", "http://127.0.0.1:1", "key")
OTHER = Destination("p2", "http://127.0.0.1:2", "key2")
HELD_REASON = "destination p_held is paused: write key refused"


def route(project_id: str | None) -> Route:
    if project_id == "p_held":
        return Route(None, HELD_REASON, "p_held")
    if project_id == "p2":
        return Route(OTHER, None, "p2")
    return Route(DEST, None, "default")


def ts(seconds: int) -> str:
    return (T0 + timedelta(seconds=seconds)).isoformat()


def identify_body(n: int, customer: str = "c1", **traits: Any) -> dict[str, Any]:
    return {
        "type": "identify",
        "userId": customer,
        "traits": {"email": f"{customer}@example.com", "step": n, **traits},
        "timestamp": ts(n),
        "messageId": f"msg-{customer}-{n}",
    }


def track_body(n: int, customer: str = "c1", **properties: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "userId": customer,
        "event": "checkout.start",
        "properties": {"n": n, **properties},
        "timestamp": ts(n),
        "messageId": f"msg-{customer}-{n}",
    }


def row(
    row_id: int,
    kind: str,
    body: Any,
    *,
    customer: str = "c1",
    attempts: int = 0,
    state: str = "pending",
    due: bool = True,
    project: str | None = None,
    age_s: float = 1.0,
) -> ClaimedRow:
    return ClaimedRow(
        id=row_id,
        customer_key=customer,
        kind=kind,
        project_id=project,
        event="checkout.start",
        body_text=json.dumps(body),
        attempts=attempts,
        state=state,
        due=due,
        age_s=age_s,
    )


def items(plan: ClaimPlan, key: str = "default") -> list[Item]:
    return plan.work[key].items if key in plan.work else []


def sent(plan: ClaimPlan, key: str = "default") -> list[int]:
    return [i.row_id for i in items(plan, key)]


# --- body_problem -----------------------------------------------------------------------------

VALID_IDENTIFY: dict[str, Any] = {"type": "identify", "userId": "c1"}
VALID_TRACK: dict[str, Any] = {"type": "track", "userId": "c1", "event": "e"}


def with_(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    return {**base, **changes}


def without(base: Mapping[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in base.items() if k != key}


@pytest.mark.parametrize(
    ("kind", "body", "names"),
    [
        # Not an object at all: the reason says what it is instead.
        ("identify", [VALID_IDENTIFY], ["array", "object"]),
        ("track", None, ["null", "object"]),
        ("identify", "identify", ["string", "object"]),
        ("track", 42, ["number", "object"]),
        ("track", 4.5, ["number", "object"]),
        ("identify", True, ["boolean", "object"]),
        ("identify", {}, ["'type'"]),
        # type must be the row's kind
        ("identify", with_(VALID_TRACK, traits={}), ["'type'", "'identify'"]),
        ("track", with_(VALID_IDENTIFY, event="e"), ["'type'", "'track'"]),
        ("track", with_(VALID_TRACK, type="page"), ["'type'"]),
        # userId
        ("identify", without(VALID_IDENTIFY, "userId"), ["'userId'"]),
        ("track", with_(VALID_TRACK, userId=""), ["'userId'"]),
        ("track", with_(VALID_TRACK, userId=123), ["'userId'"]),
        ("identify", with_(VALID_IDENTIFY, userId=None), ["'userId'"]),
        ("identify", with_(VALID_IDENTIFY, userId=["c1"]), ["'userId'"]),
        ("identify", with_(without(VALID_IDENTIFY, "userId"), anonymousId=""), ["'userId'"]),
        ("identify", with_(without(VALID_IDENTIFY, "userId"), anonymousId=7), ["'userId'"]),
        # identify traits
        ("identify", with_(VALID_IDENTIFY, traits=["a"]), ["'traits'", "array"]),
        ("identify", with_(VALID_IDENTIFY, traits="a"), ["'traits'", "string"]),
        ("identify", with_(VALID_IDENTIFY, traits=None), ["'traits'", "null"]),
        ("identify", with_(VALID_IDENTIFY, traits=3), ["'traits'", "number"]),
        # track event and properties
        ("track", without(VALID_TRACK, "event"), ["'event'"]),
        ("track", with_(VALID_TRACK, event=""), ["'event'"]),
        ("track", with_(VALID_TRACK, event=5), ["'event'"]),
        ("track", with_(VALID_TRACK, properties=[1, 2]), ["'properties'", "array"]),
        ("track", with_(VALID_TRACK, properties="x"), ["'properties'", "string"]),
        ("track", with_(VALID_TRACK, properties=None), ["'properties'", "null"]),
        # timestamp
        ("track", with_(VALID_TRACK, timestamp="yesterday"), ["'timestamp'", "yesterday"]),
        ("identify", with_(VALID_IDENTIFY, timestamp="2026-13-01T00:00:00Z"), ["'timestamp'"]),
        ("identify", with_(VALID_IDENTIFY, timestamp=""), ["'timestamp'"]),
        ("track", with_(VALID_TRACK, timestamp=1764324000), ["'timestamp'"]),
        ("track", with_(VALID_TRACK, timestamp=None), ["'timestamp'"]),
        ("track", with_(VALID_TRACK, timestamp={"at": "2026-11-28"}), ["'timestamp'"]),
        # messageId
        ("track", with_(VALID_TRACK, messageId=17), ["'messageId'"]),
        ("identify", with_(VALID_IDENTIFY, messageId=None), ["'messageId'"]),
    ],
)
def test_body_problem_names_what_is_wrong(kind: str, body: Any, names: list[str]) -> None:
    reason = body_problem(kind, body)
    assert reason is not None
    for name in names:
        assert name in reason, (name, reason)


def test_body_problem_cuts_a_long_timestamp_in_its_reason() -> None:
    reason = body_problem("track", with_(VALID_TRACK, timestamp="x" * 500))
    assert reason is not None and "'timestamp'" in reason
    assert len(reason) < 150


@pytest.mark.parametrize(
    ("kind", "body"),
    [
        ("identify", VALID_IDENTIFY),
        ("identify", with_(VALID_IDENTIFY, traits={})),
        ("identify", identify_body(1)),
        ("identify", with_(identify_body(1), timestamp="2026-11-28T10:00:01.000Z")),
        ("identify", with_(identify_body(1), timestamp="2026-11-28T12:00:01+02:00")),
        ("identify", with_(without(VALID_IDENTIFY, "userId"), anonymousId="anon-1")),
        ("identify", with_(VALID_IDENTIFY, context={"ip": "1.2.3.4"}, extra=[1, None])),
        ("track", VALID_TRACK),
        ("track", with_(VALID_TRACK, properties={})),
        ("track", track_body(2)),
        ("track", with_(track_body(2), timestamp="2026-11-28T10:00:02Z")),
        ("track", with_(track_body(2), timestamp="2026-11-28T12:00:02.123456+02:00")),
        ("track", with_(without(VALID_TRACK, "userId"), anonymousId="anon-1")),
        # An identify-only field on a track is Customer.io's to judge, not certain poison.
        ("track", with_(VALID_TRACK, traits="whatever")),
    ],
)
def test_body_problem_accepts_valid_bodies(kind: str, body: Any) -> None:
    assert body_problem(kind, body) is None


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ("type", "userId", "anonymousId", "traits", "event", "properties", "timestamp")


@given(
    kind=st.sampled_from(["identify", "track"]),
    body=JSON
    | st.dictionaries(
        st.sampled_from([*FIELDS, "messageId"]),
        JSON | st.sampled_from(["identify", "track", "c1", "2026-11-28T10:00:00Z"]),
    ),
)
def test_body_problem_never_raises(kind: str, body: Any) -> None:
    reason = body_problem(kind, body)
    assert reason is None or isinstance(reason, str)
    if reason is None:
        assert isinstance(body, dict) and body["type"] == kind


# --- due_run ----------------------------------------------------------------------------------


def test_due_run_takes_the_leading_due_rows() -> None:
    rows = [
        row(1, "identify", identify_body(1)),
        row(2, "track", track_body(2), state="retrying", attempts=2),
        row(3, "track", track_body(3)),
    ]
    assert due_run(rows) == rows
    assert due_run([]) == []


@pytest.mark.parametrize(
    "stopper",
    [
        {"state": "held"},
        {"state": "in_flight"},
        {"state": "retrying", "due": False},
        {"state": "pending", "due": False},
        {"project": "p2"},
    ],
)
def test_due_run_stops_at_a_row_that_cannot_go_now(stopper: dict[str, Any]) -> None:
    before = [row(1, "identify", identify_body(1)), row(2, "track", track_body(2))]
    rows = [*before, row(3, "track", track_body(3), **stopper), row(4, "track", track_body(4))]
    assert due_run(rows) == before
    if "project" not in stopper:
        # A stopper first: nothing goes.
        assert due_run(rows[2:]) == []


def test_due_run_keeps_a_run_of_one_project() -> None:
    rows = [
        row(1, "track", track_body(1), project="p2"),
        row(2, "track", track_body(2), project="p2"),
        row(3, "track", track_body(3), project=None),
    ]
    assert due_run(rows) == rows[:2]


# --- plan_claim -------------------------------------------------------------------------------


def test_a_poison_row_dies_alone_and_the_rest_of_the_run_goes_in_write_order() -> None:
    poison = track_body(3, properties_bad=1)
    poison["properties"] = ["not", "an", "object"]
    rows = [
        row(1, "track", track_body(1)),
        row(2, "track", track_body(2)),
        row(3, "track", poison),
        row(4, "track", track_body(4)),
        row(5, "track", track_body(5)),
    ]
    plan = plan_claim(["c1"], list(reversed(rows)), route)
    assert set(plan.dead) == {3}
    assert "'properties'" in plan.dead[3]
    assert plan.dead[3].startswith("invalid message body")
    assert plan.in_flight == [1, 2, 4, 5]
    assert sent(plan) == [1, 2, 4, 5]
    assert plan.claimed == 5
    # Tracks go as stored.
    assert [i.encoded for i in items(plan)] == [r.body_text.encode() for r in rows if r.id != 3]


def test_a_poison_identify_is_not_merged_and_the_identifies_around_it_are() -> None:
    bad = identify_body(2)
    bad["traits"] = "plan=pro"
    rows = [
        row(1, "identify", identify_body(1, plan="free")),
        row(2, "identify", bad),
        row(3, "track", track_body(3)),
        row(4, "identify", identify_body(4, plan="pro")),
    ]
    plan = plan_claim(["c1"], rows, route)
    assert "'traits'" in plan.dead[2]
    assert plan.in_flight == [1, 3]
    assert plan.coalesced == {4: 1}
    merged = json.loads(plan.rewritten[1])
    assert merged["traits"]["plan"] == "pro"
    assert merged["messageId"] == "msg-c1-1"
    assert "plan=pro" not in plan.rewritten[1].decode()
    assert items(plan)[0].encoded == plan.rewritten[1]


def test_two_customers_go_in_claim_order_each_in_write_order() -> None:
    rows = [
        row(1, "track", track_body(1, "a"), customer="a"),
        row(2, "track", track_body(2, "b"), customer="b"),
        row(3, "track", track_body(3, "a"), customer="a"),
        row(4, "track", track_body(4, "b"), customer="b"),
        row(5, "track", track_body(5, "b"), customer="b"),
        # Not a head of this claim: its rows are ignored.
        row(6, "track", track_body(6, "z"), customer="z"),
    ]
    plan = plan_claim(["b", "a"], rows[::-1], route)
    assert sent(plan) == [2, 4, 5, 1, 3]
    assert [i.customer_key for i in items(plan)] == ["b", "b", "b", "a", "a"]
    assert sorted(plan.in_flight) == [1, 2, 3, 4, 5]
    assert plan.claimed == 5


def test_customers_of_different_projects_go_to_their_destinations() -> None:
    rows = [
        row(1, "track", track_body(1, "a"), customer="a", project="p2"),
        row(2, "track", track_body(2, "b"), customer="b"),
        row(3, "track", track_body(3, "a"), customer="a", project="p2"),
    ]
    plan = plan_claim(["a", "b"], rows, route)
    assert plan.work["p2"].route.destination == OTHER
    assert sent(plan, "p2") == [1, 3]
    assert sent(plan, "default") == [2]


def test_a_run_without_a_usable_destination_is_held_under_the_reason() -> None:
    bad = track_body(2)
    bad["event"] = ""
    rows = [
        row(1, "identify", identify_body(1), project="p_held"),
        row(2, "track", bad, project="p_held"),
        row(3, "identify", identify_body(3), project="p_held"),
        # Another project: after the run, untouched.
        row(4, "track", track_body(4), project=None),
    ]
    other = row(5, "track", track_body(5, "c2"), customer="c2")
    plan = plan_claim(["c1", "c2"], [*rows, other], route)
    # Held before it is judged: a poison row in a held run waits with the run.
    assert dict(plan.held) == {HELD_REASON: [1, 2, 3]}
    assert plan.dead == {}
    assert plan.coalesced == {}
    assert plan.in_flight == [5]
    assert plan.claimed == 4


def test_an_oversize_message_is_dead_with_its_size() -> None:
    body = track_body(2, blob="x" * MAX_MESSAGE_BYTES)
    size = len(json.dumps(body))
    assert size > MAX_MESSAGE_BYTES
    rows = [
        row(1, "track", track_body(1)),
        row(2, "track", body),
        row(3, "track", track_body(3)),
    ]
    plan = plan_claim(["c1"], rows, route)
    assert set(plan.dead) == {2}
    assert str(size) in plan.dead[2]
    assert str(MAX_MESSAGE_BYTES) in plan.dead[2]
    assert plan.in_flight == [1, 3]


def sdk_size(body: Any) -> int:
    """Customer.io's measure of a message, as its SDK takes it: ``len(json.dumps(msg))``."""
    return len(json.dumps(body))


@pytest.mark.parametrize("shape_ok", [True, False])
@pytest.mark.parametrize("pad", ["é" * 5_500, "🔥" * 2_800, "\x7f" * 5_500, "é" * 12_000])
def test_the_size_limit_is_judged_as_customerio_measures_it(shape_ok: bool, pad: str) -> None:
    # Under 32 KB in UTF-8 (what the row's text costs on the wire), over it with ASCII escapes
    # (what Customer.io counts): dead with its size, on the fast path (a track the claim query
    # passed, never parsed) and the slow one alike; never sent for a 400.
    body = track_body(2, pad=pad)
    assert len(json.dumps(body, ensure_ascii=False).encode()) < MAX_MESSAGE_BYTES
    size = sdk_size(body)
    assert size > MAX_MESSAGE_BYTES
    rows = [row(1, "track", track_body(1)), row(2, "track", body), row(3, "track", track_body(3))]
    rows = [dataclasses.replace(r, shape_ok=shape_ok) for r in rows]
    plan = plan_claim(["c1"], rows, route)
    assert set(plan.dead) == {2}
    assert f"message is {size} bytes" in plan.dead[2]
    assert plan.in_flight == [1, 3]


def test_the_size_limit_counts_the_separators_customerio_counts() -> None:
    # Compact, this body is under the limit; written as the SDK writes it (", " and ": "), over.
    body = track_body(1)
    body["properties"].update({f"k{n:05d}": 0 for n in range(2700)})
    assert len(encode(body)) <= MAX_MESSAGE_BYTES < sdk_size(body)
    plan = plan_claim(["c1"], [row(1, "track", body)], route)
    assert plan.dead == {
        1: f"message is {sdk_size(body)} bytes as Customer.io measures it"
        f" (JSON with non-ASCII characters as \\u escapes), over its"
        f" {MAX_MESSAGE_BYTES}-byte limit"
    }


def test_a_message_at_the_limit_goes_out_with_its_size() -> None:
    body = track_body(1, pad="")
    body["properties"]["pad"] = "é" * ((MAX_MESSAGE_BYTES - sdk_size(body)) // 6)
    body["properties"]["pad"] += "x" * (MAX_MESSAGE_BYTES - sdk_size(body))
    assert sdk_size(body) == MAX_MESSAGE_BYTES
    for shape_ok in (True, False):
        r = dataclasses.replace(row(1, "track", body), shape_ok=shape_ok)
        plan = plan_claim(["c1"], [r], route)
        assert plan.dead == {}
        assert [(i.encoded, i.size) for i in items(plan)] == [
            (r.body_text.encode(), sdk_size(body))
        ]


def test_every_item_carries_its_size_as_customerio_measures_it() -> None:
    # Identifies merge (the carrier is re-encoded), tracks go as stored: either way the size
    # handed to batching is json.dumps' length of what is sent.
    rows = [
        row(1, "identify", identify_body(1, city="Zürich")),
        row(2, "track", track_body(2, note="🔥 naïve \x7f")),
        row(3, "identify", identify_body(3, name="Zoë")),
        dataclasses.replace(row(4, "track", track_body(4, note="ça")), shape_ok=True),
    ]
    plan = plan_claim(["c1"], rows, route)
    assert plan.coalesced == {3: 1}
    assert [i.row_id for i in items(plan)] == [1, 2, 4]
    for item in items(plan):
        assert item.size == sdk_size(json.loads(item.encoded)), item


def test_an_item_built_without_a_size_measures_its_encoded_body() -> None:
    body = track_body(1, note="é🔥")
    item = Item(1, "c1", "checkout.start", "track", encode(body), 0, 1.0)
    assert item.size == sdk_size(body)


def test_a_project_id_over_the_limit_is_dead_and_the_claim_goes_on() -> None:
    # Such a row can only come from SQL (record_event refuses it). Held, it would need an entry
    # in relay_outbox_held_idx that PostgreSQL refuses, failing the whole claim, every cycle.
    long = "p" * (MAX_PROJECT_ID_BYTES + 1)
    rows = [
        row(1, "identify", identify_body(1), project=long),
        row(2, "track", track_body(2), project=long),
        # Another project after the run: left for a later claim, as any run's end is.
        row(3, "track", track_body(3), project="p2"),
        row(4, "track", track_body(4, "c2"), customer="c2"),
    ]
    plan = plan_claim(["c1", "c2"], rows, route)
    assert set(plan.dead) == {1, 2}
    reason = plan.dead[1]
    assert reason == (
        f"project_id is {MAX_PROJECT_ID_BYTES + 1} bytes, over the {MAX_PROJECT_ID_BYTES}-byte"
        " limit (relay.limits.MAX_PROJECT_ID_BYTES) that record_event enforces; held, the row"
        " could not be indexed"
    )
    assert plan.in_flight == [4]
    assert dict(plan.held) == {}
    assert plan.claimed == 3


def test_a_project_id_at_the_limit_is_routed() -> None:
    at_limit = "é" * (MAX_PROJECT_ID_BYTES // 2)
    plan = plan_claim(["c1"], [row(1, "track", track_body(1), project=at_limit)], route)
    assert plan.dead == {}
    assert plan.in_flight == [1]


def test_identifies_whose_merge_would_be_oversize_are_sent_as_they_are() -> None:
    half = MAX_MESSAGE_BYTES // 2 + 100
    rows = [
        row(1, "identify", identify_body(1, a="a" * half)),
        row(2, "track", track_body(2)),
        row(3, "identify", identify_body(3, b="b" * half)),
    ]
    plan = plan_claim(["c1"], rows, route)
    assert plan.dead == {}
    assert plan.coalesced == {}
    assert plan.rewritten == {}
    assert plan.in_flight == [1, 2, 3]
    assert [i.encoded for i in items(plan)] == [r.body_text.encode() for r in rows]


def test_merged_identifies_that_fit_are_one_message_on_the_first() -> None:
    rows = [
        row(1, "identify", identify_body(1, a=1)),
        row(2, "track", track_body(2)),
        row(3, "identify", identify_body(3, b=2)),
        row(4, "identify", identify_body(4, a=3)),
    ]
    plan = plan_claim(["c1"], rows, route)
    assert plan.coalesced == {3: 1, 4: 1}
    assert plan.in_flight == [1, 2]
    assert plan.coalesced_by_destination == {"default": 2}
    merged = json.loads(plan.rewritten[1])
    assert merged["traits"] == {"email": "c1@example.com", "step": 4, "a": 3, "b": 2}
    assert merged["timestamp"] == ts(4)
    assert items(plan)[0].encoded == plan.rewritten[1]


def test_identifies_are_never_coalesced_into_a_dead_carrier() -> None:
    big = identify_body(1, blob="x" * MAX_MESSAGE_BYTES)
    # A small identify with nothing the carrier lacks: the merge equals the carrier's body.
    small = {"type": "identify", "userId": "c1", "timestamp": big["timestamp"], "messageId": "m2"}
    plan = plan_claim(["c1"], [row(1, "identify", big), row(2, "identify", small)], route)
    assert set(plan.dead) == {1}
    for into in plan.coalesced.values():
        assert into in plan.in_flight, (plan.coalesced, plan.dead)
    assert 2 in plan.in_flight


# --- bodies the relay cannot read, or cannot write back ---------------------------------------


def nested(depth: int) -> str:
    """An object ``depth`` levels deep, spelled as jsonb prints it."""
    return '{"a": ' * depth + "1" + "}" * depth


def raw(row_id: int, kind: str, text: str, **kw: Any) -> ClaimedRow:
    """A row whose stored body is ``text``, jsonb's spelling of a value Python may not read."""
    return dataclasses.replace(row(row_id, kind, None, **kw), body_text=text)


def stored_identify(n: int, traits: str, customer: str = "c1") -> str:
    """An identify otherwise valid (mergeable: aware timestamp), with ``traits`` as written."""
    return (
        f'{{"type": "identify", "userId": "{customer}", "traits": {traits},'
        f' "timestamp": "{ts(n)}", "messageId": "msg-{customer}-{n}"}}'
    )


# jsonb keeps numbers as numeric and prints them without an exponent: 1e5000 comes back as
# 5,001 digits, past the 4,300 Python converts to an int.
LONG_INTEGER = "1" + "0" * 5000
# Beyond a float's range but not an integer: Python reads it as inf, which JSON cannot write.
HUGE_DECIMAL = "1" + "0" * 400 + ".5"


@pytest.mark.parametrize("kind", ["identify", "track"])
def test_a_body_nested_deeper_than_the_relay_reads_dies_alone_with_its_depth(kind: str) -> None:
    # jsonb stores 3,000 levels; Python's parser gives up near 1,000 with a RecursionError,
    # which escaping the planner failed every claim that took the row.
    if kind == "identify":
        text = stored_identify(2, nested(3000))
    else:
        # A track the claim query did not pass (shape_ok false) is parsed here too.
        text = f'{{"type": "track", "userId": "c1", "event": "e", "properties": {nested(3000)}}}'
    rows = [
        row(1, "identify", identify_body(1, plan="free")),
        raw(2, kind, text),
        row(3, "track", track_body(3)),
        row(4, "identify", identify_body(4, plan="pro")),
        row(5, "track", track_body(5, "c2"), customer="c2"),
    ]
    plan = plan_claim(["c1", "c2"], rows, route)
    assert set(plan.dead) == {2}
    assert plan.dead[2] == (
        "invalid message body: body is nested 3001 levels deep, deeper than the relay's JSON"
        f" parser reads (Python's recursion limit, {sys.getrecursionlimit()})"
    )
    assert plan.in_flight == [1, 3, 5]
    assert plan.coalesced == {4: 1}
    assert json.loads(plan.rewritten[1])["traits"]["plan"] == "pro"


def test_a_number_longer_than_the_relay_reads_dies_alone_naming_its_digits() -> None:
    rows = [
        row(1, "identify", identify_body(1)),
        raw(2, "identify", stored_identify(2, f'{{"n": {LONG_INTEGER}}}')),
        row(3, "identify", identify_body(3)),
        row(4, "track", track_body(4, "c2"), customer="c2"),
    ]
    plan = plan_claim(["c1", "c2"], rows, route)
    assert plan.dead == {
        2: "invalid message body: body holds a number of 5001 digits, longer than the"
        f" {sys.get_int_max_str_digits()} digits the relay's JSON parser reads"
    }
    assert plan.in_flight == [1, 4]
    assert plan.coalesced == {3: 1}


def test_a_body_that_is_not_json_dies_alone() -> None:
    # jsonb never returns such text; the planner still judges it rather than raise.
    rows = [raw(1, "identify", '{"type": "identify", "userId": '), row(2, "track", track_body(2))]
    plan = plan_claim(["c1"], rows, route)
    assert set(plan.dead) == {1}
    assert plan.dead[1].startswith("invalid message body: body is not valid JSON: ")
    assert plan.in_flight == [2]


@pytest.mark.parametrize("shape_ok", [True, False])
def test_a_body_that_is_not_utf8_text_dies_alone(shape_ok: bool) -> None:
    # A lone surrogate cannot be encoded to UTF-8 (PostgreSQL never returns one): sent as
    # stored, parsed or not, such a body could not be written to the request.
    text = '{"type": "track", "userId": "c1", "event": "e", "properties": {"s": "\ud800"}}'
    rows = [raw(1, "track", text), row(2, "track", track_body(2))]
    rows = [dataclasses.replace(r, shape_ok=shape_ok) for r in rows]
    plan = plan_claim(["c1"], rows, route)
    assert plan.dead == {1: "invalid message body: body is not valid UTF-8 text"}
    assert plan.in_flight == [2]


def test_identifies_whose_merge_cannot_be_written_as_json_go_out_as_stored() -> None:
    # Each identify is valid as stored, but their merge would carry inf, which JSON cannot
    # write (and jsonb would refuse on the claim's write of the merged body): no merge, each
    # goes out exactly as stored, none dead.
    rows = [
        raw(1, "identify", stored_identify(1, f'{{"big": {HUGE_DECIMAL}}}')),
        row(2, "track", track_body(2)),
        row(3, "identify", identify_body(3, plan="pro")),
    ]
    assert json.loads(rows[0].body_text)["traits"]["big"] == float("inf")
    plan = plan_claim(["c1"], rows, route)
    assert plan.dead == {}
    assert plan.coalesced == {} and plan.rewritten == {}
    assert plan.in_flight == [1, 2, 3]
    assert [i.encoded for i in items(plan)] == [r.body_text.encode() for r in rows]
    assert [i.size for i in items(plan)] == [text_size(r.body_text) for r in rows]


def test_a_merge_nested_too_deep_to_write_back_never_escapes_the_planner() -> None:
    # Python's parser and encoder stop at the same recursion limit, but the merge is encoded
    # from deeper in the stack than the body was parsed: near the limit, a body that parsed
    # cannot be written back. Across the depths around it, every row lands in one place: the
    # merge, the identifies as stored, or dead for its depth; never an exception.
    limit = sys.getrecursionlimit()
    seen: set[str] = set()
    # Wide enough for any stack depth the test runner starts plan_claim at.
    for depth in range(limit - 400, limit + 10):
        rows = [
            raw(1, "identify", stored_identify(1, f'{{"deep": {nested(depth)}}}')),
            row(2, "track", track_body(2)),
            row(3, "identify", identify_body(3, plan="pro")),
        ]
        plan = plan_claim(["c1"], rows, route)
        assert sorted([*plan.in_flight, *plan.coalesced, *plan.dead]) == [1, 2, 3], depth
        if plan.dead:
            assert set(plan.dead) == {1}
            assert "levels deep" in plan.dead[1]
            seen.add("dead")
        elif plan.coalesced:
            assert plan.coalesced == {3: 1}
            assert json.loads(plan.rewritten[1])["traits"]["plan"] == "pro"
            seen.add("merged")
        else:
            assert plan.rewritten == {}
            assert [i.encoded for i in items(plan)] == [r.body_text.encode() for r in rows]
            seen.add("as stored")
    assert {"merged", "dead"} <= seen, seen
    if sys.version_info < (3, 12):
        # Python frames and the json module's C recursion share one count before 3.12, so
        # some depth parses and then fails to encode: the fallback is exercised.
        assert "as stored" in seen, seen


def test_body_problem_never_recurses_into_a_field_it_reports() -> None:
    # A value parsed near the recursion limit cannot be repr()'d: the reason describes it
    # without walking it.
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    for field, body in [
        ("type", {"type": deep, "userId": "c1"}),
        ("timestamp", {"type": "track", "userId": "c1", "event": "e", "timestamp": deep}),
    ]:
        reason = body_problem("track", body)
        assert reason is not None and f"'{field}'" in reason and "array" in reason, reason
        assert len(reason) < 150


# --- the partition property -------------------------------------------------------------------

POISONS: list[tuple[str, Any]] = [
    ("identify", {"type": "identify", "userId": "x", "traits": [1]}),
    ("identify", {"type": "track", "userId": "x", "event": "e"}),
    ("track", {"type": "track", "userId": "x"}),
    ("track", {"type": "track", "userId": "x", "event": "e", "properties": "p"}),
    ("track", {"type": "track", "event": "e"}),
    ("track", {"type": "track", "userId": "x", "event": "e", "timestamp": "soon"}),
    ("identify", ["identify"]),
    ("track", None),
]

RUN_ROW = st.tuples(
    st.sampled_from(["identify", "track", "poison"]),
    st.integers(0, 2),
    st.integers(0, len(POISONS) - 1),
)
STOPPER = st.sampled_from([None, "held", "in_flight", "not_due", "other_project"])
CUSTOMER = st.tuples(st.lists(RUN_ROW, max_size=8), STOPPER, st.booleans())


def build_customer(
    customer: str,
    spec: tuple[list[tuple[str, int, int]], str | None, bool],
    next_id: int,
) -> tuple[list[ClaimedRow], list[ClaimedRow], set[int]]:
    """A customer's rows: the run, the rows after it (stopper and one more), the poison ids."""
    run_spec, stopper, held = spec
    project = "p_held" if held else None
    run: list[ClaimedRow] = []
    poison: set[int] = set()
    for kind, attempts, which in run_spec:
        i = next_id
        next_id += 1
        state = "retrying" if attempts else "pending"
        if kind == "poison":
            kind, body = POISONS[which]
            poison.add(i)
        else:
            body = identify_body(i, customer) if kind == "identify" else track_body(i, customer)
        run.append(
            row(i, kind, body, customer=customer, attempts=attempts, state=state, project=project)
        )
    after: list[ClaimedRow] = []
    if stopper == "other_project" and not run:
        stopper = None  # another project's row first simply starts the run
    if stopper is not None:
        options: dict[str, dict[str, Any]] = {
            "held": {"state": "held"},
            "in_flight": {"state": "in_flight"},
            "not_due": {"state": "retrying", "attempts": 1, "due": False},
            "other_project": {"project": "p_other" if held else "p2"},
        }
        kw: dict[str, Any] = {"project": project, **options[stopper]}
        after.append(row(next_id, "track", track_body(next_id, customer), customer=customer, **kw))
        after.append(
            row(next_id + 1, "track", track_body(next_id + 1, customer), customer=customer)
        )
    return run, after, poison


@given(
    customers=st.lists(CUSTOMER, min_size=1, max_size=3),
    order=st.randoms(use_true_random=False),
)
def test_every_claimed_row_lands_in_exactly_one_place(
    customers: list[tuple[list[tuple[str, int, int]], str | None, bool]], order: Any
) -> None:
    all_rows: list[ClaimedRow] = []
    runs: dict[str, tuple[list[ClaimedRow], list[ClaimedRow], set[int], bool]] = {}
    next_id = 1
    for n, spec in enumerate(customers):
        name = f"c{n}"
        run, after, poison = build_customer(name, spec, next_id)
        next_id += len(run) + len(after) + 1
        runs[name] = (run, after, poison, spec[2])
        all_rows += run + after
    order.shuffle(all_rows)
    heads = list(runs)

    plan = plan_claim(heads, all_rows, route)

    held_ids = [i for ids in plan.held.values() for i in ids]
    places = [*plan.in_flight, *plan.coalesced, *plan.dead, *held_ids]
    assert len(places) == len(set(places)), "a row is in two places"
    run_ids = {r.id for run, _, _, _ in runs.values() for r in run}
    assert set(places) == run_ids
    assert plan.claimed == len(run_ids)
    every_item = [i for unit in plan.work.values() for i in unit.items]
    assert sorted(i.row_id for i in every_item) == sorted(plan.in_flight)
    assert set(plan.rewritten) <= set(plan.in_flight)

    for name, (run, _after, poison, held) in runs.items():
        ids = [r.id for r in run]
        if held:
            assert all(i in plan.held[HELD_REASON] for i in ids)
            continue
        for i in poison:
            assert plan.dead[i].startswith("invalid message body: ")
        good = [r for r in run if r.id not in poison]
        mine = [i.row_id for i in every_item if i.customer_key == name]
        assert mine == sorted(mine), "sent out of write order"
        last_attempted = max((n for n, r in enumerate(good) if r.attempts > 0), default=-1)
        fresh = [r.id for r in good[last_attempted + 1 :] if r.kind == "identify"]
        expected = {i: fresh[0] for i in fresh[1:]} if len(fresh) > 1 else {}
        got = {i: into for i, into in plan.coalesced.items() if i in ids}
        assert got == expected
        assert mine == [r.id for r in good if r.id not in expected]
        for into in got.values():
            assert into in plan.in_flight


# --- the claim query's fast shape check agrees with body_problem ---------------------------

# jsonb cannot hold a NUL character (the mapping rejects it before any SQL).
# UTF-8 characters only: PostgreSQL refuses a lone surrogate (\ud800) in JSON, so a body with
# one can never be stored, and a key with one failed the insert, not the check under test.
_keys = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=3)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["", "x", "track"]),
    lambda inner: st.lists(inner, max_size=2) | st.dictionaries(_keys, inner, max_size=2),
    max_leaves=4,
)
_bodies = st.one_of(
    _json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["track", "identify", 1]),
            "userId": st.sampled_from(["c1", "", 7]),
            "event": st.sampled_from(["page.view", "", None]),
            "properties": _json_values,
            "messageId": st.sampled_from(["m1", 3]),
            "timestamp": st.sampled_from(
                [
                    "2026-11-28T10:00:00.000Z",
                    "2026-11-28T10:00:00+02:00",
                    "2026-11-28T10:00:00",
                    "2026-11-28",
                    "2026-13-45T99:99:99Z",
                    "yesterday",
                    5,
                ]
            ),
        },
    ),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=_bodies)
def test_a_track_the_database_passes_is_one_body_problem_passes(dsn: str, body: Any) -> None:
    # The fast path sends a track the claim query calls shape_ok without parsing it in Python:
    # it must never pass a body the planner would have declared dead.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,"
            " body, occurred_at) VALUES ('m', 'e', 'track', 'c', 'x', %s, now())",
            (Jsonb(body),),
        )
        row = conn.execute(
            q.OUTBOX_CLAIM_FOLLOWERS,
            {"head_ids": [0], "customer_keys": ["c"], "per_customer": 10, "floor": "-infinity"},
        ).fetchone()
        conn.rollback()
    assert row is not None
    if ClaimedRow(*row).shape_ok:
        assert body_problem("track", body) is None, body


_texts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=8)
_sized_values = st.recursive(
    st.none() | st.booleans() | st.integers() | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=10,
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=st.dictionaries(_texts, _sized_values, max_size=4))
def test_the_size_of_jsonb_text_is_json_dumps_length_of_its_value(dsn: str, body: Any) -> None:
    # The planner measures a stored body from jsonb's text, without parsing it: the count must
    # be exactly what json.dumps (ASCII escapes, ", " and ": ") makes of the same value.
    with psycopg.connect(dsn) as conn:
        stored = conn.execute("SELECT %s::jsonb::text", (Jsonb(body),)).fetchone()
    assert stored is not None
    assert text_size(stored[0]) == len(json.dumps(json.loads(stored[0]))) == len(json.dumps(body))
