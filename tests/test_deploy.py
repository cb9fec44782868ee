"""The deployment files and the runbook, held to the relay they deploy.

No container engine or systemd instance is needed. Each file is read the way its tool reads
it (the Dockerfile's final stage, the unit's Environment=/EnvironmentFile=, compose's
services), and the commands it would start are run here, as subprocesses of this virtual
environment's ``relay``, with the environment it would give them, against this test's
database and ``relay.testing.fakecio``:

- Dockerfile: the wheel is built from the build context ``.dockerignore`` leaves, copied as
  the build stage's COPY lines copy it; the final stage's ENTRYPOINT + CMD then run from that
  wheel (not from the checkout), migrate an empty database, deliver, and exit 0 on SIGTERM.
- deploy/systemd/relay.service: ExecStart with the unit's environment (its Environment= lines
  and the example EnvironmentFile), HOME and cwd as systemd sets them; ``systemd-analyze
  verify`` and its offline security score when the tool exists; TimeoutStopSec against the
  relay's own shutdown bound, computed from relay.settings.
- compose.yaml: the migrate, fakecio and relay services' commands and environment, its
  healthcheck, and the names that tie the services together.
- docs/operations.md: every ``relay ...`` command parses with the relay's own parser, and every
  SQL block runs on a migrated database as the role it names.

Every environment variable a deployment file gives the relay must be one the relay reads:
the relay processes run with a ``sitecustomize`` that records each variable looked up in
``os.environ``, so a misspelt or removed setting fails here instead of being ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from psycopg import sql

from relay.cli import build_parser
from relay.settings import Settings, from_env
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import KEY, funnel_event, query, states, wait_until, write_events

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
COMPOSE = REPO / "compose.yaml"
UNIT = REPO / "deploy" / "systemd" / "relay.service"
UNIT_ENV_EXAMPLE = REPO / "deploy" / "systemd" / "relay.env.example"
RUNBOOK = REPO / "docs" / "operations.md"

# Where the image and the unit install the relay; mapped to this virtual environment here.
INSTALL_PREFIX = "/opt/relay/venv"
VENV_BIN = Path(sys.executable).parent

# Variables a deployment file may set for the interpreter or the system, not for the relay.
NOT_FOR_THE_RELAY = {"PATH", "HOME", "LANG", "LC_ALL", "TZ"}

# Shutdown work after the requests in flight (relay/service.py Service.stop, relay/db.py):
# joining the LISTEN thread (2 s) and, with the database unreachable, the connect timeout
# (10 s) of the connection that hands back unsent rows.
LISTENER_JOIN_S = 2.0
DB_CONNECT_TIMEOUT_S = 10.0


# --- processes ------------------------------------------------------------------------------

# Imported by the interpreter at start-up (PYTHONPATH): records every name looked up in
# os.environ (os.environ[...], get, in) and where `relay` was imported from. Walking the whole
# mapping (items(), copy(): wsgiref does at import) reads every name without choosing one, and
# is not recorded.
ENV_RECORDER = """
import atexit, json, os, sys

_getitem = os._Environ.__getitem__
_out = _getitem(os.environ, "DEPLOY_TEST_RECORD")
_seen = set()
_WALKS = {"__iter__", "__eq__", "copy", "items", "values"}


def _recording_getitem(self, key):
    caller = sys._getframe(1).f_code
    if caller.co_name not in _WALKS:
        _seen.add(key)
    return _getitem(self, key)


os._Environ.__getitem__ = _recording_getitem


@atexit.register
def _write():
    relay = sys.modules.get("relay")
    with open(_out, "w") as f:
        json.dump({"env": sorted(_seen), "relay": getattr(relay, "__file__", None)}, f)
