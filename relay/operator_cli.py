"""Operator commands: status, inspect, retry, cancel, destinations, purge.

Each reads DATABASE_URL (never the embedded database: an operator command must act on the
database the relays use, not create an empty one). Read-only commands work as relay_operator;
retry, cancel, purge and destinations enable/disable need relay_worker; destinations set
needs the schema owner (relay_worker may not insert destinations). A write key is printed
only masked, and only to a session allowed to read it.

Exit status follows ``relay.cli``: 2 for a bad setting or a missing selector, 3 for an
unreachable database, 5 for a database without the relay's tables or views (relay migrate), 1
for other failures (including "permission denied" for the role). Every command that reports
something takes ``--json`` and then prints one JSON document on stdout instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import psycopg

from relay import logs
from relay import queries as q
from relay.client import base_url_for, mask_key, sends_key_in_clear
from relay.db import connect, first_line
from relay.errors import ConfigError, DatabaseUnavailable, NotMigrated, RelayError
from relay.limits import MAX_PROJECT_ID_BYTES
from relay.models.states import MESSAGE_STATES, UNFINISHED_STATES
from relay.retention import DEFAULT_BATCH_SIZE, parse_duration, purge
from relay.tables import text_table

# Every state, in the order status shows them (zero counts included).
STATES: Final = MESSAGE_STATES
UNSENT_STATES: Final = ("pending", "retrying", "held")
DEFAULT_DESTINATION: Final = "default"
# Rows changed per transaction by retry, cancel and the release of held rows.
CHANGE_BATCH: Final = 1000
# How long retry/cancel wait for rows a relay is claiming at that instant (claims take
# milliseconds; a row still locked after this is reported, not waited for).
BUSY_WAIT_S: Final = 5.0
CLEAR_SCREEN: Final = "\x1b[H\x1b[2J"

Conn = psycopg.Connection[tuple[Any, ...]]


# --- plumbing -------------------------------------------------------------------------------


def _dsn() -> str:
    from relay.settings import database_url

    url = database_url()
    if not url:
        raise ConfigError("DATABASE_URL is not set (postgresql://user@host:port/dbname)")
    return url


@contextmanager
def _errors(purpose: str) -> Iterator[None]:
    """Database errors an operator can act on, as one line (exit 1 or 3) instead of a trace."""
    try:
        yield
    except psycopg.errors.InsufficientPrivilege as exc:
        raise RelayError(
            f"permission denied: {first_line(str(exc))} (relay {purpose} needs a role "
            "that may do this; see the roles in migration 0002)"
        ) from exc
    except psycopg.errors.UndefinedTable as exc:
        raise NotMigrated(
            f"{first_line(str(exc))}: is the database migrated? (relay migrate)"
        ) from exc
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailable(f"database connection lost: {first_line(str(exc))}") from exc


@contextmanager
def _session(purpose: str) -> Iterator[Conn]:
    """An autocommit connection to DATABASE_URL, closed on exit, errors translated."""
    with _errors(purpose):
        conn = connect(_dsn(), autocommit=True, application_name=f"relay {purpose}")
        # Never prepare: the selector statements must be planned with their actual values.
        conn.prepare_threshold = None
        with conn:
            yield conn


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, default=_json_default, sort_keys=False))


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if value else ""


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


# --- status ---------------------------------------------------------------------------------

# What `relay status` counts exactly without --exact: what partial indexes hold (the backlog
# and the dead messages). The finished states and the total are estimated from the planner's
# statistics instead, since counting them reads every row of the history.
# In STATES order, as OUTBOX_STATUS_BACKLOG returns them: pending, in_flight, retrying, held, dead.
COUNTED_STATES: Final = tuple(s for s in STATES if s in UNFINISHED_STATES or s == "dead")
FINISHED_STATES: Final = tuple(s for s in STATES if s not in COUNTED_STATES)
ESTIMATED: Final = (*FINISHED_STATES, "total")


EXACT_BELOW_PAGES: Final = 1024
"""A relay_outbox of at most this many pages (8 MB at the default block size) is counted
exactly when its statistics cannot estimate it (never analyzed): the count takes a few
milliseconds."""


UNFINISHED_READ_LIMIT: Final = 40_000
"""At most this many unfinished rows are read to count them (about 1 us each, one heap fetch
through the partial index). A bigger backlog (an outage) has its unfinished states estimated
instead, at least what was counted, and its ages reported as lower bounds: ``relay status``
stays in milliseconds however far behind the relays are."""

DEAD_READ_LIMIT: Final = 10_000
"""The same bound for dead rows."""


def backlog_limits() -> dict[str, int]:
    """``OUTBOX_STATUS_BACKLOG``'s parameters: the read limits."""
    return {"unfinished_limit": UNFINISHED_READ_LIMIT, "dead_limit": DEAD_READ_LIMIT}


UNFINISHED_COUNTED: Final = tuple(s for s in COUNTED_STATES if s != "dead")
AGES: Final = ("oldest_undelivered_age_s", "oldest_pending_age_s")


