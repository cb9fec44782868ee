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

from relay import operator_cli, record_event
from relay import queries as q
from relay.models.schema import PARTITION_NAME
from relay.operator_cli import TableStatistics, estimate_finished

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
    done = relay(empty_dsn, "status", "--exact")  # the default reads no view
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


def test_status_exact_json_counts_each_state_and_destination(dsn: str) -> None:
    _populate_every_state(dsn)
    sql(
        dsn,
        "INSERT INTO relay_destination (project_id, region, write_key, paused_at, paused_reason)"
        " VALUES ('prj_1', 'us', %s, now(), '401 Unauthorized'), ('prj_2', 'eu', %s, NULL, NULL)",
        (KEY, KEY),
    )
    snap = json.loads(ok(relay(dsn, "status", "--exact", "--json")))

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
    assert snap["estimated"] == []
    assert KEY not in json.dumps(snap)


def test_status_exact_text_is_a_table_with_totals(dsn: str) -> None:
    _populate_every_state(dsn)
    out = ok(relay(dsn, "status", "--exact"))
    header, default, prj_1, total = out.splitlines()[:4]
    assert header.split()[:3] == ["DESTINATION", "PENDING", "IN"]  # IN FLIGHT
    assert default.split()[:9] == ["default", *["1"] * 8]
    assert prj_1.split()[:2] == ["prj_1", "4"]
    assert total.split()[:2] == ["TOTAL", "5"]
    assert "oldest message waiting to be sent: 1h 0m" in out
    assert "1 held messages" in out and "1 dead messages" in out
    assert "messages in relay_outbox: 12\n" in out and "~" not in out


# --- status: exact backlog, estimated history ---------------------------------------------------

COUNTED = ("pending", "in_flight", "retrying", "held", "dead")
FINISHED = ("delivered", "coalesced", "cancelled")


def fill_finished(dsn: str, first: int, last: int) -> None:
    """Finished rows ``first``..``last`` in one INSERT ... SELECT: every 50th coalesced, every
    1000th (offset 1) cancelled, the rest delivered; every 4th to project prj_1."""
    sql(
        dsn,
        """
        INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, project_id,
                                  event_type, body, occurred_at, state, delivered_at)
        SELECT 'old-' || g, 'evt-old-' || g, 'track', 'old_' || (g / 10),
               CASE WHEN g %% 4 = 0 THEN 'prj_1' END, 'page.view',
               jsonb_build_object('type', 'track', 'userId', 'old_' || (g / 10),
                                  'event', 'page.view', 'messageId', 'old-' || g),
               now(),
               CASE WHEN g %% 50 = 0 THEN 'coalesced' WHEN g %% 1000 = 1 THEN 'cancelled'
                    ELSE 'delivered' END,
               now()
        FROM generate_series(%s::int, %s::int) AS g
        """,
        (first, last),
    )


def analyze(dsn: str) -> None:
    sql(dsn, "ANALYZE relay_outbox")


def view(dsn: str) -> dict[str, dict[str, Any]]:
    """The relay_status view, per destination."""
    columns = (*STATES, "total", "oldest_undelivered_age_s", "lag_s")
    return {
        r[0]: dict(zip(columns, r[1:], strict=True))
        for r in sql(dsn, "SELECT * FROM relay_status ORDER BY destination")
    }


def exact_counts(dsn: str) -> dict[str, int]:
    counts = dict.fromkeys(STATES, 0)
    rows = sql(dsn, "SELECT state, count(*) FROM relay_outbox GROUP BY state")
    counts.update({state: n for state, n in rows})
    return counts


def within(estimate: int | None, exact: int, share: float) -> bool:
    return estimate is not None and abs(estimate - exact) <= share * exact


