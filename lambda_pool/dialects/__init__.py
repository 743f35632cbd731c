"""Which dialect serves a URL: the registry of supported backends and drivers.

The registry is plain data so that ``import lambda_pool.url`` (which validates
URLs against it) stays cheap; a dialect module, and with it the driver, is
imported only when an engine is created for that URL.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lambda_pool.exc import ArgumentError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.dialects.base import AsyncDialect, SyncDialect

__all__ = [
    "DEFAULT_DRIVERS",
    "REGISTRY",
    "check_drivername",
    "load_dialect",
    "resolve",
]

# (backend, driver, is_async) -> "module:class".
REGISTRY: dict[tuple[str, str, bool], str] = {
    ("postgresql", "psycopg", False): "lambda_pool.dialects.psycopg:PsycopgDialect",
    ("postgresql", "psycopg", True): "lambda_pool.dialects.psycopg_async:AsyncPsycopgDialect",
    ("postgresql", "asyncpg", True): "lambda_pool.dialects.asyncpg:AsyncpgDialect",
    ("sqlite", "pysqlite", False): "lambda_pool.dialects.sqlite:SQLiteDialect",
}

# Driver used when the URL names none (``postgresql://``, ``sqlite://``).
DEFAULT_DRIVERS: dict[str, str] = {"postgresql": "psycopg", "sqlite": "pysqlite"}

# Spellings SQLAlchemy users write that name a driver we have under another name:
# ``postgresql+psycopg_async://`` is SQLAlchemy's explicit async psycopg name.
_ALIASES: dict[str, str] = {"psycopg_async": "psycopg"}

# Drivers that only exist in one mode; ``psycopg`` serves both.
_ASYNC_ONLY = {"asyncpg", "psycopg_async"}
_SYNC_ONLY = {"pysqlite"}


def _supported() -> str:
    names = sorted(
        {f"{backend}://" for backend, _, _ in REGISTRY}
        | {f"{backend}+{driver}://" for backend, driver, _ in REGISTRY}
        | {"postgresql+psycopg_async://"}
    )
    return ", ".join(names)


def _split(drivername: str) -> tuple[str, str | None]:
    backend, sep, driver = drivername.partition("+")
    return backend, (driver if sep else None)


def check_drivername(drivername: str) -> None:
    """Raise :class:`ArgumentError` unless ``drivername`` (``backend[+driver]``) is supported."""
    backend, driver = _split(drivername)
    if backend not in DEFAULT_DRIVERS:
        hint = " (write postgresql://)" if backend in {"postgres", "pg", "psql"} else ""
        raise ArgumentError(
            f"unsupported database scheme {backend!r}{hint}; lambda-pool supports {_supported()}"
        )
    if driver is None:
        return
    known = {d for b, d, _ in REGISTRY if b == backend} | (
        set(_ALIASES) if backend == "postgresql" else set()
    )
    if driver not in known:
        raise ArgumentError(
            f"unsupported driver {driver!r} for {backend}://; lambda-pool supports {_supported()}"
        )


def resolve(drivername: str, *, is_async: bool) -> tuple[str, str, bool]:
    """Map ``drivername`` to its registry key for a sync or async engine.

    A URL meant for the other factory raises :class:`ArgumentError` pointing to it:
    ``postgresql+asyncpg://`` needs ``create_async_engine`` and ``sqlite://`` has
    no async driver here.
    """
    check_drivername(drivername)
    backend, driver = _split(drivername)
    if driver is None:
        driver = DEFAULT_DRIVERS[backend]
    if is_async and driver in _SYNC_ONLY:
        raise ArgumentError(
            f"{drivername}:// is a synchronous driver; use lambda_pool.create_engine(), "
            "or an async URL such as postgresql+asyncpg:// or postgresql+psycopg:// "
            "with lambda_pool.asyncio.create_async_engine()"
        )
    if not is_async and driver in _ASYNC_ONLY:
        raise ArgumentError(
            f"{drivername}:// is an asyncio driver; use "
            "lambda_pool.asyncio.create_async_engine() (and 'await'), or "
            "postgresql+psycopg:// with lambda_pool.create_engine()"
        )
    driver = _ALIASES.get(driver, driver)
    return backend, driver, is_async


def load_dialect(drivername: str, *, is_async: bool, **options: Any) -> SyncDialect | AsyncDialect:
    """Instantiate the dialect serving ``drivername`` (imports its module, not yet its driver)."""
    target = REGISTRY[resolve(drivername, is_async=is_async)]
    module_name, _, class_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    dialect: SyncDialect | AsyncDialect = cls(**options)
    return dialect
