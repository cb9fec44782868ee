"""The relay on a big outbox: a backlog on top of millions of old delivered rows, then purge.

``python -m bench.bigtable [--quick] [--delivered N] [--customers N] [--dsn URL|embedded]``

1. **Fill** (SQL, ``generate_series``, ``synchronous_commit = off``): ``--delivered`` rows
   (5,000,000; 500,000 with ``--quick``) delivered, spread over the 30 days from 59 to 30 days ago,
   each day in its own partition (``relay_partition_create``, as the migration makes the days of a
   table's history), with one attempt row per 100 of them in the same days, then a pending backlog
   of ``--customers`` customers (50,000; 5,000) x 10 funnel events = 20 rows each (identify + track
   per event): 1,000,000 rows (100,000). Bodies are the relay's own mapping of
   ``bench.common.funnel_event`` (one template per funnel step, with each row's customer and
   messageId written in), so rows have production size. The pending rows are interleaved as 100
   concurrent funnels write them. Then ``VACUUM ANALYZE``, as a table autovacuum keeps up with, and
   the claim's floor raised as a running relay raises it (``relay_outbox_floor_advance``), so the
   claim skips the 30 old days.
2. **Before**: table and index sizes, live and dead tuples, and the claim query
   (``EXPLAIN ANALYZE`` of ``OUTBOX_CLAIM_HEADS``, customers=100, rolled back).
3. **Drain**: one ``relay run --drain`` (default settings, RELAY_CONCURRENCY included) against a
   ``python -m relay.testing.fakecio`` process. The server's accepted count is sampled every 0.2 s;
   the rate over the first and the last 10% of the messages it receives is compared (target:
   end >= 80% of start). The claim query is timed again at 50% and 90% of the drain, from a
   side session (its locks are held for the statement only, then rolled back). The relay's
   peak RSS is its ``VmHWM``, read from /proc while it runs.
4. **Purge**: ``relay purge --older-than 30d`` (timed; it drops the 30 old days whole), sizes
   and dead tuples after, then a plain ``VACUUM`` (timed) and the sizes again.

The full size takes ~10 minutes on a 2-core machine; ``--quick`` about one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx
import psycopg

from bench.common import (
    FUNNEL_STEPS,
    REPO_ROOT,
    RESULTS_DIR,
    WRITE_KEY,
    add_database_option,
    bench_database,
    checkpoint,
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
from bench.drain import FakeServer
from relay import queries as q
from relay.mapping import map_event
from relay.operator_cli import status_snapshot

TARGET_END_OVER_START = 0.9
CUSTOMERS_PER_TXN = 100  # as bench.drain writes its backlog

# --------------------------------------------------------------------------- fill


def _templates() -> list[dict[str, Any]]:
    """The mapped messages of customer 0's funnel (identify, track per step), in write order."""
    out = []
    for step in range(len(FUNNEL_STEPS)):
        for m in map_event(funnel_event(0, step)):
            out.append(
                {
                    "n": len(out) + 1,  # 1-based position, which the fill SQL joins on
                    "step": step,
                    "kind": m.kind,
                    "event_type": m.event_type,
                    "project_id": m.project_id,
                    "body": m.body,
                }
            )
    return out


# The templates' userId / traits.email are replaced per row; everything else (profile,
# funnel data, subscription) stays the template's, which is what sets the row's size.
_FILL_DELIVERED = """
INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, project_id, event_type,
                          body, occurred_at, created_at, state, attempts, next_attempt_at,
                          delivered_at, updated_at)
SELECT 'old-' || g, 'evt-old-' || (g / 2), t.kind, 'old_' || (g / 20), t.project_id,
       t.event_type,
       t.body || jsonb_build_object('userId', 'old_' || (g / 20), 'messageId', 'old-' || g),
       d.at, d.at, 'delivered', 1, d.at, d.at, d.at
FROM generate_series(%(first)s, %(last)s) AS g
CROSS JOIN LATERAL (
    SELECT date_trunc('day', now() - interval '59 days', 'UTC')
           + (g * 30 / %(delivered)s) * interval '1 day' + interval '12 hours' AS at
) AS d
JOIN jsonb_to_recordset(%(templates)s::jsonb)
     AS t(n int, step int, kind text, event_type text, project_id text, body jsonb)
  ON t.n = 1 + g %% 20
ORDER BY g
"""

