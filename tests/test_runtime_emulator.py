"""The local Lambda environment drives the real awslambdaric like Lambda does."""

from __future__ import annotations

import os
import signal
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lambda_pool.testing.runtime import LocalLambda, RuntimeInitError

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")

pytestmark = pytest.mark.e2e

HANDLERS = textwrap.dedent(
    """
    import os, signal, time

    INIT_PID = os.getpid()

    if os.environ.get("T_EXTENSION"):
        from lambda_pool.lifecycle import register_internal_extension
        EXTENSION_ID = register_internal_extension()

        def on_sigterm(signum, frame):
            with open(os.environ["T_MARK"], "w") as mark:
                mark.write("SIGTERM in handler module")
            # Not SystemExit: on python3.12+ runtimes awslambdaric waits for the next
            # event in a non-daemon thread, and interpreter exit would wait on it
            # until Lambda's SIGKILL.
            os._exit(0)

        signal.signal(signal.SIGTERM, on_sigterm)

    def echo(event, context):
        return {
            "event": event,
            "pid": os.getpid(),
            "request_id": context.aws_request_id,
            "arn": context.invoked_function_arn,
            "remaining_ms": context.get_remaining_time_in_millis(),
            "function": os.environ["AWS_LAMBDA_FUNCTION_NAME"],
        }

    def fail_or_echo(event, context):
        if event.get("fail"):
            raise KeyError("no such order")
        return echo(event, context)

    def sleep_or_echo(event, context):
        time.sleep(event.get("sleep", 0))
        return echo(event, context)
    """
)


@pytest.fixture
def code_dir(tmp_path: Path) -> Path:
    (tmp_path / "fn.py").write_text(HANDLERS)
    return tmp_path


@pytest.fixture
def make_lambda(code_dir: Path) -> Iterator[type[LocalLambda]]:
    made: list[LocalLambda] = []

    class Tracked(LocalLambda):
        def __init__(self, handler: str, **kwargs: object) -> None:
            super().__init__(handler, code_dir, **kwargs)  # type: ignore[arg-type]
            made.append(self)

    yield Tracked
    for fn in made:
        fn.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_responses_come_back_with_the_lambda_context(make_lambda: type[LocalLambda]) -> None:
    with make_lambda("fn.echo", function_name="orders", timeout_s=5) as fn:
        first = fn.invoke({"n": 1})
        second = fn.invoke({"n": 2})

    assert first.ok and second.ok
    assert first.payload["event"] == {"n": 1}
    assert first.payload["request_id"] == first.request_id
    assert first.payload["arn"] == "arn:aws:lambda:us-east-1:123456789012:function:orders"
    assert first.payload["function"] == "orders"
    assert 0 < first.payload["remaining_ms"] <= 5000
    # One environment served both: the first was the cold start, the second was warm.
    assert (first.cold, second.cold) == (True, False)
    assert first.payload["pid"] == second.payload["pid"]


def test_handler_exception_comes_back_as_an_error_and_the_next_invocation_succeeds(
    make_lambda: type[LocalLambda],
) -> None:
    with make_lambda("fn.fail_or_echo") as fn:
        failed = fn.invoke({"fail": True})
        after = fn.invoke({"fail": False})

    assert not failed.ok
    assert failed.error_type == "KeyError"
    assert "no such order" in (failed.error_message or "")
    assert failed.stack_trace and any("fail_or_echo" in line for line in failed.stack_trace)
    assert after.ok and not after.cold
    assert after.payload["event"] == {"fail": False}


def test_handler_past_its_deadline_is_killed_and_the_next_invocation_is_cold(
    make_lambda: type[LocalLambda],
) -> None:
    with make_lambda("fn.sleep_or_echo") as fn:
        warm = fn.invoke({})
        pid = warm.payload["pid"]
        slow = fn.invoke({"sleep": 30}, timeout_s=0.5)
        assert not _alive(pid)
        next_one = fn.invoke({})

    assert slow.timed_out and slow.error_type == "Sandbox.Timedout"
    assert next_one.ok and next_one.cold
    assert next_one.payload["pid"] != pid
    assert fn.cold_starts == 2


