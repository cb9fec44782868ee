"""Column privileges: each role may write only the columns its own statements write.

Migration 0002 granted table-wide INSERT to relay_app and table-wide UPDATE on
relay_destination to relay_worker; 0003 granted relay_worker every write on relay_throttle.
Each was more than the role's statements need, and each extra column was a way to break the
relay from a credential meant for something smaller:

- relay_app could choose any column of a new outbox row. A row inserted as ``in_flight`` has no
  lease, so the rescue never takes it: it blocks its customer for good, ``relay run --drain``
  never finishes, and ``relay cancel`` / ``relay retry`` (pending, retrying, held, dead) cannot
  clear it. An explicit ``id`` takes a value the identity sequence hands out later, and that
  later insert fails. ``attempts``, ``next_attempt_at``, ``created_at`` or ``lease_*`` would fake
  a delivery history. relay_app now inserts only the columns the application writes (the
  README's plain-SQL INSERT and ``OUTBOX_INSERT_MESSAGES``, which ``record_event`` runs):
  message_id, event_id, kind, customer_key, project_id, event_type, body, occurred_at. Every
  other column takes its default, so every new row is ``pending``, due now, never attempted.
  It keeps SELECT on message_id alone (ON CONFLICT (message_id) and RETURNING message_id).
- relay_worker could rewrite a destination's region, api_url and write_key: a stolen relay
  credential could send every message, keys included, to a server of its choosing. It now
  updates only paused_at, paused_reason and updated_at (``DESTINATION_PAUSE``, on a 401/403)
  and enabled (``DESTINATION_SET_ENABLED``: ``relay destinations enable|disable``), none of which
  moves traffic anywhere. Changing where a destination points (``relay destinations set``)
  stays with the schema owner; relay_operator stays read-only and still cannot read write_key.
- relay_worker on relay_throttle: INSERT (destination, resume_at, reason) and UPDATE
  (resume_at, reason, updated_at), what ``THROTTLE_SET`` writes; no statement deletes from it.

Roles are cluster-wide and this runs per database: a role that does not exist here is skipped
with a WARNING, as in 0002. REVOKE of a table privilege also revokes that privilege's column
grants, so each change is "revoke the privilege, grant it on the columns". A privilege the
role still holds afterwards (granted by someone other than the table owner, or inherited from
another role) is reported as a WARNING naming the column. The downgrade restores the grants
of 0002 and 0003.

Revision ID: relay_0004
Revises: relay_0003
Create Date: 2026-12-08 10:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "relay_0004"
down_revision: str | None = "relay_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The application's columns: README.md "From SQL" and relay.queries.OUTBOX_INSERT_MESSAGES.
APP_INSERT_COLUMNS = (
    "message_id",
    "event_id",
    "kind",
    "customer_key",
    "project_id",
    "event_type",
    "body",
    "occurred_at",
)
# What the relays write to a destination: DESTINATION_PAUSE and DESTINATION_SET_ENABLED.
WORKER_DESTINATION_UPDATE_COLUMNS = ("enabled", "paused_at", "paused_reason", "updated_at")
# THROTTLE_SET: the inserted columns, then the ones its ON CONFLICT DO UPDATE sets.
WORKER_THROTTLE_INSERT_COLUMNS = ("destination", "resume_at", "reason")
WORKER_THROTTLE_UPDATE_COLUMNS = ("resume_at", "reason", "updated_at")

# Per role: the statements of the upgrade and those of the downgrade.
_UPGRADE: dict[str, list[str]] = {
    "relay_app": [
        "REVOKE INSERT ON relay_outbox FROM relay_app",
        f"GRANT INSERT ({', '.join(APP_INSERT_COLUMNS)}) ON relay_outbox TO relay_app",
    ],
    "relay_worker": [
        "REVOKE UPDATE ON relay_destination FROM relay_worker",
        f"GRANT UPDATE ({', '.join(WORKER_DESTINATION_UPDATE_COLUMNS)}) ON relay_destination"
        " TO relay_worker",
        "REVOKE INSERT, UPDATE, DELETE ON relay_throttle FROM relay_worker",
        f"GRANT INSERT ({', '.join(WORKER_THROTTLE_INSERT_COLUMNS)}),"
        f" UPDATE ({', '.join(WORKER_THROTTLE_UPDATE_COLUMNS)}) ON relay_throttle TO relay_worker",
    ],
}

_DOWNGRADE: dict[str, list[str]] = {
    "relay_app": [
        "REVOKE INSERT ON relay_outbox FROM relay_app",
        "GRANT INSERT ON relay_outbox TO relay_app",
    ],
    "relay_worker": [
        "REVOKE UPDATE ON relay_destination FROM relay_worker",
        "GRANT UPDATE ON relay_destination TO relay_worker",
        "REVOKE INSERT, UPDATE, DELETE ON relay_throttle FROM relay_worker",
        "GRANT INSERT, UPDATE, DELETE ON relay_throttle TO relay_worker",
    ],
}

# What each role must not hold once upgraded: (table, privilege, columns), where no columns
# means any column of the table.
_MUST_NOT_HOLD: dict[str, list[tuple[str, str, tuple[str, ...]]]] = {
    "relay_app": [
        (
            "relay_outbox",
            "INSERT",
            (
                "id",
                "state",
                "attempts",
                "next_attempt_at",
                "created_at",
                "updated_at",
                "lease_owner",
                "lease_expires_at",
                "lease_token",
                "delivered_at",
                "last_error",
                "coalesced_into",
                "requeued_by",
                "requeued_at",
            ),
        )
    ],
    "relay_worker": [
        ("relay_destination", "UPDATE", ("project_id", "region", "api_url", "write_key")),
        ("relay_destination", "INSERT", ()),
        ("relay_throttle", "DELETE", ()),
    ],
}


def _check(role: str, table: str, privilege: str, columns: tuple[str, ...]) -> str:
    # has_*_privilege answers for the role as the server does: grants from any grantor,
    # table-wide or per column, and those inherited through membership.
    if not columns:
        # DELETE exists only table-wide; INSERT and UPDATE may also be held on one column.
        test = "has_table_privilege" if privilege == "DELETE" else "has_any_column_privilege"
        return f"""
        IF {test}('{role}', '{table}', '{privilege}') THEN
            RAISE WARNING 'role {role} still holds {privilege} on {table}: revoke it';
        END IF;"""
    listed = ", ".join(f"'{c}'" for c in columns)
    return f"""
        FOREACH col IN ARRAY ARRAY[{listed}] LOOP
            IF has_column_privilege('{role}', '{table}', col, '{privilege}') THEN
                RAISE WARNING USING
                    MESSAGE = 'role {role} still holds {privilege} on {table}.' || col
                              || ': revoke it';
            END IF;
        END LOOP;"""


def _apply(role: str, statements: list[str], checks: bool) -> str:
    missing = (
        f"role {role} is missing: its grants are skipped"
        " (create it, then grant as migrations 0002 to 0004 do)"
    )
    body = "\n".join(f"        {stmt};" for stmt in statements)
    if checks:
        body += "".join(_check(role, *check) for check in _MUST_NOT_HOLD[role])
    return f"""
    DO $$
    DECLARE
        col text;
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
            RAISE WARNING '{missing}';
            RETURN;
        END IF;
{body}
    END $$
    """


def upgrade() -> None:
    for role, statements in _UPGRADE.items():
        op.execute(_apply(role, statements, checks=True))


def downgrade() -> None:
    for role, statements in _DOWNGRADE.items():
        op.execute(_apply(role, statements, checks=False))
