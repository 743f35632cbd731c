"""``warm_engine()`` end to end: the module-level cache of engines and their WarmPool, through
``lambda_pool.create_engine``, against the real embedded PostgreSQL (and moto for IAM)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import FakeClock, in_forked_child, require_tls

import lambda_pool
from lambda_pool import lifecycle
from lambda_pool.auth import Credentials
from lambda_pool.exc import ArgumentError
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import WarmPool, cached_engines, warm_engine


@pytest.fixture
def url(embedded_postgres: PostgresServer, unique_application_name: str) -> Iterator[str]:
    yield embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    )
    for engine in cached_engines():
        if engine.url.query.get("application_name") == unique_application_name:
            engine.dispose()


def _backend_pid(conn: Any) -> int:
    return int(conn.execute("SELECT pg_backend_pid()").scalar_one())


def test_warm_engine_is_exported_lazily_and_cached_per_identity(url: str) -> None:
    engine = lambda_pool.warm_engine(url)
    assert isinstance(engine.pool, WarmPool)
    assert warm_engine(url) is engine
    assert warm_engine(url, pre_ping_idle_seconds=5) is not engine
    other_password = url.replace("@", "x@", 1)
    assert warm_engine(other_password) is not engine
    assert "x@" not in repr(warm_engine(other_password).url)  # never shows a password
    assert any(e is engine for e in lifecycle.registered_engines())


def test_concurrent_first_calls_create_one_engine(url: str) -> None:
    engines: list[Any] = []
    threads = [threading.Thread(target=lambda: engines.append(warm_engine(url))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(e) for e in engines}) == 1


def test_warm_engine_refuses_other_pools(url: str) -> None:
    with pytest.raises(ArgumentError, match="pool_size"):
        warm_engine(url, pool_size=3)
    with pytest.raises(ArgumentError, match="pre_ping_idle_seconds"):
        warm_engine(url, pre_ping_idle_seconds=-5)


def test_hundred_invocations_use_exactly_one_backend(
    url: str, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pids = set()
    for _ in range(100):
        engine = warm_engine(url)  # what a handler calls on every invocation
        with engine.connect() as conn:
            pids.add(_backend_pid(conn))
    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert warm_engine(url).pool.stats.as_dict()["reused"] == 99


def test_terminated_backend_is_replaced_between_invocations(
    url: str, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = warm_engine(url)
    with engine.connect() as conn:
        first = _backend_pid(conn)
    assert embedded_postgres.terminate(unique_application_name) == 1
    with engine.connect() as conn:
        assert _backend_pid(conn) != first
    assert embedded_postgres.backend_count(unique_application_name) == 1


def test_forked_child_gets_its_own_backend_and_the_parent_keeps_its_own(url: str) -> None:
    engine = warm_engine(url)
    with engine.connect() as conn:
        parent_backend = _backend_pid(conn)

    def in_child() -> int:
        with warm_engine(url).connect() as conn:
            return _backend_pid(conn)

    assert in_forked_child(in_child) != parent_backend
    with engine.connect() as conn:
        assert _backend_pid(conn) == parent_backend


def test_two_threads_at_once_get_two_backends(url: str) -> None:
    engine = warm_engine(url)
    barrier = threading.Barrier(2)
    pids: list[int] = []

    def work() -> None:
        with engine.connect() as conn:
            pids.append(_backend_pid(conn))
            barrier.wait(timeout=10)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(pids)) == 2
    assert engine.pool.stats.overflow_connections == 1


def test_failed_invocation_leaves_no_transaction_or_session_state(url: str) -> None:
    engine = warm_engine(url)
    import psycopg

    with pytest.raises(psycopg.errors.DivisionByZero), engine.connect() as conn:
        first = _backend_pid(conn)
        conn.execute("SET application_name = 'leaked'")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        conn.execute("PREPARE leaked AS SELECT 1")
        conn.execute("SELECT pg_advisory_lock(99)")
        conn.execute("SELECT 1 / 0")
    with engine.connect() as conn:
        assert _backend_pid(conn) == first
        row = conn.execute(
            "SELECT current_setting('application_name') <> 'leaked',"
            " (SELECT count(*) FROM pg_prepared_statements),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            "    AND pid = pg_backend_pid()),"
            " to_regclass('pg_temp.scratch') IS NULL,"
            " (SELECT state FROM pg_stat_activity WHERE pid = pg_backend_pid())"
        ).one()
        assert tuple(row) == (True, 0, 0, True, "active")


def test_pre_ping_counted_only_after_idle_threshold(url: str) -> None:
    clock = FakeClock()
    engine = warm_engine(url, pre_ping_idle_seconds=45, clock=clock)
    for _ in range(4):
        with engine.connect():
            clock.advance(30)
    assert engine.pool.stats.pre_pings == 0
    clock.advance(60)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert engine.pool.stats.pre_pings == 1
    assert engine.pool.stats.opened == 1


def test_recycle_at_credentials_expiry_with_an_injected_clock(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pg = embedded_postgres
    clock = FakeClock()

    class ExpiringCredentials:
        """Static password, but each issue is valid for 10 minutes (like a token)."""

        def __init__(self) -> None:
            self.clock = clock
            self.issued = 0

        def get(self) -> Credentials:
            self.issued += 1
            return Credentials(pg.user, pg.password, expires_at=clock() + 600)

        def refresh(self) -> None:
            pass

    provider = ExpiringCredentials()
    url = f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}"
    engine = warm_engine(url, credentials=provider)
    try:
        with engine.connect() as conn:
            first = _backend_pid(conn)
        clock.advance(599)
        with engine.connect() as conn:
            assert _backend_pid(conn) == first
        clock.advance(2)
        with engine.connect() as conn:
            assert _backend_pid(conn) != first
        assert provider.issued == 2
        assert engine.pool.stats.replaced == {"credentials_expired": 1}
        assert pg.wait_for_backend_count(1, unique_application_name) == 1
    finally:
        engine.dispose()


@pytest.fixture
def role(embedded_postgres: PostgresServer) -> str:
    name = f"iam_{uuid.uuid4().hex[:10]}"
    embedded_postgres.create_role(name, uuid.uuid4().hex)
    return name


def test_iam_token_connection_kept_until_expiry_then_replaced_with_a_fresh_token(
    aws: str, embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    from lambda_pool.auth import IAMCredentials

    pg = embedded_postgres
    require_tls(pg)
    issued: list[str] = []

    def client_factory(region: str) -> Any:
        import boto3

        real = boto3.client("rds", region_name=region)

        class Issuing:
            """Each new token becomes the role's password: RDS checking tokens, in-test."""

            def generate_db_auth_token(self, **kwargs: Any) -> str:
                token: str = real.generate_db_auth_token(**kwargs)
                issued.append(token)
                pg.set_password(role, token)
                return token

        return Issuing()

    clock = FakeClock()
    provider = IAMCredentials(
        pg.host, pg.port, role, region=aws, clock=clock, client_factory=client_factory
    )
    url = f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}"
    engine = warm_engine(url, credentials=provider)
    try:
        with engine.connect() as conn:
            first = _backend_pid(conn)
            assert conn.execute(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            ).scalar_one()
        pg.set_password(role, "no-longer-the-token")
        clock.advance(780)  # still inside 900 s minus the 60 s margin
        with engine.connect() as conn:
            assert _backend_pid(conn) == first
        clock.advance(61)
        with engine.connect() as conn:
            assert _backend_pid(conn) != first
            assert conn.execute("SELECT current_user").scalar_one() == role
        assert len(issued) == 2
    finally:
        engine.dispose()


def test_pre_ping_threshold_from_environment(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", "0")
    engine = warm_engine(url)
    for _ in range(3):
        with engine.connect():
            pass
    assert engine.pool.policy.pre_ping_idle_seconds == 0
    assert engine.pool.stats.pre_pings == 2