_FILL_ATTEMPTS = """
INSERT INTO relay_attempt (relay_instance, destination, started_at, latency_ms, status_code,
                           outcome, response_snippet, request_bytes, message_count, message_ids)
SELECT 'bench-old', 'default',
       date_trunc('day', now() - interval '59 days', 'UTC')
           + (b * 30 / %(batches)s) * interval '1 day' + interval '12 hours',
       5, 200, 'delivered', '{}',
       60000, 100, ARRAY(SELECT generate_series(b * 100 + 1, b * 100 + 100)::bigint)
FROM generate_series(0, %(batches)s - 1) AS b
"""

# Row r of the backlog: groups of 100 customers, each group's events step by step (identify
# then track), as concurrent funnels commit them.
_FILL_PENDING = """
INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, project_id, event_type,
                          body, occurred_at)
SELECT 'new-' || c || '-' || s || '-' || t.kind, 'evt-new-' || c || '-' || s, t.kind,
       'cus_' || lpad(c::text, 8, '0'), t.project_id, t.event_type,
       CASE WHEN t.kind = 'identify'
            THEN jsonb_set(t.body, '{traits,email}', to_jsonb('customer' || c || '@example.com'))
            ELSE t.body END
         || jsonb_build_object('userId', 'cus_' || lpad(c::text, 8, '0'),
                               'messageId', 'new-' || c || '-' || s || '-' || t.kind),
       now() - interval '1 hour' + s * interval '1 minute'
FROM generate_series(0, %(rows)s - 1) AS r
CROSS JOIN LATERAL (
    SELECT (r / 2000) * 100 + (r %% 200) / 2 AS c, (r %% 2000) / 200 AS s,
           1 + ((r %% 2000) / 200) * 2 + r %% 2 AS n
) AS x
JOIN jsonb_to_recordset(%(templates)s::jsonb)
     AS t(n int, step int, kind text, event_type text, project_id text, body jsonb)
  ON t.n = x.n
ORDER BY r
"""


