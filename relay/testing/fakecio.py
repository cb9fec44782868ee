"""A local HTTP server that behaves like Customer.io's CDP (Data Pipelines) API.

For integration tests, the demo, the chaos test and benchmarks. It speaks real HTTP/1.1 with
keep-alive on 127.0.0.1, so the relay's client, connection pool and timeouts are exercised as
they are against ``cdp.customer.io``. Standard library only.

What it reproduces of Customer.io:

- ``POST /v1/batch`` (``{"batch": [...], "sentAt": ..., "context": ...}``) and the single-item
  endpoints ``/v1/identify``, ``/v1/track``, ``/v1/page``, ``/v1/screen``, ``/v1/group``,
  ``/v1/alias``. Success is ``200`` with body ``{}``.
- HTTP Basic auth, the write key as user name and an empty password.
- Strict mode: with ``X-Strict-Mode: 1`` an invalid body is a ``400`` and a bad key a ``401``;
  without it Customer.io answers ``200`` and throws the request away. Such requests are
  recorded with ``dropped=True`` and nothing in ``accepted``, so a test can show the loss.
- A request is accepted or rejected as a whole: one bad item (or one refused by the
  ``reject`` hook) rejects the batch and nothing from it is stored.
- Limits: 32768 bytes per item (as Customer.io's SDK measures it, ``len(json.dumps(item))``:
  ASCII escapes, ``", "`` and ``": "``), 512000 bytes per request body.
- ``Content-Encoding: gzip`` bodies (one or more gzip members) are decompressed first, and the
  limits apply to the decompressed body, as Customer.io applies them. A body that is not valid
  gzip, or any other content coding, is an invalid body (``400`` naming the reason).
- The batch's top-level ``context`` is recorded on the request (``RequestRecord.context``), not
  merged into the stored items: how Customer.io merges it with a call's own ``context`` is not
  documented.

Faults are injected before validation: first a FIFO of scripted faults (``script``), then
random faults drawn from a seeded ``random.Random`` (``set_fault_rates``). Kinds:

- ``"500"``, ``"502"``, ``"503"``, or ``"5xx"`` (one of the three, drawn from the seeded
  generator): that status, nothing accepted.
- ``"429"``: ``429`` with ``Retry-After: retry_after_s``, nothing accepted.
- ``"401"``: ``401`` whatever the key, nothing accepted.
- ``"drop"``: the request is read, then the connection is closed without a response.
- ``"slow"``: wait ``slow_s``, then process normally. The items ARE accepted: this is the case
  of a client that timed out while the server stored the data, so its retry is a duplicate.
- ``"timeout_edge"``: wait ``edge_s``, then process normally (the items ARE accepted). Set
  ``edge_s`` just under the client's deadline: the answer arrives either just in time or just
  too late, and in the second case the retry is a duplicate.
- ``"trickle"``: process normally (the items ARE accepted), send the status line and headers
  at once, with a ``Content-Length`` larger than the body that follows, then trickle the body
  one byte every ``trickle_interval_s`` for ``trickle_s`` and close the connection. A client
  must judge by the status: the body never completes. Only an answer of ``200`` trickles; a
  request refused (``400``, ``401``) is answered normally.
- ``"hang"``: read the request and answer nothing until ``hang_s`` has passed (or ``stop``),
  then close the connection. Nothing accepted.
- ``"reset"``: read the request, then reset the connection (RST: ``SO_LINGER`` 0 and close)
  without a response. Nothing accepted.
- ``"ok"`` (script only): no fault for that request.

``stop`` wakes every request waiting for latency or for one of these faults (``slow``,
``timeout_edge``, ``trickle``, ``hang``): it returns promptly whatever the connections do.

``fault_counts`` counts the faults injected by the kind that was answered (``"502"``, never
``"5xx"``). A scripted ``"401"`` answers ``401`` with or without strict mode, like the other
status faults. ``latency_s`` is added to every API request, faulted or not.

Records (``accepted``, ``requests``, ``fault_counts``) are guarded by one lock, whose condition
is notified whenever a request arrives and whenever it is recorded; ``wait_for`` waits on it.
A request is recorded before its response is written. For use from another process,
``GET /_fake/received`` and ``GET /_fake/stats`` return the same data as JSON, and
``python -m relay.testing.fakecio`` runs the server until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import dataclasses
import io
import json
import random
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final

__all__ = [
    "FAULT_KINDS",
    "ITEM_TYPES",
    "MAX_ITEM_BYTES",
    "MAX_REQUEST_BYTES",
    "NO_RESPONSE",
    "STORING_FAULTS",
    "Accepted",
    "FakeCustomerIO",
    "RequestRecord",
    "main",
]

MAX_ITEM_BYTES: Final = 32768
"""Largest item Customer.io takes, measured as its SDK measures it: ``len(json.dumps(item))``,
so one "é" counts 6 bytes (``\\u00e9``) and an emoji 12 (a surrogate pair)."""

MAX_REQUEST_BYTES: Final = 512000
"""Largest request body Customer.io takes (500 KB)."""

ITEM_TYPES: Final = frozenset({"identify", "track", "page", "screen", "group", "alias"})

NO_RESPONSE: Final = 0
"""``RequestRecord.status`` of a request whose connection was closed without an answer."""

FAULT_KINDS: Final = (
    "500",
    "502",
    "503",
    "5xx",
    "429",
    "401",
    "drop",
    "slow",
    "trickle",
    "timeout_edge",
    "hang",
    "reset",
)
"""Fault kinds accepted by ``script`` and ``set_fault_rates``; random draws follow this order.