"""

# Set in every recorded process and read by nothing: if the recorder ever sees it looked up,
# something read the whole environment name by name and the recording proves nothing.
UNREAD_SENTINEL = "DEPLOY_TEST_NOBODY_READS_THIS"


@dataclass
class Recorded:
    env: set[str]
    relay_file: str | None


class Process:
    """A subprocess whose output (stdout and stderr together) is collected line by line."""

    def __init__(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        cwd: Path,
        record_dir: Path,
        python_path: Sequence[Path] = (),
    ) -> None:
        self.record = record_dir / f"record-{time.monotonic_ns()}.json"
        env = dict(env)
        env["DEPLOY_TEST_RECORD"] = str(self.record)
        env[UNREAD_SENTINEL] = "1"
        env["PYTHONPATH"] = os.pathsep.join(str(p) for p in (record_dir, *python_path))
        self.argv = list(argv)
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for_line(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    match = regex.search(line)
                    if match:
                        return match
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(
                        f"{self.argv}: no line matching {pattern!r}; output:\n{self.output}"
                    )
                self._cond.wait(min(left, 0.2))

    def wait(self, timeout: float = 120.0) -> int:
        code = self.proc.wait(timeout)
        self._close()
        return code

    def _close(self) -> None:
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def recorded(self) -> Recorded:
        data = json.loads(self.record.read_text())
        seen = set(data["env"])
        assert UNREAD_SENTINEL not in seen, "every variable was read: the recording is void"
        return Recorded(seen, data["relay"])


@pytest.fixture
def record_dir() -> Iterator[Path]:
    """A folder with the environment recorder as sitecustomize, for the relay's PYTHONPATH."""
    path = Path(tempfile.mkdtemp(prefix="relay-deploy-"))
    (path / "sitecustomize.py").write_text(ENV_RECORDER)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def base_env() -> dict[str, str]:
    """What any process starts from here: the caller's environment minus the relay's own
    settings, so nothing but the deployment file configures the relay under test."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("CUSTOMERIO_", "RELAY_", "DATABASE_URL", "PYTHON"))
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_to_completion(process: Process, timeout: float = 180.0) -> str:
    try:
        code = process.wait(timeout)
    finally:
        process.kill()
    assert code == 0, f"{process.argv} exited {code}:\n{process.output}"
    return process.output


def deliver_and_stop(process: Process, dsn: str, delivered: Any, customer: str) -> None:
    """Wait for the relay to run, record one event, wait for ``delivered()``, then SIGTERM:
    the relay must exit 0 with nothing left in flight."""
    try:
        process.wait_for_line(r"relay \S+ running", timeout=60)
        write_events(dsn, [funnel_event(customer, 0)])
        assert wait_until(delivered, timeout=30), process.output
        code = process.terminate()
    finally:
        process.kill()
    assert code == 0, process.output
    assert "stopped" in process.output, process.output
    assert states(dsn) == {"delivered": 2}, process.output


def assert_relay_reads(names: set[str], recorded: Recorded, source: str) -> None:
    """Every variable ``source`` sets for the relay is one the relay looked up."""
    meant_for_relay = {
        n for n in names if n not in NOT_FOR_THE_RELAY and not n.startswith("PYTHON")
    }
    ignored = sorted(meant_for_relay - recorded.env)
    assert not ignored, f"{source} sets variables the relay never reads: {ignored}"


def assert_no_files_written(cwd: Path) -> None:
    """The relay writes nothing where it runs (no embedded database in .relay-data)."""
    assert list(cwd.iterdir()) == [], list(cwd.iterdir())


# --- Dockerfile -----------------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [i.args for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> str | None:
        found = self.all(keyword)
        return found[-1] if found else None


def dockerfile_instructions(text: str) -> tuple[dict[str, str], list[Instruction]]:
    """(ARG defaults before the first FROM, instructions), as the Dockerfile frontend reads
    them: comment lines dropped (inside continued instructions too), backslash continuation."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not pending):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    assert not pending, "the Dockerfile ends inside a continued instruction"
    global_args: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            global_args[name] = default
    return global_args, instructions


def dockerfile_stages(text: str) -> list[Stage]:
    global_args, instructions = dockerfile_instructions(text)
    stages: list[Stage] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            words = [w for w in ins.args.split() if not w.startswith("--")]
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2] if len(words) == 3 and words[1].lower() == "as" else None
            stages.append(Stage(base, name))
        elif stages:
            stages[-1].instructions.append(ins)
    return stages


def env_assignments(args: str, current: dict[str, str]) -> dict[str, str]:
    """``ENV a=1 b="two words"`` (the key=value form), ``$VAR`` expanded from ``current``."""
    out = {}
    for word in shlex.split(args):
        name, eq, value = word.partition("=")
        assert eq, f"ENV {args!r}: use the NAME=value form"
        out[name] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: current.get(m[1] or m[2], ""), value)
    return out


def image_env(stage: Stage, path: str) -> dict[str, str]:
    """The final stage's ENV, starting from the base image's PATH."""
    env = {"PATH": path}
    for args in stage.all("ENV"):
        env.update(env_assignments(args, env))
    return env


def image_command(stage: Stage) -> list[str]:
    entrypoint = json.loads(stage.last("ENTRYPOINT") or "[]")
    cmd = json.loads(stage.last("CMD") or "[]")
    assert isinstance(entrypoint, list) and isinstance(cmd, list), "use the exec (JSON) form"
    return [*entrypoint, *cmd]


def local_install_path(path: str) -> str:
    """A PATH of the image or the unit with the install prefix mapped to this venv."""
    return path.replace(f"{INSTALL_PREFIX}/bin", str(VENV_BIN))


def dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(excludes, regex) per line of .dockerignore, in order; the last match decides."""
    patterns = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        line = line.lstrip("!").strip().strip("/")
        regex = ""
        i = 0
        while i < len(line):
            if line.startswith("**/", i):
                regex += "(?:.*/)?"
                i += 3
            elif line.startswith("**", i):
                regex += ".*"
                i += 2
            elif line[i] == "*":
                regex += "[^/]*"
                i += 1
            elif line[i] == "?":
                regex += "[^/]"
                i += 1
            elif line[i] == "[":
                end = line.index("]", i)
                regex += "[" + line[i + 1 : end].replace("!", "^", 1) + "]"
                i = end + 1
            else:
                regex += re.escape(line[i])
                i += 1
        patterns.append((not negated, re.compile(regex)))
    return patterns


def dockerignore_excludes(rel: str, patterns: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Whether ``rel`` is left out of the build context: a pattern that matches the path or
    one of its parent folders applies, and the last one that applies wins (as Docker does)."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for excludes, regex in patterns:
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = excludes
    return excluded


def build_context(dest: Path) -> None:
    """Copy what Docker would send as the build context (symlinks kept as links)."""
    patterns = dockerignore_patterns()
    may_reinclude = [r.pattern for excludes, r in patterns if not excludes]
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO)
        for name in list(dirs):
            rel = (rel_root / name).as_posix()
            path = Path(root) / name
            if path.is_symlink():
                dirs.remove(name)
                files.append(name)
            elif dockerignore_excludes(rel, patterns) and not any(
                p.startswith(re.escape(rel) + "/") or p.startswith("(?:.*/)?")
                for p in may_reinclude
            ):
                dirs.remove(name)  # nothing below an excluded folder is let back in
        for name in files:
            rel = (rel_root / name).as_posix()
            if dockerignore_excludes(rel, patterns):
                continue
            src = Path(root) / name
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if src.is_symlink():
                target.symlink_to(os.readlink(src))
            else:
                shutil.copy2(src, target)


def run_build_stage_copies(stage: Stage, context: Path, workdir: Path) -> None:
    """The build stage's COPY lines (from the context), into ``workdir``."""
    copies = [a for a in stage.all("COPY") if not a.startswith("--from")]
    assert copies, "the build stage copies nothing from the context"
    for args in copies:
        *sources, dest = args.split()
        for src in sources:
            origin = context / src.rstrip("/")
            assert origin.exists() or origin.is_symlink(), (
                f"COPY {src}: not in the build context (missing, or excluded by .dockerignore)"
            )
            if dest.endswith("/") and origin.is_dir() and not origin.is_symlink():
                shutil.copytree(origin, workdir / dest, symlinks=True, dirs_exist_ok=True)
            elif dest.endswith("/"):
                (workdir / dest).mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, workdir / dest / origin.name, follow_symlinks=False)
            else:
                shutil.copy2(origin, workdir / dest, follow_symlinks=False)


@pytest.fixture(scope="module")
def image_site() -> Iterator[Path]:
    """The relay as the image installs it: the wheel built from the build context, unpacked
    (a folder to put first on PYTHONPATH, ahead of this checkout's editable install)."""
    build = next(s for s in dockerfile_stages(DOCKERFILE.read_text()) if s.name == "build")
    root = Path(tempfile.mkdtemp(prefix="relay-image-"))
    try:
        context, workdir, wheels, site = (root / n for n in ("context", "src", "wheels", "site"))
        build_context(context)
        workdir.mkdir()
        run_build_stage_copies(build, context, workdir)
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), "."],
            cwd=workdir,
            check=True,
            capture_output=True,
            timeout=300,
        )
        (wheel,) = wheels.glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(site)
        yield site
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_dockerfile_final_stage_runs_relay_as_a_fixed_unprivileged_user() -> None:
    stages = dockerfile_stages(DOCKERFILE.read_text())
    final = stages[-1]
    assert len(stages) >= 2, "the wheel is built in a stage of its own"
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", final.base), final.base
    user = final.last("USER")
    assert user is not None, "the final stage has no USER: it would run as root"
    uid, _, gid = user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: a numeric, non-zero UID"
    assert gid.isdigit() and int(gid) != 0, f"USER {user}: a numeric, non-zero GID"
    created = " ".join(final.all("RUN"))
    assert f"--uid {uid}" in created and f"--gid {gid}" in created, (
        "the final stage creates the user with the USER's UID and GID"
    )
    assert final.last("STOPSIGNAL") == "SIGTERM"
    # The final stage installs the wheels the build stage made, and nothing from an index.
    (build,) = (s for s in stages if s.name == "build")
    wheel_dir = re.search(r"pip wheel .*--wheel-dir (\S+)", " ".join(build.all("RUN")))
    assert wheel_dir, "the build stage builds the wheels"
    mount = f"--mount=type=bind,from=build,source={wheel_dir[1]},target={wheel_dir[1]}"
    installs = [r for r in final.all("RUN") if mount in r]
    assert installs and "--no-index" in installs[0], final.all("RUN")
    command = image_command(final)
    assert command[0] == "relay" and command[1] == "run", command
    # No secret baked into a layer.
    env = image_env(final, "/usr/local/bin:/usr/bin:/bin")
    assert not {"DATABASE_URL", "CUSTOMERIO_WRITE_KEY"} & set(env)
    assert env["PATH"].split(":")[0] == f"{INSTALL_PREFIX}/bin"


