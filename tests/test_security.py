"""Secrets and personal data: the write key never leaves the process in clear, TLS is verified
unless an operator turns it off loudly, and customer emails are masked in logs."""

from __future__ import annotations

import base64
import io
import json
import logging
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
import trustme
from prometheus_client import generate_latest

from relay import logs, record_event
from relay.client import CustomerIOClient, Destination
from relay.daemon import Relay
from relay.errors import ConfigError
from relay.service import drain
from relay.settings import Settings, from_env
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import KEY, funnel_event, query, settings_for, write_events
from tests.relay_helpers import relay_env as helpers_relay_env

SECRET = "wk_live_SECRET_0123456789abcdef"
SECRET_2 = "wk_proj_SECRET_fedcba9876543210"


def leaks(text: str, *secrets: str) -> list[str]:
    """Every form in which one of ``secrets`` would be readable in ``text``."""
    found = []
    for secret in secrets:
        token = base64.b64encode(f"{secret}:".encode()).decode()
        # The masked form shows at most 4 characters; 12 would be a leak.
        for form in (secret, secret[:12], token, token[:16]):
            if form in text:
                found.append(form)
    return found


def relay_env(dsn: str, url: str, **extra: str) -> dict[str, str]:
    return helpers_relay_env(dsn, url, key=SECRET, **extra)


def relay_cli(
    env: dict[str, str], *args: str, log_format: str = "text", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "--log-level",
            "DEBUG",
            "--log-format",
            log_format,
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def database_text(dsn: str) -> str:
    """Every column a key could end up in: attempts, outbox errors, destination pauses."""
    rows = query(
        dsn,
        "SELECT coalesce(error, '') || ' ' || coalesce(response_snippet, '') FROM relay_attempt "
        "UNION ALL SELECT coalesce(last_error, '') FROM relay_outbox "
        "UNION ALL SELECT coalesce(paused_reason, '') FROM relay_destination",
    )
    return "\n".join(r[0] for r in rows)


def relay_commands() -> set[str]:
    out = subprocess.run(
        [sys.executable, "-m", "relay.cli", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return {word for line in out.splitlines() for word in line.split()[:1]}


# --- the write key in logs, tables and output -------------------------------------------------


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_refused_key_is_not_in_logs_tables_or_status(
    dsn: str, cio: FakeCustomerIO, log_format: str
) -> None:
    # The default destination's key (environment) and a project's key (table) are both refused.
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, api_url, write_key) "
            "VALUES ('proj-1', 'us', %s, %s)",
            (cio.url, SECRET_2),
        )
        record_event(conn, funnel_event("cus_1", 0))
        record_event(conn, funnel_event("cus_2", 0, project="proj-1"))
        conn.commit()
    proc = relay_cli(
        relay_env(dsn, cio.url), "run", "--drain", "--timeout", "20", log_format=log_format
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output  # held (401) is not pending: the drain completes
    assert output.count("PAUSED") >= 2 and "401" in output, output
    assert leaks(output, SECRET, SECRET_2) == []
    assert leaks(database_text(dsn), SECRET, SECRET_2) == []
    assert query(dsn, "SELECT paused_reason IS NOT NULL FROM relay_destination") == [(True,)]
    # The operator commands that show this state, when this build has them.
    available = relay_commands()
    operator_views = [
        ("status",),
        ("status", "--json"),
        ("destinations", "list"),
        ("destinations", "list", "--json"),
        ("inspect", "cus_2"),
    ]
    for command in (c for c in operator_views if c[0] in available):
        shown = relay_cli(relay_env(dsn, cio.url), *command, log_format=log_format)
        assert shown.returncode == 0, (command, shown.stderr)
        assert leaks(shown.stdout + shown.stderr, SECRET, SECRET_2) == [], command


def test_the_key_is_not_in_logs_through_5xx_drops_timeouts_and_429(
    dsn: str, cio: FakeCustomerIO
) -> None:
    cio.add_write_key(SECRET)
    cio.slow_s = 1.6
    cio.retry_after_s = 0.1
    cio.script(["503", "drop", "slow", "429", "500", "502"])
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(3)])
    env = relay_env(dsn, cio.url, RELAY_HTTP_TIMEOUT="1", RELAY_LEASE_SECONDS="3")
    proc = relay_cli(env, "run", "--drain", "--timeout", "30")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    for seen in ("HTTP 503", "protocol", "timeout", "HTTP 429", "HTTP 500", "HTTP 502"):
        assert seen in output, (seen, output)
    assert leaks(output, SECRET) == []
    assert leaks(database_text(dsn), SECRET) == []
    assert query(dsn, "SELECT DISTINCT state FROM relay_outbox") == [("delivered",)]


