"""What both benchmarks share: a throw-away database, realistic AppFunnel events, statistics,
plain-text tables, the reproduce line and the JSON results file.

Database choice (``--dsn``): by default the machine's PostgreSQL at ``LOCAL_SERVER`` when it
answers, else an embedded server in a temporary folder; ``--dsn embedded`` forces the embedded
one and ``--dsn postgresql://...`` names any server the user may create databases on. Either
way each run works in its own database ``relay_bench_<pid>``, migrated to head, dropped at the
end, so a run never sees another run's rows (or the test suite's).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from relay.tables import markdown_table

LOCAL_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent
WRITE_KEY = "bench-write-key"
PROJECT_ID = "proj_bench"

# --------------------------------------------------------------------------- the database


@dataclass
class BenchDatabase:
    """The run's own database and what it runs on."""

    dsn: str
    server: str
    """``local``, ``embedded`` or the ``--dsn`` URL without its password."""
    version: str
    settings: dict[str, str] = field(default_factory=dict)
    """Server settings that decide commit cost (fsync, synchronous_commit, ...)."""


def add_database_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dsn",
        help=(
            "PostgreSQL server to create the benchmark database on: a postgresql:// URL, or "
            f"'embedded'. Default: {LOCAL_SERVER} when it answers, else embedded."
        ),
    )


def _with_dbname(dsn: str, dbname: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + dbname))


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def _answers(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.Error:
        return False
    return True


@contextlib.contextmanager
def _server(choice: str | None) -> Iterator[tuple[str, str]]:
    """(maintenance DSN, label) of the server to use; an embedded one lives for the block."""
    if choice and choice != "embedded":
        if urlsplit(choice).scheme not in ("postgres", "postgresql"):
            raise SystemExit("--dsn must be a postgresql:// URL or 'embedded'")
        yield choice, _redacted(choice)
        return
    if choice is None and _answers(LOCAL_SERVER):
        yield LOCAL_SERVER, "local"
        return
    from relay.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    server = EmbeddedPostgres(data_dir, delete_on_exit=True)
    try:
        yield server.dsn("postgres"), "embedded"
    finally:
        server.stop()


@contextlib.contextmanager
def bench_database(choice: str | None) -> Iterator[BenchDatabase]:
    """A fresh, migrated ``relay_bench_<pid>`` database, dropped when the block ends."""
    from relay.migrate import upgrade

    with _server(choice) as (admin, label):
        name = f"relay_bench_{os.getpid()}"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsn = _with_dbname(admin, name)
        try:
            upgrade(dsn)
            with psycopg.connect(dsn) as conn:
                version = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
                settings = {
                    s: str(conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(s))).fetchone()[0])  # type: ignore[index]
                    for s in (
                        "fsync",
                        "synchronous_commit",
                        "wal_sync_method",
                        "shared_buffers",
                        "max_wal_size",
                    )
                }
            yield BenchDatabase(dsn, label, version, settings)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                # FORCE: a relay subprocess killed by a failed run may still hold a session.
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


def checkpoint(dsn: str) -> None:
    """Flush dirty buffers now, so a variant does not pay for the previous one's writes.

    Needs superuser (or pg_checkpoint); without it the variants simply share that noise.
    """
    with contextlib.suppress(psycopg.Error), psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


# --------------------------------------------------------------------------- events

_FUNNEL_DATA = {
    "utm_source": "instagram",
    "utm_medium": "paid_social",
    "utm_campaign": "spring_quiz_v3",
    "quiz_goal": "lose_weight",
    "quiz_age_band": "35-44",
    "quiz_activity": "lightly_active",
    "plan_variant": "B",
    "paywall": "annual_first",
    "landing_path": "/q/weight-loss",
}


