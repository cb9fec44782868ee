"""``python -m bench.summary``: every figure of the benchmarks against its target, one table.

Reads what the other benchmarks wrote (``bench/results/{record_event,drain,latency,bigtable,
peers}.json``), prints one Markdown table (figure, value, target, met) and writes
``bench/results/summary.json``. ``python -m bench`` runs it last, so one invocation ends with
the whole picture. A figure whose benchmark has not run (or ran at another commit than the
others, or at another size) is marked so rather than left out.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from bench.common import RESULTS_DIR, describe_environment, table, write_results

SOURCES = ("record_event", "drain", "latency", "bigtable", "peers")


@dataclass
class Figure:
    number: str  # the figure number, or "peers"
    name: str
    value: str
    target: str = ""
    met: bool | None = None  # None: no target for this figure
    source: str = ""


def _load() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in SOURCES:
        path = RESULTS_DIR / f"{name}.json"
        if path.exists():
            out[name] = json.loads(path.read_text())
    return out


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _write_cost(r: dict[str, Any]) -> list[Figure]:
    v = r["variants"]
    b, d, e = v["b"], v["d"], v["e"]
    target = r["target_ratio_b_over_a"]
    return [
        Figure(
            "1",
            "record_event in a one-order transaction: median txn ratio with / without",
            f"{b['ratio']:.2f}x ({v['a']['median_ms']:.2f} -> {b['median_ms']:.2f} ms; "
            f"{_n(v['a']['txn_per_s'])} -> {_n(b['txn_per_s'])} txn/s)",
            f"<= {target:g}x",
            b["ratio"] <= target,
        ),
        Figure(
            "1",
            "added per event, 1 per transaction: median / p99",
            f"{b['added_median_ms']:.2f} / {b['added_p99_ms']:.2f} ms",
        ),
        Figure(
            "1",
            "added per event, 100 per transaction: record_event x100 / record_events(100)",
            f"{d['added_median_ms']:.2f} / {e['added_median_ms']:.2f} ms "
            f"({_n(v['c']['txn_per_s'], 1)} -> {_n(d['txn_per_s'], 1)} / "
            f"{_n(e['txn_per_s'], 1)} txn/s)",
        ),
    ]


def _drain(r: dict[str, Any]) -> list[Figure]:
    by_key = {x["key"]: x for x in r["variants"]}
    single = by_key["api-0"]
    out = [
        Figure(
            "2",
            "drain, one relay, server answering at once",
            f"{_n(single['messages_per_s'])} messages/s ({r['backlog']['rows']:,} rows)",
            ">= 10,000/s",
            single["messages_per_s"] >= 10_000,
        )
    ]
    for x in r["variants"]:
        if x["mode"] == "api" and x["latency_ms"] != 0:
            out.append(
                Figure(
                    "2",
                    f"drain, one relay, {x['latency_ms']:g} ms per request",
                    f"{_n(x['messages_per_s'])} messages/s",
                )
            )
    out.append(
        Figure(
            "3",
            "HTTP requests per 1,000 funnel events",
            f"{single['requests_per_1000_events']:.1f}",
            "<= 12",
            single["requests_per_1000_events"] <= 12,
        )
    )
    for x in r["variants"]:
        if x["mode"] == "cli":
            out.append(
                Figure(
                    "5",
                    f"scale: {x['relays']} relay process{'es' if x['relays'] > 1 else ''}, "
                    f"{x['latency_ms']:g} ms",
                    f"{_n(x['messages_per_s'])} messages/s "
                    f"(x{x['vs_single_relay_0ms']:.2f} of one relay at 0 ms)",
                )
            )
    if "sql" in by_key:
        fraction = single["fraction_of_sql_ceiling"]
        out.append(
            Figure(
                "7",
                "one relay / the same work in SQL alone",
                f"{100 * fraction:.0f}% (ceiling {_n(by_key['sql']['messages_per_s'])}/s)",
                ">= 50%",
                fraction >= 0.5,
            )
        )
    pg = single.get("postgres_cpu_ms_per_1000_rows")
    if pg:
        out.append(
            Figure(
                "scale",
                "CPU per 1,000 rows drained: relay / PostgreSQL",
                f"{single['relay_cpu_ms_per_1000_rows']:.0f} / {pg:.0f} ms",
            )
        )
    return out


def _latency(r: dict[str, Any]) -> list[Figure]:
    lat, t, p = r["latency_ms"], r["target"], r["parameters"]
    return [
        Figure(
            "4",
            f"commit-to-received p50, {p['rate']:g} events/s for {p['seconds']:g} s",
            f"{lat['p50']:.1f} ms",
            f"<= {t['p50_ms']:g} ms",
            lat["p50"] <= t["p50_ms"],
        ),
        Figure(
            "4",
            "commit-to-received p99",
            f"{lat['p99']:.1f} ms (max {lat['max']:.0f})",
            f"<= {t['p99_ms']:g} ms",
            lat["p99"] <= t["p99_ms"],
        ),
    ]


def _bigtable(r: dict[str, Any]) -> list[Figure]:
    d, par = r["drain"], r["parameters"]
    start, end = d["rate_first_10pct"], d["rate_last_10pct"]
    ratio = end / start if start else float("nan")
    explains = d["explains"]
    last = explains[max(explains, key=lambda k: float(k.rstrip("%")))] if explains else None
    before, purged = r["before"], r["after_vacuum"]
    return [
        Figure(
            "6",
            f"big table ({par['pending_rows']:,} pending on {par['delivered']:,} delivered): "
            "rate at the end / at the start",
            f"{100 * ratio:.0f}% ({_n(start)} -> {_n(end)} messages/s)",
            f">= {100 * r['target']['end_over_start']:.0f}%",
            ratio >= r["target"]["end_over_start"],
        ),
        Figure(
            "6",
            "claim query before the drain / near its end",
            f"{r['claim_before']['execution_ms']:.1f} / "
            + (f"{last['execution_ms']:.1f} ms" if last else "n/a"),
        ),
        Figure(
            "6",
            "relay_outbox total size before / after purge and VACUUM; dead tuples after",
            f"{_n(before['total_mb'])} / {_n(purged['total_mb'])} MB; {purged['dead_tuples']:,}",
        ),
    ]


def _peak_rss(results: dict[str, dict[str, Any]]) -> list[Figure]:
    seen: list[tuple[float, str]] = []
    if "bigtable" in results:
        seen.append((results["bigtable"]["drain"]["peak_rss_mb"], "bigtable"))
    if "drain" in results:
        for x in results["drain"]["variants"]:
            if x.get("peak_rss_mb_per_relay"):
                seen.append((x["peak_rss_mb_per_relay"], "drain"))
    if "latency" in results:
        seen.append((results["latency"]["relay_peak_rss_mb"], "latency"))
    if not seen:
        return []
    worst, where = max(seen)
    return [
        Figure(
            "6",
            "peak relay RSS, any benchmark",
            f"{worst:.0f} MB ({where})",
            "<= 150 MB",
            worst <= 150,
            source=where,
        )
    ]


def _peers(r: dict[str, Any]) -> list[Figure]:
    out = []
    for x in r["throughput"]:
        if x["key"] == "relay":
            continue
        boxed = ", boxed" if x["boxed"] else ""
        out.append(
            Figure(
                "peers",
                f"relay / {x['system']}, {x['latency_ms']:g} ms",
                f"{x['relay_over_peer']:,.1f}x (peer {_n(x['messages_per_s'], 1)}/s{boxed}; "
                f"{_n(x['requests_per_1000_events'])} req/1k events)",
                f">= {x['target']:g}x",
                x["met"],
            )
        )
    outbox = [x for x in r["loss"] if x["system"] == "outbox + relay"]
    others = [x for x in r["loss"] if x["system"] != "outbox + relay"]
    out.append(
        Figure(
            "peers",
            "messages lost: outbox + relay (kill, outage) / official SDK (kill, outage)",
            f"{sum(x['lost'] for x in outbox)} of {sum(x['messages'] for x in outbox)} / "
            f"{sum(x['lost'] for x in others)} of {sum(x['messages'] for x in others)}",
            "outbox: 0",
            all(x["lost"] == 0 for x in outbox),
        )
    )
    return out


BUILDERS: dict[str, Callable[[dict[str, Any]], list[Figure]]] = {
    "record_event": _write_cost,
    "drain": _drain,
    "latency": _latency,
    "bigtable": _bigtable,
    "peers": _peers,
}


def summarise(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    figures: list[Figure] = []
    for name in SOURCES:
        if name not in results:
            figures.append(Figure("", f"bench.{name}", "not run", met=None, source=name))
            continue
        for f in BUILDERS[name](results[name]):
            f.source = f.source or name
            figures.append(f)
    figures.extend(_peak_rss(results))
    commits = {r["environment"]["git_commit"] for r in results.values()}
    relay_code = {r["environment"]["relay_code"] for r in results.values()}
    quick = {name: bool(r["parameters"].get("quick")) for name, r in results.items()}
    missed = [f for f in figures if f.met is False]
    return {
        "benchmark": "summary",
        "sources": {
            name: {
                "date": r["environment"]["date"],
                "commit": r["environment"]["git_commit"],
                "command": r["command"],
                "quick": quick[name],
            }
            for name, r in results.items()
        },
        "one_commit": len(commits) <= 1 and len(relay_code) <= 1,
        "figures": [asdict(f) for f in figures],
        "targets_met": sum(1 for f in figures if f.met),
        "targets_missed": [f.name for f in missed],
    }


def render(summary: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    out = ["summary: the benchmarks' figures against the targets"]
    if results:
        first = results[next(iter(results))]
        out.append(describe_environment(first["environment"]))
    out.append("")
    out.append(
        table(
            ["#", "figure", "value", "target", "", "from"],
            [
                [
                    f["number"],
                    f["name"],
                    f["value"],
                    f["target"],
                    "" if f["met"] is None else ("met" if f["met"] else "NOT met"),
                    f["source"],
                ]
                for f in summary["figures"]
            ],
        )
    )
    out.append("")
    out.append(
        f"Targets met: {summary['targets_met']}; missed: {len(summary['targets_missed'])}"
        + (f" ({'; '.join(summary['targets_missed'])})" if summary["targets_missed"] else "")
    )
    if not summary["one_commit"]:
        out.append(
            "WARNING: these results come from more than one commit or relay source; "
            "rerun `python -m bench` for figures of one version."
        )
    for name, s in summary["sources"].items():
        out.append(f"  {name}: {s['date']} at {s['commit']}: {s['command']}")
    return "\n".join(out)


def main() -> int:
    results = _load()
    summary = summarise(results)
    path = write_results("summary", summary)
    print(render(summary, results))
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
