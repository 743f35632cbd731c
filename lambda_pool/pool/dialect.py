"""The generic dialects a pool uses when the engine gives it none.

A dialect is how a pool talks to connections (see docs/ARCHITECTURE.md, "Pool ↔
dialect").  These work with any DB-API connection and recognise disconnects of the
drivers lambda-pool supports (psycopg, sqlite3, asyncpg) by duck typing and class
names, so no driver is imported here.  The engine passes the precise dialects.

Closing without an event loop or a lock (``do_terminate``, ``is_executing``,
``do_cancel``) is the drivers' dialects' own code, reached here by module name: a
psycopg or asyncpg connection behaves the same whichever dialect the pool has.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Protocol


class Dialect(Protocol):
    """What a sync pool needs from a dialect."""

    def do_rollback(self, dbapi_connection: Any) -> None: ...
    def do_commit(self, dbapi_connection: Any) -> None: ...
    def do_close(self, dbapi_connection: Any) -> None: ...
    def do_ping(self, dbapi_connection: Any) -> bool: ...
    def is_disconnect(self, exc: BaseException, dbapi_connection: Any) -> bool: ...
    def get_driver_connection(self, dbapi_connection: Any) -> Any: ...


def _driver(dbapi_connection: Any) -> str:
    # By module name, so that nothing here imports a driver.
    return type(dbapi_connection).__module__.partition(".")[0]


def generic_is_executing(dbapi_connection: Any) -> bool:
    """A statement is running: psycopg's libpq state; ``False`` for other drivers."""
    if _driver(dbapi_connection) != "psycopg":
        return False
    from lambda_pool.dialects.psycopg import psycopg_is_executing

    return psycopg_is_executing(dbapi_connection)


def _class_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def generic_is_disconnect(exc: BaseException, dbapi_connection: Any) -> bool:
    """Disconnect detection shared by the generic sync and async dialects."""
    module = type(exc).__module__
    names = _class_names(exc)
    if module.startswith("psycopg"):
        # psycopg: OperationalError (AdminShutdown, "consuming input failed", …) or a
        # connection it already knows is closed.
        return "OperationalError" in names or bool(getattr(dbapi_connection, "closed", False))
    if module.startswith("sqlite3") or module == "_sqlite3":
        return "ProgrammingError" in names and "closed database" in str(exc)
    if module.startswith("asyncpg"):
        closed = getattr(dbapi_connection, "is_closed", None)
        return (
            bool(names & {"ConnectionDoesNotExistError", "ConnectionFailureError"})
            or ("InterfaceError" in names and "closed" in str(exc))
            or (callable(closed) and bool(closed()))
        )
    return isinstance(exc, (ConnectionError, EOFError))


class _GenericDialect:
    """What both generic dialects answer the same way, sync or async."""

    def is_disconnect(self, exc: BaseException, dbapi_connection: Any) -> bool:
        return generic_is_disconnect(exc, dbapi_connection)

    def get_driver_connection(self, dbapi_connection: Any) -> Any:
        return dbapi_connection

    def is_executing(self, dbapi_connection: Any) -> bool:
        return generic_is_executing(dbapi_connection)


class DefaultDialect(_GenericDialect):
    """Any DB-API 2 connection: ``SELECT 1`` through a cursor, ``rollback``, ``commit``."""

    is_async = False

    def do_rollback(self, dbapi_connection: Any) -> None:
        dbapi_connection.rollback()

    def do_commit(self, dbapi_connection: Any) -> None:
        dbapi_connection.commit()

    def do_close(self, dbapi_connection: Any) -> None:
        dbapi_connection.close()

    def do_terminate(self, dbapi_connection: Any) -> None:
        """Close without the driver's lock: psycopg ``pgconn.finish()``, else ``close()``."""
        if _driver(dbapi_connection) == "psycopg":
            from lambda_pool.dialects.psycopg import psycopg_terminate

            psycopg_terminate(dbapi_connection)
        else:
            dbapi_connection.close()

    def do_cancel(self, dbapi_connection: Any, timeout: float) -> bool:
        """psycopg's (called only when :meth:`is_executing` said so)."""
        from lambda_pool.dialects.psycopg import PsycopgDialect

        return PsycopgDialect().do_cancel(dbapi_connection, timeout)

    def do_ping(self, dbapi_connection: Any) -> bool:
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
        return True


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