def test_dockerignore_keeps_the_context_to_the_sources(tmp_path: Path) -> None:
    context = tmp_path / "context"
    build_context(context)
    top = sorted(p.name for p in context.iterdir())
    assert top == ["README.md", "alembic", "models", "pyproject.toml", "relay"], top
    assert (context / "relay" / "models").is_symlink()
    assert not list(context.rglob("__pycache__"))
    patterns = dockerignore_patterns()
    for secret in (".git/config", ".venv/bin/python", ".relay-data/pg/PG_VERSION", ".env"):
        assert dockerignore_excludes(secret, patterns), secret


def test_image_wheel_holds_the_schema_and_the_migrations(image_site: Path) -> None:
    for rel in (
        "relay/cli.py",
        "relay/models/schema.py",
        "relay/migrations/env.py",
        "relay/migrations/script.py.mako",
    ):
        assert (image_site / rel).is_file(), rel
    assert list((image_site / "relay" / "migrations" / "versions").glob("0001_*.py"))
    (entry_points,) = image_site.glob("*.dist-info/entry_points.txt")
    assert re.search(r"^relay = relay\.cli:main$", entry_points.read_text(), re.M)


def test_image_command_migrates_delivers_and_stops_on_sigterm(
    image_site: Path,
    empty_dsn: str,
    cio: FakeCustomerIO,
    record_dir: Path,
    tmp_path: Path,
) -> None:
    final = dockerfile_stages(DOCKERFILE.read_text())[-1]
    env = base_env()
    env.update(image_env(final, env.get("PATH", "/usr/bin:/bin")))
    env["PATH"] = local_install_path(env["PATH"])
    env["HOME"] = "/nonexistent"  # the image's relay user has no home
    # What `docker run -e` adds: the database and the destination.
    env.update(DATABASE_URL=empty_dsn, CUSTOMERIO_WRITE_KEY=KEY, CUSTOMERIO_API_URL=cio.url)
    command = image_command(final)
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable == str(VENV_BIN / "relay"), executable
    cwd = tmp_path / "workdir"
    cwd.mkdir()

    migrate = Process([executable, "migrate"], env, cwd, record_dir, python_path=[image_site])
    assert "migrated to head" in run_to_completion(migrate)
    assert migrate.recorded().relay_file == str(image_site / "relay" / "__init__.py")

    relay = Process([executable, *command[1:]], env, cwd, record_dir, python_path=[image_site])
    deliver_and_stop(relay, empty_dsn, lambda: len(cio.accepted_items()) >= 2, "cus_image")
    recorded = relay.recorded()
    assert recorded.relay_file == str(image_site / "relay" / "__init__.py")
    assert_relay_reads(set(image_env(final, "")), recorded, "Dockerfile ENV")
    assert "embedded" not in relay.output
    assert_no_files_written(cwd)


# --- systemd --------------------------------------------------------------------------------


def unit_settings(text: str) -> dict[str, list[str]]:
    """``Key=value`` lines of a unit file by key (repeated keys keep every value), with
    backslash continuation and comment lines dropped, as systemd parses them."""
    out: dict[str, list[str]] = {}
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;" or line.startswith("[")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        key, eq, value = (pending + line).partition("=")
        pending = ""
        assert eq, f"not a Key=value line: {raw!r}"
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def systemd_timespan(text: str) -> float:
    """``45s``, ``1min 30s``, ``90`` (seconds) as systemd reads a time span."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "": 1}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[unit]
    return total


def environment_file(path: Path) -> dict[str, str]:
    """An EnvironmentFile= as systemd reads it: VAR=value lines, # and ; comments, quotes."""
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        name, eq, value = line.partition("=")
        assert eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()), (
            f"{path.name}: not a VAR=value line: {raw!r}"
        )
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name.strip()] = value
    return env


