"""``with_connection``: a Lambda handler decorator that lends the handler one database connection.

::

    from lambda_pool import with_connection

    @with_connection()                      # settings from LAMBDA_POOL_* (lambda_pool.config)
    def handler(event, context, connection):
        row = connection.execute("SELECT %s", (1,)).fetchone()
        return {"value": row[0]}

Per invocation the decorator

1. fails fast with :class:`~lambda_pool.exc.StatementTimeoutError` — before touching the
   pool — when the invocation has no more time left than the margin;
2. checks a connection out (from the warm-container cache by default, so back-to-back
   invocations reuse one backend) and passes it as the keyword ``connection=``;
3. bounds statements by the invocation's deadline: at the start of each transaction it
   sets ``SET LOCAL statement_timeout = remaining - margin`` (on psycopg sent in one
   message with ``BEGIN`` and, when it takes no parameters, the transaction's first
   statement: nothing is sent before the handler's first statement), so PostgreSQL cancels a
   slow query with a clear error before Lambda would kill the container mid-query
   (which leaves the query running on the server).  ``SET LOCAL`` ends with the
   transaction: nothing leaks into the next invocation, and it is safe behind
   PgBouncer in transaction mode (the value is the deadline less a short allowance, so
   the server's error arrives before the client stops waiting);
4. bounds every blocking step on the client too — connect (TLS and authentication
   included), pre-ping, each statement, commit, the reset on return — with
   ``lambda_pool.deadlines.use(remaining - margin)``, so a network black hole (TCP up,
   nothing answering) ends in :class:`~lambda_pool.exc.DeadlineExceededError` naming the
   step, its connection discarded, instead of Lambda's timeout (see
   :mod:`lambda_pool.deadlines`); a black hole at the reset on return, after the commit,
   only drops the connection and the handler's result is returned;
5. commits when the handler returns, rolls back when it raises (the exception
   reaches the caller unchanged: same object, same traceback), and always returns the
   connection to the pool, which resets it (from the warm pool the reset travels in the
   final ``COMMIT``'s message: one round trip for both); a connection the driver reports broken is
   invalidated so the warm cache opens a new one next time.

Decoration runs once per container (Init): it reads and validates the settings,
creates the engine (no I/O: nothing connects before the first invocation), installs
the shutdown hooks and, with ``LAMBDA_POOL_REGISTER_EXTENSION=1``, registers an internal
extension so SIGTERM reaches the process.

An ``async def`` handler is decorated the same way: it receives an
:class:`~lambda_pool.asyncio.AsyncConnection` and runs on one event loop kept for the
container's life, with the decisions made here (:mod:`lambda_pool.handler_async`).

Stacking with Powertools: put ``@with_connection()`` innermost (closest to the
function) so the checkout is inside the traced, logged handler and its metrics exist
before ``@metrics.log_metrics`` flushes.  Other orders work as well: the connection is
passed as a keyword argument, which every Powertools decorator passes through.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import inspect
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from lambda_pool import deadlines
from lambda_pool.dialects.base import ExecResult
from lambda_pool.dialects.psycopg import (
    psycopg_commit_then,
    psycopg_execute_opening,
    psycopg_opens_in_pipeline,
)
from lambda_pool.engine import Connection
from lambda_pool.engine_core import ConnOp
from lambda_pool.exc import ArgumentError, DeadlineExceededError, StatementTimeoutError
from lambda_pool.result import Result

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.asyncio import AsyncEngine
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.config import Settings
    from lambda_pool.engine import Engine
    from lambda_pool.observability import Instrumentation
    from lambda_pool.pool import PoolProxiedConnection
    from lambda_pool.url import URL

__all__ = ["DEADLINE", "with_connection"]

log = logging.getLogger("lambda_pool.handler")

#: ``statement_timeout=DEADLINE`` (the default): bound statements by the invocation's
#: remaining time minus the margin.
DEADLINE = "deadline"

#: How much sooner than the client-side deadline the server's statement_timeout fires
#: (at most; a fifth of the budget when that is less): the client stops waiting up to
#: 100 ms (a tenth) before the deadline to send its own cancel, and the server's
#: cancellation error must reach it before that.
_REPLY_ALLOWANCE_MS = 200

#: SQLSTATE of ``query_canceled``; the message tells a statement timeout from a cancel.
_QUERY_CANCELED = "57014"

R = TypeVar("R")


# ----------------------------------------------------------------------------- deadline


class _Deadline(deadlines.Deadline):
    """One invocation's deadline: the bound of its blocking steps (a
    :class:`lambda_pool.deadlines.Deadline`, Lambda's remaining time minus the margin)
    and how long its statements may run.  One object for both, as both count down
    from the same reading of the context's remaining time.

    ``policy`` is ``"deadline"`` (remaining time minus ``margin_ms``), a fixed number of
    milliseconds, or ``None`` (no bound).  ``remaining_ms``: the context's remaining time,
    read once when the invocation starts (:func:`_remaining_ms_of`); ``None`` without a
    context that can tell (a local call): then the deadline policy bounds nothing and
    the object is no bound for blocking steps (``bounds_steps`` is false; its
    ``expires_at`` is infinite).  The time left later is counted down on the monotonic
    clock: Lambda's remaining time runs down with real time, and reading the context
    again would cost a call.
    """

    __slots__ = ("bounds_steps", "ends_at", "policy")

    def __init__(self, policy: str | int | None, margin_ms: int, remaining_ms: int | None) -> None:
        self.margin_ms = margin_ms
        self.source = _BLOCKING_SOURCE
        self.policy = policy
        if remaining_ms is None:
            self.expires_at = math.inf
            self.bounds_steps = False
            self.ends_at: float | None = None
            return
        now = _monotonic()
        self.expires_at = now + (remaining_ms - margin_ms) / 1000.0
        self.bounds_steps = True
        self.ends_at = now + remaining_ms / 1000.0 if policy == DEADLINE else None

    def remaining_ms(self) -> int | None:
        ends_at = self.ends_at
        return None if ends_at is None else int((ends_at - _monotonic()) * 1000.0)

    def timeout_ms(self) -> tuple[int | None, int | None]:
        """``(statement_timeout in ms or None, remaining ms or None)`` for a statement now.

        Raises :class:`StatementTimeoutError` when the remaining time is not more than
        the margin: a statement started now would be cut off by Lambda.
        """
        policy = self.policy
        if isinstance(policy, int):
            return policy, None
        ends_at = self.ends_at
        if ends_at is None:
            return None, None
        remaining = int((ends_at - _monotonic()) * 1000.0)
        budget = remaining - self.margin_ms
        if budget <= 0:  # 0 would mean "no timeout" to PostgreSQL
            raise self.no_time_left(remaining)
        # The client stops waiting at the same deadline (lambda_pool.deadlines); the
        # server's cancellation comes a little sooner, so on a healthy network a slow
        # query ends with PostgreSQL's clear error and the connection is kept.
        return budget - min(_REPLY_ALLOWANCE_MS, budget // 5), remaining

    def no_time_left(self, remaining_ms: int) -> StatementTimeoutError:
        return StatementTimeoutError(
            f"the invocation has {remaining_ms} ms left, not more than the statement-timeout "
            f"margin of {self.margin_ms} ms, so no statement was started (Lambda would end "
            "the invocation mid-query); raise the function's timeout, make earlier work "
            "faster, or lower the margin (with_connection(timeout_margin_ms=...) or "
            "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS)"
        )

    def statement_timeout_error(
        self, timeout_ms: int, remaining_ms: int | None
    ) -> StatementTimeoutError:
        if remaining_ms is None:
            return StatementTimeoutError(
                f"the query exceeded statement_timeout={timeout_ms} ms set by "
                "with_connection(statement_timeout=...) and PostgreSQL cancelled it; make the "
                "query faster or raise the limit"
            )
        return StatementTimeoutError(
            f"the query exceeded the invocation's remaining time of {remaining_ms} ms minus "
            f"the margin of {self.margin_ms} ms (statement_timeout={timeout_ms} ms) and "
            "PostgreSQL cancelled it before Lambda would have ended the invocation mid-query; "
            "make the query faster (an index, smaller batches), raise the function's timeout, "
            "or lower the margin (timeout_margin_ms / LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS)"
        )


def _remaining_ms_of(context: Any) -> int | None:
    """The context's remaining time in ms, read once per invocation; ``None`` without a
    context that can tell (a local call, a stand-in whose method fails)."""
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if remaining is None:
        return None
    try:
        return int(remaining())
    except Exception:  # a context stand-in that cannot tell: do not guess
        return None


_BLOCKING_SOURCE = "invocation's deadline (Lambda's remaining time minus the margin)"
_monotonic = time.monotonic


def _is_statement_timeout(exc: BaseException) -> bool:
    return (
        getattr(exc, "sqlstate", None) == _QUERY_CANCELED
        and "statement timeout" in str(exc).lower()
    )


def _transaction_status(driver_connection: Any) -> int | None:
    """libpq's transaction status (0 idle, 2 in transaction, 3 failed), read locally."""
    pgconn = getattr(driver_connection, "pgconn", None)
    if pgconn is not None:  # psycopg: libpq's own, without psycopg's ConnectionInfo
        return int(pgconn.transaction_status)
    info = getattr(driver_connection, "info", None)
    status = getattr(info, "transaction_status", None)
    return None if status is None else int(status)


