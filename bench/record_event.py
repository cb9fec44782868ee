"""What ``record_event`` adds to an application transaction.

``python -m bench.record_event [--quick] [--dsn URL|embedded]``

Transaction shapes, committed durably (``synchronous_commit = on``, as the application
commits its business change), on a blocking psycopg connection:

    a  1 order INSERT                                  (baseline for b)
    b  1 order INSERT + record_event                   (1 event)
    c  100 order INSERTs                               (baseline for d and e)
    d  100 order INSERTs + 100 record_event calls      (one per order)
    e  100 order INSERTs + one record_events(100)

and the same for asyncio applications, with ``record_event_async`` / ``record_events_async``,
each against its own baseline on the same kind of connection: f-i on a psycopg
``AsyncConnection``, j-m on an asyncpg connection (skipped when asyncpg is not installed):

    f / j  1 order INSERT                              (baseline for g / k)
    g / k  1 order INSERT + record_event_async
    h / l  100 order INSERTs                           (baseline for i / m)
    i / m  100 order INSERTs + one record_events_async(100)

The variants run interleaved (round robin, the starting variant rotating each round) so noise
on this shared machine lands on all of them alike; figures are meant to be read as ratios
within one run. Each transaction is timed from its first statement to the end of its commit;
the events are built before the clock starts (building them is the application's business).

Added cost per event: ``(median(variant) - median(baseline)) / events``, and the same with
p99. The mapping alone (``map_event`` on the same events, no database) is measured separately
so the table shows how much of the added cost is Python and how much is SQL and commit.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg

from bench.common import (
    add_database_option,
    bench_database,
    checkpoint,
    code_changed_warning,
    code_fingerprint,
    describe_environment,
    environment,
    footer,
    median,
    order_event,
    percentile,
    reproduce_command,
    table,
    write_results,
)
from relay import (
    map_event,
    record_event,
    record_event_async,
    record_events,
    record_events_async,
)

ORDERS_TABLE = """
CREATE TABLE bench_orders (
    id bigserial PRIMARY KEY,
    customer text,
    amount int,
    created_at timestamptz DEFAULT now()
)
"""
INSERT_ORDER = "INSERT INTO bench_orders (customer, amount) VALUES (%s, %s)"
INSERT_ORDER_NUMBERED = "INSERT INTO bench_orders (customer, amount) VALUES ($1, $2)"  # asyncpg

PSYCOPG = "psycopg"
PSYCOPG_ASYNC = "psycopg async"
ASYNCPG = "asyncpg"

# Target from the issue: recording the event adds at most half again to a one-event transaction.
TARGET_RATIO = 1.5


@dataclass
class Variant:
    key: str
    label: str
    orders: int
    events: int
    mode: str  # "none", "each" (record_event per order) or "batch" (one record_events)
    baseline: str | None
    driver: str = PSYCOPG
    txn_ns: list[int] = field(default_factory=list)
    commit_ns: list[int] = field(default_factory=list)


def _variants(with_asyncpg: bool) -> dict[str, Variant]:
    variants = [
        Variant("a", "1 order", 1, 0, "none", None),
        Variant("b", "1 order + record_event", 1, 1, "each", "a"),
        Variant("c", "100 orders", 100, 0, "none", None),
        Variant("d", "100 orders + 100 x record_event", 100, 100, "each", "c"),
        Variant("e", "100 orders + record_events(100)", 100, 100, "batch", "c"),
    ]
    drivers = [(("f", "g", "h", "i"), PSYCOPG_ASYNC)]
    if with_asyncpg:
        drivers.append((("j", "k", "l", "m"), ASYNCPG))
    for (k1, k1e, k100, k100e), driver in drivers:
        variants += [
            Variant(k1, f"1 order [{driver}]", 1, 0, "none", None, driver),
            Variant(k1e, f"1 order + record_event_async [{driver}]", 1, 1, "each", k1, driver),
            Variant(k100, f"100 orders [{driver}]", 100, 0, "none", None, driver),
            Variant(
                k100e,
                f"100 orders + record_events_async(100) [{driver}]",
                100,
                100,
                "batch",
                k100,
                driver,
            ),
        ]
    return {v.key: v for v in variants}


class Runner:
    """Runs one transaction of a variant at a time on one durable connection."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.seq = 0

    def transaction(self, v: Variant) -> tuple[int, int]:
        """One transaction of ``v``; returns (whole transaction, commit alone) in ns."""
        conn = self.conn
        base = self.seq
        self.seq += v.orders
        events = [order_event(base + i, base + i) for i in range(v.events)]
        t0 = time.perf_counter_ns()
        for i in range(v.orders):
            conn.execute(INSERT_ORDER, (f"cus_{base + i:08d}", 4999))
            if v.mode == "each":
                record_event(conn, events[i])
        if v.mode == "batch":
            record_events(conn, events)
        t1 = time.perf_counter_ns()
        conn.commit()
        t2 = time.perf_counter_ns()
        return t2 - t0, t2 - t1


