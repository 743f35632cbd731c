"""The engines through a real PgBouncer in transaction mode (``default_pool_size=5``).

Transaction pooling lends a server session to a client for one transaction only, so
anything a driver leaves in the session (a server-side prepared statement) is gone, or
belongs to someone else, at the client's next transaction.  psycopg prepares a statement
after its 5th execution on a connection (``prepare_threshold=5``); the engines'
``transaction_pooling`` setting turns that off.  To make the hazard deterministic, a
second client takes the server session the engine just released before the engine's
next transaction (PgBouncer lends the most recently released server first), so every
transaction of the engine runs on another server session than the one before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import create_engine, with_connection
from lambda_pool.asyncio import create_async_engine
from lambda_pool.engine import Connection, Engine
from lambda_pool.testing.pgbouncer import PgBouncer
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import warm_engine

pytestmark = pytest.mark.pgbouncer

STATEMENT = "SELECT %s::int * 2 AS doubled, pg_backend_pid() AS server_pid"
EXECUTIONS = 12  # well past psycopg's prepare threshold of 5


class SessionThief:
    """A second client that grabs the server session the engine released last.

    ``between()`` runs between two transactions of the engine: it gives back the session
    it held (so the pool keeps two sessions in play) and takes the engine's, the most
    recently released one.  The engine's next transaction then gets the other session.
    """

    def __init__(self, bouncer: PgBouncer) -> None:
        self.conn = bouncer.connect()  # prepare_threshold=None: it never prepares

    def release(self) -> None:
        self.conn.commit()

    def take(self) -> None:
        self.conn.execute("SELECT 1")  # opens a transaction: holds its server session

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def thief(pgbouncer: PgBouncer) -> Iterator[SessionThief]:
    thief = SessionThief(pgbouncer)
    yield thief
    thief.close()


def run_interleaved(engine: Engine, thief: SessionThief) -> set[int]:
    """The same statement EXECUTIONS times, one transaction each, on one engine connection;
    returns the server pids it ran on."""
    pids: set[int] = set()
    with engine.connect() as conn:
        for i in range(EXECUTIONS):
            row = conn.execute(STATEMENT, (i,)).one()
            assert row[0] == 2 * i
            pids.add(row[1])
            thief.release()
            conn.commit()
            thief.take()
    thief.release()
    return pids


def test_without_transaction_pooling_psycopg_prepares_and_the_next_server_lacks_it(
    pgbouncer: PgBouncer, thief: SessionThief
) -> None:
    # The hazard the setting exists for: psycopg's default prepare_threshold=5.
    engine = create_engine(pgbouncer.dsn)
    assert engine.transaction_pooling is False
    with pytest.raises(psycopg.errors.InvalidSqlStatementName, match="does not exist"):
        run_interleaved(engine, thief)


@pytest.mark.parametrize("how", ["keyword", "url"])
def test_transaction_pooling_engine_runs_the_same_workload_without_errors(
    pgbouncer: PgBouncer, thief: SessionThief, how: str
) -> None:
    if how == "keyword":
        engine = create_engine(pgbouncer.dsn, transaction_pooling=True)
    else:
        engine = create_engine(pgbouncer.dsn + "?transaction_pooling=true")
    assert engine.transaction_pooling is True
    pids = run_interleaved(engine, thief)
    # The workload did hop between server sessions (else it proves nothing).
    assert len(pids) >= 2
    with engine.connect() as conn:
        assert conn.driver_connection.prepare_threshold is None


def test_warm_engine_with_transaction_pooling_serves_many_invocations(
    pgbouncer: PgBouncer, thief: SessionThief
) -> None:
    engine = warm_engine(pgbouncer.dsn, transaction_pooling=True)
    assert engine.pool.transaction_pooling is True
    pids: set[int] = set()
    for invocation in range(30):
        # One Lambda invocation: the warm connection is reused, the statement repeated.
        with engine.begin() as conn:
            row = conn.execute(STATEMENT, (invocation,)).one()
            assert row[0] == 2 * invocation
            pids.add(row[1])
        thief.release()
        thief.take()
    thief.release()
    assert engine.pool.stats.opened == 1  # one client connection, reused 29 times
    assert engine.pool.stats.reused == 29
    assert len(pids) >= 2
    engine.dispose()


def test_warm_engine_reads_transaction_pooling_from_the_url(pgbouncer: PgBouncer) -> None:
    engine = warm_engine(pgbouncer.dsn + "?transaction_pooling=true")
    assert engine.pool.transaction_pooling is True
    assert engine.transaction_pooling is True
    with engine.connect() as conn:
        assert conn.driver_connection.prepare_threshold is None
    engine.dispose()


@pytest.mark.parametrize("driver", ["postgresql+asyncpg", "postgresql+psycopg"])
async def test_async_engines_with_transaction_pooling_repeat_statements_safely(
    pgbouncer: PgBouncer, driver: str
) -> None:
    import asyncio

    thief = await asyncio.to_thread(SessionThief, pgbouncer)
    engine = create_async_engine(
        pgbouncer.dsn.replace("postgresql://", f"{driver}://"), transaction_pooling=True
    )
    try:
        async with engine.connect() as conn:
            for i in range(EXECUTIONS):
                row = (await conn.execute(STATEMENT, (i,))).one()
                assert row[0] == 2 * i
                await asyncio.to_thread(thief.release)
                await conn.commit()
                await asyncio.to_thread(thief.take)
    finally:
        await asyncio.to_thread(thief.release)
        await asyncio.to_thread(thief.close)


def test_set_local_does_not_leak_to_the_next_client_of_the_server_session(
    pgbouncer: PgBouncer,
) -> None:
    first = create_engine(pgbouncer.dsn, transaction_pooling=True)
    second = create_engine(pgbouncer.dsn, transaction_pooling=True)
    with first.connect() as a, second.connect() as b:
        default = b.execute("SHOW statement_timeout").scalar()
        b.commit()
        with a.begin():
            a.execute("SET LOCAL statement_timeout = '4321ms'")
            assert a.execute("SHOW statement_timeout").scalar() == "4321ms"
            used = a.execute("SELECT pg_backend_pid()").scalar()
        # The server session `a` just released is the next one lent: `b` gets it.
        assert b.execute("SELECT pg_backend_pid()").scalar() == used
        assert b.execute("SHOW statement_timeout").scalar() == default
        b.commit()
        assert a.execute("SHOW statement_timeout").scalar() == default


def test_twenty_concurrent_engine_clients_share_at_most_the_pool_size_of_servers(
    pgbouncer: PgBouncer, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    clients = 20
    url = f"{pgbouncer.dsn}?application_name={unique_application_name}"
    engines = [create_engine(url, transaction_pooling=True) for _ in range(clients)]
    barrier = threading.Barrier(clients)
    pids: list[int] = []
    errors: list[BaseException] = []
    done = threading.Event()
    peaks = {"servers": 0, "clients": 0, "backends": 0}

    def client(engine: Engine) -> None:
        try:
            with engine.connect() as conn:
                barrier.wait(30)
                for i in range(3):
                    row = conn.execute(
                        "SELECT pg_backend_pid(), pg_sleep(0.05), %s::int", (i,)
                    ).one()
                    pids.append(row[0])
                    conn.commit()
        except BaseException as exc:  # reported below
            errors.append(exc)

    def monitor() -> None:
        while not done.is_set():
            stats = pgbouncer.pool_stats()
            servers = sum(stats.get(k, 0) for k in ("sv_active", "sv_idle", "sv_used", "sv_login"))
            peaks["servers"] = max(peaks["servers"], servers)
            peaks["clients"] = max(peaks["clients"], stats["cl_active"] + stats["cl_waiting"])
            backends = embedded_postgres.backend_count(unique_application_name)
            peaks["backends"] = max(peaks["backends"], backends)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=client, args=(engine,)) for engine in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    done.set()
    watcher.join(30)

    assert not errors, errors
    assert len(pids) == clients * 3
    limit = pgbouncer.default_pool_size
    assert len(set(pids)) <= limit
    assert 1 <= peaks["servers"] <= limit
    assert peaks["clients"] >= clients  # they really were connected at the same time
    assert peaks["backends"] <= limit


@pytest.mark.parametrize("warm", ["1", "0"])
def test_the_decorator_behind_pgbouncer_needs_only_the_environment_setting(
    pgbouncer: PgBouncer,
    thief: SessionThief,
    lambda_context: Any,
    monkeypatch: pytest.MonkeyPatch,
    warm: str,
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", pgbouncer.dsn)
    monkeypatch.setenv("LAMBDA_POOL_TRANSACTION_POOLING", "1")
    monkeypatch.setenv("LAMBDA_POOL_WARM", warm)
    for name in ("LAMBDA_POOL_AUTH", "LAMBDA_POOL_SECRET_ARN"):
        monkeypatch.delenv(name, raising=False)

    @with_connection()
    def handler(event: dict[str, int], context: Any, connection: Connection) -> list[int]:
        # One transaction per statement, the session thief between them: each runs on
        # another server session than the one before, past psycopg's prepare threshold.
        doubled = []
        for i in range(EXECUTIONS):
            doubled.append(connection.execute(STATEMENT, (i,)).one()[0])
            thief.release()
            connection.commit()
            thief.take()
        return doubled

    results = [handler({}, lambda_context()) for _ in range(2)]
    thief.release()

    assert results == [[2 * i for i in range(EXECUTIONS)]] * 2
    assert handler.engine.transaction_pooling is True  # type: ignore[attr-defined]
    if warm == "1":
        assert handler.engine.pool.transaction_pooling is True  # type: ignore[attr-defined]
