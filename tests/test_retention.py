"""Retention: `relay purge` and `relay.retention.purge` on real PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import psycopg
import pytest

from relay import record_event
from relay.errors import ConfigError
from relay.retention import parse_duration, purge

DAY = 86400.0


def _event(n: int, customer: str = "cus_1") -> dict[str, Any]:
    return {
        "id": f"evt_{customer}_{n}",
        "type": "purchase.complete",
        "occurred_at": "2026-11-28T10:00:00Z",
        "customer": {"id": customer, "email": f"{customer}@example.com"},
        "properties": {"n": n},
    }


def _record(dsn: str, events: int, customer: str = "cus_1") -> list[int]:
    """Record ``events`` events (an identify and a track each); returns the row ids in order."""
    with psycopg.connect(dsn) as conn:
        for n in range(events):
            record_event(conn, _event(n, customer))
        conn.commit()
        rows = conn.execute(
            "SELECT id FROM relay_outbox WHERE customer_key = %s ORDER BY id", (customer,)
        ).fetchall()
    return [r[0] for r in rows]


def _set(dsn: str, ids: list[int], state: str, age_days: float = 0, **extra: Any) -> None:
    """Put rows in ``state``, written and last changed ``age_days`` ago."""
    sets = ", ".join(f"{k} = %({k})s" for k in extra)
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE relay_outbox SET state = %(state)s,"
            " created_at = now() - %(age)s * interval '1 day',"
            " updated_at = now() - %(age)s * interval '1 day'"
            + (", " + sets if sets else "")
            + " WHERE id = ANY(%(ids)s)",
            {"state": state, "age": age_days, "ids": ids, **extra},
        )


def _attempt(dsn: str, age_days: float, message_ids: list[int]) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_attempt (relay_instance, destination, started_at, latency_ms,"
            " status_code, outcome, request_bytes, message_count, message_ids)"
            " VALUES ('test', 'default', now() - %s * interval '1 day', 12.5, 200, 'delivered',"
            " 100, %s, %s)",
            (age_days, len(message_ids), message_ids),
        )


def _states(dsn: str) -> dict[int, str]:
    with psycopg.connect(dsn) as conn:
        return dict(conn.execute("SELECT id, state FROM relay_outbox").fetchall())  # type: ignore[arg-type]


def _attempt_count(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT count(*) FROM relay_attempt").fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30d", 30 * DAY), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("1.5h", 5400)],
)
def test_parse_duration_accepts_the_four_units(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["30", "30 days", "d", "-1d", "0s", "1w", ""])
def test_parse_duration_refuses_a_bare_number_or_an_unknown_unit(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_purge_deletes_old_finished_rows_in_bounded_batches_and_nothing_else(dsn: str) -> None:
    ids = _record(dsn, 12)  # 24 rows, oldest first
    old_delivered = ids[:10]
    old_coalesced, old_cancelled = ids[10], ids[11]
    old_unfinished = dict(
        zip(("pending", "retrying", "in_flight", "held"), ids[12:16], strict=True)
    )
    old_dead = ids[16]
    recent = ids[17:]
    _set(dsn, old_delivered, "delivered", 40)
    _set(dsn, [old_coalesced], "coalesced", 40, coalesced_into=ids[0])
    _set(dsn, [old_cancelled], "cancelled", 40)
    for state, row_id in old_unfinished.items():
        _set(dsn, [row_id], state, 40)
    _set(dsn, [old_dead], "dead", 40)
    _set(dsn, recent, "delivered", 1)
    for _ in range(7):
        _attempt(dsn, 40, old_delivered[:2])
    _attempt(dsn, 1, recent[:1])

    seen: list[dict[str, int]] = []
    totals = purge(dsn, 30 * DAY, batch_size=3, progress=seen.append)

    assert totals == {"messages": 12, "attempts": 7, "partitions": 0, "partition_rows": 0}
    left = _states(dsn)
    assert set(left) == {*old_unfinished.values(), old_dead, *recent}
    assert _attempt_count(dsn) == 1
    # Bounded batches: progress after each batch, never more than batch_size rows apart.
    steps = [
        (b["messages"] - a["messages"], b["attempts"] - a["attempts"])
        for a, b in zip([{"messages": 0, "attempts": 0}, *seen], seen, strict=False)
    ]
    assert len(seen) == 4 + 3  # 12 messages and 7 attempts, 3 at a time
    assert all(0 <= m <= 3 and 0 <= a <= 3 for m, a in steps)
    assert seen[-1] == totals


def test_include_dead_deletes_old_dead_rows_too(dsn: str) -> None:
    ids = _record(dsn, 2)
    _set(dsn, ids[:2], "dead", 40)
    _set(dsn, ids[2:], "dead", 5)
    assert purge(dsn, 30 * DAY)["messages"] == 0
    assert purge(dsn, 30 * DAY, include_dead=True)["messages"] == 2
    assert set(_states(dsn)) == set(ids[2:])


def test_a_coalesced_row_is_kept_while_its_carrier_is_unfinished(dsn: str) -> None:
    # a -> b -> c: a was merged into b, which was later merged into c, which is still pending.
    a, b, c, *rest = _record(dsn, 2)
    _set(dsn, [a], "coalesced", 40, coalesced_into=b)
    _set(dsn, [b], "coalesced", 40, coalesced_into=c)
    _set(dsn, [c], "retrying", 40)
    _set(dsn, rest, "delivered", 40)
    assert purge(dsn, 30 * DAY)["messages"] == len(rest)
    assert set(_states(dsn)) == {a, b, c}

    _set(dsn, [c], "delivered", 40)
    assert purge(dsn, 30 * DAY)["messages"] == 3
    assert _states(dsn) == {}


def test_a_coalesced_row_whose_carrier_is_dead_goes_only_with_include_dead(dsn: str) -> None:
    a, b = _record(dsn, 1)
    _set(dsn, [a], "coalesced", 40, coalesced_into=b)
    _set(dsn, [b], "dead", 1)
    assert purge(dsn, 30 * DAY)["messages"] == 0
    assert purge(dsn, 30 * DAY, include_dead=True)["messages"] == 1
    assert set(_states(dsn)) == {b}


def test_purge_on_an_empty_outbox_deletes_nothing(dsn: str) -> None:
    assert purge(dsn, 1) == {"messages": 0, "attempts": 0, "partitions": 0, "partition_rows": 0}


def _relay(dsn: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": dsn}
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_relay_purge_shows_progress_and_a_final_count(dsn: str) -> None:
    ids = _record(dsn, 5)
    _set(dsn, ids[:8], "delivered", 31)
    _set(dsn, ids[8:], "pending", 31)
    _attempt(dsn, 31, ids[:2])

    done = _relay(dsn, "purge", "--older-than", "30d", "--batch-size", "2")

    assert done.returncode == 0, done.stderr
    assert "purge: " in done.stderr and "deleted so far" in done.stderr
    assert "purged 8 messages" in done.stdout and "1 attempts" in done.stdout
    assert set(_states(dsn)) == set(ids[8:])


def test_relay_purge_refuses_a_duration_without_unit(dsn: str) -> None:
    done = _relay(dsn, "purge", "--older-than", "30")
    assert done.returncode == 2
    assert "30d" in done.stderr  # the error shows what a duration looks like


def test_relay_purge_include_dead(dsn: str) -> None:
    ids = _record(dsn, 1)
    _set(dsn, ids, "dead", 2)
    done = _relay(dsn, "purge", "--older-than", "1d", "--include-dead")
    assert done.returncode == 0, done.stderr
    assert "purged 2 messages" in done.stdout
    assert _states(dsn) == {}
