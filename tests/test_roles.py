"""The group roles of migrations 0002 to 0004, proven by connecting as login users that hold
them, and by running the relay and its commands as those users.

Roles are cluster-wide: every login user made here has a unique name and is dropped after its
test, and the group roles themselves are shared by every database migrated on the server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from psycopg import errors

from relay import queries as q
from relay import record_event
from relay.limits import MAX_MESSAGE_BYTES
from relay.migrate import downgrade, head_revision, upgrade
from relay.models.states import UNFINISHED_STATES
from relay.retention import purge
from relay.service import drain
from relay.testing.fakecio import FakeCustomerIO
from tests.conftest import LoginAs
from tests.relay_helpers import KEY as DEFAULT_KEY
from tests.relay_helpers import make_relay

KEY = "wk_roles_0123456789abcdef"
EVENT: dict[str, Any] = {
    "id": "evt_roles_1",
    "type": "purchase.complete",
    "occurred_at": "2026-11-28T10:00:00Z",
    "customer": {"id": "cus_42", "email": "ada@example.com"},
    "properties": {"amount": 4999},
}


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


# The columns an application writes (README.md "From SQL", OUTBOX_INSERT_MESSAGES); every
# other column of relay_outbox is the relay's and takes its default on insert.
APP_COLUMNS = "message_id, event_id, kind, customer_key, project_id, event_type, body, occurred_at"


def _readme_insert() -> str:
    """The plain-SQL INSERT of README.md's "From SQL" section, as documented."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### From SQL", 1)[1]
    match = re.search(r"```sql\n(.*?)```", section, re.S)
    assert match is not None, "README.md: no sql block under From SQL"
    return match.group(1)


def _app_insert(
    user_dsn: str, rows: list[tuple[str, str, str | None, str]], prefix: str = "m"
) -> None:
    """As ``user_dsn``, the application's INSERT of (kind, customer_key, project_id, body
    as JSON text) rows, in order: message ids ``{prefix}0``, ``{prefix}1``..."""
    with psycopg.connect(user_dsn) as conn:
        for n, (kind, customer, project, body) in enumerate(rows):
            conn.execute(
                f"INSERT INTO relay_outbox ({APP_COLUMNS})"
                " VALUES (%s, %s, %s, %s, %s, 'page.view', %s::jsonb, now())",
                (f"{prefix}{n}", f"evt_{prefix}{n}", kind, customer, project, body),
            )


