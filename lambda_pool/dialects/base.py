"""What every dialect provides: the interface the pool and the engines call.

A dialect is the only place that knows a driver.  The pool uses ``do_ping``,
``do_rollback``, ``do_commit``, ``do_close``, ``is_disconnect`` and
``get_driver_connection`` (see docs/ARCHITECTURE.md, "Pool ↔ dialect"); the
engines also use ``create_connect_args``, ``apply_credentials``, ``connect``,
``execute`` and ``is_auth_failure``.  Async dialects have the same names, with
the I/O methods as coroutines.

Closing without an event loop or a lock (process shutdown, a connection of another
event loop, garbage collection) uses three synchronous methods, the same in both
kinds: ``do_terminate(conn)`` (close now; never awaits, never fails because the
connection's loop is closed), ``is_executing(conn) -> bool`` (a statement is running,
from local state only) and ``do_cancel(conn, timeout)`` (ask the server to cancel it;
called from a helper thread, only when ``is_executing`` said so).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from lambda_pool._record import FrozenRecord
from lambda_pool.exc import ArgumentError, DriverNotInstalledError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = [
    "CAPACITY_PHRASES",
    "CAPACITY_SQLSTATES",
    "AsyncDialect",
    "ExecResult",
    "SyncDialect",
    "import_driver",
    "stronger_sslmode",
    "url_connect_params",
]

# libpq's sslmode values, weakest first: credentials that require TLS may raise the
# mode a user chose but must never lower it (verify-full stays verify-full).
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")

# too_many_connections: max_connections reached, or a role's / database's CONNECTION LIMIT.
CAPACITY_SQLSTATES = frozenset({"53300"})
# How servers and poolers say "no free connection slot" when no SQLSTATE reaches us:
# libpq reports errors during connect as text only, and PgBouncer answers with its own
# messages.  Lower case; matched as substrings of the lower-cased error message.
CAPACITY_PHRASES = (
    # PostgreSQL (53300): max_connections, CONNECTION LIMIT of a role or a database.
    "sorry, too many clients already",
    "too many connections for role",
    "too many connections for database",
    "remaining connection slots are reserved",
    # PgBouncer: max_client_conn, max_db_connections / max_user_connections.
    "no more connections allowed",
    # RDS Proxy: the client connection limit, or no database connection to borrow
    # within the proxy's ConnectionBorrowTimeout.
    "too many connections",
    "timed-out waiting to acquire database connection",
)


def is_capacity_message(exc: BaseException) -> bool:
    """True when ``exc``'s message is one of :data:`CAPACITY_PHRASES`."""
    message = str(exc).lower()
    return any(phrase in message for phrase in CAPACITY_PHRASES)


def stronger_sslmode(current: object, required: str) -> object:
    """The stronger of a user's ``sslmode`` and the one credentials require.

    Anything that is not a libpq sslmode string (asyncpg's ``SSLContext``, ``True``) is
    the user's explicit TLS setup and is kept.
    """
    if current is None:
        return required
    if isinstance(current, str) and current in _SSLMODES and required in _SSLMODES:
        return current if _SSLMODES.index(current) >= _SSLMODES.index(required) else required
    return current


def url_connect_params(url: URL, *, database_key: str) -> dict[str, Any]:
    """The URL's host, port, database (under ``database_key``), user and password, as given."""
    cparams: dict[str, Any] = {}
    if url.host is not None:
        cparams["host"] = url.host
    if url.port is not None:
        cparams["port"] = url.port
    if url.database is not None:
        cparams[database_key] = url.database
    if url.username is not None:
        cparams["user"] = url.username
    if url.password is not None:
        cparams["password"] = url.password
    return cparams


def import_driver(module: str, extra: str) -> ModuleType:
    """Import a driver module, turning its absence into an error naming the extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise DriverNotInstalledError(
            f"the {module!r} driver is not installed; install it with "
            f"pip install 'lambda-pool[{extra}]'"
        ) from exc


#: A statement's outcome as a plain tuple, ``(keys, rows, rowcount, returns_rows)``: what
#: the transaction-opening path returns (every warm invocation's first statement), where
#: building an :class:`ExecResult` as well as the caller's result would cost a second
#: object per statement.
Fetched = tuple[tuple[str, ...], list[tuple[Any, ...]], int, bool]


class ExecResult(FrozenRecord):
    """A statement's outcome, fully fetched: column names, rows as tuples, rowcount."""

    __slots__ = _fields = ("keys", "rows", "rowcount", "returns_rows")
    keys: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rowcount: int
    returns_rows: bool

    def __init__(
        self, keys: tuple[str, ...], rows: list[tuple[Any, ...]], rowcount: int, returns_rows: bool
    ) -> None:
        object.__setattr__(self, "keys", keys)
        object.__setattr__(self, "rows", rows)
        object.__setattr__(self, "rowcount", rowcount)
        object.__setattr__(self, "returns_rows", returns_rows)