# ----------------------------------------------------------------------------- connection


class InvocationConnection(Connection):
    """A :class:`lambda_pool.engine.Connection` whose transactions obey the deadline.

    At the start of every transaction (the first statement, and the first after a
    ``commit()``/``rollback()`` inside the handler) it sets ``SET LOCAL
    statement_timeout`` from the time left at that moment, and turns PostgreSQL's
    *statement timeout* cancellation into :class:`StatementTimeoutError`.
    """

    _deadline: _Deadline | None = None
    _instrumentation: Instrumentation | None = None
    _armed: tuple[int, int | None] | None = None
    # Set for one statement: it opens the transaction, sent with BEGIN and these
    # statements in one round trip (psycopg_execute_opening).
    _opening: list[str] | None = None
    # Set for the final commit: the session reset sent in the same message.
    _commit_then: str | None = None
    # The warm invocation's lane (with_connection sets both when the warm pool's quick
    # checkout lent a psycopg connection): while the connection still holds that proxy,
    # the opening statement and the final commit skip the general checks.
    _lane_proxy: PoolProxiedConnection | None = None
    _lane_driver: Any = None
    # The session reset the warm pool offered to send with the final COMMIT.
    _lane_reset = ""

    def execute(self, statement: str, parameters: Any = None) -> Any:
        driver = self._lane_driver
        if (
            driver is not None
            and self._proxy is self._lane_proxy
            and not self._closed
            and not self._invalidated
        ):
            opening = _prelude_now(self) if psycopg_opens_in_pipeline(driver) else None
        else:
            driver = None
            opening = _opening_prelude(self)
        if opening is None:
            self._arm()
        try:
            if opening is not None and isinstance(statement, str):
                # execute()'s procedure (_g_execute) for the statement that opens the
                # transaction, inline: every invocation's first statement takes this
                # path, and the procedure's generators cost more CPU than the round
                # trip it saves.  The connection is checked out, open and usable.
                if driver is None:
                    proxy = self._proxy
                    assert proxy is not None
                    driver = proxy.dbapi_connection
                engine = self._engine
                logger = engine._logger  # engine._log_statement(), inline
                if logger.isEnabledFor(logging.INFO):
                    logger.info("%s", statement)
                self._begun = True
                try:
                    keys, rows, rowcount, returns_rows = psycopg_execute_opening(
                        driver, statement, parameters, opening
                    )
                except Exception as exc:
                    if engine.dialect.is_disconnect(exc, driver):
                        self._run(self._g_invalidate(exc))
                    raise
                return Result(keys, rows, rowcount, returns_rows)
            self._opening = opening  # for _perform(): a statement that is not a str
            return super().execute(statement, parameters)
        except Exception as exc:
            armed = self._armed
            if armed is not None and _is_statement_timeout(exc):
                timeout_ms, remaining_ms = armed
                error = self._timeout_error(timeout_ms, remaining_ms)
                raise error from exc
            raise
        finally:
            self._opening = None

    def _perform(self, step: Any) -> Any:
        op, arg = step
        if op is ConnOp.EXECUTE and self._opening is not None:
            prelude, self._opening = self._opening, None
            dbapi, sql, params = arg
            return ExecResult(*psycopg_execute_opening(dbapi, sql, params, prelude))
        if op is ConnOp.COMMIT and self._commit_then is not None:
            statements, self._commit_then = self._commit_then, None
            with deadlines.step("commit"):
                if psycopg_commit_then(arg, statements):
                    _session_reset_done(self.engine, self._proxy)
            return None
        return super()._perform(step)

    def _timeout_error(self, timeout_ms: int, remaining_ms: int | None) -> StatementTimeoutError:
        assert self._deadline is not None
        if self._instrumentation is not None:
            self._instrumentation.statement_timeout(
                timeout_ms, remaining_ms or 0, self._deadline.margin_ms
            )
        return self._deadline.statement_timeout_error(timeout_ms, remaining_ms)

    def _commit_for_return(self, status: int | None = None) -> None:
        """Commit before the connection goes back to the pool: with the warm pool's
        session reset in the same message when it offers one (one round trip).

        That commit is ``commit()``'s procedure (``_g_finish``) inline, as for the
        opening statement: it ends every warm invocation.  ``status``: libpq's
        transaction status when the caller read it already."""
        statements = _reset_to_send_with_commit(self, status)
        if statements is None:
            self.commit()
            return
        self._check_usable()
        proxy = self._proxy
        assert proxy is not None
        dbapi = proxy.dbapi_connection
        self._transaction = None
        self._begun = False
        try:
            with deadlines.step("commit"):
                reset = psycopg_commit_then(dbapi, statements)
        except Exception as exc:
            if self._engine.dialect.is_disconnect(exc, dbapi):
                self._run(self._g_invalidate(exc))
            raise
        if reset:
            _session_reset_done(self._engine, proxy)

    def _commit_and_return_in_lane(self) -> None:
        """The warm invocation's end on its lane: ``COMMIT`` and the session reset in
        one message (:func:`psycopg_commit_then`, the step named ``commit``), then the
        connection given back with nothing more to send
        (``WarmPool.return_after_session_reset``).  When a reset statement failed the
        connection is returned the ordinary way, which resets it again."""
        proxy = self._lane_proxy
        assert proxy is not None
        dbapi = self._lane_driver
        self._transaction = None
        self._begun = False
        try:
            reset = psycopg_commit_then(dbapi, self._lane_reset)
        except DeadlineExceededError as exc:
            # Named here rather than with deadlines.step("commit") around the call:
            # the wait names its step only when it gives up, and this saves every
            # invocation the context variable's round.
            bound = deadlines.current()
            if exc.step != "statement" or bound is None:
                raise
            raise bound.exceeded("commit", exc.remaining_ms / 1000.0, exc.cause) from None
        except Exception as exc:
            if self._engine.dialect.is_disconnect(exc, dbapi):
                self._run(self._g_invalidate(exc))
            raise
        if not reset:
            return  # close() returns it the ordinary way, which resets it again
        pool: Any = proxy._pool
        if pool.return_after_session_reset(proxy):
            self._closed = True
            self._proxy = None
        else:
            # close() returns it the ordinary way, and sends nothing more if it is idle.
            pool.mark_session_reset(proxy)

    def close(self) -> None:
        """Return the connection to the pool; with nothing left to roll back, the
        procedure's return (``_g_close``) inline."""
        proxy = self._proxy
        if self._closed or self._begun or proxy is None:
            super().close()
            return
        self._closed = True
        self._transaction = None
        self._proxy = None
        with deadlines.step("reset on return"):
            proxy.close()

    def _arm(self) -> None:
        """``SET LOCAL statement_timeout`` when a new transaction is about to begin."""
        deadline = self._deadline
        if deadline is None or self.closed or self.invalidated:
            return
        if self.engine.dialect.name != "postgresql":
            return  # statement_timeout is PostgreSQL's
        driver = self.driver_connection
        status = _transaction_status(driver)
        if status is None or status != 0 or getattr(driver, "autocommit", False):
            # Inside a transaction it is armed already; in autocommit SET LOCAL
            # would do nothing (and a session SET would leak to the next invocation).
            return
        timeout_ms, remaining_ms = _timeout_now(self, deadline)
        if timeout_ms is None:
            self._armed = None
            return
        # An int we computed, never user text: safe to format into the statement
        # (SET does not take bind parameters).
        super().execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        self._armed = (timeout_ms, remaining_ms)

    def _holds_connection(self) -> bool:
        return _holds_connection(self)