New kinds go at the end: a rate table without them draws the same faults for the same seed.
"""

STORING_FAULTS: Final = frozenset({"slow", "timeout_edge", "trickle"})
"""Faults after which the items are stored although the client may never see the answer."""

_SCRIPT_KINDS: Final = frozenset((*FAULT_KINDS, "ok"))
_SERVER_ERRORS: Final = ("500", "502", "503")

# Single-item endpoints name the item's type; None marks the batch endpoint.
_ENDPOINTS: Final[Mapping[str, str | None]] = {
    "/v1/batch": None,
    **{f"/v1/{kind}": kind for kind in sorted(ITEM_TYPES)},
}

# The same text as json.dumps(item), the SDK's measure of an item, with the encoder built once.
# Parsed JSON cannot be circular, so that check is skipped.
_SDK_JSON: Final = json.JSONEncoder(check_circular=False)

_EMPTY_OBJECT: Final = b"{}"

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)

# zlib's window size plus 16: a gzip member (header and CRC-32 trailer), not a zlib stream.
_GZIP_WBITS: Final = 16 + zlib.MAX_WBITS


@dataclass(frozen=True, slots=True)
class Accepted:
    """One item the server stored, in the order stored (``seq`` counts from 1)."""

    seq: int
    received_at: float
    """``time.monotonic()`` when the request's items were stored."""
    request_no: int
    item: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request to an API path, recorded when its outcome was decided.

    ``status`` is what the client was sent (``NO_RESPONSE`` when the connection was closed
    instead). ``items`` is the number of items in the body when it could be parsed, ``bytes``
    the body's length once its content coding was undone (what the size limit measures; the
    length as received when it could not be undone, one past the limit when decompression
    stopped there). ``fault`` is the injected fault (``"503"`` rather than ``"5xx"``), or
    None. ``dropped`` is Customer.io's silent loss: answered ``200`` without strict mode, yet
    nothing stored.

    ``content_encoding`` is the request's ``Content-Encoding`` (lower case), None without one;
    ``wire_bytes`` the body's length as received when it had one, else None. ``context`` is a
    batch's top-level ``context`` object, when the body was parsed and had one.
    """

    no: int
    path: str
    status: int
    strict: bool
    auth_ok: bool
    items: int
    bytes: int
    fault: str | None
    dropped: bool
    received_at: float = dataclasses.field(default=0.0, compare=False)
    """``time.monotonic()`` when the request's body had been read (before any latency); not
    part of equality, so a test can compare records without knowing the clock."""
    content_encoding: str | None = None
    wire_bytes: int | None = None
    context: dict[str, Any] | None = None
    user_agent: str | None = dataclasses.field(default=None, compare=False)
    """The request's ``User-Agent``; not part of equality, as a generic client's names the
    version of its HTTP library."""
    sent_at: str | None = dataclasses.field(default=None, compare=False)
    """A batch's ``sentAt`` as the client wrote it (the relay's attempt ``started_at``): what
    ties a request to the client's own record of it."""


