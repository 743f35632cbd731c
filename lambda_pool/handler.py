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
   runs ``SET LOCAL statement_timeout = remaining - margin``, so PostgreSQL cancels a
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
   connection to the pool, which resets it; a connection the driver reports broken is
   invalidated so the warm cache opens a new one next time.

Decoration runs once per container (Init): it reads and validates the settings,
creates the engine (no I/O: nothing connects before the first invocation), installs
the shutdown hooks and, with ``LAMBDA_POOL_REGISTER_EXTENSION=1``, registers an internal
extension so SIGTERM reaches the process.

Stacking with Powertools: put ``@with_connection()`` innermost (closest to the
function) so the checkout is inside the traced, logged handler and its metrics exist
before ``@metrics.log_metrics`` flushes.  Other orders work as well: the connection is
passed as a keyword argument, which every Powertools decorator passes through.
"""

from __future__ import annotations

import functools
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_pool import deadlines
from lambda_pool.engine import Connection
from lambda_pool.exc import ArgumentError, StatementTimeoutError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.config import Settings
    from lambda_pool.engine import Engine
    from lambda_pool.observability import Instrumentation
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


class _Deadline:
    """How long statements of one invocation may run.

    ``policy`` is ``"deadline"`` (remaining time minus ``margin_ms``), a fixed number of
    milliseconds, or ``None`` (no bound).  Without a context offering
    ``get_remaining_time_in_millis`` (a local call) the deadline policy bounds nothing.
    """

    def __init__(self, policy: str | int | None, margin_ms: int, context: Any) -> None:
        self.policy = policy
        self.margin_ms = margin_ms
        remaining = getattr(context, "get_remaining_time_in_millis", None)
        self._remaining: Callable[[], Any] | None = (
            remaining if policy == DEADLINE and callable(remaining) else None
        )

    def remaining_ms(self) -> int | None:
        if self._remaining is None:
            return None
        try:
            return int(self._remaining())
        except Exception:  # a context stand-in that cannot tell: do not guess
            return None

    def timeout_ms(self) -> tuple[int | None, int | None]:
        """``(statement_timeout in ms or None, remaining ms or None)`` for a statement now.

        Raises :class:`StatementTimeoutError` when the remaining time is not more than
        the margin: a statement started now would be cut off by Lambda.
        """
        if isinstance(self.policy, int):
            return self.policy, None
        remaining = self.remaining_ms()
        if remaining is None:
            return None, None
        budget = remaining - self.margin_ms
        if budget <= 0:  # 0 would mean "no timeout" to PostgreSQL
            raise StatementTimeoutError(
                f"the invocation has {remaining} ms left, not more than the statement-timeout "
                f"margin of {self.margin_ms} ms, so no statement was started (Lambda would end "
                "the invocation mid-query); raise the function's timeout, make earlier work "
                "faster, or lower the margin (with_connection(timeout_margin_ms=...) or "
                "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS)"
            )
        # The client stops waiting at the same deadline (lambda_pool.deadlines); the
        # server's cancellation comes a little sooner, so on a healthy network a slow
        # query ends with PostgreSQL's clear error and the connection is kept.
        return budget - min(_REPLY_ALLOWANCE_MS, budget // 5), remaining

    def exceeded(self, timeout_ms: int, remaining_ms: int | None) -> StatementTimeoutError:
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


def _blocking_deadline(context: Any, margin_ms: int) -> deadlines.Deadline | None:
    """The bound for every blocking step of this invocation (connect, pre-ping, each
    statement, commit, reset on return): the context's remaining time minus the margin,
    as a :class:`lambda_pool.deadlines.Deadline`; ``None`` without a context that can
    tell (a local call), which leaves the steps to the engine's own timeouts.

    It applies whatever ``statement_timeout`` says: that option sets the server-side
    bound of statements, this one bounds the client's waits, even on a silent network.
    """
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if not callable(remaining):
        return None
    try:
        remaining_ms = int(remaining())
    except Exception:  # a context stand-in that cannot tell: do not guess
        return None
    return deadlines.Deadline.after(
        (remaining_ms - margin_ms) / 1000.0,
        margin_ms=margin_ms,
        source="invocation's deadline (Lambda's remaining time minus the margin)",
    )


def _is_statement_timeout(exc: BaseException) -> bool:
    return (
        getattr(exc, "sqlstate", None) == _QUERY_CANCELED
        and "statement timeout" in str(exc).lower()
    )


def _transaction_status(driver_connection: Any) -> int | None:
    """libpq's transaction status (0 idle, 2 in transaction, 3 failed), read locally."""
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

    def execute(self, statement: str, parameters: Any = None) -> Any:
        self._arm()
        try:
            return super().execute(statement, parameters)
        except Exception as exc:
            armed = self._armed
            if armed is not None and _is_statement_timeout(exc):
                timeout_ms, remaining_ms = armed
                error = self._timeout_error(timeout_ms, remaining_ms)
                raise error from exc
            raise

    def _timeout_error(self, timeout_ms: int, remaining_ms: int | None) -> StatementTimeoutError:
        assert self._deadline is not None
        if self._instrumentation is not None:
            self._instrumentation.statement_timeout(
                timeout_ms, remaining_ms or 0, self._deadline.margin_ms
            )
        return self._deadline.exceeded(timeout_ms, remaining_ms)

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
        try:
            timeout_ms, remaining_ms = deadline.timeout_ms()
        except StatementTimeoutError:
            if self._instrumentation is not None:
                self._instrumentation.statement_timeout(
                    None, deadline.remaining_ms() or 0, deadline.margin_ms
                )
            raise
        if timeout_ms is None:
            self._armed = None
            return
        # An int we computed, never user text: safe to format into the statement
        # (SET does not take bind parameters).
        super().execute(f"SET LOCAL statement_timeout = {int(timeout_ms)}")
        self._armed = (timeout_ms, remaining_ms)

    def _holds_connection(self) -> bool:
        # After an invalidation and rollback() no connection is checked out until
        # the next statement; committing then would check one out for nothing.
        return self._proxy is not None and not self.closed and not self.invalidated