@dataclass(frozen=True)
class TableStatistics:
    """relay_outbox's statistics, as ``OUTBOX_STATUS_ESTIMATE`` reads them."""

    reltuples: float
    """Live rows at the last VACUUM or ANALYZE; -1 when neither ever ran."""
    relpages: int
    """The table's size in pages at that time."""
    pages: int
    """Its size in pages now."""
    state_freqs: dict[str, float]
    """Share of each most common state in the last ANALYZE's sample (empty: never analyzed)."""
    state_n_distinct: float | None = None
    """pg_stats.n_distinct of state (negative: a share of the rows); None: never analyzed."""
    analyzed_at: datetime | None = None

    def state_share(self, state: str) -> float:
        """The share of rows in ``state``, as the planner estimates ``state = '...'``
        (PostgreSQL's ``var_eq_const``): its frequency when it is one of the most common
        values; otherwise what those leave, spread evenly over the other distinct values, and
        no more than the least common of them. ANALYZE lists as most common only values seen
        at least twice in its sample, so a rare state is found here rather than in the list.
        """
        if state in self.state_freqs:
            return self.state_freqs[state]
        if self.state_n_distinct is None:
            return 0.0
        leftover = max(0.0, 1.0 - sum(self.state_freqs.values()))  # NOT NULL: no null share
        distinct = self.state_n_distinct
        if distinct < 0:
            distinct = -distinct * max(self.reltuples, 0.0)
        # The state's CHECK constraint allows no more distinct values than STATES.
        others = min(distinct, len(STATES)) - len(self.state_freqs)
        share = leftover / others if others > 1 else leftover
        return min(share, *self.state_freqs.values()) if self.state_freqs else share


def estimate_rows(stats: TableStatistics) -> float | None:
    """Live rows in the table now, as the planner estimates them (PostgreSQL's
    ``table_block_relation_estimate_size``): the density of the last VACUUM or ANALYZE,
    reltuples / relpages, times the pages the table has now.

    None when there is no density to scale: never vacuumed or analyzed (reltuples -1), or
    last seen empty (relpages 0) while it has pages now. The planner then guesses from the
    columns' types; a count printed as an estimate should not be a guess of that kind.
    """
    if stats.pages == 0:
        return 0.0  # no pages, no rows
    if stats.reltuples < 0 or stats.relpages == 0:
        return None
    return stats.reltuples / stats.relpages * stats.pages


def estimate_finished(stats: TableStatistics, counted: int) -> dict[str, int | None]:
    """Estimates of the finished states and of the total, given ``counted``: the exact number
    of unfinished and dead messages.

    The finished messages are the estimated total less the counted ones (so a backlog that
    grew or drained since the last ANALYZE does not skew them), split between delivered,
    coalesced and cancelled in the proportions the planner would assume from the last
    ANALYZE (``TableStatistics.state_share``). When that ANALYZE saw no finished message at
    all, or there is none yet, the split is unknown (None) though the total is not; when the
    total is unknown (``estimate_rows``), so is everything here.
    """
    rows = estimate_rows(stats)
    if rows is None:
        return dict.fromkeys(ESTIMATED, None)
    finished = max(0, round(rows) - counted)
    weights = {s: stats.state_share(s) for s in FINISHED_STATES}
    share = sum(weights.values())
    split: dict[str, int | None]
    if finished == 0:
        split = dict.fromkeys(FINISHED_STATES, 0)
    elif share > 0:
        split = {s: round(finished * w / share) for s, w in weights.items()}
    else:
        split = dict.fromkeys(FINISHED_STATES, None)
    return {**split, "total": counted + finished}


def _table_statistics(conn: Conn) -> TableStatistics:
    row = conn.execute(q.OUTBOX_STATUS_ESTIMATE).fetchone()
    assert row is not None  # the regclass cast raised if the table is missing
    reltuples, relpages, pages, values, freqs, n_distinct, analyzed_at = row
    return TableStatistics(
        reltuples=float(reltuples),
        relpages=int(relpages),
        pages=int(pages),
        state_freqs=dict(zip(values or (), freqs or (), strict=True)),
        state_n_distinct=None if n_distinct is None else float(n_distinct),
        analyzed_at=analyzed_at,
    )


def _empty_entry(exact: bool) -> dict[str, Any]:
    counts: dict[str, Any] = dict.fromkeys(STATES, 0)
    if not exact:
        counts.update(dict.fromkeys(FINISHED_STATES, None))
    return {
        **counts,
        "total": 0 if exact else None,
        "oldest_undelivered_age_s": None,
        "lag_s": None,
    }


def _destination_rows(conn: Conn, exact: bool) -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """Per destination: every count (``exact``: the relay_status view), or the counted states
    with the finished ones and the total None (not estimated per destination: pg_stats has no
    joint statistics of project_id and state to split them by).

    Also the states whose bounded read reached its limit (``UNFINISHED_READ_LIMIT``,
    ``DEAD_READ_LIMIT``): their per-destination counts are only what was read, so they are
    None here, and the ages are lower bounds."""
    out: dict[str, dict[str, Any]] = {}
    if exact:
        for row in conn.execute(q.STATUS_BY_DESTINATION).fetchall():
            out[row[0]] = {
                **dict(zip(STATES, (int(n) for n in row[1:9]), strict=True)),
                "total": int(row[9]),
                "oldest_undelivered_age_s": row[10],
                "lag_s": row[11],
            }
        return out, ()
    with conn.transaction():
        conn.execute(q.STATUS_INDEX_SCANS_ONLY)
        rows = conn.execute(q.OUTBOX_STATUS_BACKLOG, backlog_limits()).fetchall()
    for row in rows:
        entry = _empty_entry(exact=False)
        entry.update(zip(COUNTED_STATES, (int(n) for n in row[1:6]), strict=True))
        entry.update(oldest_undelivered_age_s=row[6], lag_s=row[7])
        out[row[0]] = entry
    capped: tuple[str, ...] = ()
    if sum(e[s] for e in out.values() for s in UNFINISHED_COUNTED) >= UNFINISHED_READ_LIMIT:
        capped += UNFINISHED_COUNTED
    if sum(e["dead"] for e in out.values()) >= DEAD_READ_LIMIT:
        capped += ("dead",)
    return out, capped


