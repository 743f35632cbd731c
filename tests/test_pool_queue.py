"""QueuePool on a real PostgreSQL: counters, waiting, pre-ping, recycle, reset, dispose, fork."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from support import in_forked_child

from lambda_pool import exc
from lambda_pool.pool import QueuePool
from lambda_pool.testing.postgres import PostgresServer


def creator_for(server: PostgresServer, app: str) -> Callable[[], psycopg.Connection[Any]]:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(server.dsn, application_name=app)

    return connect


def counters(pool: QueuePool) -> tuple[int, int, int, int]:
    return pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()


def test_counters_follow_the_documented_table(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 2, 1, timeout=0.2)
    assert counters(pool) == (2, 0, 0, 0)
    assert embedded_postgres.backend_count(unique_application_name) == 0  # lazy
    first, second, third = pool.connect(), pool.connect(), pool.connect()
    assert counters(pool) == (2, 0, 3, 1)
    third.close()
    assert counters(pool) == (2, 1, 2, 1)
    second.close()
    assert counters(pool) == (2, 2, 1, 1)
    first.close()
    assert counters(pool) == (2, 2, 0, 0)
    assert embedded_postgres.wait_for_backend_count(2, unique_application_name) == 2
    assert pool.status() == (
        "Pool size: 2  Connections in pool: 2 Current Overflow: 0 "
        "Current Checked out connections: 0"
    )
    pool.dispose()
    assert counters(pool) == (2, 0, 0, 0)
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_dispose_keeps_checked_out_connections_which_come_back_later(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 2, 1)
    held = pool.connect()
    pool.connect().close()
    pool.dispose()
    assert counters(pool) == (2, 0, 1, 0)
    assert held.execute("SELECT 1").fetchone() == (1,)
    held.close()
    assert counters(pool) == (2, 1, 0, 0)
    pool.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_exhausted_pool_times_out_with_sqlalchemys_message_under_threads(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 2, 1, timeout=0.2)
    held = [pool.connect() for _ in range(3)]
    errors: list[BaseException] = []

    def try_checkout() -> None:
        try:
            pool.connect().close()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=try_checkout) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(errors) == 4
    for err in errors:
        assert isinstance(err, exc.TimeoutError)
        assert isinstance(err, TimeoutError)
        assert str(err) == (
            "QueuePool limit of size 2 overflow 1 reached, connection timed out, timeout 0.20"
        )
    for proxy in held:
        proxy.close()
    pool.dispose()


def test_waiting_caller_gets_the_connection_returned_by_another_thread(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=30)
    held = pool.connect()
    got: list[int] = []

    def waiter() -> None:
        with pool.connect() as proxy:
            got.append(proxy.execute("SELECT 42").fetchone()[0])

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.1)
    assert not got  # still waiting: the only slot is taken
    held.close()
    thread.join(10)
    assert got == [42]
    assert embedded_postgres.backend_count(unique_application_name) == 1
    pool.dispose()


def test_waiting_caller_is_woken_by_invalidation(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, timeout=30)
    held = pool.connect()
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(pool.connect()))
    thread.start()
    time.sleep(0.05)
    held.invalidate()
    thread.join(10)
    assert got[0].execute("SELECT 1").fetchone() == (1,)
    assert pool.checkedout() == 1
    got[0].close()
    pool.dispose()


def test_timeout_zero_fails_at_once_and_max_overflow_minus_one_never_waits(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    creator = creator_for(embedded_postgres, unique_application_name)
    strict = QueuePool(creator, 1, 0, timeout=0)
    held = strict.connect()
    with pytest.raises(exc.TimeoutError, match=r"size 1 overflow 0 .* timeout 0\.00"):
        strict.connect()
    held.close()
    strict.dispose()
    unbounded = QueuePool(creator, 1, -1)
    proxies = [unbounded.connect() for _ in range(4)]
    assert unbounded.checkedout() == 4
    for proxy in proxies:
        proxy.close()
    assert unbounded.checkedin() == 1
    unbounded.dispose()


def test_pool_size_zero_keeps_every_connection_without_overflow(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), pool_size=0)
    proxies = [pool.connect() for _ in range(3)]
    assert counters(pool) == (0, 0, 3, 0)
    for proxy in proxies:
        proxy.close()
    assert counters(pool) == (0, 3, 0, 0)
    pool.dispose()


def test_use_lifo_hands_out_the_most_recently_returned_connection() -> None:
    import sqlite3

    for lifo, expected_first in ((True, "b"), (False, "a")):
        pool = QueuePool(lambda: sqlite3.connect(":memory:"), 2, 0, use_lifo=lifo)
        a, b = pool.connect(), pool.connect()
        a.info["name"], b.info["name"] = "a", "b"
        a.close()
        b.close()
        assert pool.connect().info["name"] == expected_first


def test_failed_connect_gives_the_slot_back_and_raises_the_driver_error(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    fail = {"now": False}
    good = creator_for(embedded_postgres, unique_application_name)

    def flaky() -> psycopg.Connection[Any]:
        if fail["now"]:
            return psycopg.connect(embedded_postgres.dsn, dbname="no_such_db", connect_timeout=5)
        return good()

    pool = QueuePool(flaky, 1, 1, timeout=0)
    held = pool.connect()
    fail["now"] = True
    with pytest.raises(psycopg.OperationalError):
        pool.connect()
    assert counters(pool) == (1, 0, 1, 0)
    fail["now"] = False
    second = pool.connect()  # the overflow slot was given back
    assert counters(pool) == (1, 0, 2, 1)
    second.close()
    held.close()
    pool.dispose()


def test_reset_on_return_rolls_back_so_the_backend_is_idle(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0)
    with pool.connect() as proxy:
        proxy.execute("CREATE TEMP TABLE t (x int)")
        proxy.execute("INSERT INTO t VALUES (1)")
        (row,) = embedded_postgres.backends(unique_application_name)
        assert row["state"] == "idle in transaction"
    (row,) = embedded_postgres.backends(unique_application_name)
    assert row["state"] == "idle"
    with pool.connect() as proxy:  # rolled back: the temp table never existed
        with pytest.raises(psycopg.errors.UndefinedTable):
            proxy.execute("SELECT * FROM t")
        proxy.rollback()
    pool.dispose()


def test_reset_on_return_commit_keeps_the_work(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(
        creator_for(embedded_postgres, unique_application_name), 1, 0, reset_on_return="commit"
    )
    with pool.connect() as proxy:
        proxy.execute("CREATE TEMP TABLE kept (x int)")
    assert embedded_postgres.backends(unique_application_name)[0]["state"] == "idle"
    with pool.connect() as proxy:
        assert proxy.execute("SELECT count(*) FROM kept").fetchone() == (0,)
    pool.dispose()


def test_reset_on_return_none_leaves_the_transaction_open(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(
        creator_for(embedded_postgres, unique_application_name), 1, 0, reset_on_return=None
    )
    with pool.connect() as proxy:
        proxy.execute("SELECT 1")
    assert embedded_postgres.backends(unique_application_name)[0]["state"] == (
        "idle in transaction"
    )
    pool.dispose()


def test_failed_reset_is_logged_and_the_connection_replaced_silently(
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0)
    proxy = pool.connect()
    proxy.execute("SELECT 1")
    embedded_postgres.terminate(unique_application_name)
    proxy.close()  # the rollback fails: the caller sees nothing
    assert "Exception during reset" in caplog.text
    with pool.connect() as fresh:
        assert fresh.execute("SELECT 2").fetchone() == (2,)
    pool.dispose()


def test_pre_ping_replaces_a_terminated_backend_without_an_error(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 2, 0, pre_ping=True)
    first, second = pool.connect(), pool.connect()
    old_pids = {first.info.setdefault("pid", first.pgconn.backend_pid), second.pgconn.backend_pid}
    first.close()
    second.close()
    embedded_postgres.terminate(unique_application_name)
    with pool.connect() as proxy:
        assert proxy.execute("SELECT 1").fetchone() == (1,)
        assert proxy.pgconn.backend_pid not in old_pids
        assert "pid" not in proxy.info  # info belongs to the physical connection
    # the other (also dead) connection was older than the invalidation: replaced too
    a, b = pool.connect(), pool.connect()
    assert a.execute("SELECT 1").fetchone() == b.execute("SELECT 1").fetchone() == (1,)
    a.close()
    b.close()
    pool.dispose()


def test_without_pre_ping_a_terminated_backend_surfaces_to_the_caller(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0)
    pool.connect().close()
    embedded_postgres.terminate(unique_application_name)
    with pool.connect() as proxy, pytest.raises(psycopg.OperationalError):
        proxy.execute("SELECT 1")
    pool.dispose()


def test_pre_ping_error_that_is_not_a_disconnect_propagates(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    class PickyDialect:
        def do_rollback(self, conn: Any) -> None:
            conn.rollback()

        def do_commit(self, conn: Any) -> None:
            conn.commit()

        def do_close(self, conn: Any) -> None:
            conn.close()

        def do_ping(self, conn: Any) -> bool:
            raise ValueError("not a disconnect")

        def is_disconnect(self, err: BaseException, conn: Any) -> bool:
            return False

        def get_driver_connection(self, conn: Any) -> Any:
            return conn

    pool = QueuePool(
        creator_for(embedded_postgres, unique_application_name),
        1,
        0,
        pre_ping=True,
        dialect=PickyDialect(),
    )
    pool.connect().close()
    with pytest.raises(ValueError, match="not a disconnect"):
        pool.connect()
    assert counters(pool) == (1, 1, 0, 0)
    pool.dispose()


def test_recycle_replaces_connections_older_than_the_limit(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 1, 0, recycle=0.2)
    with pool.connect() as proxy:
        old_pid = proxy.pgconn.backend_pid
    with pool.connect() as proxy:
        assert proxy.pgconn.backend_pid == old_pid  # young enough: reused
    time.sleep(0.3)
    with pool.connect() as proxy:
        assert proxy.pgconn.backend_pid != old_pid
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    pool.dispose()


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"pool_size": -1}, "pool_size"),
        ({"pool_size": 2.5}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"max_overflow": -2}, "max_overflow"),
        ({"timeout": -1}, "timeout"),
        ({"timeout": "soon"}, "timeout"),
        ({"reset_on_return": "sometimes"}, "reset_on_return"),
        ({"recycle": "hourly"}, "recycle"),
        ({"echo": "loud"}, "echo"),
    ],
)
def test_invalid_arguments_name_the_value_and_what_is_accepted(
    kwargs: dict[str, Any], named: str
) -> None:
    import sqlite3

    with pytest.raises(exc.ArgumentError) as raised:
        QueuePool(lambda: sqlite3.connect(":memory:"), **kwargs)
    message = str(raised.value)
    assert named in message and repr(next(iter(kwargs.values()))) in message
    assert "accepted" in message


def test_defaults_are_sqlalchemys() -> None:
    import sqlite3

    pool = QueuePool(lambda: sqlite3.connect(":memory:"))
    assert (pool.size(), pool.timeout()) == (5, 30.0)
    assert pool._max_overflow == 10 and pool._recycle == -1 and pool._pre_ping is False


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_never_gets_the_parents_connection(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    pool = QueuePool(creator_for(embedded_postgres, unique_application_name), 2, 0)
    with pool.connect() as proxy:
        parent_pid = proxy.pgconn.backend_pid

    def in_child() -> int:
        with pool.connect() as proxy:
            pid = int(proxy.pgconn.backend_pid)
        pool.dispose()
        return pid

    assert in_forked_child(in_child) not in (0, parent_pid)
    # the parent's session was not closed by the child
    with pool.connect() as proxy:
        assert proxy.pgconn.backend_pid == parent_pid
        assert proxy.execute("SELECT 1").fetchone() == (1,)
    pool.dispose()
