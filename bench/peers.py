"""The relay next to what applications use instead of it, in one run on one workload.

``python -m bench.peers [--quick] [--customers N] [--dsn URL|embedded]``

Workload: ``--customers`` customers (1,000; 200 with ``--quick``), each with the 10-event
funnel of ``bench.common.FUNNEL_STEPS``; every event is an identify and a track, the bodies
``relay.mapping.map_event`` produces, so every system sends the same data. Each system runs
against its own ``python -m relay.fakecio`` process answering at once.

1. **Official SDK inline** (``customerio-cdp-analytics``): the application calls
   ``identify``/``track`` per event, then ``flush()``. Throughput is from the first call to
   the end of ``flush()``, with the server holding every message. Loss: (a) the application
   is SIGKILLed mid-stream, and (b) the API is down (a stopped server: connection refused)
   for longer than the SDK retries (``max_retries`` lowered to ``--sdk-max-retries`` so the
   scenario ends in seconds; the SDK's default of 10 only makes it give up later).
2. **procrastinate** and 3. **pgqueuer** as the outbox: one job per message, deferred in the
   application's transaction, drained by the library's worker with one strict-mode POST per
   message. Drain rate from a pre-written backlog.
4. **The relay**: ``bench.drain``'s single-relay drain (``Relay`` + ``drain``) of the same
   backlog, and the same two loss scenarios for the outbox: the relay is SIGKILLed mid-drain
   or the API is down; then ``relay run --drain`` against a healthy server. Lost must be 0.

Loss scenarios use ``--loss-customers`` customers (20) and a 50 ms server latency, so the kill
lands while messages are still in flight.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib.metadata import version
from typing import Any

import httpx
import procrastinate
import psycopg
from pgqueuer.db import SyncPsycopgDriver
from pgqueuer.queries import Queries, SyncQueries

from bench.common import (
    FUNNEL_STEPS,
    REPO_ROOT,
    WRITE_KEY,
    add_database_option,
    bench_database,
    code_changed_warning,
    code_fingerprint,
    describe_environment,
    environment,
    funnel_event,
    reproduce_command,
    table,
    write_results,
)
from bench.drain import FakeServer, Variant, build_backlog, load_backlog, run_variant
from bench.peers_worker import PGQUEUER_ENTRYPOINT, PROCRASTINATE_TASK
from relay import record_event
from relay.mapping import map_event

TARGETS = {"procrastinate": 100.0, "pgqueuer": 50.0, "sdk": 5.0}
"""The issue's targets: relay messages/s at least this many times the peer's."""

LOSS_LATENCY_MS = 50.0

# --------------------------------------------------------------------------- helpers


def _events(customers: int) -> list[dict[str, Any]]:
    """Every funnel event, in the order the relay backlog writes them (100 customers at a time,
    events interleaved across them, as concurrent funnels produce them)."""
    return [
        funnel_event(n, step)
        for first in range(0, customers, 100)
        for step in range(len(FUNNEL_STEPS))
        for n in range(first, min(first + 100, customers))
    ]


def _worker(mode: str, url: str, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.peers_worker",
            "--mode",
            mode,
            "--url",
            url,
            "--write-key",
            WRITE_KEY,
            *extra,
        ],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        raise RuntimeError(f"bench.peers_worker --mode {mode} did not start")
    return proc


def _go(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()


def _report(proc: subprocess.Popen[str], timeout_s: float) -> dict[str, Any]:
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            proc.wait(timeout=timeout_s)
            return dict(json.loads(line))
    raise RuntimeError(f"a peer worker ended without a report (exit {proc.wait()})")


def _received_ids(server: FakeServer) -> list[str]:
    body = httpx.get(server.url + "/_fake/received", timeout=60).json()
    return [a["item"].get("messageId", "") for a in body["accepted"]]


def _dead_url() -> str:
    """The URL of a Customer.io that is down: a fake server started, then stopped."""
    server = FakeServer(0.0)
    url = server.url
    server.stop()
    return url


def _relay_cli(dsn: str, url: str, *args: str, timeout_s: float) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "CUSTOMERIO_WRITE_KEY": WRITE_KEY,
        "CUSTOMERIO_API_URL": url,
        # A short HTTP timeout permits a short lease, so the restarted relay rescues what the
        # killed one had in flight after seconds rather than the default 30.
        "RELAY_HTTP_TIMEOUT": "2",
        "RELAY_LOG_LEVEL": "WARNING",
    }
    cmd = [sys.executable, "-c", "import sys, relay.cli; sys.exit(relay.cli.main())"]
    return subprocess.Popen(
        [*cmd, "run", "--lease", "3", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_accepted(server: FakeServer, at_least: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        accepted = int(server.stats()["accepted"])
        if accepted >= at_least or time.monotonic() > deadline:
            return accepted
        time.sleep(0.05)


# --------------------------------------------------------------------------- throughput


def relay_drain(dsn: str, customers: int, timeout_s: float) -> dict[str, Any]:
    backlog = build_backlog(dsn, customers, 100)
    rows = load_backlog(dsn)
    o = run_variant(Variant("api-0", "api", 1, 0.0), dsn, rows, timeout_s)
    events = backlog["events"]
    return {
        "system": "relay (Relay + drain, 1 process)",
        "events": events,
        "messages": o.finished,
        "seconds": o.seconds,
        "messages_per_s": o.rate,
        "requests": o.requests,
        "requests_per_1000_events": o.requests / (events / 1000),
        "accepted_by_server": o.accepted,
        "coalesced": o.coalesced,
        "write_s": backlog["write_s"],
        "problems": o.problems,
    }


def sdk_throughput(customers: int, max_retries: int) -> dict[str, Any]:
    server = FakeServer(0.0)
    try:
        proc = _worker(
            "sdk", server.url, "--customers", str(customers), "--max-retries", str(max_retries)
        )
        _go(proc)
        r = _report(proc, 600)
        stats = server.stats()
    finally:
        server.stop()
    seconds = r["end"] - r["start"]
    events = r["events"]
    problems = []
    if stats["accepted"] != 2 * events:
        problems.append(f"server accepted {stats['accepted']} of {2 * events} messages")
    return {
        "system": "official SDK inline (async queue)",
        "events": events,
        "messages": int(stats["accepted"]),
        "seconds": seconds,
        "messages_per_s": stats["accepted"] / seconds,
        "app_loop_s": r["app_loop_end"] - r["start"],
        "requests": int(stats["requests"]),
        "requests_per_1000_events": stats["requests"] / (events / 1000),
        "problems": problems,
    }


def _job_queue_drain(
    system: str, dsn: str, customers: int, write: Any, timeout_s: float
) -> dict[str, Any]:
    """Write the backlog with ``write(conn, events)``, then drain it with the peer's worker."""
    events = _events(customers)
    with psycopg.connect(dsn, autocommit=True) as conn:
        t0 = time.perf_counter()
        for first in range(0, len(events), 1000):  # 100 customers x 10 events per transaction
            with conn.transaction():
                write(conn, events[first : first + 1000])
        write_s = time.perf_counter() - t0
    server = FakeServer(0.0)
    try:
        proc = _worker(system, server.url, "--dsn", dsn)
        _go(proc)
        r = _report(proc, timeout_s)
        stats = server.stats()
    finally:
        server.stop()
    messages = 2 * len(events)
    seconds = r["end"] - r["start"]
    problems = []
    if stats["accepted"] != messages:
        problems.append(f"server accepted {stats['accepted']} of {messages} messages")
    return {
        "system": f"{system} (1 worker, one job per message)",
        "events": len(events),
        "messages": int(stats["accepted"]),
        "seconds": seconds,
        "messages_per_s": stats["accepted"] / seconds,
        "requests": int(stats["requests"]),
        "requests_per_1000_events": stats["requests"] / (len(events) / 1000),
        "write_s": write_s,
        "problems": problems,
    }


