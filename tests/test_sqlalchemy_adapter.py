"""The SQLAlchemy adapter against the real embedded PostgreSQL: a genuine SQLAlchemy
``Engine`` with lambda-pool's pool choice, warm-container reuse rules, session reset,
credentials (RDS IAM tokens under moto) and registration for shutdown."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import text  # noqa: E402
from sqlalchemy.pool import NullPool, QueuePool, StaticPool  # noqa: E402
from support import FakeClock, in_forked_child, require_tls  # noqa: E402

from lambda_pool import lifecycle  # noqa: E402
from lambda_pool.exc import ArgumentError  # noqa: E402
from lambda_pool.sqlalchemy import (  # noqa: E402
    WarmSQLAlchemyPool,
    create_engine,
    forget_cached_engines,
    warm_engine,
)
from lambda_pool.testing.postgres import PostgresServer  # noqa: E402

REGION = "us-east-1"


def _url(pg: PostgresServer, app: str) -> str:
    return pg.dsn_for(pg.user, pg.password, application_name=app)


@pytest.fixture
def make_engine(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> Iterator[Callable[..., Any]]:
    engines: list[Any] = []

    def make(**kwargs: Any) -> Any:
        engine = create_engine(_url(embedded_postgres, unique_application_name), **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.dispose()


def _backend_pid(conn: Any) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


# -- pool choice ------------------------------------------------------------------------


def test_default_pool_is_nullpool_and_closes_each_connection(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine()
    assert isinstance(engine.pool, NullPool)
    assert engine.url.drivername == "postgresql+psycopg"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
        assert embedded_postgres.backend_count(unique_application_name) == 1
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_sizing_arguments_select_queuepool_and_poolclass_wins(
    make_engine: Callable[..., Any],
) -> None:
    assert isinstance(make_engine(pool_size=2).pool, QueuePool)
    assert isinstance(make_engine(poolclass=StaticPool).pool, StaticPool)
    assert isinstance(make_engine(warm=True).pool, WarmSQLAlchemyPool)


def test_warm_with_poolclass_is_an_argument_error(embedded_postgres: PostgresServer) -> None:
    with pytest.raises(ArgumentError, match="poolclass"):
        create_engine(embedded_postgres.dsn, warm=True, poolclass=QueuePool)


def test_the_shutdown_hook_closes_the_engines_connections_and_keeps_it_usable(
    make_engine: Callable[..., Any],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    warm, pooled = make_engine(warm=True), make_engine(pool_size=2)
    for engine in (warm, pooled):
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    assert embedded_postgres.backend_count(unique_application_name) == 2

    assert lifecycle.dispose_all() == 0

    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    with warm.connect() as conn:
        assert conn.exec_driver_sql("SELECT 1").scalar() == 1


# -- warm reuse ---------------------------------------------------------------------------


def test_hundred_warm_checkouts_use_one_backend(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine(warm=True)
    pids = set()
    for _ in range(100):
        with engine.connect() as conn:
            pids.add(_backend_pid(conn))
    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    stats = engine.pool.stats.as_dict()
    assert stats["opened"] == 1
    assert stats["reused"] == 99


def test_terminated_backend_is_replaced_without_error(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine(warm=True)
    with engine.connect() as conn:
        first = _backend_pid(conn)
    assert embedded_postgres.terminate(unique_application_name) == 1
    with engine.connect() as conn:
        second = _backend_pid(conn)
    assert second != first
    assert embedded_postgres.backend_count(unique_application_name) == 1
    # The driver noticed nothing yet (no I/O since the kill), so it is the idle-time
    # pre-ping or the closed flag that caught it; either way it was replaced once.
    assert sum(engine.pool.stats.replaced.values()) == 1


def test_two_threads_at_once_get_two_backends(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine(warm=True)
    barrier = threading.Barrier(2)
    pids: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with engine.connect() as conn:
                pids.append(_backend_pid(conn))
                barrier.wait(timeout=10)  # both hold a connection at the same moment
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(pids)) == 2
    assert engine.pool.stats.overflow_connections == 1
    # The separate connection was closed on return; the warm one stays.
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1


def test_forked_child_never_uses_the_parents_connection(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine(warm=True)
    with engine.connect() as conn:
        parent_pid = _backend_pid(conn)

    def in_child() -> int:
        with engine.connect() as conn:
            pid = _backend_pid(conn)
        engine.dispose()
        return pid

    assert in_forked_child(in_child) != parent_pid
    # The parent's session survived the child replacing (and closing) its copy.
    with engine.connect() as conn:
        assert _backend_pid(conn) == parent_pid


def test_exception_mid_transaction_leaves_no_state_for_the_next_checkout(
    make_engine: Callable[..., Any],
) -> None:
    engine = make_engine(warm=True)
    with pytest.raises(RuntimeError), engine.connect() as conn:
        first = _backend_pid(conn)
        conn.execute(text("SET statement_timeout = 1234"))
        conn.execute(text("CREATE TEMP TABLE scratch (x int)"))
        conn.execute(text("PREPARE leaked AS SELECT 1"))
        conn.execute(text("SELECT pg_advisory_lock(4242)"))
        conn.execute(text("SELECT 1"))
        raise RuntimeError("handler failed mid-transaction")
    with engine.connect() as conn:
        assert _backend_pid(conn) == first  # same session, cleaned
        row = conn.execute(
            text(
                "SELECT current_setting('statement_timeout'),"
                " (SELECT count(*) FROM pg_prepared_statements),"
                " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
                "    AND pid = pg_backend_pid()),"
                " to_regclass('pg_temp.scratch') IS NULL"
            )
        ).one()
        assert tuple(row) == ("0", 0, 0, True)


def test_session_state_committed_before_return_is_discarded_too(
    make_engine: Callable[..., Any],
) -> None:
    engine = make_engine(warm=True)
    with engine.begin() as conn:
        conn.execute(text("SET search_path = pg_catalog"))
        conn.execute(text("CREATE TEMP TABLE kept_until_discard (x int)"))
    with engine.connect() as conn:
        assert conn.execute(text("SHOW search_path")).scalar_one() != "pg_catalog"
        assert (
            conn.execute(text("SELECT to_regclass('pg_temp.kept_until_discard')")).scalar() is None
        )


def test_repeated_statements_across_invocations_do_not_hit_stale_prepared_statements(
    make_engine: Callable[..., Any],
) -> None:
    # psycopg would auto-prepare a statement run 5+ times; DISCARD ALL drops it on the
    # server at each return.  Twenty invocations of ten runs each must all succeed.
    engine = make_engine(warm=True)
    for invocation in range(20):
        with engine.connect() as conn:
            for i in range(10):
                value = conn.execute(text("SELECT :v + 1"), {"v": i}).scalar_one()
                assert value == i + 1, invocation


def test_pre_ping_only_after_the_idle_threshold(make_engine: Callable[..., Any]) -> None:
    clock = FakeClock()
    engine = make_engine(warm=True, pre_ping_idle_seconds=30, clock=clock)
    with engine.connect():
        pass
    for _ in range(5):
        clock.advance(10)  # back-to-back invocations
        with engine.connect():
            pass
    assert engine.pool.stats.pre_pings == 0
    clock.advance(31)  # frozen longer than the threshold
    with engine.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    assert engine.pool.stats.pre_pings == 1
    assert engine.pool.stats.pre_ping_failures == 0
    assert engine.pool.stats.opened == 1


def test_pre_ping_threshold_comes_from_the_environment(
    make_engine: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", "0")
    engine = make_engine(warm=True)
    for _ in range(3):
        with engine.connect():
            pass
    assert engine.pool.stats.pre_pings == 2  # every checkout but the first


def test_pool_recycle_replaces_at_checkout(make_engine: Callable[..., Any]) -> None:
    clock = FakeClock()
    engine = make_engine(warm=True, pool_recycle=300, clock=clock)
    with engine.connect() as conn:
        first = _backend_pid(conn)
    clock.advance(301)
    with engine.connect() as conn:
        assert _backend_pid(conn) != first
    assert engine.pool.stats.replaced == {"recycle": 1}


def test_warm_engine_is_cached_per_identity(embedded_postgres: PostgresServer) -> None:
    app = f"lpt_cache_{uuid.uuid4().hex[:8]}"
    url = _url(embedded_postgres, app)
    first = warm_engine(url)
    try:
        assert warm_engine(url) is first
        assert warm_engine(url, echo_pool=True) is not first
        with first.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
    finally:
        # Forget the cache too: the echoing engine would otherwise log at session end.
        for engine in forget_cached_engines():
            engine.dispose()


# -- credentials: RDS IAM tokens ------------------------------------------------------------


@pytest.fixture
def iam_role(embedded_postgres: PostgresServer) -> Iterator[str]:
    role = f"iam_{uuid.uuid4().hex[:10]}"
    embedded_postgres.create_role(role, uuid.uuid4().hex)
    yield role


class TokenIssuingFactory:
    """Real boto3 rds clients (under moto) whose every newly signed token becomes the role's
    password on the server: the test's stand-in for RDS checking IAM tokens at connect."""

    def __init__(self, pg: PostgresServer, role: str) -> None:
        self.pg = pg
        self.role = role
        self.issued: list[str] = []

    def __call__(self, region: str) -> Any:
        import boto3

        return _IssuingClient(boto3.client("rds", region_name=region), self)


