"""Pool event listeners: ``listen``, ``listens_for``, ``remove``, ``contains``.

Events and their arguments (SQLAlchemy's)::

    first_connect, connect, close, detach  (dbapi_connection, connection_record)
    checkout        (dbapi_connection, connection_record, connection_proxy)
    checkin         (dbapi_connection or None, connection_record)
    reset           (dbapi_connection, connection_record, reset_state)
    invalidate, soft_invalidate  (dbapi_connection, connection_record, exception or None)
    close_detached  (dbapi_connection)

Engine events (SQLAlchemy's ``DialectEvents``), on an engine only::

    do_connect      (dialect, conn_rec, cargs, cparams)

``do_connect`` fires before the driver opens each new connection (once per physical
connection, not per checkout; after credentials are applied, before the driver's
``connect``).  ``cparams`` is that connect's keyword dict, a fresh copy for each
connect: change it to change what the driver gets (``cparams["application_name"] =
...``, an IAM token as ``cparams["password"]``).  It holds the password: never log it.
A listener may return a driver connection to use instead; the first non-``None``
return wins and the later listeners and the driver connect are skipped (an async
engine awaits a returned awaitable).  ``cargs`` is an empty list (the drivers take
keywords only; a listener adding to it is an ``ArgumentError``); ``conn_rec`` is
``None``: the pool attaches its record only once the connection exists (use the
``connect`` event for ``record.info``).  Not fired for an engine given ``creator=``
or ``pool=`` (the creator connects), as in SQLAlchemy.  Listeners registered before
or after ``create_engine`` apply to every later connect and survive ``dispose()``.

Targets and where a listener is stored:

* a pool **class** (``QueuePool``, ``Pool``…): a registry per class; a pool fires the
  registries of every class in its MRO, so ``Pool`` reaches every pool.  Class-level
  listeners run before the others.
* the **engine class** (``lambda_pool.Engine``, ``lambda_pool.asyncio.AsyncEngine``):
  the same as ``Pool`` (SQLAlchemy's rule): every pool, of every engine or none.
* a pool **instance**: the pool's own registry; ``pool.recreate()`` copies it.
* an **engine**: an engine owns one :class:`EventRegistry` and passes it to every pool
  it creates (``PoolClass(creator, events=engine.pool_events)``).  ``listen`` finds it
  as ``engine.pool_events`` (or ``engine.dispatch`` when that is an ``EventRegistry``);
  because the engine keeps the registry, listeners survive ``engine.dispose()``
  replacing the pool.  Failing that, an object with a ``.pool`` attribute is treated as
  that pool instance (whose listeners ``recreate()`` carries over), and an async engine
  wrapper is followed through ``.sync_engine``.

Order when an event fires (SQLAlchemy's): class-level listeners first, then the
engine's and the pool instance's together; within each of the two groups,
``insert=True`` listeners first (latest inserted first), then registration order.
``once=True`` fires a listener at most once.  ``named=True`` passes keyword arguments.
"""

from __future__ import annotations

import itertools
import sys
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from lambda_pool.exc import ArgumentError

__all__ = [
    "ENGINE_EVENTS",
    "EVENTS",
    "EventRegistry",
    "contains",
    "fire_do_connect",
    "listen",
    "listens_for",
    "remove",
]

#: Every pool event with its argument names (used for validation and ``named=True``).
EVENTS: dict[str, tuple[str, ...]] = {
    "first_connect": ("dbapi_connection", "connection_record"),
    "connect": ("dbapi_connection", "connection_record"),
    "checkout": ("dbapi_connection", "connection_record", "connection_proxy"),
    "checkin": ("dbapi_connection", "connection_record"),
    "close": ("dbapi_connection", "connection_record"),
    "detach": ("dbapi_connection", "connection_record"),
    "close_detached": ("dbapi_connection",),
    "reset": ("dbapi_connection", "connection_record", "reset_state"),
    "invalidate": ("dbapi_connection", "connection_record", "exception"),
    "soft_invalidate": ("dbapi_connection", "connection_record", "exception"),
}

