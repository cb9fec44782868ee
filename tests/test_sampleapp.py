"""An application that adds the relay: tests/sampleapp, exactly as README.md describes it.

The sample application has its own top-level ``models`` module, its own Alembic history
(``0001``, the ``orders`` table) and records purchase events in its own transactions. Each
way of migrating is run with the real commands (``alembic``, ``relay migrate``, the printed
SQL), then committed and rolled-back orders are drained to the fake Customer.io. One database
also takes orders through every connection kind the application may hold (blocking, asyncio,
Django) before ``relay run --drain`` delivers them.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import asyncpg
import psycopg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, pool
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import relay.migrate
from relay import map_event, record_event
from relay.db import sqlalchemy_url
from relay.models import Base as RelayBase
from relay.service import drain
from relay.testing.fakecio import FakeCustomerIO
from tests.relay_helpers import make_relay, query, relay_env
from tests.test_outbox_async import _connect_args, sqlalchemy_async_url

ROOT = Path(__file__).resolve().parent.parent
SAMPLEAPP = Path(__file__).resolve().parent / "sampleapp"
APP_MODULES = ("models", "shop", "shop_async")
APP_HEAD = "0001"


def _env(dsn: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if dsn is not None:
        env["DATABASE_URL"] = dsn
    env.update(extra)
    return env


def run(
    dsn: str | None, *args: str, cwd: Path = SAMPLEAPP, **extra: str
) -> subprocess.CompletedProcess[str]:
    """One command as the application's deploy runs it (cwd: the application's folder)."""
    proc = subprocess.run(
        args, cwd=cwd, env=_env(dsn, **extra), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, f"{args}: {proc.stderr}"
    return proc


def alembic(dsn: str | None, *args: str, cwd: Path = SAMPLEAPP) -> subprocess.CompletedProcess[str]:
    return run(dsn, sys.executable, "-m", "alembic", *args, cwd=cwd)


def relay_cli(dsn: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    return run(dsn, sys.executable, "-m", "relay.cli", "--log-level", "WARNING", *args)


def apply_script(dsn: str, sql: str) -> None:
    """Run a printed migration script as psql -f would: its own BEGIN and COMMIT, in order."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(sql)  # no parameters: one simple query, every statement of the script