@dataclass(slots=True)
class _Exchange:
    """What is known about one API request while it is being answered."""

    handler: _Handler
    no: int
    path: str
    strict: bool
    auth_ok: bool
    items: int
    body_bytes: int
    fault: str | None
    received_at: float = 0.0
    content_encoding: str | None = None
    wire_bytes: int | None = None
    context: dict[str, Any] | None = None
    user_agent: str | None = None
    sent_at: str | None = None


class FakeCustomerIO:
    """A Customer.io CDP API on a local port; see the module docstring for its behaviour.

    ``latency_s``, ``slow_s``, ``edge_s``, ``trickle_s``, ``trickle_interval_s``, ``hang_s``,
    ``retry_after_s`` and ``reject`` are plain attributes and may be changed while the server
    runs (a request uses the values read when its fault takes effect). ``reject`` is called
    with each valid item of a request; a string it returns rejects the whole request (``400``
    naming the item, or a silent drop without strict mode).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        write_keys: Iterable[str] = frozenset({"test-key"}),
        *,
        latency_s: float = 0.0,
        slow_s: float = 3.0,
        edge_s: float = 0.9,
        trickle_s: float = 3.0,
        trickle_interval_s: float = 0.5,
        hang_s: float = 30.0,
        retry_after_s: float = 1.0,
        reject: Callable[[dict[str, Any]], str | None] | None = None,
    ) -> None:
        if isinstance(write_keys, str):
            raise TypeError("write_keys is a collection of keys, not one str")
        self.host = host
        self.latency_s = latency_s
        self.slow_s = slow_s
        self.edge_s = edge_s
        self.trickle_s = trickle_s
        self.trickle_interval_s = trickle_interval_s
        self.hang_s = hang_s
        self.retry_after_s = retry_after_s
        self.reject = reject

        self.accepted: list[Accepted] = []
        self.requests: list[RequestRecord] = []
        self.fault_counts: dict[str, int] = {}
        self.connections_accepted = 0
        """TCP connections accepted; with keep-alive, far fewer than requests."""

        # One lock for every record and setting below. Reentrant, so that a wait_for
        # predicate may call accepted_items() and friends while the condition holds it.
        self._cond = threading.Condition(threading.RLock())
        self._write_keys = set(write_keys)
        self._script: deque[str] = deque()
        self._rates: dict[str, float] = {}
        self._rng = random.Random()
        self._request_count = 0
        self._connections: set[socket.socket] = set()

        self._port = port
        self._server: _HTTPServer | None = None
        self._thread: threading.Thread | None = None
        # Set by stop(): wakes handlers sleeping for latency or a fault's delay.
        self._stopping = threading.Event()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> FakeCustomerIO:
        """Bind and serve in a daemon thread. After a stop(), binds the same port again."""
        if self._server is not None:
            raise RuntimeError("FakeCustomerIO is already running")
        server = _HTTPServer((self.host, self._port), self)
        # Keep the port a restart binds to: a test can take the server down and bring it
        # back at the same URL, as an outage would look to the client.
        self._port = server.server_port
        self._stopping.clear()
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakecio:{self._port}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Close the listening socket and every open connection; return once handlers ended.

        Requests sleeping for latency or a "slow", "timeout_edge" or "hang" fault are
        abandoned: their connection is closed without a response and nothing from them is
        accepted. A "trickle" body stops where it was (its items were accepted already).
        """
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._server = self._thread = None
        self._stopping.set()
        # Shutting the listening socket down refuses new connections at once and wakes the
        # accept loop (its accept() then fails until shutdown() has set the flag it checks),
        # so stop() does not wait out the loop's poll interval.
        with contextlib.suppress(OSError):
            server.socket.shutdown(socket.SHUT_RDWR)
        server.shutdown()
        server.server_close()
        thread.join()
        with self._cond:
            # Under the lock: a connection still in the set has not been closed by its
            # handler (it leaves the set before closing), so its descriptor cannot have
            # been reused by another socket.
            for conn in self._connections:
                with contextlib.suppress(OSError):  # the peer may have gone already
                    conn.shutdown(socket.SHUT_RDWR)
            self._cond.wait_for(lambda: not self._connections, timeout=2.0)

    def __enter__(self) -> FakeCustomerIO:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (known once started)."""
        if self._port == 0:
            raise RuntimeError("FakeCustomerIO has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; the API paths go after it."""
        return f"http://{self.host}:{self.port}"

    # -- configuration ---------------------------------------------------------------------

    @property
    def write_keys(self) -> frozenset[str]:
        with self._cond:
            return frozenset(self._write_keys)

    def add_write_key(self, key: str) -> None:
        with self._cond:
            self._write_keys.add(key)

    def remove_write_key(self, key: str) -> None:
        with self._cond:
            self._write_keys.discard(key)

    def script(self, faults: Iterable[str]) -> None:
        """Queue faults, one per API request in arrival order, ahead of the random ones."""
        kinds = list(faults)
        unknown = [kind for kind in kinds if kind not in _SCRIPT_KINDS]
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {sorted(_SCRIPT_KINDS)}")
        with self._cond:
            self._script.extend(kinds)

    def clear_script(self) -> None:
        """Drop the scripted faults not yet used."""
        with self._cond:
            self._script.clear()

    def set_fault_rates(self, rates: Mapping[str, float], seed: int | None = None) -> None:
        """Inject faults at random with these probabilities per request; ``{}`` turns it off.

        One number is drawn per request and compared with the rates in ``FAULT_KINDS`` order,
        so the same seed and the same sequence of requests give the same faults.
        """
        unknown = sorted(set(rates) - set(FAULT_KINDS))
        if unknown:
            raise ValueError(f"unknown fault kind(s) {unknown}; known: {list(FAULT_KINDS)}")
        for kind, rate in rates.items():
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"fault rate for {kind!r} must be within [0, 1], got {rate}")
        if sum(rates.values()) > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {sum(rates.values())}, more than 1")
        with self._cond:
            self._rates = {kind: rates[kind] for kind in FAULT_KINDS if rates.get(kind)}
            self._rng = random.Random(seed)

    def reset(self) -> None:
        """Forget every record and counter, and any scripted fault not yet used.

        Configuration stays: write keys, fault rates, the reject hook and the timings.
        """
        with self._cond:
            self.accepted.clear()
            self.requests.clear()
            self.fault_counts.clear()
            self.connections_accepted = 0
            self._request_count = 0
            self._script.clear()
            self._cond.notify_all()

    # -- records -----------------------------------------------------------------------------

    def accepted_items(self) -> list[dict[str, Any]]:
        """The stored items, in the order stored."""
        with self._cond:
            return [record.item for record in self.accepted]

    def accepted_message_ids(self) -> list[str]:
        """``messageId`` of each stored item that has one, in the order stored."""
        with self._cond:
            return [
                record.item["messageId"] for record in self.accepted if "messageId" in record.item
            ]

    @property
    def requests_arrived(self) -> int:
        """API requests whose body has been read, answered or not (``requests`` holds only
        the answered ones)."""
        with self._cond:
            return self._request_count

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
        """Wait until ``predicate()`` is true; False if it still is not after ``timeout`` s.

        The predicate runs with the lock held, re-evaluated each time a request arrives (its
        fault drawn) and each time one is recorded.
        """
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    def stats(self) -> dict[str, Any]:
        """Counts for ``GET /_fake/stats``: requests by status, faults, accepted, dropped,
        and requests that came gzip-compressed."""
        with self._cond:
            by_status: dict[str, int] = {}
            dropped = dropped_items = gzipped = 0
            for record in self.requests:
                key = str(record.status)
                by_status[key] = by_status.get(key, 0) + 1
                if record.content_encoding in ("gzip", "x-gzip"):
                    gzipped += 1
                if record.dropped:
                    dropped += 1
                    dropped_items += record.items
            return {
                "requests": len(self.requests),
                "requests_by_status": by_status,
                "faults": dict(self.fault_counts),
                "accepted": len(self.accepted),
                "dropped": dropped,
                "dropped_items": dropped_items,
                "connections": self.connections_accepted,
                "gzipped": gzipped,
            }

    def received(self) -> dict[str, Any]:
        """The body of ``GET /_fake/received``."""
        with self._cond:
            return {
                "accepted": [
                    {"seq": r.seq, "request_no": r.request_no, "item": r.item}
                    for r in self.accepted
                ]
            }

    # -- request handling (called on handler threads) ----------------------------------------

    def _handle_get(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        if path == "/_fake/received":
            _send(h, 200, json.dumps(self.received()).encode())
        elif path == "/_fake/stats":
            _send(h, 200, json.dumps(self.stats()).encode())
        else:
            _send(h, 404, _error_body(f"no such endpoint: GET {path}"))

    def _handle_post(self, h: _Handler) -> None:
        path = h.path.split("?", 1)[0]
        body = _read_body(h)
        encoding = h.headers.get("Content-Encoding", "").strip().lower() or None
        user_agent = h.headers.get("User-Agent")
        strict = h.headers.get("X-Strict-Mode", "").strip() == "1"
        key = _write_key_from(h.headers.get("Authorization"))
        received_at = time.monotonic()
        endpoint_known = path in _ENDPOINTS
        with self._cond:
            self._request_count += 1
            no = self._request_count
            auth_ok = key is not None and key in self._write_keys
            fault = self._draw_fault() if endpoint_known and body is not None else None
            # Waiters may watch faults being drawn, e.g. to act while a "slow" one sleeps.
            self._cond.notify_all()

        if body is None:
            # Unparseable framing leaves the connection's position in the stream unknown.
            h.close_connection = True
            ex = _Exchange(h, no, path, strict, auth_ok, 0, 0, None)
            self._conclude(ex, 400, _error_body("malformed Content-Length or chunked body"))
            return
        if not endpoint_known:
            ex = _Exchange(h, no, path, strict, auth_ok, 0, len(body), None)
            self._conclude(ex, 404, _error_body(f"no such endpoint: POST {path}"))
            return

        wire_bytes = None if encoding is None else len(body)
        items: list[Any] = []
        context: dict[str, Any] | None = None
        sent_at: str | None = None
        error: str | None = None
        # A body that cannot be decoded, or is over the limit, is not parsed: Customer.io
        # refuses it on that alone. The limit applies to the decompressed body.
        if encoding is not None:
            body, error = _decode_content(body, encoding, MAX_REQUEST_BYTES)
        if error is None and len(body) > MAX_REQUEST_BYTES:
            error = f"request body is {len(body)} bytes, over the {MAX_REQUEST_BYTES}-byte limit"
        if error is None:
            items, error, context, sent_at = _parse_body(body, _ENDPOINTS[path])
        ex = _Exchange(
            h,
            no,
            path,
            strict,
            auth_ok,
            len(items),
            len(body),
            fault,
            received_at,
            content_encoding=encoding,
            wire_bytes=wire_bytes,
            context=context,
            user_agent=user_agent,
            sent_at=sent_at,
        )

        if self.latency_s > 0 and self._stopping.wait(self.latency_s):
            self._abandon(ex)
            return
        if fault == "drop":
            self._abandon(ex)
            return
        if fault in _SERVER_ERRORS:
            self._conclude(ex, int(fault), _error_body(f"injected fault: {fault}"))
            return
        if fault == "429":
            retry_after = f"{self.retry_after_s:g}"
            headers = (("Retry-After", retry_after),)
            self._conclude(ex, 429, _error_body("rate limited"), headers=headers)
            return
        if fault == "401":
            self._conclude(ex, 401, _error_body("injected fault: 401"))
            return
        if fault == "hang":
            # The request was read; nothing is ever answered. The connection is closed at
            # the end (or at stop), as a proxy that gave up would do.
            self._stopping.wait(self.hang_s)
            self._abandon(ex)
            return
        if fault == "reset":
            self._reset(ex)
            return
        if fault == "slow" and self._stopping.wait(self.slow_s):
            self._abandon(ex)
            return
        if fault == "timeout_edge" and self._stopping.wait(self.edge_s):
            self._abandon(ex)
            return

        if not auth_ok:
            self._refuse(ex, 401, "invalid or missing write key (HTTP Basic, key as user name)")
            return
        if error is None:
            error = _first_item_error(items)
        if error is None and self.reject is not None:
            error = self._first_rejection(items)
        if error is not None:
            self._refuse(ex, 400, error)
            return
        if fault == "trickle":
            self._trickle(ex, items)
            return
        self._conclude(ex, 200, _EMPTY_OBJECT, accept=items)

    def _draw_fault(self) -> str | None:
        # Called with the lock held, so concurrent requests consume the script and the
        # generator in one order, and fault_counts matches what was injected.
        if self._script:
            kind = self._script.popleft()
        elif self._rates:
            roll = self._rng.random()
            kind = "ok"
            for candidate, rate in self._rates.items():
                if roll < rate:
                    kind = candidate
                    break
                roll -= rate
        else:
            return None
        if kind == "ok":
            return None
        if kind == "5xx":
            kind = self._rng.choice(_SERVER_ERRORS)
        self.fault_counts[kind] = self.fault_counts.get(kind, 0) + 1
        return kind

    def _first_rejection(self, items: list[Any]) -> str | None:
        reject = self.reject
        if reject is None:
            return None
        for index, item in enumerate(items):
            reason = reject(item)
            if reason is not None:
                return f"item {index}: {reason}"
        return None

    def _refuse(self, ex: _Exchange, status: int, message: str) -> None:
        if ex.strict:
            self._conclude(ex, status, _error_body(message))
        else:
            # Customer.io's default: 200, and the request is thrown away.
            self._conclude(ex, 200, _EMPTY_OBJECT, dropped=True)

    def _abandon(self, ex: _Exchange) -> None:
        ex.handler.close_connection = True
        self._record(ex, NO_RESPONSE, dropped=False, accept=())

    def _reset(self, ex: _Exchange) -> None:
        h = ex.handler
        h.close_connection = True
        self._record(ex, NO_RESPONSE, dropped=False, accept=())
        # l_onoff=1, l_linger=0: close() sends RST instead of FIN. The socket is closed here
        # rather than by the server's shutdown_request, which would send a FIN first
        # (shutdown(SHUT_WR)). Python defers the real close until the handler's file objects
        # are closed (at the end of this request), and later calls on the closed socket
        # object fail with EBADF without touching whatever reuses the descriptor.
        with contextlib.suppress(OSError):
            h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        h.connection.close()

    def _trickle(self, ex: _Exchange, items: Sequence[dict[str, Any]]) -> None:
        """Accept, answer 200 with headers at once, then a body that never completes."""
        h = ex.handler
        h.close_connection = True
        interval = max(self.trickle_interval_s, 0.001)
        count = max(1, int(self.trickle_s / interval))
        # The real body, then JSON whitespace: whatever part arrives is a prefix of "{}  ...".
        body = (_EMPTY_OBJECT + b" " * count)[:count]
        self._record(ex, 200, dropped=False, accept=items)
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        # Larger than what follows: the client waits for bytes that never come.
        h.send_header("Content-Length", str(len(body) + 64))
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.flush()
        for byte in body:
            if self._stopping.wait(interval):
                return
            h.wfile.write(bytes((byte,)))
            h.wfile.flush()

    def _conclude(
        self,
        ex: _Exchange,
        status: int,
        body: bytes,
        *,
        dropped: bool = False,
        accept: Sequence[dict[str, Any]] = (),
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        # Recorded before the response is written: once a client has its answer, the
        # records already show it, so a test can assert right after the call returns.
        self._record(ex, status, dropped=dropped, accept=accept)
        _send(ex.handler, status, body, headers)

    def _record(
        self, ex: _Exchange, status: int, *, dropped: bool, accept: Sequence[dict[str, Any]]
    ) -> None:
        record = RequestRecord(
            no=ex.no,
            path=ex.path,
            status=status,
            strict=ex.strict,
            auth_ok=ex.auth_ok,
            items=ex.items,
            bytes=ex.body_bytes,
            fault=ex.fault,
            dropped=dropped,
            received_at=ex.received_at,
            content_encoding=ex.content_encoding,
            wire_bytes=ex.wire_bytes,
            context=ex.context,
            user_agent=ex.user_agent,
            sent_at=ex.sent_at,
        )
        with self._cond:
            now = time.monotonic()
            # One lock hold per request: items of concurrent requests never interleave.
            for item in accept:
                self.accepted.append(Accepted(len(self.accepted) + 1, now, ex.no, item))
            self.requests.append(record)
            self._cond.notify_all()

    def _track_connection(self, conn: socket.socket, *, opened: bool) -> None:
        with self._cond:
            if opened:
                self._connections.add(conn)
                self.connections_accepted += 1
            else:
                self._connections.discard(conn)
                self._cond.notify_all()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "FakeCustomerIO"
    sys_version = ""
    # Buffered writes send headers and body in one segment, and without Nagle no response
    # waits for the client's delayed ACK (tens of ms per request on a keep-alive connection).
    wbufsize = -1
    disable_nagle_algorithm = True
    server: _HTTPServer

    def do_POST(self) -> None:
        self.server.fake._handle_post(self)

    def do_GET(self) -> None:
        self.server.fake._handle_get(self)

    def handle_expect_100(self) -> bool:
        # With buffered writes the interim response would sit in the buffer while the
        # client waits for it before sending the body.
        result = super().handle_expect_100()
        self.wfile.flush()
        return result

    def log_message(self, format: str, *args: Any) -> None:
        # No access log: benchmarks and tests would drown stderr.
        return


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], fake: FakeCustomerIO) -> None:
        self.fake = fake
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on DNS.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        self.fake._track_connection(request, opened=True)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        # Leave the set before closing: stop() shuts down only sockets still in it.
        self.fake._track_connection(request, opened=False)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that timed out or hung up is normal here (the "slow" fault provokes it);
        # anything else is a defect of this server and keeps its traceback.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


