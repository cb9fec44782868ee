"""The fake Customer.io CDP server, driven over real HTTP with httpx."""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import os
import selectors
import signal
import ssl
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from relay.testing.fakecio import (
    MAX_ITEM_BYTES,
    MAX_REQUEST_BYTES,
    NO_RESPONSE,
    FakeCustomerIO,
    RequestRecord,
)

KEY = "test-key"
STRICT = {"X-Strict-Mode": "1"}
REPO_ROOT = Path(__file__).resolve().parents[1]

# Every request here is plain HTTP. One TLS context shared by all clients spares each new
# client the tens of milliseconds of loading the CA bundle.
_TLS = ssl.create_default_context()


def http_client(**kwargs: Any) -> httpx.Client:
    return httpx.Client(verify=_TLS, **kwargs)


def identify(user: str = "u1", **extra: Any) -> dict[str, Any]:
    return {"type": "identify", "userId": user, "traits": {"email": f"{user}@example.com"}, **extra}


def track(user: str = "u1", event: str = "purchase.complete", **extra: Any) -> dict[str, Any]:
    return {"type": "track", "userId": user, "event": event, "properties": {}, **extra}


def batch(*items: Any) -> dict[str, Any]:
    return {"batch": list(items), "sentAt": "2024-05-01T12:00:00Z"}


def item_of_size(size: int, char: str = "x") -> dict[str, Any]:
    """A track item exactly ``size`` bytes long as Customer.io's SDK measures it,
    ``len(json.dumps(item))``, padded with ``char`` (and "x" for the remainder)."""
    item = track(properties={"pad": ""})
    room = size - len(json.dumps(item))
    unit = len(json.dumps(char)) - 2
    item["properties"]["pad"] = char * (room // unit) + "x" * (room % unit)
    assert len(json.dumps(item)) == size
    return item


@pytest.fixture
def client(cio: FakeCustomerIO) -> Iterator[httpx.Client]:
    with http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=5.0) as c:
        yield c


