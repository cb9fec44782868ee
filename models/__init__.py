"""The relay's schema: SQLAlchemy models, the one source of truth that Alembic migrates."""

from models.schema import (
    ATTEMPT_OUTCOMES,
    MESSAGE_KINDS,
    MESSAGE_STATES,
    Base,
    DeliveryAttempt,
    Destination,
    OutboxMessage,
)

__all__ = [
    "ATTEMPT_OUTCOMES",
    "MESSAGE_KINDS",
    "MESSAGE_STATES",
    "Base",
    "DeliveryAttempt",
    "Destination",
    "OutboxMessage",
]