# -- pure helpers ----------------------------------------------------------------------------


def _send(
    h: BaseHTTPRequestHandler, status: int, body: bytes, headers: Iterable[tuple[str, str]] = ()
) -> None:
    h.send_response(status)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(body)))
    for name, value in headers:
        h.send_header(name, value)
    if h.close_connection:
        h.send_header("Connection", "close")
    h.end_headers()
    h.wfile.write(body)


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _read_body(h: BaseHTTPRequestHandler) -> bytes | None:
    """The request body, or None when its framing is broken."""
    if "chunked" in h.headers.get("Transfer-Encoding", "").lower():
        return _read_chunked(h.rfile)
    raw = h.headers.get("Content-Length")
    if raw is None:
        return b""
    try:
        length = int(raw)
    except ValueError:
        return None
    if length < 0:
        return None
    body = h.rfile.read(length)
    return body if len(body) == length else None


def _read_chunked(rfile: io.BufferedIOBase) -> bytes | None:
    parts: list[bytes] = []
    while True:
        line = rfile.readline(1024)
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            return None
        if size == 0:
            break
        chunk = rfile.read(size)
        if len(chunk) != size or rfile.readline(1024).strip():
            return None
        parts.append(chunk)
    while rfile.readline(1024).strip():
        pass  # trailer fields, ignored
    return b"".join(parts)