def basic_auth(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def last_request(cio: FakeCustomerIO) -> RequestRecord:
    return cio.requests[-1]


# -- success ---------------------------------------------------------------------------------


def test_valid_strict_batch_is_accepted_in_order(cio: FakeCustomerIO, client: httpx.Client) -> None:
    items = [identify("a", messageId="m1"), track("a", messageId="m2"), identify("b")]
    body = json.dumps(batch(*items)).encode()

    response = client.post("/v1/batch", content=body)

    assert response.status_code == 200
    assert response.json() == {}
    assert response.headers["content-length"] == "2"
    assert cio.accepted_items() == items
    assert [a.seq for a in cio.accepted] == [1, 2, 3]
    assert {a.request_no for a in cio.accepted} == {1}
    assert cio.accepted_message_ids() == ["m1", "m2"]
    assert cio.requests == [
        RequestRecord(
            no=1,
            path="/v1/batch",
            status=200,
            strict=True,
            auth_ok=True,
            items=3,
            bytes=len(body),
            fault=None,
            dropped=False,
        )
    ]


def test_single_item_endpoints_store_the_item_with_its_type(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    body = {"userId": "u1", "event": "checkout.start", "timestamp": "2024-05-01T12:00:00+02:00"}

    assert client.post("/v1/identify", json={"userId": "u1"}).status_code == 200
    assert client.post("/v1/track", json=body).status_code == 200

    assert cio.accepted_items() == [
        {"type": "identify", "userId": "u1"},
        {"type": "track", **body},
    ]
    mismatch = client.post("/v1/track", json={"type": "identify", "userId": "u1"})
    assert mismatch.status_code == 400
    assert mismatch.json()["error"].startswith("item 0: ")


def test_lenient_cases_are_accepted(cio: FakeCustomerIO, client: httpx.Client) -> None:
    items = [
        identify("", anonymousId="anon-1"),
        track(timestamp="2024-05-01T12:00:00.123456Z"),
        {"type": "page", "name": "home"},
    ]
    assert client.post("/v1/batch", json={"batch": items}).status_code == 200
    assert client.post("/v1/batch", json={"batch": []}).status_code == 200
    assert cio.accepted_items() == items


# -- auth and strict mode ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth_header",
    [
        None,
        basic_auth("wrong-key", ""),
        basic_auth(KEY, "a-password"),
        f"Bearer {KEY}",
        "Basic !!!not-base64",
    ],
    ids=["missing", "wrong-key", "non-empty-password", "bearer", "garbage"],
)
def test_bad_auth_is_401_in_strict_mode_and_a_silent_drop_without(
    cio: FakeCustomerIO, auth_header: str | None
) -> None:
    headers = {} if auth_header is None else {"Authorization": auth_header}
    with http_client(base_url=cio.url, headers=headers) as c:
        strict = c.post("/v1/batch", json=batch(identify()), headers=STRICT)
        lenient = c.post("/v1/batch", json=batch(identify()))

    assert strict.status_code == 401
    assert "write key" in strict.json()["error"]
    assert lenient.status_code == 200
    assert lenient.json() == {}
    assert cio.accepted == []
    assert [(r.status, r.auth_ok, r.dropped) for r in cio.requests] == [
        (401, False, False),
        (200, False, True),
    ]
    assert cio.stats()["dropped"] == 1
    assert cio.stats()["dropped_items"] == 1


def test_write_keys_can_change_at_runtime(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.remove_write_key(KEY)
    assert client.post("/v1/batch", json=batch(identify())).status_code == 401

    cio.add_write_key(KEY)
    assert client.post("/v1/batch", json=batch(identify())).status_code == 200
    assert cio.write_keys == frozenset({KEY})
    assert len(cio.accepted) == 1


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad_item", "reason"),
    [
        (42, "must be a JSON object"),
        ({"userId": "u1"}, "'type' must be one of"),
        ({"type": "purchase", "userId": "u1"}, "'type' must be one of"),
        ({"type": "identify", "traits": {}}, "identify requires a non-empty 'userId'"),
        ({"type": "identify", "userId": ""}, "identify requires a non-empty 'userId'"),
        ({"type": "identify", "userId": 17}, "identify requires a non-empty 'userId'"),
        ({"type": "track", "userId": "u1"}, "track requires a non-empty 'event'"),
        ({"type": "track", "userId": "u1", "event": ""}, "track requires a non-empty 'event'"),
        ({"type": "track", "event": "e"}, "track requires a non-empty 'userId'"),
        (identify(traits=["a"]), "'traits' must be an object"),
        (track(properties="x"), "'properties' must be an object"),
        (identify(context=None), "'context' must be an object"),
        (identify(messageId=17), "'messageId' must be a string"),
        (identify(timestamp="yesterday"), "'timestamp' must be an ISO-8601 string"),
        (identify(timestamp=1714564800), "'timestamp' must be an ISO-8601 string"),
    ],
)
def test_an_invalid_item_rejects_the_whole_batch_naming_it(
    cio: FakeCustomerIO, client: httpx.Client, bad_item: Any, reason: str
) -> None:
    response = client.post("/v1/batch", json=batch(identify("ok-1"), bad_item, identify("ok-2")))

    assert response.status_code == 400
    error = response.json()["error"]
    assert error.startswith("item 1: ")
    assert reason in error
    assert cio.accepted == []
    assert last_request(cio).status == 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"batch": [{"type": "identify", "userId": "u", "traits": {"n": NaN}}]}', "NaN"),
        (b"[]", "must be a JSON object"),
        (b"{}", "'batch' is missing"),
        (b'{"batch": {}}', "'batch' must be a list"),
        (b'{"batch": [], "context": []}', "'context' must be an object"),
        (b'{"batch": [], "sentAt": 1714564800}', "'sentAt' must be an ISO-8601 string"),
    ],
)
def test_an_invalid_body_is_400(
    cio: FakeCustomerIO, client: httpx.Client, body: bytes, reason: str
) -> None:
    response = client.post("/v1/batch", content=body)

    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert cio.accepted == []


def test_an_invalid_batch_without_strict_mode_is_200_and_dropped(cio: FakeCustomerIO) -> None:
    with http_client(base_url=cio.url, auth=(KEY, "")) as c:
        response = c.post("/v1/batch", json=batch(identify(), track(event="")))

    assert response.status_code == 200
    assert response.json() == {}
    assert cio.accepted == []
    assert (last_request(cio).dropped, last_request(cio).strict) == (True, False)


