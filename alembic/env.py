"""Alembic environment for the relay's schema.

The revision is kept in ``relay_alembic_version`` (not ``alembic_version``) so these
migrations can run against an application's database that has its own Alembic history.
"""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import Connection, create_engine, pool

from alembic import context
from relay.db import sqlalchemy_url
from relay.models import Base

VERSION_TABLE = "relay_alembic_version"

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _dsn() -> str:
    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not dsn:
        import os

        dsn = os.environ.get("DATABASE_URL", "")
    if not dsn:
        raise SystemExit("DATABASE_URL is not set (or pass -x dsn=postgresql://...)")
    return sqlalchemy_url(dsn)


# Revision ids before they were made unique (``relay_`` prefix, so they cannot clash with an
# application's own ``0001`` when merged into its history). A database migrated under the old
# ids has its version row renamed in the migration's own transaction, before Alembic reads it.
LEGACY_REVISIONS = {"0001": "relay_0001", "0002": "relay_0002", "0003": "relay_0003"}


def _rename_legacy_revisions(connection: Connection) -> None:
    exists = connection.exec_driver_sql(
        "SELECT to_regclass(%(name)s) IS NOT NULL", {"name": VERSION_TABLE}
    ).scalar()
    if not exists:
        return
    for old, new in LEGACY_REVISIONS.items():
        connection.exec_driver_sql(
            f"UPDATE {VERSION_TABLE} SET version_num = %(new)s WHERE version_num = %(old)s",
            {"old": old, "new": new},
        )


def run_migrations_offline() -> None:
    context.configure(
        url=_dsn(),
        target_metadata=target_metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(
            connection=connection, target_metadata=target_metadata, version_table=VERSION_TABLE
        )
        with context.begin_transaction():
            _rename_legacy_revisions(connection)
            context.run_migrations()
        return
    engine = create_engine(_dsn(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(
            connection=conn, target_metadata=target_metadata, version_table=VERSION_TABLE
        )
        with context.begin_transaction():
            _rename_legacy_revisions(conn)
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
