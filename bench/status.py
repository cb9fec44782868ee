"""`relay status` on a big outbox: the default snapshot (exact backlog, estimated history)
next to ``--exact`` (the relay_status view, which reads every row).

``python -m bench.status [--quick] [--delivered N] [--customers N] [--repeat N] [--dsn URL]``

1. **Fill** as ``bench.bigtable`` does (its ``fill``): ``--delivered`` rows delivered 59-30 days
   ago (2,000,000; 200,000 with ``--quick``) with production-size bodies, one attempt row per
   100 of them, a pending backlog of ``--customers`` (1,000; 200) x 20 rows, then ``VACUUM
   ANALYZE``. One backlog row in ten is then moved to retrying, held, in flight or dead, so
   every counted state has rows.
2. **Time** ``relay.operator_cli.status_snapshot`` on one connection, as ``relay status`` runs
   it, without and with ``exact=True``: the first call of each (the pages it reads may not be
   cached yet), then the median and the fastest of ``--repeat`` (5) more.
3. **Plans**: the scan nodes on relay_outbox of each status statement (``EXPLAIN``, not run),
   and the estimates next to the exact counts.

Nothing asserts a timing. This script runs no git command (unlike the other benchmarks'
headers, its header names no commit): it is meant to be run from any working tree.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.bigtable import fill
from bench.common import (
    SHARED_MACHINE_NOTE,
    add_database_option,
    bench_database,
    code_changed_warning,
    code_fingerprint,
    reproduce_command,
    table,
    write_results,
)
from relay import queries as q
from relay.models.schema import PARTITION_NAME
from relay.operator_cli import STATES, backlog_limits, status_snapshot

# One backlog row in ten leaves pending for another counted state, by id.
_SPREAD_BACKLOG = """
UPDATE relay_outbox
SET state = (ARRAY['retrying', 'held', 'in_flight', 'dead'])[1 + (id / 10) % 4],
    lease_owner = CASE WHEN (id / 10) % 4 = 2 THEN 'bench-status' END,
    lease_expires_at = CASE WHEN (id / 10) % 4 = 2 THEN now() + interval '1 hour' END,
    last_error = CASE WHEN (id / 10) % 4 IN (1, 3) THEN 'bench' END