class _IssuingClient:
    def __init__(self, client: Any, factory: TokenIssuingFactory) -> None:
        self._client = client
        self._factory = factory

    def generate_db_auth_token(self, **kwargs: Any) -> str:
        token: str = self._client.generate_db_auth_token(**kwargs)
        self._factory.issued.append(token)
        self._factory.pg.set_password(self._factory.role, token)
        return token


def test_iam_tokens_recycle_at_expiry_through_a_real_sqlalchemy_engine(
    aws: str, embedded_postgres: PostgresServer, iam_role: str, unique_application_name: str
) -> None:
    from lambda_pool.auth import IAMCredentials

    pg = embedded_postgres
    require_tls(pg)
    clock = FakeClock()
    factory = TokenIssuingFactory(pg, iam_role)
    provider = IAMCredentials(
        pg.host, pg.port, iam_role, region=aws, clock=clock, client_factory=factory
    )
    # No password in the URL: the provider supplies user and token (and sslmode=require).
    url = f"postgresql://{iam_role}@{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}"
    engine = create_engine(url, warm=True, credentials=provider)
    try:
        with engine.connect() as conn:
            first = _backend_pid(conn)
            row = conn.execute(
                text("SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            ).one()
            assert tuple(row) == (iam_role, True)
        assert len(factory.issued) == 1

        # A new token is issued (e.g. by another connection) while ours is still valid:
        # the server now only accepts the new one, yet the open session keeps working.
        pg.set_password(iam_role, "rotated-" + uuid.uuid4().hex)
        clock.advance(600)  # 10 of the token's 15 minutes (minus margin) gone
        with engine.connect() as conn:
            assert _backend_pid(conn) == first
        assert len(factory.issued) == 1

        clock.advance(300)  # past expiry minus the 60 s margin: retired at checkout
        with engine.connect() as conn:
            second = _backend_pid(conn)
        assert second != first
        assert len(factory.issued) == 2  # the new connection used a freshly signed token
        assert engine.pool.stats.replaced == {"credentials_expired": 1}
        assert pg.wait_for_backend_count(1, unique_application_name) == 1
    finally:
        engine.dispose()


def test_auth_failure_is_retried_once_after_refresh(
    embedded_postgres: PostgresServer, iam_role: str, unique_application_name: str
) -> None:
    from lambda_pool.auth import Credentials

    pg = embedded_postgres
    pg.set_password(iam_role, "current-secret")

    class RotatingProvider:
        """Serves a stale password until refreshed (a Secrets Manager rotation)."""

        def __init__(self) -> None:
            self.clock = time.time
            self.password = "stale-secret"
            self.refreshes = 0

        def get(self) -> Credentials:
            return Credentials(iam_role, self.password)

        def refresh(self) -> None:
            self.refreshes += 1
            self.password = "current-secret"

    provider = RotatingProvider()
    url = f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}"
    engine = create_engine(url, credentials=provider)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT current_user")).scalar_one() == iam_role
        assert provider.refreshes == 1
    finally:
        engine.dispose()


def test_queuepool_connections_are_retired_when_credentials_expire(
    embedded_postgres: PostgresServer, iam_role: str, unique_application_name: str
) -> None:
    from lambda_pool.auth import Credentials

    pg = embedded_postgres
    pg.set_password(iam_role, "pw")
    clock = FakeClock()

    class ExpiringProvider:
        def __init__(self) -> None:
            self.clock = clock
            self.issued = 0

        def get(self) -> Credentials:
            self.issued += 1
            return Credentials(iam_role, "pw", expires_at=clock() + 100)

        def refresh(self) -> None:
            pass

    provider = ExpiringProvider()
    url = f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}"
    engine = create_engine(url, credentials=provider, pool_size=1)
    try:
        with engine.connect() as conn:
            first = _backend_pid(conn)
        with engine.connect() as conn:
            assert _backend_pid(conn) == first
        clock.advance(101)
        with engine.connect() as conn:
            assert _backend_pid(conn) != first
        assert provider.issued == 2
    finally:
        engine.dispose()


def test_dispose_while_checked_out_closes_the_connection_on_return(
    make_engine: Callable[..., Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    engine = make_engine(warm=True)
    conn = engine.connect()
    first = _backend_pid(conn)
    engine.dispose()  # e.g. the SIGTERM hook running while an invocation holds it
    conn.close()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    with engine.connect() as again:
        assert _backend_pid(again) != first


def test_separate_connections_are_counted_apart_from_warm_ones(
    make_engine: Callable[..., Any],
) -> None:
    engine = make_engine(warm=True)
    with engine.connect() as first, engine.connect() as second:
        assert _backend_pid(first) != _backend_pid(second)
        assert engine.pool.checkedout() == 2
        assert engine.pool.overflow() == 1
    stats = engine.pool.stats.as_dict()
    assert (stats["opened"], stats["overflow_connections"]) == (1, 1)
    assert (engine.pool.checkedin(), engine.pool.checkedout()) == (1, 0)
