"""The I/O-free core of the pool: argument checks, slot accounting, deadlines, checkout decisions.

Nothing here touches a socket, a clock or a lock: every function takes the current time
as an argument and every slot class is a plain state machine.  The sync shell (threads)
and the async shell (asyncio) in :mod:`lambda_pool.pool.base` hold a lock around these
calls and do the I/O the decisions ask for, so both modes share one source of truth for
"may I have a connection, must I wait, is this one too old, does the returned one stay".

The I/O itself is described by :class:`Op` values that the pool's procedures (written
once, as generators) yield; the shells execute them with or without ``await``.
"""

from __future__ import annotations

import abc
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any, ClassVar, TypeVar

# The procedure runners, re-exported: they live apart so an engine loads them without
# the pool (see lambda_pool._drive).
from lambda_pool._drive import drive as drive
from lambda_pool._drive import drive_async as drive_async
from lambda_pool._record import Constant, StaticGeneric
from lambda_pool.exc import ArgumentError

R = TypeVar("R")

# Names accepted for ``reset_on_return`` and what they mean.
RESET_ROLLBACK = "rollback"
RESET_COMMIT = "commit"
RESET_NONE = None


# --------------------------------------------------------------------------- arguments


def check_reset_on_return(value: object) -> str | None:
    """Normalise ``reset_on_return`` to ``"rollback"``, ``"commit"`` or ``None``."""
    # bool first: True == 1 would otherwise be looked up as a plain value.
    if value is True or value == RESET_ROLLBACK:
        return RESET_ROLLBACK
    if value == RESET_COMMIT:
        return RESET_COMMIT
    if value is None or value is False or value == "none":
        return RESET_NONE
    raise ArgumentError(
        f"Invalid value for reset_on_return: {value!r}; "
        "accepted: 'rollback' or True (the default), 'commit', None, False or 'none'"
    )


def check_int(name: str, value: object, *, minimum: int) -> int:
    """Reject non-integers (``bool`` included) and values below ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ArgumentError(
            f"Invalid value for {name}: {value!r}; accepted: an integer >= {minimum}"
        )
    return value


def check_timeout(value: object) -> float | None:
    """``timeout``: seconds >= 0 (0 = fail at once) or ``None`` (wait forever)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ArgumentError(
            f"Invalid value for timeout: {value!r}; "
            "accepted: a number of seconds >= 0, or None to wait forever"
        )
    return float(value)


def check_recycle(value: object) -> float:
    """``recycle``: seconds (> 0) after which a connection is replaced; -1 (or < 0) = never."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ArgumentError(
            f"Invalid value for recycle: {value!r}; accepted: a number of seconds, -1 = never"
        )
    return float(value)


def check_echo(value: object) -> bool | str:
    """``echo``: ``False``/``None``, ``True`` (INFO) or ``"debug"`` (DEBUG)."""
    if value is None or value is False:
        return False
    if value is True or value == "debug":
        return value  # type: ignore[return-value]
    raise ArgumentError(f"Invalid value for echo: {value!r}; accepted: False, True or 'debug'")


def timeout_message(pool_size: int, max_overflow: int, timeout: float | None) -> str:
    """SQLAlchemy's exhaustion message, word for word (users grep logs for it)."""
    shown = "None" if timeout is None else f"{timeout:.2f}"
    return (
        f"QueuePool limit of size {pool_size} overflow {max_overflow} reached, "
        f"connection timed out, timeout {shown}"
    )


# --------------------------------------------------------------------------- deadlines


class Deadline:
    """When a waiting caller gives up, on a monotonic clock the shell reads."""

    __slots__ = ("expires_at",)

    def __init__(self, now: float, timeout: float | None) -> None:
        self.expires_at = None if timeout is None else now + timeout

    def remaining(self, now: float) -> float | None:
        """Seconds left (never negative), or ``None`` for no limit."""
        if self.expires_at is None:
            return None
        return max(0.0, self.expires_at - now)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


# --------------------------------------------------------------------------- checkout decisions


class Stale(Constant):
    """Why the connection in a slot must be replaced before it is handed out."""

    __slots__ = ()

    NO_CONNECTION: ClassVar[Stale]
    RECYCLE: ClassVar[Stale]
    POOL_INVALIDATED: ClassVar[Stale]
    SOFT_INVALIDATED: ClassVar[Stale]


