"""The checkout in an asyncio application: the same order and event, in one transaction."""

from __future__ import annotations

from datetime import UTC, datetime
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
    order = Order(
        customer_id=customer["id"],
        amount_cents=amount_cents,
        currency="USD",
        created_at=datetime.now(UTC),
    )
    session.add(order)
    await session.flush()  # the order's id, for the event
    await record_event_async(
        session, purchase_event(order.id, customer, amount_cents, order.created_at)
    )
    return order


async def place_order_psycopg_async(
    conn: psycopg.AsyncConnection[Any], customer: dict[str, Any], amount_cents: int
) -> int:
    """psycopg 3 AsyncConnection: in the connection's current transaction (the caller's)."""
    cur = await conn.execute(
        "INSERT INTO orders (customer_id, amount_cents, currency) VALUES (%s, %s, 'USD')"
        " RETURNING id, created_at",
        (customer["id"], amount_cents),
    )
    row = await cur.fetchone()
    assert row is not None
    await record_event_async(conn, purchase_event(row[0], customer, amount_cents, row[1]))
    return int(row[0])


async def place_order_asyncpg(
    conn: asyncpg.Connection, customer: dict[str, Any], amount_cents: int
) -> int:
    """asyncpg: in the caller's conn.transaction() (without one, each statement commits)."""
    row = await conn.fetchrow(
        "INSERT INTO orders (customer_id, amount_cents, currency) VALUES ($1, $2, 'USD')"
        " RETURNING id, created_at",
        customer["id"],
        amount_cents,
    )
    order_id: int = row["id"]
    await record_event_async(
        conn, purchase_event(order_id, customer, amount_cents, row["created_at"])
    )
    return order_id
