"""The pool machinery: ``Pool``, connection records, checked-out proxies, and the two shells.

Every pool procedure (checkout, return, invalidate, detach, dispose) is written once,
as a generator that makes its decisions through :mod:`lambda_pool.pool.core` and yields
an :class:`~lambda_pool.pool.core.Op` whenever it needs I/O.  Thin shells run those
generators: ``_run_sync`` performs each step directly (threads wait on a
``threading.Condition``), ``_run_async`` awaits it (callers wait on asyncio futures),
and ``_run_nowait`` serves the few sync entry points of an async pool (``invalidate()``,
``dispose()``, garbage collection) by scheduling closes instead of awaiting them.  The
sync and async modes therefore share one source of truth for accounting, ordering of
events and error handling.

A pool's mode comes from its creator: ``async def creator()`` (or a dialect with
``is_async = True``) makes an async pool, used with ``await pool.aconnect()``.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import logging
import os
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_pool import deadlines, event
from lambda_pool._record import FrozenRecord
from lambda_pool.exc import (
    DeadlineExceededError,
    DisconnectionError,
    InvalidRequestError,
    ResourceClosedError,
)
from lambda_pool.exc import (
    TimeoutError as PoolTimeoutError,
)
from lambda_pool.pool import core
from lambda_pool.pool.core import Acquire, Op, Stale, Step
from lambda_pool.pool.dialect import AsyncDefaultDialect, DefaultDialect, idle_probe

if TYPE_CHECKING:  # pragma: no cover - asyncio is imported where an async pool needs it
    import asyncio

T = TypeVar("T")
Proc = Generator[Step, Any, T]

# How many connections a checkout tries before giving up on DisconnectionErrors
# (SQLAlchemy's number).
CHECKOUT_ATTEMPTS = 2

# Reinitialised in a forked child: a thread of the parent may have held it at fork time.
_fork_lock = threading.Lock()

# Forks this process descends from, counted in the child.  A pool remembers the count
# it last saw: while it is unchanged the pool cannot be in a forked child, so checkout
# and return skip ``os.getpid()`` (a system call each time).
_forks = 0


def _after_fork_in_child() -> None:
    global _fork_lock, _forks
    _fork_lock = threading.Lock()
    _forks += 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


class PoolResetState(FrozenRecord):
    """Describes the reset a returning connection gets (argument of the ``reset`` event)."""

    __slots__ = _fields = ("transaction_was_reset", "terminate_only", "asyncio_safe")

    transaction_was_reset: bool
    """The caller already ended the transaction (the pool does not roll back again)."""
    terminate_only: bool
    """The connection is being dropped, not returned (no rollback is attempted)."""
    asyncio_safe: bool
    """The reset may use the connection's I/O (False while garbage-collecting an async one)."""

    def __init__(
        self, transaction_was_reset: bool, terminate_only: bool, asyncio_safe: bool
    ) -> None:
        object.__setattr__(self, "transaction_was_reset", transaction_was_reset)
        object.__setattr__(self, "terminate_only", terminate_only)
        object.__setattr__(self, "asyncio_safe", asyncio_safe)


class _PrePingDisconnect(DisconnectionError):
    """The pre-ping found the connection dead: the whole pool is marked invalidated."""

    invalidate_pool = True


