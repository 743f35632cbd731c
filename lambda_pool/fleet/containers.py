"""The coordinator's handle on one container: start, invoke with a deadline, freeze, thaw.

Two kinds, one interface (:class:`Container`):

* :class:`ProcessContainer` (the default): a real OS process running
  :func:`lambda_pool.fleet.container.serve`, driven over a ``multiprocessing`` pipe.
  Processes are forked by ``multiprocessing``'s fork server, which has imported psycopg
  and lambda-pool's engine once: a container then costs a fork plus its own Init (the
  import of the handler module), and shares the libraries' pages with its siblings —
  which is how 200 of them fit on a small machine. ``start_method="spawn"`` starts a
  fresh interpreter per container instead (every import paid per container, as on Lambda).
* :class:`RuntimeContainer`: the real ``awslambdaric`` runtime client through
  :class:`lambda_pool.testing.runtime.LocalLambda`, for fidelity at a smaller count.

Like Lambda, an invocation that outlives its deadline (plus ``grace_s`` for a busy
machine) gets its container killed; the next invocation starts a new one (a cold start).
"""

from __future__ import annotations

import abc
import contextlib
import multiprocessing
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "FORKSERVER_PRELOAD",
    "Container",
    "ContainerSpec",
    "Outcome",
    "ProcessContainer",
    "RuntimeContainer",
    "memory_of",
    "run_id",
]

#: What the fork server imports once for every container (the libraries, not the handler).
FORKSERVER_PRELOAD = [
    "psycopg",
    "lambda_pool.engine",
    "lambda_pool.warm",
    "lambda_pool.handler",
    "lambda_pool.dialects.psycopg",
    "lambda_pool.testing.context",
    "lambda_pool.fleet.container",
]

_STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ContainerSpec:
    """What every container of a fleet runs: ``module.function``, where, and its environment."""

    handler: str
    code_dir: str | None
    env: dict[str, str] = field(default_factory=dict)
    start_method: str = "forkserver"
    init_timeout_s: float = 30.0
    log_path: str | None = None


@dataclass(frozen=True)
class Outcome:
    """One invocation as the coordinator saw it."""

    ok: bool
    duration_ms: float
    cold: bool
    connects: int
    error_type: str | None = None
    error: str | None = None
    capacity: bool = False
    backend_pid: int | None = None
    timed_out: bool = False
    payload: Any = None


def _process_state(pid: int) -> str | None:
    """The kernel's one-letter state of ``pid`` (``T`` = stopped), or None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def _wait_stopped(pid: int, timeout: float = 2.0) -> None:
    # SIGSTOP is delivered asynchronously; wait until the kernel reports it.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_state(pid) in (None, "T", "t", "Z", "X"):
            return
        time.sleep(0.002)


def memory_of(pid: int) -> dict[str, int] | None:
    """``{"rss_kb", "pss_kb"}`` of a process from /proc, or None when it is gone.

    RSS counts every page the process maps, shared ones included; PSS divides shared
    pages among their sharers, so PSS summed over a fleet is the memory it really uses.
    """
    result: dict[str, int] = {}
    for path, key, field_name in (
        (f"/proc/{pid}/status", "rss_kb", "VmRSS:"),
        (f"/proc/{pid}/smaps_rollup", "pss_kb", "Pss:"),
    ):
        try:
            with open(path) as handle:
                for line in handle:
                    if line.startswith(field_name):
                        result[key] = int(line.split()[1])
                        break
        except OSError:
            continue
    return result if "rss_kb" in result else None


class Container(abc.ABC):
    """One Lambda execution environment as the fleet drives it."""

    def __init__(self, index: int, spec: ContainerSpec) -> None:
        self.index = index
        self.spec = spec
        self.frozen = False
        self.served = 0
        self.starts = 0
        self.init_ms: list[float] = []
        self.last_backend_pid: int | None = None

    @property
    @abc.abstractmethod
    def pid(self) -> int | None:
        """The process id while it runs."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start the process and run Init; raises ``RuntimeError`` when Init fails."""

    @abc.abstractmethod
    def _invoke(self, event: dict[str, Any], deadline_ms: int, grace_s: float) -> Outcome: ...

    @abc.abstractmethod
    def kill(self) -> None:
        """SIGKILL and forget the process (the next invocation is a cold start)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Let the process close its connections and exit; kill it if it does not."""

    def invoke(self, event: dict[str, Any], deadline_ms: int, grace_s: float) -> Outcome:
        """Run one invocation; a dead container is started first (that one is cold)."""
        if self.pid is None:
            try:
                self.start()
            except RuntimeError as exc:
                return Outcome(
                    ok=False,
                    duration_ms=0.0,
                    cold=True,
                    connects=0,
                    error_type="Runtime.InitError",
                    error=str(exc)[:240],
                )
        if self.frozen:
            self.thaw()
        outcome = self._invoke(event, deadline_ms, grace_s)
        self.served += 1
        if outcome.backend_pid is not None:
            self.last_backend_pid = outcome.backend_pid
        return outcome

    def freeze(self) -> None:
        """SIGSTOP, as Lambda freezes an idle environment; waits until it is stopped."""
        pid = self.pid
        if pid is None or self.frozen:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGSTOP)
        self.frozen = True
        _wait_stopped(pid)

    def thaw(self) -> None:
        """SIGCONT."""
        pid = self.pid
        if pid is not None and self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = False

    def memory(self) -> dict[str, int] | None:
        pid = self.pid
        return None if pid is None else memory_of(pid)


