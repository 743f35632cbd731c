"""The psycopg 3 dialect (blocking): ``postgresql://`` and ``postgresql+psycopg://``.

Also holds the pieces the async psycopg dialect shares (connect arguments,
disconnect and authentication-failure detection), so both read the same rules.
psycopg itself is imported only inside functions: ``import lambda_pool`` must not
pay for it on a Lambda cold start.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from lambda_pool.deadlines import step
from lambda_pool.dialects.base import (
    CAPACITY_SQLSTATES,
    ExecResult,
    Fetched,
    SyncDialect,
    import_driver,
    is_capacity_message,
    url_connect_params,
)
from lambda_pool.exc import ArgumentError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = [
    "PsycopgDialect",
    "PsycopgRules",
    "commit_then_outcome",
    "opening_outcome",
    "opening_query",
    "psycopg_commit_then",
    "psycopg_connect_args",
    "psycopg_execute_opening",
    "psycopg_is_auth_failure",
    "psycopg_is_capacity_error",
    "psycopg_is_disconnect",
    "psycopg_is_executing",
    "psycopg_opens_in_pipeline",
    "psycopg_terminate",
]

# SQLSTATEs meaning the session is gone: class 08 (connection exception) plus the
# server shutting the backend down (pg_terminate_backend, crash, startup).
_DISCONNECT_SQLSTATES = {"57P01", "57P02", "57P03"}
# 25006 read_only_sql_transaction: a write reached a read-only server.  After a failover
# a warm connection still talks to the old writer, now a reader (the endpoint's DNS was
# resolved when it connected); only a new connection resolves the name again, so the
# session is as good as lost for a writer.  Discarding a session that a user made
# read-only on purpose costs one reconnect, never data.
_FAILOVER_SQLSTATES = {"25006"}
# 28P01 invalid_password, 28000 invalid_authorization_specification (no pg_hba
# entry, IAM "PAM authentication failed").
_AUTH_SQLSTATES = {"28P01", "28000"}
# libpq reports connection-time failures without a SQLSTATE; these phrases are how
# it says the socket or the session went away.
_DISCONNECT_PHRASES = (
    "server closed the connection",
    "connection is lost",
    "connection is closed",
    "connection not open",
    "terminating connection",
    "could not receive data",
    "could not send data",
    "consuming input failed",
    "ssl syscall error",
    "ssl connection has been closed",
    "eof detected",
    "connection has been closed",
)


#: libpq's defaults wait minutes on a silent network (psycopg: a 130 s connect
#: timeout; no keepalives; unacknowledged data retransmitted for ~15 minutes).
#: Defaults applied when neither the URL nor ``connect_args`` sets the key; inside an
#: invocation the deadline (lambda_pool.deadlines) bounds every step sooner.
PSYCOPG_TIMEOUT_DEFAULTS: dict[str, str] = {
    "connect_timeout": "10",
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
#: TCP_USER_TIMEOUT (ms): a connection whose sent data stays unacknowledged this long
#: is dropped by the kernel; libpq >= 12 knows the keyword.
PSYCOPG_TCP_USER_TIMEOUT_MS = "30000"


def psycopg_timeout_defaults() -> dict[str, str]:
    """:data:`PSYCOPG_TIMEOUT_DEFAULTS`, plus ``tcp_user_timeout`` when libpq knows it."""
    defaults = dict(PSYCOPG_TIMEOUT_DEFAULTS)
    psycopg = sys.modules.get("psycopg")
    try:
        libpq = int(psycopg.pq.version()) if psycopg is not None else 0
    except Exception:
        libpq = 0
    if libpq >= 120000:
        defaults["tcp_user_timeout"] = PSYCOPG_TCP_USER_TIMEOUT_MS
    return defaults


def psycopg_connect_args(url: URL) -> dict[str, Any]:
    """libpq keywords for ``url``: host, port, dbname, user, password and every query key.

    Query keys go to libpq as written (``sslmode``, ``application_name``,
    ``connect_timeout``, ``options``, ``target_session_attrs`` …); libpq rejects the
    ones it does not know.  Several ``host`` (or ``port``) values become libpq's
    comma-separated multi-host list.
    """
    cparams = url_connect_params(url, database_key="dbname")
    for key, value in url.query.items():
        if isinstance(value, tuple):
            if key not in ("host", "port", "hostaddr"):
                raise ArgumentError(f"URL query parameter {key!r} is given more than once")
            cparams[key] = ",".join(value)
        else:
            cparams[key] = value
    return cparams


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def psycopg_is_disconnect(exc: BaseException, dbapi_conn: Any) -> bool:
    """Whether ``exc`` (from psycopg, sync or async) means the session is unusable."""
    if dbapi_conn is not None and (
        getattr(dbapi_conn, "closed", False) or getattr(dbapi_conn, "broken", False)
    ):
        return True
    psycopg = sys.modules.get("psycopg")
    if psycopg is None:  # psycopg never loaded, so it cannot have raised
        return False
    state = _sqlstate(exc)
    if state in _FAILOVER_SQLSTATES and isinstance(exc, psycopg.Error):
        return True  # ReadOnlySqlTransaction is an InternalError, not an OperationalError
    if not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False
    if state is not None:
        # Query cancellation, deadlocks and serialization failures are
        # OperationalErrors too, but the session survives them.
        return state.startswith("08") or state in _DISCONNECT_SQLSTATES
    message = str(exc).lower()
    return any(phrase in message for phrase in _DISCONNECT_PHRASES)


def psycopg_is_auth_failure(exc: BaseException) -> bool:
    """Whether a failed connect was the server refusing the user or password."""
    if _sqlstate(exc) in _AUTH_SQLSTATES:
        return True
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.OperationalError):
        return False
    # libpq gives no SQLSTATE for failures during connect; its message is the signal.
    return "authentication failed" in str(exc).lower()


def psycopg_is_capacity_error(exc: BaseException) -> bool:
    """Whether a failed connect was refused for lack of connection slots.

    A SQLSTATE arrives only from an established session; libpq reports a refusal at
    connect as text ("FATAL:  too many connections for role ..."), so the message counts.
    An authentication failure is never a capacity error.
    """
    if psycopg_is_auth_failure(exc):
        return False
    if _sqlstate(exc) in CAPACITY_SQLSTATES:
        return True
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(exc, psycopg.OperationalError):
        return False
    return is_capacity_message(exc)


#: psycopg keywords for a transaction-pooling proxy: psycopg would otherwise prepare a
#: statement server-side after its 5th execution on a connection, and the next
#: transaction may run on another server session where it does not exist.
PSYCOPG_TRANSACTION_POOLING_ARGS: dict[str, Any] = {"prepare_threshold": None}


# libpq's PQTRANS_ACTIVE: a command is in progress on the connection.
_PQTRANS_ACTIVE = 1


def psycopg_is_executing(dbapi_conn: Any) -> bool:
    """Whether a psycopg connection (blocking or asyncio) is in the middle of a statement.

    Read from libpq's local state (``pgconn.transaction_status``): no I/O, no psycopg
    lock, no event loop.  Anything unreadable answers ``False`` (the connection is then
    only closed).
    """
    pgconn = getattr(dbapi_conn, "pgconn", None)
    if pgconn is None:
        return False
    try:
        return int(pgconn.transaction_status) == _PQTRANS_ACTIVE
    except Exception:
        return False


def psycopg_terminate(dbapi_conn: Any) -> None:
    """Close at once through libpq (``pgconn.finish()``): no psycopg lock, no await.

    libpq still says goodbye to the server (*Terminate*), so the backend ends now.
    The same for ``Connection`` and ``AsyncConnection``: neither the interrupted thread
    holding psycopg's lock nor a closed event loop can stop it.
    """
    dbapi_conn.pgconn.finish()


def psycopg_exec_result(cursor: Any, rows: list[tuple[Any, ...]]) -> ExecResult:
    """A psycopg cursor's outcome (``rows`` fetched by the caller, sync or async)."""
    if cursor.description is None:
        return ExecResult((), [], cursor.rowcount, returns_rows=False)
    keys = tuple(column.name for column in cursor.description)
    return ExecResult(keys, rows, cursor.rowcount, returns_rows=True)


