"""Building the contenders: lambda-pool, SQLAlchemy and psycopg_pool pools, the warm engine.

Every pool is built the way its library's users build it (``create_engine(...)`` or
``ConnectionPool(...)``) and closed by the ``ExitStack`` passed in.  The asyncio
counterparts (``create_async_engine``, ``AsyncConnectionPool``, ``warm_async_engine``)
are built inside the event loop they will run on and closed by an ``AsyncExitStack``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lambda_pool.asyncio import AsyncEngine
    from lambda_pool.engine import Engine

__all__ = [
    "adiscard_all",
    "discard_all",
    "greenlet_missing",
    "lambda_pool_async_engine",
    "lambda_pool_engine",
    "psycopg_async_pool",
    "psycopg_pool",
    "sqlalchemy_async_discard_all_on_return",
    "sqlalchemy_async_engine",
    "sqlalchemy_discard_all_on_return",
    "sqlalchemy_engine",
    "warm_async_engine",
    "warm_engine",
    "warm_stats_since_now",
]


def lambda_pool_engine(stack: contextlib.ExitStack, url: str, **kwargs: Any) -> Engine:
    """``lambda_pool.create_engine(url, **kwargs)``, disposed when ``stack`` closes."""
    import lambda_pool

    engine = lambda_pool.create_engine(url, **kwargs)
    stack.callback(engine.dispose)
    return engine


def sqlalchemy_engine(stack: contextlib.ExitStack, url: str, **kwargs: Any) -> Any:
    """``sqlalchemy.create_engine(url, **kwargs)``, disposed when ``stack`` closes."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, **kwargs)
    stack.callback(engine.dispose)
    return engine


def discard_all(dbapi_connection: Any) -> None:
    """Roll back, then ``DISCARD ALL`` in autocommit: the session reset the warm engine does.

    Given to the peers (a SQLAlchemy ``reset`` listener, psycopg_pool's ``reset=``) so
    the warm engine's return can be compared with pools doing the same work.
    """
    dbapi_connection.rollback()
    dbapi_connection.autocommit = True
    try:
        dbapi_connection.execute("DISCARD ALL", prepare=False)
    finally:
        dbapi_connection.autocommit = False


def sqlalchemy_discard_all_on_return(engine: Any) -> None:
    """Make a SQLAlchemy engine reset sessions with :func:`discard_all` (SQLAlchemy's
    documented recipe: ``pool_reset_on_return=None`` plus a ``reset`` listener)."""
    from sqlalchemy import event

    def reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        if not reset_state.terminate_only:
            discard_all(dbapi_connection)

    event.listen(engine, "reset", reset)


def psycopg_pool(
    stack: contextlib.ExitStack, conninfo: str, *, check: bool, reset: bool = False
) -> Any:
    """A psycopg_pool ``ConnectionPool`` (5 kept, up to 15), filled before timing starts.

    ``check=True`` passes ``ConnectionPool.check_connection``: psycopg_pool's
    check-on-getconn, its counterpart of pre-ping.  ``reset=True`` passes
    :func:`discard_all` as ``reset=``, which psycopg_pool runs in a worker thread after
    ``putconn()`` returns (off the caller's clock; the caller meanwhile gets another of
    the pool's connections).
    """
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(
        conninfo,
        min_size=5,
        max_size=15,
        open=True,
        check=ConnectionPool.check_connection if check else None,
        reset=discard_all if reset else None,
        name=f"bench{'-check' if check else ''}{'-reset' if reset else ''}",
    )
    stack.callback(pool.close)
    pool.wait(timeout=30.0)
    return pool


def warm_engine(stack: contextlib.ExitStack, url: str, *, pre_ping_idle_seconds: float) -> Engine:
    """:func:`lambda_pool.warm.warm_engine` for ``url``, disposed when ``stack`` closes.

    ``warm_engine()`` caches one engine per identity in module scope (that is its job),
    so a second call with the same arguments returns the same engine; ``dispose()``
    closes its connection and the next checkout opens a new one.
    """
    from lambda_pool.warm import warm_engine as public_warm_engine

    engine = public_warm_engine(url, pre_ping_idle_seconds=pre_ping_idle_seconds)
    stack.callback(engine.dispose)
    return engine


# --- asyncio -------------------------------------------------------------------------


def greenlet_missing() -> str | None:
    """Why SQLAlchemy's asyncio engine cannot run here, or ``None`` when it can.

    ``sqlalchemy.ext.asyncio`` runs its blocking pool and dialect code in greenlets;
    without the ``greenlet`` package its first checkout raises.  lambda-pool's own
    async engine does not need it.
    """
    import importlib.util

    if importlib.util.find_spec("greenlet") is None:
        return "greenlet is not installed (SQLAlchemy's asyncio engine needs it)"
    return None


