"""HTTP client for Customer.io's Data Pipelines (CDP) batch endpoint.

What this client guarantees:

* Strict mode is always on. Every request carries ``X-Strict-Mode: 1``; without it Customer.io
  answers ``200`` to invalid bodies, oversized requests and wrong keys, and discards them.
* The write key is never shown. ``Destination`` prints a masked key (``mask_key``), and error
  texts and response snippets are scrubbed of the key and of its Basic auth token before they
  leave this module.
* Every request says who sent it, so Customer.io's logs tell the relay's requests apart: the
  batch's top-level ``context`` carries ``library`` (``LIBRARY``: the distribution's name and
  version), which Customer.io applies to every call in the batch, and ``User-Agent`` carries the
  same name and version (``USER_AGENT``). The stored messages are spliced in unchanged, so a
  ``context`` of a message's own is sent as written.
* Bodies of at least ``gzip_min_bytes`` are sent gzip-compressed (``Content-Encoding: gzip``);
  Customer.io applies its size limits to the decompressed body, so compression changes what
  crosses the network, never what fits in a batch.
* One keep-alive ``httpx.Client`` (HTTP/1.1, pooled connections) per destination, so a draining
  backlog does not pay a TCP and TLS handshake per request.
* One deadline per request. ``timeout_s`` bounds the whole exchange up to the response's status
  line and headers: waiting for a pooled connection, connecting, the TLS handshake, writing the
  request, waiting for the answer; compressing the body counts too, as it happens once the
  deadline has started. What is left of it then bounds reading (at most 64 KiB of) the body.
  A server that trickles bytes cannot stretch a request past the deadline, which the relay's
  leases depend on (see ``CustomerIOClient``).
* Weakened transport security is never silent: ``verify_tls=False``, or a plain-HTTP base URL
  to a host other than this machine, logs a WARNING naming the destination.
* ``send_batch`` reports what happened as a ``SendResult`` and does not raise for HTTP statuses
  or transport failures; httpx exceptions stop at this boundary.

What it deliberately does not do:

* Retry, back off, rate-limit or interpret statuses. Those decisions belong to the caller
  (``relay.retry`` classifies a ``SendResult``; ``relay.ratelimit`` paces requests).
* Enforce Customer.io's size limits. Batches are sized by the caller; with strict mode an
  oversized request comes back as a ``400`` rather than being dropped.
* Follow redirects. A ``3xx`` means the base URL is wrong and is reported as such.
* Honour ``HTTP(S)_PROXY`` environment variables: a proxy would sit outside the deadline. A
  proxy in front of Customer.io is configured as the destination's base URL instead.
* Bound name resolution. ``getaddrinfo`` cannot be interrupted; a hung DNS lookup is bounded
  only by the system resolver's own timeouts (``/etc/resolv.conf``), before the connect starts.
"""

from __future__ import annotations

import base64
import importlib.metadata
import json
import logging
import select
import socket
import ssl
import sys
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType, TracebackType
from typing import Any, Final, Literal, NamedTuple, Self
from urllib.parse import urlsplit

import httpcore
import httpx

from relay.errors import ConfigError

__all__ = [
    "BATCH_CONTEXT",
    "GZIP_LEVEL",
    "GZIP_MIN_BYTES",
    "LIBRARY",
    "REGION_URLS",
    "USER_AGENT",
    "CustomerIOClient",
    "Destination",
    "ErrorKind",
    "SendResult",
    "base_url_for",
    "mask_key",
    "sends_key_in_clear",
]

logger = logging.getLogger(__name__)

REGION_URLS: Final[dict[str, str]] = {
    "us": "https://cdp.customer.io",
    "eu": "https://cdp-eu.customer.io",
}

BATCH_PATH: Final = "/v1/batch"
SNIPPET_CHARS: Final = 500
# The most of a response body read; Customer.io's answers are a few bytes of JSON.
BODY_LIMIT: Final = 64 * 1024
# Transport error texts are for humans; a bounded length keeps a pathological message from
# flooding logs or the outbox's last-error column.
_ERROR_CHARS: Final = 300
_REDACTED: Final = "[redacted]"
# Plain HTTP to these hosts (a local stand-in of the API) keeps the credentials on the machine.
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})


