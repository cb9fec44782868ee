"""A simulated week at a steady write rate: outbox size, claim time and retention, day by day.

``python -m bench.week [--quick] [--rate 2000] [--day-seconds 30] [--keep-days 2]
[--dsn URL|embedded]``

Time is compressed: a simulated day lasts ``--day-seconds`` of wall time (30; 12 with
``--quick``), during which a writer records funnel events at ``--rate`` messages/s (2,000: an
identify and a track per event) with their ``occurred_at`` back-dated into that day (day 1 is
six days ago, day 7 today), while one ``relay run`` delivers them to the local strict-mode
stand-in. The seven days' partitions exist from the start, as the relay makes them ahead.
At the end of each day:

1. the writer stops and the backlog drains (seconds to drain: what the relay was behind);
2. **claim**: the relay is paused (SIGSTOP), a probe backlog of 100 customers x 2 rows is
   written into the day, ``OUTBOX_CLAIM_HEADS`` (customers=100) is run ``CLAIM_RUNS`` (9)
   times under ``EXPLAIN ANALYZE`` and rolled back (median execution time, planning time
   apart, the partitions it read and the dead row versions in them; a claim takes 1-2 ms, so
   one scheduling hiccup of the shared machine moves a median of three by a third),
   then the probe rows are cancelled and the relay resumed;
3. **retention**: ``relay.retention.purge`` (what ``relay purge`` and the relay's hourly
   retention run), in this process, with a cutoff at the start of the oldest day to keep
   (``--keep-days``, in simulated time), timed; it drops whole days;
4. **size**: the outbox's table plus indexes, summed over its partitions.

Targets (issue #13): at day 7, size and claim time within 10% of day 2; each day's purge
under 1 s however many rows the day held. The attempt log is dated by the real clock (the
relay writes ``started_at``), so all its rows fall on today and it is not purged here; its size
is reported, not judged.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.bigtable import claim_explain
from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    WRITE_KEY,
    add_database_option,
    bench_database,
    environment,
    footer,
    funnel_event,
    reproduce_command,
    table,
    write_results,
)
from bench.drain import FakeServer
from relay import queries as q
from relay import record_event
from relay.retention import purge

DAYS = 7
SIZE_TARGET = 0.10
PURGE_TARGET_S = 1.0
CLAIM_RUNS = 9
FUNNEL = 10  # events per customer (bench.common.FUNNEL_STEPS)


def _day_start(day: int) -> datetime:
    """Midnight UTC of simulated day ``day`` (1..7; 7 is today)."""
    today = datetime.now(UTC).date() - timedelta(days=DAYS - day)
    return datetime(today.year, today.month, today.day, tzinfo=UTC)


class Writer(threading.Thread):
    """Records funnel events at ``rate`` messages/s into simulated ``day``, in transactions
    of ``per_txn`` events, until stopped."""

    def __init__(self, dsn: str, rate: float, first_customer: int) -> None:
        super().__init__(name="week-writer", daemon=True)
        self.dsn = dsn
        self.rate = rate
        self.customer = first_customer
        self.day = 1
        self.day_seconds = 1.0
        self.day_started = time.monotonic()
        self.written = 0
        self.running = threading.Event()
        self.closed = threading.Event()
        self.error: BaseException | None = None

    def start_day(self, day: int, day_seconds: float) -> None:
        self.day, self.day_seconds = day, day_seconds
        self.day_started = time.monotonic()
        self.running.set()

    def run(self) -> None:
        per_txn = 50
        interval = per_txn * 2 / self.rate  # two messages per event
        try:
            with psycopg.connect(self.dsn) as conn:
                step = 0
                next_at = time.monotonic()
                while not self.closed.is_set():
                    if not self.running.wait(0.1):
                        next_at = time.monotonic()
                        continue
                    share = min(1.0, (time.monotonic() - self.day_started) / self.day_seconds)
                    at = _day_start(self.day) + timedelta(seconds=share * 86_399)
                    for _ in range(per_txn):
                        event = funnel_event(self.customer, step)
                        event["occurred_at"] = at.isoformat()
                        record_event(conn, event)
                        step += 1
                        if step == FUNNEL:
                            step, self.customer = 0, self.customer + 1
                    conn.commit()
                    self.written += per_txn * 2
                    next_at += interval
                    time.sleep(max(0.0, next_at - time.monotonic()))
        except BaseException as exc:  # reported by the main thread
            self.error = exc


def _unfinished(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(q.OUTBOX_COUNT_ACTIVE).fetchone()
    return int(row[0]) + int(row[1]) if row else 0


def _claim(dsn: str, day: int) -> dict[str, Any]:
    at = _day_start(day) + timedelta(hours=23, minutes=59)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            """
            INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,
                                      body, occurred_at)
            SELECT 'probe-' || %(day)s || '-' || g, 'probe-' || %(day)s || '-' || g,
                   'track', 'probe_' || (g / 2), 'page.view',
                   jsonb_build_object('type', 'track', 'userId', 'probe_' || (g / 2),
                                      'event', 'page.view',
                                      'messageId', 'probe-' || %(day)s || '-' || g),
                   %(at)s
            FROM generate_series(0, 199) g
            """,
            {"day": day, "at": at},
        )
        conn.commit()
        # The dead row versions of each day as the claims start, as the statistics last counted
        # them (flushed at most once a second): what the claim's index scans may step over.
        dead_by_day: dict[str, int] = dict(
            conn.execute(
                "SELECT relname, n_dead_tup FROM pg_stat_user_tables"
                " WHERE relname LIKE 'relay_outbox_%%'"
            ).fetchall()
        )
        times, planning, read = [], [], set()
        for _ in range(CLAIM_RUNS):
            explained = claim_explain(dsn)
            times.append(float(explained["execution_ms"]))
            planning.append(float(explained["planning_ms"]))
            read |= _partitions_read(explained["plan"]["Plan"])
        conn.execute(
            "UPDATE relay_outbox SET state = 'cancelled' WHERE message_id LIKE 'probe-%%'"
            " AND state = 'pending' AND occurred_at = %(at)s",
            {"at": at},
        )
        conn.commit()
        floor = conn.execute(q.FLOOR_READ).fetchone()
    return {
        "ms": statistics.median(times),
        "runs_ms": times,
        # The relay prepares its statements; an EXPLAIN plans afresh each time.
        "planning_ms": statistics.median(planning),
        "partitions_read": sorted(read),
        "dead_tuples_read": sum(int(dead_by_day.get(name, 0)) for name in read),
        "floor": floor[0] if floor else None,
    }


def _partitions_read(node: dict[str, Any]) -> set[str]:
    seen = set()
    name = node.get("Relation Name", "")
    # The claim's InitPlan reads relay_outbox_floor, a table of its own, not a partition.
    partition = name.startswith("relay_outbox_") and name != "relay_outbox_floor"
    if partition and node.get("Actual Loops", 0):
        seen.add(name)
    for child in node.get("Plans", []):
        seen |= _partitions_read(child)
    return seen


def _purge(dsn: str, keep_from: datetime) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    # The cutoff lands a minute after the first day kept begins: that day and later ones are
    # not wholly older than it; every earlier day is.
    older_than_s = (row[0] - keep_from).total_seconds() - 60
    # In this process: what `relay purge` and the relay's hourly retention run, without the
    # interpreter's start-up.
    t0 = time.monotonic()
    totals = purge(dsn, older_than_s)
    return {
        "seconds": time.monotonic() - t0,
        "partitions": totals["partitions"],
        "rows": totals["partition_rows"],
        "messages_row_by_row": totals["messages"],
        "attempts_row_by_row": totals["attempts"],
    }


def _sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            """
            SELECT (SELECT sum(pg_total_relation_size(relid))
                    FROM pg_partition_tree('relay_outbox')),
                   (SELECT count(*) FROM pg_partition_tree('relay_outbox') WHERE isleaf),
                   (SELECT sum(pg_total_relation_size(relid))
                    FROM pg_partition_tree('relay_attempt')),
                   (SELECT count(*) FROM relay_outbox)
            """
        ).fetchone()
    assert row is not None
    return {
        "outbox_mb": int(row[0]) / 2**20,
        "outbox_partitions": int(row[1]),
        "attempt_mb": int(row[2]) / 2**20,
        "outbox_rows": int(row[3]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    day_seconds = args.day_seconds or (12.0 if args.quick else 30.0)
    days: list[dict[str, Any]] = []
    with bench_database(args.dsn) as db:
        env = environment(db)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            for day in range(1, DAYS + 1):
                for parent in ("relay_outbox", "relay_attempt"):
                    conn.execute(
                        "SELECT relay_partition_create(%s, %s)",
                        (parent, _day_start(day).date()),
                    )
        server = FakeServer(0.0)
        log_path = RESULTS_DIR / "logs" / "week-relay.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        writer = Writer(db.dsn, args.rate, first_customer=1)
        writer.start()
        with open(log_path, "w") as log:
            relay = subprocess.Popen(
                [
                    *(sys.executable, "-m", "relay.cli", "--log-level", "WARNING"),
                    *("run", "--instance", "bench-week"),
                ],
                cwd=REPO_ROOT,
                env={
                    **os.environ,
                    "DATABASE_URL": db.dsn,
                    "CUSTOMERIO_WRITE_KEY": WRITE_KEY,
                    "CUSTOMERIO_API_URL": server.url,
                },
                stdout=log,
                stderr=log,
            )
            try:
                with psycopg.connect(db.dsn, autocommit=True) as conn:
                    for day in range(1, DAYS + 1):
                        before = writer.written
                        writer.start_day(day, day_seconds)
                        time.sleep(day_seconds)
                        writer.running.clear()
                        time.sleep(0.2)  # the writer's last transaction
                        if writer.error is not None:
                            raise RuntimeError(f"writer failed: {writer.error!r}")
                        t0 = time.monotonic()
                        while _unfinished(conn) and time.monotonic() - t0 < 300:
                            time.sleep(0.1)
                        drained_s = time.monotonic() - t0
                        relay.send_signal(signal.SIGSTOP)
                        try:
                            claim = _claim(db.dsn, day)
                        finally:
                            relay.send_signal(signal.SIGCONT)
                        keep_from = _day_start(max(1, day - args.keep_days + 1))
                        purged = _purge(db.dsn, keep_from)
                        sizes = _sizes(db.dsn)
                        days.append(
                            {
                                "day": day,
                                "written": writer.written - before,
                                "drain_after_s": drained_s,
                                "claim": claim,
                                "purge": purged,
                                **sizes,
                            }
                        )
                        print(
                            f"day {day}: {writer.written - before:,} messages, "
                            f"outbox {sizes['outbox_mb']:.1f} MB, claim {claim['ms']:.2f} ms, "
                            f"purge {purged['seconds']:.2f} s",
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                writer.closed.set()
                writer.running.set()
                relay.send_signal(signal.SIGTERM)
                relay.wait(timeout=60)
                server.stop()
    day2, day7 = days[1], days[-1]
    return {
        "benchmark": "week",
        "command": reproduce_command("bench.week"),
        "environment": env,
        "parameters": {
            "rate": args.rate,
            "day_seconds": day_seconds,
            "keep_days": args.keep_days,
            "quick": args.quick,
        },
        "days": days,
        "day7_over_day2": {
            "outbox_size": day7["outbox_mb"] / day2["outbox_mb"],
            "claim_ms": day7["claim"]["ms"] / day2["claim"]["ms"],
        },
        "purge_max_s": max(d["purge"]["seconds"] for d in days),
        "target": {"within": SIZE_TARGET, "purge_s": PURGE_TARGET_S},
    }


def render(p: dict[str, Any]) -> str:
    par = p["parameters"]
    rows = [
        (
            d["day"],
            d["written"],
            d["drain_after_s"],
            d["outbox_partitions"],
            d["outbox_mb"],
            d["attempt_mb"],
            d["claim"]["ms"],
            d["claim"]["planning_ms"],
            len(d["claim"]["partitions_read"]),
            d["claim"].get("dead_tuples_read", "-"),
            d["purge"]["seconds"],
            d["purge"]["partitions"],
            d["purge"]["rows"],
        )
        for d in p["days"]
    ]
    ratio = p["day7_over_day2"]
    out = [
        f"week: {DAYS} simulated days of {par['day_seconds']:.0f} s at {par['rate']:,.0f} "
        f"messages/s, keeping {par['keep_days']} days",
        table(
            [
                "day",
                "messages",
                "drain after (s)",
                "outbox partitions",
                "outbox MB",
                "attempt log MB",
                "claim ms",
                "claim planning ms",
                "partitions claim read",
                "dead tuples in them",
                "purge s",
                "partitions dropped",
                "rows dropped (est.)",
            ],
            rows,
        ),
        f"day 7 / day 2: outbox size {ratio['outbox_size']:.2f}, claim {ratio['claim_ms']:.2f} "
        f"(target: within {SIZE_TARGET:.0%} of 1)",
        f"slowest purge: {p['purge_max_s']:.2f} s (target: under {PURGE_TARGET_S:.0f} s)",
    ]
    return "\n".join([*out, *footer(p)])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.week", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="12 s days instead of 30 s")
    parser.add_argument("--rate", type=float, default=2000.0, help="messages/s written")
    parser.add_argument("--day-seconds", type=float, help="wall-clock seconds per day")
    parser.add_argument("--keep-days", type=int, default=2, help="days retention keeps")
    add_database_option(parser)
    args = parser.parse_args(argv)
    payload = run(args)
    write_results("week", payload)
    print(render(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
