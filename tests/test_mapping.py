"""AppFunnel event -> Customer.io message mapping (pure; no database, no network)."""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.errors import InvalidEvent
from relay.limits import MAX_CUSTOMER_KEY_BYTES, MAX_EVENT_ID_BYTES, MAX_PROJECT_ID_BYTES
from relay.mapping import (
    EVENT_TYPES,
    MAX_DEPTH,
    MAX_MESSAGE_BYTES,
    MESSAGE_ID_NAMESPACE,
    Customer,
    Event,
    MappingConfig,
    OutboxMessage,
    Subscription,
    format_timestamp,
    is_anonymous,
    map_event,
    map_event_explained,
    parse_event,
)
from tests.relay_helpers import OPTIONAL_CUSTOMER_STRINGS

NUL_REASON = "contains a NUL character, which PostgreSQL cannot store"

FULL_CUSTOMER: dict[str, Any] = {
    "id": "cus_42",
    "email": "ada@example.com",
    "name": "Ada",
    "date_of_birth": "1990-01-01",
    "gender": "female",
    "country": "GB",
    "city": "London",
    "state": None,
    "project_id": "prj_1",
    "first_campaign_slug": "spring",
    "campaign_base_url": "https://funnel.example/spring",
    "marketing_consent": True,
    "created_at": 1764316800,
    "last_session_id": "ses_9",
    "funnel_data": {"goal": "sleep", "answers": [1, 2, {"q": None}]},
    "subscriptions": [
        {
            "id": "sub_1",
            "status": "active",
            "priceId": "price_1",
            "currentPeriodStart": "2026-11-28T10:00:00Z",
            "currentPeriodEnd": "2026-12-28T10:00:00Z",
            "createdAt": "2026-11-28T10:00:00Z",
        },
        {"id": "sub_2", "status": "canceled", "priceId": None, "plan": "legacy"},
    ],
    "favourite_colour": "green",
}

# What FULL_CUSTOMER becomes: `state` is null and so omitted; the unknown key is ignored.
FULL_TRAITS: dict[str, Any] = {
    "email": "ada@example.com",
    "name": "Ada",
    "date_of_birth": "1990-01-01",
    "gender": "female",
    "country": "GB",
    "city": "London",
    "project_id": "prj_1",
    "first_campaign_slug": "spring",
    "campaign_base_url": "https://funnel.example/spring",
    "marketing_consent": True,
    "created_at": 1764316800,
    "last_session_id": "ses_9",
    "funnelData": {"goal": "sleep", "answers": [1, 2, {"q": None}]},
}

SUBSCRIPTION_TRAITS: dict[str, Any] = {
    "has_active_subscription": True,
    "active_subscription_count": 1,
    "subscriptions": [
        {
            "id": "sub_1",
            "status": "active",
            "priceId": "price_1",
            "currentPeriodStart": "2026-11-28T10:00:00Z",
            "currentPeriodEnd": "2026-12-28T10:00:00Z",
            "createdAt": "2026-11-28T10:00:00Z",
        },
        {"id": "sub_2", "status": "canceled", "plan": "legacy"},
    ],
}


def make_event(event_type: str = "purchase.complete", **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "id": "evt_1",
        "type": event_type,
        "occurred_at": "2026-11-28T10:00:00Z",
        "customer": copy.deepcopy(FULL_CUSTOMER),
        "properties": {"amount": 4999, "currency": "USD"},
    }
    event.update(overrides)
    return event


def with_customer(**fields: Any) -> dict[str, Any]:
    event = make_event()
    event["customer"].update(fields)
    return event


def sdk_encoded(body: Any) -> bytes:
    """``body`` as Customer.io's SDK writes (and measures) it: ``json.dumps`` defaults."""
    return json.dumps(body).encode()


# ----------------------------------------------------------------- event by event


@pytest.mark.parametrize("event_type", EVENT_TYPES)
def test_each_event_type_is_identify_then_track_under_its_own_name(event_type: str) -> None:
    messages = map_event(make_event(event_type))

    assert [m.kind for m in messages] == ["identify", "track"]
    identify, track = messages
    expected_traits = dict(FULL_TRAITS)
    if event_type == "subscription.created":
        expected_traits.update(SUBSCRIPTION_TRAITS)
    assert identify.body == {
        "type": "identify",
        "userId": "cus_42",
        "traits": expected_traits,
        "timestamp": "2026-11-28T10:00:00.000Z",
        "messageId": str(uuid.uuid5(MESSAGE_ID_NAMESPACE, "evt_1:identify")),
    }
    assert track.body == {
        "type": "track",
        "userId": "cus_42",
        "event": event_type,
        "properties": {"amount": 4999, "currency": "USD"},
        "timestamp": "2026-11-28T10:00:00.000Z",
        "messageId": str(uuid.uuid5(MESSAGE_ID_NAMESPACE, "evt_1:track")),
    }
    for message in messages:
        assert message.customer_key == "cus_42"
        assert message.project_id == "prj_1"
        assert message.event_id == "evt_1"
        assert message.event_type == event_type
        assert message.occurred_at == datetime(2026, 11, 28, 10, tzinfo=UTC)
        assert message.message_id == message.body["messageId"]
        assert message.encoded == sdk_encoded(message.body)
        assert json.loads(message.encoded) == message.body