def status_snapshot(conn: Conn, *, exact: bool = False) -> dict[str, Any]:
    """Counts per state (all states, zero when none), ages, and per-destination figures.

    By default the unfinished states and dead are counted exactly from the partial indexes,
    and the finished states and the total are estimated (``estimated`` names them; None when
    unknown, and always None per destination). ``exact`` counts every row with the
    relay_status view, which reads the whole table. So does a table too small to matter
    whose statistics cannot give the estimates yet (never analyzed: a new deployment, the
    demo): counting ``EXACT_BELOW_PAGES`` pages costs milliseconds, and beats an unknown.

    A backlog over ``UNFINISHED_READ_LIMIT`` rows (or dead rows over ``DEAD_READ_LIMIT``)
    is not counted to its end: those states are estimated too, each at least what was
    counted (``at_least`` when there are no statistics to estimate from), None per
    destination, and the ages become lower bounds (``lower_bounds`` names them).
    """
    if not exact:
        stats = _table_statistics(conn)
        unknown = any(v is None for v in estimate_finished(stats, 0).values())
        exact = unknown and stats.pages <= EXACT_BELOW_PAGES
    destinations, capped = _destination_rows(conn, exact)
    configured = {r[0]: r for r in conn.execute(q.DESTINATION_LIST_WITHOUT_KEY).fetchall()}
    totals: dict[str, Any] = dict.fromkeys((*STATES, "total"), 0)
    lags: list[float] = []
    oldest: list[float] = []
    for entry in destinations.values():
        for key in (*STATES, "total") if exact else COUNTED_STATES:
            totals[key] += entry[key]
        if entry["oldest_undelivered_age_s"] is not None:
            oldest.append(float(entry["oldest_undelivered_age_s"]))
        if entry["lag_s"] is not None:
            lags.append(float(entry["lag_s"]))
    analyzed_at = None
    estimated: list[str] = [] if exact else list(ESTIMATED)
    at_least: list[str] = []
    if not exact:
        rows = estimate_rows(stats)
        for state in capped:
            if rows is None:
                at_least.append(state)
            else:
                totals[state] = max(totals[state], round(rows * stats.state_share(state)))
            for entry in destinations.values():
                entry[state] = None
        estimated = [s for s in STATES if s in capped and s not in at_least] + estimated
        totals.update(estimate_finished(stats, sum(totals[s] for s in COUNTED_STATES)))
        analyzed_at = stats.analyzed_at
    for name, d in configured.items():
        entry = destinations.setdefault(name, _empty_entry(exact))
        entry.update(configured=True, enabled=bool(d[3]), paused_reason=d[5] if d[4] else None)
        for state in capped:
            entry[state] = None
    for name, entry in destinations.items():
        if name not in configured:
            entry.update(configured=False, enabled=None, paused_reason=None)
    return {
        **totals,
        # Which of the figures above are estimates (the rest are exact counts).
        "estimated": estimated,
        # Counts that are only what a bounded read found (a backlog past the read limit with
        # no statistics to estimate it from): the true figure is at least this.
        "at_least": at_least,
        # Figures that are lower bounds: the ages, when the backlog was not read to its end.
        "lower_bounds": list(AGES) if set(capped) & set(UNFINISHED_COUNTED) else [],
        # The ANALYZE the estimates' split by state comes from (None: never, or --exact).
        "analyzed_at": analyzed_at,
        # Age of the oldest message waiting to be sent (pending or retrying): the relay's lag.
        "oldest_pending_age_s": max(lags) if lags else None,
        # Age of the oldest message not yet delivered (also in flight or held).
        "oldest_undelivered_age_s": max(oldest) if oldest else None,
        "destinations": dict(sorted(destinations.items())),
    }


def _bound(prefix: str, seconds: float | None) -> str:
    """An age, marked ``>=`` when it is a lower bound."""
    return _age(seconds) if seconds is None else prefix + _age(seconds)


def _approx(n: int | None) -> str:
    """An estimate as the table shows it: ``~9876``, ``~50.1k``, ``~1.23M``; ``?`` unknown."""
    if n is None:
        return "?"
    if n < 10_000:
        return f"~{n}"
    rounded = float(f"{n:.3g}")  # three significant digits: all an estimate is good for
    for suffix, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if rounded >= size:
            return f"~{rounded / size:g}{suffix}"
    return f"~{n}"  # unreachable: n >= 10,000 here