def _timeout_now(connection: Any, deadline: _Deadline) -> tuple[int | None, int | None]:
    """``deadline.timeout_ms()``, reporting a fail-fast to the instrumentation."""
    try:
        return deadline.timeout_ms()
    except StatementTimeoutError:
        _report_fail_fast(connection, deadline)
        raise


def _report_fail_fast(connection: Any, deadline: _Deadline) -> None:
    if connection._instrumentation is not None:
        connection._instrumentation.statement_timeout(
            None, deadline.remaining_ms() or 0, deadline.margin_ms
        )


def _opens_with_begin(connection: Any) -> bool:
    """The next statement opens a transaction on a psycopg connection (blocking or
    asyncio) that can send ``BEGIN`` and the prelude with it (psycopg_opens_in_pipeline)."""
    proxy = connection._proxy
    if proxy is None or connection.closed or connection.invalidated:
        return False
    dialect = connection.engine.dialect
    if dialect.name != "postgresql" or dialect.driver != "psycopg":
        return False
    return psycopg_opens_in_pipeline(proxy.driver_connection)


def _opening_prelude(connection: Any) -> list[str] | None:
    """The statements to send with ``BEGIN`` and the next statement when it opens a
    transaction on a psycopg connection (all in one round trip); else ``None``: the
    ordinary path (``_arm``), ``BEGIN`` and ``SET LOCAL`` each a round trip.  Sets
    ``connection._armed`` as ``_arm`` does."""
    if not _opens_with_begin(connection):
        return None
    return _prelude_now(connection)


