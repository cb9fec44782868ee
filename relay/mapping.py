"""AppFunnel events in, Customer.io Data Pipelines messages out.

Pure functions: no I/O, no clock, no randomness. The same event always yields the same
messages, byte for byte, so recording an event twice or retrying a delivery reuses the
same ``messageId``.

Event mapping
=============

Every known AppFunnel event type is forwarded under its own name unless
``MappingConfig.event_names`` renames it (a string) or drops it (``None``)::

    AppFunnel event           Customer.io messages, in order
    ------------------------  --------------------------------------------------------
    page.view                 identify, then track "page.view"
    user.registered           identify, then track "user.registered"
    checkout.start            identify, then track "checkout.start"
    checkout.payment_added    identify, then track "checkout.payment_added"
    purchase.complete         identify, then track "purchase.complete"
    customer.first_purchase   identify, then track "customer.first_purchase"
    subscription.created      identify (with subscription traits), then track
                              "subscription.created"
    subscription.renewal      identify, then track "subscription.renewal"
    marketing.consent_given   identify, then track "marketing.consent_given"

Every event re-identifies the customer before its track, so the profile a campaign sees
when the track triggers it is already current.

Identify traits
===============
::

    Trait                       From                          Notes
    --------------------------  ----------------------------  ---------------------------
    email                       customer.email
    name                        customer.name
    date_of_birth               customer.date_of_birth
    gender                      customer.gender
    country, city, state        customer.country/city/state
    project_id                  customer.project_id           also OutboxMessage.project_id
    first_campaign_slug         customer.first_campaign_slug
    campaign_base_url           customer.campaign_base_url
    marketing_consent           customer.marketing_consent    bool; lets segments honour
                                                              opt-in
    created_at                  customer.created_at           int Unix seconds
    last_session_id             customer.last_session_id
    funnelData                  customer.funnel_data, or      all session variables
                                customer.funnelData
    has_active_subscription     customer.subscriptions        subscription.created only
    active_subscription_count   customer.subscriptions        subscription.created only
    subscriptions               customer.subscriptions        subscription.created only;
                                                              each object as given: {id,
                                                              status, priceId,
                                                              currentPeriodStart,
                                                              currentPeriodEnd, createdAt}
                                                              and any other key

A trait whose source is absent or null is omitted, never sent as null: a null would erase
what Customer.io already holds. For the same reason the three subscription traits are
omitted when the event carries no ``subscriptions`` list at all (an explicit empty list
does send ``false``, ``0`` and ``[]``). Inside a subscription object a null field is omitted
likewise; every other field, named by the spec or not, is passed on unchanged, whatever its
JSON type (the spec names the fields, not their types). A subscription counts as active when
its ``status`` is a string in ``MappingConfig.active_statuses``; any other status (missing,
null, a number, an object) counts as not active rather than failing the event, track
included. Empty strings are values like any other and are sent as given, except an empty
email, which means "no email".

``funnelData`` may come as ``customer.funnel_data`` or as ``customer.funnelData`` (the spec's
spelling of the trait). Both at once (neither null) is refused as ambiguous, even when equal:
which one was meant is not the relay's guess to make.

Rules
=====
- Anonymous customers (no email: missing, null or empty) produce no messages. Customer.io
  ignores identifies without a known person, and the integration only forwards identified
  customers. The event is still validated in full first, so a malformed anonymous event is
  rejected rather than silently skipped. ``map_event_explained`` tells "anonymous" apart
  from "dropped" (an event type mapped to ``None``); a dropped type wins when both apply.
- ``userId`` is ``customer.id`` by default, or the email with ``user_key="email"``.
- ``timestamp`` is ``occurred_at`` in UTC, ISO-8601 with milliseconds and a ``Z``
  (``2026-11-28T10:00:00.000Z``). Sub-millisecond digits are truncated.
- ``messageId`` is ``uuid5(MESSAGE_ID_NAMESPACE, f"{event_id}:{kind}")``.
- A message larger than ``MAX_MESSAGE_BYTES`` as Customer.io measures it is rejected with
  ``InvalidEvent("traits" | "properties", ...)``, naming the part to trim and the size. The
  measure is its official SDK's, ``len(json.dumps(message))``: non-ASCII characters count as
  their ``\\uXXXX`` escapes (6 bytes, 12 for an emoji), and floats as jsonb will spell them
  (``relay.limits.message_size``). ``OutboxMessage.encoded`` is written that way, so its
  length is the size judged but for that float spelling.

Validation
==========
``parse_event`` raises ``InvalidEvent(field, reason)`` where ``field`` is a dotted path into
the event: ``occurred_at``, ``customer.email``, ``properties.items[2].price``. Keys that are
not plain identifiers are written as JSON strings in brackets
(``properties["first-name"]``) so the path stays printable even when the key holds a NUL.
``event`` names the event as a whole (when it is not an object at all).

Free-form values (``properties``, ``customer.funnel_data``, every field of a subscription)
must be JSON: str, int, finite float, bool, None, lists (tuples are accepted and become lists)
and objects with string keys, nested at most ``MAX_DEPTH`` containers deep. Every string
anywhere in the event, keys included, must be storable by PostgreSQL's jsonb: no NUL
character and no unpaired surrogate. Unknown keys in ``customer`` and at the top level of
the event are ignored, so AppFunnel can add fields without breaking the relay.

Keys that land in indexed columns are bounded in UTF-8 bytes, before any SQL, so that an
over-long one is an ``InvalidEvent`` rather than an index error that aborts the caller's
transaction: the event ``id`` (``relay.limits.MAX_EVENT_ID_BYTES``), ``customer.id`` and
``customer.email`` (``MAX_CUSTOMER_KEY_BYTES``; either may be the ``userId``) and
``customer.project_id`` (``MAX_PROJECT_ID_BYTES``).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final, Literal, TypeAlias

from relay.errors import InvalidEvent
from relay.limits import (
    MAX_CUSTOMER_KEY_BYTES,
    MAX_EVENT_ID_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_PROJECT_ID_BYTES,
    message_size,
    sdk_json,
    utf8_size,
)

__all__ = [
    "DEFAULT_CONFIG",
    "EVENT_TYPES",
    "MAX_DEPTH",
    "MAX_MESSAGE_BYTES",
    "MESSAGE_ID_NAMESPACE",
    "Customer",
    "Event",
    "MappingConfig",
    "MessageKind",
    "OutboxMessage",
    "SkipReason",
    "Subscription",
    "format_timestamp",
    "is_anonymous",
    "map_event",
    "map_event_explained",
    "parse_event",
]

EVENT_TYPES: Final[tuple[str, ...]] = (
    "page.view",
    "user.registered",
    "checkout.start",
    "checkout.payment_added",
    "purchase.complete",
    "customer.first_purchase",
    "subscription.created",
    "subscription.renewal",
    "marketing.consent_given",
)

# Changing this would give every already-recorded event new messageIds, so a re-recorded
# event could no longer be matched with its earlier delivery downstream. Never change it.
MESSAGE_ID_NAMESPACE: Final = uuid.UUID("fd7afa49-0e51-4d62-bad0-7d0f13ee8d73")

# Deep enough for any real payload, shallow enough that validation, json and jsonb never
# approach a recursion limit (a self-referencing dict also stops here).
MAX_DEPTH: Final = 32

MessageKind: TypeAlias = Literal["identify", "track"]
SkipReason: TypeAlias = Literal["anonymous", "dropped"]

_NUL_REASON: Final = "contains a NUL character, which PostgreSQL cannot store"
_SURROGATE_REASON: Final = (
    "contains an unpaired surrogate, which is not valid UTF-8 and PostgreSQL cannot store"
)
_SURROGATE = re.compile("[\ud800-\udfff]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_KNOWN_TYPES_TEXT: Final = ", ".join(EVENT_TYPES)

_CUSTOMER_STRING_FIELDS: Final = (
    "email",
    "name",
    "date_of_birth",
    "gender",
    "country",
    "city",
    "state",
    "project_id",
    "first_campaign_slug",
    "campaign_base_url",
    "last_session_id",
)

# (attribute on Subscription, key in AppFunnel's payload and in the Customer.io trait), in the
# spec's order, which the trait keeps.
_SUBSCRIPTION_KEYS: Final = (
    ("id", "id"),
    ("status", "status"),
    ("price_id", "priceId"),
    ("current_period_start", "currentPeriodStart"),
    ("current_period_end", "currentPeriodEnd"),
    ("created_at", "createdAt"),
)


@dataclass(frozen=True)
class Subscription:
    """One subscription as AppFunnel reports it, passed on to Customer.io as given.

    The spec names the fields but not their types, so each holds any JSON value; ``extra``
    holds the keys it does not name (``cancelAtPeriodEnd``, ...), sent after the named ones.
    A field that is ``None`` is omitted from the trait, as a null trait is. The mapping reads
    only ``status``: the subscription is active when it is a string listed in
    ``MappingConfig.active_statuses``, and not active for any other value (missing, null, a
    number, an object), which is sent as given rather than failing the event.
    """

    id: Any = None
    status: Any = None
    price_id: Any = None
    current_period_start: Any = None
    current_period_end: Any = None
    created_at: Any = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Keys the spec does not name, in order; a key that is also a named field is refused."""