def _is_disconnect(connection: Connection, exc: BaseException) -> bool:
    try:
        dbapi = connection.connection.dbapi_connection
        return bool(connection.engine.dialect.is_disconnect(exc, dbapi))
    except Exception:
        return False


def _end_after_error(connection: Any, exc: BaseException) -> None:
    """Roll back after the handler raised; never raises (the handler's error wins)."""
    if connection.closed or connection.invalidated:
        return
    try:
        if _is_disconnect(connection, exc):
            connection.invalidate(exc)
            return
        if connection._holds_connection():
            connection.rollback()
    except Exception as cleanup_error:
        # The session is in an unknown state: drop it rather than hand it out again.
        log.warning(
            "lambda-pool: rollback after a handler error failed (%s); invalidating the connection",
            type(cleanup_error).__name__,
        )
        try:
            if not connection.closed and not connection.invalidated:
                connection.invalidate(cleanup_error)
        except Exception:
            log.debug("lambda-pool: invalidation after a failed rollback failed", exc_info=True)


def _commit(connection: Any, instrumentation: Instrumentation | None) -> None:
    """Commit the handler's work (errors propagate: the caller must know it was lost)."""
    if not connection._holds_connection():
        return
    if _transaction_status(connection.driver_connection) == 3:
        # The handler caught a database error and returned normally: PostgreSQL would
        # answer COMMIT with ROLLBACK.  Say so instead of pretending to commit.
        message = (
            "lambda-pool: the handler returned normally but its transaction had failed "
            "(a database error was caught); it was rolled back, nothing was committed. "
            "Call connection.rollback() after catching a database error to continue."
        )
        log.warning(message)
        if instrumentation is not None and instrumentation.logger is not None:
            instrumentation.logger.warning(
                message, extra={"lambda_pool_event": "transaction_failed"}
            )
        connection.rollback()
        return
    connection.commit()


def _close_quietly(connection: Any) -> None:
    try:
        connection.close()
    except Exception:
        log.warning("lambda-pool: returning the connection to the pool failed", exc_info=True)


# ----------------------------------------------------------------------------- decorator


def _check_handler(fn: Callable[..., Any]) -> None:
    if not callable(fn):
        raise ArgumentError(f"with_connection() decorates a function, got {fn!r}")
    if inspect.iscoroutinefunction(fn):
        raise ArgumentError(
            "with_connection() decorates a blocking handler; Lambda's Python runtime calls "
            "handlers synchronously (run asyncio code with asyncio.run inside it)"
        )
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
            "remaining time minus the margin), a number of milliseconds from 1 to "
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


