"""The relay's Alembic migrations, three ways.

1. ``relay migrate`` (``upgrade``): the relay's own history, recorded in its own version table
   ``relay_alembic_version``, next to whatever the application keeps in ``alembic_version``.
2. Merged into the application's Alembic history: its ``version_locations`` name the relay's
   versions folder (``relay.migrations:versions`` in alembic.ini, or ``add_version_location``
   on a ``Config``); the relay's branch is labelled ``relay`` and its revision ids are
   ``relay_0001``, ``relay_0002``... so they never clash with the application's.
3. ``relay migrate --sql`` (``upgrade_sql``): the SQL printed for a DBA, with no database.

``include_name`` and ``include_object`` keep an application's ``alembic revision
--autogenerate`` away from the relay's tables.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from alembic.config import Config

from alembic import command
from relay.db import sqlalchemy_url

VERSION_TABLE = "relay_alembic_version"
"""Where ``relay migrate`` records the relay's revision (never the application's table)."""

VERSIONS_RESOURCE = "relay.migrations:versions"
"""The versions folder as an Alembic resource name, for an application's alembic.ini."""

# Revision ids before they were made unique (``relay_`` prefix, so they cannot clash with an
# application's own ``0001`` when merged into its history).
LEGACY_REVISIONS = {"0001": "relay_0001", "0002": "relay_0002", "0003": "relay_0003"}

OFFLINE_URL = "postgresql+psycopg://"
"""Offline (``--sql``) mode needs a dialect and never a server: a URL naming no host."""


def script_location() -> Path:
    """The migration scripts: the package ``relay.migrations`` (./alembic in a checkout)."""
    import relay.migrations

    return Path(next(iter(relay.migrations.__path__)))


def versions_location() -> Path:
    """The folder of the relay's revision scripts, as an absolute path in this installation."""
    return (script_location() / "versions").absolute()


def head_revision() -> str:
    """The newest revision of the relay's branch: what ``relay migrate`` brings a database to."""
    return _revisions()[0]


_MARKER = re.compile(r"relay schema (\S+?):")


def marked_revision(comment: str | None) -> str | None:
    """The revision a ``relay_outbox`` comment names (migration relay_0005 onwards), if any."""
    found = _MARKER.match(comment or "")
    return found.group(1) if found else None


@functools.cache
def _revisions() -> tuple[str, frozenset[str]]:
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(script_location()))
    head = scripts.get_current_head()
    if head is None:
        raise RuntimeError(f"no revision scripts in {versions_location()}")
    return head, frozenset(r.revision for r in scripts.walk_revisions())


def schema_problem(has_outbox: bool, comment: str | None) -> str | None:
    """Why a database (``queries.SCHEMA_REVISION``'s row) cannot run this relay, or None.

    The revision comes from ``relay_outbox``'s comment, not from a version table, so the
    answer is the same for every role and for every way of migrating (migration relay_0005).
    """
    head, known = _revisions()
    if not has_outbox:
        return f"the database was never migrated: run relay migrate (to {head})"
    found = marked_revision(comment)
    if found == head:
        return None
    if found is None:
        return f"the relay's schema is older than relay_0005: run relay migrate (to {head})"
    if found not in known:
        return (
            f"the database is at {found}, which this relay does not know (a newer relay "
            f"migrated it); this relay needs {head}: run the newer relay"
        )
    return f"the database is at {found}, this relay needs {head}: run relay migrate"


# Alembic's path_separator names and what they split on (":" and ";" stand for themselves).
_SEPARATORS = {"space": " ", "newline": "\n", "os": os.pathsep}


def add_version_location(cfg: Config) -> Config:
    """Add the relay's versions folder to an application's Alembic ``cfg`` (merged history).

    The application's own locations are kept (``script_location``/versions when it lists
    none). Returns ``cfg``; ``alembic upgrade heads`` then applies both branches.
    """
    own = cfg.get_version_locations_list() or [
        str(Path(cfg.get_main_option("script_location") or ".") / "versions")
    ]
    ours = str(versions_location())
    locations = own if ours in own else [*own, ours]
    # A config that names no separator gets one location per line (no path holds a newline);
    # otherwise its own separator is kept, since prepend_sys_path is split on it too.
    separator = cfg.get_main_option("path_separator")
    if separator is None:
        separator = "newline"
        cfg.set_main_option("path_separator", separator)
    joiner = _SEPARATORS.get(separator, separator)
    cfg.set_main_option("version_locations", joiner.join(locations).replace("%", "%%"))
    return cfg


def alembic_config(dsn: str) -> Config:
    """An Alembic config for ``dsn`` using the relay's migration scripts."""
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", sqlalchemy_url(dsn).replace("%", "%%"))
    cfg.attributes["configure_logging"] = False
    return cfg


def revision_argument(revision: str) -> str:
    """``revision`` (or each side of a ``start:end`` range) with legacy ids renamed."""
    return ":".join(LEGACY_REVISIONS.get(part, part) for part in revision.split(":"))


def upgrade(dsn: str, revision: str = "head") -> None:
    command.upgrade(alembic_config(dsn), revision_argument(revision))


def downgrade(dsn: str, revision: str = "base") -> None:
    command.downgrade(alembic_config(dsn), revision_argument(revision))


def upgrade_sql(out: TextIO, revision: str = "head") -> None:
    """Write the SQL of the upgrade to ``revision`` (or a ``start:end`` range) to ``out``.

    Alembic's offline mode: no connection is made, so no database needs to exist. Without a
    start the script creates ``relay_alembic_version``; with one it expects the table to hold
    that revision (a legacy id such as ``0002`` is renamed by the script first).
    """
    cfg = Config(output_buffer=out)
    cfg.set_main_option("script_location", str(script_location()))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("sqlalchemy.url", OFFLINE_URL)
    cfg.attributes["configure_logging"] = False
    command.upgrade(cfg, revision_argument(revision), sql=True)


@functools.cache
def relay_tables() -> frozenset[str]:
    """Every table the relay's migrations create, and its version table."""
    from relay.models import Base

    return frozenset(Base.metadata.tables) | {VERSION_TABLE}


def include_name(name: str | None, type_: str, parent_names: Mapping[str, Any]) -> bool:
    """Autogenerate filter (``context.configure(include_name=...)``): skip the relay's tables.

    A table skipped here is never reflected, so neither it nor its indexes and constraints
    appear in the application's autogenerated revisions.
    """
    return type_ != "table" or not is_relay_table(name)


def is_relay_table(name: str | None) -> bool:
    """One of the relay's tables, or one of the day partitions the relay creates at run time
    (``relay_outbox_p20261203``, ``relay_outbox_default``: migration relay_0006)."""
    from relay.models.schema import PARTITION_NAME

    return name in relay_tables() or bool(name and PARTITION_NAME.fullmatch(name))


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Autogenerate filter (``context.configure(include_object=...)``): skip the relay's tables.

    Covers what ``include_name`` cannot see: the relay's tables and indexes in the
    application's own metadata (an application that imports ``relay.models``), which would
    otherwise be created there.
    """
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return not is_relay_table(getattr(table, "name", None))
