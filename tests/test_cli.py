"""The ``relay`` command as an operator meets it: a subprocess, its exit status and its output.

Every refusal is one line on stderr with a documented exit status (docs/reference.md, "The command
line"); settings are checked before anything starts; secrets and passwords are never printed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.limits import MAX_PROJECT_ID_BYTES
from relay.migrate import head_revision
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import KEY, funnel_event, query, states, write_events
from tests.relay_helpers import relay_env as helpers_relay_env

REPO = Path(__file__).resolve().parents[1]
RELAY = Path(sys.executable).parent / "relay"
PASSWORD = "S3cretPW"
UNREACHABLE = "postgresql://postgres@127.0.0.1:1/nowhere"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any of the relay's settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DATABASE_URL", "CUSTOMERIO_", "RELAY_"))
    }
    env.update(extra)
    return env


def relay_env(dsn: str, cio: FakeCustomerIO, **extra: str) -> dict[str, str]:
    return helpers_relay_env(dsn, cio.url, **extra)


def relay(
    *args: str, env: dict[str, str], cwd: Path | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    assert RELAY.exists(), f"the relay command is not installed at {RELAY}"
    return subprocess.run(
        [str(RELAY), *args],
        env=env,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def describe(proc: subprocess.CompletedProcess[str]) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def one_line(proc: subprocess.CompletedProcess[str], code: int) -> str:
    """The single line a refusal prints on stderr (nothing on stdout)."""
    assert proc.returncode == code, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, describe(proc)
    assert "Traceback" not in proc.stderr
    assert proc.stdout == "", describe(proc)
    return lines[0]


# --- 1. fail closed -------------------------------------------------------------------------


def test_run_without_database_url_refuses_to_start(tmp_path: Path) -> None:
    proc = relay("run", env=clean_env(CUSTOMERIO_WRITE_KEY=KEY), cwd=tmp_path)

    line = one_line(proc, 2)
    assert "DATABASE_URL" in line and "--embedded" in line, line
    # Nothing was started: no embedded database appeared where it ran.
    assert list(tmp_path.iterdir()) == []


def test_embedded_flags_are_refused_where_they_would_mislead(tmp_path: Path, dsn: str) -> None:
    both = relay("run", "--embedded", env=clean_env(CUSTOMERIO_WRITE_KEY=KEY, DATABASE_URL=dsn))
    assert "--embedded" in one_line(both, 2) and "DATABASE_URL" in both.stderr

    data_dir = tmp_path / "pg"
    alone = relay("run", "--data-dir", str(data_dir), env=clean_env(CUSTOMERIO_WRITE_KEY=KEY))
    assert "--data-dir" in one_line(alone, 2) and "--embedded" in alone.stderr
    assert not data_dir.exists()


def try_next(stdout: str) -> list[str]:
    """The commands under the demo's "Try next" heading (first column of each line)."""
    block = stdout.split("Try next", 1)[1]
    commands = []
    for line in block.splitlines()[1:]:
        if not line.startswith("  "):
            break
        if line.startswith("   "):
            continue  # a description carried over to its own line
        command = re.split(r"\s{3,}", line.strip())[0]
        if command and not command.startswith("SELECT"):
            commands.append(command)
    return commands


