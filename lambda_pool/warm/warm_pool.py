"""``WarmPool``: the single kept connection (plus separate ones while it is out), both modes.

A :mod:`lambda_pool.pool` class whose checkout vets the kept connection with
:class:`~lambda_pool.warm.guard.WarmGuard` (reuse, pre-ping or replace) and whose return
runs :func:`~lambda_pool.warm.reset.g_reset_session`.  :class:`WarmSlots` is its slot policy.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Generator, Mapping
from typing import Any, ClassVar

from lambda_pool import event
from lambda_pool.exc import ArgumentError, DeadlineExceededError, InvalidRequestError
from lambda_pool.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection
from lambda_pool.pool import base as pool_base
from lambda_pool.pool import core as pool_core
from lambda_pool.pool.core import Acquire, Op
from lambda_pool.warm.driver import (
    _is_psycopg,
    _running_loop,
    abandon_inherited_connection,
)
from lambda_pool.warm.guard import (
    CREDENTIALS_EXPIRE_AT,
    SESSION_RESET_KEY,
    WARM_INFO_KEY,
    WarmConnectionInfo,
    WarmGuard,
)
from lambda_pool.warm.policy import (
    Ping,
    Replace,
    ReplaceReason,
    Reuse,
    ReusePolicy,
    pre_ping_idle_seconds_from_env,
)
from lambda_pool.warm.reset import (
    DRIVER_CALL,
    SESSION_RESET_STATEMENTS,
    _clear_psycopg_prepared_cache,
    _discard_awaitable,
    g_reset_session,
)
from lambda_pool.warm.stats import WarmStats

# record.info when the record never had one (read-only here: nothing is stored in it).
_NO_INFO: dict[Any, Any] = {}


def _returns_its_argument(get_driver_connection: Callable[[Any], Any]) -> bool:
    """Whether the dialect's ``get_driver_connection`` is the identity (lambda-pool's own
    dialects: drivers are not wrapped), so the quick paths may skip calling it."""
    probe = object()
    try:
        return get_driver_connection(probe) is probe
    except Exception:
        return False


class LentWarmConnection(PoolProxiedConnection):
    """The proxy the quick warm checkout lends: the kept psycopg connection, found
    reusable without I/O.  Its ``session_reset_with_commit`` is the session reset to send
    in the final ``COMMIT``'s message (``None`` in transaction-pooling mode, where
    nothing but the transaction is reset); ``with_connection`` then gives it back with
    :meth:`WarmPool.return_after_session_reset`, which reads what the checkout found
    (the connection's bookkeeping, whether the pool logs at debug level) from here.
    """

    _warm_info: WarmConnectionInfo | None = None
    _logs_debug = False


class WarmSlots(pool_core.Slots[ConnectionPoolEntry]):
    """Slot policy of :class:`WarmPool`: one kept record, plus separate ones while it is out.

    The kept record is handed to one caller at a time; a checkout finding it in use gets
    a new record that is closed when returned (never the kept one, whichever returns
    first).  ``overflow()`` counts those separate connections.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record: ConnectionPoolEntry | None = None
        self.in_use = False
        self.separate = 0
        # Records given up by dispose() while in use: closed when they come back.
        self._retired: list[ConnectionPoolEntry] = []

    def acquire(
        self, make: Callable[[], ConnectionPoolEntry], key: Any = None
    ) -> tuple[Acquire, ConnectionPoolEntry | None]:
        self.out += 1
        if not self.in_use:
            self.in_use = True
            if self.record is None:
                self.record = make()
                return Acquire.NEW, self.record
            return Acquire.TAKE, self.record
        self.separate += 1
        return Acquire.NEW, make()

    def is_warm(self, record: ConnectionPoolEntry) -> bool:
        """True for the kept record (the one the reuse rules apply to)."""
        return record is self.record

    def release(self, record: ConnectionPoolEntry) -> bool:
        self.out -= 1
        self.version += 1  # _bump(), inline: every warm return
        if record is self.record:
            self.in_use = False
            return True
        if record in self._retired:
            self._retired.remove(record)
        else:
            self.separate -= 1
        return False

    def discard(self, record: ConnectionPoolEntry) -> None:
        self.out -= 1
        self._bump()
        if record is self.record:
            self.record = None
            self.in_use = False
        elif record in self._retired:
            self._retired.remove(record)
        else:
            self.separate -= 1

    def drain_idle(self) -> list[ConnectionPoolEntry]:
        record, self.record = self.record, None
        self._bump()
        if record is None:
            return []
        if self.in_use:
            # Its user keeps it until it comes back; then it is closed, not kept.
            self.in_use = False
            self._retired.append(record)
            return []
        return [record]

    def forget_all(self) -> list[ConnectionPoolEntry]:
        idle = super().forget_all()
        self.record = None
        self.in_use = False
        self.separate = 0
        self._retired.clear()
        return idle

    def size(self) -> int:
        return 1

    def checkedin(self) -> int:
        return 1 if self.record is not None and not self.in_use else 0

    def overflow(self) -> int:
        return max(0, self.separate)


class WarmPool(Pool):
    """A single-connection pool whose connection survives across Lambda invocations.

    At each checkout the kept connection goes through :func:`decide_reuse` (the module
    docstring lists the rules): reused, pre-pinged, or replaced (closed; after a fork
    dropped) before the caller sees it.  While it is checked out, another checkout gets
    a separate short-lived connection, closed when returned.  On return the session is
    reset by :func:`reset_session` (after the pool's rollback): ``DISCARD ALL``, or only
    the rollback with ``transaction_pooling=True``.

    ``recycle`` and ``pre_ping`` keep their pool meaning but are applied by the shared
    decision on ``clock`` (``pre_ping=True`` pings at every checkout); the pool's own
    wall-clock recycle and pre-ping are therefore off.  ``stats`` is a
    :class:`WarmStats`.

    Both modes, like every pool class: a blocking creator (``pool.connect()``) or an
    ``async def`` creator / async dialect (``await pool.aconnect()``; psycopg
    ``AsyncConnection``, asyncpg).  The procedures are the same generators; the session
    reset's driver calls are steps too (:func:`g_reset_session`), performed with or
    without ``await`` by this class's shells.  In async mode the connection is also
    bound to the event loop that opened it: a checkout on another loop replaces it
    (reason ``other_event_loop``), closing the old one without awaiting
    (the dialect's ``do_terminate``).  Two tasks checking out at once get two connections, as
    two threads do.
    """

    def __init__(
        self,
        creator: Callable[[], Any],
        *,
        recycle: float = -1,
        echo: bool | str | None = False,
        logging_name: str | None = None,
        reset_on_return: bool | str | None = True,
        events: Any = None,
        dialect: Any = None,
        pre_ping: bool = False,
        pre_ping_idle_seconds: float | None = None,
        recycle_on_credentials_expiry: bool | None = None,
        transaction_pooling: bool | None = None,
        clock: Callable[[], float] | None = None,
        stats: WarmStats | None = None,
    ) -> None:
        # Arguments left unset come from the class's settings: lambda_pool.create_engine()
        # accepts only the generic pool keywords, so warm_engine() hands its options over
        # as a configured subclass (see configure()).
        settings = type(self)._settings
        if pre_ping_idle_seconds is None:
            pre_ping_idle_seconds = settings.get("pre_ping_idle_seconds")
        if recycle_on_credentials_expiry is None:
            recycle_on_credentials_expiry = settings.get("recycle_on_credentials_expiry", True)
        if transaction_pooling is None:
            transaction_pooling = settings.get("transaction_pooling", False)
        if clock is None:
            clock = settings.get("clock")
        pool_core.check_recycle(recycle)
        idle = (
            pre_ping_idle_seconds_from_env()
            if pre_ping_idle_seconds is None
            else pre_ping_idle_seconds
        )
        if isinstance(idle, bool) or not isinstance(idle, (int, float)) or idle < 0:
            raise ArgumentError(
                f"pre_ping_idle_seconds must be a number of seconds >= 0 (0 pings at every "
                f"checkout); got {idle!r}"
            )
        super().__init__(
            creator,
            recycle=-1,
            echo=echo,
            logging_name=logging_name,
            reset_on_return=reset_on_return,
            events=events,
            dialect=dialect,
            pre_ping=False,
        )
        self.stats = stats if stats is not None else WarmStats()
        slots = self._slots
        assert isinstance(slots, WarmSlots)
        self._warm = slots  # the pool's slots, typed (never replaced: a fork empties them)
        # The quick paths read these instead of asking at every invocation.
        self._driver_is_dbapi = _returns_its_argument(self._dialect.get_driver_connection)
        self._quiet_checkout = self._quiet_return = -1
        # What a lent connection's final COMMIT may carry (LentWarmConnection), and
        # whether return_after_session_reset() may give it back inline: both settled
        # here, once (neither the dialect nor the reset mode changes).
        self._reset_with_commit = (
            None if transaction_pooling or not self._driver_is_dbapi else SESSION_RESET_STATEMENTS
        )
        self._returns_inline = (
            self._driver_is_dbapi
            and self._reset_on_return == pool_core.RESET_ROLLBACK
            and self._skip_idle_rollback
        )
        self._guard = WarmGuard(
            ReusePolicy(
                recycle=float(recycle) if recycle >= 0 else None,
                pre_ping_idle_seconds=0.0 if pre_ping else float(idle),
                recycle_on_credentials_expiry=bool(recycle_on_credentials_expiry),
            ),
            clock=clock,
            stats=self.stats,
        )
        self._transaction_pooling = bool(transaction_pooling)
        self._kwargs.update(
            recycle=recycle,
            pre_ping=pre_ping,
            pre_ping_idle_seconds=pre_ping_idle_seconds,
            recycle_on_credentials_expiry=recycle_on_credentials_expiry,
            transaction_pooling=transaction_pooling,
            clock=clock,
            stats=self.stats,  # one set of counters across dispose()/recreate()
        )

    _settings: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def configure(cls, **settings: Any) -> type[WarmPool]:
        """A subclass whose unset constructor arguments default to ``settings``.

        Accepted: ``pre_ping_idle_seconds``, ``recycle_on_credentials_expiry``,
        ``transaction_pooling``, ``clock``.  For ``create_engine(poolclass=...)``, whose
        keywords are the generic pool ones.
        """
        allowed = {
            "pre_ping_idle_seconds",
            "recycle_on_credentials_expiry",
            "transaction_pooling",
            "clock",
        }
        unknown = sorted(set(settings) - allowed)
        if unknown:
            raise ArgumentError(
                f"WarmPool.configure() got unknown setting(s) {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(allowed))}"
            )
        merged = {**cls._settings, **settings}
        return type(cls.__name__, (cls,), {"_settings": merged, "__doc__": cls.__doc__})

    @property
    def policy(self) -> ReusePolicy:
        """The reuse rules this pool applies."""
        return self._guard.policy

    @property
    def transaction_pooling(self) -> bool:
        """True when ``DISCARD ALL`` is skipped (PgBouncer / RDS Proxy transaction mode)."""
        return self._transaction_pooling

    def _make_slots(self) -> pool_core.Slots[ConnectionPoolEntry]:
        return WarmSlots()

    # -- checkout ---------------------------------------------------------------------

    def connect(self) -> PoolProxiedConnection:
        """Check a connection out (sync pools): the kept one when the reuse rules allow.

        The warm invocation's checkout is here, inline: the kept connection, idle, with
        no ``checkout`` listener, taken and handed out when the guard says
        :class:`Reuse` (no I/O).  The procedure (``Pool.connect``) runs instead when
        there is nothing kept, it is in use, there are listeners, after a fork or an
        invalidation; when the guard asks for a ping or a replacement, the procedure
        runs on the taken slot and decides again.  Every warm invocation takes this
        path, which is why it is not a generator run by ``drive()``: the steps are the
        procedure's, in its order, and each reads its state directly (attributes, not
        properties or helpers: on Lambda the CPU they would cost is billed at every
        invocation)."""
        if (
            self._is_async
            or pool_base._forks != self._forks_seen
            or (self._quiet_checkout != event._generation and not self._find_quiet())
        ):
            return super().connect()
        slots = self._warm
        # acquire()/release() rather than "with": the same lock held the same way, for
        # less CPU (the with statement's protocol costs about a lock's worth again).
        lock = self._lock
        lock.acquire()
        try:
            record = slots.record
            if record is not None and not slots.in_use:
                # WarmSlots.acquire() taking the kept record.
                slots.out += 1
                slots.in_use = True
            else:
                record = None
        finally:
            lock.release()
        if record is None:
            return super().connect()
        proxy = LentWarmConnection(self, record)
        dbapi = record.dbapi_connection
        starttime = record.starttime
        try:
            info_map = record._info or _NO_INFO
            info = info_map.get(WARM_INFO_KEY)
            if (
                isinstance(info, WarmConnectionInfo)
                and dbapi is not None
                and self._invalidate_time <= starttime
                and record.soft_invalidate_time <= starttime
            ):
                if SESSION_RESET_KEY in info_map:
                    del info_map[SESSION_RESET_KEY]
                reusable = self._guard.reusable_now(
                    dbapi if self._driver_is_dbapi else self._dialect.get_driver_connection(dbapi),
                    info,
                    info_map.get(CREDENTIALS_EXPIRE_AT),
                )
            else:
                reusable = False
        except BaseException:
            # Interrupted before the connection was handed out (KeyboardInterrupt, a
            # driver raising from a property): the slot comes back, the connection is kept.
            proxy._closed = True
            with self._lock:
                slots.release(record)
                self._notify_locked()
            raise
        if not reusable:
            # The procedure decides again, names the reason, pings or replaces.
            return self._run_sync(self._g_hand_out(Acquire.TAKE, record, proxy))
        # stats.record_reused(), inline and without the stats' lock: the kept
        # connection is lent to one caller at a time (slots.in_use, under the pool's
        # lock), so no other thread counts a reuse while this one does (a pool recreated
        # by dispose() shares the stats, but the old one no longer lends its kept one).
        stats = self.stats
        stats.reused += 1
        if stats._listeners:
            stats._emit("reused", {})
        record.fresh = False
        proxy.session_reset_with_commit = self._reset_with_commit
        proxy._warm_info = info
        logger = self._logger
        if logger.debug_forced or logger.logger.isEnabledFor(10):  # logging.DEBUG
            proxy._logs_debug = True
            logger.debug("Connection %r checked out from pool", dbapi)
        return proxy

    def _find_quiet(self) -> bool:
        """Whether no ``checkout`` listener is registered for this pool now (the quick
        checkout fires none), remembered until the listeners change
        (``event._generation``); likewise, in ``_quiet_return``, no ``reset`` or
        ``checkin`` listener (the quick return fires neither)."""
        generation = event._generation
        quiet_checkout = not self._listeners("checkout")
        quiet_return = not (self._listeners("reset") or self._listeners("checkin"))
        self._quiet_checkout = generation if quiet_checkout else -1
        self._quiet_return = generation if quiet_return else -1
        return quiet_checkout

    def _check_fork(self) -> None:
        # The base class drops the parent's connections without closing them; release
        # the child's copy of the warm socket as well (without a word to the server)
        # and count the replacement.
        if os.getpid() != self._pid:
            record = self._warm.record
            if record is not None and record.dbapi_connection is not None:
                self.stats.record_replaced(ReplaceReason.FORKED)
                abandon_inherited_connection(
                    self._dialect.get_driver_connection(record.dbapi_connection)
                )
        super()._check_fork()

    def _g_checkout(self) -> Generator[Any, Any, PoolProxiedConnection]:
        proxy = yield from super()._g_checkout()
        record = proxy.record
        if record is not None and not self._warm.is_warm(record):
            self.stats.record_separate_connection()
        return proxy

    def _g_prepare(
        self,
        record: ConnectionPoolEntry,
        proxy: PoolProxiedConnection,
        *,
        raised: BaseException | None = None,
    ) -> Generator[Any, Any, None]:
        if self._warm.is_warm(record) and record.dbapi_connection is not None:
            # Only the return right after the marking may rely on it.
            record.info.pop(SESSION_RESET_KEY, None)
            yield from self._g_vet(record)
        if raised is None:
            yield from super()._g_prepare(record, proxy)
        else:
            yield from super()._g_prepare(record, proxy, raised=raised)

    def _g_vet(self, record: ConnectionPoolEntry) -> Generator[Any, Any, None]:
        info = record.info.get(WARM_INFO_KEY)
        if not isinstance(info, WarmConnectionInfo):
            return
        dbapi = record.dbapi_connection
        decision = self._guard.decide(
            self._dialect.get_driver_connection(dbapi),
            info,
            record.info.get(CREDENTIALS_EXPIRE_AT),
        )
        if isinstance(decision, Ping):
            try:
                ok = bool((yield Op.PING, dbapi))
            except DeadlineExceededError:
                # The invocation's time ran out in the ping; the driver has closed the
                # connection and there is no time to open another: the caller hears
                # why (the failed checkout drops the record).
                self.stats.record_pre_ping(False, decision.idle_seconds)
                self.stats.record_replaced(ReplaceReason.PRE_PING_FAILED)
                raise
            except Exception:
                # Any failure: this connection is not one to hand out; the caller gets
                # a new one and never sees the error.
                ok = False
            self.stats.record_pre_ping(ok, decision.idle_seconds)
            decision = Reuse() if ok else Replace(ReplaceReason.PRE_PING_FAILED)
        if isinstance(decision, Reuse):
            self.stats.record_reused()
            return
        self.stats.record_replaced(decision.reason)
        self._logger.info("Warm connection %r replaced: %s", dbapi, decision.reason.value)
        if decision.reason is ReplaceReason.OTHER_EVENT_LOOP:
            # Its close cannot be awaited here; the base checkout then opens the
            # replacement on the running loop.
            self._drop_off_loop(record)
            return
        if not decision.may_close:
            abandon_inherited_connection(self._dialect.get_driver_connection(dbapi))
        # The base checkout then finds no connection and opens the replacement.
        yield from self._g_close_connection(record)

    def _g_connect(self, record: ConnectionPoolEntry) -> Generator[Any, Any, None]:
        yield from super()._g_connect(record)
        if self._warm.is_warm(record):
            loop = _running_loop() if self._is_async else None
            record.info[WARM_INFO_KEY] = self._guard.new_info(loop)

    def _drop_off_loop(self, record: ConnectionPoolEntry) -> None:
        """Close a connection of another event loop without awaiting: the dialect's
        ``do_terminate`` (psycopg ``pgconn.finish()``; asyncpg ends the session on a
        duplicate of its socket, then terminates it on its own loop, or not at all when
        that loop is closed)."""
        dbapi = record.dbapi_connection
        record.dbapi_connection = None
        try:
            self._fire("close", dbapi, record)
        finally:
            try:
                self._terminate(dbapi)
            except Exception:
                self._logger.error("Exception closing connection %r", dbapi, exc_info=True)

    # -- the shells: the pool's steps, plus the session reset's driver calls ------------

    def _perform_sync(self, step: Any) -> Any:
        if step[0] is DRIVER_CALL:
            result = step[1]()
            if inspect.isawaitable(result):  # pragma: no cover - a sync pool's driver
                _discard_awaitable(result)
                raise InvalidRequestError("a blocking WarmPool got an asyncio connection")
            return result
        return super()._perform_sync(step)

    async def _perform_async(self, step: Any) -> Any:
        if step[0] is DRIVER_CALL:
            result = step[1]()
            if inspect.isawaitable(result):
                result = await result
            return result
        return await super()._perform_async(step)

    # -- return -----------------------------------------------------------------------

    def _return_sync(self, proxy: PoolProxiedConnection, transaction_was_reset: bool) -> None:
        """The warm invocation's return, inline: the session was reset with the final
        ``COMMIT`` (:meth:`mark_session_reset`) and the connection is idle, so nothing is
        sent; the rest is the procedure's bookkeeping (prepared-statement cache emptied
        as after ``DISCARD ALL``, idle timer started, slot given back).  Anything else
        (listeners, a transaction left open, a separate connection) takes the procedure.
        """
        record = proxy._record
        info_map = None if record is None else record._info
        if (
            info_map is None
            or not info_map.get(SESSION_RESET_KEY)
            or not self.return_after_session_reset(proxy)
        ):
            super()._return_sync(proxy, transaction_was_reset)

    def return_after_session_reset(self, proxy: PoolProxiedConnection) -> bool:
        """Give back the kept connection, whose session was reset right after its last
        commit (the statements :meth:`session_reset_after_commit` offered, sent in the
        ``COMMIT``'s message, all succeeded) and which is idle now: nothing is sent,
        only the procedure's bookkeeping, inline (prepared-statement cache emptied as
        after ``DISCARD ALL``, idle timer started, slot given back).  Every warm
        invocation of ``with_connection`` ends here.

        ``False``, having done nothing, when the procedure must run instead
        (listeners, a transaction open again, a separate or retired connection, another
        reset mode): the caller then marks it (:meth:`mark_session_reset`) and closes
        the proxy, which sends nothing more if it is still idle.
        """
        record = proxy._record
        if (
            record is None
            or record is not self._warm.record
            or proxy._closed
            or not self._returns_inline
            or record._epoch != self._epoch
            or pool_base._forks != self._forks_seen
            or (self._quiet_return != event._generation and not self._find_quiet_return())
            or proxy._nested != 1
        ):
            return False
        info_map = record._info or _NO_INFO
        driver = record.dbapi_connection  # the driver's own (_returns_inline)
        if proxy.__class__ is LentWarmConnection:
            # Found psycopg at checkout, which also read these.
            info = proxy._warm_info  # type: ignore[attr-defined]
            logs_debug = proxy._logs_debug  # type: ignore[attr-defined]
        elif driver is None or not _is_psycopg(driver):
            return False
        else:
            info = info_map.get(WARM_INFO_KEY)
            logger = self._logger
            logs_debug = logger.debug_forced or logger.logger.isEnabledFor(10)
        if driver is None or driver.pgconn.transaction_status != 0:
            return False
        if logs_debug:  # as _reset_step() logs
            self._logger.debug("Connection %r being returned to pool; rollback", driver)
        proxy._closed = True
        try:
            if SESSION_RESET_KEY in info_map:
                del info_map[SESSION_RESET_KEY]
            try:
                # What psycopg runs after DISCARD ALL (the reset deallocated them), when
                # it has anything to forget: the invocation's statements usually went
                # out in the simple protocol, which prepares nothing.
                prepared = driver._prepared
                if prepared._counts or prepared._names:
                    prepared.clear()
            except AttributeError:
                _clear_psycopg_prepared_cache(driver)
            if isinstance(info, WarmConnectionInfo):
                info.last_used_at = self._guard.clock()  # WarmGuard.mark_returned(), inline
        finally:
            # Whatever interrupted the bookkeeping, the slot comes back (as _g_release).
            slots = self._warm
            lock = self._lock
            lock.acquire()  # as in connect(): "with self._lock", for less CPU
            try:
                if record is slots.record:  # WarmSlots.release() of the kept one, inline
                    slots.out -= 1
                    slots.version += 1
                    slots.in_use = False
                    keep = True
                else:
                    keep = slots.release(record)
                if self._sync_waiters or self._async_waiters:
                    self._notify_locked()
            finally:
                lock.release()
        if not keep:
            self._run_sync(self._g_close_connection(record))
        return True

    def _find_quiet_return(self) -> bool:
        self._find_quiet()
        return self._quiet_return != -1

    def _g_reset(
        self,
        dbapi: Any,
        record: ConnectionPoolEntry | None,
        transaction_was_reset: bool,
        terminate_only: bool,
    ) -> Generator[Any, Any, None]:
        yield from super()._g_reset(dbapi, record, transaction_was_reset, terminate_only)
        if (
            record is None
            or terminate_only
            or record.dbapi_connection is None
            or not self._warm.is_warm(record)
        ):
            return
        info = record.info.get(WARM_INFO_KEY)
        discarded = bool(record.info.pop(SESSION_RESET_KEY, False))
        try:
            yield from g_reset_session(
                self._dialect.get_driver_connection(record.dbapi_connection),
                discard=not self._transaction_pooling,
                discarded=discarded,
            )
        except Exception as exc:
            # The caller already has its result; close now, reconnect at next checkout.
            self._logger.info("Warm connection reset failed, closing it: %r", exc)
            yield from self._g_invalidate(record, exc)
            return
        if isinstance(info, WarmConnectionInfo):
            self._guard.mark_returned(info)

    # -- the session reset sent with the invocation's commit ----------------------------

    def session_reset_after_commit(self, proxy: PoolProxiedConnection) -> str | None:
        """The statements that reset the session (:data:`SESSION_RESET_STATEMENTS`) when
        ``proxy``'s connection is this pool's kept one and is reset with ``DISCARD ALL``
        on return; else ``None``.

        ``with_connection`` sends them in the same message as its final ``COMMIT`` and
        then calls :meth:`mark_session_reset`, so the return sends nothing more.
        """
        record = proxy._record
        if self._transaction_pooling or record is None or record is not self._warm.record:
            return None
        return SESSION_RESET_STATEMENTS

    def mark_session_reset(self, proxy: PoolProxiedConnection) -> None:
        """The session was reset right after the last commit: the return (next) need
        not send ``DISCARD ALL``; it still does if the connection is not idle then."""
        record = proxy.record
        if record is not None and self._warm.is_warm(record):
            record.info[SESSION_RESET_KEY] = True

    def status(self) -> str:
        slots = self._warm
        state = "none" if slots.record is None else ("in use" if slots.in_use else "idle")
        return (
            f"Pool size: 1  Connections in pool: {self.checkedin()} "
            f"Current Overflow: {self.overflow()} "
            f"Current Checked out connections: {self.checkedout()}  warm connection: {state}"
        )
