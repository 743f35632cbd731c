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

from lambda_pool.dialects.base import (
    CAPACITY_SQLSTATES,
    ExecResult,
    SyncDialect,
    is_capacity_message,
)
from lambda_pool.exc import ArgumentError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = [
    "PsycopgDialect",
    "psycopg_connect_args",
    "psycopg_is_auth_failure",
    "psycopg_is_capacity_error",
    "psycopg_is_disconnect",
]

# SQLSTATEs meaning the session is gone: class 08 (connection exception) plus the
# server shutting the backend down (pg_terminate_backend, crash, startup).
_DISCONNECT_SQLSTATES = {"57P01", "57P02", "57P03"}
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


def psycopg_connect_args(url: URL) -> dict[str, Any]:
    """libpq keywords for ``url``: host, port, dbname, user, password and every query key.

    Query keys go to libpq as written (``sslmode``, ``application_name``,
    ``connect_timeout``, ``options``, ``target_session_attrs`` …); libpq rejects the
    ones it does not know.  Several ``host`` (or ``port``) values become libpq's
    comma-separated multi-host list.
    """
    cparams: dict[str, Any] = {}
    if url.host is not None:
        cparams["host"] = url.host
    if url.port is not None:
        cparams["port"] = url.port
    if url.database is not None:
        cparams["dbname"] = url.database
    if url.username is not None:
        cparams["user"] = url.username
    if url.password is not None:
        cparams["password"] = url.password
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
    if not isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return False
    state = _sqlstate(exc)
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


class PsycopgDialect(SyncDialect):
    """Blocking psycopg 3 connections (``psycopg.connect``)."""

    name: ClassVar[str] = "postgresql"
    driver: ClassVar[str] = "psycopg"
    driver_module: ClassVar[str] = "psycopg"
    extra: ClassVar[str] = "postgres"

    def create_connect_args(self, url: URL) -> dict[str, Any]:
        return psycopg_connect_args(url)

    def connect(self, cparams: Mapping[str, Any]) -> Any:
        psycopg = self.load_driver()
        return psycopg.connect(**cparams)

    def do_ping(self, dbapi_conn: Any) -> bool:
        # An empty query is one round trip; outside a transaction it must run in
        # autocommit, or psycopg would send BEGIN first and leave a transaction open
        # (the way psycopg_pool checks connections).
        psycopg = self.load_driver()
        idle = dbapi_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if dbapi_conn.autocommit or not idle:
            dbapi_conn.execute("")
            return True
        dbapi_conn.autocommit = True
        try:
            dbapi_conn.execute("")
        finally:
            if not dbapi_conn.closed:
                dbapi_conn.autocommit = False
        return True

    def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        from psycopg.rows import tuple_row

        # tuple_row whatever row_factory the user configured: Result rows are tuples.
        with dbapi_conn.cursor(row_factory=tuple_row) as cursor:
            cursor.execute(sql, params)
            if cursor.description is None:
                return ExecResult((), [], cursor.rowcount, returns_rows=False)
            keys = tuple(column.name for column in cursor.description)
            rows = cursor.fetchall()
            return ExecResult(keys, rows, cursor.rowcount, returns_rows=True)

    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        return psycopg_is_disconnect(exc, dbapi_conn)

    def is_auth_failure(self, exc: BaseException) -> bool:
        return psycopg_is_auth_failure(exc)

    def is_capacity_error(self, exc: BaseException) -> bool:
        return psycopg_is_capacity_error(exc)

    def transaction_pooling_args(self) -> dict[str, Any]:
        return dict(PSYCOPG_TRANSACTION_POOLING_ARGS)

    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once, without taking psycopg's connection lock (process shutdown:
        the interrupted thread may hold it).  libpq still says goodbye to the server."""
        dbapi_conn.pgconn.finish()
