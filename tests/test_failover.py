"""Failover hygiene against a real PostgreSQL: a warm connection that lands on a read-only
server (SQLSTATE 25006, the old writer after an Aurora failover) is discarded, so the next
invocation reconnects (and resolves the endpoint again); an asyncpg connection whose
backend is killed mid-query is classified as lost, whatever asyncpg's error says.

The read-only server is a dedicated throw-away cluster put in read-only mode with
``ALTER SYSTEM SET default_transaction_read_only = on`` and a reload: open sessions see
it at once, exactly like sessions on a demoted writer.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import lifecycle, warm_async_engine, warm_engine, with_connection
from lambda_pool.dialects.asyncpg import AsyncpgDialect
from lambda_pool.dialects.psycopg import psycopg_is_disconnect
from lambda_pool.engine import Connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import EmbeddedPostgres, PostgresServer


@pytest.fixture(scope="module")
def failover_server() -> Iterator[EmbeddedPostgres]:
    """A server of its own: ALTER SYSTEM changes every session on it."""
    with EmbeddedPostgres(ssl=False) as server:
        yield server


def _set_read_only(server: PostgresServer, on: bool) -> None:
    with server.admin_connect() as admin:
        admin.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        admin.execute("SELECT pg_reload_conf()")
    # The reload reaches each backend at its next command; wait until a new session
    # sees the new value so the test does not race the postmaster's SIGHUP.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with psycopg.connect(server.dsn, autocommit=True) as probe:
            row = probe.execute("SHOW default_transaction_read_only").fetchone()
        if row is not None and row[0] == ("on" if on else "off"):
            return
        time.sleep(0.05)
    raise AssertionError("the server did not apply default_transaction_read_only")


@pytest.fixture
def read_only(failover_server: EmbeddedPostgres) -> Iterator[Callable[[bool], None]]:
    """Switch the server between read-only and read-write; read-write again afterwards."""
    yield lambda on: _set_read_only(failover_server, on)
    _set_read_only(failover_server, False)


@pytest.fixture
def table(failover_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"failover_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(failover_server.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY)")
    yield name
    with psycopg.connect(failover_server.dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.fixture
def application_name() -> str:
    """This test's own application_name, to count its backends."""
    return f"lpt_failover_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def url(failover_server: EmbeddedPostgres, application_name: str) -> Iterator[str]:
    yield failover_server.dsn_for(
        failover_server.user, failover_server.password, application_name=application_name
    )
    lifecycle.dispose_all()


def _rows(server: PostgresServer, table: str) -> list[int]:
    """The table as another connection sees it: what was committed, nothing else."""
    with psycopg.connect(server.dsn) as conn:
        return [int(row[0]) for row in conn.execute(f"SELECT id FROM {table} ORDER BY id")]