class PsycopgAsyncRunner:
    """``Runner`` on a psycopg ``AsyncConnection``."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.conn = conn
        self.seq = 0

    async def transaction(self, v: Variant) -> tuple[int, int]:
        conn = self.conn
        base = self.seq
        self.seq += v.orders
        events = [order_event(20_000_000 + base + i, base + i) for i in range(v.events)]
        t0 = time.perf_counter_ns()
        for i in range(v.orders):
            await conn.execute(INSERT_ORDER, (f"cus_{base + i:08d}", 4999))
            if v.mode == "each":
                await record_event_async(conn, events[i])
        if v.mode == "batch":
            await record_events_async(conn, events)
        t1 = time.perf_counter_ns()
        await conn.commit()
        t2 = time.perf_counter_ns()
        return t2 - t0, t2 - t1


class AsyncpgRunner:
    """``Runner`` on an asyncpg connection; asyncpg opens the transaction explicitly."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.seq = 0

    async def transaction(self, v: Variant) -> tuple[int, int]:
        conn = self.conn
        base = self.seq
        self.seq += v.orders
        events = [order_event(30_000_000 + base + i, base + i) for i in range(v.events)]
        t0 = time.perf_counter_ns()
        tr = conn.transaction()
        await tr.start()
        for i in range(v.orders):
            await conn.execute(INSERT_ORDER_NUMBERED, f"cus_{base + i:08d}", 4999)
            if v.mode == "each":
                await record_event_async(conn, events[i])
        if v.mode == "batch":
            await record_events_async(conn, events)
        t1 = time.perf_counter_ns()
        await tr.commit()
        t2 = time.perf_counter_ns()
        return t2 - t0, t2 - t1