@pytest.mark.parametrize("char", ["x", "é", "🔥", "\x7f"])
def test_item_size_limit_is_32768_bytes_as_the_sdk_measures_it(
    cio: FakeCustomerIO, client: httpx.Client, char: str
) -> None:
    at_limit = item_of_size(MAX_ITEM_BYTES, char)
    over_limit = item_of_size(MAX_ITEM_BYTES + 1, char)

    assert client.post("/v1/batch", json=batch(at_limit)).status_code == 200
    response = client.post("/v1/batch", json=batch(identify(), over_limit))

    assert response.status_code == 400
    assert response.json()["error"].startswith("item 1: 32769 bytes")
    assert cio.accepted_items() == [at_limit]


@pytest.mark.parametrize("text", ["é" * 6000, "🔥" * 3000])
def test_item_size_counts_ascii_escapes_not_utf8_bytes(client: httpx.Client, text: str) -> None:
    # 12,000 bytes of UTF-8 but 36,000 once each "é" is written \u00e9 (an emoji is a
    # 12-byte surrogate pair): over the limit as Customer.io's SDK counts it.
    item = track(properties={"name": text})
    assert len(json.dumps(item, ensure_ascii=False).encode()) < MAX_ITEM_BYTES

    response = client.post("/v1/batch", json=batch(item))

    assert response.status_code == 400
    assert "over the 32768-byte limit" in response.json()["error"]


