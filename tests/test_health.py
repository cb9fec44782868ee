"""`/metrics`, `/livez`, `/readyz` (and `/healthz`) of a relay process (relay.health), and the
Prometheus alert rules in deploy/prometheus that read those metrics."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest
import yaml
from alembic.script import ScriptDirectory
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from relay.daemon import Relay
from relay.health import MetricsServer, serve_metrics, stuck_after_s
from relay.migrate import alembic_config, upgrade
from relay.service import DeliveryLoop, Service
from relay.settings import Settings
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import funnel_event, relay_env, settings_for, wait_until, write_events

KEY = "test-key"  # the fake's accepted key
REJECTED_KEY = "wk_rejected_abcdefghijklmnop"
ALERTS = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "relay-alerts.yml"
ALERT_TESTS = ALERTS.with_name("relay-alerts.test.yml")


def get(server: MetricsServer | str, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` from a server (or a base URL): (status, content type, body)."""
    if isinstance(server, str):
        url = server + path
    else:
        host, port = server.server_address[:2]
        url = f"http://{host}:{port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read()


def probe(server: MetricsServer | str, path: str) -> tuple[int, dict[str, Any]]:
    status, content_type, body = get(server, path)
    assert content_type == "application/json"
    return status, json.loads(body)


def samples(text: str) -> dict[str, float]:
    """Unlabelled samples of a /metrics text, by name."""
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


def head_revisions() -> set[str]:
    return set(
        ScriptDirectory.from_config(alembic_config("postgresql://x@localhost/x")).get_heads()
    )


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[MetricsServer] = []

    def start(relay_or_dsn: Relay | str, **kw: Any) -> tuple[Relay, MetricsServer]:
        relay = (
            Relay(Settings(write_key=KEY), relay_or_dsn)
            if isinstance(relay_or_dsn, str)
            else relay_or_dsn
        )
        server = serve_metrics(relay, 0, **kw)
        servers.append(server)
        return relay, server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def services() -> Iterator[list[Service]]:
    started: list[Service] = []
    yield started
    for service in started:
        service.stop()


@dataclass
class StillLoop:
    """A delivery loop's timestamp, set by the test."""

    last_cycle_finished: float


# --- /metrics -------------------------------------------------------------------------------


def test_metrics_are_prometheus_text_on_localhost(dsn: str, serve: Any) -> None:
    relay, server = serve(dsn)
    relay.metrics.rescues.inc(3)

    status, content_type, body = get(server, "/metrics")

    assert server.server_address[0] == "127.0.0.1" and server.server_address[1] > 0
    assert status == 200 and content_type == CONTENT_TYPE_LATEST
    text = body.decode()
    assert "# TYPE relay_destinations_paused gauge" in text
    assert "relay_lease_rescues_total 3.0" in text
    # Every unfinished state is a series before the first backlog refresh.
    for state in ("pending", "retrying", "in_flight", "held"):
        assert f'relay_backlog_messages{{state="{state}"}} 0.0' in text


def test_metric_names_follow_prometheus_conventions(dsn: str, serve: Any) -> None:
    relay, server = serve(dsn)
    m = relay.metrics
    m.messages.labels("default", "checkout.start", "identify", "delivered").inc()
    m.coalesced.labels("default").inc()
    m.requests.labels("default", "200").inc()
    m.latency.labels("default").observe(0.04)
    m.batch_size.observe(12)
    m.rescues.inc()

    text = get(server, "/metrics")[2].decode()

    assert "_created" not in text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE))
    counters = [name for name, kind in types.items() if kind == "counter"]
    assert counters and all(name.endswith("_total") for name in counters), counters
    assert types["relay_http_request_duration_seconds"] == "histogram"
    assert "relay_http_request_seconds" not in types
    assert 'relay_http_request_duration_seconds_count{destination="default"} 1.0' in text
    # The collectors prometheus_client's default registry carries.
    values = samples(text)
    assert values["process_start_time_seconds"] > 0
    assert values["process_resident_memory_bytes"] > 0
    assert "process_cpu_seconds_total" in values
    assert types["python_gc_objects_collected_total"] == "counter"
    assert types["python_info"] == "gauge"


# --- /livez ---------------------------------------------------------------------------------


def test_stuck_bound_comes_from_the_settings() -> None:
    s = Settings()
    default = stuck_after_s(
        poll_interval_s=s.poll_interval_s,
        lease_s=s.lease_s,
        http_timeout_s=s.http_timeout_s,
        retry_after_cap_s=s.retry_after_cap_s,
    )
    # A 429 pause (Retry-After cap) and a request (HTTP timeout) may both fall in one cycle.
    assert default == 30 + 10 + 300
    # A slow poll: ten intervals.
    assert stuck_after_s(
        poll_interval_s=60, lease_s=30, http_timeout_s=10, retry_after_cap_s=300
    ) == pytest.approx(600)


