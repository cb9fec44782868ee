"""Tables of the outbox, the delivery audit and the destinations.

Every table is prefixed ``relay_`` so the schema can live in an application's own database
beside its tables, and Alembic records its revision in ``relay_alembic_version`` so it never
collides with the application's own ``alembic_version``.

The message states are drawn once, in docs/design.md ("Message states"). In short::

    pending ──claim──▶ in_flight ──2xx──▶ delivered
       ▲                  │ ├──408/429/5xx/timeout──▶ retrying ──due──▶ (claimed again)
       │                  │ ├──400 after bisecting, over 32 KB, limits hit──▶ dead
       │                  │ └──401/403──▶ held (destination paused; no attempt burnt)
       │                  └──lease expired (relay died)──▶ retrying (claimable at once)
       ├── held ◀── no destination / destination disabled or paused; back to pending when fixed
       ├── coalesced (merged into a later identify of the same customer, see coalesced_into)
       └── cancelled (by an operator); dead ──relay retry──▶ pending
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Identity,
    Index,
    Integer,
    MetaData,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from relay.models.states import (
    ATTEMPT_OUTCOMES,
    DUE_STATES,
    MESSAGE_KINDS,
    MESSAGE_STATES,
    UNFINISHED_STATES,
)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


SCHEMA_MARKER = (
    "relay schema relay_0006: the outbox of the AppFunnel relay; relay run and /readyz read the "
    "schema revision from this comment"
)
"""``relay_outbox``'s comment: the newest revision script's marker (see migration relay_0005)."""

PARTITION_NAME = re.compile(r"relay_(outbox|attempt)_(p[0-9]{8}|default)")
"""The partitions of relay_outbox and relay_attempt (migration relay_0006): one per UTC day,
``relay_outbox_p20261203``, and a DEFAULT one for rows outside the days that exist. They are
created and dropped by the relay at run time, so no model names them."""


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "%(table_name)s_%(column_0_N_name)s_idx",
            "uq": "%(table_name)s_%(column_0_N_name)s_key",
            "ck": "%(table_name)s_%(constraint_name)s_check",
            "pk": "%(table_name)s_pkey",
        }
    )


class OutboxMessage(Base):
    """One Customer.io message (identify or track), written in the application's transaction."""

    __tablename__ = "relay_outbox"

    # Write order. Within one customer, writes are sequential, so id order is write order; across
    # customers ids are not commit order, which is why nothing reads "rows after id N". One
    # identity sequence for every partition, so an id is unique on its own; the primary key
    # adds occurred_at only because a partitioned table's unique keys must hold its key.
    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # The Customer.io messageId: derived from the event id, reused by every retry.
    message_id: Mapped[str] = mapped_column(Text, nullable=False)
    event_id: Mapped[str] = mapped_column(Text, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    # The Customer.io userId; per-customer ordering is by this key.
    customer_key: Mapped[str] = mapped_column(Text, nullable=False)
    # Which destination (Customer.io workspace) the message goes to; NULL means the default one.
    project_id: Mapped[str | None] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(Text, nullable=False)
    # The exact Customer.io batch item, messageId included.
    body: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    # The event's own time: the partition key (one partition per UTC day, migration
    # relay_0006). An event recorded twice carries the same occurred_at, so both copies meet
    # in one partition, where the unique key turns the second away.
    occurred_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), primary_key=True, nullable=False
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'pending'"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    lease_owner: Mapped[str | None] = mapped_column(Text)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Which claim holds the lease: outcomes, releases and renewals are fenced on it, so a relay
    # whose lease ran out cannot touch rows a later claim took (even under the same owner).
    lease_token: Mapped[int | None] = mapped_column(BigInteger)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    # For a coalesced row: the row whose identify carried its traits. No foreign key: purging
    # delivered rows in bounded batches must not have to check references.
    coalesced_into: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # Set by `relay retry` / `relay cancel`: who changed a message by hand, and when.
    requeued_by: Mapped[str | None] = mapped_column(Text)
    requeued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        CheckConstraint(_in("kind", MESSAGE_KINDS), name="kind"),
        CheckConstraint(_in("state", MESSAGE_STATES), name="state"),
        # Recording the same event twice writes nothing the second time: the messageId is
        # derived from the event id, and inserts use ON CONFLICT (message_id, occurred_at) DO
        # NOTHING (the partition key must be part of a unique key; see occurred_at).
        Index("relay_outbox_message_id_key", "message_id", "occurred_at", unique=True),
        # The claim query: due rows in (next_attempt_at, id) order. Partial, so its size is the
        # backlog, not the history: millions of delivered rows cost it nothing.
        Index(
            "relay_outbox_due_idx",
            "next_attempt_at",
            "id",
            postgresql_where=text(_in("state", DUE_STATES)),
        ),
        # Per-customer order: "is there an earlier unfinished row of this customer?" and "the
        # customer's next rows in write order". Partial, so it holds only unfinished rows.
        Index(
            "relay_outbox_customer_unfinished_idx",
            "customer_key",
            "id",
            postgresql_where=text(_in("state", UNFINISHED_STATES)),
        ),
        # Operators: one customer's whole history (`relay inspect`, the history view).
        Index("relay_outbox_customer_key_idx", "customer_key", "id"),
        # Lease rescue: in-flight rows whose lease has expired (their relay died).
        Index(
            "relay_outbox_lease_idx",
            "lease_expires_at",
            postgresql_where=text("state = 'in_flight'"),
        ),
        # Rows waiting for a destination, released when one is configured or un-paused.
        Index("relay_outbox_held_idx", "project_id", postgresql_where=text("state = 'held'")),
        # Dead rows, for the dead-letter view and `relay retry`.
        Index("relay_outbox_dead_idx", "updated_at", postgresql_where=text("state = 'dead'")),
        {
            # Daily partitions (migration relay_0006). Every claim and mark is an UPDATE, so the
            # table churns: each partition is created with autovacuum settings that vacuum
            # early and without cost delay, or dead tuples pile up in the partial indexes the
            # claim reads (a partitioned table itself takes no storage parameters).
            "postgresql_partition_by": "RANGE (occurred_at)",
            # The schema's revision, where every role can read it (relay run and /readyz:
            # relay.migrate.schema_problem). Each revision script sets it to its own id, and
            # this text follows the newest script.
            "comment": SCHEMA_MARKER,
        },
    )


