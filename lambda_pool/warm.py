"""Warm-container cache: one connection per identity, reused across invocations only when safe.

A Lambda execution environment serves many invocations one after the other; opening a
PostgreSQL connection (TCP, TLS, authentication) on each of them costs more than the
query.  :func:`warm_engine` keeps one engine per *identity* in module scope, backed by
:class:`WarmPool`, a single-connection pool whose connection is handed out again at each
checkout **only** when all of these hold (see :func:`decide_reuse`):

1. same process — a child after ``fork()`` never uses (nor closes) its parent's socket;
2. no SnapStart restore since it was opened (:func:`lambda_pool.lifecycle.restore_generation`);
   for asyncio, the running event loop is the one that opened it;
3. the driver does not report it closed or broken;
4. it is idle (no transaction left open by the previous invocation's reset);
5. it is younger than its recycle deadline (``recycle`` seconds, and the expiry of the
   credentials it was opened with);
6. it answers a pre-ping when it sat idle longer than ``pre_ping_idle_seconds`` (a frozen
   environment may have lost its TCP flow to a NAT or to server keepalives; back-to-back
   invocations skip the round trip), or when its socket has unread input although it
   is idle (a zero-timeout poll, no round trip: the server only speaks unprompted to an
   idle session to end it, e.g. ``pg_terminate_backend``).

Otherwise it is closed (after a fork: dropped without touching the socket; on another
event loop: closed without awaiting, by the dialect's ``do_terminate``) and replaced,
and the caller sees no error.  A second concurrent checkout (another thread, or another
task) gets a separate short-lived connection, closed on return: one connection is never
shared.  :func:`warm_async_engine` is the same cache for asyncio engines (psycopg
``AsyncConnection``, asyncpg), on the same pool class and the same rules.

Session state is reset on return by :func:`reset_session`.  The reuse decision is I/O
free (:func:`decide_reuse`), so the SQLAlchemy adapter (``lambda_pool.sqlalchemy``) applies
exactly the same rules.  Counters live in :class:`WarmStats` (``engine.pool.stats``).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import hmac
import inspect
import logging
import os
import secrets
import select
import threading
import time
import weakref
from collections.abc import Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar

from lambda_pool.exc import ArgumentError, DeadlineExceededError, InvalidRequestError
from lambda_pool.pool import ConnectionPoolEntry, Pool, PoolProxiedConnection
from lambda_pool.pool import core as pool_core
from lambda_pool.pool.base import running_loop
from lambda_pool.pool.core import Acquire, Op

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import asyncio

    from lambda_pool.asyncio import AsyncEngine
    from lambda_pool.engine import Engine

__all__ = [
    "CREDENTIALS_EXPIRE_AT",
    "DEFAULT_PRE_PING_IDLE_SECONDS",
    "PRE_PING_IDLE_ENV",
    "WARM_INFO_KEY",
    "ConnectionState",
    "DriverState",
    "EngineCache",
    "Ping",
    "Replace",
    "ReplaceReason",
    "Reuse",
    "ReuseDecision",
    "ReusePolicy",
    "WarmConnectionInfo",
    "WarmGuard",
    "WarmPool",
    "WarmSlots",
    "WarmStats",
    "abandon_inherited_connection",
    "areset_session",
    "cached_engines",
    "decide_reuse",
    "forget_cached_engines",
    "g_reset_session",
    "identity_key",
    "pre_ping_idle_seconds_from_env",
    "probe_driver",
    "reset_session",
    "warm_async_engine",
    "warm_connect_args",
    "warm_engine",
]

log = logging.getLogger("lambda_pool.warm")

DEFAULT_PRE_PING_IDLE_SECONDS = 60.0
PRE_PING_IDLE_ENV = "LAMBDA_POOL_PRE_PING_IDLE_SECONDS"

# record.info keys.  CREDENTIALS_EXPIRE_AT is the engine's contract (docs/ARCHITECTURE.md,
# "Credentials ↔ engine"); WARM_INFO_KEY holds this module's per-connection bookkeeping.
CREDENTIALS_EXPIRE_AT = "lambda_pool.credentials_expire_at"
WARM_INFO_KEY = "lambda_pool.warm"


# --------------------------------------------------------------------------------------
# The I/O-free core: what is known about a connection, and what to do with it.
# --------------------------------------------------------------------------------------


class ReplaceReason(str, enum.Enum):
    """Why a warm connection was not reused; the values are the ``replaced`` stats keys."""

    FORKED = "forked"
    RESTORED = "restored"
    OTHER_EVENT_LOOP = "other_event_loop"
    CLOSED = "closed"
    NOT_IDLE = "not_idle"
    RESET_FAILED = "reset_failed"
    RECYCLE = "recycle"
    CREDENTIALS_EXPIRED = "credentials_expired"
    PRE_PING_FAILED = "pre_ping_failed"


@dataclasses.dataclass(frozen=True)
class Reuse:
    """Hand the connection out as it is."""


@dataclasses.dataclass(frozen=True)
class Ping:
    """Check the connection with one round trip first; replace it if that fails."""

    idle_seconds: float | None


@dataclasses.dataclass(frozen=True)
class Replace:
    """Do not use the connection; open a new one."""

    reason: ReplaceReason

    @property
    def may_close(self) -> bool:
        """False after a fork: closing would send Terminate on the parent's socket."""
        return self.reason is not ReplaceReason.FORKED


