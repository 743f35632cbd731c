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

The package, one job per module:

- :mod:`~lambda_pool.warm.policy` — the I/O-free reuse rules (:func:`decide_reuse`);
- :mod:`~lambda_pool.warm.stats` — :class:`WarmStats`;
- :mod:`~lambda_pool.warm.driver` — driver probing without a round trip, fork abandonment;
- :mod:`~lambda_pool.warm.reset` — the session reset on return;
- :mod:`~lambda_pool.warm.guard` — per-connection bookkeeping and :class:`WarmGuard`;
- :mod:`~lambda_pool.warm.identity` — cache keys;
- :mod:`~lambda_pool.warm.warm_pool` — :class:`WarmPool`;
- :mod:`~lambda_pool.warm.cache` — :class:`EngineCache`, :func:`warm_engine`,
  :func:`warm_async_engine`.

Every public name is importable from ``lambda_pool.warm`` itself.
"""

from __future__ import annotations

from lambda_pool.warm.cache import (
    EngineCache,
    cached_engines,
    forget_cached_engines,
    warm_async_engine,
    warm_engine,
)
from lambda_pool.warm.driver import DriverState, abandon_inherited_connection, probe_driver
from lambda_pool.warm.guard import (
    CREDENTIALS_EXPIRE_AT,
    WARM_INFO_KEY,
    WarmConnectionInfo,
    WarmGuard,
)
from lambda_pool.warm.identity import identity_key
from lambda_pool.warm.policy import (
    DEFAULT_PRE_PING_IDLE_SECONDS,
    PRE_PING_IDLE_ENV,
    ConnectionState,
    Ping,
    Replace,
    ReplaceReason,
    Reuse,
    ReuseDecision,
    ReusePolicy,
    decide_reuse,
    pre_ping_idle_seconds_from_env,
)
from lambda_pool.warm.reset import (
    areset_session,
    g_reset_session,
    reset_session,
    warm_connect_args,
)
from lambda_pool.warm.stats import WarmStats
from lambda_pool.warm.warm_pool import WarmPool, WarmSlots

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