def commented_settings(path: Path) -> set[str]:
    """Variables offered commented out (``#NAME=value``) in an environment file."""
    return set(re.findall(r"^#([A-Z][A-Z0-9_]*)=", path.read_text(), re.M))


def unit_environment(settings: dict[str, list[str]]) -> dict[str, str]:
    """Environment= assignments in order (each value a list of quoted NAME=value words)."""
    env = {}
    for value in settings.get("Environment", []):
        for word in shlex.split(value):
            name, _, val = word.partition("=")
            env[name] = val
    return env


def shutdown_bound_s(settings: Settings) -> float:
    """How long `relay run` can take to exit after SIGTERM with these settings."""
    lease_margin = min(1.0, (settings.lease_s - settings.http_timeout_s) / 2)
    return settings.http_timeout_s + lease_margin + LISTENER_JOIN_S + DB_CONNECT_TIMEOUT_S


def test_unit_waits_longer_than_the_relays_shutdown() -> None:
    unit = unit_settings(UNIT.read_text())
    assert unit["Type"] == ["simple"]  # the relay does not speak sd_notify
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] == ["relay"]
    timeout = systemd_timespan(unit["TimeoutStopSec"][-1])
    # The defaults, then what the unit's own environment changes.
    configured = {**unit_environment(unit), **environment_file(UNIT_ENV_EXAMPLE)}
    for settings in (Settings(), from_env(configured)):
        bound = shutdown_bound_s(settings)
        assert timeout > bound, (
            f"TimeoutStopSec={timeout:g}s: the relay may need {bound:g}s to stop "
            f"(RELAY_HTTP_TIMEOUT {settings.http_timeout_s:g}s)"
        )
    for option in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "RestrictSUIDSGID",
    ):
        assert unit[option] == ["yes"], option
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["CapabilityBoundingSet"] == [""]


def test_unit_environment_file_example_is_what_systemd_reads() -> None:
    text = UNIT_ENV_EXAMPLE.read_text()
    assert not re.search(r"^\s*export\s", text, re.M), "systemd does not read `export`"
    env = environment_file(UNIT_ENV_EXAMPLE)
    unit = unit_settings(UNIT.read_text())
    (env_file,) = unit["EnvironmentFile"]
    assert Path(env_file.lstrip("-")).name == UNIT_ENV_EXAMPLE.name.removesuffix(".example")
    assert not env_file.startswith("-"), "a missing EnvironmentFile must stop the start"
    assert "DATABASE_URL" in env and "CUSTOMERIO_WRITE_KEY" in env


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_and_security(tmp_path: Path) -> None:
    unit = tmp_path / "relay.service"
    unit.write_text(
        UNIT.read_text()
        .replace(f"{INSTALL_PREFIX}/bin/relay", str(VENV_BIN / "relay"))
        .replace("/etc/relay/relay.env", str(UNIT_ENV_EXAMPLE))
    )
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    complaints = [line for line in verify.stderr.splitlines() if "relay.service" in line]
    assert verify.returncode == 0 and not complaints, verify.stderr
    # The offline exposure score (0 best, 10 worst); 2.0 is the top of systemd's "OK" band.
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", security.stdout)
    assert overall, security.stdout + security.stderr
    assert security.returncode == 0, f"exposure {overall[1]} (at most 2.0)"


def test_unit_exec_start_delivers_and_stops_on_sigterm(
    dsn: str, cio: FakeCustomerIO, record_dir: Path, tmp_path: Path
) -> None:
    unit = unit_settings(UNIT.read_text())
    (exec_start,) = unit["ExecStart"]
    argv = shlex.split(exec_start.lstrip("-@:+!"))
    assert argv[0] == f"{INSTALL_PREFIX}/bin/relay", argv
    argv[0] = str(VENV_BIN / "relay")
    file_env = environment_file(UNIT_ENV_EXAMPLE)
    # systemd's own environment for a service with User=: a fixed PATH, the user's HOME; then
    # Environment=, then EnvironmentFile= (which overrides it).
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin",
        "HOME": "/nonexistent",
        "LANG": "C.UTF-8",
        **unit_environment(unit),
        **file_env,
    }
    # The example's placeholders become this test's database, key and stand-in.
    assert "CHANGE-ME" in file_env["DATABASE_URL"] and file_env["CUSTOMERIO_WRITE_KEY"]
    metrics_port = free_port()
    env.update(
        DATABASE_URL=dsn,
        CUSTOMERIO_WRITE_KEY=KEY,
        CUSTOMERIO_API_URL=cio.url,
        RELAY_METRICS_PORT=str(metrics_port),
    )
    cwd = tmp_path / "root"  # WorkingDirectory= unset: systemd starts services in /
    cwd.mkdir()
    relay = Process(argv, env, cwd, record_dir)
    try:
        relay.wait_for_line(r"relay \S+ running", timeout=60)
        # The example keeps /metrics and the probes on the host's loopback.
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/livez", timeout=5) as r:
            assert r.status == 200
    except BaseException:
        relay.kill()
        raise
    deliver_and_stop(relay, dsn, lambda: len(cio.accepted_items()) >= 2, "cus_unit")
    recorded = relay.recorded()
    assert_relay_reads(
        set(unit_environment(unit)) | set(file_env) | commented_settings(UNIT_ENV_EXAMPLE),
        recorded,
        "relay.service and relay.env.example",
    )
    assert_no_files_written(cwd)


