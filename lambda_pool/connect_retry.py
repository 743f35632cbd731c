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
everything else propagate at once.

How long to keep trying depends on whether the work has a deadline
(:mod:`lambda_pool.deadlines`; ``with_connection`` sets one per invocation):

* **With a deadline** the budget is the time left, not a retry count: a storm that clears
  before the deadline costs no failure.  A retry is started only if one more connect
  attempt still fits before the deadline with room to spare (twice the slowest attempt so
  far plus 10 ms: a loaded host is slower), and the
  sleep is shortened to leave room for it.  When it does not fit, lambda-pool gives up
  *before* the deadline with :class:`~lambda_pool.exc.CapacityExhaustedError` (how many
  attempts, how long, the server's last refusal as ``__cause__``) rather than have the
  invocation killed mid-connect.  It is a ``DeadlineExceededError`` of the ``connect``
  step, and is raised too when a retry started in time is cut short by the deadline (a
  slow server under a storm): after refusals for capacity, that is what ran out.
  ``connect_retries=0`` still turns retrying off.
* **Without one** (plain scripts, ``create_engine`` outside the decorator) the count
  rules: ``connect_retries`` retries (default 3), never past :data:`MAX_TOTAL_SECONDS`,
  and after the last attempt the driver's own error propagates unchanged (its message
  names the host and user, never the password).

The policy (:class:`ConnectRetryPolicy`) is I/O-free: it turns "which retry, how long so
far, how much time is left, a random draw" into "sleep this long" or "give up".
:func:`retry_connect_sync` and :func:`retry_connect_async` are the thin shells that
sleep, so the blocking and asyncio engines share one rule; the random source, the sleep
and the clock are injectable.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from lambda_pool import deadlines
from lambda_pool._record import FrozenRecord
from lambda_pool.exc import ArgumentError, CapacityExhaustedError, DeadlineExceededError

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


class ConnectRetryPolicy(FrozenRecord):
    """How often and how long to retry a connect refused for capacity (no I/O here).

    ``retries``: attempts after the first one (``0`` turns retrying off).  ``backoff``:
    base seconds of the full-jitter exponential backoff.  ``max_backoff``: cap of one
    sleep.  ``max_total``: no retry once this many seconds passed since the first
    attempt (the sleep is shortened to fit, or the retry skipped).
    """

    __slots__ = _fields = ("retries", "backoff", "max_backoff", "max_total")
    retries: int
    backoff: float
    max_backoff: float
    max_total: float

    def __init__(
        self,
        retries: int = DEFAULT_CONNECT_RETRIES,
        backoff: float = DEFAULT_CONNECT_RETRY_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        max_total: float = MAX_TOTAL_SECONDS,
    ) -> None:
        object.__setattr__(self, "retries", retries)
        object.__setattr__(self, "backoff", backoff)
        object.__setattr__(self, "max_backoff", max_backoff)
        object.__setattr__(self, "max_total", max_total)

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
        return min(max(0.0, draw) * self._ceiling(retry), remaining)

    def delay_within(
        self, retry: int, draw: float, remaining: float, attempt_seconds: float
    ) -> float | None:
        """With a deadline: seconds to sleep before retry ``retry`` (0-based), or ``None``.

        ``remaining``: seconds left before the deadline; ``attempt_seconds``: how long one
        connect attempt takes (the slowest so far).  The retry count does not apply (the
        deadline bounds the work), except that ``retries=0`` still means no retry; the
        sleep is shortened so one more attempt fits, and when it cannot: ``None``.
        """
        if self.retries == 0:
            return None
        # Twice the slowest attempt plus 10 ms stays free: a refused connect takes
        # longer on a loaded host, and one cut by the deadline would end at the deadline
        # itself instead of before it with the capacity error.
        budget = remaining - (2 * attempt_seconds + _ATTEMPT_SLACK_S)
        if budget <= 0:
            return None
        return min(max(0.0, draw) * self._ceiling(retry), budget)

    def _ceiling(self, retry: int) -> float:
        # min() before the power would overflow for absurd retry counts.
        return min(self.max_backoff, self.backoff * (2.0 ** min(retry, 62)))


#: Seconds kept free beyond two attempts' time when a deadline bounds the retries.
_ATTEMPT_SLACK_S = 0.01

_DEFAULT_POLICY = ConnectRetryPolicy()
# Named outside the class: there ``random`` is the field, not the module.
_UNIFORM = random.random


