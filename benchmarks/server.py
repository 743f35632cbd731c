"""The PostgreSQL server a run measures against: ``DATABASE_URL``, else a throw-away one.

The throw-away server is lambda-pool's :class:`~lambda_pool.testing.postgres.EmbeddedPostgres`
(loopback TCP only), stopped when the run ends.  :class:`Database` also spells the URL
the way each contender wants it (libpq, SQLAlchemy, lambda-pool).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = ["DATABASE_URL_ENV", "Database", "database"]

DATABASE_URL_ENV = "DATABASE_URL"


def _with_scheme(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((scheme, *parts[1:]))


@dataclass(frozen=True)
class Database:
    """One server, its URL spelled for each contender, and what it is (for the report)."""

    url: str
    source: str

    @property
    def libpq_url(self) -> str:
        """``postgresql://…`` for psycopg / psycopg_pool (libpq knows no ``+driver``)."""
        return _with_scheme(self.url, "postgresql")

    @property
    def lambda_pool_url(self) -> str:
        """``postgresql+psycopg://…`` for :func:`lambda_pool.create_engine`."""
        return _with_scheme(self.url, "postgresql+psycopg")

    @property
    def asyncpg_url(self) -> str:
        """``postgresql+asyncpg://…`` for :func:`lambda_pool.create_async_engine` on asyncpg."""
        return _with_scheme(self.url, "postgresql+asyncpg")

    @property
    def sqlalchemy_url(self) -> str:
        """``postgresql+psycopg://…`` for SQLAlchemy's ``create_engine`` and
        ``create_async_engine`` (psycopg 3; the async engine picks its async dialect)."""
        return _with_scheme(self.url, "postgresql+psycopg")

    def describe(self) -> dict[str, Any]:
        """Server version, TLS, host kind: what a reader needs to interpret the figures."""
        import psycopg

        with psycopg.connect(self.libpq_url) as conn:
            host = conn.info.host
            return {
                "source": self.source,
                "server_version": conn.info.server_version,
                "tls": bool(conn.pgconn.ssl_in_use),
                "host": "unix socket" if host.startswith("/") else host,
            }


@contextlib.contextmanager
def database(url: str | None = None) -> Iterator[Database]:
    """``url``, else ``$DATABASE_URL``, else a throw-away embedded server for the run."""
    url = url or os.environ.get(DATABASE_URL_ENV) or None
    if url:
        yield Database(url=url, source=DATABASE_URL_ENV)
        return
    from lambda_pool.testing.postgres import EmbeddedPostgres

    with EmbeddedPostgres() as server:
        yield Database(url=server.dsn, source="EmbeddedPostgres (loopback TCP)")