def _prelude_now(connection: Any) -> list[str]:
    """The ``SET LOCAL statement_timeout`` to open a transaction with now (none without
    a bound); sets ``connection._armed``."""
    deadline = connection._deadline
    if deadline is None:
        connection._armed = None
        return []
    ends_at = deadline.ends_at
    if ends_at is not None:
        # deadline.timeout_ms() for the deadline policy, inline (every invocation's first
        # statement); the method raises the fail-fast error when nothing is left.
        remaining = int((ends_at - _monotonic()) * 1000.0)
        budget = remaining - deadline.margin_ms
        if budget > 0:
            allowance = budget // 5
            timeout = budget - (
                allowance if allowance < _REPLY_ALLOWANCE_MS else _REPLY_ALLOWANCE_MS
            )
            connection._armed = (timeout, remaining)
            return [f"SET LOCAL statement_timeout = {timeout}"]
    try:
        timeout_ms, remaining_ms = deadline.timeout_ms()
    except StatementTimeoutError:
        _report_fail_fast(connection, deadline)
        raise
    if timeout_ms is None:
        connection._armed = None
        return []
    connection._armed = (timeout_ms, remaining_ms)
    # An int we computed, never user text (SET does not take bind parameters).
    return [f"SET LOCAL statement_timeout = {int(timeout_ms)}"]