class Echo(httpx.BaseTransport):
    """A hostile or broken server that repeats the credentials it was sent, in its body, its
    headers and its error texts. ``script`` is played in order, its last entry forever."""

    def __init__(self, script: Sequence[int | type[httpx.TransportError]]) -> None:
        self.script = list(script)
        self.calls = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        step = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        auth = request.headers["Authorization"]
        key = base64.b64decode(auth.split()[1]).decode().rstrip(":")
        echo = f"you sent {auth!r}, that is key {key!r}"
        if not isinstance(step, int):
            raise step(echo, request=request)
        return httpx.Response(
            step,
            text=json.dumps({"error": echo, "key": key}),
            headers={"X-Echo-Key": key, "Retry-After": "0"},
        )


@pytest.mark.parametrize(
    "script",
    [
        [500, httpx.ConnectError, httpx.ReadTimeout, httpx.RemoteProtocolError, 503, 200],
        [429, 400],
        [401],
    ],
    ids=["retried-then-delivered", "rejected", "unauthorized"],
)
def test_a_server_echoing_the_key_gets_it_nowhere(
    dsn: str,
    cio: FakeCustomerIO,
    caplog: pytest.LogCaptureFixture,
    script: Sequence[int | type[httpx.TransportError]],
) -> None:
    write_events(dsn, [funnel_event("cus_1", 0), funnel_event("cus_2", 0)])
    transport = Echo(script)
    settings = settings_for(cio, write_key=SECRET)
    relay = Relay(settings, dsn, transport_factory=lambda dest: transport)
    caplog.set_level(logging.DEBUG)
    ok, _ = drain(relay, 30)
    assert ok
    assert transport.calls >= len(script)
    # Raw records, before any logging filter: the texts themselves are clean.
    texts = caplog.text + "\n".join(r.getMessage() for r in caplog.records)
    assert leaks(texts, SECRET) == []
    stored = database_text(dsn)
    assert leaks(stored, SECRET) == []
    assert "[redacted]" in stored  # the echo did reach the relay, and was scrubbed there
    assert leaks(generate_latest(relay.metrics.registry).decode(), SECRET) == []


def test_setting_and_client_errors_and_reprs_never_show_the_key() -> None:
    bad_envs = [
        {"RELAY_BATCH_SIZE": "many"},
        {"RELAY_BATCH_SIZE": "0"},
        {"RELAY_LEASE_SECONDS": "1", "RELAY_HTTP_TIMEOUT": "2"},
        {"CUSTOMERIO_REGION": "mars"},
        {"CUSTOMERIO_API_URL": "ftp://cdp.customer.io"},
        {"DATABASE_URL": "mysql://db"},
        {"RELAY_INSECURE_SKIP_TLS_VERIFY": "maybe"},
        {"RELAY_POLL_INTERVAL": "-1"},
    ]
    for bad in bad_envs:
        with pytest.raises(ConfigError) as info:
            from_env({"CUSTOMERIO_WRITE_KEY": SECRET, **bad})
        assert leaks(str(info.value), SECRET) == [], bad

    settings = from_env({"CUSTOMERIO_WRITE_KEY": SECRET})
    assert settings.write_key == SECRET
    dest = Destination("default", "https://cdp.customer.io", SECRET)
    texts = [repr(settings), str(settings), repr(dest), str(dest), dest.masked_key]
    for key in (SECRET + "\n", f" {SECRET}", SECRET.replace("_", " ", 1), SECRET + "\x00"):
        with pytest.raises(ConfigError) as info:
            Destination("default", "https://cdp.customer.io", key)
        texts.append(str(info.value))
    with pytest.raises(ConfigError) as info:
        CustomerIOClient(dest, timeout_s=0)
    texts.append(str(info.value))
    client = CustomerIOClient(dest, timeout_s=1)
    texts.append(repr(client))
    with pytest.raises(ValueError) as empty:
        client.send_batch([])
    texts.append(str(empty.value))
    client.close()
    # A transport failure against a port nobody listens on.
    with CustomerIOClient(Destination("default", "http://127.0.0.1:9", SECRET)) as unreachable:
        result = unreachable.send_batch([b"{}"])
    assert result.error_kind == "connect"
    texts.extend([str(result.error), repr(result)])
    for text in texts:
        assert leaks(text, SECRET) == [], text


