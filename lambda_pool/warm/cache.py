"""The container's engine cache and its factories: ``warm_engine()``, ``warm_async_engine()``.

:class:`EngineCache` keeps one engine per identity (:func:`~lambda_pool.warm.identity.identity_key`)
for the container's life, module scope and lock-protected; the factories build a
``WarmPool`` engine the first time and refuse the pool keywords that do not apply.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from lambda_pool.exc import ArgumentError
from lambda_pool.warm.identity import identity_key
from lambda_pool.warm.reset import warm_connect_args
from lambda_pool.warm.warm_pool import WarmPool

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.asyncio import AsyncEngine
    from lambda_pool.engine import Engine


E = TypeVar("E")


class EngineCache(Generic[E]):
    """One engine per identity for the life of the container: module scope, lock-protected.

    Used by :func:`warm_engine`/:func:`warm_async_engine` and by the SQLAlchemy adapter's
    ``warm_engine``.  Each entry keeps the credentials provider with its engine, so the
    provider's ``id()`` in the key cannot be taken by another object while the entry lives.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[Any, ...], tuple[E, Any]] = {}

    def get_or_create(self, key: tuple[Any, ...], credentials: Any, make: Callable[[], E]) -> E:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                entry = (make(), credentials)
                self._entries[key] = entry
            return entry[0]

    def engines(self) -> list[E]:
        with self._lock:
            return [engine for engine, _ in self._entries.values()]

    def forget(self) -> list[E]:
        """Empty the cache and return what it held (not disposed: the caller decides)."""
        with self._lock:
            engines = [engine for engine, _ in self._entries.values()]
            self._entries.clear()
        return engines


_engines: EngineCache[Engine | AsyncEngine] = EngineCache()
_REFUSED_KEYWORDS = ("poolclass", "pool", "pool_size", "max_overflow", "pool_timeout")


def warm_engine(
    url: Any,
    *,
    pre_ping_idle_seconds: float | None = None,
    transaction_pooling: bool = False,
    clock: Callable[[], float] | None = None,
    **kw: Any,
) -> Engine:
    """The container's engine for this identity, created on the first call, reused after.

    The identity is the URL without its password (driver, host, port, database, query
    options), the user, the credentials provider (``credentials=``) and every keyword,
    with secrets folded in through a per-process keyed digest (see :func:`identity_key`).
    The engine's pool is a :class:`WarmPool`: ``pre_ping_idle_seconds`` (default:
    ``LAMBDA_POOL_PRE_PING_IDLE_SECONDS``, else 60), ``transaction_pooling`` (PgBouncer /
    RDS Proxy in transaction mode: no ``DISCARD ALL``, no server-side prepared
    statements) and ``clock`` (default: the credentials provider's clock, else
    ``time.time``) configure it; ``engine.pool.stats`` counts what it did.  Every other
    keyword goes to :func:`lambda_pool.create_engine` (``credentials``, ``connect_args``,
    ``pool_recycle``, ``pool_pre_ping``, ``echo_pool``, …); ``poolclass`` and queue sizing
    are refused.  Thread-safe: concurrent first calls create one engine.
    """
    engine = _cached_warm_engine(
        "warm_engine", url, False, pre_ping_idle_seconds, transaction_pooling, clock, kw
    )
    from lambda_pool.engine import Engine

    assert isinstance(engine, Engine)
    return engine


def warm_async_engine(
    url: Any,
    *,
    pre_ping_idle_seconds: float | None = None,
    transaction_pooling: bool = False,
    clock: Callable[[], float] | None = None,
    **kw: Any,
) -> AsyncEngine:
    """:func:`warm_engine` for asyncio: the container's :class:`~lambda_pool.asyncio.AsyncEngine`.

    Same identity rule, same keywords (every other one goes to
    :func:`lambda_pool.asyncio.create_async_engine`), same :class:`WarmPool` and reuse
    rules, used with ``async with engine.connect() as conn``.  Drivers: psycopg's
    ``AsyncConnection`` (``postgresql://``, opened with ``prepare_threshold=None``) and
    asyncpg (``postgresql+asyncpg://``, with its statement cache on, kept across
    invocations by the warm reset, :data:`~lambda_pool.warm.reset.ASYNCPG_SESSION_RESET`;
    off with ``transaction_pooling``).
    The cache holds async and blocking engines apart (a URL gets one of each).

    Event loops: an asyncio connection belongs to the loop that opened it.  There is one
    engine per identity, not one per loop; its pool checks at each checkout that the
    running loop is the connection's and otherwise replaces it (reason
    ``other_event_loop``), closing the old one without awaiting it.  Keep one loop for
    the container's life (``loop.run_until_complete`` per invocation, as
    ``samples/async_handler`` does) and the connection is reused; ``asyncio.run()`` per
    invocation still works, with a new connection each time.
    """
    engine = _cached_warm_engine(
        "warm_async_engine", url, True, pre_ping_idle_seconds, transaction_pooling, clock, kw
    )
    from lambda_pool.asyncio import AsyncEngine

    assert isinstance(engine, AsyncEngine)
    return engine


