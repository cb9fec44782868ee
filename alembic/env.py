"""Alembic environment for the relay's schema.

The revision is kept in ``relay_alembic_version`` (not ``alembic_version``) so these
migrations can run against an application's database that has its own Alembic history.
"""

from __future__ import annotations

from logging.config import fileConfig

from sqlalchemy import Connection, create_engine, pool

from alembic import context
from relay.db import sqlalchemy_url
from relay.migrate import LEGACY_REVISIONS, OFFLINE_URL, VERSION_TABLE
from relay.models import Base

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logging", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _dsn(*, offline: bool = False) -> str:
    dsn = context.get_x_argument(as_dictionary=True).get("dsn") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not dsn:
        import os

        dsn = os.environ.get("DATABASE_URL", "")
    if not dsn and offline:
        return OFFLINE_URL  # printing SQL needs the dialect, never a server
    if not dsn:
        raise SystemExit("DATABASE_URL is not set (or pass -x dsn=postgresql://...)")
    return sqlalchemy_url(dsn)


# A database migrated before the revision ids were made unique has its version row renamed
# (0003 -> relay_0003) in the migration's own transaction, before Alembic reads it.
RENAME_LEGACY_REVISIONS = (
    f"UPDATE {VERSION_TABLE} SET version_num = 'relay_' || version_num"
    f" WHERE version_num IN ({', '.join(repr(old) for old in LEGACY_REVISIONS)})"
)


def _rename_legacy_revisions(connection: Connection) -> None:
    exists = connection.exec_driver_sql(
        "SELECT to_regclass(%(name)s) IS NOT NULL", {"name": VERSION_TABLE}
    ).scalar()
    if exists:
        connection.exec_driver_sql(RENAME_LEGACY_REVISIONS)


def run_migrations_offline() -> None:
    # Named paramstyle: the SQL text is printed as written. With psycopg's own (pyformat) every
    # % of the DO blocks would be printed doubled, and psql would run a different statement.
    context.configure(
        url=_dsn(offline=True),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        version_table=VERSION_TABLE,
    )
    with context.begin_transaction():
        # A script that starts from a revision updates the version row the database holds,
        # which may still carry a legacy id. From base, the script creates the table itself.
        if context.get_starting_revision_argument() is not None:
            context.execute(RENAME_LEGACY_REVISIONS)
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
