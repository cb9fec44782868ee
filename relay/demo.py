"""``relay demo``: the whole product in under a minute, offline.

The demo runs every part for real, on one machine:

1. PostgreSQL: ``DATABASE_URL`` when it is set, otherwise the embedded server (database
   ``relay_demo`` in ``--data-dir``, so the demo never shares a database with ``relay run``).
2. Customer.io: ``FakeCustomerIO`` on 127.0.0.1, strict mode as always, with random faults
   (by default 10% of requests answer 5xx) so retries show up in the audit table.
3. The relay daemon (``Service``) running while a sample application writes realistic
   funnels in its own transactions with ``record_event``: some through a SQLAlchemy ``Session``,
   some through a psycopg connection. Anonymous page views are skipped, and one order's
   transaction rolls back. The daemon is then stopped and ``drain`` delivers what is left, as
   ``relay run --drain`` would.
4. Plain text tables on stdout: what Customer.io stored, the outbox's delivery states, the
   HTTP requests, a summary and checks. The exit status is 0 only if every committed message
   reached Customer.io (directly, or merged into an identify that did) and nothing of the
   rolled-back transaction or of the anonymous visitors did.

The demo's events all have ids starting with ``relay-demo:``; a run deletes the rows a previous
run left (and their attempt rows) before writing, so running it twice gives the same picture.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import textwrap
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from relay.errors import ConfigError
from relay.fakecio import FAULT_KINDS, FakeCustomerIO

# The relay's CLI builds every subcommand's parser on each start, so the heavy modules the demo
# runs on (psycopg, SQLAlchemy, the daemon) are imported where they are used, not here.
if TYPE_CHECKING:
    import psycopg
    from sqlalchemy import Engine

    from relay.daemon import CycleResult
    from relay.fakecio import Accepted
    from relay.mapping import OutboxMessage
    from relay.outbox import RecordResult
    from relay.settings import Settings

DEMO_DATABASE: Final = "relay_demo"
DEMO_WRITE_KEY: Final = "demo-write-key"
EVENT_PREFIX: Final = "relay-demo:"
"""Every demo event id starts with this; it tells the demo's outbox rows from anyone else's."""

DEFAULT_CUSTOMERS: Final = 6
DEFAULT_SEED: Final = 7
DEFAULT_FAULTS: Final = "5xx=0.1"
MAX_CUSTOMERS: Final = 500

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

_UNFINISHED: Final = ("pending", "retrying", "in_flight", "held")
_MAX_DETAIL_ROWS: Final = 60
_MAX_CUSTOMER_ROWS: Final = 20
_WIDTH: Final = 100

Api = Literal["sqlalchemy", "psycopg"]


def register(sub: Any) -> None:
    """Add the ``demo`` subcommand to the ``relay`` parser."""
    d = sub.add_parser(
        "demo",
        help="show the whole relay working, offline, in under a minute",
        description=(
            "Write sample AppFunnel funnels into the outbox while the relay delivers them to a "
            "local Customer.io stand-in, then print what arrived. Uses DATABASE_URL if set "
            "(its outbox must hold no other messages), else an embedded PostgreSQL."
        ),
    )
    d.add_argument(
        "--customers",
        type=_customer_count,
        default=DEFAULT_CUSTOMERS,
        help=f"customers going through the funnel (default {DEFAULT_CUSTOMERS})",
    )
    d.add_argument(
        "--faults",
        type=_fault_spec,
        default=_fault_spec(DEFAULT_FAULTS),
        metavar="SPEC",
        help=(
            "random faults of the local Customer.io, e.g. 5xx=0.2,429=0.1 (kinds: "
            f"{', '.join(FAULT_KINDS)}); 'none' for none (default {DEFAULT_FAULTS})"
        ),
    )
    d.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_SEED,
        help=f"seed of the sample data, the faults and the retry jitter (default {DEFAULT_SEED})",
    )
    d.add_argument("--data-dir", help="embedded PostgreSQL folder when DATABASE_URL is unset")
    d.add_argument(
        "--force",
        action="store_true",
        help="run even though DATABASE_URL's outbox holds finished messages of others",
    )
    d.set_defaults(func=cmd_demo)


def _customer_count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if not 1 <= n <= MAX_CUSTOMERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_CUSTOMERS}, got {n}")
    return n


def _fault_spec(text: str) -> dict[str, float]:
    """``5xx=0.2,429=0.1`` as rates per fault kind; ``none`` (or nothing) for no faults."""
    if text.strip().lower() in ("", "none", "0"):
        return {}
    rates: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        kind, equals, value = (s.strip() for s in part.partition("="))
        if not equals:
            raise argparse.ArgumentTypeError(f"expected KIND=RATE, got {part.strip()!r}")
        if kind not in FAULT_KINDS:
            raise argparse.ArgumentTypeError(
                f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}"
            )
        try:
            rate = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{kind}: {value!r} is not a number") from None
        if not 0.0 <= rate <= 1.0:
            raise argparse.ArgumentTypeError(f"{kind}: the rate must be within 0..1, got {rate}")
        rates[kind] = rate
    if sum(rates.values()) > 1.0:
        raise argparse.ArgumentTypeError("the fault rates add up to more than 1")
    return rates


# --- the sample application's data ------------------------------------------------------------

_PEOPLE: Final = (
    ("Ada Lovelace", "GB", "London", "GBP"),
    ("Grace Hopper", "US", "New York", "USD"),
    ("Alan Turing", "GB", "Manchester", "GBP"),
    ("Katherine Johnson", "US", "Hampton", "USD"),
    ("Edsger Dijkstra", "NL", "Amsterdam", "EUR"),
    ("Margaret Hamilton", "US", "Boston", "USD"),
    ("Emmy Noether", "DE", "Erlangen", "EUR"),
    ("Niklaus Wirth", "CH", "Zurich", "CHF"),
    ("Sophie Wilson", "GB", "Cambridge", "GBP"),
    ("Barbara Liskov", "US", "Los Angeles", "USD"),
    ("Radia Perlman", "US", "Portsmouth", "USD"),
    ("Hedy Lamarr", "AT", "Vienna", "EUR"),
)


@dataclass(frozen=True)
class _Plan:
    price_id: str
    name: str
    interval: Literal["month", "year"]
    amount: float


_PLANS: Final = (
    _Plan("price_starter_monthly", "Starter", "month", 9.0),
    _Plan("price_pro_monthly", "Pro", "month", 29.0),
    _Plan("price_pro_yearly", "Pro", "year", 290.0),
)
_CAMPAIGNS: Final = ("spring-launch", "podcast-q2", "newsletter-42", "partner-webinar")
_PAGES: Final = ("/", "/pricing", "/features", "/blog/outbox-pattern", "/customers")


@dataclass(frozen=True)
class Tx:
    """One application transaction: who it is about, its events, how it is written.

    ``fails`` is the reason the application aborts it after recording its events.
    """

    person: str
    label: str
    api: Api
    events: tuple[dict[str, Any], ...]
    fails: str | None = None


@dataclass
class Written:
    """A transaction as the application ran it; ``events`` carry their ``occurred_at``."""

    tx: Tx
    events: list[dict[str, Any]]
    messages: list[OutboxMessage]
    """What the events map to (recorded, or thrown away by a rollback)."""
    committed: bool
    committed_at: float = 0.0
    results: list[RecordResult] = field(default_factory=list)


@dataclass(frozen=True)
class Person:
    id: str
    name: str
    email: str | None


class OrderFailed(Exception):
    """Raised inside an order's transaction by the sample application to abort it."""