_ECHO_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class _EchoLogger:
    """Logs to ``lambda_pool.pool`` (``.<logging_name>``); ``echo`` forces INFO or DEBUG."""

    _LEVELS: dict[bool | str, int] = {False: logging.NOTSET, True: logging.INFO}

    def __init__(self, echo: bool | str, logging_name: str | None) -> None:
        name = "lambda_pool.pool" + (f".{logging_name}" if logging_name else "")
        self.logger = logging.getLogger(name)
        self.level = logging.DEBUG if echo == "debug" else self._LEVELS.get(echo, logging.INFO)
        # echo="debug" logs DEBUG whatever the logger's level (see log()).
        self.debug_forced = self.level == logging.DEBUG
        if echo and not self.logger.handlers:
            # What echo=True promises: output without configuring logging first.
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            self.logger.addHandler(handler)

    def log(self, level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
        forced = self.level != logging.NOTSET and level >= self.level
        if forced or self.logger.isEnabledFor(level):
            record = self.logger.makeRecord(
                self.logger.name,
                level,
                __file__,
                0,
                msg,
                args,
                sys.exc_info() if exc_info else None,
            )
            self.logger.handle(record)

    def debug(self, msg: str, *args: Any) -> None:
        if self.debug_forced or self.logger.isEnabledFor(logging.DEBUG):
            self.log(logging.DEBUG, msg, *args)

    def info(self, msg: str, *args: Any) -> None:
        self.log(logging.INFO, msg, *args)

    def error(self, msg: str, *args: Any, exc_info: bool = False) -> None:
        self.log(logging.ERROR, msg, *args, exc_info=exc_info)


class ConnectionPoolEntry:
    """One slot of a pool and the DB-API connection it currently holds (a "record").

    ``info`` belongs to the physical connection and is emptied when the slot
    reconnects; ``record_info`` belongs to the slot and survives invalidation.
    """

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._epoch = pool._epoch
        self.dbapi_connection: Any = None
        self.starttime = 0.0
        self.soft_invalidate_time = 0.0
        self.fresh = False
        self._info: dict[Any, Any] | None = None
        self._record_info: dict[Any, Any] | None = None

    @property
    def info(self) -> dict[Any, Any]:
        if self._info is None:
            self._info = {}
        return self._info

    @property
    def record_info(self) -> dict[Any, Any]:
        if self._record_info is None:
            self._record_info = {}
        return self._record_info

    @property
    def driver_connection(self) -> Any:
        if self.dbapi_connection is None:
            return None
        return self._pool._dialect.get_driver_connection(self.dbapi_connection)

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        """Hard: close the connection now (the slot reconnects later). Soft: at next checkout."""
        self._pool._run_here(self._pool._g_invalidate(self, e, soft))

    async def ainvalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        await self._pool._run_async(self._pool._g_invalidate(self, e, soft))

    def __repr__(self) -> str:
        return f"<ConnectionPoolEntry at {id(self):#x}; {self.dbapi_connection!r}>"


#: SQLAlchemy's historical name for a connection record.
_ConnectionRecord = ConnectionPoolEntry


class PoolProxiedConnection:
    """A checked-out connection: forwards to the DB-API connection, returns it on ``close()``."""

    # Defaults on the class: a checkout sets only the two attributes below (every
    # checkout makes a proxy), the others are written when they change.
    _detached: Any = None  # the DB-API connection once detach() ran
    _detached_info: dict[Any, Any] | None = None
    _closed = False
    _nested = 1  # SingletonThreadPool hands the same proxy to nested checkouts
    # The engine's Connection rolled back before close(): no second rollback.
    _transaction_reset = False
    #: The statements that reset the session, to send in the same message as the
    #: final ``COMMIT``: set by a pool that resets that way (the warm pool's quick
    #: checkout); ``with_connection`` then sends them and gives the connection back
    #: with the pool's ``return_after_session_reset``.
    session_reset_with_commit: str | None = None

    def __init__(self, pool: Pool, record: ConnectionPoolEntry) -> None:
        self._pool = pool
        self._record: ConnectionPoolEntry | None = record

    # --- the connection ---------------------------------------------------------------

    @property
    def dbapi_connection(self) -> Any:
        if self._closed:
            return None
        if self._record is None:
            return self._detached
        return self._record.dbapi_connection

    @property
    def driver_connection(self) -> Any:
        dbapi = self.dbapi_connection
        return None if dbapi is None else self._pool._dialect.get_driver_connection(dbapi)

    @property
    def is_valid(self) -> bool:
        return self.dbapi_connection is not None

    @property
    def is_detached(self) -> bool:
        return self._record is None and not self._closed

    @property
    def record(self) -> ConnectionPoolEntry | None:
        return self._record

    @property
    def info(self) -> dict[Any, Any]:
        if self._record is None:
            if self._detached_info is None:
                self._detached_info = {}
            return self._detached_info
        return self._record.info

    @property
    def record_info(self) -> dict[Any, Any] | None:
        return None if self._record is None else self._record.record_info

    def _live(self) -> Any:
        dbapi = self.dbapi_connection
        if dbapi is None:
            raise ResourceClosedError(
                "This pooled connection is closed (or was invalidated); "
                "check out a new one with pool.connect()"
            )
        return dbapi

    def __getattr__(self, name: str) -> Any:
        # Only called for names not found on the proxy: forward to the DB-API connection.
        if name.startswith("__") or name in _PROXY_SLOTS:
            raise AttributeError(name)
        return getattr(self._live(), name)

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        return self._live().cursor(*args, **kwargs)

    # --- giving it back ----------------------------------------------------------------

    def close(self, *, transaction_was_reset: bool = False) -> None:
        """Return the connection to the pool (reset first). A second call does nothing."""
        if self._closed:
            return
        if self._pool._is_async:
            raise InvalidRequestError(
                "This connection belongs to an async pool: use 'await proxy.aclose()'"
            )
        self._nested -= 1  # _release_nested(), inline: this is every return's path
        if self._nested > 0:
            return
        self._pool._return_sync(self, transaction_was_reset or self._transaction_reset)

    async def aclose(self, *, transaction_was_reset: bool = False) -> None:
        """``close()`` for either mode, awaiting the reset and close of an async connection."""
        if self._closed or self._release_nested():
            return
        if self._pool._is_async:
            await self._pool._return_async(self, transaction_was_reset or self._transaction_reset)
        else:
            self._pool._return_sync(self, transaction_was_reset or self._transaction_reset)

    def _release_nested(self) -> bool:
        self._nested -= 1
        return self._nested > 0

    def invalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        """Hard: close the connection now and return the slot. Soft: replace at next checkout."""
        if self._closed:
            return
        self._pool._run_here(self._pool._g_invalidate_proxy(self, e, soft))

    async def ainvalidate(self, e: BaseException | None = None, soft: bool = False) -> None:
        if self._closed:
            return
        await self._pool._run_any(self._pool._g_invalidate_proxy(self, e, soft))

    def detach(self) -> None:
        """Take the connection out of the pool: its slot is free now; close() closes it."""
        if self._closed or self._record is None:
            return
        self._pool._detach(self)

    # --- context managers and garbage collection ---------------------------------------

    def __enter__(self) -> PoolProxiedConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def __aenter__(self) -> PoolProxiedConnection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        if self._closed:  # a class default: set even if __init__ never ran
            return
        with contextlib.suppress(Exception):
            self._pool._collect(self)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("detached" if self._record is None else "open")
        return f"<PoolProxiedConnection {state} {self.dbapi_connection!r}>"


_PROXY_SLOTS = frozenset(vars(PoolProxiedConnection)) | {
    "_pool",
    "_record",
    "_detached",
    "_detached_info",
    "_closed",
    "_nested",
    "_transaction_reset",
}

#: SQLAlchemy's historical name for the checked-out proxy.
_ConnectionFairy = PoolProxiedConnection


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop, without importing asyncio when nothing else has."""
    if "asyncio" not in sys.modules:  # nobody imported asyncio: no loop can be running
        return None
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: Seconds :meth:`Pool._close_all_for_shutdown` waits, all connections together, for cancel
#: requests to statements still running before it closes their connections.  Part of
#: ``lambda_pool.lifecycle``'s SIGTERM budget (0.4 s by default, inside Lambda's ~500 ms
#: grace period); 0 skips cancelling (the backend then runs the statement to its end).
SHUTDOWN_CANCEL_TIMEOUT_S = 0.2


def _copied(items: weakref.WeakSet[Any]) -> list[Any]:
    """A list copy of a weak set another thread (or a collection) may change meanwhile."""
    for _ in range(5):
        try:
            return list(items)
        except RuntimeError:
            continue
    return []


def _cancel_for_shutdown(
    do_cancel: Callable[[Any, float], bool | None], connections: list[Any], timeout: float
) -> int:
    """Send a cancel request to each connection's running statement; return how many went.

    ``do_cancel(dbapi, timeout)`` is the dialect's.  One helper thread per connection,
    all joined against one deadline of ``timeout`` seconds, so neither several busy
    connections nor a cancel path without its own bound (libpq < 17, async connections)
    can make shutdown wait longer.  A cancel that did not finish in time is abandoned
    (its daemon thread ends with the process).
    """
    if timeout <= 0:
        return 0
    sent: list[Any] = []
    errors: list[str] = []

    def cancel(dbapi: Any) -> None:
        try:
            # A user dialect's do_cancel may return None: it sent the request.
            if do_cancel(dbapi, timeout) is not False:
                sent.append(dbapi)
        except Exception as exc:  # the connection is closed right after anyway
            errors.append(type(exc).__name__)

    threads = [
        threading.Thread(target=cancel, args=(dbapi,), name="lambda-pool-cancel", daemon=True)
        for dbapi in connections
    ]
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if errors:
        logging.getLogger(__name__).warning(
            "lambda-pool: cancelling %d running statement(s) at shutdown failed: %s",
            len(errors),
            ", ".join(sorted(set(errors))),
        )
    return len(sent)


class Pool(abc.ABC):
    """Base of every pool class: a creator, a dialect, listeners, and the shared procedures.

    Abstract: a pool class says how it keeps connections by returning its slot policy
    from :meth:`_make_slots` (see :mod:`lambda_pool.pool.core`).
    """

    def __init__(
        self,
        creator: Callable[[], Any],
        *,
        recycle: float = -1,
        echo: bool | str | None = False,
        logging_name: str | None = None,
        reset_on_return: bool | str | None = True,
        events: event.EventRegistry | None = None,
        dialect: Any = None,
        pre_ping: bool = False,
    ) -> None:
        if not callable(creator):
            raise core.ArgumentError(
                f"Invalid creator {creator!r}; accepted: a function returning a DB-API "
                "connection (or an async function returning an async connection)"
            )
        self._creator = creator
        self._recycle = core.check_recycle(recycle)
        self.echo = core.check_echo(echo)
        self.logging_name = logging_name
        self._reset_on_return = core.check_reset_on_return(reset_on_return)
        self._pre_ping = bool(pre_ping)
        self._is_async = inspect.iscoroutinefunction(creator) or bool(
            getattr(dialect, "is_async", False)
        )
        if dialect is None:
            dialect = AsyncDefaultDialect() if self._is_async else DefaultDialect()
        self._dialect: Any = dialect
        self._dialect_async = bool(getattr(dialect, "is_async", False))
        self._engine_events = events
        self._instance_events = event.EventRegistry()
        self._listener_cache: dict[str, list[Any]] = {}
        self._listener_generation = -1
        self._logger = _EchoLogger(self.echo, logging_name)
        # Keyword arguments recreate() passes on; subclasses add theirs.
        self._kwargs: dict[str, Any] = {
            "recycle": recycle,
            "echo": echo,
            "logging_name": logging_name,
            "reset_on_return": reset_on_return,
            "dialect": dialect,
            "pre_ping": pre_ping,
        }
        self._timeout: float | None = None
        self._invalidate_time = 0.0
        self._first_connect_done = False
        self._first_connect_lock = threading.Lock()
        # Pools this one replaced (engine.dispose() -> recreate()), kept weakly: their
        # checked-out connections are closed with this pool's at shutdown.
        self._predecessors: weakref.WeakSet[Pool] = weakref.WeakSet()
        self._pid = os.getpid()
        self._forks_seen = _forks
        self._epoch = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._sync_waiters = 0  # threads in self._cond.wait(): nobody to notify when 0
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._background: set[asyncio.Task[None]] = set()
        # Every record this pool made that is still referenced (by the slots or by a
        # checked-out proxy): what _close_all_for_shutdown() walks without the lock.
        self._records: weakref.WeakSet[ConnectionPoolEntry] = weakref.WeakSet()
        self._slots: core.Slots[ConnectionPoolEntry] = self._make_slots()
        # Whether the slot policy acts on ready(): when it does not (QueuePool, NullPool…),
        # a checkout takes the lock once, not twice.  A waiter woken with nothing changed
        # would only wait again, so skipping that notify changes nothing.
        self._slots_ready = type(self._slots).ready is not core.Slots.ready
        # StaticPool's slots (returns of a connection others still use skip the reset),
        # found once here rather than by an isinstance() check at every return.
        self._static_slots = self._slots if isinstance(self._slots, core.StaticSlots) else None
        # The quick paths (see _take_idle and _return_quickly) make the procedures'
        # decisions inline when a checkout or return needs no I/O; only for the pool
        # classes whose procedures are these ones (WarmPool, say, adds its own steps).
        cls = type(self)
        self._quick_checkout = (
            type(self._slots) is core.QueueSlots
            and cls._g_checkout is Pool._g_checkout
            and cls._g_prepare is Pool._g_prepare
        )
        self._quick_return = (
            self._static_slots is None
            and cls._g_checkin is Pool._g_checkin
            and cls._g_reset is Pool._g_reset
        )
        # A rollback that would send nothing (no transaction open) is skipped only with
        # lambda-pool's dialects, whose do_rollback is the driver's rollback(): a
        # user's dialect still sees every call.
        self._skip_idle_rollback = type(dialect).__module__.startswith("lambda_pool.")
        self._idle_probes: dict[type, Callable[[Any], bool] | None] = {}

    # --- subclass hooks -----------------------------------------------------------------

    @abc.abstractmethod
    def _make_slots(self) -> core.Slots[ConnectionPoolEntry]:
        """The slot policy deciding checkouts and returns for this pool class."""

    # --- public API ---------------------------------------------------------------------

    @property
    def dialect(self) -> Any:
        return self._dialect

    @property
    def is_async(self) -> bool:
        """True when the creator is a coroutine function: use ``aconnect``/``adispose``."""
        return self._is_async

    def connect(self) -> PoolProxiedConnection:
        """Check a connection out (sync pools)."""
        if self._is_async:
            raise InvalidRequestError("This pool has an async creator: use 'await pool.aconnect()'")
        taken = self._checkout_quickly()
        if taken is None:
            return self._run_sync(self._g_checkout())
        if isinstance(taken, PoolProxiedConnection):
            return taken
        record, proxy, raised = taken
        return self._run_sync(self._g_hand_out(Acquire.TAKE, record, proxy, raised))

    async def aconnect(self) -> PoolProxiedConnection:
        """Check a connection out (async pools)."""
        if not self._is_async:
            raise InvalidRequestError("This pool has a sync creator: use 'pool.connect()'")
        taken = self._checkout_quickly()
        if taken is None:
            return await self._run_async(self._g_checkout())
        if isinstance(taken, PoolProxiedConnection):
            return taken
        record, proxy, raised = taken
        return await self._run_async(self._g_hand_out(Acquire.TAKE, record, proxy, raised))

    def dispose(self) -> None:
        """Close every idle connection; checked-out ones are handled when they come back."""
        self._run_here(self._g_dispose())

    async def adispose(self) -> None:
        await self._run_any(self._g_dispose())

    def _retire(self) -> None:
        """``dispose()`` for a pool being replaced (``engine.dispose()``): idle connections
        are closed now and checked-out ones when they come back, instead of staying idle
        in a pool nobody checks out from until it is garbage-collected."""
        self._run_here(self._g_dispose(retire=True))

    async def _aretire(self) -> None:
        await self._run_any(self._g_dispose(retire=True))

    def _close_all_for_shutdown(self) -> int:
        """Close every connection of this pool, idle **and** checked out; return how many.

        For process shutdown (SIGTERM, SnapStart snapshot; see ``lambda_pool.lifecycle``):
        synchronous, needs no event loop and takes no lock, because it may run while the
        interrupted code holds the pool's lock (or a connection's).  Each connection is
        detached from its record and closed by :meth:`_terminate`: the dialect's
        ``do_terminate`` (no driver lock, no await), else ``do_close``.  No pool event fires:
        listeners may take locks the interrupted code holds.  The accounting is left as
        it is, so the pool stays usable: a record without a connection reconnects at its
        next checkout, and a checked-out one is returned as usual (its user sees a closed
        connection).  Calling it again finds nothing left to close.  In a forked child
        that never used the pool, the connections are the parent's and are left alone.

        A connection busy executing a statement (the dialect's ``is_executing``) is sent
        the dialect's ``do_cancel`` first (at most :data:`SHUTDOWN_CANCEL_TIMEOUT_S` for
        all of them together; a dialect without both only terminates), because PostgreSQL
        notices a closed client only when the statement ends: closing alone would leave
        the backend running the query to its end.  Idle connections are closed before
        any cancel is attempted, so a slow cancel never keeps them open.
        """
        if os.getpid() != self._pid:
            return 0
        # This pool's connections, then those still out of the pools it replaced
        # (engine.dispose() while connections were checked out).
        pools: list[Pool] = [self, *_copied(self._predecessors)]
        busy: list[tuple[Pool, Any]] = []
        closed = 0
        for pool in pools:
            do_cancel = getattr(pool._dialect, "do_cancel", None)
            for record in _copied(pool._records):
                dbapi = record.dbapi_connection
                if dbapi is None or record._epoch != pool._epoch:
                    continue
                record.dbapi_connection = None
                closed += 1
                if callable(do_cancel) and pool._is_executing(dbapi):
                    busy.append((pool, dbapi))
                else:
                    pool._terminate_for_shutdown(dbapi)
        if busy:
            by_connection = {id(dbapi): pool for pool, dbapi in busy}

            def do_cancel_any(dbapi: Any, timeout: float) -> bool | None:
                cancel: Callable[[Any, float], bool | None] = by_connection[
                    id(dbapi)
                ]._dialect.do_cancel
                return cancel(dbapi, timeout)

            cancelled = _cancel_for_shutdown(
                do_cancel_any, [dbapi for _, dbapi in busy], SHUTDOWN_CANCEL_TIMEOUT_S
            )
            for pool, dbapi in busy:
                pool._terminate_for_shutdown(dbapi)
            self._logger.info(
                "Cancelled %d of %d running statement(s) at shutdown", cancelled, len(busy)
            )
        if closed:
            self._logger.info("Closed %d connection(s) for shutdown", closed)
        return closed

    def _is_executing(self, dbapi: Any) -> bool:
        is_executing = getattr(self._dialect, "is_executing", None)
        if not callable(is_executing):
            return False
        try:
            return bool(is_executing(dbapi))
        except Exception:  # unreadable: the connection is only terminated
            return False

    def _terminate_for_shutdown(self, dbapi: Any) -> None:
        try:
            self._terminate(dbapi)
        except Exception:
            self._logger.error("Exception closing connection %r at shutdown", dbapi)

    def _terminate(self, dbapi: Any) -> None:
        """Close ``dbapi`` without awaiting or a lock: the dialect's ``do_terminate``; a
        sync dialect without one ``do_close``; an async one without one nothing (its
        connection is released when collected).  Raises what the dialect raises."""
        terminate = getattr(self._dialect, "do_terminate", None)
        if callable(terminate):
            terminate(dbapi)
        elif not self._dialect_async:
            self._dialect.do_close(dbapi)

    def recreate(self) -> Pool:
        """A new, unconnected pool of the same class, arguments and listeners."""
        self._logger.info("Pool recreating")
        new = type(self)(self._creator, events=self._engine_events, **self._kwargs)
        new._instance_events = self._instance_events.copy()
        # Weakly: a replaced pool lives only while a connection of it is still out.
        new._predecessors.update(_copied(self._predecessors))
        new._predecessors.add(self)
        return new

    def size(self) -> int:
        return self._slots.size()

    def checkedin(self) -> int:
        return self._slots.checkedin()

    def checkedout(self) -> int:
        return self._slots.checkedout()

    def overflow(self) -> int:
        return self._slots.overflow()

    def timeout(self) -> float | None:
        return self._timeout

    def status(self) -> str:
        return (
            f"Pool size: {self.size()}  Connections in pool: {self.checkedin()} "
            f"Current Overflow: {self.overflow()} "
            f"Current Checked out connections: {self.checkedout()}"
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.status()}>"

    # --- events -------------------------------------------------------------------------

    def _listeners(self, name: str) -> list[Any]:
        """The listeners of event ``name`` for this pool, in firing order (often empty:
        callers test that before building the event's arguments)."""
        # Read straight from the module: this runs several times per checkout and return.
        if event._generation == self._listener_generation:
            found = self._listener_cache.get(name)
            if found is not None:
                return found
        return self._merge_listeners(name)

    def _merge_listeners(self, name: str) -> list[Any]:
        generation = event.generation()
        if generation != self._listener_generation:
            self._listener_cache = {}
            self._listener_generation = generation
        found = self._listener_cache.get(name)
        if found is None:
            class_level: list[Any] = []
            for klass in type(self).__mro__:
                registry = event.class_registry(klass)
                if registry is not None:
                    class_level.extend(registry.listeners(name))
            class_level.sort(key=lambda item: item.order)
            # The engine's and the pool's own listeners form one group, in
            # registration order (SQLAlchemy keeps both on the pool instance).
            own = self._instance_events.listeners(name)
            if self._engine_events is not None:
                own = own + self._engine_events.listeners(name)
                own.sort(key=lambda item: item.order)
            found = class_level + own
            self._listener_cache[name] = found
        return found

    def _fire(self, name: str, *args: Any) -> None:
        for listener in self._listeners(name):
            listener(*args)

    # --- shells -------------------------------------------------------------------------

    def _run_sync(self, proc: Proc[T]) -> T:
        return core.drive(proc, self._perform_sync)

    def _perform_sync(self, step: Step) -> Any:
        op, arg = step
        if op is Op.ROLLBACK:  # the step of every return: first
            return self._dialect.do_rollback(arg)
        if op is Op.CONNECT:
            return self._creator()
        if op is Op.WAIT:
            version, seconds = arg
            with self._cond:
                if self._slots.version == version:
                    self._sync_waiters += 1
                    try:
                        self._cond.wait(seconds)
                    finally:
                        self._sync_waiters -= 1
            return None
        return self._dialect_call(op, arg)

    def _dialect_call(self, op: Op, dbapi: Any) -> Any:
        if op is Op.PING:
            return self._dialect.do_ping(dbapi)
        if op is Op.ROLLBACK:
            return self._dialect.do_rollback(dbapi)
        if op is Op.COMMIT:
            return self._dialect.do_commit(dbapi)
        if op is Op.CLOSE:
            return self._dialect.do_close(dbapi)
        if op is Op.TERMINATE:
            return self._terminate(dbapi)
        raise AssertionError(op)  # pragma: no cover - every Op is handled

    async def _run_async(self, proc: Proc[T]) -> T:
        return await core.drive_async(proc, self._perform_async)

    async def _perform_async(self, step: Step) -> Any:
        op, arg = step
        if op is Op.CONNECT:
            connection = self._creator()
            if inspect.isawaitable(connection):
                connection = await connection
            return connection
        if op is Op.WAIT:
            # Imported here: blocking users never pay for asyncio at cold start.
            import asyncio

            version, seconds = arg
            loop = asyncio.get_running_loop()
            future: asyncio.Future[None] = loop.create_future()
            with self._lock:
                if self._slots.version != version:
                    return None
                self._async_waiters.append((loop, future))
            try:
                await asyncio.wait_for(future, seconds)
            except asyncio.TimeoutError:
                pass
            finally:
                with self._lock:
                    if (loop, future) in self._async_waiters:
                        self._async_waiters.remove((loop, future))
            return None
        if op is Op.TERMINATE:  # nothing awaited: the task may be cancelled already
            return self._terminate(arg)
        result = self._dialect_call(op, arg)
        if self._dialect_async:
            result = await result
        return result

    async def _run_any(self, proc: Proc[T]) -> T:
        """Async entry points accept sync pools too (they then run without awaiting)."""
        if self._is_async:
            return await self._run_async(proc)
        return self._run_sync(proc)

    def _run_here(self, proc: Proc[T]) -> T:
        """Sync entry points of either mode: an async pool schedules its closes."""
        if self._is_async:
            return self._run_nowait(proc)
        return self._run_sync(proc)

    def _run_nowait(self, proc: Proc[T]) -> T:
        return core.drive(proc, self._perform_nowait)

    def _perform_nowait(self, step: Step) -> None:
        op, arg = step
        if op is Op.TERMINATE:
            self._terminate(arg)
            return
        if op is not Op.CLOSE:
            raise InvalidRequestError(
                f"An async pool cannot {op.value} without awaiting: use the 'a…' method"
            )
        self._close_soon(arg)

    def _close_soon(self, dbapi: Any) -> None:
        """Close an async connection from sync code: a task if a loop runs, else terminate."""
        loop = running_loop()
        if loop is not None and self._dialect_async:
            task = loop.create_task(self._close_quietly(dbapi))
            self._background.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._background.discard)
            return
        try:
            self._terminate(dbapi)
        except Exception:
            self._logger.error("Exception terminating connection %r", dbapi, exc_info=True)

    async def _close_quietly(self, dbapi: Any) -> None:
        try:
            await self._dialect.do_close(dbapi)
        except Exception:
            self._logger.error("Exception closing connection %r", dbapi, exc_info=True)

    def _notify_locked(self) -> None:
        """Wake every waiter (threads and tasks); each re-checks the slots. Hold the lock."""
        if self._sync_waiters:
            self._cond.notify_all()
        if not self._async_waiters:
            return
        waiters, self._async_waiters = self._async_waiters, []
        for loop, future in waiters:
            # A closed loop raises RuntimeError: nobody is waiting on it any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_wake, future)

    # --- fork safety --------------------------------------------------------------------

    def _check_fork(self) -> None:
        """In a forked child, forget the parent's connections without touching their sockets."""
        forks = _forks
        pid = os.getpid()
        if pid == self._pid:
            self._forks_seen = forks
            return
        with _fork_lock:
            if pid == self._pid:
                return
            # The parent's lock may have been held by a thread that does not exist here.
            self._lock = threading.Lock()
            self._cond = threading.Condition(self._lock)
            self._first_connect_lock = threading.Lock()
            self._sync_waiters = 0
            self._async_waiters = []
            dropped = self._slots.forget_all()
            self._epoch += 1
            self._pid = pid
            self._forks_seen = forks
        for record in dropped:
            # Dropped, never closed: closing would end the parent's session (psycopg sends
            # Terminate on the shared socket); the drivers skip that when collected here.
            record.dbapi_connection = None
        self._logger.info("Process %d forked from the pool's: parent connections dropped", pid)

    # --- procedures (shared by every shell) ---------------------------------------------

    def _new_record(self) -> ConnectionPoolEntry:
        record = ConnectionPoolEntry(self)
        self._records.add(record)
        return record

    def _g_checkout(self) -> Proc[PoolProxiedConnection]:
        if _forks != self._forks_seen:
            self._check_fork()
        started = time.monotonic()
        deadline: core.Deadline | None = None  # made when the checkout has to wait
        # The invocation's deadline (lambda_pool.deadline(), @with_connection) bounds
        # the wait too: a Lambda function that waits past it is killed mid-request.
        invocation: deadlines.Deadline | None = None
        started_with = 0.0
        key = threading.get_ident()
        while True:
            with self._lock:
                kind, record = self._slots.acquire(self._new_record, key)
                version = self._slots.version
            if kind is not Acquire.WAIT:
                break
            if deadline is None:
                deadline = core.Deadline(started, self._timeout)
                invocation = deadlines.current()
                if invocation is not None:
                    started_with = invocation.remaining()
            now = time.monotonic()
            if deadline.expired(now):
                raise PoolTimeoutError(self._timeout_message())
            wait = deadline.remaining(now)
            if invocation is not None:
                left = invocation.remaining()
                if left <= 0:
                    raise self._checkout_deadline_error(invocation, started_with)
                if wait is None or left < wait:
                    wait = left
            yield Op.WAIT, (version, wait)
        assert record is not None
        proxy = PoolProxiedConnection(self, record)
        return (yield from self._g_hand_out(kind, record, proxy))

    def _g_hand_out(
        self,
        kind: Acquire,
        record: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
        raised: BaseException | None = None,
    ) -> Proc[PoolProxiedConnection]:
        """Prepare an acquired record and hand it out; on failure the slot comes back.
        ``raised``: what the quick path's ``checkout`` listeners raised (see
        :meth:`_hand_out_quickly`), handled as the procedure would have."""
        try:
            if kind is not Acquire.SHARED:
                if raised is None:
                    yield from self._g_prepare(record, proxy)
                else:
                    yield from self._g_prepare(record, proxy, raised=raised)
            else:
                # A second user of StaticPool's one connection: SQLAlchemy fires
                # ``checkout`` for it too (no staleness check or ping: it is in use).
                self._fire("checkout", record.dbapi_connection, record, proxy)
        except BaseException as exc:
            proxy._closed = True
            try:
                if record.dbapi_connection is not None:
                    yield from self._g_invalidate(record, exc)
            except Exception:
                self._logger.error("Exception invalidating after a failed checkout")
            finally:
                # Whatever interrupted the clean-up, the slot comes back.
                with self._lock:
                    if kind is Acquire.NEW:
                        self._slots.discard(record)
                    else:
                        self._slots.release(record)
                    self._slots.ready(record)
                    self._notify_locked()
            raise
        static = self._static_slots
        if static is not None:
            # The newest proxy is the one whose garbage collection returns the record.
            with self._lock:
                static.checked_out_by(id(proxy))
        if kind is not Acquire.SHARED and self._slots_ready:
            with self._lock:
                self._slots.ready(record)
                self._notify_locked()
        self._logger.debug("Connection %r checked out from pool", record.dbapi_connection)
        return proxy

    def _timeout_message(self) -> str:
        return core.timeout_message(0, 0, self._timeout)

    def _checkout_deadline_error(
        self, invocation: deadlines.Deadline, started_with: float
    ) -> DeadlineExceededError:
        """The pool's timeout message, cut short by the invocation's deadline: a
        :class:`DeadlineExceededError` of step ``"checkout"`` (no connection was taken,
        none is discarded), so handlers that catch running out of time catch this too."""
        left_ms = max(0, int(started_with * 1000))
        return DeadlineExceededError(
            f"{self._timeout_message()}; the wait was cut short by the {invocation.source}: "
            f"the checkout began waiting with {left_ms} ms left and no connection came "
            "back in time. Return connections sooner, raise pool_size or max_overflow, "
            "or give the function more time",
            step="checkout",
            remaining_ms=left_ms,
        )

    # --- quick paths: the procedures' decisions, inline, when no I/O is needed ----------

    def _checkout_quickly(
        self,
    ) -> (
        PoolProxiedConnection
        | tuple[ConnectionPoolEntry, PoolProxiedConnection, BaseException | None]
        | None
    ):
        """QueuePool's checkout of an idle record that is neither stale nor to be pinged:
        ``acquire()`` and :meth:`_g_prepare`'s decisions inline, then ``checkout``.

        Returns the proxy when done; ``None`` when there is no idle record (the
        procedure connects, waits or times out); ``(record, proxy, raised)`` when the
        record needs the procedure (``raised`` None: replace or ping it) or a
        ``checkout`` listener raised ``raised`` (the procedure handles it as its own).
        """
        if not self._quick_checkout or _forks != self._forks_seen:
            return None
        slots: core.QueueSlots[ConnectionPoolEntry] = self._slots  # type: ignore[assignment]
        with self._lock:
            idle = slots.idle
            if not idle:
                return None
            record = idle.pop() if slots.use_lifo else idle.popleft()
            slots.out += 1
        proxy = PoolProxiedConnection(self, record)
        dbapi = record.dbapi_connection
        starttime = record.starttime
        if (
            self._pre_ping
            or dbapi is None
            or (self._recycle > -1 and time.time() - starttime > self._recycle)
            or self._invalidate_time > starttime
            or record.soft_invalidate_time > starttime
        ):
            return record, proxy, None
        record.fresh = False
        listeners = self._listeners("checkout")
        if listeners:
            try:
                for listener in listeners:
                    listener(dbapi, record, proxy)
            except BaseException as exc:
                return record, proxy, exc
        logger = self._logger
        if logger.debug_forced or logger.logger.isEnabledFor(logging.DEBUG):
            logger.debug("Connection %r checked out from pool", dbapi)
        return proxy

    def _quick_record(self, proxy: PoolProxiedConnection) -> ConnectionPoolEntry | None:
        """The record to return on the quick path, with the proxy closed; ``None`` when
        the general procedure (:meth:`_g_checkin`) must run instead."""
        record = proxy._record
        if (
            record is None
            or not self._quick_return
            or _forks != self._forks_seen
            or record._epoch != self._epoch
            or record.dbapi_connection is None
        ):
            return None
        proxy._closed = True
        return record

    def _quick_reset_step(
        self, record: ConnectionPoolEntry, dbapi: Any, transaction_was_reset: bool
    ) -> Any:
        """Fire ``reset`` and say which reset I/O the caller performs (``None``: none)."""
        listeners = self._listeners("reset")
        if listeners:
            self._fire_reset(listeners, dbapi, record, transaction_was_reset)
        return self._reset_step(dbapi, transaction_was_reset)

    def _quick_checkin(self, record: ConnectionPoolEntry, dbapi: Any) -> bool:
        """Fire ``checkin`` and give the slot back; whether the connection is kept."""
        listeners = self._listeners("checkin")
        try:
            for listener in listeners:
                listener(dbapi, record)
        finally:
            with self._lock:
                keep = self._slots.release(record)
                if self._sync_waiters or self._async_waiters:
                    self._notify_locked()
        return keep

    # The quick return is written out for each mode (not as a generator run by
    # drive()/drive_async()): it is the pool's hottest path, and only its two I/O calls
    # differ, so everything else lives in the three helpers above.

    def _return_sync(self, proxy: PoolProxiedConnection, transaction_was_reset: bool) -> None:
        """:meth:`_g_checkin` for a sync pool, the common case inline."""
        record = self._quick_record(proxy)
        if record is None:
            self._run_sync(self._g_checkin(proxy, transaction_was_reset))
            return
        dbapi = record.dbapi_connection
        try:
            step = self._quick_reset_step(record, dbapi, transaction_was_reset)
            if step is not None:
                self._perform_sync((step, dbapi))
        except BaseException as exc:
            self._run_sync(self._g_reset_failed(record, exc))
            return
        if not self._quick_checkin(record, dbapi):
            self._run_sync(self._g_close_connection(record))

    async def _return_async(
        self, proxy: PoolProxiedConnection, transaction_was_reset: bool
    ) -> None:
        """:meth:`_return_sync` for an async pool: the reset's I/O awaited."""
        record = self._quick_record(proxy)
        if record is None:
            await self._run_async(self._g_checkin(proxy, transaction_was_reset))
            return
        dbapi = record.dbapi_connection
        try:
            step = self._quick_reset_step(record, dbapi, transaction_was_reset)
            if step is not None:
                await self._perform_async((step, dbapi))
        except BaseException as exc:
            await self._run_async(self._g_reset_failed(record, exc))
            return
        if not self._quick_checkin(record, dbapi):
            await self._run_async(self._g_close_connection(record))

    @staticmethod
    def _fire_reset(
        listeners: list[Any],
        dbapi: Any,
        record: ConnectionPoolEntry | None,
        transaction_was_reset: bool,
    ) -> None:
        state = PoolResetState(
            transaction_was_reset=transaction_was_reset,
            terminate_only=False,
            asyncio_safe=True,
        )
        for listener in listeners:
            listener(dbapi, record, state)

    def _g_prepare(
        self,
        record: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
        *,
        raised: BaseException | None = None,
    ) -> Proc[None]:
        """Replace a stale connection, ping, fire ``checkout`` (retrying on a disconnect).
        ``raised``: the quick path checked staleness and ran the listeners, which raised
        this; the procedure takes over from there."""
        reason = (
            None
            if raised is not None
            else core.stale_reason(
                now=time.time(),
                has_connection=record.dbapi_connection is not None,
                starttime=record.starttime,
                recycle=self._recycle,
                pool_invalidated_at=self._invalidate_time,
                soft_invalidated_at=record.soft_invalidate_time,
            )
        )
        if reason is not None:
            if reason is not Stale.NO_CONNECTION:
                self._logger.info(
                    "Connection %r %s: closing and reconnecting",
                    record.dbapi_connection,
                    reason.value,
                )
                yield from self._g_close_connection(record)
            yield from self._g_connect(record)
        attempts = CHECKOUT_ATTEMPTS
        while True:
            fresh, record.fresh = record.fresh, False
            try:
                if raised is not None:
                    first, raised = raised, None
                    raise first
                if self._pre_ping and not fresh:
                    yield from self._g_ping(record)
                self._fire("checkout", record.dbapi_connection, record, proxy)
                return
            except DisconnectionError as exc:
                attempts -= 1
                self._logger.info(
                    "Disconnection detected on checkout, invalidating %s: %r",
                    "all pooled connections prior to this timestamp"
                    if getattr(exc, "invalidate_pool", False)
                    else "individual connection",
                    exc,
                )
                if getattr(exc, "invalidate_pool", False):
                    self._invalidate_time = time.time()
                yield from self._g_invalidate(record, exc)
                if attempts <= 0:
                    raise InvalidRequestError(
                        f"Reconnection attempts exhausted on checkout ({CHECKOUT_ATTEMPTS} "
                        f"connections were found disconnected); last error: {exc!r}"
                    ) from exc
                yield from self._g_connect(record)

    def _g_ping(self, record: ConnectionPoolEntry) -> Proc[None]:
        dbapi = record.dbapi_connection
        try:
            alive = yield Op.PING, dbapi
        except Exception as exc:
            if self._dialect.is_disconnect(exc, dbapi):
                raise _PrePingDisconnect(f"pre-ping failed: {exc}") from exc
            raise
        if not alive:
            raise _PrePingDisconnect("pre-ping reported the connection dead")

    def _g_connect(self, record: ConnectionPoolEntry) -> Proc[None]:
        dbapi = yield Op.CONNECT, None
        record.dbapi_connection = dbapi
        record.starttime = time.time()
        record.fresh = True
        record._info = None  # info belongs to the physical connection
        self._logger.debug("Created new connection %r", dbapi)
        try:
            if not self._first_connect_done:
                self._fire_first_connect(dbapi, record)
            self._fire("connect", dbapi, record)
        except BaseException:
            # A failing connect listener: the connection must not leak.
            record.dbapi_connection = None
            yield from self._g_close_dbapi(dbapi)
            raise

    def _fire_first_connect(self, dbapi: Any, record: ConnectionPoolEntry) -> None:
        """``first_connect`` exactly once per pool: threads connecting at the same time
        wait until it has run (SQLAlchemy's rule); a listener that raises lets the
        next connect try again."""
        with self._first_connect_lock:
            if self._first_connect_done:
                return
            self._fire("first_connect", dbapi, record)
            self._first_connect_done = True

    def _g_close_dbapi(self, dbapi: Any, op: Op = Op.CLOSE, verb: str = "closing") -> Proc[None]:
        """Close ``dbapi``: an ``Exception`` is logged and swallowed; an interruption
        (``KeyboardInterrupt``, cancellation) is logged and propagates (SQLAlchemy's rule)."""
        try:
            yield op, dbapi
        except Exception:
            self._logger.error("Exception %s connection %r", verb, dbapi, exc_info=True)
        except BaseException:
            self._logger.error("Exception %s connection %r", verb, dbapi, exc_info=True)
            raise

    def _g_close_connection(
        self, record: ConnectionPoolEntry, op: Op = Op.CLOSE, verb: str = "closing"
    ) -> Proc[None]:
        dbapi = record.dbapi_connection
        if dbapi is None:
            return
        # Forgotten first: a close that is interrupted is not retried, and the
        # connection is never handed out again.
        record.dbapi_connection = None
        self._logger.debug("Closing connection %r", dbapi)
        try:
            self._fire("close", dbapi, record)
        finally:
            yield from self._g_close_dbapi(dbapi, op, verb)

    def _g_invalidate(
        self,
        record: ConnectionPoolEntry,
        exc: BaseException | None,
        soft: bool = False,
        *,
        interrupted: bool = False,
    ) -> Proc[None]:
        dbapi = record.dbapi_connection
        if dbapi is None:
            return
        if soft:
            record.soft_invalidate_time = time.time()
            self._fire("soft_invalidate", dbapi, record, exc)
            self._logger.info("Soft invalidate connection %r (reason: %r)", dbapi, exc)
            return
        self._logger.info("Invalidate connection %r (reason: %r)", dbapi, exc)
        try:
            self._fire("invalidate", dbapi, record, exc)
        except BaseException:
            # The listener interrupted the invalidation before the close (SQLAlchemy's
            # order): the connection stays in its slot and is replaced at its next
            # checkout, never handed out again as it is.
            record.soft_invalidate_time = max(time.time(), record.starttime + 1e-6)
            raise
        # After an interruption nothing may be awaited: terminate (no I/O wait).
        yield from self._g_close_connection(
            record, Op.TERMINATE if interrupted else Op.CLOSE, "terminating"
        )

    def _g_invalidate_proxy(
        self, proxy: PoolProxiedConnection, exc: BaseException | None, soft: bool
    ) -> Proc[None]:
        record = proxy._record
        if record is None:  # detached: nothing in the pool to invalidate
            if not soft and proxy._detached is not None:
                dbapi, proxy._detached = proxy._detached, None
                proxy._closed = True
                yield from self._g_close_dbapi(dbapi, Op.CLOSE, "terminating")
            return
        if soft:
            yield from self._g_invalidate(record, exc, soft)
            return
        try:
            yield from self._g_invalidate(record, exc)
        finally:
            # Even when a listener or the close raised: the slot comes back, with no
            # reset (the connection is gone, or marked for replacement).
            proxy._nested = 1
            yield from self._g_checkin(proxy, False, reset=False)

    def _g_checkin(
        self,
        proxy: PoolProxiedConnection,
        transaction_was_reset: bool,
        *,
        reset: bool = True,
        collected: bool = False,
    ) -> Proc[None]:
        proxy._closed = True
        record = proxy._record
        if record is None:
            yield from self._g_close_detached(proxy, transaction_was_reset)
            return
        if _forks != self._forks_seen:
            self._check_fork()
        if record._epoch != self._epoch:
            record.dbapi_connection = None  # the parent's: drop it (see _check_fork)
            return
        fire_checkin = True
        static = self._static_slots
        if static is not None:
            # StaticPool: ``checkin`` fires once per use of its one record, as the
            # record's, not per proxy (see StaticSlots.end_use).
            with self._lock:
                reset, fire_checkin = static.end_use(id(proxy), collected, reset)
        dbapi = record.dbapi_connection
        if dbapi is not None and reset:
            try:
                yield from self._g_reset(dbapi, record, transaction_was_reset, False)
            except BaseException as exc:
                yield from self._g_reset_failed(record, exc, fire_checkin)
                return
        # The common return takes the quick path (_return_sync/_return_async); this
        # general one can afford the generator call.
        yield from self._g_release(record, fire_checkin)

    def _g_reset_failed(
        self, record: ConnectionPoolEntry, exc: BaseException, fire_checkin: bool = True
    ) -> Proc[None]:
        """The reset on return raised ``exc``: the caller is done with this connection,
        so a broken one is replaced, not reported; an interruption (KeyboardInterrupt, a
        cancelled task) still propagates, but only after the slot came back."""
        self._logger.error("Exception during reset or similar", exc_info=True)
        interrupted = not isinstance(exc, Exception)
        try:
            yield from self._g_invalidate(record, exc, interrupted=interrupted)
        finally:
            yield from self._g_release(record, fire_checkin)
        if interrupted:
            raise exc

    def _g_release(self, record: ConnectionPoolEntry, fire_checkin: bool = True) -> Proc[None]:
        """``checkin`` event, then the slot back to the pool (or closed if not kept)."""
        try:
            if fire_checkin:
                self._fire("checkin", record.dbapi_connection, record)
        finally:
            with self._lock:
                keep = self._slots.release(record)
                self._notify_locked()
            if not keep:
                yield from self._g_close_connection(record)

    def _g_reset(
        self,
        dbapi: Any,
        record: ConnectionPoolEntry | None,
        transaction_was_reset: bool,
        terminate_only: bool,
    ) -> Proc[None]:
        """The ``reset`` event, then rollback or commit; raises what they raise (the
        caller decides: invalidate a pooled connection, close a detached one)."""
        listeners = self._listeners("reset")
        if listeners:
            state = PoolResetState(
                transaction_was_reset=transaction_was_reset,
                terminate_only=terminate_only,
                asyncio_safe=True,
            )
            for listener in listeners:
                listener(dbapi, record, state)
        step = self._reset_step(dbapi, transaction_was_reset)
        if step is not None:
            yield step, dbapi

    def _reset_step(self, dbapi: Any, transaction_was_reset: bool) -> Op | None:
        """The I/O of the reset on return: SQLAlchemy's rules (a rollback is skipped when
        the caller already ended the transaction; a commit is not), and no rollback
        when the driver shows no transaction open (it would send nothing; the log line
        stays, as the reset is the same)."""
        mode = self._reset_on_return
        if mode == core.RESET_ROLLBACK:
            if transaction_was_reset:
                return None
            logger = self._logger
            if logger.debug_forced or logger.logger.isEnabledFor(logging.DEBUG):
                logger.debug("Connection %r being returned to pool; rollback", dbapi)
            if self._skip_idle_rollback:
                kind = type(dbapi)
                try:
                    probe = self._idle_probes[kind]
                except KeyError:
                    probe = self._idle_probes[kind] = idle_probe(kind)
                if probe is not None and probe(dbapi):
                    return None
            return Op.ROLLBACK
        if mode == core.RESET_COMMIT:
            self._logger.debug("Connection %r being returned to pool; commit", dbapi)
            return Op.COMMIT
        return None

    def _g_close_detached(
        self, proxy: PoolProxiedConnection, transaction_was_reset: bool
    ) -> Proc[None]:
        dbapi, proxy._detached = proxy._detached, None
        if dbapi is None:
            return
        interrupted = False
        try:
            # A detached connection is being dropped: terminate_only=True (SQLAlchemy's).
            yield from self._g_reset(dbapi, None, transaction_was_reset, True)
        except Exception:
            self._logger.error("Exception resetting a detached connection", exc_info=True)
        except BaseException:
            self._logger.error("Exception resetting a detached connection", exc_info=True)
            interrupted = True
            raise
        finally:
            # Closed even when the reset was interrupted: a detached connection has no
            # slot to come back to, so nothing else would ever close it.
            try:
                self._fire("close_detached", dbapi)
            finally:
                yield from self._g_close_dbapi(dbapi, Op.TERMINATE if interrupted else Op.CLOSE)

    def _detach(self, proxy: PoolProxiedConnection) -> None:
        record = proxy._record
        assert record is not None
        dbapi = record.dbapi_connection
        proxy._detached = dbapi
        proxy._detached_info = dict(record.info)
        proxy._record = None
        record.dbapi_connection = None
        with self._lock:
            if self._static_slots is not None:
                self._static_slots.end_use(id(proxy), False, False)
            # The emptied slot goes back to the pool at once (SQLAlchemy's order).
            self._slots.release(record)
            self._notify_locked()
        self._fire("detach", dbapi, record)

    def _g_dispose(self, *, retire: bool = False) -> Proc[None]:
        self._check_fork()
        with self._lock:
            if retire:
                self._slots.retire()
            idle = self._slots.drain_idle()
            self._notify_locked()
        for record in idle:
            yield from self._g_close_connection(record)
        self._logger.info("Pool disposed. %s", self.status())

    def _collect(self, proxy: PoolProxiedConnection) -> None:
        """A proxy was garbage-collected without being closed."""
        if not self._is_async:
            self._run_sync(self._g_checkin(proxy, False, collected=True))
            return
        warnings.warn(
            "An async pooled connection was garbage-collected without 'await "
            "proxy.aclose()'; it is detached and terminated, not returned. "
            "Close connections explicitly.",
            RuntimeWarning,
            stacklevel=2,
        )
        proxy._closed = True
        record = proxy._record
        if record is None:  # detached and never closed: nothing to reset
            dbapi, proxy._detached = proxy._detached, None
            if dbapi is not None:
                self._terminate_quietly(dbapi)
            return
        dbapi = record.dbapi_connection
        if dbapi is None:  # invalidated already: only the slot to give back
            self._run_nowait(self._g_checkin(proxy, False, reset=False, collected=True))
            return
        # SQLAlchemy's order without an event loop: reset (no rollback: nothing may be
        # awaited), detach (the slot comes back), close_detached, terminate.
        try:
            self._fire("reset", dbapi, record, PoolResetState(False, True, False))
        finally:
            try:
                self._detach(proxy)
            finally:
                proxy._detached = None
                try:
                    self._fire("close_detached", dbapi)
                finally:
                    self._terminate_quietly(dbapi)

    def _terminate_quietly(self, dbapi: Any) -> None:
        """Terminate (no await, SQLAlchemy's choice for a collected async connection)."""
        try:
            self._terminate(dbapi)
        except Exception:
            self._logger.error("Exception terminating connection %r", dbapi, exc_info=True)