# --- compose --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML reads compose.yaml (pip install pyyaml)")
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


def service_argv(service: dict[str, Any]) -> list[str]:
    """The command a service runs: its entrypoint (else the image's) + its command (else the
    image's CMD when the entrypoint is the image's)."""
    final = dockerfile_stages(DOCKERFILE.read_text())[-1]
    image_entry = json.loads(final.last("ENTRYPOINT") or "[]")
    image_cmd = json.loads(final.last("CMD") or "[]")
    entrypoint = service.get("entrypoint")
    command = service.get("command")
    for value in (entrypoint, command):
        assert value is None or isinstance(value, list), "use the list form"
    if entrypoint is None:
        return [*image_entry, *(command if command is not None else image_cmd)]
    return [*entrypoint, *(command or [])]


def relay_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the relay's image."""
    images = {s.get("image") for s in compose["services"].values() if s.get("build") in (".", "./")}
    return {
        name: s
        for name, s in compose["services"].items()
        if s.get("build") in (".", "./") or s.get("image") in images
    }


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    assert isinstance(env, dict), "use the mapping form of environment"
    return {k: str(v) for k, v in env.items()}


def option(argv: Sequence[str], name: str) -> str:
    return argv[list(argv).index(name) + 1]


def test_compose_services_run_real_commands(compose: dict[str, Any]) -> None:
    services = relay_services(compose)
    assert {"migrate", "relay", "fakecio"} <= set(services), sorted(services)
    parser = build_parser()
    from relay.testing.fakecio import _arg_parser as fakecio_parser

    for name, service in services.items():
        argv = service_argv(service)
        if argv[:3] == ["python", "-m", "relay.testing.fakecio"]:
            fakecio_parser().parse_args(argv[3:])
        else:
            assert argv[0] == "relay", f"{name}: {argv}"
            parser.parse_args(argv[1:])
    assert service_argv(services["migrate"])[:2] == ["relay", "migrate"]
    assert service_argv(services["relay"])[:2] == ["relay", "run"]
    assert service_argv(services["fakecio"])[:3] == ["python", "-m", "relay.testing.fakecio"]


