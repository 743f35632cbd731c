"""``engine.dispose()`` with connections checked out: they close when returned, and at shutdown.

SQLAlchemy's ``Engine.dispose()`` replaces the pool and lets connections checked out at
that moment go back to the replaced pool, where they stay open, idle, until that pool is
garbage-collected.  lambda-pool deliberately differs (README, "deliberate differences"):
the replaced pool closes every connection returned to it, and the shutdown path
(``lifecycle.dispose_all()``: SIGTERM, ``atexit``, SnapStart's before-snapshot hook)
closes the ones still out too.  Everything here runs against the real PostgreSQL the
tests start and counts server backends in ``pg_stat_activity``.
"""

from __future__ import annotations

import gc
import random
import signal
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_lifecycle import Child

from lambda_pool import create_engine, event, lifecycle
from lambda_pool.asyncio import create_async_engine
from lambda_pool.testing.postgres import PostgresServer


@pytest.fixture
def url(embedded_postgres: PostgresServer, unique_application_name: str) -> str:
    return f"{embedded_postgres.dsn}?application_name={unique_application_name}"


@pytest.fixture
def no_gc() -> Iterator[None]:
    """Garbage collection off: what closes a connection here is the pool, not the collector."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_sqlalchemy_keeps_them_open_until_gc_and_lambda_pool_closes_them_on_return(
    embedded_postgres: PostgresServer, unique_application_name: str, no_gc: None
) -> None:
    import sqlalchemy

    app = unique_application_name
    observed = {}
    for name, make_engine in (
        ("sqlalchemy", sqlalchemy.create_engine),
        ("lambda_pool", create_engine),
    ):
        engine = make_engine(
            embedded_postgres.dsn.replace("postgresql://", "postgresql+psycopg://", 1),
            pool_size=2,
            max_overflow=0,
            connect_args={"application_name": app},
        )
        held = [engine.connect(), engine.connect()]
        for connection in held:
            connection.exec_driver_sql("SELECT 1")
        assert embedded_postgres.wait_for_backend_count(2, app) == 2
        engine.dispose()
        after_dispose = embedded_postgres.backend_count(app)
        for connection in held:
            connection.close()
        time.sleep(0.2)  # a backend leaves pg_stat_activity a moment after its client
        observed[name] = (after_dispose, embedded_postgres.backend_count(app))
        del held
        gc.collect()  # SQLAlchemy's replaced pool closes them only now
        engine.dispose()
        assert embedded_postgres.wait_for_backend_count(0, app) == 0
    assert observed["sqlalchemy"] == (2, 2)  # the recorded difference, observed now
    assert observed["lambda_pool"] == (2, 0)


def test_an_async_engine_closes_them_on_return_too(
    embedded_postgres: PostgresServer, unique_application_name: str, no_gc: None
) -> None:
    import asyncio

    async def scenario() -> int:
        url = embedded_postgres.dsn.replace("postgresql://", "postgresql+psycopg://", 1)
        engine = create_async_engine(url, pool_size=2, max_overflow=0)
        event.listen(engine, "connect", lambda *args: None)
        held = [await engine.connect(), await engine.connect()]
        for connection in held:
            await connection.execute(f"SET application_name = '{unique_application_name}'")
            await connection.commit()
        await engine.dispose()
        for connection in held:
            await connection.close()
        return embedded_postgres.wait_for_backend_count(0, unique_application_name)

    assert asyncio.run(scenario()) == 0


def test_dispose_all_closes_the_ones_still_checked_out_of_a_replaced_pool(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str, no_gc: None
) -> None:
    engine = create_engine(url, pool_size=2, max_overflow=0)
    held = [engine.connect(), engine.connect()]
    for connection in held:
        connection.execute("SELECT 1")
    engine.dispose()  # both are out: the replaced pool still owns them
    current = engine.connect()  # and one from the new pool
    current.execute("SELECT 1")
    assert embedded_postgres.wait_for_backend_count(3, unique_application_name) == 3

    assert lifecycle.dispose_all() == 0
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0

    for connection in [*held, current]:
        connection.close()  # returning a closed connection is fine
    with engine.connect() as connection:  # and the engine goes on
        assert connection.execute("SELECT 1").scalar() == 1
    engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


class Census:
    """What the process holds: connections in threads' hands, idle in the live pool, and
    closed by this client (their backends may linger a moment in pg_stat_activity)."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.lock = threading.Lock()
        self.in_hand = 0  # from before connect() to after close() returned
        self.disposing = 0  # idle connections a running dispose() may hold: at most pool_size
        self.closed_pids: set[int] = set()
        event.listen(engine, "close", self._closed)

    def _closed(self, dbapi: Any, record: Any) -> None:
        with self.lock:
            self.closed_pids.add(dbapi.info.backend_pid)

    def holdable(self) -> tuple[int, int, int]:
        with self.lock:
            return self.engine.pool.checkedin(), self.in_hand, self.disposing