def build_funnels(customers: int, rng: random.Random) -> tuple[list[Person], list[list[Tx]]]:
    """The people and, per person, their transactions in order; anonymous visitors last."""
    signup_at = int(time.time()) - 3600
    people: list[Person] = []
    funnels: list[list[Tx]] = []
    width = max(2, len(str(customers)))
    for i in range(customers):
        name, country, city, currency = _PEOPLE[i % len(_PEOPLE)]
        round_no = i // len(_PEOPLE)
        first = name.split()[0].lower()
        email = f"{first}{f'+{round_no}' if round_no else ''}@example.com"
        person = Person(
            f"cus_demo_{i + 1:0{width}d}", name + (f" {round_no}" if round_no else ""), email
        )
        people.append(person)
        # The first customer goes through every step, so its detailed table shows it all.
        funnels.append(
            _customer_funnel(
                person, country, city, currency, signup_at + 60 * i, rng, complete=i == 0
            )
        )
        # One order fails: the second customer's add-on purchase (the first if there is one).
        if i == min(1, customers - 1):
            funnels[-1].insert(
                len(funnels[-1]) - rng.randint(0, 1), _failed_order(person, currency, rng)
            )
    for j in range(max(1, customers // 2)):
        visitor = Person(f"anon_demo_{j + 1:0{width}d}", "anonymous visitor", None)
        people.append(visitor)
        funnels.append(_anonymous_visits(visitor, rng))
    return people, funnels


def _event(
    person: Person, n: int, type_: str, customer: Mapping[str, Any], **props: Any
) -> dict[str, Any]:
    return {
        "id": f"{EVENT_PREFIX}{person.id}:{n:02d}:{type_}",
        "type": type_,
        "customer": dict(customer),
        "properties": props,
    }


def _customer_funnel(
    person: Person,
    country: str,
    city: str,
    currency: str,
    signup_at: int,
    rng: random.Random,
    *,
    complete: bool,
) -> list[Tx]:
    plan = rng.choice(_PLANS)
    campaign = rng.choice(_CAMPAIGNS)
    session = f"ses_{rng.getrandbits(48):012x}"
    visitor: dict[str, Any] = {
        "id": person.id,
        "first_campaign_slug": campaign,
        "campaign_base_url": f"https://try.example.com/{campaign}",
        "last_session_id": session,
    }
    known: dict[str, Any] = {
        **visitor,
        "email": person.email,
        "name": person.name,
        "country": country,
        "city": city,
        "created_at": signup_at,
        "marketing_consent": False,
        "funnel_data": {"plan_interest": plan.name.lower(), "landing_page": "/pricing"},
    }
    order_id = f"ord_{rng.getrandbits(40):010x}"
    sub_id = f"sub_{rng.getrandbits(40):010x}"
    start = datetime.fromtimestamp(signup_at, UTC)
    end = start + (timedelta(days=365) if plan.interval == "year" else timedelta(days=30))
    price = {"amount": plan.amount, "currency": currency}
    txs = [
        Tx(
            person.id,
            "landing page",
            "psycopg",
            (
                _event(
                    person,
                    1,
                    "page.view",
                    visitor,  # no email yet: anonymous, so nothing is recorded
                    path="/pricing",
                    referrer="https://news.example.org/",
                    utm_campaign=campaign,
                ),
            ),
        ),
        Tx(
            person.id,
            "sign-up",
            "sqlalchemy",
            (
                _event(
                    person,
                    2,
                    "user.registered",
                    known,
                    signup_method=rng.choice(("email", "google", "apple")),
                    plan_interest=plan.price_id,
                ),
            ),
        ),
        Tx(
            person.id,
            "checkout",
            "psycopg",
            (_event(person, 3, "checkout.start", known, plan=plan.price_id, **price),),
        ),
        # One order, one transaction, three events: their identifies are merged by the relay.
        Tx(
            person.id,
            "order",
            "psycopg",
            (
                _event(
                    person,
                    4,
                    "checkout.payment_added",
                    known,
                    payment_method="card",
                    card_brand=rng.choice(("visa", "mastercard", "amex")),
                ),
                _event(
                    person,
                    5,
                    "purchase.complete",
                    known,
                    order_id=order_id,
                    plan=plan.price_id,
                    **price,
                ),
                _event(person, 6, "customer.first_purchase", known, order_id=order_id, **price),
            ),
        ),
    ]
    subscription = {
        "id": sub_id,
        "status": "trialing" if plan.interval == "year" else "active",
        "priceId": plan.price_id,
        "currentPeriodStart": start.isoformat(),
        "currentPeriodEnd": end.isoformat(),
        "createdAt": start.isoformat(),
    }
    txs.append(
        Tx(
            person.id,
            "subscription",
            "sqlalchemy",
            (
                _event(
                    person,
                    7,
                    "subscription.created",
                    {**known, "subscriptions": [subscription]},
                    subscription_id=sub_id,
                    plan=plan.price_id,
                    interval=plan.interval,
                    **price,
                ),
            ),
        )
    )
    later: list[Tx] = []
    if complete or rng.random() < 0.6:
        known["marketing_consent"] = True
        later.append(
            Tx(
                person.id,
                "consent",
                "sqlalchemy",
                (
                    _event(
                        person,
                        8,
                        "marketing.consent_given",
                        known,
                        channel="email",
                        source="preference_center",
                    ),
                ),
            )
        )
    if plan.interval == "month" and (complete or rng.random() < 0.6):
        later.append(
            Tx(
                person.id,
                "renewal",
                "psycopg",
                (
                    _event(
                        person,
                        9,
                        "subscription.renewal",
                        known,
                        subscription_id=sub_id,
                        period=2,
                        period_end=(end + timedelta(days=30)).date().isoformat(),
                        **price,
                    ),
                ),
            )
        )
    return txs + later


def _failed_order(person: Person, currency: str, rng: random.Random) -> Tx:
    customer = {"id": person.id, "email": person.email, "name": person.name}
    order_id = f"ord_{rng.getrandbits(40):010x}"
    return Tx(
        person.id,
        "add-on order",
        "psycopg",
        (
            _event(
                person,
                20,
                "checkout.payment_added",
                customer,
                payment_method="card",
                card_brand="visa",
            ),
            _event(
                person,
                21,
                "purchase.complete",
                customer,
                order_id=order_id,
                item="extra_seats",
                amount=12.0,
                currency=currency,
            ),
        ),
        fails="card declined at capture",
    )


def _anonymous_visits(visitor: Person, rng: random.Random) -> list[Tx]:
    session = f"ses_{rng.getrandbits(48):012x}"
    pages = rng.sample(_PAGES, k=rng.randint(1, 3))
    return [
        Tx(
            visitor.id,
            "page view",
            "sqlalchemy" if n % 2 else "psycopg",
            (
                _event(
                    visitor,
                    n + 1,
                    "page.view",
                    {"id": visitor.id, "last_session_id": session},
                    path=page,
                ),
            ),
        )
        for n, page in enumerate(pages)
    ]


def interleave(funnels: Sequence[Sequence[Tx]], rng: random.Random) -> list[Tx]:
    """Every transaction once, each person's in order, people mixed as live traffic is."""
    queues = [list(f) for f in funnels if f]
    order: list[Tx] = []
    while queues:
        queue = rng.choice(queues)
        order.append(queue.pop(0))
        if not queue:
            queues.remove(queue)
    return order


# --- the run ----------------------------------------------------------------------------------


@dataclass
class Database:
    dsn: str
    where: str
    embedded: bool
    server: Any = None  # keeps the embedded server's handle for the life of the command
    ready_s: float = 0.0


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
        print(_wrap(f"  {'ok  ' if ok else 'FAIL'}  {text}", indent=" " * 8))
    print()
    print(report.summary_line(elapsed, db.ready_s))
    print()
    for line in next_steps(db):
        print(line)
    return 0 if all(ok for ok, _ in checks) else 1


def prepare_database(args: argparse.Namespace) -> Database:
    """Connect, migrate if needed, refuse unsafe databases, remove a previous run's rows."""
    from relay.db import connect, redact_dsn
    from relay.migrate import upgrade

    t0 = time.monotonic()
    if os.environ.get("DATABASE_URL"):
        from relay.cli import _database_url

        dsn = _database_url(args, embedded_ok=False)
        db = Database(dsn, f"DATABASE_URL {redact_dsn(dsn)}", embedded=False)
    else:
        from relay.embedded import DEFAULT_DATA_DIR, EmbeddedPostgres

        data_dir = Path(args.data_dir or DEFAULT_DATA_DIR)
        server = EmbeddedPostgres(data_dir)
        dsn = server.ensure_database(DEMO_DATABASE)
        db = Database(
            dsn,
            f"embedded PostgreSQL in {data_dir}, database {DEMO_DATABASE}",
            embedded=True,
            server=server,
        )
    with connect(dsn) as conn:
        row = conn.execute("SELECT to_regclass('relay_outbox') IS NOT NULL").fetchone()
    # The demo's own database follows the code's schema; someone else's is migrated only when
    # it has no outbox at all, since schema changes there are its operator's decision.
    if db.embedded or not (row and row[0]):
        upgrade(dsn)
    refuse_unsafe(dsn, force=args.force)
    remove_previous_run(dsn)
    db.ready_s = time.monotonic() - t0
    return db


def refuse_unsafe(dsn: str, *, force: bool) -> None:
    """Raise ``ConfigError`` when running the demo here could harm real data.

    The demo's relay delivers whatever is due in this outbox to the local stand-in and marks
    it delivered, and another relay on this database would deliver the demo's messages to a
    real workspace. Either would be a silent loss or a pollution, so both are refused always;
    finished messages of others are merely mixed into the tables, which ``--force`` allows.
    """
    from relay.db import connect

    with connect(dsn) as conn:
        relays = conn.execute(
            "SELECT coalesce(string_agg(DISTINCT application_name, ', '), '') "
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND application_name LIKE 'relay %%'"
        ).fetchone()
        counts = conn.execute(
            "SELECT count(*) FILTER (WHERE state = ANY(%s)), count(*) FROM relay_outbox "
            "WHERE event_id NOT LIKE %s",
            (list(_UNFINISHED), EVENT_PREFIX + "%"),
        ).fetchone()
    assert relays is not None and counts is not None
    if relays[0]:
        raise ConfigError(
            f"another relay is connected to this database ({relays[0]}); it would deliver the "
            "demo's messages to its own Customer.io workspace. Stop it, or point DATABASE_URL "
            "at another database."
        )
    unfinished, foreign = counts
    assert isinstance(unfinished, int) and isinstance(foreign, int)
    if unfinished:
        raise ConfigError(
            f"relay_outbox holds {unfinished} undelivered messages that are not the demo's; "
            "the demo's relay would send them to its local stand-in and mark them delivered. "
            "Point DATABASE_URL at an empty database (--force does not override this)."
        )
    if foreign and not force:
        raise ConfigError(
            f"relay_outbox holds {foreign} messages that are not the demo's; the demo runs on "
            "an empty outbox. Point DATABASE_URL at an empty database, or add --force to run "
            "beside them (they are left untouched)."
        )


def remove_previous_run(dsn: str) -> None:
    """Delete the rows an earlier demo left, so that its events can be recorded afresh.

    Without this, the same event ids would map to the same messageIds and be skipped as
    duplicates of the earlier run.
    """
    from relay.db import connect

    with connect(dsn) as conn, conn.transaction():
        conn.execute(
            "WITH gone AS (DELETE FROM relay_outbox WHERE event_id LIKE %s RETURNING id) "
            "DELETE FROM relay_attempt WHERE message_ids && ARRAY(SELECT id FROM gone)",
            (EVENT_PREFIX + "%",),
        )


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


def write_transaction(tx: Tx, app_conn: psycopg.Connection[Any], engine: Engine) -> Written:
    """Run one of the application's transactions: its events commit together or not at all."""
    from sqlalchemy.orm import Session

    from relay.mapping import map_event
    from relay.outbox import record_event

    events = [{**e, "occurred_at": datetime.now(UTC)} for e in tx.events]
    messages = [m for e in events for m in map_event(e)]
    results: list[RecordResult] = []
    try:
        if tx.api == "sqlalchemy":
            with Session(engine) as session, session.begin():
                results = [record_event(session, e) for e in events]
                _abort_if_failing(tx)
        else:
            with app_conn.transaction():
                results = [record_event(app_conn, e) for e in events]
                _abort_if_failing(tx)
    except OrderFailed:
        return Written(tx, events, messages, committed=False)
    return Written(
        tx, events, messages, committed=True, committed_at=time.monotonic(), results=results
    )


def _abort_if_failing(tx: Tx) -> None:
    if tx.fails:
        # Raised inside the transaction block, as an application's payment step would: the
        # block rolls back, and the events recorded in it go with it.
        raise OrderFailed(tx.fails)


# --- what happened ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OutboxRow:
    id: int
    message_id: str
    event_id: str
    kind: str
    customer_key: str
    event_type: str
    state: str
    attempts: int
    coalesced_into: int | None
    last_error: str | None


@dataclass(frozen=True)
class AttemptRow:
    status_code: int | None
    outcome: str
    error: str | None
    message_count: int
    message_ids: list[int]


@dataclass
class Report:
    people: list[Person]
    written: list[Written]
    rows: list[OutboxRow]
    attempts: list[AttemptRow]
    accepted: list[Accepted]
    server_statuses: Counter[int]
    faults: dict[str, int]
    totals: CycleResult

    @classmethod
    def collect(
        cls,
        dsn: str,
        people: list[Person],
        written: list[Written],
        cio: FakeCustomerIO,
        totals: CycleResult,
    ) -> Report:
        from psycopg.rows import class_row

        from relay.db import connect

        with connect(dsn) as conn:
            with conn.cursor(row_factory=class_row(OutboxRow)) as cur:
                rows = cur.execute(
                    "SELECT id, message_id, event_id, kind, customer_key, event_type, state, "
                    "attempts, coalesced_into, last_error FROM relay_outbox "
                    "WHERE event_id LIKE %s ORDER BY id",
                    (EVENT_PREFIX + "%",),
                ).fetchall()
            with conn.cursor(row_factory=class_row(AttemptRow)) as acur:
                attempts = acur.execute(
                    "SELECT status_code, outcome, error, message_count, message_ids "
                    "FROM relay_attempt "
                    "WHERE message_ids && %s::bigint[] ORDER BY id",
                    ([r.id for r in rows],),
                ).fetchall()
        # Called once the stand-in has stopped, so its records are final.
        statuses = Counter(r.status for r in cio.requests)
        accepted, faults = list(cio.accepted), dict(cio.fault_counts)
        return cls(people, written, rows, attempts, accepted, statuses, faults, totals)

    # -- derived facts ---------------------------------------------------------------------

    @property
    def committed(self) -> list[Written]:
        return [w for w in self.written if w.committed]

    @property
    def rolled_back(self) -> list[Written]:
        return [w for w in self.written if not w.committed]

    def expected_messages(self) -> list[Mapping[str, Any]]:
        """Every message the committed events map to, in commit order."""
        return [m.body for w in self.committed for m in w.messages]

    def first_arrivals(self) -> dict[str, Accepted]:
        """Each messageId's first storage at the server.

        Delivery is at-least-once: a later copy of a messageId is the same message again (its
        request timed out yet went through), so it is counted as a duplicate and left out of
        the tables and profiles.
        """
        first: dict[str, Accepted] = {}
        for a in self.accepted:
            first.setdefault(str(a.item.get("messageId")), a)
        return first

    def anonymous_events(self) -> int:
        return sum(1 for w in self.committed for r in w.results if r.skipped == "anonymous")

    def merged_into(self) -> Counter[int]:
        return Counter(r.coalesced_into for r in self.rows if r.coalesced_into is not None)

    def checks(self, drained: bool) -> list[tuple[bool, str]]:
        by_state = Counter(r.state for r in self.rows)
        rows_by_id = {r.id: r for r in self.rows}
        arrived = self.first_arrivals()
        expected_ids = {str(m["messageId"]) for m in self.expected_messages()}
        outbox_ids = {r.message_id for r in self.rows}

        def carrier(row: OutboxRow) -> OutboxRow:
            # A carrier that was sent but refused without counting an attempt (a 401 holds it)
            # is fresh again at its next claim and may be merged into a later identify itself,
            # so the row that finally went out is found by following the chain.
            seen = {row.id}
            while row.state == "coalesced" and row.coalesced_into in rows_by_id:
                row = rows_by_id[row.coalesced_into]
                if row.id in seen:
                    break
                seen.add(row.id)
            return row

        missing = [
            r
            for r in self.rows
            if not (carrier(r).state == "delivered" and carrier(r).message_id in arrived)
        ]
        results = [
            (
                drained and not missing and outbox_ids == expected_ids,
                f"every committed message reached Customer.io: {by_state['delivered']} "
                f"delivered, {by_state['coalesced']} merged into a later identify"
                + (f"; NOT DELIVERED: {len(missing)}" if missing else "")
                + ("" if drained else "; the drain timed out")
                + ("" if outbox_ids == expected_ids else "; the outbox differs from the events"),
            )
        ]

        for w in self.rolled_back:
            doomed = {m.message_id for m in w.messages}
            leaked = doomed & (outbox_ids | set(arrived))
            results.append(
                (
                    not leaked,
                    f"nothing of {w.tx.person}'s rolled-back {w.tx.label} ({w.tx.fails}) reached "
                    f"the outbox or Customer.io ({len(doomed)} messages)"
                    + (f"; LEAKED: {len(leaked)}" if leaked else ""),
                )
            )

        # Anonymous events map to no message, so anything of theirs at the server is a stray.
        strays = [a for a in self.accepted if str(a.item.get("messageId")) not in expected_ids]
        results.append(
            (
                not strays,
                f"nothing anonymous or unexpected was sent ({self.anonymous_events()} anonymous "
                "page views skipped)" + (f"; UNEXPECTED: {len(strays)}" if strays else ""),
            )
        )

        profiles = self.profiles()
        wanted = self.expected_profiles()
        matching = sum(1 for key, traits in wanted.items() if profiles.get(key) == traits)
        results.append(
            (
                matching == len(wanted),
                f"every customer's profile at Customer.io equals the application's "
                f"({matching} of {len(wanted)})",
            )
        )
        return results

    def profiles(self) -> dict[str, dict[str, Any]]:
        """Each customer's traits at Customer.io: its identifies applied in storage order."""
        from relay.coalesce import merge_traits

        bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for a in sorted(self.first_arrivals().values(), key=lambda a: a.seq):
            if a.item.get("type") == "identify":
                bodies[str(a.item.get("userId"))].append(a.item)
        return {key: merge_traits(items) for key, items in bodies.items()}

    def expected_profiles(self) -> dict[str, dict[str, Any]]:
        """Each customer's traits had every identify been sent one by one, in commit order."""
        from relay.coalesce import merge_traits

        bodies: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
        for body in self.expected_messages():
            if body["type"] == "identify":
                bodies[str(body["userId"])].append(body)
        return {key: merge_traits(items) for key, items in bodies.items()}

    def commit_latencies_ms(self) -> list[float]:
        """Per committed transaction with messages: commit to its last track's first storage."""
        arrived = self.first_arrivals()
        out: list[float] = []
        for w in self.committed:
            tracks = [m.message_id for m in w.messages if m.kind == "track"]
            if tracks and all(t in arrived for t in tracks):
                last = max(arrived[t].received_at for t in tracks)
                out.append(max(0.0, (last - w.committed_at) * 1000.0))
        return out

    # -- rendering -------------------------------------------------------------------------

    def render(self, *, cio_url: str) -> list[str]:
        lines: list[str] = []
        lines += self._render_received(cio_url)
        lines.append("")
        lines += self._render_requests()
        lines.append("")
        lines += self._render_outbox()
        return lines

    def _render_received(self, cio_url: str) -> list[str]:
        arrived = self.first_arrivals()
        copies = Counter(str(a.item.get("messageId")) for a in self.accepted)
        profiles = self.profiles()
        per_customer: dict[str, list[Accepted]] = defaultdict(list)
        for a in sorted(arrived.values(), key=lambda a: a.seq):
            per_customer[str(a.item.get("userId"))].append(a)

        customers = [p for p in self.people if p.email is not None]
        table = []
        for p in customers[:_MAX_CUSTOMER_ROWS]:
            items = per_customer.get(p.id, [])
            traits = profiles.get(p.id, {})
            table.append(
                (
                    p.id,
                    p.email or "",
                    sum(1 for a in items if a.item["type"] == "identify"),
                    sum(1 for a in items if a.item["type"] == "track"),
                    _show(traits.get("marketing_consent")),
                    _show(traits.get("active_subscription_count")),
                )
            )
        lines = [
            f"What Customer.io received (the local stand-in at {cio_url}, strict mode)",
            "",
            *_table(
                (
                    "customer",
                    "email",
                    "identify",
                    "track",
                    "marketing_consent",
                    "active_subscription_count",
                ),
                table,
            ),
        ]
        if len(customers) > _MAX_CUSTOMER_ROWS:
            lines.append(f"  ... and {len(customers) - _MAX_CUSTOMER_ROWS} more customers")
        visitors = [p for p in self.people if p.email is None]
        views = sum(
            len(w.events) for w in self.committed if w.tx.person in {v.id for v in visitors}
        )
        lines.append(
            f"  {len(visitors)} anonymous visitors ({views} page views): nothing sent, they have "
            "no email"
        )
        duplicates = sum(n - 1 for n in copies.values())
        lines.append(
            _wrap(
                f"  {sum(self.server_statuses.values())} HTTP requests "
                f"({self.server_statuses[200]} answered 200), {len(self.accepted)} messages "
                f"stored, {duplicates} duplicates (a messageId stored again: a request that "
                "timed out had gone through)",
                indent="  ",
            )
        )

        first = customers[0]
        merged = self.merged_into()
        row_of = {r.message_id: r for r in self.rows}
        detail = []
        for n, a in enumerate(per_customer.get(first.id, []), 1):
            item = a.item
            row = row_of.get(str(item.get("messageId")))
            if item["type"] == "identify":
                carried = merged.get(row.id, 0) if row else 0
                event = f"(merges {carried + 1} identifies)" if carried else ""
                details = _traits_text(item.get("traits", {}))
            else:
                event = str(item.get("event", ""))
                details = _props_text(item.get("properties", {}))
            detail.append((n, a.request_no, item["type"], event, details))
        lines += [
            "",
            f"Messages for {first.id} ({first.name}), in the order Customer.io stored them",
            "",
            *_table(("#", "request", "type", "event", "traits / properties"), detail),
        ]
        return lines

    def _render_requests(self) -> list[str]:
        groups: dict[tuple[str, str], list[AttemptRow]] = defaultdict(list)
        for a in self.attempts:
            groups[(_answer(a), a.outcome)].append(a)
        table = [
            (answer, outcome, len(rows), sum(r.message_count for r in rows))
            for (answer, outcome), rows in sorted(groups.items())
        ]
        faults = ", ".join(f"{kind} x{n}" for kind, n in sorted(self.faults.items())) or "none"
        return [
            "HTTP requests to Customer.io (relay_attempt, the relay's audit of every request)",
            "",
            *_table(("answer", "outcome", "requests", "messages"), table),
            f"  faults the stand-in injected: {faults}",
        ]

    def _render_outbox(self) -> list[str]:
        by_state = Counter(r.state for r in self.rows)
        states = [(s, n) for s, n in sorted(by_state.items(), key=lambda kv: -kv[1])]
        first = next(p for p in self.people if p.email is not None)
        shown = [
            r
            for r in self.rows
            if r.customer_key == first.id
            or r.attempts > 1
            or r.state not in ("delivered", "coalesced")
        ]
        hidden = len(shown) - _MAX_DETAIL_ROWS
        shown = shown[:_MAX_DETAIL_ROWS]
        # The answers Customer.io gave each request that carried the row: why it took N tries.
        answers: dict[int, list[str]] = defaultdict(list)
        for a in self.attempts:
            for row_id in a.message_ids:
                answers[row_id].append(_answer(a))
        # last_error is cleared on delivery; it only says something for a row that failed.
        failed = any(r.state not in ("delivered", "coalesced") for r in shown)
        headers = ["id", "customer", "event", "kind", "state", "attempts", "coalesced_into"]
        headers += ["answers", *(["last_error"] if failed else [])]
        table = [
            (
                r.id,
                r.customer_key,
                r.event_type,
                r.kind,
                r.state,
                r.attempts,
                r.coalesced_into,
                " ".join(answers.get(r.id, [])),
                *([(r.last_error or "")[:60]] if failed else []),
            )
            for r in shown
        ]
        lines = [
            "Delivery status in the outbox (relay_outbox)",
            "",
            *_table(("state", "messages"), states),
            "",
            f"Messages of {first.id}, and every message that needed more than one attempt",
            "",
            *_table(headers, table),
        ]
        if hidden > 0:
            lines.append(f"  ... {hidden} more rows")
        return lines

    def summary_line(self, elapsed_s: float, db_ready_s: float) -> str:
        committed_events = sum(len(w.events) for w in self.committed)
        anonymous = self.anonymous_events()
        rolled_back = sum(len(w.events) for w in self.rolled_back)
        identified = committed_events - anonymous
        requests = len(self.attempts)
        per_1000 = requests * 1000.0 / identified if identified else 0.0
        latencies = self.commit_latencies_ms()
        latency = (
            f"commit to Customer.io: median {statistics.median(latencies):.0f} ms "
            f"(poll interval {_POLL_INTERVAL_S * 1000:.0f} ms); "
            if latencies
            else ""
        )
        return _wrap(
            f"Summary: {committed_events} events written ({anonymous} anonymous, skipped), "
            f"{rolled_back} rolled back with their order; {len(self.rows)} outbox messages "
            f"({self.totals.coalesced} identifies merged into others); {requests} requests "
            f"({per_1000:.0f} per 1,000 identified events); {latency}"
            f"{elapsed_s:.1f} s in all ({db_ready_s:.1f} s to get the database ready)",
            indent="  ",
        )


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
        print(_wrap(f"  {label:<12} {text}", indent=" " * 15))
    print("", flush=True)


def next_steps(db: Database) -> list[str]:
    """Commands to try next, each working as printed where the demo ran.

    On the embedded server, which stops when the demo exits, that is the daemon on the same
    data folder (``relay run --embedded``, a database of its own beside the demo's); reading
    the demo's outbox with ``relay status`` needs a DATABASE_URL, so it is offered only after
    a demo on one.
    """
    lines = ["Try next"]
    if db.embedded:
        import shlex

        data_dir = shlex.quote(str(Path(db.server.data_dir).absolute()))
        lines += [
            f"  CUSTOMERIO_WRITE_KEY=... relay run --embedded --data-dir {data_dir}",
            "      the daemon on this embedded PostgreSQL (in a database of its own, relay),",
            "      delivering to your own Customer.io workspace",
            "  DATABASE_URL=postgresql://... relay demo",
            "      the same demo on your own PostgreSQL, where relay status and the views",
            "      relay_status and relay_message_history then show its outbox",
        ]
        return lines
    lines += [
        "  relay status                                the outbox's backlog (reads DATABASE_URL)",
        "  SELECT * FROM relay_status;                 the same, as a SQL view",
        "  SELECT * FROM relay_message_history;        every message with its attempts",
        "  CUSTOMERIO_WRITE_KEY=... relay run          deliver to your own Customer.io workspace",
    ]
    return lines


# --- formatting -------------------------------------------------------------------------------


def _table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    """Rows as aligned plain text under a header and a rule; numeric columns right-aligned."""
    cells = [["" if v is None else str(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, text in enumerate(row):
            widths[i] = max(widths[i], len(text))
    right = [
        bool(cells) and all(_is_number(row[i]) or row[i] == "" for row in cells)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(widths[i]) if right[i] else v.ljust(widths[i]) for i, v in enumerate(values)
        ]
        return ("  " + "  ".join(parts)).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in cells]
    if not cells:
        out.append("  (none)")
    return out


def _wrap(text: str, *, indent: str) -> str:
    return textwrap.fill(text, width=_WIDTH, subsequent_indent=indent, break_on_hyphens=False)


def _is_number(text: str) -> bool:
    return text.replace(".", "", 1).isdigit()


def _show(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _traits_text(traits: Mapping[str, Any]) -> str:
    shown = ("email", "marketing_consent", "active_subscription_count")
    return " ".join(f"{k}={_show(traits[k])}" for k in shown if k in traits)


def _props_text(props: Mapping[str, Any]) -> str:
    parts = []
    if "amount" in props:
        parts.append(f"{props['amount']:.2f} {props.get('currency', '')}".rstrip())
    for key in (
        "plan",
        "interval",
        "order_id",
        "payment_method",
        "card_brand",
        "signup_method",
        "channel",
        "period",
        "path",
    ):
        if key in props:
            parts.append(f"{key}={props[key]}")
    return " ".join(parts)


def _answer(attempt: AttemptRow) -> str:
    if attempt.status_code is not None:
        return str(attempt.status_code)
    # A transport failure has no status; its recorded error starts with the kind (timeout...).
    return (attempt.error or "error").split(":", 1)[0]