def request_body_of_size(size: int) -> bytes:
    """A valid batch body of exactly ``size`` bytes (trailing whitespace is valid JSON)."""
    items = [item_of_size(30_000) for _ in range(size // 30_500)]
    body = json.dumps(batch(*items)).encode()
    assert len(body) <= size
    return body + b" " * (size - len(body))


def test_request_size_limit_is_512000_bytes(cio: FakeCustomerIO, client: httpx.Client) -> None:
    at_limit = request_body_of_size(MAX_REQUEST_BYTES)
    over_limit = request_body_of_size(MAX_REQUEST_BYTES + 1)

    assert client.post("/v1/batch", content=at_limit).status_code == 200
    accepted = len(cio.accepted)
    response = client.post("/v1/batch", content=over_limit)

    assert accepted > 0
    assert response.status_code == 400
    assert "512001 bytes, over the 512000-byte limit" in response.json()["error"]
    assert len(cio.accepted) == accepted
    with http_client(base_url=cio.url, auth=(KEY, "")) as lenient:
        assert lenient.post("/v1/batch", content=over_limit).status_code == 200
    assert last_request(cio).dropped
    assert len(cio.accepted) == accepted


def test_reject_hook_refuses_the_whole_request(cio: FakeCustomerIO, client: httpx.Client) -> None:
    def poisoned(item: dict[str, Any]) -> str | None:
        return "poisoned message" if item.get("properties", {}).get("poison") else None

    cio.reject = poisoned
    bad = client.post("/v1/batch", json=batch(track(), track(properties={"poison": True})))
    good = client.post("/v1/batch", json=batch(track(messageId="fine")))

    assert bad.status_code == 400
    assert bad.json() == {"error": "item 1: poisoned message"}
    assert good.status_code == 200
    assert cio.accepted_message_ids() == ["fine"]


# -- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["500", "502", "503", "401"])
def test_scripted_status_faults_accept_nothing(
    cio: FakeCustomerIO, client: httpx.Client, kind: str
) -> None:
    cio.script([kind])

    faulted = client.post("/v1/batch", json=batch(identify()))
    after = client.post("/v1/batch", json=batch(identify()))

    assert faulted.status_code == int(kind)
    assert after.status_code == 200
    assert len(cio.accepted) == 1
    assert cio.fault_counts == {kind: 1}
    assert [r.fault for r in cio.requests] == [kind, None]


def test_scripted_5xx_answers_one_of_500_502_503(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.script(["5xx"] * 5)

    statuses = [client.post("/v1/batch", json=batch(identify())).status_code for _ in range(5)]

    assert set(statuses) <= {500, 502, 503}
    assert sum(cio.fault_counts.values()) == 5
    assert cio.accepted == []


def test_scripted_429_sends_retry_after(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.script(["429", "429"])

    first = client.post("/v1/batch", json=batch(identify()))
    cio.retry_after_s = 0.25
    second = client.post("/v1/batch", json=batch(identify()))

    assert (first.status_code, first.headers["retry-after"]) == (429, "1")
    assert (second.status_code, second.headers["retry-after"]) == (429, "0.25")
    assert cio.accepted == []
    assert cio.fault_counts == {"429": 2}


def test_scripted_drop_closes_the_connection_without_a_response(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    cio.script(["drop", "ok"])

    with pytest.raises(httpx.TransportError):
        client.post("/v1/batch", json=batch(identify()))
    after = client.post("/v1/batch", json=batch(identify("after")))

    assert after.status_code == 200
    assert cio.accepted_items() == [identify("after")]
    assert [(r.status, r.fault) for r in cio.requests] == [(NO_RESPONSE, "drop"), (200, None)]


def test_scripted_faults_are_used_in_order(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.script(["500", "ok", "429"])

    statuses = [client.post("/v1/batch", json=batch(identify())).status_code for _ in range(4)]

    assert statuses == [500, 200, 429, 200]


def test_slow_fault_times_the_client_out_but_stores_the_items(cio: FakeCustomerIO) -> None:
    cio.slow_s = 0.5
    cio.script(["slow"])
    item = identify(messageId="late")

    with (
        http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=0.1) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/batch", json=batch(item))

    assert cio.wait_for(lambda: cio.accepted_message_ids() == ["late"], timeout=5.0)
    assert cio.fault_counts == {"slow": 1}


def test_timeout_edge_answers_after_edge_s_and_stores_the_items(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    cio.edge_s = 0.3
    cio.script(["timeout_edge"])
    started = time.monotonic()

    response = client.post("/v1/batch", json=batch(identify(messageId="edge")))

    assert response.status_code == 200
    assert time.monotonic() - started >= 0.3
    assert cio.accepted_message_ids() == ["edge"]
    assert [(r.status, r.fault) for r in cio.requests] == [(200, "timeout_edge")]


def test_timeout_edge_past_the_client_deadline_is_a_timeout_yet_stored(
    cio: FakeCustomerIO,
) -> None:
    cio.edge_s = 0.4
    cio.script(["timeout_edge"])

    with (
        http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=0.2) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/batch", json=batch(identify(messageId="late-edge")))

    assert cio.wait_for(lambda: cio.accepted_message_ids() == ["late-edge"], timeout=5.0)


def test_trickle_sends_200_at_once_then_a_body_that_never_completes(
    cio: FakeCustomerIO,
) -> None:
    cio.trickle_s = 0.6
    cio.trickle_interval_s = 0.1
    cio.script(["trickle"])
    received = bytearray()
    started = time.monotonic()

    with (
        http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=5.0) as c,
        c.stream("POST", "/v1/batch", json=batch(identify(messageId="t1"))) as response,
    ):
        headers_after = time.monotonic() - started
        assert response.status_code == 200
        # The items are stored before the answer starts.
        assert cio.accepted_message_ids() == ["t1"]
        declared = int(response.headers["content-length"])
        with pytest.raises(httpx.RemoteProtocolError):
            for chunk in response.iter_raw():
                received.extend(chunk)

    assert headers_after < 0.3
    assert 1 <= len(received) < declared
    assert bytes(received) == (b"{}" + b" " * 64)[: len(received)]
    assert time.monotonic() - started >= 0.5
    assert [(r.status, r.fault) for r in cio.requests] == [(200, "trickle")]


def test_the_relay_client_counts_a_trickled_200_as_delivered(cio: FakeCustomerIO) -> None:
    from relay.client import CustomerIOClient, Destination

    cio.trickle_s = 3.0
    cio.trickle_interval_s = 0.2
    cio.script(["trickle"])
    item = json.dumps(identify(messageId="t2"), separators=(",", ":")).encode()

    with CustomerIOClient(Destination("default", cio.url, KEY), timeout_s=0.5) as client:
        started = time.monotonic()
        result = client.send_batch([item])

    assert result.status_code == 200
    assert result.body_complete is False
    assert time.monotonic() - started < 1.5  # the deadline, not the trickle, ends it
    assert cio.accepted_message_ids() == ["t2"]


def test_trickle_answers_a_refused_request_normally(cio: FakeCustomerIO) -> None:
    cio.script(["trickle"])
    with http_client(base_url=cio.url, auth=("wrong", ""), headers=STRICT, timeout=2.0) as c:
        response = c.post("/v1/batch", json=batch(identify()))

    assert response.status_code == 401
    assert cio.accepted == []


def test_hang_reads_the_request_and_never_answers(cio: FakeCustomerIO) -> None:
    cio.hang_s = 0.5
    cio.script(["hang"])

    with (
        http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=0.2) as c,
        pytest.raises(httpx.ReadTimeout),
    ):
        c.post("/v1/batch", json=batch(identify(messageId="hung")))

    assert cio.requests_arrived == 1
    assert cio.wait_for(lambda: len(cio.requests) == 1, timeout=5.0)
    assert [(r.status, r.fault) for r in cio.requests] == [(NO_RESPONSE, "hang")]
    assert cio.accepted == []


def test_reset_closes_the_connection_with_rst(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.script(["reset", "ok"])

    with pytest.raises(httpx.ReadError, match="reset"):
        client.post("/v1/batch", json=batch(identify(messageId="gone")))
    after = client.post("/v1/batch", json=batch(identify("after", messageId="after")))

    assert after.status_code == 200
    assert cio.accepted_message_ids() == ["after"]
    assert [(r.status, r.fault) for r in cio.requests] == [(NO_RESPONSE, "reset"), (200, None)]


def arrived(cio: FakeCustomerIO, n: int) -> bool:
    return cio.requests_arrived == n


def test_stop_is_prompt_with_hanging_and_trickling_connections(cio: FakeCustomerIO) -> None:
    cio.hang_s = 30.0
    cio.trickle_s = 30.0
    cio.trickle_interval_s = 1.0
    cio.slow_s = 30.0
    cio.edge_s = 30.0
    cio.script(["hang", "trickle", "slow", "timeout_edge"])
    outcomes: list[str] = []
    lock = threading.Lock()

    def post(n: int) -> None:
        with http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT, timeout=60.0) as c:
            try:
                c.post("/v1/batch", json=batch(identify(f"u{n}")))
                outcome = "answered"
            except httpx.TransportError as exc:
                outcome = type(exc).__name__
        with lock:
            outcomes.append(outcome)

    posters = []
    for n in range(4):
        posters.append(threading.Thread(target=post, args=(n,)))
        posters[-1].start()
        # One at a time, so the script's faults go to the requests in this order.
        assert cio.wait_for(partial(arrived, cio, n + 1), timeout=5.0)
    assert cio.wait_for(lambda: len(cio.requests) == 1, timeout=5.0)  # trickle's 200 recorded
    started = time.monotonic()
    cio.stop()
    for poster in posters:
        poster.join(timeout=5.0)

    assert time.monotonic() - started < 1.5
    assert len(outcomes) == 4 and "answered" not in outcomes
    # Only the trickle had stored its items (before answering); the rest were abandoned.
    assert cio.accepted_items() == [identify("u1")]
    assert sorted((r.fault or "", r.status) for r in cio.requests) == [
        ("hang", NO_RESPONSE),
        ("slow", NO_RESPONSE),
        ("timeout_edge", NO_RESPONSE),
        ("trickle", 200),
    ]


def test_latency_is_added_to_every_request(cio: FakeCustomerIO, client: httpx.Client) -> None:
    cio.latency_s = 0.05
    started = time.monotonic()

    assert client.post("/v1/batch", json=batch(identify())).status_code == 200

    assert time.monotonic() - started >= 0.05


def fault_sequence(seed: int, requests: int = 60) -> list[str | None]:
    with FakeCustomerIO(write_keys={KEY}, slow_s=0.0) as server:
        server.set_fault_rates({"5xx": 0.3, "429": 0.2, "drop": 0.1, "slow": 0.1}, seed=seed)
        with http_client(base_url=server.url, auth=(KEY, ""), headers=STRICT) as c:
            for _ in range(requests):
                with contextlib.suppress(httpx.TransportError):  # a "drop"
                    c.post("/v1/batch", json=batch(identify()))
        return [r.fault for r in server.requests]


def test_random_faults_with_a_seed_are_reproducible() -> None:
    first, again, other = fault_sequence(7), fault_sequence(7), fault_sequence(8)

    assert first == again
    assert first != other
    assert {"429", "drop", "slow", None} <= set(first)
    assert set(first) & {"500", "502", "503"}


def test_random_draws_include_the_connection_faults() -> None:
    kinds = {"trickle": 0.2, "timeout_edge": 0.2, "hang": 0.2, "reset": 0.2}
    with FakeCustomerIO(
        write_keys={KEY}, edge_s=0.0, trickle_s=0.02, trickle_interval_s=0.01, hang_s=0.02
    ) as server:
        server.set_fault_rates(kinds, seed=5)
        with http_client(base_url=server.url, auth=(KEY, ""), headers=STRICT, timeout=2.0) as c:
            for _ in range(40):
                with contextlib.suppress(httpx.TransportError):
                    c.post("/v1/batch", json=batch(identify()))
        assert server.wait_for(lambda: len(server.requests) == 40, timeout=5.0)
        faults = {r.fault for r in server.requests}
        stored = sum(r.status == 200 for r in server.requests)

    assert faults == {"trickle", "timeout_edge", "hang", "reset", None}
    # ok, timeout_edge and trickle store; hang and reset do not.
    assert len(server.accepted) == stored


def test_the_command_line_sets_the_connection_faults_and_their_timings() -> None:
    from relay.testing.fakecio import _arg_parser

    args = _arg_parser().parse_args(
        [
            "--write-key",
            KEY,
            "--faults",
            "trickle=0.1,timeout_edge=0.1,hang=0.05,reset=0.05",
            "--edge-s",
            "0.8",
            "--trickle-s",
            "2",
            "--trickle-interval-s",
            "0.25",
            "--hang-s",
            "5",
        ]
    )

    assert args.faults == {"trickle": 0.1, "timeout_edge": 0.1, "hang": 0.05, "reset": 0.05}
    assert (args.edge_s, args.trickle_s, args.trickle_interval_s, args.hang_s) == (
        0.8,
        2.0,
        0.25,
        5.0,
    )
    FakeCustomerIO(write_keys={KEY}).set_fault_rates(args.faults)  # all known kinds


@pytest.mark.parametrize(
    "rates",
    [{"teapot": 0.1}, {"5xx": 1.5}, {"5xx": -0.1}, {"5xx": 0.6, "429": 0.6}],
)
def test_bad_fault_rates_are_refused(cio: FakeCustomerIO, rates: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        cio.set_fault_rates(rates)


def test_unknown_scripted_fault_is_refused(cio: FakeCustomerIO) -> None:
    with pytest.raises(ValueError, match="teapot"):
        cio.script(["500", "teapot"])
    assert cio.stats()["faults"] == {}


# -- connections and lifecycle -----------------------------------------------------------------


def test_keep_alive_serves_many_requests_on_one_connection(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    statuses = [
        client.post("/v1/batch", json=batch(identify(f"u{i}"))).status_code for i in range(20)
    ]

    assert statuses == [200] * 20
    assert cio.connections_accepted == 1
    assert len(cio.accepted) == 20


def test_stop_is_prompt_with_a_slow_request_and_an_idle_connection(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    assert client.post("/v1/batch", json=batch(identify())).status_code == 200
    cio.slow_s = 30.0
    cio.script(["slow"])
    errors: list[Exception] = []

    def post_slow() -> None:
        with http_client(base_url=cio.url, auth=(KEY, ""), headers=STRICT) as c:
            try:
                c.post("/v1/batch", json=batch(identify("never")))
            except httpx.TransportError as exc:
                errors.append(exc)

    poster = threading.Thread(target=post_slow)
    poster.start()
    # The slow request is recorded only when it ends; its fault is drawn when it arrives.
    assert cio.wait_for(lambda: cio.fault_counts.get("slow") == 1, timeout=5.0)
    started = time.monotonic()
    cio.stop()
    poster.join(timeout=5.0)

    assert time.monotonic() - started < 1.0
    assert len(errors) == 1
    assert identify("never") not in cio.accepted_items()
    assert last_request(cio).status == NO_RESPONSE


def test_a_stopped_server_refuses_connections_and_restarts_on_the_same_port(
    cio: FakeCustomerIO,
) -> None:
    url = cio.url
    cio.stop()
    with http_client(auth=(KEY, ""), headers=STRICT) as c:
        with pytest.raises(httpx.ConnectError):
            c.post(f"{url}/v1/batch", json=batch(identify()))
        cio.start()
        assert cio.url == url
        assert c.post(f"{url}/v1/batch", json=batch(identify())).status_code == 200


def test_wait_for_returns_false_at_its_deadline(cio: FakeCustomerIO) -> None:
    started = time.monotonic()

    assert cio.wait_for(lambda: len(cio.accepted) > 0, timeout=0.05) is False
    assert time.monotonic() - started >= 0.05


def test_reset_forgets_records_and_pending_script(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    client.post("/v1/batch", json=batch(identify()))
    cio.script(["500", "500"])
    client.post("/v1/batch", json=batch(identify()))

    cio.reset()
    response = client.post("/v1/batch", json=batch(identify("fresh")))

    assert response.status_code == 200
    assert [(a.seq, a.request_no) for a in cio.accepted] == [(1, 1)]
    assert cio.fault_counts == {}
    assert len(cio.requests) == 1


def test_unknown_path_is_404(cio: FakeCustomerIO, client: httpx.Client) -> None:
    assert client.post("/v1/batches", json=batch(identify())).status_code == 404
    assert client.get("/v1/batch").status_code == 404
    assert cio.accepted == []


# -- out-of-process views -----------------------------------------------------------------------


def test_fake_endpoints_report_received_items_and_stats(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    cio.script(["503"])
    client.post("/v1/batch", json=batch(identify()))
    client.post("/v1/batch", json=batch(identify("a", messageId="m1"), track("a")))
    client.post("/v1/batch", json=batch(track(event="")))
    with http_client(base_url=cio.url) as lenient:
        lenient.post("/v1/batch", json=batch(identify()))

    received = client.get("/_fake/received").json()
    stats = client.get("/_fake/stats").json()

    assert received == {
        "accepted": [
            {"seq": 1, "request_no": 2, "item": identify("a", messageId="m1")},
            {"seq": 2, "request_no": 2, "item": track("a")},
        ]
    }
    assert stats["requests"] == 4
    assert stats["requests_by_status"] == {"503": 1, "200": 2, "400": 1}
    assert stats["faults"] == {"503": 1}
    assert stats["accepted"] == 2
    assert stats["dropped"] == 1
    assert stats["dropped_items"] == 1


def read_line_with_deadline(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output within {timeout} s")
    return proc.stdout.readline().decode().strip()


@pytest.mark.parametrize("module", ["relay.testing.fakecio"])
def test_cli_prints_its_url_serves_and_stops_on_sigterm(module: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable,
        "-m",
        module,
        "--port",
        "0",
        "--write-key",
        KEY,
        "--faults",
        "5xx=0,429=0",
        "--seed",
        "3",
    ]
    with subprocess.Popen(
        command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    ) as proc:
        try:
            line = read_line_with_deadline(proc, timeout=10.0)
            assert line.startswith("listening on http://127.0.0.1:")
            url = line.removeprefix("listening on ")
            with http_client(base_url=url, auth=(KEY, ""), headers=STRICT) as c:
                assert c.post("/v1/batch", json=batch(identify())).status_code == 200
                assert c.get("/_fake/stats").json()["accepted"] == 1

            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5.0) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.stderr is not None
        assert proc.stderr.read() == b""


# -- gzip request bodies ---------------------------------------------------------------------

GZIP = {"Content-Encoding": "gzip"}


def test_a_gzip_body_is_decompressed_and_accepted(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    items = [identify("a", messageId="m1"), track("a", messageId="m2")]
    body = json.dumps({**batch(*items), "context": {"library": {"name": "x", "version": "1"}}})
    raw = body.encode()
    wire = gzip.compress(raw)

    response = client.post("/v1/batch", content=wire, headers=GZIP)

    assert response.status_code == 200
    assert cio.accepted_items() == items
    record = last_request(cio)
    assert (record.content_encoding, record.bytes, record.wire_bytes) == (
        "gzip",
        len(raw),
        len(wire),
    )
    assert record.context == {"library": {"name": "x", "version": "1"}}
    assert cio.stats()["gzipped"] == 1


def test_a_body_of_several_gzip_members_is_their_concatenation(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    raw = json.dumps(batch(identify("a"), track("a"))).encode()
    wire = gzip.compress(raw[:10]) + gzip.compress(raw[10:])

    response = client.post("/v1/batch", content=wire, headers={"Content-Encoding": "x-gzip"})

    assert response.status_code == 200
    assert cio.accepted_items() == [identify("a"), track("a")]


def test_an_uncompressed_body_records_no_encoding(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    raw = json.dumps(batch(identify())).encode()

    assert client.post("/v1/batch", content=raw).status_code == 200
    record = last_request(cio)
    assert (record.content_encoding, record.wire_bytes, record.bytes) == (None, None, len(raw))
    assert record.context is None
    assert cio.stats()["gzipped"] == 0


def _corrupt_crc(data: bytes) -> bytes:
    # The trailer is CRC-32 then ISIZE, 4 bytes each.
    return data[:-8] + bytes([data[-8] ^ 0xFF]) + data[-7:]


_VALID = gzip.compress(json.dumps(batch(identify())).encode())


@pytest.mark.parametrize(
    ("wire", "encoding", "reason"),
    [
        (json.dumps(batch(identify())).encode(), "gzip", "not valid gzip: Error -3"),
        (_VALID[:-5], "gzip", "not valid gzip: it ends before the end of the gzip stream"),
        (b"", "gzip", "not valid gzip: it ends before the end of the gzip stream"),
        (_corrupt_crc(_VALID), "gzip", "not valid gzip: Error -3"),
        (_VALID + b"trailing", "gzip", "not valid gzip: Error -3"),
        (_VALID, "br", "Content-Encoding 'br' is not supported"),
    ],
    ids=["plain-json", "truncated", "empty", "bad-crc", "trailing-garbage", "brotli"],
)
def test_a_body_that_cannot_be_decoded_is_400_naming_the_reason(
    cio: FakeCustomerIO, client: httpx.Client, wire: bytes, encoding: str, reason: str
) -> None:
    response = client.post("/v1/batch", content=wire, headers={"Content-Encoding": encoding})

    assert response.status_code == 400
    assert reason in response.json()["error"]
    assert cio.accepted == []
    record = last_request(cio)
    assert (record.content_encoding, record.wire_bytes, record.items) == (encoding, len(wire), 0)


def test_bad_gzip_without_strict_mode_is_200_and_dropped(cio: FakeCustomerIO) -> None:
    with http_client(base_url=cio.url, auth=(KEY, "")) as lenient:
        response = lenient.post("/v1/batch", content=b"not gzip", headers=GZIP)

    assert response.status_code == 200
    assert cio.accepted == []
    assert last_request(cio).dropped


def test_the_request_size_limit_applies_to_the_decompressed_body(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    at_limit = gzip.compress(request_body_of_size(MAX_REQUEST_BYTES))
    over_limit = gzip.compress(request_body_of_size(MAX_REQUEST_BYTES + 1))
    assert len(over_limit) < MAX_REQUEST_BYTES // 10  # small on the wire

    assert client.post("/v1/batch", content=at_limit, headers=GZIP).status_code == 200
    accepted = len(cio.accepted)
    response = client.post("/v1/batch", content=over_limit, headers=GZIP)

    assert accepted > 0
    assert response.status_code == 400
    assert "decompresses to more than 512000 bytes" in response.json()["error"]
    assert len(cio.accepted) == accepted
    record = last_request(cio)
    assert (record.bytes, record.wire_bytes) == (MAX_REQUEST_BYTES + 1, len(over_limit))


def test_a_gzip_bomb_is_refused_after_the_limit_not_inflated_whole(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    # 32 MiB of zeros in about 32 KiB: inflated whole, 64 times the largest valid body.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    wire = b"".join(compressor.compress(zeros) for _ in range(32)) + compressor.flush()
    assert len(wire) < 64 * 1024

    response = client.post("/v1/batch", content=wire, headers=GZIP)

    assert response.status_code == 400
    assert "decompresses to more than 512000 bytes" in response.json()["error"]
    assert last_request(cio).bytes == MAX_REQUEST_BYTES + 1


def test_a_request_record_keeps_the_batch_sent_at(
    cio: FakeCustomerIO, client: httpx.Client
) -> None:
    # sentAt is the client's own start time: what ties a request to the client's record of it
    # (the chaos run matches relay_attempt rows by it).
    assert client.post("/v1/batch", json=batch(identify())).status_code == 200
    assert client.post("/v1/identify", json=identify()).status_code == 200
    assert client.post("/v1/batch", content=b"[1]").status_code == 400
    assert [r.sent_at for r in cio.requests] == ["2024-05-01T12:00:00Z", None, None]