def test_compose_wires_the_services_together(compose: dict[str, Any]) -> None:
    services = compose["services"]
    relay, migrate, fakecio, db = (services[n] for n in ("relay", "migrate", "fakecio", "db"))
    assert db["image"].split(":")[0] == "postgres"
    assert relay["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert migrate["depends_on"]["db"]["condition"] == "service_healthy"
    assert "healthcheck" in db
    env = service_env(relay)
    # The relay's database is the db service, with the credentials that service creates.
    url = urlsplit(env["DATABASE_URL"])
    db_env = service_env(db)
    assert (url.hostname, url.username, url.password, url.path.lstrip("/")) == (
        "db",
        db_env["POSTGRES_USER"],
        db_env["POSTGRES_PASSWORD"],
        db_env["POSTGRES_DB"],
    )
    assert service_env(migrate)["DATABASE_URL"] == env["DATABASE_URL"]
    # The relay sends to the stand-in, with a key the stand-in accepts.
    fake_argv = service_argv(fakecio)
    api = urlsplit(env["CUSTOMERIO_API_URL"])
    assert api.hostname == "fakecio" and api.port == int(option(fake_argv, "--port"))
    assert option(fake_argv, "--host") == "0.0.0.0", "reachable from the relay's container"
    keys = [fake_argv[i + 1] for i, a in enumerate(fake_argv) if a == "--write-key"]
    assert env["CUSTOMERIO_WRITE_KEY"] in keys
    # Docker's default 10 s would cut a request in flight short.
    grace = systemd_timespan(str(relay["stop_grace_period"]))
    assert grace > shutdown_bound_s(from_env(env)), grace


def test_compose_stack_migrates_delivers_and_stops_on_sigterm(
    compose: dict[str, Any], empty_dsn: str, record_dir: Path, tmp_path: Path
) -> None:
    services = compose["services"]
    cwd = tmp_path / "workdir"
    cwd.mkdir()
    path = f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}"

    def start(name: str, env: dict[str, str], argv: list[str] | None = None) -> Process:
        argv = argv or service_argv(services[name])
        executable = shutil.which(argv[0], path=path)
        assert executable is not None, argv
        return Process([executable, *argv[1:]], {**base_env(), **env}, cwd, record_dir)

    # The stand-in as compose runs it, on a free port of 127.0.0.2: still this machine, but not
    # an address the relay counts as its own, as `fakecio` is not in the compose network.
    fake_argv = service_argv(services["fakecio"])
    fake_argv[fake_argv.index("--host") + 1] = "127.0.0.2"
    fake_argv[fake_argv.index("--port") + 1] = "0"
    fake = start("fakecio", service_env(services["fakecio"]), fake_argv)
    relay: Process | None = None
    try:
        fake_url = fake.wait_for_line(r"listening on (http://\S+)")[1]

        def received() -> list[dict[str, Any]]:
            with urllib.request.urlopen(f"{fake_url}/_fake/received", timeout=5) as r:
                return list(json.load(r)["accepted"])

        migrate_env = {**service_env(services["migrate"]), "DATABASE_URL": empty_dsn}
        migrate = start("migrate", migrate_env)
        assert "migrated to head" in run_to_completion(migrate)
        assert_relay_reads(set(migrate_env), migrate.recorded(), "compose service migrate")

        env = service_env(services["relay"])
        # The container's port, moved to a free one of this machine.
        compose_port = env["RELAY_METRICS_PORT"]
        metrics_port = str(free_port())
        env.update(
            DATABASE_URL=empty_dsn, CUSTOMERIO_API_URL=fake_url, RELAY_METRICS_PORT=metrics_port
        )
        relay = start("relay", env)
        relay.wait_for_line(r"relay \S+ running", timeout=60)
        check = services["relay"].get("healthcheck", {}).get("test")
        if check:
            # The healthcheck as compose runs it inside the relay's container.
            assert check[0] == "CMD", check
            argv = [a.replace(compose_port, metrics_port) for a in check[1:]]
            assert argv[0] == "python"
            probe = subprocess.run(
                [sys.executable, *argv[1:]], capture_output=True, text=True, timeout=30
            )
            assert probe.returncode == 0, probe.stderr
        deliver_and_stop(relay, empty_dsn, lambda: len(received()) >= 2, "cus_compose")
        items = received()
        assert {i["item"]["userId"] for i in items} == {"cus_compose"}
        # What compose.yaml says the relay does with a plain-HTTP URL to another host.
        assert "uses plain HTTP" in relay.output, relay.output
        assert_relay_reads(set(env), relay.recorded(), "compose service relay")
        assert fake.terminate() == 0, fake.output
    finally:
        fake.kill()
        if relay is not None:
            relay.kill()
    assert_no_files_written(cwd)