class AsyncDefaultDialect(_GenericDialect):
    """psycopg's ``AsyncConnection`` and asyncpg connections, told apart by their methods."""

    is_async = True

    async def do_rollback(self, dbapi_connection: Any) -> None:
        if hasattr(dbapi_connection, "rollback"):
            await _maybe_await(dbapi_connection.rollback())
        elif dbapi_connection.is_in_transaction():  # asyncpg has no rollback()
            await dbapi_connection.execute("ROLLBACK")

    async def do_commit(self, dbapi_connection: Any) -> None:
        if hasattr(dbapi_connection, "commit"):
            await _maybe_await(dbapi_connection.commit())
        elif dbapi_connection.is_in_transaction():
            await dbapi_connection.execute("COMMIT")

    async def do_close(self, dbapi_connection: Any) -> None:
        await _maybe_await(dbapi_connection.close())

    async def do_ping(self, dbapi_connection: Any) -> bool:
        if hasattr(dbapi_connection, "fetchval"):  # asyncpg
            await dbapi_connection.fetchval("SELECT 1")
            return True
        cursor = dbapi_connection.cursor()
        try:
            await _maybe_await(cursor.execute("SELECT 1"))
        finally:
            await _maybe_await(cursor.close())
        return True

    def do_terminate(self, dbapi_connection: Any) -> None:
        """Close without awaiting, whatever the state of the connection's event loop:
        the asyncpg and psycopg dialects' ``do_terminate``; another driver's
        ``terminate()`` when it has one."""
        driver = _driver(dbapi_connection)
        if driver == "asyncpg":
            from lambda_pool.dialects.asyncpg import asyncpg_terminate

            asyncpg_terminate(dbapi_connection)
        elif driver == "psycopg":
            from lambda_pool.dialects.psycopg import psycopg_terminate

            psycopg_terminate(dbapi_connection)
        else:
            terminate = getattr(dbapi_connection, "terminate", None)
            if callable(terminate):
                terminate()

    def do_cancel(self, dbapi_connection: Any, timeout: float) -> bool:
        """psycopg ``AsyncConnection``'s (called only when :meth:`is_executing` said so)."""
        from lambda_pool.dialects.psycopg_async import AsyncPsycopgDialect

        return AsyncPsycopgDialect().do_cancel(dbapi_connection, timeout)


def _psycopg_idle(dbapi_connection: Any) -> bool:
    # libpq's PQTRANS_IDLE is 0; a closed or broken connection reads UNKNOWN (4) or
    # INERROR, so it still gets its rollback (and the error that invalidates it).
    return bool(dbapi_connection.pgconn.transaction_status == 0)


def _sqlite_idle(dbapi_connection: Any) -> bool:
    return not dbapi_connection.in_transaction


def idle_probe(dbapi_type: type) -> Callable[[Any], bool] | None:
    """A test that a connection of ``dbapi_type`` has no transaction open, so that the
    rollback of the reset on return would send nothing (psycopg's and sqlite3's
    ``rollback()`` return at once then); ``None`` for drivers without a cheap one.

    psycopg_pool's ``putconn()`` makes the same test and skips the call; the pool does
    the same only with lambda-pool's own dialects, whose ``do_rollback`` is the
    driver's ``rollback()`` (a user's dialect still sees every call).
    """
    # psycopg's connections and their subclasses (the deadline-bounded ones), by class
    # name so that nothing here imports a driver.
    if any(
        klass.__name__ == "BaseConnection" and klass.__module__.startswith("psycopg")
        for klass in dbapi_type.__mro__
    ):
        return _psycopg_idle
    driver = dbapi_type.__module__.partition(".")[0]
    if driver in ("sqlite3", "_sqlite3") and hasattr(dbapi_type, "in_transaction"):
        return _sqlite_idle
    return None
