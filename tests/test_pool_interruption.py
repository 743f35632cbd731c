"""Interrupted returns and invalidations give the slot back, side by side with SQLAlchemy.

Each scenario runs through SQLAlchemy 2.1's ``sqlalchemy.pool`` and through
``lambda_pool.pool`` with the same public calls; the test asserts that lambda-pool
observes what SQLAlchemy observes (events, counters, what propagates, whether the next
checkout works).  An interruption is a ``KeyboardInterrupt`` (what a local run's Ctrl-C,
and in spirit a Lambda timeout, is), a listener that raises, or a cancelled task.  The
rule: whatever is interrupted, the slot comes back (or the connection is detached and
closed) and ``status()`` stays true.

The connections are real sqlite3 connections whose ``rollback``/``close`` can be told
to raise once: the fault is injected at the driver call, as a signal would arrive.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sqlite3
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest

from lambda_pool.testing.postgres import PostgresServer

EVENTS = ("connect", "reset", "invalidate", "close", "checkin", "detach", "close_detached")


def implementations() -> dict[str, tuple[ModuleType, ModuleType]]:
    """name -> (pool module, event module) for the reference and for lambda-pool."""
    import sqlalchemy.event
    import sqlalchemy.pool

    import lambda_pool.event
    import lambda_pool.pool

    return {
        "sqlalchemy": (sqlalchemy.pool, sqlalchemy.event),
        "lambda_pool": (lambda_pool.pool, lambda_pool.event),
    }


class FaultyConnection(sqlite3.Connection):
    """A sqlite3 connection whose next rollback or close raises what it is given."""

    rollback_raises: BaseException | None = None
    close_raises: BaseException | None = None
    closed_for_real = False

    def rollback(self) -> None:
        error, self.rollback_raises = self.rollback_raises, None
        if error is not None:
            raise error
        super().rollback()

    def close(self) -> None:
        error, self.close_raises = self.close_raises, None
        if error is not None:
            raise error
        self.closed_for_real = True
        super().close()


def faulty_connect() -> FaultyConnection:
    connection = sqlite3.connect(":memory:", factory=FaultyConnection, check_same_thread=False)
    assert isinstance(connection, FaultyConnection)
    return connection


class Recorder:
    """A one-slot QueuePool of either implementation with every event recorded."""

    def __init__(self, name: str) -> None:
        pool_module, self.event = implementations()[name]
        self.pool = pool_module.QueuePool(faulty_connect, pool_size=1, max_overflow=0, timeout=0.1)
        self.seen: list[str] = []
        for event_name in EVENTS:
            self.event.listen(self.pool, event_name, self._recorder(event_name))

    def _recorder(self, event_name: str) -> Callable[..., None]:
        return lambda *args: self.seen.append(event_name)

    def counters(self) -> tuple[int, int]:
        return self.pool.checkedin(), self.pool.checkedout()

    def listen_once_raising(self, event_name: str, error: BaseException) -> None:
        raised: list[bool] = []

        def listener(*args: Any) -> None:
            if not raised:
                raised.append(True)
                raise error

        self.event.listen(self.pool, event_name, listener)

    def next_checkout_works(self) -> bool:
        try:
            proxy = self.pool.connect()
        except Exception:
            return False
        proxy.cursor().execute("SELECT 1")
        proxy.close()
        return True


def run(action: Callable[[], None]) -> str | None:
    """Call ``action``; the name of what it raised (KeyboardInterrupt included), or None."""
    try:
        action()
    except BaseException as error:
        return type(error).__name__
    return None


def observe(name: str, scenario: Callable[[Recorder], str | None]) -> dict[str, Any]:
    recorder = Recorder(name)
    raised = scenario(recorder)
    counters_after = recorder.counters()
    gc.collect()  # the slot must be back without garbage collection's help
    return {
        "raised": raised,
        "events": list(recorder.seen),
        "counters": counters_after,
        "next checkout works": recorder.next_checkout_works(),
        "counters at the end": recorder.counters(),
    }


def reset_listener_raises(error: BaseException) -> Callable[[Recorder], str | None]:
    def scenario(recorder: Recorder) -> str | None:
        proxy = recorder.pool.connect()
        recorder.listen_once_raising("reset", error)
        return run(proxy.close)

    return scenario


def rollback_raises(error: BaseException) -> Callable[[Recorder], str | None]:
    def scenario(recorder: Recorder) -> str | None:
        proxy = recorder.pool.connect()
        proxy.dbapi_connection.rollback_raises = error
        return run(proxy.close)

    return scenario


def invalidate_listener_raises(error: BaseException) -> Callable[[Recorder], str | None]:
    def scenario(recorder: Recorder) -> str | None:
        proxy = recorder.pool.connect()
        recorder.listen_once_raising("invalidate", error)
        outcome = run(proxy.invalidate)
        assert not proxy.is_valid  # the proxy is finished with, whatever happened
        return outcome

    return scenario


SCENARIOS = {
    "reset listener raises KeyboardInterrupt": reset_listener_raises(KeyboardInterrupt()),
    "rollback raises KeyboardInterrupt": rollback_raises(KeyboardInterrupt()),
    "invalidate listener raises RuntimeError": invalidate_listener_raises(RuntimeError("x")),
    "invalidate listener raises KeyboardInterrupt": invalidate_listener_raises(KeyboardInterrupt()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_an_interrupted_return_or_invalidation_gives_the_slot_back_as_sqlalchemy_does(
    scenario: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.CRITICAL)  # "Exception during reset" tracebacks: expected
    reference = observe("sqlalchemy", SCENARIOS[scenario])
    ours = observe("lambda_pool", SCENARIOS[scenario])
    assert ours == reference
    # The rule, stated on its own: the slot is back and the counters say so.
    assert ours["counters"] == (1, 0)
    assert ours["next checkout works"]


def test_an_invalidate_listener_that_raises_leaves_the_connection_to_be_replaced() -> None:
    """SQLAlchemy keeps the connection in its slot, never hands it out again as it is,
    and replaces it at the next checkout (close -> connect)."""
    results = {}
    for name in ("sqlalchemy", "lambda_pool"):
        recorder = Recorder(name)
        proxy = recorder.pool.connect()
        first = proxy.dbapi_connection
        recorder.listen_once_raising("invalidate", RuntimeError("listener"))
        run(proxy.invalidate)
        recorder.seen.clear()
        again = recorder.pool.connect()
        results[name] = (again.dbapi_connection is first, first.closed_for_real, recorder.seen)
        again.close()
    assert results["lambda_pool"] == results["sqlalchemy"]
    assert results["lambda_pool"][:2] == (False, True)


@pytest.mark.parametrize("path", ["invalidate", "NullPool return"])
def test_a_close_interrupted_by_keyboardinterrupt_is_logged_and_propagates(
    path: str, caplog: pytest.LogCaptureFixture
) -> None:
    observed = {}
    for name in ("sqlalchemy", "lambda_pool"):
        pool_module, _ = implementations()[name]
        if path == "invalidate":
            pool = pool_module.QueuePool(faulty_connect, pool_size=1, max_overflow=0)
        else:
            pool = pool_module.NullPool(faulty_connect)
        proxy = pool.connect()
        proxy.dbapi_connection.close_raises = KeyboardInterrupt()
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            raised = run(proxy.invalidate if path == "invalidate" else proxy.close)
        messages = [
            record.getMessage().split(" <")[0]
            for record in caplog.records
            if record.levelno >= logging.ERROR
        ]
        counters = (pool.checkedin(), pool.checkedout()) if path == "invalidate" else None
        observed[name] = (raised, messages, counters)
    assert observed["lambda_pool"] == observed["sqlalchemy"]
    assert observed["lambda_pool"][0] == "KeyboardInterrupt"
    assert observed["lambda_pool"][1] in (
        ["Exception terminating connection"],
        ["Exception closing connection"],
    )


# --------------------------------------------------------------------------- asyncio


async def _cancel_close_during_rollback(
    connection: Any, close: Callable[[], Any], reset_seen: list[str]
) -> str:
    """Close ``connection`` in a task and cancel the task while its rollback awaits."""
    task = asyncio.ensure_future(close())
    for _ in range(100):  # run the task until it waits on the server for the rollback
        await asyncio.sleep(0)
        if reset_seen:
            break
    assert reset_seen, "the close never reached its reset"
    assert not task.done()
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "CancelledError"
    return "finished"


async def test_a_cancelled_aclose_gives_the_slot_back_as_sqlalchemy_does(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    """A task cancelled at a timeout while the pool's return awaits its rollback.

    The transaction is opened on the driver connection itself, so that the rollback
    awaited is the pool's reset (SQLAlchemy's engine ``Connection`` would otherwise roll
    back its own transaction before the pool's reset starts).
    """
    import psycopg
    from sqlalchemy import event as sa_event
    from sqlalchemy.ext.asyncio import create_async_engine as sa_create_async_engine

    from lambda_pool import event
    from lambda_pool.pool import AsyncAdaptedQueuePool

    url = embedded_postgres.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
    sa_engine = sa_create_async_engine(
        url,
        pool_size=1,
        max_overflow=0,
        pool_timeout=0.5,
        connect_args={"application_name": unique_application_name},
    )
    sa_reset: list[str] = []
    sa_event.listen(sa_engine.sync_engine, "reset", lambda *args: sa_reset.append("reset"))
    sa_connection = await sa_engine.connect()
    raw = await sa_connection.get_raw_connection()
    driver: Any = raw.driver_connection
    await driver.execute("SELECT 1")  # a transaction is open on the driver
    sa_raised = await _cancel_close_during_rollback(sa_connection, sa_connection.close, sa_reset)
    sa_pool: Any = sa_engine.sync_engine.pool
    reference = (sa_raised, sa_pool.checkedin(), sa_pool.checkedout())
    async with sa_engine.connect() as sa_again:  # the next checkout works
        assert (await sa_again.exec_driver_sql("SELECT 1")).scalar() == 1
    await sa_engine.dispose()

    async def connect() -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            embedded_postgres.dsn, application_name=unique_application_name
        )

    pool = AsyncAdaptedQueuePool(connect, pool_size=1, max_overflow=0, timeout=0.5)
    reset_seen: list[str] = []
    event.listen(pool, "reset", lambda *args: reset_seen.append("reset"))
    proxy = await pool.aconnect()
    await proxy.execute("SELECT 1")  # a transaction is open on the driver
    raised = await _cancel_close_during_rollback(proxy, proxy.aclose, reset_seen)
    ours = (raised, pool.checkedin(), pool.checkedout())
    assert ours == reference
    assert ours == ("CancelledError", 1, 0)
    again = await pool.aconnect()  # the next checkout works (and is not a broken one)
    cursor = await again.execute("SELECT 1")
    assert (await cursor.fetchone()) == (1,)
    await again.aclose()
    await pool.adispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