def render_status(snap: dict[str, Any]) -> str:
    estimated = set(snap.get("estimated", ()))
    at_least = set(snap.get("at_least", ()))
    floor = ">=" if snap.get("lower_bounds") else ""

    def total_cell(state: str) -> Any:
        if state in estimated:
            return _approx(snap[state])
        return f">={snap[state]}" if state in at_least else snap[state]

    headers = ["DESTINATION", *(s.upper().replace("_", " ") for s in STATES), "OLDEST", "LAG"]
    rows: list[list[Any]] = []
    for name, d in snap["destinations"].items():
        rows.append(
            [
                name,
                # None: a finished state, which is not estimated per destination.
                *("-" if d[s] is None else d[s] for s in STATES),
                _bound(floor, d["oldest_undelivered_age_s"]),
                _bound(floor, d["lag_s"]),
            ]
        )
    rows.append(
        [
            "TOTAL",
            *(total_cell(s) for s in STATES),
            _bound(floor, snap["oldest_undelivered_age_s"]),
            _bound(floor, snap["oldest_pending_age_s"]),
        ]
    )
    lines = text_table(headers, rows, right=range(1, len(STATES) + 1))
    lines.append("(OLDEST: oldest message not yet delivered; LAG: oldest waiting to be sent)")
    if floor or at_least:
        lines.append(
            f"(the backlog is over {UNFINISHED_READ_LIMIT:,} rows or the dead over "
            f"{DEAD_READ_LIMIT:,}: not counted to the end, so those states are estimated, "
            ">= marks a lower bound, and ages are of the rows read)"
        )
    if estimated:
        when = f" (last ANALYZE {_when(snap['analyzed_at'])})" if snap["analyzed_at"] else ""
        lines.append(
            f"(~: estimated from relay_outbox's statistics{when}; -: not estimated per destination)"
        )
        lines.append(
            "(the other counts are exact; relay status --exact counts every row, reading the "
            "whole table)"
        )
    lines.append("")
    total = snap["total"]
    lines.append(
        "messages in relay_outbox: "
        + (f"{_approx(total)} (estimated)" if "total" in estimated else str(total))
    )
    if any(snap[s] is None for s in estimated):
        lines.append(
            "finished counts unknown: relay_outbox has no statistics from a time it held rows "
            "yet (autovacuum analyzes it; or ANALYZE relay_outbox, or relay status --exact)"
        )
    lines.append(
        "oldest message waiting to be sent: "
        + (
            _bound(floor, snap["oldest_pending_age_s"])
            if snap["oldest_pending_age_s"] is not None
            else "none"
        )
    )
    for name, d in snap["destinations"].items():
        if d["paused_reason"]:
            lines.append(f"destination {name} is PAUSED: {d['paused_reason']}")
        elif d["enabled"] is False:
            lines.append(f"destination {name} is disabled (its messages are held)")
    if snap["held"]:
        lines.append(
            f"{total_cell('held')} held messages wait for a usable destination "
            "(see relay destinations list)"
        )
    if snap["dead"]:
        lines.append(
            f"{total_cell('dead')} dead messages (relay_dead_messages; re-queue: relay retry)"
        )
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    if args.watch is None:
        with _session("status") as conn:
            snap = status_snapshot(conn, exact=args.exact)
        if args.json:
            _print_json(snap)
        else:
            print(render_status(snap))
        return 0
    if not args.watch > 0:
        raise ConfigError("--watch needs a positive number of seconds")
    with _errors("status"):
        return _watch(args.watch, args.json, args.exact)


def _watch(interval: float, as_json: bool, exact: bool) -> int:
    """Redraw the status every ``interval`` seconds until Ctrl-C.

    A database that goes away is shown on screen and retried at the next refresh: a watch is
    most useful exactly when something is wrong.
    """
    conn: Conn | None = None
    try:
        while True:
            now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            try:
                if conn is None or conn.closed:
                    conn = connect(_dsn(), autocommit=True, application_name="relay status")
                snap = status_snapshot(conn, exact=exact)
                body = json.dumps(snap, default=_json_default) if as_json else render_status(snap)
            except (DatabaseUnavailable, psycopg.OperationalError) as exc:
                if conn is not None:
                    conn.close()
                conn = None
                error = first_line(str(exc))
                body = json.dumps({"error": error}) if as_json else f"database unavailable: {error}"
            if as_json:
                # One object a line: a stream a program can follow, no screen control codes.
                print(body, flush=True)
            else:
                header = f"relay status at {now}, every {interval:g}s (Ctrl-C to stop)\n\n"
                sys.stdout.write(CLEAR_SCREEN + header + body + "\n")
                sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
    except BrokenPipeError:
        # The reader went away (`relay status --watch --json | head -1`): stop as for Ctrl-C,
        # and point stdout at /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if conn is not None:
            conn.close()


# --- inspect --------------------------------------------------------------------------------

_MESSAGE_COLUMNS: Final = (
    "id",
    "message_id",
    "customer_key",
    "project_id",
    "event_id",
    "event_type",
    "kind",
    "state",
    "attempts",
    "created_at",
    "updated_at",
    "delivered_at",
    "last_error",
    "coalesced_into",
    "requeued_by",
    "requeued_at",
)
_ATTEMPT_COLUMNS: Final = (
    "id",
    "started_at",
    "status_code",
    "outcome",
    "error",
    "latency_ms",
    "relay_instance",
)


