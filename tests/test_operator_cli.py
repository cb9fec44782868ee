"""The operator commands, run as an operator runs them: `python -m relay.cli ...` on a real
database named by DATABASE_URL."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay import record_event

KEY = "wk_live_0123456789abcdefghijklmnop"
CLEAR = "\x1b[H\x1b[2J"


def relay(
    dsn: str | None, *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "CUSTOMERIO_"))
    }
    if dsn is not None:
        full_env["DATABASE_URL"] = dsn
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=full_env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def event(n: int, customer: str, project: str | None = None) -> dict[str, Any]:
    who: dict[str, Any] = {"id": customer, "email": f"{customer}@example.com"}
    if project is not None:
        who["project_id"] = project
    return {
        "id": f"evt_{customer}_{n}",
        "type": "purchase.complete" if n % 2 else "page.view",
        "occurred_at": "2026-11-28T10:00:00Z",
        "customer": who,
        "properties": {"n": n},
    }


def record(dsn: str, customer: str, events: int = 1, project: str | None = None) -> list[int]:
    """Record events; returns the customer's row ids (identify, track per event), oldest first."""
    with psycopg.connect(dsn) as conn:
        for n in range(events):
            record_event(conn, event(n, customer, project))
        conn.commit()
        rows = conn.execute(
            "SELECT id FROM relay_outbox WHERE customer_key = %s ORDER BY id", (customer,)
        ).fetchall()
    return [r[0] for r in rows]


def sql(dsn: str, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def set_state(dsn: str, ids: list[int], state: str, **extra: Any) -> None:
    sets = "".join(f", {k} = %({k})s" for k in extra)
    sql(
        dsn,
        f"UPDATE relay_outbox SET state = %(state)s{sets} WHERE id = ANY(%(ids)s)",
        {"state": state, "ids": ids, **extra},
    )


def states(dsn: str) -> dict[int, str]:
    return {r[0]: r[1] for r in sql(dsn, "SELECT id, state FROM relay_outbox")}


# --- plumbing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["inspect"],
        ["retry"],
        ["cancel"],
        ["destinations"],
        ["destinations", "list"],
        ["destinations", "set"],
        ["destinations", "disable"],
        ["destinations", "enable"],
        ["purge"],
    ],
)
def test_every_command_has_its_own_help(command: list[str]) -> None:
    out = ok(relay(None, *command, "--help"))
    assert out.startswith(f"usage: relay {' '.join(command)}")


def test_without_database_url_a_command_exits_2() -> None:
    done = relay(None, "status")
    assert done.returncode == 2
    assert "DATABASE_URL is not set" in done.stderr


def test_an_unreachable_database_exits_3(dsn: str) -> None:
    done = relay(dsn.replace("/relay_t_", "/relay_missing_"), "status")
    assert done.returncode == 3, done.stderr
    assert "database unavailable" in done.stderr


def test_a_database_without_the_operator_views_is_one_line_not_a_traceback(
    empty_dsn: str,
) -> None:
    from relay.migrate import upgrade

    upgrade(empty_dsn, "relay_0001")
    done = relay(empty_dsn, "status")
    assert done.returncode == 5  # the schema is not this relay's (docs/reference.md)
    assert "relay_status" in done.stderr and "relay migrate" in done.stderr
    assert "Traceback" not in done.stderr


# --- status -----------------------------------------------------------------------------------

STATES = ("pending", "in_flight", "retrying", "held", "delivered", "coalesced", "dead", "cancelled")


def test_status_json_on_an_empty_outbox_has_every_state_at_zero(dsn: str) -> None:
    snap = json.loads(ok(relay(dsn, "status", "--json")))
    assert {s: snap[s] for s in STATES} == dict.fromkeys(STATES, 0)
    assert snap["oldest_pending_age_s"] is None
    assert snap["destinations"] == {}


