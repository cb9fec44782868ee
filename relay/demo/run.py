"""``relay demo`` itself: the relay and the sample application side by side, then the report.

The relay runs as ``relay run`` does (``Service``), on settings tightened for a demo, against
the local Customer.io stand-in; the application writes its transactions meanwhile. The daemon
is then stopped and ``drain`` delivers what is left, as ``relay run --drain`` would.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final

from relay.demo.database import Database, prepare_database
from relay.demo.funnels import Tx, Written, build_funnels, interleave, write_transaction
from relay.demo.report import Report, next_steps, wrap
from relay.testing.fakecio import FakeCustomerIO

if TYPE_CHECKING:
    from relay.daemon import CycleResult
    from relay.settings import Settings

DEMO_WRITE_KEY: Final = "demo-write-key"


# Retries, timeouts and polling tightened from the production defaults so that a retried
# message is delivered within a second or two and the whole demo stays well under a minute.
# The poll interval stays far above the commit-to-delivery latency the demo reports, which
# therefore shows the LISTEN/NOTIFY wake-up rather than polling.
_POLL_INTERVAL_S: Final = 0.5
_HTTP_TIMEOUT_S: Final = 1.0
_SLOW_FAULT_S: Final = 1.5  # longer than the client timeout: a "slow" fault becomes a duplicate
_RETRY_AFTER_S: Final = 0.5
_DRAIN_TIMEOUT_S: Final = 40.0
# Total pause spread between the application's transactions: a funnel arrives over time, so
# most transactions are delivered on their own, as they are in production at low volume.
_WRITE_SPREAD_S: Final = 1.5
_MAX_PAUSE_S: Final = 0.03


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    # INFO is the CLI's default level: the demo's stdout is its tables, so the relay's routine
    # lines are kept off and only its warnings (a retried request, say) reach stderr.
    if str(args.log_level).upper() == "INFO":
        logging.getLogger().setLevel(logging.WARNING)

    rng = random.Random(args.seed)
    people, funnels = build_funnels(args.customers, rng)
    txs = interleave(funnels, rng)

    db = prepare_database(args)
    print_header(db, args, len(people) - args.customers, txs)

    from relay.settings import Settings

    with FakeCustomerIO(write_keys={DEMO_WRITE_KEY}) as cio:
        cio.slow_s = _SLOW_FAULT_S
        cio.retry_after_s = _RETRY_AFTER_S
        cio.set_fault_rates(args.faults, seed=args.seed)
        settings = Settings(
            write_key=DEMO_WRITE_KEY,
            api_url=cio.url,
            instance=f"relay-demo:{os.getpid()}",
            poll_interval_s=_POLL_INTERVAL_S,
            lease_s=10.0,
            http_timeout_s=_HTTP_TIMEOUT_S,
            backoff_base_s=0.25,
            backoff_cap_s=1.0,
            retry_after_cap_s=1.0,
        ).validated()
        jitter = random.Random(args.seed)
        written, totals, drained = run_relay_and_application(db.dsn, settings, txs, jitter)
    report = Report.collect(db.dsn, people, written, cio, totals)
    elapsed = time.monotonic() - started

    checks = report.checks(drained)
    for line in report.render(cio_url=settings.base_url):
        print(line)
    print()
    print("Checks")
    for ok, text in checks:
        print(wrap(f"  {'ok  ' if ok else 'FAIL'}  {text}", indent=" " * 8))
    print()
    print(report.summary_line(elapsed, db.ready_s, _POLL_INTERVAL_S))
    print()
    for line in next_steps(db):
        print(line)
    return 0 if all(ok for ok, _ in checks) else 1


def print_header(db: Database, args: argparse.Namespace, visitors: int, txs: Sequence[Tx]) -> None:
    apis = Counter(tx.api for tx in txs)
    faults = (
        ", ".join(f"{kind} on {rate:.0%} of requests" for kind, rate in args.faults.items())
        or "none"
    )
    rows = (
        ("Customer.io", f"a local stand-in on 127.0.0.1 (write key {DEMO_WRITE_KEY!r})"),
        ("faults", f"{faults} (seed {args.seed})"),
        (
            "application",
            f"{args.customers} customers and {visitors} anonymous visitors: {len(txs)} "
            f"transactions, {apis['sqlalchemy']} through a SQLAlchemy Session and "
            f"{apis['psycopg']} through a psycopg connection, one of them rolled back",
        ),
        (
            "relay",
            "the daemon runs while the application writes (woken by LISTEN/NOTIFY), then "
            "drains what is left as `relay run --drain` does",
        ),
    )
    print("relay demo")
    print(f"  {'database':<12} {db.where}")  # not wrapped: a folder name stays whole
    for label, text in rows:
        print(wrap(f"  {label:<12} {text}", indent=" " * 15))
    print("", flush=True)


def run_relay_and_application(
    dsn: str, settings: Settings, txs: Sequence[Tx], jitter: random.Random
) -> tuple[list[Written], CycleResult, bool]:
    """Run the daemon while the application writes, then drain; the transactions as written."""
    import psycopg
    from sqlalchemy import create_engine

    from relay.daemon import Relay
    from relay.db import sqlalchemy_url
    from relay.service import Service, drain

    service = Service(Relay(settings, dsn, rand=jitter.random))
    engine = create_engine(sqlalchemy_url(dsn), pool_size=1)
    app_conn = psycopg.connect(dsn, autocommit=True, application_name="appfunnel demo app")
    pause = min(_MAX_PAUSE_S, _WRITE_SPREAD_S / max(1, len(txs)))
    written: list[Written] = []
    service.start()
    try:
        # Until LISTEN is in place a commit would wait for the next poll; the demo shows the
        # wake-up, so it writes only once the listener is connected.
        service.listener.connected.wait(5.0)
        for tx in txs:
            written.append(write_transaction(tx, app_conn, engine))
            time.sleep(pause)
    finally:
        app_conn.close()
        engine.dispose()
        service.stop()
    totals = service.totals
    # What the daemon left (retries waiting out their backoff), delivered as `relay run --drain`.
    drained, rest = drain(Relay(settings, dsn, rand=jitter.random), _DRAIN_TIMEOUT_S)
    totals.add(rest)
    # The listeners of the daemon and of the drain notice the stop within half a second. Left
    # running, they would see the embedded server shut down at exit and log a lost connection.
    for thread in threading.enumerate():
        if thread.name == "relay-listen":
            thread.join(timeout=2.0)
    return written, totals, drained
