"""Bad arguments to the engines raise clear errors and leave nothing open on the server."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import create_engine
from lambda_pool.asyncio import create_async_engine
from lambda_pool.exc import ArgumentError, DriverNotInstalledError, InvalidRequestError
from lambda_pool.pool import AsyncAdaptedQueuePool, NullPool, QueuePool
from lambda_pool.testing.postgres import PostgresServer


@pytest.fixture
def app_url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return f"{embedded_postgres.dsn}?application_name={unique_application_name}"


@pytest.fixture(autouse=True)
def nothing_left_open(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> Iterator[None]:
    yield
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"pool_size": -1}, "pool_size: -1"),
        ({"pool_size": "5"}, "pool_size: '5'"),
        ({"pool_size": True}, "pool_size: True"),
        ({"pool_size": 2.5}, "pool_size: 2.5"),
        ({"max_overflow": -2}, "max_overflow: -2"),
        ({"max_overflow": "10"}, "max_overflow: '10'"),
        ({"pool_timeout": -1}, "pool_timeout: -1"),
        ({"pool_timeout": "30"}, "pool_timeout: '30'"),
        ({"pool_recycle": "1h"}, "pool_recycle: '1h'"),
        ({"pool_pre_ping": "yes"}, "pool_pre_ping: 'yes'"),
        ({"pool_reset_on_return": "rollbak"}, "pool_reset_on_return: 'rollbak'"),
        ({"echo_pool": "loud"}, "echo_pool: 'loud'"),
        ({"connect_args": ["sslmode=require"]}, "connect_args"),
        ({"creator": "not callable"}, "creator"),
        ({"poolclass": dict}, "poolclass"),
        ({"credentials": object()}, "credentials= needs a credential provider"),
    ],
)
def test_bad_values_name_the_keyword_and_connect_nothing(
    app_url: str, kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ArgumentError) as info:
        create_engine(app_url, **kwargs)
    assert fragment in str(info.value)
    assert "Invalid value" in str(info.value) or "credentials" in str(info.value)


def test_unknown_keyword_is_named(app_url: str) -> None:
    with pytest.raises(ArgumentError, match="unknown keyword argument\\(s\\) 'pool_sise'"):
        create_engine(app_url, pool_sise=5)


def test_sizing_keywords_with_nullpool_are_rejected(app_url: str) -> None:
    with pytest.raises(ArgumentError, match=r"'pool_size', 'max_overflow'.*NullPool"):
        create_engine(app_url, poolclass=NullPool, pool_size=5, max_overflow=2)


def test_ready_pool_cannot_take_pool_keywords(app_url: str) -> None:
    pool = QueuePool(lambda: psycopg.connect(app_url))
    with pytest.raises(ArgumentError, match="pool= is a ready pool; 'pool_size'"):
        create_engine(app_url, pool=pool, pool_size=3)


def test_async_pool_class_is_refused_by_the_sync_factory(app_url: str) -> None:
    with pytest.raises(ArgumentError, match="AsyncAdaptedQueuePool is for asyncio engines"):
        create_engine(app_url, poolclass=AsyncAdaptedQueuePool)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("mysql://u:pw@h/d", "unsupported database scheme 'mysql'"),
        ("postgresql+pg8000://u:pw@h/d", "unsupported driver 'pg8000'"),
        ("oracle+cx_oracle://u:pw@h/d", "unsupported database scheme 'oracle'"),
    ],
)
def test_unknown_scheme_or_driver_lists_the_supported_ones(url: str, fragment: str) -> None:
    with pytest.raises(ArgumentError) as info:
        create_engine(url)
    assert fragment in str(info.value)
    assert "postgresql+psycopg://" in str(info.value)


def test_async_url_given_to_create_engine_points_to_create_async_engine(app_url: str) -> None:
    url = app_url.replace("postgresql://", "postgresql+asyncpg://")
    with pytest.raises(ArgumentError, match=r"lambda_pool\.asyncio\.create_async_engine"):
        create_engine(url)


def test_psycopg_async_alias_given_to_create_engine_points_to_async(app_url: str) -> None:
    url = app_url.replace("postgresql://", "postgresql+psycopg_async://")
    with pytest.raises(ArgumentError, match="create_async_engine"):
        create_engine(url)


def test_sqlite_url_given_to_create_async_engine_points_to_create_engine(tmp_path: Any) -> None:
    with pytest.raises(ArgumentError, match=r"lambda_pool\.create_engine"):
        create_async_engine(f"sqlite:///{tmp_path}/x.db")


def test_async_engine_rejects_a_sync_ready_pool(app_url: str) -> None:
    pool = NullPool(lambda: psycopg.connect(app_url))
    with pytest.raises(ArgumentError, match="needs an async one"):
        create_async_engine(app_url, pool=pool)


def _run_without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a child where importing ``module`` fails, as if not installed."""
    prelude = f"import sys\nsys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_psycopg_names_the_postgres_extra() -> None:
    result = _run_without(
        "psycopg",
        """
        from lambda_pool import create_engine
        from lambda_pool.exc import DriverNotInstalledError
        try:
            create_engine("postgresql://u:pw@127.0.0.1/db")
        except DriverNotInstalledError as exc:
            print("ERROR:", exc)
        """,
    )
    assert "pip install 'lambda-pool[postgres]'" in result.stdout, result.stderr


