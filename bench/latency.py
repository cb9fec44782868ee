"""Commit-to-received latency of an idle relay woken by notifications, at a steady load.

``python -m bench.latency [--rate 500] [--seconds 20] [--quick] [--dsn URL|embedded]``

- **Writer** (this process, one thread): ``record_event`` of one funnel event per durable
  transaction, on a fixed schedule of ``--rate`` events per second (event ``i`` is due at
  ``start + i / rate``; a late transaction does not push the later ones back, so the offered
  load stays the target's). The commit time of each event is ``time.monotonic()`` right after
  its ``COMMIT`` returned, kept with the event's messageIds.
- **Relay**: exactly ``relay run --poll-interval 5`` in its own process. The poll interval is
  long on purpose: between bursts only the outbox trigger's ``NOTIFY`` can wake it, which is
  what this measures.
- **Fake Customer.io**: ``relay.testing.fakecio.FakeCustomerIO`` in a process of its own (this
  module with ``--serve-fake``), so that neither the writer nor the relay shares its GIL. The HTTP
  endpoint ``/_fake/received`` has no times; that process hands back each accepted item's
  ``received_at`` (``time.monotonic()`` when its request was stored) on request.

``time.monotonic()`` is ``CLOCK_MONOTONIC`` on Linux, one clock for the whole machine, so the
writer's and the server's readings subtract directly. Latency per track message = received -
committed. Identifies are left out of the figures: the relay may merge a customer's identifies
into one (coalescing), and a merged one is never received.

Target (from the issue): p50 <= 25 ms and p99 <= 150 ms at 500 events/s.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import psycopg

from bench.common import (
    FUNNEL_STEPS,
    REPO_ROOT,
    RESULTS_DIR,
    WRITE_KEY,
    add_database_option,
    bench_database,
    code_changed_warning,
    code_fingerprint,
    describe_environment,
    environment,
    footer,
    funnel_event,
    median,
    percentile,
    reproduce_command,
    spawn_listening,
    table,
    write_results,
)
from relay import record_event

TARGET_P50_MS = 25.0
TARGET_P99_MS = 150.0
INSTANCE = "bench-latency"
# Customers of this benchmark start here, so their ids never meet the warm-up's.
FIRST_CUSTOMER = 1_000_000

# --------------------------------------------------------------------------- the fake server


def serve_fake() -> int:
    """``--serve-fake``: run a FakeCustomerIO; on ``dump`` (stdin) print its receipts and exit.

    Prints ``listening on URL`` first. The receipts are one JSON line: a list of
    ``[messageId, kind, received_at]`` for every accepted item.
    """
    from relay.testing.fakecio import FakeCustomerIO

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when this ends
    fake = FakeCustomerIO(write_keys={WRITE_KEY}).start()
    print(f"listening on {fake.url}", flush=True)
    for line in sys.stdin:
        if line.strip() == "dump":
            with fake._cond:  # the records' own lock: a consistent copy
                out = [
                    [a.item.get("messageId"), a.item.get("type"), a.received_at]
                    for a in fake.accepted
                ]
            print(json.dumps(out), flush=True)
            break
        if line.strip() == "count":
            # Tracks only: identifies may be merged away, tracks all arrive.
            with fake._cond:
                print(sum(1 for a in fake.accepted if a.item.get("type") == "track"), flush=True)
    fake.stop()
    return 0


class FakeProcess:
    def __init__(self) -> None:
        self.proc, self.url = spawn_listening(
            ["-m", "bench.latency", "--serve-fake"], "the fake server", stdin=True
        )

    def _ask(self, what: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline()

    def count(self) -> int:
        return int(self._ask("count"))

    def dump(self) -> list[list[Any]]:
        out: list[list[Any]] = json.loads(self._ask("dump"))
        self.proc.wait(timeout=30)
        return out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- the relay


def start_relay(dsn: str, url: str, poll_s: float, log: IO[str]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "CUSTOMERIO_WRITE_KEY": WRITE_KEY,
        "CUSTOMERIO_API_URL": url,
    }
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay.cli",
            "--log-level",
            "WARNING",
            "run",
            "--poll-interval",
            str(poll_s),
            "--instance",
            INSTANCE,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=log,
        text=True,
    )


def wait_listening(dsn: str, proc: subprocess.Popen[str], timeout_s: float = 30.0) -> None:
    """Until the relay's LISTEN session exists: before that a NOTIFY would wake nobody."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError("the relay exited at start-up; see its log")
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                (f"relay listen {INSTANCE}",),
            ).fetchone()
            if row and row[0]:
                # The session exists; its LISTEN is the first statement it runs.
                time.sleep(0.5)
                return
            time.sleep(0.1)
    raise RuntimeError("the relay did not open its LISTEN session in time")