def test_encoded_bytes_are_exact_and_keep_trait_order() -> None:
    event = make_event("user.registered", properties=None)
    event["customer"] = {"id": "cus_1", "email": "bé@example.com", "name": "Zoë", "city": None}

    identify, track = map_event(event)

    # As Customer.io's SDK writes a message, so its length is the size Customer.io counts:
    # non-ASCII as \u escapes, a space after every ':' and ','.
    assert identify.encoded == (
        b'{"type": "identify", "userId": "cus_1", "traits": {"email": "b\\u00e9@example.com", '
        b'"name": "Zo\\u00eb"}, "timestamp": "2026-11-28T10:00:00.000Z", '
        b'"messageId": "c4090589-00a3-51b8-a62c-76d1751abf22"}'
    )
    assert track.encoded == (
        b'{"type": "track", "userId": "cus_1", "event": "user.registered", "properties": {}, '
        b'"timestamp": "2026-11-28T10:00:00.000Z", '
        b'"messageId": "3fcfddbd-a781-5a3d-962d-8a0e8cfbb530"}'
    )


def test_absent_and_null_customer_fields_are_omitted_from_traits() -> None:
    event = make_event()
    event["customer"] = {
        "id": "cus_1",
        "email": "ada@example.com",
        "name": None,
        "date_of_birth": None,
        "gender": None,
        "country": None,
        "city": None,
        "state": None,
        "project_id": None,
        "first_campaign_slug": None,
        "campaign_base_url": None,
        "marketing_consent": None,
        "created_at": None,
        "last_session_id": None,
        "funnel_data": None,
        "subscriptions": None,
    }

    identify, track = map_event(event)

    assert identify.body["traits"] == {"email": "ada@example.com"}
    assert identify.project_id is None
    assert track.project_id is None
    assert b"null" not in identify.encoded


def test_false_consent_and_empty_values_are_sent_not_omitted() -> None:
    event = with_customer(marketing_consent=False, name="", funnel_data={}, created_at=0)

    identify, _ = map_event(event)

    traits = identify.body["traits"]
    assert traits["marketing_consent"] is False
    assert traits["name"] == ""
    assert traits["funnelData"] == {}
    assert traits["created_at"] == 0


@pytest.mark.parametrize("other", ["<missing>", None])
def test_funnel_data_may_be_spelled_as_the_spec_spells_the_trait(other: Any) -> None:
    event = make_event()
    del event["customer"]["funnel_data"]
    event["customer"]["funnelData"] = {"goal": "focus", "answers": ["a"]}
    if other != "<missing>":
        event["customer"]["funnel_data"] = other

    identify, _ = map_event(event)

    assert identify.body["traits"]["funnelData"] == {"goal": "focus", "answers": ["a"]}
    assert parse_event(event).customer.funnel_data == {"goal": "focus", "answers": ["a"]}


def test_funnel_data_given_under_both_spellings_is_refused_as_ambiguous() -> None:
    # Even when equal: which one wins is not the relay's guess to make.
    event = with_customer(funnelData={"goal": "sleep"})

    with pytest.raises(InvalidEvent) as raised:
        map_event(event)
    assert raised.value.field == "customer.funnelData"
    assert "customer.funnel_data" in raised.value.reason


def test_funnel_data_camel_case_is_validated_under_its_own_name() -> None:
    event = make_event()
    del event["customer"]["funnel_data"]
    event["customer"]["funnelData"] = {"goal": math.nan}

    with pytest.raises(InvalidEvent) as raised:
        parse_event(event)
    assert raised.value.field == "customer.funnelData.goal"


def test_properties_absent_or_null_become_empty_object() -> None:
    missing = make_event()
    del missing["properties"]
    for event in (missing, make_event(properties=None), make_event(properties={})):
        _, track = map_event(event)
        assert track.body["properties"] == {}


# ------------------------------------------------------------- subscription traits


def subscriptions_event(statuses: list[str]) -> dict[str, Any]:
    return with_customer(
        subscriptions=[{"id": f"sub_{i}", "status": s} for i, s in enumerate(statuses)]
    )


def test_subscription_traits_count_default_active_statuses() -> None:
    event = subscriptions_event(["active", "trialing", "past_due", "canceled"])
    event["type"] = "subscription.created"

    identify, _ = map_event(event)

    traits = identify.body["traits"]
    assert traits["has_active_subscription"] is True
    assert traits["active_subscription_count"] == 2
    assert traits["subscriptions"] == [
        {"id": "sub_0", "status": "active"},
        {"id": "sub_1", "status": "trialing"},
        {"id": "sub_2", "status": "past_due"},
        {"id": "sub_3", "status": "canceled"},
    ]


def test_subscription_traits_follow_custom_active_statuses() -> None:
    event = subscriptions_event(["active", "trialing", "past_due", "canceled"])
    event["type"] = "subscription.created"
    config = MappingConfig(active_statuses=frozenset({"past_due", "canceled"}))

    identify, _ = map_event(event, config)

    assert identify.body["traits"]["active_subscription_count"] == 2
    assert identify.body["traits"]["has_active_subscription"] is True

    only_trialing = MappingConfig(active_statuses=frozenset({"active"}))
    event = subscriptions_event(["trialing"])
    event["type"] = "subscription.created"
    identify, _ = map_event(event, only_trialing)
    assert identify.body["traits"]["has_active_subscription"] is False
    assert identify.body["traits"]["active_subscription_count"] == 0