def _distribution_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        # A checkout used without being installed: the requests still name the relay.
        return "unknown"


_DISTRIBUTION: Final = "appfunnel-cio-relay"

LIBRARY: Final[Mapping[str, str]] = MappingProxyType(
    {"name": _DISTRIBUTION, "version": _distribution_version(_DISTRIBUTION)}
)
"""``context.library`` of every batch: the installed distribution's name and version."""

USER_AGENT: Final = f"{LIBRARY['name']}/{LIBRARY['version']}"
"""The ``User-Agent`` of every request: the same name and version as ``LIBRARY``."""

BATCH_CONTEXT: Final = json.dumps({"library": dict(LIBRARY)}, separators=(",", ":")).encode()
"""The top-level ``context`` of every batch, encoded once. Customer.io applies it to every call
in the batch, so the stored message bodies need no rewriting to carry it. It is part of the
envelope a batch costs besides its items (``relay.batching``)."""

GZIP_MIN_BYTES: Final = 1024
"""Default smallest body (in bytes of JSON) sent gzip-compressed; 0 turns compression off."""

GZIP_LEVEL: Final = 1
"""zlib level for request bodies. On the relay's batches (about 50 KB of JSON per 100 items)
level 1 compresses about 11 to 1 at some 400 MB/s; level 6 saves another 13% of a body that
is already a tenth of its size, for about 2.6 times the CPU."""

_GZIP_HEADERS: Final = {"Content-Encoding": "gzip"}
# zlib's window size plus 16: a gzip member (header and CRC-32 trailer), not a zlib stream.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS

ErrorKind = Literal["timeout", "connect", "protocol"]


def base_url_for(region: str, override: str | None = None) -> str:
    """The API base URL for a destination, without a trailing slash.

    A non-blank ``override`` wins (a proxy or a test server). Otherwise the region must be
    named explicitly: an EU workspace sent to the US host gets ``200`` and stores nothing, so
    an unknown region is a ``ConfigError`` rather than a guess.
    """
    if override is not None and override.strip():
        return override.strip().rstrip("/")
    url = REGION_URLS.get(region.strip().lower())
    if url is None:
        accepted = ", ".join(repr(name) for name in REGION_URLS)
        raise ConfigError(f"unknown Customer.io region {region!r}: expected one of {accepted}")
    return url


def mask_key(key: str) -> str:
    """A printable stand-in for a secret: ``wk_a…(32 chars)``.

    At most the first 4 characters are shown, and only for keys longer than 8, so that a short
    key never has half of itself on display.
    """
    unit = "char" if len(key) == 1 else "chars"
    prefix = key[:4] if len(key) > 8 else ""
    return f"{prefix}…({len(key)} {unit})"


def _basic_token(write_key: str) -> str:
    # Customer.io authenticates with the write key as user name and an empty password.
    return base64.b64encode(f"{write_key}:".encode()).decode("ascii")


def _check_base_url(name: str, base_url: str) -> None:
    try:
        parts = urlsplit(base_url)
        host = parts.hostname
    except ValueError:  # e.g. an unclosed IPv6 bracket
        host = None
    if host is None or parts.scheme not in ("http", "https"):
        raise ConfigError(
            f"destination {name!r}: base URL {base_url!r} must be an http(s) URL "
            "such as https://cdp.customer.io"
        )


def sends_key_in_clear(base_url: str) -> bool:
    """Whether requests to ``base_url`` carry the write key readable on the network: plain
    ``http://`` to a host other than this machine. The settings and ``relay destinations set``
    refuse such a URL unless RELAY_ALLOW_INSECURE_HTTP allows it; the client warns when it
    sends to one."""
    parts = urlsplit(base_url)
    return parts.scheme == "http" and (parts.hostname or "").lower() not in _LOOPBACK_HOSTS


