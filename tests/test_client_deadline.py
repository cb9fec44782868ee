"""relay.client's request deadline, against a server that misbehaves at the byte level.

``timeout_s`` is one deadline for the exchange up to the status line and headers, and the body
is read in what is left of it. httpx's own timeouts are per phase (each read, each write): a
server trickling a byte a little more often than that holds a request as long as it likes.

Timings are asserted generously (``< timeout + 1``): the point is that without the deadline the
same requests take many times longer, not the last tenth of a second.
"""

from __future__ import annotations

import contextlib
import contextvars
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Literal

import httpcore
import httpx
import pytest
import trustme

from relay import client as client_module
from relay.client import CustomerIOClient, Destination, SendResult
from tests.rawfake import (
    Behaviour,
    RawFake,
    close_after_request,
    hang_before_response,
    hang_on_accept,
    ok,
    reset_after_request,
    slow_ok,
    slow_read,
    status,
    trickle_body,
    trickle_headers,
)

KEY = "wk_abcdEFGH1234ijklMNOP5678qrstU"
TIMEOUT = 1.0
SLACK = 1.0  # what the bounds allow beyond the deadline: scheduling, not design
ITEMS = [b'{"type":"track","userId":"u1","event":"Signed Up","messageId":"m1"}']


def make_client(
    url: str, timeout_s: float = TIMEOUT, transport: httpx.BaseTransport | None = None
) -> CustomerIOClient:
    return CustomerIOClient(Destination("p", url, KEY), timeout_s=timeout_s, transport=transport)


def timed_send(client: CustomerIOClient, items: list[bytes] = ITEMS) -> tuple[SendResult, float]:
    t0 = time.monotonic()
    result = client.send_batch(items)
    return result, time.monotonic() - t0


@pytest.fixture
def server() -> Iterator[RawFake]:
    with RawFake() as fake:
        yield fake


@pytest.fixture(scope="module")
def tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    return server_ctx, client_ctx


# --- the bug: per-phase timeouts are not a deadline -----------------------------------------


def test_per_phase_timeouts_let_a_trickling_server_hold_a_request() -> None:
    """The premise. The client used to be configured exactly like this: ``httpx.Timeout(1.0)``
    and a default transport. Each read gets a byte within 0.4 s, so no timeout ever fires; a
    20-byte body takes 8 s and trickled headers 29 s. Rather than wait that out, the test shows
    both still running at three times the deadline, then stops the servers."""
    outcomes: dict[str, float] = {}

    def run(name: str, url: str) -> None:
        t0 = time.monotonic()
        # The server stopping under it ends the request with an error.
        with (
            httpx.Client(timeout=httpx.Timeout(TIMEOUT)) as plain,
            contextlib.suppress(httpx.HTTPError),
        ):
            plain.post(url + "/v1/batch", content=b"{}").read()
        outcomes[name] = time.monotonic() - t0

    with RawFake(trickle_body(0.4)) as body_fake, RawFake(trickle_headers(0.4)) as head_fake:
        threads = [
            threading.Thread(target=run, args=("body", body_fake.url)),
            threading.Thread(target=run, args=("headers", head_fake.url)),
        ]
        for thread in threads:
            thread.start()
        time.sleep(3 * TIMEOUT)
        still_running = [t.is_alive() for t in threads]
    for thread in threads:
        thread.join(timeout=5)
    assert still_running == [True, True], "a per-phase timeout bounded a trickled response"
    assert min(outcomes.values()) >= 3 * TIMEOUT


# --- the status line arrives in time ---------------------------------------------------------


def test_a_trickled_body_keeps_its_status_and_stops_at_the_deadline(server: RawFake) -> None:
    server.behaviour = trickle_body(0.4, length=200)  # 80 s of body
    with make_client(server.url) as client:
        result, elapsed = timed_send(client)
    assert elapsed < TIMEOUT + 0.5
    assert result.latency_s < TIMEOUT + 0.5
    assert result.status_code == 200, "Customer.io answers 200 only once it has the batch"
    assert result.error_kind is None and result.error is None
    assert result.body_complete is False
    assert result.response_snippet == "x" * len(result.response_snippet)
    assert 1 <= len(result.response_snippet) <= 3
    assert server.requests == 1


def test_slow_but_in_time_is_a_complete_200(server: RawFake) -> None:
    server.behaviour = slow_ok(0.3)
    with make_client(server.url) as client:
        result, elapsed = timed_send(client)
    assert result.status_code == 200
    assert result.body_complete is True
    assert result.response_snippet == "{}"
    assert 0.3 <= elapsed < TIMEOUT
    assert len(server.bodies) == 1
    assert server.bodies[0].startswith(b'{"batch":[' + ITEMS[0] + b"]")


@pytest.mark.parametrize("after", ["close", "reset"])
def test_a_body_cut_short_keeps_the_status_and_what_arrived(
    server: RawFake, after: Literal["close", "reset"]
) -> None:
    server.behaviour = status(
        503, b'{"err', {"Content-Length": "40", "Retry-After": "7"}, after=after
    )
    with make_client(server.url) as client:
        result, elapsed = timed_send(client)
    assert result.status_code == 503
    assert result.retry_after == "7"
    assert result.error_kind is None
    assert result.body_complete is False
    assert result.response_snippet == '{"err'
    assert elapsed < TIMEOUT


