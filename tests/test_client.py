"""Tests for relay.client: headers, body, identity, gzip, status and error reporting, and key
secrecy."""

from __future__ import annotations

import base64
import dataclasses
import gzip
import importlib.metadata
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import psycopg
import pytest

from relay.batching import ENVELOPE_BYTES
from relay.client import (
    GZIP_MIN_BYTES,
    LIBRARY,
    REGION_URLS,
    USER_AGENT,
    CustomerIOClient,
    Destination,
    SendResult,
    _distribution_version,
    base_url_for,
    mask_key,
)
from relay.errors import ConfigError
from relay.service import drain
from relay.settings import from_env
from relay.testing.fakecio import FakeCustomerIO
from tests.rawfake import RawFake, hang_before_response
from tests.relay_helpers import KEY as RELAY_KEY
from tests.relay_helpers import funnel_event, make_relay, write_events

KEY = "wk_abcdEFGH1234ijklMNOP5678qrstU"  # 32 characters
# Read from the installed distribution here, independently of relay.client.
VERSION = importlib.metadata.version("appfunnel-cio-relay")
TOKEN = base64.b64encode(f"{KEY}:".encode()).decode("ascii")
US = "https://cdp.customer.io"

Handler = Callable[[httpx.Request], httpx.Response]


def destination(base_url: str = US, key: str = KEY) -> Destination:
    return Destination(name="proj_1", base_url=base_url, write_key=key)


def make_client(handler: Handler) -> CustomerIOClient:
    return CustomerIOClient(destination(), transport=httpx.MockTransport(handler))


class Recorder:
    """A MockTransport handler that keeps every request and answers with a fixed response."""

    def __init__(
        self, status: int = 200, body: bytes = b"{}", headers: dict[str, str] | None = None
    ) -> None:
        self.requests: list[httpx.Request] = []
        self.status = status
        self.body = body
        self.headers = headers or {}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        request.read()
        self.requests.append(request)
        return httpx.Response(self.status, content=self.body, headers=self.headers)


def assert_no_key(text: str) -> None:
    assert KEY not in text
    assert TOKEN not in text


def assert_result_has_no_key(result: SendResult) -> None:
    for f in dataclasses.fields(result):
        assert_no_key(str(getattr(result, f.name)))
    assert_no_key(repr(result))


ITEMS = [
    b'{"type":"identify","userId":"u1","traits":{"plan":"pro"},"messageId":"m1"}',
    b'{"type":"track","userId":"u1","event":"Signed Up","messageId":"m2"}',
    # Kept byte for byte: a non-ASCII escape and unusual spacing must not be re-encoded.
    b'{"type":"track", "userId":"u2","event":"caf\\u00e9","messageId":"m3"}',
]


# --- request shape ------------------------------------------------------------------------


def test_request_headers_and_url() -> None:
    rec = Recorder()
    with make_client(rec) as client:
        client.send_batch(ITEMS)
    (req,) = rec.requests
    assert req.method == "POST"
    assert str(req.url) == "https://cdp.customer.io/v1/batch"
    assert req.headers["X-Strict-Mode"] == "1"
    assert req.headers["Authorization"] == f"Basic {TOKEN}"
    assert base64.b64decode(req.headers["Authorization"].split()[1]) == f"{KEY}:".encode()
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == f"appfunnel-cio-relay/{VERSION}"
    assert "Content-Encoding" not in req.headers  # a body this small goes uncompressed


def test_override_url_with_path() -> None:
    rec = Recorder()
    dest = destination(base_url_for("us", "https://proxy.internal/cio/"))
    with CustomerIOClient(dest, transport=httpx.MockTransport(rec)) as client:
        client.send_batch(ITEMS[:1])
    (req,) = rec.requests
    assert str(req.url) == "https://proxy.internal/cio/v1/batch"