class DeliveryAttempt(Base):
    """One HTTP request to Customer.io (Svix-style message attempt), for audit."""

    __tablename__ = "relay_attempt"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    relay_instance: Mapped[str] = mapped_column(Text, nullable=False)
    destination: Mapped[str] = mapped_column(Text, nullable=False)
    # The partition key (one partition per UTC day, dropped whole by retention).
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), primary_key=True, nullable=False
    )
    latency_ms: Mapped[float] = mapped_column(nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    response_snippet: Mapped[str | None] = mapped_column(Text)
    request_bytes: Mapped[int] = mapped_column(Integer, nullable=False)
    message_count: Mapped[int] = mapped_column(Integer, nullable=False)
    # relay_outbox.id of every message in the request, in send order.
    message_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False)

    __table_args__ = (
        CheckConstraint(_in("outcome", ATTEMPT_OUTCOMES), name="outcome"),
        # "Every attempt that carried message X": array containment (message_ids @> ARRAY[x]).
        Index("relay_attempt_message_ids_idx", "message_ids", postgresql_using="gin"),
        # Time-range queries and retention purges.
        Index("relay_attempt_started_at_idx", "started_at"),
        {"postgresql_partition_by": "RANGE (started_at)"},
    )


class OutboxFloor(Base):
    """The claim's floor: no unfinished outbox row has an ``occurred_at`` before it.

    One row. The claim reads ``unfinished_from`` in its own statement, and PostgreSQL skips
    the partitions of older days at run time. Inserts and ``relay retry`` lower it; the relay
    raises it in three steps (``relay_outbox_floor_advance``, migration relay_0006) so that it
    is never raised past a row some transaction is still writing.
    """

    __tablename__ = "relay_outbox_floor"

    one: Mapped[bool] = mapped_column(Boolean, primary_key=True, server_default=text("true"))
    unfinished_from: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    # A raise in progress: the value it publishes, and the transactions it waits out.
    raising_to: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    raise_xmax: Mapped[int | None] = mapped_column(BigInteger)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (
        CheckConstraint("one", name="one"),
        {
            "comment": (
                "No unfinished relay_outbox row has occurred_at before unfinished_from: the "
                "claim skips older partitions. Lowered by inserts and relay retry, raised by "
                "the relay."
            )
        },
    )


class Destination(Base):
    """A Customer.io workspace a project's messages go to (region plus write key)."""

    __tablename__ = "relay_destination"

    project_id: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text, nullable=False)
    # Overrides the region's base URL (a local Customer.io-compatible server, a proxy).
    api_url: Mapped[str | None] = mapped_column(Text)
    write_key: Mapped[str] = mapped_column(Text, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    # Set by a relay that got 401/403: nothing more is sent until the key is changed.
    paused_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    paused_reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )

    __table_args__ = (CheckConstraint("region IN ('us', 'eu')", name="region"),)


class Throttle(Base):
    """A destination that answered 429: no relay sends to it before ``resume_at``."""

    __tablename__ = "relay_throttle"

    # "default" or a project id, as in relay_attempt.destination.
    destination: Mapped[str] = mapped_column(Text, primary_key=True)
    resume_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
