"""HTTP client for Customer.io's Data Pipelines (CDP) batch endpoint.

What this client guarantees:

* Strict mode is always on. Every request carries ``X-Strict-Mode: 1``; without it Customer.io
  answers ``200`` to invalid bodies, oversized requests and wrong keys, and discards them.
* The write key is never shown. ``Destination`` prints a masked key (``mask_key``), and error
  texts and response snippets are scrubbed of the key and of its Basic auth token before they
  leave this module.
* One keep-alive ``httpx.Client`` (HTTP/1.1, pooled connections) per destination, so a draining
  backlog does not pay a TCP and TLS handshake per request.
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
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Final, Literal, Self
from urllib.parse import urlsplit

import httpx

from relay.errors import ConfigError

__all__ = [
    "REGION_URLS",
    "CustomerIOClient",
    "Destination",
    "ErrorKind",
    "SendResult",
    "base_url_for",
    "mask_key",
]

logger = logging.getLogger(__name__)

REGION_URLS: Final[dict[str, str]] = {
    "us": "https://cdp.customer.io",
    "eu": "https://cdp-eu.customer.io",
}

BATCH_PATH: Final = "/v1/batch"
SNIPPET_CHARS: Final = 500
# Transport error texts are for humans; a bounded length keeps a pathological message from
# flooding logs or the outbox's last-error column.
_ERROR_CHARS: Final = 300
_REDACTED: Final = "[redacted]"
# Plain HTTP to these hosts (a local stand-in of the API) keeps the credentials on the machine.
_LOOPBACK_HOSTS: Final = frozenset({"localhost", "127.0.0.1", "::1"})

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


def _sends_key_in_clear(base_url: str) -> bool:
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
    """

    status_code: int | None
    error_kind: ErrorKind | None
    error: str | None
    retry_after: str | None
    response_snippet: str
    latency_s: float
    request_bytes: int
    started_at: datetime


def _iso_utc(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class CustomerIOClient:
    """Sends batches to one ``Destination`` over one pooled, keep-alive HTTP client.

    Safe to share between threads (``httpx.Client`` is). ``timeout_s`` applies to each phase
    (connect, write, each read, waiting for a pooled connection), not to the request as a whole.
    ``transport`` replaces the network, for tests; ``verify_tls`` has no effect then.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        timeout_s: float = 10.0,
        verify_tls: bool = True,
        transport: httpx.BaseTransport | None = None,
        user_agent: str = "appfunnel-cio-relay",
    ) -> None:
        if not timeout_s > 0:
            raise ConfigError(
                f"destination {destination.name!r}: timeout must be positive, got {timeout_s!r}"
            )
        self.destination = destination
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
        if _sends_key_in_clear(destination.base_url):
            logger.warning(
                "Customer.io destination %s uses plain HTTP: the write key is sent unencrypted",
                destination,
            )
        self._http = httpx.Client(
            headers={
                "Authorization": f"Basic {token}",
                "Content-Type": "application/json",
                "X-Strict-Mode": "1",
                "User-Agent": user_agent,
            },
            timeout=httpx.Timeout(timeout_s),
            verify=verify_tls,
            transport=transport,
            http1=True,
            http2=False,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"CustomerIOClient({self.destination!r})"

    def send_batch(self, items: Sequence[bytes]) -> SendResult:
        """POST ``items`` (each one compact, already-encoded JSON message) to ``/v1/batch``.

        The items are spliced into the body as bytes, so what was measured and stored upstream
        is exactly what is sent. Returns a ``SendResult`` for any HTTP status and any transport
        failure; raises ``ValueError`` only for an empty batch, which is a caller bug.
        """
        if not items:
            raise ValueError("send_batch needs at least one item")
        started_at = datetime.now(UTC)
        body = b"".join(
            (
                b'{"batch":[',
                b",".join(items),
                b'],"sentAt":"',
                _iso_utc(started_at).encode("ascii"),
                b'"}',
            )
        )
        t0 = time.monotonic()
        try:
            response = self._http.post(self._url, content=body)
        except httpx.TimeoutException as exc:
            result = self._failure("timeout", exc, t0, len(body), started_at)
        except httpx.ConnectError as exc:
            result = self._failure("connect", exc, t0, len(body), started_at)
        except httpx.RequestError as exc:
            # Any other TransportError (peer hung up, read/write failure, proxy error), and
            # also a body that arrived but could not be decoded: the exchange did not complete
            # and nothing above this module should need to know httpx's exception types.
            result = self._failure("protocol", exc, t0, len(body), started_at)
        else:
            result = SendResult(
                status_code=response.status_code,
                error_kind=None,
                error=None,
                retry_after=response.headers.get("Retry-After"),
                response_snippet=self._redact(response.text)[:SNIPPET_CHARS],
                latency_s=time.monotonic() - t0,
                request_bytes=len(body),
                started_at=started_at,
            )
        logger.debug(
            "batch to %s: %d items, %d bytes -> %s in %.3fs",
            self.destination.name,
            len(items),
            result.request_bytes,
            result.status_code if result.status_code is not None else result.error_kind,
            result.latency_s,
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

    def _failure(
        self,
        kind: ErrorKind,
        exc: httpx.RequestError,
        t0: float,
        request_bytes: int,
        started_at: datetime,
    ) -> SendResult:
        latency_s = time.monotonic() - t0
        detail = str(exc).strip()
        text = f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__
        return SendResult(
            status_code=None,
            error_kind=kind,
            error=self._redact(text)[:_ERROR_CHARS],
            retry_after=None,
            response_snippet="",
            latency_s=latency_s,
            request_bytes=request_bytes,
            started_at=started_at,
        )

    def _redact(self, text: str) -> str:
        # httpx does not put credentials in its messages, but a proxy or a misbehaving server
        # could echo them back; scrubbing here keeps the promise independent of either. Callers
        # truncate after redacting, so a cut can never leave part of a secret behind.
        for secret in self._secrets:
            text = text.replace(secret, _REDACTED)
        return text
