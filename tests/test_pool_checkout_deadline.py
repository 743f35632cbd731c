"""A checkout waiting for a free slot ends by the invocation's deadline, not only ``timeout``.

Real PostgreSQL connections; the pool is full because the test holds its only one.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

import lambda_pool
from lambda_pool import exc
from lambda_pool.pool import AsyncAdaptedQueuePool, QueuePool
from lambda_pool.testing.postgres import PostgresServer


def creator_for(server: PostgresServer, app: str) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(server.dsn, application_name=app)

    return connect


def test_waiting_checkout_ends_at_the_deadline_with_step_checkout(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=60)
    held = pool.connect()
    started = time.monotonic()
    with lambda_pool.deadline(0.3), pytest.raises(exc.DeadlineExceededError) as raised:
        pool.connect()
    waited = time.monotonic() - started
    assert raised.value.step == "checkout"
    assert 0 < raised.value.remaining_ms <= 300
    message = str(raised.value)
    assert "QueuePool limit of size 1 overflow 0 reached" in message
    assert "cut short by the deadline" in message
    # Ended by the deadline, far from the pool's own 60 s (a bound, not a speed claim).
    assert waited < 30
    # Nothing was taken or leaked: the held connection still comes back and is reused.
    assert (pool.checkedin(), pool.checkedout()) == (0, 1)
    held.close()
    with pool.connect() as again:
        assert again.execute("SELECT 1").fetchone() == (1,)
    assert embedded_postgres.backend_count(unique_application_name) == 1
    pool.dispose()


def test_pool_timeout_shorter_than_the_deadline_raises_the_pool_timeout(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=0.2)
    held = pool.connect()
    with lambda_pool.deadline(30), pytest.raises(exc.TimeoutError) as raised:
        pool.connect()
    assert not isinstance(raised.value, exc.DeadlineExceededError)
    assert str(raised.value) == (
        "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.20"
    )
    held.close()
    pool.dispose()


def test_an_expired_deadline_does_not_stop_a_checkout_that_need_not_wait(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=5)
    pool.connect().close()
    with lambda_pool.deadline(0.001):
        time.sleep(0.01)
        proxy = pool.connect()  # an idle connection: no wait, so no deadline check
    proxy.close()
    pool.dispose()


def test_a_connection_returned_during_the_wait_is_handed_over_before_the_deadline(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=60)
    held = pool.connect()
    held_pid = held.dbapi_connection.info.backend_pid
    timer = threading.Timer(0.1, held.close)
    timer.start()
    try:
        with lambda_pool.deadline(20), pool.connect() as proxy:
            assert proxy.dbapi_connection.info.backend_pid == held_pid
    finally:
        timer.join()
    pool.dispose()


def test_async_waiting_checkout_ends_at_the_deadline(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            embedded_postgres.dsn, application_name=unique_application_name
        )

    async def scenario() -> None:
        pool = AsyncAdaptedQueuePool(connect, 1, 0, timeout=60)
        held = await pool.aconnect()
        with lambda_pool.deadline(0.3), pytest.raises(exc.DeadlineExceededError) as raised:
            await pool.aconnect()
        assert raised.value.step == "checkout"
        assert "QueuePool limit of size 1 overflow 0 reached" in str(raised.value)
        assert pool.checkedout() == 1
        await held.aclose()
        proxy = await pool.aconnect()
        await proxy.aclose()
        await pool.adispose()

    asyncio.run(asyncio.wait_for(scenario(), 30))
