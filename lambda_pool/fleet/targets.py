"""The database a fleet runs against, and what the coordinator reads from its server.

* :func:`embedded` — a throw-away PostgreSQL with the ``max_connections`` and settings
  asked for (``idle_session_timeout`` …);
* :func:`through_pgbouncer` — the same, behind the real ``pgbouncer`` in transaction
  mode with the pool size asked for (``LAMBDA_POOL_TRANSACTION_POOLING=1`` for the
  containers); PgBouncer stands in for RDS Proxy;
* :func:`external` — any URL (a staging database); backends are then counted by the
  fleet's ``application_name`` among the URL user's own sessions.

A :class:`Target` samples the server's client backends from ``pg_stat_activity`` over
one connection of its own, which never counts itself.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "APPLICATION_NAME",
    "BackendSample",
    "Target",
    "embedded",
    "external",
    "libpq_url",
    "through_pgbouncer",
    "with_application_name",
]

#: The ``application_name`` fleet containers connect with.
APPLICATION_NAME = "lambda-pool-fleet"
_SAMPLER_APPLICATION_NAME = "lambda-pool-fleet-sampler"

_SETTINGS = (
    "max_connections",
    "superuser_reserved_connections",
    "reserved_connections",
    "idle_session_timeout",
    "idle_in_transaction_session_timeout",
    "server_version",
)


@dataclass(frozen=True)
class BackendSample:
    """Client backends of the fleet's user at one moment, by state, and their pids."""

    total: int
    active: int
    idle: int
    idle_in_transaction: int
    pids: frozenset[int]


#: URL query keys lambda-pool reads itself; libpq (the coordinator's own connection) would
#: refuse them.
_LAMBDA_POOL_KEYS = frozenset(
    {"transaction_pooling", "auth", "secret", "region", "token_margin", "secret_max_age"}
)


def libpq_url(url: str) -> str:
    """``url`` as libpq takes it: no ``+driver`` in the scheme, no lambda-pool query keys."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    kept = [(k, v) for k, v in query if k not in _LAMBDA_POOL_KEYS]
    return urlunsplit(parts._replace(scheme=parts.scheme.split("+", 1)[0], query=urlencode(kept)))


def with_application_name(url: str, name: str = APPLICATION_NAME) -> str:
    """``url`` with ``application_name=name`` added unless it names one already."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(key == "application_name" for key, _ in query):
        return url
    query.append(("application_name", name))
    return urlunsplit(parts._replace(query=urlencode(query)))


