"""Alembic owns the schema: migrations apply, reverse and re-apply, and match the models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from relay.db import sqlalchemy_url
from relay.migrate import (
    VERSION_TABLE,
    add_version_location,
    downgrade,
    head_revision,
    upgrade,
    versions_location,
)
from relay.models import Base
from relay.models.schema import PARTITION_NAME


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_upgrade_downgrade_upgrade_on_an_empty_database(empty_dsn: str) -> None:
    upgrade(empty_dsn)
    assert {"relay_outbox", "relay_attempt", "relay_destination"} <= _tables(empty_dsn)
    downgrade(empty_dsn, "base")
    assert _tables(empty_dsn) <= {"relay_alembic_version"}
    upgrade(empty_dsn)
    assert {"relay_outbox", "relay_attempt", "relay_destination"} <= _tables(empty_dsn)


def test_models_and_migrations_agree(dsn: str) -> None:
    assert _schema_diff(dsn) == []


def test_version_table_does_not_collide_with_an_applications_own(dsn: str) -> None:
    tables = _tables(dsn)
    assert "relay_alembic_version" in tables
    assert "alembic_version" not in tables


def test_insert_notifies_once_per_transaction(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as listener, psycopg.connect(dsn) as writer:
        listener.execute("LISTEN relay_outbox")
        with writer.transaction():
            for i in range(3):
                writer.execute(
                    "INSERT INTO relay_outbox (message_id, event_id, kind, customer_key,"
                    " event_type, body, occurred_at) VALUES (%s, %s, 'track', 'c', 'page.view',"
                    " '{}', now())",
                    (f"m{i}", f"e{i}"),
                )
        received = list(listener.notifies(timeout=2.0, stop_after=5))
    assert [n.channel for n in received] == ["relay_outbox"]


def _version(dsn: str) -> list[tuple[str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT version_num FROM relay_alembic_version").fetchall()


def _schema_diff(dsn: str) -> list[object]:
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "version_table": VERSION_TABLE,
                    # The day partitions are made at run time, by the relay, not by a model.
                    "include_name": lambda name, type_, _parents: (
                        type_ != "table" or not PARTITION_NAME.fullmatch(name or "")
                    ),
                },
            )
            return list(compare_metadata(ctx, Base.metadata))
    finally:
        engine.dispose()


def test_a_database_stamped_with_a_legacy_revision_id_upgrades_cleanly(empty_dsn: str) -> None:
    # A database migrated before the ids became relay_000N holds the bare id.
    upgrade(empty_dsn, "relay_0003")
    with psycopg.connect(empty_dsn) as conn:
        conn.execute("UPDATE relay_alembic_version SET version_num = '0003'")
    upgrade(empty_dsn)
    assert _version(empty_dsn) == [(head_revision(),)]
    assert _schema_diff(empty_dsn) == []


def _relay_migrate(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay.cli", "--log-level", "WARNING", "migrate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update(extra)
    return env


def _apply_script(dsn: str, sql: str) -> None:
    # As psql -f runs it: the script's own BEGIN/COMMIT, statements in order, no parameters
    # (psycopg sends a parameterless query as one simple query, every statement in it).
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)


def test_relay_migrate_sql_prints_a_script_that_builds_the_schema(empty_dsn: str) -> None:
    proc = _relay_migrate("--sql", env=_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("BEGIN;") and proc.stdout.rstrip().endswith("COMMIT;")
    _apply_script(empty_dsn, proc.stdout)
    assert {"relay_outbox", "relay_attempt", "relay_destination", "relay_throttle"} <= (
        _tables(empty_dsn)
    )
    assert _version(empty_dsn) == [(head_revision(),)]
    assert _schema_diff(empty_dsn) == []
    with psycopg.connect(empty_dsn) as conn:
        # 0002's DO blocks ran as printed: the roles got their grants.
        granted = conn.execute(
            "SELECT has_any_column_privilege('relay_app', 'relay_outbox', 'INSERT'),"
            " has_table_privilege('relay_operator', 'relay_status', 'SELECT')"
        ).fetchone()
    assert granted == (True, True)
    # The printed script then counts as migrated: relay migrate has nothing left to do.
    upgrade(empty_dsn)
    assert _version(empty_dsn) == [(head_revision(),)]


def test_relay_migrate_sql_never_connects() -> None:
    # An unroutable server: a connection attempt would hang until the connect timeout.
    unroutable = _relay_migrate(
        "--sql", env=_env(DATABASE_URL="postgresql://relay@10.255.255.1:5432/app")
    )
    no_url = _relay_migrate("--sql", env=_env())
    assert unroutable.returncode == 0, unroutable.stderr
    assert unroutable.stdout == no_url.stdout
    assert f"INSERT INTO {VERSION_TABLE}" in no_url.stdout


def test_relay_migrate_sql_from_a_legacy_revision_id_applies_on_that_database(
    empty_dsn: str,
) -> None:
    upgrade(empty_dsn, "relay_0002")
    with psycopg.connect(empty_dsn) as conn:
        conn.execute("UPDATE relay_alembic_version SET version_num = '0002'")
    proc = _relay_migrate("--sql", "0002:head", env=_env())
    assert proc.returncode == 0, proc.stderr
    # Only what follows 0002: relay_0001 created relay_destination, nothing later does.
    assert "CREATE TABLE relay_destination" not in proc.stdout
    assert "relay_0003" in proc.stdout
    _apply_script(empty_dsn, proc.stdout)
    assert _version(empty_dsn) == [(head_revision(),)]
    assert _schema_diff(empty_dsn) == []


def test_relay_migrate_rejects_bad_arguments_in_one_line() -> None:
    bad = _relay_migrate("--sql", "relay_9999", env=_env())
    assert (bad.returncode, bad.stdout) == (2, "")
    assert bad.stderr.strip() == (
        "relay: configuration error: revision 'relay_9999': "
        "Can't locate revision identified by 'relay_9999'"
    )
    ranged = _relay_migrate("relay_0001:head", env=_env(DATABASE_URL="postgresql://x@h/db"))
    assert ranged.returncode == 2
    assert ranged.stderr.strip() == (
        "relay: configuration error: revision 'relay_0001:head': a start:end range needs --sql"
    )
    refused = _relay_migrate(env=_env(DATABASE_URL="postgresql://relay:pw@127.0.0.1:1/app"))
    assert refused.returncode == 3
    assert refused.stderr.startswith(
        "relay: database unavailable: migrating postgresql://relay:***@127.0.0.1:1/app:"
    )
    assert len(refused.stderr.strip().splitlines()) == 1


def test_add_version_location_keeps_the_apps_own_folder(tmp_path: Path) -> None:
    ini = tmp_path / "alembic.ini"
    ini.write_text("[alembic]\nscript_location = %(here)s/migrations\npath_separator = os\n")
    cfg = add_version_location(Config(ini))
    expected = [str(tmp_path / "migrations" / "versions"), str(versions_location())]
    assert cfg.get_version_locations_list() == expected
    assert add_version_location(cfg).get_version_locations_list() == expected  # once only

    listed = tmp_path / "listed.ini"
    listed.write_text(
        "[alembic]\nscript_location = migrations\nversion_locations = a b\npath_separator = space\n"
    )
    assert add_version_location(Config(listed)).get_version_locations_list() == [
        "a",
        "b",
        str(versions_location()),
    ]
    assert (versions_location() / "0001_outbox_attempts_destinations.py").is_file()


def test_the_head_revision_names_itself_in_the_outbox_comment(empty_dsn: str) -> None:
    # relay run and /readyz read the schema's revision from this comment (migration
    # relay_0005): every later revision must set it to its own id, or a migrated database
    # would be reported as behind.
    from relay import queries as q
    from relay.migrate import head_revision, marked_revision, schema_problem
    from relay.models.schema import SCHEMA_MARKER

    upgrade(empty_dsn)
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute(q.SCHEMA_REVISION).fetchone()
    assert row is not None and row[0] is True
    assert marked_revision(row[1]) == head_revision()
    assert schema_problem(row[0], row[1]) is None
    assert row[1] == SCHEMA_MARKER  # the models follow the newest script
    downgrade(empty_dsn, "relay_0004")
    with psycopg.connect(empty_dsn) as conn:
        row = conn.execute(q.SCHEMA_REVISION).fetchone()
    assert row is not None and marked_revision(row[1]) is None
    assert schema_problem(row[0], row[1]) == (
        f"the relay's schema is older than relay_0005: run relay migrate (to {head_revision()})"
    )