Stale._define(
    NO_CONNECTION="no connection",
    RECYCLE="recycle",
    POOL_INVALIDATED="pool invalidated",
    SOFT_INVALIDATED="soft invalidated",
)


def stale_reason(
    *,
    now: float,
    has_connection: bool,
    starttime: float,
    recycle: float,
    pool_invalidated_at: float,
    soft_invalidated_at: float,
) -> Stale | None:
    """The checks of a checkout, in SQLAlchemy's order, all on wall-clock time."""
    if not has_connection:
        return Stale.NO_CONNECTION
    if recycle > -1 and now - starttime > recycle:
        return Stale.RECYCLE
    if pool_invalidated_at > starttime:
        return Stale.POOL_INVALIDATED
    if soft_invalidated_at > starttime:
        return Stale.SOFT_INVALIDATED
    return None


# --------------------------------------------------------------------------- I/O descriptions


class Op(Constant):
    """An I/O step a pool procedure asks its shell to perform."""

    __slots__ = ()

    CONNECT: ClassVar[Op]  # arg None -> new DB-API connection
    PING: ClassVar[Op]  # arg dbapi connection -> bool
    ROLLBACK: ClassVar[Op]
    COMMIT: ClassVar[Op]
    CLOSE: ClassVar[Op]
    TERMINATE: ClassVar[Op]  # close without awaiting anything (after an interruption)
    WAIT: ClassVar[Op]  # arg (version, seconds or None) -> None, returns when woken or timed out


Op._define(
    CONNECT="connect",
    PING="ping",
    ROLLBACK="rollback",
    COMMIT="commit",
    CLOSE="close",
    TERMINATE="terminate",
    WAIT="wait",
)


Step = tuple[Op, Any]


# --------------------------------------------------------------------------- slot accounting


class Acquire(Constant):
    """What a checkout gets from the slot policy."""

    __slots__ = ()

    TAKE: ClassVar[Acquire]  # an idle record: check it, then hand it out
    NEW: ClassVar[Acquire]  # a new record (no connection yet) counted in the pool
    SHARED: ClassVar[Acquire]  # a record already in use that this pool shares (StaticPool)
    WAIT: ClassVar[Acquire]  # the limit is reached: wait for a release


Acquire._define(TAKE="take", NEW="new", SHARED="shared", WAIT="wait")


class Slots(abc.ABC, StaticGeneric[R]):
    """Counts records and decides checkouts and returns; subclasses are the pool policies.

    ``version`` changes on every event that can let a waiting caller proceed, so a
    shell can wait for "something changed since I looked" without losing a wake-up.
    """

    def __init__(self) -> None:
        self.version = 0
        self.out = 0
        self.retired = False

    def retire(self) -> None:
        """The pool was replaced (``engine.dispose()``): records coming back are closed."""
        self.retired = True

    @abc.abstractmethod
    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        """Decide a checkout: reuse an idle record, make a new one (``make``), or wait."""

    def ready(self, record: R) -> None:
        """The record's checkout preparation ended (connected, checked, or failed)."""

    @abc.abstractmethod
    def release(self, record: R) -> bool:
        """A checked-out record comes back; True = keep it idle, False = close it."""

    @abc.abstractmethod
    def discard(self, record: R) -> None:
        """A checked-out record leaves the pool for good (detach, failed connect)."""

    @abc.abstractmethod
    def drain_idle(self) -> list[R]:
        """Remove and return every idle record (dispose); checked-out ones stay counted."""

    def forget_all(self) -> list[R]:
        """Forget every record (after a fork they belong to the parent); return the idle ones."""
        idle = self.drain_idle()
        self.out = 0
        self._bump()
        return idle

    def _bump(self) -> None:
        self.version += 1

    # counters -----------------------------------------------------------------------------

    @abc.abstractmethod
    def size(self) -> int:
        """The pool's configured size (``pool.size()``)."""

    @abc.abstractmethod
    def checkedin(self) -> int:
        """Idle records ready for checkout (``pool.checkedin()``)."""

    def checkedout(self) -> int:
        return max(0, self.out)

    def overflow(self) -> int:
        return 0