def test_a_configuration_error_on_the_command_line_does_not_print_the_key(dsn: str) -> None:
    env = relay_env(dsn, "https://cdp.customer.io", RELAY_LEASE_SECONDS="abc")
    proc = relay_cli(env, "run", "--drain")
    assert proc.returncode == 2
    assert "RELAY_LEASE_SECONDS" in proc.stderr
    assert leaks(proc.stdout + proc.stderr, SECRET) == []


# --- TLS --------------------------------------------------------------------------------------


def ssl_context(client: CustomerIOClient) -> ssl.SSLContext:
    """The context httpx's connection pool opens every TLS connection with."""
    transport: Any = client._http._transport
    context: ssl.SSLContext = transport._pool._ssl_context
    return context


def test_default_settings_give_a_client_that_verifies_certificates() -> None:
    settings = from_env({"CUSTOMERIO_WRITE_KEY": SECRET})
    assert settings.verify_tls and Settings().verify_tls
    relay = Relay(settings, "postgresql://unused@/unused")
    try:
        route = relay.router.route(None)
        assert route.destination is not None
        assert route.destination.base_url.startswith("https://")
        client, _ = relay.router.client(route.destination)
        context = ssl_context(client)
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
    finally:
        relay.close()


def test_turning_verification_off_is_explicit_and_logged(
    dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The environment flag: the client built from it says so at WARNING.
    settings = from_env({"CUSTOMERIO_WRITE_KEY": SECRET, "RELAY_INSECURE_SKIP_TLS_VERIFY": "1"})
    assert not settings.verify_tls
    caplog.set_level(logging.WARNING)
    dest = Destination("default", settings.base_url, SECRET)
    with CustomerIOClient(dest, verify_tls=settings.verify_tls) as client:
        assert ssl_context(client).verify_mode == ssl.CERT_NONE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("verification" in r.getMessage() for r in warnings), caplog.text

    # The command-line flag: `relay run` says so at WARNING before doing anything else.
    env = relay_env(dsn, "https://cdp.customer.io")
    proc = relay_cli(env, "run", "--insecure-skip-tls-verify", "--drain", "--timeout", "5")
    assert proc.returncode == 0, proc.stderr
    flagged = [
        line for line in proc.stderr.splitlines() if "WARNING" in line and "verification" in line
    ]
    assert flagged and "OFF" in flagged[0], proc.stderr


class _Recorder(BaseHTTPRequestHandler):
    # Authorization headers that reached a handler, i.e. requests sent after a handshake.
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        _Recorder.seen.append(self.headers.get("Authorization", ""))
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: Any) -> None:
        return


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes are the point of the exercise, not errors worth a traceback.
        return


@pytest.fixture
def impostor() -> Iterator[str]:
    """An HTTPS server on 127.0.0.1 whose certificate nobody signed: a man in the middle."""
    # A certificate for 127.0.0.1 from a CA that only this test knows: valid in form, trusted
    # by nobody the client trusts.
    ca = trustme.CA()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = _QuietServer(("127.0.0.1", 0), _Recorder)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    _Recorder.seen = []
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_an_unverified_certificate_never_receives_the_key(impostor: str) -> None:
    dest = Destination("default", impostor, SECRET)
    with CustomerIOClient(dest, timeout_s=5) as client:
        result = client.send_batch([b'{"type":"track"}'])
    assert result.status_code is None and result.error_kind in ("connect", "protocol")
    assert "CERTIFICATE_VERIFY_FAILED" in str(result.error)
    assert _Recorder.seen == []
    # The same server does answer when verification is off: the refusal above was TLS's doing.
    with CustomerIOClient(dest, timeout_s=5, verify_tls=False) as client:
        assert client.send_batch([b'{"type":"track"}']).status_code == 200
    assert len(_Recorder.seen) == 1


# --- customer emails in logs ------------------------------------------------------------------


