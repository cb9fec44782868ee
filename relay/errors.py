"""The project's exceptions.

One root, ``RelayError``. Lower-layer errors (psycopg, httpx) are translated at the
boundary that meets them and kept as ``__cause__``::

    RelayError
    ├── InvalidEvent          an AppFunnel event cannot be recorded (names field and reason)
    ├── ConfigError           a setting is missing or malformed (one line for the operator)
    ├── DatabaseUnavailable   the database cannot be reached (translated from psycopg)
    └── NotMigrated           the database's schema is not the one this relay was built for
"""

from __future__ import annotations


class RelayError(Exception):
    """Root of every exception this project raises on purpose."""


class InvalidEvent(RelayError, ValueError):
    """An event that cannot become outbox rows.

    ``field`` is a dotted path into the event (``customer.email``, ``occurred_at``,
    ``properties.amount``); ``reason`` says what is wrong with it. Nothing has been written
    when this is raised, so the caller's transaction is still usable.
    """

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")


class ConfigError(RelayError):
    """A setting is missing or malformed; the message is one line naming it."""


class DatabaseUnavailable(RelayError):
    """The database could not be reached or dropped the connection."""


class NotMigrated(RelayError):
    """The database lacks the relay's tables, or holds another revision than this relay's head:
    ``relay migrate`` (or a newer relay) is the remedy, not a retry."""
