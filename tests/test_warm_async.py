"""The warm-container cache for asyncio engines, against the real embedded PostgreSQL, with
both async drivers (psycopg's ``AsyncConnection`` and asyncpg): the same reuse rules as the
blocking cache (``test_warm.py``, ``test_warm_engine.py``), plus the event-loop rule — an
asyncio connection is only ever handed out on the loop that opened it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from support import FakeClock

from lambda_pool.asyncio import AsyncConnection, AsyncEngine
from lambda_pool.auth import Credentials
from lambda_pool.exc import ArgumentError
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import (
    WarmPool,
    cached_engines,
    forget_cached_engines,
    warm_async_engine,
    warm_engine,
)

DRIVERS = ["psycopg", "asyncpg"]


def _with_driver(url: str, driver: str) -> str:
    assert url.startswith("postgresql://")
    return url.replace("postgresql://", f"postgresql+{driver}://", 1)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    pytest.importorskip(request.param)
    return str(request.param)


@pytest.fixture
def url(embedded_postgres: PostgresServer, unique_application_name: str, driver: str) -> str:
    return _with_driver(
        embedded_postgres.dsn_for(
            embedded_postgres.user,
            embedded_postgres.password,
            application_name=unique_application_name,
        ),
        driver,
    )


def _engines_of(application_name: str) -> list[AsyncEngine]:
    return [
        engine
        for engine in cached_engines()
        if isinstance(engine, AsyncEngine)
        and engine.url.query.get("application_name") == application_name
    ]


@pytest.fixture
async def cleanup(unique_application_name: str) -> AsyncIterator[None]:
    """Close this test's warm connections on the test's own loop."""
    yield
    for engine in _engines_of(unique_application_name):
        await engine.dispose()


async def _backend_pid(conn: AsyncConnection) -> int:
    return int((await conn.execute("SELECT pg_backend_pid()")).scalar())


# -- the cache --------------------------------------------------------------------------------


async def test_async_engine_is_cached_per_identity_apart_from_the_blocking_one(
    url: str, driver: str, cleanup: None
) -> None:
    engine = warm_async_engine(url)
    assert isinstance(engine, AsyncEngine)
    assert isinstance(engine.pool, WarmPool)
    assert engine.pool.is_async
    assert engine.driver == driver
    assert warm_async_engine(url) is engine
    assert warm_async_engine(url, pre_ping_idle_seconds=5) is not engine
    assert any(e is engine for e in cached_engines())
    if driver == "psycopg":
        blocking = warm_engine(url)
        assert blocking is not engine and not blocking.pool.is_async
        blocking.dispose()


def test_warm_async_engine_refuses_other_pools(url: str) -> None:
    with pytest.raises(ArgumentError, match=r"warm_async_engine\(\).*pool_size"):
        warm_async_engine(url, pool_size=3)
    with pytest.raises(ArgumentError, match="pre_ping_idle_seconds"):
        warm_async_engine(url, pre_ping_idle_seconds=-5)


async def test_forget_cached_engines_forgets_async_engines_too(url: str, cleanup: None) -> None:
    engine = warm_async_engine(url)
    forgotten = forget_cached_engines()
    assert any(e is engine for e in forgotten)
    assert warm_async_engine(url) is not engine
    await engine.dispose()


# -- reuse, replacement, concurrency -----------------------------------------------------------


async def test_hundred_warm_checkouts_use_exactly_one_backend(
    url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    cleanup: None,
) -> None:
    pids = set()
    for _ in range(100):
        engine = warm_async_engine(url)  # what a handler calls on every invocation
        async with engine.connect() as conn:
            pids.add(await _backend_pid(conn))
    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    pool = warm_async_engine(url).pool
    assert isinstance(pool, WarmPool)
    assert pool.stats.as_dict() == {
        "opened": 1,
        "reused": 99,
        "replaced": {},
        "pre_pings": 0,
        "pre_ping_failures": 0,
        "overflow_connections": 0,
    }
    assert (pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()) == (1, 1, 0, 0)


async def test_terminated_backend_is_replaced_and_the_caller_sees_no_error(
    url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    cleanup: None,
) -> None:
    clock = FakeClock()  # never advanced: far under the idle threshold
    engine = warm_async_engine(url, clock=clock)
    async with engine.connect() as conn:
        first = await _backend_pid(conn)
    assert embedded_postgres.terminate(unique_application_name) == 1
    async with engine.connect() as conn:
        second = await _backend_pid(conn)
    assert second != first
    assert embedded_postgres.backend_count(unique_application_name) == 1
    stats = engine.pool.stats  # type: ignore[attr-defined]
    # Back to back: the server's goodbye waiting on the socket (the zero-timeout poll,
    # asyncpg's through its transport's socket) is what triggered the check.
    assert stats.pre_pings == 1
    assert stats.replaced == {"pre_ping_failed": 1}
    assert stats.opened == 2


async def test_two_tasks_at_once_get_two_backends_and_the_separate_one_is_closed(
    url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    cleanup: None,
) -> None:
    engine = warm_async_engine(url)
    both_in = asyncio.Barrier(2)

    async def work() -> int:
        async with engine.connect() as conn:
            pid = await _backend_pid(conn)
            await asyncio.wait_for(both_in.wait(), 10)
            return pid

    pids = await asyncio.gather(work(), work())
    assert len(set(pids)) == 2
    pool = engine.pool
    assert pool.stats.overflow_connections == 1  # type: ignore[attr-defined]
    assert pool.overflow() == 0
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    async with engine.connect() as conn:
        assert await _backend_pid(conn) in pids


def _driver_in_transaction(conn: AsyncConnection) -> bool:
    raw = conn.driver_connection
    if hasattr(raw, "is_in_transaction"):  # asyncpg
        return bool(raw.is_in_transaction())
    return int(raw.info.transaction_status) != 0  # psycopg: IDLE == 0


async def test_exception_mid_transaction_leaves_no_transaction_or_session_state(
    url: str, cleanup: None
) -> None:
    engine = warm_async_engine(url)
    with pytest.raises(RuntimeError):
        async with engine.connect() as conn:
            first = await _backend_pid(conn)
            await conn.execute("SET statement_timeout = 1234")
            await conn.execute("SET application_name = 'leaked'")
            await conn.execute("CREATE TEMP TABLE scratch (x int)")
            await conn.execute("PREPARE leaked AS SELECT 1")
            await conn.execute("SELECT pg_advisory_lock(4242)")
            await conn.execute("LISTEN leaked_channel")
            assert _driver_in_transaction(conn)
            raise RuntimeError("handler failed mid-transaction")
    async with engine.connect() as conn:
        assert not _driver_in_transaction(conn)
        assert await _backend_pid(conn) == first
        row = (
            await conn.execute(
                "SELECT current_setting('statement_timeout'),"
                " current_setting('application_name') <> 'leaked',"
                " (SELECT count(*) FROM pg_prepared_statements WHERE from_sql),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "    AND pid = pg_backend_pid()),"
                " to_regclass('pg_temp.scratch') IS NULL,"
                " (SELECT count(*) FROM pg_listening_channels())"
            )
        ).one()
        assert tuple(row) == ("0", True, 0, 0, True, 0)
    assert engine.pool.stats.opened == 1  # type: ignore[attr-defined]


async def test_committed_session_state_is_discarded(url: str, cleanup: None) -> None:
    engine = warm_async_engine(url)
    async with engine.connect() as conn:
        await conn.execute("SET search_path = pg_catalog")
        await conn.execute("SELECT pg_advisory_lock(7)")
        await conn.commit()
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                "SELECT current_setting('search_path'),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "    AND pid = pg_backend_pid())"
            )
        ).one()
        search_path, advisory_locks = tuple(row)
        assert search_path != "pg_catalog"
        assert advisory_locks == 0


async def test_transaction_pooling_skips_discard_all(url: str, cleanup: None) -> None:
    engine = warm_async_engine(url, transaction_pooling=True)
    assert engine.transaction_pooling
    async with engine.connect() as conn:
        await conn.execute("CREATE TEMP TABLE survives_without_discard (x int)")
        await conn.commit()
    async with engine.connect() as conn:
        table = (
            await conn.execute("SELECT to_regclass('pg_temp.survives_without_discard')")
        ).scalar()
        assert table is not None


# -- prepared statements stay consistent across DISCARD ALL --------------------------------------


async def _driver_level_queries(engine: AsyncEngine, invocations: int) -> None:
    """Queries sent straight to the driver, the way that uses its statement cache."""
    for invocation in range(invocations):
        async with engine.connect() as conn:
            raw = conn.driver_connection
            for i in range(3):
                if engine.driver == "asyncpg":
                    value = await raw.fetchval("SELECT $1::int + 1", i)
                else:
                    cursor = await raw.execute("SELECT %s::int + 1", (i,))
                    value = (await cursor.fetchone())[0]
                assert value == i + 1, invocation
            await conn.commit()


@pytest.mark.parametrize("cache", ["default", "turned_on"])
async def test_driver_statement_cache_stays_consistent_across_discard_all(
    url: str, driver: str, cache: str, cleanup: None
) -> None:
    connect_args: dict[str, Any] = {}
    if cache == "turned_on":
        connect_args = {"statement_cache_size": 100} if driver == "asyncpg" else {}
        connect_args = connect_args or {"prepare_threshold": 0}
    engine = warm_async_engine(url, connect_args=connect_args)
    await _driver_level_queries(engine, 6)
    assert engine.pool.stats.opened == 1  # type: ignore[attr-defined]


async def test_asyncpg_statement_cache_breaks_after_discard_all_without_the_warm_settings(
    embedded_postgres: PostgresServer,
) -> None:
    # The hazard the warm settings avoid: asyncpg keeps a cached statement the server
    # dropped, and the next use fails.
    asyncpg = pytest.importorskip("asyncpg")
    conn = await asyncpg.connect(embedded_postgres.dsn, statement_cache_size=100)
    try:
        assert await conn.fetchval("SELECT $1::int + 1", 1) == 2
        await conn.execute("DISCARD ALL")
        with pytest.raises(asyncpg.exceptions.InvalidSQLStatementNameError):
            await conn.fetchval("SELECT $1::int + 1", 1)
    finally:
        await conn.close()


# -- pre-ping and recycle on an injected clock ---------------------------------------------------


async def test_pre_ping_skipped_under_the_idle_threshold_and_done_over_it(
    url: str, cleanup: None
) -> None:
    clock = FakeClock()
    engine = warm_async_engine(url, pre_ping_idle_seconds=60, clock=clock)
    pings: list[bool] = []

    def on_event(name: str, details: Any) -> None:
        if name == "pre_ping":
            pings.append(details["ok"])

    stats = engine.pool.stats  # type: ignore[attr-defined]
    stats.add_listener(on_event)
    async with engine.connect():
        pass
    for _ in range(5):
        clock.advance(59)  # back-to-back invocations: no round trip
        async with engine.connect() as conn:
            await conn.execute("SELECT 1")
    assert stats.pre_pings == 0
    clock.advance(61)  # frozen longer than the threshold
    async with engine.connect() as conn:
        assert (await conn.execute("SELECT 1")).scalar() == 1
    assert stats.pre_pings == 1
    assert pings == [True]
    assert stats.opened == 1
    assert stats.reused == 6


def _expiring_credentials(pg: PostgresServer, clock: FakeClock) -> Any:
    class ExpiringCredentials:
        """Static password, but each issue is valid for 10 minutes (like a token)."""

        def __init__(self) -> None:
            self.clock = clock
            self.issued = 0

        def get(self) -> Credentials:
            self.issued += 1
            return Credentials(pg.user, pg.password, expires_at=clock() + 600)

        def refresh(self) -> None:
            pass

    return ExpiringCredentials()


async def test_recycle_at_credentials_expiry_with_an_injected_clock(
    embedded_postgres: PostgresServer, unique_application_name: str, driver: str, cleanup: None
) -> None:
    pg = embedded_postgres
    clock = FakeClock()
    provider = _expiring_credentials(pg, clock)
    url = _with_driver(
        f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}",
        driver,
    )
    engine = warm_async_engine(url, credentials=provider)
    async with engine.connect() as conn:
        first = await _backend_pid(conn)
    clock.advance(599)
    async with engine.connect() as conn:
        assert await _backend_pid(conn) == first
    clock.advance(2)
    async with engine.connect() as conn:
        assert await _backend_pid(conn) != first
    assert provider.issued == 2
    assert engine.pool.stats.replaced == {"credentials_expired": 1}  # type: ignore[attr-defined]
    assert pg.wait_for_backend_count(1, unique_application_name) == 1


# -- event loops --------------------------------------------------------------------------------


async def _pid_and_loop(engine: AsyncEngine) -> tuple[int, asyncio.AbstractEventLoop]:
    async with engine.connect() as conn:
        return await _backend_pid(conn), asyncio.get_running_loop()


def test_another_event_loop_never_gets_the_old_loops_connection(
    url: str, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = warm_async_engine(url)
    first_loop = asyncio.new_event_loop()
    second_loop = asyncio.new_event_loop()
    try:
        # One long-lived loop: reused (what samples/async_handler does).
        a1, _ = first_loop.run_until_complete(_pid_and_loop(engine))
        a2, _ = first_loop.run_until_complete(_pid_and_loop(engine))
        assert a1 == a2
        # Another loop, the first one still open but not running: a new connection,
        # and the old one is closed without its loop.
        b1, _ = second_loop.run_until_complete(_pid_and_loop(engine))
        assert b1 != a1
        assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
        b2, _ = second_loop.run_until_complete(_pid_and_loop(engine))
        assert b2 == b1
        # Back on the first loop: it does not get the second loop's connection either.
        a3, _ = first_loop.run_until_complete(_pid_and_loop(engine))
        assert a3 not in (a1, b1)
        assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
        assert engine.pool.stats.replaced == {"other_event_loop": 2}  # type: ignore[attr-defined]
        first_loop.run_until_complete(engine.dispose())
    finally:
        first_loop.close()
        second_loop.close()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_asyncio_run_per_invocation_gets_a_new_connection_each_time_and_leaks_none(
    url: str, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    # asyncio.run() closes its loop at the end: the connection left behind belongs to a
    # closed loop, and must neither be handed out nor stay open on the server.
    engine = warm_async_engine(url)
    pids = []
    for _ in range(3):
        pid, _ = asyncio.run(_pid_and_loop(engine))
        pids.append(pid)
        assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    assert len(set(pids)) == 3
    assert engine.pool.stats.replaced == {"other_event_loop": 2}  # type: ignore[attr-defined]
    engine.dispose_for_shutdown()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def test_connection_of_a_loop_running_in_another_thread_is_not_taken(
    url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    loop_in_thread: asyncio.AbstractEventLoop,
    cleanup: None,
) -> None:
    engine = warm_async_engine(url)
    other = asyncio.run_coroutine_threadsafe(_pid_and_loop(engine), loop_in_thread)
    other_pid, other_loop = other.result(30)
    assert other_loop is loop_in_thread
    mine, my_loop = await _pid_and_loop(engine)
    assert my_loop is asyncio.get_running_loop()
    assert mine != other_pid
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    assert engine.pool.stats.replaced == {"other_event_loop": 1}  # type: ignore[attr-defined]


# -- the pool without an engine -------------------------------------------------------------


async def test_warm_pool_with_an_async_creator_and_no_dialect_is_usable(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    # The generic async dialect: rollback on return, reuse, and DISCARD ALL still run,
    # since the session reset talks to the driver connection itself.
    psycopg = pytest.importorskip("psycopg")

    async def creator() -> Any:
        return await psycopg.AsyncConnection.connect(
            embedded_postgres.dsn, application_name=unique_application_name
        )

    pool = WarmPool(creator)
    seen = set()
    for _ in range(3):
        proxy = await pool.aconnect()
        try:
            cursor = await proxy.driver_connection.execute("SELECT pg_backend_pid()")
            seen.add((await cursor.fetchone())[0])
            await proxy.driver_connection.execute("SET statement_timeout = 777")
        finally:
            await proxy.aclose()
    assert len(seen) == 1
    proxy = await pool.aconnect()
    try:
        cursor = await proxy.driver_connection.execute("SHOW statement_timeout")
        assert (await cursor.fetchone())[0] == "0"
    finally:
        await proxy.aclose()
    await pool.adispose()
    assert pool.stats.as_dict()["reused"] == 3