def test_empty_subscription_list_says_none_active() -> None:
    event = subscriptions_event([])
    event["type"] = "subscription.created"

    identify, _ = map_event(event)

    traits = identify.body["traits"]
    assert traits["has_active_subscription"] is False
    assert traits["active_subscription_count"] == 0
    assert traits["subscriptions"] == []


def test_missing_subscription_list_sends_no_subscription_traits() -> None:
    # Unknown is not "none": sending false would overwrite what Customer.io knows.
    event = with_customer(subscriptions=None)
    event["type"] = "subscription.created"

    identify, _ = map_event(event)

    assert not {"has_active_subscription", "active_subscription_count", "subscriptions"} & set(
        identify.body["traits"]
    )


def test_subscription_fields_pass_through_as_any_json_value() -> None:
    # The spec names the fields but not their types: a number, a boolean or an object is sent
    # as given, extra keys included, and never costs the event its track.
    subscription = {
        "id": 17,
        "status": "active",
        "priceId": {"lookup": "gold", "amounts": [999, 9.99]},
        "currentPeriodStart": 1764316800,
        "currentPeriodEnd": 1766908800.5,
        "createdAt": "2026-11-28T10:00:00Z",
        "cancelAtPeriodEnd": False,
        "items": [{"sku": "ünïcode", "qty": 2}],
    }
    event = with_customer(subscriptions=[subscription])
    event["type"] = "subscription.created"

    identify, track = map_event(event)

    assert identify.body["traits"]["subscriptions"] == [subscription]
    assert identify.body["traits"]["active_subscription_count"] == 1
    assert track.body["event"] == "subscription.created"


def test_null_subscription_fields_are_omitted_like_null_traits() -> None:
    event = with_customer(
        subscriptions=[{"id": "sub_1", "status": None, "priceId": None, "trial": None, "n": 0}]
    )
    event["type"] = "subscription.created"

    identify, _ = map_event(event)

    assert identify.body["traits"]["subscriptions"] == [{"id": "sub_1", "n": 0}]


@pytest.mark.parametrize(
    "status",
    ["<missing>", None, 1, True, ["active"], {"name": "active"}, "Active", "canceled"],
)
def test_a_status_that_is_not_an_active_status_string_counts_as_not_active(status: Any) -> None:
    inactive = {"id": "sub_2"} if status == "<missing>" else {"id": "sub_2", "status": status}
    event = with_customer(subscriptions=[{"id": "sub_1", "status": "trialing"}, inactive])
    event["type"] = "subscription.created"

    identify, _ = map_event(event)

    traits = identify.body["traits"]
    assert traits["active_subscription_count"] == 1
    assert traits["has_active_subscription"] is True
    assert traits["subscriptions"][1] == ({k: v for k, v in inactive.items() if v is not None})


def test_typed_subscription_carries_extra_fields_and_any_values() -> None:
    typed = typed_event()
    extra = Subscription(
        id="sub_3",
        status="active",
        current_period_start=1764316800,
        extra={"cancelAtPeriodEnd": False},
    )
    typed = Event(
        id=typed.id,
        type=typed.type,
        occurred_at=typed.occurred_at,
        customer=Customer(id="cus_42", email="ada@example.com", subscriptions=(extra,)),
    )
    as_dict = make_event("subscription.created")
    as_dict["customer"] = {
        "id": "cus_42",
        "email": "ada@example.com",
        "subscriptions": [
            {
                "id": "sub_3",
                "status": "active",
                "currentPeriodStart": 1764316800,
                "cancelAtPeriodEnd": False,
            }
        ],
    }
    as_dict["properties"] = {}

    assert map_event(typed) == map_event(as_dict)
    assert parse_event(as_dict) == parse_event(typed)


def test_a_typed_subscription_field_given_twice_is_refused() -> None:
    twice = Subscription(id="sub_1", status="active", price_id="p1", extra={"priceId": "p2"})
    event = Event(
        id="evt_1",
        type="subscription.created",
        occurred_at=datetime(2026, 11, 28, 10, tzinfo=UTC),
        customer=Customer(id="cus_42", email="ada@example.com", subscriptions=(twice,)),
    )

    with pytest.raises(InvalidEvent) as raised:
        parse_event(event)
    assert raised.value.field == "customer.subscriptions[0].priceId"
    assert "price_id" in raised.value.reason and "extra" in raised.value.reason


@pytest.mark.parametrize("event_type", [t for t in EVENT_TYPES if t != "subscription.created"])
def test_subscription_traits_only_on_subscription_created(event_type: str) -> None:
    identify, _ = map_event(make_event(event_type))

    assert identify.body["traits"] == FULL_TRAITS


# ------------------------------------------------------------------ configuration


def test_event_names_rename_the_track_only() -> None:
    config = MappingConfig(event_names={"purchase.complete": "Order Completed"})

    identify, track = map_event(make_event("purchase.complete"), config)
    _, other = map_event(make_event("checkout.start"), config)

    assert track.body["event"] == "Order Completed"
    assert track.event_type == "purchase.complete"
    assert identify.event_type == "purchase.complete"
    assert other.body["event"] == "checkout.start"


def test_event_names_none_drops_the_type_entirely() -> None:
    config = MappingConfig(event_names={"page.view": None})

    assert map_event_explained(make_event("page.view"), config) == ([], "dropped")
    assert map_event(make_event("page.view"), config) == []
    assert len(map_event(make_event("checkout.start"), config)) == 2