def test_body_is_items_spliced_in_order_with_sent_at() -> None:
    rec = Recorder()
    with make_client(rec) as client:
        result = client.send_batch(ITEMS)
    body = rec.requests[0].content
    assert body.startswith(b'{"batch":[' + b",".join(ITEMS) + b'],"context":')
    assert result.request_bytes == len(body)
    assert result.gzip_bytes is None

    parsed = json.loads(body)
    assert set(parsed) == {"batch", "context", "sentAt"}
    assert parsed["context"] == {"library": {"name": "appfunnel-cio-relay", "version": VERSION}}
    assert [m["messageId"] for m in parsed["batch"]] == ["m1", "m2", "m3"]
    assert parsed["batch"] == [json.loads(item) for item in ITEMS]

    sent_at = parsed["sentAt"]
    assert sent_at.endswith("Z")
    moment = datetime.fromisoformat(sent_at)
    assert moment.utcoffset() == timedelta(0)
    assert result.started_at.tzinfo is not None
    assert result.started_at.utcoffset() == timedelta(0)
    assert abs(moment - result.started_at) < timedelta(milliseconds=1)
    assert abs(datetime.now(UTC) - moment) < timedelta(seconds=60)


def test_empty_batch_is_a_caller_error() -> None:
    with make_client(Recorder()) as client, pytest.raises(ValueError):
        client.send_batch([])


def test_redirect_is_reported_not_followed() -> None:
    rec = Recorder(status=307, body=b"", headers={"Location": "https://elsewhere.example/v1/batch"})
    with make_client(rec) as client:
        result = client.send_batch(ITEMS)
    assert result.status_code == 307
    assert len(rec.requests) == 1


# --- statuses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "retry_after"),
    [
        (200, b"{}", {}, None),
        (400, b'{"error":"batch too large"}', {}, None),
        (401, b'{"error":"unauthorized"}', {}, None),
        (429, b"slow down", {"Retry-After": "7"}, "7"),
        (
            503,
            b"maintenance",
            {"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"},
            "Wed, 21 Oct 2015 07:28:00 GMT",
        ),
        (500, b"", {}, None),
    ],
)
def test_status_reported_faithfully(
    status: int, body: bytes, headers: dict[str, str], retry_after: str | None
) -> None:
    with make_client(Recorder(status, body, headers)) as client:
        result = client.send_batch(ITEMS)
    assert result.status_code == status
    assert result.error_kind is None
    assert result.error is None
    assert result.retry_after == retry_after
    assert result.response_snippet == body.decode()
    assert result.body_complete is True
    assert result.latency_s >= 0
    assert_result_has_no_key(result)


def test_snippet_is_truncated_to_500_chars() -> None:
    with make_client(Recorder(500, b"x" * 5000)) as client:
        result = client.send_batch(ITEMS)
    assert result.response_snippet == "x" * 500


def test_key_echoed_by_server_is_redacted_from_snippet() -> None:
    # The key sits across the 500-character cut: no prefix of it may survive truncation.
    body = ("a" * 490 + KEY + " Basic " + TOKEN).encode()
    with make_client(Recorder(401, body)) as client:
        result = client.send_batch(ITEMS)
    assert_result_has_no_key(result)
    assert KEY[:10] not in result.response_snippet
    assert result.response_snippet == "a" * 490 + "[redacted]"


