"""The asyncio engine: ``create_async_engine``, ``AsyncEngine``, ``AsyncConnection``.

URLs: ``postgresql+asyncpg://`` (asyncpg) and ``postgresql://`` /
``postgresql+psycopg://`` (``psycopg.AsyncConnection``).  The pool is ``NullPool``
unless sized (``pool_size``/``max_overflow``/``pool_timeout`` select
``AsyncAdaptedQueuePool``) or ``poolclass=`` says otherwise.

``await conn.execute(sql, params)`` returns a buffered :class:`~lambda_pool.result.Result`
(read it without ``await``).  SQL is written psycopg-style (``%s``, ``%(name)s``) for
both drivers: the asyncpg dialect rewrites it to ``$1, $2 …``, so the same statement
runs on either driver, and the same transaction rule applies (a transaction opens
with the first statement; ``await conn.commit()`` ends it).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import types
from collections.abc import AsyncIterator, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lambda_pool import deadlines
from lambda_pool.dialects.base import AsyncDialect
from lambda_pool.engine_core import (
    ConnectionCore,
    ConnOp,
    EngineBase,
    Params,
    Proc,
    Step,
    TransactionCore,
    run_async,
)
from lambda_pool.exc import InvalidRequestError
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.pool import PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = ["AsyncConnection", "AsyncEngine", "AsyncTransaction", "create_async_engine"]


class AsyncTransaction(TransactionCore):
    """An explicit transaction: ``async with conn.begin(): ...`` commits or rolls back."""

    async def commit(self) -> None:
        await run_async(self._g_end(commit=True), self._connection_perform)

    async def rollback(self) -> None:
        await run_async(self._g_end(commit=False), self._connection_perform)

    async def _connection_perform(self, step: Step) -> Any:
        assert isinstance(self._connection, AsyncConnection)
        return await self._connection._perform(step)

    async def __aenter__(self) -> AsyncTransaction:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            await self.commit()
        else:
            await self.rollback()


class AsyncConnection(ConnectionCore["AsyncEngine"]):
    """An async checked-out connection (see :class:`lambda_pool.engine.Connection`).

    ``engine.connect()`` returns it unconnected; ``async with`` (or ``await
    conn.start()``) checks the connection out, ``await conn.close()`` returns it.
    The rules live in :class:`lambda_pool.engine_core.ConnectionCore`, shared with the
    blocking ``Connection``.
    """

    _kind = "AsyncConnection"
    _rollback_verb = "await"
    _begun_hint = "end it first"

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, None)

    # --- the shell: await each step ------------------------------------------------------

    async def _run(self, proc: Proc[Any]) -> Any:
        return await run_async(proc, self._perform)

    async def _perform(self, step: Step) -> Any:
        op, arg = step
        if op is ConnOp.CHECKOUT:
            return await self._engine.pool.aconnect()
        if op is ConnOp.EXECUTE:
            return await self._engine.dialect.execute(*arg)
        if op is ConnOp.COMMIT:
            return await self._engine.dialect.do_commit(arg)
        if op is ConnOp.ROLLBACK:
            return await self._engine.dialect.do_rollback(arg)
        if op is ConnOp.INVALIDATE:
            proxy, exc = arg
            return await proxy.ainvalidate(exc)
        if op is ConnOp.CLOSE:
            # The pool resets the connection on return (rollback, DISCARD ALL).
            with deadlines.step("reset on return"):
                return await arg.aclose()
        raise AssertionError(op)  # pragma: no cover - every ConnOp is handled

    async def _live(self) -> PoolProxiedConnection:
        proxy: PoolProxiedConnection = await self._run(self._g_live())
        return proxy

    def _checked(self) -> PoolProxiedConnection:
        """The proxy, without I/O: properties cannot await a checkout."""
        self._check_usable()
        if self._proxy is None:
            raise InvalidRequestError(
                "This AsyncConnection is not started: use 'async with engine.connect() as conn'"
            )
        return self._proxy

    # --- state -------------------------------------------------------------------------

    @property
    def connection(self) -> PoolProxiedConnection:
        """The pool's proxy of the driver connection."""
        return self._checked()

    @property
    def driver_connection(self) -> Any:
        """``asyncpg.Connection`` or ``psycopg.AsyncConnection``."""
        return self._checked().driver_connection

    @property
    def info(self) -> dict[Any, Any]:
        return self._checked().info

    async def start(self) -> AsyncConnection:
        """Check the connection out (``async with`` does this)."""
        await self._live()
        return self

    def __await__(self) -> Any:
        # ``conn = await engine.connect()`` works as in SQLAlchemy.
        return self.start().__await__()

    # --- statements --------------------------------------------------------------------

    async def execute(self, statement: str, parameters: Params = None) -> Result:
        """Run one SQL statement (psycopg-style placeholders); returns a buffered Result."""
        result: Result = await self._run(self._g_execute(statement, parameters))
        return result

    async def exec_driver_sql(self, statement: str, parameters: Params = None) -> Result:
        return await self.execute(statement, parameters)

    async def commit(self) -> None:
        await self._run(self._g_finish(commit=True))

    async def rollback(self) -> None:
        """Roll back; after an invalidation this lets the connection reconnect."""
        await self._run(self._g_rollback())

    def begin(self) -> AsyncTransaction:
        """``async with conn.begin(): ...`` commits on success, rolls back on error."""
        self._check_open()
        return self._new_transaction(AsyncTransaction)

    # --- ending ------------------------------------------------------------------------

    async def invalidate(self, exception: BaseException | None = None) -> None:
        """Close the driver connection now and drop it from the pool."""
        await self._run(self._g_invalidate_requested(exception))

    async def close(self) -> None:
        """Return the connection to the pool (which rolls back open work). Idempotent."""
        await self._run(self._g_close())

    async def __aenter__(self) -> AsyncConnection:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded: a cancelled task must still give its connection back.
        await _shielded(self.close())


