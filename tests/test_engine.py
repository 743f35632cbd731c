"""The blocking engine against a real PostgreSQL (and sqlite3): pools, statements, credentials."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lambda_pool import create_engine, event, lifecycle
from lambda_pool.auth import Credentials, StaticCredentials
from lambda_pool.engine import Connection, Engine
from lambda_pool.engine_setup import CREDENTIALS_EXPIRE_KEY
from lambda_pool.exc import InvalidRequestError, ResourceClosedError
from lambda_pool.pool import NullPool, QueuePool, SingletonThreadPool, StaticPool
from lambda_pool.result import MultipleResultsFound, NoResultFound
from lambda_pool.testing.postgres import PostgresServer


@pytest.fixture
def app_url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return f"{embedded_postgres.dsn}?application_name={unique_application_name}"


# --------------------------------------------------------------------------- pool choice


def test_default_pool_is_nullpool_and_close_ends_the_backend(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(app_url)
    assert type(engine.pool) is NullPool
    with engine.connect() as conn:
        conn.execute("SELECT 1")
        assert embedded_postgres.backend_count(unique_application_name) == 1
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_sizing_keywords_select_queuepool_which_keeps_connections(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    for kwargs in ({"pool_size": 2}, {"max_overflow": 1}, {"pool_timeout": 5}):
        engine = create_engine(app_url, **kwargs)
        assert type(engine.pool) is QueuePool
        with engine.connect() as conn:
            conn.execute("SELECT 1")
        assert engine.pool.checkedin() == 1
        assert embedded_postgres.backend_count(unique_application_name) == 1
        engine.dispose()
        assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_explicit_poolclass_wins_over_the_rules(app_url: str, tmp_path: Path) -> None:
    assert type(create_engine(app_url, poolclass=StaticPool).pool) is StaticPool
    assert type(create_engine("sqlite://", poolclass=NullPool).pool) is NullPool
    assert type(create_engine(f"sqlite:///{tmp_path}/f.db").pool) is NullPool


def test_in_memory_sqlite_defaults_to_singletonthreadpool_so_data_survives() -> None:
    engine = create_engine("sqlite:///:memory:")
    assert type(engine.pool) is SingletonThreadPool
    with engine.connect() as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
        conn.execute("INSERT INTO t VALUES (%s)", (7,))
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute("SELECT a FROM t").all() == [(7,)]


def test_in_memory_sqlite_with_nullpool_gives_an_empty_database_each_time() -> None:
    engine = create_engine("sqlite://", poolclass=NullPool)
    with engine.connect() as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
        conn.commit()
    with engine.connect() as conn:
        assert conn.execute("SELECT name FROM sqlite_master").all() == []


def test_sqlite_connections_can_be_shared_across_threads_through_staticpool() -> None:
    engine = create_engine("sqlite://", poolclass=StaticPool)
    with engine.connect() as conn:
        conn.execute("CREATE TABLE t (a INTEGER)")
        conn.commit()
    seen: list[Any] = []

    def work() -> None:
        with engine.connect() as conn:
            seen.append(conn.execute("SELECT count(*) FROM t").scalar())

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen == [0]


def test_pool_keywords_reach_the_pool(app_url: str) -> None:
    engine = create_engine(
        app_url, pool_size=3, max_overflow=4, pool_timeout=1.5, pool_recycle=60, pool_use_lifo=True
    )
    assert engine.pool.size() == 3
    assert engine.pool.timeout() == 1.5
    assert "size 3 overflow 4" in engine.pool._timeout_message()  # type: ignore[attr-defined]


def test_a_ready_pool_is_used_as_is(app_url: str) -> None:
    pool = QueuePool(lambda: psycopg.connect(app_url), pool_size=1)
    engine = create_engine("postgresql://", pool=pool)
    assert engine.pool is pool
    with engine.connect() as conn:
        assert conn.execute("SELECT 41 + 1").scalar() == 42
    engine.dispose()


def test_creator_is_called_for_each_new_connection(app_url: str) -> None:
    calls: list[int] = []

    def creator() -> psycopg.Connection[Any]:
        calls.append(1)
        return psycopg.connect(app_url)

    engine = create_engine("postgresql://", creator=creator)
    for _ in range(2):
        with engine.connect() as conn:
            conn.execute("SELECT 1")
    assert len(calls) == 2


def test_connect_args_override_the_url(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(embedded_postgres.dsn, connect_args={"application_name": "x"})
    engine2 = create_engine(
        embedded_postgres.dsn + "?application_name=x",
        connect_args={"application_name": unique_application_name},
    )
    with engine2.connect() as conn:
        assert conn.execute("SHOW application_name").scalar() == unique_application_name
    with engine.connect() as conn:
        assert conn.execute("SHOW application_name").scalar() == "x"


# --------------------------------------------------------------------------- statements


def test_execute_returns_rows_as_tuples_with_keys_and_rowcount(app_url: str) -> None:
    engine = create_engine(app_url)
    with engine.connect() as conn:
        result = conn.execute(
            "SELECT g AS n, g * %(k)s AS twice FROM generate_series(1, 3) g", {"k": 2}
        )
        assert result.keys() == ["n", "twice"]
        assert result.rowcount == 3
        assert result.fetchone() == (1, 2)
        assert result.fetchmany(1) == [(2, 4)]
        assert list(result) == [(3, 6)]
        assert result.fetchone() is None
        assert conn.execute("SELECT %s::text", ("a%b",)).scalar_one() == "a%b"
        assert conn.execute("SELECT 1 WHERE false").first() is None
        assert conn.execute("SELECT 5").one() == (5,)
        with pytest.raises(NoResultFound):
            conn.execute("SELECT 1 WHERE false").scalar_one()
        with pytest.raises(MultipleResultsFound):
            conn.execute("SELECT generate_series(1, 2)").one()


def test_statements_without_rows_report_rowcount_and_refuse_fetch(app_url: str) -> None:
    engine = create_engine(app_url)
    with engine.connect() as conn:
        conn.execute("CREATE TEMP TABLE t (a int)")
        result = conn.execute("INSERT INTO t VALUES (1), (2), (3)")
        assert result.rowcount == 3
        assert not result.returns_rows
        with pytest.raises(ResourceClosedError, match="does not return rows"):
            result.fetchall()


def test_commit_persists_and_close_rolls_back_uncommitted_work(app_url: str) -> None:
    engine = create_engine(app_url)
    with engine.begin() as conn:
        conn.execute("DROP TABLE IF EXISTS engine_commit_test")
        conn.execute("CREATE TABLE engine_commit_test (a int)")
    with engine.connect() as conn:
        conn.execute("INSERT INTO engine_commit_test VALUES (1)")
        conn.commit()
        conn.execute("INSERT INTO engine_commit_test VALUES (2)")  # never committed
    with engine.connect() as conn:
        assert conn.execute("SELECT a FROM engine_commit_test").all() == [(1,)]
        with pytest.raises(RuntimeError), conn.begin():
            conn.execute("INSERT INTO engine_commit_test VALUES (3)")
            raise RuntimeError("boom")
        with conn.begin():
            conn.execute("INSERT INTO engine_commit_test VALUES (4)")
        conn.execute("DROP TABLE engine_commit_test")
        conn.rollback()
    with engine.begin() as conn:
        assert conn.execute("SELECT a FROM engine_commit_test ORDER BY a").all() == [(1,), (4,)]
        conn.execute("DROP TABLE engine_commit_test")


def test_engine_begin_rolls_back_on_error(app_url: str) -> None:
    engine = create_engine(app_url)
    with pytest.raises(ZeroDivisionError), engine.begin() as conn:
        conn.execute("CREATE TABLE engine_begin_rollback (a int)")
        _ = 1 / 0
    with engine.connect() as conn:
        assert conn.execute("SELECT to_regclass('engine_begin_rollback')").scalar() is None


def test_connection_attributes_and_closed_state(app_url: str) -> None:
    engine = create_engine(app_url)
    conn = engine.connect()
    assert isinstance(conn, Connection)
    assert isinstance(conn.driver_connection, psycopg.Connection)
    assert conn.connection.dbapi_connection is conn.driver_connection
    conn.info["k"] = "v"
    assert conn.info["k"] == "v"
    assert not conn.closed
    conn.close()
    conn.close()  # a second close does nothing
    assert conn.closed
    with pytest.raises(ResourceClosedError):
        conn.execute("SELECT 1")


def test_raw_connection_is_the_pool_proxy(app_url: str) -> None:
    engine = create_engine(app_url, pool_size=1)
    raw = engine.raw_connection()
    with raw.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)
    assert engine.pool.checkedout() == 1
    raw.close()
    assert engine.pool.checkedout() == 0
    engine.dispose()


def test_echo_logs_statements_without_parameters(
    app_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_engine(app_url, echo=True, logging_name="echo_test")
    with caplog.at_level("INFO", logger="lambda_pool.engine"), engine.connect() as conn:
        conn.execute("SELECT %s::text", ("secret-value",))
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("lambda_pool.engine")]
    assert "SELECT %s::text" in messages
    assert not any("secret-value" in m for m in messages)


# --------------------------------------------------------------------------- disconnects


def test_disconnect_during_execute_invalidates_and_the_pool_drops_it(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(app_url, pool_size=1)
    invalidated: list[Any] = []
    event.listen(engine, "invalidate", lambda dbapi, rec, exc: invalidated.append(exc))
    conn = engine.connect()
    conn.execute("SELECT 1")
    embedded_postgres.terminate(unique_application_name)
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    assert conn.invalidated
    assert len(invalidated) == 1
    assert engine.pool.checkedout() == 0
    with pytest.raises(InvalidRequestError, match="invalidated"):
        conn.execute("SELECT 1")
    conn.rollback()  # lets it continue on a new connection
    assert conn.execute("SELECT 2").scalar() == 2
    conn.close()
    with engine.connect() as fresh:
        assert fresh.execute("SELECT 3").scalar() == 3
    engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_explicit_invalidate_closes_the_backend(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(app_url, pool_size=1)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
        conn.invalidate()
        assert conn.invalidated
        assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    assert engine.pool.checkedin() == 1  # the slot is back, without a connection


def test_pre_ping_replaces_a_terminated_connection_silently(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(app_url, pool_size=1, pool_pre_ping=True)
    with engine.connect() as conn:
        first = conn.execute("SELECT pg_backend_pid()").scalar()
    idle = psycopg.pq.TransactionStatus.IDLE
    with engine.connect() as conn:
        # This checkout pinged the kept connection; the ping left no transaction open.
        assert conn.driver_connection.info.transaction_status == idle
    embedded_postgres.terminate(unique_application_name)
    with engine.connect() as conn:
        second = conn.execute("SELECT pg_backend_pid()").scalar()
    assert first != second
    engine.dispose()


# --------------------------------------------------------------------------- dispose


def test_dispose_closes_idle_connections_and_keeps_engine_listeners(
    embedded_postgres: PostgresServer, app_url: str, unique_application_name: str
) -> None:
    engine = create_engine(app_url, pool_size=2)
    connects: list[Any] = []
    event.listen(engine, "connect", lambda dbapi, rec: connects.append(dbapi))
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    old_pool = engine.pool
    engine.dispose()
    assert engine.pool is not old_pool
    assert type(engine.pool) is QueuePool and engine.pool.size() == 2
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    with engine.connect() as conn:
        conn.execute("SELECT 1")
    assert len(connects) == 2
    engine.dispose()


def test_engine_registers_with_lifecycle_and_repr_masks_password(app_url: str) -> None:
    engine = create_engine(app_url)
    assert engine in lifecycle.registered_engines()
    assert repr(engine).startswith("Engine(postgresql://lambda_pool:***@127.0.0.1:")
    assert "***" in repr(engine)
    assert isinstance(engine, Engine)


# --------------------------------------------------------------------------- credentials


class _RotatingProvider:
    """A provider whose cached password is stale until ``refresh()`` re-reads it."""

    def __init__(self, user: str, stale: str, current: str, clock: Callable[[], float]) -> None:
        self.user, self.stale, self.current = user, stale, current
        self.clock = clock
        self.cached: str | None = stale
        self.gets = 0
        self.refreshes = 0
        self.expires_in: float | None = None

    def get(self) -> Credentials:
        self.gets += 1
        password = self.cached if self.cached is not None else self.current
        self.cached = password
        expires = None if self.expires_in is None else self.clock() + self.expires_in
        return Credentials(self.user, password, expires, {})

    def refresh(self) -> None:
        self.refreshes += 1
        self.cached = None


@pytest.fixture
def role(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    name = "lp_engine_" + unique_application_name[-12:]
    embedded_postgres.create_role(name, "right-password")
    return name


def test_credentials_retry_once_after_refresh_on_auth_failure(
    embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    provider = _RotatingProvider(role, "old-password", "right-password", clock=lambda: 0.0)
    url = embedded_postgres.dsn_for("nobody", "", application_name=unique_application_name)
    engine = create_engine(url, credentials=provider)
    with engine.connect() as conn:
        assert conn.execute("SELECT current_user").scalar() == role
    assert provider.refreshes == 1
    assert provider.gets == 2


def test_credentials_failing_twice_raise_the_auth_error(
    embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    provider = StaticCredentials(role, "wrong-password")
    url = embedded_postgres.dsn_for("nobody", "", application_name=unique_application_name)
    engine = create_engine(url, credentials=provider)
    with pytest.raises(psycopg.OperationalError, match="authentication failed"):
        engine.connect()
    assert embedded_postgres.backend_count(unique_application_name) == 0


def test_connection_is_retired_at_checkout_once_its_credentials_expired(
    embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    now = [1000.0]
    provider = _RotatingProvider(role, "right-password", "right-password", clock=lambda: now[0])
    provider.expires_in = 60
    url = embedded_postgres.dsn_for("nobody", "", application_name=unique_application_name)
    engine = create_engine(url, credentials=provider, pool_size=1)
    with engine.connect() as conn:
        first = conn.execute("SELECT pg_backend_pid()").scalar()
        assert conn.connection.info[CREDENTIALS_EXPIRE_KEY] == 1060.0
    now[0] = 1030.0
    with engine.connect() as conn:
        assert conn.execute("SELECT pg_backend_pid()").scalar() == first
    now[0] = 1061.0
    with engine.connect() as conn:
        second = conn.execute("SELECT pg_backend_pid()").scalar()
        assert conn.connection.info[CREDENTIALS_EXPIRE_KEY] == 1121.0
    assert second != first
    assert embedded_postgres.backend_count(unique_application_name) == 1
    engine.dispose()


def test_expiry_recycling_can_be_turned_off(
    embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    now = [1000.0]
    provider = _RotatingProvider(role, "right-password", "right-password", clock=lambda: now[0])
    provider.expires_in = 60
    url = embedded_postgres.dsn_for("nobody", "", application_name=unique_application_name)
    engine = create_engine(
        url, credentials=provider, pool_size=1, recycle_on_credentials_expiry=False
    )
    with engine.connect() as conn:
        first = conn.execute("SELECT pg_backend_pid()").scalar()
    now[0] = 5000.0
    with engine.connect() as conn:
        assert conn.execute("SELECT pg_backend_pid()").scalar() == first
    engine.dispose()


def test_provider_connect_args_raise_sslmode_but_never_lower_it(app_url: str) -> None:
    from lambda_pool.dialects.psycopg import PsycopgDialect

    dialect = PsycopgDialect()
    required = {"sslmode": "require"}
    assert dialect.apply_credentials({}, "u", "p", required)["sslmode"] == "require"
    assert dialect.apply_credentials({"sslmode": "disable"}, "u", "p", required)["sslmode"] == (
        "require"
    )
    assert (
        dialect.apply_credentials({"sslmode": "verify-full"}, "u", "p", required)["sslmode"]
        == "verify-full"
    )


def test_iam_style_provider_forces_tls_on_the_wire(
    embedded_postgres: PostgresServer, role: str, unique_application_name: str
) -> None:
    if not embedded_postgres.ssl_enabled:
        pytest.skip("the test server has no TLS (PostgreSQL built without OpenSSL)")
    provider = StaticCredentials(role, "right-password", connect_args={"sslmode": "require"})
    url = embedded_postgres.dsn_for(
        "nobody", "", application_name=unique_application_name, sslmode="disable"
    )
    engine = create_engine(url, credentials=provider)
    with engine.connect() as conn:
        conn.execute("SELECT 1")
        (backend,) = embedded_postgres.backends(unique_application_name)
        assert backend["ssl"] is True