@dataclass(frozen=True)
class Customer:
    """The customer an event is about. ``email is None`` means anonymous."""

    id: str
    email: str | None = None
    name: str | None = None
    date_of_birth: str | None = None
    gender: str | None = None
    country: str | None = None
    city: str | None = None
    state: str | None = None
    project_id: str | None = None
    first_campaign_slug: str | None = None
    campaign_base_url: str | None = None
    marketing_consent: bool | None = None
    created_at: int | None = None
    """Unix seconds."""
    last_session_id: str | None = None
    funnel_data: Mapping[str, Any] | None = None
    subscriptions: tuple[Subscription, ...] | None = None
    """``None`` when the event did not say; ``()`` when it said there are none."""


@dataclass(frozen=True)
class Event:
    """An AppFunnel event. Instances returned by ``parse_event`` are validated, hold their
    own copies of every nested value, and have ``occurred_at`` in UTC."""

    id: str
    type: str
    occurred_at: datetime
    customer: Customer
    properties: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MappingConfig:
    """How events become messages. Validated on construction (``ValueError`` names the
    field)."""

    user_key: Literal["id", "email"] = "id"
    """What Customer.io's ``userId`` is: the AppFunnel customer id, or the email."""
    active_statuses: frozenset[str] = frozenset({"active", "trialing"})
    """Subscription statuses that count towards ``active_subscription_count``."""
    event_names: Mapping[str, str | None] = field(default_factory=lambda: MappingProxyType({}))
    """Per AppFunnel type: a string renames the track, ``None`` drops the type entirely."""

    def __post_init__(self) -> None:
        if self.user_key not in ("id", "email"):
            raise ValueError(f"user_key must be 'id' or 'email', got {self.user_key!r}")
        statuses: object = self.active_statuses
        if not isinstance(statuses, (set, frozenset)) or not all(
            isinstance(status, str) for status in statuses
        ):
            raise ValueError(f"active_statuses must be a frozenset of strings, got {statuses!r}")
        names: object = self.event_names
        if not isinstance(names, Mapping):
            raise ValueError(
                f"event_names must be a mapping of event type to name or None, "
                f"got {type(names).__name__}"
            )
        for event_type, name in names.items():
            if event_type not in EVENT_TYPES:
                raise ValueError(
                    f"event_names: unknown event type {event_type!r}; "
                    f"known types: {_KNOWN_TYPES_TEXT}"
                )
            if name is not None and (
                not isinstance(name, str) or not name or "\x00" in name or _SURROGATE.search(name)
            ):
                raise ValueError(
                    f"event_names[{event_type!r}] must be a non-empty string or None, got {name!r}"
                )
        # Copies, so a caller mutating what it passed in cannot change a config that is
        # already in use.
        object.__setattr__(self, "active_statuses", frozenset(statuses))
        object.__setattr__(self, "event_names", MappingProxyType(dict(names)))


