"""Engine registry and process-shutdown disposal: SIGTERM, ``atexit``, SnapStart hooks.

Every engine lambda-pool creates calls :func:`register` on itself; the registry holds
it weakly, so registering never keeps an engine alive. :func:`dispose_all` disposes
every engine still alive. :func:`install_shutdown_hooks` arranges for ``dispose_all`` to
run when the process is told to stop (SIGTERM), when the interpreter exits normally
(``atexit``), and around a SnapStart snapshot.

How a Lambda function gets SIGTERM
----------------------------------
Lambda sends SIGTERM to the runtime process at Shutdown only when at least one
extension is registered; without one the process is simply killed (SIGKILL) and no
Python code runs. A function gets SIGTERM in one of two ways:

* it has a layer with an external extension (any one: the Powertools layer does not
  count, it is a library; a monitoring agent layer does), or
* it registers an *internal* extension during Init: :func:`register_internal_extension`
  does that (``POST /2020-01-01/extension/register`` with ``{"events": []}``, then a
  daemon thread parked on ``GET /2020-01-01/extension/event/next``).

Lambda then gives the runtime a short grace period (about 500 ms with an internal
extension) before SIGKILL, which is why the SIGTERM path runs disposal under a time
budget. Python runs signal handlers only in the main thread and only between
bytecodes: awslambdaric waits for the next event from a helper thread (leaving the main
thread free to run the handler) only when ``AWS_EXECUTION_ENV`` is
``AWS_Lambda_python3.12`` or a later listed runtime; on older runtimes the main thread
sits in native code and the handler cannot run until the next event arrives.

The shutdown protocol for engines
---------------------------------
An engine registered here is disposed at shutdown by calling, in order of preference:

1. ``engine.dispose_for_shutdown()`` -- **synchronous**; closes every connection the
   engine holds (idle *and* checked out, the process is ending -- including connections
   still checked out of pools an earlier ``engine.dispose()`` replaced), needs no event loop,
   never blocks long on a lock (it may run from a signal handler that interrupted the
   code holding that lock), is idempotent, and leaves the engine usable (a later
   checkout reconnects). Async engines must implement this: their ``dispose()`` is a
   coroutine bound to an event loop that is usually gone by shutdown time (psycopg's
   ``pgconn.finish()`` and asyncpg's ``Connection.terminate()`` close synchronously).
2. ``engine.dispose()`` -- if it returns an awaitable, that awaitable is run to
   completion on a fresh event loop in a helper thread, as a best effort.

Errors from any engine are logged and never stop the others from being disposed.

The engines' ``dispose_for_shutdown()`` (``Pool._close_all_for_shutdown``) first sends a
cancel request to every psycopg connection still executing a statement, waiting at most
``lambda_pool.pool.base.SHUTDOWN_CANCEL_TIMEOUT_S`` (0.2 s) for all of them, inside this
module's SIGTERM budget: PostgreSQL notices a closed client only when the statement ends,
so closing alone would leave the backend running the query to its end.
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, Protocol, runtime_checkable

# The registry itself lives in lambda_pool._registry: create_engine() registers every
# engine without loading this module (its shutdown machinery is needed only when
# install_shutdown_hooks() or dispose_all() is called).
from lambda_pool._registry import (
    _snapshot_refs,
    register,
    registered_engines,
    unregister,
)

__all__ = [
    "DEFAULT_SHUTDOWN_BUDGET_S",
    "Disposable",
    "ShutdownDisposable",
    "dispose_all",
    "install_shutdown_hooks",
    "register",
    "register_internal_extension",
    "registered_engines",
    "restore_generation",
    "unregister",
]

logger = logging.getLogger(__name__)

#: Seconds the SIGTERM path waits for disposal before chaining to the previous
#: handler. Lambda allows about 500 ms between SIGTERM and SIGKILL with an internal
#: extension; leave room for the previous handler and interpreter teardown.
DEFAULT_SHUTDOWN_BUDGET_S = 0.4

_EXTENSION_API_VERSION = "2020-01-01"


@runtime_checkable
class Disposable(Protocol):
    """Anything with ``dispose()``: a sync engine, or an async one (returns a coroutine)."""

    def dispose(self) -> Any: ...


@runtime_checkable
class ShutdownDisposable(Protocol):
    """An engine with a synchronous, loop-free, lock-light close path for shutdown."""

    def dispose_for_shutdown(self) -> None: ...


_restore_generation = 0

# What install_shutdown_hooks has installed so far (each part is installed once).
_install_lock = threading.Lock()
_atexit_installed = False
_sigterm_installed = False
_snapstart_installed = False
_previous_sigterm: Any = None
_budget_s = DEFAULT_SHUTDOWN_BUDGET_S

# Set once a shutdown disposal ran and the process is on its way out, so ``atexit``
# after a SIGTERM whose previous handler called ``sys.exit`` does not dispose twice.
_shutdown_disposed = False

_extension_id: str | None = None


def restore_generation() -> int:
    """How many SnapStart restores this process has seen.

    A warm cache stores the generation when it opens a connection and refuses to reuse
    the connection once the generation changed: the connection was made before the
    snapshot, and its socket, credentials and timestamps are not to be trusted.
    """
    return _restore_generation


# --------------------------------------------------------------------------- disposal


def dispose_all() -> int:
    """Dispose every registered engine; never raises. Returns how many failed.

    Errors are logged (with the engine's type, not its repr, which could hold a DSN)
    and the remaining engines are still disposed.
    """
    failures = 0
    for ref in _snapshot_refs():
        engine = ref()
        if engine is None:
            continue
        try:
            _dispose_one(engine)
        except BaseException as exc:
            # BaseException too: a dispose() calling sys.exit must not leave the other
            # engines' connections open, and this function promises never to raise.
            failures += 1
            logger.warning(
                "lambda-pool: disposing %s failed: %s: %s",
                type(engine).__name__,
                type(exc).__name__,
                exc,
            )
    return failures


def _dispose_one(engine: Any) -> None:
    fast = getattr(engine, "dispose_for_shutdown", None)
    if callable(fast):
        result = fast()
        if _is_awaitable(result):
            # Protocol violation: the fast path must be synchronous. Run it anyway.
            _run_awaitable(result)
        return
    result = engine.dispose()
    if _is_awaitable(result):
        _run_awaitable(result)


def _is_awaitable(value: object) -> bool:
    return hasattr(value, "__await__")


def _run_awaitable(awaitable: Any, timeout_s: float = 5.0) -> None:
    """Run ``awaitable`` on a fresh event loop in a helper thread and wait for it.

    A helper thread because the caller may be inside a running event loop (or a signal
    handler that interrupted one), where a second loop cannot run.
    """
    import asyncio  # lazily: asyncio costs import time that sync users never need

    error: list[BaseException] = []

    async def _await() -> None:
        await awaitable

    def _target() -> None:
        try:
            asyncio.run(_await())
        except BaseException as exc:  # reported to the caller below
            error.append(exc)

    thread = threading.Thread(target=_target, name="lambda-pool-async-dispose", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"async dispose() did not finish within {timeout_s} s")
    if error:
        raise error[0]


def _dispose_within(budget_s: float) -> None:
    """Run :func:`dispose_all` in a helper thread and wait at most ``budget_s``.

    The SIGTERM handler interrupts the main thread at an arbitrary bytecode: if that
    thread held a pool lock, disposing inline would deadlock. A helper thread simply
    waits for the lock, and the budget keeps us inside Lambda's grace period.
    """
    thread = threading.Thread(target=dispose_all, name="lambda-pool-shutdown", daemon=True)
    thread.start()
    thread.join(budget_s)
    if thread.is_alive():
        logger.warning(
            "lambda-pool: disposing engines did not finish within %.3f s at SIGTERM", budget_s
        )


# --------------------------------------------------------------------------- hooks


def install_shutdown_hooks(*, budget_s: float = DEFAULT_SHUTDOWN_BUDGET_S) -> bool:
    """Dispose every registered engine on SIGTERM, at interpreter exit and around SnapStart.

    Idempotent: each part is installed once, however often this is called.

    * SIGTERM: the handler disposes engines (waiting at most ``budget_s`` seconds), then
      chains to the handler that was installed before it: a Python handler is called
      with the same arguments; ``SIG_DFL`` (or a handler installed outside Python) is
      restored and the signal raised again, so the process dies by SIGTERM exactly as it
      would have without lambda-pool (``atexit`` functions do not run, as before);
      ``SIG_IGN`` keeps the signal ignored and the process running.
    * ``atexit``: disposes engines at normal interpreter exit, including ``sys.exit``.
    * SnapStart, when ``snapshot_restore_py`` is importable: before the snapshot every
      engine is disposed (no socket survives into the snapshot); after restore engines
      are disposed again, :func:`restore_generation` is incremented and cached
      credentials are forgotten (``lambda_pool.auth.forget_all_cached_credentials``).

    Signal handlers can only be set from the main thread. Called from another thread,
    this installs ``atexit`` and SnapStart hooks, logs a warning that SIGTERM is not
    handled, and returns ``False``; a later call from the main thread installs the
    SIGTERM handler. Returns ``True`` when the SIGTERM handler is in place.
    """
    global _atexit_installed, _sigterm_installed, _snapstart_installed
    global _previous_sigterm, _budget_s
    with _install_lock:
        _budget_s = budget_s
        if not _atexit_installed:
            atexit.register(_on_exit)
            _atexit_installed = True
        if not _snapstart_installed:
            _snapstart_installed = _install_snapstart_hooks()
        if not _sigterm_installed:
            if threading.current_thread() is not threading.main_thread():
                logger.warning(
                    "lambda-pool: install_shutdown_hooks() called outside the main thread: "
                    "SIGTERM is not handled (atexit and SnapStart hooks are installed); "
                    "call it at module level of the handler"
                )
                return False
            previous = signal.getsignal(signal.SIGTERM)
            if previous is _on_sigterm:
                # Already ours (e.g. state reset in tests): never chain to ourselves.
                _sigterm_installed = True
                return True
            _previous_sigterm = previous
            signal.signal(signal.SIGTERM, _on_sigterm)
            _sigterm_installed = True
        return True


def _on_exit() -> None:
    global _shutdown_disposed
    if _shutdown_disposed:
        return
    _shutdown_disposed = True
    dispose_all()


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    global _shutdown_disposed
    _shutdown_disposed = True
    _dispose_within(_budget_s)
    previous = _previous_sigterm
    if previous == signal.SIG_IGN:
        # The process chose to survive SIGTERM; engines reconnect when used again.
        _shutdown_disposed = False
        return
    if callable(previous):
        # SystemExit from the previous handler propagates: the process exits with its
        # status, and _on_exit sees that engines were disposed already.
        previous(signum, frame)
        # The previous handler let the process live on: a later exit disposes again.
        _shutdown_disposed = False
        return
    # SIG_DFL, or None (a handler set outside Python, which cannot be restored):
    # die by the signal, as the process would have without lambda-pool.
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)
    # Only reached if the signal is blocked in this thread: end the same way anyway.
    os._exit(128 + signum)


def _install_snapstart_hooks() -> bool:
    try:
        import snapshot_restore_py
    except ImportError:
        return False
    snapshot_restore_py.register_before_snapshot(_before_snapshot)
    snapshot_restore_py.register_after_restore(_after_restore)
    return True


def _before_snapshot() -> None:
    """SnapStart: close every connection so none is frozen into the snapshot."""
    dispose_all()


def _after_restore() -> None:
    """SnapStart: nothing made before the snapshot is trusted after restore."""
    global _restore_generation
    # First, so a warm cache drops its connection even if a dispose below fails.
    _restore_generation += 1
    dispose_all()
    try:
        from lambda_pool import auth
    except ImportError:
        return
    forget: Callable[[], object] | None = getattr(auth, "forget_all_cached_credentials", None)
    if forget is None:
        return
    try:
        forget()
    except Exception as exc:  # a restore hook must not fail the restore
        logger.warning(
            "lambda-pool: forgetting cached credentials after restore failed: %s",
            type(exc).__name__,
        )


# --------------------------------------------------------------------------- extension


def register_internal_extension(name: str = "lambda-pool", *, timeout_s: float = 2.0) -> str | None:
    """Register an internal Lambda extension so the runtime receives SIGTERM at Shutdown.

    Call during Init (module level of the handler), before the first invocation.
    Posts ``{"events": []}`` to the Extensions API register endpoint, then starts a
    daemon thread that stays blocked on ``event/next`` (an extension must keep asking
    for its next event; with no events subscribed that call only returns at shutdown,
    if at all). Returns the extension identifier; ``None`` outside Lambda (no
    ``AWS_LAMBDA_RUNTIME_API``) or when already registered in this process.
    """
    global _extension_id
    api = os.environ.get("AWS_LAMBDA_RUNTIME_API")
    if not api:
        return None
    # Lazily: urllib.request pulls in http.client, email and ssl, which every cold
    # start would otherwise pay for even when no extension is registered.
    import json
    import urllib.request

    with _install_lock:
        if _extension_id is not None:
            return None
        request = urllib.request.Request(
            f"http://{api}/{_EXTENSION_API_VERSION}/extension/register",
            data=json.dumps({"events": []}).encode(),
            headers={"Lambda-Extension-Name": name, "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            extension_id: str | None = response.headers.get("Lambda-Extension-Identifier")
            response.read()
        if not extension_id:
            raise RuntimeError("Extensions API register answered without an identifier")
        _extension_id = extension_id
    thread = threading.Thread(
        target=_extension_loop,
        args=(api, extension_id),
        name="lambda-pool-extension",
        daemon=True,
    )
    thread.start()
    return extension_id


def _extension_loop(api: str, extension_id: str) -> None:
    import json
    import urllib.request

    url = f"http://{api}/{_EXTENSION_API_VERSION}/extension/event/next"
    while True:
        request = urllib.request.Request(
            url, headers={"Lambda-Extension-Identifier": extension_id}, method="GET"
        )
        try:
            # No timeout: the environment is frozen while this waits; that is the point.
            with urllib.request.urlopen(request) as response:
                body = response.read()
        except Exception as exc:  # a dead API: the environment is ending
            logger.debug("lambda-pool: extension event/next ended: %s", type(exc).__name__)
            return
        try:
            event = json.loads(body or b"{}")
        except ValueError:
            event = {}
        if isinstance(event, dict) and event.get("eventType") == "SHUTDOWN":
            return