def test_handler_replaces_the_warm_connection_after_a_write_on_a_read_only_server(
    failover_server: EmbeddedPostgres,
    url: str,
    table: str,
    read_only: Callable[[bool], None],
    application_name: str,
) -> None:
    pids: list[int] = []

    @with_connection(url, warm=True)
    def handler(event: Any, context: Any, connection: Connection) -> int:
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pids.append(int(row[0]))
        connection.execute(f"INSERT INTO {table} VALUES (%s)", (event["id"],))
        return int(row[0])

    handler({"id": 1}, LambdaContext(remaining_ms=5000))
    read_only(True)
    for attempt in range(3):
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as raised:
            handler({"id": 10 + attempt}, LambdaContext(remaining_ms=5000))
        # The driver's own error, not a wrapper: what the handler would catch.
        assert type(raised.value) is psycopg.errors.ReadOnlySqlTransaction
        assert raised.value.sqlstate == "25006"
    read_only(False)
    handler({"id": 2}, LambdaContext(remaining_ms=5000))

    # The warm backend meets the read-only server once; before the fix the same
    # backend failed three times in a row, now each later invocation has a new one.
    assert pids[1] == pids[0]
    assert len(set(pids[1:5])) == 4, pids
    assert _rows(failover_server, table) == [1, 2]
    assert failover_server.backend_count(application_name) == 1


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_warm_engine_reconnects_after_a_write_on_a_read_only_server(
    failover_server: EmbeddedPostgres,
    url: str,
    table: str,
    read_only: Callable[[bool], None],
    driver: str,
) -> None:
    pytest.importorskip(driver)
    engine = warm_async_engine(url.replace("postgresql://", f"postgresql+{driver}://", 1))

    async def invocation(row_id: int) -> tuple[int, BaseException | None]:
        conn = await engine.connect()
        pid = -1
        try:
            pid = int((await conn.execute("SELECT pg_backend_pid()")).fetchone()[0])  # type: ignore[index]
            await conn.execute(f"INSERT INTO {table} VALUES (%s)", (row_id,))
            await conn.commit()
            return pid, None
        except Exception as exc:
            assert conn.invalidated, f"{exc!r} did not invalidate the connection"
            return pid, exc
        finally:
            await conn.close()

    async def scenario() -> list[tuple[int, BaseException | None]]:
        outcomes = [await invocation(1)]
        await asyncio.to_thread(read_only, True)
        outcomes += [await invocation(10 + n) for n in range(3)]
        await asyncio.to_thread(read_only, False)
        outcomes.append(await invocation(2))
        await engine.dispose()
        return outcomes

    outcomes = asyncio.run(scenario())
    failed = outcomes[1:4]
    assert all(getattr(error, "sqlstate", None) == "25006" for _, error in failed), outcomes
    assert outcomes[0][1] is None and outcomes[4][1] is None
    assert len({pid for pid, _ in failed}) == 3, outcomes
    assert _rows(failover_server, table) == [1, 2]


def test_warm_engine_outside_the_decorator_reconnects_after_25006(
    failover_server: EmbeddedPostgres, url: str, read_only: Callable[[bool], None]
) -> None:
    engine = warm_engine(url)
    with engine.connect() as conn:
        before = conn.execute("SELECT pg_backend_pid()").fetchone()
    read_only(True)
    with engine.connect() as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("CREATE TEMP TABLE t_failover (x int)")
        assert conn.invalidated
    with engine.connect() as conn:
        after = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert before != after


def test_sqlalchemy_adapter_drops_the_connection_after_25006(
    failover_server: EmbeddedPostgres, url: str, table: str, read_only: Callable[[bool], None]
) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from lambda_pool.sqlalchemy import create_engine

    engine = create_engine(url, warm=True)
    try:
        with engine.connect() as conn:
            first = conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar()
        read_only(True)
        pids = []
        for n in range(3):
            with pytest.raises(sqlalchemy.exc.InternalError) as raised, engine.begin() as conn:
                pids.append(conn.execute(sqlalchemy.text("SELECT pg_backend_pid()")).scalar())
                conn.execute(sqlalchemy.text(f"INSERT INTO {table} VALUES ({n})"))
            assert raised.value.connection_invalidated
            assert isinstance(raised.value.orig, psycopg.errors.ReadOnlySqlTransaction)
        assert pids[0] == first and len(set(pids)) == 3  # a new backend after each failure
        assert _rows(failover_server, table) == []
    finally:
        engine.dispose()


def test_read_only_error_is_a_disconnect_but_other_internal_errors_are_not(
    failover_server: EmbeddedPostgres,
) -> None:
    with psycopg.connect(failover_server.dsn) as conn:
        conn.execute("SET TRANSACTION READ ONLY")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as read_only_error:
            conn.execute("CREATE TEMP TABLE t_ro (x int)")
        conn.rollback()
        with pytest.raises(psycopg.errors.DivisionByZero) as data_error:
            conn.execute("SELECT 1 / 0")
        conn.rollback()
        # A live connection: the answer comes from the error, not from a closed socket.
        assert psycopg_is_disconnect(read_only_error.value, conn)
        assert not psycopg_is_disconnect(data_error.value, conn)


