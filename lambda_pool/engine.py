"""The blocking engine: ``create_engine``, ``Engine``, ``Connection`` (results: ``Result``).

``create_engine()`` takes SQLAlchemy's keywords and defaults to ``NullPool``: each
``engine.connect()`` opens a connection and ``close()`` ends it, which is what a
short-lived Lambda container wants.  ``Connection.execute()`` takes SQL text with
psycopg-style placeholders (``%s``, ``%(name)s``) on every driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lambda_pool import deadlines
from lambda_pool.dialects.base import SyncDialect
from lambda_pool.engine_core import (
    ConnectionCore,
    ConnOp,
    EngineBase,
    Params,
    Proc,
    Step,
    TransactionCore,
    run_sync,
)
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.pool import PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = ["Connection", "Engine", "Result", "Transaction", "create_engine"]


class Transaction(TransactionCore):
    """An explicit transaction on a :class:`Connection`: ``commit()``, ``rollback()``, ``with``."""

    def commit(self) -> None:
        run_sync(self._g_end(commit=True), self._connection_perform)

    def rollback(self) -> None:
        run_sync(self._g_end(commit=False), self._connection_perform)

    def _connection_perform(self, step: Step) -> Any:
        assert isinstance(self._connection, Connection)
        return self._connection._perform(step)

    def __enter__(self) -> Transaction:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.rollback()


class Connection(ConnectionCore["Engine"]):
    """A checked-out connection: ``execute()``, ``commit()``, ``rollback()``, ``close()``.

    The driver opens a transaction on the first statement (psycopg's rule, which the
    asyncpg dialect follows too); ``commit()`` ends it, ``close()`` returns the
    connection to the pool, which rolls back whatever was left uncommitted.  A
    disconnect during ``execute()`` invalidates the connection (the pool drops it)
    and the driver's error is raised; after ``rollback()`` the next statement checks
    out a new connection.  The rules live in
    :class:`lambda_pool.engine_core.ConnectionCore`, shared with ``AsyncConnection``.
    """

    _kind = "Connection"
    _rollback_verb = "call"
    _begun_hint = "commit or roll it back first"

    # --- the shell: perform each step directly -------------------------------------------

    def _run(self, proc: Proc[Any]) -> Any:
        return run_sync(proc, self._perform)

    def _perform(self, step: Step) -> Any:
        op, arg = step
        if op is ConnOp.CHECKOUT:
            return self._engine.pool.connect()
        if op is ConnOp.EXECUTE:
            return self._engine.dialect.execute(*arg)
        if op is ConnOp.COMMIT:
            return self._engine.dialect.do_commit(arg)
        if op is ConnOp.ROLLBACK:
            return self._engine.dialect.do_rollback(arg)
        if op is ConnOp.INVALIDATE:
            proxy, exc = arg
            return proxy.invalidate(exc)
        if op is ConnOp.CLOSE:
            # The pool resets the connection on return (rollback, DISCARD ALL).
            with deadlines.step("reset on return"):
                return arg.close()
        raise AssertionError(op)  # pragma: no cover - every ConnOp is handled

    def _live(self) -> PoolProxiedConnection:
        proxy: PoolProxiedConnection = self._run(self._g_live())
        return proxy

    # --- state -------------------------------------------------------------------------

    @property
    def connection(self) -> PoolProxiedConnection:
        """The pool's proxy of the DB-API connection (checks out a new one after rollback)."""
        return self._live()

    @property
    def driver_connection(self) -> Any:
        """The driver's own connection object (``psycopg.Connection``, ``sqlite3.Connection``)."""
        return self._live().driver_connection

    @property
    def info(self) -> dict[Any, Any]:
        """Per-connection user data (the pool record's ``info``)."""
        return self._live().info

    # --- statements --------------------------------------------------------------------

    def execute(self, statement: str, parameters: Params = None) -> Result:
        """Run one SQL statement (psycopg-style placeholders) and return its rows."""
        result: Result = self._run(self._g_execute(statement, parameters))
        return result

    def exec_driver_sql(self, statement: str, parameters: Params = None) -> Result:
        """SQLAlchemy's name for running SQL text: the same as :meth:`execute`."""
        return self.execute(statement, parameters)

    def commit(self) -> None:
        """Commit the current transaction (nothing happens when none is open)."""
        self._run(self._g_finish(commit=True))

    def rollback(self) -> None:
        """Roll back; after an invalidation this also lets the connection reconnect."""
        self._run(self._g_rollback())

    def begin(self) -> Transaction:
        """Start an explicit transaction: ``with conn.begin(): ...`` commits or rolls back."""
        self._live()
        return self._new_transaction(Transaction)

    # --- ending ------------------------------------------------------------------------

    def invalidate(self, exception: BaseException | None = None) -> None:
        """Close the database connection now and drop it from the pool."""
        self._run(self._g_invalidate_requested(exception))

    def close(self) -> None:
        """Return the connection to the pool (which rolls back open work). Idempotent."""
        self._run(self._g_close())

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Engine(EngineBase[SyncDialect]):
    """A URL, a dialect and a pool: hands out :class:`Connection` objects.

    ``engine.pool`` is the current pool; ``dispose()`` closes its idle connections and
    replaces it with a fresh one (same class, arguments and listeners), so the next
    ``connect()`` opens new connections.  Listeners registered with
    ``event.listen(engine, ...)`` live on the engine and reach every pool it makes.
    """

    _is_async = False
    _kind = "Engine"

    def connect(self) -> Connection:
        """Check a connection out; use it as a context manager or ``close()`` it."""
        return Connection(self, self.pool.connect())

    def raw_connection(self) -> PoolProxiedConnection:
        """The pool's proxy of a DB-API connection; ``close()`` returns it to the pool."""
        return self.pool.connect()

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """``with engine.begin() as conn``: commit on success, roll back on error, close."""
        with self.connect() as connection, connection.begin():
            yield connection

    def dispose(self, close: bool = True) -> None:
        """Close idle connections (``close=True``) and start over with a fresh pool.

        Connections checked out now are closed when returned (and at shutdown, by
        ``dispose_for_shutdown``).  ``close=False`` leaves the old pool's connections
        alone (e.g. in a forked child: the parent owns them).
        """
        old = self.__dict__.get("pool")
        if old is None:
            return  # the pool is built at first use: none has opened a connection yet
        if close:
            old._retire()
        self.pool = old.recreate()


