"""A real PgBouncer in transaction mode serves psycopg without prepared statements and
multiplexes many clients onto few server connections."""

from __future__ import annotations

import psycopg
import pytest

from lambda_pool.testing.pgbouncer import PgBouncer
from lambda_pool.testing.postgres import PostgresServer

pytestmark = pytest.mark.pgbouncer


def test_transaction_mode_serves_queries_without_prepared_statements(
    pgbouncer: PgBouncer,
) -> None:
    assert pgbouncer.pool_mode == "transaction"
    with psycopg.connect(pgbouncer.dsn, prepare_threshold=None) as conn:
        # Past psycopg's default prepare threshold (5): nothing may be prepared server-side.
        for i in range(10):
            assert conn.execute("SELECT %s::int + 1", (i,)).fetchone() == (i + 1,)
        with conn.transaction():
            conn.execute("CREATE TEMP TABLE t (x int) ON COMMIT DROP")
            conn.execute("INSERT INTO t VALUES (1), (2)")
            assert conn.execute("SELECT count(*) FROM t").fetchone() == (2,)


def test_many_clients_share_few_server_connections(
    pgbouncer: PgBouncer, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    clients = [
        pgbouncer.connect(application_name=unique_application_name, autocommit=True)
        for _ in range(20)
    ]
    try:
        for conn in clients:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        stats = pgbouncer.pool_stats()
        assert stats["cl_active"] + stats["cl_waiting"] >= 20
        servers = stats["sv_active"] + stats["sv_idle"] + stats["sv_used"]
        assert 1 <= servers <= pgbouncer.default_pool_size
        # pgbouncer sets each client's application_name on the server connection it lends,
        # so the server sees the test's name on at most pool-size backends.
        assert (
            1
            <= embedded_postgres.backend_count(unique_application_name)
            <= (pgbouncer.default_pool_size)
        )
    finally:
        for conn in clients:
            conn.close()


def test_wrong_password_is_rejected_by_the_bouncer(
    pgbouncer: PgBouncer, embedded_postgres: PostgresServer
) -> None:
    url = embedded_postgres.dsn_for(embedded_postgres.user, "wrong")
    url = url.replace(f":{embedded_postgres.port}/", f":{pgbouncer.port}/")
    # PgBouncer words it "SASL authentication failed" where PostgreSQL says "password
    # authentication failed"; psycopg gives no SQLSTATE for either at connect time.
    with pytest.raises(psycopg.OperationalError, match="SASL authentication failed"):
        psycopg.connect(url, prepare_threshold=None, connect_timeout=5)