def test_the_embedded_demo_suggests_a_command_that_works_as_printed(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo-pg"
    env = clean_env(PATH=f"{RELAY.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    demo = relay(
        "demo", "--customers", "2", "--data-dir", str(data_dir), env=env, cwd=tmp_path, timeout=180
    )
    assert demo.returncode == 0, describe(demo)
    suggested = [c for c in try_next(demo.stdout) if " relay run" in f" {c}"]
    assert suggested, describe(demo)
    for command in try_next(demo.stdout):
        # Every suggestion runs on what the demo left; none reads an unset DATABASE_URL.
        assert shlex.split(command)[:2] != ["relay", "status"], demo.stdout

    # The daemon the demo suggests, run exactly as printed, starts on the demo's data folder.
    proc = subprocess.Popen(
        ["bash", "-c", suggested[0]],  # bash execs a lone command: SIGTERM reaches the relay
        env=env,
        cwd=tmp_path,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            output.append(line)
            if re.search(r"relay \S+ running", line) or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        output.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    text = "".join(output)
    assert re.search(r"relay \S+ running", text), text
    assert proc.returncode == 0, text
    assert "Traceback" not in text


def test_run_embedded_migrates_its_own_database_and_drains(
    tmp_path: Path, cio: FakeCustomerIO
) -> None:
    data_dir = tmp_path / "pg"
    env = clean_env(CUSTOMERIO_WRITE_KEY=KEY, CUSTOMERIO_API_URL=cio.url)
    proc = relay("run", "--embedded", "--data-dir", str(data_dir), "--drain", env=env)

    assert proc.returncode == 0, describe(proc)
    assert "drain complete" in proc.stderr
    assert (data_dir / "PG_VERSION").exists()


# --- 2. secrets from files ------------------------------------------------------------------


def test_write_key_and_database_url_from_files(
    tmp_path: Path, dsn: str, cio: FakeCustomerIO
) -> None:
    write_events(dsn, [funnel_event("cus_file", 0)])
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")  # as secret stores write them
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(dsn + "\n")
    env = relay_env(dsn, cio, CUSTOMERIO_WRITE_KEY_FILE=str(key_file))
    del env["CUSTOMERIO_WRITE_KEY"], env["DATABASE_URL"]
    env["DATABASE_URL_FILE"] = str(dsn_file)

    proc = relay("run", "--drain", "--timeout", "30", env=env)

    assert proc.returncode == 0, describe(proc)
    assert states(dsn) == {"delivered": 2}
    # --exact: a table this new has no statistics, so plain status leaves delivered unknown.
    status = relay("status", "--exact", "--json", env=env)
    assert json.loads(status.stdout)["delivered"] == 2, describe(status)


@pytest.mark.parametrize("variable", ["CUSTOMERIO_WRITE_KEY", "DATABASE_URL"])
def test_a_secret_and_its_file_together_are_refused(
    tmp_path: Path, dsn: str, cio: FakeCustomerIO, variable: str
) -> None:
    path = tmp_path / "secret"
    path.write_text("whatever\n")
    env = relay_env(dsn, cio, **{f"{variable}_FILE": str(path)})

    line = one_line(relay("run", "--drain", env=env), 2)
    assert variable in line and f"{variable}_FILE" in line, line


@pytest.mark.parametrize("variable", ["CUSTOMERIO_WRITE_KEY", "DATABASE_URL"])
@pytest.mark.parametrize("problem", ["missing", "directory", "not text", "empty"])
def test_an_unusable_secret_file_is_one_line_without_its_content(
    tmp_path: Path, dsn: str, cio: FakeCustomerIO, variable: str, problem: str
) -> None:
    path = tmp_path / "secret"
    if problem == "directory":
        path.mkdir()
    elif problem == "not text":
        path.write_bytes(PASSWORD.encode() + b"\xff\xfe" + PASSWORD.encode())
    elif problem == "empty":
        path.write_text("\n")
    env = relay_env(dsn, cio, **{f"{variable}_FILE": str(path)})
    del env[variable]

    line = one_line(relay("run", "--drain", env=env), 2)
    assert f"{variable}_FILE" in line and str(path) in line, line
    assert PASSWORD[:4] not in line and "0xff" not in line, line


def test_the_new_key_of_a_destination_may_come_from_a_file(tmp_path: Path, dsn: str) -> None:
    path = tmp_path / "new-key"
    path.write_text("wk_proj_0123456789abcdef\n")
    env = clean_env(DATABASE_URL=dsn, CUSTOMERIO_WRITE_KEY_NEW_FILE=str(path))

    proc = relay("destinations", "set", "proj_a", "--region", "eu", env=env)

    assert proc.returncode == 0, describe(proc)
    assert query(dsn, "SELECT write_key FROM relay_destination") == [("wk_proj_0123456789abcdef",)]
    assert "0123456789abcdef" not in proc.stdout + proc.stderr


# --- 3. every setting validated -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RELAY_LEASE_SECONDS", "nan"),
        ("RELAY_LEASE_SECONDS", "inf"),
        ("RELAY_RATE_PER_SECOND", "inf"),
        ("RELAY_BACKOFF_CAP", "inf"),
        ("RELAY_BACKOFF_BASE", "-inf"),
        ("RELAY_HTTP_TIMEOUT", "NaN"),
        ("RELAY_MAX_AGE_SECONDS", "1e400"),
        ("RELAY_RETRY_AFTER_CAP", "-1"),
        ("RELAY_POLL_INTERVAL", "0"),
        ("RELAY_RETENTION_DAYS", "nan"),
        ("RELAY_RETENTION_DAYS", "-3"),
        ("RELAY_VACUUM_SECONDS", "inf"),
        ("RELAY_VACUUM_MIN_DEAD", "-5"),
        ("RELAY_METRICS_PORT", "70000"),
        ("RELAY_CONCURRENCY", "0"),
        ("RELAY_GZIP_MIN_BYTES", "-1"),
    ],
)
def test_a_number_out_of_range_is_refused_at_start(
    dsn: str, cio: FakeCustomerIO, name: str, value: str
) -> None:
    line = one_line(relay("run", "--drain", env=relay_env(dsn, cio, **{name: value})), 2)
    assert line.startswith("relay: configuration error: ") and name in line, line
    assert value.lower() in line.lower(), line


