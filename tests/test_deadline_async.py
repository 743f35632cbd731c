"""A network black hole cannot hold asyncio database work past its deadline (issue 7 §1),
on psycopg's ``AsyncConnection`` and on asyncpg.

An async Lambda handler runs its coroutine inside the blocking handler; here each test
runs one event loop for all its "invocations" (as ``samples/async_handler`` keeps one
loop per container), bounds each with ``lambda_pool.deadline(remaining - margin)`` and
makes the network a black hole at one step through ``lp_fault_proxy``.  Checked as in
tests/test_deadline_sync.py: the step in the error, the time against the deadline, the
write all or nothing (read from another connection), the backend gone once the network
heals, the next invocation working at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from deadline_support import Scene, Stopwatch, insert_sql, scene

from lambda_pool import deadline, exc
from lambda_pool.asyncio import AsyncEngine, create_async_engine
from lambda_pool.warm import warm_async_engine

__all__ = ["scene"]  # the fixture, imported for pytest

REMAINING = 2.0
MARGIN = 0.3
ROWS = 5

DRIVERS = [
    pytest.param("postgresql", id="psycopg_async"),
    pytest.param("postgresql+asyncpg", id="asyncpg"),
]


@pytest.fixture(params=DRIVERS)
def scheme(request: pytest.FixtureRequest) -> str:
    if request.param.endswith("asyncpg"):
        pytest.importorskip("asyncpg")
    return str(request.param)


async def _invoke(work: Callable[[], Awaitable[Any]]) -> Any:
    """One invocation: ``work`` under the deadline Lambda's remaining time would give."""
    with deadline(REMAINING - MARGIN):
        return await work()


async def _fails_by_the_deadline(work: Callable[[], Awaitable[Any]], step: str) -> None:
    watch = Stopwatch()
    with pytest.raises(exc.DeadlineExceededError) as caught:
        await _invoke(work)
    elapsed = watch.seconds()
    assert caught.value.step == step
    assert elapsed < REMAINING, f"{step}: {elapsed:.3f} s"
    assert 0 <= caught.value.remaining_ms <= (REMAINING - MARGIN) * 1000


async def _write(engine: AsyncEngine, scene: Scene, first: int, then: str = "") -> int:
    async with engine.connect() as conn:
        await conn.execute(insert_sql(scene.table, first, ROWS))
        if then == "sleep":
            await conn.execute("SELECT pg_sleep(5)")
        if then == "hole_before_commit":
            scene.proxy.black_hole()
        await conn.commit()
        if then == "commit_then_hole":
            scene.proxy.black_hole()
    return ROWS


async def _select(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        row = (await conn.execute("SELECT 1")).fetchone()
    assert row is not None
    return int(row[0])


async def _recovers(scene: Scene, engine: AsyncEngine, rows_before: int) -> None:
    # Off the loop: the helpers connect with blocking psycopg.
    await asyncio.to_thread(scene.heal_and_check_gone)
    watch = Stopwatch()
    assert await _invoke(lambda: _write(engine, scene, 1000)) == ROWS
    assert watch.seconds() < REMAINING
    assert await asyncio.to_thread(scene.rows) == rows_before + ROWS


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


def test_idle_past_the_pre_ping_threshold_then_black_hole_fails_in_the_pre_ping(
    scene: Scene, scheme: str
) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme), pre_ping_idle_seconds=0.2)
        assert await _invoke(lambda: _select(engine)) == 1
        await asyncio.sleep(0.4)
        scene.proxy.black_hole()
        await _fails_by_the_deadline(lambda: _write(engine, scene, 1), "pre-ping")
        assert engine.pool.stats.pre_ping_failures == 1  # type: ignore[attr-defined]
        assert await asyncio.to_thread(scene.rows) == 0
        await _recovers(scene, engine, 0)
        await engine.dispose()

    _run(scenario)


def test_back_to_back_then_black_hole_fails_in_the_first_statement(
    scene: Scene, scheme: str
) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme))
        assert await _invoke(lambda: _write(engine, scene, 1)) == ROWS
        scene.proxy.black_hole()
        await _fails_by_the_deadline(lambda: _write(engine, scene, 100), "statement")
        # Nothing left running on the loop (asyncpg's cancel request task included):
        # Lambda freezes the process once the invocation returns.
        assert asyncio.all_tasks() == {asyncio.current_task()}
        assert await asyncio.to_thread(scene.rows) == ROWS
        await _recovers(scene, engine, ROWS)
        await engine.dispose()

    _run(scenario)


# What users set hoping to bound a silent network; none of it bounds a black hole that
# keeps TCP up (the fourth row).
SOCKET_OPTIONS = {
    "postgresql": {
        "connect_timeout": 2,
        "keepalives": 1,
        "keepalives_idle": 1,
        "keepalives_interval": 1,
        "keepalives_count": 1,
        "tcp_user_timeout": 1000,
    },
    "postgresql+asyncpg": {"timeout": 30, "command_timeout": 60},
}


