"""One peer process of ``bench.peers`` (started by it; not meant to be run by hand).

Like ``bench.drain_worker``, the process imports everything first, prints ``ready`` and waits
for ``go`` on stdin, so interpreter start-up is not timed. Then it runs one mode and prints one
JSON line with its figures.

Modes:

- ``sdk``: the application calling Customer.io's official SDK (``customerio-cdp-analytics``)
  inline, an ``identify`` and a ``track`` per AppFunnel event, with the bodies that
  ``relay.mapping.map_event`` produces; with ``--sync-mode``, ``Client(sync_mode=True)``, which
  POSTs each message before the call returns. After each event it prints ``sent K`` (K events handed
  to the SDK so far), so the parent can SIGKILL it mid-stream and know what the application
  believed it had sent. Then ``flush()``, which returns once the SDK's queue is empty, whether
  the batches were delivered or given up on.
- ``procrastinate``: a procrastinate worker whose task POSTs one message per job.
- ``pgqueuer``: a pgqueuer ``QueueManager`` whose entrypoint POSTs one message per job.

Both job-queue tasks send each message on its own to ``/v1/<type>`` with ``X-Strict-Mode: 1``
and raise on anything but 200, so a job is only finished when Customer.io took its message.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import datetime
from typing import Any

PROCRASTINATE_TASK = "deliver_message"
PGQUEUER_ENTRYPOINT = "deliver_message"


def sdk_calls(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The SDK method and keyword arguments that send ``body`` (a mapped Customer.io item)."""
    # The SDK insists on a datetime and re-serialises it itself; everything else is passed as
    # the relay would send it, so both put the same data on the wire.
    common: dict[str, Any] = {
        "user_id": body["userId"],
        "timestamp": datetime.fromisoformat(body["timestamp"].replace("Z", "+00:00")),
        "message_id": body["messageId"],
        "context": dict(body.get("context") or {}),
    }
    if body["type"] == "identify":
        return "identify", {**common, "traits": body.get("traits") or {}}
    return "track", {**common, "event": body["event"], "properties": body.get("properties") or {}}


def _run_sdk(args: argparse.Namespace) -> dict[str, Any]:
    from customerio.analytics import Client

    from bench.common import FUNNEL_STEPS, funnel_event
    from relay.mapping import map_event

    # Built before the clock starts: the relay's side writes pre-mapped events too.
    events = [
        [sdk_calls(dict(m.body)) for m in map_event(funnel_event(n, step))]
        for first in range(0, args.customers, 100)
        for step in range(len(FUNNEL_STEPS))
        for n in range(first, min(first + 100, args.customers))
    ]
    failed_items = 0

    def on_error(exc: Exception, batch: list[Any]) -> None:
        # The only signal the SDK gives when it drops a batch after its last retry.
        nonlocal failed_items
        failed_items += len(batch)

    client = Client(
        args.write_key,
        host=args.url,
        max_retries=args.max_retries,
        on_error=on_error,
        # Large enough for the whole run: a full queue makes identify()/track() return False
        # and drop the message, which would be a different loss from the one measured here.
        max_queue_size=max(10_000, 4 * len(events)),
        timeout=args.http_timeout,
        # sync_mode: every identify()/track() POSTs its message before returning (one request
        # per call, no retries: the call raises when the API fails), so the application knows
        # it was delivered. The default queues it for a background thread that batches.
        sync_mode=args.sync_mode,
    )
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(1)
    start = time.time()
    enqueued = refused = raised = 0
    for k, calls in enumerate(events, 1):
        for method, kwargs in calls:
            try:
                ok, _msg = getattr(client, method)(**kwargs)
            except Exception:  # sync_mode: the POST failed and the call says so
                raised += 1
                continue
            if ok:
                enqueued += 1
            else:
                refused += 1
        if args.report_each:
            print(f"sent {k}", flush=True)
    loop_end = time.time()
    client.flush()
    end = time.time()
    return {
        "events": len(events),
        "messages_enqueued": enqueued,
        "messages_refused": refused,
        "messages_raised": raised,
        "messages_reported_failed": failed_items,
        "start": start,
        "app_loop_end": loop_end,
        "end": end,
    }


def _post_one(http: Any, url: str, write_key: str, body: dict[str, Any]) -> Any:
    return http.post(
        f"{url}/v1/{body['type']}",
        json=body,
        auth=(write_key, ""),
        headers={"X-Strict-Mode": "1"},
    )


async def _run_procrastinate(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=args.dsn))
    http = httpx.AsyncClient(timeout=args.http_timeout)

    @app.task(name=PROCRASTINATE_TASK)
    async def deliver_message(body: dict[str, Any]) -> None:
        response = await _post_one(http, args.url, args.write_key, body)
        response.raise_for_status()

    async with app.open_async():
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            raise SystemExit(1)
        start = time.time()
        # wait=False: the worker returns once it has caught up with the queue, which is the
        # drain being measured. Default concurrency (1), as procrastinate ships.
        await app.run_worker_async(wait=False, install_signal_handlers=False)
        end = time.time()
    await http.aclose()
    return {"start": start, "end": end, "concurrency": 1}


async def _run_pgqueuer(args: argparse.Namespace) -> dict[str, Any]:
    import asyncpg
    import httpx
    from pgqueuer import QueueManager
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.models import Job
    from pgqueuer.queries import Queries
    from pgqueuer.types import QueueExecutionMode

    http = httpx.AsyncClient(timeout=args.http_timeout)
    # asyncpg, the driver pgqueuer's own CLI picks first. Its psycopg driver waits for
    # notifications with notifies(timeout=1.0) while holding the connection's lock, so every
    # query of a worker draining a backlog written before it started (no NOTIFY arrives)
    # queues behind that wait: one dequeue per second, about 14 messages/s here.
    conn = await asyncpg.connect(args.dsn)
    qm = QueueManager(Queries(AsyncpgDriver(conn)))

    @qm.entrypoint(PGQUEUER_ENTRYPOINT)
    async def deliver_message(job: Job) -> None:
        assert job.payload is not None
        response = await _post_one(http, args.url, args.write_key, json.loads(job.payload))
        response.raise_for_status()

    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        raise SystemExit(1)
    start = time.time()
    # mode=drain: return once the queue is empty and in-flight jobs are done. Default batch
    # size (10) and concurrency (no per-entrypoint limit), as pgqueuer ships.
    await qm.run(mode=QueueExecutionMode.drain)
    end = time.time()
    await http.aclose()
    await conn.close()
    return {"start": start, "end": end, "batch_size": 10, "driver": "asyncpg"}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peers_worker")
    parser.add_argument("--mode", choices=("sdk", "procrastinate", "pgqueuer"), required=True)
    parser.add_argument("--dsn")
    parser.add_argument("--url", required=True, help="the fake Customer.io's base URL")
    parser.add_argument("--write-key", required=True)
    parser.add_argument("--customers", type=int, default=0, help="sdk: funnels to send")
    parser.add_argument("--max-retries", type=int, default=10, help="sdk: Client(max_retries)")
    parser.add_argument("--http-timeout", type=float, default=15.0)
    parser.add_argument("--report-each", action="store_true", help="sdk: print 'sent K'")
    parser.add_argument("--sync-mode", action="store_true", help="sdk: Client(sync_mode=True)")
    args = parser.parse_args()
    if args.mode == "sdk":
        report = _run_sdk(args)
    elif args.mode == "procrastinate":
        report = asyncio.run(_run_procrastinate(args))
    else:
        report = asyncio.run(_run_pgqueuer(args))
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
