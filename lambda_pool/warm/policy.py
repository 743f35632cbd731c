"""The reuse rules of the warm cache: I/O-free, shared by ``WarmPool`` and the SQLAlchemy adapter.

:func:`decide_reuse` turns what is known about a kept connection (:class:`ConnectionState`,
gathered without a round trip) and the tunables (:class:`ReusePolicy`) into
:class:`Reuse`, :class:`Ping` or :class:`Replace` with a :class:`ReplaceReason`.
``LAMBDA_POOL_PRE_PING_IDLE_SECONDS`` is read here too.
"""

from __future__ import annotations

import dataclasses
import enum
import os

from lambda_pool.exc import ArgumentError

DEFAULT_PRE_PING_IDLE_SECONDS = 60.0
PRE_PING_IDLE_ENV = "LAMBDA_POOL_PRE_PING_IDLE_SECONDS"


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
