"""The vocabulary of the schema, without SQLAlchemy (the daemon and the CLI import only this).

The message states and their transitions are drawn in docs/design.md ("Message states").
"""

from __future__ import annotations

MESSAGE_KINDS = ("identify", "track")
MESSAGE_STATES = (
    "pending",
    "in_flight",
    "retrying",
    "held",
    "delivered",
    "coalesced",
    "dead",
    "cancelled",
)
ATTEMPT_OUTCOMES = ("delivered", "retry", "rejected", "unauthorized")

# States in which a message still has to reach Customer.io. A customer's later message may not
# be sent while an earlier one is in one of these (per-customer order).
UNFINISHED_STATES = ("pending", "retrying", "in_flight", "held")
# States the claim query reads.
DUE_STATES = ("pending", "retrying")
