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


def test_engine_and_instance_listeners_order_after_class_level() -> None:
    order: list[str] = []
    eng = FakeEngine()
    event.listen(eng.pool, "checkout", lambda *a: order.append("pool"))
    event.listen(eng, "checkout", lambda *a: order.append("engine"))
    eng.pool.connect().close()
    assert order == ["engine", "pool"]
