"""A local AWS Lambda execution environment: the Runtime and Extensions APIs plus a process.

:class:`RuntimeAPIServer` serves the parts of the Lambda Runtime API
(``/2018-06-01/runtime/...``) and Extensions API (``/2020-01-01/extension/...``) a
Python function uses, on ``127.0.0.1``. :class:`LocalLambda` runs the *real*
``awslambdaric`` runtime client against it as a subprocess, with the environment Lambda
sets, and drives it the way Lambda does: Init on the first invocation (a cold start),
one invocation at a time with an absolute deadline, SIGKILL when the deadline passes
(the next invocation is a cold start again), and at Shutdown SIGTERM -- only when an
extension is registered, as in Lambda -- followed by SIGKILL after a grace period.

SnapStart (``LocalLambda(..., snapstart=True)``)
-----------------------------------------------
Init runs with ``AWS_LAMBDA_INITIALIZATION_TYPE=snap-start``, so awslambdaric, after
importing the handler module, runs the ``snapshot_restore_py`` before-snapshot hooks and
then asks ``GET /runtime/restore/next``; that request is the moment Lambda takes the
snapshot. The emulator holds the answer and emulates snapshot and restore around it:

1. *snapshot*: the process is stopped (SIGSTOP) and ``on_snapshot()`` is called, so a
   test sees the world as the snapshot does (e.g. how many backends the function still
   has on the database server: a connection alive here would be frozen into it);
2. the process stays frozen for ``snapshot_pause_s`` (wall-clock time moves on, as it
   does while a snapshot sits in storage);
3. *restore*: ``on_restore()`` is called, to invalidate what a restore invalidates
   outside the process (e.g. terminate the server-side sessions opened during Init: in
   a restored microVM their TCP state is gone), the process is continued (SIGCONT) and
   ``/runtime/restore/next`` is answered 200; awslambdaric then runs the after-restore
   hooks and asks for its first invocation, which ends the restore. A hook failure comes
   back as ``Runtime.BeforeSnapshotError`` (posted to ``/runtime/init/error``) or
   ``Runtime.AfterRestoreError`` (``/runtime/restore/error``), as awslambdaric reports them.

The gap to a real SnapStart restore: the *same* process continues, it is not a copy
resumed from a memory image in another microVM. So the monotonic clock does not jump
(it advanced exactly as long as the pause), the process keeps its pid, its open file
descriptors and sockets (whatever the caller's ``on_restore`` does not break stays
working, where on Lambda it would be broken), its random state is not shared with other
environments restored from the same snapshot, and Init runs again for every new
environment instead of once per published version. ``restore_duration_ms`` measures the
hooks and the return to ``/invocation/next``, not loading a snapshot.

Otherwise not emulated: freezing between invocations is optional (``idle(freeze=True)``
sends SIGSTOP), extensions receive only the SHUTDOWN event (no INVOKE events), and
response streaming is not supported.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from lambda_pool.exc import LambdaPoolError

__all__ = [
    "InvocationResult",
    "LocalLambda",
    "RuntimeAPIServer",
    "RuntimeInitError",
]

_RUNTIME_PREFIX = "/2018-06-01/runtime"
_EXTENSION_PREFIX = "/2020-01-01/extension"
_ACCOUNT_ID = "123456789012"


class RuntimeInitError(LambdaPoolError):
    """The function failed during Init (it posted ``/runtime/init/error`` or exited)."""

    def __init__(self, error_type: str, error_message: str, logs: str) -> None:
        super().__init__(f"{error_type}: {error_message}")
        self.error_type = error_type
        self.error_message = error_message
        self.logs = logs


@dataclass(frozen=True)
class InvocationResult:
    """What one invocation returned, as the Lambda Invoke API would report it."""

    request_id: str
    payload: Any = None
    """The handler's return value decoded from JSON (``None`` on error)."""
    error_type: str | None = None
    error_message: str | None = None
    stack_trace: list[str] | None = None
    duration_ms: float = 0.0
    """Wall time from handing the event to the runtime to its answer (or the kill)."""
    cold: bool = False
    """This invocation ran in a process that was started for it (Init ran first)."""
    timed_out: bool = False
    observed: dict[str, Any] | None = None
    """What the ``observe`` hook returned after this invocation."""

    @property
    def ok(self) -> bool:
        """``True`` when the handler returned normally."""
        return self.error_type is None