def test_driver_timeouts_in_connect_args_do_not_change_the_bound(scene: Scene, scheme: str) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme), connect_args=SOCKET_OPTIONS[scheme])
        assert await _invoke(lambda: _write(engine, scene, 1)) == ROWS
        handle = asyncio.get_running_loop().call_later(0.3, scene.proxy.black_hole)
        try:
            await _fails_by_the_deadline(lambda: _write(engine, scene, 100, "sleep"), "statement")
        finally:
            handle.cancel()
        await asyncio.to_thread(scene.heal_and_check_gone)
        assert await asyncio.to_thread(scene.rows) == ROWS
        await _recovers(scene, engine, ROWS)
        await engine.dispose()

    _run(scenario)


def test_black_hole_during_a_running_query_fails_the_statement_and_writes_nothing(
    scene: Scene, scheme: str
) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme))
        assert await _invoke(lambda: _select(engine)) == 1
        handle = asyncio.get_running_loop().call_later(0.3, scene.proxy.black_hole)
        try:
            await _fails_by_the_deadline(lambda: _write(engine, scene, 1, "sleep"), "statement")
        finally:
            handle.cancel()
        await asyncio.to_thread(scene.heal_and_check_gone)
        assert await asyncio.to_thread(scene.rows) == 0
        await _recovers(scene, engine, 0)
        await engine.dispose()

    _run(scenario)


@pytest.mark.parametrize("warm", [False, True], ids=["nullpool", "warm_first_connect"])
def test_a_new_connect_into_a_black_hole_fails_in_connect(
    scene: Scene, scheme: str, warm: bool
) -> None:
    async def scenario() -> None:
        url = scene.url(scheme)
        engine = warm_async_engine(url) if warm else create_async_engine(url)
        scene.proxy.black_hole()
        await _fails_by_the_deadline(lambda: _write(engine, scene, 1), "connect")
        assert await asyncio.to_thread(scene.rows) == 0
        await _recovers(scene, engine, 0)
        await engine.dispose()

    _run(scenario)


def test_black_hole_at_commit_fails_the_commit_and_the_write_is_all_or_nothing(
    scene: Scene, scheme: str
) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme))
        assert await _invoke(lambda: _select(engine)) == 1
        await _fails_by_the_deadline(
            lambda: _write(engine, scene, 1, "hole_before_commit"), "commit"
        )
        await asyncio.to_thread(scene.heal_and_check_gone)
        rows = await asyncio.to_thread(scene.rows)
        assert rows in (0, ROWS)
        await _recovers(scene, engine, rows)
        await engine.dispose()

    _run(scenario)


def test_black_hole_at_the_reset_on_return_is_bounded_and_the_connection_replaced(
    scene: Scene, scheme: str
) -> None:
    async def scenario() -> None:
        engine = warm_async_engine(scene.url(scheme))
        assert await _invoke(lambda: _select(engine)) == 1
        watch = Stopwatch()
        # Committed, then the reset (DISCARD ALL) meets the black hole: the work is
        # done, so no error; the reset ends by the deadline and the connection is dropped.
        assert await _invoke(lambda: _write(engine, scene, 1, "commit_then_hole")) == ROWS
        assert watch.seconds() < REMAINING
        assert await asyncio.to_thread(scene.rows) == ROWS
        accepted = scene.proxy.counters().connections_accepted
        await _recovers(scene, engine, ROWS)
        assert scene.proxy.counters().connections_accepted == accepted + 1
        await engine.dispose()

    _run(scenario)


def test_queue_pool_async_engine_black_hole_fails_the_statement(scene: Scene, scheme: str) -> None:
    async def scenario() -> None:
        engine = create_async_engine(scene.url(scheme), pool_size=1, max_overflow=0)
        assert await _invoke(lambda: _write(engine, scene, 1)) == ROWS
        scene.proxy.black_hole()
        await _fails_by_the_deadline(lambda: _write(engine, scene, 100), "statement")
        assert engine.pool.checkedout() == 0
        await _recovers(scene, engine, ROWS)
        await engine.dispose()

    _run(scenario)


def _sleeping_queries(scene: Scene) -> list[str]:
    return [
        str(b["query"])
        for b in scene.server.backends(scene.app)
        if b["state"] == "active" and "pg_sleep" in str(b["query"])
    ]


def test_a_slow_query_on_a_healthy_network_is_cancelled_on_the_server_at_the_deadline(
    scene: Scene, scheme: str
) -> None:
    """No black hole: the query is just longer than the deadline.  The client stops
    waiting by the deadline and its cancel request reaches the server, so the query does
    not run on after the invocation (holding locks and a connection slot)."""

    async def scenario() -> None:
        engine = create_async_engine(scene.url(scheme))
        await _fails_by_the_deadline(lambda: _write(engine, scene, 1, "sleep"), "statement")
        await engine.dispose()

    _run(scenario)
    # pg_sleep(5) would run ~3 s more without the cancel; look for 2 s.
    watch = Stopwatch()
    while _sleeping_queries(scene) and watch.seconds() < 2:
        time.sleep(0.05)
    assert _sleeping_queries(scene) == []
    assert scene.server.wait_for_backend_count(0, scene.app) == 0
    assert scene.rows() == 0
