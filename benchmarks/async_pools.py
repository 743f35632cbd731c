"""The asyncio side: checkout + return and a simulated invocation, on one event loop.

Two sections, run together by ``--only async``:

* ``async_checkout`` — one connection out of the pool and back, per operation:

  - lambda-pool ``create_async_engine(url, pool_size=5)`` (``AsyncAdaptedQueuePool``):
    ``proxy = await engine.pool.aconnect(); await proxy.aclose()``;
  - SQLAlchemy ``sqlalchemy.ext.asyncio.create_async_engine(url, pool_size=5)`` (its
    ``AsyncAdaptedQueuePool``, psycopg's async dialect): ``fairy = await
    engine.raw_connection(); await greenlet_spawn(fairy.close)``.  That is the closest
    equivalent of ``aconnect()``/``aclose()``: SQLAlchemy's public pool-level checkout
    for asyncio, two awaits; the close must run in a greenlet because returning the
    connection rolls it back through the async driver (outside one SQLAlchemy raises
    ``MissingGreenlet``);
  - psycopg_pool ``AsyncConnectionPool``: ``await pool.putconn(await pool.getconn())``;
  - the same three at the level users write, in a group of their own:
    ``async with engine.connect()`` (both engines) and ``async with pool.connection()``;
  - with pre-ping (``pool_pre_ping=True``; psycopg_pool
    ``check=AsyncConnectionPool.check_connection``), joined by the warm async engine
    after an idle gap (``pre_ping_idle_seconds=0``: a ping at every checkout);
  - ``DISCARD ALL`` on return: ``warm_async_engine`` 's fast path against SQLAlchemy
    with a ``reset`` listener and psycopg_pool with ``reset=``.

* ``async_invocation`` — ``async with engine.connect() as c: await c.execute("SELECT 1");
  await c.commit()``: ``create_async_engine(url)`` (``NullPool``, a connection per
  invocation) against ``warm_async_engine(url)``, with psycopg async and asyncpg.

One event loop serves the whole group, as one loop serves a Lambda container for its
life (``samples/async_handler``): an asyncio connection belongs to the loop that opened
it, and the warm engine replaces a connection checked out on another loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks import contenders
from benchmarks.report import Section, add_case_rows
from benchmarks.server import Database
from benchmarks.timing import AsyncOp, Case, run_interleaved

__all__ = ["measure_async"]

SQLALCHEMY = "SQLAlchemy"
PSYCOPG_POOL = "psycopg_pool"
NULLPOOL = "NullPool"
RAW = "raw held"


# --- operations ---------------------------------------------------------------------------


def _aconnect_aclose(engine: Any) -> AsyncOp:
    async def op() -> None:
        # engine.pool read at each call, as engine.raw_connection() does.
        proxy = await engine.pool.aconnect()
        await proxy.aclose()

    return op


def _sqlalchemy_raw(engine: Any) -> AsyncOp:
    from sqlalchemy.util import greenlet_spawn

    async def op() -> None:
        fairy = await engine.raw_connection()
        await greenlet_spawn(fairy.close)

    return op


def _engine_connect(engine: Any) -> AsyncOp:
    async def op() -> None:
        async with engine.connect():
            pass

    return op


def _getconn_putconn(pool: Any) -> AsyncOp:
    async def op() -> None:
        await pool.putconn(await pool.getconn())

    return op


def _pool_connection(pool: Any) -> AsyncOp:
    async def op() -> None:
        async with pool.connection():
            pass

    return op


def _invocation(engine: Any) -> AsyncOp:
    async def op() -> None:
        async with engine.connect() as conn:
            await conn.execute("SELECT 1")
            await conn.commit()

    return op


def _pool_idle_again(pool: Any, timeout_s: float = 5.0) -> Callable[[], Awaitable[None]]:
    """Wait (untimed) until every connection of a psycopg_pool is back in the pool.

    With ``reset=`` the async pool resets a returned connection in a worker task of the
    same loop; what a block leaves running would otherwise run during the next
    contender's block, billed to it.
    """

    async def settle() -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while loop.time() < deadline:
            stats = pool.get_stats()
            if stats.get("pool_available", 0) >= stats.get("pool_size", 0):
                return
            await asyncio.sleep(0.0005)

    return settle


# --- cases --------------------------------------------------------------------------------


async def _checkout_cases(
    stack: contextlib.AsyncExitStack,
    db: Database,
    loop: asyncio.AbstractEventLoop,
    with_sqlalchemy: bool,
) -> list[Case]:
    cases: list[Case] = []

    def add(
        case_id: str,
        label: str,
        op: AsyncOp,
        group: str,
        role: str = "",
        **kw: Any,
    ) -> None:
        cases.append(
            Case(
                f"async_checkout.{case_id}",
                f"[{group}] {label}",
                op,
                group,
                role=role,
                loop=loop,
                **kw,
            )
        )

    for ping in (False, True):
        group = f"psycopg async{' + pre-ping' if ping else ''}"
        suffix = ".preping" if ping else ""
        check = " (check)" if ping else ""
        ours = await contenders.lambda_pool_async_engine(
            stack, db.lambda_pool_url, pool_size=5, max_overflow=10, pool_pre_ping=ping
        )
        peer = await contenders.psycopg_async_pool(stack, db.libpq_url, check=ping)
        add(
            f"psycopg.lambda_pool.queuepool{suffix}",
            "lambda-pool AsyncAdaptedQueuePool aconnect/aclose",
            _aconnect_aclose(ours),
            group,
        )
        theirs = None
        if with_sqlalchemy:
            theirs = await contenders.sqlalchemy_async_engine(
                stack, db.sqlalchemy_url, pool_size=5, max_overflow=10, pool_pre_ping=ping
            )
            add(
                f"psycopg.sqlalchemy.queuepool{suffix}",
                "SQLAlchemy AsyncAdaptedQueuePool raw_connection/close",
                _sqlalchemy_raw(theirs),
                group,
                role=SQLALCHEMY,
            )
        add(
            f"psycopg.psycopg_pool.getconn{suffix}",
            f"psycopg_pool AsyncConnectionPool getconn/putconn{check}",
            _getconn_putconn(peer),
            group,
            role=PSYCOPG_POOL,
        )
        if ping:
            continue
        # The same pools, at the level users write: context managers.
        cm_group = "psycopg async, context manager"
        add(
            "psycopg.lambda_pool.connect",
            "lambda-pool async with engine.connect()",
            _engine_connect(ours),
            cm_group,
        )
        if theirs is not None:
            add(
                "psycopg.sqlalchemy.connect",
                "SQLAlchemy async with engine.connect()",
                _engine_connect(theirs),
                cm_group,
                role=SQLALCHEMY,
            )
        add(
            "psycopg.psycopg_pool.connection",
            "psycopg_pool async with pool.connection()",
            _pool_connection(peer),
            cm_group,
            role=PSYCOPG_POOL,
        )

    warm_ping = await contenders.warm_async_engine(
        stack, db.lambda_pool_url, pre_ping_idle_seconds=0.0
    )
    add(
        "psycopg.lambda_pool.warm.preping",
        "lambda-pool warm_async_engine (after idle: ping)",
        _aconnect_aclose(warm_ping),
        "psycopg async + pre-ping",
        facts=contenders.warm_stats_since_now(warm_ping),
    )

    group = "psycopg async + DISCARD ALL"
    # Far above the run's length: every checkout takes the fast path (no ping).
    warm = await contenders.warm_async_engine(
        stack, db.lambda_pool_url, pre_ping_idle_seconds=3600.0
    )
    add(
        "psycopg.lambda_pool.warm",
        "lambda-pool warm_async_engine (fast path)",
        _aconnect_aclose(warm),
        group,
        facts=contenders.warm_stats_since_now(warm),
    )
    if with_sqlalchemy:
        theirs = await contenders.sqlalchemy_async_engine(
            stack, db.sqlalchemy_url, pool_size=5, max_overflow=10, pool_reset_on_return=None
        )
        contenders.sqlalchemy_async_discard_all_on_return(theirs)
        add(
            "psycopg.sqlalchemy.queuepool.discard",
            "SQLAlchemy AsyncAdaptedQueuePool + reset listener",
            _sqlalchemy_raw(theirs),
            group,
            role=SQLALCHEMY,
        )
    peer = await contenders.psycopg_async_pool(stack, db.libpq_url, check=False, reset=True)
    add(
        "psycopg.psycopg_pool.getconn.discard",
        "psycopg_pool AsyncConnectionPool getconn/putconn, reset=",
        _getconn_putconn(peer),
        group,
        role=PSYCOPG_POOL,
        settle=_pool_idle_again(peer),
    )
    return cases


async def _raw_held(stack: contextlib.AsyncExitStack, db: Database, key: str) -> AsyncOp:
    """The floor: one driver connection opened once and kept (as a global), running the
    same statements as the invocation (BEGIN, ``SELECT 1``, COMMIT)."""
    if key == "psycopg":
        import psycopg

        conn = await psycopg.AsyncConnection.connect(db.libpq_url)
        stack.push_async_callback(conn.close)

        async def op() -> None:
            await conn.execute("SELECT 1")
            await conn.commit()

        return op
    import asyncpg

    raw = await asyncpg.connect(db.libpq_url)
    stack.push_async_callback(raw.close)

    async def asyncpg_op() -> None:
        async with raw.transaction():
            await raw.fetchval("SELECT 1")

    return asyncpg_op


async def _invocation_cases(
    stack: contextlib.AsyncExitStack, db: Database, loop: asyncio.AbstractEventLoop
) -> list[Case]:
    cases: list[Case] = []
    for driver, url in (("psycopg async", db.lambda_pool_url), ("asyncpg", db.asyncpg_url)):
        key = "psycopg" if driver == "psycopg async" else "asyncpg"
        raw_label = (
            "psycopg AsyncConnection" if key == "psycopg" else "asyncpg connection (transaction())"
        )
        cases.append(
            Case(
                f"async_invocation.{key}.raw_held",
                f"[{driver}] raw {raw_label} held in a global (the floor)",
                await _raw_held(stack, db, key),
                driver,
                role=RAW,
                loop=loop,
            )
        )
        nullpool = await contenders.lambda_pool_async_engine(stack, url)
        warm = await contenders.warm_async_engine(stack, url, pre_ping_idle_seconds=3600.0)
        warm_ping = await contenders.warm_async_engine(stack, url, pre_ping_idle_seconds=0.0)
        cases += [
            Case(
                f"async_invocation.{key}.lambda_pool.nullpool",
                f"[{driver}] create_async_engine() default (NullPool): connect each time",
                _invocation(nullpool),
                driver,
                role=NULLPOOL,
                loop=loop,
            ),
            Case(
                f"async_invocation.{key}.lambda_pool.warm",
                f"[{driver}] warm_async_engine (fast path)",
                _invocation(warm),
                driver,
                loop=loop,
                facts=contenders.warm_stats_since_now(warm),
            ),
            Case(
                f"async_invocation.{key}.lambda_pool.warm.preping",
                f"[{driver}] warm_async_engine (after idle: ping)",
                _invocation(warm_ping),
                driver,
                loop=loop,
                facts=contenders.warm_stats_since_now(warm_ping),
            ),
        ]
    return cases


# --- the section --------------------------------------------------------------------------


def measure_async(
    db: Database,
    *,
    checkout_rounds: int,
    checkout_ops: int,
    checkout_warmup: int,
    invocation_rounds: int,
    invocation_ops: int,
    invocation_warmup: int,
) -> list[Section]:
    """Time the async contenders on one event loop; an ``async_checkout`` and an
    ``async_invocation`` section."""
    missing = contenders.greenlet_missing()
    loop = asyncio.new_event_loop()
    try:
        checkout_cases, checkout_facts = _timed(
            loop,
            lambda stack: _checkout_cases(stack, db, loop, with_sqlalchemy=missing is None),
            rounds=checkout_rounds,
            ops_per_round=checkout_ops,
            warmup_ops=checkout_warmup,
        )
        invocation_cases, invocation_facts = _timed(
            loop,
            lambda stack: _invocation_cases(stack, db, loop),
            rounds=invocation_rounds,
            ops_per_round=invocation_ops,
            warmup_ops=invocation_warmup,
        )
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()

    checkout = Section(
        name="async_checkout",
        title="Async checkout + return (asyncio, one event loop)",
        unit="us/op",
        baselines=[SQLALCHEMY, PSYCOPG_POOL],
        notes=[
            "ratios within a group; x psycopg_pool is against getconn/putconn, in the "
            "context-manager group against async with pool.connection()",
            "SQLAlchemy raw: fairy = await engine.raw_connection(); "
            "await greenlet_spawn(fairy.close) (its return rolls back through the driver, "
            "which needs SQLAlchemy's greenlet)",
            "the warm engine resets the session on return (DISCARD ALL, one round trip), "
            "in both its rows; its fast path is compared with peers doing the same reset",
            "psycopg_pool runs reset= in a worker task of the same loop after putconn() "
            "returns; the caller does not wait for it, but the task shares the loop; "
            "the block waits (untimed) for it to finish before the next contender runs",
            f"median of {checkout_rounds} interleaved rounds x {checkout_ops} ops",
        ],
    )
    if missing is not None:
        checkout.notes.insert(0, f"SQLAlchemy rows not measured: {missing}")
    add_case_rows(checkout, checkout_cases, checkout_facts)

    invocation = Section(
        name="async_invocation",
        title="Async invocation (checkout, SELECT 1, commit, return)",
        unit="us/op",
        baselines=[NULLPOOL, RAW],
        notes=[
            "ratios within a driver; x NullPool < 1 means cheaper than opening a "
            "connection per invocation",
            "x raw held: against the driver's own connection kept in a global, the same "
            "statements (BEGIN, SELECT 1, COMMIT)",
            f"median of {invocation_rounds} interleaved rounds x {invocation_ops} invocations",
        ],
    )
    add_case_rows(invocation, invocation_cases, invocation_facts)
    return [checkout, invocation]


def _timed(
    loop: asyncio.AbstractEventLoop,
    build: Callable[[contextlib.AsyncExitStack], Awaitable[list[Case]]],
    *,
    rounds: int,
    ops_per_round: int,
    warmup_ops: int,
) -> tuple[list[Case], dict[str, dict[str, Any]]]:
    """Build cases on ``loop``, time them interleaved, record their facts, close them."""
    stack = contextlib.AsyncExitStack()
    try:
        cases = loop.run_until_complete(build(stack))
        run_interleaved(cases, rounds=rounds, ops_per_round=ops_per_round, warmup_ops=warmup_ops)
        facts = {case.id: case.facts() for case in cases if case.facts is not None}
    finally:
        loop.run_until_complete(stack.aclose())
    return cases, facts
