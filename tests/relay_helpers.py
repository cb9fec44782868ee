"""Shared helpers for relay tests: events, settings, reading the outbox."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import psycopg

from relay import record_event
from relay.daemon import Relay
from relay.settings import Settings
from relay.testing.fakecio import FakeCustomerIO

KEY = "test-key"


OPTIONAL_CUSTOMER_STRINGS = (
    "name",
    "date_of_birth",
    "gender",
    "country",
    "city",
    "state",
    "project_id",
    "first_campaign_slug",
    "campaign_base_url",
    "last_session_id",
)
"""The customer's optional string attributes (integration spec), for tests that vary them."""


def funnel_event(
    customer: str,
    n: int,
    *,
    type_: str = "checkout.start",
    project: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "id": customer,
        "email": f"{customer}@example.com",
        "name": f"Name {n}",
        "city": f"City {n}",
    }
    if project is not None:
        c["project_id"] = project
    return {
        "id": f"evt_{customer}_{n}",
        "type": type_,
        "occurred_at": f"2026-11-28T10:{n // 60 % 60:02d}:{n % 60:02d}Z",
        "customer": c,
        "properties": {"n": n, **extra},
    }


def write_events(dsn: str, events: list[dict[str, Any]]) -> None:
    with psycopg.connect(dsn) as conn:
        for e in events:
            record_event(conn, e)
        conn.commit()


def settings_for(cio: FakeCustomerIO, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "write_key": KEY,
        "api_url": cio.url,
        "poll_interval_s": 0.2,
        "lease_s": 5.0,
        "http_timeout_s": 2.0,
        "backoff_base_s": 0.05,
        "backoff_cap_s": 0.2,
        "instance": "test-relay",
    }
    base.update(kw)
    return Settings(**base).validated()


def states(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT state, count(*) FROM relay_outbox GROUP BY state").fetchall()
    return {s: n for s, n in rows}


def query(dsn: str, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(sql, params).fetchall()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, every: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes (never a blind sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()


def make_relay(dsn: str, cio: FakeCustomerIO, **kw: Any) -> Relay:
    return Relay(settings_for(cio, **kw), dsn, rand=lambda: 1.0 - 1e-9)


def relay_env(dsn: str, url: str, *, key: str = KEY, **extra: str) -> dict[str, str]:
    """The environment of a `relay` process: this test's database and fake Customer.io, fast
    polling and backoff, and nothing inherited from the caller's RELAY_*/CUSTOMERIO_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CUSTOMERIO_", "RELAY_"))}
    env.update(
        DATABASE_URL=dsn,
        CUSTOMERIO_WRITE_KEY=key,
        CUSTOMERIO_API_URL=url,
        RELAY_POLL_INTERVAL="0.2",
        RELAY_BACKOFF_BASE="0.05",
        RELAY_BACKOFF_CAP="0.2",
    )
    env.update(extra)
    return env
