"""The sqlite3 dialect: ``sqlite:///path``, ``sqlite:///:memory:`` and ``sqlite://``.

Decisions:

* ``check_same_thread=False`` by default: the pool, not sqlite3, guarantees that
  one caller uses a connection at a time, and a pooled connection is routinely
  returned, disposed or closed from another thread (``engine.dispose()`` at
  shutdown, StaticPool shared between threads).  Pass
  ``connect_args={"check_same_thread": True}`` to get sqlite3's check back.
* an in-memory database lives as long as its connection, so ``create_engine``
  picks ``SingletonThreadPool`` for it when no pool is asked for (as SQLAlchemy
  does); with ``NullPool`` every checkout would see a new, empty database.
* placeholders are written psycopg-style and rewritten to sqlite3's
  (``%s`` → ``?``, ``%(name)s`` → ``:name``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar

from lambda_pool.dialects._paramstyle import to_sqlite
from lambda_pool.dialects.base import ExecResult, SyncDialect
from lambda_pool.exc import ArgumentError, DriverNotInstalledError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = ["SQLiteDialect", "is_memory_url"]

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ArgumentError(f"sqlite URL parameter {key!r} must be true or false, got {value!r}")


def _number(key: str, value: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(value)
    except ValueError:
        raise ArgumentError(f"sqlite URL parameter {key!r} must be a number") from None


# URL query keys sqlite3.connect() understands, and how to read their text.
_QUERY_KEYS: dict[str, Callable[[str, str], Any]] = {
    "timeout": lambda key, value: _number(key, value, float),
    "detect_types": lambda key, value: _number(key, value, int),
    "cached_statements": lambda key, value: _number(key, value, int),
    "check_same_thread": _flag,
    "uri": _flag,
    "isolation_level": lambda key, value: None if value.lower() == "none" else value,
}


def is_memory_url(url: URL) -> bool:
    """True for ``sqlite://`` and ``sqlite:///:memory:`` (a database per connection)."""
    if url.get_backend_name() != "sqlite":
        return False
    database = url.database or ""
    return database in ("", ":memory:") or (
        database.startswith("file:") and "mode=memory" in database
    )


class SQLiteDialect(SyncDialect):
    """sqlite3 connections from the standard library."""

    name: ClassVar[str] = "sqlite"
    driver: ClassVar[str] = "pysqlite"
    driver_module: ClassVar[str] = "sqlite3"
    extra: ClassVar[str] = ""

    def load_driver(self) -> ModuleType:
        # sqlite3 is in the standard library: no extra can install it.
        try:
            import sqlite3
        except ImportError as exc:
            raise DriverNotInstalledError(
                "this Python was built without the sqlite3 module; use a Python "
                "build that includes it (every AWS Lambda runtime does)"
            ) from exc
        return sqlite3

    def create_connect_args(self, url: URL) -> dict[str, Any]:
        if url.host or url.port or url.username or url.password:
            raise ArgumentError(
                "a sqlite URL has no host or user: write sqlite:///relative/path.db, "
                "sqlite:////absolute/path.db or sqlite:///:memory:"
            )
        cparams: dict[str, Any] = {
            "database": url.database or ":memory:",
            "check_same_thread": False,
        }
        for key, value in url.query.items():
            reader = _QUERY_KEYS.get(key)
            if reader is None or isinstance(value, tuple):
                raise ArgumentError(
                    f"unsupported sqlite URL parameter {key!r}; supported: "
                    f"{', '.join(sorted(_QUERY_KEYS))}"
                )
            cparams[key] = reader(key, value)
        return cparams

    def connect(self, cparams: Mapping[str, Any]) -> Any:
        sqlite3 = self.load_driver()
        return sqlite3.connect(**cparams)

    def do_ping(self, dbapi_conn: Any) -> bool:
        dbapi_conn.execute("SELECT 1").close()
        return True

    def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        text, args = to_sqlite(sql, params)
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(text, args)
            if cursor.description is None:
                return ExecResult((), [], cursor.rowcount, returns_rows=False)
            keys = tuple(column[0] for column in cursor.description)
            rows = [tuple(row) for row in cursor.fetchall()]
            return ExecResult(keys, rows, cursor.rowcount, returns_rows=True)
        finally:
            cursor.close()

    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None:
            return False
        return isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc).lower()
