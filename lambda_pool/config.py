"""Settings from the environment: the one place lambda-pool reads ``LAMBDA_POOL_*`` variables.

A Lambda function is configured through its environment (the SAM template sets these),
so ``@with_connection()`` without arguments builds its engine from them.  Every
variable is validated when the handler module is imported (Init phase), and a bad value
raises :class:`lambda_pool.exc.ArgumentError` naming the variable, the value's problem
and what to set instead — a typo must fail the deployment, not silently change
behaviour.

=========================================  ==========================================
``LAMBDA_POOL_DATABASE_URL``               database URL, e.g.
                                           ``postgresql://app@db.example.com:5432/app``.
                                           Required unless ``url=``/``engine=`` is given
                                           or ``LAMBDA_POOL_AUTH=secret`` (then host,
                                           port and database may come from the secret).
``LAMBDA_POOL_AUTH``                       ``static`` (default: the URL's own user and
                                           password), ``iam`` (RDS IAM token for the
                                           URL's user and host; TLS), or ``secret``
                                           (user and password from Secrets Manager).
``LAMBDA_POOL_SECRET_ARN``                 the secret for ``LAMBDA_POOL_AUTH=secret``
                                           (ARN or name). Required for ``secret``.
``LAMBDA_POOL_IAM_REGION``                 region for ``iam`` tokens (default:
                                           ``AWS_REGION``).
``LAMBDA_POOL_PRE_PING_IDLE_SECONDS``      ping the warm connection before reuse when it
                                           sat idle longer than this (default 60; 0 =
                                           at every invocation).
``LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS`` milliseconds kept free before the invocation
                                           deadline (default 500).
``LAMBDA_POOL_TRANSACTION_POOLING``        ``1``/``true`` behind PgBouncer or RDS Proxy in
                                           transaction mode: no ``DISCARD ALL``, no
                                           server-side prepared statements.
``LAMBDA_POOL_REGISTER_EXTENSION``         ``1``/``true``: register an internal Lambda
                                           extension at Init so the runtime receives
                                           SIGTERM and can close connections cleanly.
``LAMBDA_POOL_WARM``                       ``1`` (default): ``@with_connection()`` uses the
                                           warm-container cache; ``0``: a ``NullPool``
                                           engine, a connection per invocation.
=========================================  ==========================================

Credentials are built with :mod:`lambda_pool.auth` (``provider_from_url``), the same code
that handles the URL query convention (``?auth=iam``, ``?secret=...``), so the two ways
of asking for IAM or Secrets Manager behave identically.  This module imports neither
boto3 nor a driver: providers load them on first use.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Literal

from lambda_pool.exc import ArgumentError

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.auth.base import CredentialProvider
    from lambda_pool.url import URL

__all__ = [
    "AUTH_ENV",
    "DATABASE_URL_ENV",
    "DEFAULT_PRE_PING_IDLE_SECONDS",
    "DEFAULT_STATEMENT_TIMEOUT_MARGIN_MS",
    "IAM_REGION_ENV",
    "PRE_PING_IDLE_SECONDS_ENV",
    "REGISTER_EXTENSION_ENV",
    "SECRET_ARN_ENV",
    "STATEMENT_TIMEOUT_MARGIN_MS_ENV",
    "TRANSACTION_POOLING_ENV",
    "WARM_ENV",
    "AuthMode",
    "Settings",
    "credentials_for",
]

DATABASE_URL_ENV = "LAMBDA_POOL_DATABASE_URL"
AUTH_ENV = "LAMBDA_POOL_AUTH"
SECRET_ARN_ENV = "LAMBDA_POOL_SECRET_ARN"
IAM_REGION_ENV = "LAMBDA_POOL_IAM_REGION"
PRE_PING_IDLE_SECONDS_ENV = "LAMBDA_POOL_PRE_PING_IDLE_SECONDS"
STATEMENT_TIMEOUT_MARGIN_MS_ENV = "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS"
TRANSACTION_POOLING_ENV = "LAMBDA_POOL_TRANSACTION_POOLING"
REGISTER_EXTENSION_ENV = "LAMBDA_POOL_REGISTER_EXTENSION"
WARM_ENV = "LAMBDA_POOL_WARM"

DEFAULT_PRE_PING_IDLE_SECONDS = 60.0
DEFAULT_STATEMENT_TIMEOUT_MARGIN_MS = 500

#: With ``LAMBDA_POOL_AUTH=secret`` and no URL, everything but the driver comes from the
#: secret (RDS-managed secrets hold ``host``, ``port`` and ``dbname``).
SECRET_ONLY_URL = "postgresql+psycopg://"

AuthMode = Literal["static", "iam", "secret"]
_AUTH_MODES: tuple[AuthMode, ...] = ("static", "iam", "secret")

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ArgumentError(f"{name}={raw!r} is not a boolean; set it to 1 (on) or 0 (off)")


def _optional(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return None
    return raw.strip()


def _non_negative_float(environ: Mapping[str, str], name: str, example: str) -> float | None:
    raw = _optional(environ, name)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ArgumentError(f"{name}={raw!r} is not a number >= 0; set it to e.g. {example}")
    return value


def _non_negative_int(environ: Mapping[str, str], name: str, example: str) -> int | None:
    raw = _optional(environ, name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ArgumentError(f"{name}={raw!r} is not a whole number >= 0; set it to e.g. {example}")
    return value


@dataclasses.dataclass(frozen=True)
class Settings:
    """lambda-pool's environment settings, validated (see the module docstring).

    ``None`` in an optional field means "not set": the caller's argument or the
    library default applies.  ``repr()`` masks the URL's password.
    """

    database_url: str | None = None
    auth: AuthMode = "static"
    secret_arn: str | None = None
    iam_region: str | None = None
    pre_ping_idle_seconds: float | None = None
    statement_timeout_margin_ms: int | None = None
    transaction_pooling: bool = False
    register_extension: bool = False
    warm: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every ``LAMBDA_POOL_*`` variable (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        auth_raw = (_optional(env, AUTH_ENV) or "static").lower()
        if auth_raw not in _AUTH_MODES:
            raise ArgumentError(
                f"{AUTH_ENV}={env.get(AUTH_ENV)!r} is not a known mode; "
                "use static (the URL's password), iam (RDS IAM tokens) or secret "
                f"(Secrets Manager, with {SECRET_ARN_ENV})"
            )
        auth: AuthMode = auth_raw  # type: ignore[assignment]  # checked just above
        secret_arn = _optional(env, SECRET_ARN_ENV)
        if auth == "secret" and secret_arn is None:
            raise ArgumentError(
                f"{AUTH_ENV}=secret needs {SECRET_ARN_ENV} (the ARN or name of the secret "
                "holding username and password)"
            )
        if auth != "secret" and secret_arn is not None:
            raise ArgumentError(
                f"{SECRET_ARN_ENV} is set but {AUTH_ENV} is {auth!r}; set {AUTH_ENV}=secret "
                f"to use the secret, or remove {SECRET_ARN_ENV}"
            )
        return cls(
            database_url=_optional(env, DATABASE_URL_ENV),
            auth=auth,
            secret_arn=secret_arn,
            iam_region=_optional(env, IAM_REGION_ENV),
            pre_ping_idle_seconds=_non_negative_float(
                env, PRE_PING_IDLE_SECONDS_ENV, "60, or 0 to ping at every invocation"
            ),
            statement_timeout_margin_ms=_non_negative_int(
                env, STATEMENT_TIMEOUT_MARGIN_MS_ENV, "500"
            ),
            transaction_pooling=_flag(env, TRANSACTION_POOLING_ENV),
            register_extension=_flag(env, REGISTER_EXTENSION_ENV),
            warm=_flag(env, WARM_ENV, default=True),
        )

    @property
    def margin_ms(self) -> int:
        """The statement-timeout margin to use (the variable, else 500)."""
        if self.statement_timeout_margin_ms is None:
            return DEFAULT_STATEMENT_TIMEOUT_MARGIN_MS
        return self.statement_timeout_margin_ms

    def url(self) -> URL:
        """The database URL from ``LAMBDA_POOL_DATABASE_URL`` (parsed, validated).

        Raises :class:`ArgumentError` when it is missing — except with
        ``LAMBDA_POOL_AUTH=secret``, where the secret can name the server.
        """
        from lambda_pool.url import make_url

        if self.database_url is None:
            if self.auth == "secret":
                return make_url(SECRET_ONLY_URL)
            raise ArgumentError(
                f"no database URL: set {DATABASE_URL_ENV} (e.g. "
                "postgresql://USER@HOST:5432/DBNAME), or pass with_connection(url=...) "
                "or with_connection(engine=...)"
            )
        try:
            return make_url(self.database_url)
        except ArgumentError as exc:
            # make_url's message never includes the password; name the variable too.
            raise ArgumentError(f"{DATABASE_URL_ENV} is not a valid database URL: {exc}") from None

    def __repr__(self) -> str:
        url = self.database_url
        if url is not None:
            try:
                from lambda_pool.url import make_url

                url = repr(make_url(url))
            except ArgumentError:
                url = "<invalid URL>"
        fields = ", ".join(
            f"{field.name}={getattr(self, field.name)!r}"
            for field in dataclasses.fields(self)
            if field.name != "database_url"
        )
        return f"Settings(database_url={url}, {fields})"


def credentials_for(settings: Settings, url: URL) -> CredentialProvider | None:
    """The credential provider ``settings.auth`` asks for on ``url``, or ``None`` (static).

    Built with :func:`lambda_pool.auth.provider_from_url`, as if the URL carried
    ``?auth=iam&region=...`` or ``?secret=...``.  A URL that already names credentials in
    its query while ``LAMBDA_POOL_AUTH`` asks for iam/secret is refused: two sources
    for one decision would make the outcome depend on precedence rules nobody reads.
    """
    if settings.auth == "static":
        return None
    from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url

    named = sorted(AUTH_QUERY_KEYS.intersection(url.query))
    if named:
        raise ArgumentError(
            f"{AUTH_ENV}={settings.auth} and the database URL's query ({', '.join(named)}=) "
            "both choose credentials; keep one of them"
        )
    query: dict[str, str]
    if settings.auth == "iam":
        query = {"auth": "iam"}
        if settings.iam_region is not None:
            query["region"] = settings.iam_region
        sslmode = url.query.get("sslmode")
        if isinstance(sslmode, str):
            query["sslmode"] = sslmode
    else:
        assert settings.secret_arn is not None  # from_env guarantees it
        query = {"secret": settings.secret_arn}
    return provider_from_url(query, url.username, url.host, url.port)
