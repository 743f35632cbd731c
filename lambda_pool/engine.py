"""The blocking engine: ``create_engine``, ``Engine``, ``Connection`` (results: ``Result``).

``create_engine()`` takes SQLAlchemy's keywords and defaults to ``NullPool``: each
``engine.connect()`` opens a connection and ``close()`` ends it, which is what a
short-lived Lambda container wants.  ``Connection.execute()`` takes SQL text with
psycopg-style placeholders (``%s``, ``%(name)s``) on every driver.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from lambda_pool.dialects.base import SyncDialect
from lambda_pool.engine_setup import build_engine_parts, engine_logger
from lambda_pool.exc import InvalidRequestError, ResourceClosedError
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.event import EventRegistry
    from lambda_pool.pool import Pool, PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = ["Connection", "Engine", "Result", "Transaction", "create_engine"]

Params = Sequence[Any] | Mapping[str, Any] | None


class Transaction:
    """An explicit transaction on a :class:`Connection`: ``commit()``, ``rollback()``, ``with``."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self._active = True

    @property
    def is_active(self) -> bool:
        return self._active

    def commit(self) -> None:
        if self._active:
            self._active = False
            self._connection._end_transaction(self, commit=True)

    def rollback(self) -> None:
        if self._active:
            self._active = False
            self._connection._end_transaction(self, commit=False)

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