ReuseDecision = Reuse | Ping | Replace


@dataclasses.dataclass(frozen=True)
class ReusePolicy:
    """The tunables of :func:`decide_reuse`.

    ``recycle``: maximum age in seconds (``None`` or negative: no limit).
    ``pre_ping_idle_seconds``: ping when idle longer than this (``0``: at every checkout;
    ``None``: never).  ``recycle_on_credentials_expiry``: retire a connection at the first
    checkout after the credentials it was opened with expired.
    """

    recycle: float | None = None
    pre_ping_idle_seconds: float | None = DEFAULT_PRE_PING_IDLE_SECONDS
    recycle_on_credentials_expiry: bool = True


@dataclasses.dataclass(frozen=True)
class ConnectionState:
    """Everything :func:`decide_reuse` needs, gathered without I/O at checkout.

    Times are wall-clock epoch seconds: the monotonic clock may stand still while an
    environment is frozen and can jump across a SnapStart restore.
    """

    opener_pid: int
    current_pid: int
    opened_generation: int
    current_generation: int
    opened_at: float
    last_used_at: float
    closed: bool
    idle: bool
    credentials_expire_at: float | None = None
    reset_failed: bool = False
    pending_input: bool = False
    same_event_loop: bool = True


def decide_reuse(
    state: ConnectionState, now: float, policy: ReusePolicy | None = None
) -> ReuseDecision:
    """Decide whether the cached connection described by ``state`` may serve a checkout.

    Checks run cheapest and most fundamental first; the first that fails names the
    reason.  The process check comes first because nothing else about an inherited
    connection may be touched; an asyncio connection opened on another event loop than
    the running one (``same_event_loop``) is not used either.  The pre-ping is the only
    check needing a round trip, so it is returned as :class:`Ping` for the caller to
    perform: after an idle gap longer than ``pre_ping_idle_seconds``, or at once when
    the socket of an idle connection has something to read (``pending_input``) — the
    server does not speak unprompted to an idle session except to end it
    (``pg_terminate_backend``, ``idle_session_timeout``, shutdown), so a terminated
    session is caught even between back-to-back invocations.
    """
    policy = policy or _DEFAULT_POLICY
    if state.opener_pid != state.current_pid:
        return Replace(ReplaceReason.FORKED)
    if state.opened_generation != state.current_generation:
        return Replace(ReplaceReason.RESTORED)
    if not state.same_event_loop:
        # An asyncio connection belongs to the loop that opened it (its socket is
        # registered with that loop's selector, its futures with that loop).
        return Replace(ReplaceReason.OTHER_EVENT_LOOP)
    if state.closed:
        return Replace(ReplaceReason.CLOSED)
    if state.reset_failed:
        return Replace(ReplaceReason.RESET_FAILED)
    if not state.idle:
        return Replace(ReplaceReason.NOT_IDLE)
    if (
        policy.recycle is not None
        and policy.recycle >= 0
        and now - state.opened_at > policy.recycle
    ):
        return Replace(ReplaceReason.RECYCLE)
    if (
        policy.recycle_on_credentials_expiry
        and state.credentials_expire_at is not None
        and now >= state.credentials_expire_at
    ):
        return Replace(ReplaceReason.CREDENTIALS_EXPIRED)
    idle = now - state.last_used_at
    if state.pending_input:
        return Ping(idle if idle >= 0 else None)
    threshold = policy.pre_ping_idle_seconds
    if threshold is None:
        return Reuse()
    if idle < 0:
        # The wall clock went backwards (NTP step, restore): the idle time is unknown,
        # so check rather than trust.
        return Ping(None)
    if idle > threshold or threshold == 0:
        return Ping(idle)
    return Reuse()