def _populate_every_state(dsn: str) -> dict[str, int]:
    ids = record(dsn, "cus_a", 4) + record(dsn, "cus_b", 2, project="prj_1")
    # cus_a (default destination): one row in each of the eight states
    for state, row_id in zip(STATES, ids[:8], strict=True):
        set_state(dsn, [row_id], state)
    sql(
        dsn,
        "UPDATE relay_outbox SET created_at = now() - interval '1 hour' WHERE id = %s",
        (ids[0],),
    )
    # cus_b (prj_1): all four pending
    return dict(zip(STATES, ids[:8], strict=True))


def test_status_json_counts_each_state_and_destination(dsn: str) -> None:
    _populate_every_state(dsn)
    sql(
        dsn,
        "INSERT INTO relay_destination (project_id, region, write_key, paused_at, paused_reason)"
        " VALUES ('prj_1', 'us', %s, now(), '401 Unauthorized'), ('prj_2', 'eu', %s, NULL, NULL)",
        (KEY, KEY),
    )
    snap = json.loads(ok(relay(dsn, "status", "--json")))

    assert {s: snap[s] for s in STATES} == {**dict.fromkeys(STATES, 1), "pending": 5}
    assert snap["total"] == 12
    # The pending row backdated an hour is the oldest waiting message.
    assert 3590 <= snap["oldest_pending_age_s"] < 3700
    assert snap["oldest_undelivered_age_s"] >= snap["oldest_pending_age_s"]
    default, prj_1, prj_2 = (snap["destinations"][n] for n in ("default", "prj_1", "prj_2"))
    assert {s: default[s] for s in STATES} == dict.fromkeys(STATES, 1)
    assert default["configured"] is False
    assert prj_1["pending"] == 4 and prj_1["total"] == 4 and prj_1["lag_s"] is not None
    assert prj_1["paused_reason"] == "401 Unauthorized" and prj_1["enabled"] is True
    assert prj_2["total"] == 0 and prj_2["configured"] is True and prj_2["paused_reason"] is None
    assert KEY not in json.dumps(snap)


def test_status_text_is_a_table_with_totals(dsn: str) -> None:
    _populate_every_state(dsn)
    out = ok(relay(dsn, "status"))
    header, default, prj_1, total = out.splitlines()[:4]
    assert header.split()[:3] == ["DESTINATION", "PENDING", "IN"]  # IN FLIGHT
    assert default.split()[:9] == ["default", *["1"] * 8]
    assert prj_1.split()[:2] == ["prj_1", "4"]
    assert total.split()[:2] == ["TOTAL", "5"]
    assert "oldest message waiting to be sent: 1h 0m" in out
    assert "1 held messages" in out and "1 dead messages" in out