@dataclass
class _Invocation:
    request_id: str
    body: bytes
    deadline_ms: int
    function_arn: str
    trace_id: str
    outcome: dict[str, Any] | None = None


@dataclass
class _ServerState:
    """Everything the HTTP handler threads share; guarded by ``cond``."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    # Bumped whenever a runtime process goes away: long polls from the old process
    # must not pick up events meant for the next one.
    generation: int = 0
    pending: deque[_Invocation] = field(default_factory=deque)
    in_flight: dict[str, _Invocation] = field(default_factory=dict)
    runtime_ready: bool = False
    init_error: dict[str, Any] | None = None
    # SnapStart: hold /runtime/restore/next until released (else answer at once).
    hold_restore: bool = False
    restore_requested: bool = False
    restore_released: bool = False
    restore_error: dict[str, Any] | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    shutting_down: bool = False
    closed: bool = False


class RuntimeAPIServer:
    """The Lambda Runtime API and Extensions API on a free port of ``127.0.0.1``."""

    def __init__(self) -> None:
        self.state = _ServerState()
        self._httpd = _QuietHTTPServer(("127.0.0.1", 0), _make_handler(self.state))
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="lambda-runtime-api",
            daemon=True,
        )

    @property
    def address(self) -> str:
        """``host:port``, the value of ``AWS_LAMBDA_RUNTIME_API``."""
        host, port = self._httpd.server_address[:2]
        return f"{host!s}:{port}"

    def start(self) -> None:
        """Serve requests from a background thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and wake every long poll so no thread is left waiting."""
        with self.state.cond:
            self.state.closed = True
            self.state.cond.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)

    def new_environment(self, *, snapstart: bool = False) -> None:
        """Forget the previous runtime process: a new one is about to start.

        With ``snapstart=True`` its ``/runtime/restore/next`` is answered only after
        :meth:`release_restore`.
        """
        st = self.state
        with st.cond:
            st.generation += 1
            st.pending.clear()
            st.in_flight.clear()
            st.runtime_ready = False
            st.init_error = None
            st.hold_restore = snapstart
            st.restore_requested = False
            st.restore_released = False
            st.restore_error = None
            st.extensions.clear()
            st.shutting_down = False
            st.cond.notify_all()

    def release_restore(self) -> None:
        """Answer the held ``/runtime/restore/next``: the environment is restored."""
        with self.state.cond:
            self.state.restore_released = True
            self.state.cond.notify_all()

    def begin_shutdown(self) -> None:
        """Answer every extension's ``event/next`` with a SHUTDOWN event."""
        with self.state.cond:
            self.state.shutting_down = True
            self.state.cond.notify_all()

    def submit(self, invocation: _Invocation) -> None:
        """Queue an event for the runtime's next ``/invocation/next``."""
        with self.state.cond:
            self.state.pending.append(invocation)
            self.state.cond.notify_all()

    def notify(self) -> None:
        """Wake waiters (a process exited)."""
        with self.state.cond:
            self.state.cond.notify_all()