def tables(dsn: str) -> set[str]:
    rows = query(dsn, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


def versions(dsn: str, table: str) -> set[str]:
    return {r[0] for r in query(dsn, f"SELECT version_num FROM {table}")}


# The ways a team runs the migrations (README "Adding the relay to your application").
def way1_relay_first(dsn: str) -> None:
    relay_cli(dsn, "migrate")
    alembic(dsn, "upgrade", "head")


def way1_app_first(dsn: str) -> None:
    alembic(dsn, "upgrade", "head")
    relay_cli(dsn, "migrate")


def way2_alembic_ini(dsn: str) -> None:
    alembic(dsn, "-n", "with_relay", "upgrade", "heads")


def way2_python(dsn: str) -> None:
    run(dsn, sys.executable, "migrate.py")


def way3_printed_sql(dsn: str) -> None:
    # The DBA's script is printed with no DATABASE_URL at all, then applied.
    apply_script(dsn, relay_cli(None, "migrate", "--sql").stdout)
    alembic(dsn, "upgrade", "head")


WAYS: dict[str, tuple[Callable[[str], None], bool]] = {
    # name: (migrate, merged into the application's own history)
    "relay migrate, then alembic upgrade head": (way1_relay_first, False),
    "alembic upgrade head, then relay migrate": (way1_app_first, False),
    "alembic -n with_relay upgrade heads": (way2_alembic_ini, True),
    "migrate.py (add_version_location)": (way2_python, True),
    "relay migrate --sql applied, then alembic upgrade head": (way3_printed_sql, False),
}


def check_migrated(dsn: str, merged: bool) -> None:
    head = relay.migrate.head_revision()
    assert {"orders", "relay_outbox", "relay_attempt", "relay_destination", "relay_throttle"} <= (
        tables(dsn)
    )
    if merged:
        assert versions(dsn, "alembic_version") == {APP_HEAD, head}
        assert "relay_alembic_version" not in tables(dsn)
    else:
        assert versions(dsn, "alembic_version") == {APP_HEAD}
        assert versions(dsn, "relay_alembic_version") == {head}
    # 0002's DO blocks ran under whichever environment applied them: the roles hold grants.
    granted = query(
        dsn,
        "SELECT has_any_column_privilege('relay_app', 'relay_outbox', 'INSERT'),"
        " has_table_privilege('relay_worker', 'relay_attempt', 'INSERT'),"
        " has_table_privilege('relay_operator', 'relay_status', 'SELECT')",
    )
    assert granted == [(True, True, True)]
    # The application's autogenerate leaves the relay's tables alone: nothing to propose.
    check = alembic(dsn, *(["-n", "with_relay"] if merged else []), "check")
    assert "No new upgrade operations detected" in check.stdout


@pytest.fixture(scope="module")
def app() -> Iterator[SimpleNamespace]:
    """The sample application's modules, imported as it imports them (its folder first)."""
    saved_path = list(sys.path)
    saved = {name: sys.modules.pop(name) for name in APP_MODULES if name in sys.modules}
    sys.path.insert(0, str(SAMPLEAPP))
    try:
        models = importlib.import_module("models")
        shop = importlib.import_module("shop")
        shop_async = importlib.import_module("shop_async")
        assert Path(models.__file__).parent == SAMPLEAPP
        yield SimpleNamespace(models=models, shop=shop, shop_async=shop_async)
    finally:
        sys.path[:] = saved_path
        for name in APP_MODULES:
            sys.modules.pop(name, None)
        sys.modules.update(saved)


class PaymentDeclined(Exception):
    pass


# -- the application's checkouts, one per connection kind ---------------------------------
# Each opens its transactions as the application's caller does, commits an order for each
# customer in `commit`, and rolls back the order of `roll_back` (its payment is declined).

Customer = dict[str, Any]
Placed = tuple[list[int], int]  # the committed orders' ids, the rolled-back order's id
Kind = Callable[[str, SimpleNamespace, list[Customer], Customer, int], Placed]


def with_session(
    dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
) -> Placed:
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        ids = []
        for customer in commit:
            with Session(engine) as session, session.begin():
                ids.append(app.shop.place_order(session, customer, amount).id)
        with pytest.raises(PaymentDeclined), Session(engine) as session, session.begin():
            declined = app.shop.place_order(session, roll_back, amount).id
            raise PaymentDeclined
        return ids, declined
    finally:
        engine.dispose()


def with_psycopg(
    dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
) -> Placed:
    with psycopg.connect(dsn) as conn:
        ids = []
        for customer in commit:
            with conn.transaction():
                ids.append(app.shop.place_order_psycopg(conn, customer, amount))
        with pytest.raises(PaymentDeclined), conn.transaction():
            declined = app.shop.place_order_psycopg(conn, roll_back, amount)
            raise PaymentDeclined
    return ids, declined


def blocking(place: Callable[..., Coroutine[Any, Any, Placed]]) -> Kind:
    """An asyncio checkout, run to completion in its own event loop."""
    return lambda *args: asyncio.run(place(*args))


def with_async_session(driver: str) -> Kind:
    async def place(
        dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
    ) -> Placed:
        url = sqlalchemy_async_url(dsn, driver)
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            ids = []
            for customer in commit:
                async with AsyncSession(engine) as session, session.begin():
                    order = await app.shop_async.place_order_async(session, customer, amount)
                    ids.append(order.id)
            with pytest.raises(PaymentDeclined):
                async with AsyncSession(engine) as session, session.begin():
                    order = await app.shop_async.place_order_async(session, roll_back, amount)
                    declined = order.id
                    raise PaymentDeclined
            return ids, declined
        finally:
            await engine.dispose()

    return blocking(place)


async def with_psycopg_async(
    dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
) -> Placed:
    place = app.shop_async.place_order_psycopg_async
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        ids = []
        for customer in commit:
            async with conn.transaction():
                ids.append(await place(conn, customer, amount))
        with pytest.raises(PaymentDeclined):
            async with conn.transaction():
                declined = await place(conn, roll_back, amount)
                raise PaymentDeclined
    return ids, declined


async def with_asyncpg(
    dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
) -> Placed:
    place = app.shop_async.place_order_asyncpg
    async with asyncpg.create_pool(**_connect_args(dsn), min_size=1, max_size=2) as connections:
        ids = []
        for customer in commit:
            async with connections.acquire() as conn, conn.transaction():
                ids.append(await place(conn, customer, amount))
        with pytest.raises(PaymentDeclined):
            async with connections.acquire() as conn, conn.transaction():
                declined = await place(conn, roll_back, amount)
                raise PaymentDeclined
    return ids, declined


# Django's settings are configured once per process (and tests/test_django.py configures its
# own), so the Django checkout runs in a process of its own, as the application's would.
DJANGO_CHECKOUT = """
import json, sys
import django
django.setup()
from django.db import transaction
import shop_django

class PaymentDeclined(Exception):
    pass

commit, roll_back, amount = json.loads(sys.argv[1])
ids = []
for customer in commit:
    with transaction.atomic():
        ids.append(shop_django.place_order_django(customer, amount))
try:
    with transaction.atomic():
        declined = shop_django.place_order_django(roll_back, amount)
        raise PaymentDeclined
except PaymentDeclined:
    pass
print(json.dumps([ids, declined]))
"""


def with_django(
    dsn: str, app: SimpleNamespace, commit: list[Customer], roll_back: Customer, amount: int
) -> Placed:
    args = json.dumps([commit, roll_back, amount])
    proc = run(
        dsn, sys.executable, "-c", DJANGO_CHECKOUT, args, DJANGO_SETTINGS_MODULE="django_settings"
    )
    ids, declined = json.loads(proc.stdout)
    return ids, declined


KINDS: dict[str, Kind] = {
    "SQLAlchemy Session": with_session,
    "psycopg Connection": with_psycopg,
    "SQLAlchemy AsyncSession, asyncpg": with_async_session("asyncpg"),
    "SQLAlchemy AsyncSession, psycopg": with_async_session("psycopg"),
    "psycopg AsyncConnection": blocking(with_psycopg_async),
    "asyncpg Connection (pool)": blocking(with_asyncpg),
    "Django, transaction.atomic()": with_django,
}


def customers(prefix: str, n: int) -> list[Customer]:
    return [
        {"id": f"cus_{prefix}{i}", "email": f"cus_{prefix}{i}@example.com", "name": f"C {i}"}
        for i in range(n)
    ]


def expected_message_ids(
    app: SimpleNamespace, committed: list[tuple[int, Customer, int]]
) -> list[str]:
    return sorted(
        m.message_id
        for order_id, customer, amount in committed
        # (A messageId comes from the event id alone: any time will do here.)
        for m in map_event(app.shop.purchase_event(order_id, customer, amount, datetime.now(UTC)))
    )


@pytest.mark.parametrize("way", list(WAYS))
def test_sample_app_migrates_records_and_the_relay_delivers_only_what_committed(
    way: str, empty_dsn: str, app: SimpleNamespace, cio: FakeCustomerIO
) -> None:
    migrate, merged = WAYS[way]
    migrate(empty_dsn)
    check_migrated(empty_dsn, merged)

    shop = app.shop
    committed: list[tuple[int, Customer, int]] = []
    rolled_back: list[int] = []
    sync_kinds: list[tuple[Kind, int, list[Customer]]] = [
        (with_session, 1500, customers("s", 3)),
        (with_psycopg, 3500, customers("p", 3)),
    ]
    for kind, amount, group in sync_kinds:
        ids, declined = kind(empty_dsn, app, group[:2], group[2], amount)
        committed += [(i, c, amount) for i, c in zip(ids, group[:2], strict=True)]
        rolled_back.append(declined)

    assert len(committed) == 4 and len(rolled_back) == 2
    # The event id comes from the order id: the same order's event recorded again is a no-op.
    order_id, customer, amount = committed[0]
    with psycopg.connect(empty_dsn) as conn:
        placed_at = conn.execute(
            "SELECT created_at FROM orders WHERE id = %s", (order_id,)
        ).fetchone()
        assert placed_at is not None
        again = record_event(conn, shop.purchase_event(order_id, customer, amount, placed_at[0]))
        conn.commit()
    assert (again.written, again.skipped) == (0, "duplicate")
    order_ids = {r[0] for r in query(empty_dsn, "SELECT id FROM orders")}
    assert order_ids == {order_id for order_id, _, _ in committed}

    ok, _ = drain(make_relay(empty_dsn, cio), 30.0)
    assert ok
    expected = expected_message_ids(app, committed)
    assert len(expected) == 2 * len(committed)
    assert sorted(cio.accepted_message_ids()) == expected
    tracked = {i["properties"]["order_id"] for i in cio.accepted_items() if i["type"] == "track"}
    assert tracked == order_ids


def test_every_connection_kind_records_in_the_apps_transaction_and_one_drain_delivers_it(
    dsn: str, app: SimpleNamespace, cio: FakeCustomerIO
) -> None:
    # dsn holds the relay's schema (relay migrate); the application adds its own (way 1).
    alembic(dsn, "upgrade", "head")
    committed: list[tuple[int, Customer, int]] = []
    rolled_back: list[int] = []
    for n, (name, kind) in enumerate(KINDS.items()):
        amount = 1000 + n  # tells the kinds apart at Customer.io
        group = customers(f"k{n}_", 3)
        ids, declined = kind(dsn, app, group[:2], group[2], amount)
        assert len(ids) == 2 and isinstance(declined, int), name
        committed += [(i, c, amount) for i, c in zip(ids, group[:2], strict=True)]
        rolled_back.append(declined)

    placed = [order_id for order_id, _, _ in committed] + rolled_back
    assert len(set(placed)) == len(placed) == 3 * len(KINDS)
    order_ids = {r[0] for r in query(dsn, "SELECT id FROM orders")}
    assert order_ids == {order_id for order_id, _, _ in committed}
    # Only the committed orders' messages are in the outbox, before any relay runs.
    outbox = [r[0] for r in query(dsn, "SELECT message_id FROM relay_outbox")]
    assert sorted(outbox) == expected_message_ids(app, committed)

    # The relay as README runs it, against the fake Customer.io.
    proc = subprocess.run(
        [sys.executable, "-m", "relay.cli", "run", "--drain", "--timeout", "60"],
        env=relay_env(dsn, cio.url),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(cio.accepted_message_ids()) == expected_message_ids(app, committed)
    tracked = {
        (i["properties"]["order_id"], i["properties"]["amount"])
        for i in cio.accepted_items()
        if i["type"] == "track"
    }
    assert tracked == {(order_id, amount) for order_id, _, amount in committed}


def test_a_team_switches_from_relay_migrate_to_the_merged_history(empty_dsn: str) -> None:
    # Way 1, with the relay's schema one revision behind the installed relay.
    alembic(empty_dsn, "upgrade", "head")
    relay_cli(empty_dsn, "migrate", "relay_0002")
    # The switch, as README describes it: bring the relay's schema to the installed head with
    # relay migrate one last time, record that head in the application's history, drop the
    # relay's own version table.
    relay_cli(empty_dsn, "migrate")
    alembic(empty_dsn, "-n", "with_relay", "stamp", "relay@head")
    with psycopg.connect(empty_dsn) as conn:
        conn.execute("DROP TABLE relay_alembic_version")
    assert versions(empty_dsn, "alembic_version") == {APP_HEAD, relay.migrate.head_revision()}
    upgraded = alembic(empty_dsn, "-n", "with_relay", "upgrade", "heads")
    assert "Running upgrade" not in upgraded.stderr  # nothing left to apply
    check_migrated(empty_dsn, merged=True)
    # A stray relay migrate now fails at its first CREATE TABLE, and its transaction leaves
    # nothing behind.
    stray = subprocess.run(
        [sys.executable, "-m", "relay.cli", "--log-level", "WARNING", "migrate"],
        env=_env(empty_dsn),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert stray.returncode == 1
    assert stray.stderr.startswith('relay: migration failed: relation "relay_')
    assert len(stray.stderr.splitlines()) == 1
    assert "relay_alembic_version" not in tables(empty_dsn)


def test_the_merged_history_applies_later_relay_revisions_under_the_apps_env(
    empty_dsn: str,
) -> None:
    # A database whose application history holds the relay at relay_0002 (stamped as in the
    # switch above): upgrading the relay's branch runs relay_0003 onwards through the
    # application's env.py.
    alembic(empty_dsn, "upgrade", "head")
    relay_cli(empty_dsn, "migrate", "relay_0002")
    alembic(empty_dsn, "-n", "with_relay", "stamp", "relay_0002")
    with psycopg.connect(empty_dsn) as conn:
        conn.execute("DROP TABLE relay_alembic_version")
    upgraded = alembic(empty_dsn, "-n", "with_relay", "upgrade", "relay@head")
    assert "Running upgrade relay_0002 -> relay_0003" in upgraded.stderr
    check_migrated(empty_dsn, merged=True)


def test_the_merged_history_prints_as_sql_for_a_dba(empty_dsn: str) -> None:
    # Offline: the application's env.py only names the dialect; the server is unroutable.
    printed = run(
        "postgresql://app@10.255.255.1:5432/app",
        sys.executable,
        "-m",
        "alembic",
        "-n",
        "with_relay",
        "upgrade",
        "heads",
        "--sql",
    ).stdout
    apply_script(empty_dsn, printed)
    check_migrated(empty_dsn, merged=True)


def test_autogenerate_filter_hides_the_relays_tables_and_keeps_the_apps_changes(
    dsn: str, app: SimpleNamespace
) -> None:
    # dsn holds the relay's tables and its version table, and no orders table yet.
    engine = create_engine(sqlalchemy_url(dsn), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            app_metadata = app.models.Base.metadata
            unfiltered = compare_metadata(MigrationContext.configure(conn), app_metadata)
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "include_name": relay.migrate.include_name,
                    "include_object": relay.migrate.include_object,
                },
            )
            filtered = compare_metadata(ctx, app_metadata)
            # The relay's own metadata inside the application's: still nothing to create.
            relay_side = compare_metadata(ctx, RelayBase.metadata)
    finally:
        engine.dispose()
    dropped = {d[1].name for d in unfiltered if d[0] == "remove_table"}
    assert relay.migrate.relay_tables() <= dropped  # what the filter is for
    assert [(d[0], d[1].name) for d in filtered] == [("add_table", "orders")]
    assert relay_side == []


def test_autogenerate_in_the_merged_history_writes_only_the_apps_change(
    empty_dsn: str, tmp_path: Path
) -> None:
    app_copy = tmp_path / "app"
    shutil.copytree(SAMPLEAPP, app_copy, ignore=shutil.ignore_patterns("__pycache__"))
    alembic(empty_dsn, "-n", "with_relay", "upgrade", "heads", cwd=app_copy)
    models = app_copy / "models.py"
    column = "    currency: Mapped[str] = mapped_column(Text)\n"
    assert column in models.read_text()
    models.write_text(
        models.read_text().replace(
            column, column + "    note: Mapped[str | None] = mapped_column(Text)\n"
        )
    )
    # Two heads (the application's and relay@head): a new revision names its own branch.
    alembic(
        empty_dsn,
        "-n",
        "with_relay",
        "revision",
        "--autogenerate",
        "--head",
        f"{APP_HEAD}@head",
        "-m",
        "order note",
        cwd=app_copy,
    )
    (generated,) = (app_copy / "migrations" / "versions").glob("*_order_note.py")
    script = generated.read_text()
    assert "op.add_column('orders', sa.Column('note'" in script
    assert f"down_revision: str | None = '{APP_HEAD}'" in script
    assert "relay_" not in script


def _sampleapp_snippets(readme: str) -> list[tuple[str, str]]:
    section = readme.split("## Adding the relay to your application", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"<!-- sampleapp: (\S+) -->\n```\w*\n(.*?)```", section, re.DOTALL)


def test_readme_snippets_are_the_sample_apps_files() -> None:
    snippets = _sampleapp_snippets((ROOT / "README.md").read_text())
    assert {path for path, _ in snippets} >= {
        "alembic.ini",
        "migrations/env.py",
        "migrate.py",
        "shop.py",
        "shop_async.py",
        "shop_django.py",
    }
    for path, snippet in snippets:
        assert snippet in (SAMPLEAPP / path).read_text(), f"README snippet differs from {path}"


def test_readme_names_exactly_the_sample_apps_checkouts() -> None:
    # The section's caller snippets ("The caller owns the transaction") and its text name the
    # checkouts the sample application defines, and every one it defines is named.
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Adding the relay to your application", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"\b(place_order\w*)\b", section))
    defined = {
        name
        for path in SAMPLEAPP.glob("shop*.py")
        for name in re.findall(r"^(?:async )?def (place_order\w*)\(", path.read_text(), re.M)
    }
    assert len(defined) == 6
    assert named == defined


# -- packaging: installing the relay adds one top-level name ---------------------------------

IMPORT_CHECK = """
import sys
import models, shop, shop_async
import relay, relay.models, relay.operator_cli
from relay.cli import main
assert models.__file__.startswith(sys.argv[1]), models.__file__
assert "django" not in sys.modules  # only shop_django (the Django side) imports Django
assert set(models.Base.metadata.tables) == {"orders"}
assert "relay_outbox" in relay.models.Base.metadata.tables
print(relay.__file__)
sys.exit(main(["status", "--help"]))
"""


def _check_imports_beside_the_apps_models(env_extra: dict[str, str]) -> str:
    proc = run(None, sys.executable, "-c", IMPORT_CHECK, str(SAMPLEAPP), **env_extra)
    assert "usage: relay status" in proc.stdout
    return proc.stdout.splitlines()[0]


def test_the_installed_relay_imports_beside_an_apps_own_models_module() -> None:
    relay_file = _check_imports_beside_the_apps_models({})
    assert Path(relay_file).resolve().parent == (ROOT / "relay").resolve()


def _build_wheel(out: Path) -> Path:
    # Built from a copy of the sources, so no build/ or egg-info appears in the working tree.
    src = out / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("relay", "models", "alembic"):
        shutil.copytree(
            ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__")
        )
    # pip fetches the build backend pyproject.toml names, as `pip install` does.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = out.glob("*.whl")
    return wheel


def test_the_wheel_adds_one_top_level_name_and_holds_real_files(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    with zipfile.ZipFile(wheel) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        top = {n.split("/", 1)[0] for n in names}
        (dist_info,) = (t for t in top if t.endswith(".dist-info"))
        assert top - {dist_info} == {"relay"}
        assert zf.read(f"{dist_info}/top_level.txt").decode().split() == ["relay"]
        for info in infos:  # regular files (no symlinks) with the sources' contents
            assert (info.external_attr >> 16) & 0o170000 in (0, 0o100000), info.filename
        expected = {
            **{f"relay/models/{p.name}": p for p in (ROOT / "models").glob("*.py")},
            **{
                f"relay/migrations/versions/{p.name}": p
                for p in (ROOT / "alembic" / "versions").glob("*.py")
            },
            "relay/migrations/env.py": ROOT / "alembic" / "env.py",
            "relay/migrations/script.py.mako": ROOT / "alembic" / "script.py.mako",
            # Every module of the relay package, subpackages included: an editable install
            # serves a subpackage missing from pyproject's list from the checkout, so only
            # the wheel shows it is missing.
            **{
                f"relay/{p.relative_to(ROOT / 'relay')}": p
                for p in (ROOT / "relay").rglob("*.py")
                if p.relative_to(ROOT / "relay").parts[0] not in ("models", "migrations")
            },
        }
        for name, source in expected.items():
            assert zf.read(name) == source.read_bytes(), name
        zf.extractall(tmp_path / "site")

    # The wheel's relay, imported beside the application's models.py (cwd first on sys.path);
    # its migrations resolve inside the wheel, by path and by Alembic resource name.
    site = tmp_path / "site"
    relay_file = _check_imports_beside_the_apps_models({"PYTHONPATH": str(site)})
    assert Path(relay_file).parent == site / "relay"
    resolved = run(
        None,
        sys.executable,
        "-c",
        "import relay.migrate; from alembic.util import coerce_resource_to_filename as c;"
        " print(relay.migrate.versions_location());"
        " print(c(relay.migrate.VERSIONS_RESOURCE).resolve())",
        PYTHONPATH=str(site),
    ).stdout.split()
    assert [Path(p).resolve() for p in resolved] == [
        (site / "relay" / "migrations" / "versions").resolve()
    ] * 2
    from_wheel = run(
        None, sys.executable, "-m", "relay.cli", "migrate", "--sql", PYTHONPATH=str(site)
    )
    assert from_wheel.stdout == relay_cli(None, "migrate", "--sql").stdout