def _watch(dsn: str, *args: str, until: Callable[[str], bool]) -> tuple[str, int]:
    """Run `relay status --watch ...` until its output satisfies ``until``, then Ctrl-C it;
    returns (output so far, exit status)."""
    env = {**os.environ, "DATABASE_URL": dsn}
    chunks: queue.Queue[str] = queue.Queue()
    with subprocess.Popen(
        [sys.executable, "-m", "relay.cli", "status", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as proc:
        stdout = proc.stdout
        assert stdout is not None

        def pump() -> None:
            while chunk := stdout.read(1):
                chunks.put(chunk)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        seen = ""
        deadline = time.monotonic() + 20
        try:
            while not until(seen) and time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    seen += chunks.get(timeout=0.5)
        finally:
            proc.send_signal(signal.SIGINT)
            code = proc.wait(timeout=20)
            reader.join(timeout=20)
    while not chunks.empty():
        seen += chunks.get()
    return seen, code


def test_status_watch_redraws_until_interrupted(dsn: str) -> None:
    record(dsn, "cus_a")
    seen, code = _watch(dsn, "--watch", "0.2", until=lambda out: out.count(CLEAR) >= 2)
    assert seen.count(CLEAR) >= 2, seen
    assert "Ctrl-C" in seen and "default" in seen
    assert code == 0


def test_status_watch_json_prints_one_object_a_line(dsn: str) -> None:
    seen, code = _watch(dsn, "--json", "--watch", "0.1", until=lambda out: out.count("\n") >= 2)
    assert code == 0
    first, second = seen.splitlines()[:2]
    assert json.loads(first)["pending"] == 0 and json.loads(second)["total"] == 0
    assert CLEAR not in seen


# --- inspect ----------------------------------------------------------------------------------


def _attempt(
    dsn: str, message_ids: list[int], status: int | None, outcome: str, ago_s: int
) -> None:
    sql(
        dsn,
        "INSERT INTO relay_attempt (relay_instance, destination, started_at, latency_ms,"
        " status_code, outcome, error, request_bytes, message_count, message_ids)"
        " VALUES ('host-1:42', 'default', now() - %s * interval '1 second', 87.4, %s, %s, %s,"
        " 300, %s, %s)",
        (
            ago_s,
            status,
            outcome,
            None if status == 200 else "HTTP 503",
            len(message_ids),
            message_ids,
        ),
    )


def test_inspect_shows_messages_newest_first_with_their_attempts(dsn: str) -> None:
    identify, track, later_identify, later_track = record(dsn, "cus_a", 2)
    record(dsn, "cus_other")
    _attempt(dsn, [identify, track], 503, "retry", 60)
    _attempt(dsn, [identify, track], 200, "delivered", 30)
    set_state(dsn, [identify, track], "delivered", attempts=2)
    set_state(dsn, [later_identify], "dead", last_error="400: traits too large", attempts=1)

    out = ok(relay(dsn, "inspect", "cus_a"))

    assert out.startswith("customer cus_a: 4 messages (newest first")
    positions = [out.index(f"\n{i} ") for i in (later_track, later_identify, track, identify)]
    assert positions == sorted(positions)
    assert "400: traits too large" in out
    # the later messages have no attempt lines: the next line is the next message
    assert out.split(f"\n{later_track} ", 1)[1].splitlines()[1].startswith(f"{later_identify} ")
    block = out[out.index(f"\n{identify} ") :]
    assert "503" in block and "retry" in block and "200" in block and "87 ms" in block
    assert block.index("200") < block.index("503")  # attempts newest first
    assert "cus_other" not in out

    data = json.loads(ok(relay(dsn, "inspect", "cus_a", "--json")))
    assert data["total_messages"] == 4
    assert [m["id"] for m in data["messages"]] == [later_track, later_identify, track, identify]
    oldest = data["messages"][-1]
    assert oldest["kind"] == "identify" and oldest["state"] == "delivered"
    assert [a["status_code"] for a in oldest["attempt_log"]] == [200, 503]
    assert oldest["attempt_log"][0]["latency_ms"] == pytest.approx(87.4)
    assert data["messages"][0]["attempt_log"] == []


def test_inspect_limit_and_an_unknown_customer(dsn: str) -> None:
    ids = record(dsn, "cus_a", 3)
    data = json.loads(ok(relay(dsn, "inspect", "cus_a", "--json", "--limit", "2")))
    assert [m["id"] for m in data["messages"]] == ids[::-1][:2]
    assert "newest 2 shown" in ok(relay(dsn, "inspect", "cus_a", "--limit", "2"))
    assert ok(relay(dsn, "inspect", "nobody")).strip() == "no messages for customer nobody"


# --- retry and cancel -------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["retry", "cancel"])
def test_retry_and_cancel_refuse_to_run_without_a_selector(dsn: str, command: str) -> None:
    ids = record(dsn, "cus_a")
    set_state(dsn, ids, "dead")
    done = relay(dsn, command)
    assert done.returncode == 2
    assert "needs a selector" in done.stderr and "--customer" in done.stderr
    assert set(states(dsn).values()) == {"dead"}


def _dead_rows(dsn: str) -> dict[str, list[int]]:
    rows = {
        "a": record(dsn, "cus_a"),
        "b": record(dsn, "cus_b", project="prj_1"),
        "c": record(dsn, "cus_c"),
    }
    everything = [i for ids in rows.values() for i in ids]
    set_state(dsn, everything, "dead", attempts=12, last_error="HTTP 503")
    # cus_c was written in 2020
    sql(
        dsn,
        "UPDATE relay_outbox SET created_at = '2020-01-01T00:00:00Z' WHERE id = ANY(%s)",
        (rows["c"],),
    )
    return rows


def _requeued(dsn: str) -> dict[int, tuple[Any, ...]]:
    return {
        r[0]: r[1:]
        for r in sql(
            dsn,
            "SELECT id, attempts, requeued_by, requeued_at IS NOT NULL, next_attempt_at <= now()"
            " FROM relay_outbox WHERE state = 'pending'",
        )
    }


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        (
            lambda rows: ["--id", str(rows["a"][0]), "--id", str(rows["b"][1])],
            lambda r: [r["a"][0], r["b"][1]],
        ),
        (lambda rows: ["--customer", "cus_a"], lambda r: r["a"]),
        (lambda rows: ["--destination", "prj_1"], lambda r: r["b"]),
        (lambda rows: ["--destination", "default"], lambda r: r["a"] + r["c"]),
        (lambda rows: ["--until", "2021-01-01"], lambda r: r["c"]),
        (lambda rows: ["--since", "2021-01-01T00:00:00+00:00"], lambda r: r["a"] + r["b"]),
        (
            lambda rows: ["--since", "2019-06-01", "--until", "2020-06-01T00:00:00Z"],
            lambda r: r["c"],
        ),
        (lambda rows: ["--all"], lambda r: r["a"] + r["b"] + r["c"]),
    ],
    ids=["id", "customer", "destination", "default-destination", "until", "since", "range", "all"],
)
def test_retry_requeues_the_selected_dead_messages(dsn: str, selector: Any, expected: Any) -> None:
    rows = _dead_rows(dsn)
    want = sorted(expected(rows))
    out = ok(relay(dsn, "retry", *selector(rows), "--by", "alice"))
    assert out.startswith(f"re-queued {len(want)} dead messages (by alice)")
    requeued = _requeued(dsn)
    assert sorted(requeued) == want
    # a fresh attempt budget, due now, and who did it
    assert set(requeued.values()) == {(0, "alice", True, True)}
    assert sum(1 for s in states(dsn).values() if s == "dead") == 6 - len(want)