# --- the runbook ----------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of each fenced code block."""
    return [(m[1], m[2]) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(block: str) -> Iterator[list[str]]:
    """Simple commands of a shell block: prompts and comments dropped, continued lines
    joined, pipelines and lists split, redirections and leading NAME=value assignments
    dropped."""
    text = re.sub(r"\\\n", " ", block)
    for raw in text.splitlines():
        line = raw.strip().removeprefix("$ ").strip()
        if not line or line.startswith("#"):
            continue
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        lexer.commenters = "#"
        command: list[str] = []
        redirect = False
        for token in [*lexer, ";"]:
            if token in ("|", "||", "&&", ";", "&"):
                while command and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", command[0]):
                    command.pop(0)
                if command:
                    yield command
                command = []
            elif token in (">", ">>", "<", ">&"):
                redirect = True  # the next word is a file, not an argument
                if command and command[-1].isdigit():
                    command.pop()  # 2> : the descriptor
            elif redirect:
                redirect = False
            else:
                command.append(token)


def relay_arguments(command: list[str]) -> list[str] | None:
    """The arguments of ``relay`` in a command line: ``relay ...``, ``/path/bin/relay ...``,
    ``docker compose run [--rm] relay ...`` (the image's entrypoint is relay) or
    ``docker compose exec relay relay ...``; None for other commands."""
    if command[0] == "relay" or command[0].endswith("/bin/relay"):
        return command[1:]
    if command[:2] == ["docker", "compose"] and command[2] in ("run", "exec"):
        rest = command[3:]
        while rest and rest[0].startswith("-"):
            rest = rest[1:]
        if rest and rest[0] == "relay":
            args = rest[1:]
            if command[2] == "exec":
                assert args and args[0] == "relay", command
                args = args[1:]
            return args
    return None


def exact_parser() -> argparse.ArgumentParser:
    """The relay's parser, refusing abbreviated flags (``--older`` for ``--older-than``): a
    runbook line must spell each flag as the relay defines it."""
    parser = build_parser()
    parsers = [parser]
    while parsers:
        p = parsers.pop()
        p.allow_abbrev = False
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
    return parser


def test_every_relay_command_in_the_runbook_exists() -> None:
    parser = exact_parser()
    seen: set[str] = set()
    checked = 0
    for lang, body in fenced_blocks(RUNBOOK.read_text()):
        if lang not in ("sh", "bash", "shell", "console"):
            continue
        for command in shell_commands(body):
            args = relay_arguments(command)
            if args is None:
                continue
            try:
                parsed = parser.parse_args(args)
            except SystemExit as exc:
                if exc.code != 0:  # 0: a --help line
                    raise AssertionError(
                        f"not a valid relay command: {shlex.join(command)}"
                    ) from None
                continue
            seen.add(
                " ".join(
                    w for w in (parsed.command, getattr(parsed, "destinations_command", None)) if w
                )
            )
            checked += 1
    wanted = {
        "status",
        "inspect",
        "retry",
        "cancel",
        "purge",
        "destinations set",
        "destinations list",
        "run",
        "migrate",
    }
    assert wanted <= seen, f"the runbook never shows: {sorted(wanted - seen)}"
    assert checked >= 20, checked


def test_runbook_rejects_a_flag_the_relay_does_not_have() -> None:
    """The check above can fail: an invented flag, or an abbreviated one, is caught."""
    parser = exact_parser()
    block = "relay retry --everything --by alice\nrelay purge --older 30d > purge.log\n"
    commands = list(shell_commands(block))
    assert commands[1] == ["relay", "purge", "--older", "30d"]
    for command in commands:
        args = relay_arguments(command)
        assert args is not None
        with pytest.raises(SystemExit) as exc, contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(args)
        assert exc.value.code == 2


def sql_blocks() -> list[str]:
    return [body for lang, body in fenced_blocks(RUNBOOK.read_text()) if lang == "sql"]


def test_every_sql_block_in_the_runbook_runs_as_its_role(dsn: str) -> None:
    """Each block runs in a transaction (rolled back) as the role its first line names:
    ``-- as relay_app`` or ``-- as relay_operator`` (read-only); any other block as
    relay_operator, read-only, since that is the role operators query with."""
    blocks = sql_blocks()
    assert len(blocks) >= 5, len(blocks)
    # Something for the queries to find: a delivered customer and a dead message.
    write_events(dsn, [funnel_event("cus_42", 0), funnel_event("cus_43", 1)])
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE relay_outbox SET state = 'dead', last_error = 'rejected by Customer.io "
            "(400): item 0: bad' WHERE customer_key = 'cus_43'"
        )
        conn.commit()
    for block in blocks:
        first = block.strip().splitlines()[0]
        role_match = re.fullmatch(r"--\s*as (relay_\w+).*", first)
        role = role_match[1] if role_match else "relay_operator"
        with psycopg.connect(dsn) as conn:
            try:
                if role == "relay_operator":
                    conn.execute("SET TRANSACTION READ ONLY")
                conn.execute(sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(role)))
                conn.execute(block)
            except psycopg.Error as exc:
                raise AssertionError(f"runbook SQL failed as {role}: {exc}\n{block}") from exc
            finally:
                conn.rollback()
    assert query(dsn, "SELECT count(*) FROM relay_outbox") == [(4,)]


def test_runbook_quotes_the_benchmark_figures_as_published() -> None:
    """Figures quoted in the runbook appear, with the run's date and commit, in README.md or
    bench/README.md: a re-run of the benchmarks that changes them shows up here."""
    # Compared with line breaks as spaces: a figure may wrap differently in each file.
    runbook = " ".join(RUNBOOK.read_text().split())
    published = " ".join(
        ((REPO / "README.md").read_text() + (REPO / "bench" / "README.md").read_text()).split()
    )
    quoted = re.findall(r"\b\d{1,3},\d{3}(?:-\d{1,3},\d{3})? messages/s", runbook)
    assert quoted, "the runbook quotes no throughput figure"
    for figure in quoted:
        assert figure.split()[0].split("-")[0] in published, figure
    run = re.search(r"commit ([0-9a-f]{7,})", runbook)
    assert run and f"commit {run[1]}" in published, "the benchmark run's commit"
    dated = re.search(r"\b(\w{3} \w{3} \d{1,2} [\d:-]+ UTC \d{4})", runbook)
    assert dated and dated[1] in published, "the benchmark run's date"