@pytest.mark.parametrize(("flag", "value"), [("--lease", "nan"), ("--poll-interval", "inf")])
def test_a_flag_out_of_range_is_refused_at_start(
    dsn: str, cio: FakeCustomerIO, flag: str, value: str
) -> None:
    line = one_line(relay("run", "--drain", flag, value, env=relay_env(dsn, cio)), 2)
    assert flag in line, line


@pytest.mark.parametrize(
    ("name", "value"), [("RELAY_LOG_LEVEL", "LOUD"), ("RELAY_LOG_FORMAT", "xml")]
)
def test_a_bad_log_setting_is_one_line(dsn: str, name: str, value: str) -> None:
    line = one_line(relay("status", env=clean_env(DATABASE_URL=dsn, **{name: value})), 2)
    assert name in line and value in line, line


def test_a_bad_log_level_flag_is_one_line(dsn: str) -> None:
    line = one_line(relay("status", "--log-level", "LOUD", env=clean_env(DATABASE_URL=dsn)), 2)
    assert "--log-level" in line and "LOUD" in line, line


def test_an_unknown_relay_variable_is_a_warning_naming_the_closest(dsn: str) -> None:
    env = clean_env(DATABASE_URL=dsn, RELAY_BATCH_SZIE="50", RELAY_COLOUR="blue")
    proc = relay("status", "--json", env=env)

    assert proc.returncode == 0, describe(proc)
    json.loads(proc.stdout)
    warnings = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 2, proc.stderr
    typo = next(line for line in warnings if "RELAY_BATCH_SZIE" in line)
    assert "RELAY_BATCH_SIZE" in typo
    other = next(line for line in warnings if "RELAY_COLOUR" in line)
    assert "did you mean" not in other


def test_the_removed_max_attempts_keeps_its_own_warning(dsn: str, cio: FakeCustomerIO) -> None:
    proc = relay("run", "--drain", env=relay_env(dsn, cio, RELAY_MAX_ATTEMPTS="3"))

    assert proc.returncode == 0, describe(proc)
    lines = [line for line in proc.stderr.splitlines() if "RELAY_MAX_ATTEMPTS" in line]
    assert len(lines) == 1 and "ignored" in lines[0], proc.stderr


# --- 4. passwords ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://postgres@127.0.0.1:1/nowhere?password={PASSWORD}",
        f"postgresql://postgres@127.0.0.1:1/nowhere?sslmode=disable&password={PASSWORD}",
        f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/nowhere",
    ],
)
@pytest.mark.parametrize("command", [["run", "--drain"], ["migrate"], ["status"]])
def test_the_database_password_is_never_printed(url: str, command: list[str]) -> None:
    env = clean_env(DATABASE_URL=url, CUSTOMERIO_WRITE_KEY=KEY)
    line = one_line(relay(*command, env=env), 3)
    assert "database unavailable" in line, line
    assert PASSWORD not in line, line
    assert "127.0.0.1:1" in line or "port 1" in line, line