@dataclass(frozen=True, repr=False)
class Destination:
    """Where a stream of messages goes: one Customer.io workspace, one write key.

    ``name`` is the project id the destination serves, or ``"default"``. The write key is
    excluded from the generated repr and shown masked by ``__repr__`` and ``__str__``.

    Construction raises ``ConfigError`` for an empty name, an empty write key, a key containing
    whitespace or control characters, or a base URL that is not an http(s) URL with a host.
    """

    name: str
    base_url: str
    write_key: str = field(repr=False)

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("destination name is empty")
        if not self.write_key:
            raise ConfigError(f"destination {self.name!r}: write key is empty")
        # A key read from a file or a secret store often carries a trailing newline; strict
        # mode would then answer 401 for a key that looks right to whoever checks it.
        if any(ch.isspace() or not ch.isprintable() for ch in self.write_key):
            raise ConfigError(
                f"destination {self.name!r}: write key {mask_key(self.write_key)} contains "
                "whitespace or control characters (a trailing newline?)"
            )
        _check_base_url(self.name, self.base_url)

    @property
    def masked_key(self) -> str:
        return mask_key(self.write_key)

    def __repr__(self) -> str:
        return (
            f"Destination(name={self.name!r}, base_url={self.base_url!r}, "
            f"write_key={self.masked_key!r})"
        )

    def __str__(self) -> str:
        return f"{self.name} ({self.base_url}, key {self.masked_key})"


@dataclass(frozen=True)
class SendResult:
    """What one POST to Customer.io produced, as observed at the HTTP boundary.

    Exactly one of ``status_code`` and ``error_kind`` is set: a status when a response arrived
    (whatever the status), an error kind when the exchange failed before one did. Only
    ``"connect"`` means the request certainly never reached the server; after ``"timeout"`` or
    ``"protocol"`` Customer.io may have processed it.

    ``error`` and ``response_snippet`` have been scrubbed of the write key. ``retry_after`` is
    the raw ``Retry-After`` header, left for the caller to parse (seconds or an HTTP date).
    ``latency_s`` is measured on the monotonic clock; ``started_at`` is wall-clock UTC and is
    the instant sent as the batch's ``sentAt``.

    ``body_complete`` is False when a status arrived but its body did not arrive in full: the
    connection was cut or reset during it, it was still trickling in when the deadline passed,
    or it was longer than ``BODY_LIMIT`` and reading stopped there. The status still stands (a
    ``2xx`` is a delivery: Customer.io answers only once it has processed the batch), the
    snippet holds what did arrive, and the connection is closed rather than reused. It is True
    for every complete response and for every failure (there is no body to speak of).

    ``request_bytes`` is the JSON body's length, the figure Customer.io's size limits apply to;
    ``gzip_bytes`` is the length of the compressed body sent in its place, or None when the
    body went uncompressed.
    """

    status_code: int | None
    error_kind: ErrorKind | None
    error: str | None
    retry_after: str | None
    response_snippet: str
    latency_s: float
    request_bytes: int
    started_at: datetime
    body_complete: bool = True
    gzip_bytes: int | None = None


def _iso_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- the request deadline -------------------------------------------------------------------
#
# httpx's timeouts are per phase: a read timeout bounds each read, so a server that sends a
# byte a little more often than that holds a request for as long as it likes. The deadline is
# enforced one level down instead, in the network backend httpcore does all its I/O through:
# every socket call (connect to each address, TLS handshake, each send, each recv) gets at most
# the time left before the deadline of the request the calling thread is making, and fails with
# httpcore's matching timeout exception when none is left. httpx turns those into its own
# ``TimeoutException`` subclasses, so ``send_batch`` reports them as ``"timeout"``.
#
# The deadline lives in a context variable that ``send_batch`` sets around one exchange. httpcore
# does a request's I/O in the thread that makes it, so each of the threads sharing a client
# sees its own deadline and only its own; outside ``send_batch`` there is none and httpx's
# per-phase timeouts apply unchanged.