#: Events an engine fires itself (not its pools), with their argument names.
ENGINE_EVENTS: dict[str, tuple[str, ...]] = {
    "do_connect": ("dialect", "conn_rec", "cargs", "cparams"),
}
_ARGUMENTS: dict[str, tuple[str, ...]] = {**EVENTS, **ENGINE_EVENTS}

if TYPE_CHECKING:  # annotations only: building the bound costs time at every cold start
    F = TypeVar("F", bound=Callable[..., Any])

# Ordering key source: inserted listeners take negative numbers so they sort first.
_sequence = itertools.count(1)
_lock = threading.Lock()
# Bumped on every change so pools can cache their merged listener lists.
_generation = 0


class _Listener:
    """One registered function with its options."""

    __slots__ = ("fired", "fn", "name", "named", "once", "order")

    def __init__(self, name: str, fn: Callable[..., Any], *, insert: bool, once: bool, named: bool):
        self.name = name
        self.fn = fn
        self.once = once
        self.named = named
        self.fired = False
        seq = next(_sequence)
        self.order = -seq if insert else seq

    def __call__(self, *args: Any) -> Any:
        """Call the listener; its return value matters only for ``do_connect``."""
        if self.once:
            with _lock:
                if self.fired:
                    return None
                self.fired = True
        if self.named:
            return self.fn(**dict(zip(_ARGUMENTS[self.name], args, strict=False)))
        return self.fn(*args)


class EventRegistry:
    """The listeners registered on one target (a pool class, a pool, or an engine)."""

    def __init__(self) -> None:
        self._listeners: dict[str, list[_Listener]] = {}

    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        insert: bool = False,
        once: bool = False,
        named: bool = False,
    ) -> None:
        _check_name(name)
        listener = _Listener(name, fn, insert=insert, once=once, named=named)
        with _lock:
            bucket = self._listeners.setdefault(name, [])
            bucket.append(listener)
            bucket.sort(key=lambda item: item.order)
            _changed()

    def remove(self, name: str, fn: Callable[..., Any]) -> None:
        _check_name(name)
        with _lock:
            bucket = self._listeners.get(name, [])
            for listener in bucket:
                if listener.fn is fn or listener.fn == fn:
                    bucket.remove(listener)
                    _changed()
                    return
        raise ArgumentError(f"No listener {fn!r} registered for pool event {name!r}")

    def contains(self, name: str, fn: Callable[..., Any]) -> bool:
        _check_name(name)
        return any(item.fn is fn or item.fn == fn for item in self._listeners.get(name, ()))

    def listeners(self, name: str) -> list[_Listener]:
        return list(self._listeners.get(name, ()))

    def copy(self) -> EventRegistry:
        """A registry with the same listeners (``once`` state shared), for ``recreate()``."""
        clone = EventRegistry()
        with _lock:
            clone._listeners = {name: list(items) for name, items in self._listeners.items()}
            _changed()
        return clone

    def __bool__(self) -> bool:
        return any(self._listeners.values())


# Class-level registries; weak so that throw-away subclasses (tests) can be collected.
_class_registries: weakref.WeakKeyDictionary[type, EventRegistry] = weakref.WeakKeyDictionary()


def _changed() -> None:
    global _generation
    _generation += 1


def generation() -> int:
    """Changes whenever any listener is added or removed anywhere (cache key for pools)."""
    return _generation


def class_registry(cls: type, *, create: bool = False) -> EventRegistry | None:
    """The registry of listeners attached to pool class ``cls`` itself (not its bases)."""
    registry = _class_registries.get(cls)
    if registry is None and create:
        registry = EventRegistry()
        _class_registries[cls] = registry
    return registry


def _check_name(name: str) -> None:
    if name not in _ARGUMENTS:
        raise ArgumentError(
            f"No such pool event {name!r}; valid events: {', '.join(sorted(EVENTS))}, "
            f"and on an engine: {', '.join(sorted(ENGINE_EVENTS))}"
        )


