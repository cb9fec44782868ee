"""The sample application's checkout: an order and its purchase event, in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.orm import Session

from models import Order
from relay import record_event


def purchase_event(
    order_id: int, customer: dict[str, Any], amount_cents: int, placed_at: datetime
) -> dict[str, Any]:
    return {
        "id": f"evt_order_{order_id}",  # one event per order: recording it twice writes nothing
        "type": "purchase.complete",
        # The order's own time, never the time of writing: an event recorded again must carry
        # the same occurred_at to be recognised (the outbox's key is message_id with it).
        "occurred_at": placed_at.isoformat(),
        "customer": customer,
        "properties": {"order_id": order_id, "amount": amount_cents, "currency": "USD"},
    }


def place_order(session: Session, customer: dict[str, Any], amount_cents: int) -> Order:
    """SQLAlchemy: the order and its messages, in the session's transaction (the caller's)."""
    order = Order(
        customer_id=customer["id"],
        amount_cents=amount_cents,
        currency="USD",
        created_at=datetime.now(UTC),
    )
    session.add(order)
    session.flush()  # the order's id, for the event
    record_event(session, purchase_event(order.id, customer, amount_cents, order.created_at))
    return order


def place_order_psycopg(
    conn: psycopg.Connection[Any], customer: dict[str, Any], amount_cents: int
) -> int:
    """psycopg 3: the same, in the connection's current transaction (the caller's)."""
    row = conn.execute(
        "INSERT INTO orders (customer_id, amount_cents, currency) VALUES (%s, %s, 'USD')"
        " RETURNING id, created_at",
        (customer["id"], amount_cents),
    ).fetchone()
    assert row is not None
    record_event(conn, purchase_event(row[0], customer, amount_cents, row[1]))
    return int(row[0])