def customer(n: int, *, consent: bool = False, **extra: Any) -> dict[str, Any]:
    """Customer ``n`` as AppFunnel sends it: identified, with the usual profile and funnel data."""
    return {
        "id": f"cus_{n:08d}",
        "email": f"customer{n}@example.com",
        "name": f"Customer {n}",
        "gender": "female" if n % 2 else "male",
        "date_of_birth": "1987-04-12",
        "country": "US",
        "city": "Austin",
        "state": "TX",
        "project_id": PROJECT_ID,
        "first_campaign_slug": "spring-quiz",
        "campaign_base_url": "https://app.example.com/spring-quiz",
        "marketing_consent": consent,
        "created_at": 1_764_000_000 + n,
        "last_session_id": f"ses_{n:08d}_1",
        "funnel_data": {**_FUNNEL_DATA, "session_no": 1 + n % 3},
        **extra,
    }


# Events are dated today (UTC), as live traffic is: the outbox is partitioned by occurred_at,
# and an event of a day with no partition goes to the DEFAULT partition, one more than 25 hours
# old also through the floor trigger (a late event's path). A fixed date would have measured
# that path in every benchmark once the date was past. The same in every process of one run
# (peers' workers map the same events), unless a run crosses midnight UTC.
EVENT_DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def order_event(n: int, seq: int) -> dict[str, Any]:
    """The event an order-taking transaction records: ``checkout.start`` of customer ``n``.

    ``seq`` makes the event id unique, so every call writes rows (a duplicate writes nothing and
    would make ``record_event`` look cheaper than it is).
    """
    when = EVENT_DAY + timedelta(milliseconds=seq)
    return {
        "id": f"evt_order_{seq}_{n}",
        "type": "checkout.start",
        "occurred_at": when.isoformat(),
        "customer": customer(n),
        "properties": {
            "price_id": "price_annual_4999",
            "amount": 4999,
            "currency": "USD",
            "plan": "annual",
            "coupon": None,
            "items": [{"sku": "plan-annual", "qty": 1, "price": 49.99}],
        },
    }


FUNNEL_STEPS: tuple[str, ...] = (
    "user.registered",
    "page.view",
    "page.view",
    "checkout.start",
    "checkout.payment_added",
    "purchase.complete",
    "customer.first_purchase",
    "subscription.created",
    "marketing.consent_given",
    "subscription.renewal",
)
"""A customer's realistic funnel: 10 events, each an identify plus a track in the outbox."""


def funnel_event(n: int, step: int) -> dict[str, Any]:
    """Step ``step`` (index into ``FUNNEL_STEPS``) of customer ``n``'s funnel."""
    kind = FUNNEL_STEPS[step]
    when = EVENT_DAY + timedelta(minutes=step, seconds=n % 60)
    consent = step >= FUNNEL_STEPS.index("marketing.consent_given")
    extra: dict[str, Any] = {}
    if kind == "subscription.created":
        extra["subscriptions"] = [
            {
                "id": f"sub_{n:08d}",
                "status": "active",
                "priceId": "price_annual_4999",
                "currentPeriodStart": "2026-11-28T10:07:00Z",
                "currentPeriodEnd": "2027-11-28T10:07:00Z",
                "createdAt": "2026-11-28T10:07:00Z",
            }
        ]
    by_kind: dict[str, dict[str, Any]] = {
        "user.registered": {"method": "email"},
        "page.view": {"path": f"/q/weight-loss/{step}", "title": "Your plan", "referrer": ""},
        "checkout.start": {"price_id": "price_annual_4999", "amount": 4999, "currency": "USD"},
        "checkout.payment_added": {"method": "card", "brand": "visa"},
        "purchase.complete": {"order_id": f"ord_{n:08d}", "amount": 4999, "currency": "USD"},
        "customer.first_purchase": {"order_id": f"ord_{n:08d}"},
        "subscription.created": {"subscription_id": f"sub_{n:08d}", "plan": "annual"},
        "marketing.consent_given": {"channel": "email", "source": "checkout"},
        "subscription.renewal": {"subscription_id": f"sub_{n:08d}", "period": 2},
    }
    properties = by_kind[kind]
    return {
        "id": f"evt_{n:08d}_{step}",
        "type": kind,
        "occurred_at": when.isoformat(),
        "customer": customer(n, consent=consent, **extra),
        "properties": properties,
    }