def _cached_warm_engine(
    factory: str,
    url: Any,
    is_async: bool,
    pre_ping_idle_seconds: float | None,
    transaction_pooling: bool,
    clock: Callable[[], float] | None,
    kw: dict[str, Any],
) -> Engine | AsyncEngine:
    for name in _REFUSED_KEYWORDS:
        if name in kw:
            raise ArgumentError(
                f"{factory}() chooses its pool (WarmPool, one connection); {name}= does not "
                "apply. Use lambda_pool.create_engine() for other pools"
            )
    from lambda_pool.engine_setup import transaction_pooling_from_url
    from lambda_pool.url import make_url

    parsed = make_url(url)
    # ``?transaction_pooling=true`` in the URL means the same as the keyword: the pool
    # must skip DISCARD ALL too, not only the driver its prepared statements.
    transaction_pooling = bool(transaction_pooling or transaction_pooling_from_url(parsed))
    options = dict(kw)
    options.update(
        pre_ping_idle_seconds=pre_ping_idle_seconds,
        transaction_pooling=transaction_pooling,
        clock=clock,
    )
    if is_async:
        # Part of the key: a URL's blocking and asyncio engines are different engines.
        options["lambda_pool.asyncio"] = True
    credentials = kw.get("credentials")
    key = identity_key(parsed, credentials, options)
    return _engines.get_or_create(
        key,
        credentials,
        lambda: _create_warm_engine(
            parsed, is_async, pre_ping_idle_seconds, transaction_pooling, clock, kw
        ),
    )


def _create_warm_engine(
    url: Any,
    is_async: bool,
    pre_ping_idle_seconds: float | None,
    transaction_pooling: bool,
    clock: Callable[[], float] | None,
    kw: dict[str, Any],
) -> Engine | AsyncEngine:
    options = dict(kw)
    if clock is None:
        clock = getattr(options.get("credentials"), "clock", None)
    postgresql = url.get_backend_name() == "postgresql"
    driver = url.get_driver_name()
    if postgresql and driver in ("psycopg", ""):
        connect_args = dict(options.get("connect_args") or {})
        if transaction_pooling:
            # Server-side prepared statements break (or pin) behind a transaction pooler.
            connect_args["prepare_threshold"] = None
        options["connect_args"] = warm_connect_args(connect_args, psycopg=True)
    # asyncpg keeps its statement cache (statement_cache_size, default 100): the warm
    # reset keeps the statements it caches (warm_connect_args adds nothing for it);
    # transaction pooling turns it off through the engine's transaction_pooling option.
    if transaction_pooling and postgresql:
        # The engine's own setting (engine.transaction_pooling; the driver's keywords).
        options["transaction_pooling"] = True
    poolclass = WarmPool.configure(
        pre_ping_idle_seconds=pre_ping_idle_seconds,
        transaction_pooling=transaction_pooling,
        clock=clock,
        recycle_on_credentials_expiry=options.get("recycle_on_credentials_expiry", True),
    )
    if is_async:
        from lambda_pool.asyncio import create_async_engine

        return create_async_engine(url, poolclass=poolclass, **options)
    from lambda_pool.engine import create_engine

    return create_engine(url, poolclass=poolclass, **options)


def cached_engines() -> list[Engine | AsyncEngine]:
    """The engines :func:`warm_engine` and :func:`warm_async_engine` created in this
    process (for diagnostics)."""
    return _engines.engines()


def forget_cached_engines() -> list[Engine | AsyncEngine]:
    """Empty the cache, so the next :func:`warm_engine` / :func:`warm_async_engine` call
    builds a new engine.

    What a new execution environment starts with; a test standing in for a cold start
    needs it.  The forgotten engines (blocking and asyncio) are returned, not disposed:
    the caller decides.
    """
    return _engines.forget()