class _Deadline(NamedTuple):
    at: float  # on the time.monotonic() clock
    budget_s: float  # the whole allowance, for error texts


_DEADLINE: ContextVar[_Deadline | None] = ContextVar("relay_client_deadline", default=None)


def _time_left(
    timeout: float | None, expired: type[httpcore.TimeoutException], phase: str
) -> float | None:
    """The timeout for one socket call: httpx's per-phase ``timeout``, cut to what is left of
    the current deadline. Raises ``expired`` when the deadline has already passed."""
    deadline = _DEADLINE.get()
    if deadline is None:
        return timeout
    left = deadline.at - time.monotonic()
    if left <= 0:
        raise expired(_timeout_text(phase))
    return left if timeout is None else min(timeout, left)


def _timeout_text(phase: str) -> str:
    deadline = _DEADLINE.get()
    if deadline is None:
        return f"{phase} timed out"
    return f"the {deadline.budget_s:g} s request deadline passed during {phase}"


def _is_readable(sock: socket.socket) -> bool:
    # As httpcore does it: a pooled connection whose socket is readable while idle has been
    # closed by the server (or sent garbage) and is not reused.
    fd = sock.fileno()
    if fd < 0:
        return True
    if sys.platform == "win32" or not hasattr(select, "poll"):  # pragma: no cover
        readable, _, _ = select.select([fd], [], [], 0)
        return bool(readable)
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _DeadlineStream(httpcore.NetworkStream):
    """httpcore's ``SyncStream``, with each socket call bounded by the request deadline.

    Not a wrapper around ``SyncStream``: its ``write`` reuses one timeout for every ``send`` of
    a loop, so a peer reading slowly could stretch a write far past any deadline.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        left = _time_left(timeout, httpcore.ReadTimeout, "read")
        try:
            self._sock.settimeout(left)
            return self._sock.recv(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(_timeout_text("read")) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc) or type(exc).__name__) from exc

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        while view:
            left = _time_left(timeout, httpcore.WriteTimeout, "write")
            try:
                self._sock.settimeout(left)
                sent = self._sock.send(view)
            except TimeoutError as exc:
                raise httpcore.WriteTimeout(_timeout_text("write")) from exc
            except OSError as exc:
                raise httpcore.WriteError(str(exc) or type(exc).__name__) from exc
            view = view[sent:]

    def close(self) -> None:
        self._sock.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        try:
            left = _time_left(timeout, httpcore.ConnectTimeout, "the TLS handshake")
            # The handshake runs inside wrap_socket, and CPython bounds it as a whole by the
            # socket timeout (not per read), so it cannot outlast the deadline either.
            self._sock.settimeout(left)
            tls = ssl_context.wrap_socket(self._sock, server_hostname=server_hostname)
        except TimeoutError as exc:
            self.close()
            raise httpcore.ConnectTimeout(_timeout_text("the TLS handshake")) from exc
        except OSError as exc:
            self.close()
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        except BaseException:
            self.close()
            raise
        return _DeadlineStream(tls)

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            # httpcore reads the negotiated ALPN protocol from it; an SSLSocket answers that.
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "socket":
            return self._sock
        if info == "is_readable":
            return _is_readable(self._sock)
        return None


class _DeadlineBackend(httpcore.NetworkBackend):
    """httpcore's ``SyncBackend``, with connecting bounded by the request deadline.

    ``socket.create_connection`` gives each resolved address the full timeout in turn; here
    they share what is left of the deadline. Stateless, so one instance serves every thread.
    """

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        _time_left(timeout, httpcore.ConnectTimeout, "connect")
        try:
            addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise httpcore.ConnectError(str(exc) or type(exc).__name__) from exc
        options = list(socket_options or ())
        last: OSError | None = None
        for family, kind, proto, _, address in addresses:
            left = _time_left(timeout, httpcore.ConnectTimeout, "connect")
            sock = socket.socket(family, kind, proto)
            try:
                for option in options:
                    sock.setsockopt(*option)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if local_address is not None:
                    sock.bind((local_address, 0))
                sock.settimeout(left)
                sock.connect(address)
            except OSError as exc:  # TimeoutError included: try the next address, if in time
                sock.close()
                last = exc
                continue
            except BaseException:
                sock.close()
                raise
            return _DeadlineStream(sock)
        if isinstance(last, TimeoutError):
            raise httpcore.ConnectTimeout(_timeout_text("connect")) from last
        detail = (str(last) or type(last).__name__) if last else "no address"
        raise httpcore.ConnectError(f"cannot connect to {host}:{port}: {detail}") from last


# The same limits httpx.Client uses by default, spelled out because the transport is built here.
_POOL_LIMITS: Final = httpx.Limits(
    max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0
)


def _deadline_transport(verify_tls: bool) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` like the one ``httpx.Client`` makes by default (HTTP/1.1, the
    same TLS settings and pool limits) whose connections do their I/O through
    ``_DeadlineBackend``."""
    ssl_context = httpx.create_ssl_context(verify=verify_tls)
    transport = httpx.HTTPTransport(
        verify=ssl_context, http1=True, http2=False, limits=_POOL_LIMITS
    )
    pool = httpcore.ConnectionPool(
        ssl_context=ssl_context,
        max_connections=_POOL_LIMITS.max_connections,
        max_keepalive_connections=_POOL_LIMITS.max_keepalive_connections,
        keepalive_expiry=_POOL_LIMITS.keepalive_expiry,
        http1=True,
        http2=False,
        network_backend=_DeadlineBackend(),
    )
    _install_pool(transport, pool)
    return transport


