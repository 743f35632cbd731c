"""Inside one fleet container: import the handler like Lambda's Init, then serve invocations.

:func:`serve` is the body of a container process. It sets the function's environment,
imports ``module.function`` (the Init phase: ``@with_connection()`` builds its engine
here, without connecting), tells the coordinator it is ready, then answers one
invocation at a time over its pipe until told to stop or the pipe closes. Each
invocation gets a context whose ``get_remaining_time_in_millis()`` counts down from the
deadline the coordinator chose, as Lambda's does.

Messages are small dicts. In: ``{"event": ..., "deadline_ms": int}`` or ``{"stop": True}``.
Out: ``{"ready": True, "init_ms": float}`` or ``{"init_error": str, "message": str}`` once,
then per invocation ``{"ok": bool, "payload": ..., "error_type": str | None, "error": str
| None, "capacity": bool, "duration_ms": float, "connects": int}``.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time
from typing import Any

__all__ = ["describe_error", "serve"]

_MESSAGE_LIMIT = 240


def describe_error(exc: BaseException) -> tuple[str, str, bool]:
    """``(type name, first line of the message, is a capacity error)`` for the report.

    The type name carries the step a deadline error names (``DeadlineExceededError
    (connect)``). Driver messages name host, port and user, never the password.
    """
    from lambda_pool.dialects.base import is_capacity_message

    cause: BaseException | None = exc
    capacity = False
    # A lambda-pool error may wrap the driver's refusal: look down the chain.
    while cause is not None and not capacity:
        capacity = getattr(cause, "sqlstate", None) == "53300" or is_capacity_message(cause)
        cause = cause.__cause__
    name = type(exc).__module__.split(".")[0] + "." + type(exc).__qualname__
    step = getattr(exc, "step", None)
    if isinstance(step, str) and step:
        name += f" ({step})"
    text = str(exc).strip().splitlines()
    return name, (text[0] if text else "")[:_MESSAGE_LIMIT], capacity


def _load(handler: str, code_dir: str | None) -> Any:
    if code_dir and code_dir not in sys.path:
        sys.path.insert(0, code_dir)
    module_name, _, attribute = handler.rpartition(".")
    if not module_name:
        raise ValueError(f"handler must be 'module.function', got {handler!r}")
    return getattr(importlib.import_module(module_name), attribute)


def _connect_counter(function: Any) -> list[int]:
    """Count connects of the handler's engine (``with_connection`` exposes ``.engine``)."""
    counter = [0]
    engine = getattr(function, "engine", None)
    if engine is not None:
        from lambda_pool import event

        def count(dbapi_connection: Any, connection_record: Any) -> None:
            counter[0] += 1

        event.listen(engine, "connect", count)
    return counter


def _invoke(function: Any, request: dict[str, Any], counter: list[int]) -> dict[str, Any]:
    from lambda_pool.testing.context import LambdaContext

    context = LambdaContext(
        function_name="lambda-pool-fleet", remaining_ms=int(request["deadline_ms"])
    )
    connects_before = counter[0]
    started = time.perf_counter()
    try:
        payload = function(request.get("event"), context)
    except Exception as exc:
        error_type, message, capacity = describe_error(exc)
        return {
            "ok": False,
            "payload": None,
            "error_type": error_type,
            "error": message,
            "capacity": capacity,
            "duration_ms": (time.perf_counter() - started) * 1000.0,
            "connects": counter[0] - connects_before,
        }
    return {
        "ok": True,
        "payload": payload,
        "error_type": None,
        "error": None,
        "capacity": False,
        "duration_ms": (time.perf_counter() - started) * 1000.0,
        "connects": counter[0] - connects_before,
    }


def serve(
    pipe: Any,
    handler: str,
    code_dir: str | None,
    env: dict[str, str],
    log_path: str | None = None,
) -> None:
    """Run one container on ``pipe`` (a ``multiprocessing`` connection) until stopped.

    With ``log_path`` the container's stdout and stderr (its CloudWatch, so to speak)
    are appended to that file instead of the coordinator's terminal.
    """
    # The coordinator handles Ctrl-C and stops its containers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if log_path:
        descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.close(descriptor)
    os.environ.update(env)
    started = time.perf_counter()
    try:
        function = _load(handler, code_dir)
    except Exception as exc:
        error_type, message, _ = describe_error(exc)
        pipe.send({"init_error": error_type, "message": message})
        return
    counter = _connect_counter(function)
    pipe.send({"ready": True, "init_ms": (time.perf_counter() - started) * 1000.0})
    try:
        while True:
            try:
                request = pipe.recv()
            except (EOFError, OSError):
                return
            if request.get("stop"):
                return
            reply = _invoke(function, request, counter)
            try:
                pipe.send(reply)
            except (BrokenPipeError, OSError):
                return  # the coordinator gave up on this container (its deadline passed)
    finally:
        # multiprocessing ends its children with os._exit: atexit hooks do not run, so
        # close the connections here and the server sees a clean goodbye.
        from lambda_pool import lifecycle

        lifecycle.dispose_all()
