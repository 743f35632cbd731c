"""``?plugin=lambda_pool``: lambda-pool's serverless behaviour for plain ``create_engine(url)``.

Some ``create_engine`` calls are not the application's to change: Alembic's ``env.py``, a
framework's settings, a library that takes a URL.  SQLAlchemy's own extension point for
them is a ``CreateEnginePlugin`` named in the URL (or in ``plugins=[...]``); this one is
registered under the entry point group ``sqlalchemy.plugins`` as ``lambda_pool``::

    engine = sqlalchemy.create_engine(
        "postgresql://app@db.example.com/app?plugin=lambda_pool&auth=iam&region=eu-west-1"
    )

It gives that engine what :func:`lambda_pool.sqlalchemy.create_engine` gives (the same
code: pool choice and engine equipment are shared):

* the psycopg 3 driver for ``postgresql://`` / ``postgres://`` (SQLAlchemy's own default
  would be psycopg2);
* credentials from the URL's lambda-pool keys (``auth=iam``, ``secret=...``, ``region``,
  ``token_margin``, ``secret_max_age``; see ``docs/CREDENTIALS.md``), applied in
  ``do_connect`` with one retry after a rotation, and connections retired at checkout
  once their IAM token expired (``recycle_on_credentials_expiry=false`` turns it off);
* the warm-container pool (one connection per container, reused under
  :func:`lambda_pool.warm.decide_reuse`'s rules) — the default, since an engine built at
  module scope lives as long as the container; ``warm=false`` gives ``NullPool`` instead,
  and a ``poolclass``/``pool_size`` the caller passes gives that pool;
  ``pre_ping_idle_seconds``, ``transaction_pooling`` and ``defer_session_reset``
  (``false``: ``DISCARD ALL`` at return instead of with the next ``BEGIN``; see
  :mod:`lambda_pool.sqlalchemy`) tune the warm pool;
* registration with the shutdown hooks (SIGTERM, ``atexit``, SnapStart), which are
  installed.

The lambda-pool keys are removed from the URL before SQLAlchemy's dialect sees it.
Blocking engines only: ``create_async_engine`` with the plugin is refused with advice.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.engine import URL, CreateEnginePlugin, Engine
from sqlalchemy.engine.base import Engine as _Engine  # noqa: F401  (re-export guard)
from sqlalchemy.engine.interfaces import Dialect
from sqlalchemy.pool import Pool

from lambda_pool.exc import ArgumentError

__all__ = ["LambdaPoolPlugin"]

# The plugin's own URL keys (besides the credential keys of lambda_pool.auth.from_url).
_FLAG_KEYS = ("warm", "transaction_pooling", "recycle_on_credentials_expiry", "defer_session_reset")
_NUMBER_KEYS = ("pre_ping_idle_seconds",)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _single(url: URL, key: str) -> str | None:
    value = url.query.get(key)
    if value is None:
        return None
    if isinstance(value, tuple):
        raise ArgumentError(f"URL query key {key!r} is given more than once (plugin=lambda_pool)")
    return value


def _flag(url: URL, key: str, default: bool) -> bool:
    value = _single(url, key)
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ArgumentError(f"URL query key {key}={value!r} (plugin=lambda_pool): use true or false")


def _seconds(url: URL, key: str) -> float | None:
    value = _single(url, key)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ArgumentError(
            f"URL query key {key}={value!r} (plugin=lambda_pool): give a number of seconds >= 0"
        )
    return seconds


class LambdaPoolPlugin(CreateEnginePlugin):
    """The ``lambda_pool`` SQLAlchemy plugin (see the module docstring)."""

    def __init__(self, url: URL, kwargs: dict[str, Any]) -> None:
        from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url
        from lambda_pool.sqlalchemy import _choose_pool, _wall_clock

        super().__init__(url, kwargs)
        if kwargs.get("_is_async"):
            raise ArgumentError(
                "plugin=lambda_pool serves blocking engines (sqlalchemy.create_engine); for "
                "asyncio use lambda_pool.warm_async_engine or "
                "lambda_pool.asyncio.create_async_engine"
            )
        self._own_keys = tuple(AUTH_QUERY_KEYS) + _FLAG_KEYS + _NUMBER_KEYS
        self._driver = _psycopg_driver(url.drivername)
        self._is_psycopg = self._driver == "postgresql+psycopg"
        credential_query = {
            key: value
            for key, value in url.query.items()
            if key in AUTH_QUERY_KEYS or key == "sslmode"
        }
        self._credentials = provider_from_url(credential_query, url.username, url.host, url.port)
        self._clock = getattr(self._credentials, "clock", None) or _wall_clock
        self._recycle = _flag(url, "recycle_on_credentials_expiry", True)
        caller_chose_pool = any(
            name in kwargs for name in ("poolclass", "pool", "pool_size", "max_overflow")
        )
        explicit_warm = _single(url, "warm") is not None
        self._warm = _flag(url, "warm", not caller_chose_pool)
        if self._warm and caller_chose_pool and explicit_warm:
            raise ArgumentError(
                "warm=true in the URL chooses the pool (one warm connection per container); "
                "drop poolclass=/pool=/pool_size=/max_overflow= or set warm=false"
            )
        pre_ping_idle = _seconds(url, "pre_ping_idle_seconds")
        transaction_pooling = _flag(url, "transaction_pooling", False)
        defer_session_reset = _flag(url, "defer_session_reset", True)
        _choose_pool(
            kwargs,
            warm=self._warm,
            is_psycopg=self._is_psycopg,
            pre_ping_idle_seconds=pre_ping_idle if self._warm else None,
            recycle_on_credentials_expiry=self._recycle,
            transaction_pooling=transaction_pooling if self._warm else False,
            clock=self._clock,
        )
        if not self._warm and (
            pre_ping_idle is not None
            or transaction_pooling
            or _single(url, "defer_session_reset") is not None
        ):
            raise ArgumentError(
                "pre_ping_idle_seconds, transaction_pooling and defer_session_reset in the "
                "URL apply to the warm pool (plugin=lambda_pool without warm=false and "
                "without a pool of your own)"
            )
        if self._warm and not defer_session_reset:
            kwargs["defer_session_reset"] = False

    def update_url(self, url: URL) -> URL:
        """The URL the dialect sees: psycopg 3 chosen, lambda-pool's keys removed."""
        stripped = url.difference_update_query(self._own_keys)
        return stripped.set(drivername=self._driver)

    def handle_dialect_kwargs(
        self, dialect_cls: type[Dialect], dialect_args: dict[str, Any]
    ) -> None:
        """Nothing to change in the dialect's arguments."""

    def handle_pool_kwargs(self, pool_cls: type[Pool], pool_args: dict[str, Any]) -> None:
        """The pool keywords were set in ``__init__`` (before SQLAlchemy chose the class)."""

    def engine_created(self, engine: Engine) -> None:
        """Disconnect rules, credentials and the shutdown hooks for the new engine."""
        from lambda_pool import lifecycle
        from lambda_pool.sqlalchemy import _equip_engine

        _equip_engine(
            engine,
            is_psycopg=self._is_psycopg,
            credentials=self._credentials,
            recycle_on_credentials_expiry=self._recycle,
            clock=self._clock,
            warm=self._warm,
        )
        lifecycle.install_shutdown_hooks()


def _psycopg_driver(drivername: str) -> str:
    """``postgresql``/``postgres`` mean psycopg 3 here; an explicit driver is kept."""
    if drivername in ("postgresql", "postgres"):
        return "postgresql+psycopg"
    return drivername