@pytest.mark.parametrize(
    "url",
    [
        f"host=127.0.0.1 port=1 password={PASSWORD} dbname=x",
        f"postgresql://postgres@127.0.0.1:1/x?password={PASSWORD}&nonsense=1",
    ],
)
def test_a_malformed_url_with_a_password_is_refused_without_it(url: str) -> None:
    line = one_line(relay("status", env=clean_env(DATABASE_URL=url)), 2)
    assert "DATABASE_URL" in line and PASSWORD not in line, line


def test_redact_dsn_masks_every_form_of_password() -> None:
    from relay.db import redact_dsn

    cases = {
        f"postgresql://u:{PASSWORD}@h:5432/db": "postgresql://u:***@h:5432/db",
        f"postgresql://u@h/db?password={PASSWORD}": "postgresql://u@h/db?password=***",
        f"postgresql://u@h/db?sslmode=require&password={PASSWORD}&connect_timeout=3": (
            "postgresql://u@h/db?sslmode=require&password=***&connect_timeout=3"
        ),
        f"host=h password={PASSWORD} dbname=db": "host=h password=*** dbname=db",
        f"host=h password = '{PASSWORD} x\\'y' dbname=db": "host=h password = *** dbname=db",
        f"host=h sslpassword={PASSWORD}": "host=h sslpassword=***",
        "postgresql://u@h/db": "postgresql://u@h/db",
    }
    for dsn, masked in cases.items():
        assert redact_dsn(dsn) == masked, dsn


# --- 5. plain HTTP to another host ----------------------------------------------------------


def test_plain_http_to_another_host_is_refused(dsn: str, cio: FakeCustomerIO) -> None:
    env = relay_env(dsn, cio, CUSTOMERIO_API_URL="http://cio-proxy.internal:8080")
    line = one_line(relay("run", "--drain", env=env), 2)
    assert "CUSTOMERIO_API_URL" in line and "RELAY_ALLOW_INSECURE_HTTP" in line, line


def test_plain_http_to_another_host_runs_when_explicitly_allowed(dsn: str) -> None:
    write_events(dsn, [funnel_event("cus_http", 0)])
    # 127.0.0.2 is this machine, but not an address the relay treats as its own.
    with FakeCustomerIO(host="127.0.0.2", write_keys={KEY}) as other:
        env = relay_env(dsn, other, RELAY_ALLOW_INSECURE_HTTP="1")
        proc = relay("run", "--drain", "--timeout", "30", env=env)
        assert proc.returncode == 0, describe(proc)
        assert len(other.accepted_items()) == 2
    # Allowed, never silent.
    assert "plain HTTP" in proc.stderr


def test_a_destination_over_plain_http_to_another_host_is_refused(dsn: str) -> None:
    env = clean_env(DATABASE_URL=dsn, CUSTOMERIO_WRITE_KEY_NEW="wk_proj_0123456789")
    args = ["destinations", "set", "proj_a", "--region", "us", "--api-url", "http://proxy:80"]

    line = one_line(relay(*args, env=env), 2)
    assert "RELAY_ALLOW_INSECURE_HTTP" in line, line
    assert query(dsn, "SELECT count(*) FROM relay_destination") == [(0,)]
    allowed = relay(*args, env={**env, "RELAY_ALLOW_INSECURE_HTTP": "1"})
    assert allowed.returncode == 0, describe(allowed)


# --- 6. one line instead of a traceback -----------------------------------------------------


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("postgresql://[::1", "DATABASE_URL"),
        ("postgresql://postgres@127.0.0.1:5432/x?bogus=1", "bogus"),
        ("postgresql://postgres@127.0.0.1:port/x", "port"),
    ],
)
@pytest.mark.parametrize("command", [["run", "--drain"], ["migrate"], ["status"]])
def test_a_malformed_database_url_is_one_line(url: str, says: str, command: list[str]) -> None:
    line = one_line(relay(*command, env=clean_env(DATABASE_URL=url, CUSTOMERIO_WRITE_KEY=KEY)), 2)
    assert "DATABASE_URL" in line and says in line, line