def test_missing_asyncpg_names_the_asyncpg_extra() -> None:
    result = _run_without(
        "asyncpg",
        """
        from lambda_pool.asyncio import create_async_engine
        from lambda_pool.exc import DriverNotInstalledError
        try:
            create_async_engine("postgresql+asyncpg://u:pw@127.0.0.1/db")
        except DriverNotInstalledError as exc:
            print("ERROR:", exc, isinstance(exc, ImportError))
        """,
    )
    assert "pip install 'lambda-pool[asyncpg]'" in result.stdout, result.stderr
    assert "True" in result.stdout


def test_missing_driver_error_is_an_import_error_subclass() -> None:
    assert issubclass(DriverNotInstalledError, ImportError)


def test_wrong_password_raises_the_driver_error_and_leaves_no_backend(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, "wrong-password", application_name=unique_application_name
    )
    engine = create_engine(url, pool_size=1)
    with pytest.raises(psycopg.OperationalError) as info:
        engine.connect()
    assert "wrong-password" not in str(info.value)
    # The failed connect gave its slot back.
    assert engine.pool.checkedout() == 0


def test_unknown_libpq_option_in_connect_args_fails_at_connect(app_url: str) -> None:
    engine = create_engine(app_url, connect_args={"no_such_option": "1"})
    with pytest.raises(psycopg.ProgrammingError, match="no_such_option"):
        engine.connect()
    assert engine.pool.checkedout() == 0


def test_statement_error_keeps_the_connection_usable_and_close_releases_it(app_url: str) -> None:
    engine = create_engine(app_url)
    with engine.connect() as conn:
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table")
        conn.rollback()
        assert conn.execute("SELECT 1").scalar() == 1


def test_execute_rejects_non_text_statements(app_url: str) -> None:
    engine = create_engine(app_url)
    with engine.connect() as conn, pytest.raises(InvalidRequestError, match="SQL text"):
        conn.execute(b"SELECT 1")  # type: ignore[arg-type]


async def test_bad_placeholder_on_asyncpg_is_an_argument_error(app_url: str) -> None:
    engine = create_async_engine(app_url.replace("postgresql://", "postgresql+asyncpg://"))
    async with engine.connect() as conn:
        with pytest.raises(ArgumentError, match="'%d'"):
            await conn.execute("SELECT %d", (1,))
        with pytest.raises(ArgumentError, match="2 placeholders but 1"):
            await conn.execute("SELECT %s, %s", (1,))
        with pytest.raises(ArgumentError, match="cannot be mixed"):
            await conn.execute("SELECT %s, %(a)s", (1,))
        assert (await conn.execute("SELECT 1")).scalar() == 1
    await engine.dispose()


def test_demo_quotes_a_crafted_database_name_instead_of_running_it(
    embedded_postgres: PostgresServer,
) -> None:
    from psycopg import sql

    from lambda_pool.demo import _own_schema

    role = "lp_demo_quoting"
    crafted = 'lp_demo" SET search_path = x; CREATE TABLE lp_demo_injected (); --'
    with embedded_postgres.admin_connect() as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(crafted)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(crafted)))
        if admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone() is None:
            admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
        try:
            _own_schema(admin, crafted, role)
            setting = admin.execute(
                "SELECT s.setconfig FROM pg_db_role_setting s "
                "JOIN pg_database d ON d.oid = s.setdatabase "
                "JOIN pg_roles r ON r.oid = s.setrole WHERE d.datname = %s AND r.rolname = %s",
                (crafted, role),
            ).fetchone()
            injected = admin.execute("SELECT to_regclass('lp_demo_injected')").fetchone()[0]
        finally:
            admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(crafted)))
            admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(role)))
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    assert setting is not None and setting[0] == [f"search_path={role}"]
    assert injected is None


@pytest.mark.parametrize(
    ("connect_args", "fragment"),
    [
        ({"sslmode": "garbage"}, "connect_args sslmode='garbage' is not one of"),
        ({"connect_timeout": "abc"}, "connect_args connect_timeout='abc'"),
        ({"connect_timeout": 2.5}, "connect_args connect_timeout='2.5' is not a whole"),
        ({"options": "-c a='b"}, "connect_args options has an unclosed quote"),
        ({"target_session_attrs": "writer"}, "connect_args target_session_attrs='writer'"),
        ({"port": 70000}, "connect_args port must be an integer"),
    ],
)
def test_connect_args_values_the_driver_would_refuse_fail_at_create_engine(
    app_url: str, connect_args: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(ArgumentError) as info:
        create_engine(app_url, connect_args=connect_args)
    assert fragment in str(info.value)


async def test_asyncpg_connect_args_values_fail_at_create_async_engine(app_url: str) -> None:
    url = app_url.replace("postgresql://", "postgresql+asyncpg://")
    with pytest.raises(ArgumentError, match="connect_args connect_timeout='soon' is not a number"):
        create_async_engine(url, connect_args={"connect_timeout": "soon"})
    with pytest.raises(ArgumentError, match="connect_args options has an unclosed quote"):
        create_async_engine(url, connect_args={"options": "-c a='b"})
    # asyncpg takes fractions of a second.
    engine = create_async_engine(url, connect_args={"connect_timeout": 2.5})
    async with engine.connect() as conn:
        assert (await conn.execute("SELECT 1")).scalar() == 1
    await engine.dispose()


def test_valid_connect_args_values_connect(app_url: str) -> None:
    engine = create_engine(
        app_url,
        connect_args={"connect_timeout": 5, "keepalives_idle": "30", "options": "-c work_mem=8MB"},
    )
    with engine.connect() as conn:
        assert conn.execute("SHOW work_mem").scalar() == "8MB"
    engine.dispose()
