"""Malformed and hostile input: every event is refused clearly or delivered exactly as recorded.

The contract under test (relay.outbox, relay.mapping): ``record_event`` either raises
``InvalidEvent`` before any SQL runs, leaving the caller's transaction usable, or writes rows
that the relay delivers and strict-mode Customer.io accepts. Never another exception, never a
row that dies on its way, never a relay that stops working.

Bodies are compared as JSON values with numbers as decimals: jsonb keeps a number's value but
not its spelling (``1e+16`` comes back as ``10000000000000000``), and JSON means the value.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import os
import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay import InvalidEvent, MappingConfig, record_event
from relay.limits import (
    MAX_CUSTOMER_KEY_BYTES,
    MAX_EVENT_ID_BYTES,
    MAX_PROJECT_ID_BYTES,
    text_size,
)
from relay.mapping import EVENT_TYPES, MAX_DEPTH, MAX_MESSAGE_BYTES, map_event
from relay.service import drain
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import KEY, OPTIONAL_CUSTOMER_STRINGS, make_relay, query, states

Conn = psycopg.Connection[tuple[Any, ...]]
# Sized for CI (well under a minute); raise it for a longer fuzzing session.
FUZZ_EXAMPLES = int(os.environ.get("RELAY_FUZZ_EXAMPLES", "300"))

HOSTILE = [
    "'; DROP TABLE relay_outbox; --",
    "Robert'); DROP TABLE relay_attempt;--",
    '" OR "1"="1',
    "' OR 1=1 --",
    "\\",
    "\\'\\\"\\\\",
    "C:\\Windows\\system32\\",
    "%s %(message_ids)s %% $1 {0}",
    "E'\\x00'",
    "$$; SELECT pg_sleep(10); $$",
    "<script>alert('x')</script>",
    "../../../../etc/passwd",
    "\u202eevil\u202c txt.exe",
    "مرحبا بالعالم",
    "שלום עולם",
    "👩‍👩‍👧‍👦🔥🚀 émoji",
    "\u2028\u2029\r\n\t\x1b[31m",
    "\x01\x1f\x7f",
    "\ufeffBOM",
    "null",
    "{}",
    "[]",
    " ",
    "Zalgo: z̸̢̛a̵̡̛l̶̨̛g̷̢̛o̵̡̕",
]


def as_json_value(value: Any) -> Any:
    """``value`` as JSON means it: numbers as decimals, so spelling does not matter."""
    return json.loads(json.dumps(value), parse_float=Decimal, parse_int=Decimal)


def event(event_id: str, customer_id: str, **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": event_id,
        "type": "checkout.start",
        "occurred_at": "2026-11-28T10:00:00Z",
        "customer": {"id": customer_id, "email": f"{customer_id}@example.com"},
        "properties": {},
    }
    base.update(extra)
    return base


def drain_all(dsn: str, cio: FakeCustomerIO) -> None:
    ok, _ = drain(make_relay(dsn, cio, batch_size=100), 60)
    assert ok, f"drain timed out; states: {states(dsn)}"


def accepted_by_id(cio: FakeCustomerIO) -> dict[str, dict[str, Any]]:
    return {item["messageId"]: item for item in cio.accepted_items()}


def assert_delivered_verbatim(
    dsn: str, cio: FakeCustomerIO, expected: dict[str, dict[str, Any]]
) -> None:
    """Every expected message is delivered (not dead) and the server holds exactly its body."""
    rows = dict(query(dsn, "SELECT message_id, state FROM relay_outbox"))
    got = accepted_by_id(cio)
    for mid, body in expected.items():
        assert rows.get(mid) == "delivered", (mid, rows.get(mid), body)
        assert mid in got, (mid, body)
        assert as_json_value(got[mid]) == as_json_value(body), (mid, got[mid], body)


def assert_usable_after_error(conn: Conn, n: int) -> dict[str, Any]:
    """After an InvalidEvent, the same transaction still runs SQL and records; returns the
    canary event it recorded (committed by the caller)."""
    assert conn.execute("SELECT 1").fetchone() == (1,)
    canary = event(f"canary-after-{n}", f"canary-a-{n}")
    assert record_event(conn, canary).written == 2
    return canary


# --- strategies -------------------------------------------------------------------------------

# Any character PostgreSQL's jsonb can store: no NUL, no unpaired surrogate.
storable_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
text = st.one_of(storable_text, st.sampled_from(HOSTILE))
non_empty = text.filter(bool)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    text,
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(text, inner, max_size=4),
    ),
    max_leaves=12,
)
json_object = st.dictionaries(text, json_value, max_size=5)
offsets = st.timedeltas(min_value=-timedelta(hours=23, minutes=59), max_value=timedelta(hours=23))
aware = st.datetimes(timezones=st.one_of(st.just(UTC), offsets.map(timezone)))
instant = st.one_of(
    aware.map(datetime.isoformat),
    aware,
    st.datetimes().map(lambda d: d.isoformat() + "Z"),
)
emails = st.one_of(
    st.emails(),
    st.builds(lambda local, domain: f"{local}@{domain}", non_empty, text),
    st.just(""),  # no email: an anonymous customer, nothing is sent
    st.none(),
)


def nested(depth: int) -> Any:
    """Containers ``depth`` deep, counted as the mapping counts them (the outer one is 1)."""
    value: Any = "bottom"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


@st.composite
def valid_events(draw: st.DrawFn) -> dict[str, Any]:
    customer: dict[str, Any] = {"id": draw(non_empty), "email": draw(emails)}
    for name in OPTIONAL_CUSTOMER_STRINGS:
        if draw(st.booleans()):
            customer[name] = draw(st.one_of(text, st.none()))
    if draw(st.booleans()):
        customer["marketing_consent"] = draw(st.booleans())
    if draw(st.booleans()):
        customer["created_at"] = draw(
            st.one_of(
                st.integers(min_value=0, max_value=2**40),
                st.floats(min_value=0, max_value=2e9),
                aware.filter(lambda d: 1 < d.year < 9999).map(datetime.isoformat),
            )
        )
    if draw(st.booleans()):
        # Either spelling; the other one absent or null.
        spelling = draw(st.sampled_from(["funnel_data", "funnelData"]))
        customer[spelling] = draw(json_object)
        if draw(st.booleans()):
            customer["funnelData" if spelling == "funnel_data" else "funnel_data"] = None
    if draw(st.booleans()):
        # Any JSON value in any field, extra keys too: only the status is read, and a status
        # that is not a string counts as not active.
        customer["subscriptions"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "id": st.one_of(non_empty, st.integers(0, 10**12)),
                        "status": st.one_of(
                            st.sampled_from(["active", "trialing", "gone"]), json_leaf
                        ),
                        "priceId": st.one_of(text, st.none()),
                        "currentPeriodStart": json_leaf,
                        "createdAt": st.one_of(text, st.integers(0, 2**40)),
                        "cancelAtPeriodEnd": st.booleans(),
                        "items": json_value,
                    },
                ),
                max_size=3,
            )
        )
    properties = draw(
        st.one_of(
            json_object,
            st.none(),
            st.just({"deep": nested(MAX_DEPTH - 1)}),  # at the limit: accepted
            # Large, under 32 KB as Customer.io counts it: each "é" is 6 bytes, \u00e9.
            st.integers(1_000, 5_000).map(lambda n: {"blob": "é" * n}),
        )
    )
    out: dict[str, Any] = {
        "id": draw(non_empty),
        "type": draw(st.sampled_from(EVENT_TYPES)),
        "occurred_at": draw(instant),
        "customer": customer,
        "properties": properties,
    }
    if draw(st.booleans()):
        out[draw(text)] = draw(json_value)  # unknown top-level keys are ignored
    return out


class _Opaque:
    """Not JSON, and says so badly: its repr is hostile too."""

    def __repr__(self) -> str:
        return "'; DROP TABLE relay_outbox; --"


NOT_JSON = [
    {1, 2},
    b"bytes",
    bytearray(b"x"),
    complex(1, 2),
    Decimal("1.5"),
    datetime(2026, 1, 1),
    range(3),
    _Opaque(),
    object(),
    print,
]
BAD_TIMESTAMPS = [
    "",
    "yesterday",
    "2026-02-30T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-11-28 10:00:00",  # no zone: no single instant
    "2026-11-28T10:00:00",
    "2026-11-28",
    "0001-01-01T00:00:00+01:00",  # before year 1 once in UTC
    "9999-12-31T23:59:59-01:00",  # after year 9999 once in UTC
    "2026-11-28T10:00:00\ud800Z",
    1_764_324_000,
    1.7e9,
    math.nan,
    True,
    [2026, 11, 28],
    {"iso": "2026-11-28T10:00:00Z"},
    datetime(2026, 11, 28, 10),  # naive
]
WRONG_TYPES = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2), st.binary()
)
STRING_PATHS = [
    ("id",),
    ("type",),
    ("customer", "id"),
    ("customer", "email"),
    ("customer", "name"),
    ("customer", "city"),
    ("customer", "project_id"),
]
REQUIRED = [("id",), ("type",), ("occurred_at",), ("customer",), ("customer", "id")]


def put(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        doc = doc[key]
    doc[path[-1]] = value


def spoil(value: str, bad: str, where: int) -> str:
    at = where % (len(value) + 1)
    return value[:at] + bad + value[at:]


@st.composite
def invalid_events(draw: st.DrawFn) -> tuple[Any, bool]:
    """An event broken one way; the flag says it must be refused (False: either outcome)."""
    doc = draw(valid_events())
    how = draw(
        st.sampled_from(
            [
                "missing",
                "wrong type",
                "timestamp",
                "nan",
                "not json",
                "huge",
                "nul",
                "surrogate",
                "deep",
                "unknown type",
                "key type",
                "not an object",
                "long key",
                "both funnel spellings",
            ]
        )
    )
    if how == "long key":
        path, limit = draw(
            st.sampled_from(
                [
                    (("id",), MAX_EVENT_ID_BYTES),
                    (("customer", "id"), MAX_CUSTOMER_KEY_BYTES),
                    (("customer", "email"), MAX_CUSTOMER_KEY_BYTES),
                    (("customer", "project_id"), MAX_PROJECT_ID_BYTES),
                ]
            )
        )
        char = draw(st.sampled_from(["k", "é", "€", "🔥"]))
        over = draw(st.integers(1, 3_000))
        value = char * ((limit + over) // len(char.encode()) + 1)
        put(doc, path, value + "@example.com" if path[-1] == "email" else value)
        return doc, True
    if how == "both funnel spellings":
        doc["customer"]["funnel_data"] = draw(json_object)
        doc["customer"]["funnelData"] = draw(json_object)
        return doc, True
    if how == "missing":
        path = draw(st.sampled_from(REQUIRED))
        if draw(st.booleans()):
            put(doc, path, None)
        elif len(path) == 1:
            del doc[path[0]]
        else:
            del doc["customer"][path[1]]
        return doc, True
    if how == "wrong type":
        path = draw(st.sampled_from(STRING_PATHS))
        put(doc, path, draw(WRONG_TYPES))
        return doc, True
    if how == "timestamp":
        path = draw(st.sampled_from([("occurred_at",), ("customer", "created_at")]))
        bad = draw(st.sampled_from(BAD_TIMESTAMPS))
        # Unix seconds are a valid created_at; everything else on the list is wrong for both.
        must = True
        if path[-1] == "created_at" and isinstance(bad, (int, float)) and not isinstance(bad, bool):
            must = not math.isfinite(bad)
        put(doc, path, bad)
        return doc, must
    if how == "nan":
        bad = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        where = draw(st.sampled_from(["properties", "funnel_data", "nested", "created_at"]))
        if where == "properties":
            doc["properties"] = {"v": bad}
        elif where == "funnel_data":
            doc["customer"]["funnel_data"] = {"a": [1, {"b": bad}]}
        elif where == "nested":
            doc["properties"] = {"list": [0, [1, (2, bad)]]}
        else:
            doc["customer"]["created_at"] = bad
        return doc, True
    if how == "not json":
        bad = draw(st.sampled_from(NOT_JSON))
        target = draw(st.sampled_from(["properties", "funnel_data"]))
        holder = {"v": [bad]} if draw(st.booleans()) else {"v": bad}
        if target == "properties":
            doc["properties"] = holder
        else:
            doc["customer"]["funnel_data"] = holder
        return doc, True
    if how == "huge":
        size = draw(st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES))
        char = draw(st.sampled_from(["x", "é", "🔥", "\x01"]))
        blob = char * (size // len(json.dumps(char, ensure_ascii=False).encode()[1:-1]) + 1)
        if draw(st.booleans()):
            doc["properties"] = {"blob": blob}
        else:
            doc["customer"]["funnel_data"] = {"blob": blob}
        # An anonymous customer's event is validated but not mapped, so its size never counts.
        return doc, bool(doc["customer"].get("email"))
    if how in ("nul", "surrogate"):
        bad = "\x00" if how == "nul" else draw(st.sampled_from(["\ud800", "\udfff", "\udc00x"]))
        where = draw(
            st.sampled_from(["string", "property key", "property value", "funnel key", "sub"])
        )
        pos = draw(st.integers(0, 50))
        if where == "string":
            path = draw(st.sampled_from(STRING_PATHS))
            current = doc["customer"] if len(path) == 2 else doc
            value = current.get(path[-1]) or "v"
            put(doc, path, spoil(value if isinstance(value, str) else "v", bad, pos))
        elif where == "property key":
            doc["properties"] = {spoil("key", bad, pos): 1}
        elif where == "property value":
            doc["properties"] = {"k": ["ok", {"deeper": spoil("value", bad, pos)}]}
        elif where == "funnel key":
            doc["customer"]["funnel_data"] = {"a": {spoil("answer", bad, pos): "x"}}
        else:
            doc["customer"]["subscriptions"] = [{"id": spoil("sub", bad, pos), "status": "active"}]
        return doc, True
    if how == "deep":
        depth = draw(st.integers(MAX_DEPTH + 1, MAX_DEPTH + 200))
        if draw(st.booleans()):
            doc["properties"] = {"deep": nested(depth - 1)}
        else:
            doc["customer"]["funnel_data"] = {"deep": nested(depth - 1)}
        return doc, True
    if how == "unknown type":
        doc["type"] = draw(
            st.one_of(storable_text, st.sampled_from(HOSTILE), st.just("Checkout.Start")).filter(
                lambda t: t not in EVENT_TYPES
            )
        )
        return doc, True
    if how == "key type":
        key = draw(st.sampled_from([1, 1.5, None, True, b"k", ("t",)]))
        if draw(st.booleans()):
            doc["properties"] = {key: "v"}
        else:
            doc["customer"]["funnel_data"] = {"ok": {key: "v"}}
        return doc, True
    # not an object, at one of three levels
    level = draw(st.sampled_from(["event", "customer", "properties", "funnel_data"]))
    replacement = draw(st.one_of(st.lists(st.integers(), max_size=2), st.integers(), text))
    if level == "event":
        return replacement, True
    if level == "customer":
        doc["customer"] = replacement
    elif level == "properties":
        doc["properties"] = replacement
    else:
        doc["customer"]["funnel_data"] = replacement
    return doc, True


any_event = st.one_of(valid_events().map(lambda e: (e, False)), invalid_events())


def make_unique(doc: Any, n: int) -> Any:
    """Distinct event and customer ids per example (so nothing is a duplicate and no two
    examples' identifies coalesce), without changing whether the event is valid."""
    if not isinstance(doc, dict):
        return doc
    if isinstance(doc.get("id"), str) and doc["id"]:
        doc["id"] = f"{doc['id']}#{n}"
    customer = doc.get("customer")
    if isinstance(customer, dict) and isinstance(customer.get("id"), str) and customer["id"]:
        customer["id"] = f"{customer['id']}#{n}"
    return doc


# --- the property -----------------------------------------------------------------------------


def test_any_event_is_refused_cleanly_or_delivered_verbatim(dsn: str, cio: FakeCustomerIO) -> None:
    recorded: list[Any] = []  # events written, canaries included
    outcomes: dict[str, int] = {"refused": 0, "recorded": 0, "skipped": 0}
    counter = itertools.count()

    with psycopg.connect(dsn) as conn:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(case=any_event)
        def record(case: tuple[Any, bool]) -> None:
            doc, must_refuse = case
            n = next(counter)
            doc = make_unique(doc, n)
            conn.rollback()  # a failing example (while shrinking) must not poison the next
            # The transaction has work of its own before the bad event arrives.
            before = event(f"canary-before-{n}", f"canary-b-{n}")
            record_event(conn, before)
            try:
                result = record_event(conn, doc)
            except InvalidEvent as exc:
                outcomes["refused"] += 1
                assert exc.field and exc.reason
                str(exc).encode("utf-8")  # printable anywhere: no lone surrogate in the text
                after = assert_usable_after_error(conn, n)
                conn.commit()
                recorded.extend([before, after])
                return
            assert not must_refuse, f"accepted an event that must be refused: {doc!r}"
            conn.commit()
            recorded.append(before)
            if result.recorded:
                outcomes["recorded"] += 1
                recorded.append(doc)
            else:
                outcomes["skipped"] += 1

        record()

    assert outcomes["refused"] > 0 and outcomes["recorded"] > 0, outcomes
    expected = {m.message_id: dict(m.body) for doc in recorded for m in map_event(doc)}
    # Every refusal left its transaction working: the canaries around it were committed.
    assert states(dsn) == {"pending": len(expected)}

    drain_all(dsn, cio)
    assert states(dsn) == {"delivered": len(expected)}
    assert_delivered_verbatim(dsn, cio, expected)
    # The relay still works afterwards.
    with psycopg.connect(dsn) as conn:
        record_event(conn, event("after-the-storm", "cus-last"))
        conn.commit()
    drain_all(dsn, cio)
    assert states(dsn) == {"delivered": len(expected) + 2}


# --- Customer.io refuses one message ----------------------------------------------------------


def test_a_message_customerio_rejects_is_dead_with_its_reason_and_nothing_else_stops(
    dsn: str, cio: FakeCustomerIO
) -> None:
    def reject(item: dict[str, Any]) -> str | None:
        if item.get("properties", {}).get("poison"):
            return "properties.poison is not allowed in this workspace"
        return None

    cio.reject = reject
    docs = []
    for n in range(4):
        for c in ("alice", "bob", "carol", "dave"):
            extra = {"poison": True} if (c, n) == ("bob", 1) else {}
            docs.append(event(f"evt-{c}-{n}", c, properties={"n": n, **extra}))
    with psycopg.connect(dsn) as conn:
        for doc in docs:
            record_event(conn, doc)
        conn.commit()
    poisoned = map_event(docs[5])[1].message_id  # bob's track of n == 1

    drain_all(dsn, cio)

    # It first travelled with everyone else: one request, refused whole.
    assert cio.requests[0].status == 400 and cio.requests[0].items == 4 + 16
    rows = query(dsn, "SELECT message_id, state, last_error FROM relay_outbox")
    dead = [r for r in rows if r[1] == "dead"]
    assert [r[0] for r in dead] == [poisoned]
    reason = dead[0][2]
    assert "400" in reason and "properties.poison is not allowed" in reason, reason
    assert {r[1] for r in rows if r[0] != poisoned} <= {"delivered", "coalesced"}
    # Everything else reached Customer.io, bob's later messages included.
    got = accepted_by_id(cio)
    tracks = [m for doc in docs for m in map_event(doc) if m.kind == "track"]
    assert {m.message_id for m in tracks} - set(got) == {poisoned}
    bob = [
        i["properties"]["n"]
        for i in cio.accepted_items()
        if i.get("userId") == "bob" and i["type"] == "track"
    ]
    assert bob == [0, 2, 3]
    outcomes = {r[0] for r in query(dsn, "SELECT DISTINCT outcome FROM relay_attempt")}
    assert "rejected" in outcomes and "delivered" in outcomes


# --- hostile strings, stored and sent verbatim ------------------------------------------------


def hostile_event(value: str, n: int) -> dict[str, Any]:
    return {
        "id": value,
        "type": "checkout.start",
        "occurred_at": "2026-11-28T10:00:00Z",
        "customer": {
            "id": value,
            "email": f"user{n}@example.com",
            "name": value,
            "city": value,
            "project_id": None,
            "funnel_data": {value: value, "answers": [value, {value: [value]}]},
        },
        "properties": {value: value, "nested": {"list": [value, value * 3]}},
    }


def test_hostile_strings_are_stored_and_sent_verbatim(dsn: str, cio: FakeCustomerIO) -> None:
    expected: dict[str, dict[str, Any]] = {}
    with psycopg.connect(dsn) as conn:
        for n, value in enumerate(HOSTILE):
            # The same string as a custom track name, through the operator's mapping config.
            mapping = MappingConfig(event_names={"checkout.start": value})
            doc = hostile_event(value, n)
            assert record_event(conn, doc, mapping=mapping).written == 2
            for message in map_event(doc, mapping):
                expected[message.message_id] = dict(message.body)
        conn.commit()

    # Nothing was executed: both tables are there and hold what was written, as written.
    stored = dict(query(dsn, "SELECT message_id, body FROM relay_outbox"))
    assert set(stored) == set(expected)
    for mid, body in expected.items():
        assert stored[mid] == body
    drain_all(dsn, cio)
    assert_delivered_verbatim(dsn, cio, expected)
    names = {i["event"] for i in cio.accepted_items() if i["type"] == "track"}
    assert names == set(HOSTILE)


@pytest.mark.parametrize("bad", ["\x00", "\ud800", "ok\udfff"], ids=["nul", "surrogate", "low"])
@pytest.mark.parametrize(
    "where",
    [
        ("id",),
        ("customer", "id"),
        ("customer", "email"),
        ("customer", "name"),
        ("customer", "funnel_data"),
        ("properties",),
        ("properties", "key"),
    ],
    ids=lambda w: ".".join(w),
)
def test_unstorable_text_is_refused_naming_the_field(
    conn: Conn, bad: str, where: tuple[str, ...]
) -> None:
    doc = event("evt-1", "cus-1")
    value = f"a{bad}b@example.com"
    if where == ("customer", "funnel_data"):
        doc["customer"]["funnel_data"] = {"q": [value]}
        field = "customer.funnel_data.q[0]"
    elif where == ("properties",):
        doc["properties"] = {"v": value}
        field = "properties.v"
    elif where == ("properties", "key"):
        doc["properties"] = {value: 1}
        field = f"properties[{json.dumps(value)}]"
    else:
        put(doc, where, value)
        field = ".".join(where)
    record_event(conn, event("evt-0", "cus-0"))
    with pytest.raises(InvalidEvent) as info:
        record_event(conn, doc)
    assert info.value.field == field
    assert "NUL" in info.value.reason or "surrogate" in info.value.reason
    assert_usable_after_error(conn, 1)
    conn.commit()
    assert query_count(conn) == 4


def query_count(conn: Conn) -> int:
    row = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize("name", ["a\x00b", "\ud800", "", 5])
def test_a_custom_event_name_that_cannot_be_sent_is_refused_by_the_config(name: Any) -> None:
    with pytest.raises(ValueError, match=r"event_names\['checkout.start'\]"):
        MappingConfig(event_names={"checkout.start": name})


# --- sizes and depth at the limits ------------------------------------------------------------


def track_size(doc: dict[str, Any]) -> int:
    """The track's size as Customer.io's SDK measures it."""
    return len(json.dumps(map_event(doc)[1].body))


def padded_to(size: int, char: str = "x") -> dict[str, Any]:
    """An event whose track message is exactly ``size`` bytes as Customer.io measures it."""
    doc = event(f"evt-{size}-{ord(char)}", f"cus-{size}-{ord(char)}", properties={"blob": ""})
    room = size - track_size(doc)
    unit = len(json.dumps(char)) - 2
    doc["properties"]["blob"] = char * (room // unit) + "x" * (room % unit)
    assert track_size(doc) == size
    return doc


def test_messages_up_to_32_kb_are_delivered_and_larger_ones_refused(
    dsn: str, cio: FakeCustomerIO
) -> None:
    accepted_docs = [
        padded_to(MAX_MESSAGE_BYTES),
        padded_to(MAX_MESSAGE_BYTES, "é"),
        padded_to(MAX_MESSAGE_BYTES - 1, "🔥"),
        padded_to(30_000, "\u202e"),
        event("evt-30k", "cus-30k", properties={"v": "'; DROP TABLE relay_outbox; --" * 1000}),
    ]
    refused = [
        (padded_to(MAX_MESSAGE_BYTES, "x"), "properties"),
        (event("evt-chars", "cus-chars", properties={"v": "é" * 17_000}), "properties"),
        # 24 KB in UTF-8, 72 KB as Customer.io counts it ("\u00e9", 6 bytes each).
        (event("evt-escaped", "cus-escaped", properties={"v": "é" * 12_000}), "properties"),
        # 6,000 characters, 36,000 bytes: each control character is escaped as \u00XX
        (event("evt-ctl", "cus-ctl", properties={"v": "\x01" * 6_000}), "properties"),
        (
            event(
                "evt-traits",
                "cus-traits",
                customer={
                    "id": "cus-traits",
                    "email": "t@example.com",
                    "funnel_data": {"v": "x" * 33_000},
                },
            ),
            "traits",
        ),
    ]
    refused[0][0]["properties"]["blob"] += "x"  # one byte over
    expected: dict[str, dict[str, Any]] = {}
    with psycopg.connect(dsn) as conn:
        for doc in accepted_docs:
            assert record_event(conn, doc).written == 2
            expected.update({m.message_id: dict(m.body) for m in map_event(doc)})
        for n, (doc, part) in enumerate(refused):
            with pytest.raises(InvalidEvent) as info:
                record_event(conn, doc)
            assert info.value.field == part
            assert str(MAX_MESSAGE_BYTES) in info.value.reason
            canary = assert_usable_after_error(conn, n)
            expected.update({m.message_id: dict(m.body) for m in map_event(canary)})
        conn.commit()
    drain_all(dsn, cio)
    assert_delivered_verbatim(dsn, cio, expected)
    assert states(dsn) == {"delivered": len(expected)}


def test_nesting_at_the_limit_is_delivered_and_deeper_refused(
    dsn: str, cio: FakeCustomerIO
) -> None:
    ok = event("evt-deep", "cus-deep", properties={"d": nested(MAX_DEPTH - 1)})
    ok["customer"]["funnel_data"] = {"d": nested(MAX_DEPTH - 1)}
    with psycopg.connect(dsn) as conn:
        assert record_event(conn, ok).written == 2
        for where in ("properties", "funnel_data"):
            bad = event(f"evt-{where}", "cus-x", properties={"d": nested(MAX_DEPTH)})
            if where == "funnel_data":
                bad = event(f"evt-{where}", "cus-x")
                bad["customer"]["funnel_data"] = {"d": nested(MAX_DEPTH)}
            with pytest.raises(InvalidEvent, match=f"deeper than {MAX_DEPTH}"):
                record_event(conn, bad)
        # Far beyond any recursion limit: refused, not a RecursionError.
        with pytest.raises(InvalidEvent):
            record_event(conn, event("evt-abyss", "cus-y", properties={"d": nested(100_000)}))
        assert_usable_after_error(conn, 0)
        conn.commit()
    drain_all(dsn, cio)
    assert_delivered_verbatim(dsn, cio, {m.message_id: dict(m.body) for m in map_event(ok)})


# --- input that passes validation but cannot arrive -------------------------------------------


@pytest.mark.parametrize("stamp", ["2026-11-28T10:00:00Z\x00", "2026-11-28T10:00:00\x00Z"])
def test_a_timestamp_with_a_nul_is_refused(conn: Conn, stamp: str) -> None:
    with pytest.raises(InvalidEvent, match="NUL"):
        record_event(conn, event("evt-nul-time", "cus-nul-time", occurred_at=stamp))


@pytest.mark.parametrize("where", ["properties", "created_at"])
def test_an_integer_too_long_for_json_is_refused_as_invalid(conn: Conn, where: str) -> None:
    doc = event("evt-bigint", "cus-bigint")
    if where == "properties":
        doc["properties"] = {"n": 10**5000}
    else:
        doc["customer"]["created_at"] = 10**5000
    with pytest.raises(InvalidEvent):
        record_event(conn, doc)
    assert_usable_after_error(conn, 0)


def test_floats_are_measured_as_jsonb_will_send_them(dsn: str, cio: FakeCustomerIO) -> None:
    # jsonb stores numbers as numeric and prints them without an exponent: 1e300 comes back as
    # 301 digits. The size limit counts that spelling, so a message is either refused clearly
    # when recorded or delivered; never recorded and then dead unsent.
    too_big = event("evt-floats-big", "cus-floats", properties={"v": [1e300] * 200})
    assert len(json.dumps(too_big["properties"])) < 2_000  # small as Python encodes it
    fits = event("evt-floats", "cus-floats", properties={"v": [1e300] * 50, "w": 1e-07})
    with psycopg.connect(dsn) as conn:
        with pytest.raises(InvalidEvent) as info:
            record_event(conn, too_big)
        assert info.value.field == "properties" and "32768" in info.value.reason
        assert record_event(conn, fits).written == 2
        conn.commit()
    drain_all(dsn, cio)
    assert_delivered_verbatim(dsn, cio, {m.message_id: dict(m.body) for m in map_event(fits)})


# --- keys at the limits of PostgreSQL's indexes -----------------------------------------------


def text_of_bytes(size: int, seed: int) -> str:
    """Random text of exactly ``size`` UTF-8 bytes, mixing 1- to 4-byte characters: nothing a
    btree's compression could shrink, so the index must take it at its full length."""
    rng = random.Random(seed)
    chars: list[str] = []
    left = size
    while left:
        width = rng.randint(1, min(4, left))
        if width == 1:
            code = rng.randrange(0x21, 0x7F)
        elif width == 2:
            code = rng.randrange(0x80, 0x800)
        elif width == 3:
            code = rng.choice([rng.randrange(0x800, 0xD800), rng.randrange(0xE000, 0x10000)])
        else:
            code = rng.randrange(0x10000, 0x110000)
        chars.append(chr(code))
        left -= width
    text = "".join(chars)
    assert len(text.encode()) == size
    return text


def event_with_longest_keys(n: int) -> dict[str, Any]:
    doc = event(
        text_of_bytes(MAX_EVENT_ID_BYTES, 4 * n), text_of_bytes(MAX_CUSTOMER_KEY_BYTES, 4 * n + 1)
    )
    at = "@example.com"
    doc["customer"]["email"] = text_of_bytes(MAX_CUSTOMER_KEY_BYTES - len(at), 4 * n + 2) + at
    doc["customer"]["project_id"] = text_of_bytes(MAX_PROJECT_ID_BYTES, 4 * n + 3)
    return doc


def test_keys_at_their_limits_fit_every_index_and_one_byte_more_is_refused(
    dsn: str, cio: FakeCustomerIO
) -> None:
    by_id, by_email = event_with_longest_keys(0), event_with_longest_keys(1)
    with psycopg.connect(dsn) as conn:
        assert record_event(conn, by_id).written == 2
        # With user_key="email" the longest email is the customer key in the indexes.
        assert record_event(conn, by_email, mapping=MappingConfig(user_key="email")).written == 2
        for n, (path, limit) in enumerate(
            [
                (("id",), MAX_EVENT_ID_BYTES),
                (("customer", "id"), MAX_CUSTOMER_KEY_BYTES),
                (("customer", "email"), MAX_CUSTOMER_KEY_BYTES),
                (("customer", "project_id"), MAX_PROJECT_ID_BYTES),
            ]
        ):
            doc = copy.deepcopy(event_with_longest_keys(2 + n))
            holder = doc if len(path) == 1 else doc["customer"]
            holder[path[-1]] = "x" + holder[path[-1]]  # one byte more
            with pytest.raises(InvalidEvent) as info:
                record_event(conn, doc)
            assert info.value.field == ".".join(path)
            assert (
                f"is {limit + 1} bytes in UTF-8, over the {limit}-byte limit" in info.value.reason
            )
            assert_usable_after_error(conn, n)
        conn.commit()
    lengths = query(
        dsn,
        "SELECT DISTINCT octet_length(customer_key), octet_length(project_id) FROM relay_outbox"
        " WHERE project_id IS NOT NULL",
    )
    assert lengths == [(MAX_CUSTOMER_KEY_BYTES, MAX_PROJECT_ID_BYTES)]

    # No destination at all: every row is held, so the longest project id is in the held index.
    ok, _ = drain(make_relay(dsn, cio, write_key=None), 10)
    assert ok and states(dsn) == {"held": 12}
    # A destination for it (its primary key takes the longest id too): everything goes out.
    with psycopg.connect(dsn) as conn:
        for doc in (by_id, by_email):
            conn.execute(
                "INSERT INTO relay_destination (project_id, region, api_url, write_key)"
                " VALUES (%s, 'us', %s, %s)",
                (doc["customer"]["project_id"], cio.url, KEY),
            )
        conn.commit()
    drain_all(dsn, cio)
    assert states(dsn) == {"delivered": 12}
    assert {i["userId"] for i in cio.accepted_items()} >= {
        by_id["customer"]["id"],
        by_email["customer"]["email"],
    }


def test_a_row_written_by_sql_with_an_over_long_project_id_dies_alone(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # README "From SQL": nothing checks what an application inserts by hand. 6,000 bytes of
    # hex cannot be held (relay_outbox_held_idx would refuse the entry), and a claim that
    # tried failed as a whole, every cycle, for every customer behind it.
    too_long = random.Random(7).randbytes(3000).hex()
    # A long key PostgreSQL did store (it compresses well) is harmless: sent like any other.
    compressible = "k" * 6000
    with psycopg.connect(dsn) as conn:
        for n, (customer, project) in enumerate([("cus_sql", too_long), (compressible, None)]):
            body = {
                "type": "track",
                "userId": customer,
                "event": "purchase.complete",
                "properties": {"n": n},
                "timestamp": "2026-11-28T10:00:00.000Z",
                "messageId": f"evt_sql_{n}:track",
            }
            conn.execute(
                "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, project_id,"
                " event_type, body, occurred_at)"
                " VALUES (%s, %s, 'track', %s, %s, 'purchase.complete', %s, now())",
                (body["messageId"], f"evt_sql_{n}", customer, project, json.dumps(body)),
            )
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, api_url, write_key)"
            " VALUES ('prj_ok', 'us', %s, %s)",
            (cio.url, KEY),
        )
        for n in range(3):
            doc = event(f"evt-ok-{n}", f"cus-ok-{n}")
            doc["customer"]["project_id"] = "prj_ok"
            record_event(conn, doc)
        conn.commit()

    # The compressible key's row has no project and there is no default destination: held.
    ok, _ = drain(make_relay(dsn, cio, write_key=None), 10)
    assert ok, states(dsn)
    rows = query(dsn, "SELECT customer_key, state, last_error FROM relay_outbox ORDER BY id")
    assert [r[1] for r in rows] == ["dead", "held"] + ["delivered"] * 6
    reason = rows[0][2]
    assert "project_id" in reason and f"{MAX_PROJECT_ID_BYTES}-byte limit" in reason, reason
    assert len(reason) < 500  # names the problem without repeating the 6,000 bytes
    assert len(cio.accepted_items()) == 6
    # With a default destination the stored long key goes out like any other.
    drain_all(dsn, cio)
    assert [r[0] for r in query(dsn, "SELECT state FROM relay_outbox ORDER BY id")] == [
        "dead",
        "delivered",
        *["delivered"] * 6,
    ]
    assert compressible in {i["userId"] for i in cio.accepted_items()}


# --- the size Customer.io counts --------------------------------------------------------------

# Strings of any storable character, emoji, DEL and control characters included; floats whose
# spelling jsonb keeps (test_floats_are_measured_as_jsonb_will_send_them covers exponents;
# jsonb stores -0.0 as 0.0, one byte shorter).
sdk_text = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
sdk_float = st.floats(allow_nan=False, allow_infinity=False).filter(
    lambda f: "e" not in repr(f) and repr(f) != "-0.0"
)
sdk_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**20), 10**20), sdk_float, sdk_text),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(sdk_text, inner, max_size=4)
    ),
    max_leaves=15,
)


