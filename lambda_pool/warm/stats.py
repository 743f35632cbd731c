"""Counters of one warm pool (``engine.pool.stats``) and the listeners that observe them."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from lambda_pool.warm.policy import ReplaceReason

log = logging.getLogger("lambda_pool.warm")

WarmListener = Callable[[str, Mapping[str, Any]], None]


class WarmStats:
    """Counters of one warm pool, safe to read from any thread (``engine.pool.stats``).

    ``opened``: connections opened for the warm slot.  ``reused``: checkouts that handed
    out the cached connection.  ``replaced``: ``{reason: count}`` with the
    :class:`ReplaceReason` values as keys.  ``pre_pings`` / ``pre_ping_failures``: round
    trips made because the connection sat idle too long, and how many failed.
    ``overflow_connections``: separate short-lived connections handed to a concurrent
    caller while the warm one was in use.

    Listeners added with :meth:`add_listener` are called as ``fn(event, details)`` with
    ``event`` one of ``"opened"``, ``"reused"``, ``"replaced"`` (``details["reason"]``),
    ``"pre_ping"`` (``details["ok"]``) and ``"separate_connection"``; a listener that
    raises is logged and never breaks a checkout.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._listeners: list[WarmListener] = []
        self.opened = 0
        self.reused = 0
        self.replaced: dict[str, int] = {}
        self.pre_pings = 0
        self.pre_ping_failures = 0
        self.overflow_connections = 0

    def add_listener(self, fn: WarmListener) -> None:
        """Call ``fn(event, details)`` on every warm-cache event."""
        with self._lock:
            self._listeners.append(fn)

    def remove_listener(self, fn: WarmListener) -> None:
        """Stop calling ``fn``; a listener that was never added is ignored."""
        with self._lock:
            if fn in self._listeners:
                self._listeners.remove(fn)

    def as_dict(self) -> dict[str, Any]:
        """A consistent copy of every counter (for logs and metrics)."""
        with self._lock:
            return {
                "opened": self.opened,
                "reused": self.reused,
                "replaced": dict(self.replaced),
                "pre_pings": self.pre_pings,
                "pre_ping_failures": self.pre_ping_failures,
                "overflow_connections": self.overflow_connections,
            }

    def __repr__(self) -> str:
        return f"WarmStats({self.as_dict()!r})"

    def record_opened(self) -> None:
        with self._lock:
            self.opened += 1
        self._emit("opened", {})

    def record_reused(self) -> None:
        with self._lock:
            self.reused += 1
        self._emit("reused", {})

    def record_replaced(self, reason: ReplaceReason) -> None:
        with self._lock:
            self.replaced[reason.value] = self.replaced.get(reason.value, 0) + 1
        self._emit("replaced", {"reason": reason.value})

    def record_pre_ping(self, ok: bool, idle_seconds: float | None) -> None:
        with self._lock:
            self.pre_pings += 1
            if not ok:
                self.pre_ping_failures += 1
        self._emit("pre_ping", {"ok": ok, "idle_seconds": idle_seconds})

    def record_separate_connection(self) -> None:
        with self._lock:
            self.overflow_connections += 1
        self._emit("separate_connection", {})

    def _emit(self, event: str, details: Mapping[str, Any]) -> None:
        if not self._listeners:
            return  # the common case, at every checkout: no lock, no copy
        with self._lock:
            listeners = list(self._listeners)
        for fn in listeners:
            try:
                fn(event, details)
            except Exception:
                # Observability must never turn a healthy checkout into a failure.
                log.exception("warm-cache listener %r failed on %r", fn, event)