def test_retry_records_user_by_default_and_dry_run_changes_nothing(dsn: str) -> None:
    rows = _dead_rows(dsn)
    assert ok(relay(dsn, "retry", "--customer", "cus_a", "--dry-run")).startswith(
        "would re-queue 2 dead messages"
    )
    assert _requeued(dsn) == {}
    ok(relay(dsn, "retry", "--customer", "cus_a", env={"USER": "bob"}))
    assert {v[1] for v in _requeued(dsn).values()} == {"bob"}
    ok(relay(dsn, "retry", "--customer", "cus_b", env={"USER": ""}))
    assert {v[1] for i, v in _requeued(dsn).items() if i in rows["b"]} == {"operator"}


def test_retry_leaves_rows_that_are_not_dead_alone(dsn: str) -> None:
    ids = record(dsn, "cus_a", 2)
    set_state(dsn, ids[:1], "dead")
    set_state(dsn, ids[1:2], "delivered")
    out = ok(relay(dsn, "retry", "--customer", "cus_a"))
    assert out.startswith("re-queued 1 dead messages")
    assert [states(dsn)[i] for i in ids] == ["pending", "delivered", "pending", "pending"]


def test_retry_refuses_a_malformed_time(dsn: str) -> None:
    done = relay(dsn, "retry", "--since", "yesterday")
    assert done.returncode == 2 and "ISO 8601" in done.stderr