DEFAULT_CONFIG: Final = MappingConfig()


@dataclass(frozen=True)
class OutboxMessage:
    """One Customer.io batch item, ready to be stored and later sent as is."""

    kind: MessageKind
    message_id: str
    customer_key: str
    """The ``userId``; messages for one key must be delivered in order."""
    project_id: str | None
    """The AppFunnel project, which selects the Customer.io destination."""
    event_id: str
    event_type: str
    """The AppFunnel event type, even when the track was renamed."""
    occurred_at: datetime
    body: Mapping[str, Any]
    """The batch item; always equal to ``json.loads(encoded)``."""
    encoded: bytes
    """``body`` as Customer.io's SDK writes it (``json.dumps`` defaults: ASCII with ``\\u``
    escapes, ``", "`` and ``": "``): its length is the size Customer.io counts, which the
    limit applies to, plus the growth of any float jsonb spells longer."""


# --------------------------------------------------------------------------- mapping


def map_event(
    event: Mapping[str, Any] | Event, config: MappingConfig = DEFAULT_CONFIG
) -> list[OutboxMessage]:
    """Validate ``event`` and return its messages: ``[identify, track]``, or ``[]`` for an
    anonymous customer or a dropped event type. Raises ``InvalidEvent``."""
    messages, _ = map_event_explained(event, config)
    return messages