def _rows(dsn: str) -> dict[str, tuple[str, str | None]]:
    """message_id -> (state, last_error) of every outbox row."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT message_id, state, last_error FROM relay_outbox").fetchall()
    return {m: (state, error) for m, state, error in rows}


def _unfinished(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM relay_outbox WHERE state = ANY(%s)", (list(UNFINISHED_STATES),)
        ).fetchone()
    assert row is not None
    return int(row[0])


def _track(user: str, **extra: Any) -> str:
    return json.dumps({"type": "track", "userId": user, "event": "Page Viewed", **extra})


def _identify(user: str, **extra: Any) -> str:
    return json.dumps({"type": "identify", "userId": user, "traits": {"plan": "pro"}, **extra})


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

    # message_id and occurred_at are the only readable columns: ON CONFLICT (message_id,
    # occurred_at) and RETURNING need them.
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


def test_app_inserts_only_the_applications_columns(dsn: str, login_as: LoginAs) -> None:
    app = login_as("relay_app")

    # The README's plain-SQL INSERT, as written there, and record_event both still work.
    with psycopg.connect(app) as conn:
        conn.execute(_readme_insert())
        recorded = record_event(conn, EVENT)
    assert recorded.written == 2
    with psycopg.connect(dsn) as conn:
        written = conn.execute(
            "SELECT message_id, state, attempts, lease_owner, lease_expires_at, lease_token,"
            " next_attempt_at <= now() FROM relay_outbox ORDER BY id"
        ).fetchall()
    assert written[0][0] == "evt_42:track"
    assert {w[1:] for w in written} == {("pending", 0, None, None, None, True)}

    # Every other column is the relay's: naming one in an INSERT is refused, whatever value.
    base = (
        "'evt_x:track', 'evt_x', 'track', 'cus_x', NULL, 'page.view',"
        ' \'{"type":"track","userId":"cus_x","event":"x"}\', now()'
    )
    for column, value in (
        ("state", "'in_flight'"),
        ("id", "1000000"),
        ("attempts", "3"),
        ("next_attempt_at", "'2999-01-01'"),
        ("created_at", "'2000-01-01'"),
        ("updated_at", "now()"),
        ("lease_owner", "'relay-1'"),
        ("lease_expires_at", "'2999-01-01'"),
        ("lease_token", "7"),
        ("delivered_at", "now()"),
        ("last_error", "'x'"),
        ("coalesced_into", "1"),
        ("requeued_by", "'x'"),
        ("requeued_at", "now()"),
    ):
        statement = f"INSERT INTO relay_outbox ({APP_COLUMNS}, {column}) VALUES ({base}, {value})"
        assert _denied(app, statement), column
    # Nor can a conflicting insert rewrite the existing row.
    assert _denied(
        app,
        f"INSERT INTO relay_outbox ({APP_COLUMNS}) VALUES ({base.replace('evt_x', 'evt_42')})"
        " ON CONFLICT (message_id, occurred_at) DO UPDATE SET state = 'in_flight'",
    )
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM relay_outbox").fetchone()
    assert row == (3,)


def test_every_row_the_app_can_write_is_delivered_dead_or_cleared(
    dsn: str, login_as: LoginAs
) -> None:
    """Whatever an application writes with its columns, the relay delivers it, marks it dead
    with a reason naming the field, or holds it where `relay cancel` clears it."""
    app, worker = login_as("relay_app"), login_as("relay_worker")
    big = "x" * MAX_MESSAGE_BYTES
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_destination (project_id, region, write_key, enabled)"
            " VALUES ('prj_off', 'us', %s, false)",
            (KEY,),
        )
    _app_insert(
        app,
        [
            ("track", "cus_ok", None, _track("cus_ok")),
            ("identify", "cus_id", None, _identify("cus_id")),
            ("track", "cus_array", None, "[1, 2]"),
            ("identify", "cus_kind", None, _track("cus_kind")),
            ("track", "cus_nouser", None, json.dumps({"type": "track", "event": "x"})),
            ("track", "cus_time", None, _track("cus_time", timestamp="yesterday")),
            ("identify", "cus_traits", None, _identify("cus_traits", traits=[1])),
            ("track", "cus_big", None, _track("cus_big", properties={"s": big})),
            ("track", "cus_ctx", None, _track("cus_ctx", context="not an object")),
            # prj_off's destination is disabled: held (a drain reports it, does not wait).
            ("track", "cus_held", "prj_off", _track("cus_held")),
        ],
    )
    cio = FakeCustomerIO(write_keys={DEFAULT_KEY}).start()
    try:
        ok, _ = drain(make_relay(worker, cio), 30)
        assert ok
        after = _rows(dsn)
        assert after["m0"] == ("delivered", None)
        assert after["m1"] == ("delivered", None)
        for message, words in (
            ("m2", "JSON array"),
            ("m3", "'type'"),
            ("m4", "'userId'"),
            ("m5", "'timestamp'"),
            ("m6", "'traits'"),
            ("m7", f"{MAX_MESSAGE_BYTES}-byte limit"),
            ("m8", "'context' must be an object"),
        ):
            state, error = after[message]
            assert state == "dead" and error is not None and words in error, (message, error)
        assert after["m9"][0] == "held" and "prj_off" in str(after["m9"][1])

        # The held row is cleared by an operator command run as the worker, and the
        # customer's next message goes out. A dead row can be re-queued (and dies again).
        with psycopg.connect(dsn) as conn:
            ids = dict(conn.execute("SELECT message_id, id FROM relay_outbox").fetchall())
        cancelled = _relay(worker, "cancel", "--id", str(ids["m9"]))
        assert cancelled.returncode == 0 and "cancelled 1 " in cancelled.stdout, cancelled
        retried = _relay(worker, "retry", "--id", str(ids["m3"]))
        assert retried.returncode == 0 and "re-queued 1 " in retried.stdout, retried
        _app_insert(app, [("track", "cus_held", None, _track("cus_held"))], prefix="next")
        ok, _ = drain(make_relay(worker, cio), 30)
        assert ok
    finally:
        cio.stop()
    after = _rows(dsn)
    assert after["m9"][0] == "cancelled"
    assert after["next0"] == ("delivered", None)
    assert after["m3"][0] == "dead" and "'type'" in str(after["m3"][1])
    assert _unfinished(dsn) == 0
    assert sorted(item["userId"] for item in cio.accepted_items()) == [
        "cus_held",
        "cus_id",
        "cus_ok",
    ]


# Bodies jsonb stores but Python's json module will not read back: nested deeper than its
# recursion limit, or an integer longer than its 4,300-digit conversion limit.
_DEEP_TRAITS = '{"a":' * 3000 + "1" + "}" * 3000
_UNPARSABLE = [
    (
        "identify",
        "cus_deep",
        None,
        f'{{"type":"identify","userId":"cus_deep","traits":{_DEEP_TRAITS}}}',
    ),
    (
        "identify",
        "cus_digits",
        None,
        '{"type":"identify","userId":"cus_digits","traits":{"n":1e5000}}',
    ),
    ("track", "cus_fine", None, _track("cus_fine")),
]


def test_a_body_the_relay_cannot_parse_dies_alone(dsn: str, login_as: LoginAs) -> None:
    app, worker = login_as("relay_app"), login_as("relay_worker")
    _app_insert(app, _UNPARSABLE)
    cio = FakeCustomerIO(write_keys={DEFAULT_KEY}).start()
    try:
        ok, _ = drain(make_relay(worker, cio), 5)
    finally:
        cio.stop()
    after = _rows(dsn)
    assert ok
    assert after["m2"] == ("delivered", None)
    assert after["m0"][0] == "dead" and after["m1"][0] == "dead"


def test_a_body_that_stops_the_relay_is_cleared_by_relay_cancel(
    dsn: str, login_as: LoginAs
) -> None:
    app, worker = login_as("relay_app"), login_as("relay_worker")
    _app_insert(app, _UNPARSABLE)
    cio = FakeCustomerIO(write_keys={DEFAULT_KEY}).start()
    try:
        # While the planner fails on these rows, this drain ends at its timeout with every row
        # pending (cus_fine's too: each claim takes all three customers). An operator cancels
        # the two customers' unsent messages, and the relay goes on with the rest.
        drain(make_relay(worker, cio), 3)
        for customer in ("cus_deep", "cus_digits"):
            cancelled = _relay(worker, "cancel", "--customer", customer)
            assert cancelled.returncode == 0, cancelled.stderr
        ok, _ = drain(make_relay(worker, cio), 30)
    finally:
        cio.stop()
    assert ok
    after = _rows(dsn)
    assert after["m2"] == ("delivered", None)
    assert after["m0"][0] in ("cancelled", "dead") and after["m1"][0] in ("cancelled", "dead")
    assert _unfinished(dsn) == 0


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
        "UPDATE relay_destination SET api_url = 'https://elsewhere.example'",
        "UPDATE relay_destination SET write_key = 'wk_other'",
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
        heads = conn.execute(
            q.OUTBOX_CLAIM_HEADS, {"customers": 10, "floor": "-infinity"}
        ).fetchall()
        followers = conn.execute(
            q.OUTBOX_CLAIM_FOLLOWERS,
            {
                "head_ids": [h[0] for h in heads],
                "customer_keys": [h[1] for h in heads],
                "per_customer": 10,
                "floor": "-infinity",
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
                **q.ANY_SPAN,
            },
        )
        renewed = conn.execute(
            q.OUTBOX_EXTEND_LEASE,
            {"ids": sorted(ids), "tokens": [7], "lease_s": 30, **q.ANY_SPAN},
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
                **q.ANY_SPAN,
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
    assert purge(worker, 1e-6) == {
        "messages": 2,
        "attempts": 1,
        "partitions": 0,
        "partition_rows": 0,
    }
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


def test_worker_cannot_redirect_a_destination(dsn: str, login_as: LoginAs) -> None:
    _seed(dsn)
    worker = login_as("relay_worker")

    for statement in (
        "UPDATE relay_destination SET api_url = 'https://attacker.example'",
        "UPDATE relay_destination SET write_key = 'wk_attacker'",
        "UPDATE relay_destination SET region = 'eu'",
        "UPDATE relay_destination SET project_id = 'prj_2'",
        "INSERT INTO relay_destination (project_id, region, write_key) VALUES ('p', 'us', 'k')",
        "DELETE FROM relay_destination",
        "UPDATE relay_throttle SET destination = 'prj_2'",
        "DELETE FROM relay_throttle",
    ):
        assert _denied(worker, statement), statement
    refused = _relay(worker, "destinations", "set", "prj_1", "--region", "eu", "--write-key", "k2")
    assert refused.returncode == 1 and "permission denied" in refused.stderr, refused

    # What the relays and `relay destinations enable|disable` write is still allowed.
    assert _relay(worker, "destinations", "disable", "prj_1").returncode == 0
    assert _relay(worker, "destinations", "enable", "prj_1").returncode == 0
    with psycopg.connect(worker) as conn:
        conn.execute(
            q.DESTINATION_PAUSE, {"project_id": "prj_1", "write_key": KEY, "reason": "HTTP 401"}
        )
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT region, api_url, write_key, enabled, paused_reason FROM relay_destination"
        ).fetchone()
    assert row == ("us", None, KEY, True, "HTTP 401")


def test_worker_relay_delivers_and_pauses_a_destination_on_401(dsn: str, login_as: LoginAs) -> None:
    """The relay run as relay_worker delivers, pauses a destination whose key is refused,
    and the schema owner's `relay destinations set` with a new key resumes it."""
    app, worker = login_as("relay_app"), login_as("relay_worker")
    cio = FakeCustomerIO(write_keys={DEFAULT_KEY}).start()
    try:
        with psycopg.connect(dsn) as conn:
            conn.execute(
                "INSERT INTO relay_destination (project_id, region, api_url, write_key)"
                " VALUES ('prj_1', 'us', %s, 'wk_revoked_0000000000')",
                (cio.url,),
            )
        _app_insert(
            app,
            [
                ("track", "cus_1", None, _track("cus_1")),
                ("track", "cus_2", "prj_1", _track("cus_2")),
            ],
        )
        ok, _ = drain(make_relay(worker, cio), 30)
        assert ok
        assert _rows(dsn)["m0"] == ("delivered", None)
        assert _rows(dsn)["m1"][0] == "held"
        with psycopg.connect(dsn) as conn:
            paused = conn.execute(
                "SELECT paused_reason FROM relay_destination WHERE project_id = 'prj_1'"
            ).fetchone()
        assert paused is not None and "401" in str(paused[0])

        cio.add_write_key(KEY)
        new_key = ["--region", "us", "--api-url", cio.url, "--write-key", KEY]
        changed = _relay(dsn, "destinations", "set", "prj_1", *new_key)
        assert changed.returncode == 0 and "released 1 held" in changed.stdout, changed
        ok, _ = drain(make_relay(worker, cio), 30)
    finally:
        cio.stop()
    assert ok
    assert _rows(dsn)["m1"] == ("delivered", None)
    assert sorted(item["userId"] for item in cio.accepted_items()) == ["cus_1", "cus_2"]


