"""``/metrics`` and ``/healthz`` for one relay process, on a small threaded HTTP server.

``/healthz`` answers 200 ``{"ok": true}`` when the database answers ``SELECT 1`` on a fresh
connection and no destination is paused for a rejected key; otherwise 503 with the failed
checks (``{"ok": false, "failed": {"database": "...", "destinations": "..."}}``). A fresh
connection rather than the relay's own: the relay's may be busy in a delivery cycle, and a
probe must not queue behind it nor disturb it. Error texts are redacted (registered secrets,
email addresses) and never contain a write key.

The server binds to 127.0.0.1 unless told otherwise: the metrics name destinations and the
health body names database errors, which are for the machine's own scraper and orchestrator.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from relay import queries as q
from relay.db import first_line
from relay.logs import redact

log = logging.getLogger("relay.health")

DB_CHECK_TIMEOUT_S = 3


class _Metrics(Protocol):
    @property
    def registry(self) -> Any: ...


class _Router(Protocol):
    @property
    def paused(self) -> Sequence[str]: ...


class RelayLike(Protocol):
    """What the endpoints read from a relay (``relay.daemon.Relay`` has all of it)."""

    @property
    def dsn(self) -> str: ...

    @property
    def metrics(self) -> _Metrics: ...

    @property
    def router(self) -> _Router: ...


class MetricsServer(ThreadingHTTPServer):
    """The HTTP server; ``shutdown()`` then ``server_close()`` stops it."""

    # Request threads must not keep the process alive at exit.
    daemon_threads = True

    def __init__(self, address: tuple[str, int], relay: RelayLike) -> None:
        self.relay = relay
        super().__init__(address, _Handler)


def check_health(relay: RelayLike) -> tuple[bool, dict[str, str]]:
    """(healthy, failed checks by name with the reason)."""
    failed: dict[str, str] = {}
    try:
        with psycopg.connect(
            relay.dsn,
            connect_timeout=DB_CHECK_TIMEOUT_S,
            application_name="relay healthz",
            autocommit=True,
        ) as conn:
            conn.execute(q.SESSION_CHECK)
    except psycopg.Error as exc:
        failed["database"] = redact(first_line(str(exc)) or type(exc).__name__)
    paused = list(relay.router.paused)
    if paused:
        failed["destinations"] = "paused for a rejected write key: " + ", ".join(sorted(paused))
    return not failed, failed


class _Handler(BaseHTTPRequestHandler):
    server: MetricsServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(
                200, CONTENT_TYPE_LATEST, generate_latest(self.server.relay.metrics.registry)
            )
        elif path == "/healthz":
            ok, failed = check_health(self.server.relay)
            body: dict[str, Any] = {"ok": True} if ok else {"ok": False, "failed": failed}
            self._send(200 if ok else 503, "application/json", json.dumps(body).encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Scrapes every few seconds would drown the relay's log on stderr.
        log.debug("%s %s", self.address_string(), format % args)


def serve_metrics(relay: RelayLike, port: int, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` from a daemon thread.

    Port 0 picks a free port; ``server.server_address`` tells which. Returns the server so the
    caller (or a test) can ``shutdown()`` it.
    """
    server = MetricsServer((host, port), relay)
    thread = threading.Thread(target=server.serve_forever, name="relay-metrics", daemon=True)
    thread.start()
    bound_host, bound_port = server.server_address[:2]
    log.info("serving /metrics and /healthz on http://%s:%s", bound_host, bound_port)
    return server
