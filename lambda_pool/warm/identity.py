"""Cache identity: the key a warm engine is kept under, secrets folded into a keyed digest."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from typing import Any

# Secrets are folded into cache keys through an HMAC with a per-process random key: two
# URLs differing only in their password are different identities, yet the module-level
# cache never holds a password, nor a digest that could be brute-forced elsewhere.
_KEY_SALT = secrets.token_bytes(32)


def _digest(value: object) -> str:
    return hmac.new(_KEY_SALT, repr(value).encode(), hashlib.sha256).hexdigest()[:32]


def _freeze(value: Any) -> Any:
    """A hashable, order-independent stand-in for keyword arguments (dicts, lists…)."""
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_freeze(v) for v in value]
        return (
            tuple(sorted(items, key=repr)) if isinstance(value, (set, frozenset)) else tuple(items)
        )
    try:
        hash(value)
    except TypeError:
        return ("unhashable", type(value).__qualname__, id(value))
    return value


def identity_key(url: Any, credentials: Any, options: Mapping[str, Any]) -> tuple[Any, ...]:
    """The warm-cache key for ``url`` (a lambda-pool or SQLAlchemy ``URL``).

    Made of the URL rendered without its password (so host, port, driver, database and
    query options count), the user and database, the credentials provider's identity
    (the object itself: two providers are two identities), and a keyed digest of the
    password and every other keyword (``connect_args`` may carry secrets too).
    """
    others = {k: v for k, v in options.items() if k != "credentials"}
    return (
        url.render_as_string(hide_password=True),
        url.username,
        url.database,
        id(credentials) if credentials is not None else None,
        # The unmasked rendering too: a ?password= or ?sslpassword= is masked above.
        _digest((url.password, url.render_as_string(hide_password=False), _freeze(others))),
    )