class QueueSlots(Slots[R]):
    """QueuePool: ``pool_size`` kept connections plus ``max_overflow`` temporary ones.

    ``pool_size=0`` means no limit and no overflow accounting; ``max_overflow=-1``
    means never wait.  Idle records are handed out FIFO, or LIFO with ``use_lifo``.
    """

    def __init__(self, pool_size: int, max_overflow: int, use_lifo: bool) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.max_overflow = max_overflow
        self.use_lifo = use_lifo
        self.idle: deque[R] = deque()
        self.total = 0  # records counted in the pool: idle + checked out
        # How many idle records a return may leave (pool_size=0: no limit; 0 once retired).
        self.keep_limit: float = pool_size if pool_size else float("inf")

    def retire(self) -> None:
        super().retire()
        self.keep_limit = 0

    def _unbounded(self) -> bool:
        return self.pool_size == 0 or self.max_overflow < 0

    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        if self.idle:
            record = self.idle.pop() if self.use_lifo else self.idle.popleft()
            self.out += 1
            return Acquire.TAKE, record
        if self._unbounded() or self.total < self.pool_size + self.max_overflow:
            self.total += 1
            self.out += 1
            return Acquire.NEW, make()
        return Acquire.WAIT, None

    def release(self, record: R) -> bool:
        self.out -= 1
        self.version += 1  # _bump(), inline: every return runs this
        if len(self.idle) < self.keep_limit:
            self.idle.append(record)
            return True
        self.total -= 1
        return False

    def discard(self, record: R) -> None:
        self.out -= 1
        self.total -= 1
        self._bump()

    def drain_idle(self) -> list[R]:
        idle = list(self.idle)
        self.idle.clear()
        self.total -= len(idle)
        self._bump()
        return idle

    def forget_all(self) -> list[R]:
        idle = super().forget_all()
        self.total = 0
        return idle

    def size(self) -> int:
        return self.pool_size

    def checkedin(self) -> int:
        return len(self.idle)

    def checkedout(self) -> int:
        return max(0, self.total - len(self.idle))

    def overflow(self) -> int:
        if self.pool_size == 0:
            return 0
        return max(0, self.total - self.pool_size)


class NullSlots(Slots[R]):
    """NullPool: a new connection per checkout, closed on return; nothing is kept."""

    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        self.out += 1
        return Acquire.NEW, make()

    def release(self, record: R) -> bool:
        self.out -= 1
        self._bump()
        return False

    def discard(self, record: R) -> None:
        self.out -= 1
        self._bump()

    def drain_idle(self) -> list[R]:
        return []

    def size(self) -> int:
        return 0

    def checkedin(self) -> int:
        return 0