async def _shielded(coro: Coroutine[Any, Any, None]) -> None:
    """``await asyncio.shield(coro)``, without scheduling a task when ``coro`` ends without
    waiting (returning a connection that needs no I/O, the common case).

    Python 3.12+: an eager task runs ``coro``'s first step at once, as that task (so
    ``asyncio.current_task()`` inside it, which ``asyncio.wait_for`` / ``timeout`` use to
    cancel on expiry, is the task that keeps running it), and is done right away when
    nothing waited.  Older Pythons have no eager tasks: the first step runs in the caller
    and the rest in a shielded task; that hand-over is sound there because their
    ``asyncio.wait_for`` cancels its own inner future, never the current task.
    """
    if _EAGER_TASKS:
        task = asyncio.Task(coro, loop=asyncio.get_running_loop(), eager_start=True)  # type: ignore[call-arg]
        if task.done():
            task.result()
            return
        await asyncio.shield(task)
        return
    context = contextvars.copy_context()
    try:
        first = context.run(coro.send, None)
    except StopIteration:
        return

    async def rest() -> None:
        await _continue(coro, first, context)

    await asyncio.shield(rest())


_EAGER_TASKS = sys.version_info >= (3, 12)


@types.coroutine
def _continue(
    coro: Coroutine[Any, Any, None], first: Any, context: contextvars.Context
) -> Generator[Any, Any, None]:
    """Drive a coroutine already started by :func:`_shielded` from the task running this:
    hand the task what ``coro`` waits on, send back what the task resumes it with."""
    step = first
    while True:
        try:
            sent = yield step
        except GeneratorExit:
            coro.close()
            raise
        except BaseException as exc:
            try:
                step = context.run(coro.throw, exc)
            except StopIteration:
                return
            continue
        try:
            step = context.run(coro.send, sent)
        except StopIteration:
            return


class AsyncEngine(EngineBase[AsyncDialect]):
    """The asyncio counterpart of :class:`lambda_pool.engine.Engine`."""

    _is_async = True
    _kind = "AsyncEngine"

    def connect(self) -> AsyncConnection:
        """``async with engine.connect() as conn`` (or ``conn = await engine.connect()``)."""
        return AsyncConnection(self)

    async def raw_connection(self) -> PoolProxiedConnection:
        """The pool's proxy of a driver connection; ``await proxy.aclose()`` returns it."""
        return await self.pool.aconnect()

    @contextlib.asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """``async with engine.begin() as conn``: commit on success, roll back on error."""
        async with self.connect() as connection, connection.begin():
            yield connection

    async def dispose(self, close: bool = True) -> None:
        """Close idle connections and start over with a fresh pool (same arguments);
        connections checked out now are closed when returned."""
        old = self.pool
        if close:
            await old._aretire()
        self.pool = old.recreate()


def create_async_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """Create an :class:`AsyncEngine`; keywords as :func:`lambda_pool.create_engine`.

    A URL whose driver is blocking-only (``sqlite://``) raises ``ArgumentError``
    pointing to ``create_engine``.  Nothing connects until the first checkout.
    """
    return AsyncEngine._create(url, kwargs)