def test_cancel_cancels_unsent_messages_but_never_in_flight_ones(dsn: str) -> None:
    ids = record(dsn, "cus_a", 3)
    other = record(dsn, "cus_b")
    wanted = dict(
        zip(ids, ["pending", "retrying", "held", "in_flight", "delivered", "dead"], strict=True)
    )
    for row_id, state in wanted.items():
        set_state(dsn, [row_id], state)

    out = ok(relay(dsn, "cancel", "--customer", "cus_a", "--by", "carol"))

    assert out.startswith("cancelled 3 messages (by carol)")
    after = states(dsn)
    assert [after[i] for i in ids] == [
        "cancelled",
        "cancelled",
        "cancelled",
        "in_flight",
        "delivered",
        "dead",
    ]
    assert [after[i] for i in other] == ["pending", "pending"]
    by = sql(dsn, "SELECT DISTINCT requeued_by FROM relay_outbox WHERE state = 'cancelled'")
    assert by == [("carol",)]


def test_cancel_by_id_and_destination(dsn: str) -> None:
    a = record(dsn, "cus_a")
    b = record(dsn, "cus_b", project="prj_1")
    assert ok(relay(dsn, "cancel", "--id", str(a[1]))).startswith("cancelled 1 messages")
    assert ok(relay(dsn, "cancel", "--destination", "prj_1", "--dry-run")).startswith(
        "would cancel 2 unsent messages"
    )
    assert ok(relay(dsn, "cancel", "--destination", "prj_1")).startswith("cancelled 2 messages")
    after = states(dsn)
    assert [after[i] for i in a + b] == ["pending", "cancelled", "cancelled", "cancelled"]


# --- destinations -----------------------------------------------------------------------------


def _destination(dsn: str, project: str) -> tuple[Any, ...] | None:
    rows = sql(
        dsn,
        "SELECT region, api_url, write_key, enabled, paused_at IS NOT NULL, paused_reason"
        " FROM relay_destination WHERE project_id = %s",
        (project,),
    )
    return rows[0] if rows else None


def test_destinations_set_from_a_file_releases_held_messages_and_never_prints_the_key(
    dsn: str, tmp_path: Path
) -> None:
    held = record(dsn, "cus_a", 2, project="prj_1")
    set_state(dsn, held[:1], "held", attempts=1)
    set_state(dsn, held[1:], "held")
    other = record(dsn, "cus_b", project="prj_2")
    set_state(dsn, other, "held")
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")

    done = relay(
        dsn, "destinations", "set", "prj_1", "--region", "eu", "--write-key-file", str(key_file)
    )

    out = ok(done)
    assert KEY not in out + done.stderr
    assert "wk_l…(34 chars)" in out and "released 4 held messages" in out
    assert _destination(dsn, "prj_1") == ("eu", None, KEY, True, False, None)
    after = states(dsn)
    # back to the queue: retrying when an attempt was already made, else pending
    assert [after[i] for i in held] == ["retrying", "pending", "pending", "pending"]
    assert [after[i] for i in other] == ["held", "held"]


def test_destinations_list_masks_keys_and_shows_pauses(dsn: str) -> None:
    ok(
        relay(
            dsn,
            "destinations",
            "set",
            "prj_1",
            "--region",
            "us",
            "--api-url",
            "http://127.0.0.1:9999",
            env={"CUSTOMERIO_WRITE_KEY_NEW": KEY},
        )
    )
    ok(relay(dsn, "destinations", "set", "prj_2", "--region", "eu", "--write-key", "short"))
    sql(
        dsn,
        "UPDATE relay_destination SET paused_at = now(), paused_reason = '401 from Customer.io'"
        " WHERE project_id = 'prj_2'",
    )

    done = relay(dsn, "destinations", "list")
    out = ok(done)
    assert KEY not in out and "short" not in out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["PROJECT", "REGION", "API", "URL"]
    assert lines[1].split()[:5] == ["prj_1", "us", "http://127.0.0.1:9999", "wk_l…(34", "chars)"]
    assert lines[2].split()[:5] == ["prj_2", "eu", "(region", "default)", "…(5"]
    assert "401 from Customer.io" in lines[2]

    listed = json.loads(ok(relay(dsn, "destinations", "list", "--json")))
    assert [(d["project_id"], d["key"], d["enabled"]) for d in listed] == [
        ("prj_1", "wk_l…(34 chars)", True),
        ("prj_2", "…(5 chars)", True),
    ]
    assert listed[1]["paused_reason"] == "401 from Customer.io"
    assert KEY not in json.dumps(listed)