def test_an_incomplete_body_does_not_leave_its_connection_in_the_pool(server: RawFake) -> None:
    server.behaviour = ok()
    with make_client(server.url) as client:
        assert client.send_batch(ITEMS).body_complete
        assert client.send_batch(ITEMS).body_complete
        assert server.connections == 1, "a complete response's connection is kept alive"
        server.behaviour = trickle_body(0.2)
        assert client.send_batch(ITEMS).body_complete is False
        server.behaviour = ok()
        result = client.send_batch(ITEMS)
    assert result.status_code == 200 and result.body_complete
    assert server.connections == 2, "the connection with a half-read body was reused"


def test_only_64_kib_of_a_long_body_is_read(server: RawFake) -> None:
    server.behaviour = status(400, b"y" * 200_000)
    with make_client(server.url) as client:
        result = client.send_batch(ITEMS)
    assert result.status_code == 400
    assert result.body_complete is False
    assert result.response_snippet == "y" * 500


def test_a_key_cut_in_half_by_the_connection_is_still_redacted(server: RawFake) -> None:
    server.behaviour = status(
        401, b"bad key " + KEY[:12].encode(), {"Content-Length": "99"}, after="close"
    )
    with make_client(server.url) as client:
        result = client.send_batch(ITEMS)
    assert result.body_complete is False
    assert result.response_snippet == "bad key [redacted]"
    assert KEY[:5] not in repr(result)


# --- the status line does not arrive in time -------------------------------------------------


@pytest.mark.parametrize(
    ("behaviour", "reached"),
    [
        (trickle_headers(0.4), 1),
        (hang_before_response(), 1),
        (slow_ok(10), 1),
        (hang_on_accept(), 0),
    ],
    ids=["trickle_headers", "hang_before_response", "slow_ok", "hang_on_accept"],
)
def test_no_status_by_the_deadline_is_a_timeout(
    server: RawFake, behaviour: Behaviour, reached: int
) -> None:
    server.behaviour = behaviour
    with make_client(server.url) as client:
        result, elapsed = timed_send(client)
    assert result.status_code is None
    assert result.error_kind == "timeout"
    assert TIMEOUT * 0.9 <= elapsed < TIMEOUT + SLACK
    assert result.latency_s < TIMEOUT + SLACK
    assert result.error is not None and "deadline" in result.error
    assert result.body_complete is True  # nothing to be incomplete
    assert server.requests == reached


def test_a_request_the_server_drains_slowly_is_bounded_by_the_deadline(server: RawFake) -> None:
    # ~32 MB read at ~6 MB/s: every send() makes progress, so a timeout per send never fires.
    server.behaviour = slow_read(0.01, 65536)
    items = [b'{"pad":"' + b"p" * (4 * 1024 * 1024) + b'"}'] * 8
    # Uncompressed: gzip would shrink these 32 MB of "p" to some 150 KB.
    dest = Destination("p", server.url, KEY)
    with CustomerIOClient(dest, timeout_s=TIMEOUT, gzip_min_bytes=0) as client:
        result, elapsed = timed_send(client, items)
    assert result.error_kind == "timeout"
    assert elapsed < TIMEOUT + SLACK
    assert result.error is not None and "during write" in result.error


def test_reset_or_close_before_the_status_is_protocol(server: RawFake) -> None:
    with make_client(server.url) as client:
        for behaviour in (reset_after_request(), close_after_request()):
            server.behaviour = behaviour
            result, elapsed = timed_send(client)
            assert result.status_code is None
            assert result.error_kind == "protocol", behaviour
            assert elapsed < TIMEOUT
    assert server.requests == 2, "both requests reached the server"


def test_a_refused_connection_is_connect() -> None:
    with RawFake() as fake:
        url = fake.url
    # Stopped: nothing listens on the port any more.
    with make_client(url) as client:
        result, elapsed = timed_send(client)
    assert result.status_code is None
    assert result.error_kind == "connect"
    assert elapsed < TIMEOUT


# --- TLS ------------------------------------------------------------------------------------


def test_tls_exchange_and_deadline(
    tls_contexts: tuple[ssl.SSLContext, ssl.SSLContext], monkeypatch: pytest.MonkeyPatch
) -> None:
    server_ctx, client_ctx = tls_contexts
    # CustomerIOClient verifies against certifi's roots; have it trust this test's CA instead.
    monkeypatch.setattr(httpx, "create_ssl_context", lambda verify: client_ctx)
    with RawFake(ok(), tls=server_ctx) as fake, make_client(fake.url) as client:
        result = client.send_batch(ITEMS)
        assert (result.status_code, result.body_complete) == (200, True)
        fake.behaviour = trickle_body(0.4)
        result, elapsed = timed_send(client)
        assert (result.status_code, result.body_complete) == (200, False)
        assert elapsed < TIMEOUT + 0.5
        fake.behaviour = hang_on_accept()  # the client's handshake gets no answer
        result, elapsed = timed_send(client)
        assert result.error_kind == "timeout"
        assert result.error is not None and "TLS handshake" in result.error
        assert elapsed < TIMEOUT + SLACK


