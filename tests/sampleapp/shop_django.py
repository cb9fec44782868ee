"""The checkout in a Django application: the same order and event, under transaction.atomic()."""

from __future__ import annotations

from typing import Any

from django.db import connection
from shop import purchase_event

from relay import record_event


def place_order_django(customer: dict[str, Any], amount_cents: int) -> int:
    """Django: the order and its messages, in the caller's ``transaction.atomic()`` block."""
    with connection.cursor() as cursor:  # a model's save() runs in the same block just as well
        cursor.execute(
            "INSERT INTO orders (customer_id, amount_cents, currency) VALUES (%s, %s, 'USD')"
            " RETURNING id, created_at",
            [customer["id"], amount_cents],
        )
        order_id, placed_at = cursor.fetchone()
    record_event(connection, purchase_event(order_id, customer, amount_cents, placed_at))
    return int(order_id)
