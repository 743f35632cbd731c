"""The asyncpg dialect: ``postgresql+asyncpg://`` with ``create_async_engine``.

Two things make asyncpg behave like the psycopg dialects, so the same code runs on
either driver:

* placeholders: SQL is written psycopg-style (``%s``, ``%(name)s``) and rewritten
  to asyncpg's ``$1, $2 …`` (see ``_paramstyle``);
* transactions: asyncpg autocommits each statement, psycopg opens a transaction
  on the first statement and waits for ``commit()``.  This dialect sends ``BEGIN``
  before the first statement when no transaction is open, so ``commit()`` and
  ``rollback()`` (and the pool's reset on return) mean the same thing.

Statements run as asyncpg prepared statements (one statement per call, as with any
extended-protocol driver) to get both the rows and the command status (rowcount),
taken from asyncpg's statement cache as its own ``fetch()`` does
(:func:`_prepared_statement`): a statement seen before on the connection is one round
trip (bind and execute), a new one two (prepare, then bind and execute).  A warm
connection keeps that cache across invocations (its reset,
:data:`lambda_pool.warm.reset.ASYNCPG_SESSION_RESET`, keeps the statements);
``statement_cache_size=0`` (transaction pooling) makes every statement two.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import socket
import sys
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from lambda_pool import deadlines
from lambda_pool.dialects._paramstyle import to_numeric
from lambda_pool.dialects.base import (
    CAPACITY_SQLSTATES,
    AsyncDialect,
    ExecResult,
    is_capacity_message,
    stronger_sslmode,
    url_connect_params,
)
from lambda_pool.exc import ArgumentError, DeadlineExceededError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = [
    "ASYNCPG_CONNECT_TIMEOUT",
    "AsyncpgDialect",
    "asyncpg_bounded",
    "asyncpg_commit_then",
    "asyncpg_connection_loop",
    "asyncpg_rollback_then",
    "asyncpg_socket_fileno",
    "asyncpg_terminate",
]

log = logging.getLogger("lambda_pool.dialects.asyncpg")

_DISCONNECT_SQLSTATES = {"57P01", "57P02", "57P03"}
# 25006 read_only_sql_transaction (ReadOnlySQLTransactionError): the server is a reader
# now, e.g. the old writer after a failover; see the psycopg dialect's _FAILOVER_SQLSTATES.
_FAILOVER_SQLSTATES = {"25006"}
_AUTH_SQLSTATES = {"28P01", "28000"}
# asyncpg.connect() keywords that may come from the URL query, with their types.
_TYPED_KEYS: dict[str, type] = {
    "command_timeout": float,
    "statement_cache_size": int,
    "max_cached_statement_lifetime": int,
    "max_cacheable_statement_size": int,
    "target_session_attrs": str,
}
_CLOSE_TIMEOUT = 5.0
# At most this much of the time left is kept for asyncpg's cancel request.
_CANCEL_RESERVE = 0.1
#: Seconds ``asyncpg.connect`` may take when nothing else says (asyncpg's own: 60).
ASYNCPG_CONNECT_TIMEOUT = 10.0

T = TypeVar("T")


_CONNECTION_LOST_NOTE = (
    "lambda-pool: the database connection was lost (asyncpg's protocol state no longer "
    "matches the server, e.g. the backend was terminated mid-query); it was discarded and "
    "the next checkout opens a new one"
)


def _note_connection_lost(exc: BaseException) -> None:
    """Say on the driver's own exception (same object, same type) that the connection is
    gone: asyncpg's message names only its internal states."""
    # Exception notes (PEP 678) exist from Python 3.11; 3.10 would not print them.
    if sys.version_info >= (3, 11) and _CONNECTION_LOST_NOTE not in getattr(exc, "__notes__", ()):
        exc.add_note(_CONNECTION_LOST_NOTE)


def _server_settings_from_options(options: str) -> dict[str, str]:
    """libpq ``options`` (``-c key=value`` …) as asyncpg ``server_settings``."""
    settings: dict[str, str] = {}
    tokens = shlex.split(options)
    index = 0
    while index < len(tokens):
        token = tokens[index]
        if token == "-c" and index + 1 < len(tokens):
            assignment = tokens[index + 1]
            index += 2
        elif token.startswith("-c") or token.startswith("--"):
            assignment = token[2:]
            index += 1
        else:
            raise ArgumentError(
                "the 'options' connection parameter must be '-c name=value' settings for asyncpg"
            )
        key, sep, value = assignment.partition("=")
        if not sep:
            raise ArgumentError(f"the 'options' setting {key!r} has no '=value'")
        settings[key.replace("-", "_")] = value
    return settings


