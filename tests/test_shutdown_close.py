"""``engine.dispose_for_shutdown()`` in-process: every pool class closes idle and checked-out
connections at once, without the pool's lock, and the engine reconnects afterwards.

(The SIGTERM path through ``lambda_pool.lifecycle`` in a real child process is in
``test_lifecycle.py``.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import pytest

from lambda_pool import create_engine, event
from lambda_pool.asyncio import create_async_engine
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import warm_engine


@pytest.fixture
def url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return f"{embedded_postgres.dsn}?application_name={unique_application_name}"


@pytest.mark.parametrize("sizing", [{"pool_size": 2}, {}], ids=["queuepool", "nullpool"])
def test_checked_out_and_idle_connections_close_and_the_engine_reconnects(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str, sizing: Any
) -> None:
    engine = create_engine(url, **sizing)
    held = engine.connect()
    held.execute("SELECT 1")
    with engine.connect() as idle:
        idle.execute("SELECT 1")
    expected = 2 if sizing else 1  # NullPool keeps nothing idle
    assert embedded_postgres.wait_for_backend_count(expected, unique_application_name) == expected

    engine.dispose_for_shutdown()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    engine.dispose_for_shutdown()  # twice: nothing left, no error

    held.close()
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1
    engine.dispose()


def test_warm_engine_closes_its_warm_and_separate_connections(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    engine = warm_engine(url)
    first = engine.connect()
    first.execute("SELECT 1")
    second = engine.connect()  # the warm one is in use: a separate connection
    second.execute("SELECT 1")
    assert embedded_postgres.wait_for_backend_count(2, unique_application_name) == 2

    engine.dispose_for_shutdown()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0

    first.close()
    second.close()
    opened = engine.pool.stats.opened
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1
    assert engine.pool.stats.opened == opened + 1  # a new warm connection
    engine.dispose()


def test_shutdown_close_does_not_wait_for_the_pool_lock(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    engine = create_engine(url, pool_size=1)
    held = engine.connect()
    held.execute("SELECT 1")
    finished = threading.Event()
    # As when SIGTERM interrupts code that holds the pool's lock.
    with engine.pool._lock:
        worker = threading.Thread(target=lambda: (engine.dispose_for_shutdown(), finished.set()))
        worker.start()
        assert finished.wait(10), "dispose_for_shutdown() blocked on the pool lock"
    worker.join()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    held.close()


def _hold_on_a_finished_loop(engine: Any) -> Any:
    """One connection checked out and one idle, opened on a loop that is closed now."""

    async def hold() -> Any:
        held = await engine.connect()
        await held.execute("SELECT 1")
        async with engine.connect() as idle:
            await idle.execute("SELECT 1")
        return held

    return asyncio.run(hold())


# The held connection is never returned: its loop is gone, as at process shutdown.
@pytest.mark.filterwarnings("ignore:An async pooled connection was garbage-collected")
@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
def test_async_engine_closes_checked_out_connections_after_its_loop_is_gone(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str, driver: str
) -> None:
    engine = create_async_engine(url.replace("postgresql://", f"{driver}://"), pool_size=2)
    held = _hold_on_a_finished_loop(engine)
    assert embedded_postgres.wait_for_backend_count(2, unique_application_name) == 2
    engine.dispose_for_shutdown()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    engine.dispose_for_shutdown()  # twice: nothing left, no error
    del held


def _running_sleep(pg: PostgresServer, app: str, timeout: float = 10.0) -> int:
    """Wait until a ``pg_sleep`` statement of ``app`` runs on the server; its backend pid."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for row in pg.backends(app):
            if row["state"] == "active" and "pg_sleep" in (row["query"] or ""):
                return int(row["pid"])
        time.sleep(0.02)
    raise AssertionError(f"no pg_sleep statement of {app} started")


def test_a_running_statement_is_cancelled_before_its_connection_closes(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    engine = create_engine(url)
    outcome: list[BaseException | None] = []

    def long_query() -> None:
        try:
            with engine.connect() as conn:
                conn.execute("SELECT pg_sleep(30)")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=long_query, daemon=True)
    worker.start()
    _running_sleep(embedded_postgres, unique_application_name)

    engine.dispose_for_shutdown()

    # The server stopped the statement and the session; nothing waits 30 s for pg_sleep.
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name, timeout=3) == 0
    worker.join(5)
    assert not worker.is_alive()
    assert outcome and outcome[0] is not None  # the caller saw its statement fail
    engine.dispose()


def test_an_async_connection_running_a_statement_is_cancelled_without_its_loop(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    outcome: list[BaseException | None] = []

    async def long_query() -> None:
        async with engine.connect() as conn:
            await conn.execute("SELECT pg_sleep(30)")

    def run() -> None:
        try:
            asyncio.run(long_query())
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    _running_sleep(embedded_postgres, unique_application_name)

    # From another thread, as the SIGTERM path does: the loop is busy in the query.
    engine.dispose_for_shutdown()

    assert embedded_postgres.wait_for_backend_count(0, unique_application_name, timeout=3) == 0
    worker.join(5)
    assert not worker.is_alive()
    assert outcome and outcome[0] is not None


# The connections are kept referenced (as an interrupted coroutine's frame would keep
# them), so the garbage collector cannot end the sessions in the test's place.
@pytest.mark.filterwarnings("ignore:An async pooled connection was garbage-collected")
def test_asyncpg_connections_of_a_closed_loop_are_shut_down_without_an_error(
    embedded_postgres: PostgresServer,
    url: str,
    unique_application_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = create_async_engine(url.replace("postgresql://", "postgresql+asyncpg://"), pool_size=2)
    opened: list[Any] = []
    event.listen(engine, "connect", lambda dbapi, record: opened.append(dbapi))

    held = _hold_on_a_finished_loop(engine)  # nothing can run on their loop now
    assert len(opened) == 2
    assert embedded_postgres.wait_for_backend_count(2, unique_application_name) == 2

    with caplog.at_level(logging.ERROR):
        engine.dispose_for_shutdown()
        assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
        engine.dispose_for_shutdown()  # twice: nothing left, no error
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    del held
