"""The registry of live engines that :mod:`lambda_pool.lifecycle` disposes at shutdown.

Every engine lambda-pool creates calls :func:`register` on itself; the registry holds it
weakly, so registering never keeps an engine alive.  It is apart from
:mod:`lambda_pool.lifecycle` (which re-exports these functions, their public home) so
that ``create_engine`` registers an engine without loading the shutdown machinery.
"""

from __future__ import annotations

import weakref
from typing import Any

__all__ = ["register", "registered_engines", "unregister"]

# id(engine) -> weak reference. A dict of weakrefs rather than a WeakSet so engines that
# are unhashable (``__eq__`` without ``__hash__``) can register too. No lock: the
# SIGTERM handler reads this from the main thread, possibly while the main thread was
# interrupted inside ``register``; plain dict operations are atomic under the GIL, a
# lock would deadlock there.
_registry: dict[int, weakref.ReferenceType[Any]] = {}


def register(engine: Any) -> Any:
    """Remember ``engine`` (weakly) so ``lifecycle.dispose_all()`` disposes it; returns it.

    ``engine`` needs ``dispose()`` or ``dispose_for_shutdown()`` (see
    :mod:`lambda_pool.lifecycle`) and must support weak references. Registering twice is
    harmless.
    """
    if not (
        callable(getattr(engine, "dispose_for_shutdown", None))
        or callable(getattr(engine, "dispose", None))
    ):
        raise TypeError(
            f"{type(engine).__name__} has neither dispose() nor dispose_for_shutdown(); "
            "lambda_pool.lifecycle.register() needs one of them"
        )
    key = id(engine)

    def _forget(ref: weakref.ReferenceType[Any], key: int = key) -> None:
        # Only drop our own entry: the id may already belong to a newer engine.
        if _registry.get(key) is ref:
            _registry.pop(key, None)

    existing = _registry.get(key)
    if existing is None or existing() is not engine:
        _registry[key] = weakref.ref(engine, _forget)
    return engine


def unregister(engine: Any) -> None:
    """Forget ``engine``; ``lifecycle.dispose_all()`` will not touch it any more."""
    ref = _registry.get(id(engine))
    if ref is not None and ref() is engine:
        _registry.pop(id(engine), None)


def registered_engines() -> list[Any]:
    """The registered engines still alive, oldest registration first."""
    return [e for e in (r() for r in _snapshot_refs()) if e is not None]


def _snapshot_refs() -> list[weakref.ReferenceType[Any]]:
    # A weakref callback from another thread could resize the dict mid-copy.
    for _ in range(5):
        try:
            return list(_registry.values())
        except RuntimeError:
            continue
    return []
