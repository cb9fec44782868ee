"""Operator views and the three group roles.

Views (read by ``relay status`` / ``relay inspect`` and by anyone with psql):
- relay_status: message counts per destination and state, oldest undelivered age and lag.
- relay_message_history: one row per (message, attempt that carried it); messages never
  attempted appear once with NULL attempt columns.
- relay_dead_messages: the dead-letter list.

Roles (NOLOGIN groups; a DBA grants them to login users, e.g. ``GRANT relay_app TO web``):
- relay_app: INSERT on relay_outbox, plus SELECT on its message_id column only, because
  ``INSERT ... ON CONFLICT (message_id) DO NOTHING RETURNING message_id`` (record_event)
  needs it for the arbiter index and the RETURNING list. It reads no bodies, no customers and
  no destination. No sequence privilege: identity columns draw their values without one.
- relay_worker: what the daemon runs: SELECT, INSERT, UPDATE, DELETE on relay_outbox and
  relay_attempt (DELETE for the retention purge), SELECT and UPDATE on relay_destination (it
  pauses a destination on 401/403). Creating destinations stays with the schema owner.
- relay_operator: read-only: the three views, relay_outbox, relay_attempt, and every column of
  relay_destination except write_key (column-level grant: a column added later must be granted
  by the migration that adds it).
Each role also gets USAGE on the schema holding the tables (no data access by itself).

Roles are cluster-wide while this migration runs per database (an application may have several
databases, and the tests copy a migrated template many times), so roles are created only when
missing, concurrent creation is tolerated, and a user without CREATEROLE gets a WARNING and no
grants for the missing role instead of a failed migration. The downgrade revokes what was
granted here and drops a role only when nothing else in the cluster uses it (grants in other
databases, members).

Revision ID: relay_0002
Revises: relay_0001
Create Date: 2026-11-29 18:02:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "relay_0002"
down_revision: str | None = "relay_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLES = ("relay_app", "relay_worker", "relay_operator")

_ROLE_COMMENTS = {
    "relay_app": "AppFunnel outbox: may record events (INSERT into relay_outbox), nothing else",
    "relay_worker": "AppFunnel relay daemon: claims, delivers and purges outbox messages",
    "relay_operator": "AppFunnel relay: read-only operators (views; destinations without keys)",
}

# Grants per role, besides USAGE on the schema that holds relay_outbox.
_GRANTS = {
    "relay_app": [
        "GRANT INSERT ON relay_outbox TO relay_app",
        "GRANT SELECT (message_id) ON relay_outbox TO relay_app",
    ],
    "relay_worker": [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON relay_outbox, relay_attempt TO relay_worker",
        "GRANT SELECT, UPDATE ON relay_destination TO relay_worker",
    ],
    "relay_operator": [
        "GRANT SELECT ON relay_status, relay_message_history, relay_dead_messages,"
        " relay_outbox, relay_attempt TO relay_operator",
        "GRANT SELECT (project_id, region, api_url, enabled, paused_at, paused_reason,"
        " updated_at) ON relay_destination TO relay_operator",
    ],
}

_VIEWS = {
    # Exact counts, so it reads every row of relay_outbox: fine for an operator's glance, too
    # heavy for a tight loop on a large history (the daemon's metrics read the partial indexes).
    "relay_status": """
        CREATE VIEW relay_status AS
        SELECT coalesce(project_id, 'default') AS destination,
               count(*) FILTER (WHERE state = 'pending') AS pending,
               count(*) FILTER (WHERE state = 'in_flight') AS in_flight,
               count(*) FILTER (WHERE state = 'retrying') AS retrying,
               count(*) FILTER (WHERE state = 'held') AS held,
               count(*) FILTER (WHERE state = 'delivered') AS delivered,
               count(*) FILTER (WHERE state = 'coalesced') AS coalesced,
               count(*) FILTER (WHERE state = 'dead') AS dead,
               count(*) FILTER (WHERE state = 'cancelled') AS cancelled,
               count(*) AS total,
               extract(epoch FROM now() - min(created_at) FILTER (
                   WHERE state IN ('pending', 'retrying', 'in_flight', 'held')))::float8
                   AS oldest_undelivered_age_s,
               extract(epoch FROM now() - min(created_at) FILTER (
                   WHERE state IN ('pending', 'retrying')))::float8 AS lag_s
        FROM relay_outbox
        GROUP BY coalesce(project_id, 'default')
    """,
    # Filter it by customer_key or id: the planner pushes the filter into relay_outbox
    # (relay_outbox_customer_key_idx) and probes relay_attempt_message_ids_idx (GIN) per message.
    "relay_message_history": """
        CREATE VIEW relay_message_history AS
        SELECT m.id, m.message_id, m.customer_key, m.project_id, m.event_id, m.event_type,
               m.kind, m.state, m.attempts, m.created_at, m.updated_at, m.delivered_at,
               m.last_error, m.coalesced_into, m.requeued_by, m.requeued_at,
               a.id AS attempt_id, a.started_at, a.status_code, a.outcome,
               a.error AS attempt_error, a.latency_ms, a.relay_instance
        FROM relay_outbox m
        LEFT JOIN relay_attempt a ON a.message_ids @> ARRAY[m.id]
    """,
    # Served by relay_outbox_dead_idx (partial: state = 'dead').
    "relay_dead_messages": """
        CREATE VIEW relay_dead_messages AS
        SELECT id, message_id, customer_key, project_id, event_type, kind, attempts,
               last_error, created_at, updated_at, requeued_by, requeued_at
        FROM relay_outbox
        WHERE state = 'dead'
    """,
}

_VIEW_COMMENTS = {
    "relay_status": (
        "Messages per destination (project_id; NULL shown as default) and state; "
        "oldest_undelivered_age_s: oldest pending/retrying/in-flight/held message; "
        "lag_s: oldest pending/retrying message."
    ),
    "relay_message_history": (
        "One row per (message, attempt that carried it); attempt columns are NULL for a "
        "message never attempted. Filter by customer_key or id."
    ),
    "relay_dead_messages": (
        "Dead messages (attempt or age limit reached, or rejected by Customer.io); "
        "re-queue with relay retry."
    ),
}


# The DO blocks hold no % (no format(), no RAISE placeholders): printed offline by an
# application's env.py that keeps psycopg's pyformat paramstyle, each % would come out doubled.
# schema_name is regnamespace::text, already quoted where the name needs it.


def _create_role(role: str) -> str:
    # IF NOT EXISTS makes a second database (or a re-run) a no-op; the handler covers two
    # migrations creating the role at the same moment, and a user who may not create roles.
    return f"""
    DO $$
    BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
            BEGIN
                CREATE ROLE {role} NOLOGIN;
                COMMENT ON ROLE {role} IS '{_ROLE_COMMENTS[role]}';
            EXCEPTION
                WHEN duplicate_object OR unique_violation THEN
                    NULL;
                WHEN insufficient_privilege THEN
                    RAISE WARNING USING MESSAGE = 'role {role} is missing and ' || current_user
                        || ' may not create it: its grants are skipped (create it, then grant as migration relay_0002 does)';
            END;
        END IF;
    END $$
    """


def _grant(role: str) -> str:
    statements = "\n".join(f"            {stmt};" for stmt in _GRANTS[role])
    return f"""
    DO $$
    DECLARE
        schema_name text := (SELECT relnamespace::regnamespace::text
                             FROM pg_class WHERE oid = 'relay_outbox'::regclass);
    BEGIN
        IF EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
            EXECUTE 'GRANT USAGE ON SCHEMA ' || schema_name || ' TO {role}';
{statements}
        END IF;
    END $$
    """


def _revoke_and_drop(role: str) -> str:
    # REVOKE ALL on a table also revokes its column grants. The role is dropped only when no
    # other database holds grants to it and no user is a member (the membership the creating
    # user holds on PostgreSQL 16+ does not count); otherwise it stays for the others.
    return f"""
    DO $$
    DECLARE
        schema_name text := (SELECT relnamespace::regnamespace::text
                             FROM pg_class WHERE oid = 'relay_outbox'::regclass);
        role_oid oid := (SELECT oid FROM pg_roles WHERE rolname = '{role}');
    BEGIN
        IF role_oid IS NULL THEN
            RETURN;
        END IF;
        REVOKE ALL ON relay_outbox, relay_attempt, relay_destination FROM {role};
        EXECUTE 'REVOKE USAGE ON SCHEMA ' || schema_name || ' FROM {role}';
        IF EXISTS (SELECT FROM pg_shdepend
                   WHERE refclassid = 'pg_authid'::regclass AND refobjid = role_oid)
           OR EXISTS (SELECT FROM pg_auth_members
                      WHERE roleid = role_oid
                        AND member <> (SELECT oid FROM pg_roles WHERE rolname = current_user))
        THEN
            RAISE NOTICE 'role {role} is kept: other databases or users still use it';
            RETURN;
        END IF;
        BEGIN
            DROP ROLE {role};
        EXCEPTION
            WHEN dependent_objects_still_exist OR insufficient_privilege THEN
                RAISE NOTICE USING MESSAGE = 'role {role} is kept: ' || SQLERRM;
        END;
    END $$
    """


def upgrade() -> None:
    for name, ddl in _VIEWS.items():
        op.execute(ddl)
        op.execute(f"COMMENT ON VIEW {name} IS '{_VIEW_COMMENTS[name]}'")
    for role in ROLES:
        op.execute(_create_role(role))
        op.execute(_grant(role))


def downgrade() -> None:
    # Views first: REVOKE ALL below names only the tables.
    for name in reversed(list(_VIEWS)):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    for role in reversed(ROLES):
        op.execute(_revoke_and_drop(role))