def psycopg_opens_in_pipeline(conn: Any) -> bool:
    """Whether :func:`psycopg_execute_opening` can begin a transaction on ``conn``
    (blocking or asyncio): idle, outside autocommit, with psycopg's default ``BEGIN`` (no
    isolation level, read-only or deferrable setting, which would change that
    statement), and not in a pipeline."""
    try:
        # The fields behind psycopg's properties, read directly: every invocation's
        # first statement asks, and each property is a call.
        return (
            not conn._autocommit
            and conn.pgconn.transaction_status == 0
            and conn._isolation_level is None
            and conn._read_only is None
            and conn._deferrable is None
            and conn._pipeline is None
        )
    except AttributeError:  # a psycopg that renamed them: its public properties
        return (
            not conn.autocommit
            and int(conn.pgconn.transaction_status) == 0
            and conn.isolation_level is None
            and conn.read_only is None
            and conn.deferrable is None
            and getattr(conn, "_pipeline", None) is None
        )


def opening_query(
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    prelude: Sequence[str],
    encoding: str = "utf-8",
) -> tuple[bytes, bool]:
    """The simple query that begins the transaction: ``BEGIN``, ``prelude`` and, when it
    takes no parameters (and is no ``COPY``, which needs psycopg's copy API), the
    statement itself; and whether the statement is in it."""
    with_statement = params is None and sql.lstrip()[:4].upper() != "COPY"
    # "; " after each: a statement may end in a -- comment only when it is the last.
    # In the connection's client encoding, as psycopg sends a query.
    if with_statement:
        return "; ".join(["BEGIN", *prelude, sql]).encode(encoding), True
    return "; ".join(["BEGIN", *prelude]).encode(encoding), False


