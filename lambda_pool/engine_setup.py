"""From ``create_engine``/``create_async_engine`` keywords to a dialect, a creator and a pool.

Shared by the sync and async engines so both accept the same keywords, pick pool
classes by the same rule and treat credentials the same way:

* **pool class**: ``poolclass=`` wins; ``pool_size``, ``max_overflow`` or
  ``pool_timeout`` without one selects ``QueuePool`` (``AsyncAdaptedQueuePool`` for
  async engines); an in-memory SQLite URL gets ``SingletonThreadPool`` (its database
  lives only as long as its connection, as in SQLAlchemy); everything else gets
  ``NullPool``, the serverless default.  Such a default pool, chosen with no pool
  keyword, is built at the engine's first use (``EngineParts.pool_factory``), so
  ``create_engine`` does not load :mod:`lambda_pool.pool`; any pool keyword is checked
  against its class, and the pool built, in ``create_engine`` as before.
* **credentials** (docs/ARCHITECTURE.md, "Credentials ↔ engine"): the provider is
  asked on every new connection; an authentication failure calls ``refresh()`` and
  retries once; ``expires_at`` goes to ``record.info[CREDENTIALS_EXPIRE_KEY]`` and a
  connection past it is retired at checkout (``recycle_on_credentials_expiry``).
  Credentials that need TLS (RDS IAM) refuse a ``sslmode`` that allows plain text.
* **capacity retries**: a connect the dialect calls a capacity error ("too many
  clients", PgBouncer's ``max_client_conn``, RDS Proxy's limits) is retried with
  jittered backoff (``connect_retries``, ``connect_retry_backoff``; see
  :mod:`lambda_pool.connect_retry`), around every creator the engine gives its pool.
* **connect hooks**: the engine-level ``do_connect`` event (SQLAlchemy's) fires before
  each driver connect with that connect's keyword dict (see :mod:`lambda_pool.event`);
  ``engine.connect_wrappers`` (context-manager factories, see :class:`ConnectAttempt`)
  are entered around each new connection, retries included, and see how it ended.
* **transaction pooling** (``transaction_pooling=True`` or ``?transaction_pooling=true``
  in the URL): PgBouncer in transaction mode or RDS Proxy in front of the server; the
  driver then prepares no server-side statements (psycopg ``prepare_threshold=None``,
  asyncpg ``statement_cache_size=0``).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from lambda_pool._record import Record
from lambda_pool.dialects import load_dialect
from lambda_pool.dialects.base import AsyncDialect, SyncDialect
from lambda_pool.event import EventRegistry, fire_do_connect
from lambda_pool.exc import ArgumentError, DisconnectionError
from lambda_pool.url import URL, make_url

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider, Credentials
    from lambda_pool.connect_retry import ConnectRetry
    from lambda_pool.pool import Pool

__all__ = [
    "CREDENTIALS_EXPIRE_KEY",
    "TRANSACTION_POOLING_QUERY_KEY",
    "ConnectAttempt",
    "ConnectWrapper",
    "EngineParts",
    "build_engine_parts",
    "engine_logger",
    "transaction_pooling_from_url",
]

#: ``record.info`` key holding the moment (provider clock) a connection's credentials expire.
CREDENTIALS_EXPIRE_KEY = "lambda_pool.credentials_expire_at"

# create_engine keyword -> pool constructor keyword.
_POOL_KEYWORDS: dict[str, str] = {
    "pool_size": "pool_size",
    "max_overflow": "max_overflow",
    "pool_timeout": "timeout",
    "pool_recycle": "recycle",
    "pool_pre_ping": "pre_ping",
    "pool_reset_on_return": "reset_on_return",
    "pool_use_lifo": "use_lifo",
    "pool_logging_name": "logging_name",
    "echo_pool": "echo",
}
_SIZING = ("pool_size", "max_overflow", "pool_timeout")
_ENGINE_KEYWORDS = frozenset(
    {
        "poolclass",
        "pool",
        "creator",
        "connect_args",
        "credentials",
        "recycle_on_credentials_expiry",
        "echo",
        "logging_name",
        "transaction_pooling",
    }
)
#: URL query key that turns transaction pooling on (removed before the driver sees the URL).
TRANSACTION_POOLING_QUERY_KEY = "transaction_pooling"
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# lambda_pool.connect_retry's KEYWORDS (a test keeps them equal), named here so that an
# engine created without them loads that module at its first connect, not at Init.
_RETRY_KEYWORDS = frozenset(
    {"connect_retries", "connect_retry_backoff", "connect_retry_random", "connect_retry_sleep"}
)
ACCEPTED_KEYWORDS = frozenset(_POOL_KEYWORDS) | _ENGINE_KEYWORDS | _RETRY_KEYWORDS


class ConnectAttempt(Record):
    """One new connection being opened, as a connect wrapper sees it.

    A connect wrapper is a function ``wrapper(attempt) -> context manager``, appended to
    ``engine.connect_wrappers``.  The engine enters each wrapper's context (in list
    order) before it opens a new physical connection and leaves it when the connection
    is open (``attempt.connection`` is then the driver connection) or the connect
    failed (the exception passes through the context's exit).  The context spans the
    whole open: credentials, capacity retries and ``do_connect`` listeners included;
    it runs once per new connection, never per checkout, and the pool's ``connect``
    event fires right after it.  Entered in the task or thread that connects, with no
    ``await`` between the exit and that ``connect`` event.  Not used by an engine given
    ``pool=`` (its pool has its own creator).
    """

    __slots__ = _fields = ("is_async", "connection")
    #: True for an async engine (the connect is awaited inside the context).
    is_async: bool
    #: The driver connection, once the connect returned.
    connection: Any

    def __init__(self, is_async: bool, connection: Any = None) -> None:
        self.is_async = is_async
        self.connection = connection


#: ``engine.connect_wrappers`` entries: see :class:`ConnectAttempt`.
ConnectWrapper = Callable[[ConnectAttempt], contextlib.AbstractContextManager[Any]]


class EngineParts(Record):
    """What an engine is made of.

    ``pool`` is ``None`` when the engine's pool is built at its first use by
    ``pool_factory`` (a default pool with no pool keywords: building it cannot fail, so
    nothing is checked later than it would have been, and ``create_engine`` does not
    load the pool machinery).
    """

    __slots__ = _fields = (
        "url",
        "dialect",
        "pool",
        "pool_factory",
        "pool_events",
        "credentials",
        "echo",
        "logging_name",
        "transaction_pooling",
        "connect_retry",
        "connect_wrappers",
    )

    url: URL
    dialect: SyncDialect | AsyncDialect
    pool: Pool | None
    pool_factory: Callable[[], Pool] | None
    pool_events: EventRegistry
    credentials: CredentialProvider | None
    echo: bool | str
    logging_name: str | None
    transaction_pooling: bool
    #: ``None``: the default policy, built at the first connect.
    connect_retry: ConnectRetry | None
    connect_wrappers: list[ConnectWrapper]

    def __init__(
        self,
        url: URL,
        dialect: SyncDialect | AsyncDialect,
        pool: Pool | None,
        pool_factory: Callable[[], Pool] | None,
        pool_events: EventRegistry,
        credentials: CredentialProvider | None,
        echo: bool | str,
        logging_name: str | None,
        transaction_pooling: bool = False,
        connect_retry: ConnectRetry | None = None,
        connect_wrappers: list[ConnectWrapper] | None = None,
    ) -> None:
        self.url = url
        self.dialect = dialect
        self.pool = pool
        self.pool_factory = pool_factory
        self.pool_events = pool_events
        self.credentials = credentials
        self.echo = echo
        self.logging_name = logging_name
        self.transaction_pooling = transaction_pooling
        self.connect_retry = connect_retry
        self.connect_wrappers = [] if connect_wrappers is None else connect_wrappers


def engine_logger(logging_name: str | None, echo: bool | str) -> logging.Logger:
    """``lambda_pool.engine`` (``.<logging_name>``); ``echo`` makes it print SQL to stdout."""
    logger = logging.getLogger("lambda_pool.engine" + (f".{logging_name}" if logging_name else ""))
    if echo:
        logger.setLevel(logging.DEBUG if echo == "debug" else logging.INFO)
        if not logger.handlers:
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
            )
            logger.addHandler(handler)
    return logger


# --------------------------------------------------------------------------- validation


def _fail(keyword: str, value: object, accepted: str) -> ArgumentError:
    return ArgumentError(f"Invalid value for {keyword}: {value!r}; accepted: {accepted}")


def _check_values(kw: Mapping[str, Any]) -> None:
    """Check pool keywords under the names the caller used (the pool re-checks its own)."""

    def integer(name: str, minimum: int) -> None:
        value = kw[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise _fail(name, value, f"an integer >= {minimum}")

    if "pool_size" in kw:
        integer("pool_size", 0)
    if "max_overflow" in kw:
        integer("max_overflow", -1)
    if "pool_timeout" in kw:
        value = kw["pool_timeout"]
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
        ):
            raise _fail("pool_timeout", value, "a number of seconds >= 0, or None to wait forever")
    if "pool_recycle" in kw:
        value = kw["pool_recycle"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail("pool_recycle", value, "a number of seconds, -1 = never")
    for name in (
        "pool_pre_ping",
        "pool_use_lifo",
        "recycle_on_credentials_expiry",
        "transaction_pooling",
    ):
        if name in kw and not isinstance(kw[name], bool):
            raise _fail(name, kw[name], "True or False")
    if "pool_reset_on_return" in kw:
        from lambda_pool.pool.core import check_reset_on_return

        try:
            check_reset_on_return(kw["pool_reset_on_return"])
        except ArgumentError:
            raise _fail(
                "pool_reset_on_return",
                kw["pool_reset_on_return"],
                "'rollback' or True (the default), 'commit', None, False or 'none'",
            ) from None
    for name in ("echo", "echo_pool"):
        if name in kw and kw[name] not in (True, False, None, "debug"):
            raise _fail(name, kw[name], "False, True or 'debug'")
    for name in ("pool_logging_name", "logging_name"):
        if name in kw and kw[name] is not None and not isinstance(kw[name], str):
            raise _fail(name, kw[name], "a string")
    if "connect_args" in kw and not isinstance(kw["connect_args"], Mapping):
        raise _fail("connect_args", type(kw["connect_args"]).__name__, "a dict of driver keywords")
    if "creator" in kw and not callable(kw["creator"]):
        raise _fail("creator", kw["creator"], "a function returning a DB-API connection")


def _check_provider(provider: object) -> None:
    if not (
        callable(getattr(provider, "get", None))
        and callable(getattr(provider, "refresh", None))
        and callable(getattr(provider, "clock", None))
    ):
        raise ArgumentError(
            "credentials= needs a credential provider with get(), refresh() and clock "
            "(e.g. lambda_pool.StaticCredentials, SecretsManagerCredentials, IAMCredentials)"
        )


def _choose_poolclass(
    kw: Mapping[str, Any], url: URL, *, is_async: bool, dialect_name: str
) -> type[Pool]:
    from lambda_pool.pool import (
        AsyncAdaptedQueuePool,
        NullPool,
        Pool,
        QueuePool,
        SingletonThreadPool,
    )

    poolclass = kw.get("poolclass")
    if poolclass is not None:
        if not (isinstance(poolclass, type) and issubclass(poolclass, Pool)):
            raise _fail("poolclass", poolclass, "a lambda_pool.pool.Pool subclass")
        if not is_async and issubclass(poolclass, AsyncAdaptedQueuePool):
            raise ArgumentError(
                "AsyncAdaptedQueuePool is for asyncio engines "
                "(lambda_pool.asyncio.create_async_engine); use QueuePool with create_engine()"
            )
        return poolclass
    if any(name in kw for name in _SIZING):
        return AsyncAdaptedQueuePool if is_async else QueuePool
    if dialect_name == "sqlite":
        from lambda_pool.dialects.sqlite import is_memory_url

        if is_memory_url(url):
            return SingletonThreadPool
    return NullPool


def _default_pool_name(kw: Mapping[str, Any], url: URL, *, dialect_name: str) -> str | None:
    """The default pool class's name when no keyword concerns the pool, else ``None``.

    The rule of :func:`_choose_poolclass` for that case, without importing the pool.
    """
    if "poolclass" in kw or any(name in kw for name in _POOL_KEYWORDS):
        return None
    if dialect_name == "sqlite":
        from lambda_pool.dialects.sqlite import is_memory_url

        if is_memory_url(url):
            return "SingletonThreadPool"
    return "NullPool"


def _default_pool_factory(
    name: str,
    creator: Callable[[], Any],
    dialect: SyncDialect | AsyncDialect,
    events: EventRegistry,
) -> Callable[[], Pool]:
    """Builds the default pool ``name`` (importing the pool machinery) when first called."""

    def build_pool() -> Pool:
        from lambda_pool import pool as pool_module

        poolclass: type[Pool] = getattr(pool_module, name)
        return poolclass(creator, dialect=dialect, events=events)

    return build_pool


def _pool_arguments(
    poolclass: type[Pool], kw: Mapping[str, Any], configuration: str
) -> dict[str, Any]:
    """Translate ``pool_*`` keywords, rejecting ones the pool class does not take."""
    accepted = set(inspect.signature(poolclass.__init__).parameters)
    arguments: dict[str, Any] = {}
    rejected: list[str] = []
    for engine_name, pool_name in _POOL_KEYWORDS.items():
        if engine_name not in kw:
            continue
        if pool_name in accepted:
            arguments[pool_name] = kw[engine_name]
        else:
            rejected.append(engine_name)
    if rejected:
        names = ", ".join(repr(name) for name in rejected)
        raise ArgumentError(
            f"Invalid argument(s) {names} sent to create_engine(), using configuration "
            f"{configuration}; {poolclass.__name__} does not take them "
            "(pool_size/max_overflow/pool_timeout need QueuePool)"
        )
    return arguments


# --------------------------------------------------------------------------- driver connect


class _DriverConnect:
    """The driver connect behind every engine-built creator: ``do_connect`` listeners first.

    Each connect gets its own copy of the keyword dict, so a listener's change applies
    to that connect only (a token set for one connect never lingers for the next).
    """

    def __init__(self, dialect: SyncDialect | AsyncDialect, events: EventRegistry) -> None:
        self.dialect = dialect
        self.events = events

    def connect_sync(self, cparams: Mapping[str, Any]) -> Any:
        dialect = self.dialect
        assert isinstance(dialect, SyncDialect)
        params = dict(cparams)
        connection = fire_do_connect(self.events, dialect, [], params)
        return connection if connection is not None else dialect.connect(params)

    async def connect_async(self, cparams: Mapping[str, Any]) -> Any:
        dialect = self.dialect
        assert isinstance(dialect, AsyncDialect)
        params = dict(cparams)
        connection = fire_do_connect(self.events, dialect, [], params)
        if connection is None:
            return await dialect.connect(params)
        if inspect.isawaitable(connection):
            connection = await connection
        return connection


# --------------------------------------------------------------------------- credentials


class _CredentialsBinding:
    """Opens connections with a provider's credentials and retires them when they expire."""

    def __init__(
        self,
        provider: CredentialProvider,
        driver: _DriverConnect,
        cparams: Mapping[str, Any],
    ) -> None:
        self.provider = provider
        self.driver = driver
        self.dialect = driver.dialect
        self.cparams = dict(cparams)
        # id(dbapi connection) -> expires_at, from the creator until the connect event
        # (fired by the pool right after the creator returns) moves it to record.info.
        self._pending: dict[int, float] = {}

    def params(self, credentials: Credentials) -> dict[str, Any]:
        return self.dialect.apply_credentials(
            self.cparams, credentials.user, credentials.password, credentials.connect_args
        )

    def opened(self, connection: Any, credentials: Credentials) -> Any:
        if credentials.expires_at is not None:
            self._pending[id(connection)] = credentials.expires_at
        return connection

    def connect_sync(self) -> Any:
        connect = self.driver.connect_sync
        credentials = self.provider.get()
        try:
            return self.opened(connect(self.params(credentials)), credentials)
        except Exception as exc:
            if not self.dialect.is_auth_failure(exc):
                raise
        # The password may have been rotated: forget the cached one and try once more.
        self.provider.refresh()
        credentials = self.provider.get()
        return self.opened(connect(self.params(credentials)), credentials)

    async def connect_async(self) -> Any:
        connect = self.driver.connect_async
        credentials = self.provider.get()
        try:
            return self.opened(await connect(self.params(credentials)), credentials)
        except Exception as exc:
            if not self.dialect.is_auth_failure(exc):
                raise
        self.provider.refresh()
        credentials = self.provider.get()
        return self.opened(await connect(self.params(credentials)), credentials)

    def on_connect(self, dbapi_connection: Any, connection_record: Any) -> None:
        expires_at = self._pending.pop(id(dbapi_connection), None)
        if expires_at is not None:
            connection_record.info[CREDENTIALS_EXPIRE_KEY] = expires_at

    def on_checkout(self, dbapi_connection: Any, connection_record: Any, proxy: Any) -> None:
        expires_at = connection_record.info.get(CREDENTIALS_EXPIRE_KEY)
        if expires_at is not None and self.provider.clock() >= expires_at:
            # The pool closes this connection and opens a new one (fresh credentials)
            # before handing it out: retired at checkout, never mid-invocation.
            raise DisconnectionError(
                "the credentials this connection was opened with have expired; reconnecting"
            )


# --------------------------------------------------------------------------- TLS for IAM


def _requires_tls(provider: object) -> bool:
    """Whether ``provider`` hands out credentials that may only travel over TLS (RDS IAM)."""
    iam = sys.modules.get("lambda_pool.auth.iam")
    # Not imported means no IAMCredentials exists: nothing to check, nothing to import.
    return iam is not None and isinstance(provider, iam.IAMCredentials)


def _check_tls(dialect: SyncDialect | AsyncDialect, cparams: Mapping[str, Any]) -> None:
    """Refuse connect arguments that let an IAM token go out without TLS.

    The provider raises a missing or weaker-but-TLS ``sslmode`` to ``require``; a mode
    that allows plain text (``disable``, ``allow``, ``prefer``) is the user's explicit
    choice and contradicts IAM, so it is an error rather than silently overridden.
    """
    from lambda_pool.auth.iam import check_tls_sslmode

    if "sslmode" in cparams:
        check_tls_sslmode(str(cparams["sslmode"]))
    ssl = cparams.get("ssl")  # asyncpg's spelling: a mode, a bool or an SSLContext
    if ssl is False:
        check_tls_sslmode("disable")
    elif isinstance(ssl, str):
        check_tls_sslmode(ssl)


# --------------------------------------------------------------------------- transaction pooling


def _flag(text: object) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ArgumentError(
        f"Invalid value for the URL query parameter {TRANSACTION_POOLING_QUERY_KEY}: "
        f"{text!r}; accepted: true or false"
    )


def transaction_pooling_from_url(url: URL) -> bool | None:
    """The URL's ``?transaction_pooling=`` as a bool, ``None`` when absent."""
    raw = url.query.get(TRANSACTION_POOLING_QUERY_KEY)
    if raw is None:
        return None
    if isinstance(raw, tuple):
        raise ArgumentError(
            f"URL query parameter {TRANSACTION_POOLING_QUERY_KEY!r} is given more than once"
        )
    return _flag(raw)


def _transaction_pooling_args(
    dialect: SyncDialect | AsyncDialect, connect_args: Mapping[str, Any]
) -> dict[str, Any]:
    """The driver keywords transaction pooling needs; a contradicting one is an error."""
    required = dialect.transaction_pooling_args()
    for key, value in required.items():
        if key in connect_args and connect_args[key] != value:
            raise ArgumentError(
                f"transaction_pooling=True needs {key}={value!r} (no server-side prepared "
                f"statements behind PgBouncer or RDS Proxy) but connect_args has "
                f"{key}={connect_args[key]!r}; drop one of them"
            )
    return required


# --------------------------------------------------------------------------- assembly


def _url_credentials(url: URL, explicit: object) -> tuple[URL, CredentialProvider | None]:
    """A provider named by the URL query (``auth=iam``, ``secret=...``), and the URL without it."""
    if not url.query:  # the common static URL: no credentials module is loaded at all
        return url, None
    from lambda_pool.auth.from_url import AUTH_QUERY_KEYS

    if not AUTH_QUERY_KEYS.intersection(url.query):
        return url, None
    if explicit is not None:
        raise ArgumentError(
            "the URL names credentials (auth=/secret=) and credentials= was passed: choose one"
        )
    from lambda_pool.auth.from_url import provider_from_url

    provider = provider_from_url(url.query, url.username, url.host, url.port)
    return url.difference_update_query(AUTH_QUERY_KEYS), provider


def build_engine_parts(url: str | URL, kw: Mapping[str, Any], *, is_async: bool) -> EngineParts:
    """Validate ``create_engine``/``create_async_engine`` arguments and build the pool.

    Nothing is connected here: a bad argument raises before any socket is opened.
    """
    factory = "create_async_engine" if is_async else "create_engine"
    unknown = sorted(set(kw) - ACCEPTED_KEYWORDS)
    if unknown:
        raise ArgumentError(
            f"{factory}() got unknown keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"accepted: {', '.join(sorted(ACCEPTED_KEYWORDS))}"
        )
    parsed = make_url(url)
    dialect = load_dialect(parsed.drivername, is_async=is_async)
    _check_values(kw)

    explicit_provider = kw.get("credentials")
    if explicit_provider is not None:
        _check_provider(explicit_provider)
    driver_url, url_provider = _url_credentials(parsed, explicit_provider)
    provider: CredentialProvider | None = explicit_provider or url_provider

    url_pooling = transaction_pooling_from_url(driver_url)
    if url_pooling is not None:
        if "transaction_pooling" in kw and kw["transaction_pooling"] != url_pooling:
            raise ArgumentError(
                "the URL says transaction_pooling="
                f"{str(url_pooling).lower()} and transaction_pooling={kw['transaction_pooling']!r}"
                " was passed: choose one"
            )
        driver_url = driver_url.difference_update_query([TRANSACTION_POOLING_QUERY_KEY])
    transaction_pooling = bool(kw.get("transaction_pooling", url_pooling or False))
    # No retry keyword: the default policy (it retries), built at the first connect.
    connect_retry: ConnectRetry | None = None
    if not _RETRY_KEYWORDS.isdisjoint(kw):
        from lambda_pool.connect_retry import connect_retry_from_kwargs

        connect_retry = connect_retry_from_kwargs(kw, is_async=is_async)

    ready_pool = kw.get("pool")
    if ready_pool is not None:
        from lambda_pool.pool import Pool

        if not isinstance(ready_pool, Pool):
            raise _fail("pool", ready_pool, "a lambda_pool.pool.Pool instance")
        conflicting = sorted(
            name
            for name in kw
            if name in _POOL_KEYWORDS
            or name in _RETRY_KEYWORDS
            or name in ("poolclass", "creator", "connect_args", "transaction_pooling")
        )
        if url_pooling is not None and "transaction_pooling" not in conflicting:
            conflicting.append("transaction_pooling")
        if conflicting or provider is not None:
            names = conflicting + (["credentials"] if provider is not None else [])
            raise ArgumentError(
                f"pool= is a ready pool; {', '.join(map(repr, names))} cannot be applied to it"
            )
        if ready_pool.is_async != is_async:
            raise ArgumentError(
                f"pool= is {'an async' if ready_pool.is_async else 'a sync'} pool; "
                f"{factory}() needs {'an async' if is_async else 'a sync'} one"
            )
        events = getattr(ready_pool, "_engine_events", None)
        if not isinstance(events, EventRegistry):
            # Engine-level listeners must reach this pool and every recreate() of it.
            events = EventRegistry()
            ready_pool._engine_events = events
        return EngineParts(
            parsed,
            dialect,
            ready_pool,
            None,
            events,
            None,
            kw.get("echo") or False,
            kw.get("logging_name"),
        )

    creator = kw.get("creator")
    if creator is not None and provider is not None:
        raise ArgumentError("creator= and credentials cannot be combined: the creator connects")
    if creator is not None and transaction_pooling:
        raise ArgumentError(
            "creator= and transaction_pooling cannot be combined: the creator connects; "
            "open its connections with prepare_threshold=None (psycopg) or "
            "statement_cache_size=0 (asyncpg) instead"
        )
    if creator is None:
        # Fail at create_engine(), not at the first request, when the driver is missing.
        dialect.load_driver()

    # The pool class and its arguments are checked now; a default pool with no pool
    # keywords has nothing to check and is built at the engine's first use.
    default_pool = _default_pool_name(kw, parsed, dialect_name=dialect.name)
    if default_pool is None:
        poolclass = _choose_poolclass(kw, parsed, is_async=is_async, dialect_name=dialect.name)
        configuration = f"{type(dialect).__name__}/{poolclass.__name__}/Engine"
        pool_arguments = _pool_arguments(poolclass, kw, configuration)

    connect_args: dict[str, Any] = dict(kw.get("connect_args") or {})
    if dialect.name == "postgresql":
        # A value the driver would refuse at the first connect fails here, at Init.
        from lambda_pool.conninfo import check_params

        check_params(
            {
                key: str(value)
                for key, value in connect_args.items()
                if isinstance(value, (str, int, float)) and not isinstance(value, bool)
            },
            dialect.driver,
            source="connect_args",
        )
    if transaction_pooling:
        connect_args.update(_transaction_pooling_args(dialect, connect_args))
    cparams = dialect.merge_connect_args(dialect.create_connect_args(driver_url), connect_args)
    # Connect and socket timeouts where neither the URL nor connect_args set one: outside
    # an invocation's deadline a silent network must not hold a connect for minutes.
    for key, value in dialect.timeout_defaults().items():
        cparams.setdefault(key, value)
    if provider is not None and _requires_tls(provider):
        _check_tls(dialect, cparams)
    events = EventRegistry()
    driver = _DriverConnect(dialect, events)
    pool_creator: Callable[[], Any] | Callable[[], Awaitable[Any]]
    if creator is not None:
        pool_creator = _wrap_creator(creator, is_async)
    elif provider is not None:
        binding = _CredentialsBinding(provider, driver, cparams)
        pool_creator = binding.connect_async if is_async else binding.connect_sync
        events.add("connect", binding.on_connect, insert=True)
        if kw.get("recycle_on_credentials_expiry", True):
            events.add("checkout", binding.on_checkout, insert=True)
    elif is_async:

        async def pool_creator_async() -> Any:
            return await driver.connect_async(cparams)

        pool_creator = pool_creator_async
    else:

        def pool_creator_sync() -> Any:
            return driver.connect_sync(cparams)

        pool_creator = pool_creator_sync
    if connect_retry is None or connect_retry.policy.retries > 0:
        pool_creator = _with_capacity_retry(pool_creator, dialect, connect_retry, is_async)
    connect_wrappers: list[ConnectWrapper] = []
    pool_creator = _with_connect_wrappers(pool_creator, connect_wrappers, is_async)

    pool: Pool | None = None
    pool_factory: Callable[[], Pool] | None = None
    if default_pool is None:
        pool = poolclass(pool_creator, dialect=dialect, events=events, **pool_arguments)
    else:
        pool_factory = _default_pool_factory(default_pool, pool_creator, dialect, events)
    return EngineParts(
        parsed,
        dialect,
        pool,
        pool_factory,
        events,
        provider,
        kw.get("echo") or False,
        kw.get("logging_name"),
        transaction_pooling,
        connect_retry,
        connect_wrappers,
    )


def _with_connect_wrappers(
    creator: Callable[..., Any], wrappers: list[ConnectWrapper], is_async: bool
) -> Callable[..., Any]:
    """``creator`` inside the contexts of ``wrappers`` (read at each connect: the list is
    ``engine.connect_wrappers``, which may change after the engine is made)."""

    def enter(stack: contextlib.ExitStack) -> ConnectAttempt:
        attempt = ConnectAttempt(is_async=is_async)
        for wrapper in list(wrappers):
            stack.enter_context(wrapper(attempt))
        return attempt

    if is_async:

        async def connect_wrapped_async() -> Any:
            if not wrappers:
                return await creator()
            with contextlib.ExitStack() as stack:
                attempt = enter(stack)
                attempt.connection = await creator()
                return attempt.connection

        return connect_wrapped_async

    def connect_wrapped() -> Any:
        if not wrappers:
            return creator()
        with contextlib.ExitStack() as stack:
            attempt = enter(stack)
            attempt.connection = creator()
            return attempt.connection

    return connect_wrapped


def _with_capacity_retry(
    creator: Callable[..., Any],
    dialect: SyncDialect | AsyncDialect,
    retry: ConnectRetry | None,
    is_async: bool,
) -> Callable[..., Any]:
    """``creator`` retried on capacity errors (outermost: an authentication retry inside
    it runs again on each attempt, with the provider's cached credentials).

    ``retry`` ``None`` is the default policy, built (and :mod:`lambda_pool.connect_retry`
    imported) at the first connect: once per new connection, never per checkout.
    """

    def policy() -> ConnectRetry:
        nonlocal retry
        if retry is None:
            from lambda_pool.connect_retry import connect_retry_from_kwargs

            retry = connect_retry_from_kwargs({}, is_async=is_async)
        return retry

    if is_async:

        async def connect_with_retry_async() -> Any:
            from lambda_pool.connect_retry import retry_connect_async

            return await retry_connect_async(creator, dialect.is_capacity_error, policy())

        return connect_with_retry_async

    def connect_with_retry() -> Any:
        from lambda_pool.connect_retry import retry_connect_sync

        return retry_connect_sync(creator, dialect.is_capacity_error, policy())

    return connect_with_retry


def _wrap_creator(creator: Callable[..., Any], is_async: bool) -> Callable[..., Any]:
    """A user's ``creator`` as the pool wants it (a coroutine function for async engines)."""
    if not is_async or inspect.iscoroutinefunction(creator):
        return creator

    async def call_creator() -> Any:
        connection = creator()
        if inspect.isawaitable(connection):
            connection = await connection
        return connection

    return call_creator