def _build_engine(
    settings: Settings,
    url: str | URL | None,
    credentials: CredentialProvider | None,
    warm: bool,
    engine_kwargs: dict[str, Any],
) -> Engine:
    from lambda_pool.config import credentials_for
    from lambda_pool.url import make_url

    parsed = settings.url() if url is None else make_url(url)
    provider = credentials if credentials is not None else credentials_for(settings, parsed)
    options = dict(engine_kwargs)
    if provider is not None:
        options["credentials"] = provider
    if settings.transaction_pooling:
        options.setdefault("transaction_pooling", True)
    if warm:
        from lambda_pool.warm import warm_engine

        if settings.pre_ping_idle_seconds is not None:
            options.setdefault("pre_ping_idle_seconds", settings.pre_ping_idle_seconds)
        return warm_engine(parsed, **options)
    from lambda_pool.engine import create_engine

    return create_engine(parsed, **options)


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


def with_connection(
    url: str | URL | None = None,
    *,
    engine: Engine | None = None,
    credentials: CredentialProvider | None = None,
    warm: bool | None = None,
    statement_timeout: str | int | None = DEADLINE,
    timeout_margin_ms: int | None = None,
    logger: Any = None,
    metrics: Any = None,
    tracer: Any = None,
    **engine_kwargs: Any,
) -> Callable[[Callable[..., R]], Callable[..., R]]:
    """Decorate a Lambda handler so it receives a database connection as ``connection=``.

    ``url``: database URL; default ``LAMBDA_POOL_DATABASE_URL`` (see
    :mod:`lambda_pool.config` for every setting).  ``engine``: a ready
    :class:`lambda_pool.engine.Engine` instead (then ``url``, ``credentials`` and engine
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
    if engine is None:
        use_warm = settings.warm if warm is None else warm
        engine = _build_engine(settings, url, credentials, use_warm, engine_kwargs)
    the_engine: Engine = engine
    margin_ms = settings.margin_ms if timeout_margin_ms is None else timeout_margin_ms
    _install_lifecycle(settings)

    from lambda_pool import observability

    if logger is not None or metrics is not None or tracer is not None:
        observability.instrument(the_engine, logger=logger, metrics=metrics, tracer=tracer)

    def decorate(fn: Callable[..., R]) -> Callable[..., R]:
        _check_handler(fn)

        @functools.wraps(fn)
        def handler(event: Any, context: Any, *args: Any, **kwargs: Any) -> R:
            if "connection" in kwargs:
                raise ArgumentError(
                    "the handler was called with connection= already; with_connection "
                    "provides it (is the decorator applied twice?)"
                )
            instrumentation = observability.instrumentation_for(the_engine)
            deadline = _Deadline(statement_timeout, margin_ms, context)
            if deadline.policy == DEADLINE:
                remaining = deadline.remaining_ms()
                if remaining is not None and remaining <= margin_ms:
                    # Fail before the pool is touched: no connect, no checkout.
                    if instrumentation is not None:
                        instrumentation.statement_timeout(None, remaining, margin_ms)
                    deadline.timeout_ms()  # raises StatementTimeoutError with the message
            with deadlines.use(_blocking_deadline(context, margin_ms)):
                started = time.perf_counter()
                proxy = the_engine.raw_connection()
                wait_ms = (time.perf_counter() - started) * 1000.0
                connection = InvocationConnection(the_engine, proxy)
                connection._deadline = deadline if statement_timeout is not None else None
                connection._instrumentation = instrumentation
                if instrumentation is not None:
                    instrumentation.checkout_waited(wait_ms, proxy.dbapi_connection)
                try:
                    try:
                        connection._arm()
                        result = fn(event, context, *args, connection=connection, **kwargs)
                    except BaseException as exc:
                        _end_after_error(connection, exc)
                        raise
                    _commit(connection, instrumentation)
                    return result
                finally:
                    _close_quietly(connection)

        # Tests and diagnostics reach the engine through the handler.
        handler.engine = the_engine  # type: ignore[attr-defined]
        return handler

    return decorate
