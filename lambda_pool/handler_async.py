"""The ``async def`` shell of :func:`lambda_pool.with_connection`: one event loop per
container, an :class:`~lambda_pool.asyncio.AsyncConnection` per invocation.

::

    from lambda_pool import with_connection

    @with_connection()                      # settings from LAMBDA_POOL_* (lambda_pool.config)
    async def handler(event, context, connection):
        row = (await connection.execute("SELECT %s", (1,))).fetchone()
        return {"value": row[0]}

Lambda's Python runtime calls handlers synchronously, so the decorated ``async def``
becomes a plain function.  It runs the coroutine with ``run_until_complete`` on the
container's event loop: created at the first invocation, kept for the environment's
life (between invocations it is simply not running while Lambda freezes the process),
made anew in a forked child or when something closed it.  Never ``asyncio.run()`` per
invocation: an asyncio connection belongs to the loop that opened it (its socket is
registered with that loop's selector), so a new loop per invocation would make the warm
cache open a new connection every time (reason ``other_event_loop``).

Called while an event loop is already running in the calling thread (an ``async def``
test under pytest-asyncio calling ``handler(event, context)``), the invocation still
runs on the container's loop, in a helper thread, and the caller's thread waits for it
as for any blocking call: the result and the warm connection are the same as under
Lambda.  Called from inside the container's own loop (a handler calling a decorated
handler) it raises :class:`~lambda_pool.exc.InvalidRequestError`: that loop cannot run
twice.  Calls from several threads run one after another (one loop runs one invocation).
Tasks a handler starts and does not await stay on the loop, frozen with the environment,
and go on at the next invocation; await them before returning.

Per invocation, the same rules as the blocking decorator, with its decisions
(:mod:`lambda_pool.handler`: option checks, settings, the deadline, how the transaction
ends): fail fast without touching the pool when no time is left; every blocking step
bounded by ``lambda_pool.deadlines`` (the async engines read the same ContextVar, set
here inside the invocation's task); ``SET LOCAL statement_timeout`` at the start of each
transaction and PostgreSQL's cancellation turned into
:class:`~lambda_pool.exc.StatementTimeoutError`; commit on return, rollback on an
exception (which reaches the caller unchanged), a broken connection invalidated; the
connection always returned to the pool, which resets it.

Round trips, as on the blocking path and with its helpers
(:mod:`lambda_pool.dialects.psycopg_async`): nothing is sent before the handler's first
statement.  On psycopg's ``AsyncConnection`` the statement that opens a transaction
goes out after ``BEGIN`` and ``SET LOCAL statement_timeout`` in one simple query (in the
same message when it takes no parameters), and the final ``COMMIT`` carries the warm
pool's session reset when the pool offers it (``session_reset_after_commit``), so the
return sends nothing more.  On asyncpg, ``BEGIN`` and ``SET LOCAL`` go out as one simple
query (the dialect would send ``BEGIN`` alone there anyway); each statement is one
round trip once asyncpg has it in its statement cache (bind and execute; two the first
time: prepare, then bind and execute), and the final ``COMMIT`` (or the ``ROLLBACK``
after the handler's error) carries the asyncpg form of the session reset
(:data:`lambda_pool.warm.reset.ASYNCPG_SESSION_RESET`, which keeps the cached
statements).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_pool import deadlines
from lambda_pool.asyncio import AsyncConnection, AsyncEngine
from lambda_pool.dialects.psycopg import psycopg_opens_in_pipeline
from lambda_pool.dialects.psycopg_async import apsycopg_commit_then, apsycopg_execute_opening
from lambda_pool.engine_core import ConnOp, Step
from lambda_pool.exc import InvalidRequestError, StatementTimeoutError
from lambda_pool.handler import (
    _Deadline,
    _Ending,
    _ending_after_error,
    _ending_after_return,
    _fail_fast,
    _is_statement_timeout,
    _refuse_given_connection,
    _remaining_ms_of,
    _report_cleanup_failure,
    _report_failed_transaction,
    _transaction_status,
)
from lambda_pool.pool.base import running_loop

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.observability import Instrumentation
    from lambda_pool.result import Result

__all__ = ["AsyncInvocationConnection", "container_loop", "wrap_async_handler"]

log = logging.getLogger("lambda_pool.handler")

T = TypeVar("T")


# ----------------------------------------------------------------------------- event loop


class _ContainerLoop:
    """The container's one event loop, made lazily and kept across invocations."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def current(self) -> asyncio.AbstractEventLoop | None:
        """The loop invocations run on now (``None`` before the first one)."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._pid != os.getpid():
            return None
        return loop

    def _checked_fork(self) -> None:
        if self._pid == os.getpid():
            return
        # A forked child: the parent's loop (its selector, its self-pipe, the
        # connections registered with it) and a lock some parent thread may have held
        # are not the child's.  The connections are abandoned by the warm pool's own
        # fork check; the child starts with a new loop.
        inherited, self._loop = self._loop, None
        self._pid = os.getpid()
        self._lock = threading.Lock()
        if inherited is not None and not inherited.is_running() and not inherited.is_closed():
            try:
                inherited.close()  # the child's copies of its descriptors only
            except Exception:
                log.debug("lambda-pool: closing the parent's event loop failed", exc_info=True)

    def _loop_for_invocation(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            # Not set as the thread's current loop: nothing else should schedule work
            # on it between invocations, while the environment may be frozen.
            loop = asyncio.new_event_loop()
            self._loop = loop
        return loop

    def run(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """Run the coroutine ``make()`` returns on the container's loop, to its end."""
        self._checked_fork()
        running = running_loop()
        if running is None:
            with self._lock:
                return self._loop_for_invocation().run_until_complete(make())
        if running is self._loop:
            raise InvalidRequestError(
                "a with_connection() async handler was called from inside the container's "
                "event loop (a handler calling a decorated handler?); the loop cannot run "
                "twice at once: await the undecorated coroutine function instead"
            )
        return self._run_in_helper_thread(make)

    def _run_in_helper_thread(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        # The caller's thread runs another loop (e.g. a pytest-asyncio test): the
        # invocation runs on the container's loop in a helper thread, with the caller's
        # context (an outer lambda_pool.deadline() applies), and the caller waits as for
        # any blocking call.  The warm connection stays on the one loop it belongs to.
        context = contextvars.copy_context()
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._lock:
                    loop = self._loop_for_invocation()
                    outcome["result"] = context.run(loop.run_until_complete, make())
            except BaseException as exc:  # handed to the caller unchanged
                outcome["error"] = exc

        helper = threading.Thread(target=work, name="lambda-pool-handler", daemon=True)
        helper.start()
        helper.join()
        if "error" in outcome:
            error: BaseException = outcome["error"]
            raise error
        result: T = outcome["result"]
        return result


_container_loop = _ContainerLoop()


def container_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop async handlers run on in this process (``None`` before the first
    invocation); for diagnostics and tests."""
    return _container_loop.current()


# ----------------------------------------------------------------------------- connection


def _in_transaction(driver: Any) -> bool | None:
    """Whether the driver connection has a transaction open (read locally), or ``None``
    when it cannot tell."""
    status = _transaction_status(driver)  # psycopg: libpq's status
    if status is not None:
        return status != 0
    probe = getattr(driver, "is_in_transaction", None)  # asyncpg
    if callable(probe):
        return bool(probe())
    return None


def _session_reset_after_commit(engine: AsyncEngine, proxy: Any) -> str | None:
    """The pool's session reset to send with the final ``COMMIT`` (the warm pool offers
    one for its kept connection), or ``None``."""
    offer = getattr(engine.pool, "session_reset_after_commit", None)
    if not callable(offer):
        return None
    statements = offer(proxy)
    return statements if isinstance(statements, str) else None


def _reset_to_send_with_commit(engine: AsyncEngine, proxy: Any) -> str | None:
    """The session reset to send in the same message as the final ``COMMIT``, or
    ``None`` (the pool resets the session on return, if it does).

    psycopg: the statements the pool offers, when a transaction is open.  asyncpg:
    :data:`~lambda_pool.warm.reset.ASYNCPG_SESSION_RESET` (it keeps asyncpg's cached
    statements) when the pool offers a reset at all and this one has proven itself on
    the connection (:func:`~lambda_pool.warm.reset.asyncpg_session_reset_proven`: the
    pool's reset on return sends it alone the first time).
    """
    driver = proxy.driver_connection
    name = engine.dialect.driver
    if name == "psycopg":
        if _transaction_status(driver) != 2:  # not in a transaction
            return None
        return _session_reset_after_commit(engine, proxy)
    if name != "asyncpg" or not driver.is_in_transaction():
        return None
    if _session_reset_after_commit(engine, proxy) is None:
        return None
    from lambda_pool.warm.reset import ASYNCPG_SESSION_RESET, asyncpg_session_reset_proven

    return ASYNCPG_SESSION_RESET if asyncpg_session_reset_proven(driver) else None


class AsyncInvocationConnection(AsyncConnection):
    """An :class:`~lambda_pool.asyncio.AsyncConnection` whose transactions obey the
    invocation's deadline, as :class:`lambda_pool.handler.InvocationConnection` does for
    the blocking one (``SET LOCAL statement_timeout`` when a transaction begins, the
    server's cancellation turned into :class:`StatementTimeoutError`)."""

    _deadline: _Deadline | None = None
    _instrumentation: Instrumentation | None = None
    _armed: tuple[int, int | None] | None = None
    # The last statement failed and nothing ended the transaction since: PostgreSQL has
    # aborted it (only ROLLBACK succeeds there).  For drivers that do not report the
    # transaction status (asyncpg).
    _last_statement_failed = False

    # Set for one statement: it opens the transaction, sent with BEGIN and these
    # statements in one round trip (psycopg).
    _opening: list[str] | None = None
    # Set for the final commit: the session reset sent in the same message.
    _commit_then: str | None = None
    # Set for the final rollback: the session reset sent in the same message (asyncpg).
    _rollback_then: str | None = None

    async def execute(self, statement: str, parameters: Any = None) -> Result:
        opening = self._opening_prelude()
        if opening is None:
            await self._arm()
        self._opening = opening
        try:
            result = await super().execute(statement, parameters)
        except Exception as exc:
            self._last_statement_failed = True
            armed = self._armed
            if armed is not None and _is_statement_timeout(exc):
                raise self._timeout_error(*armed) from exc
            raise
        finally:
            self._opening = None
        self._last_statement_failed = False
        return result

    async def _perform(self, step: Step) -> Any:
        op, arg = step
        if op is ConnOp.EXECUTE and self._opening is not None:
            prelude, self._opening = self._opening, None
            dbapi, sql, params = arg
            return await apsycopg_execute_opening(dbapi, sql, params, prelude)
        if op is ConnOp.COMMIT and self._commit_then is not None:
            statements, self._commit_then = self._commit_then, None
            with deadlines.step("commit"):
                if self.engine.dialect.driver == "asyncpg":
                    from lambda_pool.dialects.asyncpg import asyncpg_commit_then

                    reset = await asyncpg_commit_then(arg, statements)
                else:
                    reset = await apsycopg_commit_then(arg, statements)
                if reset:
                    self._mark_session_reset()
            return None
        if op is ConnOp.ROLLBACK and self._rollback_then is not None:
            statements, self._rollback_then = self._rollback_then, None
            from lambda_pool.dialects.asyncpg import asyncpg_rollback_then

            with deadlines.step("rollback"):
                if await asyncpg_rollback_then(arg, statements):
                    self._mark_session_reset()
            return None
        return await super()._perform(step)

    def _mark_session_reset(self) -> None:
        """Tell the pool the session was reset with the transaction's end: its return
        sends nothing more."""
        mark = getattr(self.engine.pool, "mark_session_reset", None)
        if callable(mark) and self._proxy is not None:
            mark(self._proxy)

    def _opening_prelude(self) -> list[str] | None:
        """The statements to send with ``BEGIN`` and the next statement when it opens a
        transaction on a psycopg connection already checked out (no I/O here); else
        ``None``: the ordinary path (:meth:`_arm`)."""
        proxy = self._proxy
        if proxy is None or self.closed or self.invalidated:
            return None
        dialect = self.engine.dialect
        if dialect.name != "postgresql" or dialect.driver != "psycopg":
            return None
        if not psycopg_opens_in_pipeline(proxy.driver_connection):
            return None
        deadline = self._deadline
        if deadline is None:
            self._armed = None
            return []
        timeout_ms, remaining_ms = self._timeout_now(deadline)
        if timeout_ms is None:
            self._armed = None
            return []
        self._armed = (timeout_ms, remaining_ms)
        # An int we computed, never user text (SET takes no bind parameters).
        return [f"SET LOCAL statement_timeout = {int(timeout_ms)}"]

    def _timeout_now(self, deadline: _Deadline) -> tuple[int | None, int | None]:
        try:
            return deadline.timeout_ms()
        except StatementTimeoutError:
            if self._instrumentation is not None:
                self._instrumentation.statement_timeout(
                    None, deadline.remaining_ms() or 0, deadline.margin_ms
                )
            raise

    async def _commit_for_return(self) -> None:
        """Commit before the connection goes back to the pool, with the session reset in
        the same message when there is one to send (:func:`_reset_to_send_with_commit`:
        one round trip for both)."""
        proxy = self._proxy
        if proxy is not None:
            self._commit_then = _reset_to_send_with_commit(self.engine, proxy)
        try:
            await self.commit()
        finally:
            self._commit_then = None

    async def _rollback_for_return(self) -> None:
        """Roll back before the connection goes back to the pool, with the session reset
        in the same message on asyncpg when it would go with a commit
        (:func:`_reset_to_send_with_commit`); psycopg's is sent on return."""
        proxy = self._proxy
        if proxy is not None and self.engine.dialect.driver == "asyncpg":
            self._rollback_then = _reset_to_send_with_commit(self.engine, proxy)
        try:
            await self.rollback()
        finally:
            self._rollback_then = None

    async def commit(self) -> None:
        await super().commit()
        self._last_statement_failed = False

    async def rollback(self) -> None:
        await super().rollback()
        self._last_statement_failed = False

    def _timeout_error(self, timeout_ms: int, remaining_ms: int | None) -> StatementTimeoutError:
        assert self._deadline is not None
        if self._instrumentation is not None:
            self._instrumentation.statement_timeout(
                timeout_ms, remaining_ms or 0, self._deadline.margin_ms
            )
        return self._deadline.statement_timeout_error(timeout_ms, remaining_ms)

    def _transaction_failed(self) -> bool:
        status = _transaction_status(self.driver_connection)
        if status is not None:
            return status == 3
        return self._last_statement_failed

    async def _arm(self) -> None:
        """``SET LOCAL statement_timeout`` when a new transaction is about to begin."""
        deadline = self._deadline
        if deadline is None or self.closed or self.invalidated:
            return
        if self.engine.dialect.name != "postgresql":
            return  # statement_timeout is PostgreSQL's
        proxy = await self._live()  # checks one out after rollback() of an invalidation
        driver = proxy.driver_connection
        if _in_transaction(driver) is not False or getattr(driver, "autocommit", False):
            # Inside a transaction it is armed already; in autocommit SET LOCAL would do
            # nothing (and a session SET would leak to the next invocation).
            return
        timeout_ms, remaining_ms = self._timeout_now(deadline)
        if timeout_ms is None:
            self._armed = None
            return
        # An int we computed, never user text: safe to format into the statement (SET
        # takes no bind parameters).
        setting = f"SET LOCAL statement_timeout = {int(timeout_ms)}"
        if self.engine.dialect.driver == "asyncpg":
            await self._begin_with(f"BEGIN; {setting}", proxy)
        else:
            await super().execute(setting)
        self._armed = (timeout_ms, remaining_ms)

    async def _begin_with(self, statements: str, proxy: Any) -> None:
        """Open the transaction with ``statements`` as one simple query (asyncpg), with
        the rules every statement has: bounded by the deadline, logged by ``echo``, a
        disconnect invalidates the connection."""
        from lambda_pool.dialects.asyncpg import asyncpg_bounded

        driver = proxy.driver_connection
        self.engine._log_statement(statements)
        self._begun = True  # close() rolls back (ConnectionCore's flag)
        try:
            await asyncpg_bounded(driver, driver.execute(statements), "statement")
        except Exception as exc:
            if self.engine.dialect.is_disconnect(exc, proxy.dbapi_connection):
                await self.invalidate(exc)
            raise


async def _end_after_error(connection: AsyncInvocationConnection, exc: BaseException) -> None:
    """Roll back after the handler raised; never raises (the handler's error wins)."""
    try:
        ending = _ending_after_error(connection, exc)
        if ending is _Ending.INVALIDATE:
            await connection.invalidate(exc)
        elif ending is _Ending.ROLLBACK:
            await connection._rollback_for_return()
    except Exception as cleanup_error:
        _report_cleanup_failure(cleanup_error)
        try:
            if not connection.closed and not connection.invalidated:
                await connection.invalidate(cleanup_error)
        except Exception:
            log.debug("lambda-pool: invalidation after a failed rollback failed", exc_info=True)


async def _commit(
    connection: AsyncInvocationConnection, instrumentation: Instrumentation | None
) -> None:
    """Commit the handler's work (errors propagate: the caller must know it was lost)."""
    ending = _ending_after_return(connection, connection._transaction_failed)
    if ending is _Ending.ROLLBACK_FAILED:
        _report_failed_transaction(instrumentation)
        await connection._rollback_for_return()
    elif ending is _Ending.COMMIT:
        await connection._commit_for_return()


async def _close_quietly(connection: AsyncInvocationConnection) -> None:
    try:
        await connection.close()
    except Exception:
        log.warning("lambda-pool: returning the connection to the pool failed", exc_info=True)


# ----------------------------------------------------------------------------- decorator


async def _invoke(
    fn: Callable[..., Any],
    engine: AsyncEngine,
    statement_timeout: str | int | None,
    margin_ms: int,
    event: Any,
    context: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
) -> Any:
    from lambda_pool import observability

    instrumentation = observability.instrumentation_for(engine)
    remaining_ms = _remaining_ms_of(context)
    deadline = _Deadline(statement_timeout, margin_ms, remaining_ms)
    _fail_fast(deadline, instrumentation, remaining_ms)
    # Set inside the invocation's task, so only this invocation's work sees it.
    with deadlines.use(deadline if deadline.bounds_steps else None):
        started = time.perf_counter()
        connection = AsyncInvocationConnection(engine)
        await connection.start()
        wait_ms = (time.perf_counter() - started) * 1000.0
        connection._deadline = deadline if statement_timeout is not None else None
        connection._instrumentation = instrumentation
        if instrumentation is not None:
            instrumentation.checkout_waited(wait_ms, connection.connection.dbapi_connection)
        try:
            try:
                # Nothing is sent before the handler's first statement: it opens the
                # transaction (with SET LOCAL statement_timeout).
                result = fn(event, context, *args, connection=connection, **kwargs)
                if inspect.isawaitable(result):
                    # ``async def``, or a wrapper (a decorator below this one) returning
                    # the coroutine.
                    result = await result
            except BaseException as exc:
                await _end_after_error(connection, exc)
                raise
            await _commit(connection, instrumentation)
            return result
        finally:
            await _close_quietly(connection)


def wrap_async_handler(
    fn: Callable[..., Any],
    engine: AsyncEngine,
    statement_timeout: str | int | None,
    margin_ms: int,
) -> Callable[..., Any]:
    """The plain function Lambda calls for the ``async def`` handler ``fn`` (called by
    :func:`lambda_pool.with_connection`, which checked the arguments and built
    ``engine``)."""
    assert isinstance(engine, AsyncEngine)

    @functools.wraps(fn)
    def handler(event: Any, context: Any, *args: Any, **kwargs: Any) -> Any:
        _refuse_given_connection(kwargs)
        return _container_loop.run(
            lambda: _invoke(fn, engine, statement_timeout, margin_ms, event, context, args, kwargs)
        )

    # functools.wraps copied fn's attributes: a marker from inspect.markcoroutinefunction
    # would make this plain function look like a coroutine function.
    handler.__dict__.pop("_is_coroutine_marker", None)
    # Tests and diagnostics reach the engine through the handler.
    handler.engine = engine  # type: ignore[attr-defined]
    return handler