class _Psycopg:
    """psycopg's modules the invocation path uses, imported on first use (never at
    ``import lambda_pool``) and then kept: a function-level import on every statement
    costs more than the lookup it saves."""

    __slots__ = ("errors", "generators", "transformer")

    def __init__(self) -> None:
        from psycopg import errors, generators
        from psycopg.adapt import Transformer

        self.errors: Any = errors
        self.generators: Any = generators
        self.transformer: Any = Transformer


_psycopg: _Psycopg | None = None


def _modules() -> _Psycopg:
    global _psycopg
    if _psycopg is None:
        _psycopg = _Psycopg()
    return _psycopg


def opening_outcome(
    conn: Any,
    results: Sequence[Any],
    prelude_count: int,
    with_statement: bool,
    encoding: str | None = None,
) -> Fetched | None:
    """The statement's outcome (:data:`~lambda_pool.dialects.base.Fetched`) from the
    opening query's libpq results (the first error raised, by the statement that caused
    it), or ``None`` when the
    statement was not in it.  ``encoding``: the connection's client encoding, when the
    caller read it already."""
    psycopg = _psycopg or _modules()
    if encoding is None:
        encoding = conn.info.encoding
    # Only the last result can be a failure or a COPY: either ends the query string
    # (the server skips the statements after an error; COPY waits for its data).
    last = results[-1]
    status = last.status
    if status != _COMMAND_OK and status != _TUPLES_OK and status != _EMPTY_QUERY:
        if status == _FATAL_ERROR:
            raise psycopg.errors.error_from_result(last, encoding=encoding)
        # COPY or another state this path cannot finish: the session is unusable.
        conn.pgconn.finish()
        raise psycopg.errors.ProgrammingError(
            "the statement needs psycopg's own API (COPY?); the connection was closed"
        )
    if not with_statement:
        return None
    outcome = results[prelude_count + 1]  # after BEGIN and the prelude
    rowcount = outcome.command_tuples
    if outcome.status != _TUPLES_OK:
        return (), [], -1 if rowcount is None else rowcount, False
    transformer = psycopg.transformer(conn)
    transformer.set_pgresult(outcome)
    rows = transformer.load_rows(0, outcome.ntuples, tuple)
    nfields = outcome.nfields
    keys = (
        (outcome.fname(0).decode(encoding),)  # the common case, without a comprehension
        if nfields == 1
        else tuple([outcome.fname(i).decode(encoding) for i in range(nfields)])
    )
    return keys, rows, outcome.ntuples, True


