"""Pool events: arguments, order, targets (pool, class, engine), insert/once, errors."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool import event, exc
from lambda_pool.pool import (
    ConnectionPoolEntry,
    NullPool,
    Pool,
    PoolProxiedConnection,
    PoolResetState,
    QueuePool,
)
from lambda_pool.testing.postgres import PostgresServer

ALL = sorted(event.EVENTS)


def record_all(target: Any) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []
    for name in ALL:
        event.listen(target, name, lambda *args, name=name: seen.append((name, *args)))
    return seen


def names(seen: list[tuple[Any, ...]]) -> list[str]:
    return [item[0] for item in seen]


@pytest.fixture
def pg_creator(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> Callable[[], Any]:
    return lambda: psycopg.connect(embedded_postgres.dsn, application_name=unique_application_name)


def test_checkout_and_return_fire_events_in_order_with_their_arguments(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 1)
    seen = record_all(pool)
    proxy = pool.connect()
    dbapi = proxy.dbapi_connection
    assert names(seen) == ["first_connect", "connect", "checkout"]
    _, conn, record = seen[0]
    assert conn is dbapi and isinstance(record, ConnectionPoolEntry)
    assert seen[2][1:] == (dbapi, record, proxy)
    seen.clear()
    proxy.close()
    assert names(seen) == ["reset", "checkin"]
    reset_state = seen[0][3]
    assert isinstance(reset_state, PoolResetState)
    assert reset_state == PoolResetState(
        transaction_was_reset=False, terminate_only=False, asyncio_safe=True
    )
    assert seen[1][1:] == (dbapi, record)
    seen.clear()
    pool.connect().close()  # a reused connection: no connect event, first_connect never again
    assert names(seen) == ["checkout", "reset", "checkin"]
    seen.clear()
    pool.dispose()
    assert names(seen) == ["close"]
    assert seen[0][1:] == (dbapi, record)


def test_return_to_a_full_pool_fires_reset_checkin_close(pg_creator: Callable[[], Any]) -> None:
    pool = QueuePool(pg_creator, 1, 1)
    a, b = pool.connect(), pool.connect()
    seen = record_all(pool)
    a.close()
    b.close()
    assert names(seen) == ["reset", "checkin", "reset", "checkin", "close"]
    pool.dispose()


def test_nullpool_closes_every_returned_connection(pg_creator: Callable[[], Any]) -> None:
    pool = NullPool(pg_creator)
    seen = record_all(pool)
    pool.connect().close()
    assert names(seen) == ["first_connect", "connect", "checkout", "reset", "checkin", "close"]


def test_hard_invalidate_fires_invalidate_close_then_checkin_without_connection(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0)
    proxy = pool.connect()
    dbapi = proxy.dbapi_connection
    record = proxy.record
    seen = record_all(pool)
    error = RuntimeError("broken")
    proxy.invalidate(error)
    assert names(seen) == ["invalidate", "close", "checkin"]
    assert seen[0][1:] == (dbapi, record, error)
    assert seen[2][1:] == (None, record)
    assert dbapi.closed and not proxy.is_valid
    with pytest.raises(exc.ResourceClosedError):
        proxy.execute("SELECT 1")


def test_soft_invalidate_keeps_the_connection_until_next_checkout(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0)
    proxy = pool.connect()
    seen = record_all(pool)
    proxy.invalidate(soft=True)
    assert names(seen) == ["soft_invalidate"]
    assert seen[0][3] is None
    assert proxy.execute("SELECT 1").fetchone() == (1,)  # still usable
    proxy.close()
    seen.clear()
    pool.connect().close()
    assert names(seen) == ["close", "connect", "checkout", "reset", "checkin"]
    pool.dispose()


def test_detach_frees_the_slot_and_close_fires_reset_then_close_detached(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0, timeout=0)
    proxy = pool.connect()
    dbapi = proxy.dbapi_connection
    seen = record_all(pool)
    proxy.detach()
    assert names(seen) == ["detach"]
    assert pool.checkedout() == 0
    other = pool.connect()  # the slot is free at once
    assert proxy.execute("SELECT 1").fetchone() == (1,)
    seen.clear()
    proxy.close()
    assert names(seen) == ["reset", "close_detached"]
    assert seen[1][1:] == (dbapi,)
    assert dbapi.closed
    other.close()
    pool.dispose()


def test_recycle_fires_close_connect_checkout_without_invalidate() -> None:
    pool = QueuePool(lambda: sqlite3.connect(":memory:"), 1, 0, recycle=0)
    pool.connect().close()
    seen = record_all(pool)
    import time

    time.sleep(0.01)
    pool.connect().close()
    assert names(seen) == ["close", "connect", "checkout", "reset", "checkin"]


def test_pre_ping_failure_fires_invalidate_close_connect_checkout(
    embedded_postgres: PostgresServer, unique_application_name: str, pg_creator: Callable[[], Any]
) -> None:
    pool = QueuePool(pg_creator, 1, 0, pre_ping=True)
    pool.connect().close()
    embedded_postgres.terminate(unique_application_name)
    seen = record_all(pool)
    with pool.connect() as proxy:
        assert proxy.execute("SELECT 1").fetchone() == (1,)
    assert names(seen) == ["invalidate", "close", "connect", "checkout", "reset", "checkin"]
    assert isinstance(seen[0][3], exc.DisconnectionError)
    pool.dispose()


def test_disconnection_error_in_checkout_listener_gets_a_fresh_connection(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0)
    pool.connect().close()
    refused: list[Any] = []

    def refuse_first(dbapi: Any, record: Any, proxy: Any) -> None:
        if not refused:
            refused.append(dbapi)
            raise exc.DisconnectionError("stale")

    event.listen(pool, "checkout", refuse_first)
    with pool.connect() as proxy:
        assert proxy.dbapi_connection is not refused[0]
        assert refused[0].closed
        assert proxy.execute("SELECT 1").fetchone() == (1,)
    pool.dispose()


def test_checkout_listener_refusing_every_connection_gives_a_clear_error(
    pg_creator: Callable[[], Any],
) -> None:
    pool = QueuePool(pg_creator, 1, 0)

    @event.listens_for(pool, "checkout")
    def always_refuse(dbapi: Any, record: Any, proxy: Any) -> None:
        raise exc.DisconnectionError("never good")

    with pytest.raises(exc.InvalidRequestError, match="Reconnection attempts exhausted"):
        pool.connect()
    assert pool.checkedout() == 0
    event.remove(pool, "checkout", always_refuse)
    pool.connect().close()
    pool.dispose()


def test_raising_connect_listener_closes_the_connection_frees_the_slot_and_propagates(
    embedded_postgres: PostgresServer, unique_application_name: str, pg_creator: Callable[[], Any]
) -> None:
    pool = QueuePool(pg_creator, 1, 0, timeout=0)
    made: list[Any] = []

    def reject(dbapi: Any, record: Any) -> None:
        made.append(dbapi)
        raise RuntimeError("no thanks")

    event.listen(pool, "connect", reject)
    with pytest.raises(RuntimeError, match="no thanks"):
        pool.connect()
    assert made[0].closed
    assert (pool.checkedin(), pool.checkedout(), pool.overflow()) == (0, 0, 0)
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    event.remove(pool, "connect", reject)
    pool.connect().close()  # the slot is free again
    pool.dispose()


def test_class_level_listeners_reach_every_pool_and_run_first() -> None:
    order: list[str] = []

    def on_class(*args: Any) -> None:
        order.append("class")

    def on_pool(*args: Any) -> None:
        order.append("instance")

    pool = QueuePool(lambda: sqlite3.connect(":memory:"))
    event.listen(pool, "checkout", on_pool)
    event.listen(Pool, "checkout", on_class)
    try:
        pool.connect().close()
        NullPool(lambda: sqlite3.connect(":memory:")).connect().close()
        assert order == ["class", "instance", "class"]
        assert event.contains(Pool, "checkout", on_class)
    finally:
        event.remove(Pool, "checkout", on_class)
    assert not event.contains(Pool, "checkout", on_class)


def test_insert_goes_first_and_once_fires_once() -> None:
    pool = QueuePool(lambda: sqlite3.connect(":memory:"))
    order: list[str] = []
    event.listen(pool, "checkout", lambda *a: order.append("plain"))
    event.listen(pool, "checkout", lambda *a: order.append("inserted"), insert=True)
    event.listen(pool, "checkout", lambda *a: order.append("once"), once=True)
    pool.connect().close()
    pool.connect().close()
    assert order == ["inserted", "plain", "once", "inserted", "plain"]


def test_named_listener_gets_keyword_arguments() -> None:
    pool = QueuePool(lambda: sqlite3.connect(":memory:"))
    got: dict[str, Any] = {}
    event.listen(pool, "checkout", lambda **kw: got.update(kw), named=True)
    proxy = pool.connect()
    assert set(got) == {"dbapi_connection", "connection_record", "connection_proxy"}
    assert got["connection_proxy"] is proxy
    proxy.close()


def test_unknown_event_name_is_an_error_naming_the_valid_ones() -> None:
    pool = QueuePool(lambda: sqlite3.connect(":memory:"))
    with pytest.raises(exc.ArgumentError, match=r"'chekout'.*checkin, checkout"):
        event.listen(pool, "chekout", print)
    with pytest.raises(exc.ArgumentError, match="Cannot listen"):
        event.listen(object(), "checkout", print)


class FakeEngine:
    """What an engine does for pool events: owns a registry and shares it with its pools."""

    def __init__(self) -> None:
        self.pool_events = event.EventRegistry()
        self.pool: Pool = QueuePool(
            lambda: sqlite3.connect(":memory:"), 1, 0, events=self.pool_events
        )

    def dispose(self) -> None:
        self.pool.dispose()
        self.pool = self.pool.recreate()


class PoolOnlyEngine:
    def __init__(self) -> None:
        self.pool: Pool = QueuePool(lambda: sqlite3.connect(":memory:"), 1, 0)

    def dispose(self) -> None:
        self.pool.dispose()
        self.pool = self.pool.recreate()


@pytest.fixture(params=[FakeEngine, PoolOnlyEngine])
def engine(request: pytest.FixtureRequest) -> Iterator[Any]:
    yield request.param()


def test_engine_listeners_survive_dispose_recreating_the_pool(engine: Any) -> None:
    seen: list[Any] = []

    @event.listens_for(engine, "connect")
    def on_connect(dbapi: Any, record: ConnectionPoolEntry) -> None:
        record.info["created_at"] = 1.0
        seen.append(dbapi)

    @event.listens_for(engine, "checkout")
    def on_checkout(dbapi: Any, record: Any, proxy: PoolProxiedConnection) -> None:
        assert record.info.get("created_at") == 1.0
        assert engine.pool.checkedout() == 1

    engine.pool.connect().close()
    old_pool = engine.pool
    engine.dispose()
    assert engine.pool is not old_pool
    engine.pool.connect().close()
    assert len(seen) == 2
    assert event.contains(engine, "connect", on_connect)


# --------------------------------------------------------------------------- side by side
# The same scenario through SQLAlchemy 2.1 and through lambda-pool, public API only; the
# test asserts lambda-pool observes what SQLAlchemy observes, at test time.


def reference_and_ours() -> dict[str, tuple[Any, Any, Any]]:
    """name -> (pool module, event module, create_engine) for both implementations."""
    import sqlalchemy
    import sqlalchemy.event
    import sqlalchemy.pool

    import lambda_pool
    import lambda_pool.pool

    return {
        "sqlalchemy": (sqlalchemy.pool, sqlalchemy.event, sqlalchemy.create_engine),
        "lambda_pool": (lambda_pool.pool, event, lambda_pool.create_engine),
    }


class CountingConnection(sqlite3.Connection):
    """A real sqlite3 connection that counts its rollbacks."""

    rollbacks = 0

    def rollback(self) -> None:
        self.rollbacks += 1
        super().rollback()


def counting_connect() -> CountingConnection:
    connection = sqlite3.connect(":memory:", factory=CountingConnection, check_same_thread=False)
    assert isinstance(connection, CountingConnection)
    return connection


def test_engine_class_listeners_reach_every_pool_in_sqlalchemys_order() -> None:
    def observe(pool_module: Any, events: Any, create_engine: Any) -> Any:
        engine_class = type(create_engine("sqlite://"))
        order: list[str] = []
        registered: list[tuple[Any, Callable[..., None]]] = []

        def listen(target: Any, label: str, insert: bool = False) -> None:
            def listener(*args: Any) -> None:
                order.append(label)

            events.listen(target, "connect", listener, insert=insert)
            if isinstance(target, type):
                registered.append((target, listener))

        engine = create_engine("sqlite://", poolclass=pool_module.QueuePool)
        try:
            listen(engine.pool, "pool 1")
            listen(engine, "engine 1")
            listen(engine_class, "Engine class 1")
            listen(pool_module.Pool, "Pool class")
            listen(pool_module.QueuePool, "QueuePool class")
            listen(engine, "engine 2")
            listen(engine.pool, "pool 2")
            listen(engine_class, "Engine class 2")
            listen(engine, "engine inserted", insert=True)
            listen(engine_class, "Engine class inserted", insert=True)
            engine.connect().close()
            first = list(order)
            order.clear()
            engine.dispose()
            engine.connect().close()
            after_dispose = list(order)
            order.clear()
            create_engine("sqlite://", poolclass=pool_module.NullPool).connect().close()
            other_engine = list(order)
            order.clear()
            pool_module.NullPool(counting_connect).connect().close()
            bare_pool = list(order)
            contained = events.contains(engine_class, "connect", registered[0][1])
        finally:
            for target, listener in registered:
                events.remove(target, "connect", listener)
        return (first, after_dispose, other_engine, bare_pool, contained)

    observed = {name: observe(*impl) for name, impl in reference_and_ours().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"][2] == [
        "Engine class inserted",
        "Engine class 1",
        "Pool class",
        "Engine class 2",
    ]


def test_first_connect_fires_once_while_other_threads_wait_for_it() -> None:
    import threading
    import time

    def observe(pool_module: Any, events: Any, _: Any) -> Any:
        order: list[str] = []

        def slow_connect() -> CountingConnection:
            time.sleep(0.02)  # every thread is connecting when the first one finishes
            return counting_connect()

        def first_connect(*args: Any, order: list[str] = order) -> None:
            order.append("first_connect")
            time.sleep(0.1)
            order.append("first_connect done")

        pool = pool_module.QueuePool(slow_connect, pool_size=5)
        events.listen(pool, "first_connect", first_connect)
        events.listen(pool, "connect", lambda *args, order=order: order.append("connect"))
        held: list[Any] = []
        threads = [threading.Thread(target=lambda: held.append(pool.connect())) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for proxy in held:
            proxy.close()
        return order

    observed = {name: observe(*impl) for name, impl in reference_and_ours().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"] == [
        "first_connect",
        "first_connect done",
        "connect",
        "connect",
        "connect",
    ]


def test_staticpool_fires_checkin_once_per_record_and_resets_each_return() -> None:
    import gc

    def observe(pool_module: Any, events: Any, _: Any) -> Any:
        pool = pool_module.StaticPool(counting_connect)
        seen: list[str] = []
        for event_name in ("checkout", "reset", "checkin", "close"):
            events.listen(pool, event_name, lambda *args, n=event_name: seen.append(n))
        first, second = pool.connect(), pool.connect()
        dbapi = first.dbapi_connection
        same = dbapi is second.dbapi_connection
        first.close()
        after_first = (list(seen), dbapi.rollbacks)
        second.close()
        after_second = (list(seen), dbapi.rollbacks)
        seen.clear()
        # Garbage collection of a proxy that a newer checkout superseded does nothing.
        older, newer = pool.connect(), pool.connect()
        del older
        gc.collect()
        after_gc = list(seen)
        newer.close()
        return (same, after_first, after_second, after_gc, list(seen))

    observed = {name: observe(*impl) for name, impl in reference_and_ours().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    # One checkin for the one record; a rollback at every return.
    assert observed["lambda_pool"][2] == (["checkout", "checkout", "reset", "checkin", "reset"], 2)


def test_closing_a_detached_connection_resets_it_with_terminate_only() -> None:
    def observe(pool_module: Any, events: Any, _: Any) -> Any:
        pool = pool_module.QueuePool(counting_connect)
        seen: list[Any] = []

        def on_reset(dbapi: Any, record: Any, state: Any, seen: list[Any] = seen) -> None:
            seen.append(
                ("reset", state.transaction_was_reset, state.terminate_only, state.asyncio_safe)
            )

        events.listen(pool, "reset", on_reset)
        for event_name in ("checkin", "close", "detach", "close_detached"):
            events.listen(pool, event_name, lambda *args, n=event_name: seen.append(n))
        proxy = pool.connect()
        dbapi = proxy.dbapi_connection
        proxy.detach()
        proxy.close()
        return (seen, dbapi.rollbacks, pool.checkedin(), pool.checkedout())

    observed = {name: observe(*impl) for name, impl in reference_and_ours().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert ("reset", False, True, True) in observed["lambda_pool"][0]


def test_engine_connection_closed_in_a_transaction_rolls_back_before_the_reset() -> None:
    def observe(pool_module: Any, events: Any, create_engine: Any) -> Any:
        seen: list[Any] = []
        connections: list[CountingConnection] = []
        # Rollbacks counted from the start of each step (SQLAlchemy's dialect also
        # rolls back once while initialising on the first connect).
        start = [0]

        def connect(connections: list[CountingConnection] = connections) -> CountingConnection:
            connections.append(counting_connect())
            return connections[-1]

        engine = create_engine("sqlite://", creator=connect, poolclass=pool_module.QueuePool)

        def on_reset(
            dbapi: Any, record: Any, state: Any, seen: list[Any] = seen, start: list[int] = start
        ) -> None:
            seen.append(("reset", state.transaction_was_reset, dbapi.rollbacks - start[0]))

        def step(connection: Any, seen: list[Any] = seen, start: list[int] = start) -> Any:
            seen.clear()
            start[0] = connections[0].rollbacks
            connection.close()
            return list(seen), connections[0].rollbacks - start[0]

        events.listen(engine, "reset", on_reset)
        steps = {}
        connection = engine.connect()
        connection.exec_driver_sql("SELECT 1")  # opens the transaction
        steps["open transaction"] = step(connection)
        connection = engine.connect()
        connection.exec_driver_sql("SELECT 1")
        connection.commit()
        steps["after commit"] = step(connection)
        connection = engine.connect()
        connection.begin()
        steps["explicit begin"] = step(connection)
        steps["nothing run"] = step(engine.connect())
        return steps
        engine.dispose()

    observed = {name: observe(*impl) for name, impl in reference_and_ours().items()}
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    # Rolled back first (the reset sees that rollback done), then told it was reset.
    assert observed["lambda_pool"]["open transaction"] == ([("reset", True, 1)], 1)
    assert observed["lambda_pool"]["after commit"] == ([("reset", False, 0)], 1)