def test_livez_fails_when_no_cycle_finished_within_the_bound(dsn: str, serve: Any) -> None:
    loop = StillLoop(last_cycle_finished=100.0)
    now = [100.5]
    _, server = serve(dsn, loop=loop, stuck_after=30.0, clock=lambda: now[0])

    assert probe(server, "/livez") == (
        200,
        {"ok": True, "last_cycle_s": 0.5, "stuck_after_s": 30.0},
    )

    now[0] = 131.0
    status, body = probe(server, "/livez")
    assert status == 503
    assert body["failed"] == {
        "delivery_loop": "no delivery cycle finished for 31.0 s (limit 30 s): the loop is stuck"
    }
    values = samples(get(server, "/metrics")[2].decode())
    assert values["relay_delivery_last_cycle_age_seconds"] == 31.0
    assert values["relay_delivery_stuck_after_seconds"] == 30.0

    loop.last_cycle_finished = 130.0  # a cycle finished again
    assert probe(server, "/livez")[0] == 200


def test_livez_follows_a_running_loop_and_a_loop_stuck_on_a_lock(
    dsn: str, cio: FakeCustomerIO, serve: Any, services: list[Service]
) -> None:
    relay = Relay(settings_for(cio), dsn)
    service = Service(relay)
    _, server = serve(relay, loop=service.loop, stuck_after=1.0)
    service.start()
    services.append(service)

    # The loop keeps finishing cycles for longer than the bound: alive all along.
    started = service.loop.last_cycle_finished
    assert wait_until(lambda: service.loop.last_cycle_finished > started + 1.5)
    status, body = probe(server, "/livez")
    assert status == 200 and body["last_cycle_s"] < 1.0

    # Another session locks the outbox: the next claim waits on it, and the loop stops.
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE relay_outbox IN ACCESS EXCLUSIVE MODE")
        assert wait_until(lambda: probe(server, "/livez")[0] == 503)
        status, body = probe(server, "/livez")
        assert "the loop is stuck" in body["failed"]["delivery_loop"]
        values = samples(get(server, "/metrics")[2].decode())
        assert values["relay_delivery_last_cycle_age_seconds"] > 1.0
        # The database itself still answers: ready, only not live.
        assert probe(server, "/readyz")[0] == 200
        locker.rollback()

    assert wait_until(lambda: probe(server, "/livez")[0] == 200)


def test_a_database_that_is_down_fails_readiness_not_liveness(
    cio: FakeCustomerIO, serve: Any
) -> None:
    with socket.socket() as sock:  # a port nothing listens on: connections are refused
        sock.bind(("127.0.0.1", 0))
        dsn = f"postgresql://relay@127.0.0.1:{sock.getsockname()[1]}/relay"
    relay = Relay(settings_for(cio), dsn)
    loop = DeliveryLoop(relay)
    _, server = serve(relay, loop=loop, stuck_after=1.0)
    thread = threading.Thread(target=loop.run, daemon=True)
    thread.start()
    try:
        # Each cycle fails at once and the loop goes on: alive for longer than the bound.
        started = loop.last_cycle_finished
        assert wait_until(lambda: loop.last_cycle_finished > started + 1.5)
        assert probe(server, "/livez")[0] == 200
        status, body = probe(server, "/readyz")
        assert status == 503 and "refused" in body["failed"]["database"]
    finally:
        relay.stopping.set()
        relay.wake()
        thread.join(timeout=10)
        relay.close()


# --- /readyz and /healthz -------------------------------------------------------------------


def test_readyz_needs_the_database_at_the_head_revision(empty_dsn: str, serve: Any) -> None:
    _, server = serve(empty_dsn)
    (head,) = head_revisions()

    status, body = probe(server, "/readyz")
    assert status == 503
    assert body["failed"] == {
        "migrations": f"the database was never migrated: run relay migrate (to {head})"
    }
    assert probe(server, "/healthz") == (status, body)

    upgrade(empty_dsn, "relay_0004")  # before the revision was kept in the catalog
    older = {
        "migrations": f"the relay's schema is older than relay_0005: run relay migrate (to {head})"
    }
    assert probe(server, "/readyz") == (503, {"ok": False, "failed": older, "revision": None})

    upgrade(empty_dsn)
    assert probe(server, "/readyz") == (200, {"ok": True, "revision": head})
    assert probe(server, "/healthz") == (200, {"ok": True, "revision": head})

    with psycopg.connect(empty_dsn) as conn:
        # Migrated by a newer relay.
        conn.execute("COMMENT ON TABLE relay_outbox IS 'relay schema relay_9999: newer'")
        conn.commit()
    status, body = probe(server, "/readyz")
    assert status == 503 and "relay_9999, which this relay does not know" in str(body)