def psycopg_execute_opening(
    conn: Any,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    prelude: Sequence[str],
) -> Fetched:
    """Begin a transaction on ``conn`` with ``prelude`` (e.g. ``SET LOCAL
    statement_timeout``), then run ``sql``: one round trip fewer than psycopg's way.
    Returns the statement's outcome as a :data:`~lambda_pool.dialects.base.Fetched`.

    psycopg sends its ``BEGIN`` as a round trip of its own before a transaction's first
    statement.  Here ``BEGIN`` and ``prelude`` go out as one simple query, and with them
    the statement itself when it takes no parameters (the simple protocol allows several
    statements in one message; an explicit ``BEGIN`` there opens a real transaction
    block that outlives the message): one round trip in all.  A statement with
    parameters needs the extended protocol, so it follows as usual (psycopg then sees
    the open transaction and sends no ``BEGIN``): two.  Errors are raised here, by the
    statement that caused them; the transaction is then failed, as it would be
    otherwise.  psycopg's pipeline mode would carry everything in one round trip too,
    but its Python machinery costs more CPU per invocation than a loopback round trip
    (measured: +230 us against +40 us).  The libpq calls are psycopg's own generators,
    waited on by the connection's ``wait()`` (bounded by the deadline), under its lock.
    """
    psycopg = _psycopg or _modules()
    pgconn = conn.pgconn
    # What conn.info.encoding reads (psycopg's own conn_encoding), without building a
    # ConnectionInfo for it.
    encoding = pgconn._encoding
    query, with_statement = opening_query(sql, params, prelude, encoding)
    with conn.lock:
        pgconn.send_query(query)
        results = conn.wait(psycopg.generators.execute(pgconn))
    outcome = opening_outcome(conn, results, len(prelude), with_statement, encoding)
    if outcome is not None:
        return outcome
    from psycopg.rows import tuple_row

    with conn.cursor(row_factory=tuple_row) as cursor:
        cursor.execute(sql, params)
        rows = cursor.fetchall() if cursor.description is not None else []
        done = psycopg_exec_result(cursor, rows)
        return done.keys, done.rows, done.rowcount, done.returns_rows


def psycopg_commit_then(conn: Any, statements: str) -> bool:
    """``COMMIT``, then ``statements``, as one simple query (one round trip).

    Raises the ``COMMIT``'s own error when it failed (the server then rolled the
    transaction back and skipped the rest).  Returns whether ``statements`` all
    succeeded too: after a committed transaction a failure there is not the caller's
    to hear about; the caller then resets the session the ordinary way.
    """
    psycopg = _psycopg or _modules()
    pgconn = conn.pgconn
    encoding = pgconn._encoding  # conn.info.encoding, as in psycopg_execute_opening
    with conn.lock:
        pgconn.send_query(f"COMMIT; {statements}".encode(encoding))
        results = conn.wait(psycopg.generators.execute(pgconn))
    # commit_then_outcome(), inline: every warm invocation ends here.
    if results and results[0].status != _FATAL_ERROR:
        return len(results) > 1 and results[-1].status != _FATAL_ERROR
    return commit_then_outcome(results, encoding)


def commit_then_outcome(results: Sequence[Any], encoding: str) -> bool:
    """What :func:`psycopg_commit_then` got back (libpq results, one per statement):
    raises the ``COMMIT``'s error, else tells whether every later statement succeeded."""
    if not results:
        return False
    if results[0].status == _FATAL_ERROR:
        psycopg = _psycopg or _modules()
        raise psycopg.errors.error_from_result(results[0], encoding=encoding)
    # A failed statement ends the query string (the server skips the rest): only the
    # last result can be one.
    return len(results) > 1 and results[-1].status != _FATAL_ERROR


