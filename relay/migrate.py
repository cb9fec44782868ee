"""Applying the relay's Alembic migrations from Python (`relay migrate`, tests, the demo)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

from alembic import command
from relay.db import sqlalchemy_url

_ROOT = Path(__file__).resolve().parent.parent


def script_location() -> Path:
    """The migration scripts: ./alembic in a checkout, ``relay_migrations`` in a wheel."""
    checkout = _ROOT / "alembic"
    if (checkout / "env.py").exists():
        return checkout
    import relay_migrations  # type: ignore[import-not-found]

    return Path(next(iter(relay_migrations.__path__)))


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
