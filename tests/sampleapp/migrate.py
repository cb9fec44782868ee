"""Deploy step of the sample application: its migrations and the relay's, as one history."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

import relay.migrate
from alembic import command


def upgrade() -> None:
    cfg = Config(Path(__file__).with_name("alembic.ini"))  # the [alembic] section
    relay.migrate.add_version_location(cfg)  # + the installed relay's versions folder
    command.upgrade(cfg, "heads")


if __name__ == "__main__":
    upgrade()
