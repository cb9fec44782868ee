"""Per-claim lease tokens, and a destination-wide throttle shared by every relay.

- ``relay_outbox.lease_token``: set by each claim, cleared with the lease. Outcomes, releases
  and lease renewals are fenced on it, so a relay whose lease ran out (and whose rows another
  claim took, possibly under the same instance name after a restart) neither records an
  outcome on them nor sends them.
- ``relay_throttle``: one row per destination that answered 429, with the time before which
  no relay may send to it. Each relay reads it before sending and writes it when it gets a 429.

Revision ID: relay_0003
Revises: relay_0002
Create Date: 2026-12-03 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "relay_0003"
down_revision: str | None = "relay_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # No default and no rewrite: adding a NULL column is a catalog change on any table size.
    op.add_column("relay_outbox", sa.Column("lease_token", sa.BigInteger(), nullable=True))
    op.create_table(
        "relay_throttle",
        sa.Column("destination", sa.Text(), nullable=False),
        sa.Column("resume_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("destination", name="relay_throttle_pkey"),
    )
    op.execute(
        """
        DO $$
        BEGIN
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'relay_worker') THEN
                GRANT SELECT, INSERT, UPDATE, DELETE ON relay_throttle TO relay_worker;
            END IF;
            IF EXISTS (SELECT FROM pg_roles WHERE rolname = 'relay_operator') THEN
                GRANT SELECT ON relay_throttle TO relay_operator;
            END IF;
        END $$
        """
    )


def downgrade() -> None:
    op.drop_table("relay_throttle")
    op.drop_column("relay_outbox", "lease_token")
