"""Every code example of the pooling reference, with only the imports changed.

``sqlalchemy`` → ``lambda_pool``, ``sqlalchemy.pool`` → ``lambda_pool.pool``,
``sqlalchemy.ext.asyncio`` → ``lambda_pool.asyncio``.  ``"postgresql://user:pass@
localhost/db"`` and ``url`` are the embedded server's URL (with a unique
``application_name`` so backends can be counted in ``pg_stat_activity``); SQLite
files live in a temporary directory.  Each test then checks what the page claims.
Where our default differs (``create_engine(url)`` is ``NullPool``), the test says so.
"""

from __future__ import annotations

import builtins
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lambda_pool import create_engine, event
from lambda_pool.exc import TimeoutError as PoolTimeoutError
from lambda_pool.pool import AsyncAdaptedQueuePool, NullPool, QueuePool, SingletonThreadPool
from lambda_pool.testing.postgres import PostgresServer


@pytest.fixture
def url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return f"{embedded_postgres.dsn}?application_name={unique_application_name}"


@pytest.fixture
def backends(embedded_postgres: PostgresServer, unique_application_name: str) -> Any:
    """``backends()`` now; ``backends(wait_for=n)`` polls until the count settles at n."""

    def count(wait_for: int | None = None) -> int:
        if wait_for is None:
            return embedded_postgres.backend_count(unique_application_name)
        return embedded_postgres.wait_for_backend_count(wait_for, unique_application_name)

    return count


def _pid(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute("SELECT pg_backend_pid()").scalar())


# --------------------------------------------------------------------------- Pool Types


def test_queuepool_example(url: str, backends: Any) -> None:
    from lambda_pool import create_engine

    engine = create_engine(
        url,
        pool_size=10,  # Persistent connections
        max_overflow=20,  # Additional connections when pool exhausted
        pool_timeout=30,  # Timeout waiting for connection
        pool_recycle=3600,  # Recycle connections after 1 hour
        pool_pre_ping=True,  # Test connections before using
    )
    assert type(engine.pool) is QueuePool
    assert engine.pool.size() == 10 and engine.pool.timeout() == 30
    first = _pid(engine)
    assert _pid(engine) == first  # persistent: the same backend serves both
    assert backends() == 1
    engine.dispose()
    assert backends(wait_for=0) == 0


def test_queuepool_documented_defaults(url: str, backends: Any) -> None:
    # pool_size 5, max_overflow 10, pool_timeout 30.0, pool_recycle -1, pre_ping False.
    engine = create_engine(url, poolclass=QueuePool)
    assert engine.pool.size() == 5
    assert engine.pool.timeout() == 30.0
    held = [engine.connect() for _ in range(15)]
    assert engine.pool.overflow() == 10 and engine.pool.checkedout() == 15
    for conn in held:
        conn.close()
    assert engine.pool.checkedin() == 5  # only pool_size connections are kept
    assert backends(wait_for=5) == 5
    engine.dispose()
    assert backends(wait_for=0) == 0


def test_nullpool_example(url: str, backends: Any) -> None:
    from lambda_pool.pool import NullPool

    engine = create_engine(url, poolclass=NullPool)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
        assert backends() == 1
    assert backends(wait_for=0) == 0  # no pooling: closed on return


def test_staticpool_example() -> None:
    from lambda_pool.pool import StaticPool

    engine = create_engine("sqlite:///:memory:", poolclass=StaticPool)
    with engine.connect() as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
        first = conn.driver_connection
    with engine.connect() as conn:
        assert conn.driver_connection is first  # a single connection for all requests
        assert conn.execute("SELECT a FROM t").all() == [(1,)]


def test_singletonthreadpool_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # sqlite:///database.db is relative to the working directory
    from lambda_pool.pool import SingletonThreadPool

    engine = create_engine("sqlite:///database.db", poolclass=SingletonThreadPool)
    with engine.connect() as conn:
        mine = conn.driver_connection
    with engine.connect() as conn:
        assert conn.driver_connection is mine  # one connection per thread
    other: list[Any] = []

    def in_thread() -> None:
        with engine.connect() as conn:
            other.append(conn.driver_connection)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert other[0] is not mine
    assert (tmp_path / "database.db").exists()
    engine.dispose()


