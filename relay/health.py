"""``/metrics``, ``/livez`` and ``/readyz`` for one relay process, on a small threaded HTTP server.

Probes, as Kubernetes reads them (200 ok, 503 not; a JSON body says why):

- ``/livez``: the delivery loop still finishes cycles. It fails when no cycle has finished for
  longer than ``stuck_after_s`` (a claim waiting forever on a lock, a thread deadlock): a
  restart is then the remedy. A database that is down does *not* fail it: each cycle then
  fails fast (connect timeout) and still finishes, and a restart would not bring the
  database back.
- ``/readyz``: the database answers on a fresh connection and holds the head revision of this
  relay's migration scripts (read from ``relay_outbox``'s comment, which every role may read
  and every way of migrating writes: migration relay_0005). A fresh
  connection rather than the relay's own: the relay's may be busy in a delivery cycle, and a
  probe must not queue behind it nor disturb it.
- ``/healthz``: the same as ``/readyz``, kept for scrapers and scripts that used it.

A destination paused for a rejected write key (401/403) fails neither probe: restarting the
relay or taking it out of service does not fix a key, and the other destinations still
deliver. It shows in ``relay_destinations_paused``, in the ``/readyz`` body and in ``relay
status``. Error texts are redacted (registered secrets, email addresses) and never contain a
write key.

The server binds to 127.0.0.1 unless told otherwise (``RELAY_METRICS_HOST``): the metrics name
destinations and the probe bodies name database errors. ``0.0.0.0`` or ``::`` (which also
takes IPv4) let a Prometheus or kubelet in another container or pod reach them.
"""

from __future__ import annotations

import errno
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import queries as q
from relay.db import first_line
from relay.errors import ConfigError
from relay.logs import redact

log = logging.getLogger("relay.health")

DB_CHECK_TIMEOUT_S = 3
"""Connect timeout of the readiness check, and how long its query may run before it is cancelled."""

LIVENESS_POLL_INTERVALS = 10
"""An idle loop finishes a cycle every poll interval; this many missed ones is not idling."""


def stuck_after_s(
    *, poll_interval_s: float, lease_s: float, http_timeout_s: float, retry_after_cap_s: float
) -> float:
    """How long the delivery loop may go without finishing a cycle before /livez fails.

    ``max(10 x poll interval, lease + HTTP timeout + Retry-After cap)``; 340 s with the
    defaults. A healthy cycle can take long: a sending thread waits in it for a 429 pause
    (up to ``RELAY_RETRY_AFTER_CAP``), then sends a request (up to ``RELAY_HTTP_TIMEOUT``).
    The lease is headroom for the cycle's database work: a database stalled for longer has
    also stalled the lease renewal, so other relays have rescued the claim by then. An idle
    loop finishes a cycle every poll interval; ten of them tolerate a slow poll. Restarting
    a relay that is only waiting out a 429 would resend what it has in flight, so the bound
    errs long; lower ``RELAY_RETRY_AFTER_CAP`` to find a stuck loop sooner.
    """
    return max(
        LIVENESS_POLL_INTERVALS * poll_interval_s, lease_s + http_timeout_s + retry_after_cap_s
    )


class _Metrics(Protocol):
    @property
    def registry(self) -> Any: ...

    def watch_delivery_loop(self, age_s: Callable[[], float], stuck_after_s: float) -> None: ...


class _Router(Protocol):
    @property
    def paused(self) -> Sequence[str]: ...


class _Settings(Protocol):
    @property
    def poll_interval_s(self) -> float: ...

    @property
    def lease_s(self) -> float: ...

    @property
    def http_timeout_s(self) -> float: ...

    @property
    def retry_after_cap_s(self) -> float: ...


class RelayLike(Protocol):
    """What the endpoints read from a relay (``relay.daemon.Relay`` has all of it)."""

    @property
    def dsn(self) -> str: ...

    @property
    def settings(self) -> _Settings: ...

    @property
    def metrics(self) -> _Metrics: ...

    @property
    def router(self) -> _Router: ...


