"""The group roles of migration 0002, proven by connecting as login users that hold them.

Roles are cluster-wide: every login user made here has a unique name and is dropped after its
test, and the group roles themselves are shared by every database migrated on the server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.conninfo import conninfo_to_dict

from relay import queries as q
from relay import record_event
from relay.fakecio import FakeCustomerIO
from relay.migrate import downgrade, upgrade
from relay.retention import purge

KEY = "wk_roles_0123456789abcdef"
EVENT: dict[str, Any] = {
    "id": "evt_roles_1",
    "type": "purchase.complete",
    "occurred_at": "2026-11-28T10:00:00Z",
    "customer": {"id": "cus_42", "email": "ada@example.com"},
    "properties": {"amount": 4999},
}

LoginAs = Callable[[str], str]


def _url(dsn: str, user: str) -> str:
    """``dsn`` as a URL for another user (for DATABASE_URL, which must be a URL)."""
    params = conninfo_to_dict(dsn)
    host, port, dbname = params.get("host", ""), params.get("port", "5432"), params["dbname"]
    if str(host).startswith("/"):
        return f"postgresql://{user}@/{dbname}?host={host}&port={port}"
    return f"postgresql://{user}@{host}:{port}/{dbname}"


@pytest.fixture
def login_as(dsn: str) -> Iterator[LoginAs]:
    """``login_as("relay_app")``: a new LOGIN user granted that role; returns its DSN."""
    made: list[str] = []

    def make(role: str) -> str:
        name = f"relay_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            made.append(name)
            admin.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(name))
            )
        return _url(dsn, name)

    yield make
    with psycopg.connect(dsn, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def _denied(user_dsn: str, statement: str, params: Any = None) -> bool:
    """True when ``statement`` fails with "permission denied" for this user."""
    with psycopg.connect(user_dsn) as conn:
        try:
            conn.execute(statement, params)
        except errors.InsufficientPrivilege:
            return True
    return False


def _seed(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        record_event(conn, EVENT)
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, write_key)"
            " VALUES ('prj_1', 'us', %s)",
            (KEY,),
        )


def _relay(database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "CUSTOMERIO_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env={**clean, "DATABASE_URL": database_url, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_three_group_roles_exist_and_cannot_log_in(dsn: str) -> None:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT rolname, rolcanlogin FROM pg_roles"
            " WHERE rolname IN ('relay_app', 'relay_worker', 'relay_operator') ORDER BY rolname"
        ).fetchall()
    assert rows == [("relay_app", False), ("relay_operator", False), ("relay_worker", False)]


def test_app_can_record_events_and_read_nothing_else(dsn: str, login_as: LoginAs) -> None:
    _seed(dsn)
    app = login_as("relay_app")

    with psycopg.connect(app) as conn:
        first = record_event(conn, {**EVENT, "id": "evt_roles_2"})
        again = record_event(conn, {**EVENT, "id": "evt_roles_2"})
    assert first.written == 2 and again.skipped == "duplicate"

    # message_id is the only readable column: ON CONFLICT (message_id) and RETURNING need it.
    with psycopg.connect(app) as conn:
        assert len(conn.execute("SELECT message_id FROM relay_outbox").fetchall()) == 4
    for statement in (
        "SELECT body FROM relay_outbox",
        "SELECT customer_key FROM relay_outbox",
        "SELECT * FROM relay_outbox",
        "SELECT * FROM relay_destination",
        "SELECT project_id FROM relay_destination",
        "SELECT * FROM relay_attempt",
        "SELECT * FROM relay_status",
        "SELECT * FROM relay_message_history",
        "SELECT * FROM relay_dead_messages",
        "UPDATE relay_outbox SET state = 'cancelled'",
        "DELETE FROM relay_outbox",
        "UPDATE relay_destination SET enabled = false",
    ):
        assert _denied(app, statement), statement


def test_operator_reads_views_and_destinations_without_keys_and_changes_nothing(
    dsn: str, login_as: LoginAs
) -> None:
    _seed(dsn)
    operator = login_as("relay_operator")

    with psycopg.connect(operator) as conn:
        status = conn.execute("SELECT destination, pending FROM relay_status").fetchall()
        history = conn.execute("SELECT id, attempt_id FROM relay_message_history").fetchall()
        conn.execute("SELECT * FROM relay_dead_messages").fetchall()
        conn.execute("SELECT body FROM relay_outbox").fetchall()
        conn.execute("SELECT * FROM relay_attempt").fetchall()
        destinations = conn.execute(
            "SELECT project_id, region, api_url, enabled, paused_at, paused_reason, updated_at"
            " FROM relay_destination"
        ).fetchall()
    assert status == [("default", 2)]
    assert len(history) == 2
    assert [d[0] for d in destinations] == ["prj_1"]
    for statement in (
        "SELECT write_key FROM relay_destination",
        "SELECT * FROM relay_destination",
        "UPDATE relay_outbox SET state = 'cancelled'",
        "UPDATE relay_destination SET enabled = false",
        "INSERT INTO relay_attempt (relay_instance, destination, started_at, latency_ms,"
        " outcome, request_bytes, message_count, message_ids)"
        " VALUES ('x', 'x', now(), 1, 'delivered', 1, 1, '{1}')",
        "DELETE FROM relay_outbox",
    ):
        assert _denied(operator, statement), statement


def test_operator_commands_work_read_only(dsn: str, login_as: LoginAs) -> None:
    _seed(dsn)
    operator = login_as("relay_operator")

    assert _relay(operator, "status", "--json").returncode == 0
    assert _relay(operator, "inspect", "cus_42").returncode == 0
    listed = _relay(operator, "destinations", "list")
    assert listed.returncode == 0, listed.stderr
    assert "(not readable by this role)" in listed.stdout and KEY not in listed.stdout

    for command in (["cancel", "--all"], ["purge", "--older-than", "1s"]):
        refused = _relay(operator, *command)
        assert refused.returncode == 1, command
        assert "permission denied" in refused.stderr and "Traceback" not in refused.stderr


def test_worker_runs_the_daemons_statements(dsn: str, login_as: LoginAs) -> None:
    _seed(dsn)
    worker = login_as("relay_worker")

    with psycopg.connect(worker) as conn:
        conn.execute(q.SESSION_ASYNC_COMMIT)
        heads = conn.execute(q.OUTBOX_CLAIM_HEADS, {"customers": 10}).fetchall()
        followers = conn.execute(
            q.OUTBOX_CLAIM_FOLLOWERS,
            {
                "head_ids": [h[0] for h in heads],
                "customer_keys": [h[1] for h in heads],
                "per_customer": 10,
            },
        ).fetchall()
        ids = [f[0] for f in followers]
        conn.execute(
            q.OUTBOX_CLAIM_MARK,
            {
                "ids": ids,
                "states": ["in_flight"] * len(ids),
                "into_ids": [None] * len(ids),
                "bodies": "[" + ",".join(["null"] * len(ids)) + "]",
                "errors": [None] * len(ids),
                "owner": "w1",
                "token": 7,
                "lease_s": 30,
            },
        )
        renewed = conn.execute(
            q.OUTBOX_EXTEND_LEASE, {"ids": sorted(ids), "tokens": [7], "lease_s": 30}
        ).fetchall()
        assert sorted(r[0] for r in renewed) == sorted(ids)
        conn.commit()
        conn.execute(
            q.ATTEMPT_INSERT,
            {
                "relay_instance": "w1",
                "destination": "default",
                "started_at": "2026-11-29T10:00:00Z",
                "latency_ms": 10.0,
                "status_code": 200,
                "outcome": "delivered",
                "error": None,
                "response_snippet": "{}",
                "request_bytes": 100,
                "message_count": len(ids),
                "message_ids": ids,
            },
        )
        conn.execute(
            q.OUTBOX_RECORD_OUTCOMES,
            {
                "ids": ids,
                "states": ["delivered"] * len(ids),
                "attempted": [1] * len(ids),
                "delays": [0.0] * len(ids),
                "errors": [None] * len(ids),
                "token": 7,
            },
        )
        conn.execute(q.THROTTLE_SET, {"destination": "default", "pause_s": 0.0, "reason": "429"})
        conn.execute(q.THROTTLE_ACTIVE).fetchall()
        conn.execute(q.DESTINATION_LIST_WITH_KEY).fetchall()
        conn.execute(
            q.DESTINATION_PAUSE, {"project_id": "prj_1", "write_key": KEY, "reason": "401"}
        )
        conn.commit()
    assert len(ids) == 2
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT DISTINCT state FROM relay_outbox").fetchall() == [
            ("delivered",)
        ]
        assert conn.execute("SELECT paused_reason FROM relay_destination").fetchall() == [("401",)]

    # The retention purge and the operator's write commands run as the worker too.
    assert purge(worker, 1e-6) == {"messages": 2, "attempts": 1}
    assert _relay(worker, "retry", "--all").returncode == 0
    # Creating a destination stays with the schema owner.
    assert _denied(
        worker,
        "INSERT INTO relay_destination (project_id, region, write_key) VALUES ('p', 'us', 'k')",
    )


def test_worker_runs_the_relay_daemon(dsn: str, login_as: LoginAs) -> None:
    _seed(dsn)
    worker = login_as("relay_worker")
    cio = FakeCustomerIO(write_keys={KEY}).start()
    try:
        done = _relay(
            worker,
            "run",
            "--drain",
            "--timeout",
            "60",
            CUSTOMERIO_WRITE_KEY=KEY,
            CUSTOMERIO_API_URL=cio.url,
        )
    finally:
        cio.stop()
    assert done.returncode == 0, done.stderr
    assert len(cio.accepted_message_ids()) == 2


def test_migration_is_safe_when_the_roles_exist_and_keeps_them_on_downgrade(
    empty_dsn: str,
) -> None:
    # The session's template database was migrated already, so the roles exist and are used.
    def grants() -> list[tuple[str, str]]:
        with psycopg.connect(empty_dsn) as conn:
            return conn.execute(
                "SELECT grantee, privilege_type FROM information_schema.role_table_grants"
                " WHERE table_name = 'relay_outbox' AND grantee LIKE 'relay\\_%'"
                " ORDER BY 1, 2"
            ).fetchall()

    def roles() -> int:
        with psycopg.connect(empty_dsn) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_roles"
                " WHERE rolname IN ('relay_app', 'relay_worker', 'relay_operator')"
            ).fetchone()
        assert row is not None
        return int(row[0])

    upgrade(empty_dsn)
    assert ("relay_app", "INSERT") in grants()
    downgrade(empty_dsn, "relay_0001")
    assert grants() == []
    assert roles() == 3  # other databases still use them
    upgrade(empty_dsn)
    assert ("relay_worker", "DELETE") in grants()
    assert ("relay_operator", "SELECT") in grants()