_DEFAULT_POLICY = ReusePolicy()


def pre_ping_idle_seconds_from_env(default: float = DEFAULT_PRE_PING_IDLE_SECONDS) -> float:
    """``LAMBDA_POOL_PRE_PING_IDLE_SECONDS`` as a float, else ``default``.

    Raises :class:`lambda_pool.exc.ArgumentError` when the variable is set but is not a
    non-negative number: a typo should not silently turn pre-ping off.
    """
    raw = os.environ.get(PRE_PING_IDLE_ENV)
    if raw is None or not raw.strip():
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if value < 0 or value != value:  # negative or NaN
        raise ArgumentError(
            f"{PRE_PING_IDLE_ENV}={raw!r} is not a number of seconds >= 0; "
            "set it to e.g. 60, or 0 to ping at every checkout"
        )
    return value


# --------------------------------------------------------------------------------------
# Observability.
# --------------------------------------------------------------------------------------

WarmListener = Callable[[str, Mapping[str, Any]], None]


class WarmStats:
    """Counters of one warm pool, safe to read from any thread (``engine.pool.stats``).

    ``opened``: connections opened for the warm slot.  ``reused``: checkouts that handed
    out the cached connection.  ``replaced``: ``{reason: count}`` with the
    :class:`ReplaceReason` values as keys.  ``pre_pings`` / ``pre_ping_failures``: round
    trips made because the connection sat idle too long, and how many failed.
    ``overflow_connections``: separate short-lived connections handed to a concurrent
    caller while the warm one was in use.

    Listeners added with :meth:`add_listener` are called as ``fn(event, details)`` with
    ``event`` one of ``"opened"``, ``"reused"``, ``"replaced"`` (``details["reason"]``),
    ``"pre_ping"`` (``details["ok"]``) and ``"separate_connection"``; a listener that
    raises is logged and never breaks a checkout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[WarmListener] = []
        self.opened = 0
        self.reused = 0
        self.replaced: dict[str, int] = {}
        self.pre_pings = 0
        self.pre_ping_failures = 0
        self.overflow_connections = 0

    def add_listener(self, fn: WarmListener) -> None:
        """Call ``fn(event, details)`` on every warm-cache event."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: WarmListener) -> None:
        """Stop calling ``fn``; a listener that was never added is ignored."""
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def as_dict(self) -> dict[str, Any]:
        """A consistent copy of every counter (for logs and metrics)."""
        with self._lock:
            return {
                "opened": self.opened,
                "reused": self.reused,
                "replaced": dict(self.replaced),
                "pre_pings": self.pre_pings,
                "pre_ping_failures": self.pre_ping_failures,
                "overflow_connections": self.overflow_connections,
            }

    def __repr__(self) -> str:
        return f"WarmStats({self.as_dict()!r})"

    def record_opened(self) -> None:
        with self._lock:
            self.opened += 1
        self._emit("opened", {})

    def record_reused(self) -> None:
        with self._lock:
            self.reused += 1
        self._emit("reused", {})

    def record_replaced(self, reason: ReplaceReason) -> None:
        with self._lock:
            self.replaced[reason.value] = self.replaced.get(reason.value, 0) + 1
        self._emit("replaced", {"reason": reason.value})

    def record_pre_ping(self, ok: bool, idle_seconds: float | None) -> None:
        with self._lock:
            self.pre_pings += 1
            if not ok:
                self.pre_ping_failures += 1
        self._emit("pre_ping", {"ok": ok, "idle_seconds": idle_seconds})

    def record_separate_connection(self) -> None:
        with self._lock:
            self.overflow_connections += 1
        self._emit("separate_connection", {})

    def _emit(self, event: str, details: Mapping[str, Any]) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event, details)
            except Exception:
                # Observability must never turn a healthy checkout into a failure.
                log.exception("warm-cache listener %r failed on %r", fn, event)