class LoopLike(Protocol):
    """What /livez reads from the delivery loop (``relay.service.DeliveryLoop``)."""

    @property
    def last_cycle_finished(self) -> float: ...


class Liveness:
    """Whether the delivery loop finished a cycle within ``stuck_after_s`` (of ``clock``)."""

    def __init__(
        self,
        loop: LoopLike | None,
        stuck_after_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.loop = loop
        self.stuck_after_s = stuck_after_s
        self.clock = clock

    def age_s(self) -> float:
        """Seconds since the loop last finished a cycle."""
        assert self.loop is not None
        return max(0.0, self.clock() - self.loop.last_cycle_finished)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(alive, the JSON body). Without a loop it says only that the process answers."""
        if self.loop is None:
            return True, {"ok": True}
        age = self.age_s()
        body: dict[str, Any] = {
            "ok": age <= self.stuck_after_s,
            "last_cycle_s": round(age, 3),
            "stuck_after_s": self.stuck_after_s,
        }
        if not body["ok"]:
            body["failed"] = {
                "delivery_loop": f"no delivery cycle finished for {age:.1f} s "
                f"(limit {self.stuck_after_s:g} s): the loop is stuck"
            }
        return body["ok"], body


class Readiness:
    """Whether the database answers and is migrated to this relay's head revision."""

    def __init__(self, relay: RelayLike) -> None:
        self.relay = relay

    def schema(self) -> tuple[bool, str | None]:
        """``queries.SCHEMA_REVISION`` on a fresh connection (no pool: see the module
        docstring): whether ``relay_outbox`` exists, and its comment, naming the revision."""
        with psycopg.connect(
            self.relay.dsn,
            connect_timeout=DB_CHECK_TIMEOUT_S,
            application_name="relay readyz",
            autocommit=True,
        ) as conn:
            # A query stuck behind a lock (a migration running) is cancelled rather than
            # holding the probe, and a thread of this server, for ever.
            timer = threading.Timer(DB_CHECK_TIMEOUT_S, conn.cancel_safe)
            timer.daemon = True
            timer.start()
            try:
                row = conn.execute(q.SCHEMA_REVISION).fetchone()
            finally:
                timer.cancel()
        assert row is not None
        return bool(row[0]), row[1]

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(ready, the JSON body)."""
        from relay.migrate import marked_revision, schema_problem

        failed: dict[str, str] = {}
        body: dict[str, Any] = {}
        try:
            has_outbox, comment = self.schema()
        except psycopg.Error as exc:
            if isinstance(exc, psycopg.errors.QueryCanceled):
                failed["database"] = f"no answer within {DB_CHECK_TIMEOUT_S} s"
            else:
                failed["database"] = redact(first_line(str(exc)) or type(exc).__name__)
        else:
            body["revision"] = marked_revision(comment)
            problem = schema_problem(has_outbox, comment)
            if problem:
                failed["migrations"] = problem
        paused = sorted(self.relay.router.paused)
        if paused:
            body["paused"] = paused  # shown, not a failure: see the module docstring
        body = {"ok": not failed, **({"failed": failed} if failed else {}), **body}
        return not failed, body

    def close(self) -> None:
        """Nothing held between checks (each opens its own connection)."""


class MetricsServer(ThreadingHTTPServer):
    """The HTTP server; ``shutdown()`` then ``server_close()`` stops it."""

    # Request threads must not keep the process alive at exit.
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        relay: RelayLike,
        liveness: Liveness,
        readiness: Readiness,
    ) -> None:
        self.relay = relay
        self.liveness = liveness
        self.readiness = readiness
        host, port = address
        # The address family of the host (IPv4, or IPv6 for "::" and IPv6 addresses).
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self.address_family = family
        # The whole socket address: an IPv6 one keeps its scope (a link-local address).
        super().__init__(sockaddr, _Handler)  # type: ignore[arg-type]

    def server_bind(self) -> None:
        if self.address_family == socket.AF_INET6:
            # "::" then takes IPv4 scrapes too (the default already on most Linux systems).
            try:
                self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                log.debug("IPv6-only socket: %s serves IPv6 only", self.server_address[0])
        # TCPServer's bind, not HTTPServer's: that one looks up the host's name in the DNS,
        # which for 0.0.0.0 in a container can hang until the resolver gives up.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def server_close(self) -> None:
        super().server_close()
        self.readiness.close()


def _json(ok: bool, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return 200 if ok else 503, "application/json", json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = generate_latest(self.server.relay.metrics.registry)
            self._send(200, CONTENT_TYPE_LATEST, body)
        elif path == "/livez":
            self._send(*_json(*self.server.liveness.check()))
        elif path in ("/readyz", "/healthz"):
            self._send(*_json(*self.server.readiness.check()))
        else:
            self._send(
                404,
                "text/plain; charset=utf-8",
                b"not found: try /metrics, /livez, /readyz (or /healthz, the same as /readyz)\n",
            )

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes and probes every few seconds would drown the relay's log on stderr.
        log.debug("%s %s", self.address_string(), format % args)


def _bind_error(host: str, port: int, exc: OSError) -> ConfigError:
    host_is = f"RELAY_METRICS_HOST (--metrics-host) {host!r}"
    port_is = f"RELAY_METRICS_PORT (--metrics-port) {port}"
    if isinstance(exc, socket.gaierror):
        return ConfigError(f"{host_is} does not resolve to an address ({exc.strerror})")
    if exc.errno == errno.EADDRINUSE:
        return ConfigError(f"{port_is} is in use on {host} (another process listens there)")
    if exc.errno == errno.EADDRNOTAVAIL:
        return ConfigError(
            f"{host_is} is not an address of this machine; 0.0.0.0 or :: bind every address"
        )
    if exc.errno == errno.EACCES:
        return ConfigError(f"{port_is} needs privileges to bind; use a port above 1023")
    if exc.errno == errno.EAFNOSUPPORT:
        return ConfigError(f"{host_is}: this machine has no IPv6; use 0.0.0.0")
    return ConfigError(f"cannot serve metrics on {host} port {port}: {exc.strerror or exc}")


def serve_metrics(
    relay: RelayLike,
    port: int,
    host: str = "127.0.0.1",
    *,
    loop: LoopLike | None = None,
    stuck_after: float | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> MetricsServer:
    """Serve ``/metrics``, ``/livez``, ``/readyz`` and ``/healthz`` on ``host:port``.

    From a daemon thread. Port 0 picks a free port; ``server.server_address`` tells which.
    ``loop`` is the delivery loop /livez watches, ``stuck_after`` its bound (default: from
    the relay's settings, see ``stuck_after_s``), ``clock`` the monotonic clock the loop's
    timestamps are taken with. A port in use or a host that cannot be bound is a
    ``ConfigError`` naming the setting. Returns the server so the caller (or a test) can
    ``shutdown()`` and ``server_close()`` it.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(
            f"RELAY_METRICS_PORT (--metrics-port) must be between 1 and 65535, got {port}"
        )
    s = relay.settings
    bound = (
        stuck_after
        if stuck_after is not None
        else stuck_after_s(
            poll_interval_s=s.poll_interval_s,
            lease_s=s.lease_s,
            http_timeout_s=s.http_timeout_s,
            retry_after_cap_s=s.retry_after_cap_s,
        )
    )
    liveness = Liveness(loop, bound, clock)
    readiness = Readiness(relay)
    try:
        server = MetricsServer((host, port), relay, liveness, readiness)
    except OSError as exc:
        readiness.close()
        raise _bind_error(host, port, exc) from exc
    if loop is not None:
        relay.metrics.watch_delivery_loop(liveness.age_s, bound)
    thread = threading.Thread(target=server.serve_forever, name="relay-metrics", daemon=True)
    thread.start()
    name = server.server_name
    shown = f"[{name}]" if ":" in name else name
    log.info("serving /metrics, /livez and /readyz on http://%s:%s", shown, server.server_port)
    return server
