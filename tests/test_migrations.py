"""Alembic owns the schema: migrations apply, reverse and re-apply, and match the models."""

from __future__ import annotations

import psycopg
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool

from relay.db import sqlalchemy_url
from relay.migrate import downgrade, upgrade
from relay.models import Base


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
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"version_table": "relay_alembic_version"})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


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