def map_event_explained(
    event: Mapping[str, Any] | Event, config: MappingConfig = DEFAULT_CONFIG
) -> tuple[list[OutboxMessage], SkipReason | None]:
    """Like ``map_event``, and also say why nothing is sent: ``"dropped"`` (the type maps
    to ``None``), ``"anonymous"`` (no email), or ``None`` when messages were produced."""
    parsed = parse_event(event)
    name = config.event_names.get(parsed.type, parsed.type)
    if name is None:
        return [], "dropped"
    customer = parsed.customer
    if customer.email is None:
        return [], "anonymous"
    key = customer.id if config.user_key == "id" else customer.email
    timestamp = format_timestamp(parsed.occurred_at)
    identify_id = _message_id(parsed.id, "identify")
    track_id = _message_id(parsed.id, "track")
    identify = _message(
        "identify",
        "traits",
        parsed,
        key,
        {
            "type": "identify",
            "userId": key,
            "traits": _traits(parsed, config),
            "timestamp": timestamp,
            "messageId": identify_id,
        },
    )
    track = _message(
        "track",
        "properties",
        parsed,
        key,
        {
            "type": "track",
            "userId": key,
            "event": name,
            "properties": parsed.properties,
            "timestamp": timestamp,
            "messageId": track_id,
        },
    )
    return [identify, track], None


def is_anonymous(event: Mapping[str, Any] | Event) -> bool:
    """Whether the event's customer has no email. Validates the event first."""
    return parse_event(event).customer.email is None


def format_timestamp(moment: datetime) -> str:
    """``moment`` as ISO-8601 UTC with milliseconds and a ``Z``: ``2026-11-28T10:00:00.000Z``.

    Raises ``ValueError`` for a naive datetime, whose instant is unknown.
    """
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError("a timezone-aware datetime is required")
    utc = moment.astimezone(UTC)
    # Formatted by hand: strftime does not zero-pad years below 1000 on every platform.
    return (
        f"{utc.year:04d}-{utc.month:02d}-{utc.day:02d}T"
        f"{utc.hour:02d}:{utc.minute:02d}:{utc.second:02d}.{utc.microsecond // 1000:03d}Z"
    )


# Integers wider than this are refused in free-form values (json gives up past 4300 digits).
_MAX_INT_BITS: Final = 256
# 9999-12-31T23:59:59Z: the last second a timestamp can name.
_MAX_UNIX_SECONDS: Final = 253_402_300_800


def _message_id(event_id: str, kind: MessageKind) -> str:
    return str(uuid.uuid5(MESSAGE_ID_NAMESPACE, f"{event_id}:{kind}"))


def _message(
    kind: MessageKind,
    trim_field: str,
    event: Event,
    key: str,
    draft: dict[str, Any],
) -> OutboxMessage:
    # One encoding serves both: the text is what the size limit measures, and what is stored.
    text = sdk_json(draft)
    size = message_size(draft, text)
    if size > MAX_MESSAGE_BYTES:
        raise InvalidEvent(
            trim_field,
            f"{kind} message is {size} bytes as Customer.io measures it (JSON with non-ASCII "
            f"characters as \\u escapes), over its {MAX_MESSAGE_BYTES}-byte limit",
        )
    return OutboxMessage(
        kind=kind,
        message_id=draft["messageId"],
        customer_key=key,
        project_id=event.customer.project_id,
        event_id=event.id,
        event_type=event.type,
        occurred_at=event.occurred_at,
        # Decoded from the bytes rather than reusing the draft: the body shares nothing
        # with the event, and cannot disagree with what will be sent.
        body=json.loads(text),
        encoded=text.encode("ascii"),
    )