def _reset_to_send_with_commit(connection: Any, status: int | None = None) -> str | None:
    """The session reset to send in the final ``COMMIT``'s message: psycopg, a
    transaction open (``status``, libpq's transaction status, when the caller read it),
    and the warm pool offering it; else ``None``."""
    proxy = connection._proxy
    if proxy is None or connection.engine.dialect.driver != "psycopg":
        return None
    if status is None:
        status = _transaction_status(proxy.driver_connection)
    if status != 2:  # not in a transaction
        return None
    return _session_reset_after_commit(connection.engine, proxy)


def _driver_of(connection: Any) -> Any:
    """The driver connection held now (no checkout: ``driver_connection`` would run one
    after an invalidation)."""
    proxy = connection._proxy
    return proxy.driver_connection if proxy is not None else connection.driver_connection


def _session_reset_after_commit(engine: Any, proxy: Any) -> str | None:
    """The warm pool's session reset to send right after the final ``COMMIT``, or
    ``None`` (another pool, a separate connection, transaction pooling)."""
    # Duck-typed (WarmPool's methods): handler -> warm stays an import-free edge here.
    offer = getattr(engine.pool, "session_reset_after_commit", None)
    return offer(proxy) if offer is not None else None


def _session_reset_done(engine: Any, proxy: Any) -> None:
    mark = getattr(engine.pool, "mark_session_reset", None)
    if mark is not None and proxy is not None:
        mark(proxy)


def _is_disconnect(connection: Any, exc: BaseException) -> bool:
    try:
        dbapi = connection.connection.dbapi_connection
        return bool(connection.engine.dialect.is_disconnect(exc, dbapi))
    except Exception:
        return False


def _holds_connection(connection: Any) -> bool:
    """A connection is checked out and usable: there is work to commit or roll back.

    After an invalidation and rollback() no connection is checked out until the next
    statement; committing then would check one out for nothing."""
    return connection._proxy is not None and not connection.closed and not connection.invalidated


class _Ending(enum.Enum):
    """How an invocation's transaction ends (decided here for both shells)."""

    NOTHING = "nothing"
    COMMIT = "commit"
    ROLLBACK = "rollback"
    #: The handler returned, but its transaction had failed (it caught a database error).
    ROLLBACK_FAILED = "rollback_failed"
    INVALIDATE = "invalidate"


def _ending_after_return(connection: Any, transaction_failed: Callable[[], bool]) -> _Ending:
    """The handler returned normally: commit, unless its transaction had failed
    (PostgreSQL would answer COMMIT with ROLLBACK; say so instead of pretending)."""
    if not _holds_connection(connection):
        return _Ending.NOTHING
    return _Ending.ROLLBACK_FAILED if transaction_failed() else _Ending.COMMIT


def _ending_after_error(connection: Any, exc: BaseException) -> _Ending:
    """The handler raised: a connection the driver reports broken is invalidated (the
    warm cache opens a new one next time), held work is rolled back."""
    if connection.closed or connection.invalidated:
        return _Ending.NOTHING
    if _is_disconnect(connection, exc):
        return _Ending.INVALIDATE
    return _Ending.ROLLBACK if _holds_connection(connection) else _Ending.NOTHING


def _report_failed_transaction(instrumentation: Instrumentation | None) -> None:
    message = (
        "lambda-pool: the handler returned normally but its transaction had failed "
        "(a database error was caught); it was rolled back, nothing was committed. "
        "Call connection.rollback() after catching a database error to continue."
    )
    log.warning(message)
    if instrumentation is not None and instrumentation.logger is not None:
        instrumentation.logger.warning(message, extra={"lambda_pool_event": "transaction_failed"})


def _report_cleanup_failure(cleanup_error: BaseException) -> None:
    # The session is in an unknown state: the caller drops it rather than hand it out again.
    log.warning(
        "lambda-pool: rollback after a handler error failed (%s); invalidating the connection",
        type(cleanup_error).__name__,
    )


def _end_after_error(connection: Any, exc: BaseException) -> None:
    """Roll back after the handler raised; never raises (the handler's error wins)."""
    try:
        ending = _ending_after_error(connection, exc)
        if ending is _Ending.INVALIDATE:
            connection.invalidate(exc)
        elif ending is _Ending.ROLLBACK:
            connection.rollback()
    except Exception as cleanup_error:
        _report_cleanup_failure(cleanup_error)
        try:
            if not connection.closed and not connection.invalidated:
                connection.invalidate(cleanup_error)
        except Exception:
            log.debug("lambda-pool: invalidation after a failed rollback failed", exc_info=True)