def test_run_on_a_database_never_migrated_says_to_migrate(
    empty_dsn: str, cio: FakeCustomerIO
) -> None:
    line = one_line(relay("run", env=relay_env(empty_dsn, cio)), 5)
    assert "relay migrate" in line and head_revision() in line, line


def test_run_on_a_database_behind_says_to_migrate(empty_dsn: str, cio: FakeCustomerIO) -> None:
    from relay.migrate import upgrade

    upgrade(empty_dsn, "relay_0003")
    line = one_line(relay("run", "--drain", env=relay_env(empty_dsn, cio)), 5)
    assert "older than relay_0005" in line, line
    assert head_revision() in line and "relay migrate" in line, line


def test_migrate_with_the_database_unreachable_is_one_line() -> None:
    line = one_line(relay("migrate", env=clean_env(DATABASE_URL=UNREACHABLE)), 3)
    assert line.startswith("relay: database unavailable: "), line


def test_every_exit_status_is_in_the_reference_table() -> None:
    from relay import cli

    text = (REPO / "docs" / "reference.md").read_text()
    section = text.split("\n## The command line\n", 1)[1].split("\n## ", 1)[0]
    documented = {int(m) for m in re.findall(r"^\| `(\d+)` \|", section, re.M)}
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_")}
    assert codes and codes == documented, (codes, documented)


# --- 7. the command line --------------------------------------------------------------------


def test_version() -> None:
    proc = relay("--version", env=clean_env())
    assert proc.returncode == 0, describe(proc)
    assert proc.stdout.strip() == f"relay {importlib.metadata.version('appfunnel-cio-relay')}"


def test_global_options_after_the_subcommand(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event("cus_debug", 0)])
    proc = relay("run", "--drain", "--log-level", "DEBUG", env=relay_env(dsn, cio))
    assert proc.returncode == 0, describe(proc)
    assert " DEBUG " in proc.stderr, proc.stderr

    env = clean_env(DATABASE_URL=dsn, RELAY_BATCH_SZIE="1")
    status = relay("status", "--json", "--log-format", "json", env=env)
    assert status.returncode == 0, describe(status)
    record = json.loads(status.stderr.splitlines()[0])
    assert record["level"] == "warning"


def test_json_log_lines_carry_fields_as_keys(dsn: str) -> None:
    env = clean_env(DATABASE_URL=dsn, RELAY_BATCH_SZIE="1")
    proc = relay("--log-format", "json", "status", env=env)

    assert proc.returncode == 0, describe(proc)
    record = json.loads(proc.stderr.splitlines()[0])
    assert record["variable"] == "RELAY_BATCH_SZIE"
    assert record["suggestion"] == "RELAY_BATCH_SIZE"


def test_delivery_log_lines_carry_destination_status_messages_attempt_instance(
    dsn: str, cio: FakeCustomerIO
) -> None:
    """A log collector filters delivery problems by field, not by parsing the message."""
    write_events(dsn, [funnel_event("cus_fields", 0)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key, event_type,"
            " body, occurred_at) VALUES ('m-big', 'e', 'track', 'c', 'x', %s, now())",
            (json.dumps({"type": "track", "userId": "c", "event": "x", "blob": "x" * 40_000}),),
        )
        conn.commit()
    cio.script(["503", "429"])
    env = relay_env(dsn, cio, RELAY_INSTANCE="relay-fields-1", RELAY_RETRY_AFTER_CAP="0.2")
    proc = relay("run", "--drain", "--log-format", "json", env=env)

    assert proc.returncode == 0, describe(proc)
    records = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    retry = [r for r in records if "to retry" in r["msg"]]
    throttled = [r for r in records if ": 429, pausing" in r["msg"]]
    dead = [r for r in records if "is dead" in r["msg"]]
    assert retry and throttled and dead, proc.stderr
    assert retry[0] | {"ts": None} == retry[0] | {
        "ts": None,
        "level": "warning",
        "instance": "relay-fields-1",
        "destination": "default",
        "status": 503,
        "messages": 2,
        "attempt": 1,
    }, retry[0]
    assert throttled[0]["status"] == 429 and throttled[0]["attempt"] == 2, throttled[0]
    assert throttled[0]["instance"] == "relay-fields-1" and throttled[0]["pause_s"] > 0
    [row_id] = query(dsn, "SELECT id FROM relay_outbox WHERE message_id = 'm-big'")[0]
    assert dead[0]["row_id"] == row_id and dead[0]["instance"] == "relay-fields-1", dead[0]
    assert "32768-byte limit" in dead[0]["error"], dead[0]


def test_drain_json_and_quiet_without_a_terminal(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(5)])
    proc = relay("run", "--drain", "--json", env=relay_env(dsn, cio))

    assert proc.returncode == 0, describe(proc)
    report = json.loads(proc.stdout)
    assert report["complete"] is True
    assert report["delivered"] == 10 and report["dead"] == 0
    # No progress line, no carriage returns: a log or a pipe gets nothing to redraw.
    assert "\r" not in proc.stderr and "remaining" not in proc.stderr, proc.stderr