def test_status_counts_unfinished_and_dead_as_the_view_does_and_leaves_history_to_estimates(
    dsn: str,
) -> None:
    _populate_every_state(dsn)
    ids = record(dsn, "cus_c", 3, project="prj_2")
    set_state(dsn, ids[:2], "held")
    set_state(dsn, ids[2:3], "dead")
    set_state(dsn, ids[3:4], "retrying")
    set_state(dsn, ids[4:5], "delivered")
    fill_finished(dsn, 1, 500)
    analyze(dsn)
    expected = view(dsn)

    snap = json.loads(ok(relay(dsn, "status", "--json")))

    assert set(snap["destinations"]) <= set(expected)
    for name, d in snap["destinations"].items():
        assert {s: d[s] for s in COUNTED} == {s: expected[name][s] for s in COUNTED}, name
        # Not estimated per destination: null, never a guess.
        assert {s: d[s] for s in (*FINISHED, "total")} == dict.fromkeys((*FINISHED, "total"))
        for age in ("oldest_undelivered_age_s", "lag_s"):
            if expected[name][age] is None:
                assert d[age] is None, (name, age)
            else:
                assert d[age] == pytest.approx(expected[name][age], abs=5), (name, age)
    # Every destination with an unfinished or dead message is listed.
    assert {n for n, e in expected.items() if any(e[s] for s in COUNTED)} <= set(
        snap["destinations"]
    )
    for s in COUNTED:
        assert snap[s] == sum(e[s] for e in expected.values()), s
    assert 3590 <= snap["oldest_pending_age_s"] < 3700
    assert snap["estimated"] == ["delivered", "coalesced", "cancelled", "total"]
    assert snap["analyzed_at"] is not None


def test_status_exact_equals_the_view(dsn: str) -> None:
    _populate_every_state(dsn)
    fill_finished(dsn, 1, 300)
    expected = view(dsn)

    snap = json.loads(ok(relay(dsn, "status", "--exact", "--json")))

    columns = (*STATES, "total")
    for name, e in expected.items():
        d = snap["destinations"][name]
        assert {c: d[c] for c in columns} == {c: e[c] for c in columns}, name
    assert set(snap["destinations"]) == set(expected)  # prj_1: finished rows only
    assert {c: snap[c] for c in columns} == {
        c: sum(e[c] for e in expected.values()) for c in columns
    }
    assert snap["estimated"] == [] and snap["analyzed_at"] is None


def test_status_estimates_the_history_after_analyze_and_says_so(dsn: str) -> None:
    _populate_every_state(dsn)
    fill_finished(dsn, 1, 50_000)
    analyze(dsn)
    exact = exact_counts(dsn)

    snap = json.loads(ok(relay(dsn, "status", "--json")))

    assert snap["estimated"] == ["delivered", "coalesced", "cancelled", "total"]
    assert {s: snap[s] for s in COUNTED} == {s: exact[s] for s in COUNTED}
    for s in ("delivered", "coalesced"):
        assert within(snap[s], exact[s], 0.10), (s, snap[s], exact[s])
    assert snap["cancelled"] is not None and snap["cancelled"] >= 0
    assert within(snap["total"], sum(exact.values()), 0.10), snap["total"]

    text = ok(relay(dsn, "status"))
    lines = text.splitlines()
    default = next(line for line in lines if line.startswith("default "))
    assert default.split()[5:7] == ["-", "-"]  # DELIVERED, COALESCED: not per destination
    total = next(line for line in lines if line.startswith("TOTAL "))
    assert total.split()[5].startswith("~") and total.split()[5].endswith("k")  # ~49k
    assert total.split()[1:5] == [str(exact[s]) for s in COUNTED[:4]]  # exact, unmarked
    assert "(~: estimated from relay_outbox's statistics (last ANALYZE " in text
    assert "relay status --exact counts every row" in text
    assert "messages in relay_outbox: ~" in text and "(estimated)" in text

    # Rows written since the ANALYZE are counted: the planner's density times today's pages.
    fill_finished(dsn, 50_001, 100_000)
    grown = json.loads(ok(relay(dsn, "status", "--json")))
    assert within(grown["total"], sum(exact.values()) + 50_000, 0.10), grown["total"]
    assert within(grown["delivered"], exact["delivered"] * 2, 0.10), grown["delivered"]


def fill_backlog(dsn: str, rows: int, state: str = "pending", age_s: int = 0) -> None:
    """``rows`` unfinished (or dead) rows of 100 customers, created ``age_s`` ago."""
    sql(
        dsn,
        """
        INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type, body,
                                  occurred_at, created_at, state)
        SELECT %(state)s || '-' || g, 'evt-' || %(state)s || '-' || g, 'track', 'bk_' || (g %% 100),
               'page.view',
               jsonb_build_object('type', 'track', 'userId', 'bk_' || (g %% 100),
                                  'event', 'page.view', 'messageId', %(state)s || '-' || g),
               now(), now() - make_interval(secs => %(age)s), %(state)s
        FROM generate_series(1, %(rows)s) AS g
        """,
        {"rows": rows, "state": state, "age": age_s},
    )