def _libpq_to_asyncpg(cparams: dict[str, Any], key: str, value: Any) -> None:
    """Store one libpq-named connection parameter in asyncpg's terms."""
    settings: dict[str, Any] = cparams.setdefault("server_settings", {})
    if key == "sslmode":
        cparams["ssl"] = stronger_sslmode(cparams.get("ssl"), str(value))
    elif key == "connect_timeout":
        cparams["timeout"] = float(value)
    elif key == "application_name":
        settings["application_name"] = str(value)
    elif key == "options":
        settings.update(_server_settings_from_options(str(value)))
    elif key in _TYPED_KEYS:
        try:
            cparams[key] = _TYPED_KEYS[key](value)
        except ValueError:
            raise ArgumentError(f"connection parameter {key!r} must be a number") from None
    elif key in ("user", "password", "host", "port", "database", "ssl", "timeout"):
        cparams[key] = value
    else:
        # asyncpg's own DSN parser sends unknown keys to the server as settings.
        settings[key] = str(value)
    if not settings:
        del cparams["server_settings"]


def _rowcount(status: str | None) -> int:
    """The count at the end of a command tag (``INSERT 0 3`` → 3), or -1."""
    if not status:
        return -1
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


def asyncpg_socket_fileno(conn: Any) -> int | None:
    """The descriptor of an asyncpg connection's socket, or ``None`` (closed, or unknown).

    asyncpg has no public accessor: its ``Connection`` keeps the asyncio transport in
    ``_transport`` (private; looked up defensively), whose public
    ``get_extra_info("socket")`` gives the socket.  Callers only poll or duplicate the
    descriptor, never read from it: asyncio owns it.
    """
    try:
        transport = getattr(conn, "_transport", None)
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return None
        fileno = int(sock.fileno())
    except Exception:
        return None
    return fileno if fileno >= 0 else None