def customer_history(conn: Conn, customer: str, limit: int) -> dict[str, Any]:
    rows = conn.execute(q.HISTORY_FOR_CUSTOMER, {"customer": customer, "limit": limit}).fetchall()
    count = conn.execute(q.OUTBOX_COUNT_CUSTOMER, {"customer": customer}).fetchone()
    messages: dict[int, dict[str, Any]] = {}
    n = len(_MESSAGE_COLUMNS)
    for row in rows:
        message = messages.get(row[0])
        if message is None:
            message = dict(zip(_MESSAGE_COLUMNS, row[:n], strict=True))
            message["attempt_log"] = []
            messages[row[0]] = message
        if row[n] is not None:
            message["attempt_log"].append(dict(zip(_ATTEMPT_COLUMNS, row[n:], strict=True)))
    return {
        "customer": customer,
        "total_messages": int(count[0]) if count else 0,
        "messages": list(messages.values()),
    }


def render_history(history: dict[str, Any]) -> str:
    """One line per message, newest first, each followed by its attempts (newest first)."""
    messages = history["messages"]
    if not messages:
        return f"no messages for customer {history['customer']}"
    shown, total = len(messages), history["total_messages"]
    title = f"customer {history['customer']}: {total} messages" + (
        f", newest {shown} shown" if shown < total else ""
    )
    message_lines = text_table(
        ["ID", "MESSAGE ID", "EVENT", "KIND", "STATE", "ATTEMPTS", "WRITTEN", "LAST ERROR"],
        [
            [
                m["id"],
                m["message_id"],
                m["event_type"],
                m["kind"],
                m["state"] + (f" into {m['coalesced_into']}" if m["coalesced_into"] else ""),
                m["attempts"],
                _when(m["created_at"]),
                m["last_error"] or "",
            ]
            for m in messages
        ],
        right=(),
    )
    # All attempts in one table so their columns line up across messages.
    attempts = [a for m in messages for a in m["attempt_log"]]
    attempt_lines = iter(
        text_table(
            None,
            [
                [
                    "attempt",
                    _when(a["started_at"]),
                    a["status_code"] if a["status_code"] is not None else "-",
                    a["outcome"],
                    f"{a['latency_ms']:.0f} ms",
                    a["relay_instance"],
                    a["error"] or "",
                ]
                for a in attempts
            ],
            right=(),
        )
    )
    lines = [title + " (newest first; attempts: time, status, outcome, latency, relay)", ""]
    lines.append(message_lines[0])
    for m, line in zip(messages, message_lines[1:], strict=True):
        lines.append(line)
        if m["requeued_by"]:
            lines.append(f"      changed by {m['requeued_by']} at {_when(m['requeued_at'])}")
        lines.extend("      " + next(attempt_lines) for _ in m["attempt_log"])
    return "\n".join(lines)


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise ConfigError("--limit must be at least 1")
    with _session("inspect") as conn:
        history = customer_history(conn, args.customer, args.limit)
    if args.json:
        _print_json(history)
    else:
        print(render_history(history))
    return 0


# --- retry and cancel -----------------------------------------------------------------------


