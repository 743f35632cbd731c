"""The runners of I/O-free procedures: :func:`drive` (blocking) and :func:`drive_async`.

A procedure is a generator that keeps its state, decides, and yields a step whenever it
needs I/O; a shell runs it by performing each step and sending the result back in (an
error is thrown back in).  The pool's procedures (:mod:`lambda_pool.pool.base`) and the
engine's connection procedures (:mod:`lambda_pool.engine_core`) run on these two loops.
They live apart from the pool so that an engine loads its runners without the pool
machinery, which is imported at the first connect (``lambda_pool.pool.core`` re-exports
both under their old names).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

__all__ = ["drive", "drive_async"]

S = TypeVar("S")
V = TypeVar("V")


def drive(proc: Generator[S, Any, V], perform: Callable[[S], Any]) -> V:
    """Run a procedure: perform each step it yields and send the result back in (an error
    is thrown back in).  The sync shells (the pool's, the engine's) are this loop."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = proc.throw(error) if error is not None else proc.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            send = perform(step)
        except BaseException as exc:
            error, send = exc, None


async def drive_async(proc: Generator[S, Any, V], perform: Callable[[S], Awaitable[Any]]) -> V:
    """:func:`drive` for the async shells: each step is awaited."""
    send: Any = None
    error: BaseException | None = None
    while True:
        try:
            step = proc.throw(error) if error is not None else proc.send(send)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        error = None
        try:
            send = await perform(step)
        except BaseException as exc:
            error, send = exc, None