def _commit(connection: Any, instrumentation: Instrumentation | None) -> None:
    """Commit the handler's work (errors propagate: the caller must know it was lost).

    libpq's transaction status, read once, decides: idle (the handler sent nothing, or
    ended its own transaction) needs nothing, and the driver's commit would only go
    through its machinery to do nothing; failed (it caught a database error) is rolled
    back and reported (PostgreSQL would answer COMMIT with ROLLBACK); open is committed.
    """
    proxy = connection._proxy
    if proxy is None or connection._closed or connection._invalidated:
        return
    lane = proxy is connection._lane_proxy
    status = (
        int(connection._lane_driver.pgconn.transaction_status)
        if lane
        else _transaction_status(proxy.driver_connection)
    )
    if status == 0:
        return
    if status == 3:
        _report_failed_transaction(instrumentation)
        connection.rollback()
        return
    if lane and status == 2:
        connection._commit_and_return_in_lane()
        return
    connection._commit_for_return(status)


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        log.warning("lambda-pool: returning the connection to the pool failed", exc_info=True)


# ----------------------------------------------------------------------------- decorator


def _is_async_handler(fn: Callable[..., Any]) -> bool:
    """``async def`` (also behind ``functools.wraps`` decorators, or an object whose
    ``__call__`` is ``async def``): it runs on the container's event loop."""
    candidates: list[Any] = [fn, getattr(fn, "__call__", None)]  # noqa: B004 (its __call__ itself)
    with contextlib.suppress(ValueError):  # a __wrapped__ cycle: judge by fn itself
        candidates.append(inspect.unwrap(fn))
    return any(inspect.iscoroutinefunction(candidate) for candidate in candidates)


def _check_handler(fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise ArgumentError(f"with_connection() decorates a function, got {fn!r}")
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return  # a builtin or C callable: nothing to check
    accepts = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) or (
        "connection" in parameters
        and parameters["connection"].kind is not inspect.Parameter.POSITIONAL_ONLY
    )
    if not accepts:
        name = getattr(fn, "__qualname__", repr(fn))
        raise ArgumentError(
            f"{name} must accept a keyword argument named 'connection': "
            "def handler(event, context, connection): ..."
        )


# PostgreSQL keeps statement_timeout in an int of milliseconds; a larger value is refused
# by SET at every invocation (InvalidParameterValue), so it is refused here, at Init.
_MAX_STATEMENT_TIMEOUT_MS = 2_147_483_647


def _check_options(statement_timeout: Any, timeout_margin_ms: Any) -> None:
    if (
        statement_timeout is not None
        and statement_timeout != DEADLINE
        and (
            isinstance(statement_timeout, bool)
            or not isinstance(statement_timeout, int)
            or not 0 < statement_timeout <= _MAX_STATEMENT_TIMEOUT_MS
        )
    ):
        raise ArgumentError(
            f"statement_timeout={statement_timeout!r}: use 'deadline' (the invocation's "
            "remaining time minus the margin), a number of milliseconds > 0 and at most "
            f"{_MAX_STATEMENT_TIMEOUT_MS} (PostgreSQL's limit), or None"
        )
    if timeout_margin_ms is not None and (
        isinstance(timeout_margin_ms, bool)
        or not isinstance(timeout_margin_ms, int)
        or timeout_margin_ms < 0
    ):
        raise ArgumentError(
            f"timeout_margin_ms={timeout_margin_ms!r}: use a whole number of milliseconds >= 0"
        )


def _refuse_given_connection(kwargs: dict[str, Any]) -> None:
    if "connection" in kwargs:
        raise ArgumentError(
            "the handler was called with connection= already; with_connection "
            "provides it (is the decorator applied twice?)"
        )


def _fail_fast(
    deadline: _Deadline, instrumentation: Instrumentation | None, remaining_ms: int | None
) -> None:
    """Raise :class:`StatementTimeoutError` before the pool is touched (no connect, no
    checkout) when the invocation has no more time left than the margin
    (``remaining_ms``: the context's remaining time, as read at the start)."""
    if deadline.policy != DEADLINE or remaining_ms is None:
        return
    if remaining_ms <= deadline.margin_ms:
        if instrumentation is not None:
            instrumentation.statement_timeout(None, remaining_ms, deadline.margin_ms)
        raise deadline.no_time_left(remaining_ms)