# --- threads --------------------------------------------------------------------------------


def run_in_threads(
    calls: list[Callable[[], tuple[SendResult, float]]],
) -> list[tuple[SendResult, float]]:
    results: list[tuple[SendResult, float] | None] = [None] * len(calls)
    start = threading.Barrier(len(calls))

    def run(i: int) -> None:
        start.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(r is not None for r in results), "a sending thread did not finish"
    return [r for r in results if r is not None]


def test_eight_threads_on_one_client_each_keep_their_own_deadline() -> None:
    # One client, one pool: half the requests hang, half are answered at once.
    def route(body: bytes) -> Behaviour:
        return hang_before_response() if b'"hang"' in body else ok()

    with RawFake(route=route) as fake, make_client(fake.url) as client:
        hang: list[bytes] = [b'{"hang":1}']
        fine: list[bytes] = [b'{"fine":1}']
        outcomes = run_in_threads(
            [lambda: timed_send(client, hang), lambda: timed_send(client, fine)] * 4
        )
    hung, answered = outcomes[0::2], outcomes[1::2]
    for result, elapsed in hung:
        assert result.error_kind == "timeout"
        assert elapsed < TIMEOUT + SLACK
    for result, elapsed in answered:
        assert (result.status_code, result.body_complete) == (200, True)
        assert elapsed < TIMEOUT
    assert fake.requests == 8


def test_deadlines_do_not_leak_between_threads_or_servers() -> None:
    """Two servers, one hanging and one slow, behind one shared transport (pool and network
    backend): 0.5 s deadlines for the hanging one, 3 s for the slow one. Borrowing the other
    thread's deadline either way would fail a bound below."""
    transport = client_module._deadline_transport(verify_tls=True)
    with (
        RawFake(hang_before_response()) as hanging,
        RawFake(slow_ok(1.2)) as slow,
        make_client(hanging.url, 0.5, transport=transport) as short,
        make_client(slow.url, 3.0, transport=transport) as long,
    ):
        outcomes = run_in_threads([lambda: timed_send(short), lambda: timed_send(long)] * 4)
    for result, elapsed in outcomes[0::2]:
        assert result.error_kind == "timeout"
        assert elapsed < 0.5 + SLACK, "a 0.5 s request outlived its deadline"
    for result, elapsed in outcomes[1::2]:
        assert result.status_code == 200, "a 3 s request died at someone else's deadline"
        assert elapsed >= 1.2


def test_the_deadline_is_set_only_during_send_batch(server: RawFake) -> None:
    deadline = client_module._DEADLINE
    assert deadline.get() is None
    with make_client(server.url) as client:
        client.send_batch(ITEMS)
        assert deadline.get() is None
        # A deadline long past in this thread's context is invisible to another thread.
        token = deadline.set(client_module._Deadline(at=time.monotonic() - 60, budget_s=1.0))
        try:
            with pytest.raises(httpcore.ReadTimeout):
                client_module._time_left(5.0, httpcore.ReadTimeout, "read")
            seen: list[tuple[object, SendResult]] = []
            worker = threading.Thread(
                target=lambda: seen.append((deadline.get(), client.send_batch(ITEMS)))
            )
            worker.start()
            worker.join(timeout=10)
        finally:
            deadline.reset(token)
    ((other, result),) = seen
    assert other is None
    assert result.status_code == 200
    # Without a deadline, httpx's per-phase timeout passes through untouched.
    assert (
        contextvars.copy_context().run(client_module._time_left, 5.0, httpcore.ReadTimeout, "read")
        == 5.0
    )


# --- the private httpx attribute the deadline depends on --------------------------------------


def test_requests_go_through_the_deadline_backend(
    server: RawFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fails if httpx stops using ``HTTPTransport._pool`` for requests: the client would then
    run with no deadline, and the timing tests above would be the only other sign."""
    transport = client_module._deadline_transport(verify_tls=True)
    assert isinstance(transport._pool, httpcore.ConnectionPool)
    connects: list[str] = []
    original = client_module._DeadlineBackend.connect_tcp

    def counting(
        self: client_module._DeadlineBackend, host: str, port: int, **kw: object
    ) -> httpcore.NetworkStream:
        connects.append(host)
        return original(self, host, port, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(client_module._DeadlineBackend, "connect_tcp", counting)
    with make_client(server.url) as client:
        assert client.send_batch(ITEMS).status_code == 200
    assert connects == ["127.0.0.1"]


def test_a_transport_without_the_private_pool_fails_loudly() -> None:
    class Changed(httpx.HTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            del self._pool

    pool = httpcore.ConnectionPool()
    with pytest.raises(RuntimeError, match="_pool"):
        client_module._install_pool(Changed(), pool)
