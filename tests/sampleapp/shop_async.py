"""The checkout in an asyncio application: the same order and event, in one transaction."""

from __future__ import annotations

from typing import Any

import asyncpg
import psycopg
from shop import purchase_event
from sqlalchemy.ext.asyncio import AsyncSession

from models import Order
from relay import record_event_async


async def place_order_async(
    session: AsyncSession, customer: dict[str, Any], amount_cents: int
) -> Order:
    """SQLAlchemy AsyncSession (asyncpg or psycopg driver): in the session's transaction."""
    order = Order(customer_id=customer["id"], amount_cents=amount_cents, currency="USD")
    session.add(order)
    await session.flush()  # the order's id, for the event
    await record_event_async(session, purchase_event(order.id, customer, amount_cents))
    return order


async def place_order_psycopg_async(
    conn: psycopg.AsyncConnection[Any], customer: dict[str, Any], amount_cents: int
) -> int:
    """psycopg 3 AsyncConnection: in the connection's current transaction (the caller's)."""
    cur = await conn.execute(
        "INSERT INTO orders (customer_id, amount_cents, currency) VALUES (%s, %s, 'USD')"
        " RETURNING id",
        (customer["id"], amount_cents),
    )
    row = await cur.fetchone()
    assert row is not None
    await record_event_async(conn, purchase_event(row[0], customer, amount_cents))
    return int(row[0])


async def place_order_asyncpg(
    conn: asyncpg.Connection, customer: dict[str, Any], amount_cents: int
) -> int:
    """asyncpg: in the caller's conn.transaction() (without one, each statement commits)."""
    order_id: int = await conn.fetchval(
        "INSERT INTO orders (customer_id, amount_cents, currency) VALUES ($1, $2, 'USD')"
        " RETURNING id",
        customer["id"],
        amount_cents,
    )
    await record_event_async(conn, purchase_event(order_id, customer, amount_cents))
    return order_id
