"""NullPool, StaticPool, SingletonThreadPool, AssertionPool, recreate(), echo, and the proxy."""

from __future__ import annotations

import gc
import logging
import sqlite3
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from lambda_pool import event, exc
from lambda_pool.pool import NullPool, Pool, QueuePool, SingletonThreadPool, StaticPool
from lambda_pool.testing.postgres import PostgresServer


def counters(pool: Pool) -> tuple[int, int, int, int]:
    return pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()


@pytest.fixture
def pg_creator(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> Callable[[], Any]:
    return lambda: psycopg.connect(embedded_postgres.dsn, application_name=unique_application_name)


def test_nullpool_opens_a_backend_per_checkout_and_closes_it_on_return(
    pg_creator: Callable[[], Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = NullPool(pg_creator)
    assert counters(pool) == (0, 0, 0, 0)
    a, b = pool.connect(), pool.connect()
    assert counters(pool) == (0, 0, 2, 0)
    assert embedded_postgres.backend_count(unique_application_name) == 2
    a.close()
    b.close()
    assert counters(pool) == (0, 0, 0, 0)
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    pool.dispose()  # nothing to do


def test_staticpool_shares_one_connection_and_reconnects_after_invalidation(
    pg_creator: Callable[[], Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = StaticPool(pg_creator)
    assert counters(pool) == (1, 0, 0, 0)
    a, b = pool.connect(), pool.connect()
    assert a.dbapi_connection is b.dbapi_connection
    assert counters(pool) == (1, 0, 2, 0)
    a.close()
    b.close()
    assert counters(pool) == (1, 1, 0, 0)
    assert embedded_postgres.backend_count(unique_application_name) == 1
    with pool.connect() as c:
        first = c.dbapi_connection
        c.invalidate()
    with pool.connect() as d:
        assert d.dbapi_connection is not first
        assert d.execute("SELECT 1").fetchone() == (1,)
    pool.dispose()
    assert counters(pool) == (1, 0, 0, 0)
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    with pool.connect() as e:  # reconnects after dispose
        assert e.execute("SELECT 1").fetchone() == (1,)
    pool.dispose()


def test_staticpool_keeps_an_in_memory_sqlite_database_alive() -> None:
    pool = StaticPool(lambda: sqlite3.connect(":memory:", check_same_thread=False))
    with pool.connect() as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        conn.commit()
    with pool.connect() as conn:
        assert conn.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_singletonthreadpool_gives_one_connection_per_thread_and_nests() -> None:
    pool = SingletonThreadPool(lambda: sqlite3.connect(":memory:", check_same_thread=False))
    outer = pool.connect()
    inner = pool.connect()
    assert inner is outer
    inner.close()
    assert outer.execute("SELECT 1").fetchone() == (1,)  # still checked out
    assert counters(pool) == (5, 0, 1, 0)
    outer.close()
    assert counters(pool) == (5, 1, 0, 0)
    other: list[Any] = []

    def in_thread() -> None:
        with pool.connect() as conn:
            other.append(conn.dbapi_connection)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    with pool.connect() as mine:
        assert other[0] is not mine.dbapi_connection
    assert counters(pool) == (5, 2, 0, 0)
    pool.dispose()
    assert counters(pool) == (5, 0, 0, 0)


def test_recreate_gives_an_unconnected_pool_with_the_same_arguments_and_listeners(
    pg_creator: Callable[[], Any], embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(pg_creator, pool_size=3, max_overflow=2, timeout=1.5, pre_ping=True)
    seen: list[str] = []
    event.listen(pool, "connect", lambda *a: seen.append("connect"))
    pool.connect().close()
    new = pool.recreate()
    assert type(new) is QueuePool
    assert (new.size(), new.timeout(), new._max_overflow, new._pre_ping) == (3, 1.5, 2, True)
    assert counters(new) == (3, 0, 0, 0)
    new.connect().close()
    assert seen == ["connect", "connect"]
    pool.dispose()
    new.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_proxy_forwards_to_the_connection_and_refuses_use_after_close(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0)
    proxy = pool.connect()
    assert proxy.driver_connection is proxy.dbapi_connection
    assert proxy.execute("SELECT 7").fetchone() == (7,)
    assert proxy.is_valid
    proxy.info["a"] = 1
    assert proxy.record_info is not None
    proxy.record_info["slot"] = "kept"
    proxy.close()
    proxy.close()  # a second close is a no-op
    assert proxy.dbapi_connection is None
    with pytest.raises(exc.ResourceClosedError, match="closed"):
        proxy.execute("SELECT 1")
    with pytest.raises(exc.ResourceClosedError):
        proxy.cursor()
    again = pool.connect()
    assert again.info == {"a": 1}
    again.invalidate()
    third = pool.connect()
    assert third.info == {}  # new physical connection
    assert third.record_info == {"slot": "kept"}  # same slot
    third.close()
    pool.dispose()


def test_garbage_collected_proxy_is_returned_to_the_pool(pg_creator: Callable[[], Any]) -> None:
    pool = QueuePool(pg_creator, 1, 0)
    pool.connect()
    gc.collect()
    assert (pool.checkedin(), pool.checkedout()) == (1, 0)
    pool.dispose()


def test_echo_prints_pool_activity_through_the_lambda_pool_pool_logger(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logging.getLogger("lambda_pool").setLevel(logging.WARNING)  # echo needs no logging config
    try:
        pool = QueuePool(lambda: sqlite3.connect(":memory:"), echo="debug", logging_name="mine")
        pool.connect().close()
        out = capsys.readouterr().out
        assert "DEBUG lambda_pool.pool.mine Created new connection" in out
        assert "being returned to pool; rollback" in out
        quiet = QueuePool(lambda: sqlite3.connect(":memory:"), logging_name="quiet")
        quiet.connect().close()
        assert capsys.readouterr().out == ""
    finally:
        logging.getLogger("lambda_pool").setLevel(logging.NOTSET)


def test_sqlite_closed_database_counts_as_a_disconnect_for_pre_ping() -> None:
    pool = QueuePool(lambda: sqlite3.connect(":memory:"), 1, 0, pre_ping=True)
    with pool.connect() as proxy:
        first = proxy.dbapi_connection
    first.close()  # the connection dies while idle in the pool
    with pool.connect() as proxy:
        assert proxy.dbapi_connection is not first
        assert proxy.execute("SELECT 1").fetchone() == (1,)


# --------------------------------------------------------------------------- AssertionPool
# Side by side with SQLAlchemy 2.1's AssertionPool: the same calls, the same outcome.


def assertion_pools() -> dict[str, Any]:
    import sqlalchemy.pool

    import lambda_pool
    import lambda_pool.pool

    assert lambda_pool.AssertionPool is lambda_pool.pool.AssertionPool  # exported
    return {
        "sqlalchemy": sqlalchemy.pool.AssertionPool,
        "lambda_pool": lambda_pool.pool.AssertionPool,
    }


def outcome(action: Callable[[], Any]) -> str:
    try:
        action()
    except BaseException as error:
        return f"{type(error).__name__}: {str(error).partition(' at:')[0]}"
    return "ok"


def test_assertion_pool_allows_one_checkout_at_a_time_as_sqlalchemy_does() -> None:
    def observe(pool_class: Any) -> list[Any]:
        pool = pool_class(lambda: sqlite3.connect(":memory:"), store_traceback=False)
        first = pool.connect()
        dbapi = first.dbapi_connection
        steps: list[Any] = [outcome(pool.connect)]  # a second checkout is a bug
        first.close()
        again = pool.connect()
        steps.append(again.dbapi_connection is dbapi)  # the one connection is reused
        again.close()
        steps.append(outcome(again.close))  # a double close is a no-op
        steps.append(pool.status())
        held = pool.connect()
        pool.dispose()  # closes the connection, even checked out, and forgets the checkout
        # Unusable now (the error is lambda-pool's clear one, SQLAlchemy's is the driver's).
        steps.append(outcome(lambda: held.cursor().execute("SELECT 1")) != "ok")
        replacement = pool.connect()
        steps.append(replacement.dbapi_connection is dbapi)
        replacement.cursor().execute("SELECT 1")
        replacement.close()
        steps.append(type(pool.recreate()).__name__)
        return steps

    observed = {name: observe(pool_class) for name, pool_class in assertion_pools().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"][0] == "AssertionError: connection is already checked out"


def test_assertion_pool_says_where_the_connection_was_checked_out() -> None:
    for pool_class in assertion_pools().values():
        pool = pool_class(lambda: sqlite3.connect(":memory:"))

        def first_checkout_here(pool: Any = pool) -> Any:
            return pool.connect()

        held = first_checkout_here()
        with pytest.raises(AssertionError, match="already checked out at:") as raised:
            pool.connect()
        assert "first_checkout_here" in str(raised.value)
        held.close()


def test_assertion_pool_connect_error_raises_and_leaves_the_pool_free() -> None:
    def observe(pool_class: Any) -> list[str]:
        attempts: list[int] = []

        def flaky() -> sqlite3.Connection:
            attempts.append(1)
            if len(attempts) < 3:
                raise sqlite3.OperationalError("unable to open database file")
            return sqlite3.connect(":memory:")

        pool = pool_class(flaky)
        steps = [outcome(pool.connect), outcome(pool.connect)]
        proxy = pool.connect()
        steps.append(outcome(pool.connect).partition(" at:")[0])
        proxy.close()
        return steps

    observed = {name: observe(pool_class) for name, pool_class in assertion_pools().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"][:2] == ["OperationalError: unable to open database file"] * 2


def test_assertion_pool_through_create_engine_on_postgresql(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    from lambda_pool import create_engine
    from lambda_pool.pool import AssertionPool

    url = embedded_postgres.dsn + f"?application_name={unique_application_name}"
    engine = create_engine(url, poolclass=AssertionPool)
    with engine.connect() as connection:
        assert connection.execute("SELECT 1").scalar() == 1
        with pytest.raises(AssertionError, match="already checked out"):
            engine.connect()
    assert embedded_postgres.backend_count(unique_application_name) == 1
    engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