WHERE state = 'pending' AND id % 10 = 0
"""

Snapshot = Callable[[], dict[str, Any]]


def _timed(snapshot: Snapshot, repeat: int) -> dict[str, Any]:
    times = []
    result: dict[str, Any] = {}
    for _ in range(1 + repeat):
        t0 = time.perf_counter()
        result = snapshot()
        times.append((time.perf_counter() - t0) * 1000)
    return {
        "first_ms": times[0],
        "median_ms": statistics.median(times[1:]) if repeat else times[0],
        "fastest_ms": min(times[1:]) if repeat else times[0],
        "all_ms": times,
        "snapshot": result,
    }


def _outbox_scans(conn: psycopg.Connection[Any], statement: str) -> list[str]:
    """The plan's scan nodes on relay_outbox's partitions, as ``Node Type (index) xN``: each
    partition's index named as the table's index it belongs to, scans of the same kind
    counted together."""
    params = None
    with conn.transaction():
        if statement is q.OUTBOX_STATUS_BACKLOG:  # as status_snapshot runs it
            conn.execute(q.STATUS_INDEX_SCANS_ONLY)
            params = backlog_limits()
        row = conn.execute("EXPLAIN (FORMAT JSON) " + statement, params).fetchone()
    assert row is not None
    found: Counter[str] = Counter()
    pending = [row[0][0]["Plan"]]
    while pending:
        node = pending.pop()
        pending.extend(node.get("Plans", ()))
        index, relation = node.get("Index Name"), node.get("Relation Name") or ""
        # A bitmap scan names the table on the heap node and the index on its child.
        if index and str(index).startswith("relay_outbox"):
            root = conn.execute("SELECT pg_partition_root(%s::regclass)::text", (index,))
            found[f"{node['Node Type']} ({root.fetchone()[0]})"] += 1  # type: ignore[index]
        elif not index and (relation == "relay_outbox" or PARTITION_NAME.fullmatch(relation)):
            found[node["Node Type"]] += 1
    return [f"{name} x{n}" for name, n in sorted(found.items())]


def run(args: argparse.Namespace) -> dict[str, Any]:
    delivered = args.delivered or (200_000 if args.quick else 2_000_000)
    customers = args.customers or (200 if args.quick else 1_000)
    with bench_database(args.dsn) as db:
        print(
            f"filling: {delivered:,} delivered + {customers * 20:,} backlog rows",
            file=sys.stderr,
            flush=True,
        )
        filled = fill(db.dsn, delivered, customers)
        with psycopg.connect(db.dsn, autocommit=True) as conn:
            conn.execute(_SPREAD_BACKLOG)
            size = conn.execute(
                "SELECT sum(pg_relation_size(relid)), sum(pg_indexes_size(relid))"
                " FROM pg_partition_tree('relay_outbox') WHERE isleaf"
            ).fetchone()
            assert size is not None
            print("timing ...", file=sys.stderr, flush=True)
            estimated = _timed(lambda: status_snapshot(conn), args.repeat)
            exact = _timed(lambda: status_snapshot(conn, exact=True), args.repeat)
            plans = {
                name: _outbox_scans(conn, getattr(q, name))
                for name in (
                    "OUTBOX_STATUS_BACKLOG",
                    "OUTBOX_STATUS_ESTIMATE",
                    "STATUS_BY_DESTINATION",
                )
            }
        server = {"postgres": db.version, "server": db.server, "settings": db.settings}
    return {
        "benchmark": "status",
        "command": reproduce_command("bench.status"),
        "environment": {
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "load_avg_at_start": list(os.getloadavg()),
            "python": platform.python_version(),
            **server,
            "relay_code": code_fingerprint(),
        },
        "parameters": {"delivered": delivered, "customers": customers, "repeat": args.repeat},
        "fill": filled,
        "table_mb": size[0] / 2**20,
        "indexes_mb": size[1] / 2**20,
        "estimated": estimated,
        "exact": exact,
        "plans": plans,
    }


def render(p: dict[str, Any]) -> str:
    env, par = p["environment"], p["parameters"]
    est, exact = p["estimated"]["snapshot"], p["exact"]["snapshot"]
    load = ", ".join(f"{x:.2f}" for x in env["load_avg_at_start"])
    out = [
        "status: relay status (exact backlog, estimated history) next to relay status --exact",
        f"{env['date']}  host {env['host']}  {env['cpus']} CPUs  load {load}  "
        f"Python {env['python']}  PostgreSQL {env['postgres']} ({env['server']}, "
        f"shared_buffers={env['settings'].get('shared_buffers')})  "
        f"relay source {env['relay_code']}",
        "",
        f"Outbox: {par['delivered']:,} rows delivered 59-30 days ago + {par['customers'] * 20:,} "
        f"backlog rows (one in ten retrying, held, in flight or dead); relay_outbox "
        f"{p['table_mb']:,.0f} MB, its indexes {p['indexes_mb']:,.0f} MB; filled in "
        f"{p['fill']['fill_s']:.0f} s, VACUUM ANALYZE {p['fill']['vacuum_analyze_s']:.0f} s.",
        "",
        table(
            ["status_snapshot", "first call ms", f"median of {par['repeat']} ms", "fastest ms"],
            [
                [label, t["first_ms"], t["median_ms"], t["fastest_ms"]]
                for label, t in (
                    ("relay status (default)", p["estimated"]),
                    ("relay status --exact", p["exact"]),
                )
            ],
        ),
        "",
        table(
            ["count", "relay status", "relay status --exact"],
            [
                [
                    state,
                    ("~" if state in est["estimated"] else "")
                    + ("?" if est[state] is None else f"{est[state]:,}"),
                    f"{exact[state]:,}",
                ]
                for state in (*STATES, "total")
            ],
        ),
        "",
        table(
            ["statement", "scans of relay_outbox (EXPLAIN)"],
            [[name, ", ".join(scans) or "none"] for name, scans in p["plans"].items()],
        ),
        "",
        SHARED_MACHINE_NOTE,
    ]
    if p.get("relay_code_changed"):
        out.append(p["relay_code_changed"])
    out.append(f"\nreproduce: {p['command']}")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.status",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="200,000 delivered, 4,000 backlog")
    parser.add_argument("--delivered", type=int, help="old delivered rows (2,000,000)")
    parser.add_argument("--customers", type=int, help="backlog customers, 20 rows each (1,000)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls after the first (5)")
    add_database_option(parser)
    args = parser.parse_args(argv)
    payload = run(args)
    payload["relay_code_changed"] = code_changed_warning(payload["environment"], code_fingerprint())
    path = write_results("status", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
