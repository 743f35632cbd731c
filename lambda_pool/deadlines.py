"""The invocation deadline: how long blocking database work may still take.

A :class:`Deadline` is a point on the monotonic clock.  The current one lives in a
:class:`contextvars.ContextVar`, so the thread doing an invocation's work, and every
asyncio task it starts, sees it without it being passed down through the pool, the
engine and the dialect.  :func:`lambda_pool.with_connection` sets it for each invocation
(the context's remaining time minus the margin); code outside the decorator bounds its
own work with ``with lambda_pool.deadline(seconds): ...``.

Each blocking step (connect, pre-ping, statement, commit, reset on return, backoff
between connect retries) asks :func:`current` how long it may block, and when the time
runs out it ends with :class:`~lambda_pool.exc.DeadlineExceededError` naming the step
and the time it had left when it started.  Nothing here starts a thread or a timer: a
deadline is only read by the steps, so a frozen Lambda sandbox has nothing armed.

Who reads it: psycopg connections are opened as
:class:`lambda_pool.dialects._psycopg_deadline.DeadlineConnection` (and its asyncio
twin), whose every socket wait and connect attempt ends by :func:`remaining`; asyncpg
work runs under ``asyncio.wait_for`` (:func:`lambda_pool.dialects.asyncpg.asyncpg_bounded`)
and its connect ``timeout`` is lowered to the time left.  :func:`step` names the step
for the error (the engines name the reset on return, the dialects the pre-ping, the
psycopg connection class commit and rollback; anything else is a statement).

This module is I/O-free and imports nothing heavy: it is read on every statement.
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Iterator
from contextlib import contextmanager

from lambda_pool.exc import ArgumentError, DeadlineExceededError

__all__ = [
    "Deadline",
    "StepInfo",
    "current",
    "current_step",
    "deadline",
    "remaining",
    "step",
    "use",
]


class Deadline:
    """A moment (``time.monotonic()`` seconds) by which blocking work must have ended.

    ``margin_ms`` is the time already kept free before the real end (Lambda's own
    deadline), reported in errors; ``source`` says in words where the bound came from.
    """

    __slots__ = ("expires_at", "margin_ms", "source")

    def __init__(self, expires_at: float, margin_ms: int = 0, source: str = "deadline") -> None:
        self.expires_at = expires_at
        self.margin_ms = margin_ms
        self.source = source

    @classmethod
    def after(cls, seconds: float, *, margin_ms: int = 0, source: str = "deadline") -> Deadline:
        """A deadline ``seconds`` from now."""
        return cls(time.monotonic() + seconds, margin_ms=margin_ms, source=source)

    def remaining(self) -> float:
        """Seconds left (zero or negative once it has passed)."""
        return self.expires_at - time.monotonic()

    def expired(self) -> bool:
        return time.monotonic() >= self.expires_at

    def exceeded(self, step: str, started_with: float, cause: str = "") -> DeadlineExceededError:
        """The error for ``step``, which started with ``started_with`` seconds left."""
        left_ms = max(0, int(started_with * 1000))
        margin = f" (after the margin of {self.margin_ms} ms)" if self.margin_ms else ""
        detail = f": {cause}" if cause else ""
        message = (
            f"the {step} did not finish before the {self.source}{detail}; it started with "
            f"{left_ms} ms left{margin}. The connection was discarded and the next one is "
            "opened afresh; if the server or network is slow, raise the function's timeout "
            "or make the work smaller"
        )
        if step == "commit":
            # The COMMIT may have reached the server with only its reply lost: a caller
            # that retries blindly could write twice (docs/reliability.md measures it).
            message += (
                ". Whether the transaction committed is unknown: the COMMIT may have "
                "reached the server and only its answer was lost; check before writing "
                "again, or make the write idempotent"
            )
        return DeadlineExceededError(message, step=step, remaining_ms=left_ms, cause=cause)

    def __repr__(self) -> str:
        return f"<Deadline {self.remaining() * 1000:.0f} ms left ({self.source})>"


_current: contextvars.ContextVar[Deadline | None] = contextvars.ContextVar(
    "lambda_pool.deadline", default=None
)


#: :func:`current` without a Python frame of its own, for the paths every statement takes.
current_deadline = _current.get
#: What :class:`use` does on entry (``token = set_current(bound)``) and exit
#: (``reset_current(token)``), for the decorator's per-invocation path; :class:`use`
#: chooses the earlier of the two deadlines first, which that caller does inline.
set_current = _current.set
reset_current = _current.reset


def current() -> Deadline | None:
    """The deadline of the work running in this thread or task, or ``None``."""
    return _current.get()


def remaining() -> float | None:
    """Seconds left before the current deadline, or ``None`` without one."""
    found = _current.get()
    return None if found is None else found.remaining()


class use:  # a context manager named like a function, as contextlib's are
    """Make ``bound`` the current deadline inside the block (the earlier one wins when
    an outer deadline ends sooner); ``None`` keeps the outer one.

    A class rather than a ``@contextmanager`` generator: every invocation enters it,
    and the generator machinery would cost more than the work it wraps.
    """

    __slots__ = ("_chosen", "_token")

    def __init__(self, bound: Deadline | None) -> None:
        outer = _current.get()
        chosen = bound
        if outer is not None and (chosen is None or outer.expires_at <= chosen.expires_at):
            chosen = outer
        self._chosen = chosen
        self._token: contextvars.Token[Deadline | None] | None = None

    def __enter__(self) -> Deadline | None:
        self._token = _current.set(self._chosen)
        return self._chosen

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _current.reset(token)


class StepInfo:
    """The blocking step under way: its name and the seconds it started with."""

    __slots__ = ("name", "started_with")

    def __init__(self, name: str, started_with: float | None) -> None:
        self.name = name
        self.started_with = started_with


_step: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "lambda_pool.deadline_step", default=None
)


class step:  # a context manager named like a function, as contextlib's are
    """Name the blocking step run inside the block (``"commit"``, ``"pre-ping"`` …) for
    :class:`~lambda_pool.exc.DeadlineExceededError`, and note the time it starts with.

    The outer name wins: the pool's reset on return calls the driver's ``rollback()``,
    which names itself ``"rollback"``, but the error says ``"reset on return"``.  A
    class, as :class:`use` is, for the same reason: it wraps every commit and return.
    """

    __slots__ = ("_name", "_token")

    def __init__(self, name: str) -> None:
        self._name = name
        self._token: contextvars.Token[StepInfo | None] | None = None

    def __enter__(self) -> None:
        if _step.get() is None:
            self._token = _step.set(StepInfo(self._name, remaining()))

    def __exit__(self, *exc_info: object) -> None:
        token, self._token = self._token, None
        if token is not None:
            _step.reset(token)


def current_step(default: str, left: float) -> tuple[str, float]:
    """``(name, seconds it started with)`` of the step under way; ``default`` and ``left``
    (the time left now) when no step was named."""
    info = _step.get()
    if info is None:
        return default, left
    return info.name, left if info.started_with is None else info.started_with


@contextmanager
def deadline(seconds: float, *, source: str = "deadline") -> Iterator[Deadline | None]:
    """Bound every blocking database step inside the block by ``seconds`` from now.

    ::

        with lambda_pool.deadline(2.5):
            with engine.connect() as conn:
                conn.execute("SELECT ...")

    A step still blocked when the time is up ends with
    :class:`~lambda_pool.exc.DeadlineExceededError`; its connection is discarded.
    Nested blocks keep the earlier of the two deadlines.
    """
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds != seconds:
        raise ArgumentError(f"deadline(seconds={seconds!r}): give a number of seconds")
    with use(Deadline.after(float(seconds), source=source)) as bound:
        yield bound