def _traits(event: Event, config: MappingConfig) -> dict[str, Any]:
    customer = event.customer
    candidates: tuple[tuple[str, object], ...] = (
        ("email", customer.email),
        ("name", customer.name),
        ("date_of_birth", customer.date_of_birth),
        ("gender", customer.gender),
        ("country", customer.country),
        ("city", customer.city),
        ("state", customer.state),
        ("project_id", customer.project_id),
        ("first_campaign_slug", customer.first_campaign_slug),
        ("campaign_base_url", customer.campaign_base_url),
        ("marketing_consent", customer.marketing_consent),
        ("created_at", customer.created_at),
        ("last_session_id", customer.last_session_id),
        ("funnelData", customer.funnel_data),
    )
    traits = {name: value for name, value in candidates if value is not None}
    if event.type == "subscription.created" and customer.subscriptions is not None:
        active = sum(
            1
            for s in customer.subscriptions
            if isinstance(s.status, str) and s.status in config.active_statuses
        )
        traits["has_active_subscription"] = active > 0
        traits["active_subscription_count"] = active
        traits["subscriptions"] = [_subscription_trait(s) for s in customer.subscriptions]
    return traits


def _subscription_trait(subscription: Subscription) -> dict[str, Any]:
    trait: dict[str, Any] = {}
    for attribute, key in _SUBSCRIPTION_KEYS:
        value = getattr(subscription, attribute)
        if value is not None:
            trait[key] = value
    for key, value in subscription.extra.items():
        if value is not None:
            trait[key] = value
    return trait


# ------------------------------------------------------------------------ validation


def parse_event(data: Mapping[str, Any] | Event) -> Event:
    """Validate ``data`` and return a normalised ``Event``. Raises ``InvalidEvent``.

    A typed ``Event`` goes through the same checks as a dict (dataclasses do not check
    types at runtime), so both inputs are accepted or rejected alike.
    """
    raw: object = _event_as_mapping(data) if isinstance(data, Event) else data
    if not isinstance(raw, Mapping):
        raise InvalidEvent("event", f"must be an object, got {_type_name(raw)}")
    event_id = _required_string(raw, "id", "id")
    _check_bytes(event_id, "id", MAX_EVENT_ID_BYTES, "MAX_EVENT_ID_BYTES")
    event_type = raw.get("type")
    if event_type is None:
        raise InvalidEvent("type", "is required")
    if not isinstance(event_type, str):
        raise InvalidEvent("type", f"must be a string, got {_type_name(event_type)}")
    if event_type not in EVENT_TYPES:
        raise InvalidEvent(
            "type", f"unknown event type {event_type!r}; known types: {_KNOWN_TYPES_TEXT}"
        )
    if raw.get("occurred_at") is None:
        raise InvalidEvent("occurred_at", "is required")
    occurred_at = _parse_instant(raw["occurred_at"], "occurred_at")
    customer = _parse_customer(raw.get("customer", _MISSING))
    properties = raw.get("properties")
    if properties is None:
        properties = {}
    elif not isinstance(properties, Mapping):
        raise InvalidEvent("properties", f"must be an object, got {_type_name(properties)}")
    else:
        properties = _json_copy(properties, "properties", 1)
    return Event(
        id=event_id,
        type=event_type,
        occurred_at=occurred_at,
        customer=customer,
        properties=properties,
    )


class _Missing:
    pass


_MISSING: Final = _Missing()