async def test_asyncadaptedqueuepool_example(
    embedded_postgres: PostgresServer, unique_application_name: str, backends: Any
) -> None:
    from lambda_pool.asyncio import create_async_engine

    engine = create_async_engine(
        embedded_postgres.dsn.replace("postgresql://", "postgresql+asyncpg://")
        + f"?application_name={unique_application_name}",
        pool_size=10,
        max_overflow=20,
    )
    assert type(engine.pool) is AsyncAdaptedQueuePool
    async with engine.connect() as conn:
        assert (await conn.execute("SELECT 1")).scalar() == 1
    assert engine.pool.checkedin() == 1  # kept for the next checkout
    await engine.dispose()
    assert backends(wait_for=0) == 0


# --------------------------------------------------------------------------- Pool Configuration


def test_pool_pre_ping_example(url: str) -> None:
    engine = create_engine(
        url,
        pool_pre_ping=True,  # SELECT 1 before each checkout
    )
    # ours: without sizing keywords the pool stays NullPool, whose connections are new at
    # every checkout and need no ping; test_stale_connections_example shows the ping.
    assert type(engine.pool) is NullPool
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1


def test_pool_recycle_example(url: str) -> None:
    engine = create_engine(
        url,
        pool_recycle=3600,  # Recycle after 1 hour
    )
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1
    # With a kept connection: younger than pool_recycle is reused, older is replaced.
    young = create_engine(url, pool_size=1, pool_recycle=3600)
    assert _pid(young) == _pid(young)
    old = create_engine(url, pool_size=1, pool_recycle=0)
    assert _pid(old) != _pid(old)
    young.dispose()
    old.dispose()


def test_pool_reset_on_return_example(url: str) -> None:
    from lambda_pool.pool import PoolResetState

    engine = create_engine(
        url,
        pool_reset_on_return="rollback",  # rollback, commit, or None
    )
    states: list[Any] = []
    event.listen(engine, "reset", lambda dbapi, record, state: states.append(state))
    with engine.connect() as conn:
        conn.execute("CREATE TABLE reset_on_return_example (a int)")
    assert isinstance(states[0], PoolResetState)
    with engine.connect() as conn:  # the CREATE TABLE was rolled back on return
        assert conn.execute("SELECT to_regclass('reset_on_return_example')").scalar() is None
    committing = create_engine(url, pool_reset_on_return="commit")
    with committing.connect() as conn:  # a Connection rolls back its own transaction
        conn.execute("CREATE TABLE reset_on_return_commit (a int)")
    with committing.connect() as conn:
        assert conn.execute("SELECT to_regclass('reset_on_return_commit')").scalar() is None
    raw = committing.raw_connection()  # the pool's own connection: committed on return
    cursor = raw.cursor()
    cursor.execute("CREATE TABLE reset_on_return_commit (a int)")
    cursor.close()
    raw.close()
    with committing.connect() as conn:
        conn.execute("DROP TABLE reset_on_return_commit")  # it exists: commit on return
        conn.commit()


def test_pool_size_example(url: str) -> None:
    engine = create_engine(url, pool_size=20)
    assert type(engine.pool) is QueuePool and engine.pool.size() == 20


def test_max_overflow_example(url: str, backends: Any) -> None:
    engine = create_engine(
        url,
        pool_size=10,
        max_overflow=30,  # Max 40 total connections
    )
    held = [engine.connect() for _ in range(40)]
    assert engine.pool.checkedout() == 40 and engine.pool.overflow() == 30
    assert backends() == 40
    for conn in held:
        conn.close()
    assert engine.pool.checkedin() == 10
    engine.dispose()
    assert backends(wait_for=0) == 0


def test_pool_timeout_example(url: str) -> None:
    engine = create_engine(
        url,
        pool_timeout=60,  # Wait up to 60 seconds
    )
    assert type(engine.pool) is QueuePool and engine.pool.timeout() == 60


