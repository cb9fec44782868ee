"""Applying the relay's Alembic migrations from Python (`relay migrate`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from alembic import command
from relay.db import sqlalchemy_url


def script_location() -> Path:
    """The migration scripts: the package ``relay.migrations`` (./alembic in a checkout)."""
    import relay.migrations

    return Path(next(iter(relay.migrations.__path__)))


def alembic_config(dsn: str) -> Config:
    """An Alembic config for ``dsn`` using the relay's migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision)


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision)