def _privileges(dsn: str) -> dict[str, bool]:
    """The privileges 0004 narrows, as the server answers for each role (inheritance and
    table-wide grants included)."""
    checks = {
        "app INSERT state": "has_column_privilege('relay_app', 'relay_outbox', 'state', 'INSERT')",
        "app INSERT id": "has_column_privilege('relay_app', 'relay_outbox', 'id', 'INSERT')",
        "app INSERT body": "has_column_privilege('relay_app', 'relay_outbox', 'body', 'INSERT')",
        "app SELECT body": "has_column_privilege('relay_app', 'relay_outbox', 'body', 'SELECT')",
        "worker UPDATE api_url": (
            "has_column_privilege('relay_worker', 'relay_destination', 'api_url', 'UPDATE')"
        ),
        "worker UPDATE write_key": (
            "has_column_privilege('relay_worker', 'relay_destination', 'write_key', 'UPDATE')"
        ),
        "worker UPDATE paused_at": (
            "has_column_privilege('relay_worker', 'relay_destination', 'paused_at', 'UPDATE')"
        ),
        "worker DELETE throttle": (
            "has_table_privilege('relay_worker', 'relay_throttle', 'DELETE')"
        ),
        "worker INSERT throttle resume_at": (
            "has_column_privilege('relay_worker', 'relay_throttle', 'resume_at', 'INSERT')"
        ),
        "operator UPDATE enabled": (
            "has_column_privilege('relay_operator', 'relay_destination', 'enabled', 'UPDATE')"
        ),
    }
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT " + ", ".join(checks.values())).fetchone()
    assert row is not None
    return dict(zip(checks, row, strict=True))