class ConnectRetry(FrozenRecord):
    """A policy plus its I/O: the random source, the sleep and the clock (injectable).

    ``sleep`` is ``time.sleep`` for blocking engines; ``async_sleep`` (a coroutine
    function) defaults to ``asyncio.sleep`` for asyncio engines (imported when first
    needed: blocking users should not pay for importing asyncio).  ``clock`` is monotonic seconds.
    """

    __slots__ = _fields = ("policy", "random", "sleep", "async_sleep", "clock")
    policy: ConnectRetryPolicy
    random: Callable[[], float]
    sleep: Callable[[float], None]
    async_sleep: Callable[[float], Awaitable[None]] | None
    clock: Callable[[], float]

    def __init__(
        self,
        policy: ConnectRetryPolicy = _DEFAULT_POLICY,
        random: Callable[[], float] = _UNIFORM,
        sleep: Callable[[float], None] = time.sleep,
        async_sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        object.__setattr__(self, "policy", policy)
        object.__setattr__(self, "random", random)
        object.__setattr__(self, "sleep", sleep)
        object.__setattr__(self, "async_sleep", async_sleep)
        object.__setattr__(self, "clock", clock)


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


def _exhausted(
    attempts: int, elapsed: float, remaining: float, slowest: float, *, cut: bool = False
) -> CapacityExhaustedError:
    bound = deadlines.current()
    source = bound.source if bound is not None else "deadline"
    elapsed_ms = int(elapsed * 1000)
    remaining_ms = max(0, int(remaining * 1000))
    if cut:
        refused = attempts - 1
        ending = (
            f"the server refused {refused} connect attempt(s) for lack of connection slots "
            f"(capacity exhausted) and the last attempt did not finish in the time left; "
            f"{elapsed_ms} ms in all."
        )
    else:
        ending = (
            f"the server refused all {attempts} connect attempt(s) over {elapsed_ms} ms for "
            f"lack of connection slots (capacity exhausted), and the {remaining_ms} ms left "
            f"are less than one more attempt takes (about {int(slowest * 1000)} ms)."
        )
    message = (
        f"no database connection slot came free before the {source}: {ending} The server's "
        "last refusal is the cause. Put RDS Proxy or PgBouncer in front of the database, "
        "raise its max_connections, or cap the function's concurrency "
        "(ReservedConcurrentExecutions)"
    )
    return CapacityExhaustedError(
        message, attempts=attempts, elapsed_ms=elapsed_ms, remaining_ms=remaining_ms
    )


class _Attempts:
    """The state of one retried connect, shared by the blocking and asyncio shells."""

    __slots__ = ("count", "last_refusal", "retry", "slowest", "started")

    def __init__(self, retry: ConnectRetry) -> None:
        self.retry = retry
        self.started = retry.clock()
        self.count = 0
        self.slowest = 0.0
        self.last_refusal: BaseException | None = None

    def cut_by_deadline(self, exc: DeadlineExceededError) -> None:
        """A retry the deadline cut short (a connect started in time, then slower than
        the ones before): after capacity refusals that is still capacity exhaustion, and
        the caller should hear so; a first attempt cut short is the deadline's own error."""
        if self.last_refusal is None or isinstance(exc, CapacityExhaustedError):
            return
        now = self.retry.clock()
        remaining = deadlines.remaining()
        raise _exhausted(
            self.count + 1, now - self.started, remaining or 0.0, self.slowest, cut=True
        ) from self.last_refusal

    def refused(self, began: float, exc: BaseException) -> float:
        """After a capacity refusal: the sleep before the next attempt.

        Raises :class:`CapacityExhaustedError` (from ``exc``) when a deadline leaves no
        room for another attempt; re-raises ``exc`` when the count-based policy ends.
        """
        retry = self.retry
        now = retry.clock()
        self.last_refusal = exc
        self.count += 1
        self.slowest = max(self.slowest, now - began)
        elapsed = now - self.started
        remaining = deadlines.remaining()
        if remaining is None:
            delay = retry.policy.delay(self.count - 1, elapsed, retry.random())
        else:
            delay = retry.policy.delay_within(
                self.count - 1, retry.random(), remaining, self.slowest
            )
        if delay is None:
            log.warning(
                "connect refused for lack of connection slots after %d attempt(s) in %.0f ms; "
                "giving up: %s",
                self.count,
                elapsed * 1000,
                type(exc).__name__,
            )
            if remaining is not None and retry.policy.retries > 0:
                raise _exhausted(self.count, elapsed, remaining, self.slowest) from exc
            raise exc
        # The exception type only: the driver's message is the caller's to show, and logs
        # must never carry more than the error that reaches the caller anyway.
        log.info(
            "connect refused for lack of connection slots (%s); retry %d in %.3f s (%s)",
            type(exc).__name__,
            self.count,
            delay,
            f"{remaining * 1000:.0f} ms left before the deadline"
            if remaining is not None
            else f"of {retry.policy.retries}",
        )
        return delay


def retry_connect_sync(
    connect: Callable[[], Any],
    is_capacity_error: Callable[[BaseException], bool],
    retry: ConnectRetry,
) -> Any:
    """Call ``connect()``; on a capacity error sleep as the policy says and call it again."""
    attempts = _Attempts(retry)
    while True:
        began = retry.clock()
        try:
            return connect()
        except DeadlineExceededError as exc:
            attempts.cut_by_deadline(exc)
            raise
        except Exception as exc:
            if not is_capacity_error(exc):
                raise
            delay = attempts.refused(began, exc)
        retry.sleep(delay)


async def retry_connect_async(
    connect: Callable[[], Awaitable[Any]],
    is_capacity_error: Callable[[BaseException], bool],
    retry: ConnectRetry,
) -> Any:
    """:func:`retry_connect_sync` for asyncio: the sleep is awaited."""
    attempts = _Attempts(retry)
    while True:
        began = retry.clock()
        try:
            return await connect()
        except DeadlineExceededError as exc:
            attempts.cut_by_deadline(exc)
            raise
        except Exception as exc:
            if not is_capacity_error(exc):
                raise
            delay = attempts.refused(began, exc)
        if retry.async_sleep is None:
            import asyncio

            await asyncio.sleep(delay)
        else:
            await retry.async_sleep(delay)