def _timestamp(text: str) -> datetime:
    """An ISO 8601 time for --since/--until; without an offset it is taken as UTC."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (e.g. 2026-11-29T10:00:00Z)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _selectors(args: argparse.Namespace, command: str) -> dict[str, Any]:
    params = {
        "ids": args.ids,
        "customer": args.customer,
        "destination": args.destination,
        "since": args.since,
        "until": args.until,
    }
    if all(v is None for v in params.values()) and not args.all:
        raise ConfigError(
            f"relay {command} needs a selector: --id, --customer, --destination, --since or "
            "--until (or --all to select every matching message)"
        )
    if args.since and args.until and args.since >= args.until:
        raise ConfigError("--since must be earlier than --until")
    return params


def _change_in_batches(
    conn: Conn, statement: str, params: dict[str, Any], states: Sequence[str]
) -> tuple[int, int]:
    """Run a batched UPDATE until nothing is left; returns (changed, left busy).

    The statements skip rows a relay has locked at that instant. When a batch changes nothing
    but matching rows remain, they are locked: wait briefly and try again, then give up and
    report them rather than hang behind a relay.
    """
    changed = 0
    deadline = time.monotonic() + BUSY_WAIT_S
    while True:
        rows = conn.execute(statement, {**params, "batch": CHANGE_BATCH}).fetchall()
        changed += len(rows)
        if rows:
            continue
        left = conn.execute(q.OUTBOX_COUNT_SELECTED, {**params, "states": list(states)})
        row = left.fetchone()
        busy = int(row[0]) if row else 0
        if busy == 0 or time.monotonic() >= deadline:
            return changed, busy
        time.sleep(0.1)


def _requeued_by(args: argparse.Namespace) -> str:
    return str(args.by or os.environ.get("USER") or "operator")


def cmd_retry(args: argparse.Namespace) -> int:
    params = _selectors(args, "retry")
    with _session("retry") as conn:
        if args.dry_run:
            row = conn.execute(q.OUTBOX_COUNT_SELECTED, {**params, "states": ["dead"]}).fetchone()
            matched = int(row[0]) if row else 0
            if args.json:
                _print_json({"dry_run": True, "matched": matched})
            else:
                print(f"would re-queue {matched} dead messages")
            return 0
        by = _requeued_by(args)
        changed, busy = _change_in_batches(
            conn, q.OUTBOX_REQUEUE_DEAD, {**params, "by": by}, ("dead",)
        )
        if changed:
            conn.execute(q.OUTBOX_WAKE_RELAYS)
    if args.json:
        _print_json({"dry_run": False, "changed": changed, "busy": busy, "by": by})
        return 0
    print(f"re-queued {changed} dead messages (by {by})")
    if busy:
        print(f"{busy} matching messages were locked and left dead; run again", file=sys.stderr)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    params = _selectors(args, "cancel")
    with _session("cancel") as conn:
        if args.dry_run:
            row = conn.execute(
                q.OUTBOX_COUNT_SELECTED, {**params, "states": list(UNSENT_STATES)}
            ).fetchone()
            matched = int(row[0]) if row else 0
            if args.json:
                _print_json({"dry_run": True, "matched": matched})
            else:
                print(f"would cancel {matched} unsent messages")
            return 0
        by = _requeued_by(args)
        changed, busy = _change_in_batches(
            conn, q.OUTBOX_CANCEL_UNSENT, {**params, "by": by}, UNSENT_STATES
        )
    if args.json:
        _print_json({"dry_run": False, "changed": changed, "busy": busy, "by": by})
        return 0
    print(f"cancelled {changed} messages (by {by})")
    if busy:
        print(
            f"{busy} matching messages were being claimed by a relay and were left; run again",
            file=sys.stderr,
        )
    return 0


# --- destinations ---------------------------------------------------------------------------


def _read_key(args: argparse.Namespace) -> str:
    """The new write key, from --write-key-file, --write-key or CUSTOMERIO_WRITE_KEY_NEW."""
    if args.write_key is not None and args.write_key_file is not None:
        raise ConfigError("give the write key once: --write-key or --write-key-file, not both")
    if args.write_key_file is not None:
        path = args.write_key_file
        try:
            raw = sys.stdin.read() if path == "-" else Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read --write-key-file {path}: {exc.strerror}") from None
        # Files and secret stores end keys with a newline that is not part of the key.
        key = raw.strip()
        source = f"--write-key-file {path}"
    elif args.write_key is not None:
        key = args.write_key
        source = "--write-key"
    else:
        from relay.settings import read_secret

        key = read_secret(os.environ, "CUSTOMERIO_WRITE_KEY_NEW") or ""
        source = "CUSTOMERIO_WRITE_KEY_NEW"
        if not key:
            raise ConfigError(
                "no write key: use --write-key-file PATH (or - for stdin), set "
                "CUSTOMERIO_WRITE_KEY_NEW (or CUSTOMERIO_WRITE_KEY_NEW_FILE), or pass "
                "--write-key KEY"
            )
    if not key:
        raise ConfigError(f"the write key from {source} is empty")
    # From here on, any error text that happens to contain the key prints it as ***.
    logs.register_secret(key)
    return key


def _check_project(project: str) -> str:
    project = project.strip()
    if not project:
        raise ConfigError("the project id is empty")
    if project == DEFAULT_DESTINATION:
        raise ConfigError(
            "the default destination is configured in the relays' environment "
            "(CUSTOMERIO_WRITE_KEY, CUSTOMERIO_REGION), not in relay_destination"
        )
    size = len(project.encode())
    if size > MAX_PROJECT_ID_BYTES:
        # No message could name it: record_event refuses longer project ids (relay.limits).
        raise ConfigError(
            f"the project id is {size} bytes (UTF-8); project ids are at most "
            f"{MAX_PROJECT_ID_BYTES}"
        )
    return project


def _release_held(conn: Conn, project: str) -> int:
    released = 0
    while True:
        rows = conn.execute(
            q.OUTBOX_RELEASE_HELD_PROJECT, {"project_id": project, "batch": CHANGE_BATCH}
        ).fetchall()
        released += len(rows)
        if len(rows) < CHANGE_BATCH:
            break
    if released:
        conn.execute(q.OUTBOX_WAKE_RELAYS)
    return released


def cmd_destinations_set(args: argparse.Namespace) -> int:
    from relay.client import Destination

    project = _check_project(args.project)
    key = _read_key(args)
    api_url = args.api_url.strip() if args.api_url and args.api_url.strip() else None
    # Validates the key's characters and the URL the same way the relays will.
    destination = Destination(project, base_url_for(args.region, api_url), key)
    from relay.settings import insecure_http_allowed

    if sends_key_in_clear(destination.base_url) and not insecure_http_allowed():
        raise ConfigError(
            f"--api-url {api_url} is plain HTTP to a host other than this machine: the write "
            "key would cross the network readable. Use https://, or set "
            "RELAY_ALLOW_INSECURE_HTTP=1 for a stand-in on a network you trust"
        )
    with _session("destinations set") as conn:
        row = conn.execute(
            q.DESTINATION_UPSERT,
            {"project_id": project, "region": args.region, "api_url": api_url, "write_key": key},
        ).fetchone()
        assert row is not None
        enabled, paused_reason = bool(row[0]), row[1]
        released = _release_held(conn, project) if enabled and not paused_reason else 0
    if args.json:
        _print_json(
            {
                "project_id": project,
                "region": args.region,
                "api_url": api_url,
                "key": mask_key(key),
                "enabled": enabled,
                "paused_reason": paused_reason,
                "released": released,
            }
        )
        return 0
    print(
        f"destination {project}: region {args.region}"
        + (f", API {api_url}" if api_url else "")
        + f", key {mask_key(key)}, {'enabled' if enabled else 'disabled'}"
    )
    if paused_reason:
        print(f"still paused (same key as when it was rejected): {paused_reason}")
    elif not enabled:
        print("it is disabled: its messages stay held until relay destinations enable")
    print(f"released {released} held messages")
    return 0


def _set_enabled(project: str, enabled: bool) -> tuple[bool, str | None, int]:
    verb = "enable" if enabled else "disable"
    with _session(f"destinations {verb}") as conn:
        row = conn.execute(
            q.DESTINATION_SET_ENABLED, {"project_id": project, "enabled": enabled}
        ).fetchone()
        if row is None:
            raise RelayError(f"no destination for project {project} (see relay destinations list)")
        paused_reason = row[1]
        released = _release_held(conn, project) if enabled and not paused_reason else 0
    return bool(row[0]), paused_reason, released


def cmd_destinations_enable(args: argparse.Namespace) -> int:
    project = _check_project(args.project)
    enabled, paused_reason, released = _set_enabled(project, True)
    if args.json:
        _print_json(
            {
                "project_id": project,
                "enabled": enabled,
                "paused_reason": paused_reason,
                "released": released,
            }
        )
        return 0
    print(f"destination {project} enabled; released {released} held messages")
    if paused_reason:
        print(f"still paused: {paused_reason} (set a new key with relay destinations set)")
    return 0


def cmd_destinations_disable(args: argparse.Namespace) -> int:
    project = _check_project(args.project)
    enabled, paused_reason, _ = _set_enabled(project, False)
    if args.json:
        _print_json({"project_id": project, "enabled": enabled, "paused_reason": paused_reason})
        return 0
    print(f"destination {project} disabled: its messages are held until it is enabled")
    return 0


def destination_rows(conn: Conn) -> list[dict[str, Any]]:
    row = conn.execute(q.DESTINATION_CAN_READ_KEY).fetchone()
    can_read_key = bool(row and row[0])
    sql = q.DESTINATION_LIST_WITH_KEY if can_read_key else q.DESTINATION_LIST_WITHOUT_KEY
    out = []
    for r in conn.execute(sql).fetchall():
        out.append(
            {
                "project_id": r[0],
                "region": r[1],
                "api_url": r[2],
                "key": mask_key(r[7]) if can_read_key else None,
                "enabled": bool(r[3]),
                "paused_at": r[4],
                "paused_reason": r[5],
                "updated_at": r[6],
            }
        )
    return out


def cmd_destinations_list(args: argparse.Namespace) -> int:
    with _session("destinations list") as conn:
        rows = destination_rows(conn)
    if args.json:
        _print_json(rows)
        return 0
    if not rows:
        print("no destinations in relay_destination (messages go to the default destination)")
        return 0
    lines = text_table(
        ["PROJECT", "REGION", "API URL", "KEY", "ENABLED", "PAUSED", "UPDATED"],
        [
            [
                r["project_id"],
                r["region"],
                r["api_url"] or "(region default)",
                r["key"] or "(not readable by this role)",
                "yes" if r["enabled"] else "no",
                f"since {_when(r['paused_at'])}: {r['paused_reason']}" if r["paused_at"] else "no",
                _when(r["updated_at"]),
            ]
            for r in rows
        ],
        right=(),
    )
    print("\n".join(lines))
    return 0


# --- purge ----------------------------------------------------------------------------------


def _progress_printer() -> Callable[[dict[str, int]], None]:
    """Progress lines on stderr: the first batch, then at most one a second."""
    last = [0.0]

    def show(totals: dict[str, int]) -> None:
        now = time.monotonic()
        if last[0] and now - last[0] < 1.0:
            return
        last[0] = now
        print(
            f"purge: {totals['messages']} messages, {totals['attempts']} attempts deleted so far",
            file=sys.stderr,
            flush=True,
        )

    return show


def cmd_purge(args: argparse.Namespace) -> int:
    older_than_s = parse_duration(args.older_than)
    with _errors("purge"):
        totals = purge(
            _dsn(),
            older_than_s,
            args.batch_size,
            _progress_printer(),
            include_dead=args.include_dead,
        )
    if args.json:
        _print_json(
            {
                "messages": totals["messages"],
                "attempts": totals["attempts"],
                "partitions": totals["partitions"],
                "partition_rows_estimated": totals["partition_rows"],
                "older_than": args.older_than,
                "include_dead": args.include_dead,
            }
        )
        return 0
    kinds = "delivered, coalesced, cancelled" + (" and dead" if args.include_dead else "")
    print(
        f"purged {totals['messages']} messages ({kinds}) and {totals['attempts']} attempts "
        f"older than {args.older_than}"
    )
    if totals["partitions"]:
        print(
            f"dropped {totals['partitions']} day partitions older than {args.older_than} "
            f"(about {totals['partition_rows']} rows)"
        )
    return 0


# --- parser ---------------------------------------------------------------------------------


def _add_selectors(p: argparse.ArgumentParser, what: str) -> None:
    g = p.add_argument_group("selectors (at least one, or --all; they combine with AND)")
    g.add_argument(
        "--id",
        dest="ids",
        type=_positive_int,
        action="append",
        metavar="N",
        help="relay_outbox row id (repeatable)",
    )
    g.add_argument("--customer", metavar="KEY", help="customer key (Customer.io userId)")
    g.add_argument(
        "--destination",
        metavar="PROJECT",
        help="project id; 'default' for messages without one",
    )
    g.add_argument(
        "--since",
        type=_timestamp,
        metavar="ISO",
        help="written at or after this time (ISO 8601; UTC when no offset is given)",
    )
    g.add_argument(
        "--until", type=_timestamp, metavar="ISO", help="written before this time (ISO 8601)"
    )
    g.add_argument("--all", action="store_true", help=f"every {what} message")
    p.add_argument(
        "--by",
        metavar="NAME",
        help="who is doing this, recorded in requeued_by (default: $USER, else 'operator')",
    )
    p.add_argument("--dry-run", action="store_true", help="only count the messages selected")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def register(sub: Any) -> None:
    """Add the operator subcommands to the ``relay`` parser."""
    s = sub.add_parser(
        "status",
        help="message counts per state and destination, oldest message, lag",
        description="Message counts per state and destination, the age of the oldest message "
        "waiting to be sent, and paused or disabled destinations. Unfinished (pending, in "
        "flight, retrying, held) and dead messages are counted exactly from their partial "
        "indexes; delivered, coalesced, cancelled and the total are estimated from the "
        "table's statistics (marked ~, and named under 'estimated' in --json), since counting "
        "them reads the whole history. --exact counts every row (the relay_status view).",
    )
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument(
        "--exact",
        action="store_true",
        help="count every state exactly, per destination too, with the relay_status view "
        "(reads every row of relay_outbox: seconds on millions of rows)",
    )
    s.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C; with --json, one object a line",
    )
    s.set_defaults(func=cmd_status)

    i = sub.add_parser(
        "inspect",
        help="one customer's messages and their delivery attempts",
        description="A customer's messages, newest first, each with the HTTP requests that "
        "carried it (the relay_message_history view).",
    )
    i.add_argument("customer", metavar="CUSTOMER", help="customer key (Customer.io userId)")
    i.add_argument("--limit", type=int, default=50, help="newest N messages (default 50)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(func=cmd_inspect)

    r = sub.add_parser(
        "retry",
        help="re-queue dead messages",
        description="Put dead messages back in the queue with a fresh attempt budget "
        "(attempts = 0), recording who did it and when. Needs a selector.",
    )
    _add_selectors(r, "dead")
    r.set_defaults(func=cmd_retry)

    c = sub.add_parser(
        "cancel",
        help="cancel messages not yet sent",
        description="Cancel pending, retrying and held messages (never ones in flight), "
        "recording who did it and when. Needs a selector.",
    )
    _add_selectors(c, "unsent")
    c.set_defaults(func=cmd_cancel)

    d = sub.add_parser(
        "destinations",
        help="list and change per-project Customer.io destinations",
        description="Per-project destinations (relay_destination). Keys are never printed in full.",
    )
    dsub = d.add_subparsers(dest="destinations_command", required=True, metavar="ACTION")
    dl = dsub.add_parser("list", help="list destinations (keys masked)")
    dl.add_argument("--json", action="store_true", help="print a JSON array")
    dl.set_defaults(func=cmd_destinations_list)
    ds = dsub.add_parser(
        "set",
        help="create or replace a project's destination, then release its held messages",
        description="Create or replace a project's destination. A new key (or region, or API "
        "URL) lifts a pause and enables it; held messages of the project go back to the "
        "queue. The key is read from --write-key-file, --write-key or CUSTOMERIO_WRITE_KEY_NEW "
        "(prefer the file or the variable: a command line is visible to other users).",
    )
    ds.add_argument("project", metavar="PROJECT", help="project id")
    ds.add_argument("--region", choices=("us", "eu"), required=True, help="workspace region")
    ds.add_argument("--write-key", metavar="KEY", help="Pipelines write key")
    ds.add_argument(
        "--write-key-file", metavar="PATH", help="read the write key from a file (- for stdin)"
    )
    ds.add_argument(
        "--api-url",
        metavar="URL",
        help="override the region's API base URL (plain http:// to another host needs "
        "RELAY_ALLOW_INSECURE_HTTP=1)",
    )
    ds.add_argument("--json", action="store_true", help="print one JSON object")
    ds.set_defaults(func=cmd_destinations_set)
    dd = dsub.add_parser("disable", help="stop sending a project's messages (they are held)")
    dd.add_argument("project", metavar="PROJECT")
    dd.add_argument("--json", action="store_true", help="print one JSON object")
    dd.set_defaults(func=cmd_destinations_disable)
    de = dsub.add_parser("enable", help="send a project's messages again")
    de.add_argument("project", metavar="PROJECT")
    de.add_argument("--json", action="store_true", help="print one JSON object")
    de.set_defaults(func=cmd_destinations_enable)

    p = sub.add_parser(
        "purge",
        help="delete finished messages and attempt rows older than a duration",
        description="Delete delivered, coalesced and cancelled messages (and dead ones with "
        "--include-dead) that last changed before the cutoff, and attempt rows started before "
        "it, in short batches that are safe while relays run. Unfinished messages are never "
        "deleted. Progress goes to stderr.",
    )
    p.add_argument(
        "--older-than", required=True, metavar="DURATION", help="e.g. 30d, 12h, 90m, 3600s"
    )
    p.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"rows per transaction (default {DEFAULT_BATCH_SIZE})",
    )
    p.add_argument("--include-dead", action="store_true", help="also delete dead messages")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object (progress stays on stderr)"
    )
    p.set_defaults(func=cmd_purge)
