"""A network black hole cannot hold a blocking invocation past its deadline (issue 7 §1).

Each test runs ``@with_connection`` handlers against the real PostgreSQL through the
fault proxy (``lp_fault_proxy``), makes the network a black hole (bytes accepted, never
answered, nothing closed) at one step, and checks what a user relies on:

* the handler's caller gets :class:`~lambda_pool.exc.DeadlineExceededError` naming the
  step, within the invocation's remaining time (a bound, not a speed claim);
* the write is all or nothing, read from another connection;
* the connection was discarded: once the network heals its backend ends;
* the next invocation works at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from deadline_support import Scene, Stopwatch, insert_sql, scene

from lambda_pool import create_engine, deadline, exc, with_connection
from lambda_pool.testing.context import LambdaContext

__all__ = ["scene"]  # the fixture, imported for pytest

REMAINING_MS = 2000
MARGIN_MS = 200
ROWS = 5

# What users put in connect_args hoping to bound a silent network: none of them bounds
# a black hole that keeps TCP up (the fourth row).
SOCKET_OPTIONS = {
    "connect_timeout": 2,
    "keepalives": 1,
    "keepalives_idle": 1,
    "keepalives_interval": 1,
    "keepalives_count": 1,
    "tcp_user_timeout": 1000,
}


def _handler(scene: Scene, **options: Any) -> Callable[..., Any]:
    if "engine" not in options:
        options.setdefault("warm", True)
        options["url"] = scene.url()

    @with_connection(timeout_margin_ms=MARGIN_MS, **options)
    def handler(event: dict[str, Any], context: Any, connection: Any) -> Any:
        first = int(event.get("first", 1))
        action = event.get("action", "write")
        if action == "select":
            return connection.execute("SELECT 1").fetchone()[0]
        connection.execute(insert_sql(scene.table, first, ROWS))
        if action == "hole_before_commit":
            scene.proxy.black_hole()
        elif action == "sleep":
            connection.execute("SELECT pg_sleep(5)")
        elif action == "commit_then_hole":
            connection.commit()
            scene.proxy.black_hole()
        return ROWS

    return handler


def _context() -> LambdaContext:
    return LambdaContext(remaining_ms=REMAINING_MS)


def _fails_by_the_deadline(handler: Callable[..., Any], event: dict[str, Any], step: str) -> None:
    watch = Stopwatch()
    with pytest.raises(exc.DeadlineExceededError) as caught:
        handler(event, _context())
    elapsed = watch.seconds()
    assert caught.value.step == step
    assert elapsed < REMAINING_MS / 1000, f"{step}: {elapsed:.3f} s"
    # It started with at most the remaining time minus the margin, and says so.
    assert 0 <= caught.value.remaining_ms <= REMAINING_MS - MARGIN_MS
    assert f"{caught.value.remaining_ms} ms left" in str(caught.value)


def _recovers(scene: Scene, handler: Callable[..., Any], rows_before: int) -> None:
    scene.heal_and_check_gone()
    watch = Stopwatch()
    assert handler({"action": "write", "first": 1000}, _context()) == ROWS
    assert watch.seconds() < REMAINING_MS / 1000
    assert scene.rows() == rows_before + ROWS


def _hole_after(proxy_action: Callable[[], None], seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, proxy_action)
    timer.start()
    return timer


def test_idle_past_the_pre_ping_threshold_then_black_hole_fails_in_the_pre_ping(
    scene: Scene,
) -> None:
    handler = _handler(scene, pre_ping_idle_seconds=0.2)
    assert handler({"action": "select"}, _context()) == 1
    time.sleep(0.4)
    scene.proxy.black_hole()
    _fails_by_the_deadline(handler, {"action": "write"}, "pre-ping")
    assert scene.rows() == 0
    assert handler.engine.pool.stats.pre_ping_failures == 1  # type: ignore[attr-defined]
    _recovers(scene, handler, 0)


@pytest.mark.parametrize("connect_args", [None, SOCKET_OPTIONS], ids=["plain", "socket_options"])
def test_back_to_back_invocations_then_black_hole_fail_in_the_first_statement(
    scene: Scene, connect_args: dict[str, Any] | None
) -> None:
    options = {"connect_args": connect_args} if connect_args else {}
    handler = _handler(scene, **options)
    assert handler({"action": "write", "first": 1}, _context()) == ROWS
    scene.proxy.black_hole()
    _fails_by_the_deadline(handler, {"action": "write", "first": 100}, "statement")
    assert scene.rows() == ROWS
    _recovers(scene, handler, ROWS)


@pytest.mark.parametrize("connect_args", [None, SOCKET_OPTIONS], ids=["plain", "socket_options"])
def test_black_hole_during_a_running_query_fails_the_statement_and_writes_nothing(
    scene: Scene, connect_args: dict[str, Any] | None
) -> None:
    options = {"connect_args": connect_args} if connect_args else {}
    handler = _handler(scene, **options)
    assert handler({"action": "select"}, _context()) == 1
    timer = _hole_after(scene.proxy.black_hole, 0.3)
    try:
        _fails_by_the_deadline(handler, {"action": "sleep", "first": 1}, "statement")
    finally:
        timer.join()
    scene.heal_and_check_gone()
    assert scene.rows() == 0  # the INSERT before the sleep was never committed
    _recovers(scene, handler, 0)


@pytest.mark.parametrize("warm", [False, True], ids=["nullpool", "warm_first_connect"])
def test_a_new_connect_into_a_black_hole_fails_in_connect(scene: Scene, warm: bool) -> None:
    handler = _handler(scene, warm=warm)
    scene.proxy.black_hole()  # accepts the TCP connection, never answers the startup
    _fails_by_the_deadline(handler, {"action": "write"}, "connect")
    assert scene.proxy.counters().connections_accepted >= 1
    assert scene.rows() == 0
    _recovers(scene, handler, 0)


def test_connect_bound_holds_with_a_libpq_connect_timeout_longer_than_the_deadline(
    scene: Scene,
) -> None:
    handler = _handler(scene, warm=False, connect_args={"connect_timeout": 30})
    scene.proxy.black_hole()
    _fails_by_the_deadline(handler, {"action": "write"}, "connect")
    _recovers(scene, handler, 0)


def test_black_hole_at_commit_fails_the_commit_and_the_write_is_all_or_nothing(
    scene: Scene,
) -> None:
    handler = _handler(scene)
    assert handler({"action": "select"}, _context()) == 1
    _fails_by_the_deadline(handler, {"action": "hole_before_commit", "first": 1}, "commit")
    scene.heal_and_check_gone()
    # The COMMIT was sent before the hole answered nothing: whether it landed is
    # unknown to the client, but never half of it.
    assert scene.rows() in (0, ROWS)
    before = scene.rows()
    _recovers(scene, handler, before)


def test_black_hole_at_the_reset_on_return_keeps_the_committed_result_and_discards_the_connection(
    scene: Scene,
) -> None:
    """The handler's transaction is committed before the reset (``DISCARD ALL``) runs:
    the invocation returns its result (failing it would make a caller retry work that
    is done); the reset is bounded and its connection dropped."""
    handler = _handler(scene)
    assert handler({"action": "select"}, _context()) == 1
    watch = Stopwatch()
    assert handler({"action": "commit_then_hole", "first": 1}, _context()) == ROWS
    assert watch.seconds() < REMAINING_MS / 1000
    assert scene.rows() == ROWS
    before_connects = scene.proxy.counters().connections_accepted
    _recovers(scene, handler, ROWS)
    # The next invocation had to open a new connection: the old one was not reused.
    assert scene.proxy.counters().connections_accepted == before_connects + 1


def test_queue_pool_engine_black_hole_fails_the_statement(scene: Scene) -> None:
    engine = create_engine(scene.url(), pool_size=1, max_overflow=0)
    handler = _handler(scene, engine=engine)
    assert handler({"action": "write", "first": 1}, _context()) == ROWS
    scene.proxy.black_hole()
    _fails_by_the_deadline(handler, {"action": "write", "first": 100}, "statement")
    assert engine.pool.checkedout() == 0
    _recovers(scene, handler, ROWS)
    engine.dispose()


def test_deadline_block_bounds_a_plain_engine_outside_the_decorator(scene: Scene) -> None:
    engine = create_engine(scene.url())
    try:
        with engine.connect() as conn:
            conn.execute(insert_sql(scene.table, 1, ROWS))
            scene.proxy.black_hole()
            watch = Stopwatch()
            with pytest.raises(exc.DeadlineExceededError) as caught, deadline(0.5):
                conn.commit()
            assert watch.seconds() < 1.0
            assert caught.value.step == "commit"
            assert "Whether the transaction committed is unknown" in str(caught.value)
            assert conn.invalidated
        scene.heal_and_check_gone()
        assert scene.rows() in (0, ROWS)
    finally:
        engine.dispose()


def test_sqlalchemy_adapter_black_hole_fails_the_statement_by_the_deadline(
    scene: Scene,
) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    from lambda_pool.sqlalchemy import create_engine as sa_create_engine

    engine = sa_create_engine(scene.url(), warm=True)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT 1")).scalar() == 1
        scene.proxy.black_hole()
        watch = Stopwatch()
        with (
            pytest.raises(exc.DeadlineExceededError) as caught,
            deadline(1.0),
            engine.begin() as conn,
        ):
            conn.execute(sqlalchemy.text(insert_sql(scene.table, 1, ROWS)))
        assert watch.seconds() < 1.5
        assert caught.value.step == "statement"
        scene.heal_and_check_gone()
        assert scene.rows() == 0
        with deadline(2.0), engine.begin() as conn:
            conn.execute(sqlalchemy.text(insert_sql(scene.table, 1, ROWS)))
        assert scene.rows() == ROWS
    finally:
        engine.dispose()


def _own_threads() -> set[threading.Thread]:
    """Live threads, without the fault proxy's own (the test's tool, not the code under test)."""
    return {t for t in threading.enumerate() if not t.name.startswith("lambda-pool-fault-proxy")}


def test_a_black_holed_invocation_leaves_no_thread_or_timer_behind(scene: Scene) -> None:
    handler = _handler(scene)
    assert handler({"action": "select"}, _context()) == 1
    before = _own_threads()
    scene.proxy.black_hole()
    _fails_by_the_deadline(handler, {"action": "write"}, "statement")
    # Lambda freezes the process now: nothing of ours may still be running.
    assert _own_threads() == before
    _recovers(scene, handler, 0)


def test_black_hole_in_the_middle_of_a_reply_fails_the_statement(scene: Scene) -> None:
    handler = _handler(scene)
    assert handler({"action": "select"}, _context()) == 1
    scene.proxy.black_hole_mid_reply(3)  # a few bytes of the next reply, then silence
    _fails_by_the_deadline(handler, {"action": "write"}, "statement")
    assert scene.rows() == 0
    _recovers(scene, handler, 0)