def test_observe_hook_result_is_attached_to_each_invocation(
    make_lambda: type[LocalLambda],
) -> None:
    calls: list[int] = []

    def observe() -> dict[str, int]:
        calls.append(1)
        return {"observations": len(calls)}

    with make_lambda("fn.echo", observe=observe) as fn:
        results = [fn.invoke({}), fn.invoke({})]

    assert [r.observed for r in results] == [{"observations": 1}, {"observations": 2}]


def test_import_error_during_init_is_reported(make_lambda: type[LocalLambda]) -> None:
    with make_lambda("missing_module.handler") as fn:
        with pytest.raises(RuntimeInitError) as info:
            fn.start()
        result = fn.invoke({})

    assert info.value.error_type == "Runtime.ImportModuleError"
    assert result.error_type == "Runtime.ImportModuleError" and result.cold


def test_sigterm_reaches_the_handler_module_when_an_internal_extension_registered(
    make_lambda: type[LocalLambda], tmp_path: Path
) -> None:
    mark = tmp_path / "sigterm.mark"
    fn = make_lambda("fn.echo", env={"T_EXTENSION": "1", "T_MARK": str(mark)})
    fn.start()
    assert fn.extensions_registered == 1
    pid = fn.invoke({}).payload["pid"]
    fn.idle(0.1)

    status = fn.shutdown(grace=0.5)

    assert mark.read_text() == "SIGTERM in handler module"
    assert status == 0  # the module's handler exited cleanly within the grace period
    assert not _alive(pid)


def test_without_an_extension_shutdown_kills_without_sigterm(
    make_lambda: type[LocalLambda], tmp_path: Path
) -> None:
    mark = tmp_path / "sigterm.mark"
    fn = make_lambda("fn.echo", env={"T_MARK": str(mark)})
    pid = fn.invoke({}).payload["pid"]

    status = fn.shutdown()

    # As in Lambda: no extension registered, so no SIGTERM, just SIGKILL.
    assert status == -signal.SIGKILL
    assert not mark.exists()
    assert not _alive(pid)


def test_close_leaves_no_process_and_no_server(make_lambda: type[LocalLambda]) -> None:
    fn = make_lambda("fn.sleep_or_echo")
    fn.invoke({})
    pid = fn.pid
    assert pid is not None and _alive(pid)
    fn.idle(0.05, freeze=True)

    fn.close()

    assert fn.pid is None
    assert not _alive(pid)


POOLED_HANDLER = textwrap.dedent(
    """
    import os
    import psycopg
    from lambda_pool import lifecycle

    lifecycle.register_internal_extension()
    lifecycle.install_shutdown_hooks()

    class HeldConnections:
        def __init__(self):
            self.conns = []

        def checkout(self):
            if not self.conns:
                self.conns.append(
                    psycopg.connect(os.environ["T_DSN"], application_name=os.environ["T_APP"])
                )
            return self.conns[0]

        def dispose(self):
            with open(os.environ["T_MARK"], "a") as mark:
                mark.write("disposed %d\\n" % len(self.conns))
            for conn in self.conns:
                conn.close()
            self.conns = []

    ENGINE = lifecycle.register(HeldConnections())

    def handler(event, context):
        return ENGINE.checkout().execute("SELECT 41 + 1").fetchone()[0]
    """
)


def test_shutdown_hook_closes_the_warm_connection_when_lambda_ends_the_environment(
    tmp_path: Path, embedded_postgres: Any, unique_application_name: str
) -> None:
    (tmp_path / "pooled.py").write_text(POOLED_HANDLER)
    app = unique_application_name
    mark = tmp_path / "dispose.mark"

    def backends() -> dict[str, int]:
        return {"backends": embedded_postgres.backend_count(app)}

    with LocalLambda(
        "pooled.handler",
        tmp_path,
        env={"T_DSN": embedded_postgres.dsn, "T_APP": app, "T_MARK": str(mark)},
        observe=backends,
    ) as fn:
        results = [fn.invoke({}) for _ in range(3)]
        fn.idle(0.1)
        status = fn.shutdown()

    assert [r.payload for r in results] == [42, 42, 42], fn.logs()
    # One connection, reused warm across invocations.
    assert [r.observed for r in results] == [{"backends": 1}] * 3
    # Lambda's SIGTERM reached lambda-pool's hook, which closed it and then ended the
    # process by the signal, as the runtime would have died without lambda-pool.
    assert status == -signal.SIGTERM
    assert mark.read_text() == "disposed 1\n"
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=1.0) == 0