def read_pty(fd: int, proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every writer closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_drain_on_a_terminal_shows_progress(dsn: str, cio: FakeCustomerIO) -> None:
    write_events(dsn, [funnel_event(f"cus_{i}", 0) for i in range(20)])
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [str(RELAY), "run", "--drain", "--timeout", "60"],
        env=relay_env(dsn, cio),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    try:
        out = read_pty(master, proc, 90).decode()
        code = proc.wait(30)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert code == 0, out
    assert re.search(r"\r\S*.*delivered \d+, remaining \d+, [\d.]+ msg/s", out), repr(out)
    assert "remaining 40" in out, repr(out)  # the first frame: all 40 messages to go
    assert "drain complete: 40 delivered" in out, repr(out)


def test_every_reporting_command_has_json(dsn: str) -> None:
    write_events(dsn, [funnel_event("cus_j", 0)])
    ids = [r[0] for r in query(dsn, "SELECT id FROM relay_outbox ORDER BY id")]
    query_dead = "UPDATE relay_outbox SET state = 'dead' WHERE id = %s RETURNING id"
    query(dsn, query_dead, (ids[0],))
    env = clean_env(DATABASE_URL=dsn)

    def run_json(*args: str) -> Any:
        proc = relay(*args, "--json", env=env)
        assert proc.returncode == 0, describe(proc)
        return json.loads(proc.stdout)

    assert run_json("retry", "--all", "--dry-run")["matched"] == 1
    retried = run_json("retry", "--all", "--by", "tester")
    assert retried["changed"] == 1 and retried["by"] == "tester"
    cancelled = run_json("cancel", "--customer", "cus_j", "--by", "tester")
    assert cancelled["changed"] == 2 and cancelled["busy"] == 0
    purged = run_json("purge", "--older-than", "30d")
    assert purged == {
        "messages": 0,
        "attempts": 0,
        "partitions": 0,
        "partition_rows_estimated": 0,
        "older_than": "30d",
        "include_dead": False,
    }
    assert run_json("migrate")["revision"] == [head_revision()]
    new = run_json("destinations", "set", "p1", "--region", "eu", "--write-key", "wk_abcdefgh1")
    assert new["project_id"] == "p1" and new["enabled"] is True and new["released"] == 0
    assert "wk_abcdefgh1" not in json.dumps(new)
    assert run_json("destinations", "disable", "p1")["enabled"] is False
    assert run_json("destinations", "enable", "p1")["enabled"] is True


# --- 8. operator input ----------------------------------------------------------------------


def test_destinations_set_refuses_a_project_id_too_long_to_index(dsn: str) -> None:
    env = clean_env(DATABASE_URL=dsn, CUSTOMERIO_WRITE_KEY_NEW="wk_proj_0123456789")
    project = "é" * (MAX_PROJECT_ID_BYTES // 2 + 1)  # within the limit in characters only

    line = one_line(relay("destinations", "set", project, "--region", "us", env=env), 2)
    assert str(MAX_PROJECT_ID_BYTES) in line, line
    assert query(dsn, "SELECT count(*) FROM relay_destination") == [(0,)]