def test_repeated_dispose_never_holds_more_backends_than_the_pool_and_its_users(
    embedded_postgres: PostgresServer, url: str, unique_application_name: str
) -> None:
    """16 threads, pool 4+4, dispose every 0.1-0.3 s for a bounded run.

    At each sample, the server's backends of this test that the client has not closed
    must fit in the live pool's idle connections, plus the connections in the threads'
    hands at that moment (from any pool, the replaced ones included), plus what a running
    ``dispose()`` is closing.  Each figure is read before and after the server query and
    the larger taken, so a connection moving from one to another is counted.
    """
    app = unique_application_name
    engine = create_engine(url, pool_size=4, max_overflow=4, pool_timeout=30)
    census = Census(engine)
    stop = threading.Event()
    errors: list[BaseException] = []
    over: list[tuple[int, tuple[int, int, int]]] = []
    peak = [0]

    def user(seed: int) -> None:
        chance = random.Random(seed)
        while not stop.is_set():
            with census.lock:
                census.in_hand += 1
            try:
                with engine.connect() as connection:
                    connection.execute("SELECT 1")
                    time.sleep(chance.uniform(0, 0.01))
            except BaseException as error:
                errors.append(error)
                return
            finally:
                with census.lock:
                    census.in_hand -= 1

    def disposer() -> None:
        chance = random.Random(0)
        while not stop.wait(chance.uniform(0.1, 0.3)):
            with census.lock:
                census.disposing = 4
            try:
                engine.dispose()
            finally:
                with census.lock:
                    census.disposing = 0

    def sampler() -> None:
        while not stop.is_set():
            before = census.holdable()
            pids = {row["pid"] for row in embedded_postgres.backends(app)}
            after = census.holdable()
            with census.lock:
                held = len(pids - census.closed_pids)
            bound = tuple(max(a, b) for a, b in zip(before, after, strict=True))
            peak[0] = max(peak[0], held)
            if held > sum(bound):
                over.append((held, bound))  # type: ignore[arg-type]
            time.sleep(0.02)

    threads = [threading.Thread(target=user, args=(seed,)) for seed in range(16)]
    threads += [threading.Thread(target=disposer), threading.Thread(target=sampler)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)
    stop.set()
    for thread in threads:
        thread.join(60)
    assert not errors, errors[:3]
    assert not over, f"backends above what the pool and its users can hold: {over[:5]}"
    assert peak[0] > 0  # the sampler saw the load
    engine.dispose()
    assert embedded_postgres.wait_for_backend_count(0, app) == 0


# --------------------------------------------------------------------------- shutdown path
# A child process: two connections checked out of a pool that engine.dispose() replaced,
# one checked out of the current pool and one idle in it -- then the shutdown path runs
# while the process lives on, so only lambda-pool can have closed the backends.

PRELUDE = textwrap.dedent(
    """
    import atexit, os, signal, sys
    import lambda_pool
    from lambda_pool import lifecycle

    DSN, APP = os.environ["T_DSN"], os.environ["T_APP"]
    engine = lambda_pool.create_engine(
        DSN, pool_size=2, max_overflow=0, connect_args={"application_name": APP}
    )
    replaced = [engine.connect(), engine.connect()]
    for conn in replaced:
        conn.execute("SELECT 1")
    engine.dispose()  # both stay checked out of the replaced pool
    current = engine.connect()
    current.execute("SELECT 1")
    with engine.connect() as idle:
        idle.execute("SELECT 1")
    """
)

SIGTERM_BODY = """
import time
signalled = []

def previous(signum, frame):  # lambda-pool's handler chains here; the process lives on
    signalled.append(signum)
    print("after sigterm", flush=True)

signal.signal(signal.SIGTERM, previous)
lifecycle.install_shutdown_hooks()
print("ready", flush=True)
while not signalled:
    time.sleep(0.05)
sys.stdin.readline()
"""

ATEXIT_BODY = """
def last():  # registered first, so it runs after lambda-pool's atexit disposal
    print("after atexit", flush=True)
    sys.stdin.readline()

atexit.register(last)
lifecycle.install_shutdown_hooks()
print("ready", flush=True)
sys.stdin.readline()
sys.exit(0)
"""

SNAPSTART_BODY = """
import snapshot_restore_py

lifecycle.install_shutdown_hooks()
print("ready", flush=True)
sys.stdin.readline()
for func, args, kwargs in snapshot_restore_py.get_before_snapshot():
    func(*args, **kwargs)  # what the runtime does before taking the snapshot
print("after snapshot hook", flush=True)
sys.stdin.readline()
for conn in replaced + [current]:
    conn.close()  # the invocations end later: returning closed connections is fine
print("returned", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize(
    ("body", "trigger", "reached"),
    [
        (SIGTERM_BODY, "sigterm", "after sigterm"),
        (ATEXIT_BODY, "exit", "after atexit"),
        (SNAPSTART_BODY, "snapshot", "after snapshot hook"),
    ],
    ids=["sigterm", "atexit", "snapstart-before-snapshot"],
)
def test_the_shutdown_path_leaves_no_backend_even_for_connections_checked_out(
    body: str,
    trigger: str,
    reached: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    tmp_path: Path,
) -> None:
    if trigger == "snapshot":
        pytest.importorskip("snapshot_restore_py", reason="pip install 'lambda-pool[snapstart]'")
    app = unique_application_name
    child = Child(PRELUDE + textwrap.dedent(body), {"T_DSN": embedded_postgres.dsn, "T_APP": app})
    try:
        child.expect("ready")
        # 2 out of the replaced pool, 1 out of the current one, 1 idle in it.
        assert embedded_postgres.wait_for_backend_count(4, app) == 4
        if trigger == "sigterm":
            child.proc.send_signal(signal.SIGTERM)
        else:
            child.send(trigger)
        child.expect(reached)
        assert child.proc.poll() is None  # alive: the kernel closed nothing
        assert embedded_postgres.wait_for_backend_count(0, app) == 0
        if trigger == "snapshot":
            child.send("return")
            child.expect("returned")
        child.send("done")
        assert child.wait() == 0, child.stderr()
    finally:
        child.kill()
