"""One relay process of ``bench.drain`` (started by it; not meant to be run by hand).

The process imports everything the relay needs, prints ``ready``, and waits for ``go`` on
stdin, so that interpreter start-up and imports are not timed and several relays start
draining at the same instant. Then it drains and prints one JSON line: wall-clock start and
end (``time.time()``, comparable across processes and with PostgreSQL's ``now()`` on the same
machine), the relay's totals, and its own peak RSS (VmHWM) and CPU time (``getrusage``).

Modes:

- ``api``: ``Relay(settings, dsn)`` and ``relay.service.drain(relay, timeout)``, the library
  path a test or an embedding application uses. The settings are read from the environment
  as ``relay run`` reads them (``RELAY_CLAIMS_IN_FLIGHT``, ``RELAY_CONCURRENCY``, ...), with
  the fake server's URL and key and this relay's instance name.
- ``cli``: ``relay run --drain --instance NAME``, through ``relay.cli.main`` with
  ``DATABASE_URL``, ``CUSTOMERIO_WRITE_KEY`` and ``CUSTOMERIO_API_URL`` in the environment,
  exactly what an operator runs; its totals are read from the summary line it prints.

``--cprofile FILE`` runs the drain under cProfile and dumps the stats to FILE.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import resource
import sys
import time
from typing import Any

_SUMMARY = re.compile(
    r"drain (?:complete|TIMED OUT): (\d+) delivered, (\d+) dead, (\d+) coalesced, (\d+) requests"
)


def _status_kb(field: str) -> int:
    """A kB figure from /proc/self/status: VmRSS (now) or VmHWM (peak)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _drain_api(args: argparse.Namespace) -> dict[str, Any]:
    from relay.daemon import Relay
    from relay.service import drain
    from relay.settings import from_env

    env = {k: v for k, v in os.environ.items() if k.startswith("RELAY_")}
    env.update(
        CUSTOMERIO_WRITE_KEY=args.write_key,
        CUSTOMERIO_API_URL=args.url,
        RELAY_INSTANCE=args.instance,
    )
    settings = from_env(env)
    relay = Relay(settings, args.dsn)
    ok, totals = drain(relay, args.timeout)
    return {"ok": ok, **{name: getattr(totals, name) for name in totals.__dataclass_fields__}}


def _drain_cli(args: argparse.Namespace) -> dict[str, Any]:
    import relay.cli

    os.environ.update(
        DATABASE_URL=args.dsn, CUSTOMERIO_WRITE_KEY=args.write_key, CUSTOMERIO_API_URL=args.url
    )
    argv = ["--log-level", "WARNING", "run", "--drain", "--instance", args.instance]
    if args.timeout is not None:
        argv += ["--timeout", str(args.timeout)]
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        code = relay.cli.main(argv)
    sys.stderr.write(captured.getvalue())
    found = _SUMMARY.search(captured.getvalue())
    totals: dict[str, Any] = {"ok": code == 0, "exit_code": code}
    if found:
        delivered, dead, coalesced, requests = (int(g) for g in found.groups())
        totals.update(delivered=delivered, dead=dead, coalesced=coalesced, requests=requests)
    return totals


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain_worker")
    parser.add_argument("--mode", choices=("api", "cli"), required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--url", required=True, help="the fake Customer.io's base URL")
    parser.add_argument("--write-key", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--timeout", type=float)
    parser.add_argument("--cprofile", help="write cProfile stats of the drain to this file")
    args = parser.parse_args()

    # Imported now so that neither import time nor lazy imports inside the relay are timed.
    import relay.cli
    import relay.daemon
    import relay.service  # noqa: F401

    rss_ready = _status_kb("VmRSS")
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    run = _drain_api if args.mode == "api" else _drain_cli
    profiler = None
    if args.cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.time()
    totals = run(args)
    end = time.time()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(args.cprofile)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {
        "instance": args.instance,
        "mode": args.mode,
        "pid": os.getpid(),
        "start": start,
        "end": end,
        "totals": totals,
        "rss_ready_kb": rss_ready,
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss across execve, so a child started by a
        # big parent reports the parent's peak. VmHWM belongs to this address space only; it
        # covers the process's whole life, imports included, which is what a deployment has
        # to provision.
        "peak_rss_kb": _status_kb("VmHWM"),
        "cpu_user_s": usage.ru_utime,
        "cpu_system_s": usage.ru_stime,
    }
    print(json.dumps(report), flush=True)
    return 0 if totals.get("ok") else 4


if __name__ == "__main__":
    sys.exit(main())