async def lambda_pool_async_engine(
    stack: contextlib.AsyncExitStack, url: str, **kwargs: Any
) -> AsyncEngine:
    """``lambda_pool.create_async_engine(url, **kwargs)``, disposed when ``stack`` closes."""
    from lambda_pool.asyncio import create_async_engine

    engine = create_async_engine(url, **kwargs)
    stack.push_async_callback(engine.dispose)
    return engine


async def sqlalchemy_async_engine(stack: contextlib.AsyncExitStack, url: str, **kwargs: Any) -> Any:
    """``sqlalchemy.ext.asyncio.create_async_engine(url, **kwargs)``, disposed with ``stack``.

    Its default pool is ``AsyncAdaptedQueuePool`` (size 5, overflow 10).
    """
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url, **kwargs)
    stack.push_async_callback(engine.dispose)
    return engine


async def adiscard_all(connection: Any) -> None:
    """:func:`discard_all` for a ``psycopg.AsyncConnection``."""
    await connection.rollback()
    await connection.set_autocommit(True)
    try:
        await connection.execute("DISCARD ALL", prepare=False)
    finally:
        await connection.set_autocommit(False)


def sqlalchemy_async_discard_all_on_return(engine: Any) -> None:
    """:func:`sqlalchemy_discard_all_on_return` for a SQLAlchemy ``AsyncEngine``.

    Pool events are sync and run inside SQLAlchemy's greenlet, so the listener awaits
    the driver's coroutines with ``sqlalchemy.util.await_`` (``await_only`` before 2.1),
    as SQLAlchemy's own async dialects do.
    """
    from sqlalchemy import event, util

    await_ = getattr(util, "await_", None) or util.await_only

    def reset(dbapi_connection: Any, connection_record: Any, reset_state: Any) -> None:
        if not reset_state.terminate_only:
            await_(adiscard_all(dbapi_connection.driver_connection))

    event.listen(engine.sync_engine, "reset", reset)


async def psycopg_async_pool(
    stack: contextlib.AsyncExitStack, conninfo: str, *, check: bool, reset: bool = False
) -> Any:
    """A psycopg_pool ``AsyncConnectionPool`` (5 kept, up to 15), filled before timing.

    ``check=True`` passes ``AsyncConnectionPool.check_connection``; ``reset=True``
    passes :func:`adiscard_all` as ``reset=``, which the async pool runs in a worker
    task of the same event loop after ``putconn()`` returns.
    """
    from psycopg_pool import AsyncConnectionPool

    pool = AsyncConnectionPool(
        conninfo,
        min_size=5,
        max_size=15,
        open=False,
        check=AsyncConnectionPool.check_connection if check else None,
        reset=adiscard_all if reset else None,
        name=f"abench{'-check' if check else ''}{'-reset' if reset else ''}",
    )
    await pool.open(wait=True, timeout=30.0)
    stack.push_async_callback(pool.close)
    return pool


async def warm_async_engine(
    stack: contextlib.AsyncExitStack, url: str, *, pre_ping_idle_seconds: float
) -> AsyncEngine:
    """:func:`lambda_pool.warm.warm_async_engine` for ``url``, disposed with ``stack``.

    Cached per identity like :func:`warm_engine`; its connection belongs to the event
    loop that opened it, so a section keeps one loop for all its rounds (as a Lambda
    container keeps one loop for its life).
    """
    from lambda_pool.warm import warm_async_engine as public_warm_async_engine

    engine = public_warm_async_engine(url, pre_ping_idle_seconds=pre_ping_idle_seconds)
    stack.push_async_callback(engine.dispose)
    return engine


def warm_stats_since_now(engine: Engine | AsyncEngine) -> Callable[[], dict[str, Any]]:
    """A function giving what the warm pool did from now on (opened, reused, pinged, …).

    The counters prove which path was timed (a fast-path row with ``pre_pings`` > 0
    or ``opened`` > 1 would not be measuring the fast path).  They are cumulative
    per warm engine, and ``warm_engine()`` hands out the same engine again, hence
    the difference from a snapshot.
    """
    stats = engine.pool.stats  # type: ignore[attr-defined]
    before = stats.as_dict()

    def facts() -> dict[str, Any]:
        after = stats.as_dict()
        delta: dict[str, Any] = {}
        for key, value in after.items():
            if isinstance(value, int):
                delta[key] = value - before.get(key, 0)
            elif isinstance(value, dict):
                old = before.get(key, {})
                delta[key] = {k: v - old.get(k, 0) for k, v in value.items() if v != old.get(k)}
        return delta

    return facts