def _install_pool(transport: httpx.HTTPTransport, pool: httpcore.ConnectionPool) -> None:
    # PRIVATE API. httpx.HTTPTransport takes no network backend, so its httpcore pool is
    # replaced with one built on ours. httpx 0.28-0.29 keep that pool in ``_pool`` and use it
    # for every request (``handle_request``) and for ``close``. If a release stops doing so,
    # fail here, at client construction, rather than send requests with no deadline;
    # tests/test_client_deadline.py checks that requests really go through the backend.
    current = getattr(transport, "_pool", None)
    if not isinstance(current, httpcore.ConnectionPool):
        raise RuntimeError(
            f"httpx {httpx.__version__}: HTTPTransport no longer keeps an httpcore "
            "ConnectionPool in _pool; relay.client cannot enforce its request deadline"
        )
    current.close()  # never used: holds no connections
    transport._pool = pool


class CustomerIOClient:
    """Sends batches to one ``Destination`` over one pooled, keep-alive HTTP client.

    Safe to share between threads (``httpx.Client`` is, and each thread's deadline is its own):
    the relay's sending threads share one client per destination.

    ``timeout_s`` is one deadline for each ``send_batch``, counted from its start: waiting for a
    pooled connection, connecting, the TLS handshake, writing the request and receiving the
    response's status line and headers must all fit in it, or the result is ``"timeout"``
    (within ``timeout_s`` plus scheduling slack). The body is then read in what is left of the
    same deadline; a status that arrived in time stands even if its body does not (see
    ``SendResult.body_complete``). So no request outlives ``timeout_s``, however slowly the
    server trickles bytes.

    ``gzip_min_bytes`` is the smallest body (in bytes of JSON) sent gzip-compressed; 0 sends
    every body uncompressed. Compression happens under the deadline, which it shares with the
    exchange: a few milliseconds for the largest batch, so no request outlives ``timeout_s``.

    ``transport`` replaces the network, for tests; ``verify_tls`` has no effect then, and
    neither does the deadline, which is enforced in the network layer that ``transport``
    replaces.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        timeout_s: float = 10.0,
        verify_tls: bool = True,
        transport: httpx.BaseTransport | None = None,
        gzip_min_bytes: int = GZIP_MIN_BYTES,
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(
                f"destination {destination.name!r}: timeout must be positive, got {timeout_s!r}"
            )
        if gzip_min_bytes < 0:
            raise ConfigError(
                f"destination {destination.name!r}: gzip_min_bytes must be 0 (off) or more, "
                f"got {gzip_min_bytes!r}"
            )
        self.destination = destination
        self._timeout_s = timeout_s
        self._gzip_min_bytes = gzip_min_bytes
        self._url = destination.base_url.rstrip("/") + BATCH_PATH
        token = _basic_token(destination.write_key)
        self._secrets = (token, destination.write_key)
        # Both are legitimate for a fake or a proxy on a trusted network, so they are allowed,
        # but never quietly: each weakens what protects the write key in transit.
        if not verify_tls:
            logger.warning(
                "TLS certificate verification is DISABLED for Customer.io destination %s",
                destination,
            )
        if sends_key_in_clear(destination.base_url):
            logger.warning(
                "Customer.io destination %s uses plain HTTP: the write key is sent unencrypted",
                destination,
            )
        self._http = httpx.Client(
            headers={
                "Authorization": f"Basic {token}",
                "Content-Type": "application/json",
                "X-Strict-Mode": "1",
                "User-Agent": USER_AGENT,
            },
            # Per phase, and each phase is further cut to what is left of the deadline. The
            # pool phase (waiting for a free connection) starts with the request, so this
            # bounds it by the deadline too.
            timeout=httpx.Timeout(timeout_s),
            transport=transport if transport is not None else _deadline_transport(verify_tls),
            http1=True,
            http2=False,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"CustomerIOClient({self.destination!r})"

    def send_batch(self, items: Sequence[bytes]) -> SendResult:
        """POST ``items`` (each one compact, already-encoded JSON message) to ``/v1/batch``.

        The items are spliced into the body as bytes, so what was measured and stored upstream
        is exactly what is sent. Returns within the client's ``timeout_s`` deadline (plus
        scheduling slack) with a ``SendResult`` for any HTTP status and any transport failure;
        raises ``ValueError`` only for an empty batch, which is a caller bug.
        """
        if not items:
            raise ValueError("send_batch needs at least one item")
        started_at = datetime.now(UTC)
        body = b"".join(
            (
                b'{"batch":[',
                b",".join(items),
                b'],"context":',
                BATCH_CONTEXT,
                b',"sentAt":"',
                _iso_utc(started_at).encode("ascii"),
                b'"}',
            )
        )
        t0 = time.monotonic()
        token = _DEADLINE.set(_Deadline(t0 + self._timeout_s, self._timeout_s))
        try:
            # Inside the deadline: the lease on these rows was sized for timeout_s, so the
            # compression's few milliseconds come out of it rather than on top of it. zlib
            # releases the GIL while it works; the other sending threads are not held up.
            gzipped = (
                zlib.compress(body, GZIP_LEVEL, wbits=_GZIP_WBITS)
                if 0 < self._gzip_min_bytes <= len(body)
                else None
            )
            result, body_problem = self._exchange(body, gzipped, t0, started_at)
        finally:
            _DEADLINE.reset(token)
        logger.debug(
            "batch to %s: %d items, %d bytes%s -> %s in %.3fs%s",
            self.destination.name,
            len(items),
            result.request_bytes,
            f" ({result.gzip_bytes} gzipped)" if result.gzip_bytes is not None else "",
            result.status_code if result.status_code is not None else result.error_kind,
            result.latency_s,
            f" (body incomplete: {body_problem})" if body_problem else "",
        )
        return result

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _exchange(
        self, body: bytes, gzipped: bytes | None, t0: float, started_at: datetime
    ) -> tuple[SendResult, str | None]:
        """One POST of ``body`` (as ``gzipped`` when that is not None) under the deadline
        already set; the result, and why the response body is incomplete (None when it is
        not)."""
        gzip_bytes = None if gzipped is None else len(gzipped)
        try:
            if gzipped is None:
                request = self._http.build_request("POST", self._url, content=body)
            else:
                request = self._http.build_request(
                    "POST", self._url, content=gzipped, headers=_GZIP_HEADERS
                )
            # stream=True returns once the status line and headers are in, leaving the body
            # to be read (or not) here, under the same deadline.
            response = self._http.send(request, stream=True)
        except httpx.TimeoutException as exc:
            return self._failure("timeout", exc, t0, len(body), gzip_bytes, started_at), None
        except httpx.ConnectError as exc:
            return self._failure("connect", exc, t0, len(body), gzip_bytes, started_at), None
        except httpx.RequestError as exc:
            # Any other TransportError (peer hung up, read/write failure, proxy error), and
            # also a body that arrived but could not be decoded: the exchange did not complete
            # and nothing above this module should need to know httpx's exception types.
            return self._failure("protocol", exc, t0, len(body), gzip_bytes, started_at), None
        try:
            received, problem = _read_body(response)
        finally:
            # Before the body is complete, this closes the connection instead of pooling it.
            _close_quietly(response)
        text = _decode(received, response)
        result = SendResult(
            status_code=response.status_code,
            error_kind=None,
            error=None,
            retry_after=response.headers.get("Retry-After"),
            response_snippet=self._redact(text, cut=problem is not None)[:SNIPPET_CHARS],
            latency_s=time.monotonic() - t0,
            request_bytes=len(body),
            started_at=started_at,
            body_complete=problem is None,
            gzip_bytes=gzip_bytes,
        )
        return result, None if problem is None else self._redact(problem)[:_ERROR_CHARS]

    def _failure(
        self,
        kind: ErrorKind,
        exc: httpx.RequestError,
        t0: float,
        request_bytes: int,
        gzip_bytes: int | None,
        started_at: datetime,
    ) -> SendResult:
        latency_s = time.monotonic() - t0
        return SendResult(
            status_code=None,
            error_kind=kind,
            error=self._redact(_describe(exc))[:_ERROR_CHARS],
            retry_after=None,
            response_snippet="",
            latency_s=latency_s,
            request_bytes=request_bytes,
            started_at=started_at,
            gzip_bytes=gzip_bytes,
        )

    def _redact(self, text: str, *, cut: bool = False) -> str:
        # httpx does not put credentials in its messages, but a proxy or a misbehaving server
        # could echo them back; scrubbing here keeps the promise independent of either. Callers
        # truncate after redacting, so a cut of theirs can never leave part of a secret behind.
        # ``cut`` says the text itself was cut short (a body that stopped arriving): a secret's
        # first characters at its end are scrubbed as well, beyond the 4 a masked key shows.
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        if cut:
            for secret in self._secrets:
                for size in range(min(len(secret) - 1, len(text)), 4, -1):
                    if text.endswith(secret[:size]):
                        text = text[:-size] + _REDACTED
                        break
        return text


def _describe(exc: BaseException) -> str:
    detail = str(exc).strip()
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


def _read_body(response: httpx.Response) -> tuple[bytes, str | None]:
    """Up to ``BODY_LIMIT`` bytes of the (decoded) body, and why it is incomplete, if it is.

    Every read the network needs is bounded by what is left of the deadline, so this returns
    by the deadline whatever the server does.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        for chunk in response.iter_bytes():
            chunks.append(chunk)
            size += len(chunk)
            if size > BODY_LIMIT:
                return b"".join(chunks)[:BODY_LIMIT], f"longer than {BODY_LIMIT} bytes"
    except httpx.RequestError as exc:
        return b"".join(chunks), _describe(exc)
    return b"".join(chunks), None


def _decode(received: bytes, response: httpx.Response) -> str:
    # response.encoding is the charset of Content-Type when Python knows it, else UTF-8.
    return received.decode(response.encoding or "utf-8", errors="replace")


def _close_quietly(response: httpx.Response) -> None:
    # Closing only closes sockets; a failure here cannot change what the server answered.
    try:
        response.close()
    except (httpx.HTTPError, OSError) as exc:
        logger.debug("closing a response failed: %s", _describe(exc))
