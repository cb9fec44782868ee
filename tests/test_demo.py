"""``relay demo`` run as a user runs it: a subprocess, on a fresh database or on none at all."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from tests.relay_helpers import funnel_event, query, write_events

REPO = Path(__file__).resolve().parents[1]

# The README promises a demo well under a minute; a run that creeps towards it fails here.
TIME_LIMIT_S = 30.0

HEADINGS = (
    "What Customer.io received",
    "Messages for cus_demo_01",
    "HTTP requests to Customer.io",
    "Delivery status in the outbox",
    "Checks",
    "Summary:",
    "Try next",
)


def run_demo(
    args: Sequence[str], *, dsn: str | None, cwd: Path, dsn_file: Path | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``relay demo`` with ``dsn`` as DATABASE_URL, or ``dsn_file`` as DATABASE_URL_FILE."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in (
            "DATABASE_URL",
            "DATABASE_URL_FILE",
            "RELAY_DATA_DIR",
            "RELAY_LOG_LEVEL",
            "RELAY_LOG_FORMAT",
        )
    }
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    if dsn_file is not None:
        env["DATABASE_URL_FILE"] = str(dsn_file)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "relay.cli", "demo", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - started


def describe(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def assert_all_delivered(dsn: str) -> dict[str, int]:
    by_state = dict(query(dsn, "SELECT state, count(*) FROM relay_outbox GROUP BY state"))
    assert set(by_state) == {"delivered", "coalesced"}, by_state
    return by_state


def test_demo_delivers_every_committed_message_and_runs_again(dsn: str, tmp_path: Path) -> None:
    result, elapsed = run_demo([], dsn=dsn, cwd=tmp_path)

    assert result.returncode == 0, describe(result)
    assert elapsed < TIME_LIMIT_S, f"the demo took {elapsed:.1f} s"
    for heading in HEADINGS:
        assert heading in result.stdout, describe(result)
    assert "FAIL" not in result.stdout
    assert result.stdout.count("  ok  ") == 4, describe(result)
    assert "Traceback" not in result.stderr, result.stderr

    first = assert_all_delivered(dsn)
    # Anonymous page views are never recorded.
    assert query(dsn, "SELECT count(*) FROM relay_outbox WHERE event_type = 'page.view'") == [(0,)]
    # cus_demo_02's add-on order rolled back: only its first purchase is in the outbox.
    assert query(
        dsn,
        "SELECT count(DISTINCT event_id) FROM relay_outbox "
        "WHERE customer_key = 'cus_demo_02' AND event_type = 'purchase.complete'",
    ) == [(1,)]
    # Each order's transaction writes three identifies at once; the relay merges them.
    assert first["coalesced"] >= 6
    outcomes = dict(query(dsn, "SELECT outcome, count(*) FROM relay_attempt GROUP BY outcome"))
    assert outcomes.get("delivered", 0) >= 1

    again, _ = run_demo([], dsn=dsn, cwd=tmp_path)
    assert again.returncode == 0, describe(again)
    second = assert_all_delivered(dsn)
    # The second run replaced the first run's rows instead of adding to them.
    assert sum(second.values()) == sum(first.values())


def test_demo_with_faults_retries_until_everything_is_delivered(dsn: str, tmp_path: Path) -> None:
    result, elapsed = run_demo(
        ["--customers", "3", "--faults", "5xx=0.3,429=0.1", "--seed", "3"], dsn=dsn, cwd=tmp_path
    )

    assert result.returncode == 0, describe(result)
    assert elapsed < TIME_LIMIT_S, f"the demo took {elapsed:.1f} s"
    assert_all_delivered(dsn)
    outcomes = dict(query(dsn, "SELECT outcome, count(*) FROM relay_attempt GROUP BY outcome"))
    assert outcomes.get("retry", 0) >= 1, outcomes
    assert query(dsn, "SELECT count(*) > 0 FROM relay_outbox WHERE attempts > 1") == [(True,)]
    # The relay's retry warnings go to stderr; stdout holds only the demo's own report.
    assert "to retry" in result.stderr
    assert "WARNING" not in result.stdout


def test_demo_refuses_an_outbox_holding_other_messages(dsn: str, tmp_path: Path) -> None:
    write_events(dsn, [funnel_event("cus_real", 1)])

    refused, _ = run_demo([], dsn=dsn, cwd=tmp_path)
    assert refused.returncode == 2, describe(refused)
    assert "not the demo's" in refused.stderr

    # Undelivered messages would be "delivered" to the local stand-in: never, even forced.
    forced, _ = run_demo(["--force"], dsn=dsn, cwd=tmp_path)
    assert forced.returncode == 2, describe(forced)
    assert "--force does not override" in forced.stderr
    assert query(dsn, "SELECT state, attempts FROM relay_outbox") == [("pending", 0)] * 2

    with psycopg.connect(dsn) as conn:
        conn.execute("UPDATE relay_outbox SET state = 'delivered', delivered_at = now()")
    refused, _ = run_demo(["--customers", "2"], dsn=dsn, cwd=tmp_path)
    assert refused.returncode == 2, describe(refused)
    assert "--force" in refused.stderr

    forced, _ = run_demo(["--customers", "2", "--force"], dsn=dsn, cwd=tmp_path)
    assert forced.returncode == 0, describe(forced)
    # The other messages are left as they were.
    assert (
        query(
            dsn,
            "SELECT state, attempts FROM relay_outbox WHERE customer_key = 'cus_real'",
        )
        == [("delivered", 0)] * 2
    )


def test_demo_reads_the_database_url_from_database_url_file(dsn: str, tmp_path: Path) -> None:
    # A mounted secret, as containers pass it: the file ends with a newline.
    secret = tmp_path / "database_url"
    secret.write_text(dsn + "\n")
    data_dir = tmp_path / "pg"

    result, _ = run_demo(
        ["--customers", "2", "--data-dir", str(data_dir)], dsn=None, cwd=tmp_path, dsn_file=secret
    )

    assert result.returncode == 0, describe(result)
    assert "DATABASE_URL postgresql://" in result.stdout, describe(result)
    assert "embedded PostgreSQL" not in result.stdout
    # The demo ran on the file's database, and never started the embedded server.
    assert_all_delivered(dsn)
    assert query(dsn, "SELECT count(*) > 0 FROM relay_outbox") == [(True,)]
    assert not data_dir.exists()


def test_demo_rejects_an_unknown_fault_kind(tmp_path: Path) -> None:
    result, _ = run_demo(["--faults", "meteor=0.5"], dsn=None, cwd=tmp_path)

    assert result.returncode == 2
    assert "unknown fault kind 'meteor'" in result.stderr
    assert not (tmp_path / ".relay-data").exists()


def test_demo_on_the_embedded_postgresql_when_database_url_is_unset(tmp_path: Path) -> None:
    data_dir = tmp_path / "pg"
    result, elapsed = run_demo(
        ["--customers", "2", "--data-dir", str(data_dir)], dsn=None, cwd=tmp_path
    )

    assert result.returncode == 0, describe(result)
    # This includes creating the server's data folder (initdb), the slowest part of a first run.
    assert elapsed < TIME_LIMIT_S, f"the demo took {elapsed:.1f} s"
    assert f"embedded PostgreSQL in {data_dir}, database relay_demo" in result.stdout
    for heading in HEADINGS:
        assert heading in result.stdout, describe(result)
    assert "Traceback" not in result.stderr, result.stderr

    # The demo's server stopped when it exited; start it again to look at what it left.
    from relay.embedded import EmbeddedPostgres

    server = EmbeddedPostgres(data_dir, delete_on_exit=True)
    try:
        assert_all_delivered(server.dsn("relay_demo"))
    finally:
        server.stop()


def test_the_demo_never_imports_the_command_line() -> None:
    # relay.cli imports relay.demo to add the subcommand; an import back, even one deferred
    # into a function, would make the two modules a cycle.
    importers = []
    for path in sorted((REPO / "relay" / "demo").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if "relay.cli" in names:
                importers.append(f"{path.name}:{node.lineno}")
    assert importers == []
    # Imported alone, in a fresh interpreter, the demo loads without the command line.
    probe = "import sys, relay.demo; print('relay.cli' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False", result.stderr
