"""AppFunnel to Customer.io: a transactional outbox in PostgreSQL and the relay that drains it.

The application API is ``record_event`` (write an event's Customer.io messages in the
caller's transaction; ``record_event_async`` for asyncio applications); the relay daemon and
the operator CLI are ``relay`` on the command line.
"""

from relay.errors import ConfigError, DatabaseUnavailable, InvalidEvent, RelayError
from relay.mapping import Customer, Event, MappingConfig, Subscription, map_event
from relay.outbox import (
    RecordResult,
    record_event,
    record_event_async,
    record_events,
    record_events_async,
)

__all__ = [
    "ConfigError",
    "Customer",
    "DatabaseUnavailable",
    "Event",
    "InvalidEvent",
    "MappingConfig",
    "RecordResult",
    "RelayError",
    "Subscription",
    "map_event",
    "record_event",
    "record_event_async",
    "record_events",
    "record_events_async",
]