SNAPSTART_HANDLERS = textwrap.dedent(
    """
    import os, time
    from snapshot_restore_py import register_after_restore, register_before_snapshot

    EVENTS = [("init", time.time())]

    @register_before_snapshot
    def before():
        if os.environ.get("T_FAIL") == "before":
            raise RuntimeError("cannot close the connection")
        EVENTS.append(("before", time.time()))

    @register_after_restore
    def after():
        if os.environ.get("T_FAIL") == "after":
            raise ValueError("cannot renew the token")
        EVENTS.append(("after", time.time()))

    def handler(event, context):
        return {
            "events": [name for name, _ in EVENTS],
            "paused_s": dict(EVENTS).get("after", 0) - dict(EVENTS).get("before", 0),
            "init_type": os.environ["AWS_LAMBDA_INITIALIZATION_TYPE"],
            "pid": os.getpid(),
        }
    """
)


def _process_state(pid: int | None) -> str:
    """The kernel's one-letter state of ``pid`` (``T`` = stopped)."""
    assert pid is not None
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@pytest.fixture
def snap_dir(tmp_path: Path) -> Path:
    pytest.importorskip("snapshot_restore_py", reason="pip install 'lambda-pool[snapstart]'")
    (tmp_path / "snap.py").write_text(SNAPSTART_HANDLERS)
    return tmp_path


def test_snapstart_runs_before_snapshot_hooks_freezes_then_after_restore_hooks(
    snap_dir: Path,
) -> None:
    if not Path("/proc/self/stat").exists():
        pytest.skip("reading a process state needs /proc")
    seen: dict[str, object] = {}

    def at_snapshot() -> str:
        seen["pid"] = fn.pid
        return _process_state(fn.pid)

    def at_restore() -> str:
        return _process_state(fn.pid)

    with LocalLambda(
        "snap.handler",
        snap_dir,
        snapstart=True,
        on_snapshot=at_snapshot,
        on_restore=at_restore,
        snapshot_pause_s=0.3,
    ) as fn:
        first = fn.invoke({})
        second = fn.invoke({})

    assert first.ok and second.ok, fn.logs()
    # awslambdaric ran the before-snapshot hooks after Init, then (once restore/next was
    # answered) the after-restore hooks, then the invocations; each hook once.
    assert first.payload["events"] == ["init", "before", "after"]
    assert second.payload["events"] == ["init", "before", "after"]
    assert first.payload["init_type"] == "snap-start"
    # Frozen at the snapshot and still frozen when the restore began; the same process
    # then served the invocations (the emulation's documented gap: no new process).
    assert (fn.snapshot_observed, fn.restore_observed) == ("T", "T")
    assert first.payload["pid"] == seen["pid"] == second.payload["pid"]
    assert first.payload["paused_s"] >= 0.3  # the wall clock moved on across the pause
    assert (fn.snapshots, fn.restores, fn.cold_starts) == (1, 1, 1)
    assert first.cold and not second.cold


def test_without_snapstart_no_hook_runs(snap_dir: Path) -> None:
    with LocalLambda("snap.handler", snap_dir) as fn:
        result = fn.invoke({})

    assert result.payload["events"] == ["init"]
    assert result.payload["init_type"] == "on-demand"
    assert (fn.snapshots, fn.restores) == (0, 0)


@pytest.mark.parametrize(
    ("hook", "error_type", "cause"),
    [
        ("before", "Runtime.BeforeSnapshotError", "RuntimeError: cannot close the connection"),
        ("after", "Runtime.AfterRestoreError", "ValueError: cannot renew the token"),
    ],
)
def test_a_failing_snapstart_hook_fails_the_environment_like_lambda(
    snap_dir: Path, hook: str, error_type: str, cause: str
) -> None:
    with LocalLambda("snap.handler", snap_dir, snapstart=True, env={"T_FAIL": hook}) as fn:
        with pytest.raises(RuntimeInitError) as info:
            fn.start()
        result = fn.invoke({})

    assert info.value.error_type == error_type
    assert info.value.error_message.startswith(cause)
    # The environment is thrown away; the next invocation tries a new one, fails the same.
    assert result.error_type == error_type and result.cold
    assert fn.cold_starts == 2 and fn.restores == 0
    assert fn.snapshots == (0 if hook == "before" else 2)