class BreaksOff(httpx.SyncByteStream):
    """A response body whose connection fails after ``sent`` has arrived."""

    def __init__(self, sent: bytes, exc: httpx.RequestError) -> None:
        self.sent = sent
        self.exc = exc
        self.closed = False

    def __iter__(self) -> Iterator[bytes]:
        yield self.sent
        raise self.exc

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout("the 10 s request deadline passed during read"),
        httpx.ReadError("connection reset by peer"),
        httpx.RemoteProtocolError("peer closed connection without sending complete body"),
    ],
)
def test_a_body_that_breaks_off_keeps_the_status(
    exc: httpx.RequestError, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.client")
    stream = BreaksOff(b'{"par', exc)
    with make_client(lambda request: httpx.Response(200, stream=stream)) as client:
        result = client.send_batch(ITEMS)
    assert result.status_code == 200
    assert result.error_kind is None
    assert result.error is None
    assert result.body_complete is False
    assert result.response_snippet == '{"par'
    assert stream.closed
    assert "body incomplete" in caplog.text
    assert type(exc).__name__ in caplog.text


def test_send_result_body_complete_defaults_to_true() -> None:
    result = SendResult(
        status_code=200,
        error_kind=None,
        error=None,
        retry_after=None,
        response_snippet="{}",
        latency_s=0.1,
        request_bytes=10,
        started_at=datetime.now(UTC),
    )
    assert result.body_complete is True


# --- transport failures -------------------------------------------------------------------


def raising(exc_type: type[httpx.RequestError], message: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc_type(message, request=request)

    return handler


@pytest.mark.parametrize(
    ("exc_type", "kind"),
    [
        (httpx.ConnectTimeout, "timeout"),
        (httpx.ReadTimeout, "timeout"),
        (httpx.WriteTimeout, "timeout"),
        (httpx.PoolTimeout, "timeout"),
        (httpx.ConnectError, "connect"),
        (httpx.RemoteProtocolError, "protocol"),
        (httpx.LocalProtocolError, "protocol"),
        (httpx.ReadError, "protocol"),
        (httpx.WriteError, "protocol"),
        (httpx.CloseError, "protocol"),
        (httpx.ProxyError, "protocol"),
        (httpx.DecodingError, "protocol"),
    ],
)
def test_transport_errors_map_to_error_kind(exc_type: type[httpx.RequestError], kind: str) -> None:
    with make_client(raising(exc_type, "peer went away")) as client:
        result = client.send_batch(ITEMS)
    assert result.status_code is None
    assert result.error_kind == kind
    assert result.error == f"{exc_type.__name__}: peer went away"
    assert result.retry_after is None
    assert result.response_snippet == ""
    assert result.body_complete is True
    assert result.request_bytes > 0
    assert result.latency_s >= 0


def test_error_text_is_redacted_and_bounded() -> None:
    message = f"failed with Authorization: Basic {TOKEN} for key {KEY} " + "z" * 1000
    with make_client(raising(httpx.RemoteProtocolError, message)) as client:
        result = client.send_batch(ITEMS)
    assert_result_has_no_key(result)
    assert result.error is not None
    assert "[redacted]" in result.error
    assert len(result.error) <= 300


def test_error_without_message_names_the_exception() -> None:
    with make_client(raising(httpx.ReadError, "")) as client:
        result = client.send_batch(ITEMS)
    assert result.error == "ReadError"


# --- the key is never shown ---------------------------------------------------------------


def test_destination_repr_and_str_mask_the_key() -> None:
    dest = destination()
    for text in (repr(dest), str(dest), f"{dest}", f"{dest!r}", repr([dest])):
        assert_no_key(text)
        assert "wk_a…(32 chars)" in text
    assert "proj_1" in str(dest)
    assert_no_key(repr(CustomerIOClient(dest, transport=httpx.MockTransport(Recorder()))))


def test_key_never_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    outcomes: list[Handler] = [
        Recorder(200),
        Recorder(401, f"bad key {KEY}".encode()),
        raising(httpx.ConnectError, f"cannot reach, key={KEY}"),
        raising(httpx.ReadTimeout, f"Basic {TOKEN}"),
    ]
    for handler in outcomes:
        with CustomerIOClient(
            destination(), verify_tls=False, transport=httpx.MockTransport(handler)
        ) as client:
            client.send_batch(ITEMS)
    assert caplog.records, "expected the client to log"
    assert any(r.levelno == logging.WARNING for r in caplog.records)
    assert_no_key(caplog.text)
    for record in caplog.records:
        assert_no_key(record.getMessage())


def test_config_errors_do_not_show_the_key() -> None:
    with pytest.raises(ConfigError) as info:
        Destination(name="p", base_url="cdp.customer.io", write_key=KEY)
    assert_no_key(str(info.value))
    with pytest.raises(ConfigError) as info:
        Destination(name="p", base_url=US, write_key=KEY + "\n")
    assert_no_key(str(info.value))
    assert "wk_a" in str(info.value)


# --- TLS ----------------------------------------------------------------------------------


def test_verify_tls_false_warns_once_naming_the_destination(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.client")
    CustomerIOClient(destination(), verify_tls=False).close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "TLS" in message
    assert "proj_1" in message
    assert "wk_a…(32 chars)" in message
    assert_no_key(message)


def test_verify_tls_default_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.client")
    CustomerIOClient(destination()).close()
    CustomerIOClient(destination("http://127.0.0.1:8080")).close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_plain_http_to_a_remote_host_warns(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="relay.client")
    CustomerIOClient(destination("http://fake-cio.internal:8080")).close()
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert "plain HTTP" in message
    assert "proj_1" in message
    assert_no_key(message)


# --- lifecycle and keep-alive -------------------------------------------------------------


class ClosingTransport(httpx.MockTransport):
    def __init__(self, handler: Handler) -> None:
        super().__init__(handler)
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_context_manager_closes_the_http_client() -> None:
    transport = ClosingTransport(Recorder())
    with CustomerIOClient(destination(), transport=transport) as client:
        client.send_batch(ITEMS)
    assert transport.closed == 1
    with pytest.raises(RuntimeError):
        client.send_batch(ITEMS)


def test_non_positive_timeout_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        CustomerIOClient(destination(), timeout_s=0)


@pytest.fixture
def loopback_server() -> Iterator[tuple[str, list[tuple[str, int]]]]:
    """A local HTTP/1.1 server that records the client address of every request."""
    peers: list[tuple[str, int]] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            peers.append(self.client_address[:2])
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", peers
    finally:
        server.shutdown()
        server.server_close()


def test_requests_reuse_one_keep_alive_connection(
    loopback_server: tuple[str, list[tuple[str, int]]],
) -> None:
    url, peers = loopback_server
    with CustomerIOClient(destination(url)) as client:
        results = [client.send_batch(ITEMS) for _ in range(3)]
    assert [r.status_code for r in results] == [200, 200, 200]
    assert len(peers) == 3
    assert len(set(peers)) == 1, "each request opened a new connection"


# --- base_url_for and Destination validation ----------------------------------------------


def test_base_url_for_regions() -> None:
    assert base_url_for("us") == "https://cdp.customer.io"
    assert base_url_for("eu") == "https://cdp-eu.customer.io"
    assert base_url_for(" EU ") == REGION_URLS["eu"]


def test_base_url_for_override_wins() -> None:
    assert base_url_for("eu", "https://mock.local:8443/") == "https://mock.local:8443"
    assert base_url_for("mars", "https://mock.local") == "https://mock.local"
    assert base_url_for("eu", "  ") == REGION_URLS["eu"]


def test_base_url_for_unknown_region() -> None:
    with pytest.raises(ConfigError) as info:
        base_url_for("mars")
    message = str(info.value)
    assert "'mars'" in message
    assert "'us'" in message
    assert "'eu'" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("key", "masked"),
    [
        (KEY, "wk_a…(32 chars)"),
        ("123456789", "1234…(9 chars)"),
        ("12345678", "…(8 chars)"),
        ("abc", "…(3 chars)"),
        ("x", "…(1 char)"),
        ("", "…(0 chars)"),
    ],
)
def test_mask_key(key: str, masked: str) -> None:
    assert mask_key(key) == masked


@pytest.mark.parametrize(
    ("name", "base_url", "key"),
    [
        ("", US, KEY),
        ("p", US, ""),
        ("p", US, " " + KEY),
        ("p", US, KEY + "\r\n"),
        ("p", "ftp://cdp.customer.io", KEY),
        ("p", "cdp.customer.io", KEY),
        ("p", "https://", KEY),
        ("p", "https://[::1", KEY),
    ],
)
def test_destination_rejects_bad_settings(name: str, base_url: str, key: str) -> None:
    with pytest.raises(ConfigError):
        Destination(name=name, base_url=base_url, write_key=key)


@pytest.mark.parametrize(
    "url", ["http://localhost:4010", "http://127.0.0.1:9", "http://[::1]:80", "http://fake-cio:80"]
)
def test_destination_accepts_http_urls(url: str) -> None:
    assert Destination(name="p", base_url=url, write_key=KEY).base_url == url


# --- what identifies the relay ------------------------------------------------------------


def test_library_and_user_agent_name_the_installed_distribution() -> None:
    assert LIBRARY == {"name": "appfunnel-cio-relay", "version": VERSION}
    assert USER_AGENT.split("/") == ["appfunnel-cio-relay", VERSION]


def test_without_distribution_metadata_the_version_is_unknown() -> None:
    assert _distribution_version("no-such-distribution-for-relay-tests") == "unknown"


def test_a_message_s_own_context_is_sent_as_written() -> None:
    own = (
        b'{"type":"track","userId":"u1","event":"e","messageId":"m9",'
        b'"context":{"library":{"name":"app","version":"7"},"ip":"203.0.113.9"}}'
    )
    rec = Recorder()
    with make_client(rec) as client:
        client.send_batch([own, ITEMS[0]])
    body = rec.requests[0].content
    assert body.startswith(b'{"batch":[' + own + b"," + ITEMS[0] + b"],")
    parsed = json.loads(body)
    assert parsed["batch"][0]["context"] == {
        "library": {"name": "app", "version": "7"},
        "ip": "203.0.113.9",
    }
    assert "context" not in parsed["batch"][1]
    assert parsed["context"] == {"library": LIBRARY}


@pytest.mark.xfail(
    strict=True,
    reason="relay.batching's _ENVELOPE does not count BATCH_CONTEXT yet: batches are planned "
    "about 70 bytes short of what is sent (harmless under the 512,000-byte limit, but the "
    "475,000-byte figure is no longer exact)",
)
def test_the_batch_planner_budgets_the_whole_envelope() -> None:
    rec = Recorder()
    with gzip_client(rec, 0) as client:
        client.send_batch(ITEMS[:1])
    envelope = len(rec.requests[0].content) - len(ITEMS[0])
    assert envelope <= ENVELOPE_BYTES


# --- gzip ---------------------------------------------------------------------------------


def gzip_client(rec: Recorder, gzip_min_bytes: int) -> CustomerIOClient:
    return CustomerIOClient(
        destination(), transport=httpx.MockTransport(rec), gzip_min_bytes=gzip_min_bytes
    )


def body_length(items: list[bytes]) -> int:
    # sentAt always has the same length (milliseconds, "Z"), so so does the body.
    rec = Recorder()
    with gzip_client(rec, 0) as client:
        client.send_batch(items)
    return len(rec.requests[0].content)


@pytest.mark.parametrize(("offset", "gzipped"), [(-1, True), (0, True), (1, False)])
def test_bodies_from_the_threshold_up_are_gzipped(offset: int, gzipped: bool) -> None:
    size = body_length(ITEMS)
    rec = Recorder()
    with gzip_client(rec, size + offset) as client:
        result = client.send_batch(ITEMS)
    (req,) = rec.requests
    assert int(req.headers["Content-Length"]) == len(req.content)
    if gzipped:
        assert req.headers["Content-Encoding"] == "gzip"
        assert result.gzip_bytes == len(req.content)
        raw = gzip.decompress(req.content)
    else:
        assert "Content-Encoding" not in req.headers
        assert result.gzip_bytes is None
        raw = req.content
    # request_bytes is the JSON's length either way: what Customer.io's limits measure.
    assert len(raw) == result.request_bytes == size
    assert json.loads(raw)["batch"] == [json.loads(item) for item in ITEMS]
    assert json.loads(raw)["context"] == {"library": LIBRARY}


def test_a_threshold_of_zero_sends_every_body_uncompressed() -> None:
    big = [
        b'{"type":"track","userId":"u%d","event":"e","messageId":"m%d"}' % (n, n)
        for n in range(2000)
    ]
    rec = Recorder()
    with gzip_client(rec, 0) as client:
        result = client.send_batch(big)
    (req,) = rec.requests
    assert result.request_bytes > 100_000
    assert "Content-Encoding" not in req.headers
    assert result.gzip_bytes is None


def test_the_default_threshold_applies_without_one_given() -> None:
    items = [b'{"type":"track","userId":"u1","event":"%s"}' % (b"x" * GZIP_MIN_BYTES)]
    rec = Recorder()
    with make_client(rec) as client:
        client.send_batch(items)
    assert ("Content-Encoding" in rec.requests[0].headers) == (GZIP_MIN_BYTES > 0)


def test_a_negative_threshold_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"gzip_min_bytes must be 0 .* got -1"):
        CustomerIOClient(destination(), gzip_min_bytes=-1)


def test_a_gzipped_request_keeps_the_deadline() -> None:
    # Compression happens under the deadline; a server that never answers still ends the
    # request at timeout_s, and what it read is the compressed body.
    with (
        RawFake(hang_before_response()) as server,
        CustomerIOClient(
            Destination("p", server.url, KEY), timeout_s=0.5, gzip_min_bytes=1
        ) as client,
    ):
        t0 = time.monotonic()
        result = client.send_batch(ITEMS)
        elapsed = time.monotonic() - t0
        assert server.bodies and json.loads(gzip.decompress(server.bodies[0]))["batch"]
    assert result.error_kind == "timeout"
    assert result.gzip_bytes is not None
    assert 0.5 <= elapsed < 1.5


@pytest.mark.parametrize(("raw", "expected"), [("off", 0), (" OFF ", 0), ("0", 0), ("2048", 2048)])
def test_relay_gzip_min_bytes_is_read_from_the_environment(raw: str, expected: int) -> None:
    assert from_env({"RELAY_GZIP_MIN_BYTES": raw}).gzip_min_bytes == expected


def test_relay_gzip_min_bytes_defaults_to_the_client_default() -> None:
    assert from_env({}).gzip_min_bytes == GZIP_MIN_BYTES


@pytest.mark.parametrize("raw", ["-1", "1k", "1.5", "no"])
def test_a_bad_relay_gzip_min_bytes_is_refused_naming_it(raw: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_env({"RELAY_GZIP_MIN_BYTES": raw})
    assert "RELAY_GZIP_MIN_BYTES" in str(info.value)
    assert raw in str(info.value)


# --- end to end: the relay against the fake Customer.io -----------------------------------


@pytest.mark.parametrize("gzip_min_bytes", [64, 0])
def test_the_relay_s_requests_carry_its_library_and_arrive_gzipped(
    dsn: str, gzip_min_bytes: int
) -> None:
    own_context = {"library": {"name": "appfunnel-web", "version": "3.1"}, "ip": "203.0.113.9"}
    write_events(dsn, [funnel_event(f"cus_{n}", n) for n in range(5)])
    with psycopg.connect(dsn) as conn:
        # An application's own context, written into the outbox with SQL.
        conn.execute(
            "UPDATE relay_outbox SET body = body || jsonb_build_object('context', %s::jsonb)"
            " WHERE kind = 'track'",
            (json.dumps(own_context),),
        )
    with FakeCustomerIO(write_keys={RELAY_KEY}) as cio:
        ok, _ = drain(make_relay(dsn, cio, gzip_min_bytes=gzip_min_bytes), 20.0)
        assert ok, "drain timed out"
        requests = list(cio.requests)
        items = cio.accepted_items()

    assert requests and all(r.status == 200 for r in requests)
    for r in requests:
        assert r.context == {"library": LIBRARY}
        assert r.user_agent == USER_AGENT
        if gzip_min_bytes:
            assert r.content_encoding == "gzip"
            assert r.wire_bytes is not None and r.wire_bytes < r.bytes
        else:
            assert (r.content_encoding, r.wire_bytes) == (None, None)
    tracks = [i for i in items if i["type"] == "track"]
    assert len(tracks) == 5
    assert all(t["context"] == own_context for t in tracks)
    assert all("context" not in i for i in items if i["type"] == "identify")