def test_readyz_answers_for_every_role_and_every_way_of_migrating(dsn: str, serve: Any) -> None:
    # relay_worker may not read the Alembic version table, and a database migrated inside an
    # application's own history has none of the relay's: readiness reads the catalog.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("DROP TABLE relay_alembic_version")
        user = f"relay_test_{uuid.uuid4().hex[:10]}"
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(user)))
        conn.execute(sql.SQL("GRANT relay_worker TO {}").format(sql.Identifier(user)))
    try:
        parts = urlsplit(dsn)
        as_worker = urlunsplit(parts._replace(netloc=f"{user}@{parts.netloc.rpartition('@')[2]}"))
        _, server = serve(as_worker)
        (head,) = head_revisions()
        assert probe(server, "/readyz") == (200, {"ok": True, "revision": head})
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(user)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(user)))


def test_readyz_is_503_when_the_database_does_not_exist(dsn: str, serve: Any) -> None:
    _, server = serve(dsn.replace("/relay_t_", "/relay_missing_"))
    status, body = probe(server, "/readyz")
    assert status == 503
    assert body["ok"] is False
    assert "does not exist" in body["failed"]["database"]
    assert "migrations" not in body["failed"]


def test_a_paused_destination_fails_no_probe_and_shows_in_metrics(
    dsn: str, cio: FakeCustomerIO, serve: Any, services: list[Service]
) -> None:
    # The fake accepts only KEY: the relay's own key gets a 401 and its destination pauses.
    relay = Relay(settings_for(cio, write_key=REJECTED_KEY), dsn)
    service = Service(relay)
    _, server = serve(relay, loop=service.loop)
    write_events(dsn, [funnel_event("cus_1", 0)])
    service.start()
    services.append(service)

    assert wait_until(
        lambda: "relay_destinations_paused 1.0" in get(server, "/metrics")[2].decode()
    )

    live_status, live = probe(server, "/livez")
    ready_status, ready = probe(server, "/readyz")
    assert (live_status, live["ok"]) == (200, True)
    assert (ready_status, ready["ok"], ready["paused"]) == (200, True, ["default"])
    assert probe(server, "/healthz")[0] == 200
    for path in ("/livez", "/readyz", "/metrics"):
        assert REJECTED_KEY.encode() not in get(server, path)[2]


def test_other_paths_are_404(dsn: str, serve: Any) -> None:
    _, server = serve(dsn)
    assert get(server, "/")[0] == 404


# --- binding --------------------------------------------------------------------------------

# In a network namespace of its own (made by `unshare -n`, so no traffic leaves this
# process's sandbox): a veth interface with a non-loopback address, then the metrics server
# on each host, scraped through that address.
NETNS_SETUP = """
set -e
ip link set lo up
ip link add relay0 type veth peer name relay1
ip addr add 198.18.0.1/24 dev relay0
ip link set relay0 up
ip link set relay1 up
"""

NETNS_SCRAPE = """
import json, sys, urllib.request
from relay.daemon import Relay
from relay.health import serve_metrics
from relay.settings import Settings

relay = Relay(Settings(write_key="wk_netns"), "postgresql://nobody@127.0.0.1:1/none")
seen = {}
for host in ("0.0.0.0", "::", "127.0.0.1"):
    server = serve_metrics(relay, 0, host)
    port = server.server_address[1]
    try:
        with urllib.request.urlopen(f"http://198.18.0.1:{port}/metrics", timeout=5) as resp:
            seen[host] = [resp.status, b"relay_destinations_paused" in resp.read()]
    except OSError as exc:
        seen[host] = [type(exc).__name__, str(exc)]
    server.shutdown()
    server.server_close()
print(json.dumps(seen))
"""


