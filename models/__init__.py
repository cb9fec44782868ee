"""The relay's schema: SQLAlchemy models, the one source of truth that Alembic migrates.

The models are imported on first use, so code that needs only the state names
(``models.states``) does not pay for importing SQLAlchemy.
"""

from __future__ import annotations

from typing import Any

from relay.models.states import ATTEMPT_OUTCOMES, MESSAGE_KINDS, MESSAGE_STATES

_MODELS = ("Base", "DeliveryAttempt", "Destination", "OutboxMessage", "Throttle")

__all__ = ["ATTEMPT_OUTCOMES", "MESSAGE_KINDS", "MESSAGE_STATES", *_MODELS]


def __getattr__(name: str) -> Any:
    if name in _MODELS:
        from relay.models import schema

        return getattr(schema, name)
    raise AttributeError(f"module 'relay.models' has no attribute {name!r}")
