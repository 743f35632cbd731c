"""Pool and warm-cache events as Powertools log lines, EMF metrics and X-Ray subsegments.

``instrument(engine, logger=..., metrics=..., tracer=...)`` subscribes to the engine's
pool events (:mod:`lambda_pool.event`) and, for a warm engine, to its
:class:`lambda_pool.warm.WarmStats` listeners.  Nothing of Powertools is imported here:
the sinks are used by duck typing, so a stdlib ``logging.Logger`` works as ``logger``,
anything with ``add_metric(name=, unit=, value=)`` as ``metrics`` and anything with
``provider.in_subsegment(name)`` (a Powertools ``Tracer``) as ``tracer``.

Log lines (``logger.info``/``debug``/``warning`` with ``extra=``) always carry
``lambda_pool_event`` and ``pool`` (the pool class); others as they apply:

=====================  =========  ==========================================================
``lambda_pool_event``  level      other keys
=====================  =========  ==========================================================
``connection_opened``  INFO       ``backend_pid``, ``connect_ms``
``connection_reused``  DEBUG      ``backend_pid``
``connection_checkout`` DEBUG     ``backend_pid``, ``wait_ms``, ``reused`` (decorator only)
``connection_closed``  DEBUG      ``backend_pid``
``connection_invalidated`` WARNING ``backend_pid``, ``error`` (exception class and SQLSTATE)
``connection_recycled`` INFO      ``reason`` (a :class:`lambda_pool.warm.ReplaceReason` value)
``pre_ping``           DEBUG/WARNING ``ok``, ``idle_seconds``
``separate_connection`` INFO      (warm connection busy: a short-lived one was opened)
``statement_timeout``  WARNING    ``timeout_ms``, ``remaining_ms``, ``margin_ms``
=====================  =========  ==========================================================

EMF metrics (``metrics.add_metric``; no dimensions are added, the caller's apply):

======================  ============  ==================================================
``ConnectionsOpened``   Count         a new physical connection was opened
``ConnectionsReused``   Count         a checkout got an already open connection
``ConnectionsRecycled`` Count         a warm connection was replaced before reuse (any reason)
``ConnectionsInvalidated`` Count      a connection was dropped as broken
``PrePingFailures``     Count         a warm connection failed its pre-ping
``SeparateConnections`` Count         a concurrent checkout got a short-lived connection
``ConnectMs``           Milliseconds  time to open one connection (TCP, TLS, auth)
``CheckoutWaitMs``      Milliseconds  time the handler decorator waited for its connection
``StatementTimeouts``   Count         a statement hit the invocation's deadline
======================  ============  ==================================================

X-Ray: each new connection of a blocking engine is opened inside
``tracer.provider.in_subsegment("lambda_pool.connect")`` (annotated with
``backend_pid``; a failed connect closes it with the error), so cold-start connects show
in the trace.  The connect is timed and the subsegment held through the engine's public
``connect_wrappers`` (:class:`lambda_pool.engine_setup.ConnectAttempt`); async engines get
``ConnectMs`` and ``connect_ms`` but no subsegment (X-Ray's default context is per thread,
not per task).  An engine without ``connect_wrappers`` (``pool=`` given, another
library's engine) reports everything but the connect timing.

Never logged or measured: passwords, tokens, secret values, URLs, SQL text, parameters
and exception messages (which can quote SQL); errors are named by class and SQLSTATE.
A failing sink is logged on ``lambda_pool.observability`` and never breaks a checkout.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from lambda_pool import event

__all__ = [
    "CONNECT_SUBSEGMENT",
    "LOG_EVENT_KEY",
    "METRIC_CHECKOUT_WAIT_MS",
    "METRIC_CONNECTIONS_INVALIDATED",
    "METRIC_CONNECTIONS_OPENED",
    "METRIC_CONNECTIONS_RECYCLED",
    "METRIC_CONNECTIONS_REUSED",
    "METRIC_CONNECT_MS",
    "METRIC_PRE_PING_FAILURES",
    "METRIC_SEPARATE_CONNECTIONS",
    "METRIC_STATEMENT_TIMEOUTS",
    "Instrumentation",
    "instrument",
    "instrumentation_for",
]

log = logging.getLogger("lambda_pool.observability")

LOG_EVENT_KEY = "lambda_pool_event"
CONNECT_SUBSEGMENT = "lambda_pool.connect"

METRIC_CONNECTIONS_OPENED = "ConnectionsOpened"
METRIC_CONNECTIONS_REUSED = "ConnectionsReused"
METRIC_CONNECTIONS_RECYCLED = "ConnectionsRecycled"
METRIC_CONNECTIONS_INVALIDATED = "ConnectionsInvalidated"
METRIC_PRE_PING_FAILURES = "PrePingFailures"
METRIC_SEPARATE_CONNECTIONS = "SeparateConnections"
METRIC_CONNECT_MS = "ConnectMs"
METRIC_CHECKOUT_WAIT_MS = "CheckoutWaitMs"
METRIC_STATEMENT_TIMEOUTS = "StatementTimeouts"

# record.info key marking a physical connection opened but not yet checked out, so the
# checkout event can tell "opened for this checkout" from "reused".  record.info is
# emptied by the pool whenever a new connection is made, so a stale mark cannot survive.
_FRESH_KEY = "lambda_pool.observability.fresh"

_registry_lock = threading.Lock()
_instrumented: weakref.WeakKeyDictionary[Any, Instrumentation] = weakref.WeakKeyDictionary()
# False until the first instrument(): most processes never call it.
_any_instrumented = False


def _backend_pid(dbapi_connection: Any) -> int | None:
    """The server process id, read from the driver's local state (no round trip)."""
    info = getattr(dbapi_connection, "info", None)
    pid = getattr(info, "backend_pid", None)  # psycopg 3
    if pid is None:
        get_pid = getattr(dbapi_connection, "get_server_pid", None)  # asyncpg
        if callable(get_pid):
            with contextlib.suppress(Exception):
                pid = get_pid()
    return pid if isinstance(pid, int) else None