def fill(dsn: str, delivered: int, customers: int) -> dict[str, Any]:
    templates = json.dumps(_templates())
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute(
            "SELECT relay_partition_create(t, d::date)"
            " FROM unnest(ARRAY['relay_outbox', 'relay_attempt']) AS t,"
            " generate_series((now() AT TIME ZONE 'UTC')::date - 59,"
            "                 (now() AT TIME ZONE 'UTC')::date - 30, interval '1 day') AS d"
        )
        # In chunks: one statement of millions of rows would hold one huge transaction.
        step = 500_000
        for first in range(0, delivered, step):
            conn.execute(
                _FILL_DELIVERED,
                {
                    "first": first,
                    "last": min(first + step, delivered) - 1,
                    "delivered": delivered,
                    "templates": templates,
                },
            )
        conn.execute(_FILL_ATTEMPTS, {"batches": delivered // 100})
        conn.execute(_FILL_PENDING, {"rows": customers * 20, "templates": templates})
        fill_s = time.monotonic() - t0
        t1 = time.monotonic()
        conn.execute("VACUUM (ANALYZE) relay_outbox")
        conn.execute("VACUUM (ANALYZE) relay_attempt")
        vacuum_s = time.monotonic() - t1
        floor = [conn.execute(q.FLOOR_ADVANCE).fetchone() for _ in range(3)]
    checkpoint(dsn)
    return {
        "fill_s": fill_s,
        "vacuum_analyze_s": vacuum_s,
        "floor_steps": [row[0] if row else None for row in floor],
    }


# --------------------------------------------------------------------------- measurements


def sizes(dsn: str) -> dict[str, Any]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The cumulative statistics are flushed by backends at most once a second.
        time.sleep(1.2)
        conn.execute("SELECT pg_stat_clear_snapshot()")
        # Summed over the partitions (a partitioned table has no storage of its own).
        row = conn.execute(
            """
            WITH outbox AS (SELECT relid FROM pg_partition_tree('relay_outbox') WHERE isleaf),
                 attempt AS (SELECT relid FROM pg_partition_tree('relay_attempt') WHERE isleaf)
            SELECT sum(pg_relation_size(s.relid)), sum(pg_indexes_size(s.relid)),
                   sum(pg_total_relation_size(s.relid)), sum(s.n_live_tup), sum(s.n_dead_tup),
                   sum(s.autovacuum_count), sum(s.vacuum_count),
                   (SELECT count(*) FROM relay_outbox),
                   (SELECT sum(pg_total_relation_size(relid)) FROM attempt),
                   (SELECT count(*) FROM relay_attempt),
                   count(*)
            FROM pg_stat_user_tables s WHERE s.relid IN (SELECT relid FROM outbox)
            """
        ).fetchone()
        # Each index of the parent, summed over its partitions' indexes.
        idx = conn.execute(
            """
            SELECT p.relname, sum(pg_relation_size(t.relid))
            FROM pg_class p, pg_partition_tree(p.oid) t
            WHERE p.relkind = 'I' AND p.relname LIKE 'relay_outbox%%' AND t.isleaf
            GROUP BY 1 ORDER BY 1
            """
        ).fetchall()
    assert row is not None
    # sum() of bigint sizes is numeric, which psycopg returns as Decimal: floats for the JSON.
    return {
        "table_mb": float(row[0]) / 2**20,
        "indexes_mb": float(row[1]) / 2**20,
        "total_mb": float(row[2]) / 2**20,
        "live_tuples": int(row[3]),
        "dead_tuples": int(row[4]),
        "autovacuum_count": int(row[5]),
        "vacuum_count": int(row[6]),
        "rows": int(row[7]),
        "attempt_total_mb": float(row[8]) / 2**20,
        "attempt_rows": int(row[9]),
        "partitions": int(row[10]),
        "index_mb": {name: float(size) / 2**20 for name, size in idx},
    }


def current_floor(conn: psycopg.Connection[Any]) -> str:
    """The claim's floor now, as the relay passes it to the claim (``queries.FLOOR_NOW``)."""
    row = conn.execute(q.FLOOR_NOW, {"floor": "-infinity"}).fetchone()
    assert row is not None
    return str(row[0])


def claim_explain(dsn: str) -> dict[str, Any]:
    """EXPLAIN ANALYZE of the relay's claim, as the relay runs it, then rolled back."""
    with psycopg.connect(dsn) as conn:
        conn.execute("SET synchronous_commit = off")
        rows = conn.execute(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + q.OUTBOX_CLAIM_HEADS,
            {"customers": 100, "floor": current_floor(conn)},
        ).fetchone()
        conn.rollback()
    assert rows is not None
    plan = rows[0][0]
    return {
        "execution_ms": plan["Execution Time"],
        "planning_ms": plan["Planning Time"],
        "rows": plan["Plan"].get("Actual Rows"),
        "shared_hit": plan["Plan"].get("Shared Hit Blocks"),
        "shared_read": plan["Plan"].get("Shared Read Blocks"),
        "plan": plan,
    }


def status_timing(dsn: str, runs: int = 5) -> dict[str, Any]:
    """``relay status`` as the command computes it (``relay.operator_cli.status_snapshot``: the
    backlog counted up to its read limit, the rest estimated from statistics) on one
    connection: median and max of ``runs`` runs, in ms, and the last snapshot's figures."""
    times = []
    with psycopg.connect(dsn) as conn:
        conn.execute(q.SESSION_NO_JIT)
        for _ in range(runs):
            t0 = time.perf_counter()
            snap = status_snapshot(conn)
            times.append((time.perf_counter() - t0) * 1000)
            conn.rollback()
    times.sort()
    figures = {k: snap[k] for k in ("pending", "dead", "total", "estimated", "lower_bounds")}
    return {"median_ms": times[len(times) // 2], "max_ms": times[-1], "runs_ms": times, **figures}


def _vm_hwm_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


# --------------------------------------------------------------------------- the drain


def drain(dsn: str, timeout_s: float) -> dict[str, Any]:
    server = FakeServer(0.0)
    log_path = RESULTS_DIR / "logs" / "bigtable-relay.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    samples: list[tuple[float, int]] = []
    explains: dict[str, Any] = {}
    peak_kb = 0
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FILTER (WHERE kind = 'track') FROM relay_outbox "
            "WHERE state = 'pending'"
        ).fetchone()
    tracks = int(row[0]) if row else 0
    env = {
        **os.environ,
        "DATABASE_URL": dsn,
        "CUSTOMERIO_WRITE_KEY": WRITE_KEY,
        "CUSTOMERIO_API_URL": server.url,
    }
    try:
        with open(log_path, "w") as log:
            t0 = time.monotonic()
            relay = subprocess.Popen(
                [
                    *(sys.executable, "-m", "relay.cli", "--log-level", "WARNING"),
                    *("run", "--drain", "--instance", "bench-bigtable"),
                    *("--timeout", str(timeout_s)),
                ],
                cwd=REPO_ROOT,
                env=env,
                stdout=log,
                stderr=log,
            )
            with httpx.Client(timeout=30) as http:
                while relay.poll() is None:
                    accepted = int(http.get(server.url + "/_fake/stats").json()["accepted"])
                    now = time.monotonic() - t0
                    samples.append((now, accepted))
                    peak_kb = max(peak_kb, _vm_hwm_kb(relay.pid))
                    # Tracks are a little under half the messages received (the rest are
                    # identifies carrying merged traits): progress by tracks is close enough
                    # to say when the claim is timed.
                    share = accepted / (tracks * 1.1) if tracks else 1.0
                    for mark in ("50%", "90%"):
                        if mark not in explains and share >= float(mark[:-1]) / 100:
                            explains[mark] = claim_explain(dsn) | {"at_s": now, "share": share}
                    time.sleep(0.2)
                end = time.monotonic() - t0
                stats = http.get(server.url + "/_fake/stats").json()
            samples.append((end, int(stats["accepted"])))
    finally:
        server.stop()
    with psycopg.connect(dsn, autocommit=True) as conn:
        states = dict(
            conn.execute(
                "SELECT state, count(*) FROM relay_outbox WHERE message_id LIKE 'new-%%' "
                "GROUP BY state"
            ).fetchall()
        )
        last = conn.execute(
            "SELECT extract(epoch FROM max(updated_at) - min(updated_at)) FROM relay_outbox "
            "WHERE message_id LIKE 'new-%%'"
        ).fetchone()
    total = samples[-1][1]
    return {
        "exit_code": relay.returncode,
        "seconds": end,
        "db_span_s": float(last[0]) if last and last[0] is not None else None,
        "accepted": total,
        "requests": int(stats["requests"]),
        "states": states,
        "samples": samples,
        "rate_first_10pct": _segment_rate(samples, 0.0, 0.1 * total),
        "rate_last_10pct": _segment_rate(samples, 0.9 * total, total),
        "rate_overall": _segment_rate(samples, 0.0, total),
        "peak_rss_mb": peak_kb / 1024,
        "explains": explains,
        "server_cpu_s": server.cpu_s,
        "log": str(log_path),
    }


def _crossing(samples: list[tuple[float, int]], level: float) -> float:
    """When the accepted count reached ``level``, interpolated between samples."""
    for (t_a, n_a), (t_b, n_b) in itertools.pairwise(samples):
        if n_b >= level > n_a or (level == 0 and n_b > 0):
            if level == 0:
                return t_a  # the last sample before the first message arrived
            return t_a + (t_b - t_a) * (level - n_a) / (n_b - n_a)
    return samples[-1][0]


def _segment_rate(samples: list[tuple[float, int]], low: float, high: float) -> float:
    t_low, t_high = _crossing(samples, low), _crossing(samples, high)
    return (high - low) / (t_high - t_low) if t_high > t_low else float("nan")


# --------------------------------------------------------------------------- purge


def purge(dsn: str) -> dict[str, Any]:
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "relay.cli", "purge", "--older-than", "30d"],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": dsn},
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "seconds": time.monotonic() - t0,
        "exit_code": done.returncode,
        "output": (done.stdout + done.stderr).strip().splitlines()[-4:],
    }


def vacuum(dsn: str) -> float:
    t0 = time.monotonic()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM relay_outbox")
        conn.execute("VACUUM relay_attempt")
    return time.monotonic() - t0


# --------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict[str, Any]:
    delivered = args.delivered or (500_000 if args.quick else 5_000_000)
    customers = args.customers or (5_000 if args.quick else 50_000)
    phases: dict[str, Any] = {}
    with bench_database(args.dsn) as db:
        env = environment(db)
        with psycopg.connect(db.dsn) as conn:
            # Decides whether dead tuples go away by themselves during the drain.
            row = conn.execute("SHOW autovacuum").fetchone()
            phases["autovacuum"] = str(row[0]) if row else "?"
        print(
            f"filling: {delivered:,} delivered + {customers * 20:,} pending rows",
            file=sys.stderr,
            flush=True,
        )
        phases["fill"] = fill(db.dsn, delivered, customers)
        phases["before"] = sizes(db.dsn)
        phases["claim_before"] = claim_explain(db.dsn)
        phases["status_before"] = status_timing(db.dsn)
        print("draining ...", file=sys.stderr, flush=True)
        phases["drain"] = drain(db.dsn, args.timeout)
        phases["after_drain"] = sizes(db.dsn)
        phases["status_after"] = status_timing(db.dsn)
        print("purging ...", file=sys.stderr, flush=True)
        phases["purge"] = purge(db.dsn)
        phases["after_purge"] = sizes(db.dsn)
        print("vacuuming ...", file=sys.stderr, flush=True)
        phases["vacuum_s"] = vacuum(db.dsn)
        phases["after_vacuum"] = sizes(db.dsn)
    return {
        "benchmark": "bigtable",
        "command": reproduce_command("bench.bigtable"),
        "environment": env,
        "parameters": {
            "delivered": delivered,
            "customers": customers,
            "pending_rows": customers * 20,
            "quick": args.quick,
        },
        **phases,
        "target": {"end_over_start": TARGET_END_OVER_START},
    }


def render(p: dict[str, Any]) -> str:
    par, d = p["parameters"], p["drain"]
    out = [
        "bigtable: a backlog on top of old delivered rows; drain, purge, vacuum",
        describe_environment(p["environment"]),
        "",
        f"Outbox: {par['delivered']:,} rows delivered over the 30 days from 59 to 30 days ago"
        " (a partition each) + a backlog of "
        f"{par['customers']:,} customers x 10 events = {par['pending_rows']:,} pending rows "
        f"(filled in {p['fill']['fill_s']:.0f} s, "
        f"VACUUM ANALYZE {p['fill']['vacuum_analyze_s']:.0f} s).",
    ]
    if "autovacuum" in p:
        out.append(
            f"Server setting autovacuum = {p['autovacuum']}"
            + (": dead tuples stay until the explicit VACUUM." if p["autovacuum"] == "off" else ".")
        )
    out += [
        "",
    ]
    stages = [
        ("before the drain", p["before"]),
        ("after the drain", p["after_drain"]),
        (f"after relay purge --older-than 30d ({p['purge']['seconds']:.1f} s)", p["after_purge"]),
        (f"after VACUUM ({p['vacuum_s']:.1f} s)", p["after_vacuum"]),
    ]
    out.append(
        table(
            [
                "relay_outbox",
                "rows",
                "table MB",
                "indexes MB",
                "total MB",
                "dead tuples",
                "autovacuums",
                "relay_attempt rows",
            ],
            [
                [
                    name,
                    s["rows"],
                    s["table_mb"],
                    s["indexes_mb"],
                    s["total_mb"],
                    s["dead_tuples"],
                    s["autovacuum_count"],
                    s["attempt_rows"],
                ]
                for name, s in stages
            ],
        )
    )
    start, end = d["rate_first_10pct"], d["rate_last_10pct"]
    ratio = end / start if start else float("nan")
    out += [
        "",
        table(
            ["drain (relay run --drain, defaults)", "value"],
            [
                ["messages received by the server", d["accepted"]],
                ["requests", d["requests"]],
                ["seconds (process start to exit)", d["seconds"]],
                ["messages/s overall", d["rate_overall"]],
                ["messages/s, first 10% of messages", start],
                ["messages/s, last 10% of messages", end],
                ["end / start", f"{100 * ratio:.0f}%"],
                ["relay peak RSS MB (VmHWM)", d["peak_rss_mb"]],
                ["exit code", d["exit_code"]],
                ["backlog rows by state after", json.dumps(d["states"])],
            ],
        ),
        "",
        table(
            ["claim query (OUTBOX_CLAIM_HEADS, 100)", "execution ms", "rows", "buffers hit/read"],
            [
                [
                    f"{label}",
                    e["execution_ms"],
                    e["rows"],
                    f"{e['shared_hit']}/{e['shared_read']}",
                ]
                for label, e in [("before the drain", p["claim_before"])]
                + [(f"at ~{k} of the drain", v) for k, v in d["explains"].items()]
            ],
        ),
        "",
        f"Drain rate at the end / at the start: {100 * ratio:.0f}% (target >= "
        f"{100 * p['target']['end_over_start']:.0f}%): "
        + ("met." if ratio >= p["target"]["end_over_start"] else "NOT met."),
    ]
    sb, sa = p["status_before"], p["status_after"]
    out.append(
        f"relay status (status_snapshot, median of {len(sb['runs_ms'])}): "
        f"{sb['median_ms']:.1f} ms with the backlog (pending {sb['pending']:,}"
        + (", estimated" if "pending" in sb["estimated"] else ", counted")
        + f"), {sa['median_ms']:.1f} ms after the drain (target < 100 ms)"
    )
    pu = p["purge"]
    out.append(f"relay purge exit {pu['exit_code']}: {' / '.join(pu['output'])}")
    out += footer(p, shared_machine_note=False)
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.bigtable",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="100k backlog on 500k delivered")
    parser.add_argument("--delivered", type=int, help="old delivered rows (5,000,000)")
    parser.add_argument("--customers", type=int, help="backlog customers, 20 rows each (50,000)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="drain timeout, s")
    add_database_option(parser)
    args = parser.parse_args(argv)
    payload = run(args)
    payload["relay_code_changed"] = code_changed_warning(payload["environment"], code_fingerprint())
    path = write_results("bigtable", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 0 if payload["drain"]["exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