def procrastinate_drain(dsn: str, customers: int, timeout_s: float) -> dict[str, Any]:
    app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=dsn))
    with app.open():
        app.schema_manager.apply_schema()

    @app.task(name=PROCRASTINATE_TASK)
    def deliver_message(body: dict[str, Any]) -> None:  # pragma: no cover - worker runs it
        # Registered here only so jobs can be deferred under this name; the worker process
        # (bench.peers_worker) registers the same task with the body that POSTs the message.
        raise RuntimeError("this process only defers jobs; bench.peers_worker runs them")

    def write(conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None:
        # connection=: procrastinate runs its INSERT on the application's connection, so the
        # job commits with the application's transaction (its documented external-connection
        # path; the connector's own pool is not used).
        deferrer = deliver_message.configure(connection=conn)
        for event in events:
            for m in map_event(event):
                deferrer.defer(body=dict(m.body))

    with app.open():
        return _job_queue_drain("procrastinate", dsn, customers, write, timeout_s)


def pgqueuer_drain(dsn: str, customers: int, timeout_s: float) -> dict[str, Any]:
    import asyncio

    async def install() -> None:
        conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        from pgqueuer.db import PsycopgDriver

        await Queries(PsycopgDriver(conn)).install()
        await conn.close()

    asyncio.run(install())

    def write(conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None:
        # pgqueuer wants an autocommit connection; the caller's conn.transaction() block makes
        # these INSERTs part of the application's transaction all the same.
        queries = SyncQueries(SyncPsycopgDriver(conn))
        for event in events:
            for m in map_event(event):
                queries.enqueue(PGQUEUER_ENTRYPOINT, m.encoded)

    return _job_queue_drain("pgqueuer", dsn, customers, write, timeout_s)


# --------------------------------------------------------------------------- loss


def sdk_killed(customers: int) -> dict[str, Any]:
    server = FakeServer(LOSS_LATENCY_MS)
    try:
        proc = _worker("sdk", server.url, "--customers", str(customers), "--report-each")
        assert proc.stdout is not None
        _go(proc)
        total = customers * len(FUNNEL_STEPS)
        sent = 0
        for line in proc.stdout:
            if line.startswith("sent "):
                sent = int(line.split()[1])
                if sent >= total // 2:
                    break
        proc.send_signal(signal.SIGKILL)
        # Lines written before the kill landed: the application may have got further.
        for line in proc.stdout:
            if line.startswith("sent "):
                sent = int(line.split()[1])
        proc.wait()
        time.sleep(0.5)  # a request already on the wire is still counted by the server
        received = set(_received_ids(server))
    finally:
        server.stop()
    messages = 2 * sent
    return {
        "system": "official SDK inline",
        "scenario": "app SIGKILLed mid-stream",
        "events_sent_by_app": sent,
        "messages": messages,
        "received": len(received),
        "lost": messages - len(received),
    }


def sdk_down(customers: int, max_retries: int) -> dict[str, Any]:
    url = _dead_url()
    proc = _worker("sdk", url, "--customers", str(customers), "--max-retries", str(max_retries))
    _go(proc)
    t0 = time.monotonic()
    r = _report(proc, 600)
    # Bring the API back at once: nothing the SDK gave up on is sent again.
    messages = 2 * r["events"]
    return {
        "system": "official SDK inline",
        "scenario": f"API down (connection refused), max_retries={max_retries}",
        "events_sent_by_app": r["events"],
        "messages": messages,
        "app_believed_sent": r["messages_enqueued"],
        "sdk_reported_failed": r["messages_reported_failed"],
        "received": 0,
        "lost": messages,
        "seconds_until_given_up": time.monotonic() - t0,
    }


def _record_loss_backlog(dsn: str, customers: int) -> tuple[int, set[str]]:
    """The application recording each event with ``record_event`` in its own transaction."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE relay_outbox, relay_attempt")
    ids: set[str] = set()
    events = _events(customers)
    with psycopg.connect(dsn) as conn:
        for event in events:
            ids.update(record_event(conn, event).message_ids)
            conn.commit()
    return len(events), ids


def _relay_restart(dsn: str, server: FakeServer, expected: set[str]) -> dict[str, Any]:
    proc = _relay_cli(dsn, server.url, "--drain", "--timeout", "300", timeout_s=330)
    _out, err = proc.communicate(timeout=330)
    received = _received_ids(server)
    with psycopg.connect(dsn) as conn:
        # Coalesced identifies are not sent on their own: their traits travel in the
        # customer's later identify, which the server must have received. They are finished,
        # not lost.
        coalesced = {
            str(row[0])
            for row in conn.execute("SELECT message_id FROM relay_outbox WHERE state = 'coalesced'")
        }
    got = set(received) & expected
    return {
        "restart_exit": proc.returncode,
        "restart_stderr_tail": err[-500:],
        "received": len(got),
        "coalesced": len(coalesced & expected),
        "duplicates": len(received) - len(set(received)),
        "lost": len(expected - got - coalesced),
    }


def outbox_killed(dsn: str, customers: int) -> dict[str, Any]:
    events, ids = _record_loss_backlog(dsn, customers)
    server = FakeServer(LOSS_LATENCY_MS)
    try:
        proc = _relay_cli(dsn, server.url, "--batch-size", "20", timeout_s=60)
        accepted_at_kill = _wait_accepted(server, 1, 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        result = _relay_restart(dsn, server, ids)
    finally:
        server.stop()
    return {
        "system": "outbox + relay",
        "scenario": "relay SIGKILLed mid-drain, then relay run --drain",
        "events_sent_by_app": events,
        "messages": len(ids),
        "accepted_before_kill": accepted_at_kill,
        **result,
    }


def outbox_down(dsn: str, customers: int, outage_s: float) -> dict[str, Any]:
    events, ids = _record_loss_backlog(dsn, customers)
    proc = _relay_cli(dsn, _dead_url(), "--drain", "--timeout", str(outage_s), timeout_s=60)
    proc.communicate(timeout=outage_s + 60)
    down_exit = proc.returncode
    server = FakeServer(0.0)
    try:
        result = _relay_restart(dsn, server, ids)
    finally:
        server.stop()
    return {
        "system": "outbox + relay",
        "scenario": f"API down {outage_s:g} s (relay drain times out), then relay run --drain",
        "events_sent_by_app": events,
        "messages": len(ids),
        "down_exit": down_exit,
        **result,
    }


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="200 customers")
    parser.add_argument("--customers", type=int, help="customers in the workload (1,000)")
    parser.add_argument("--loss-customers", type=int, default=20)
    parser.add_argument("--sdk-max-retries", type=int, default=2)
    parser.add_argument("--outage-s", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per drain, seconds")
    add_database_option(parser)
    args = parser.parse_args(argv)
    customers = args.customers or (200 if args.quick else 1_000)
    command = reproduce_command("bench.peers")

    def step(label: str) -> None:
        print(f"  {label} ...", file=sys.stderr, flush=True)

    with bench_database(args.dsn) as db:
        env = environment(db)
        step(f"relay drain, {customers:,} customers")
        relay = relay_drain(db.dsn, customers, args.timeout)
        step("official SDK inline")
        sdk = sdk_throughput(customers, args.sdk_max_retries)
        step("procrastinate")
        proc = procrastinate_drain(db.dsn, customers, args.timeout)
        step("pgqueuer")
        pgq = pgqueuer_drain(db.dsn, customers, args.timeout)
        step("loss: SDK killed")
        loss = [sdk_killed(args.loss_customers)]
        step("loss: SDK, API down")
        loss.append(sdk_down(args.loss_customers, args.sdk_max_retries))
        step("loss: relay killed")
        loss.append(outbox_killed(db.dsn, args.loss_customers))
        step("loss: outbox, API down")
        loss.append(outbox_down(db.dsn, args.loss_customers, args.outage_s))

    peers = {"sdk": sdk, "procrastinate": proc, "pgqueuer": pgq}
    ratios = {
        key: {
            "relay_over_peer": relay["messages_per_s"] / p["messages_per_s"],
            "target": TARGETS[key],
            "met": relay["messages_per_s"] / p["messages_per_s"] >= TARGETS[key],
        }
        for key, p in peers.items()
    }
    payload = {
        "benchmark": "peers",
        "command": command,
        "environment": env,
        "versions": {
            name: version(name)
            for name in ("customerio-cdp-analytics", "procrastinate", "pgqueuer", "httpx")
        },
        "parameters": {
            "customers": customers,
            "loss_customers": args.loss_customers,
            "sdk_max_retries": args.sdk_max_retries,
            "outage_s": args.outage_s,
            "loss_latency_ms": LOSS_LATENCY_MS,
            "quick": args.quick,
        },
        "throughput": {"relay": relay, **peers},
        "ratios": ratios,
        "loss": loss,
        "relay_code_changed": code_changed_warning(env, code_fingerprint()),
    }
    path = write_results("peers", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    bad = [r for r in payload["throughput"].values() if r["problems"]]
    outbox_lost = [x for x in loss if x["system"] == "outbox + relay" and x["lost"]]
    return 1 if bad or outbox_lost else 0


def render(payload: dict[str, Any]) -> str:
    p = payload["parameters"]
    t = payload["throughput"]
    ratios = payload["ratios"]
    relay_rate = t["relay"]["messages_per_s"]
    rows = []
    for key, r in t.items():
        ratio = ratios.get(key)
        rows.append(
            [
                r["system"],
                r["events"],
                r["messages"],
                r["seconds"],
                r["messages_per_s"],
                r["requests"],
                r["requests_per_1000_events"],
                None if ratio is None else ratio["relay_over_peer"],
                None if ratio is None else f">= {ratio['target']:g}x",
                None if ratio is None else ("met" if ratio["met"] else "NOT met"),
            ]
        )
    versions = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    out = [
        "peers: the relay next to the official SDK inline, procrastinate and pgqueuer",
        describe_environment(payload["environment"]),
        f"Versions: {versions}",
        "",
        f"Throughput: {p['customers']:,} customers x 10 events, each an identify + a track; "
        "fake Customer.io answering at once.",
        "",
        table(
            [
                "system",
                "events",
                "messages delivered",
                "seconds",
                "messages/s",
                "requests",
                "req/1k events",
                "relay x",
                "target",
                "",
            ],
            rows,
        ),
        "",
        f"relay = {relay_rate:,.0f} messages/s (rows finished, coalesced included). SDK: from "
        "the first identify() to the end of flush(). Job queues: from the worker's start to "
        "its return once the queue is empty, each job one strict-mode POST.",
        "",
        f"Loss: {p['loss_customers']} customers x 10 events; server latency "
        f"{p['loss_latency_ms']:g} ms.",
        "",
        table(
            [
                "system",
                "scenario",
                "events sent by app",
                "messages",
                "received",
                "coalesced",
                "lost",
                "received twice",
            ],
            [
                [
                    x["system"],
                    x["scenario"],
                    x["events_sent_by_app"],
                    x["messages"],
                    x["received"],
                    x.get("coalesced"),
                    x["lost"],
                    x.get("duplicates"),
                ]
                for x in payload["loss"]
            ],
        ),
    ]
    down = next(
        x for x in payload["loss"] if x["system"] != "outbox + relay" and "down" in x["scenario"]
    )
    out.append(
        f"\nSDK with the API down: the application was told every call succeeded "
        f"({down['app_believed_sent']} of {down['messages']} messages queued); after "
        f"{down['seconds_until_given_up']:.1f} s of retries the SDK dropped them, reporting "
        f"{down['sdk_reported_failed']} only to its on_error callback."
    )
    out.append(
        "Outbox: lost = recorded messages neither received by the server nor coalesced into a "
        "later identify that was; received twice = the batch in flight when the relay was "
        "killed, sent again after its lease expired (at-least-once, same messageId)."
    )
    problems = [(k, x) for k, r in t.items() for x in r["problems"]]
    out.extend(f"PROBLEM in {k}: {x}" for k, x in problems)
    out.append(
        "\nFigures are from one run on a shared machine: compare rows with each other, not "
        "with another run."
    )
    if payload.get("relay_code_changed"):
        out.append(payload["relay_code_changed"])
    out.append(f"\nreproduce: {payload['command']}")
    return "\n".join(out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
