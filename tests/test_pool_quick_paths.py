"""QueuePool's quick checkout and return make the procedures' decisions, on a real server.

The quick paths skip the generator machinery when no I/O is needed; these tests pin the
behaviour that must not change: the reset still ends an open transaction, a user's
dialect still sees every rollback, a stale connection is still replaced, and a raising
``checkout`` listener is still handled as the procedure handles it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from lambda_pool import event, exc
from lambda_pool.pool import AsyncAdaptedQueuePool, QueuePool
from lambda_pool.testing.postgres import PostgresServer


class CountingConnection(psycopg.Connection[Any]):
    """A psycopg connection counting the rollbacks asked of it."""

    rollbacks = 0

    def rollback(self) -> None:
        type(self).rollbacks += 1
        super().rollback()


def counting_creator(server: PostgresServer, app: str) -> Callable[[], CountingConnection]:
    CountingConnection.rollbacks = 0

    def connect() -> CountingConnection:
        return CountingConnection.connect(server.dsn, application_name=app)

    return connect


def test_return_of_an_idle_connection_sends_no_rollback(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(counting_creator(embedded_postgres, unique_application_name), 1, 0)
    pool.connect().close()
    with pool.connect() as proxy:
        dbapi = proxy.dbapi_connection
        dbapi.autocommit = True
        dbapi.execute("SELECT 1")
        dbapi.autocommit = False
    assert CountingConnection.rollbacks == 0
    pool.dispose()


def test_return_inside_a_transaction_rolls_it_back(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(counting_creator(embedded_postgres, unique_application_name), 1, 0)
    with pool.connect() as proxy:
        proxy.execute("CREATE TEMP TABLE quick_path (n int)")
    assert CountingConnection.rollbacks == 1
    with pool.connect() as proxy:
        status = proxy.dbapi_connection.info.transaction_status
        assert status == psycopg.pq.TransactionStatus.IDLE
        with pytest.raises(psycopg.errors.UndefinedTable):
            proxy.execute("SELECT * FROM quick_path")
    pool.dispose()


def test_a_users_dialect_sees_every_rollback(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    calls: list[str] = []

    class UsersDialect:
        def do_rollback(self, conn: Any) -> None:
            calls.append("rollback")
            conn.rollback()

        def do_commit(self, conn: Any) -> None:
            conn.commit()

        def do_close(self, conn: Any) -> None:
            conn.close()

        def do_ping(self, conn: Any) -> bool:
            return True

        def is_disconnect(self, err: BaseException, conn: Any) -> bool:
            return False

        def get_driver_connection(self, conn: Any) -> Any:
            return conn

    pool = QueuePool(
        counting_creator(embedded_postgres, unique_application_name),
        1,
        0,
        dialect=UsersDialect(),
    )
    pool.connect().close()
    pool.connect().close()
    assert calls == ["rollback", "rollback"]
    pool.dispose()


def test_a_soft_invalidated_connection_is_replaced_at_the_next_checkout(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(counting_creator(embedded_postgres, unique_application_name), 1, 0)
    with pool.connect() as proxy:
        first = proxy.dbapi_connection
        proxy.invalidate(soft=True)
    with pool.connect() as proxy:
        assert proxy.dbapi_connection is not first
        assert first.closed
    pool.dispose()


def test_a_disconnection_raised_by_a_checkout_listener_gets_a_new_connection(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(counting_creator(embedded_postgres, unique_application_name), 1, 0)
    pool.connect().close()  # an idle connection: the next checkout takes the quick path
    raised: list[object] = []

    def checkout(dbapi: Any, record: Any, proxy: Any) -> None:
        if not raised:
            raised.append(dbapi)
            raise exc.DisconnectionError("the listener says this one is gone")

    event.listen(pool, "checkout", checkout)
    with pool.connect() as proxy:
        assert proxy.dbapi_connection is not raised[0]
        assert proxy.execute("SELECT 1").fetchone() == (1,)
    assert (pool.checkedin(), pool.checkedout()) == (1, 0)
    pool.dispose()


def test_another_error_from_a_checkout_listener_gives_the_slot_back(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(counting_creator(embedded_postgres, unique_application_name), 1, 0)
    pool.connect().close()

    def checkout(dbapi: Any, record: Any, proxy: Any) -> None:
        raise ValueError("refused by the listener")

    event.listen(pool, "checkout", checkout)
    with pytest.raises(ValueError, match="refused by the listener"):
        pool.connect()
    assert pool.checkedout() == 0
    assert embedded_postgres.backend_count(unique_application_name) == 0
    pool.dispose()


def test_async_return_inside_a_transaction_rolls_it_back_and_idle_sends_none(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    rollbacks: list[int] = []

    class CountingAsync(psycopg.AsyncConnection[Any]):
        async def rollback(self) -> None:
            rollbacks.append(1)
            await super().rollback()

    async def connect() -> CountingAsync:
        return await CountingAsync.connect(
            embedded_postgres.dsn, application_name=unique_application_name
        )

    async def scenario() -> None:
        pool = AsyncAdaptedQueuePool(connect, 1, 0)
        proxy = await pool.aconnect()
        await proxy.aclose()
        assert rollbacks == []
        proxy = await pool.aconnect()
        await proxy.dbapi_connection.execute("SELECT 1")
        await proxy.aclose()
        assert rollbacks == [1]
        proxy = await pool.aconnect()
        status = proxy.dbapi_connection.info.transaction_status
        assert status == psycopg.pq.TransactionStatus.IDLE
        await proxy.aclose()
        await pool.adispose()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_task_cancelled_while_its_connection_closes_still_returns_it_clean(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    from lambda_pool.asyncio import create_async_engine

    url = embedded_postgres.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    async def scenario() -> None:
        engine = create_async_engine(url, pool_size=1, max_overflow=0)

        pids: list[int] = []

        async def invocation() -> None:
            async with engine.connect() as conn:
                await conn.execute("SELECT 1")  # a transaction is open: the close awaits
                pids.append(conn.connection.dbapi_connection.info.backend_pid)
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # delivered at the close's first wait

        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(invocation())
        for _ in range(200):
            if engine.pool.checkedin() == 1:
                break
            await asyncio.sleep(0.01)
        assert (engine.pool.checkedin(), engine.pool.checkedout()) == (1, 0)
        async with engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
            # The same connection: its close finished (shielded), it was not terminated.
            assert dbapi.info.backend_pid == pids[0]
        await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_async_connection_closing_without_io_needs_no_task(
    embedded_postgres: PostgresServer,
) -> None:
    from lambda_pool.asyncio import create_async_engine

    url = embedded_postgres.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    async def scenario() -> None:
        engine = create_async_engine(url, pool_size=1, max_overflow=0)
        async with engine.connect():
            pass
        before = len(asyncio.all_tasks())
        made: list[object] = []
        loop = asyncio.get_running_loop()
        factory = loop.get_task_factory()

        def counting(loop: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> Any:
            made.append(coro)
            return asyncio.Task(coro, loop=loop, **kw)

        loop.set_task_factory(counting)
        try:
            async with engine.connect():
                pass
        finally:
            loop.set_task_factory(factory)
        assert made == [] and len(asyncio.all_tasks()) == before
        await engine.dispose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
