"""The asyncio engine on both drivers (asyncpg, psycopg async) against a real PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lambda_pool import event, lifecycle
from lambda_pool.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from lambda_pool.exc import InvalidRequestError, ResourceClosedError
from lambda_pool.pool import AsyncAdaptedQueuePool, NullPool
from lambda_pool.testing.postgres import PostgresServer

DRIVERS = ["postgresql+asyncpg", "postgresql+psycopg", "postgresql"]


@pytest.fixture(params=DRIVERS)
def async_url(
    request: pytest.FixtureRequest, embedded_postgres: PostgresServer, unique_application_name: str
) -> str:
    base = embedded_postgres.dsn.replace("postgresql://", f"{request.param}://")
    return f"{base}?application_name={unique_application_name}"


async def test_default_is_nullpool_and_close_ends_the_backend(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url)
    assert type(engine.pool) is NullPool
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
        assert embedded_postgres.backend_count(unique_application_name) == 1
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


async def test_sized_engine_uses_asyncadaptedqueuepool_and_keeps_connections(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url, pool_size=2, max_overflow=0)
    assert type(engine.pool) is AsyncAdaptedQueuePool

    async def work() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute("SELECT pg_backend_pid()")).scalar()

    pids = await asyncio.gather(*(work() for _ in range(6)))
    assert len(set(pids)) <= 2
    assert engine.pool.checkedin() == len(set(pids))
    assert engine.pool.checkedout() == 0
    await engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


async def test_same_psycopg_style_sql_runs_on_every_driver(async_url: str) -> None:
    engine = create_async_engine(async_url)
    async with engine.connect() as conn:
        result = await conn.execute(
            "SELECT %(a)s::int AS a, %(b)s::text AS b, %(a)s::int + 1 AS c, '100%%' AS pct",
            {"a": 1, "b": "x"},
        )
        assert result.keys() == ["a", "b", "c", "pct"]
        assert result.all() == [(1, "x", 2, "100%")]
        positional = await conn.execute("SELECT %s::int * %s::int", (6, 7))
        assert positional.scalar() == 42
        literal = await conn.execute("SELECT '%s'")  # no parameters: sent as written
        assert literal.scalar() == "%s"


async def test_commit_persists_and_close_rolls_back(async_url: str) -> None:
    engine = create_async_engine(async_url)
    table = "async_commit_" + async_url.rsplit("=", 1)[-1][-12:]
    async with engine.begin() as conn:
        await conn.execute(f"CREATE TABLE {table} (a int)")
    async with engine.connect() as conn:
        inserted = await conn.execute(f"INSERT INTO {table} VALUES (%s), (%s)", (1, 2))
        assert inserted.rowcount == 2
        await conn.commit()
        await conn.execute(f"INSERT INTO {table} VALUES (3)")  # rolled back on close
    async with engine.connect() as conn:
        with pytest.raises(RuntimeError):
            async with conn.begin():
                await conn.execute(f"INSERT INTO {table} VALUES (4)")
                raise RuntimeError("boom")
        rows = (await conn.execute(f"SELECT a FROM {table} ORDER BY a")).all()
        assert rows == [(1,), (2,)]
        await conn.execute(f"DROP TABLE {table}")
        await conn.commit()


async def test_await_connect_and_explicit_close(async_url: str) -> None:
    engine = create_async_engine(async_url, pool_size=1)
    conn = await engine.connect()
    assert isinstance(conn, AsyncConnection)
    assert engine.pool.checkedout() == 1
    assert conn.driver_connection is conn.connection.dbapi_connection
    await conn.close()
    await conn.close()
    assert engine.pool.checkedout() == 0
    with pytest.raises(ResourceClosedError):
        await conn.execute("SELECT 1")
    await engine.dispose()


async def test_disconnect_invalidates_and_the_next_checkout_is_fresh(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url, pool_size=1)
    invalidations: list[Any] = []
    event.listen(engine, "invalidate", lambda dbapi, rec, exc: invalidations.append(exc))
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
        await asyncio.to_thread(embedded_postgres.terminate, unique_application_name)
        with pytest.raises(Exception) as info:
            await conn.execute("SELECT 1")
        assert engine.dialect.is_disconnect(info.value, None)
        assert conn.invalidated
        with pytest.raises(InvalidRequestError, match="invalidated"):
            await conn.execute("SELECT 1")
        await conn.rollback()
        assert (await conn.execute("SELECT 2")).scalar() == 2
    assert len(invalidations) == 1
    await engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


async def test_pre_ping_replaces_terminated_connections(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url, pool_size=1, pool_pre_ping=True)
    async with engine.connect() as conn:
        first = (await conn.execute("SELECT pg_backend_pid()")).scalar()
    await asyncio.to_thread(embedded_postgres.terminate, unique_application_name)
    async with engine.connect() as conn:
        second = (await conn.execute("SELECT pg_backend_pid()")).scalar()
    assert first != second
    await engine.dispose()


async def test_dispose_gives_a_fresh_pool_with_the_same_listeners(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url, pool_size=2)
    connects: list[Any] = []
    event.listen(engine, "connect", lambda dbapi, rec: connects.append(dbapi))
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
    old = engine.pool
    await engine.dispose()
    assert engine.pool is not old and type(engine.pool) is AsyncAdaptedQueuePool
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
    assert len(connects) == 2
    await engine.dispose()


async def test_engine_registers_for_shutdown_and_disposes_without_awaiting(
    embedded_postgres: PostgresServer, async_url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(async_url, pool_size=1)
    assert isinstance(engine, AsyncEngine)
    assert engine in lifecycle.registered_engines()
    assert repr(engine).startswith("AsyncEngine(postgresql")
    assert "***" in repr(engine)
    async with engine.connect() as conn:
        await conn.execute("SELECT 1")
    engine.dispose_for_shutdown()
    # The close runs as a task on this loop: wait for the server in a thread.
    wait = embedded_postgres.wait_for_backend_count
    left = await asyncio.to_thread(wait, 0, unique_application_name)
    assert left == 0