def test_a_new_key_lifts_a_pause_and_the_same_key_does_not(dsn: str) -> None:
    ok(relay(dsn, "destinations", "set", "prj_1", "--region", "us", "--write-key", KEY))
    pause = (
        "UPDATE relay_destination SET paused_at = now(), paused_reason = '401', enabled = false"
        " WHERE project_id = 'prj_1'"
    )
    held = record(dsn, "cus_a", project="prj_1")
    set_state(dsn, held, "held")
    sql(dsn, pause)

    out = ok(relay(dsn, "destinations", "set", "prj_1", "--region", "us", "--write-key", KEY))
    assert "still paused" in out and "released 0 held messages" in out
    assert _destination(dsn, "prj_1") == ("us", None, KEY, False, True, "401")

    out = ok(relay(dsn, "destinations", "set", "prj_1", "--region", "us", "--write-key", KEY + "x"))
    assert "released 2 held messages" in out
    assert _destination(dsn, "prj_1") == ("us", None, KEY + "x", True, False, None)


def test_destinations_disable_and_enable(dsn: str) -> None:
    ok(relay(dsn, "destinations", "set", "prj_1", "--region", "us", "--write-key", KEY))
    assert "disabled" in ok(relay(dsn, "destinations", "disable", "prj_1"))
    assert _destination(dsn, "prj_1")[3] is False  # type: ignore[index]
    assert "no" in ok(relay(dsn, "destinations", "list")).splitlines()[1].split()
    held = record(dsn, "cus_a", project="prj_1")
    set_state(dsn, held, "held")

    out = ok(relay(dsn, "destinations", "enable", "prj_1"))

    assert "released 2 held messages" in out
    assert _destination(dsn, "prj_1")[3] is True  # type: ignore[index]
    done = relay(dsn, "destinations", "disable", "prj_nope")
    assert done.returncode == 1 and "no destination for project prj_nope" in done.stderr


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["prj_1", "--region", "us"], {}, "no write key"),
        (["prj_1", "--region", "us", "--write-key", "has space"], {}, "whitespace"),
        (["default", "--region", "us", "--write-key", KEY], {}, "default destination"),
        (["prj_1", "--region", "us", "--write-key-file", "/nonexistent/key"], {}, "cannot read"),
        (["prj_1", "--region", "us", "--write-key", KEY, "--api-url", "ftp://x"], {}, "http(s)"),
        (["prj_1", "--region", "mars", "--write-key", KEY], {}, "invalid choice"),
    ],
)
def test_destinations_set_refuses_bad_input_with_exit_2(
    dsn: str, args: list[str], env: dict[str, str], message: str
) -> None:
    done = relay(dsn, "destinations", "set", *args, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr
    assert KEY not in done.stdout + done.stderr
    assert _destination(dsn, "prj_1") is None


def test_destinations_set_reads_the_key_from_stdin(dsn: str) -> None:
    done = relay(
        dsn,
        "destinations",
        "set",
        "prj_1",
        "--region",
        "us",
        "--write-key-file",
        "-",
        stdin=KEY + "\n",
    )
    assert KEY not in ok(done)
    assert _destination(dsn, "prj_1")[2] == KEY  # type: ignore[index]