@pytest.mark.parametrize(
    "email",
    [
        "jane.doe@example.com",
        "JANE.DOE@EXAMPLE.COM",
        "first.last+funnel@sub.example.co.uk",
        "x_y-z%1@example.io",
        "josé.álvarez@example.com",
        "user.name@exämple.de",
        "o'connor.mary@example.ie",
    ],
)
def test_redact_masks_email_addresses(email: str) -> None:
    # Only the first character of the local part may show: "j***@example.com".
    assert logs.redact(email).startswith(email[0] + "***@"), logs.redact(email)
    for text in (f"identify for <{email}> failed", json.dumps({"email": email})):
        masked = logs.redact(text)
        assert email not in masked and email[0] + "***@" in masked, masked


def test_json_log_fields_passed_as_extra_are_keys_and_are_redacted() -> None:
    """Fields of ``extra=`` are keys of the JSON line, masked like the message itself."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(logs.RedactingFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("relay.test_extra")
    logger.addHandler(handler)
    logger.propagate = False
    logs.register_secret(SECRET)
    try:
        logger.warning(
            "destination %s: 429",
            "default",
            extra={
                "destination": "default",
                "status": 429,
                "messages": 7,
                "customer": "jane.doe@example.com",
                "error": f"key {SECRET} refused",
                "level": "not the level",
            },
        )
    finally:
        logger.removeHandler(handler)
    record = json.loads(stream.getvalue())
    assert record["msg"] == "destination default: 429"
    assert (record["destination"], record["status"], record["messages"]) == ("default", 429, 7)
    assert record["customer"] == "j***@example.com"
    assert leaks(stream.getvalue(), SECRET) == []
    # A field named like one of the line's own keys sits beside it, never over it.
    assert (record["level"], record["level_"]) == ("warning", "not the level")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_relay_at_debug_logs_no_customer_email(
    dsn: str, cio: FakeCustomerIO, log_format: str
) -> None:
    emails = {
        "cus_a": "alice.liddell@example.com",
        "cus_b": "bob.builder+quiz@mail.example.org",
        "cus_c": "carol.danvers@example.net",
    }

    # Customer.io's 400 text names the person: the relay logs that text at ERROR.
    def reject(item: dict[str, Any]) -> str | None:
        if item.get("userId") == "cus_c" and item["type"] == "identify":
            return f"profile {item['traits']['email']} is suppressed"
        return None

    cio.reject = reject
    with psycopg.connect(dsn) as conn:
        for n, (customer, email) in enumerate(emails.items()):
            doc = funnel_event(customer, n)
            doc["customer"]["email"] = email
            doc["properties"]["contact"] = email
            record_event(conn, doc)
        conn.commit()
    proc = relay_cli(
        relay_env(dsn, cio.url, CUSTOMERIO_WRITE_KEY=KEY),
        "run",
        "--drain",
        "--timeout",
        "20",
        log_format=log_format,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert "is suppressed" in output, output  # the line that would carry an email was logged
    for email in emails.values():
        assert email not in output, (email, output)
        assert email.split("@")[0][1:] not in output, (email, output)
    dead = query(dsn, "SELECT last_error FROM relay_outbox WHERE state = 'dead'")
    assert dead and "is suppressed" in dead[0][0]


@pytest.mark.parametrize("allowed", [False, True])
def test_a_destination_row_with_plain_http_to_another_host_holds_its_messages(
    allowed: bool,
) -> None:
    # CUSTOMERIO_API_URL is refused at start-up; a relay_destination row is read later, so the
    # same rule holds it there: its messages wait (held, with the reason) and the key stays.
    from relay.destinations import Router

    router = Router(
        None,
        client_factory=lambda d: pytest.fail("no client for a refused destination"),
        limiter_factory=lambda: pytest.fail("no limiter either"),
        allow_insecure_http=allowed,
    )
    # project_id, region, api_url, enabled, paused_at, paused_reason, updated_at, write_key
    router.refresh([("prj_http", "us", "http://cio.example.net", True, None, None, None, SECRET)])
    route = router.route("prj_http")
    if allowed:
        assert route.destination is not None and route.reason is None
    else:
        assert route.destination is None
        assert route.reason is not None
        assert "plain http://" in route.reason and "RELAY_ALLOW_INSECURE_HTTP=1" in route.reason
        assert SECRET not in route.reason
    loopback = Router(None, client_factory=lambda d: None, limiter_factory=lambda: None)  # type: ignore[arg-type,return-value]
    loopback.refresh([("prj_local", "us", "http://127.0.0.1:8080", True, None, None, None, SECRET)])
    assert loopback.route("prj_local").destination is not None
