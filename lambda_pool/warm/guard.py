"""Applying the reuse rules at checkout: per-connection bookkeeping and :class:`WarmGuard`.

``record.info[WARM_INFO_KEY]`` holds a :class:`WarmConnectionInfo` (opener process,
SnapStart generation, times, event loop); :class:`WarmGuard` probes the driver and asks
:func:`~lambda_pool.warm.policy.decide_reuse`.  One guard per pool, shared by both shells
and by the SQLAlchemy adapter.
"""

from __future__ import annotations

import dataclasses
import os
import select
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lambda_pool import lifecycle
from lambda_pool.warm.driver import (
    _PSYCOPG_CLASSES,
    DriverState,
    _is_psycopg,
    _running_loop,
    _socket_readable,
    probe_driver,
)
from lambda_pool.warm.policy import ConnectionState, ReuseDecision, ReusePolicy, decide_reuse
from lambda_pool.warm.stats import WarmStats

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    import asyncio


# record.info keys.  CREDENTIALS_EXPIRE_AT is the engine's contract (docs/ARCHITECTURE.md,
# "Credentials ↔ engine"); WARM_INFO_KEY holds this module's per-connection bookkeeping.
CREDENTIALS_EXPIRE_AT = "lambda_pool.credentials_expire_at"
WARM_INFO_KEY = "lambda_pool.warm"
# Set by WarmPool.mark_session_reset() between the invocation's COMMIT (sent with the
# session reset) and the return of the connection, which then sends nothing more.
SESSION_RESET_KEY = "lambda_pool.warm.session_reset"


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
    #: A zero-timeout poll of a blocking psycopg connection's socket (``select.poll``'s
    #: ``poll``, the socket registered once), made at the first warm checkout.
    socket_poll: Callable[[int], list[Any]] | None = dataclasses.field(
        default=None, repr=False, compare=False
    )

    def opening_loop(self) -> asyncio.AbstractEventLoop | None:
        """The loop the connection was opened on, if it was one and it still exists."""
        return None if self.loop is None else self.loop()


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

    def reusable_now(
        self, conn: Any, info: WarmConnectionInfo, credentials_expire_at: float | None
    ) -> bool:
        """True only when :meth:`decide` would say :class:`Reuse` for a blocking psycopg
        connection, checked in :func:`decide_reuse`'s order without building its
        records: the warm checkout asks this first and calls :meth:`decide` (which names
        the reason) only when it is ``False``.  Every warm invocation asks, so it reads
        the state directly (``tests/test_warm_quick_paths.py`` checks it agrees with
        :meth:`decide` over every rule)."""
        if (
            info.loop is not None
            or info.reset_failed
            # _is_psycopg(), its answer for the class read first
            or not (_PSYCOPG_CLASSES.get(conn.__class__) or _is_psycopg(conn))
        ):
            return False
        # lifecycle.restore_generation(), read directly: every warm checkout asks.
        if (
            info.opener_pid != os.getpid()
            or info.opened_generation != lifecycle._restore_generation
        ):
            return False
        # libpq's state, read as psycopg's closed and broken do: anything but
        # CONNECTION_OK (0) is closed, broken or not yet connected.
        pgconn = conn.pgconn
        if pgconn.status != 0 or pgconn.transaction_status != 0:
            return False
        policy = self.policy
        now = self.clock()
        recycle = policy.recycle
        if recycle is not None and recycle >= 0 and now - info.opened_at > recycle:
            return False
        if (
            policy.recycle_on_credentials_expiry
            and credentials_expire_at is not None
            and now >= credentials_expire_at
        ):
            return False
        idle = now - info.last_used_at
        threshold = policy.pre_ping_idle_seconds
        if threshold is not None and (idle < 0 or idle > threshold or threshold == 0):
            return False
        poll = info.socket_poll
        if poll is None:
            poll = info.socket_poll = _socket_poller(pgconn.socket)
            if poll is None:
                return not _socket_readable(conn)
        return not poll(0)

    def mark_returned(self, info: WarmConnectionInfo) -> None:
        """Start the idle timer: the connection just came back from an invocation."""
        info.last_used_at = self.clock()


def _restore_generation() -> int:
    return lifecycle.restore_generation()


def _socket_poller(fileno: int) -> Callable[[int], list[Any]] | None:
    """``poll`` of a ``select.poll`` object watching ``fileno`` for input or EOF (what
    :func:`~lambda_pool.warm.driver._socket_readable` asks, with the registration done
    once), or ``None`` where there is no ``poll()`` or no socket."""
    if fileno < 0 or not hasattr(select, "poll"):
        return None
    poller = select.poll()
    poller.register(fileno, select.POLLIN | select.POLLPRI)
    return poller.poll
