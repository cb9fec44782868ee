"""The relay as operators run it: `relay run` processes, signals, several relays at once."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import psycopg
import pytest

from relay.migrate import head_revision
from relay.service import Service, drain
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import (
    funnel_event,
    make_relay,
    query,
    states,
    wait_until,
    write_events,
)
from tests.relay_helpers import relay_env as helpers_relay_env


def relay_env(dsn: str, cio: FakeCustomerIO, **extra: str) -> dict[str, str]:
    return helpers_relay_env(dsn, cio.url, **extra)


def start_relay(dsn: str, cio: FakeCustomerIO, *args: str, **extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "--log-level", "DEBUG", "run", *args],
        env=relay_env(dsn, cio, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_committed_event_is_delivered_within_a_second_by_an_idle_relay(
    dsn: str, cio: FakeCustomerIO
) -> None:
    # Polling every 30 s: only the LISTEN/NOTIFY path can make this fast.
    relay = make_relay(dsn, cio, poll_interval_s=30.0)
    service = Service(relay)
    service.start()
    try:
        assert wait_until(lambda: service.listener.connected.is_set(), timeout=5)
        # let the first (immediate) deliver run finish so the relay is idle
        assert wait_until(service.loop.idle.is_set, timeout=5)
        latencies = []
        for n in range(3):
            t0 = time.monotonic()
            write_events(dsn, [funnel_event(f"cus_{n}", n)])
            assert cio.wait_for(lambda n=n: len(cio.accepted_items()) >= 2 * (n + 1), timeout=5)
            latencies.append(time.monotonic() - t0)
    finally:
        service.stop()
    assert max(latencies) < 1.0, latencies


def test_three_relays_keep_every_customers_order(dsn: str, cio: FakeCustomerIO) -> None:
    cio.set_fault_rates({"5xx": 0.2, "429": 0.1}, seed=7)
    cio.retry_after_s = 0.1
    customers = [f"cus_{i}" for i in range(40)]
    # interleaved writes: each customer's events are written in order n = 0..7
    write_events(dsn, [funnel_event(c, n) for n in range(8) for c in customers])
    relays = [make_relay(dsn, cio, instance=f"r{i}", batch_size=7) for i in range(3)]
    results: list[Any] = []
    threads = [threading.Thread(target=lambda r=r: results.append(drain(r, 60))) for r in relays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(ok for ok, _ in results)
    assert states(dsn).keys() <= {"delivered", "coalesced"}
    # work was shared
    instances = {r[0] for r in query(dsn, "SELECT DISTINCT relay_instance FROM relay_attempt")}
    assert len(instances) >= 2
    # per customer, the first acceptance of each track follows write order
    first_seen: dict[str, list[int]] = defaultdict(list)
    seen: set[str] = set()
    for item in cio.accepted_items():
        if item["type"] == "track" and item["messageId"] not in seen:
            seen.add(item["messageId"])
            first_seen[item["userId"]].append(item["properties"]["n"])
    assert set(first_seen) == set(customers)
    for customer, ns in first_seen.items():
        assert ns == list(range(8)), (customer, ns)


def test_kill_9_mid_batch_loses_nothing(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(20)])
    cio.latency_s = 30.0  # the first relay's request hangs in flight
    victim = start_relay(
        dsn, cio, "--instance", "victim", RELAY_LEASE_SECONDS="6", RELAY_HTTP_TIMEOUT="5"
    )
    try:
        assert wait_until(lambda: states(dsn).get("in_flight", 0) == 40, timeout=20)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
    cio.latency_s = 0.0
    t0 = time.monotonic()
    ok, _ = drain(make_relay(dsn, cio, instance="rescuer", lease_s=6.0), 30)
    assert ok
    assert states(dsn) == {"delivered": 40}
    assert time.monotonic() - t0 < 15  # rescued within about one lease, not an hour
    ids = cio.accepted_message_ids()
    expected = {r[0] for r in query(dsn, "SELECT message_id FROM relay_outbox")}
    assert set(ids) == expected  # nothing lost
    rescued = query(dsn, "SELECT count(*) FROM relay_outbox WHERE attempts = 2")
    assert rescued == [(40,)]  # the killed attempt counts: it may have reached Customer.io


def test_sigterm_finishes_the_batch_in_flight_and_leaves_nothing_in_flight(
    dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", n) for i in range(50) for n in range(3)])
    cio.latency_s = 1.0
    proc = start_relay(dsn, cio, "--batch-size", "10")
    try:
        assert cio.wait_for(lambda: len(cio.requests) >= 1, timeout=20) or wait_until(
            lambda: states(dsn).get("in_flight", 0) > 0, timeout=20
        )
        assert wait_until(lambda: states(dsn).get("in_flight", 0) > 0, timeout=20)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "in_flight" not in states(dsn)
    # every request the server answered is recorded as delivered
    answered = {i["messageId"] for i in cio.accepted_items()}
    delivered = {
        r[0] for r in query(dsn, "SELECT message_id FROM relay_outbox WHERE state = 'delivered'")
    }
    assert answered == delivered
    assert "stopped" in err


def test_write_key_never_appears_in_logs(dsn: str, cio: FakeCustomerIO) -> None:
    secret = "wk_live_SECRET_0123456789abcdef"
    write_events(dsn, [funnel_event("cus_1", 0)])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "--log-level",
            "DEBUG",
            "run",
            "--drain",
            "--timeout",
            "5",
            "--insecure-skip-tls-verify",
        ],
        env=relay_env(dsn, cio, CUSTOMERIO_WRITE_KEY=secret),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr  # held (401) is not pending: drain completes
    output = proc.stdout + proc.stderr
    assert "PAUSED" in output and "401" in output
    assert secret not in output
    assert secret[:12] not in output
    rows = query(
        dsn, "SELECT coalesce(error, '') || coalesce(response_snippet, '') FROM relay_attempt"
    )
    assert rows and all(secret not in r[0] for r in rows)
    assert "cus_1@example.com" not in output


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CUSTOMERIO_WRITE_KEY": ""}, "CUSTOMERIO_WRITE_KEY is not set"),
        ({"CUSTOMERIO_REGION": "asia"}, "CUSTOMERIO_REGION='asia' is not a region"),
        ({"CUSTOMERIO_API_URL": "ftp://nowhere"}, "CUSTOMERIO_API_URL must be an http(s) URL"),
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must be a URL starting with postgresql://"),
        ({"RELAY_BATCH_SIZE": "many"}, "RELAY_BATCH_SIZE must be a whole number"),
        (
            {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/nowhere"},
            "database unavailable",
        ),
    ],
)
def test_bad_configuration_is_one_clear_line(
    dsn: str, cio: FakeCustomerIO, env: dict[str, str], message: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "run", "--drain", "--timeout", "2"],
        env=relay_env(dsn, cio, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode in (2, 3)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_drain_timeout_exits_non_zero(dsn: str, cio: FakeCustomerIO) -> None:
    cio.set_fault_rates({"500": 1.0}, seed=1)
    write_events(dsn, [funnel_event("cus_1", 0)])
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "run", "--drain", "--timeout", "1.5"],
        env=relay_env(dsn, cio),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 4
    assert "TIMED OUT" in proc.stderr


def test_metrics_count_what_happened(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event("cus_1", n) for n in range(3)])
    relay = make_relay(dsn, cio)
    drain(relay, 10)
    from prometheus_client import generate_latest

    text = generate_latest(relay.metrics.registry).decode()
    labels = 'destination="default",event="checkout.start",kind="identify",outcome="delivered"'
    assert f"relay_messages_total{{{labels}}} 1.0" in text
    assert 'relay_messages_coalesced_total{destination="default"} 2.0' in text
    assert 'relay_http_requests_total{destination="default",status="200"} 1.0' in text
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM relay_attempt").fetchone() == (1,)


def test_relay_migrate_applies_the_schema(empty_dsn: str, cio: FakeCustomerIO) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "migrate"],
        env=relay_env(empty_dsn, cio),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "migrated to head" in proc.stdout
    version = query(empty_dsn, "SELECT version_num FROM relay_alembic_version")
    assert version == [(head_revision(),)]


def test_relay_run_embedded_uses_an_embedded_postgres(
    tmp_path: Any, cio: FakeCustomerIO, dsn: str
) -> None:
    env = relay_env(dsn, cio)
    del env["DATABASE_URL"]
    data_dir = tmp_path / "pg"
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "relay.cli",
                "run",
                "--embedded",
                "--drain",
                "--timeout",
                "20",
                "--data-dir",
                str(data_dir),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert proc.returncode == 0, proc.stderr
        assert "embedded PostgreSQL" in proc.stderr
        assert "drain complete" in proc.stderr
        assert (data_dir / "PG_VERSION").exists()
    finally:
        from relay.embedded import EmbeddedPostgres

        # The relay stops its embedded server when it exits; make sure, even if it crashed.
        if (data_dir / "postmaster.pid").exists():
            EmbeddedPostgres(data_dir).stop()
