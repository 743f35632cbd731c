"""The pooling system: SQLAlchemy's pool classes, records and proxies, sync and async.

Layout: :mod:`.core` holds the I/O-free decisions (arguments, slot accounting,
deadlines, staleness), :mod:`.base` the ``Pool`` procedures and the sync/async
shells that run them, :mod:`.impl` the pool classes, :mod:`.dialect` the generic
dialects used when the engine passes none.
"""

from __future__ import annotations

from lambda_pool.pool.base import (
    ConnectionPoolEntry,
    Pool,
    PoolProxiedConnection,
    PoolResetState,
    _ConnectionFairy,
    _ConnectionRecord,
)
from lambda_pool.pool.dialect import AsyncDefaultDialect, DefaultDialect, Dialect
from lambda_pool.pool.impl import (
    AssertionPool,
    AsyncAdaptedQueuePool,
    NullPool,
    QueuePool,
    SingletonThreadPool,
    StaticPool,
)

__all__ = [
    "AssertionPool",
    "AsyncAdaptedQueuePool",
    "AsyncDefaultDialect",
    "ConnectionPoolEntry",
    "DefaultDialect",
    "Dialect",
    "NullPool",
    "Pool",
    "PoolProxiedConnection",
    "PoolResetState",
    "QueuePool",
    "SingletonThreadPool",
    "StaticPool",
    "_ConnectionFairy",
    "_ConnectionRecord",
]