def test_record_event_accepts_exactly_the_messages_customerio_measures_within_the_limit(
    dsn: str,
) -> None:
    counter = itertools.count()
    outcomes = {"accepted": 0, "refused": 0}
    with psycopg.connect(dsn) as conn:

        @settings(
            max_examples=FUZZ_EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
            database=None,
        )
        @given(
            value=st.dictionaries(sdk_text, sdk_value, max_size=5),
            where=st.sampled_from(["traits", "properties"]),
            pad=st.sampled_from(["x", "é", "€", "🔥", "\x7f", "\x01", '"']),
            delta=st.integers(-40, 40),
        )
        def check(value: dict[str, Any], where: str, pad: str, delta: int) -> None:
            n = next(counter)
            conn.rollback()
            free: dict[str, Any] = {"v": value, "pad": ""}
            doc = event(f"evt-sdk-{n}", f"cus-sdk-{n}")
            if where == "traits":
                doc["customer"]["funnel_data"] = free
            else:
                doc["properties"] = free
            # The message without its pad, to aim the pad at the limit, within +-40 bytes.
            identify, track = map_event(doc)
            message = dict((identify if where == "traits" else track).body)
            room = MAX_MESSAGE_BYTES - len(json.dumps(message)) + delta
            free["pad"] = pad * max(0, room // (len(json.dumps(pad)) - 2))
            # The message Customer.io would get, measured as its SDK measures it.
            if where == "traits":
                message["traits"] = {**message["traits"], "funnelData": free}
            else:
                message["properties"] = free
            size = len(json.dumps(message))
            try:
                result = record_event(conn, doc)
            except InvalidEvent as exc:
                outcomes["refused"] += 1
                assert size > MAX_MESSAGE_BYTES, (size, exc)
                assert exc.field == where
                assert f"is {size} bytes" in exc.reason
                assert_usable_after_error(conn, n)
                return
            outcomes["accepted"] += 1
            assert size <= MAX_MESSAGE_BYTES
            # What is stored, as the planner measures it before sending: the same size.
            kind = 0 if where == "traits" else 1
            stored = conn.execute(
                "SELECT body::text FROM relay_outbox WHERE message_id = %s",
                (result.message_ids[kind],),
            ).fetchone()
            assert stored is not None and text_size(stored[0]) == size

        check()

    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0, outcomes