class _QuietHTTPServer(ThreadingHTTPServer):
    """A server that does not print a traceback when a killed runtime drops a socket."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (BrokenPipeError, ConnectionResetError)):
            return
        super().handle_error(request, client_address)


def _make_handler(state: _ServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in separate writes; with Nagle's algorithm the
        # runtime client's delayed ACK would add ~40 ms to every request.
        disable_nagle_algorithm = True

        def log_message(self, format: str, *args: Any) -> None:
            # The runtime client polls constantly; request lines are noise in test output.
            return

        # ------------------------------------------------------------ plumbing
        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _send(
            self,
            status: HTTPStatus,
            body: bytes = b"",
            headers: Mapping[str, str] | None = None,
        ) -> None:
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            if body and not (headers and "Content-Type" in headers):
                self.send_header("Content-Type", "application/json")
            self.end_headers()
            if body:
                self.wfile.write(body)

        def _json(self, status: HTTPStatus, obj: object) -> None:
            self._send(status, json.dumps(obj).encode())

        # ------------------------------------------------------------ routes
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == f"{_RUNTIME_PREFIX}/invocation/next":
                self._next_invocation()
            elif path == f"{_RUNTIME_PREFIX}/restore/next":
                self._restore_next()
            elif path == f"{_EXTENSION_PREFIX}/event/next":
                self._extension_next()
            else:
                self._json(HTTPStatus.NOT_FOUND, {"errorType": "NotFound", "errorMessage": path})

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0]
            body = self._body()
            if path == f"{_EXTENSION_PREFIX}/register":
                self._extension_register(body)
                return
            if path in (f"{_RUNTIME_PREFIX}/init/error", f"{_RUNTIME_PREFIX}/restore/error"):
                document = _runtime_error_document(body, self.headers)
                with state.cond:
                    if path.endswith("/init/error"):
                        state.init_error = document
                    else:
                        state.restore_error = document
                    state.cond.notify_all()
                self._json(HTTPStatus.ACCEPTED, {"status": "OK"})
                return
            prefix = f"{_RUNTIME_PREFIX}/invocation/"
            if path.startswith(prefix):
                request_id, _, kind = path[len(prefix) :].partition("/")
                if kind in ("response", "error"):
                    self._invocation_outcome(request_id, kind, body)
                    return
            self._json(HTTPStatus.NOT_FOUND, {"errorType": "NotFound", "errorMessage": path})

        def _next_invocation(self) -> None:
            with state.cond:
                generation = state.generation
                # The runtime asking for work is what ends Init in Lambda.
                state.runtime_ready = True
                state.cond.notify_all()
                state.cond.wait_for(
                    lambda: state.closed or state.generation != generation or bool(state.pending)
                )
                if state.closed or state.generation != generation:
                    invocation = None
                else:
                    invocation = state.pending.popleft()
                    state.in_flight[invocation.request_id] = invocation
            if invocation is None:
                # A stale poll from a process that is gone; nobody reads this answer.
                self._send(HTTPStatus.GONE)
                return
            self._send(
                HTTPStatus.OK,
                invocation.body,
                {
                    "Content-Type": "application/json",
                    "Lambda-Runtime-Aws-Request-Id": invocation.request_id,
                    "Lambda-Runtime-Deadline-Ms": str(invocation.deadline_ms),
                    "Lambda-Runtime-Invoked-Function-Arn": invocation.function_arn,
                    "Lambda-Runtime-Trace-Id": invocation.trace_id,
                },
            )

        def _restore_next(self) -> None:
            # awslambdaric asks this once, after the before-snapshot hooks: the snapshot
            # is taken now, and the answer means "restored, run the after-restore hooks".
            with state.cond:
                generation = state.generation
                state.restore_requested = True
                state.cond.notify_all()
                if state.hold_restore:
                    state.cond.wait_for(
                        lambda: (
                            state.closed or state.generation != generation or state.restore_released
                        )
                    )
                answer = not state.closed and state.generation == generation
            self._send(HTTPStatus.OK if answer else HTTPStatus.GONE)

        def _invocation_outcome(self, request_id: str, kind: str, body: bytes) -> None:
            with state.cond:
                invocation = state.in_flight.pop(request_id, None)
                if invocation is not None:
                    if kind == "response":
                        invocation.outcome = {"response": body}
                    else:
                        invocation.outcome = {"error": _error_document(body, self.headers)}
                    state.cond.notify_all()
            if invocation is None:
                self._json(
                    HTTPStatus.BAD_REQUEST,
                    {"errorType": "InvalidRequestID", "errorMessage": "unknown request id"},
                )
            else:
                self._json(HTTPStatus.ACCEPTED, {"status": "OK"})

        def _extension_register(self, body: bytes) -> None:
            name = self.headers.get("Lambda-Extension-Name")
            if not name:
                self._json(
                    HTTPStatus.BAD_REQUEST,
                    {"errorType": "InvalidRequest", "errorMessage": "Lambda-Extension-Name"},
                )
                return
            extension_id = str(uuid.uuid4())
            with state.cond:
                state.extensions[extension_id] = name
            self._send(
                HTTPStatus.OK,
                json.dumps({"functionName": "", "functionVersion": "$LATEST"}).encode(),
                {"Content-Type": "application/json", "Lambda-Extension-Identifier": extension_id},
            )

        def _extension_next(self) -> None:
            extension_id = self.headers.get("Lambda-Extension-Identifier", "")
            with state.cond:
                if extension_id not in state.extensions:
                    known = False
                else:
                    known = True
                    generation = state.generation
                    state.cond.wait_for(
                        lambda: (
                            state.closed or state.shutting_down or state.generation != generation
                        )
                    )
                    deliver = state.shutting_down and state.generation == generation
            if not known:
                self._json(
                    HTTPStatus.FORBIDDEN,
                    {"errorType": "Extension.InvalidExtensionId", "errorMessage": extension_id},
                )
                return
            if not deliver:
                self._send(HTTPStatus.GONE)
                return
            self._json(
                HTTPStatus.OK,
                {
                    "eventType": "SHUTDOWN",
                    "shutdownReason": "spindown",
                    "deadlineMs": int(time.time() * 1000) + 2000,
                },
            )

    return Handler


def _error_document(body: bytes, headers: Any) -> dict[str, Any]:
    try:
        doc = json.loads(body or b"{}")
    except ValueError:
        doc = {"errorMessage": body.decode("utf-8", "replace")}
    if not isinstance(doc, dict):
        doc = {"errorMessage": str(doc)}
    doc.setdefault("errorType", headers.get("Lambda-Runtime-Function-Error-Type") or "Unknown")
    return doc


def _runtime_error_document(body: bytes, headers: Any) -> dict[str, Any]:
    """An Init or restore error as Lambda reports it: the runtime's error type header wins.

    awslambdaric posts a failed before-snapshot hook to ``/init/error`` with the header
    ``Runtime.BeforeSnapshotError`` and a failed after-restore hook to ``/restore/error``
    with ``Runtime.AfterRestoreError``; the body names the hook's exception. For other
    Init errors header and body agree.
    """
    doc = _error_document(body, headers)
    header = headers.get("Lambda-Runtime-Function-Error-Type")
    if header and header != doc["errorType"]:
        doc["errorMessage"] = f"{doc['errorType']}: {doc.get('errorMessage', '')}"
        doc["errorType"] = header
    return doc


# --------------------------------------------------------------------------- process


class _RuntimeProcess:
    """One ``python -m awslambdaric`` process and the threads reading its output."""

    def __init__(
        self, argv: list[str], cwd: Path, env: dict[str, str], on_exit: Callable[[], None]
    ):
        self.popen = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            # Own process group: a test runner's Ctrl-C is not the function's SIGINT.
            start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.served = 0
        self.stopped = False
        self._readers = [
            threading.Thread(target=self._read, args=(self.popen.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.popen.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        self._watcher = threading.Thread(target=self._watch, args=(on_exit,), daemon=True)
        self._watcher.start()

    @staticmethod
    def _read(stream: Any, sink: list[str]) -> None:
        for line in iter(stream.readline, b""):
            sink.append(line.decode("utf-8", "replace"))
        stream.close()

    def _watch(self, on_exit: Callable[[], None]) -> None:
        self.popen.wait()
        on_exit()

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(signum)

    def freeze(self, timeout: float = 2.0) -> None:
        """SIGSTOP, and wait until the kernel says the process is stopped.

        The signal is delivered asynchronously: without waiting, a snapshot observer
        could still see the process running. Where ``/proc`` is missing this is a
        best effort.
        """
        self.signal(signal.SIGSTOP)
        self.stopped = True
        stat = Path(f"/proc/{self.popen.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                return
            if state in ("T", "t", "Z", "X"):
                return
            time.sleep(0.002)

    def kill(self) -> None:
        if self.stopped:
            self.signal(signal.SIGCONT)
        self.signal(signal.SIGKILL)
        self.wait()

    def wait(self, timeout: float | None = None) -> int | None:
        try:
            code = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        for reader in self._readers:
            reader.join(2)
        return code


class LocalLambda:
    """Run a handler in the real ``awslambdaric`` runtime client, the way Lambda does.

    ``handler`` is ``"module.function"`` found in ``code_dir``. ``env`` is added to (and
    overrides) the variables Lambda sets. ``observe`` is called after every invocation;
    what it returns is attached to the result (e.g. the number of backends on the
    database server). Use as a context manager, or call :meth:`shutdown` and
    :meth:`close`.

    ``snapstart=True`` runs every environment's Init as a SnapStart snapshot followed by
    a restore (see the module docstring): ``on_snapshot()`` is called while the process
    is frozen at the snapshot, ``on_restore()`` just before it is restored, after
    ``snapshot_pause_s`` seconds; what they return is kept in :attr:`snapshot_observed`
    and :attr:`restore_observed`. The restore (after-restore hooks until the runtime
    asks for an invocation) must end within ``restore_timeout_s``, as Lambda allows
    10 s for restore and hooks.
    """

    def __init__(
        self,
        handler: str,
        code_dir: str | os.PathLike[str],
        *,
        env: Mapping[str, str] | None = None,
        function_name: str = "lambda-pool-local",
        memory_mb: int = 128,
        timeout_s: float = 3.0,
        init_timeout_s: float = 10.0,
        region: str = "us-east-1",
        python: str = sys.executable,
        execution_env: str = "AWS_Lambda_python3.12",
        observe: Callable[[], dict[str, Any]] | None = None,
        snapstart: bool = False,
        on_snapshot: Callable[[], Any] | None = None,
        on_restore: Callable[[], Any] | None = None,
        snapshot_pause_s: float = 0.0,
        restore_timeout_s: float = 10.0,
    ) -> None:
        if "." not in handler:
            raise ValueError(f"handler must be 'module.function', got {handler!r}")
        self.handler = handler
        self.code_dir = Path(code_dir).resolve()
        self.function_name = function_name
        self.memory_mb = memory_mb
        self.timeout_s = timeout_s
        self.init_timeout_s = init_timeout_s
        self.region = region
        self.python = python
        self.execution_env = execution_env
        self.observe = observe
        self.snapstart = snapstart
        self.on_snapshot = on_snapshot
        self.on_restore = on_restore
        self.snapshot_pause_s = snapshot_pause_s
        self.restore_timeout_s = restore_timeout_s
        self._user_env = dict(env or {})
        self._server: RuntimeAPIServer | None = None
        self._process: _RuntimeProcess | None = None
        self._finished: list[_RuntimeProcess] = []
        self.cold_starts = 0
        self.init_duration_ms: float | None = None
        self.snapshots = 0
        """How many environments were snapshotted (SnapStart)."""
        self.restores = 0
        """How many environments were restored and reached their first invocation."""
        self.restore_duration_ms: float | None = None
        self.snapshot_observed: Any = None
        """What ``on_snapshot`` returned at the last snapshot."""
        self.restore_observed: Any = None
        """What ``on_restore`` returned at the last restore."""

    # ------------------------------------------------------------------ lifecycle

    @property
    def function_arn(self) -> str:
        """The ARN the runtime sees as ``invoked_function_arn``."""
        return f"arn:aws:lambda:{self.region}:{_ACCOUNT_ID}:function:{self.function_name}"

    @property
    def pid(self) -> int | None:
        """The runtime process id, while one runs."""
        return self._process.popen.pid if self._process and self._process.alive else None

    def environment(self) -> dict[str, str]:
        """The environment the runtime process gets (Lambda's variables + ``env``)."""
        stream = f"{time.strftime('%Y/%m/%d')}/[$LATEST]{uuid.uuid4().hex}"
        server = self._ensure_server()
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "en_US.UTF-8",
            "TZ": ":UTC",
            "AWS_LAMBDA_RUNTIME_API": server.address,
            "AWS_LAMBDA_FUNCTION_NAME": self.function_name,
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
            "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
            "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start" if self.snapstart else "on-demand",
            "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{self.function_name}",
            "AWS_LAMBDA_LOG_STREAM_NAME": stream,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            # Lambda's Python 3.12+ value: awslambdaric then waits for events from a
            # thread, which leaves the main thread free to run signal handlers.
            "AWS_EXECUTION_ENV": self.execution_env,
            "LAMBDA_TASK_ROOT": str(self.code_dir),
            "_HANDLER": self.handler,
            "PYTHONPATH": str(self.code_dir),
        }
        # AWS_LAMBDA_MAX_CONCURRENCY is deliberately absent: awslambdaric would switch
        # to its multi-process (Managed Instances) mode.
        env.update(self._user_env)
        return env

    def start(self) -> float:
        """Start a runtime process and run Init; returns the Init duration in ms.

        Raises :class:`RuntimeInitError` when Init fails. A no-op (returning the last
        Init duration) while a process is running.
        """
        if self._process is not None and self._process.alive:
            return self.init_duration_ms or 0.0
        error = self._start_process()
        if error is not None:
            raise RuntimeInitError(
                str(error.get("errorType")), str(error.get("errorMessage")), self.logs()
            )
        return self.init_duration_ms or 0.0

    def _ensure_server(self) -> RuntimeAPIServer:
        if self._server is None:
            self._server = RuntimeAPIServer()
            self._server.start()
        return self._server

    def _start_process(self) -> dict[str, Any] | None:
        """Start a process and wait for Init (and, SnapStart, restore); the error on failure."""
        self._retire_process()
        server = self._ensure_server()
        server.new_environment(snapstart=self.snapstart)
        started = time.monotonic()
        process = _RuntimeProcess(
            [self.python, "-m", "awslambdaric", self.handler],
            self.code_dir,
            self.environment(),
            server.notify,
        )
        self._process = process
        self.cold_starts += 1
        try:
            error = self._wait_for_init(server, process)
            self.init_duration_ms = (time.monotonic() - started) * 1000
            if error is None and self.snapstart:
                error = self._snapshot_and_restore(server, process)
        except BaseException:
            self._retire_process()  # an on_snapshot/on_restore callback failed
            raise
        if error is not None:
            # Lambda throws the environment away after a failed Init or restore.
            self._retire_process()
        return error

    def _wait_for_init(
        self, server: RuntimeAPIServer, process: _RuntimeProcess
    ) -> dict[str, Any] | None:
        st = server.state
        with st.cond:
            st.cond.wait_for(
                lambda: (
                    st.runtime_ready
                    or st.restore_requested
                    or st.init_error is not None
                    or not process.alive
                ),
                timeout=self.init_timeout_s,
            )
            init_error = st.init_error
            ready = st.restore_requested if self.snapstart else st.runtime_ready
            skipped_restore = self.snapstart and st.runtime_ready and not st.restore_requested
        if init_error is not None:
            return init_error
        if ready:
            return None
        if skipped_restore:
            return {
                "errorType": "Runtime.SnapStartNotSupported",
                "errorMessage": (
                    "the runtime asked for an invocation without GET /runtime/restore/next "
                    "although AWS_LAMBDA_INITIALIZATION_TYPE=snap-start: it ran no "
                    "before-snapshot hooks"
                ),
            }
        if process.alive:
            return {
                "errorType": "Runtime.InitTimeout",
                "errorMessage": f"Init did not finish within {self.init_timeout_s} s",
            }
        return {
            "errorType": "Runtime.ExitError",
            "errorMessage": f"Runtime exited during Init: {process.popen.returncode}",
        }

    def _snapshot_and_restore(
        self, server: RuntimeAPIServer, process: _RuntimeProcess
    ) -> dict[str, Any] | None:
        """Freeze at the snapshot, let the caller look and invalidate, then restore."""
        # The runtime is blocked in GET /runtime/restore/next after its before-snapshot
        # hooks: freeze it, as the snapshot captures it in exactly this state.
        process.freeze()
        self.snapshots += 1
        self.snapshot_observed = self.on_snapshot() if self.on_snapshot is not None else None
        if self.snapshot_pause_s > 0:
            time.sleep(self.snapshot_pause_s)
        self.restore_observed = self.on_restore() if self.on_restore is not None else None
        process.signal(signal.SIGCONT)
        process.stopped = False
        started = time.monotonic()
        server.release_restore()
        st = server.state
        with st.cond:
            st.cond.wait_for(
                lambda: (
                    st.runtime_ready
                    or st.restore_error is not None
                    or st.init_error is not None
                    or not process.alive
                ),
                timeout=self.restore_timeout_s,
            )
            ready, error = st.runtime_ready, st.restore_error or st.init_error
        self.restore_duration_ms = (time.monotonic() - started) * 1000
        if error is not None:
            return error
        if ready:
            self.restores += 1
            return None
        if process.alive:
            return {
                "errorType": "Runtime.RestoreTimeout",
                "errorMessage": (
                    f"restore and after-restore hooks did not finish within "
                    f"{self.restore_timeout_s} s"
                ),
            }
        return {
            "errorType": "Runtime.ExitError",
            "errorMessage": f"Runtime exited during restore: {process.popen.returncode}",
        }

    def _retire_process(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if process.alive:
            process.kill()
        else:
            process.wait(5)
        self._finished.append(process)

    # ------------------------------------------------------------------ invoking

    def invoke(self, event: Any = None, *, timeout_s: float | None = None) -> InvocationResult:
        """Send ``event`` (JSON-serialisable) to the function and wait for its answer.

        Starts a process first if none runs (that invocation is ``cold``). When the
        deadline (``timeout_s``, default the function's timeout) passes without an
        answer, the process is killed with SIGKILL, as Lambda does, and the result is
        ``timed_out``; the next invocation starts a new process.
        """
        timeout = self.timeout_s if timeout_s is None else timeout_s
        request_id = str(uuid.uuid4())
        if self._process is None or not self._process.alive:
            init_error = self._start_process()
            if init_error is not None:
                return self._finish(
                    InvocationResult(
                        request_id=request_id,
                        error_type=str(init_error.get("errorType")),
                        error_message=str(init_error.get("errorMessage")),
                        stack_trace=init_error.get("stackTrace"),
                        cold=True,
                    )
                )
        process = self._process
        server = self._server
        assert process is not None and server is not None
        # Cold: the first invocation of a process, the one that paid for its Init.
        cold = process.served == 0
        if process.stopped:
            process.signal(signal.SIGCONT)
            process.stopped = False
        started = time.monotonic()
        deadline_ms = int(time.time() * 1000 + timeout * 1000)
        invocation = _Invocation(
            request_id=request_id,
            body=json.dumps(event).encode(),
            deadline_ms=deadline_ms,
            function_arn=self.function_arn,
            trace_id=_trace_id(),
        )
        server.submit(invocation)
        st = server.state
        with st.cond:
            st.cond.wait_for(
                lambda: invocation.outcome is not None or not process.alive,
                timeout=timeout,
            )
            outcome = invocation.outcome
        duration_ms = (time.monotonic() - started) * 1000
        process.served += 1
        if outcome is None:
            if process.alive:
                # The deadline passed: Lambda stops the environment, no grace period.
                process.kill()
                self._retire_process()
                return self._finish(
                    InvocationResult(
                        request_id=request_id,
                        error_type="Sandbox.Timedout",
                        error_message=f"Task timed out after {timeout:.2f} seconds",
                        duration_ms=duration_ms,
                        cold=cold,
                        timed_out=True,
                    )
                )
            code = process.popen.returncode
            self._retire_process()
            return self._finish(
                InvocationResult(
                    request_id=request_id,
                    error_type="Runtime.ExitError",
                    error_message=f"RequestId: {request_id} Error: Runtime exited ({code})",
                    duration_ms=duration_ms,
                    cold=cold,
                )
            )
        if "response" in outcome:
            raw: bytes = outcome["response"]
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = raw.decode("utf-8", "replace")
            return self._finish(
                InvocationResult(
                    request_id=request_id, payload=payload, duration_ms=duration_ms, cold=cold
                )
            )
        error = outcome["error"]
        trace = error.get("stackTrace")
        return self._finish(
            InvocationResult(
                request_id=request_id,
                error_type=str(error.get("errorType")),
                error_message=str(error.get("errorMessage", "")),
                stack_trace=[str(line) for line in trace] if isinstance(trace, list) else None,
                duration_ms=duration_ms,
                cold=cold,
            )
        )

    def _finish(self, result: InvocationResult) -> InvocationResult:
        if self.observe is None:
            return result
        observed = self.observe()
        return InvocationResult(
            **{**result.__dict__, "observed": observed},
        )

    def idle(self, seconds: float, *, freeze: bool = False) -> None:
        """Let time pass between invocations.

        With ``freeze=True`` the process is stopped (SIGSTOP) meanwhile, as Lambda
        freezes an environment between invocations: no thread of it runs, and its TCP
        connections cannot answer keepalive probes. The next invocation thaws it.
        """
        process = self._process
        if freeze and process is not None and process.alive and not process.stopped:
            process.freeze()
        time.sleep(seconds)

    # ------------------------------------------------------------------ shutdown

    @property
    def extensions_registered(self) -> int:
        """How many extensions the current process registered."""
        if self._server is None:
            return 0
        with self._server.state.cond:
            return len(self._server.state.extensions)

    def shutdown(self, grace: float = 0.5) -> int | None:
        """End the environment like Lambda's Shutdown phase; returns the exit status.

        With at least one extension registered, the runtime gets SIGTERM and ``grace``
        seconds before SIGKILL (extensions receive their SHUTDOWN event); without one
        it is killed at once, since Lambda sends SIGTERM only when an extension is
        registered. The status is as ``subprocess`` reports it (``-9`` = SIGKILL).
        """
        process = self._process
        if process is None:
            return None
        server = self._server
        if process.alive:
            if process.stopped:
                process.signal(signal.SIGCONT)
                process.stopped = False
            if self.extensions_registered and server is not None:
                server.begin_shutdown()
                process.signal(signal.SIGTERM)
                if process.wait(grace) is None:
                    process.kill()
            else:
                process.kill()
        code = process.wait(5)
        self._retire_process()
        return code

    def close(self) -> None:
        """Shut the environment down (if running) and stop the Runtime API server."""
        try:
            self.shutdown()
        finally:
            if self._server is not None:
                self._server.close()
                self._server = None

    def __enter__(self) -> LocalLambda:
        self._ensure_server()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ output

    def logs(self) -> str:
        """Everything every runtime process wrote to stdout and stderr so far."""
        parts = []
        for process in [*self._finished, *([self._process] if self._process else [])]:
            parts.append("".join(process.stdout))
            parts.append("".join(process.stderr))
        return "".join(parts)


def _trace_id() -> str:
    return (
        f"Root=1-{int(time.time()):08x}-{uuid.uuid4().hex[:24]};"
        f"Parent={uuid.uuid4().hex[:16]};Sampled=0"
    )
