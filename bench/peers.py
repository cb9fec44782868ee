"""The relay next to what applications use instead of it, in one run on one workload.

``python -m bench.peers [--quick] [--customers N] [--dsn URL|embedded]``

Workload: ``--customers`` customers (10,000; 200 with ``--quick``), each with the 10-event
funnel of ``bench.common.FUNNEL_STEPS``; every event is an identify and a track, the bodies
``relay.mapping.map_event`` produces, so every system sends the same data. Each system runs
against its own ``python -m relay.testing.fakecio`` process, once answering at once and once after
50 ms per request (``--latency-ms``), the order of magnitude of a request to Customer.io from
another network.

1. **Official SDK inline** (``customerio-cdp-analytics``), both ways it can be called: its
   default, where ``identify``/``track`` put the message on an in-memory queue that a
   background thread sends in batches, and ``sync_mode``, where each call POSTs its message
   before it returns. Throughput is from the first call to the end of ``flush()``. Loss: (a)
   the application is SIGKILLed mid-stream, and (b) the API is down (a stopped server:
   connection refused) for longer than the SDK retries (``max_retries`` lowered to
   ``--sdk-max-retries`` so the scenario ends in seconds; the SDK's default of 10 only makes
   it give up later); in ``sync_mode`` each call raises instead.
2. **procrastinate** and 3. **pgqueuer** as the outbox: one job per message, deferred in the
   application's transaction, drained by the library's worker with one strict-mode POST per
   message. Drain rate from a pre-written backlog.
4. **The relay**: ``bench.drain``'s single-relay drain (``Relay`` + ``drain``) of the same
   backlog, and the same two loss scenarios for the outbox: the relay is SIGKILLed mid-drain
   or the API is down; then ``relay run --drain`` against a healthy server. Lost must be 0.

A peer that has not finished after ``--box-s`` seconds (60; 15 with ``--quick``) is stopped and
its rate read from what the server had accepted by then: at one request per message and 50 ms
each, the whole workload would take hours.

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
from typing import Any, Protocol

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
    footer,
    funnel_event,
    reproduce_command,
    table,
    write_results,
)
from bench.drain import FakeServer, Variant, build_backlog, load_backlog, run_variant
from bench.peers_worker import PGQUEUER_ENTRYPOINT, PROCRASTINATE_TASK
from relay import record_event
from relay.mapping import map_event

TARGETS = {"procrastinate": 100.0, "pgqueuer": 50.0, "sdk": 5.0, "sdk_sync": 5.0}
"""The issue's targets: relay messages/s at least this many times the peer's. "SDK inline"
is measured both ways the SDK can be called: its default (a background thread batches a
queue in memory) and ``sync_mode`` (each call POSTs its message before it returns)."""

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


def _run_worker(
    proc: subprocess.Popen[str], server: FakeServer, box_s: float | None, timeout_s: float
) -> tuple[float, float, dict[str, Any], bool]:
    """Start ``proc`` and let it run to its end, or for at most ``box_s`` seconds.

    Returns (start, end, the server's stats, whether the box cut the run short). A peer that
    sends one request per message at 50 ms each would need hours for the whole workload
    (200,000 messages at 20/s); its steady rate over the box is what the table compares.
    """
    started = time.time()
    _go(proc)
    if box_s is not None:
        try:
            proc.wait(timeout=box_s)
        except subprocess.TimeoutExpired:
            stats = server.stats()
            cut = time.time()
            proc.kill()
            proc.wait()
            return started, cut, stats, True
    r = _report(proc, timeout_s)
    return float(r.get("start", started)), float(r["end"]), server.stats(), False


def _throughput_row(
    system: str,
    latency_ms: float,
    events: int,
    start: float,
    end: float,
    stats: dict[str, Any],
    boxed: bool,
    **extra: Any,
) -> dict[str, Any]:
    messages = 2 * events
    problems = []
    if not boxed and stats["accepted"] != messages:
        problems.append(f"server accepted {stats['accepted']} of {messages} messages")
    # A boxed run's events are those whose messages the server received in the box.
    done_events = stats["accepted"] / 2 if boxed else events
    return {
        "system": system,
        "latency_ms": latency_ms,
        "events": events,
        "messages": int(stats["accepted"]),
        "seconds": end - start,
        "boxed": boxed,
        "messages_per_s": stats["accepted"] / (end - start),
        "requests": int(stats["requests"]),
        "requests_per_1000_events": stats["requests"] / (done_events / 1000)
        if done_events
        else None,
        "problems": problems,
        **extra,
    }


def relay_drain(
    dsn: str, backlog: dict[str, Any], latency_ms: float, timeout_s: float
) -> dict[str, Any]:
    """``bench.drain``'s single relay over the ``record_events`` backlog (built once, copied
    back before each drain)."""
    rows = load_backlog(dsn)
    o = run_variant(Variant(f"api-{latency_ms:g}", "api", 1, latency_ms), dsn, rows, timeout_s)
    events = backlog["events"]
    return {
        "system": "relay (Relay + drain, 1 process)",
        "latency_ms": latency_ms,
        "events": events,
        "messages": o.finished,
        "seconds": o.seconds,
        "boxed": False,
        "messages_per_s": o.rate,
        "requests": o.requests,
        "requests_per_1000_events": o.requests / (events / 1000),
        "accepted_by_server": o.accepted,
        "coalesced": o.coalesced,
        "write_s": backlog["write_s"],
        "problems": o.problems,
    }


def sdk_throughput(
    customers: int, max_retries: int, sync_mode: bool, latency_ms: float, box_s: float | None
) -> dict[str, Any]:
    server = FakeServer(latency_ms)
    try:
        proc = _worker(
            "sdk",
            server.url,
            "--customers",
            str(customers),
            "--max-retries",
            str(max_retries),
            *(["--sync-mode"] if sync_mode else []),
        )
        start, end, stats, boxed = _run_worker(proc, server, box_s, 600)
    finally:
        server.stop()
    system = (
        "official SDK inline, sync_mode"
        if sync_mode
        else "official SDK inline, default (background queue)"
    )
    return _throughput_row(system, latency_ms, customers * 10, start, end, stats, boxed)


class JobQueue(Protocol):
    """procrastinate or pgqueuer used as the outbox: its schema, and the application's write
    of one job per message inside the application's own transaction."""

    name: str

    def install(self, dsn: str) -> None: ...

    def reset(self, conn: psycopg.Connection[Any]) -> None: ...

    def write(self, conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None: ...


class Procrastinate:
    name = "procrastinate"

    def __init__(self, dsn: str) -> None:
        self.app = procrastinate.App(connector=procrastinate.SyncPsycopgConnector(conninfo=dsn))

        @self.app.task(name=PROCRASTINATE_TASK)
        def deliver_message(body: dict[str, Any]) -> None:  # pragma: no cover - worker runs it
            # Registered here only so jobs can be deferred under this name; the worker process
            # (bench.peers_worker) registers the same task with the body that POSTs it.
            raise RuntimeError("this process only defers jobs; bench.peers_worker runs them")

        self.task = deliver_message

    def install(self, dsn: str) -> None:
        with self.app.open():
            self.app.schema_manager.apply_schema()

    def reset(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("TRUNCATE procrastinate_jobs CASCADE")

    def write(self, conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None:
        # connection=: procrastinate runs its INSERT on the application's connection, so the
        # job commits with the application's transaction (its documented external-connection
        # path; the connector's own pool is not used).
        deferrer = self.task.configure(connection=conn)
        for event in events:
            for m in map_event(event):
                deferrer.defer(body=dict(m.body))


class PgQueuer:
    name = "pgqueuer"

    def install(self, dsn: str) -> None:
        import asyncio

        from pgqueuer.db import PsycopgDriver

        async def install() -> None:
            conn = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
            await Queries(PsycopgDriver(conn)).install()
            await conn.close()

        asyncio.run(install())

    def reset(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("TRUNCATE pgqueuer, pgqueuer_log")

    def write(self, conn: psycopg.Connection[Any], events: list[dict[str, Any]]) -> None:
        # pgqueuer wants an autocommit connection; the caller's conn.transaction() block makes
        # these INSERTs part of the application's transaction all the same.
        queries = SyncQueries(SyncPsycopgDriver(conn))
        for event in events:
            for m in map_event(event):
                queries.enqueue(PGQUEUER_ENTRYPOINT, m.encoded)


def job_queue_drain(
    queue: JobQueue,
    dsn: str,
    customers: int,
    latency_ms: float,
    box_s: float | None,
    timeout_s: float,
) -> dict[str, Any]:
    """Write the backlog, one job per message, then drain it with the peer's worker."""
    events = _events(customers)
    with psycopg.connect(dsn, autocommit=True) as conn:
        queue.reset(conn)
        t0 = time.perf_counter()
        for first in range(0, len(events), 1000):  # 100 customers x 10 events per transaction
            with conn.transaction():
                queue.write(conn, events[first : first + 1000])
        write_s = time.perf_counter() - t0
    server = FakeServer(latency_ms)
    try:
        proc = _worker(queue.name, server.url, "--dsn", dsn)
        start, end, stats, boxed = _run_worker(proc, server, box_s, timeout_s)
    finally:
        server.stop()
    return _throughput_row(
        f"{queue.name} (1 worker, one job per message)",
        latency_ms,
        len(events),
        start,
        end,
        stats,
        boxed,
        write_s=write_s,
    )


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


def sdk_down(customers: int, max_retries: int, sync_mode: bool) -> dict[str, Any]:
    url = _dead_url()
    extra = ["--sync-mode"] if sync_mode else []
    proc = _worker(
        "sdk", url, "--customers", str(customers), "--max-retries", str(max_retries), *extra
    )
    _go(proc)
    t0 = time.monotonic()
    r = _report(proc, 600)
    # Bring the API back at once: nothing the SDK gave up on is sent again. In sync_mode each
    # failed call raised in the application instead: it must fail its own request (the
    # customer's purchase fails because Customer.io is down) or drop the message; nothing
    # keeps it to send later, so it counts as lost here.
    messages = 2 * r["events"]
    return {
        "system": "official SDK inline" + (", sync_mode" if sync_mode else ""),
        "scenario": (
            "API down (connection refused), each call raises"
            if sync_mode
            else f"API down (connection refused), max_retries={max_retries}"
        ),
        "events_sent_by_app": r["events"],
        "messages": messages,
        "app_believed_sent": r["messages_enqueued"],
        "app_saw_raise": r["messages_raised"],
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
    parser.add_argument("--quick", action="store_true", help="200 customers, 15 s box")
    parser.add_argument("--customers", type=int, help="customers in the workload (10,000)")
    parser.add_argument(
        "--latency-ms",
        default="0,50",
        help="the fake server's latency per request, a comma-separated list (0,50)",
    )
    parser.add_argument(
        "--box-s",
        type=float,
        help="longest a peer may run before its rate is read and it is stopped (60; 15 quick)",
    )
    parser.add_argument("--loss-customers", type=int, default=20)
    parser.add_argument("--sdk-max-retries", type=int, default=2)
    parser.add_argument("--outage-s", type=float, default=8.0)
    parser.add_argument("--timeout", type=float, default=1800.0, help="per drain, seconds")
    add_database_option(parser)
    args = parser.parse_args(argv)
    customers = args.customers or (200 if args.quick else 10_000)
    box_s = args.box_s or (15.0 if args.quick else 60.0)
    latencies = [float(x) for x in args.latency_ms.split(",") if x.strip()]
    command = reproduce_command("bench.peers")

    def step(label: str) -> None:
        print(f"  {label} ...", file=sys.stderr, flush=True)

    throughput: list[dict[str, Any]] = []
    with bench_database(args.dsn) as db:
        env = environment(db)
        queues: list[JobQueue] = [Procrastinate(db.dsn), PgQueuer()]
        for queue in queues:
            queue.install(db.dsn)
        step(f"relay backlog, {customers:,} customers")
        backlog = build_backlog(db.dsn, customers, 100)
        for latency in latencies:
            at = f"{latency:g} ms"
            step(f"relay drain, {at}")
            row = relay_drain(db.dsn, backlog, latency, args.timeout)
            throughput.append({"key": "relay", **row})
            for key, sync_mode in (("sdk", False), ("sdk_sync", True)):
                step(f"official SDK inline{', sync_mode' if sync_mode else ''}, {at}")
                row = sdk_throughput(customers, args.sdk_max_retries, sync_mode, latency, box_s)
                throughput.append({"key": key, **row})
            for queue in queues:
                step(f"{queue.name}, {at}")
                row = job_queue_drain(queue, db.dsn, customers, latency, box_s, args.timeout)
                throughput.append({"key": queue.name, **row})
        step("loss: SDK killed")
        loss = [sdk_killed(args.loss_customers)]
        step("loss: SDK, API down")
        loss.append(sdk_down(args.loss_customers, args.sdk_max_retries, sync_mode=False))
        step("loss: SDK sync_mode, API down")
        loss.append(sdk_down(args.loss_customers, args.sdk_max_retries, sync_mode=True))
        step("loss: relay killed")
        loss.append(outbox_killed(db.dsn, args.loss_customers))
        step("loss: outbox, API down")
        loss.append(outbox_down(db.dsn, args.loss_customers, args.outage_s))

    relay_rate = {r["latency_ms"]: r["messages_per_s"] for r in throughput if r["key"] == "relay"}
    for r in throughput:
        if r["key"] != "relay":
            ratio = relay_rate[r["latency_ms"]] / r["messages_per_s"]
            r["relay_over_peer"] = ratio
            r["target"] = TARGETS[r["key"]]
            r["met"] = ratio >= TARGETS[r["key"]]
    payload = {
        "benchmark": "peers",
        "command": command,
        "environment": env,
        "versions": {
            name: version(name)
            for name in (
                "customerio-cdp-analytics",
                "procrastinate",
                "pgqueuer",
                "asyncpg",
                "httpx",
            )
        },
        "parameters": {
            "customers": customers,
            "latencies_ms": latencies,
            "box_s": box_s,
            "loss_customers": args.loss_customers,
            "sdk_max_retries": args.sdk_max_retries,
            "outage_s": args.outage_s,
            "loss_latency_ms": LOSS_LATENCY_MS,
            "quick": args.quick,
        },
        "throughput": throughput,
        "loss": loss,
        "relay_code_changed": code_changed_warning(env, code_fingerprint()),
    }
    path = write_results("peers", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    bad = [r for r in throughput if r["problems"]]
    outbox_lost = [x for x in loss if x["system"] == "outbox + relay" and x["lost"]]
    return 1 if bad or outbox_lost else 0


def render(payload: dict[str, Any]) -> str:
    p = payload["parameters"]
    rows = [
        [
            r["system"],
            f"{r['latency_ms']:g}",
            r["events"],
            r["messages"],
            f"{r['seconds']:.1f}" + (" (box)" if r["boxed"] else ""),
            r["messages_per_s"],
            r["requests"],
            r["requests_per_1000_events"],
            r.get("relay_over_peer"),
            f">= {r['target']:g}x" if "target" in r else None,
            None if "met" not in r else ("met" if r["met"] else "NOT met"),
        ]
        for r in payload["throughput"]
    ]
    versions = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    out = [
        "peers: the relay next to the official SDK inline, procrastinate and pgqueuer",
        describe_environment(payload["environment"]),
        f"Versions: {versions}",
        "",
        f"Throughput: {p['customers']:,} customers x 10 events, each an identify + a track; "
        "the fake Customer.io answering after the given latency per request.",
        "",
        table(
            [
                "system",
                "server ms",
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
        "relay: messages/s = rows finished (delivered, or coalesced into a later identify that "
        "was) per second. SDK: from the first identify() to the end of flush(). Job queues: "
        "from the worker's start to its return once the queue is empty, each job one "
        f"strict-mode POST. (box): the peer was stopped after {p['box_s']:g} s and its rate is "
        "what the server had accepted by then; req/1k events then counts the events whose "
        "messages arrived. relay x: the relay's messages/s at the same latency over the peer's.",
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
        x
        for x in payload["loss"]
        if x["system"] == "official SDK inline" and "down" in x["scenario"]
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
    problems = [(r["system"], x) for r in payload["throughput"] for x in r["problems"]]
    out.extend(f"PROBLEM in {k}: {x}" for k, x in problems)
    out += ["", *footer(payload)]
    return "\n".join(out)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