def test_dropped_wins_over_anonymous() -> None:
    event = make_event("page.view")
    del event["customer"]["email"]
    config = MappingConfig(event_names={"page.view": None})

    assert map_event_explained(event, config) == ([], "dropped")


def test_user_key_email_uses_the_email_as_user_id() -> None:
    config = MappingConfig(user_key="email")

    messages = map_event(make_event(), config)

    for message in messages:
        assert message.body["userId"] == "ada@example.com"
        assert message.customer_key == "ada@example.com"


def test_config_copies_its_inputs() -> None:
    names: dict[str, str | None] = {"page.view": "Viewed"}
    statuses = {"active"}
    config = MappingConfig(event_names=names, active_statuses=statuses)  # type: ignore[arg-type]
    names["page.view"] = None
    statuses.add("trialing")

    assert config.event_names == {"page.view": "Viewed"}
    assert config.active_statuses == frozenset({"active"})
    assert isinstance(config.active_statuses, frozenset)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"user_key": "phone"}, "user_key"),
        ({"active_statuses": "active"}, "active_statuses"),
        ({"active_statuses": frozenset({1})}, "active_statuses"),
        ({"event_names": [("page.view", None)]}, "event_names"),
        ({"event_names": {"order.shipped": "x"}}, "event_names"),
        ({"event_names": {"page.view": ""}}, "event_names"),
        ({"event_names": {"page.view": 3}}, "event_names"),
        ({"event_names": {"page.view": "a\x00b"}}, "event_names"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MappingConfig(**kwargs)


# ---------------------------------------------------------------------- anonymous


@pytest.mark.parametrize("email", ["<missing>", None, ""])
def test_customer_without_email_is_anonymous_and_sends_nothing(email: str | None) -> None:
    event = make_event("page.view")
    if email == "<missing>":
        del event["customer"]["email"]
    else:
        event["customer"]["email"] = email

    assert map_event_explained(event) == ([], "anonymous")
    assert map_event(event) == []
    assert is_anonymous(event)
    assert parse_event(event).customer.email is None


def test_identified_customer_is_not_anonymous() -> None:
    messages, reason = map_event_explained(make_event())

    assert reason is None
    assert len(messages) == 2
    assert not is_anonymous(make_event())


def test_anonymous_events_are_still_validated() -> None:
    event = make_event("page.view", occurred_at="2026-11-28T10:00:00")
    del event["customer"]["email"]

    with pytest.raises(InvalidEvent) as raised:
        map_event(event)
    assert raised.value.field == "occurred_at"


# ---------------------------------------------------------------------- message ids


def test_message_ids_are_deterministic_and_per_kind() -> None:
    first = map_event(make_event())
    again = map_event(make_event())
    other = map_event(make_event(id="evt_2"))

    assert [m.message_id for m in first] == [m.message_id for m in again]
    assert first == again
    assert first[0].message_id != first[1].message_id
    assert {m.message_id for m in first}.isdisjoint(m.message_id for m in other)
    # Pinned: a change here would re-id every event already recorded.
    assert [m.message_id for m in first] == [
        "c4090589-00a3-51b8-a62c-76d1751abf22",
        "3fcfddbd-a781-5a3d-962d-8a0e8cfbb530",
    ]


def test_message_id_does_not_depend_on_content_or_config() -> None:
    changed = make_event(properties={"amount": 1})
    config = MappingConfig(user_key="email", event_names={"purchase.complete": "Paid"})

    assert [m.message_id for m in map_event(changed, config)] == [
        m.message_id for m in map_event(make_event())
    ]


# ------------------------------------------------------------------------ timestamps


@pytest.mark.parametrize(
    ("occurred_at", "timestamp", "utc"),
    [
        ("2026-11-28T10:00:00Z", "2026-11-28T10:00:00.000Z", datetime(2026, 11, 28, 10)),
        (
            "2026-11-28T12:00:00.123456+02:00",
            "2026-11-28T10:00:00.123Z",
            datetime(2026, 11, 28, 10, 0, 0, 123456),
        ),
        (
            "2026-01-01T01:30:00.9999+02:00",
            "2025-12-31T23:30:00.999Z",
            datetime(2025, 12, 31, 23, 30, 0, 999900),
        ),
        (
            datetime(2026, 11, 28, 5, 0, tzinfo=timezone(timedelta(hours=-5))),
            "2026-11-28T10:00:00.000Z",
            datetime(2026, 11, 28, 10),
        ),
    ],
)
def test_timestamp_is_utc_with_milliseconds_and_z(
    occurred_at: str | datetime, timestamp: str, utc: datetime
) -> None:
    messages = map_event(make_event(occurred_at=occurred_at))

    for message in messages:
        assert message.body["timestamp"] == timestamp
        assert message.occurred_at == utc.replace(tzinfo=UTC)
        assert message.occurred_at.utcoffset() == timedelta(0)


def test_format_timestamp_pads_and_rejects_naive() -> None:
    assert format_timestamp(datetime(999, 1, 2, 3, 4, 5, 6000, tzinfo=UTC)) == (
        "0999-01-02T03:04:05.006Z"
    )
    with pytest.raises(ValueError):
        format_timestamp(datetime(2026, 1, 1))


@pytest.mark.parametrize(
    ("created_at", "seconds"),
    [
        (1764316800, 1764316800),
        (1764316800.9, 1764316800),
        ("2025-11-28T08:00:00Z", 1764316800),
        ("2025-11-28T10:00:00+02:00", 1764316800),
    ],
)
def test_created_at_becomes_integer_unix_seconds(created_at: object, seconds: int) -> None:
    identify, _ = map_event(with_customer(created_at=created_at))

    assert identify.body["traits"]["created_at"] == seconds
    assert type(identify.body["traits"]["created_at"]) is int


# ---------------------------------------------------------------------- typed input


def typed_event() -> Event:
    return Event(
        id="evt_1",
        type="subscription.created",
        occurred_at=datetime(2026, 11, 28, 10, tzinfo=UTC),
        customer=Customer(
            id="cus_42",
            email="ada@example.com",
            name="Ada",
            date_of_birth="1990-01-01",
            gender="female",
            country="GB",
            city="London",
            state=None,
            project_id="prj_1",
            first_campaign_slug="spring",
            campaign_base_url="https://funnel.example/spring",
            marketing_consent=True,
            created_at=1764316800,
            last_session_id="ses_9",
            funnel_data={"goal": "sleep", "answers": [1, 2, {"q": None}]},
            subscriptions=(
                Subscription(
                    id="sub_1",
                    status="active",
                    price_id="price_1",
                    current_period_start="2026-11-28T10:00:00Z",
                    current_period_end="2026-12-28T10:00:00Z",
                    created_at="2026-11-28T10:00:00Z",
                ),
                Subscription(id="sub_2", status="canceled", extra={"plan": "legacy"}),
            ),
        ),
        properties={"amount": 4999, "currency": "USD"},
    )


def test_typed_event_maps_exactly_like_the_dict() -> None:
    from_dict = map_event(make_event("subscription.created"))
    from_typed = map_event(typed_event())

    assert from_typed == from_dict
    assert [m.encoded for m in from_typed] == [m.encoded for m in from_dict]


def test_parse_event_of_dict_equals_the_typed_event() -> None:
    assert parse_event(make_event("subscription.created")) == typed_event()
    assert parse_event(typed_event()) == typed_event()


def test_typed_event_is_validated_too() -> None:
    bad = Customer(id="cus_1", email="ada@example.com", marketing_consent="yes")  # type: ignore[arg-type]
    event = Event(
        id="evt_1",
        type="page.view",
        occurred_at=datetime(2026, 1, 1, tzinfo=UTC),
        customer=bad,
    )

    with pytest.raises(InvalidEvent) as raised:
        map_event(event)
    assert raised.value.field == "customer.marketing_consent"

    naive = Event(
        id="evt_1",
        type="page.view",
        occurred_at=datetime(2026, 1, 1),
        customer=Customer(id="cus_1"),
    )
    with pytest.raises(InvalidEvent, match="timezone is required"):
        parse_event(naive)


def test_parsed_event_and_messages_do_not_share_the_callers_objects() -> None:
    raw = make_event()
    parsed = parse_event(raw)
    identify, track = map_event(raw)
    raw["properties"]["amount"] = 1
    raw["customer"]["funnel_data"]["goal"] = "focus"

    assert parsed.properties["amount"] == 4999
    assert parsed.customer.funnel_data == FULL_TRAITS["funnelData"]
    assert track.body["properties"]["amount"] == 4999
    assert identify.body["traits"]["funnelData"]["goal"] == "sleep"


def test_tuples_in_free_form_values_become_lists() -> None:
    _, track = map_event(make_event(properties={"items": ("a", ("b",))}))

    assert track.body["properties"] == {"items": ["a", ["b"]]}


# ---------------------------------------------------------------------- validation


def nested(depth: int) -> dict[str, Any]:
    """``depth`` levels of objects, the outermost one included."""
    value: dict[str, Any] = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def replace(path: tuple[str | int, ...], value: Any) -> Callable[[dict[str, Any]], Any]:
    def mutate(event: dict[str, Any]) -> dict[str, Any]:
        target: Any = event
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value
        return event

    return mutate


def remove(path: tuple[str | int, ...]) -> Callable[[dict[str, Any]], Any]:
    def mutate(event: dict[str, Any]) -> dict[str, Any]:
        target: Any = event
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]
        return event

    return mutate