# --------------------------------------------------------------------------- Pool Methods


def test_engine_pool_access_example(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_engine(url)

    # Get pool instance
    pool = engine.pool

    # Pool statistics
    print(pool.size())  # Current pool size
    print(pool.checkedin())  # Checked in connections
    print(pool.checkedout())  # Checked out connections
    print(pool.overflow())  # Overflow connections

    # Dispose of pool
    engine.dispose()

    # ours: the default NullPool keeps nothing, so every figure is 0.
    assert capsys.readouterr().out.split() == ["0", "0", "0", "0"]
    assert engine.pool is not pool


def test_pool_events_example(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lambda_pool import event

    engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def receive_connect(dbapi_conn: Any, connection_record: Any) -> None:
        print(f"New connection: {dbapi_conn}")

    @event.listens_for(engine, "checkout")
    def receive_checkout(dbapi_conn: Any, connection_record: Any, connection_proxy: Any) -> None:
        print("Connection checked out")

    @event.listens_for(engine, "checkin")
    def receive_checkin(dbapi_conn: Any, connection_record: Any) -> None:
        print("Connection returned to pool")

    @event.listens_for(engine, "close")
    def receive_close(dbapi_conn: Any, connection_record: Any) -> None:
        print("Connection closed")

    @event.listens_for(engine, "detach")
    def receive_detach(dbapi_conn: Any, connection_record: Any) -> None:
        print("Connection detached from pool")

    @event.listens_for(engine, "close_detached")
    def receive_close_detached(dbapi_conn: Any) -> None:
        print("Detached connection closed")

    with engine.connect() as conn:
        conn.execute("SELECT 1")
    raw = engine.raw_connection()
    raw.detach()
    raw.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("New connection: <psycopg.Connection")
    assert lines[1:4] == [
        "Connection checked out",
        "Connection returned to pool",
        "Connection closed",
    ]
    assert lines[4].startswith("New connection:")
    assert lines[5:] == [
        "Connection checked out",
        "Connection detached from pool",
        "Detached connection closed",
    ]


# --------------------------------------------------------------------------- Pool Monitoring


def test_pool_statistics_example(
    url: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    from lambda_pool import create_engine, event

    caplog.set_level(logging.DEBUG, logger="lambda_pool.pool")
    engine = create_engine(url, echo_pool=True)

    # Monitor pool events
    @event.listens_for(engine, "checkout")
    def receive_checkout(dbapi_conn: Any, connection_record: Any, connection_proxy: Any) -> None:
        pool = engine.pool
        print(f"Pool size: {pool.size()}")
        print(f"Checked in: {pool.checkedin()}")
        print(f"Checked out: {pool.checkedout()}")
        print(f"Overflow: {pool.overflow()}")

    with engine.connect() as conn:
        conn.execute("SELECT 1")
    out = capsys.readouterr().out
    for line in ("Pool size: 0", "Checked in: 0", "Checked out: 1", "Overflow: 0"):
        assert line in out
    pool_records = [r for r in caplog.records if r.name.startswith("lambda_pool.pool")]
    assert pool_records, "echo_pool=True logs through the 'lambda_pool.pool' logger"


def test_connection_info_example(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    engine = create_engine(url, pool_size=1)

    @event.listens_for(engine, "connect")
    def receive_connect(dbapi_conn: Any, connection_record: Any) -> None:
        # connection_record.info is a dict for storing metadata
        connection_record.info["created_at"] = time.time()

    @event.listens_for(engine, "checkout")
    def receive_checkout(dbapi_conn: Any, connection_record: Any, connection_proxy: Any) -> None:
        created_at = connection_record.info.get("created_at")
        if created_at:
            age = time.time() - created_at
            print(f"Connection age: {age} seconds")

    for _ in range(2):
        with engine.connect() as conn:
            conn.execute("SELECT 1")
    assert capsys.readouterr().out.count("Connection age: ") == 2
    engine.dispose()


# --------------------------------------------------------------------------- Common Patterns


def test_serverless_example(url: str, backends: Any) -> None:
    # AWS Lambda, Google Cloud Functions, etc.
    from lambda_pool.pool import NullPool

    engine = create_engine(
        url,
        poolclass=NullPool,  # No persistent connections
    )
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert backends(wait_for=0) == 0


def test_nullpool_is_the_default_counted_in_pg_stat_activity(url: str, backends: Any) -> None:
    engine = create_engine(url)
    for _ in range(3):
        with engine.connect() as conn:
            conn.execute("SELECT 1")
            assert backends() == 1
        assert backends(wait_for=0) == 0


def test_best_practice_pool_size(url: str) -> None:
    engine = create_engine(
        url,
        pool_size=10,  # Based on expected concurrent users
        max_overflow=20,  # Handle traffic spikes
    )
    assert type(engine.pool) is QueuePool and engine.pool.size() == 10


def test_best_practice_pre_ping(url: str) -> None:
    engine = create_engine(
        url,
        pool_pre_ping=True,  # Detect stale connections
    )
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1


def test_best_practice_recycle(url: str) -> None:
    engine = create_engine(
        url,
        pool_recycle=3600,  # Recycle every hour
    )
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1


def test_best_practice_timeouts(url: str) -> None:
    engine = create_engine(
        url,
        pool_timeout=30,  # Fail fast if pool exhausted
    )
    assert type(engine.pool) is QueuePool and engine.pool.timeout() == 30


def test_disposing_example(url: str, backends: Any) -> None:
    engine = create_engine(url, pool_size=2)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert backends() == 1

    # Application shutdown
    engine.dispose()
    assert backends(wait_for=0) == 0

    # Force reconnect
    old_pool = engine.pool
    engine.dispose()
    conn = engine.connect()  # Creates new pool
    assert engine.pool is not old_pool
    assert conn.execute("SELECT 1").scalar() == 1
    assert engine.pool.checkedout() == 1 and old_pool.checkedout() == 0
    conn.close()
    engine.dispose()
    assert backends(wait_for=0) == 0


# --------------------------------------------------------------------------- Troubleshooting


def test_pool_exhaustion_timeout_error(url: str) -> None:
    engine = create_engine(url, pool_size=1, max_overflow=0, pool_timeout=0.1)
    held = engine.connect()
    with pytest.raises(PoolTimeoutError) as info:
        engine.connect()
    assert isinstance(info.value, builtins.TimeoutError)
    assert str(info.value) == (
        "QueuePool limit of size 1 overflow 0 reached, connection timed out, timeout 0.10"
    )
    held.close()
    engine.connect().close()  # closing the held connection made room
    engine.dispose()


def test_stale_connections_example(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    # Enable pre-ping to detect stale connections
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_recycle=3600,
    )
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    # ours: NullPool by default, so no connection can go stale. With a kept connection,
    # the ping finds the terminated backend and replaces it without an error:
    pooled = create_engine(url, pool_size=1, pool_pre_ping=True, pool_recycle=3600)
    first = _pid(pooled)
    embedded_postgres.terminate(unique_application_name)
    assert _pid(pooled) != first
    pooled.dispose()


def test_memory_leaks_example(url: str, backends: Any) -> None:
    engine = create_engine(url, pool_size=1)
    stmt = "SELECT 1"

    # Use context managers (recommended)
    with engine.connect() as conn:
        result = conn.execute(stmt)
    assert engine.pool.checkedout() == 0

    # Or explicit close
    conn = engine.connect()
    try:
        result = conn.execute(stmt)
    finally:
        conn.close()
    assert engine.pool.checkedout() == 0
    assert result.scalar() == 1  # results are buffered: readable after close
    engine.dispose()
    assert backends(wait_for=0) == 0


def test_singletonthreadpool_is_what_in_memory_sqlite_gets_by_default() -> None:
    # Silent on the page; SQLAlchemy's behaviour, and ours (see dialects/sqlite.py).
    assert type(create_engine("sqlite://").pool) is SingletonThreadPool