class _DialectBase(ABC):
    name: ClassVar[str]
    driver: ClassVar[str]
    is_async: ClassVar[bool]
    # Module imported by load_driver(), and the lambda-pool extra that installs it.
    driver_module: ClassVar[str]
    extra: ClassVar[str]

    def load_driver(self) -> ModuleType:
        """The driver module; raises DriverNotInstalledError naming the extra when absent."""
        return import_driver(self.driver_module, self.extra)

    @abstractmethod
    def create_connect_args(self, url: URL) -> dict[str, Any]:
        """Driver keyword arguments for ``url`` (before ``connect_args`` are merged in)."""

    def merge_connect_args(
        self, base: Mapping[str, Any], extra: Mapping[str, Any]
    ) -> dict[str, Any]:
        """``base`` updated with the user's ``connect_args`` (theirs win, as in SQLAlchemy)."""
        merged = dict(base)
        merged.update(extra)
        return merged

    def apply_credentials(
        self,
        cparams: Mapping[str, Any],
        user: str | None,
        password: str | None,
        connect_args: Mapping[str, Any],
    ) -> dict[str, Any]:
        """Connect arguments with a credentials provider's user, password and requirements.

        The provider's ``connect_args`` use libpq names (:meth:`apply_libpq_arg` stores
        each in the driver's terms); ``sslmode`` can only be raised.
        """
        merged = dict(cparams)
        if user is not None:
            merged["user"] = user
        if password is not None:
            merged["password"] = password
        for key, value in connect_args.items():
            self.apply_libpq_arg(merged, key, value)
        return merged

    def apply_libpq_arg(self, cparams: dict[str, Any], key: str, value: Any) -> None:
        """Store one libpq-named connection parameter in ``cparams`` (``sslmode`` only up)."""
        if key == "sslmode":
            cparams["sslmode"] = stronger_sslmode(cparams.get("sslmode"), str(value))
        else:
            cparams[key] = value

    def get_driver_connection(self, dbapi_conn: Any) -> Any:
        """The driver's own connection object (we do not wrap drivers)."""
        return dbapi_conn

    @abstractmethod
    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        """True when ``exc`` means the connection is dead and must not be reused."""

    def is_auth_failure(self, exc: BaseException) -> bool:
        """True when a connect failed because the user or password was refused."""
        return False

    def is_capacity_error(self, exc: BaseException) -> bool:
        """True when a connect was refused for lack of connection slots (worth retrying).

        The engines retry such a connect with jittered backoff
        (:mod:`lambda_pool.connect_retry`); nothing else is retried that way.
        """
        return False

    def is_executing(self, dbapi_conn: Any) -> bool:
        """Whether a statement is running on ``dbapi_conn``, read from local state (no I/O,
        no lock, no event loop).  ``True`` makes shutdown :meth:`do_cancel` it before
        terminating the connection; the default, ``False``, only terminates."""
        return False

    def do_cancel(self, dbapi_conn: Any, timeout: float) -> bool:
        """Ask the server to cancel the statement running on ``dbapi_conn``; ``True`` when
        the request was sent, ``False`` when this driver has no way to (the default).

        Synchronous, from a helper thread, without the driver's connection lock or the
        event loop; ``timeout`` bounds it where the driver can (the caller stops waiting
        after it anyway).  Called only when :meth:`is_executing` is ``True``.
        """
        return False

    def timeout_defaults(self) -> dict[str, Any]:
        """Connect and socket timeouts (driver keywords) the engines apply where the URL
        and ``connect_args`` set none, so a connect or a silent socket never waits minutes
        outside an invocation's deadline.  None by default."""
        return {}

    def transaction_pooling_args(self) -> dict[str, Any]:
        """Driver keywords for a transaction-pooling proxy (PgBouncer transaction mode,
        RDS Proxy): no server-side prepared statements, which live in one server session."""
        raise ArgumentError(
            f"transaction_pooling applies to PostgreSQL drivers behind PgBouncer or RDS "
            f"Proxy; the {self.name}+{self.driver} dialect has no such setting"
        )


class SyncDialect(_DialectBase):
    """A dialect for a blocking DB-API driver."""

    is_async: ClassVar[bool] = False

    @abstractmethod
    def connect(self, cparams: Mapping[str, Any]) -> Any:
        """Open a new driver connection."""

    @abstractmethod
    def do_ping(self, dbapi_conn: Any) -> bool:
        """Round-trip to the server; raises the driver's error when the connection is dead."""

    def do_rollback(self, dbapi_conn: Any) -> None:
        dbapi_conn.rollback()

    def do_commit(self, dbapi_conn: Any) -> None:
        dbapi_conn.commit()

    def do_close(self, dbapi_conn: Any) -> None:
        dbapi_conn.close()

    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once without the driver's connection lock (process shutdown: the
        interrupted thread may hold it).  By default :meth:`do_close`."""
        self.do_close(dbapi_conn)

    @abstractmethod
    def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        """Run one statement (psycopg-style placeholders) and fetch its rows."""


class AsyncDialect(_DialectBase):
    """A dialect for an asyncio driver: I/O methods are coroutines."""

    is_async: ClassVar[bool] = True

    @abstractmethod
    async def connect(self, cparams: Mapping[str, Any]) -> Any:
        """Open a new driver connection."""

    @abstractmethod
    async def do_ping(self, dbapi_conn: Any) -> bool:
        """Round-trip to the server; raises the driver's error when the connection is dead."""

    @abstractmethod
    async def do_rollback(self, dbapi_conn: Any) -> None:
        """End the connection's transaction, discarding its work."""

    @abstractmethod
    async def do_commit(self, dbapi_conn: Any) -> None:
        """Commit the connection's transaction."""

    @abstractmethod
    async def do_close(self, dbapi_conn: Any) -> None:
        """Close the connection for real."""

    @abstractmethod
    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once, synchronously, from any thread: no await, no driver lock, and no
        error when the connection's event loop is closed or runs in another thread
        (process shutdown, a connection of another event loop, garbage collection)."""

    @abstractmethod
    async def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        """Run one statement (psycopg-style placeholders) and fetch its rows."""
