"""Building the contenders: lambda-pool, SQLAlchemy and psycopg_pool pools, the warm engine.

Every pool is built the way its library's users build it (``create_engine(...)`` or
``ConnectionPool(...)``) and closed by the ``ExitStack`` passed in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lambda_pool.engine import Engine

__all__ = [
    "discard_all",
    "lambda_pool_engine",
    "psycopg_pool",
    "sqlalchemy_discard_all_on_return",
    "sqlalchemy_engine",
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


def warm_stats_since_now(engine: Engine) -> Callable[[], dict[str, Any]]:
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