def _parse_customer(raw: object) -> Customer:
    if raw is _MISSING:
        raise InvalidEvent("customer", "is required")
    if not isinstance(raw, Mapping):
        raise InvalidEvent("customer", f"must be an object, got {_type_name(raw)}")
    customer_id = _required_string(raw, "id", "customer.id")
    _check_bytes(customer_id, "customer.id", MAX_CUSTOMER_KEY_BYTES, "MAX_CUSTOMER_KEY_BYTES")
    strings: dict[str, str | None] = {}
    for name in _CUSTOMER_STRING_FIELDS:
        value = raw.get(name)
        path = f"customer.{name}"
        if value is not None:
            if not isinstance(value, str):
                raise InvalidEvent(path, f"must be a string, got {_type_name(value)}")
            _check_text(value, path)
        strings[name] = value
    email = strings["email"]
    if email == "":
        email = None
    elif email is not None:
        if "@" not in email:
            raise InvalidEvent("customer.email", "is not an email address (no '@')")
        # Bounded whatever MappingConfig.user_key says: whether an event is valid does not
        # depend on the relay's configuration.
        _check_bytes(email, "customer.email", MAX_CUSTOMER_KEY_BYTES, "MAX_CUSTOMER_KEY_BYTES")
    project_id = strings["project_id"]
    if project_id is not None:
        _check_bytes(
            project_id, "customer.project_id", MAX_PROJECT_ID_BYTES, "MAX_PROJECT_ID_BYTES"
        )
    consent = raw.get("marketing_consent")
    if consent is not None and not isinstance(consent, bool):
        raise InvalidEvent(
            "customer.marketing_consent", f"must be a boolean, got {_type_name(consent)}"
        )
    return Customer(
        id=customer_id,
        email=email,
        name=strings["name"],
        date_of_birth=strings["date_of_birth"],
        gender=strings["gender"],
        country=strings["country"],
        city=strings["city"],
        state=strings["state"],
        project_id=project_id,
        first_campaign_slug=strings["first_campaign_slug"],
        campaign_base_url=strings["campaign_base_url"],
        marketing_consent=consent,
        created_at=_parse_created_at(raw.get("created_at")),
        last_session_id=strings["last_session_id"],
        funnel_data=_parse_funnel_data(raw),
        subscriptions=_parse_subscriptions(raw.get("subscriptions")),
    )


def _parse_funnel_data(customer: Mapping[Any, Any]) -> dict[str, Any] | None:
    snake, camel = customer.get("funnel_data"), customer.get("funnelData")
    if snake is not None and camel is not None:
        raise InvalidEvent(
            "customer.funnelData",
            "is given together with customer.funnel_data; both are the funnelData trait, "
            "send only one",
        )
    value, path = (
        (camel, "customer.funnelData") if camel is not None else (snake, "customer.funnel_data")
    )
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidEvent(path, f"must be an object, got {_type_name(value)}")
    copied: dict[str, Any] = _json_copy(value, path, 1)
    return copied


def _parse_created_at(value: object) -> int | None:
    path = "customer.created_at"
    if value is None:
        return None
    # bool is an int subclass; True as a creation time is a bug upstream, not second 1.
    if isinstance(value, bool):
        raise InvalidEvent(path, "must be Unix seconds or an ISO-8601 string, got bool")
    if isinstance(value, int | float) and not (
        abs(value) < _MAX_UNIX_SECONDS  # also False for NaN
    ):
        shown = repr(value) if isinstance(value, float) else f"a {value.bit_length()}-bit integer"
        raise InvalidEvent(
            path, f"must be a finite number of Unix seconds before year 10000, got {shown}"
        )
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return math.floor(value)
    if isinstance(value, (str, datetime)):
        return math.floor(_parse_instant(value, path).timestamp())
    raise InvalidEvent(path, f"must be Unix seconds or an ISO-8601 string, got {_type_name(value)}")


def _parse_subscriptions(value: object) -> tuple[Subscription, ...] | None:
    path = "customer.subscriptions"
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        raise InvalidEvent(path, f"must be a list of objects, got {_type_name(value)}")
    parsed: list[Subscription] = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            raise InvalidEvent(item_path, f"must be an object, got {_type_name(item)}")
        # Every field is free-form JSON, checked as properties are (the list is one level, the
        # object a second); the named ones are lifted out, the rest kept in order in ``extra``.
        fields: dict[str, Any] = _json_copy(item, item_path, 2)
        named = {attribute: fields.pop(key, None) for attribute, key in _SUBSCRIPTION_KEYS}
        parsed.append(Subscription(**named, extra=fields))
    return tuple(parsed)


def _required_string(raw: Mapping[Any, Any], key: str, path: str) -> str:
    value = raw.get(key)
    if value is None:
        raise InvalidEvent(path, "is required")
    if not isinstance(value, str):
        raise InvalidEvent(path, f"must be a string, got {_type_name(value)}")
    if not value:
        raise InvalidEvent(path, "must not be empty")
    _check_text(value, path)
    return value