def create_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create a blocking :class:`Engine` for ``url`` (``postgresql://``, ``sqlite://``).

    Keywords (SQLAlchemy's): ``poolclass``, ``pool``, ``creator``, ``connect_args``,
    ``pool_size``, ``max_overflow``, ``pool_timeout``, ``pool_recycle``,
    ``pool_pre_ping``, ``pool_reset_on_return``, ``pool_use_lifo``,
    ``pool_logging_name``, ``echo_pool``, ``echo``, ``logging_name``; and lambda-pool's:

    * ``credentials`` (a credential provider) and ``recycle_on_credentials_expiry``
      (default ``True``).  RDS IAM credentials need TLS: a ``sslmode`` of ``disable``,
      ``allow`` or ``prefer`` (URL or ``connect_args``) raises ``ArgumentError``.
    * ``connect_retries`` (default 3; 0 = off) and ``connect_retry_backoff`` (seconds,
      default 0.1): a connect refused for lack of connection slots ("too many clients",
      a role's ``CONNECTION LIMIT``, PgBouncer's ``max_client_conn``, RDS Proxy's
      limits) is tried again, sleeping a random time up to ``backoff * 2**retry``
      (capped at 2 s).  Inside a deadline (``with_connection``, ``lambda_pool.deadline``)
      it is retried while one more attempt fits before the deadline, then
      :class:`~lambda_pool.exc.CapacityExhaustedError` is raised; without one, up to
      ``connect_retries`` times (no retry after 10 s in all), then the driver's error
      propagates.  Other errors, authentication failures included, are never retried
      this way.  ``connect_retry_random`` (a ``[0, 1)`` source) and
      ``connect_retry_sleep`` replace ``random.random`` and ``time.sleep`` (tests).
    * ``transaction_pooling`` (default ``False``; also ``?transaction_pooling=true`` in
      the URL): the URL points at PgBouncer in transaction mode or RDS Proxy, so the
      driver must not prepare server-side statements (psycopg ``prepare_threshold=None``,
      asyncpg ``statement_cache_size=0``).

    The pool is ``NullPool`` unless ``poolclass``/``pool`` says otherwise or
    ``pool_size``/``max_overflow``/``pool_timeout`` ask for ``QueuePool``; an
    in-memory SQLite URL gets ``SingletonThreadPool``.  Nothing connects until the
    first ``connect()``.  Bad arguments raise ``lambda_pool.exc.ArgumentError``.
    """
    return Engine._create(url, kwargs)