class StaticSlots(Slots[R]):
    """StaticPool: one record shared by every checkout.

    Only the checkout that finds it unused may reconnect or ping it; a checkout
    arriving while that happens waits, so two callers never connect the slot twice.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record: R | None = None
        self.users = 0
        self.busy = False
        # SQLAlchemy's record state: in use since the last checkout (``checkin`` fires
        # once, at the first return after it), and the newest checkout's proxy (only
        # its garbage collection returns the record).
        self.in_use = False
        self.current: int | None = None

    def checked_out_by(self, proxy_id: int) -> None:
        self.in_use = True
        self.current = proxy_id

    def end_use(self, proxy_id: int, collected: bool, reset: bool) -> tuple[bool, bool]:
        """A proxy returns: (reset it?, fire ``checkin``?).  Closing any proxy resets the
        connection and ends the record's use; collecting one that a newer checkout
        superseded does nothing (SQLAlchemy's rules)."""
        if collected and proxy_id != self.current:
            return False, False
        fire = self.in_use
        self.in_use = False
        if proxy_id == self.current:
            self.current = None
        return reset, fire

    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        if self.busy:
            return Acquire.WAIT, None
        self.out += 1
        self.users += 1
        if self.record is None:
            self.record = make()
            self.busy = True
            return Acquire.NEW, self.record
        if self.users == 1:
            self.busy = True
            return Acquire.TAKE, self.record
        return Acquire.SHARED, self.record

    def ready(self, record: R) -> None:
        if record is self.record:
            self.busy = False
            self._bump()

    def release(self, record: R) -> bool:
        self.out -= 1
        self._bump()
        if record is self.record:
            self.users -= 1
            if self.retired and self.users <= 0:
                self.record = None
                return False
            return True
        # A record replaced by dispose() is closed by its last user only.
        return False

    def discard(self, record: R) -> None:
        self.out -= 1
        if record is self.record:
            self.users -= 1
            self.busy = False
            self.record = None
        self._bump()

    def drain_idle(self) -> list[R]:
        record = self.record
        if record is None:
            return []
        self.record = None
        self.busy = False
        self._bump()
        if self.users:
            # In use: the users keep it; the last return closes it (release -> False).
            self.users = 0
            return []
        return [record]

    def size(self) -> int:
        return 1

    def checkedin(self) -> int:
        return 1 if self.record is not None and self.users == 0 else 0


class ThreadSlots(Slots[R]):
    """SingletonThreadPool: one record per thread (``key``), at most ``pool_size`` kept."""

    def __init__(self, pool_size: int) -> None:
        super().__init__()
        self.pool_size = pool_size
        self.by_key: dict[Hashable, R] = {}
        self.in_use: dict[int, int] = {}  # id(record) -> nested checkouts

    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        self.out += 1
        record = self.by_key.get(key)
        if record is None:
            record = make()
            self.by_key[key] = record
            self.in_use[id(record)] = 1
            return Acquire.NEW, record
        nested = self.in_use.get(id(record), 0)
        self.in_use[id(record)] = nested + 1
        return (Acquire.TAKE if nested == 0 else Acquire.SHARED), record

    def _key_of(self, record: R) -> Hashable:
        for key, candidate in self.by_key.items():
            if candidate is record:
                return key
        return None

    def release(self, record: R) -> bool:
        self.out -= 1
        self._bump()
        left = self.in_use.get(id(record), 1) - 1
        if left > 0:
            self.in_use[id(record)] = left
            return True
        self.in_use.pop(id(record), None)
        key = self._key_of(record)
        if key is None and record not in self.by_key.values():
            return False  # dropped by dispose() while in use
        if self.retired:
            self.by_key.pop(key, None)
            return False
        if len(self.by_key) > self.pool_size:
            # More threads than pool_size: the returning one makes room.
            self.by_key.pop(key, None)
            return False
        return True

    def discard(self, record: R) -> None:
        self.out -= 1
        self.in_use.pop(id(record), None)
        key = self._key_of(record)
        if key is not None:
            del self.by_key[key]
        self._bump()

    def drain_idle(self) -> list[R]:
        idle = [r for r in self.by_key.values() if id(r) not in self.in_use]
        # Every record leaves the pool; the ones in use are closed when returned.
        self.by_key.clear()
        self._bump()
        return idle

    def forget_all(self) -> list[R]:
        idle = super().forget_all()
        self.in_use.clear()
        return idle

    def size(self) -> int:
        return self.pool_size

    def checkedin(self) -> int:
        return sum(1 for r in self.by_key.values() if id(r) not in self.in_use)

    def checkedout(self) -> int:
        return len(self.in_use)


class AssertionSlots(Slots[R]):
    """AssertionPool: one record, at most one checkout at a time (a second one is a bug).

    ``dispose()`` closes the connection even while it is checked out and forgets the
    checkout (SQLAlchemy's rule); the record reconnects at its next checkout.
    """

    def __init__(self) -> None:
        super().__init__()
        self.record: R | None = None
        self.checked_out = False

    def acquire(self, make: Callable[[], R], key: Hashable = None) -> tuple[Acquire, R | None]:
        if self.checked_out:
            raise AssertionError("connection is already checked out")
        self.checked_out = True
        self.out = 1
        if self.record is None:
            self.record = make()
            return Acquire.NEW, self.record
        return Acquire.TAKE, self.record

    def release(self, record: R) -> bool:
        if not self.checked_out:
            raise AssertionError("connection is not checked out")
        self.checked_out = False
        self.out = 0
        self._bump()
        return record is self.record and not self.retired

    def discard(self, record: R) -> None:
        self.checked_out = False
        self.out = 0
        if record is self.record:
            self.record = None
        self._bump()

    def drain_idle(self) -> list[R]:
        self.checked_out = False
        self.out = 0
        self._bump()
        return [] if self.record is None else [self.record]

    def size(self) -> int:
        return 1

    def checkedin(self) -> int:
        return 1 if self.record is not None and not self.checked_out else 0
