"""What the sync and async engines share: connection state, procedures, engine basics.

``Connection`` (:mod:`lambda_pool.engine`) and ``AsyncConnection``
(:mod:`lambda_pool.asyncio`) differ only in how they perform I/O, so every procedure
(execute, commit, rollback, begin/end of an explicit transaction, invalidate, close) is
written once here, as a generator that keeps the state (closed, invalidated, the open
transaction), decides what happens after a disconnect, and yields a :class:`ConnOp`
whenever it needs I/O.  The sync shell performs each step with :func:`run_sync`, the
async shell awaits it with :func:`run_async`: the pool's technique and the pool's own
runners (:func:`lambda_pool._drive.drive`, ``drive_async``).  :class:`EngineBase`
holds what both engines are made of (URL, dialect, pool, listeners, logging) and how
they are built from ``create_engine`` keywords.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from lambda_pool._drive import drive as run_sync
from lambda_pool._drive import drive_async as run_async
from lambda_pool._record import Constant, StaticGeneric
from lambda_pool._registry import register
from lambda_pool.dialects.base import AsyncDialect, SyncDialect
from lambda_pool.engine_setup import ConnectWrapper, build_engine_parts, engine_logger
from lambda_pool.exc import InvalidRequestError, ResourceClosedError
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.event import EventRegistry
    from lambda_pool.pool import Pool, PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = [
    "ConnOp",
    "ConnectionCore",
    "EngineBase",
    "Params",
    "TransactionCore",
    "run_async",
    "run_sync",
]

Params = Sequence[Any] | Mapping[str, Any] | None

T = TypeVar("T")
if TYPE_CHECKING:
    # Only type checkers see these (the generic bases below name them as strings): a
    # TypeVar with a bound compiles it at import.
    D = TypeVar("D", bound="SyncDialect | AsyncDialect")
    E = TypeVar("E", bound="EngineBase[Any]")
    EngineT = TypeVar("EngineT", bound="EngineBase[Any]")


class ConnOp(Constant):
    """An I/O step a connection procedure asks its shell to perform."""

    __slots__ = ()

    CHECKOUT: ClassVar[ConnOp]  # arg None -> a PoolProxiedConnection from the engine's pool
    EXECUTE: ClassVar[ConnOp]  # arg (dbapi, statement, parameters) -> ExecResult
    COMMIT: ClassVar[ConnOp]  # arg dbapi
    ROLLBACK: ClassVar[ConnOp]  # arg dbapi
    INVALIDATE: ClassVar[ConnOp]  # arg (proxy, exception or None)
    CLOSE: ClassVar[ConnOp]  # arg proxy: return it to the pool


ConnOp._define(
    CHECKOUT="checkout",
    EXECUTE="execute",
    COMMIT="commit",
    ROLLBACK="rollback",
    INVALIDATE="invalidate",
    CLOSE="close",
)


Step = tuple[ConnOp, Any]
Proc = Generator[Step, Any, T]


class TransactionCore:
    """State of an explicit transaction; the shells add ``commit()``/``rollback()``."""

    def __init__(self, connection: ConnectionCore[Any]) -> None:
        self._connection = connection
        self._active = True

    @property
    def is_active(self) -> bool:
        return self._active

    def _g_end(self, *, commit: bool) -> Proc[None]:
        if self._active:
            self._active = False
            yield from self._connection._g_end_transaction(self, commit=commit)


class ConnectionCore(StaticGeneric["E"]):
    """A checked-out connection's state and procedures, with no I/O of its own.

    Rules (both shells): the driver opens a transaction with the first statement and
    ``commit()`` ends it; a disconnect during a statement, commit or rollback
    invalidates the connection (the pool drops it) and the driver's error propagates;
    after that ``rollback()`` clears the state and the next statement checks out a new
    connection; ``close()`` returns the connection to the pool and is idempotent.
    """

    #: The class name used in messages and ``repr``.
    _kind: ClassVar[str]
    #: How the user calls ``rollback()`` ("call" or "await"), for the invalidated message.
    _rollback_verb: ClassVar[str]
    #: The end of the "a transaction is already begun" message.
    _begun_hint: ClassVar[str]

    def __init__(self, engine: E, proxy: PoolProxiedConnection | None) -> None:
        self._engine = engine
        self._proxy: PoolProxiedConnection | None = proxy
        self._closed = False
        self._invalidated = False
        self._transaction: TransactionCore | None = None
        # A transaction is open on the driver (a statement ran, or begin()) and no
        # commit or rollback ended it yet: close() rolls it back first (SQLAlchemy's).
        self._begun = False

    # --- state -------------------------------------------------------------------------

    @property
    def engine(self) -> E:
        return self._engine

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def invalidated(self) -> bool:
        """True after a disconnect or ``invalidate()``, until ``rollback()`` reconnects."""
        return self._invalidated

    def in_transaction(self) -> bool:
        return self._transaction is not None and self._transaction.is_active

    def _check_open(self) -> None:
        if self._closed:
            raise ResourceClosedError(f"This {self._kind} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._invalidated:
            raise InvalidRequestError(
                f"This {self._kind} was invalidated (its database connection was lost); "
                f"{self._rollback_verb} rollback() to continue with a new one, or close() it"
            )

    def _new_transaction(self, transaction: Callable[[Any], T]) -> T:
        if self.in_transaction():
            raise InvalidRequestError(
                f"a transaction is already begun on this {self._kind}; {self._begun_hint}"
            )
        created = transaction(self)
        assert isinstance(created, TransactionCore)
        self._transaction = created
        self._begun = True
        return created

    # --- procedures --------------------------------------------------------------------

    def _g_live(self) -> Proc[PoolProxiedConnection]:
        """The checked-out proxy; checks one out after ``rollback()`` of an invalidation."""
        self._check_usable()
        if self._proxy is None:
            self._proxy = yield ConnOp.CHECKOUT, None
        return self._proxy

    def _g_guarded(self, op: ConnOp, arg: Any, dbapi: Any) -> Proc[Any]:
        """Perform ``op``; a disconnect invalidates the connection, the error propagates."""
        try:
            return (yield op, arg)
        except Exception as exc:
            if self._engine.dialect.is_disconnect(exc, dbapi):
                yield from self._g_invalidate(exc)
            raise

    def _g_execute(self, statement: str, parameters: Params) -> Proc[Result]:
        if not isinstance(statement, str):
            raise InvalidRequestError(
                f"execute() takes SQL text (str), got {type(statement).__name__}; for "
                "SQLAlchemy's text() and Core constructs use SQLAlchemy's own engine with "
                "lambda-pool's behaviour: lambda_pool.sqlalchemy.create_engine(url) or "
                "?plugin=lambda_pool in the URL"
            )
        proxy = yield from self._g_live()
        dbapi = proxy.dbapi_connection
        self._engine._log_statement(statement)
        self._begun = True
        outcome = yield from self._g_guarded(ConnOp.EXECUTE, (dbapi, statement, parameters), dbapi)
        return Result(
            outcome.keys, outcome.rows, outcome.rowcount, returns_rows=outcome.returns_rows
        )

    def _g_finish(self, *, commit: bool) -> Proc[None]:
        proxy = yield from self._g_live()
        dbapi = proxy.dbapi_connection
        self._transaction = None
        self._begun = False
        yield from self._g_guarded(ConnOp.COMMIT if commit else ConnOp.ROLLBACK, dbapi, dbapi)

    def _g_rollback(self) -> Proc[None]:
        self._check_open()
        if self._invalidated:
            # The lost connection is gone already: forget it, reconnect on next use.
            self._invalidated = False
            self._transaction = None
            return
        yield from self._g_finish(commit=False)

    def _g_end_transaction(self, transaction: TransactionCore, *, commit: bool) -> Proc[None]:
        if transaction is not self._transaction:
            return
        if self._closed or self._invalidated:
            self._transaction = None
            return
        yield from self._g_finish(commit=commit)

    def _g_invalidate(self, exc: BaseException | None) -> Proc[None]:
        proxy, self._proxy = self._proxy, None
        self._invalidated = True
        self._transaction = None
        self._begun = False
        if proxy is not None:
            yield ConnOp.INVALIDATE, (proxy, exc)

    def _g_invalidate_requested(self, exception: BaseException | None) -> Proc[None]:
        self._check_open()
        if not self._invalidated:
            yield from self._g_invalidate(exception)

    def _g_close(self) -> Proc[None]:
        if self._closed:
            return
        self._closed = True
        self._transaction = None
        begun, self._begun = self._begun, False
        proxy, self._proxy = self._proxy, None
        if proxy is None:
            return
        try:
            if begun:
                # SQLAlchemy's order: roll back, then the pool's reset is told the
                # transaction was reset (a failed rollback leaves it to the pool).
                yield ConnOp.ROLLBACK, proxy.dbapi_connection
                proxy._transaction_reset = True
        except Exception:
            pass
        finally:
            yield ConnOp.CLOSE, proxy

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("invalidated" if self._invalidated else "open")
        return f"<{self._kind} {state} {self._engine!r}>"


# Held only while an engine builds its pool at first use (two threads must not each build one).
_pool_build_lock = threading.Lock()


class _PoolAtFirstUse:
    """``engine.pool`` of an engine whose default pool is built when first used.

    It sits on a private subclass of the engine's class (same name, nothing else added;
    see :func:`_pending_pool_class`) that the engine has until then.  The first access
    builds the pool (importing :mod:`lambda_pool.pool`), stores it in the instance's
    ``__dict__`` and turns the engine back into an instance of its public class, where
    ``pool`` is a plain instance attribute.  So ``create_engine`` does not load the pool
    machinery, and the public classes carry no descriptor: one there would keep every
    checkout's ``engine.pool`` read from being specialised by the interpreter.
    """

    def __get__(self, engine: EngineBase[Any] | None, owner: type | None = None) -> Any:
        if engine is None:
            return self
        with _pool_build_lock:
            pool = engine.__dict__.get("pool")
            if pool is None:
                factory = engine._pool_factory
                assert factory is not None
                pool = engine.__dict__["pool"] = factory()
                engine._pool_factory = None
            public: type[EngineBase[Any]] = getattr(type(engine), "_public_class", type(engine))
            engine.__class__ = public
        return pool


_pending_pool_classes: dict[type, type] = {}


def _pending_pool_class(cls: type[EngineBase[Any]]) -> type[EngineBase[Any]]:
    """``cls`` with :class:`_PoolAtFirstUse` as ``pool``: an engine's class until its pool
    is built (same name, module and layout, so ``__class__`` can be set back)."""
    pending = _pending_pool_classes.get(cls)
    if pending is None:
        pending = type(
            cls.__name__,
            (cls,),
            {
                "__slots__": (),
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
                "pool": _PoolAtFirstUse(),
                "_public_class": cls,
            },
        )
        _pending_pool_classes[cls] = pending
    return pending


class EngineBase(StaticGeneric["D"]):
    """A URL, a dialect (``D``) and a pool; the shells add ``connect()`` and ``dispose()``.

    ``engine.pool`` is the current pool; ``dispose()`` replaces it with a fresh one
    (same class, arguments and listeners).  Listeners registered with
    ``event.listen(engine, ...)`` live on the engine and reach every pool it makes.
    A default pool (no pool keywords) is built at the first access of ``engine.pool``
    (see :class:`_PoolAtFirstUse`).
    """

    pool: Pool

    #: Whether the dialect's I/O methods are coroutines (which factory builds it).
    _is_async: ClassVar[bool]
    #: ``event.listen(Engine, ...)`` on the class reaches every pool (SQLAlchemy's rule).
    _pool_events_reach_every_pool: ClassVar[bool] = True
    #: The name ``repr`` shows.
    _kind: ClassVar[str]

    def __init__(
        self,
        url: URL,
        dialect: D,
        pool: Pool | None,
        pool_events: EventRegistry,
        *,
        pool_factory: Callable[[], Pool] | None = None,
        credentials: CredentialProvider | None = None,
        echo: bool | str = False,
        logging_name: str | None = None,
        transaction_pooling: bool = False,
        connect_wrappers: list[ConnectWrapper] | None = None,
    ) -> None:
        self.url = url
        self.dialect = dialect
        # Without a pool, pool_factory builds it at the first use of self.pool.
        self._pool_factory = pool_factory
        if pool is not None:
            self.pool = pool
        elif pool_factory is None:
            raise TypeError("an engine needs a pool or a pool_factory")
        else:
            self.__class__ = _pending_pool_class(type(self))
        #: Engine-level pool listeners (``lambda_pool.event`` finds them here).
        self.pool_events = pool_events
        self.credentials = credentials
        self.echo = echo
        self.logging_name = logging_name
        #: True when connections go through a transaction-pooling proxy (PgBouncer
        #: transaction mode, RDS Proxy) and the driver prepares no statements.
        self.transaction_pooling = transaction_pooling
        #: Context-manager factories entered around each new connection (observability
        #: times connects with one); see :class:`lambda_pool.engine_setup.ConnectAttempt`.
        #: Only engines that built their pool's creator use them (not ``pool=``).
        self.connect_wrappers: list[ConnectWrapper] = (
            connect_wrappers if connect_wrappers is not None else []
        )
        self._logger = engine_logger(logging_name, echo)

    @classmethod
    def _create(cls: type[EngineT], url: str | URL, kwargs: Mapping[str, Any]) -> EngineT:
        """Build from ``create_engine``/``create_async_engine`` keywords and register it
        for disposal at shutdown (``lambda_pool.lifecycle``, whose registry
        :mod:`lambda_pool._registry` is)."""
        parts = build_engine_parts(url, kwargs, is_async=cls._is_async)
        assert parts.dialect.is_async == cls._is_async
        dialect: Any = parts.dialect
        engine = cls(
            parts.url,
            dialect,
            parts.pool,
            parts.pool_events,
            pool_factory=parts.pool_factory,
            credentials=parts.credentials,
            echo=parts.echo,
            logging_name=parts.logging_name,
            transaction_pooling=parts.transaction_pooling,
            connect_wrappers=parts.connect_wrappers,
        )
        register(engine)
        return engine

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

    def dispose_for_shutdown(self) -> None:
        """Close every connection now, idle and checked out: the process is ending.

        Called by ``lambda_pool.lifecycle`` at SIGTERM, at exit and before a SnapStart
        snapshot (see its docstring for the contract).  Synchronous, lock-free and
        loop-free: it may run while the interrupted code holds the pool's lock, the
        event loop an async connection was opened on is usually gone, and Lambda kills
        the process about half a second after SIGTERM.  Connections are closed with the
        driver's terminate where it has one (psycopg ``pgconn.finish()``, asyncpg
        ``terminate()``), so each server session gets a proper goodbye instead of
        lingering until a timeout.  Safe to call twice; the engine stays usable (the
        next checkout reconnects).
        """
        pool = self.__dict__.get("pool")
        if pool is not None:  # a pool never built has no connection to close
            pool._close_all_for_shutdown()

    def __repr__(self) -> str:
        return f"{self._kind}({self.url!r})"
