"""The pool classes: QueuePool, NullPool, StaticPool, SingletonThreadPool, AssertionPool,
AsyncAdaptedQueuePool.

Each class only chooses its arguments and its slot policy from :mod:`lambda_pool.pool.core`;
checkout, return and events are the shared procedures of :class:`~lambda_pool.pool.base.Pool`.
Constructor signatures are SQLAlchemy's (creator first, then keywords, same defaults).
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Callable
from typing import Any

from lambda_pool import event
from lambda_pool.pool import core
from lambda_pool.pool.base import ConnectionPoolEntry, Pool, PoolProxiedConnection


class QueuePool(Pool):
    """``pool_size`` kept connections plus up to ``max_overflow`` temporary ones."""

    def __init__(
        self,
        creator: Callable[[], Any],
        pool_size: int = 5,
        max_overflow: int = 10,
        timeout: float | None = 30.0,
        use_lifo: bool = False,
        *,
        recycle: float = -1,
        echo: bool | str | None = False,
        logging_name: str | None = None,
        reset_on_return: bool | str | None = True,
        events: event.EventRegistry | None = None,
        dialect: Any = None,
        pre_ping: bool = False,
    ) -> None:
        self._pool_size = core.check_int("pool_size", pool_size, minimum=0)
        self._max_overflow = core.check_int("max_overflow", max_overflow, minimum=-1)
        self._use_lifo = bool(use_lifo)
        timeout_value = core.check_timeout(timeout)
        super().__init__(
            creator,
            recycle=recycle,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=reset_on_return,
            events=events,
            dialect=dialect,
            pre_ping=pre_ping,
        )
        self._timeout = timeout_value
        self._kwargs.update(
            pool_size=pool_size, max_overflow=max_overflow, timeout=timeout, use_lifo=use_lifo
        )

    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        return core.QueueSlots(self._pool_size, self._max_overflow, self._use_lifo)

    def _timeout_message(self) -> str:
        return core.timeout_message(self._pool_size, self._max_overflow, self._timeout)


class AsyncAdaptedQueuePool(QueuePool):
    """QueuePool for asyncio drivers: waiting callers wait on the event loop, not a thread.

    Any pool whose creator is a coroutine function waits on asyncio; this class exists
    under SQLAlchemy's name so code that names it keeps working.
    """


class NullPool(Pool):
    """No pooling: a new connection for each checkout, closed when it is returned."""

    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        return core.NullSlots()

    def dispose(self) -> None:
        """Nothing is kept, so there is nothing to close."""

    async def adispose(self) -> None:
        """Nothing is kept, so there is nothing to close."""


class StaticPool(Pool):
    """Exactly one connection, shared by every checkout (what SQLite ``:memory:`` needs).

    It reconnects after invalidation or ``dispose()``.  The connection is reset on
    return only when no other checkout is using it.
    """

    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        return core.StaticSlots()


class SingletonThreadPool(Pool):
    """One connection per thread; a nested checkout in the same thread returns the same one."""

    def __init__(
        self,
        creator: Callable[[], Any],
        pool_size: int = 5,
        *,
        recycle: float = -1,
        echo: bool | str | None = False,
        logging_name: str | None = None,
        reset_on_return: bool | str | None = True,
        events: event.EventRegistry | None = None,
        dialect: Any = None,
        pre_ping: bool = False,
    ) -> None:
        self._pool_size = core.check_int("pool_size", pool_size, minimum=1)
        super().__init__(
            creator,
            recycle=recycle,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=reset_on_return,
            events=events,
            dialect=dialect,
            pre_ping=pre_ping,
        )
        self._current = threading.local()
        self._kwargs.update(pool_size=pool_size)

    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        return core.ThreadSlots(self._pool_size)

    def _nested(self) -> PoolProxiedConnection | None:
        ref: weakref.ref[PoolProxiedConnection] | None = getattr(self._current, "proxy", None)
        proxy = ref() if ref is not None else None
        if proxy is None or proxy._closed:
            return None
        proxy._nested += 1
        return proxy

    def _remember(self, proxy: PoolProxiedConnection) -> PoolProxiedConnection:
        self._current.proxy = weakref.ref(proxy)
        return proxy

    def connect(self) -> PoolProxiedConnection:
        return self._nested() or self._remember(super().connect())

    async def aconnect(self) -> PoolProxiedConnection:
        return self._nested() or self._remember(await super().aconnect())


class AssertionPool(Pool):
    """At most one connection checked out at any time: a second checkout raises
    ``AssertionError`` (for finding code that uses more connections than it should).

    ``store_traceback=True`` (the default) adds where the connection was checked out to
    that error.  A failed connect raises the driver's error and leaves the pool free.
    ``dispose()`` closes the connection, even one that is checked out.
    """

    def __init__(
        self,
        creator: Callable[[], Any],
        *,
        store_traceback: bool = True,
        recycle: float = -1,
        echo: bool | str | None = False,
        logging_name: str | None = None,
        reset_on_return: bool | str | None = True,
        events: event.EventRegistry | None = None,
        dialect: Any = None,
        pre_ping: bool = False,
    ) -> None:
        super().__init__(
            creator,
            recycle=recycle,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=reset_on_return,
            events=events,
            dialect=dialect,
            pre_ping=pre_ping,
        )
        self._store_traceback = bool(store_traceback)
        self._checkout_traceback: list[str] | None = None
        self._kwargs.update(store_traceback=store_traceback)

    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        return core.AssertionSlots()

    def status(self) -> str:
        return "AssertionPool"  # SQLAlchemy's

    def _second_checkout(self, error: AssertionError) -> AssertionError:
        where = self._checkout_traceback
        if not where:
            return error
        return AssertionError(f"{error} at:\n{''.join(where)}")

    def connect(self) -> PoolProxiedConnection:
        try:
            proxy = super().connect()
        except AssertionError as error:
            raise self._second_checkout(error) from None
        self._remember_checkout()
        return proxy

    async def aconnect(self) -> PoolProxiedConnection:
        try:
            proxy = await super().aconnect()
        except AssertionError as error:
            raise self._second_checkout(error) from None
        self._remember_checkout()
        return proxy

    def _remember_checkout(self) -> None:
        if self._store_traceback:
            # Without the pool's own frames: the caller's code is what matters.
            self._checkout_traceback = traceback.format_stack()[:-2]