def _error_name(exc: BaseException | None) -> str | None:
    """An exception as class name and SQLSTATE only: messages can quote SQL or values."""
    if exc is None:
        return None
    name = type(exc).__name__
    sqlstate = getattr(exc, "sqlstate", None)
    return f"{name} (SQLSTATE {sqlstate})" if isinstance(sqlstate, str) else name


class Instrumentation:
    """The sinks attached to one engine; :func:`instrument` creates or updates it.

    Public methods are what the handler decorator reports through
    (:meth:`checkout_waited`, :meth:`statement_timeout`); :meth:`close` detaches
    every listener.
    """

    def __init__(self, engine: Any) -> None:
        self._engine_ref = weakref.ref(engine)
        self.logger: Any = None
        self.metrics: Any = None
        self.tracer: Any = None
        self._listening = False
        self._stats: Any = None
        # The connect duration, handed from the creator wrapper to the connect event
        # (fired by the pool right after the creator returns, on the same thread).
        self._pending_connect_ms = threading.local()

    # --- configuration ---------------------------------------------------------------

    def configure(self, *, logger: Any = None, metrics: Any = None, tracer: Any = None) -> None:
        """Set the sinks given (``None`` leaves one as it was) and attach the listeners."""
        if logger is not None:
            self.logger = logger
        if metrics is not None:
            self.metrics = metrics
        if tracer is not None:
            self.tracer = tracer
        engine = self._engine_ref()
        if engine is None:
            return
        if not self._listening:
            for name, fn in self._pool_listeners().items():
                event.listen(engine, name, fn)
            self._listening = True
        self._attach_warm_stats(engine)
        self._attach_connect_timer(engine)

    def _pool_listeners(self) -> dict[str, Callable[..., None]]:
        return {
            "connect": self._on_connect,
            "checkout": self._on_checkout,
            "close": self._on_close,
            "invalidate": self._on_invalidate,
        }

    def close(self) -> None:
        """Stop reporting: remove every listener this instrumentation added."""
        engine = self._engine_ref()
        if engine is not None and self._listening:
            for name, fn in self._pool_listeners().items():
                with contextlib.suppress(Exception):
                    event.remove(engine, name, fn)
        self._listening = False
        wrappers = getattr(engine, "connect_wrappers", None)
        if isinstance(wrappers, list) and self._time_connect in wrappers:
            wrappers.remove(self._time_connect)
        if self._stats is not None:
            self._stats.remove_listener(self._on_warm_event)
            self._stats = None
        self.logger = self.metrics = self.tracer = None
        with _registry_lock:
            if engine is not None and _instrumented.get(engine) is self:
                del _instrumented[engine]

    def _attach_warm_stats(self, engine: Any) -> None:
        # WarmStats survives dispose()/recreate() (the pool passes it on), so one
        # subscription covers the engine's whole life.
        stats = getattr(getattr(engine, "pool", None), "stats", None)
        if (
            stats is None
            or stats is self._stats
            or not callable(getattr(stats, "add_listener", None))
        ):
            return
        if self._stats is not None:
            self._stats.remove_listener(self._on_warm_event)
        stats.add_listener(self._on_warm_event)
        self._stats = stats

    def _attach_connect_timer(self, engine: Any) -> None:
        """Time each connect and hold the X-Ray subsegment around it.

        Pool events fire only after a connection exists; ``engine.connect_wrappers`` is
        the engine's public way to stand *around* a connect (and see a failure).  The
        list belongs to the engine, so ``engine.dispose()`` keeps the timer.
        """
        wrappers = getattr(engine, "connect_wrappers", None)
        if isinstance(wrappers, list) and self._time_connect not in wrappers:
            wrappers.append(self._time_connect)

    # --- sinks -----------------------------------------------------------------------

    def _pool_name(self) -> str:
        engine = self._engine_ref()
        pool = getattr(engine, "pool", None)
        return type(pool).__name__ if pool is not None else "unknown"

    def _log(self, level: int, message: str, event_name: str, **fields: Any) -> None:
        logger = self.logger
        if logger is None:
            return
        extra: dict[str, Any] = {LOG_EVENT_KEY: event_name, "pool": self._pool_name()}
        extra.update({key: value for key, value in fields.items() if value is not None})
        method = {
            logging.DEBUG: "debug",
            logging.INFO: "info",
            logging.WARNING: "warning",
        }[level]
        try:
            getattr(logger, method)(message, extra=extra)
        except Exception:
            log.exception("lambda-pool: logging %r through %r failed", event_name, logger)

    def _metric(self, name: str, unit: str, value: float) -> None:
        metrics = self.metrics
        if metrics is None:
            return
        try:
            # Unit as a string: Powertools accepts MetricUnit values by name, and this
            # keeps the module free of a Powertools import.
            metrics.add_metric(name=name, unit=unit, value=value)
        except Exception:
            log.exception("lambda-pool: metric %s through %r failed", name, metrics)

    @contextlib.contextmanager
    def _subsegment(self, name: str) -> Iterator[Any]:
        tracer = self.tracer
        provider = getattr(tracer, "provider", None)
        in_subsegment = getattr(provider, "in_subsegment", None)
        if not callable(in_subsegment):
            yield None
            return
        manager: Any
        try:
            manager = in_subsegment(name=name)
            segment = manager.__enter__()
        except Exception:
            # A tracer problem (no segment, daemon down) must not stop the connect.
            log.debug("lambda-pool: could not open X-Ray subsegment %s", name, exc_info=True)
            yield None
            return
        try:
            yield segment
        except BaseException as exc:
            if not manager.__exit__(type(exc), exc, exc.__traceback__):
                raise
        else:
            manager.__exit__(None, None, None)

    # --- connect timing (engine.connect_wrappers) ------------------------------------

    @contextlib.contextmanager
    def _time_connect(self, attempt: Any) -> Iterator[None]:
        subsegment = (
            contextlib.nullcontext() if attempt.is_async else self._subsegment(CONNECT_SUBSEGMENT)
        )
        with subsegment as segment:
            started = time.perf_counter()
            yield
            elapsed_ms = (time.perf_counter() - started) * 1000.0
            pid = _backend_pid(attempt.connection)
            if segment is not None and pid is not None:
                with contextlib.suppress(Exception):
                    segment.put_annotation(key="backend_pid", value=pid)
        # Read by the pool's connect event, fired right after this context ends in the
        # same thread (or task: no await in between).
        self._pending_connect_ms.value = elapsed_ms
        self._metric(METRIC_CONNECT_MS, "Milliseconds", round(elapsed_ms, 3))

    # --- pool event listeners --------------------------------------------------------

    def _on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        try:
            connection_record.info[_FRESH_KEY] = True
        except Exception:
            log.debug("lambda-pool: record.info unavailable", exc_info=True)
        connect_ms = getattr(self._pending_connect_ms, "value", None)
        self._pending_connect_ms.value = None
        self._metric(METRIC_CONNECTIONS_OPENED, "Count", 1)
        self._log(
            logging.INFO,
            "lambda-pool: connection opened",
            "connection_opened",
            backend_pid=_backend_pid(dbapi_connection),
            connect_ms=None if connect_ms is None else round(connect_ms, 3),
        )

    def _on_checkout(self, dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        try:
            fresh = connection_record.info.pop(_FRESH_KEY, False)
        except Exception:
            fresh = False
        if fresh:
            return
        self._metric(METRIC_CONNECTIONS_REUSED, "Count", 1)
        self._log(
            logging.DEBUG,
            "lambda-pool: connection reused",
            "connection_reused",
            backend_pid=_backend_pid(dbapi_connection),
        )

    def _on_close(self, dbapi_connection: Any, connection_record: Any) -> None:
        self._log(
            logging.DEBUG,
            "lambda-pool: connection closed",
            "connection_closed",
            backend_pid=_backend_pid(dbapi_connection),
        )

    def _on_invalidate(
        self, dbapi_connection: Any, connection_record: Any, exception: BaseException | None
    ) -> None:
        self._metric(METRIC_CONNECTIONS_INVALIDATED, "Count", 1)
        self._log(
            logging.WARNING,
            "lambda-pool: connection invalidated",
            "connection_invalidated",
            backend_pid=_backend_pid(dbapi_connection),
            error=_error_name(exception),
        )

    # --- warm-cache listener ---------------------------------------------------------

    def _on_warm_event(self, name: str, details: Mapping[str, Any]) -> None:
        if name == "replaced":
            reason = details.get("reason")
            self._metric(METRIC_CONNECTIONS_RECYCLED, "Count", 1)
            self._log(
                logging.INFO,
                f"lambda-pool: warm connection replaced ({reason})",
                "connection_recycled",
                reason=str(reason) if reason is not None else None,
            )
        elif name == "pre_ping":
            ok = bool(details.get("ok"))
            idle = details.get("idle_seconds")
            if not ok:
                self._metric(METRIC_PRE_PING_FAILURES, "Count", 1)
            self._log(
                logging.DEBUG if ok else logging.WARNING,
                "lambda-pool: pre-ping " + ("succeeded" if ok else "failed"),
                "pre_ping",
                ok=ok,
                idle_seconds=None if idle is None else round(float(idle), 3),
            )
        elif name == "separate_connection":
            self._metric(METRIC_SEPARATE_CONNECTIONS, "Count", 1)
            self._log(
                logging.INFO,
                "lambda-pool: warm connection busy, opened a separate one",
                "separate_connection",
            )
        # "opened" and "reused" are reported from the pool events, which cover every
        # pool class the same way.

    # --- reports from the handler decorator ------------------------------------------

    def checkout_waited(self, wait_ms: float, dbapi_connection: Any = None) -> None:
        """The decorator got its connection after ``wait_ms`` (connect included)."""
        self._metric(METRIC_CHECKOUT_WAIT_MS, "Milliseconds", round(wait_ms, 3))
        self._log(
            logging.DEBUG,
            "lambda-pool: connection checked out",
            "connection_checkout",
            wait_ms=round(wait_ms, 3),
            backend_pid=_backend_pid(dbapi_connection),
        )

    def statement_timeout(self, timeout_ms: int | None, remaining_ms: int, margin_ms: int) -> None:
        """A statement was stopped (or not started) because the deadline was near."""
        self._metric(METRIC_STATEMENT_TIMEOUTS, "Count", 1)
        self._log(
            logging.WARNING,
            "lambda-pool: statement stopped before the invocation deadline",
            "statement_timeout",
            timeout_ms=timeout_ms,
            remaining_ms=remaining_ms,
            margin_ms=margin_ms,
        )

    def __repr__(self) -> str:
        sinks = [
            name for name in ("logger", "metrics", "tracer") if getattr(self, name) is not None
        ]
        return f"<Instrumentation {self._pool_name()} sinks={sinks}>"


def instrument(
    engine: Any, *, logger: Any = None, metrics: Any = None, tracer: Any = None
) -> Instrumentation:
    """Report ``engine``'s pool activity to Powertools ``logger``, ``metrics``, ``tracer``.

    Idempotent per engine: a second call updates the sinks it is given (``None`` keeps
    the current one) and adds no second set of listeners, so several handlers sharing a
    warm engine report each event once.  Returns the engine's :class:`Instrumentation`.
    """
    global _any_instrumented
    with _registry_lock:
        instrumentation = _instrumented.get(engine)
        if instrumentation is None:
            instrumentation = Instrumentation(engine)
            _instrumented[engine] = instrumentation
            _any_instrumented = True
        instrumentation.configure(logger=logger, metrics=metrics, tracer=tracer)
    return instrumentation


def instrumentation_for(engine: Any) -> Instrumentation | None:
    """The engine's :class:`Instrumentation`, or ``None`` when it was never instrumented."""
    if not _any_instrumented:
        return None  # asked at every invocation: no lock, no weak-key lookup
    with _registry_lock:
        return _instrumented.get(engine)
