"""`/metrics` and `/healthz` of a relay process (relay.health.serve_metrics)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from relay.daemon import Relay
from relay.health import MetricsServer, serve_metrics
from relay.settings import Settings

KEY = "wk_health_0123456789abcdef"


def get(server: MetricsServer, path: str) -> tuple[int, str, bytes]:
    host, port = server.server_address[:2]
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[MetricsServer] = []

    def start(dsn: str) -> tuple[Relay, MetricsServer]:
        relay = Relay(Settings(write_key=KEY), dsn)
        server = serve_metrics(relay, 0)
        servers.append(server)
        return relay, server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_metrics_are_prometheus_text_on_localhost(dsn: str, serve: Any) -> None:
    relay, server = serve(dsn)
    relay.metrics.rescues.inc(3)

    status, content_type, body = get(server, "/metrics")

    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    text = body.decode()
    assert "# TYPE relay_destinations_paused gauge" in text
    assert "relay_lease_rescues_total 3.0" in text


def test_healthz_is_ok_with_a_database_and_no_paused_destination(dsn: str, serve: Any) -> None:
    _, server = serve(dsn)
    status, content_type, body = get(server, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"ok": True}


def test_healthz_is_503_when_the_database_does_not_exist(dsn: str, serve: Any) -> None:
    _, server = serve(dsn.replace("/relay_t_", "/relay_missing_"))
    status, _, body = get(server, "/healthz")
    assert status == 503
    answer = json.loads(body)
    assert answer["ok"] is False
    assert "does not exist" in answer["failed"]["database"]
    assert "destinations" not in answer["failed"]


def test_healthz_is_503_when_a_destination_is_paused_and_never_shows_its_key(
    dsn: str, serve: Any
) -> None:
    relay, server = serve(dsn)
    paused_key = "wk_paused_abcdefghijklmnop"
    relay.router.refresh(
        [
            # DESTINATION_LIST_WITH_KEY's columns
            ("prj_1", "us", None, True, datetime.now(UTC), "401 Unauthorized", None, paused_key)
        ]
    )

    status, _, body = get(server, "/healthz")

    assert status == 503
    answer = json.loads(body)
    assert answer == {
        "ok": False,
        "failed": {"destinations": "paused for a rejected write key: prj_1"},
    }
    assert paused_key.encode() not in body and KEY.encode() not in body

    relay.router.refresh([])
    assert get(server, "/healthz")[0] == 200


def test_other_paths_are_404(dsn: str, serve: Any) -> None:
    _, server = serve(dsn)
    assert get(server, "/")[0] == 404
