"""Alembic environment of the sample application (README: "Adding the relay to your application").

The same file serves both ways of running the relay's migrations: beside this history
(``relay migrate``) or merged into it (``alembic -n with_relay upgrade heads``).
"""

from __future__ import annotations

import os
from logging.config import fileConfig

from sqlalchemy import create_engine, pool

import relay.migrate
from alembic import context
from models import Base

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    # The application's DATABASE_URL (postgresql://...), driven by psycopg 3.
    return os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+psycopg://", 1)


def run_migrations_offline() -> None:
    context.configure(
        url=database_url(),
        target_metadata=Base.metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            # The relay's tables are the relay's: autogenerate proposes no change to them.
            include_name=relay.migrate.include_name,
            include_object=relay.migrate.include_object,
        )
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
