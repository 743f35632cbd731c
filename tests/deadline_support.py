"""What the deadline tests (tests/test_deadline_*.py) share: a table to write to, URLs
through the fault proxy, and the checks made after every black hole."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from lambda_pool.testing.faults import FaultProxy
from lambda_pool.testing.postgres import PostgresServer


@dataclass
class Scene:
    """A test's database objects: the proxy, a URL through it, a table, an app name."""

    proxy: FaultProxy
    server: PostgresServer
    app: str
    table: str
    direct_url: str

    def url(self, scheme: str = "postgresql", **params: str) -> str:
        """A URL through the proxy with this test's application_name (TLS off: the
        proxy's byte counts then are PostgreSQL messages)."""
        query = {"application_name": self.app, "sslmode": "disable", **params}
        base = self.proxy.url_for(self.server.dsn_for(self.server.user, self.server.password))
        base = base.replace("postgresql://", f"{scheme}://", 1)
        sep = "&" if "?" in base else "?"
        return base + sep + "&".join(f"{k}={v}" for k, v in query.items())

    def rows(self) -> int:
        """Rows in the table, read from another (direct) connection."""
        with self.server.admin_connect() as conn:
            row = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
        assert row is not None
        return int(row[0])

    def heal_and_check_gone(self) -> None:
        """Heal the network, then the discarded connection's backend must end (the
        client closed its socket; the held bytes and the end-of-stream now arrive)."""
        self.proxy.pass_through()
        assert self.server.wait_for_backend_count(0, self.app, timeout=10) == 0


@pytest.fixture
def scene(
    lp_fault_proxy: FaultProxy, embedded_postgres: PostgresServer, unique_application_name: str
) -> Iterator[Scene]:
    from lambda_pool.testing.invoke import reset_lambda_pool_state

    table = f"lp_deadline_{uuid.uuid4().hex[:10]}"
    with embedded_postgres.admin_connect() as conn:
        conn.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, note text)")
        conn.execute(f"GRANT ALL ON {table} TO {embedded_postgres.user}")
    made = Scene(lp_fault_proxy, embedded_postgres, unique_application_name, table, "")
    try:
        yield made
    finally:
        lp_fault_proxy.pass_through()
        reset_lambda_pool_state()
        with embedded_postgres.admin_connect() as conn:
            conn.execute(f"DROP TABLE IF EXISTS {table}")


def insert_sql(table: str, first: int, count: int) -> str:
    """One statement writing ``count`` rows: the write whose atomicity is checked."""
    return f"INSERT INTO {table} SELECT g, 'x' FROM generate_series({first}, {first + count - 1}) g"


class Stopwatch:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def seconds(self) -> float:
        return time.monotonic() - self.started