# --------------------------------------------------------------------------- processes

_context_lock = threading.Lock()


def _mp_context(start_method: str) -> Any:
    with _context_lock:
        context = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            # Global to the fork server; it starts with the first container.
            context.set_forkserver_preload(FORKSERVER_PRELOAD)
        return context


class ProcessContainer(Container):
    """A container process running :func:`lambda_pool.fleet.container.serve` over a pipe."""

    def __init__(self, index: int, spec: ContainerSpec) -> None:
        super().__init__(index, spec)
        self._process: Any = None
        self._pipe: Any = None

    @property
    def pid(self) -> int | None:
        process = self._process
        if process is None or not process.is_alive():
            return None
        return int(process.pid)

    def start(self) -> None:
        from lambda_pool.fleet.container import serve

        self.kill()
        context = _mp_context(self.spec.start_method)
        ours, theirs = context.Pipe(duplex=True)
        process = context.Process(
            target=serve,
            args=(
                theirs,
                self.spec.handler,
                self.spec.code_dir,
                self.spec.env,
                self.spec.log_path,
            ),
            name=f"lambda-pool-fleet-{self.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._pipe = process, ours
        self.served = 0
        self.starts += 1
        if not ours.poll(self.spec.init_timeout_s):
            self.kill()
            raise RuntimeError(f"Init did not finish within {self.spec.init_timeout_s} s")
        try:
            hello = ours.recv()
        except (EOFError, OSError) as exc:
            self.kill()
            raise RuntimeError(f"the container exited during Init ({exc})") from None
        if not hello.get("ready"):
            self.kill()
            raise RuntimeError(f"{hello.get('init_error')}: {hello.get('message')}")
        self.init_ms.append(float(hello["init_ms"]))

    def _invoke(self, event: dict[str, Any], deadline_ms: int, grace_s: float) -> Outcome:
        cold = self.served == 0
        started = time.perf_counter()
        try:
            self._pipe.send({"event": event, "deadline_ms": deadline_ms})
            answered = self._pipe.poll(deadline_ms / 1000.0 + grace_s)
            reply = self._pipe.recv() if answered else None
        except (EOFError, OSError):
            reply, answered = None, True
        waited_ms = (time.perf_counter() - started) * 1000.0
        if reply is None:
            self.kill()
            if answered:
                return Outcome(
                    ok=False,
                    duration_ms=waited_ms,
                    cold=cold,
                    connects=0,
                    error_type="Runtime.ExitError",
                    error="the container exited during the invocation",
                )
            return Outcome(
                ok=False,
                duration_ms=waited_ms,
                cold=cold,
                connects=0,
                error_type="Sandbox.Timedout",
                error=f"no answer within the deadline of {deadline_ms} ms (+{grace_s} s grace)",
                timed_out=True,
            )
        payload = reply.get("payload")
        backend_pid = payload.get("backend_pid") if isinstance(payload, dict) else None
        return Outcome(
            ok=bool(reply["ok"]),
            duration_ms=float(reply["duration_ms"]),
            cold=cold,
            connects=int(reply["connects"]),
            error_type=reply.get("error_type"),
            error=reply.get("error"),
            capacity=bool(reply.get("capacity")),
            backend_pid=int(backend_pid) if isinstance(backend_pid, int) else None,
            payload=payload,
        )

    def kill(self) -> None:
        process, self._process = self._process, None
        pipe, self._pipe = self._pipe, None
        if process is not None:
            if self.frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.join(_STOP_TIMEOUT_S)
        if pipe is not None:
            pipe.close()
        self.frozen = False

    def stop(self) -> None:
        process, pipe = self._process, self._pipe
        if process is None:
            return
        self.thaw()
        with contextlib.suppress(OSError):
            pipe.send({"stop": True})
        process.join(_STOP_TIMEOUT_S)
        self.kill()


# --------------------------------------------------------------------------- awslambdaric


class RuntimeContainer(Container):
    """The real ``awslambdaric`` in a ``LocalLambda`` environment (fidelity mode).

    Connects per invocation come from the handler's payload (``connects_total``, which
    :mod:`lambda_pool.fleet.handler` reports), as the coordinator cannot reach into the
    runtime's process. Thawing happens when the next invocation arrives, as on Lambda.
    """

    def __init__(self, index: int, spec: ContainerSpec) -> None:
        super().__init__(index, spec)
        from lambda_pool.testing.runtime import LocalLambda

        code_dir = spec.code_dir or os.getcwd()
        self._lambda = LocalLambda(
            spec.handler,
            code_dir,
            env={**spec.env, "PYTHONPATH": os.pathsep.join(_pythonpath(code_dir))},
            function_name=f"lambda-pool-fleet-{index}",
            init_timeout_s=spec.init_timeout_s,
        )
        self._connects_seen = 0

    @property
    def pid(self) -> int | None:
        return self._lambda.pid

    def start(self) -> None:
        from lambda_pool.testing.runtime import RuntimeInitError

        try:
            init_ms = self._lambda.start()
        except RuntimeInitError as exc:
            raise RuntimeError(str(exc)) from None
        self.starts += 1
        self.served = 0
        self._connects_seen = 0
        self.init_ms.append(init_ms)

    def _invoke(self, event: dict[str, Any], deadline_ms: int, grace_s: float) -> Outcome:
        from lambda_pool.dialects.base import is_capacity_message

        self.frozen = False  # LocalLambda sends SIGCONT itself before the event
        result = self._lambda.invoke(event, timeout_s=deadline_ms / 1000.0)
        payload = result.payload if isinstance(result.payload, dict) else None
        connects = 0
        backend_pid = None
        if payload is not None:
            total = int(payload.get("connects_total", self._connects_seen))
            connects, self._connects_seen = total - self._connects_seen, total
            pid_value = payload.get("backend_pid")
            backend_pid = pid_value if isinstance(pid_value, int) else None
        if result.timed_out or result.error_type in ("Runtime.ExitError",):
            self._connects_seen = 0
        message = (result.error_message or "").strip().splitlines()
        return Outcome(
            ok=result.ok,
            duration_ms=result.duration_ms,
            cold=result.cold,
            connects=connects,
            error_type=result.error_type,
            error=message[0][:240] if message else None,
            capacity=bool(result.error_message)
            and is_capacity_message(Exception(result.error_message)),
            backend_pid=backend_pid,
            timed_out=result.timed_out,
            payload=payload,
        )

    def freeze(self) -> None:
        if self.pid is None or self.frozen:
            return
        self._lambda.idle(0, freeze=True)
        self.frozen = True

    def thaw(self) -> None:
        # LocalLambda continues the process when it hands it the next event.
        self.frozen = False

    def kill(self) -> None:
        self._lambda.shutdown(grace=0)

    def stop(self) -> None:
        self._lambda.close()


def _pythonpath(code_dir: str) -> list[str]:
    """The code folder first, then where lambda_pool itself lives (a checkout or a venv)."""
    import lambda_pool

    package_root = str(Path(lambda_pool.__file__).resolve().parent.parent)
    return [code_dir] if package_root == code_dir else [code_dir, package_root]


def run_id() -> str:
    """A short id naming one fleet run in the handlers' rows."""
    return uuid.uuid4().hex[:12]