def test_metrics_on_every_address_are_reachable_through_a_non_loopback_address() -> None:
    unshare, ip = shutil.which("unshare"), shutil.which("ip")
    if unshare is None or ip is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) for a network namespace")
    check = subprocess.run(
        [unshare, "-n", "sh", "-c", NETNS_SETUP], capture_output=True, text=True, timeout=30
    )
    if check.returncode != 0:
        pytest.skip(f"cannot make a network namespace with an interface: {check.stderr.strip()}")

    proc = subprocess.run(
        [
            unshare,
            "-n",
            "sh",
            "-c",
            NETNS_SETUP + 'exec "$0" -c "$1"',
            sys.executable,
            NETNS_SCRAPE,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["0.0.0.0"] == [200, True]
    assert seen["::"] == [200, True]  # an IPv6 socket that takes IPv4 too
    # The default stays on the loopback: the same scrape is refused.
    assert seen["127.0.0.1"][0] == "URLError" and "refused" in seen["127.0.0.1"][1]


def _listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--metrics-port", "99999"],
            "RELAY_METRICS_PORT (--metrics-port) must be between 1 and 65535, got 99999",
        ),
        (
            ["--metrics-port", "9108", "--metrics-host", "http://0.0.0.0"],
            "RELAY_METRICS_HOST (--metrics-host) 'http://0.0.0.0' is not an address",
        ),
        (["--metrics-port", "IN_USE"], "is in use on 127.0.0.1 (another process listens there)"),
        (
            ["--metrics-port", "9108", "--metrics-host", "[::]"],
            "RELAY_METRICS_HOST (--metrics-host) '[::]' is not an address: give the host alone",
        ),
        (
            # TEST-NET-3: an address no interface here has (binding sends nothing).
            ["--metrics-port", "9108", "--metrics-host", "203.0.113.9"],
            "RELAY_METRICS_HOST (--metrics-host) '203.0.113.9' is not an address of this machine",
        ),
    ],
)
def test_a_metrics_address_that_cannot_be_served_is_one_line_and_exit_2(
    dsn: str, cio: FakeCustomerIO, args: list[str], message: str
) -> None:
    with _listening_socket() as taken:
        args = [str(taken.getsockname()[1]) if a == "IN_USE" else a for a in args]
        proc = subprocess.run(
            [sys.executable, "-m", "relay.cli", "run", *args],
            env=relay_env(dsn, cio.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("relay: configuration error: ") and message in lines[0]


# --- alert rules ----------------------------------------------------------------------------

# PromQL words that are not metric names; `up` is Prometheus' own series for every target.
PROMQL_WORDS = {"or", "and", "unless", "offset", "bool", "up"}


def rule_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (label names, functions and keywords left out)."""
    text = re.sub(r'"[^"]*"', "", expr)
    text = re.sub(r"\b(?:without|by|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    names = set(re.findall(r"\b([A-Za-z_:][A-Za-z0-9_:]*)\b(?!\s*\()", text))
    return {n for n in names if n not in PROMQL_WORDS}


def exported_names(text: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(s.name for s in family.samples)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_alert_rules_use_only_metrics_a_running_relay_exports(
    dsn: str, cio: FakeCustomerIO
) -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    by_name = {r["alert"]: r for r in rules}
    for needed in (
        "RelayDown",
        "RelayDeliveryLoopStuck",
        "RelayBacklogOldMessages",
        "RelayDeadMessages",
        "RelayDestinationPaused",
    ):
        assert needed in by_name, needed
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
    assert "up" in re.findall(r"\b\w+\b", by_name["RelayDown"]["expr"])
    used = set().union(*(rule_metric_names(r["expr"]) for r in rules))
    assert {
        "relay_backlog_oldest_seconds",
        "relay_messages_total",
        "relay_destinations_paused",
        "relay_delivery_last_cycle_age_seconds",
        "relay_delivery_stuck_after_seconds",
    } <= used

    port = free_port()
    write_events(dsn, [funnel_event("cus_1", 0)])
    proc = subprocess.Popen(
        # "::" takes IPv4 too: scraped at 127.0.0.1 below.
        [sys.executable, "-m", "relay.cli", "run", "--metrics-port", str(port)],
        env=relay_env(dsn, cio.url, RELAY_METRICS_HOST="::"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def live() -> bool:
            try:
                return get(base, "/livez")[0] == 200
            except OSError:
                return False

        assert wait_until(live, timeout=30), "the relay never answered /livez"
        assert cio.wait_for(lambda: len(cio.accepted_items()) >= 1, timeout=30)
        assert wait_until(lambda: b"relay_messages_total{" in get(base, "/metrics")[2])
        text = get(base, "/metrics")[2].decode()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err

    missing = sorted(used - exported_names(text))
    assert not missing, f"alert rules use metrics the relay does not export: {missing}"
    values = samples(text)
    # The loop's gauges are live in `relay run`, not NaN placeholders.
    assert 0 <= values["relay_delivery_last_cycle_age_seconds"] < 30
    assert values["relay_delivery_stuck_after_seconds"] == 340.0


def test_alert_rules_pass_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    check = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr
    unit = subprocess.run(
        [promtool, "test", "rules", ALERT_TESTS.name],
        cwd=ALERT_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unit.returncode == 0, unit.stdout + unit.stderr