def _write_key_from(authorization: str | None) -> str | None:
    """The write key of a ``Basic base64("<key>:")`` header; None for any other form."""
    if not authorization:
        return None
    scheme, _, encoded = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    key, colon, password = decoded.partition(":")
    if not colon or password:
        return None
    return key


def _no_constant(name: str) -> Any:
    # json.loads takes NaN and Infinity by default; they are not JSON and Customer.io
    # refuses them, so a client that emits them must fail here too.
    raise ValueError(f"{name} is not valid JSON")


def _decode_content(body: bytes, encoding: str, limit: int) -> tuple[bytes, str | None]:
    """``body`` with its ``Content-Encoding`` undone, and why that failed (None if it did not).

    Decompression stops one byte past ``limit``: a small body that inflates without end (a
    "zip bomb") costs no more memory than a body at the limit.
    """
    if encoding == "identity":
        return body, None
    # RFC 9110: a recipient should treat x-gzip as gzip.
    if encoding not in ("gzip", "x-gzip"):
        return body, f"Content-Encoding {encoding!r} is not supported (gzip or identity)"
    out = bytearray()
    rest = body
    while True:  # one gzip member per turn; a body may hold several (RFC 1952)
        inflater = zlib.decompressobj(_GZIP_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            return body, f"body is not valid gzip: {exc}"
        if len(out) > limit:
            return bytes(out), (
                f"request body decompresses to more than {limit} bytes, over the {limit}-byte limit"
            )
        if not inflater.eof:
            return body, "body is not valid gzip: it ends before the end of the gzip stream"
        rest = inflater.unused_data
        if not rest:
            return bytes(out), None


def _parse_body(
    body: bytes, single_type: str | None
) -> tuple[list[Any], str | None, dict[str, Any] | None, str | None]:
    """The request's items, the first request-level error (items not yet checked), a batch's
    top-level ``context`` (None when absent or not an object) and its ``sentAt``."""
    try:
        doc = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        return [], f"body is not valid JSON: {exc}", None, None
    if not isinstance(doc, dict):
        return [], "body must be a JSON object", None, None
    if single_type is not None:
        declared = doc.get("type", single_type)
        if declared != single_type:
            error = f"item 0: 'type' is {declared!r} but the endpoint is /v1/{single_type}"
            return [doc], error, None, None
        if "type" not in doc:
            # The endpoint implies the type; stored items always carry it, as in a batch.
            doc = {"type": single_type, **doc}
        return [doc], None, None, None
    if "batch" not in doc:
        return [], "'batch' is missing", None, None
    batch = doc["batch"]
    if not isinstance(batch, list):
        return [], "'batch' must be a list", None, None
    context = doc.get("context")
    if "context" in doc and not isinstance(context, dict):
        return batch, "batch 'context' must be an object", None, None
    if "sentAt" in doc and not _is_iso8601(doc["sentAt"]):
        return batch, "'sentAt' must be an ISO-8601 string", context, None
    return batch, None, context, doc.get("sentAt")


def _first_item_error(items: list[Any]) -> str | None:
    for index, item in enumerate(items):
        reason = _item_error(item)
        if reason is not None:
            return f"item {index}: {reason}"
    return None


def _item_error(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "must be a JSON object"
    kind = item.get("type")
    if kind not in ITEM_TYPES:
        return f"'type' must be one of {sorted(ITEM_TYPES)}, got {kind!r}"
    if kind == "track" and not _non_empty_str(item.get("event")):
        return "track requires a non-empty 'event'"
    if kind in ("identify", "track") and not (
        _non_empty_str(item.get("userId")) or _non_empty_str(item.get("anonymousId"))
    ):
        return f"{kind} requires a non-empty 'userId' or 'anonymousId'"
    for field in ("traits", "properties", "context"):
        if field in item and not isinstance(item[field], dict):
            return f"'{field}' must be an object"
    if "messageId" in item and not isinstance(item["messageId"], str):
        return "'messageId' must be a string"
    if "timestamp" in item and not _is_iso8601(item["timestamp"]):
        return f"'timestamp' must be an ISO-8601 string, got {item['timestamp']!r}"
    # ASCII only: every other character, a lone surrogate included, is a 6-byte \uXXXX escape.
    size = len(_SDK_JSON.encode(item))
    if size > MAX_ITEM_BYTES:
        return (
            f"{size} bytes as Customer.io's SDK measures it (json.dumps, non-ASCII as \\u "
            f"escapes), over the {MAX_ITEM_BYTES}-byte limit"
        )
    return None


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _is_iso8601(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# -- command line ----------------------------------------------------------------------------


def _fault_rates(text: str) -> dict[str, float]:
    rates: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, equals, value = part.partition("=")
        try:
            if not equals:
                raise ValueError
            rates[kind.strip()] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {part!r}") from None
    return rates


def _arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m relay.testing.fakecio",
        description="Serve a local stand-in for Customer.io's CDP API until SIGTERM or SIGINT.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--write-key", action="append", required=True, help="a valid write key (repeatable)"
    )
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added to every request")
    parser.add_argument(
        "--faults",
        type=_fault_rates,
        default={},
        help="random fault rates, e.g. 5xx=0.2,429=0.1,drop=0.05,slow=0.01,trickle=0.02,"
        "timeout_edge=0.02,hang=0.01,reset=0.02",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for the fault draws")
    parser.add_argument("--slow-s", type=float, default=3.0, help="delay of a 'slow' fault")
    parser.add_argument(
        "--edge-s",
        type=float,
        default=0.9,
        help="delay of a 'timeout_edge' fault (set it just under the client's timeout)",
    )
    parser.add_argument(
        "--trickle-s", type=float, default=3.0, help="how long a 'trickle' body trickles"
    )
    parser.add_argument(
        "--trickle-interval-s",
        type=float,
        default=0.5,
        help="seconds between the bytes of a 'trickle' body",
    )
    parser.add_argument(
        "--hang-s", type=float, default=30.0, help="how long a 'hang' fault holds the request"
    )
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After on 429")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _arg_parser()
    args = parser.parse_args(argv)
    fake = FakeCustomerIO(
        args.host,
        args.port,
        args.write_key,
        latency_s=args.latency_ms / 1000.0,
        slow_s=args.slow_s,
        edge_s=args.edge_s,
        trickle_s=args.trickle_s,
        trickle_interval_s=args.trickle_interval_s,
        hang_s=args.hang_s,
        retry_after_s=args.retry_after_s,
    )
    try:
        fake.set_fault_rates(args.faults, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    signals = {signal.SIGINT, signal.SIGTERM}
    # Blocked before any thread exists, so every thread inherits the mask and sigwait is the
    # only receiver: no signal handler can run in the middle of a lock-holding call.
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    fake.start()
    try:
        print(f"listening on {fake.url}", flush=True)
        signal.sigwait(signals)
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