def test_a_backlog_past_the_read_limit_is_estimated_with_ages_as_lower_bounds(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The limits scaled down (40,000 and 10,000 in production) so the test stays small.
    monkeypatch.setattr(operator_cli, "UNFINISHED_READ_LIMIT", 500)
    monkeypatch.setattr(operator_cli, "DEAD_READ_LIMIT", 50)
    fill_finished(dsn, 1, 3_000)
    fill_backlog(dsn, 2_000, age_s=7200)
    fill_backlog(dsn, 300, "dead")
    analyze(dsn)
    exact = exact_counts(dsn)

    with psycopg.connect(dsn) as conn:
        snap = operator_cli.status_snapshot(conn)

    # Past both limits: pending and dead estimated, never below what the bounded read counted.
    assert {"pending", "dead", "total"} <= set(snap["estimated"])
    assert snap["at_least"] == []
    assert within(snap["pending"], exact["pending"], 0.10), snap["pending"]
    assert within(snap["dead"], exact["dead"], 0.25), snap["dead"]
    assert snap["pending"] >= 500 and snap["dead"] >= 50
    assert within(snap["total"], sum(exact.values()), 0.10), snap["total"]
    # Per destination, a count that stopped at the limit is no count at all.
    assert snap["destinations"]["default"]["pending"] is None
    assert snap["destinations"]["default"]["dead"] is None
    # Ages come from the rows read: lower bounds, said so.
    assert snap["lower_bounds"] == ["oldest_undelivered_age_s", "oldest_pending_age_s"]
    assert snap["oldest_pending_age_s"] <= 7300
    text = operator_cli.render_status(snap)
    total = next(line for line in text.splitlines() if line.startswith("TOTAL "))
    assert total.split()[1].startswith("~") and total.split()[-2:] == [">=2h", "0m"]
    assert "not counted to the end" in text

    # Under the limits, the same statement counts exactly (the check above can fail).
    monkeypatch.setattr(operator_cli, "UNFINISHED_READ_LIMIT", 40_000)
    monkeypatch.setattr(operator_cli, "DEAD_READ_LIMIT", 10_000)
    with psycopg.connect(dsn) as conn:
        counted = operator_cli.status_snapshot(conn)
    assert (counted["pending"], counted["dead"]) == (exact["pending"], exact["dead"])
    assert counted["lower_bounds"] == [] and "pending" not in counted["estimated"]
    assert 7190 <= counted["oldest_pending_age_s"] < 7300


def test_a_backlog_past_the_read_limit_without_statistics_is_a_lower_bound(
    dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(operator_cli, "UNFINISHED_READ_LIMIT", 500)
    monkeypatch.setattr(operator_cli, "EXACT_BELOW_PAGES", 0)  # no exact fallback
    leaves = "SELECT relid FROM pg_partition_tree('relay_outbox') WHERE isleaf"
    for (leaf,) in sql(dsn, leaves):
        sql(dsn, f"ALTER TABLE {leaf} SET (autovacuum_enabled = false)")
    fill_backlog(dsn, 800)

    with psycopg.connect(dsn) as conn:
        snap = operator_cli.status_snapshot(conn)

    assert set(snap["at_least"]) == {"pending", "in_flight", "retrying", "held"}
    assert snap["pending"] == 500  # what was read: no statistics to estimate the rest
    text = operator_cli.render_status(snap)
    total = next(line for line in text.splitlines() if line.startswith("TOTAL "))
    assert total.split()[1] == ">=500"


def test_status_on_a_table_never_analyzed_is_sane(dsn: str) -> None:
    # Autovacuum must not analyze the table behind the test's back.
    # (Per partition: a partitioned table takes no storage parameters of its own.)
    leaves = "SELECT relid FROM pg_partition_tree('relay_outbox') WHERE isleaf"
    for (leaf,) in sql(dsn, leaves):
        sql(dsn, f"ALTER TABLE {leaf} SET (autovacuum_enabled = false)")
    _populate_every_state(dsn)
    ids = record(dsn, "cus_d", 2)
    set_state(dsn, ids, "delivered")
    # The premise: a table fresh from its migration has never been vacuumed or analyzed.
    assert sql(dsn, f"SELECT DISTINCT reltuples FROM pg_class WHERE oid IN ({leaves})") == [(-1.0,)]
    exact = exact_counts(dsn)

    # Small (a new deployment, the demo): counted, since a count is cheap and beats "unknown".
    small = json.loads(ok(relay(dsn, "status", "--json")))
    assert small["estimated"] == [] and small["analyzed_at"] is None
    assert {s: small[s] for s in STATES} == exact
    assert small["total"] == sum(exact.values())
    assert "~" not in ok(relay(dsn, "status"))

    # Past EXACT_BELOW_PAGES and never analyzed: the history is unknown, not guessed.
    fill_finished(dsn, 1, 60_000)
    pages = sql(dsn, f"SELECT sum(pg_relation_size(relid)) / 8192 FROM ({leaves}) t")[0][0]
    assert pages > operator_cli.EXACT_BELOW_PAGES, pages
    exact = exact_counts(dsn)
    snap = json.loads(ok(relay(dsn, "status", "--json")))
    assert {s: snap[s] for s in COUNTED} == {s: exact[s] for s in COUNTED}
    assert {s: snap[s] for s in (*FINISHED, "total")} == dict.fromkeys((*FINISHED, "total"))
    assert snap["analyzed_at"] is None
    text = ok(relay(dsn, "status"))
    total = next(line for line in text.splitlines() if line.startswith("TOTAL "))
    assert total.split()[5:7] == ["?", "?"]
    assert "messages in relay_outbox: ? (estimated)" in text
    assert "finished counts unknown" in text and "relay status --exact" in text

    # VACUUM (no ANALYZE) gives the row count but no split by state.
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM relay_outbox")
    vacuumed = json.loads(ok(relay(dsn, "status", "--json")))
    assert within(vacuumed["total"], sum(exact.values()), 0.01), vacuumed["total"]
    assert {s: vacuumed[s] for s in FINISHED} == dict.fromkeys(FINISHED)

    analyze(dsn)
    analyzed = json.loads(ok(relay(dsn, "status", "--json")))
    assert analyzed["estimated"] == ["delivered", "coalesced", "cancelled", "total"]
    for s in ("delivered", "coalesced"):
        assert within(analyzed[s], exact[s], 0.10), (s, analyzed[s], exact[s])


NONE = dict.fromkeys(("delivered", "coalesced", "cancelled", "total"))


@pytest.mark.parametrize(
    ("stats", "counted", "expected"),
    [
        # No pages: no rows, whatever the catalogue says.
        ((-1.0, 0, 0, {}, None), 0, {"delivered": 0, "coalesced": 0, "cancelled": 0, "total": 0}),
        # Never vacuumed or analyzed, or last seen empty while it has pages now: unknown.
        ((-1.0, 0, 5, {}, None), 3, NONE),
        ((0.0, 0, 5, {}, None), 3, NONE),
        # 100 rows a page, 20 pages now: 2000 rows, 1900 finished, split 0.90 : 0.05 : 0.
        (
            (1000.0, 10, 20, {"delivered": 0.9, "coalesced": 0.05, "pending": 0.05}, 3.0),
            100,
            {"delivered": 1800, "coalesced": 100, "cancelled": 0, "total": 2000},
        ),
        # States outside the most common values share what those leave, as the planner has it:
        # 0.04 over 4 - 2 other values.
        (
            (1000.0, 10, 10, {"delivered": 0.9, "pending": 0.06}, 4.0),
            60,
            {"delivered": 900, "coalesced": 20, "cancelled": 20, "total": 1000},
        ),
        # n_distinct as a share of the rows: 0.5 x 16 = 8 values, 6 of them outside the list.
        (
            (16.0, 1, 1, {"pending": 5 / 16, "delivered": 5 / 16}, -0.5),
            9,
            {"delivered": 5, "coalesced": 1, "cancelled": 1, "total": 16},
        ),
        # VACUUM without ANALYZE: the row count, no split.
        (
            (1000.0, 10, 10, {}, None),
            10,
            {"delivered": None, "coalesced": None, "cancelled": None, "total": 1000},
        ),
        # The last ANALYZE saw no finished message (all were pending then): split unknown.
        (
            (1000.0, 10, 10, {"pending": 1.0}, 1.0),
            10,
            {"delivered": None, "coalesced": None, "cancelled": None, "total": 1000},
        ),
        # A backlog that outgrew the estimate: nothing finished, never a negative count.
        (
            (100.0, 10, 10, {"delivered": 1.0}, 1.0),
            250,
            {"delivered": 0, "coalesced": 0, "cancelled": 0, "total": 250},
        ),
    ],
)
def test_estimate_finished_guards_its_inputs(
    stats: tuple[float, int, int, dict[str, float], float | None],
    counted: int,
    expected: dict[str, Any],
) -> None:
    assert estimate_finished(TableStatistics(*stats), counted) == expected


def _plan_nodes(plan: dict[str, Any]) -> list[dict[str, Any]]:
    return [plan, *(n for child in plan.get("Plans", ()) for n in _plan_nodes(child))]


def _scans(dsn: str, statement: str) -> list[tuple[str, str | None, str | None]]:
    """(node type, relation, index) of every node of the statement's plan."""
    params = operator_cli.backlog_limits() if statement is q.OUTBOX_STATUS_BACKLOG else None
    ((doc,),) = sql(dsn, "EXPLAIN (FORMAT JSON) " + statement, params)
    return [
        (n["Node Type"], n.get("Relation Name"), n.get("Index Name"))
        for n in _plan_nodes(doc[0]["Plan"])
    ]


def test_status_queries_read_partial_indexes_and_never_seq_scan_the_outbox(dsn: str) -> None:
    fill_finished(dsn, 1, 200_000)
    _populate_every_state(dsn)
    record(dsn, "cus_p", 5, project="prj_2")
    analyze(dsn)

    def outbox(relation: str | None) -> bool:  # the table or one of its day partitions
        return relation == "relay_outbox" or bool(PARTITION_NAME.fullmatch(relation or ""))

    for statement in (q.OUTBOX_STATUS_BACKLOG, q.OUTBOX_STATUS_ESTIMATE):
        nodes = _scans(dsn, statement)
        # The planner reads a small partition whole (the days ahead, empty; the DEFAULT one,
        # which holds this test's few events dated before the first day): under 1 MB, that is
        # cheaper than an index. The 200,000 rows of history are in today's partition.
        seq = [
            n
            for n in nodes
            if "Seq Scan" in n[0]
            and outbox(n[1])
            and sql(dsn, "SELECT pg_relation_size(%s)", (n[1],))[0][0] > 2**20
        ]
        assert seq == [], (statement, nodes)
    # A partition's index, named as the table's index it belongs to.
    indexes = {
        sql(dsn, "SELECT pg_partition_root(%s::regclass)::text", (n[2],))[0][0]
        for n in _scans(dsn, q.OUTBOX_STATUS_BACKLOG)
        if n[2] is not None
    }
    assert {"relay_outbox_customer_unfinished_idx", "relay_outbox_dead_idx"} <= indexes
    # The check can fail: --exact's view reads the whole table, as its docs say.
    exact = _scans(dsn, q.STATUS_BY_DESTINATION)
    assert any("Seq Scan" in n[0] and outbox(n[1]) for n in exact), exact


def test_relay_operator_sees_the_statistics_the_estimates_come_from(
    dsn: str, login_as: Callable[[str], str]
) -> None:
    _populate_every_state(dsn)
    fill_finished(dsn, 1, 5_000)
    analyze(dsn)
    exact = exact_counts(dsn)
    stats_row = (
        "SELECT count(*) FROM pg_stats WHERE tablename = 'relay_outbox' AND attname = 'state'"
        " AND most_common_vals IS NOT NULL"
    )
    operator, app = login_as("relay_operator"), login_as("relay_app")
    # pg_stats shows a column only to who may read it: relay_operator may, relay_app not.
    assert sql(operator, stats_row) == [(1,)]
    assert sql(app, stats_row) == [(0,)]

    snap = json.loads(ok(relay(operator, "status", "--json")))

    assert {s: snap[s] for s in COUNTED} == {s: exact[s] for s in COUNTED}
    assert within(snap["delivered"], exact["delivered"], 0.10), snap["delivered"]
    assert within(snap["total"], sum(exact.values()), 0.10), snap["total"]


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
