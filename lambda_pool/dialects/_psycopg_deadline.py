"""psycopg connection classes whose every network wait ends by the invocation's deadline.

psycopg runs each operation (connect, statement, fetch, commit, rollback, the empty
ping query) as a generator that a *wait* function drives: it ``select()``\\ s on the
socket until libpq can go on.  :class:`DeadlineConnection` and
:class:`AsyncDeadlineConnection` (the ``connection_class`` the psycopg dialects open)
bound those waits by :func:`lambda_pool.deadlines.remaining`, in the thread (or task)
doing the work:

* ``wait()`` (every statement, commit, rollback, ping, ``DISCARD ALL``) passes
  ``timeout=min(the caller's, time left)`` to psycopg's own wait (psycopg >= 3.2), which
  raises ``_WaitTimeout`` when it passes;
* ``_connect_gen()`` (each connect attempt: TCP, TLS, authentication) is wrapped so the
  attempt stops at the deadline.  psycopg's own ``connect_timeout`` is whole seconds
  with a 2 s minimum (libpq's rule), too coarse for "400 ms left"; psycopg's connect
  loop wakes the generator every 0.1 s, so the wrapper gives up at the last wake-up
  before the deadline (up to 0.1 s early, never late).

A wait gives up a little before the deadline (0.1 s, or a tenth of the time left when
that is less).  If a statement is running then, the time kept is spent on a cancel
request (``cancel_safe(timeout=)``, non-blocking with libpq >= 17; skipped with older
libpq, whose cancel could block): a query that is merely slow stops on the server
instead of running on; in a black hole the request is lost too, and it ends with the
reserve.  Then the libpq connection is finished at once (``pgconn.finish()``: the socket
is closed, psycopg sees the connection closed, every pool and engine drops it) and
:class:`~lambda_pool.exc.DeadlineExceededError` names the step.  (``with_connection``
also sets ``SET LOCAL statement_timeout`` a little before that, so on a healthy network
the server's own cancellation usually comes first and the connection is kept.)  Nothing
here starts a thread or a timer.

Without a current deadline both classes behave exactly as psycopg's.  This module
imports psycopg: the dialects import it only when they connect.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any, TypeVar

import psycopg
from psycopg import errors

from lambda_pool import deadlines
from lambda_pool.exc import DeadlineExceededError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from typing_extensions import Self

__all__ = ["AsyncDeadlineConnection", "DeadlineConnection", "bounded_connect_gen"]

RV = TypeVar("RV")

# psycopg's connect and wait loops wake up this often when the socket stays silent.
_POLL_INTERVAL = 0.1
_READY_NONE = 0
# libpq's PQTRANS_ACTIVE: a statement is running.
_PQTRANS_ACTIVE = 1
# At most this much of the time left is kept for a cancel request (see _bounds).
_CANCEL_RESERVE = 0.1
_NO_ANSWER = "the server did not answer (the network may be a black hole)"
# Bound once: the blocking wait runs them for every statement and commit.
_current_deadline = deadlines.current_deadline
_monotonic = time.monotonic
_psycopg_wait = psycopg.Connection.wait


class _ConnectDeadline(Exception):
    """Carries the connect's DeadlineExceededError out of psycopg's connect loop.

    DeadlineExceededError is a TimeoutError, hence an OSError, which psycopg's asyncio
    connect loop turns into "connection socket closed"; this plain Exception passes
    through both connect loops untouched and ``connect()`` unwraps it.
    """

    def __init__(self, error: DeadlineExceededError) -> None:
        super().__init__(str(error))
        self.error = error


def bounded_connect_gen(
    gen: Generator[Any, Any, RV],
) -> Generator[Any, Any, RV]:
    """``gen`` (a psycopg connection generator) stopped at the current deadline."""
    bound = deadlines.current()
    if bound is None:
        return (yield from gen)
    started_with = bound.remaining()
    try:
        if started_with <= 0:
            raise _ConnectDeadline(
                bound.exceeded("connect", started_with, "no time was left to connect")
            )
        request = next(gen)
        while True:
            ready = yield request
            left = bound.remaining()
            if left <= 0 or (ready == _READY_NONE and left < _POLL_INTERVAL):
                raise _ConnectDeadline(
                    bound.exceeded(
                        "connect",
                        started_with,
                        "the server did not complete the connection (TCP, TLS or "
                        "authentication); the network may be a black hole",
                    )
                )
            request = gen.send(ready)
    except StopIteration as stop:
        result: RV = stop.value
        return result
    finally:
        # Drops the half-open libpq connection: freeing it closes its socket.
        gen.close()


def _finish(conn: Any) -> None:
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


def _close(gen: Any) -> None:
    close = getattr(gen, "close", None)
    if callable(close):
        close()


def _bounds(
    timeout: float | None,
) -> tuple[deadlines.Deadline | None, float | None, float]:
    """``(deadline, timeout to pass to psycopg, time left)`` for one wait.

    The wait ends :func:`_cancel_reserve` before the deadline, keeping that time for a
    cancel request when a statement is running.
    """
    bound = deadlines.current()
    if bound is None:
        return None, timeout, 0.0
    left = bound.remaining()
    until = left - _cancel_reserve(left)
    return bound, (until if timeout is None else min(timeout, until)), left


def _cancel_reserve(left: float) -> float:
    """Time kept before the deadline for a cancel request: 0.1 s, or a tenth of what is
    left when that is less."""
    return min(_CANCEL_RESERVE, max(left, 0.0) / 10)


def _may_cancel(conn: Any) -> bool:
    """A statement is running and psycopg can cancel without blocking (libpq >= 17:
    ``cancel_safe`` bounded by its timeout; older libpq's cancel could hang in the very
    black hole that stopped the statement)."""
    if int(conn.pgconn.transaction_status) != _PQTRANS_ACTIVE:
        return False
    try:
        return bool(psycopg.capabilities.has_cancel_safe())
    except Exception:
        return False


def _driver_repr(conn: Any, public: str) -> str:
    """psycopg's repr naming its public class: the subclass only adds the deadline, and
    logs and pool events keep showing the type users know."""
    own = f"{type(conn).__module__}.{type(conn).__qualname__}"
    return str(psycopg.Connection.__repr__(conn)).replace(own, public, 1)


def _exceeded(
    conn: Any, bound: deadlines.Deadline, left: float, cause: str
) -> DeadlineExceededError:
    name, started_with = deadlines.current_step("statement", left)
    _finish(conn)
    return bound.exceeded(name, started_with, cause)


class DeadlineConnection(psycopg.Connection[Any]):
    """A blocking psycopg connection whose waits end by the current deadline."""

    @classmethod
    def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        try:
            return super().connect(conninfo, **kwargs)
        except _ConnectDeadline as passed:
            raise passed.error from None

    @classmethod
    def _connect_gen(cls, conninfo: str = "") -> Any:
        return bounded_connect_gen(super()._connect_gen(conninfo))

    def wait(self, gen: Any, interval: float = _POLL_INTERVAL, timeout: float | None = None) -> Any:
        # _bounds() inline: every statement and commit waits here at least once.
        bound = _current_deadline()
        if bound is None:
            return _psycopg_wait(self, gen, interval, timeout)
        left = bound.expires_at - _monotonic()
        if left <= 0:
            _close(gen)
            raise _exceeded(self, bound, left, "no time was left")
        until = left - (_CANCEL_RESERVE if left >= _CANCEL_RESERVE * 10 else left / 10)
        try:
            return _psycopg_wait(
                self, gen, interval, until if timeout is None or timeout > until else timeout
            )
        except errors._WaitTimeout:
            if timeout is not None and timeout < left - _cancel_reserve(left):
                raise  # the caller's own, shorter timeout (e.g. notifies())
            if _may_cancel(self):
                # Ask the server to stop the statement (a slow query on a healthy
                # network; in a black hole the request is lost), within the reserve.
                with contextlib.suppress(Exception):
                    self.cancel_safe(timeout=max(bound.remaining(), 0.001))
            raise _exceeded(self, bound, left, _NO_ANSWER) from None

    def commit(self) -> None:
        with deadlines.step("commit"):
            super().commit()

    def __repr__(self) -> str:
        return _driver_repr(self, "psycopg.Connection")

    def rollback(self) -> None:
        with deadlines.step("rollback"):
            super().rollback()


class AsyncDeadlineConnection(psycopg.AsyncConnection[Any]):
    """:class:`DeadlineConnection` for asyncio: the same bound on every awaited wait."""

    @classmethod
    async def connect(cls, conninfo: str = "", **kwargs: Any) -> Self:
        try:
            return await super().connect(conninfo, **kwargs)
        except _ConnectDeadline as passed:
            raise passed.error from None

    @classmethod
    def _connect_gen(cls, conninfo: str = "") -> Any:
        return bounded_connect_gen(super()._connect_gen(conninfo))

    async def wait(
        self, gen: Any, interval: float = _POLL_INTERVAL, timeout: float | None = None
    ) -> Any:
        bound, bounded, left = _bounds(timeout)
        if bound is None:
            return await super().wait(gen, interval, timeout)
        if left <= 0:
            _close(gen)
            raise _exceeded(self, bound, left, "no time was left")
        try:
            return await super().wait(gen, interval, bounded)
        except errors._WaitTimeout:
            if timeout is not None and timeout < left - _cancel_reserve(left):
                raise
            if _may_cancel(self):
                with contextlib.suppress(Exception):
                    await self.cancel_safe(timeout=max(bound.remaining(), 0.001))
            raise _exceeded(self, bound, left, _NO_ANSWER) from None

    async def commit(self) -> None:
        with deadlines.step("commit"):
            await super().commit()

    def __repr__(self) -> str:
        return _driver_repr(self, "psycopg.AsyncConnection")

    async def rollback(self) -> None:
        with deadlines.step("rollback"):
            await super().rollback()