INVALID_CASES: list[Any] = [
    # (case id, mutation of a valid event, field, text the reason must contain)
    ("event-list", lambda e: [e], "event", "must be an object"),
    ("event-str", lambda e: "evt", "event", "must be an object"),
    ("id-missing", remove(("id",)), "id", "required"),
    ("id-null", replace(("id",), None), "id", "required"),
    ("id-empty", replace(("id",), ""), "id", "empty"),
    ("id-int", replace(("id",), 7), "id", "string"),
    ("id-nul", replace(("id",), "evt\x00"), "id", NUL_REASON),
    ("type-missing", remove(("type",)), "type", "required"),
    ("type-int", replace(("type",), 3), "type", "string"),
    ("type-unknown", replace(("type",), "order.shipped"), "type", ", ".join(EVENT_TYPES)),
    ("type-empty", replace(("type",), ""), "type", "unknown event type"),
    ("occurred-missing", remove(("occurred_at",)), "occurred_at", "required"),
    ("occurred-int", replace(("occurred_at",), 1764316800), "occurred_at", "ISO-8601"),
    ("occurred-garbage", replace(("occurred_at",), "yesterday"), "occurred_at", "ISO-8601"),
    (
        "occurred-naive-str",
        replace(("occurred_at",), "2026-11-28T10:00:00"),
        "occurred_at",
        "timezone is required",
    ),
    (
        "occurred-naive-datetime",
        replace(("occurred_at",), datetime(2026, 11, 28, 10)),
        "occurred_at",
        "timezone is required",
    ),
    (
        "occurred-date-only",
        replace(("occurred_at",), "2026-11-28"),
        "occurred_at",
        "timezone is required",
    ),
    ("customer-missing", remove(("customer",)), "customer", "required"),
    ("customer-null", replace(("customer",), None), "customer", "object"),
    ("customer-str", replace(("customer",), "cus_42"), "customer", "object"),
    ("customer-id-missing", remove(("customer", "id")), "customer.id", "required"),
    ("customer-id-empty", replace(("customer", "id"), ""), "customer.id", "empty"),
    ("customer-id-int", replace(("customer", "id"), 42), "customer.id", "string"),
    ("email-int", replace(("customer", "email"), 42), "customer.email", "string"),
    ("email-no-at", replace(("customer", "email"), "ada.example.com"), "customer.email", "@"),
    ("email-blank", replace(("customer", "email"), "  "), "customer.email", "@"),
    *[
        (f"{name}-not-string", replace(("customer", name), ["x"]), f"customer.{name}", "string")
        for name in OPTIONAL_CUSTOMER_STRINGS
    ],
    ("name-nul", replace(("customer", "name"), "A\x00da"), "customer.name", NUL_REASON),
    (
        "consent-str",
        replace(("customer", "marketing_consent"), "yes"),
        "customer.marketing_consent",
        "boolean",
    ),
    (
        "consent-int",
        replace(("customer", "marketing_consent"), 1),
        "customer.marketing_consent",
        "boolean",
    ),
    ("created-bool", replace(("customer", "created_at"), True), "customer.created_at", "bool"),
    ("created-list", replace(("customer", "created_at"), [1]), "customer.created_at", "list"),
    (
        "created-nan",
        replace(("customer", "created_at"), math.nan),
        "customer.created_at",
        "finite",
    ),
    (
        "created-garbage",
        replace(("customer", "created_at"), "last week"),
        "customer.created_at",
        "ISO-8601",
    ),
    (
        "created-naive",
        replace(("customer", "created_at"), "2025-11-28T08:00:00"),
        "customer.created_at",
        "timezone is required",
    ),
    ("funnel-list", replace(("customer", "funnel_data"), []), "customer.funnel_data", "object"),
    (
        "funnel-set",
        replace(("customer", "funnel_data"), {"goal": {"a"}}),
        "customer.funnel_data.goal",
        "set",
    ),
    (
        "funnel-nul",
        replace(("customer", "funnel_data"), {"goal": "sle\x00ep"}),
        "customer.funnel_data.goal",
        NUL_REASON,
    ),
    (
        "funnel-too-deep",
        replace(("customer", "funnel_data"), nested(MAX_DEPTH + 1)),
        "customer.funnel_data" + ".a" * MAX_DEPTH,
        f"deeper than {MAX_DEPTH} levels",
    ),
    (
        "subscriptions-object",
        replace(("customer", "subscriptions"), {}),
        "customer.subscriptions",
        "list",
    ),
    (
        "subscription-str",
        replace(("customer", "subscriptions"), ["sub_1"]),
        "customer.subscriptions[0]",
        "object",
    ),
    (
        "subscription-key-int",
        replace(("customer", "subscriptions", 1), {"id": "sub_2", 3: "x"}),
        "customer.subscriptions[1][3]",
        "object keys must be strings",
    ),
    (
        "subscription-extra-nan",
        replace(("customer", "subscriptions", 1, "plan"), {"tier": math.nan}),
        "customer.subscriptions[1].plan.tier",
        "nan",
    ),
    (
        "subscription-start-set",
        replace(("customer", "subscriptions", 0, "currentPeriodStart"), {1764316800}),
        "customer.subscriptions[0].currentPeriodStart",
        "set",
    ),
    (
        "subscription-too-deep",
        replace(("customer", "subscriptions", 0, "meta"), nested(MAX_DEPTH - 1)),
        "customer.subscriptions[0].meta" + ".a" * (MAX_DEPTH - 2),
        f"deeper than {MAX_DEPTH} levels",
    ),
    (
        "funnel-camel-list",
        lambda e: {**e, "customer": {**e["customer"], "funnel_data": None, "funnelData": [1]}},
        "customer.funnelData",
        "object",
    ),
    (
        "id-too-long",
        replace(("id",), "é" * (MAX_EVENT_ID_BYTES // 2) + "x"),
        "id",
        f"is {MAX_EVENT_ID_BYTES + 1} bytes in UTF-8, over the {MAX_EVENT_ID_BYTES}-byte limit",
    ),
    (
        "customer-id-too-long",
        replace(("customer", "id"), "🔥" * (MAX_CUSTOMER_KEY_BYTES // 4) + "x"),
        "customer.id",
        f"is {MAX_CUSTOMER_KEY_BYTES + 1} bytes in UTF-8, over the {MAX_CUSTOMER_KEY_BYTES}-byte",
    ),
    (
        "email-too-long",
        replace(("customer", "email"), "a" * (MAX_CUSTOMER_KEY_BYTES - 11) + "@example.com"),
        "customer.email",
        f"over the {MAX_CUSTOMER_KEY_BYTES}-byte limit",
    ),
    (
        "project-too-long",
        replace(("customer", "project_id"), "p" * (MAX_PROJECT_ID_BYTES + 1)),
        "customer.project_id",
        f"over the {MAX_PROJECT_ID_BYTES}-byte limit",
    ),
    (
        "subscription-nul",
        replace(("customer", "subscriptions", 0, "createdAt"), "\x00"),
        "customer.subscriptions[0].createdAt",
        NUL_REASON,
    ),
    ("properties-list", replace(("properties",), [1]), "properties", "object"),
    ("properties-str", replace(("properties",), "x"), "properties", "object"),
    (
        "properties-nan-in-list",
        replace(("properties",), {"items": [{"price": 1}, {"price": 2}, {"price": math.nan}]}),
        "properties.items[2].price",
        "nan",
    ),
    ("properties-inf", replace(("properties",), {"a": math.inf}), "properties.a", "inf"),
    (
        "properties-datetime",
        replace(("properties",), {"when": datetime(2026, 1, 1, tzinfo=UTC)}),
        "properties.when",
        "datetime",
    ),
    ("properties-bytes", replace(("properties",), {"raw": b"x"}), "properties.raw", "bytes"),
    ("properties-int-key", replace(("properties",), {1: "x"}), "properties[1]", "int"),
    ("properties-nul", replace(("properties",), {"a": "x\x00y"}), "properties.a", NUL_REASON),
    (
        "properties-nul-key",
        replace(("properties",), {"ok": {"a\x00": 1}}),
        'properties.ok["a\\u0000"]',
        NUL_REASON,
    ),
    (
        "properties-surrogate",
        replace(("properties",), {"a": "\ud800"}),
        "properties.a",
        "surrogate",
    ),
    (
        "properties-too-deep",
        replace(("properties",), {"x": [nested(MAX_DEPTH - 1)]}),
        "properties.x[0]" + ".a" * (MAX_DEPTH - 2),
        f"deeper than {MAX_DEPTH} levels",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "field", "reason"),
    [pytest.param(*case[1:], id=case[0]) for case in INVALID_CASES],
)
def test_invalid_events_raise_invalid_event_naming_the_field(
    mutate: Callable[[dict[str, Any]], Any], field: str, reason: str
) -> None:
    event = mutate(make_event())

    with pytest.raises(InvalidEvent) as raised:
        parse_event(event)
    assert raised.value.field == field
    assert reason in raised.value.reason
    with pytest.raises(InvalidEvent):
        map_event(event)


def test_nul_reason_is_exact() -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(make_event(properties={"a": "\x00"}))

    assert raised.value.reason == NUL_REASON
    assert str(raised.value) == f"properties.a: {NUL_REASON}"


def test_nesting_at_the_limit_is_accepted() -> None:
    _, track = map_event(make_event(properties=nested(MAX_DEPTH)))

    assert track.body["properties"] == nested(MAX_DEPTH)


def test_self_referencing_value_is_rejected_not_recursed_forever() -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop

    with pytest.raises(InvalidEvent, match="deeper than"):
        parse_event(make_event(properties=loop))


def test_unknown_customer_and_top_level_keys_are_ignored() -> None:
    event = make_event(source="web")
    event["customer"]["loyalty_tier"] = {"anything": object()}

    identify, _ = map_event(event)

    assert "loyalty_tier" not in identify.body["traits"]


def test_keys_that_are_not_identifiers_are_bracketed_in_paths() -> None:
    with pytest.raises(InvalidEvent) as raised:
        parse_event(make_event(properties={"first-name": {"x y": math.nan}}))

    assert raised.value.field == 'properties["first-name"]["x y"]'


@pytest.mark.parametrize("user_key", ["id", "email"])
def test_keys_at_their_byte_limits_are_accepted(user_key: Any) -> None:
    # Limits count UTF-8 bytes: 4-byte characters reach them with a quarter as many characters.
    customer_id = "🔥" * (MAX_CUSTOMER_KEY_BYTES // 4)
    email = "é" * ((MAX_CUSTOMER_KEY_BYTES - 12) // 2) + "@example.com"
    event = make_event(id="€" * (MAX_EVENT_ID_BYTES // 3) + "x" * (MAX_EVENT_ID_BYTES % 3))
    event["customer"].update(id=customer_id, email=email, project_id="p" * MAX_PROJECT_ID_BYTES)
    assert len(email.encode()) == MAX_CUSTOMER_KEY_BYTES
    assert len(event["id"].encode()) == MAX_EVENT_ID_BYTES

    identify, track = map_event(event, MappingConfig(user_key=user_key))

    assert identify.customer_key == (customer_id if user_key == "id" else email)
    assert track.event_id == event["id"]
    assert track.project_id == "p" * MAX_PROJECT_ID_BYTES


# ---------------------------------------------------------------------- size limit


def padded(kind: str, pad: str) -> dict[str, Any]:
    if kind == "track":
        return make_event(properties={"pad": pad})
    return with_customer(funnel_data={"pad": pad})


def sdk_size(kind: str, pad: str) -> int:
    """The message's size as Customer.io's SDK measures it: ``len(json.dumps(message))``."""
    identify, track = map_event(padded(kind, pad))
    return len(json.dumps((identify if kind == "identify" else track).body))


# (character, what it counts once json.dumps has written it with ASCII escapes)
PAD_CHARACTERS = [("x", 1), ("é", 6), ("€", 6), ("🔥", 12), ("\x7f", 6), ("\x01", 6)]


@pytest.mark.parametrize(("char", "unit"), PAD_CHARACTERS)
@pytest.mark.parametrize(("kind", "field"), [("identify", "traits"), ("track", "properties")])
def test_message_at_the_size_limit_passes_and_one_byte_over_fails(
    kind: str, field: str, char: str, unit: int
) -> None:
    room = MAX_MESSAGE_BYTES - sdk_size(kind, "")
    fill = char * (room // unit) + "x" * (room % unit)

    assert sdk_size(kind, fill) == MAX_MESSAGE_BYTES
    assert sdk_size(kind, fill[:-1]) < MAX_MESSAGE_BYTES
    with pytest.raises(InvalidEvent) as raised:
        map_event(padded(kind, fill + "x"))
    assert raised.value.field == field
    assert raised.value.reason == (
        f"{kind} message is {MAX_MESSAGE_BYTES + 1} bytes as Customer.io measures it "
        f"(JSON with non-ASCII characters as \\u escapes), over its {MAX_MESSAGE_BYTES}-byte limit"
    )


@pytest.mark.parametrize("pad", ["é" * 12_000, "é" * 5_500, "🔥" * 2_800, "\x7f" * 5_500])
def test_size_limit_counts_ascii_escapes_not_utf8_bytes(pad: str) -> None:
    # Well under 32 KB in UTF-8, over it once each character is written as \uXXXX (12 bytes
    # for the surrogate pair of an emoji): Customer.io would answer 400 and the message die.
    event = padded("track", pad)
    assert len(json.dumps(event["properties"], ensure_ascii=False).encode()) < MAX_MESSAGE_BYTES

    with pytest.raises(InvalidEvent) as raised:
        map_event(event)
    assert raised.value.field == "properties"
    assert f"over its {MAX_MESSAGE_BYTES}-byte limit" in raised.value.reason


def test_encoded_length_is_the_size_customerio_counts() -> None:
    for pad in ("", "plain", 'é€🔥\x7f\x01"\\'):
        for message in map_event(padded("track", pad)):
            assert len(message.encoded) == len(json.dumps(message.body))


def test_anonymous_events_are_not_held_to_the_size_limit() -> None:
    event = padded("track", "x" * MAX_MESSAGE_BYTES)
    del event["customer"]["email"]

    assert map_event_explained(event) == ([], "anonymous")


# ------------------------------------------------------------------------ property

TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
OPTIONAL_TEXT = st.none() | TEXT
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=20,
)
OFFSETS = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
)
INSTANTS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1), timezones=OFFSETS
)
SUBSCRIPTIONS = st.fixed_dictionaries(
    {"id": TEXT, "status": st.sampled_from(["active", "trialing", "canceled", "past_due"])},
    optional={
        "priceId": OPTIONAL_TEXT,
        "currentPeriodStart": OPTIONAL_TEXT,
        "currentPeriodEnd": OPTIONAL_TEXT,
        "createdAt": OPTIONAL_TEXT,
    },
)
CUSTOMERS = st.fixed_dictionaries(
    {
        "id": TEXT.filter(bool),
        "email": st.builds(lambda a, b: f"{a}@{b}", TEXT, TEXT),
    },
    optional={
        **{name: OPTIONAL_TEXT for name in OPTIONAL_CUSTOMER_STRINGS},
        "marketing_consent": st.none() | st.booleans(),
        "created_at": st.none()
        | st.integers(min_value=0, max_value=2**33)
        | INSTANTS.map(datetime.isoformat),
        "funnel_data": st.none() | st.dictionaries(TEXT, JSON_VALUES, max_size=4),
        "subscriptions": st.none() | st.lists(SUBSCRIPTIONS, max_size=3),
    },
)
EVENTS = st.fixed_dictionaries(
    {
        "id": TEXT.filter(bool),
        "type": st.sampled_from(EVENT_TYPES),
        "occurred_at": INSTANTS | INSTANTS.map(datetime.isoformat),
        "customer": CUSTOMERS,
    },
    optional={"properties": st.none() | st.dictionaries(TEXT, JSON_VALUES, max_size=6)},
)


@settings(max_examples=300, deadline=None)
@given(event=EVENTS, user_key=st.sampled_from(["id", "email"]))
def test_valid_events_give_json_round_tripping_identify_then_track(
    event: dict[str, Any], user_key: Any
) -> None:
    messages = map_event(event, MappingConfig(user_key=user_key))

    assert [m.kind for m in messages] == ["identify", "track"]
    identify, track = messages
    for message in messages:
        assert isinstance(message, OutboxMessage)
        assert json.loads(message.encoded) == message.body
        assert json.loads(json.dumps(message.body)) == message.body
        assert len(message.encoded) <= MAX_MESSAGE_BYTES
    assert track.body["userId"] == identify.body["userId"] == identify.customer_key
    assert track.body["timestamp"] == identify.body["timestamp"]
    assert track.body["event"] == event["type"]
    assert identify.message_id != track.message_id
    assert map_event(parse_event(event), MappingConfig(user_key=user_key)) == messages
