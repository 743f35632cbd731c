"""``@with_connection()`` against a real PostgreSQL: reuse, recovery, transactions, deadlines."""

from __future__ import annotations

import re
import signal
import traceback
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import exc, lifecycle, with_connection
from lambda_pool.auth import StaticCredentials
from lambda_pool.engine import Connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer

MakeContext = Callable[..., LambdaContext]


@pytest.fixture
def app_url(
    embedded_postgres: PostgresServer, unique_application_name: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    """The app URL, tagged with this test's application_name, as LAMBDA_POOL_DATABASE_URL."""
    url = embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    )
    for name in (
        "LAMBDA_POOL_AUTH",
        "LAMBDA_POOL_SECRET_ARN",
        "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS",
        "LAMBDA_POOL_TRANSACTION_POOLING",
        "LAMBDA_POOL_REGISTER_EXTENSION",
        "LAMBDA_POOL_PRE_PING_IDLE_SECONDS",
        "LAMBDA_POOL_WARM",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", url)
    return url


@pytest.fixture
def table(embedded_postgres: PostgresServer) -> Iterator[str]:
    """A fresh table ``(id int, note text)`` owned by the application user."""
    name = f"handler_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(embedded_postgres.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, note text)")
    yield name
    with psycopg.connect(embedded_postgres.dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {name}")


def count_rows(server: PostgresServer, table: str) -> int:
    with psycopg.connect(server.dsn) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def test_hundred_warm_invocations_share_one_backend(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> dict[str, Any]:
        row = connection.execute("SELECT pg_backend_pid(), %s::int", (event["n"],)).fetchone()
        assert row is not None
        return {"pid": row[0], "n": row[1]}

    pids = {handler({"n": n}, lambda_context())["pid"] for n in range(100)}

    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert [b["pid"] for b in embedded_postgres.backends(unique_application_name)] == list(pids)


def test_lambda_pool_warm_0_gives_a_connection_per_invocation_closed_after_each(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_WARM", "0")

    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    pids = {handler({}, lambda_context()) for _ in range(3)}

    assert len(pids) == 3
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_handler_receives_connection_as_keyword_in_a_transaction(
    app_url: str, lambda_context: MakeContext
) -> None:
    seen: dict[str, Any] = {}

    @with_connection()
    def handler(event: Any, context: Any, **kwargs: Any) -> str:
        connection = kwargs["connection"]
        seen["type"] = type(connection)
        row = connection.execute("SELECT now() = statement_timestamp()").fetchone()
        connection.execute("SELECT pg_sleep(0.01)")
        row2 = connection.execute("SELECT now() = statement_timestamp()").fetchone()
        return f"{row[0]} {row2[0]}"

    # now() is the transaction's start: a later statement's time differs from it only
    # when both statements run in one transaction.  (The first statement travels in
    # BEGIN's message, so its own time is the transaction's start.)
    assert handler({}, lambda_context()) == "True False"
    assert issubclass(seen["type"], Connection)


def test_new_backend_after_the_warm_one_is_terminated_between_invocations(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> int:
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        return int(row[0])

    first = handler({}, lambda_context())
    assert embedded_postgres.terminate(unique_application_name) == 1

    second = handler({}, lambda_context())

    assert second != first
    backends = embedded_postgres.backends(unique_application_name)
    assert [b["pid"] for b in backends] == [second]


def test_connection_broken_mid_invocation_is_replaced_next_time(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> int:
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        if event.get("kill"):
            embedded_postgres.terminate(unique_application_name)
            connection.execute("SELECT 1")
        return int(row[0])

    first = handler({}, lambda_context())
    with pytest.raises(psycopg.OperationalError):
        handler({"kill": True}, lambda_context())

    second = handler({}, lambda_context())
    assert second != first
    assert embedded_postgres.backend_count(unique_application_name) == 1


class HandlerFailure(Exception):
    pass


def test_exception_reaches_caller_unchanged_and_nothing_leaks_to_next_invocation(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    table: str,
    lambda_context: MakeContext,
) -> None:
    raised: list[BaseException] = []

    @with_connection()
    def failing(event: Any, context: Any, connection: Connection) -> None:
        connection.execute(f"INSERT INTO {table} VALUES (1, 'never committed')")
        connection.execute("SET work_mem = '7777kB'")
        connection.execute("SET SESSION statement_timeout = 123456")
        connection.execute("CREATE TEMP TABLE leftover (x int)")
        error = HandlerFailure("boom")
        raised.append(error)
        raise error

    @with_connection(statement_timeout=None)
    def inspect_session(event: Any, context: Any, connection: Connection) -> tuple[Any, ...]:
        row = connection.execute(
            "SELECT pg_backend_pid(), current_setting('work_mem'), "
            "current_setting('statement_timeout'), to_regclass('pg_temp.leftover') IS NULL"
        ).fetchone()
        assert row is not None
        return tuple(row)

    pid_before = inspect_session({}, lambda_context())[0]
    with pytest.raises(HandlerFailure) as caught:
        failing({}, lambda_context())

    assert caught.value is raised[0]
    assert caught.value.__context__ is None and caught.value.__cause__ is None
    frames = [frame.name for frame in traceback.extract_tb(caught.value.__traceback__)]
    assert frames[-1] == "failing"
    assert count_rows(embedded_postgres, table) == 0
    (backend,) = embedded_postgres.backends(unique_application_name)
    assert backend["state"] == "idle" and backend["xact_start"] is None

    pid, work_mem, statement_timeout, temp_gone = inspect_session({}, lambda_context())
    assert pid == pid_before  # the same session, reset — not a new one
    assert work_mem == "4MB"
    assert statement_timeout == "0"
    assert temp_gone is True


def test_success_commits_rows_visible_from_another_connection(
    app_url: str, embedded_postgres: PostgresServer, table: str, lambda_context: MakeContext
) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> str:
        connection.execute(f"INSERT INTO {table} VALUES (%s, %s)", (event["id"], "hello"))
        return "ok"

    assert handler({"id": 1}, lambda_context()) == "ok"
    assert handler({"id": 2}, lambda_context()) == "ok"

    with psycopg.connect(embedded_postgres.dsn) as other:
        rows = other.execute(f"SELECT id, note FROM {table} ORDER BY id").fetchall()
    assert rows == [(1, "hello"), (2, "hello")]


def test_slow_query_is_stopped_by_the_invocation_deadline(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection(timeout_margin_ms=500)
    def handler(event: Any, context: Any, connection: Connection) -> None:
        connection.execute("SELECT pg_sleep(5)")

    with pytest.raises(exc.StatementTimeoutError) as caught:
        handler({}, lambda_context(remaining_ms=1500))

    message = str(caught.value)
    found = re.search(r"remaining time of (\d+) ms minus the margin of 500 ms", message)
    assert found is not None, message
    assert 1000 < int(found.group(1)) <= 1500
    assert "raise the function's timeout" in message
    assert getattr(caught.value.__cause__, "sqlstate", None) == "57014"
    backends = embedded_postgres.backends(unique_application_name)
    assert len(backends) == 1
    assert backends[0]["state"] == "idle" and backends[0]["xact_start"] is None
    with embedded_postgres.admin_connect() as admin:
        running = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' "
            "AND query LIKE '%%pg_sleep(5)%%' AND pid <> pg_backend_pid()"
        ).fetchone()
    assert running == (0,)


def test_deadline_applies_again_after_the_handler_commits(
    app_url: str, embedded_postgres: PostgresServer, table: str, lambda_context: MakeContext
) -> None:
    @with_connection(timeout_margin_ms=500)
    def handler(event: Any, context: Any, connection: Connection) -> None:
        connection.execute(f"INSERT INTO {table} VALUES (1, 'first transaction')")
        connection.commit()
        connection.execute("SELECT pg_sleep(5)")

    with pytest.raises(exc.StatementTimeoutError):
        handler({}, lambda_context(remaining_ms=1500))
    assert count_rows(embedded_postgres, table) == 1  # the committed part stays


def test_no_time_left_fails_fast_without_touching_the_database(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    called = []

    @with_connection(timeout_margin_ms=500)
    def handler(event: Any, context: Any, connection: Connection) -> None:
        called.append(True)

    with pytest.raises(exc.StatementTimeoutError, match="has 300 ms left"):
        handler({}, lambda_context(remaining_ms=300))
    assert called == []
    assert embedded_postgres.backend_count(unique_application_name) == 0


def test_deadline_timeout_is_transaction_local(app_url: str, lambda_context: MakeContext) -> None:
    @with_connection()
    def inside(event: Any, context: Any, connection: Connection) -> tuple[Any, ...]:
        row = connection.execute(
            "SELECT pg_backend_pid(), current_setting('statement_timeout')"
        ).fetchone()
        connection.commit()
        # A transaction opened by the driver directly, outside our execute(): nothing set.
        raw = connection.driver_connection.execute("SHOW statement_timeout").fetchone()
        assert row is not None and raw is not None
        return (row[0], row[1], raw[0])

    _pid, during, after_commit = inside({}, lambda_context(remaining_ms=10_000))
    assert during.endswith("ms") and 8_000 < int(during[:-2]) <= 9_500
    assert after_commit == "0"


def test_margin_and_fixed_timeout_settings(
    app_url: str, monkeypatch: pytest.MonkeyPatch, lambda_context: MakeContext
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS", "2000")

    @with_connection()
    def from_env(event: Any, context: Any, connection: Connection) -> str:
        return str(connection.execute("SHOW statement_timeout").scalar())

    @with_connection(statement_timeout=750)
    def fixed(event: Any, context: Any, connection: Connection) -> str:
        return str(connection.execute("SHOW statement_timeout").scalar())

    @with_connection(statement_timeout=None)
    def unbounded(event: Any, context: Any, connection: Connection) -> str:
        return str(connection.execute("SHOW statement_timeout").scalar())

    assert 7_000 < int(from_env({}, lambda_context(remaining_ms=10_000))[:-2]) <= 8_000
    assert fixed({}, lambda_context(remaining_ms=10_000)) == "750ms"
    assert unbounded({}, lambda_context(remaining_ms=10_000)) == "0"


def test_caught_database_error_is_not_committed(
    app_url: str,
    embedded_postgres: PostgresServer,
    table: str,
    lambda_context: MakeContext,
    caplog: pytest.LogCaptureFixture,
) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> str:
        connection.execute(f"INSERT INTO {table} VALUES (1, 'a')")
        try:
            connection.execute(f"INSERT INTO {table} VALUES (1, 'duplicate')")
        except psycopg.errors.UniqueViolation:
            return "exists"
        return "inserted"

    assert handler({}, lambda_context()) == "exists"
    assert count_rows(embedded_postgres, table) == 0
    assert "nothing was committed" in caplog.text


def test_without_warm_cache_each_invocation_opens_and_closes_a_backend(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
) -> None:
    @with_connection(warm=False)
    def handler(event: Any, context: Any, connection: Connection) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    first = handler({}, lambda_context())
    second = handler({}, lambda_context())
    assert first != second
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_explicit_url_credentials_and_engine(
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    lambda_context: MakeContext,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LAMBDA_POOL_DATABASE_URL", raising=False)
    monkeypatch.delenv("LAMBDA_POOL_AUTH", raising=False)
    url = (
        f"postgresql://{embedded_postgres.host}:{embedded_postgres.port}/"
        f"{embedded_postgres.dbname}?application_name={unique_application_name}"
    )
    provider = StaticCredentials(embedded_postgres.user, embedded_postgres.password)

    @with_connection(url, credentials=provider)
    def handler(event: Any, context: Any, connection: Connection) -> str:
        return str(connection.execute("SELECT current_user").scalar())

    assert handler({}, lambda_context()) == embedded_postgres.user

    @with_connection(engine=handler.engine)  # type: ignore[attr-defined]
    def same_engine(event: Any, context: Any, connection: Connection) -> int:
        return int(connection.execute("SELECT 41 + 1").scalar())

    assert same_engine({}, lambda_context()) == 42
    assert embedded_postgres.backend_count(unique_application_name) == 1


def test_secret_auth_from_environment_reads_user_password_and_location(
    db_secret: str, monkeypatch: pytest.MonkeyPatch, lambda_context: MakeContext
) -> None:
    monkeypatch.delenv("LAMBDA_POOL_DATABASE_URL", raising=False)
    monkeypatch.setenv("LAMBDA_POOL_AUTH", "secret")
    monkeypatch.setenv("LAMBDA_POOL_SECRET_ARN", db_secret)

    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> tuple[Any, ...]:
        row = connection.execute("SELECT current_user, current_database()").fetchone()
        assert row is not None
        return tuple(row)

    assert handler({}, lambda_context()) == ("lambda_pool", "lambda_pool_test")


def test_decoration_installs_the_sigterm_shutdown_hook(app_url: str) -> None:
    @with_connection()
    def handler(event: Any, context: Any, connection: Connection) -> None:
        return None

    assert signal.getsignal(signal.SIGTERM) is lifecycle._on_sigterm
    assert any(engine is handler.engine for engine in lifecycle.registered_engines())  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"statement_timeout": "soon"}, "statement_timeout='soon'"),
        ({"statement_timeout": 0}, "milliseconds > 0"),
        ({"timeout_margin_ms": -1}, "timeout_margin_ms=-1"),
        ({"engine": object(), "url": "postgresql://h/db"}, "engine= is a ready engine; url"),
    ],
)
def test_bad_decorator_arguments_are_refused_at_decoration(
    app_url: str, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(exc.ArgumentError, match=message.replace("(", r"\(")):
        with_connection(**kwargs)


def test_handler_without_connection_parameter_is_refused(app_url: str) -> None:
    def handler(event: Any, context: Any) -> None:
        return None

    with pytest.raises(exc.ArgumentError, match="keyword argument named 'connection'"):
        with_connection()(handler)


def test_decorator_without_parentheses_says_how_to_write_it(app_url: str) -> None:
    def handler(event: Any, context: Any, connection: Connection) -> None:
        return None

    with pytest.raises(exc.ArgumentError, match=r"@with_connection\(\)"):
        with_connection(handler)  # type: ignore[arg-type]
