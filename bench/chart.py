"""One PNG of the latest benchmark results: ``python -m bench.chart [--out PATH]``.

Reads whatever of ``bench/results/{drain,peers,latency,latency-vacuum,bigtable}.json`` exists
and draws ``bench/results/chart.png``:

- left: throughput (messages per second) of every system and variant, as horizontal bars on
  a logarithmic axis (the peers differ from the relay by orders of magnitude), one colour per
  benchmark, so bars of different runs are not read as one experiment;
- right: commit-to-received latency of ``bench.latency`` (p50, p90, p99, max), as run and,
  when there is one, with ``--vacuum-every``, against the targets (p50 <= 25 ms, p99 <= 150
  ms), on a logarithmic axis.

Needs matplotlib (``pip install matplotlib``; not a dependency of the relay itself).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR

COLOURS = {"drain": "#1f77b4", "peers": "#ff7f0e", "bigtable": "#2ca02c"}


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    if not path.exists():
        return None
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def _date(payload: dict[str, Any]) -> str:
    return str(payload.get("environment", {}).get("date", "?"))[:16].replace("T", " ")


def latencies(results: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The latency runs found: the plain one, and the one with VACUUM during the load."""
    out = []
    if "latency" in results:
        out.append(("as configured", results["latency"]))
    if "latency-vacuum" in results:
        every = results["latency-vacuum"]["parameters"].get("vacuum_every_s")
        out.append((f"VACUUM every {every:g} s", results["latency-vacuum"]))
    return out


def throughput_bars(results: dict[str, dict[str, Any]]) -> list[tuple[str, float, str]]:
    """(label, messages/s, benchmark) for every system and variant found."""
    bars: list[tuple[str, float, str]] = []
    drain = results.get("drain")
    if drain:
        rows = drain["backlog"]["rows"]
        for v in drain["variants"]:
            bars.append((f"drain: {v['label']} ({rows:,} rows)", v["messages_per_s"], "drain"))
    peers = results.get("peers")
    if peers:
        for t in peers["throughput"]:
            label = f"peers: {t['system']}, {t['latency_ms']:g} ms"
            bars.append((label, t["messages_per_s"], "peers"))
    big = results.get("bigtable")
    if big:
        d = big["drain"]
        size = f"{big['parameters']['pending_rows']:,} on {big['parameters']['delivered']:,}"
        for label, key in (("first 10%", "rate_first_10pct"), ("last 10%", "rate_last_10pct")):
            bars.append((f"bigtable: relay run --drain, {label} ({size})", d[key], "bigtable"))
    return bars


def draw(results: dict[str, dict[str, Any]], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    bars = throughput_bars(results)
    fig, (left, right) = plt.subplots(
        1,
        2,
        figsize=(15, max(5.0, 0.38 * len(bars) + 2.0)),
        gridspec_kw={"width_ratios": [2.3, 1]},
    )
    if bars:
        labels = [b[0] for b in bars][::-1]  # first bar at the top
        values = [b[1] for b in bars][::-1]
        colours = [COLOURS[b[2]] for b in bars][::-1]
        ys = range(len(bars))
        left.barh(ys, values, color=colours)
        left.set_yticks(list(ys), labels, fontsize=8)
        left.set_xscale("log")
        left.set_xlabel("messages per second (log scale)")
        for y, v in zip(ys, values, strict=True):
            left.text(v, y, f" {v:,.0f}", va="center", fontsize=7)
        left.set_xlim(right=max(values) * 4)
        runs = ", ".join(
            f"{n} {_date(p)}" for n, p in results.items() if not n.startswith("latency")
        )
        left.set_title(f"Throughput, colour = benchmark run\n({runs} UTC)", fontsize=9)
        left.grid(axis="x", which="both", alpha=0.3)
    else:
        left.text(0.5, 0.5, "no throughput results", ha="center", transform=left.transAxes)
    runs = latencies(results)
    if runs:
        names = ["p50", "p90", "p99", "max"]
        width = 0.8 / len(runs)
        shades = ["#d62728", "#2ca02c", "#9467bd"]
        for k, (label, lat_run) in enumerate(runs):
            vals = [lat_run["latency_ms"][n] for n in names]
            xs = [x + (k - (len(runs) - 1) / 2) * width for x in range(len(names))]
            right.bar(xs, vals, width=width, color=shades[k % len(shades)], label=label)
            for x, v in zip(xs, vals, strict=True):
                right.text(
                    x,
                    v,
                    f"{v:,.0f}" if v >= 10 else f"{v:.1f}",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
        right.set_xticks(range(len(names)), names)
        right.set_yscale("log")
        top = max(r["latency_ms"]["max"] for _, r in runs)
        right.set_ylim(1, top * 8)
        t = runs[0][1]["target"]
        right.axhline(
            t["p50_ms"], color="black", ls=":", lw=1, label=f"p50 target {t['p50_ms']:g} ms"
        )
        right.axhline(
            t["p99_ms"], color="black", ls="--", lw=1, label=f"p99 target {t['p99_ms']:g} ms"
        )
        right.legend(fontsize=7, loc="upper left")
        par = runs[0][1]["parameters"]
        right.set_ylabel("commit to received, ms (log scale)")
        right.set_title(
            f"Latency, {par['rate']:g} events/s offered for {par['seconds']:g} s\n"
            f"idle relay woken by NOTIFY (poll {par['poll_interval_s']:g} s)\n"
            f"{_date(runs[0][1])} UTC",
            fontsize=9,
        )
        right.grid(axis="y", which="both", alpha=0.3)
    else:
        right.text(0.5, 0.5, "no latency results", ha="center", transform=right.transAxes)
    fig.suptitle("AppFunnel -> Customer.io relay benchmarks (one shared 2-CPU machine)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "chart.png")
    args = parser.parse_args(argv)
    results = {
        name: data
        for name in ("drain", "peers", "latency", "latency-vacuum", "bigtable")
        if (data := _load(name)) is not None
    }
    if not results:
        print("no results in bench/results/: run the benchmarks first", file=sys.stderr)
        return 1
    path = draw(results, args.out)
    print(f"chart: {path} (from {', '.join(results)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