NARROWED = {
    "app INSERT state": False,
    "app INSERT id": False,
    "app INSERT body": True,
    "app SELECT body": False,
    "worker UPDATE api_url": False,
    "worker UPDATE write_key": False,
    "worker UPDATE paused_at": True,
    "worker DELETE throttle": False,
    "worker INSERT throttle resume_at": True,
    "operator UPDATE enabled": False,
}
# Migrations 0002 and 0003: table-wide INSERT for the app, UPDATE on destinations and every
# write on relay_throttle for the worker.
WIDE = {
    **NARROWED,
    "app INSERT state": True,
    "app INSERT id": True,
    "worker UPDATE api_url": True,
    "worker UPDATE write_key": True,
    "worker DELETE throttle": True,
}


def test_migration_0004_round_trips(empty_dsn: str) -> None:
    def version() -> str:
        with psycopg.connect(empty_dsn) as conn:
            row = conn.execute("SELECT version_num FROM relay_alembic_version").fetchone()
        assert row is not None
        return str(row[0])

    upgrade(empty_dsn, "relay_0004")
    assert version() == "relay_0004"
    assert _privileges(empty_dsn) == NARROWED
    downgrade(empty_dsn, "relay_0003")
    assert version() == "relay_0003"
    assert _privileges(empty_dsn) == WIDE
    upgrade(empty_dsn)  # the head, later revisions included: they keep 0004's grants
    assert version() == head_revision()
    assert _privileges(empty_dsn) == NARROWED
    # And down past 0002, which revokes everything it granted, then back up.
    downgrade(empty_dsn, "relay_0001")
    upgrade(empty_dsn)
    assert _privileges(empty_dsn) == NARROWED


def test_migration_is_safe_when_the_roles_exist_and_keeps_them_on_downgrade(
    empty_dsn: str,
) -> None:
    # The session's template database was migrated already, so the roles exist and are used.
    def grants() -> list[tuple[str, str]]:
        # Table-wide and column grants alike (relay_app's INSERT is a column grant since 0004).
        with psycopg.connect(empty_dsn) as conn:
            return conn.execute(
                "SELECT grantee, privilege_type FROM information_schema.role_table_grants"
                " WHERE table_name = 'relay_outbox' AND grantee LIKE 'relay\\_%'"
                " UNION SELECT grantee, privilege_type FROM information_schema.column_privileges"
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