def asyncpg_connection_loop(conn: Any) -> asyncio.AbstractEventLoop | None:
    """The event loop an asyncpg connection belongs to, or ``None`` when it cannot be told.

    asyncpg has no public accessor either: ``Connection._loop`` (private, looked up
    defensively) is the loop it was opened on, the one its transport and every callback
    it schedules (``terminate()`` included) use.
    """
    loop = getattr(conn, "_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def _shutdown_duplicate(fileno: int) -> None:
    """``shutdown()`` the TCP connection behind ``fileno`` through a duplicate descriptor.

    ``shutdown`` acts on the connection, not the descriptor, so the server sees the
    client gone and ends the backend now, while the original descriptor (asyncio's)
    stays valid for its owner to close.
    """
    try:
        sock = socket.socket(fileno=os.dup(fileno))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _terminate_quietly(conn: Any) -> None:
    try:
        conn.terminate()
    except RuntimeError:
        # Its loop closed meanwhile: nothing can be scheduled on it (the session is
        # already ended by the shutdown of the socket).
        log.debug("terminating a connection of a closed event loop", exc_info=True)


def _runs_in_this_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def asyncpg_terminate(conn: Any) -> None:
    """Close an asyncpg connection at once, from any thread, whatever its loop's state.

    ``Connection.terminate()`` alone aborts the asyncio transport, which schedules its
    cleanup on the connection's loop: it raises ``RuntimeError`` when that loop is
    closed (after asyncio logged a fatal error), and is not thread-safe while the loop
    runs in another thread.  So, first, the session is ended on a duplicate of the
    socket's descriptor (:func:`_shutdown_duplicate`: the server ends the backend now,
    whatever the loop does); then ``terminate()`` runs on the connection's loop
    (:func:`asyncpg_connection_loop`) when it is running in another thread
    (``call_soon_threadsafe``), here when it is this thread's running loop, idle, or
    unknown, and not at all when it is closed: nothing can run there, and the
    descriptor is released when the connection is garbage-collected (asyncio warns
    "unclosed transport").  Never awaits, takes no lock.
    """
    fileno = asyncpg_socket_fileno(conn)
    if fileno is not None:
        _shutdown_duplicate(fileno)
    loop = asyncpg_connection_loop(conn)
    if loop is not None and loop.is_closed():
        return
    if loop is not None and loop.is_running() and not _runs_in_this_thread(loop):
        try:
            loop.call_soon_threadsafe(_terminate_quietly, conn)
            return
        except RuntimeError:  # closed in the meantime
            return
    _terminate_quietly(conn)


async def asyncpg_bounded(conn: Any, work: Awaitable[T], step_name: str) -> T:
    """Await ``work`` (I/O on ``conn``) until the current deadline at most.

    asyncpg waits on asyncio futures, so ``asyncio.wait_for`` can stop it (Python 3.10
    has no ``asyncio.timeout``).  The wait ends a little before the deadline (0.1 s, or
    a tenth of the time left when that is less): cancelling a running statement makes
    asyncpg send a cancel request on a new connection, and the time kept lets that
    request out, so a query that is merely slow stops on the server (in a black hole the
    request is lost too).  Then the connection is terminated
    (:func:`asyncpg_terminate`: socket shut down, no await; it also cancels asyncpg's
    pending cancel task) and :class:`~lambda_pool.exc.DeadlineExceededError` names
    ``step_name`` (or the step already under way, see :func:`lambda_pool.deadlines.step`).
    """
    bound = deadlines.current()
    if bound is None:
        return await work
    left = bound.remaining()
    name, started_with = deadlines.current_step(step_name, left)
    if left <= 0:
        if asyncio.iscoroutine(work):
            work.close()
        asyncpg_terminate(conn)
        raise bound.exceeded(name, started_with, "no time was left")
    reserve = min(_CANCEL_RESERVE, left / 10)
    try:
        return await asyncio.wait_for(work, left - reserve)
    except DeadlineExceededError:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        if bound.remaining() > reserve + 0.01:
            raise  # the driver's own timeout (command_timeout), not the deadline
        await _let_cancel_requests_out(conn, bound.remaining())
        asyncpg_terminate(conn)
        # One loop turn: the tasks terminate() cancelled (a pending cancel request) end.
        await asyncio.sleep(0)
        raise bound.exceeded(
            name, started_with, "the server did not answer (the network may be a black hole)"
        ) from None


async def _let_cancel_requests_out(conn: Any, budget: float) -> None:
    """Wait up to ``budget`` seconds for the cancel requests asyncpg started for ``conn``.

    asyncpg keeps them in ``Connection._cancellations`` (private, looked up
    defensively: without it the connection is only terminated).
    """
    tasks = [task for task in getattr(conn, "_cancellations", ()) if not task.done()]
    if tasks and budget > 0:
        await asyncio.wait(tasks, timeout=budget)


async def _prepared_statement(conn: Any, text: str) -> Any:
    """``text`` as an asyncpg ``PreparedStatement``, from the connection's statement
    cache when it is there (no round trip), else prepared (one) and cached.

    What ``Connection.fetch()`` does, which gives no command status and no column names
    of an empty result: asyncpg's ``_prepare(use_cache=True)`` (private, so looked up
    defensively; without it, the public ``prepare()`` of an unnamed statement, one more
    round trip per statement).  ``name=False`` takes asyncpg's own choice: a cached
    statement gets a name (``__asyncpg_stmt_<n>__``), one too long to cache or on a
    connection without a cache (transaction pooling) is unnamed, as in ``fetch()``
    (``prepare()`` without a name would name it, even without a cache before asyncpg
    0.31, and a named statement must not reach a transaction pooler).
    """
    prepare = getattr(conn, "_prepare", None)
    if callable(prepare):
        return await prepare(text, name=False, use_cache=True)
    return await conn.prepare(text, name="")


def _forget_stale_statements(conn: Any, exc: BaseException) -> None:
    """Empty asyncpg's statement cache after the server said a cached statement's result
    type changed (``ALTER TABLE`` … since it was prepared), as ``Connection.fetch()``
    does, so the next use prepares it anew.

    Inside a transaction (always, here) the statement cannot be retried: its error
    aborted the transaction, and it reaches the caller as with asyncpg itself.  (A
    changed type cache, ``OutdatedSchemaCacheError``, is handled by asyncpg's prepared
    statement itself.)
    """
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None or not isinstance(exc, asyncpg.exceptions.InvalidCachedStatementError):
        return
    drop = getattr(conn, "_drop_local_statement_cache", None)
    if callable(drop):
        drop()


async def asyncpg_commit_then(conn: Any, reset: str) -> bool:
    """``COMMIT``, then ``reset``, as one simple query (one round trip), bounded by the
    current deadline.

    ``reset`` must raise :data:`~lambda_pool.warm.reset.ASYNCPG_RESET_FAILED_SQLSTATE`
    for any failure of its own (as :data:`~lambda_pool.warm.reset.ASYNCPG_SESSION_RESET`
    does): asyncpg reports only the first error of a multi-statement message, not
    which statement raised it.  Raises the ``COMMIT``'s error when it failed (the
    server then rolled the transaction back and skipped the rest).  Returns whether
    ``reset`` succeeded too: after a committed transaction its failure is not the
    caller's to hear about; the caller then resets the session the ordinary way.
    """
    return await _end_then(conn, "COMMIT", reset)


async def asyncpg_rollback_then(conn: Any, reset: str) -> bool:
    """:func:`asyncpg_commit_then` with ``ROLLBACK``: one round trip where a handler's
    error would cost two (the rollback, then the reset on return)."""
    return await _end_then(conn, "ROLLBACK", reset)


async def _end_then(conn: Any, ending: str, reset: str) -> bool:
    from lambda_pool.warm.reset import ASYNCPG_RESET_FAILED_SQLSTATE

    try:
        await asyncpg_bounded(conn, conn.execute(f"{ending}; {reset}"), ending.lower())
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != ASYNCPG_RESET_FAILED_SQLSTATE:
            raise
        log.info("lambda-pool: the session reset sent with %s failed: %s", ending, exc)
        return False
    return True


class AsyncpgDialect(AsyncDialect):
    """asyncpg connections, with psycopg-style SQL and transactions."""

    name: ClassVar[str] = "postgresql"
    driver: ClassVar[str] = "asyncpg"
    driver_module: ClassVar[str] = "asyncpg"
    extra: ClassVar[str] = "asyncpg"

    def create_connect_args(self, url: URL) -> dict[str, Any]:
        cparams = url_connect_params(url, database_key="database")
        for key, value in url.query.items():
            if key in ("host", "port"):
                # libpq's host lists (several ?host=, or "h1,h2"); an empty port is
                # libpq's default one.  The URL has checked every port is a number.
                items = [
                    v
                    for part in ((value,) if isinstance(value, str) else value)
                    for v in part.split(",")
                ]
                if key == "host":
                    cparams["host"] = items if len(items) > 1 else items[0]
                else:
                    ports = [int(p) if p.strip() else 5432 for p in items]
                    cparams["port"] = ports if len(ports) > 1 else ports[0]
            elif isinstance(value, tuple):
                raise ArgumentError(f"URL query parameter {key!r} is given more than once")
            else:
                _libpq_to_asyncpg(cparams, key, value)
        return cparams

    def merge_connect_args(
        self, base: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        merged = dict(base)
        for key, value in extra.items():
            if key == "server_settings" and isinstance(value, Mapping):
                merged["server_settings"] = {**merged.get("server_settings", {}), **value}
            elif key in ("sslmode", "connect_timeout", "application_name", "options"):
                # libpq spellings are accepted here too, so one connect_args dict
                # serves both PostgreSQL drivers.
                _libpq_to_asyncpg(merged, key, value)
            else:
                merged[key] = value
        return merged

    def apply_libpq_arg(self, cparams: dict[str, Any], key: str, value: Any) -> None:
        _libpq_to_asyncpg(cparams, key, value)

    def timeout_defaults(self) -> dict[str, Any]:
        """asyncpg's connect ``timeout`` (its default: 60 s) where none is given."""
        return {"timeout": ASYNCPG_CONNECT_TIMEOUT}

    async def connect(self, cparams: Mapping[str, Any]) -> Any:
        """``asyncpg.connect`` with its ``timeout`` (TCP, TLS and authentication) lowered
        to the time left before the current deadline."""
        asyncpg = self.load_driver()
        bound = deadlines.current()
        if bound is None:
            return await asyncpg.connect(**cparams)
        started_with = bound.remaining()
        if started_with <= 0:
            raise bound.exceeded("connect", started_with, "no time was left to connect")
        params = dict(cparams)
        given = params.get("timeout")
        own = float(given) if isinstance(given, (int, float)) else None
        params["timeout"] = started_with if own is None else min(own, started_with)
        try:
            return await asyncpg.connect(**params)
        except DeadlineExceededError:
            raise
        except (asyncio.TimeoutError, TimeoutError):
            if own is not None and own < started_with:
                raise  # the user's own, shorter connect timeout
            raise bound.exceeded(
                "connect",
                started_with,
                "the server did not complete the connection (TCP, TLS or authentication); "
                "the network may be a black hole",
            ) from None

    async def do_ping(self, dbapi_conn: Any) -> bool:
        await asyncpg_bounded(dbapi_conn, dbapi_conn.execute("SELECT 1"), "pre-ping")
        return True

    async def do_rollback(self, dbapi_conn: Any) -> None:
        if not dbapi_conn.is_closed() and dbapi_conn.is_in_transaction():
            await asyncpg_bounded(dbapi_conn, dbapi_conn.execute("ROLLBACK"), "rollback")

    async def do_commit(self, dbapi_conn: Any) -> None:
        if not dbapi_conn.is_closed() and dbapi_conn.is_in_transaction():
            await asyncpg_bounded(dbapi_conn, dbapi_conn.execute("COMMIT"), "commit")

    async def do_close(self, dbapi_conn: Any) -> None:
        try:
            await dbapi_conn.close(timeout=_CLOSE_TIMEOUT)
        except Exception:
            # A dead socket cannot say goodbye; drop it without waiting.
            dbapi_conn.terminate()

    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once without awaiting or a lock, from any thread, and never fail
        because the connection's event loop is closed (:func:`asyncpg_terminate`)."""
        asyncpg_terminate(dbapi_conn)

    def is_executing(self, dbapi_conn: Any) -> bool:
        """Always ``False``: no statement is cancelled before an asyncpg connection is
        terminated at shutdown (see :meth:`do_cancel`)."""
        return False

    def do_cancel(self, dbapi_conn: Any, timeout: float) -> bool:
        """Not available without the event loop (``False``); :meth:`is_executing` is too.

        asyncpg's cancel (``Connection._cancel`` → ``connect_utils._cancel``) is a
        coroutine that opens a new connection on the connection's own loop, which at
        shutdown is closed or busy in the very statement to cancel.  A loop-free cancel
        would have to speak PostgreSQL's CancelRequest by hand from asyncpg's private
        protocol state (the backend's secret key) over a new socket, TLS negotiation
        included.  The connection is terminated instead: its socket is shut down at
        once, and the server ends a busy backend when the statement ends, or sooner
        with ``client_connection_check_interval`` (PostgreSQL 14+) set.
        """
        return False

    async def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        return await asyncpg_bounded(
            dbapi_conn, self._execute(dbapi_conn, sql, params), "statement"
        )

    async def _execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        text, args = to_numeric(sql, params)
        if not dbapi_conn.is_in_transaction():
            await dbapi_conn.execute("BEGIN")
        statement = await _prepared_statement(dbapi_conn, text)
        try:
            records = await statement.fetch(*args)
        except Exception as exc:
            _forget_stale_statements(dbapi_conn, exc)
            raise
        keys = tuple(attribute.name for attribute in statement.get_attributes())
        rowcount = _rowcount(statement.get_statusmsg())
        if not keys:
            return ExecResult((), [], rowcount, returns_rows=False)
        return ExecResult(keys, [tuple(record) for record in records], rowcount, True)

    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        asyncpg = sys.modules.get("asyncpg")
        if asyncpg is not None and isinstance(exc, asyncpg.exceptions.InternalClientError):
            # asyncpg's protocol state machine is out of step with the socket, e.g.
            # "cannot switch to state 11; another operation (2) is in progress" when the
            # backend was killed mid-query: nothing more can be sent on it.  Checked
            # first so the note is added whether or not asyncpg saw the socket close.
            _note_connection_lost(exc)
            return True
        if dbapi_conn is not None and dbapi_conn.is_closed():
            return True
        if isinstance(exc, (ConnectionError, EOFError)):
            return True
        if asyncpg is None:
            return False
        if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
            return True
        if isinstance(exc, asyncpg.exceptions.InterfaceError):
            return "connection is closed" in str(exc) or "connection was closed" in str(exc)
        state = getattr(exc, "sqlstate", None)
        return isinstance(state, str) and (
            state.startswith("08") or state in _DISCONNECT_SQLSTATES or state in _FAILOVER_SQLSTATES
        )

    def is_auth_failure(self, exc: BaseException) -> bool:
        return getattr(exc, "sqlstate", None) in _AUTH_SQLSTATES

    def is_capacity_error(self, exc: BaseException) -> bool:
        # asyncpg gives the server's SQLSTATE (TooManyConnectionsError is 53300);
        # PgBouncer and RDS Proxy refusals arrive as protocol errors with their text.
        if self.is_auth_failure(exc):
            return False
        if getattr(exc, "sqlstate", None) in CAPACITY_SQLSTATES:
            return True
        asyncpg = sys.modules.get("asyncpg")
        if asyncpg is None or not isinstance(
            exc, (asyncpg.exceptions.PostgresError, asyncpg.exceptions.InterfaceError)
        ):
            return False
        return is_capacity_message(exc)

    def transaction_pooling_args(self) -> dict[str, Any]:
        # asyncpg prepares every statement (named, cached per connection) unless its
        # statement cache is off; behind a transaction pooler the next transaction may
        # run on a server session that never saw the statement.
        return {"statement_cache_size": 0}