# --------------------------------------------------------------------------- statistics


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) by linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50.0)


# --------------------------------------------------------------------------- reporting


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (readable as plain text too); numbers right-aligned,
    figures rounded to what a benchmark can tell apart."""
    return "\n".join(markdown_table(headers, rows, cell=_cell))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        magnitude = abs(value)
        if magnitude >= 100:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def reproduce_command(module: str) -> str:
    """The command line that reruns this benchmark with the same options."""
    return shlex.join(["python", "-m", module, *sys.argv[1:]])


def environment(db: BenchDatabase) -> dict[str, Any]:
    """Where the figures come from: enough to tell two runs' machines apart."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                check=False,
            ).stdout.strip()
        )
    except OSError:
        commit, dirty = "", False
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg_at_start": list(os.getloadavg()),
        "python": platform.python_version(),
        "postgres": db.version,
        "postgres_server": db.server,
        "postgres_settings": db.settings,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "relay_code": code_fingerprint(),
    }


SHARED_MACHINE_NOTE = (
    "Figures are from one run on a shared machine: compare rows with each other, not with "
    "another run."
)


def footer(payload: dict[str, Any], *, shared_machine_note: bool = True) -> list[str]:
    """The last lines of a benchmark's printed output: the shared-machine reminder, the
    warning when the relay's source changed during the run, and the command that reproduces
    it."""
    lines = [SHARED_MACHINE_NOTE] if shared_machine_note else []
    if payload.get("relay_code_changed"):
        lines.append(payload["relay_code_changed"])
    lines.append(f"\nreproduce: {payload['command']}")
    return lines


def spawn_listening(
    args: Sequence[str], what: str, *, stdin: bool = False
) -> tuple[subprocess.Popen[str], str]:
    """Start a local server process that prints ``listening on URL`` first; (process, URL)."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE if stdin else None,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    found = re.search(r"listening on (\S+)", line)
    if not found:
        proc.kill()
        raise RuntimeError(f"{what} did not start: {line!r}")
    return proc, found.group(1)


def code_fingerprint() -> str:
    """A digest of the relay's source (relay/ and models/), to tell whether it changed.

    The benchmarks import the relay from the working tree; a run that spans an edit measures
    two versions, which its output must say. Taken at the start and at the end of a run.
    """
    digest = hashlib.sha256()
    for folder in ("relay", "models"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(str(path.relative_to(REPO_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def code_changed_warning(env: dict[str, Any], at_end: str) -> str | None:
    if env.get("relay_code") == at_end:
        return None
    return (
        f"WARNING: the relay's source changed during this run ({env.get('relay_code')} at the "
        f"start, {at_end} at the end): the figures may mix two versions; run again."
    )


def describe_environment(env: dict[str, Any]) -> str:
    s = env["postgres_settings"]
    load = ", ".join(f"{x:.2f}" for x in env["load_avg_at_start"])
    return (
        f"{env['date']}  host {env['host']}  {env['cpus']} CPUs  load {load}  "
        f"Python {env['python']}  PostgreSQL {env['postgres']} ({env['postgres_server']}, "
        f"fsync={s.get('fsync')}, synchronous_commit={s.get('synchronous_commit')}, "
        f"wal_sync_method={s.get('wal_sync_method')})  commit {env['git_commit'] or '?'}  "
        f"relay source {env['relay_code']}"
    )


def write_results(name: str, payload: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False, default=_json_value) + "\n")
    return path


def _json_value(value: Any) -> Any:
    # PostgreSQL's sum() and numeric columns come back as Decimal: a number in the JSON, as
    # bench.summary reads it, not the string that str() would make of it.
    if isinstance(value, Decimal):
        return float(value)
    return str(value)
