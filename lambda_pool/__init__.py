"""lambda-pool: PostgreSQL connections from AWS Lambda that are fast, safe and observable.

The pooling API is SQLAlchemy's (``create_engine``, ``event``, the pool classes),
with ``NullPool`` as the default.  The serverless layer (warm-container cache,
credentials, shutdown hooks, the handler decorator) is loaded on first use:
``import lambda_pool`` stays cheap because every Lambda cold start pays for it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lambda_pool import event, exc

__version__ = "0.1.0"

# name -> module that defines it; resolved on first attribute access.
_LAZY: dict[str, str] = {
    "create_engine": "lambda_pool.engine",
    "Engine": "lambda_pool.engine",
    "Connection": "lambda_pool.engine",
    "URL": "lambda_pool.url",
    "make_url": "lambda_pool.url",
    "Pool": "lambda_pool.pool",
    "QueuePool": "lambda_pool.pool",
    "NullPool": "lambda_pool.pool",
    "StaticPool": "lambda_pool.pool",
    "SingletonThreadPool": "lambda_pool.pool",
    "AsyncAdaptedQueuePool": "lambda_pool.pool",
    "AssertionPool": "lambda_pool.pool",
    "PoolResetState": "lambda_pool.pool",
    "warm_engine": "lambda_pool.warm",
    "warm_async_engine": "lambda_pool.warm",
    "with_connection": "lambda_pool.handler",
    "deadline": "lambda_pool.deadlines",
    "install_shutdown_hooks": "lambda_pool.lifecycle",
    "dispose_all": "lambda_pool.lifecycle",
    "StaticCredentials": "lambda_pool.auth",
    "SecretsManagerCredentials": "lambda_pool.auth",
    "IAMCredentials": "lambda_pool.auth",
    "instrument": "lambda_pool.observability",
}

__all__ = [
    "URL",
    "AssertionPool",
    "AsyncAdaptedQueuePool",
    "Connection",
    "Engine",
    "IAMCredentials",
    "NullPool",
    "Pool",
    "PoolResetState",
    "QueuePool",
    "SecretsManagerCredentials",
    "SingletonThreadPool",
    "StaticCredentials",
    "StaticPool",
    "__version__",
    "create_engine",
    "deadline",
    "dispose_all",
    "event",
    "exc",
    "install_shutdown_hooks",
    "instrument",
    "make_url",
    "warm_async_engine",
    "warm_engine",
    "with_connection",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth import IAMCredentials, SecretsManagerCredentials, StaticCredentials
    from lambda_pool.deadlines import deadline
    from lambda_pool.engine import Connection, Engine, create_engine
    from lambda_pool.handler import with_connection
    from lambda_pool.lifecycle import dispose_all, install_shutdown_hooks
    from lambda_pool.observability import instrument
    from lambda_pool.pool import (
        AssertionPool,
        AsyncAdaptedQueuePool,
        NullPool,
        Pool,
        PoolResetState,
        QueuePool,
        SingletonThreadPool,
        StaticPool,
    )
    from lambda_pool.url import URL, make_url
    from lambda_pool.warm import warm_async_engine, warm_engine


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'lambda_pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