def test_asyncpg_internal_client_error_counts_as_lost_and_says_so(
    failover_server: EmbeddedPostgres,
) -> None:
    asyncpg = pytest.importorskip("asyncpg")

    async def classify() -> tuple[bool, bool, list[str]]:
        conn = await asyncpg.connect(failover_server.dsn)
        try:
            error = asyncpg.exceptions.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            )
            dialect = AsyncpgDialect()
            # Live and open: before the fix only a closed connection counted.
            lost = dialect.is_disconnect(error, conn)
            again = dialect.is_disconnect(error, conn)
            return lost, again and not conn.is_closed(), list(getattr(error, "__notes__", []))
        finally:
            await conn.close()

    lost, again, notes = asyncio.run(classify())
    assert lost and again
    assert len(notes) == 1  # classified twice, noted once
    assert "connection was lost" in notes[0]


def test_asyncpg_backend_killed_mid_query_is_always_a_lost_connection(
    failover_server: EmbeddedPostgres, url: str
) -> None:
    """pg_terminate_backend at a random moment of a running asyncpg invocation, until
    asyncpg's InternalClientError ("cannot switch to state ...") shows (bounded): every
    failure invalidates the connection, the next invocation gets a new backend, and the
    InternalClientError carries the note that the connection was lost."""
    pytest.importorskip("asyncpg")
    engine = warm_async_engine(url.replace("postgresql://", "postgresql+asyncpg://", 1))
    rng = random.Random(7)
    seen: dict[str, int] = {}
    internal_notes: list[list[str]] = []

    async def run() -> None:
        with failover_server.admin_connect() as admin:
            for _ in range(150):
                conn = await engine.connect()
                try:
                    pid = int((await conn.execute("SELECT pg_backend_pid()")).fetchone()[0])  # type: ignore[index]

                    async def kill(victim: int = pid) -> None:
                        await asyncio.sleep(rng.uniform(0, 0.02))
                        await asyncio.to_thread(
                            admin.execute, "SELECT pg_terminate_backend(%s)", (victim,)
                        )

                    killer = asyncio.create_task(kill())
                    try:
                        for _ in range(5):
                            await conn.execute("SELECT count(*) FROM generate_series(1, 20000)")
                    except Exception as exc:
                        name = type(exc).__name__
                        seen[name] = seen.get(name, 0) + 1
                        assert conn.invalidated, f"{name} did not invalidate: {exc}"
                        if name == "InternalClientError":
                            internal_notes.append(list(getattr(exc, "__notes__", [])))
                    await killer
                finally:
                    await conn.close()
                if internal_notes:
                    break
            conn = await engine.connect()
            try:
                assert (await conn.execute("SELECT 1")).fetchone() == (1,)
            finally:
                await conn.close()
        await engine.dispose()

    asyncio.run(run())
    assert sum(seen.values()) > 0, "no kill landed mid-query"
    for notes in internal_notes:
        assert any("connection was lost" in note for note in notes)


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_target_session_attrs_read_write_refuses_a_read_only_server_at_connect(
    failover_server: EmbeddedPostgres, url: str, read_only: Callable[[bool], None], driver: str
) -> None:
    """What docs/deploy.md recommends for writer endpoints: the connect itself refuses the
    demoted writer, before the handler did any work."""
    pytest.importorskip(driver)
    from lambda_pool.asyncio import create_async_engine

    writer_url = url.replace("postgresql://", f"postgresql+{driver}://", 1)
    engine = create_async_engine(writer_url + "&target_session_attrs=read-write")

    async def select_one() -> Any:
        async with engine.connect() as conn:
            return (await conn.execute("SELECT 1")).fetchone()

    async def scenario() -> tuple[Any, BaseException | None]:
        writable = await select_one()
        await asyncio.to_thread(read_only, True)
        try:
            await select_one()
        except Exception as exc:
            return writable, exc
        finally:
            await engine.dispose()
        return writable, None

    writable, refused = asyncio.run(scenario())
    assert writable == (1,)
    assert refused is not None
    assert type(refused).__name__ in ("OperationalError", "TargetServerAttributeNotMatched")
    assert "read-only" in str(refused) or "read-write" in str(refused)