async def _measure(dsn: str, variants: dict[str, Variant], n1: int, n100: int) -> int:
    """Run every variant, interleaved, on one connection per driver; returns outbox rows."""
    with psycopg.connect(dsn) as conn:
        # Durable, as the application's own transaction is: the commit waits for the WAL
        # flush, which on this machine is most of a small transaction's cost.
        conn.execute("SET synchronous_commit = on")
        conn.execute(ORDERS_TABLE)
        conn.commit()
        runner = Runner(conn)
        async_conn = await psycopg.AsyncConnection.connect(dsn)
        await async_conn.execute("SET synchronous_commit = on")
        await async_conn.commit()
        pg: Any = None
        if any(v.driver == ASYNCPG for v in variants.values()):
            asyncpg = importlib.import_module("asyncpg")  # the bench extra; optional here
            pg = await asyncpg.connect(dsn)
            await pg.execute("SET synchronous_commit = on")
        runners: dict[str, Any] = {
            PSYCOPG_ASYNC: PsycopgAsyncRunner(async_conn),
            ASYNCPG: AsyncpgRunner(pg),
        }

        async def one(v: Variant) -> tuple[int, int]:
            # The blocking variants run inside the event loop too, so that every variant
            # shares one schedule; nothing else runs on the loop meanwhile.
            if v.driver == PSYCOPG:
                return runner.transaction(v)
            result: tuple[int, int] = await runners[v.driver].transaction(v)
            return result

        try:
            for v in variants.values():  # warm-up, not timed: prepared statements, caches
                for _ in range(20 if v.orders == 1 else 2):
                    await one(v)
            checkpoint(dsn)
            plan = _schedule(variants, n1, n100)
            started = time.monotonic()
            for done, (key, count) in enumerate(plan, 1):
                v = variants[key]
                for _ in range(count):
                    total, commit = await one(v)
                    v.txn_ns.append(total)
                    v.commit_ns.append(commit)
                if done % 50 == 0 or done == len(plan):
                    print(
                        f"  {done}/{len(plan)} blocks, {time.monotonic() - started:.0f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            await async_conn.close()
            if pg is not None:
                await pg.close()
        outbox_rows = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    return int(outbox_rows[0]) if outbox_rows else 0


def _schedule(variants: dict[str, Variant], n1: int, n100: int) -> list[tuple[str, int]]:
    """Round-robin blocks: each round runs every variant once, starting one further along.

    A round gives the 1-order variants ``ceil(n1 / n100)`` transactions and the 100-order ones
    one each, so a block of either kind lasts roughly as long and the rounds are short enough
    that a burst of noise on the machine touches every variant.
    """
    rounds = max(1, n100)
    per_round_1 = -(-n1 // rounds)
    keys = list(variants)
    left = {k: (n1 if variants[k].orders == 1 else n100) for k in keys}
    plan: list[tuple[str, int]] = []
    for r in range(rounds):
        for k in keys[r % len(keys) :] + keys[: r % len(keys)]:
            take = min(left[k], per_round_1 if variants[k].orders == 1 else 1)
            if take:
                plan.append((k, take))
                left[k] -= take
    for k, n in left.items():  # rounding leftovers, if any
        if n:
            plan.append((k, n))
    return plan


def _mapping_cost(n: int) -> list[int]:
    """ns per ``map_event`` call on the same kind of event the transactions record."""
    events = [order_event(i, 10_000_000 + i) for i in range(n)]
    for e in events[:50]:
        map_event(e)  # warm-up: first calls pay for imports and caches
    out = []
    for e in events:
        t0 = time.perf_counter_ns()
        map_event(e)
        out.append(time.perf_counter_ns() - t0)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.record_event", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer transactions (~15 s)")
    parser.add_argument("--n1", type=int, help="transactions of the 1-order variants (2000)")
    parser.add_argument("--n100", type=int, help="transactions of the 100-order variants (200)")
    add_database_option(parser)
    args = parser.parse_args(argv)
    n1 = args.n1 or (300 if args.quick else 2000)
    n100 = args.n100 or (30 if args.quick else 200)
    command = reproduce_command("bench.record_event")

    with_asyncpg = importlib.util.find_spec("asyncpg") is not None
    if not with_asyncpg:
        print("asyncpg is not installed: variants j-m skipped", file=sys.stderr)

    with bench_database(args.dsn) as db:
        env = environment(db)
        variants = _variants(with_asyncpg)
        outbox_rows = asyncio.run(_measure(db.dsn, variants, n1, n100))
        mapping_ns = _mapping_cost(max(n1, 2000))

    results = _summarise(variants, mapping_ns)
    payload = {
        "benchmark": "record_event",
        "command": command,
        "environment": env,
        "parameters": {"n1": n1, "n100": n100, "quick": args.quick},
        "target_ratio_b_over_a": TARGET_RATIO,
        "variants": results["variants"],
        "mapping": results["mapping"],
        "outbox_rows_written": outbox_rows,
        "relay_code_changed": code_changed_warning(env, code_fingerprint()),
    }
    path = write_results("record_event", payload)
    print(render(payload))
    print(f"\nresults: {path}")
    return 0


def _summarise(variants: dict[str, Variant], mapping_ns: list[int]) -> dict[str, Any]:
    ms = 1e-6
    stats: dict[str, dict[str, Any]] = {}
    for v in variants.values():
        total_s = sum(v.txn_ns) / 1e9
        stats[v.key] = {
            "label": v.label,
            "orders": v.orders,
            "events": v.events,
            "transactions": len(v.txn_ns),
            "txn_per_s": len(v.txn_ns) / total_s if total_s else 0.0,
            "median_ms": median(v.txn_ns) * ms,
            "p99_ms": percentile(v.txn_ns, 99) * ms,
            "commit_median_ms": median(v.commit_ns) * ms,
            "commit_p99_ms": percentile(v.commit_ns, 99) * ms,
        }
    for v in variants.values():
        s = stats[v.key]
        if v.baseline is None:
            s.update(baseline=None, added_median_ms=None, added_p99_ms=None, ratio=None)
            continue
        b = stats[v.baseline]
        s["baseline"] = v.baseline
        s["added_median_ms"] = (s["median_ms"] - b["median_ms"]) / v.events
        s["added_p99_ms"] = (s["p99_ms"] - b["p99_ms"]) / v.events
        s["ratio"] = s["median_ms"] / b["median_ms"]
        s["ratio_p99"] = s["p99_ms"] / b["p99_ms"]
    mapping = {
        "calls": len(mapping_ns),
        "median_ms": median(mapping_ns) * ms,
        "p99_ms": percentile(mapping_ns, 99) * ms,
    }
    return {"variants": stats, "mapping": mapping}


def render(payload: dict[str, Any]) -> str:
    v = payload["variants"]
    m = payload["mapping"]
    rows = []
    for key, s in v.items():
        rows.append(
            [
                key,
                s["label"],
                s["transactions"],
                s["txn_per_s"],
                s["median_ms"],
                s["p99_ms"],
                s["commit_median_ms"],
                s["added_median_ms"],
                s["added_p99_ms"],
                None if s["ratio"] is None else f"{s['ratio']:.2f} vs {s['baseline']}",
            ]
        )
    rows.append(
        [
            "map",
            "map_event alone (no DB), per event",
            m["calls"],
            None,
            m["median_ms"],
            m["p99_ms"],
            None,
            m["median_ms"],
            m["p99_ms"],
            None,
        ]
    )
    out = [
        "record_event: cost added to a durable application transaction",
        describe_environment(payload["environment"]),
        "",
        table(
            [
                "",
                "variant",
                "txns",
                "txn/s",
                "median ms",
                "p99 ms",
                "commit median ms",
                "added/event median ms",
                "added/event p99 ms",
                "ratio (median)",
            ],
            rows,
        ),
        "",
    ]
    b, d, e = v["b"], v["d"], v["e"]
    target = payload["target_ratio_b_over_a"]
    verdict = "met" if b["ratio"] <= target else "NOT met"
    out.append(
        f"b/a = {b['ratio']:.2f} (p99 {b['ratio_p99']:.2f}); target <= {target}: {verdict} "
        "in this run."
    )

    def share(s: dict[str, Any]) -> str:
        added = s["added_median_ms"]
        return f"{100 * m['median_ms'] / added:.0f}%" if added and added > 0 else "n/a"

    out.append(
        f"Mapping's share of the added median cost per event: b {share(b)}, d {share(d)}, "
        f"e {share(e)}; the rest is the INSERT round trip, index and WAL work, and the "
        "larger commit."
    )
    out.append(
        f"Per event, record_events(100) costs {e['added_median_ms']:.3f} ms against "
        f"{d['added_median_ms']:.3f} ms for 100 record_event calls."
    )
    for one, many, driver in (("g", "i", PSYCOPG_ASYNC), ("k", "m", ASYNCPG)):
        if one in v:
            g, i = v[one], v[many]
            out.append(
                f"{driver}: record_event_async adds {g['added_median_ms']:.3f} ms (median; "
                f"p99 {g['added_p99_ms']:.3f}) to a one-order transaction, ratio "
                f"{g['ratio']:.2f} vs {g['baseline']} (blocking psycopg, b: "
                f"{b['added_median_ms']:.3f} ms); record_events_async(100) "
                f"{i['added_median_ms']:.3f} ms per event (e: {e['added_median_ms']:.3f} ms)."
            )
    a = v["a"]
    # The ratio hinges on what the baseline's commit costs, which is the disk's fsync: show
    # what the same added time would mean on a disk whose fsync is slower than this run's.
    for fsync_ms in (4.0, 36.0):
        extra = max(0.0, fsync_ms - a["commit_median_ms"])
        projected = (b["median_ms"] + extra) / (a["median_ms"] + extra)
        out.append(
            f"If each commit waited {fsync_ms:g} ms for fsync (this run's baseline commit: "
            f"{a['commit_median_ms']:.2f} ms), the same added time would give b/a ~ "
            f"{projected:.2f}."
        )
    out += footer(payload)
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