def fire_do_connect(
    registry: EventRegistry, dialect: Any, cargs: list[Any], cparams: dict[str, Any]
) -> Any:
    """Run an engine's ``do_connect`` listeners; the first connection one returns, or None."""
    for listener in registry.listeners("do_connect"):
        connection = listener(dialect, None, cargs, cparams)
        if connection is not None:
            return connection
    if cargs:
        raise ArgumentError(
            "a do_connect listener added positional connect arguments (cargs); "
            "lambda-pool's drivers take keywords only: set them in cparams"
        )
    return None


def _registry_for(target: Any) -> EventRegistry:
    if isinstance(target, type):
        from lambda_pool.pool.base import Pool  # the pool imports this module: import late

        if getattr(target, "_pool_events_reach_every_pool", False):
            target = Pool  # an engine class: every pool (SQLAlchemy's rule)
        if issubclass(target, Pool):
            registry = class_registry(target, create=True)
            assert registry is not None
            return registry
    elif _is_pool(target):
        return target._instance_events  # type: ignore[no-any-return]
    else:
        for attribute in ("pool_events", "dispatch"):
            candidate = getattr(target, attribute, None)
            if isinstance(candidate, EventRegistry):
                return candidate
        sync_engine = getattr(target, "sync_engine", None)
        if sync_engine is not None and sync_engine is not target:
            return _registry_for(sync_engine)
        from lambda_pool.pool.base import Pool

        pool = getattr(target, "pool", None)
        if isinstance(pool, Pool):
            return pool._instance_events
    raise ArgumentError(
        f"Cannot listen for pool events on {target!r}; accepted targets: a Pool class, "
        "a Pool instance, or an engine (an object with 'pool_events' or a 'pool')"
    )


def _is_pool(target: object) -> bool:
    """Whether ``target`` is a pool, without importing the pool machinery to find out: an
    engine's listeners go to the engine, and its pool is built at the first connect."""
    base = sys.modules.get("lambda_pool.pool.base")
    return base is not None and isinstance(target, base.Pool)


def listen(
    target: Any,
    identifier: str,
    fn: Callable[..., Any],
    *,
    insert: bool = False,
    once: bool = False,
    named: bool = False,
) -> None:
    """Register ``fn`` for pool event ``identifier`` (or engine event) on ``target``."""
    _check_name(identifier)
    _registry_for(_engine_event_target(target, identifier)).add(
        identifier, fn, insert=insert, once=once, named=named
    )


def _engine_event_target(target: Any, identifier: str) -> Any:
    """``target`` itself; an engine event on a pool is an error (pools never fire it)."""
    if identifier in ENGINE_EVENTS:
        from lambda_pool.pool.base import Pool

        if isinstance(target, Pool) or (isinstance(target, type) and issubclass(target, Pool)):
            raise ArgumentError(
                f"{identifier!r} is an engine event: listen on the engine "
                "(event.listen(engine, ...)), not on a pool"
            )
        if isinstance(target, type):
            raise ArgumentError(
                f"{identifier!r} is an engine event: listen on an engine instance "
                "(event.listen(engine, ...)), not on a class"
            )
    return target


def listens_for(
    target: Any, identifier: str, *, insert: bool = False, once: bool = False, named: bool = False
) -> Callable[[F], F]:
    """Decorator form of :func:`listen`."""
    _check_name(identifier)

    def decorate(fn: F) -> F:
        listen(target, identifier, fn, insert=insert, once=once, named=named)
        return fn

    return decorate


def remove(target: Any, identifier: str, fn: Callable[..., Any]) -> None:
    """Unregister ``fn``; an error if it was not registered there."""
    _registry_for(target).remove(identifier, fn)


def contains(target: Any, identifier: str, fn: Callable[..., Any]) -> bool:
    """True if ``fn`` is registered for ``identifier`` on ``target``."""
    return _registry_for(target).contains(identifier, fn)
