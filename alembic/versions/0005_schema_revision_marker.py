"""The schema's revision, readable by every role: a comment on ``relay_outbox``.

``relay run`` and ``/readyz`` must tell whether the database holds the schema this relay was
written for. The Alembic version table cannot answer that for everyone: ``relay_worker`` and
``relay_operator`` may not read it, and an application that merged the relay's scripts into
its own history keeps the revision in its own version table, whose name the relay does not
know. The catalog can: ``obj_description`` is readable by any role, and the comment moves
with the scripts whichever way they are applied (``relay migrate``, the application's
``alembic upgrade heads``, or ``relay migrate --sql``).

Every later revision sets the comment to its own id (``relay.migrate.schema_marker``), and a
test checks that the head's marker names the head.

Revision ID: relay_0005
Revises: relay_0004
Create Date: 2026-12-03 13:40:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "relay_0005"
down_revision: str | None = "relay_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Spelled out rather than imported: a revision script must keep producing the same SQL
# whatever later releases change in the relay's modules.
MARKER = (
    "relay schema relay_0005: the outbox of the AppFunnel relay; relay run and /readyz read the "
    "schema revision from this comment"
)


def upgrade() -> None:
    op.execute(f"COMMENT ON TABLE relay_outbox IS '{MARKER}'")


def downgrade() -> None:
    op.execute("COMMENT ON TABLE relay_outbox IS NULL")