class _EngineRecipe:
    """What the decorator's engine is made of, resolved and checked at Init (URL,
    credentials, options); built for the handler's kind when it is decorated: a blocking
    :class:`~lambda_pool.engine.Engine` for ``def``, an
    :class:`~lambda_pool.asyncio.AsyncEngine` for ``async def``."""

    def __init__(
        self,
        settings: Settings,
        url: str | URL | None,
        credentials: CredentialProvider | None,
        warm: bool,
        engine_kwargs: dict[str, Any],
    ) -> None:
        from lambda_pool.config import credentials_for
        from lambda_pool.url import make_url

        self.url = settings.url() if url is None else make_url(url)
        provider = credentials if credentials is not None else credentials_for(settings, self.url)
        options = dict(engine_kwargs)
        if provider is not None:
            options["credentials"] = provider
        if settings.transaction_pooling:
            options.setdefault("transaction_pooling", True)
        if warm and settings.pre_ping_idle_seconds is not None:
            options.setdefault("pre_ping_idle_seconds", settings.pre_ping_idle_seconds)
        self.warm = warm
        self.options = options
        self._built: dict[bool, Engine | AsyncEngine] = {}

    def build(self, is_async: bool) -> Engine | AsyncEngine:
        """The engine (once per kind: one decorator applied twice shares it)."""
        engine = self._built.get(is_async)
        if engine is None:
            engine = self._make(is_async)
            self._built[is_async] = engine
        return engine

    def _make(self, is_async: bool) -> Engine | AsyncEngine:
        if self.warm:
            from lambda_pool.warm import warm_async_engine, warm_engine

            factory: Callable[..., Engine | AsyncEngine] = (
                warm_async_engine if is_async else warm_engine
            )
            return factory(self.url, **self.options)
        if is_async:
            from lambda_pool.asyncio import create_async_engine

            return create_async_engine(self.url, **self.options)
        from lambda_pool.engine import create_engine

        return create_engine(self.url, **self.options)


def _engine_for(
    given: Engine | AsyncEngine | None, recipe: _EngineRecipe | None, is_async: bool
) -> Engine | AsyncEngine:
    if given is None:
        assert recipe is not None
        return recipe.build(is_async)
    if bool(getattr(given, "_is_async", False)) != is_async:
        if is_async:
            raise ArgumentError(
                "engine= is a blocking Engine but the handler is 'async def'; pass an "
                "AsyncEngine (lambda_pool.warm.warm_async_engine / "
                "lambda_pool.asyncio.create_async_engine) or decorate a plain 'def' handler"
            )
        raise ArgumentError(
            "engine= is an AsyncEngine but the handler is a plain 'def'; make the handler "
            "'async def' (it then receives an AsyncConnection) or pass a blocking Engine"
        )
    return given


def _install_lifecycle(settings: Settings) -> None:
    from lambda_pool import lifecycle

    lifecycle.install_shutdown_hooks()
    if settings.register_extension:
        try:
            lifecycle.register_internal_extension()
        except Exception as exc:
            # Without it the process gets no SIGTERM and connections end with the
            # sandbox; the function itself still works, so do not fail Init.
            log.warning(
                "lambda-pool: registering the internal extension failed (%s); "
                "connections will not be closed at shutdown",
                type(exc).__name__,
            )


class HandlerDecorator(Protocol):
    """What ``with_connection(...)`` returns: it turns a handler (``def`` or ``async
    def``) into the plain function Lambda calls."""

    @overload
    def __call__(  # type: ignore[overload-overlap]
        self, fn: Callable[..., Coroutine[Any, Any, R]], /
    ) -> Callable[..., R]: ...

    @overload
    def __call__(self, fn: Callable[..., R], /) -> Callable[..., R]: ...