# libpq's ExecStatus values (psycopg.pq.ExecStatus), by value: no import.
_EMPTY_QUERY = 0
_COMMAND_OK = 1
_TUPLES_OK = 2
_FATAL_ERROR = 7


class PsycopgRules:
    """What the blocking and asyncio psycopg dialects share (one set of rules for both):
    names, connect arguments, error classification, transaction pooling, terminate."""

    name: ClassVar[str] = "postgresql"
    driver: ClassVar[str] = "psycopg"
    driver_module: ClassVar[str] = "psycopg"
    extra: ClassVar[str] = "postgres"

    def create_connect_args(self, url: URL) -> dict[str, Any]:
        return psycopg_connect_args(url)

    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        return psycopg_is_disconnect(exc, dbapi_conn)

    def is_auth_failure(self, exc: BaseException) -> bool:
        return psycopg_is_auth_failure(exc)

    def is_capacity_error(self, exc: BaseException) -> bool:
        return psycopg_is_capacity_error(exc)

    def transaction_pooling_args(self) -> dict[str, Any]:
        return dict(PSYCOPG_TRANSACTION_POOLING_ARGS)

    def timeout_defaults(self) -> dict[str, Any]:
        """libpq timeouts applied where the URL and ``connect_args`` give none."""
        return psycopg_timeout_defaults()

    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once, without taking psycopg's connection lock or awaiting (process
        shutdown: the interrupted thread may hold it, the event loop may be gone).
        libpq still says goodbye to the server."""
        psycopg_terminate(dbapi_conn)

    def is_executing(self, dbapi_conn: Any) -> bool:
        """Whether a statement is running on ``dbapi_conn`` (libpq's local state, no I/O):
        such a connection is sent :meth:`do_cancel` before it is terminated at shutdown,
        because the server notices a closed client only when the statement ends."""
        return psycopg_is_executing(dbapi_conn)

    @staticmethod
    def ping_needs_autocommit(dbapi_conn: Any) -> bool:
        """Whether the ping's empty query must run in autocommit.

        An empty query is one round trip; outside a transaction it must run in
        autocommit, or psycopg would send BEGIN first and leave a transaction open
        (the way psycopg_pool checks connections).
        """
        psycopg = import_driver("psycopg", "postgres")
        idle = dbapi_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        return bool(idle and not dbapi_conn.autocommit)


class PsycopgDialect(PsycopgRules, SyncDialect):
    """Blocking psycopg 3 connections (``psycopg.connect``)."""

    def connect(self, cparams: Mapping[str, Any]) -> Any:
        """A :class:`~lambda_pool.dialects._psycopg_deadline.DeadlineConnection`: a
        ``psycopg.Connection`` whose connect and every later wait end by the current
        deadline (:mod:`lambda_pool.deadlines`)."""
        self.load_driver()
        from lambda_pool.dialects._psycopg_deadline import DeadlineConnection

        return DeadlineConnection.connect(**cparams)

    def do_ping(self, dbapi_conn: Any) -> bool:
        with step("pre-ping"):
            if not self.ping_needs_autocommit(dbapi_conn):
                dbapi_conn.execute("")
                return True
            dbapi_conn.autocommit = True
            try:
                dbapi_conn.execute("")
            finally:
                if not dbapi_conn.closed:
                    dbapi_conn.autocommit = False
            return True

    def do_cancel(self, dbapi_conn: Any, timeout: float) -> bool:
        """Ask the server to cancel the running statement, from any thread, without
        psycopg's connection lock.  psycopg >= 3.2: ``cancel_safe(timeout=)`` (bounded by
        ``timeout`` with libpq >= 17); older: ``cancel()``."""
        cancel_safe = getattr(dbapi_conn, "cancel_safe", None)
        if callable(cancel_safe):
            cancel_safe(timeout=timeout)
        else:
            dbapi_conn.cancel()
        return True

    def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        from psycopg.rows import tuple_row

        # tuple_row whatever row_factory the user configured: Result rows are tuples.
        with dbapi_conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(sql, params)
            rows = cursor.fetchall() if cursor.description is not None else []
            return psycopg_exec_result(cursor, rows)