def _peak_rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class Vacuumer(threading.Thread):
    """``VACUUM relay_outbox`` every ``every_s`` seconds, for a server whose autovacuum is off.

    The relay's updates leave a dead tuple (and dead index entries) per message; with
    autovacuum off nothing removes them while the load runs. This stands in for an
    autovacuum that keeps up, to tell that cost apart from the relay's own.
    """

    def __init__(self, dsn: str, every_s: float) -> None:
        super().__init__(name="bench-vacuum", daemon=True)
        self.dsn, self.every_s = dsn, every_s
        self.done = threading.Event()
        self.runs = 0
        self.start()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.done.wait(self.every_s):
                conn.execute("VACUUM relay_outbox")
                self.runs += 1

    def stop(self) -> None:
        self.done.set()
        self.join()


# --------------------------------------------------------------------------- the writer


def write_load(
    dsn: str, rate: float, seconds: float, writers: int, first_customer: int
) -> tuple[dict[str, float], dict[str, Any]]:
    """``writers`` threads, each its share of ``rate`` on a fixed schedule, staggered evenly.

    More than one: as application servers do, and because one thread's transaction (mapping
    included) may not fit in ``1 / rate`` seconds on this machine.
    """
    start = time.monotonic() + 0.3
    results: list[tuple[dict[str, float], dict[str, Any]]] = [({}, {})] * writers

    def one(k: int) -> None:
        results[k] = write_paced(
            dsn, rate / writers, seconds, first_customer + k * 100_000, start + k / rate
        )

    threads = [threading.Thread(target=one, args=(k,)) for k in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    committed: dict[str, float] = {}
    for c, _ in results:
        committed.update(c)
    stats = [w for _, w in results]
    total = sum(w["events"] for w in stats)
    elapsed = max(w["end"] for w in stats) - start
    return committed, {
        "writers": writers,
        "events": total,
        "elapsed_s": elapsed,
        "achieved_rate": total / elapsed if elapsed else 0.0,
        "late_starts": sum(w["late_starts"] for w in stats),
        "txn_median_ms": median([x for w in stats for x in w["txn_ms"]]),
        "txn_p99_ms": percentile([x for w in stats for x in w["txn_ms"]], 99),
    }


def write_paced(
    dsn: str, rate: float, seconds: float, first_customer: int, start: float
) -> tuple[dict[str, float], dict[str, Any]]:
    """Commit ``rate * seconds`` events on a fixed schedule; messageId -> commit time."""
    committed: dict[str, float] = {}
    total = int(rate * seconds)
    late = 0
    commit_ms: list[float] = []
    with psycopg.connect(dsn) as conn:
        conn.execute("SET synchronous_commit = on")  # durable, as the application commits
        conn.commit()
        events = [
            funnel_event(first_customer + i // len(FUNNEL_STEPS), i % len(FUNNEL_STEPS))
            for i in range(total)
        ]
        for i, event in enumerate(events):
            due = start + i / rate
            now = time.monotonic()
            if now < due:
                time.sleep(due - now)
            elif now - due > 0.001:
                late += 1
            t0 = time.monotonic()
            result = record_event(conn, event)
            conn.commit()
            t1 = time.monotonic()
            commit_ms.append(1000 * (t1 - t0))
            for mid in result.message_ids:
                committed[mid] = t1
    return committed, {
        "events": total,
        "end": time.monotonic(),
        "late_starts": late,
        "txn_ms": commit_ms,
    }


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    logs = RESULTS_DIR / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    with bench_database(args.dsn) as db:
        env = environment(db)
        fake = FakeProcess()
        log_path = logs / "latency-relay.log"
        relay_log = open(log_path, "w")  # noqa: SIM115 (closed below)
        relay = start_relay(db.dsn, fake.url, args.poll_interval, relay_log)
        try:
            wait_listening(db.dsn, relay)
            # Warm-up, untimed: the relay's first cycle pays for connections and imports.
            warm, _ = write_load(db.dsn, 50, 1.0, 1, 1)
            _wait_done(db.dsn, fake, len(warm) // 2, 30.0)
            before = fake.count()
            time.sleep(args.poll_interval)  # idle, so the measured load starts from rest
            vacuumer = Vacuumer(db.dsn, args.vacuum_every) if args.vacuum_every else None
            committed, writer = write_load(
                db.dsn, args.rate, args.seconds, args.writers, FIRST_CUSTOMER
            )
            tracks_expected = writer["events"]
            _wait_done(db.dsn, fake, before + tracks_expected, 60.0)
            if vacuumer is not None:
                vacuumer.stop()
            rss_kb = _peak_rss_kb(relay.pid)
            receipts = fake.dump()
        finally:
            relay.send_signal(signal.SIGTERM)
            try:
                relay.wait(timeout=30)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
            relay_log.close()
            fake.kill()
        with psycopg.connect(db.dsn) as conn:
            states = dict(
                conn.execute("SELECT state, count(*) FROM relay_outbox GROUP BY state").fetchall()
            )
            requests_row = conn.execute("SELECT count(*) FROM relay_attempt").fetchone()
            claim = _claim_cost(conn)
    latencies: list[float] = []
    # (commit time from the first commit, latency): the shape over time tells a backlog that
    # grows (latency rising with time) from lost wake-ups (isolated spikes).
    series: list[tuple[float, float]] = []
    first = min(committed.values()) if committed else 0.0
    for mid, kind, received_at in receipts:
        if kind == "track" and mid in committed:
            latencies.append(1000 * (received_at - committed[mid]))
            series.append((committed[mid] - first, latencies[-1]))
    series.sort()
    return {
        "benchmark": "latency",
        "command": reproduce_command("bench.latency"),
        "environment": env,
        "parameters": {
            "rate": args.rate,
            "seconds": args.seconds,
            "poll_interval_s": args.poll_interval,
            "writers": args.writers,
            "vacuum_every_s": args.vacuum_every,
            "quick": args.quick,
        },
        "writer": writer,
        "tracks_expected": writer["events"],
        "tracks_received": len(latencies),
        "outbox_states": states,
        "attempt_rows": int(requests_row[0]) if requests_row else 0,
        "claim_after_load": claim,
        "relay_peak_rss_mb": rss_kb / 1024,
        "latency_ms": {
            "p50": median(latencies),
            "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99),
            "max": max(latencies) if latencies else float("nan"),
            "min": min(latencies) if latencies else float("nan"),
        },
        "series": [[round(t, 4), round(x, 2)] for t, x in series],
        "over_1s": sum(1 for x in latencies if x > 1000),
        "over_150ms": sum(1 for x in latencies if x > 150),
        "target": {"p50_ms": TARGET_P50_MS, "p99_ms": TARGET_P99_MS},
        "relay_log": str(log_path),
    }


def _claim_cost(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """The relay's claim on the drained outbox: what an idle relay's next wake-up pays.

    With nothing due it should touch a handful of pages; what it touches beyond that is the
    dead index entries and row versions the load left behind.
    """
    from bench.bigtable import current_floor
    from relay import queries as q

    time.sleep(1.0)  # the cumulative statistics are flushed at most once a second
    dead = conn.execute(
        "SELECT coalesce(sum(n_dead_tup), 0) FROM pg_stat_user_tables"
        " WHERE relid IN (SELECT relid FROM pg_partition_tree('relay_outbox'))"
    ).fetchone()
    row = conn.execute(
        "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + q.OUTBOX_CLAIM_HEADS,
        {"customers": 100, "floor": current_floor(conn)},
    ).fetchone()
    conn.rollback()
    plan = row[0][0] if row else {}
    return {
        "execution_ms": plan.get("Execution Time"),
        "shared_hit": plan.get("Plan", {}).get("Shared Hit Blocks"),
        "dead_tuples": int(dead[0]) if dead else None,
    }


def _wait_done(dsn: str, fake: FakeProcess, tracks: int, timeout_s: float) -> None:
    """Until the server holds ``tracks`` tracks and the outbox has nothing left to send."""
    deadline = time.monotonic() + timeout_s
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            row = conn.execute(
                "SELECT count(*) FROM relay_outbox "
                "WHERE state IN ('pending', 'retrying', 'in_flight')"
            ).fetchone()
            if row and row[0] == 0 and fake.count() >= tracks:
                return
            time.sleep(0.2)


def _shape(series: list[list[float]]) -> str:
    """Median latency per tenth of the load, by commit time: flat, or rising with time."""
    if not series:
        return ""
    span = series[-1][0] or 1.0
    parts: list[list[float]] = [[] for _ in range(10)]
    for t, x in series:
        parts[min(9, int(10 * t / span))].append(x)
    medians = [f"{median(v):.0f}" for v in parts if v]
    return "Median latency (ms) per tenth of the load, in commit order: " + ", ".join(medians)


def render(p: dict[str, Any]) -> str:
    w, lat, t = p["writer"], p["latency_ms"], p["target"]
    rows = [
        [
            f"{p['parameters']['rate']:g}/s x {p['parameters']['seconds']:g} s, "
            f"{w['writers']} writers",
            w["achieved_rate"],
            p["tracks_received"],
            lat["p50"],
            lat["p90"],
            lat["p99"],
            lat["max"],
            w["txn_median_ms"],
            p["attempt_rows"],
            p["relay_peak_rss_mb"],
        ]
    ]
    out = [
        "latency: commit to received at the fake Customer.io, relay idle and woken by NOTIFY",
        describe_environment(p["environment"]),
        "",
        table(
            [
                "offered load",
                "achieved events/s",
                "tracks measured",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "writer txn median ms",
                "requests",
                "relay peak RSS MB",
            ],
            rows,
        ),
        "",
    ]
    p50_ok = lat["p50"] <= t["p50_ms"]
    p99_ok = lat["p99"] <= t["p99_ms"]
    out.append(
        f"p50 {lat['p50']:.1f} ms (target <= {t['p50_ms']:g}): {'met' if p50_ok else 'NOT met'}; "
        f"p99 {lat['p99']:.1f} ms (target <= {t['p99_ms']:g}): {'met' if p99_ok else 'NOT met'}."
    )
    out.append(
        f"Tracks over 150 ms: {p['over_150ms']:,}; over 1 s: {p['over_1s']:,} "
        f"of {p['tracks_received']:,}."
    )
    if p["tracks_received"] < p["tracks_expected"]:
        out.append(
            f"PROBLEM: {p['tracks_expected'] - p['tracks_received']} tracks never arrived "
            f"(outbox states: {p['outbox_states']})."
        )
    if w["late_starts"]:
        out.append(
            f"The writer started {w['late_starts']:,} of {w['events']:,} transactions more than "
            "1 ms behind schedule (the machine could not keep the offered load exactly)."
        )
    out.append(_shape(p["series"]))
    c = p.get("claim_after_load")
    if c:
        out.append(
            f"After the load (nothing due): the claim query took {c['execution_ms']:.2f} ms and "
            f"{c['shared_hit']:,} buffer hits; relay_outbox had {c['dead_tuples']:,} dead tuples."
        )
    if p["parameters"].get("vacuum_every_s"):
        out.append(
            f"VACUUM relay_outbox ran every {p['parameters']['vacuum_every_s']:g} s "
            "during the load."
        )
    out.append(
        f"Relay poll interval {p['parameters']['poll_interval_s']:g} s: only NOTIFY wakes it "
        "sooner. Latency = received (server) - end of COMMIT (writer), both CLOCK_MONOTONIC."
    )
    out += footer(p, shared_machine_note=False)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=500.0, help="events per second (500)")
    parser.add_argument("--seconds", type=float, help="seconds of load (20; 10 with --quick)")
    parser.add_argument("--quick", action="store_true", help="10 s of load")
    parser.add_argument(
        "--poll-interval", type=float, default=5.0, help="relay poll interval, s (5)"
    )
    parser.add_argument(
        "--writers", type=int, default=2, help="application threads sharing the rate (2)"
    )
    parser.add_argument(
        "--vacuum-every",
        type=float,
        help="also run VACUUM relay_outbox every S seconds during the load (autovacuum off)",
    )
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    add_database_option(parser)
    args = parser.parse_args(argv)
    if args.serve_fake:
        return serve_fake()
    if args.seconds is None:
        args.seconds = 10.0 if args.quick else 20.0
    payload = run(args)
    payload["relay_code_changed"] = code_changed_warning(payload["environment"], code_fingerprint())
    # The VACUUM variant is a diagnosis, kept beside the plain run rather than replacing it.
    path = write_results("latency-vacuum" if args.vacuum_every else "latency", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 0 if payload["tracks_received"] >= payload["tracks_expected"] else 1


if __name__ == "__main__":
    threading.current_thread().name = "bench-latency"
    sys.exit(main())
