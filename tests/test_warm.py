"""The warm-container cache against the real embedded PostgreSQL: one connection reused
across invocations only when safe, replaced invisibly when not, never shared, and reset
so nothing leaks from one invocation to the next.

The pool-level tests drive :class:`lambda_pool.warm.WarmPool` with a psycopg creator and
the psycopg dialect, exactly as the engine does; ``test_warm_engine.py`` covers the
engine-level cache.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import FakeClock, in_forked_child

from lambda_pool import event, lifecycle
from lambda_pool.dialects.psycopg import PsycopgDialect
from lambda_pool.exc import ArgumentError
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import (
    CREDENTIALS_EXPIRE_AT,
    ConnectionState,
    Ping,
    Replace,
    ReplaceReason,
    Reuse,
    ReusePolicy,
    WarmPool,
    decide_reuse,
    pre_ping_idle_seconds_from_env,
)

psycopg = pytest.importorskip("psycopg")


@pytest.fixture
def make_pool(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> Iterator[Callable[..., WarmPool]]:
    pools: list[WarmPool] = []

    def make(**kwargs: Any) -> WarmPool:
        connect_args = {"application_name": unique_application_name, "prepare_threshold": None}
        connect_args.update(kwargs.pop("connect_args", {}))

        def creator() -> Any:
            return psycopg.connect(embedded_postgres.dsn, **connect_args)

        pool = WarmPool(creator, dialect=PsycopgDialect(), **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.dispose()


def _backend_pid(conn: Any) -> int:
    row = conn.execute("SELECT pg_backend_pid()").fetchone()
    return int(row[0])


# -- the I/O-free decision ------------------------------------------------------------------


def _state(**overrides: Any) -> ConnectionState:
    base: dict[str, Any] = dict(
        opener_pid=10,
        current_pid=10,
        opened_generation=0,
        current_generation=0,
        opened_at=1000.0,
        last_used_at=1000.0,
        closed=False,
        idle=True,
    )
    base.update(overrides)
    return ConnectionState(**base)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"current_pid": 11}, Replace(ReplaceReason.FORKED)),
        ({"current_generation": 1}, Replace(ReplaceReason.RESTORED)),
        ({"closed": True}, Replace(ReplaceReason.CLOSED)),
        ({"reset_failed": True}, Replace(ReplaceReason.RESET_FAILED)),
        ({"idle": False}, Replace(ReplaceReason.NOT_IDLE)),
        ({"credentials_expire_at": 1005.0}, Replace(ReplaceReason.CREDENTIALS_EXPIRED)),
        ({"credentials_expire_at": 1100.0}, Reuse()),
        ({"pending_input": True}, Ping(10.0)),
        ({}, Reuse()),
    ],
)
def test_decide_reuse_names_the_first_failed_rule(
    overrides: dict[str, Any], expected: object
) -> None:
    assert decide_reuse(_state(**overrides), now=1010.0) == expected


def test_decide_reuse_pings_only_after_the_idle_threshold() -> None:
    policy = ReusePolicy(pre_ping_idle_seconds=60)
    assert decide_reuse(_state(), 1060.0, policy) == Reuse()
    assert decide_reuse(_state(), 1060.5, policy) == Ping(60.5)
    # A wall clock that went backwards: idle time unknown, so check.
    assert decide_reuse(_state(), 999.0, policy) == Ping(None)
    assert decide_reuse(_state(), 1000.0, ReusePolicy(pre_ping_idle_seconds=0)) == Ping(0.0)
    assert decide_reuse(_state(), 9e9, ReusePolicy(pre_ping_idle_seconds=None)) == Reuse()


def test_decide_reuse_recycle_and_credentials_switches() -> None:
    assert decide_reuse(_state(), 1301.0, ReusePolicy(recycle=300)) == Replace(
        ReplaceReason.RECYCLE
    )
    expired = _state(credentials_expire_at=1001.0)
    off = ReusePolicy(recycle_on_credentials_expiry=False, pre_ping_idle_seconds=None)
    assert decide_reuse(expired, 1010.0, off) == Reuse()


def test_forked_replacement_must_not_close() -> None:
    assert not Replace(ReplaceReason.FORKED).may_close
    assert Replace(ReplaceReason.CLOSED).may_close


def test_pre_ping_idle_seconds_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", raising=False)
    assert pre_ping_idle_seconds_from_env() == 60.0
    monkeypatch.setenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", "5.5")
    assert pre_ping_idle_seconds_from_env() == 5.5
    monkeypatch.setenv("LAMBDA_POOL_PRE_PING_IDLE_SECONDS", "soon")
    with pytest.raises(ArgumentError, match="LAMBDA_POOL_PRE_PING_IDLE_SECONDS"):
        pre_ping_idle_seconds_from_env()


# -- WarmPool against PostgreSQL -------------------------------------------------------------


def test_hundred_warm_checkouts_use_exactly_one_backend(
    make_pool: Callable[..., WarmPool],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    pool = make_pool()
    pids = set()
    for _ in range(100):
        with pool.connect() as conn:
            pids.add(_backend_pid(conn))
            assert embedded_postgres.backend_count(unique_application_name) == 1
    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert pool.stats.as_dict() == {
        "opened": 1,
        "reused": 99,
        "replaced": {},
        "pre_pings": 0,
        "pre_ping_failures": 0,
        "overflow_connections": 0,
    }
    assert (pool.size(), pool.checkedin(), pool.checkedout(), pool.overflow()) == (1, 1, 0, 0)


def test_terminated_backend_is_replaced_and_the_caller_sees_no_error(
    make_pool: Callable[..., WarmPool],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    pool = make_pool()
    with pool.connect() as conn:
        first = _backend_pid(conn)
    assert embedded_postgres.terminate(unique_application_name) == 1
    with pool.connect() as conn:
        second = _backend_pid(conn)
    assert second != first
    assert embedded_postgres.backend_count(unique_application_name) == 1
    # Back to back (far under the idle threshold): the server's goodbye waiting on the
    # socket is what triggered the check.
    assert pool.stats.pre_pings == 1
    assert pool.stats.replaced == {"pre_ping_failed": 1}


def test_forked_child_never_uses_the_parents_connection(
    make_pool: Callable[..., WarmPool],
) -> None:
    pool = make_pool()
    with pool.connect() as conn:
        parent_backend = _backend_pid(conn)

    def in_child() -> int:
        with pool.connect() as conn:
            pid = _backend_pid(conn)
        pool.dispose()
        return pid

    assert in_forked_child(in_child) != parent_backend
    # The child dropped (and at exit closed) only its own copy: the parent's session lives.
    with pool.connect() as conn:
        assert _backend_pid(conn) == parent_backend
    assert pool.stats.opened == 1


def test_two_threads_at_once_get_two_backends_and_the_separate_one_is_closed(
    make_pool: Callable[..., WarmPool],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    pool = make_pool()
    barrier = threading.Barrier(2)
    pids: list[int] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            with pool.connect() as conn:
                pids.append(_backend_pid(conn))
                barrier.wait(timeout=10)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(pids)) == 2
    assert pool.stats.overflow_connections == 1
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1
    with pool.connect() as conn:
        assert _backend_pid(conn) in pids
    assert pool.overflow() == 0


def test_exception_mid_transaction_leaves_no_session_state(
    make_pool: Callable[..., WarmPool],
) -> None:
    pool = make_pool()
    with pytest.raises(RuntimeError), pool.connect() as conn:
        first = _backend_pid(conn)
        conn.execute("SET statement_timeout = 1234")
        conn.execute("CREATE TEMP TABLE scratch (x int)")
        conn.execute("PREPARE leaked AS SELECT 1")
        conn.execute("SELECT pg_advisory_lock(4242)")
        raise RuntimeError("handler failed mid-transaction")
    with pool.connect() as conn:
        assert _backend_pid(conn) == first
        row = conn.execute(
            "SELECT current_setting('statement_timeout'),"
            " (SELECT count(*) FROM pg_prepared_statements),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            "    AND pid = pg_backend_pid()),"
            " to_regclass('pg_temp.scratch') IS NULL"
        ).fetchone()
        assert row == ("0", 0, 0, True)


def test_committed_session_state_and_autocommit_work_are_discarded(
    make_pool: Callable[..., WarmPool],
) -> None:
    pool = make_pool()
    with pool.connect() as conn:
        conn.autocommit = True
        conn.execute("SET search_path = pg_catalog")
        conn.execute("SELECT pg_advisory_lock(7)")
        conn.autocommit = False
    with pool.connect() as conn:
        row = conn.execute(
            "SELECT current_setting('search_path'),"
            " (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
            "    AND pid = pg_backend_pid())"
        ).fetchone()
        assert row is not None
        assert row[0] != "pg_catalog"
        assert row[1] == 0


def test_auto_prepared_statements_stay_consistent_across_discard(
    make_pool: Callable[..., WarmPool],
) -> None:
    # Preparation turned back on by the user: psycopg's cache must follow DISCARD ALL.
    pool = make_pool(connect_args={"prepare_threshold": 0})
    for invocation in range(10):
        with pool.connect() as conn:
            for i in range(3):
                row = conn.execute("SELECT %s::int + 1", (i,)).fetchone()
                assert row == (i + 1,), invocation
    assert pool.stats.opened == 1


def test_transaction_pooling_skips_discard_all(make_pool: Callable[..., WarmPool]) -> None:
    pool = make_pool(transaction_pooling=True)
    with pool.connect() as conn:
        conn.execute("CREATE TEMP TABLE survives_without_discard (x int)")
        conn.commit()
    with pool.connect() as conn:
        row = conn.execute("SELECT to_regclass('pg_temp.survives_without_discard')").fetchone()
        assert row is not None and row[0] is not None


def test_pre_ping_skipped_under_the_idle_threshold_and_done_over_it(
    make_pool: Callable[..., WarmPool],
) -> None:
    clock = FakeClock()
    pool = make_pool(pre_ping_idle_seconds=60, clock=clock)
    pings: list[bool] = []

    def on_event(name: str, details: Any) -> None:
        if name == "pre_ping":
            pings.append(details["ok"])

    pool.stats.add_listener(on_event)
    with pool.connect():
        pass
    for _ in range(5):
        clock.advance(59)  # back-to-back invocations: no round trip
        with pool.connect():
            pass
    assert pool.stats.pre_pings == 0
    clock.advance(61)  # frozen longer than the threshold
    with pool.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert pool.stats.pre_pings == 1
    assert pings == [True]
    assert pool.stats.opened == 1


def test_frozen_connection_dropped_by_the_network_is_replaced_after_pre_ping(
    make_pool: Callable[..., WarmPool],
) -> None:
    clock = FakeClock()
    pool = make_pool(clock=clock)
    with pool.connect() as conn:
        first = _backend_pid(conn)
    # Stand-in for a NAT dropping the flow while frozen: the socket is dead but the
    # driver has not noticed (shutdown() sends nothing the server answers to).
    with pool.connect() as conn:
        pass
    record = pool._warm.record  # white-box only to reach the socket
    assert record is not None
    import socket

    sock = socket.socket(fileno=os.dup(record.dbapi_connection.fileno()))
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    clock.advance(400)
    with pool.connect() as conn:
        assert _backend_pid(conn) != first
    assert pool.stats.pre_ping_failures == 1
    assert pool.stats.replaced == {"pre_ping_failed": 1}


def test_recycle_at_credentials_expiry_with_an_injected_clock(
    make_pool: Callable[..., WarmPool],
) -> None:
    clock = FakeClock()
    pool = make_pool(clock=clock)

    @event.listens_for(pool, "connect")
    def stamp_expiry(dbapi: Any, record: Any) -> None:
        # What the engine does for a credentials provider (docs/ARCHITECTURE.md).
        record.info[CREDENTIALS_EXPIRE_AT] = clock() + 840

    with pool.connect() as conn:
        first = _backend_pid(conn)
    clock.advance(839)
    with pool.connect() as conn:
        assert _backend_pid(conn) == first
    clock.advance(2)
    with pool.connect() as conn:
        assert _backend_pid(conn) != first
    assert pool.stats.replaced == {"credentials_expired": 1}


def test_snapstart_restore_replaces_the_connection(
    make_pool: Callable[..., WarmPool], monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = make_pool()
    with pool.connect() as conn:
        first = _backend_pid(conn)
    # What _after_restore() counts first (its dispose_all() would close the connection
    # itself, hiding whether the generation rule replaces it).
    monkeypatch.setattr(lifecycle, "_restore_generation", lifecycle.restore_generation() + 1)
    with pool.connect() as conn:
        assert _backend_pid(conn) != first
    assert pool.stats.replaced == {"restored": 1}


def test_connection_left_in_a_transaction_is_replaced(make_pool: Callable[..., WarmPool]) -> None:
    pool = make_pool(reset_on_return=None)
    with pool.connect() as conn:
        first = _backend_pid(conn)
    # An invocation's transaction still open at the next checkout (here opened behind the
    # pool's back, since the reset on return always ends one) must not be handed on.
    record = pool._warm.record
    assert record is not None
    record.dbapi_connection.execute("SELECT 1")  # opens a transaction behind the pool
    with pool.connect() as conn:
        assert _backend_pid(conn) != first
    assert pool.stats.replaced == {"not_idle": 1}


def test_dispose_closes_the_warm_connection(
    make_pool: Callable[..., WarmPool],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    pool = make_pool()
    with pool.connect():
        pass
    pool.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
    with pool.connect() as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_negative_pre_ping_idle_seconds_is_refused() -> None:
    with pytest.raises(ArgumentError, match="pre_ping_idle_seconds"):
        WarmPool(lambda: None, pre_ping_idle_seconds=-1)
