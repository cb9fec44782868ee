"""The claim against the number of days the outbox keeps: per claim, and over a drain.

``python -m bench.claimdays [--days 0,30,60] [--claims 400] [--customers 3000]
[--no-drain] [--dsn URL|embedded]``

For each ``--days`` N, a fresh database with N day partitions behind today (as a deployment
keeping N days of history has; they are left empty here, since what is measured is what the
claim pays for a day it does not read), the three days ahead and the DEFAULT partition, the
floor at the start of today:

1. **claim**: a backlog of 100 customers x 2 rows today; ``OUTBOX_CLAIM_HEADS`` (customers=100)
   run ``--claims`` times on one connection as the relay runs it (psycopg prepares it on its
   fifth run; the floor passed as the relay passes it), each rolled back; median and p99 of
   the client's time, the first 50 left out;
2. **drain** (unless ``--no-drain``): ``--customers`` customers' funnels (20 rows each) drained
   by one ``relay run --drain`` against the strict-mode stand-in answering at once, twice;
   messages/s from the first row's finish to the last's.

Every N runs in the same invocation: compare rows with each other, as ratios to 0 days.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from bench.common import (
    add_database_option,
    bench_database,
    code_changed_warning,
    code_fingerprint,
    environment,
    footer,
    reproduce_command,
    table,
    write_results,
)
from relay import queries as q

SKIPPED = 50  # the first claims: before the statement is prepared, and caches warming


def _make_days(dsn: str, days: int) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        today = datetime.now(UTC).date()
        for d in range(1, days + 1):
            for parent in ("relay_outbox", "relay_attempt"):
                conn.execute(
                    "SELECT relay_partition_create(%s, %s)", (parent, today - timedelta(days=d))
                )
        row = conn.execute(
            "SELECT count(*) FROM pg_partition_tree('relay_outbox') WHERE isleaf"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _floor_at_today(dsn: str) -> None:
    # What the relay's partition job raises it to once nothing older is unfinished (it never
    # passes the start of yesterday; today is set here so both runs prune alike).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("UPDATE relay_outbox_floor SET unfinished_from = date_trunc('day', now())")


def time_claims(dsn: str, claims: int) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            """
            INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,
                                      body, occurred_at)
            SELECT 'probe-' || g, 'probe-' || g, 'track', 'probe_' || (g / 2), 'page.view',
                   jsonb_build_object('type', 'track', 'userId', 'probe_' || (g / 2),
                                      'event', 'page.view', 'messageId', 'probe-' || g),
                   now()
            FROM generate_series(0, 199) g
            """
        )
        conn.execute("VACUUM (ANALYZE) relay_outbox")
    _floor_at_today(dsn)
    times = []
    with psycopg.connect(dsn) as conn:
        conn.execute(q.SESSION_NO_JIT)
        row = conn.execute(q.FLOOR_NOW, {"floor": "-infinity"}).fetchone()
        assert row is not None
        floor = str(row[0])
        conn.commit()
        for _ in range(claims):
            t0 = time.perf_counter()
            got = conn.execute(q.OUTBOX_CLAIM_HEADS, {"customers": 100, "floor": floor}).fetchall()
            times.append((time.perf_counter() - t0) * 1000)
            conn.rollback()
            assert len(got) == 100, f"the claim took {len(got)} customers, not 100"
    kept = sorted(times[SKIPPED:])
    return {
        "median_ms": statistics.median(kept),
        "p99_ms": kept[min(len(kept) - 1, int(0.99 * len(kept)))],
    }


def time_drains(dsn: str, customers: int, rounds: int) -> list[float]:
    from bench.drain import FakeServer, build_backlog, load_backlog, run_relays

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE relay_outbox, relay_attempt")
    build_backlog(dsn, customers, 100)
    rates = []
    server = FakeServer(0.0)
    try:
        for r in range(rounds):
            rows = load_backlog(dsn)
            _floor_at_today(dsn)
            run_relays("cli", 1, dsn, server.url, 600.0, f"claimdays-{r}")
            with psycopg.connect(dsn) as conn:
                span = conn.execute(
                    "SELECT extract(epoch FROM max(updated_at) - min(updated_at))::float8"
                    " FROM relay_outbox WHERE state IN ('delivered', 'coalesced')"
                ).fetchone()
            assert span is not None and span[0]
            rates.append(rows / float(span[0]))
    finally:
        server.stop()
    return rates


def run(args: argparse.Namespace) -> dict[str, Any]:
    results = []
    env: dict[str, Any] = {}
    for days in args.days:
        with bench_database(args.dsn) as db:
            env = env or environment(db)
            partitions = _make_days(db.dsn, days)
            claim = time_claims(db.dsn, args.claims)
            rates = [] if args.no_drain else time_drains(db.dsn, args.customers, 2)
        results.append(
            {"days_back": days, "partitions": partitions, "claim": claim, "drain_rates": rates}
        )
        print(
            f"{days} days back ({partitions} partitions): claim {claim['median_ms']:.2f} ms"
            + (f", drain {statistics.median(rates):,.0f}/s" if rates else ""),
            file=sys.stderr,
            flush=True,
        )
    return {
        "benchmark": "claimdays",
        "command": reproduce_command("bench.claimdays"),
        "environment": env,
        "parameters": {"days": args.days, "claims": args.claims, "customers": args.customers},
        "results": results,
    }


def render(p: dict[str, Any]) -> str:
    base = p["results"][0]
    rows = []
    for r in p["results"]:
        rate = statistics.median(r["drain_rates"]) if r["drain_rates"] else None
        base_rate = statistics.median(base["drain_rates"]) if base["drain_rates"] else None
        rows.append(
            (
                r["days_back"],
                r["partitions"],
                r["claim"]["median_ms"],
                r["claim"]["p99_ms"],
                f"{r['claim']['median_ms'] / base['claim']['median_ms']:.2f}",
                rate if rate is not None else "-",
                f"{rate / base_rate:.2f}" if rate and base_rate else "-",
            )
        )
    par = p["parameters"]
    head = (
        f"claimdays: the claim (prepared, 100 customers) and a drain of {par['customers']:,} "
        f"customers, against the days behind today"
    )
    return "\n".join(
        [
            head,
            table(
                [
                    "days behind today",
                    "outbox partitions",
                    "claim median ms",
                    "claim p99 ms",
                    "claim / first row",
                    "drain messages/s",
                    "drain / first row",
                ],
                rows,
            ),
            *footer(p),
        ]
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.claimdays",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--days", type=_ints, default=[0, 30, 60], help="days behind (0,30,60)")
    parser.add_argument("--claims", type=int, default=400, help="timed claims per size (400)")
    parser.add_argument("--customers", type=int, default=3000, help="drain customers (3000)")
    parser.add_argument("--no-drain", action="store_true", help="time the claim only")
    add_database_option(parser)
    args = parser.parse_args(argv)
    payload = run(args)
    payload["relay_code_changed"] = code_changed_warning(payload["environment"], code_fingerprint())
    path = write_results("claimdays", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
