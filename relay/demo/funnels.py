"""The sample application: its customers, their funnels, and its transactions.

Each customer goes through an AppFunnel funnel (landing page, sign-up, checkout, an order of
three events in one transaction, a subscription, then maybe consent and a renewal), written as
the application's own transactions with ``record_event``: some through a SQLAlchemy
``Session``, some through a psycopg connection. One add-on order fails after its events are
recorded, so its transaction rolls back. Anonymous visitors only view pages: with no email,
``record_event`` skips their events.

Every event id starts with ``EVENT_PREFIX``, which tells the demo's outbox rows from anyone
else's.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

if TYPE_CHECKING:
    import psycopg
    from sqlalchemy import Engine

    from relay.mapping import OutboxMessage
    from relay.outbox import RecordResult

EVENT_PREFIX: Final = "relay-demo:"
"""Every demo event id starts with this; it tells the demo's outbox rows from anyone else's."""

Api = Literal["sqlalchemy", "psycopg"]

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