class Target:
    """Where the containers connect (`url`) and how the coordinator watches the server.

    ``admin_url`` reaches the real server directly (behind PgBouncer too); ``user`` is
    the role whose backends are counted, or None to count the sessions named
    `APPLICATION_NAME` among the admin role's own.
    """

    def __init__(
        self,
        *,
        kind: str,
        url: str,
        admin_url: str,
        user: str | None,
        transaction_pooling: bool = False,
        pgbouncer: Any = None,
        closers: tuple[Any, ...] = (),
    ) -> None:
        self.kind = kind
        self.url = url
        self.admin_url = admin_url
        self.user = user
        self.transaction_pooling = transaction_pooling
        self.pgbouncer = pgbouncer
        self._closers = closers
        self._lock = threading.Lock()
        self._conn: Any = None

    def __repr__(self) -> str:
        return f"<Target {self.kind}>"

    def _admin(self) -> Any:
        import psycopg

        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(
                libpq_url(self.admin_url),
                autocommit=True,
                application_name=_SAMPLER_APPLICATION_NAME,
                connect_timeout=10,
            )
        return self._conn

    def execute(self, statement: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement on the coordinator's own connection; its rows."""
        with self._lock:
            cursor = self._admin().execute(statement, params)
            return list(cursor.fetchall()) if cursor.description else []

    def sample(self) -> BackendSample:
        """The fleet's client backends now (the coordinator's own never count)."""
        rows = self.execute(
            """
            SELECT pid, state FROM pg_stat_activity
            WHERE backend_type = 'client backend'
              AND pid <> pg_backend_pid()
              AND application_name IS DISTINCT FROM %(sampler)s
              AND application_name IS DISTINCT FROM 'lambda_pool.testing.admin'
              AND (CASE WHEN %(user)s::text IS NULL
                        THEN usename = current_user AND application_name = %(app)s
                        ELSE usename = %(user)s::text END)
            """,
            {"sampler": _SAMPLER_APPLICATION_NAME, "user": self.user, "app": APPLICATION_NAME},
        )
        states = [state for _, state in rows]
        return BackendSample(
            total=len(rows),
            active=states.count("active"),
            idle=states.count("idle"),
            idle_in_transaction=sum(
                1 for state in states if state and state.startswith("idle in transaction")
            ),
            pids=frozenset(int(pid) for pid, _ in rows),
        )

    def server_settings(self) -> dict[str, str | None]:
        """The settings that decide how many containers fit and when idle ones are cut."""
        row = self.execute(
            "SELECT " + ", ".join("current_setting(%s, true)" for _ in _SETTINGS),
            _SETTINGS,
        )[0]
        return dict(
            zip(_SETTINGS, (None if value is None else str(value) for value in row), strict=True)
        )

    def prepare(self, statement: str) -> None:
        """Run ``statement`` as the containers' own role (so it owns what it creates)."""
        import psycopg

        with psycopg.connect(
            libpq_url(self.url), autocommit=True, prepare_threshold=None, connect_timeout=10
        ) as conn:
            conn.execute(statement)

    def pooler_stats(self) -> dict[str, Any] | None:
        """PgBouncer's ``SHOW POOLS`` row for the application database, when there is one."""
        if self.pgbouncer is None:
            return None
        row = self.pgbouncer.pool_stats()
        keys = ("cl_active", "cl_waiting", "sv_active", "sv_idle", "sv_used", "maxwait")
        return {key: row.get(key) for key in keys}

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        for closer in self._closers:
            closer()


@contextlib.contextmanager
def embedded(
    max_connections: int = 100, settings: Mapping[str, str | int] | None = None
) -> Iterator[Target]:
    """A throw-away PostgreSQL with these settings, stopped when the block ends."""
    from lambda_pool.testing.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(max_connections=max_connections, settings=settings).start()
    target = Target(
        kind="postgres",
        url=with_application_name(server.dsn),
        admin_url=server.admin_dsn,
        user=server.user,
        closers=(server.stop,),
    )
    try:
        yield target
    finally:
        target.close()


@contextlib.contextmanager
def through_pgbouncer(
    pool_size: int,
    *,
    max_connections: int = 100,
    server_settings: Mapping[str, str | int] | None = None,
    pgbouncer_settings: Mapping[str, str | int] | None = None,
    max_client_conn: int = 1000,
) -> Iterator[Target]:
    """An embedded PostgreSQL behind PgBouncer in transaction mode with ``pool_size``."""
    from lambda_pool.testing.pgbouncer import PgBouncer
    from lambda_pool.testing.postgres import EmbeddedPostgres

    server = EmbeddedPostgres(max_connections=max_connections, settings=server_settings).start()
    try:
        bouncer = PgBouncer(
            server,
            pool_mode="transaction",
            default_pool_size=pool_size,
            max_client_conn=max_client_conn,
            settings=pgbouncer_settings,
        ).start()
    except BaseException:
        server.stop()
        raise
    target = Target(
        kind="pgbouncer",
        url=with_application_name(bouncer.dsn),
        admin_url=server.admin_dsn,
        user=server.user,
        transaction_pooling=True,
        pgbouncer=bouncer,
        closers=(bouncer.stop, server.stop),
    )
    try:
        yield target
    finally:
        target.close()


@contextlib.contextmanager
def external(url: str, *, transaction_pooling: bool = False) -> Iterator[Target]:
    """Any PostgreSQL URL; the coordinator watches it over a connection of its own."""
    target = Target(
        kind="url",
        url=with_application_name(url),
        admin_url=url,
        user=None,
        transaction_pooling=transaction_pooling,
    )
    try:
        yield target
    finally:
        target.close()
