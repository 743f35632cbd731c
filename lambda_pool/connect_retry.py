"""Retrying a connect that the server (or a pooler in front of it) refused for lack of room.

A burst of Lambda invocations can meet a database at its connection limit: PostgreSQL's
``too_many_connections`` (SQLSTATE 53300: "sorry, too many clients already", "remaining
connection slots are reserved ...", a role's or database's ``CONNECTION LIMIT``),
PgBouncer's ``max_client_conn`` or RDS Proxy's limits.  Slots free up within
milliseconds when other invocations finish, so the engines retry such a connect a few
times with *full-jitter exponential backoff* (a random sleep between 0 and
``min(cap, base * 2**retry)``): jitter spreads a thundering herd of containers instead
of having them all retry in lock-step.  Only errors the dialect classifies as capacity
errors (``dialect.is_capacity_error(exc)``) are retried; authentication failures and
everything else propagate at once.  After the last attempt the driver's own error
propagates unchanged (its message names the host and user, never the password).

The policy (:class:`ConnectRetryPolicy`) is I/O-free: it turns "which retry, how long so
far, a random draw" into "sleep this long" or "give up".  :func:`retry_connect_sync` and
:func:`retry_connect_async` are the thin shells that sleep, so the blocking and asyncio
engines share one rule; the random source, the sleep and the clock are injectable.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lambda_pool.exc import ArgumentError

__all__ = [
    "DEFAULT_CONNECT_RETRIES",
    "DEFAULT_CONNECT_RETRY_BACKOFF",
    "MAX_BACKOFF",
    "MAX_TOTAL_SECONDS",
    "ConnectRetry",
    "ConnectRetryPolicy",
    "connect_retry_from_kwargs",
    "retry_connect_async",
    "retry_connect_sync",
]

log = logging.getLogger("lambda_pool.engine")

#: Retries after the first attempt (so 4 attempts in all) by default.
DEFAULT_CONNECT_RETRIES = 3
#: Base of the exponential backoff, in seconds: retry ``k`` sleeps up to ``base * 2**k``.
DEFAULT_CONNECT_RETRY_BACKOFF = 0.1
#: No single sleep is longer than this, whatever the base and the retry number.
MAX_BACKOFF = 2.0
#: No retry starts (nor sleep is begun) once this many seconds passed since the first
#: attempt: a Lambda invocation has a deadline, and a caller waiting longer than this
#: for a slot is better served by the error.
MAX_TOTAL_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class ConnectRetryPolicy:
    """How often and how long to retry a connect refused for capacity (no I/O here).

    ``retries``: attempts after the first one (``0`` turns retrying off).  ``backoff``:
    base seconds of the full-jitter exponential backoff.  ``max_backoff``: cap of one
    sleep.  ``max_total``: no retry once this many seconds passed since the first
    attempt (the sleep is shortened to fit, or the retry skipped).
    """

    retries: int = DEFAULT_CONNECT_RETRIES
    backoff: float = DEFAULT_CONNECT_RETRY_BACKOFF
    max_backoff: float = MAX_BACKOFF
    max_total: float = MAX_TOTAL_SECONDS

    @property
    def attempts(self) -> int:
        """Connect attempts in all: the first plus ``retries``."""
        return self.retries + 1

    def delay(self, retry: int, elapsed: float, draw: float) -> float | None:
        """Seconds to sleep before retry number ``retry`` (0-based), or ``None``: give up.

        ``elapsed``: seconds since the first attempt began; ``draw``: a uniform random
        number in ``[0, 1)``.  Full jitter: ``draw * min(max_backoff, backoff * 2**retry)``.
        """
        if retry >= self.retries:
            return None
        remaining = self.max_total - elapsed
        if remaining <= 0:
            return None
        # min() before the power would overflow for absurd retry counts.
        ceiling = min(self.max_backoff, self.backoff * (2.0 ** min(retry, 62)))
        return min(max(0.0, draw) * ceiling, remaining)


@dataclasses.dataclass(frozen=True)
class ConnectRetry:
    """A policy plus its I/O: the random source, the sleep and the clock (injectable).

    ``sleep`` is ``time.sleep`` for blocking engines; ``async_sleep`` (a coroutine
    function) defaults to ``asyncio.sleep`` for asyncio engines (imported when first
    needed: blocking users should not pay for importing asyncio).  ``clock`` is monotonic seconds.
    """

    policy: ConnectRetryPolicy = ConnectRetryPolicy()
    random: Callable[[], float] = random.random
    sleep: Callable[[float], None] = time.sleep
    async_sleep: Callable[[float], Awaitable[None]] | None = None
    clock: Callable[[], float] = time.monotonic


#: The ``create_engine`` keywords this module reads.
KEYWORDS = frozenset(
    {"connect_retries", "connect_retry_backoff", "connect_retry_random", "connect_retry_sleep"}
)


def connect_retry_from_kwargs(kw: Mapping[str, Any], *, is_async: bool) -> ConnectRetry:
    """Validate ``connect_retries``, ``connect_retry_backoff``, ``connect_retry_random``
    and ``connect_retry_sleep`` and build the engine's :class:`ConnectRetry`.

    Raises :class:`lambda_pool.exc.ArgumentError` naming the keyword and what it accepts.
    """
    retries = kw.get("connect_retries", DEFAULT_CONNECT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
        raise ArgumentError(
            f"Invalid value for connect_retries: {retries!r}; accepted: an integer from 0 "
            "(no retry) to 20: how often a connect refused for lack of connection slots "
            "is retried"
        )
    backoff = kw.get("connect_retry_backoff", DEFAULT_CONNECT_RETRY_BACKOFF)
    if (
        isinstance(backoff, bool)
        or not isinstance(backoff, (int, float))
        or not 0 < backoff <= MAX_BACKOFF
    ):
        raise ArgumentError(
            f"Invalid value for connect_retry_backoff: {backoff!r}; accepted: seconds "
            f"> 0 and <= {MAX_BACKOFF} (the base of the jittered exponential backoff)"
        )
    options: dict[str, Any] = {}
    draw = kw.get("connect_retry_random")
    if draw is not None:
        if not callable(draw):
            raise ArgumentError(
                f"Invalid value for connect_retry_random: {draw!r}; accepted: a function "
                "returning a float in [0, 1), e.g. random.Random(42).random"
            )
        options["random"] = draw
    sleep = kw.get("connect_retry_sleep")
    if sleep is not None:
        if not callable(sleep):
            raise ArgumentError(
                f"Invalid value for connect_retry_sleep: {sleep!r}; accepted: a function "
                "taking seconds (a coroutine function for create_async_engine)"
            )
        options["async_sleep" if is_async else "sleep"] = sleep
    return ConnectRetry(ConnectRetryPolicy(retries=retries, backoff=float(backoff)), **options)


def _give_up_or_wait(
    retry: ConnectRetry, attempt: int, started: float, exc: BaseException
) -> float | None:
    delay = retry.policy.delay(attempt, retry.clock() - started, retry.random())
    if delay is None:
        log.warning(
            "connect refused for lack of connection slots after %d attempt(s); giving up: %s",
            attempt + 1,
            type(exc).__name__,
        )
        return None
    # The exception type only: the driver's message is the caller's to show, and logs
    # must never carry more than the error that reaches the caller anyway.
    log.info(
        "connect refused for lack of connection slots (%s); retry %d of %d in %.3f s",
        type(exc).__name__,
        attempt + 1,
        retry.policy.retries,
        delay,
    )
    return delay


def retry_connect_sync(
    connect: Callable[[], Any],
    is_capacity_error: Callable[[BaseException], bool],
    retry: ConnectRetry,
) -> Any:
    """Call ``connect()``; on a capacity error sleep as the policy says and call it again."""
    started = retry.clock()
    attempt = 0
    while True:
        try:
            return connect()
        except Exception as exc:
            if not is_capacity_error(exc):
                raise
            delay = _give_up_or_wait(retry, attempt, started, exc)
            if delay is None:
                raise
        retry.sleep(delay)
        attempt += 1


async def retry_connect_async(
    connect: Callable[[], Awaitable[Any]],
    is_capacity_error: Callable[[BaseException], bool],
    retry: ConnectRetry,
) -> Any:
    """:func:`retry_connect_sync` for asyncio: the sleep is awaited."""
    started = retry.clock()
    attempt = 0
    while True:
        try:
            return await connect()
        except Exception as exc:
            if not is_capacity_error(exc):
                raise
            delay = _give_up_or_wait(retry, attempt, started, exc)
            if delay is None:
                raise
        if retry.async_sleep is None:
            import asyncio

            await asyncio.sleep(delay)
        else:
            await retry.async_sleep(delay)
        attempt += 1
