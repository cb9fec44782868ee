"""The outbox, the delivery attempts and the destinations.

Why each index exists is said beside it in models/schema.py; in short:
- relay_outbox_message_id_key: idempotency (same event recorded twice writes nothing).
- relay_outbox_due_idx: the claim query, partial on what is due, so delivered history is free.
- relay_outbox_customer_unfinished_idx: per-customer order (earlier unfinished row?).
- relay_outbox_customer_key_idx: an operator's view of one customer's history.
- relay_outbox_lease_idx: rescue of expired leases; relay_outbox_held_idx: release of held rows;
  relay_outbox_dead_idx: the dead-letter view.
- relay_attempt_message_ids_idx (GIN): every attempt that carried a given message.

A statement-level trigger sends one NOTIFY on channel ``relay_outbox`` per inserting
statement; PostgreSQL folds identical notifications of one transaction into one, so an
application transaction wakes idle relays once however many rows it wrote.

Revision ID: relay_0001
Revises:
Create Date: 2026-11-29 17:24:11.175599
"""

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from alembic import op

revision: str = "relay_0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = ("relay",)
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "relay_attempt",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("relay_instance", sa.Text(), nullable=False),
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("response_snippet", sa.Text(), nullable=True),
        sa.Column("request_bytes", sa.Integer(), nullable=False),
        sa.Column("message_count", sa.Integer(), nullable=False),
        sa.Column("message_ids", postgresql.ARRAY(sa.BigInteger()), nullable=False),
        sa.CheckConstraint(
            "outcome IN ('delivered', 'retry', 'rejected', 'unauthorized')",
            name=op.f("relay_attempt_outcome_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("relay_attempt_pkey")),
    )
    op.create_index(
        "relay_attempt_message_ids_idx",
        "relay_attempt",
        ["message_ids"],
        unique=False,
        postgresql_using="gin",
    )
    op.create_index("relay_attempt_started_at_idx", "relay_attempt", ["started_at"], unique=False)
    op.create_table(
        "relay_destination",
        sa.Column("project_id", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("api_url", sa.Text(), nullable=True),
        sa.Column("write_key", sa.Text(), nullable=False),
        sa.Column("enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("paused_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("paused_reason", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint("region IN ('us', 'eu')", name=op.f("relay_destination_region_check")),
        sa.PrimaryKeyConstraint("project_id", name=op.f("relay_destination_pkey")),
    )
    op.create_table(
        "relay_outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("message_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("customer_key", sa.Text(), nullable=False),
        sa.Column("project_id", sa.Text(), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("body", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("occurred_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("state", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column(
            "next_attempt_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("lease_owner", sa.Text(), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("coalesced_into", sa.BigInteger(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("requeued_by", sa.Text(), nullable=True),
        sa.Column("requeued_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("kind IN ('identify', 'track')", name=op.f("relay_outbox_kind_check")),
        sa.CheckConstraint(
            "state IN ('pending', 'in_flight', 'retrying', 'held', 'delivered', 'coalesced', 'dead', 'cancelled')",
            name=op.f("relay_outbox_state_check"),
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("relay_outbox_pkey")),
        postgresql_with={
            "autovacuum_vacuum_scale_factor": "0.01",
            "autovacuum_vacuum_cost_delay": "0",
            "autovacuum_analyze_scale_factor": "0.02",
        },
    )
    op.create_index(
        "relay_outbox_customer_key_idx", "relay_outbox", ["customer_key", "id"], unique=False
    )
    op.create_index(
        "relay_outbox_customer_unfinished_idx",
        "relay_outbox",
        ["customer_key", "id"],
        unique=False,
        postgresql_where=sa.text("state IN ('pending', 'retrying', 'in_flight', 'held')"),
    )
    op.create_index(
        "relay_outbox_dead_idx",
        "relay_outbox",
        ["updated_at"],
        unique=False,
        postgresql_where=sa.text("state = 'dead'"),
    )
    op.create_index(
        "relay_outbox_due_idx",
        "relay_outbox",
        ["next_attempt_at", "id"],
        unique=False,
        postgresql_where=sa.text("state IN ('pending', 'retrying')"),
    )
    op.create_index(
        "relay_outbox_held_idx",
        "relay_outbox",
        ["project_id"],
        unique=False,
        postgresql_where=sa.text("state = 'held'"),
    )
    op.create_index(
        "relay_outbox_lease_idx",
        "relay_outbox",
        ["lease_expires_at"],
        unique=False,
        postgresql_where=sa.text("state = 'in_flight'"),
    )
    op.create_index("relay_outbox_message_id_key", "relay_outbox", ["message_id"], unique=True)

    # Wake idle relays when rows are committed (LISTEN relay_outbox). The payload is empty on
    # purpose: a constant payload lets PostgreSQL fold a transaction's notifications into one.
    op.execute(
        """
        CREATE FUNCTION relay_outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('relay_outbox', '');
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER relay_outbox_notify AFTER INSERT ON relay_outbox
        FOR EACH STATEMENT EXECUTE FUNCTION relay_outbox_notify()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS relay_outbox_notify ON relay_outbox")
    op.execute("DROP FUNCTION IF EXISTS relay_outbox_notify()")
    op.drop_index("relay_outbox_message_id_key", table_name="relay_outbox")
    op.drop_index(
        "relay_outbox_lease_idx",
        table_name="relay_outbox",
        postgresql_where=sa.text("state = 'in_flight'"),
    )
    op.drop_index(
        "relay_outbox_held_idx",
        table_name="relay_outbox",
        postgresql_where=sa.text("state = 'held'"),
    )
    op.drop_index(
        "relay_outbox_due_idx",
        table_name="relay_outbox",
        postgresql_where=sa.text("state IN ('pending', 'retrying')"),
    )
    op.drop_index(
        "relay_outbox_dead_idx",
        table_name="relay_outbox",
        postgresql_where=sa.text("state = 'dead'"),
    )
    op.drop_index(
        "relay_outbox_customer_unfinished_idx",
        table_name="relay_outbox",
        postgresql_where=sa.text("state IN ('pending', 'retrying', 'in_flight', 'held')"),
    )
    op.drop_index("relay_outbox_customer_key_idx", table_name="relay_outbox")
    op.drop_table("relay_outbox")
    op.drop_table("relay_destination")
    op.drop_index("relay_attempt_started_at_idx", table_name="relay_attempt")
    op.drop_index(
        "relay_attempt_message_ids_idx", table_name="relay_attempt", postgresql_using="gin"
    )
    op.drop_table("relay_attempt")