class Connection:
    """A checked-out connection: ``execute()``, ``commit()``, ``rollback()``, ``close()``.

    The driver opens a transaction on the first statement (psycopg's rule, which the
    asyncpg dialect follows too); ``commit()`` ends it, ``close()`` returns the
    connection to the pool, which rolls back whatever was left uncommitted.  A
    disconnect during ``execute()`` invalidates the connection (the pool drops it)
    and the driver's error is raised; after ``rollback()`` the next statement checks
    out a new connection.
    """

    def __init__(self, engine: Engine, proxy: PoolProxiedConnection) -> None:
        self._engine = engine
        self._proxy: PoolProxiedConnection | None = proxy
        self._closed = False
        self._invalidated = False
        self._transaction: Transaction | None = None

    # --- state -------------------------------------------------------------------------

    @property
    def engine(self) -> Engine:
        return self._engine

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def invalidated(self) -> bool:
        """True after a disconnect or ``invalidate()``, until ``rollback()`` reconnects."""
        return self._invalidated

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

    def in_transaction(self) -> bool:
        return self._transaction is not None and self._transaction.is_active

    def _live(self) -> PoolProxiedConnection:
        if self._closed:
            raise ResourceClosedError("This Connection is closed")
        if self._invalidated:
            raise InvalidRequestError(
                "This Connection was invalidated (its database connection was lost); "
                "call rollback() to continue with a new one, or close() it"
            )
        if self._proxy is None:
            self._proxy = self._engine.pool.connect()
        return self._proxy

    # --- statements --------------------------------------------------------------------

    def execute(self, statement: str, parameters: Params = None) -> Result:
        """Run one SQL statement (psycopg-style placeholders) and return its rows."""
        if not isinstance(statement, str):
            raise InvalidRequestError(
                f"execute() takes SQL text (str), got {type(statement).__name__}"
            )
        proxy = self._live()
        dbapi = proxy.dbapi_connection
        self._engine._log_statement(statement)
        dialect = self._engine.dialect
        try:
            outcome = dialect.execute(dbapi, statement, parameters)
        except Exception as exc:
            if dialect.is_disconnect(exc, dbapi):
                self._invalidate(exc)
            raise
        return Result(
            outcome.keys, outcome.rows, outcome.rowcount, returns_rows=outcome.returns_rows
        )

    def exec_driver_sql(self, statement: str, parameters: Params = None) -> Result:
        """SQLAlchemy's name for running SQL text: the same as :meth:`execute`."""
        return self.execute(statement, parameters)

    def commit(self) -> None:
        """Commit the current transaction (nothing happens when none is open)."""
        self._finish(commit=True)

    def rollback(self) -> None:
        """Roll back; after an invalidation this also lets the connection reconnect."""
        if self._closed:
            raise ResourceClosedError("This Connection is closed")
        if self._invalidated:
            self._invalidated = False
            self._transaction = None
            return
        self._finish(commit=False)

    def _finish(self, *, commit: bool) -> None:
        proxy = self._live()
        dbapi = proxy.dbapi_connection
        dialect = self._engine.dialect
        self._transaction = None
        try:
            if commit:
                dialect.do_commit(dbapi)
            else:
                dialect.do_rollback(dbapi)
        except Exception as exc:
            if dialect.is_disconnect(exc, dbapi):
                self._invalidate(exc)
            raise

    def begin(self) -> Transaction:
        """Start an explicit transaction: ``with conn.begin(): ...`` commits or rolls back."""
        self._live()
        if self.in_transaction():
            raise InvalidRequestError(
                "a transaction is already begun on this Connection; commit or roll it back first"
            )
        self._transaction = Transaction(self)
        return self._transaction

    def _end_transaction(self, transaction: Transaction, *, commit: bool) -> None:
        if transaction is not self._transaction:
            return
        if self._closed or self._invalidated:
            self._transaction = None
            return
        self._finish(commit=commit)

    # --- ending ------------------------------------------------------------------------

    def _invalidate(self, exc: BaseException | None) -> None:
        proxy, self._proxy = self._proxy, None
        self._invalidated = True
        self._transaction = None
        if proxy is not None:
            proxy.invalidate(exc)

    def invalidate(self, exception: BaseException | None = None) -> None:
        """Close the database connection now and drop it from the pool."""
        if self._closed:
            raise ResourceClosedError("This Connection is closed")
        if not self._invalidated:
            self._invalidate(exception)

    def close(self) -> None:
        """Return the connection to the pool (which rolls back open work). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._transaction = None
        proxy, self._proxy = self._proxy, None
        if proxy is not None:
            proxy.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("invalidated" if self._invalidated else "open")
        return f"<Connection {state} {self._engine!r}>"


class Engine:
    """A URL, a dialect and a pool: hands out :class:`Connection` objects.

    ``engine.pool`` is the current pool; ``dispose()`` closes its idle connections and
    replaces it with a fresh one (same class, arguments and listeners), so the next
    ``connect()`` opens new connections.  Listeners registered with
    ``event.listen(engine, ...)`` live on the engine and reach every pool it makes.
    """

    def __init__(
        self,
        url: URL,
        dialect: SyncDialect,
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
        #: Engine-level pool listeners (``lambda_pool.event`` finds them here).
        self.pool_events = pool_events
        self.credentials = credentials
        self.echo = echo
        self.logging_name = logging_name
        #: True when connections go through a transaction-pooling proxy (PgBouncer
        #: transaction mode, RDS Proxy) and the driver prepares no statements.
        self.transaction_pooling = transaction_pooling
        self._logger = engine_logger(logging_name, echo)

    def _log_statement(self, statement: str) -> None:
        # Parameters are never logged: they may hold secrets or personal data.
        if self._logger.isEnabledFor(logging.INFO):
            self._logger.info("%s", statement)

    @property
    def name(self) -> str:
        return self.dialect.name

    @property
    def driver(self) -> str:
        return self.dialect.driver

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

        Connections checked out now are closed when returned.  ``close=False`` leaves
        the old pool's connections alone (e.g. in a forked child: the parent owns them).
        """
        old = self.pool
        if close:
            old.dispose()
        self.pool = old.recreate()

    def dispose_for_shutdown(self) -> None:
        """Close every connection now, idle and checked out: the process is ending.

        Called by ``lambda_pool.lifecycle`` at SIGTERM, at exit and before a SnapStart
        snapshot (see its docstring for the contract).  Synchronous and lock-free: it may
        run while the interrupted code holds the pool's lock, and Lambda kills the
        process about half a second after SIGTERM.  Each server session gets a proper
        goodbye instead of lingering until a timeout.  Safe to call twice; the engine
        stays usable (the next checkout reconnects).
        """
        self.pool._close_all_for_shutdown()

    def __repr__(self) -> str:
        return f"Engine({self.url!r})"


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
      limits) is tried again up to ``connect_retries`` times, sleeping a random time up
      to ``backoff * 2**retry`` (capped at 2 s; no retry after 10 s in all); then the
      driver's error propagates.  Other errors, authentication failures included, are
      never retried this way.  ``connect_retry_random`` (a ``[0, 1)`` source) and
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
    parts = build_engine_parts(url, kwargs, is_async=False)
    assert isinstance(parts.dialect, SyncDialect)
    engine = Engine(
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