# --------------------------------------------------------------------------------------
# Driver-facing helpers shared by both shells (no SQL except in the session reset).
# --------------------------------------------------------------------------------------


@dataclasses.dataclass
class WarmConnectionInfo:
    """Bookkeeping for one physical connection, kept in ``record.info[WARM_INFO_KEY]``.

    ``loop`` is a weak reference to the event loop an asyncio connection was opened on
    (``None`` for a blocking one): weak, so the cache never keeps a finished loop alive,
    and never an ``id()``, which a later loop may get again.
    """

    opener_pid: int
    opened_generation: int
    opened_at: float
    last_used_at: float
    reset_failed: bool = False
    loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None

    def opening_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the connection was opened on, if it was one and it still exists."""
        return None if self.loop is None else self.loop()


def _is_psycopg(conn: Any) -> bool:
    # Checked by module name so that this module never imports the driver; along the
    # MRO, so a subclass of psycopg's connection defined elsewhere counts too.
    return any(cls.__module__.startswith("psycopg") for cls in type(conn).__mro__)


def _is_asyncpg(conn: Any) -> bool:
    return type(conn).__module__.startswith("asyncpg")


def _running_loop() -> asyncio.AbstractEventLoop | None:
    return running_loop()


@dataclasses.dataclass(frozen=True)
class DriverState:
    """What the driver and the socket say about a connection, read without a round trip."""

    closed: bool
    idle: bool
    pending_input: bool = False


def probe_driver(conn: Any) -> DriverState:
    """The driver's view of ``conn``, without any network round trip.

    psycopg 3 (``Connection`` and ``AsyncConnection`` alike) reads libpq's local state
    (``closed``, ``broken``, ``info.transaction_status``); asyncpg its protocol's
    (``is_closed()``, ``is_in_transaction()``, both from the last message received).  For
    both the socket is polled with a zero timeout for unread input.  Other DB-API
    drivers report what they expose (``closed``, ``in_transaction``) and are otherwise
    assumed open and idle.
    """
    if _is_psycopg(conn):
        if bool(conn.closed) or bool(getattr(conn, "broken", False)):
            return DriverState(closed=True, idle=False)
        # pq.TransactionStatus.IDLE == 0; compared by value to avoid importing psycopg.
        idle = int(conn.info.transaction_status) == 0
        return DriverState(closed=False, idle=idle, pending_input=_socket_readable(conn))
    if _is_asyncpg(conn):
        if bool(conn.is_closed()):
            return DriverState(closed=True, idle=False)
        return DriverState(
            closed=False,
            idle=not bool(conn.is_in_transaction()),
            pending_input=_socket_readable(conn),
        )
    closed = bool(getattr(conn, "closed", False))
    return DriverState(closed=closed, idle=not bool(getattr(conn, "in_transaction", False)))


def _socket_fileno(conn: Any) -> int | None:
    """The descriptor of ``conn``'s socket, or ``None`` when the driver does not expose one.

    psycopg: ``fileno()`` (libpq's ``pgconn.socket``), sync and async; asyncpg: its
    dialect's :func:`~lambda_pool.dialects.asyncpg.asyncpg_socket_fileno`.  Only polled
    or duplicated here, never read from.
    """
    if _is_asyncpg(conn):
        from lambda_pool.dialects.asyncpg import asyncpg_socket_fileno

        return asyncpg_socket_fileno(conn)
    try:
        fileno = int(conn.fileno())
    except Exception:
        return None
    return fileno if fileno >= 0 else None


def _socket_readable(conn: Any) -> bool:
    """True when the connection's socket has data or EOF waiting (a zero-timeout poll).

    For asyncpg this sees what the kernel holds; what asyncio already read (its loop
    reads eagerly while it runs) has reached the protocol, which then reports the
    connection closed by itself.
    """
    fileno = _socket_fileno(conn)
    if fileno is None:
        return False
    try:
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fileno, select.POLLIN | select.POLLPRI)
            return bool(poller.poll(0))
        readable, _, _ = select.select([fileno], [], [], 0)
    except (OSError, ValueError):
        return False
    return bool(readable)


# The session reset is written once, as a generator of driver calls, like the pool's
# procedures (lambda_pool.pool.base): each step is ``(DRIVER_CALL, fn)``; a sync runner
# calls ``fn()``, an async runner calls it and awaits the result.  WarmPool's shells
# perform these steps; reset_session() and areset_session() run them outside a pool.


class _DriverStep(enum.Enum):
    CALL = "driver call"


DRIVER_CALL = _DriverStep.CALL
DriverStep = tuple[_DriverStep, Callable[[], Any]]


def _call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> DriverStep:
    return (DRIVER_CALL, functools.partial(fn, *args, **kwargs))


def _asyncpg_reset_statement(conn: Any, statement: str) -> Any:
    """``conn.execute(statement)`` ending by the current deadline (a coroutine)."""
    from lambda_pool.dialects.asyncpg import asyncpg_bounded

    return asyncpg_bounded(conn, conn.execute(statement), "reset on return")


def g_reset_session(conn: Any, *, discard: bool = True) -> Generator[DriverStep, Any, None]:
    """The steps of :func:`reset_session` (sync or async driver), for a runner to perform."""
    if _is_psycopg(conn):
        if int(conn.info.transaction_status) != 0:
            yield _call(conn.rollback)
        if not discard:
            return
        was_autocommit = bool(conn.autocommit)
        if not was_autocommit:
            # set_autocommit(): the property is read-only on psycopg's AsyncConnection.
            yield _call(conn.set_autocommit, True)
        try:
            yield _call(conn.execute, "DISCARD ALL", prepare=False)
        finally:
            if not was_autocommit:
                yield _call(conn.set_autocommit, False)
        if conn.prepare_threshold is not None:
            _clear_psycopg_prepared_cache(conn)
        return
    if _is_asyncpg(conn):
        # Conn.execute() without arguments is the simple query protocol: no statement is
        # prepared for these two.
        # Bounded by the deadline here: asyncpg has no wait of its own to bound (psycopg's
        # connection class bounds its waits itself).
        if conn.is_in_transaction():
            yield _call(_asyncpg_reset_statement, conn, "ROLLBACK")
        if not discard:
            return
        yield _call(_asyncpg_reset_statement, conn, "DISCARD ALL")
        _clear_asyncpg_statement_cache(conn)
        return
    # Generic DB-API connection: a rollback is all a driver-neutral reset can do.
    yield _call(conn.rollback)


def reset_session(conn: Any, *, discard: bool = True) -> None:
    """Leave ``conn`` as a new session would be, so nothing leaks to the next invocation.

    ``ROLLBACK`` first (a no-op when already idle), then ``DISCARD ALL``, which resets
    ``SET`` parameters and ``SET SESSION AUTHORIZATION``, drops temporary tables,
    deallocates prepared statements, closes cursors, ``UNLISTEN *`` and releases advisory
    locks (it includes ``pg_advisory_unlock_all()``; no separate call needed).  PostgreSQL
    refuses ``DISCARD ALL`` inside a transaction block, hence the rollback before it and
    the autocommit switch around it (psycopg would otherwise open a transaction for it).

    ``discard=False`` (transaction pooling behind PgBouncer / RDS Proxy) only rolls back:
    ``DISCARD`` pins an RDS Proxy session, and such setups must not leave session state.

    psycopg's client-side prepared-statement cache: psycopg clears it when it sees the
    command status ``DISCARD ALL``, but only if that statement text is new to its
    statement counter (``psycopg/_preparing.py``: ``validate()`` runs for first-seen
    queries only), so from the second ``DISCARD ALL`` on it can keep names of statements
    the server just dropped and fail with *prepared statement "_pg3_0" does not exist*.
    Warm connections are therefore opened with ``prepare_threshold=None`` (no automatic
    server-side preparation; :func:`warm_connect_args`); when a user turns preparation back
    on, the cache is cleared here after the discard.

    asyncpg's statement cache has the same hazard, worse: see
    :func:`_clear_asyncpg_statement_cache`.  This function is for blocking connections;
    :func:`areset_session` runs the same steps on an asyncio one.
    """

    def perform(step: Any) -> Any:
        result = step[1]()
        if inspect.isawaitable(result):
            _discard_awaitable(result)
            raise InvalidRequestError(
                "reset_session() got an asyncio connection: use 'await areset_session()'"
            )
        return result

    pool_core.drive(g_reset_session(conn, discard=discard), perform)


async def areset_session(conn: Any, *, discard: bool = True) -> None:
    """:func:`reset_session` for an asyncio connection (psycopg ``AsyncConnection``, asyncpg)."""

    async def perform(step: Any) -> Any:
        result = step[1]()
        if inspect.isawaitable(result):
            result = await result
        return result

    await pool_core.drive_async(g_reset_session(conn, discard=discard), perform)


def _discard_awaitable(value: Any) -> None:
    close = getattr(value, "close", None)
    if callable(close):
        close()  # no "coroutine was never awaited" warning


def _clear_psycopg_prepared_cache(conn: Any) -> None:
    # psycopg has no public call for this; its PrepareManager.clear() is what psycopg
    # itself runs after ROLLBACK and DISCARD ALL.  If a future psycopg renames it, turn
    # preparation off for this connection instead: stale names must never be used.
    manager = getattr(conn, "_prepared", None)
    clear = getattr(manager, "clear", None)
    if callable(clear):
        clear()
    else:
        conn.prepare_threshold = None


def _clear_asyncpg_statement_cache(conn: Any) -> None:
    """Forget asyncpg's cached prepared statements after ``DISCARD ALL`` deallocated them.

    asyncpg prepares the statements of ``fetch()``/``execute(query, *args)``… as named
    server-side statements kept in a per-connection cache (``statement_cache_size``,
    default 100) and is not told about ``DISCARD ALL`` (which includes ``DEALLOCATE
    ALL``); the next use of a cached one fails with ``InvalidSQLStatementNameError``
    (*prepared statement "__asyncpg_stmt_1__" does not exist*), an error asyncpg does
    not retry (it re-prepares only on ``InvalidCachedStatementError``).  Its maintainers
    keep ``DISCARD ALL`` out of asyncpg's own pool reset for this reason
    (MagicStack/asyncpg#270), and its FAQ answers prepared-statement errors with
    ``statement_cache_size=0``.  Warm asyncpg connections are therefore opened with
    ``statement_cache_size=0`` (asyncpg then uses unnamed statements only; see
    :func:`warm_connect_args`), like psycopg's ``prepare_threshold=None``.  When a user
    turns the cache back on, it is emptied here with ``_drop_local_statement_cache()``,
    the private method asyncpg itself calls when it drops a connection's cache; the
    closes asyncpg then sends for the dropped statements are harmless (closing a
    statement that does not exist is not an error in PostgreSQL).  If that method is
    gone, the reset fails, so the pool closes the connection instead of keeping it
    inconsistent.
    """
    if not getattr(conn, "_stmt_cache_enabled", True):
        return
    drop = getattr(conn, "_drop_local_statement_cache", None)
    if not callable(drop):
        raise InvalidRequestError(
            "cannot empty asyncpg's statement cache after DISCARD ALL; open warm asyncpg "
            "connections with statement_cache_size=0"
        )
    drop()


def warm_connect_args(
    connect_args: Mapping[str, Any] | None, *, psycopg: bool, asyncpg: bool = False
) -> dict[str, Any]:
    """Driver keywords for a warm connection: automatic server-side preparation off.

    psycopg: ``prepare_threshold=None``; asyncpg: ``statement_cache_size=0``; a value the
    caller gave is kept.  See :func:`reset_session` and
    :func:`_clear_asyncpg_statement_cache` for why.
    """
    args = dict(connect_args or {})
    if psycopg:
        args.setdefault("prepare_threshold", None)
    if asyncpg:
        args.setdefault("statement_cache_size", 0)
    return args


def abandon_inherited_connection(conn: Any) -> None:
    """Forget a connection inherited across ``fork()`` without disturbing the parent.

    Closing it normally would make libpq send *Terminate* on the socket the parent still
    uses, ending the parent's session; letting the garbage collector finalize it does the
    same.  Instead the child's copy of the descriptor is pointed at ``/dev/null``
    (``dup2``), so the driver's close writes there and releases only the child's memory;
    the parent's descriptor is a different file-table entry and stays open.  psycopg's
    ``AsyncConnection`` is closed the same way through libpq (``pgconn.finish()``, no
    event loop).  An asyncpg connection is only kept referenced, never closed: each of
    its close paths goes through asyncio's selector, which after ``fork()`` is the
    parent's epoll instance, shared.
    """
    if _is_asyncpg(conn):
        _ABANDONED.append(conn)
        return
    fileno = _socket_fileno(conn)
    if fileno is None:
        _ABANDONED.append(conn)  # cannot neutralise it: keep it alive, never finalize
        return
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.dup2(devnull, fileno)
    finally:
        os.close(devnull)
    try:
        if _is_psycopg(conn) and inspect.iscoroutinefunction(type(conn).close):
            conn.pgconn.finish()
        else:
            conn.close()
    except Exception:
        log.debug("closing an abandoned inherited connection failed", exc_info=True)


_ABANDONED: list[Any] = []


class WarmGuard:
    """Applies :func:`decide_reuse` at checkout; one per pool, shared by both shells.

    ``clock`` is wall-clock epoch seconds (the credentials provider's clock when one is
    given, so expiry deadlines and "now" are on the same time line).
    """

    def __init__(
        self,
        policy: ReusePolicy,
        *,
        clock: Callable[[], float] | None = None,
        stats: WarmStats | None = None,
    ) -> None:
        self.policy = policy
        self.clock: Callable[[], float] = clock or time.time
        self.stats = stats if stats is not None else WarmStats()

    def new_info(self, loop: asyncio.AbstractEventLoop | None = None) -> WarmConnectionInfo:
        """Bookkeeping for a connection opened just now (counted as ``opened``).

        ``loop``: the event loop an asyncio connection was opened on (``None`` for a
        blocking connection, which then never fails the event-loop rule).
        """
        now = self.clock()
        self.stats.record_opened()
        return WarmConnectionInfo(
            opener_pid=os.getpid(),
            opened_generation=_restore_generation(),
            opened_at=now,
            last_used_at=now,
            loop=None if loop is None else weakref.ref(loop),
        )

    def decide(
        self, conn: Any, info: WarmConnectionInfo, credentials_expire_at: float | None
    ) -> ReuseDecision:
        """The decision for ``conn`` now (no I/O; a :class:`Ping` is the caller's to run).

        For an asyncio connection the running loop must be the one it was opened on (a
        loop that no longer exists never is).
        """
        pid = os.getpid()
        same_loop = info.loop is None or info.opening_loop() is _running_loop()
        if info.opener_pid != pid or not same_loop:
            # Do not even probe it: its state belongs to another process or loop.
            driver = DriverState(closed=False, idle=True)
        else:
            driver = probe_driver(conn)
        state = ConnectionState(
            opener_pid=info.opener_pid,
            current_pid=pid,
            opened_generation=info.opened_generation,
            current_generation=_restore_generation(),
            opened_at=info.opened_at,
            last_used_at=info.last_used_at,
            closed=driver.closed,
            idle=driver.idle,
            credentials_expire_at=credentials_expire_at,
            reset_failed=info.reset_failed,
            pending_input=driver.pending_input,
            same_event_loop=same_loop,
        )
        return decide_reuse(state, self.clock(), self.policy)

    def mark_returned(self, info: WarmConnectionInfo) -> None:
        """Start the idle timer: the connection just came back from an invocation."""
        info.last_used_at = self.clock()


def _restore_generation() -> int:
    from lambda_pool import lifecycle

    return lifecycle.restore_generation()


# --------------------------------------------------------------------------------------
# Cache identity.
# --------------------------------------------------------------------------------------

# Secrets are folded into cache keys through an HMAC with a per-process random key: two
# URLs differing only in their password are different identities, yet the module-level
# cache never holds a password, nor a digest that could be brute-forced elsewhere.
_KEY_SALT = secrets.token_bytes(32)


def _digest(value: object) -> str:
    return hmac.new(_KEY_SALT, repr(value).encode(), hashlib.sha256).hexdigest()[:32]


def _freeze(value: Any) -> Any:
    """A hashable, order-independent stand-in for keyword arguments (dicts, lists…)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_freeze(v) for v in value]
        return (
            tuple(sorted(items, key=repr)) if isinstance(value, (set, frozenset)) else tuple(items)
        )
    try:
        hash(value)
    except TypeError:
        return ("unhashable", type(value).__qualname__, id(value))
    return value


def identity_key(url: Any, credentials: Any, options: Mapping[str, Any]) -> tuple[Any, ...]:
    """The warm-cache key for ``url`` (a lambda-pool or SQLAlchemy ``URL``).

    Made of the URL rendered without its password (so host, port, driver, database and
    query options count), the user and database, the credentials provider's identity
    (the object itself: two providers are two identities), and a keyed digest of the
    password and every other keyword (``connect_args`` may carry secrets too).
    """
    others = {k: v for k, v in options.items() if k != "credentials"}
    return (
        url.render_as_string(hide_password=True),
        url.username,
        url.database,
        id(credentials) if credentials is not None else None,
        # The unmasked rendering too: a ?password= or ?sslpassword= is masked above.
        _digest((url.password, url.render_as_string(hide_password=False), _freeze(others))),
    )


# --------------------------------------------------------------------------------------
# The pool (lambda_pool.pool shell) and the module-level cache.
# --------------------------------------------------------------------------------------


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
        self._bump()
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

    def _warm_slots(self) -> WarmSlots:
        slots = self._slots
        assert isinstance(slots, WarmSlots)
        return slots

    # -- checkout ---------------------------------------------------------------------

    def _check_fork(self) -> None:
        # The base class drops the parent's connections without closing them; release
        # the child's copy of the warm socket as well (without a word to the server)
        # and count the replacement.
        if os.getpid() != self._pid:
            record = self._warm_slots().record
            if record is not None and record.dbapi_connection is not None:
                self.stats.record_replaced(ReplaceReason.FORKED)
                abandon_inherited_connection(
                    self._dialect.get_driver_connection(record.dbapi_connection)
                )
        super()._check_fork()

    def _g_checkout(self) -> Generator[Any, Any, PoolProxiedConnection]:
        proxy = yield from super()._g_checkout()
        record = proxy.record
        if record is not None and not self._warm_slots().is_warm(record):
            self.stats.record_separate_connection()
        return proxy

    def _g_prepare(
        self, record: ConnectionPoolEntry, proxy: PoolProxiedConnection
    ) -> Generator[Any, Any, None]:
        if self._warm_slots().is_warm(record) and record.dbapi_connection is not None:
            yield from self._g_vet(record)
        yield from super()._g_prepare(record, proxy)

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
        if self._warm_slots().is_warm(record):
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
            or not self._warm_slots().is_warm(record)
        ):
            return
        info = record.info.get(WARM_INFO_KEY)
        try:
            yield from g_reset_session(
                self._dialect.get_driver_connection(record.dbapi_connection),
                discard=not self._transaction_pooling,
            )
        except Exception as exc:
            # The caller already has its result; close now, reconnect at next checkout.
            self._logger.info("Warm connection reset failed, closing it: %r", exc)
            yield from self._g_invalidate(record, exc)
            return
        if isinstance(info, WarmConnectionInfo):
            self._guard.mark_returned(info)

    def status(self) -> str:
        slots = self._warm_slots()
        state = "none" if slots.record is None else ("in use" if slots.in_use else "idle")
        return (
            f"Pool size: 1  Connections in pool: {self.checkedin()} "
            f"Current Overflow: {self.overflow()} "
            f"Current Checked out connections: {self.checkedout()}  warm connection: {state}"
        )


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
    asyncpg (``postgresql+asyncpg://``, opened with ``statement_cache_size=0`` unless the
    URL or ``connect_args`` says otherwise; see :func:`_clear_asyncpg_statement_cache`).
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
    elif postgresql and driver == "asyncpg" and "statement_cache_size" not in url.query:
        # (A URL's ?statement_cache_size= is the user's choice: connect_args would win
        # over it, so no default is added then.)
        connect_args = dict(options.get("connect_args") or {})
        options["connect_args"] = warm_connect_args(connect_args, psycopg=False, asyncpg=True)
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