def with_connection(
    url: str | URL | None = None,
    *,
    engine: Engine | AsyncEngine | None = None,
    credentials: CredentialProvider | None = None,
    warm: bool | None = None,
    statement_timeout: str | int | None = DEADLINE,
    timeout_margin_ms: int | None = None,
    logger: Any = None,
    metrics: Any = None,
    tracer: Any = None,
    **engine_kwargs: Any,
) -> HandlerDecorator:
    """Decorate a Lambda handler so it receives a database connection as ``connection=``.

    ``url``: database URL; default ``LAMBDA_POOL_DATABASE_URL`` (see
    :mod:`lambda_pool.config` for every setting).  ``engine``: a ready
    :class:`lambda_pool.engine.Engine` (or :class:`lambda_pool.asyncio.AsyncEngine` for
    an ``async def`` handler) instead (then ``url``, ``credentials`` and engine
    keywords are refused).  ``credentials``: a credential provider; default from
    ``LAMBDA_POOL_AUTH``.  ``warm=True`` uses the warm-container cache
    (:func:`lambda_pool.warm.warm_engine`), ``warm=False`` a ``NullPool`` engine (a
    connection per invocation); default ``LAMBDA_POOL_WARM``, else ``True``.
    ``statement_timeout``: ``"deadline"`` (remaining time minus ``timeout_margin_ms``,
    default 500 or ``LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS``), a fixed number of milliseconds, or
    ``None``.  ``logger``/``metrics``/``tracer``: Powertools objects to report pool
    activity to (:func:`lambda_pool.observability.instrument`, once per engine).  Other
    keywords go to ``warm_engine``/``create_engine`` (``connect_args``,
    ``pool_recycle``, ``transaction_pooling``, ``pre_ping_idle_seconds``, …).

    An ``async def`` handler gets an :class:`lambda_pool.asyncio.AsyncConnection` from
    :func:`lambda_pool.warm.warm_async_engine` (``create_async_engine`` with
    ``warm=False``) and runs on one event loop kept for the container's life, with the
    same transaction, deadline and observability rules (:mod:`lambda_pool.handler_async`).

    Raises :class:`lambda_pool.exc.ArgumentError` at decoration for bad arguments or
    settings; nothing connects until the first invocation.
    """
    if callable(url) and not isinstance(url, str):
        raise ArgumentError(
            "with_connection needs parentheses: write @with_connection(), not @with_connection"
        )
    if engine is not None and (url is not None or credentials is not None or engine_kwargs):
        given = [
            name
            for name, value in (("url", url), ("credentials", credentials))
            if value is not None
        ] + sorted(engine_kwargs)
        raise ArgumentError(
            f"engine= is a ready engine; {', '.join(given)} cannot be applied to it "
            "(pass them to create_engine()/warm_engine() instead)"
        )
    _check_options(statement_timeout, timeout_margin_ms)

    from lambda_pool.config import Settings

    settings = Settings.from_env()
    recipe: _EngineRecipe | None = None
    if engine is None:
        use_warm = settings.warm if warm is None else warm
        recipe = _EngineRecipe(settings, url, credentials, use_warm, engine_kwargs)
    margin_ms = settings.margin_ms if timeout_margin_ms is None else timeout_margin_ms
    _install_lifecycle(settings)

    from lambda_pool import observability

    def engine_for_handler(is_async: bool) -> Any:
        chosen = _engine_for(engine, recipe, is_async)
        if logger is not None or metrics is not None or tracer is not None:
            observability.instrument(chosen, logger=logger, metrics=metrics, tracer=tracer)
        return chosen

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        _check_handler(fn)
        if _is_async_handler(fn):
            from lambda_pool.handler_async import wrap_async_handler

            return wrap_async_handler(fn, engine_for_handler(True), statement_timeout, margin_ms)
        the_engine: Engine = engine_for_handler(False)

        @functools.wraps(fn)
        def handler(event: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
            # Every warm invocation runs this: the steps are calls of their own only
            # where there is work to do (deadlines.use() and the decisions, inline).
            if kwargs:
                _refuse_given_connection(kwargs)
            instrumentation = (
                observability.instrumentation_for(the_engine)
                if observability._any_instrumented  # no call in the common case
                else None
            )
            # _remaining_ms_of(), inline.
            remaining_ms: int | None = None
            ask = getattr(context, "get_remaining_time_in_millis", None)
            if ask is not None:
                try:
                    remaining_ms = int(ask())
                except Exception:  # a context stand-in that cannot tell: do not guess
                    remaining_ms = None
            deadline = _Deadline(statement_timeout, margin_ms, remaining_ms)
            bound: deadlines.Deadline | None = None
            if remaining_ms is not None:
                if remaining_ms <= margin_ms and statement_timeout == DEADLINE:
                    _fail_fast(deadline, instrumentation, remaining_ms)
                bound = deadline
            outer = deadlines.current_deadline()
            if outer is not None and (bound is None or outer.expires_at <= bound.expires_at):
                bound = outer
            token = deadlines.set_current(bound)
            try:
                pool = the_engine.pool
                if instrumentation is None:
                    proxy = pool.connect()
                else:
                    started = time.perf_counter()
                    proxy = pool.connect()
                    wait_ms = (time.perf_counter() - started) * 1000.0
                    instrumentation.checkout_waited(wait_ms, proxy.dbapi_connection)
                connection = InvocationConnection(the_engine, proxy)
                connection._deadline = deadline if statement_timeout is not None else None
                connection._instrumentation = instrumentation
                # Set by the warm pool's quick checkout (handler -> warm stays an
                # import-free edge): the lane.
                reset = proxy.session_reset_with_commit
                if reset is not None:
                    connection._lane_proxy = proxy
                    connection._lane_driver = proxy._record.dbapi_connection  # type: ignore[union-attr]
                    connection._lane_reset = reset
                try:
                    try:
                        # Nothing is sent before the handler's first statement: it
                        # opens the transaction (with SET LOCAL statement_timeout).
                        if args or kwargs:
                            result = fn(event, context, *args, connection=connection, **kwargs)
                        else:  # as Lambda calls it: the cheaper call
                            result = fn(event, context, connection=connection)
                    except BaseException as exc:
                        _end_after_error(connection, exc)
                        raise
                    if (
                        proxy is connection._lane_proxy
                        and connection._proxy is proxy
                        and not connection._closed
                        and not connection._invalidated
                        and connection._lane_driver.pgconn.transaction_status == 2
                    ):
                        # _commit()'s decision for the lane, inline: a transaction open.
                        connection._commit_and_return_in_lane()
                    else:
                        _commit(connection, instrumentation)
                    return result
                finally:
                    if not connection._closed:
                        _close_quietly(connection)
            finally:
                deadlines.reset_current(token)

        # Tests and diagnostics reach the engine through the handler.
        handler.engine = the_engine  # type: ignore[attr-defined]
        return handler

    return decorate  # type: ignore[return-value]  # the overloads of HandlerDecorator
