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
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lambda_pool.dialects.base import AsyncDialect
from lambda_pool.engine_setup import build_engine_parts, engine_logger
from lambda_pool.exc import InvalidRequestError, ResourceClosedError
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.event import EventRegistry
    from lambda_pool.pool import Pool, PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = ["AsyncConnection", "AsyncEngine", "AsyncTransaction", "create_async_engine"]

Params = Sequence[Any] | Mapping[str, Any] | None


class AsyncTransaction:
    """An explicit transaction: ``async with conn.begin(): ...`` commits or rolls back."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection
        self._active = True

    @property
    def is_active(self) -> bool:
        return self._active

    async def commit(self) -> None:
        if self._active:
            self._active = False
            await self._connection._end_transaction(self, commit=True)

    async def rollback(self) -> None:
        if self._active:
            self._active = False
            await self._connection._end_transaction(self, commit=False)

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


class AsyncConnection:
    """An async checked-out connection (see :class:`lambda_pool.engine.Connection`).

    ``engine.connect()`` returns it unconnected; ``async with`` (or ``await
    conn.start()``) checks the connection out, ``await conn.close()`` returns it.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._proxy: PoolProxiedConnection | None = None
        self._started = False
        self._closed = False
        self._invalidated = False
        self._transaction: AsyncTransaction | None = None

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def invalidated(self) -> bool:
        return self._invalidated

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

    def in_transaction(self) -> bool:
        return self._transaction is not None and self._transaction.is_active

    def _checked(self) -> PoolProxiedConnection:
        if self._closed:
            raise ResourceClosedError("This AsyncConnection is closed")
        if self._invalidated:
            raise InvalidRequestError(
                "This AsyncConnection was invalidated (its database connection was lost); "
                "await rollback() to continue with a new one, or close() it"
            )
        if self._proxy is None:
            raise InvalidRequestError(
                "This AsyncConnection is not started: use 'async with engine.connect() as conn'"
            )
        return self._proxy

    async def _live(self) -> PoolProxiedConnection:
        if self._closed:
            raise ResourceClosedError("This AsyncConnection is closed")
        if self._proxy is None and not self._invalidated:
            self._proxy = await self._engine.pool.aconnect()
            self._started = True
        return self._checked()

    async def start(self) -> AsyncConnection:
        """Check the connection out (``async with`` does this)."""
        await self._live()
        return self

    def __await__(self) -> Any:
        # ``conn = await engine.connect()`` works as in SQLAlchemy.
        return self.start().__await__()

    async def execute(self, statement: str, parameters: Params = None) -> Result:
        """Run one SQL statement (psycopg-style placeholders); returns a buffered Result."""
        if not isinstance(statement, str):
            raise InvalidRequestError(
                f"execute() takes SQL text (str), got {type(statement).__name__}"
            )
        proxy = await self._live()
        dbapi = proxy.dbapi_connection
        self._engine._log_statement(statement)
        dialect = self._engine.dialect
        try:
            outcome = await dialect.execute(dbapi, statement, parameters)
        except Exception as exc:
            if dialect.is_disconnect(exc, dbapi):
                await self._invalidate(exc)
            raise
        return Result(
            outcome.keys, outcome.rows, outcome.rowcount, returns_rows=outcome.returns_rows
        )

    async def exec_driver_sql(self, statement: str, parameters: Params = None) -> Result:
        return await self.execute(statement, parameters)

    async def commit(self) -> None:
        await self._finish(commit=True)

    async def rollback(self) -> None:
        """Roll back; after an invalidation this lets the connection reconnect."""
        if self._closed:
            raise ResourceClosedError("This AsyncConnection is closed")
        if self._invalidated:
            self._invalidated = False
            self._transaction = None
            return
        await self._finish(commit=False)

    async def _finish(self, *, commit: bool) -> None:
        proxy = await self._live()
        dbapi = proxy.dbapi_connection
        dialect = self._engine.dialect
        self._transaction = None
        try:
            if commit:
                await dialect.do_commit(dbapi)
            else:
                await dialect.do_rollback(dbapi)
        except Exception as exc:
            if dialect.is_disconnect(exc, dbapi):
                await self._invalidate(exc)
            raise

    def begin(self) -> AsyncTransaction:
        """``async with conn.begin(): ...`` commits on success, rolls back on error."""
        if self._closed:
            raise ResourceClosedError("This AsyncConnection is closed")
        if self.in_transaction():
            raise InvalidRequestError(
                "a transaction is already begun on this AsyncConnection; end it first"
            )
        self._transaction = AsyncTransaction(self)
        return self._transaction

    async def _end_transaction(self, transaction: AsyncTransaction, *, commit: bool) -> None:
        if transaction is not self._transaction:
            return
        if self._closed or self._invalidated:
            self._transaction = None
            return
        await self._finish(commit=commit)

    async def _invalidate(self, exc: BaseException | None) -> None:
        proxy, self._proxy = self._proxy, None
        self._invalidated = True
        self._transaction = None
        if proxy is not None:
            await proxy.ainvalidate(exc)

    async def invalidate(self, exception: BaseException | None = None) -> None:
        """Close the driver connection now and drop it from the pool."""
        if self._closed:
            raise ResourceClosedError("This AsyncConnection is closed")
        if not self._invalidated:
            await self._invalidate(exception)

    async def close(self) -> None:
        """Return the connection to the pool (which rolls back open work). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._transaction = None
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            await proxy.aclose()

    async def __aenter__(self) -> AsyncConnection:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        # Shielded: a cancelled task must still give its connection back.
        await asyncio.shield(self.close())

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("invalidated" if self._invalidated else "open")
        return f"<AsyncConnection {state} {self._engine!r}>"


class AsyncEngine:
    """The asyncio counterpart of :class:`lambda_pool.engine.Engine`."""

    def __init__(
        self,
        url: URL,
        dialect: AsyncDialect,
        pool: Pool,
        pool_events: EventRegistry,
        *,
        credentials: CredentialProvider | None = None,
        echo: bool | str = False,
        logging_name: str | None = None,
        transaction_pooling: bool = False,
    ) -> None:
        self.url = url
        self.dialect = dialect
        self.pool = pool
        self.pool_events = pool_events
        self.credentials = credentials
        self.echo = echo
        self.logging_name = logging_name
        self.transaction_pooling = transaction_pooling
        self._logger = engine_logger(logging_name, echo)

    def _log_statement(self, statement: str) -> None:
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info("%s", statement)

    @property
    def name(self) -> str:
        return self.dialect.name

    @property
    def driver(self) -> str:
        return self.dialect.driver

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
        """Close idle connections and start over with a fresh pool (same arguments)."""
        old = self.pool
        if close:
            await old.adispose()
        self.pool = old.recreate()

    def dispose_for_shutdown(self) -> None:
        """Synchronous, loop-free disposal for process shutdown (``lambda_pool.lifecycle``).

        Closes idle and checked-out connections with the driver's synchronous terminate
        (psycopg ``pgconn.finish()``, asyncpg ``terminate()``): the event loop they were
        opened on is usually gone by then.  Safe to call twice; the engine stays usable.
        """
        self.pool._close_all_for_shutdown()

    def __repr__(self) -> str:
        return f"AsyncEngine({self.url!r})"


def create_async_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
    """Create an :class:`AsyncEngine`; keywords as :func:`lambda_pool.create_engine`.

    A URL whose driver is blocking-only (``sqlite://``) raises ``ArgumentError``
    pointing to ``create_engine``.  Nothing connects until the first checkout.
    """
    parts = build_engine_parts(url, kwargs, is_async=True)
    assert isinstance(parts.dialect, AsyncDialect)
    engine = AsyncEngine(
        parts.url,
        parts.dialect,
        parts.pool,
        parts.pool_events,
        credentials=parts.credentials,
        echo=parts.echo,
        logging_name=parts.logging_name,
        transaction_pooling=parts.transaction_pooling,
    )
    from lambda_pool.lifecycle import register

    register(engine)
    return engine