def _parse_instant(value: object, path: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        _check_text(value, path)
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise InvalidEvent(
                path, "must be an ISO-8601 timestamp such as 2026-11-28T10:00:00Z"
            ) from exc
    else:
        raise InvalidEvent(
            path,
            f"must be an ISO-8601 string or a timezone-aware datetime, got {_type_name(value)}",
        )
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise InvalidEvent(
            path,
            "has no timezone; a timezone is required (a trailing Z or an offset such as "
            "+02:00), since a local time names no single instant",
        )
    try:
        return moment.astimezone(UTC)
    except (OverflowError, ValueError) as exc:
        raise InvalidEvent(path, "is out of range once converted to UTC") from exc


def _json_copy(value: object, path: str, depth: int) -> Any:
    """Check that ``value`` is JSON that jsonb can store, and return a private copy."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        # Python prints ints of any size, but json refuses past 4300 digits and no consumer
        # downstream reads such a number back exactly: refuse it here, by name.
        if value.bit_length() > _MAX_INT_BITS:
            raise InvalidEvent(path, f"is an integer wider than {_MAX_INT_BITS} bits")
        return value
    if isinstance(value, str):
        _check_text(value, path)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidEvent(path, f"is {value}, a float JSON cannot represent")
        return value
    if isinstance(value, (Mapping, list, tuple)) and depth > MAX_DEPTH:
        raise InvalidEvent(path, f"is nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        copied: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidEvent(
                    f"{path}[{key!r}]",
                    f"key has type {_type_name(key)}; object keys must be strings",
                )
            key_path = _key_path(path, key)
            _check_text(key, key_path)
            copied[key] = _json_copy(item, key_path, depth + 1)
        return copied
    if isinstance(value, (list, tuple)):
        return [_json_copy(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise InvalidEvent(path, f"has type {_type_name(value)}, which is not JSON-serialisable")


def _check_text(text: str, path: str) -> None:
    if "\x00" in text:
        raise InvalidEvent(path, _NUL_REASON)
    if _SURROGATE.search(text):
        raise InvalidEvent(path, _SURROGATE_REASON)


def _check_bytes(text: str, path: str, limit: int, name: str) -> None:
    size = utf8_size(text)
    if size > limit:
        raise InvalidEvent(
            path, f"is {size} bytes in UTF-8, over the {limit}-byte limit (relay.limits.{name})"
        )


def _key_path(parent: str, key: str) -> str:
    if _IDENTIFIER.match(key):
        return f"{parent}.{key}"
    # json.dumps escapes NUL, surrogates and quotes, so the path is always printable.
    return f"{parent}[{json.dumps(key)}]"


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _event_as_mapping(event: Event) -> dict[str, Any]:
    customer: object = event.customer
    if isinstance(customer, Customer):
        subscriptions: object = customer.subscriptions
        if isinstance(subscriptions, (list, tuple)):
            subscriptions = [
                _subscription_as_mapping(s, f"customer.subscriptions[{i}]")
                if isinstance(s, Subscription)
                else s
                for i, s in enumerate(subscriptions)
            ]
        customer = {
            "id": customer.id,
            **{name: getattr(customer, name) for name in _CUSTOMER_STRING_FIELDS},
            "marketing_consent": customer.marketing_consent,
            "created_at": customer.created_at,
            "funnel_data": customer.funnel_data,
            "subscriptions": subscriptions,
        }
    return {
        "id": event.id,
        "type": event.type,
        "occurred_at": event.occurred_at,
        "customer": customer,
        "properties": event.properties,
    }


def _subscription_as_mapping(subscription: Subscription, path: str) -> dict[str, Any]:
    named = {
        key: getattr(subscription, attribute)
        for attribute, key in _SUBSCRIPTION_KEYS
        if getattr(subscription, attribute) is not None
    }
    extra: object = subscription.extra
    if not isinstance(extra, Mapping):
        raise InvalidEvent(f"{path}.extra", f"must be a mapping, got {_type_name(extra)}")
    for attribute, key in _SUBSCRIPTION_KEYS:
        if key in named and key in extra:
            raise InvalidEvent(
                _key_path(path, key),
                f"is given twice: as Subscription.{attribute} and in Subscription.extra",
            )
    return {**named, **extra}
