"""``python -m bench [--quick]``: every benchmark in one invocation, then the chart.

Runs, in order, each against the same PostgreSQL (the machine's at 127.0.0.1:5432 when it
answers, else an embedded one) and the same local strict-mode Customer.io stand-in:
``bench.record_event``, ``bench.drain``, ``bench.latency``, ``bench.bigtable``,
``bench.peers`` (needs the ``bench`` extra), then ``bench.chart`` and ``bench.summary`` (every
figure against its target in one table, ``bench/results/summary.json``). Each prints its own
table and the command that reproduces it, and writes ``bench/results/<name>.json``; this
runner stops at the first that fails and says which.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

STEPS = ("record_event", "drain", "latency", "bigtable", "peers")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the small sizes of every step")
    parser.add_argument("--skip", action="append", default=[], choices=STEPS)
    parser.add_argument("--dsn", help="passed to every step (URL or 'embedded')")
    args = parser.parse_args(argv)
    timings: list[tuple[str, float]] = []
    for step in STEPS:
        if step in args.skip:
            continue
        cmd = [sys.executable, "-m", f"bench.{step}"]
        if args.quick:
            cmd.append("--quick")
        if args.dsn:
            cmd += ["--dsn", args.dsn]
        print(f"\n=== {' '.join(cmd[1:])}", flush=True)
        started = time.monotonic()
        code = subprocess.call(cmd)
        timings.append((step, time.monotonic() - started))
        if code != 0:
            print(f"bench.{step} failed with exit status {code}", file=sys.stderr)
            return code
    code = subprocess.call([sys.executable, "-m", "bench.chart"])
    print("\n=== -m bench.summary", flush=True)
    code = subprocess.call([sys.executable, "-m", "bench.summary"]) or code
    print("\n" + "\n".join(f"{name:<14} {seconds:7.1f} s" for name, seconds in timings))
    print("reproduce: python -m bench" + (" --quick" if args.quick else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
