"""A hostile HTTP/1.1 server on a raw socket, for testing the client's request deadline.

``tests.fakecio`` (and ``http.server``) behave like a well-mannered server; this one misbehaves
on purpose, at the byte level: it can trickle a body or the status line one byte at a time,
hang before answering or before reading, reset the connection, or hang up without a word.

Standard library only. One thread accepts, one thread serves each connection; every blocking
wait is either a socket call that ``stop`` unblocks by shutting the socket down, or a wait on
the server's stop event, so stopping never hangs whatever the connections are doing::

    with RawFake(trickle_body(0.4)) as server:
        client = CustomerIOClient(Destination("p", server.url, KEY), timeout_s=1.0)
        ...
        server.behaviour = ok()        # thread-safe; applies from the next request on
        assert server.requests == 1    # request heads read
        assert server.bodies == [...]  # request bodies read in full

The behaviour is chosen when a request's head has been read (when a connection is accepted,
for ``hang_on_accept``), so changing it never affects a response already under way. ``route``
picks a behaviour per request from its body instead, for tests that need two behaviours on
one server at once. ``tls`` (a server-side ``ssl.SSLContext``) serves HTTPS: the handshake is
done after accepting, except for ``hang_on_accept``, which then hangs the client's handshake.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

__all__ = [
    "Behaviour",
    "RawFake",
    "close_after_request",
    "hang_before_response",
    "hang_on_accept",
    "ok",
    "reset_after_request",
    "slow_ok",
    "slow_read",
    "status",
    "trickle_body",
    "trickle_headers",
]

Kind = Literal[
    "ok",
    "slow_ok",
    "trickle_body",
    "trickle_headers",
    "hang_before_response",
    "hang_on_accept",
    "reset_after_request",
    "close_after_request",
    "status",
    "slow_read",
]
After = Literal["keep", "close", "reset"]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 429: "Too Many Requests"}
_MAX_HEAD = 64 * 1024


@dataclass(frozen=True)
class Behaviour:
    """What the server does with a request. Build one with the functions below."""

    kind: Kind
    delay: float = 0.0
    interval: float = 0.0
    code: int = 200
    body: bytes = b"{}"
    headers: Mapping[str, str] = field(default_factory=dict)
    after: After = "keep"
    chunk: int = 65536


def ok() -> Behaviour:
    """Read the request, answer ``200`` ``{}``, keep the connection alive."""
    return Behaviour("ok")


def slow_ok(delay: float) -> Behaviour:
    """Read the request, wait ``delay`` seconds, then answer like ``ok``."""
    return Behaviour("slow_ok", delay=delay)


def slow_read(interval: float, chunk: int = 65536) -> Behaviour:
    """Read the request ``chunk`` bytes every ``interval`` seconds, then answer like ``ok``:
    a peer that drains a large request slowly, so each write of it makes a little progress."""
    return Behaviour("slow_read", interval=interval, chunk=chunk)


def trickle_body(interval: float, length: int = 20) -> Behaviour:
    """Send the status line and headers (``Content-Length: length``) at once, then the body
    one byte every ``interval`` seconds."""
    return Behaviour("trickle_body", interval=interval, body=b"x" * length)


def trickle_headers(interval: float) -> Behaviour:
    """Send the status line and the headers one byte every ``interval`` seconds."""
    return Behaviour("trickle_headers", interval=interval)


def hang_before_response() -> Behaviour:
    """Read the request, then never answer (until the server stops)."""
    return Behaviour("hang_before_response")


def hang_on_accept() -> Behaviour:
    """Accept the connection and never read from it."""
    return Behaviour("hang_on_accept")


def reset_after_request() -> Behaviour:
    """Read the request, then reset the connection (RST: ``SO_LINGER`` 0 and close)."""
    return Behaviour("reset_after_request")


def close_after_request() -> Behaviour:
    """Read the request, then close the connection cleanly (FIN) without a response."""
    return Behaviour("close_after_request")


def status(
    code: int,
    body: bytes = b"",
    headers: Mapping[str, str] | None = None,
    *,
    after: After = "keep",
) -> Behaviour:
    """Answer ``code`` with ``body``. ``Content-Length`` is the body's length unless
    ``headers`` sets it (to announce more than is sent, say). ``after`` is what happens to the
    connection once the response is out: kept alive, closed (FIN) or reset (RST)."""
    return Behaviour("status", code=code, body=body, headers=dict(headers or {}), after=after)


class _Closed(Exception):
    """The peer went away, or the server is stopping."""


class RawFake:
    """The server. Binds 127.0.0.1 on a free port when constructed; ``stop`` (or leaving the
    ``with`` block) closes the listening socket and every connection, and joins the threads."""

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        *,
        route: Callable[[bytes], Behaviour] | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._tls = tls
        self._behaviour = behaviour or ok()
        self._route = route
        self._requests = 0
        self._connections = 0
        self._bodies: list[bytes] = []
        self._open: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        # accept() polls so that stop() never depends on closing a socket under a blocked call.
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._acceptor = threading.Thread(target=self._accept_loop, name="rawfake-accept")
        self._acceptor.daemon = True
        self._acceptor.start()

    # --- what a test reads and sets ------------------------------------------------------

    @property
    def behaviour(self) -> Behaviour:
        with self._lock:
            return self._behaviour

    @behaviour.setter
    def behaviour(self, value: Behaviour) -> None:
        with self._lock:
            self._behaviour = value

    @property
    def requests(self) -> int:
        """Requests whose head (request line and headers) the server has read."""
        with self._lock:
            return self._requests

    @property
    def bodies(self) -> list[bytes]:
        """The body of every request read in full, in the order they completed."""
        with self._lock:
            return list(self._bodies)

    @property
    def connections(self) -> int:
        """Connections accepted so far."""
        with self._lock:
            return self._connections

    # --- lifecycle ----------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self._acceptor.join(timeout=5)
        self._listener.close()
        with self._lock:
            conns = list(self._open)
            threads = list(self._threads)
        for conn in conns:
            _shut(conn)
        for thread in threads:
            thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- serving ------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            thread = threading.Thread(target=self._serve, args=(conn,), name="rawfake-conn")
            thread.daemon = True
            with self._lock:
                if self._stopping.is_set():
                    conn.close()
                    return
                self._connections += 1
                self._open.add(conn)
                self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        buffer = bytearray()
        try:
            if self.behaviour.kind == "hang_on_accept":
                self._stopping.wait()
                return
            if self._tls is not None:
                conn = self._wrap(conn)
            while not self._stopping.is_set():
                first = self.behaviour
                throttle = (first.interval, first.chunk) if first.kind == "slow_read" else None
                body = self._read_request(conn, buffer, throttle)
                behaviour = self._route(body) if self._route is not None else self.behaviour
                if not self._respond(conn, behaviour):
                    return
        except (_Closed, OSError, ValueError):
            pass
        finally:
            with self._lock:
                self._open.discard(conn)
            _shut(conn)

    def _wrap(self, conn: socket.socket) -> socket.socket:
        assert self._tls is not None
        # The handshake happens in wrap_socket, on a socket stop() can no longer shut down (it
        # has been detached), so it gets a timeout of its own.
        conn.settimeout(5)
        tls = self._tls.wrap_socket(conn, server_side=True)
        tls.settimeout(None)
        with self._lock:
            # wrap_socket detached the plain socket; stop() must now shut the TLS one down.
            self._open.discard(conn)
            self._open.add(tls)
        return tls

    def _read_request(
        self, conn: socket.socket, buffer: bytearray, throttle: tuple[float, int] | None
    ) -> bytes:
        while b"\r\n\r\n" not in buffer:
            if len(buffer) > _MAX_HEAD:
                raise _Closed("request head too long")
            _recv_into(conn, buffer)
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        headers = _parse_headers(head)
        with self._lock:
            self._requests += 1
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = _read_chunked(conn, buffer)
        else:
            length = int(headers.get("content-length", "0"))
            while len(buffer) < length:
                if throttle is not None:
                    if self._stopping.wait(throttle[0]):
                        raise _Closed("stopping")
                    _recv_into(conn, buffer, throttle[1])
                else:
                    _recv_into(conn, buffer)
            body = bytes(buffer[:length])
            del buffer[:length]
        with self._lock:
            self._bodies.append(body)
        return body

    def _respond(self, conn: socket.socket, b: Behaviour) -> bool:
        """Answer one request; False when the connection is finished with."""
        kind = b.kind
        if kind in ("ok", "slow_ok", "slow_read"):
            if kind == "slow_ok" and self._stopping.wait(b.delay):
                return False
            conn.sendall(_response(200, b"{}", {}))
            return True
        if kind == "trickle_body":
            conn.sendall(_response(200, b"", {"Content-Length": str(len(b.body))}))
            return self._trickle(conn, b.body, b.interval)
        if kind == "trickle_headers":
            return self._trickle(conn, _response(200, b"{}", {}), b.interval)
        if kind == "hang_before_response":
            self._stopping.wait()
            return False
        if kind == "reset_after_request":
            _reset(conn)
            return False
        if kind == "close_after_request":
            conn.shutdown(socket.SHUT_RDWR)
            return False
        if kind == "status":
            conn.sendall(_response(b.code, b.body, b.headers))
            if b.after == "reset":
                _reset(conn)
                return False
            if b.after == "close":
                conn.shutdown(socket.SHUT_RDWR)
                return False
            return True
        raise AssertionError(f"rawfake cannot act on {kind!r}")  # pragma: no cover

    def _trickle(self, conn: socket.socket, data: bytes, interval: float) -> bool:
        for i in range(len(data)):
            if self._stopping.wait(interval):
                return False
            conn.sendall(data[i : i + 1])
        return True


def _response(code: int, body: bytes, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {code} {_REASONS.get(code, 'Status')}"]
    names = {name.lower() for name in headers}
    if "content-length" not in names:
        lines.append(f"Content-Length: {len(body)}")
    if "content-type" not in names:
        lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _parse_headers(head: bytes) -> dict[str, str]:
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers


def _recv_into(conn: socket.socket, buffer: bytearray, size: int = 65536) -> None:
    data = conn.recv(size)
    if not data:
        raise _Closed("peer closed the connection")
    buffer += data


def _read_chunked(conn: socket.socket, buffer: bytearray) -> bytes:
    body = bytearray()
    while True:
        while b"\r\n" not in buffer:
            _recv_into(conn, buffer)
        size_line, _, rest = bytes(buffer).partition(b"\r\n")
        buffer[:] = rest
        size = int(size_line.split(b";")[0], 16)
        while len(buffer) < size + 2:
            _recv_into(conn, buffer)
        body += buffer[:size]
        del buffer[: size + 2]
        if size == 0:
            return bytes(body)


def _reset(conn: socket.socket) -> None:
    # l_onoff=1, l_linger=0: close() discards unsent data and sends RST instead of FIN.
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def _shut(conn: socket.socket) -> None:
    # shutdown() wakes a thread blocked in recv() on this socket; close() alone may not.
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)
    conn.close()
