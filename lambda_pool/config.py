"""Settings from the environment: the one place lambda-pool reads ``LAMBDA_POOL_*`` variables.

A Lambda function is configured through its environment (the SAM template sets these),
so ``@with_connection()`` without arguments builds its engine from them.  Every
variable is validated when the handler module is imported (Init phase), and a bad value
raises :class:`lambda_pool.exc.ArgumentError` naming the variable, the value's problem
and what to set instead — a typo must fail the deployment, not silently change
behaviour.  That includes the URL's parameter values (``sslmode``, ``connect_timeout``,
``options``, ``auth=``…, see :mod:`lambda_pool.conninfo`) and a misspelt variable name
close to one of these (``LAMBDA_POOL_DATABSE_URL``).  A blank variable counts as unset.

=========================================  ==========================================
``LAMBDA_POOL_DATABASE_URL``               database URL, e.g.
                                           ``postgresql://app@db.example.com:5432/app``,
                                           or a libpq key=value string.
                                           Required unless ``url=``/``engine=`` is given
                                           or ``LAMBDA_POOL_AUTH=secret`` (then host,
                                           port and database may come from the secret).
``LAMBDA_POOL_AUTH``                       ``static`` (default: the URL's own user and
                                           password), ``iam`` (RDS IAM token for the
                                           URL's user and host; TLS), or ``secret``
                                           (user and password from Secrets Manager).
``LAMBDA_POOL_SECRET_ARN``                 the secret for ``LAMBDA_POOL_AUTH=secret``
                                           (ARN or name). Required for ``secret``.
``LAMBDA_POOL_IAM_REGION``                 region for ``iam`` tokens, e.g. ``eu-west-1``
                                           (default: ``AWS_REGION``).
``LAMBDA_POOL_PRE_PING_IDLE_SECONDS``      ping the warm connection before reuse when it
                                           sat idle longer than this (default 60; 0 =
                                           at every invocation).
``LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS`` milliseconds kept free before the invocation
                                           deadline (default 500; below 900000, Lambda's
                                           longest timeout).
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
import difflib
import math
import os
import re
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
_FALSE = frozenset({"0", "false", "no", "off"})

_VARIABLES = (
    DATABASE_URL_ENV,
    AUTH_ENV,
    SECRET_ARN_ENV,
    IAM_REGION_ENV,
    PRE_PING_IDLE_SECONDS_ENV,
    STATEMENT_TIMEOUT_MARGIN_MS_ENV,
    TRANSACTION_POOLING_ENV,
    REGISTER_EXTENSION_ENV,
    WARM_ENV,
)
_PREFIX = "LAMBDA_POOL_"
# Lambda's longest timeout is 900 s: a margin that large leaves no time to run.
_MAX_MARGIN_MS = 900_000
# AWS region names (us-east-1, eu-central-2, us-gov-west-1, cn-north-1, ap-southeast-4).
_REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]{1,2}")
# Secrets Manager secret names and ARNs: letters, digits and /_+=.@- (plus ':' in ARNs).
_SECRET_ID_RE = re.compile(r"[A-Za-z0-9/_+=.@:-]{1,2048}")


def _show(raw: str) -> str:
    """A variable's value as a message shows it: quoted, and cut when long."""
    return repr(raw if len(raw) <= 60 else raw[:57] + "...")


def _check_names(environ: Mapping[str, str]) -> None:
    """Refuse a variable whose name is a near miss of one of ours (a typo)."""
    suffixes = [name[len(_PREFIX) :] for name in _VARIABLES]
    for name in environ:
        if not name.startswith(_PREFIX) or name in _VARIABLES:
            continue
        close = difflib.get_close_matches(name[len(_PREFIX) :], suffixes, n=1, cutoff=0.75)
        if close:
            raise ArgumentError(
                f"{name} is not a lambda-pool variable; did you mean {_PREFIX}{close[0]}?"
            )


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    raw = environ.get(name)
    if raw is None or not raw.strip():
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ArgumentError(f"{name}={_show(raw)} is not a boolean; set it to 1 (on) or 0 (off)")


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
        raise ArgumentError(f"{name}={_show(raw)} is not a number >= 0; set it to e.g. {example}")
    return value


def _bounded_int(environ: Mapping[str, str], name: str, example: str, below: int) -> int | None:
    raw = _optional(environ, name)
    if raw is None:
        return None
    # ASCII digits only, and few of them: int() would take Arabic-Indic digits or "1_000"; a
    # 5000-digit string raises its own ValueError.
    value = int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 12 else -1
    if not 0 <= value < below:
        raise ArgumentError(
            f"{name}={_show(raw)} is not a whole number from 0 to {below - 1}; "
            f"set it to e.g. {example}"
        )
    return value


def _region(environ: Mapping[str, str], name: str) -> str | None:
    raw = _optional(environ, name)
    if raw is not None and not _REGION_RE.fullmatch(raw):
        raise ArgumentError(f"{name}={_show(raw)} is not an AWS region; set it to e.g. eu-west-1")
    return raw


def _secret_id(environ: Mapping[str, str], name: str) -> str | None:
    raw = _optional(environ, name)
    if raw is None:
        return None
    if not _SECRET_ID_RE.fullmatch(raw) or (
        raw.startswith("arn:") and ":secretsmanager:" not in raw
    ):
        raise ArgumentError(
            f"{name}={_show(raw)} is not a Secrets Manager secret name or ARN "
            "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME, or NAME: letters, digits "
            "and /_+=.@-)"
        )
    return raw


def _database_url(environ: Mapping[str, str]) -> str | None:
    raw = _optional(environ, DATABASE_URL_ENV)
    if raw is not None:
        _parse_database_url(raw)  # at Init: the error names the variable
    return raw


def _parse_database_url(raw: str) -> URL:
    from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url
    from lambda_pool.exc import CredentialsError
    from lambda_pool.url import make_url

    try:
        url = make_url(raw)
        if AUTH_QUERY_KEYS.intersection(url.query):
            # The query's credential keys are read when the engine is built; check them
            # now so their errors name the variable too.
            provider_from_url(url.query, url.username, url.host, url.port)
    except (ArgumentError, CredentialsError) as exc:
        # Neither make_url's nor the provider's messages include the password.
        raise type(exc)(f"{DATABASE_URL_ENV} is not a valid database URL: {exc}") from None
    return url


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
        _check_names(env)
        auth_raw = (_optional(env, AUTH_ENV) or "static").lower()
        if auth_raw not in _AUTH_MODES:
            raise ArgumentError(
                f"{AUTH_ENV}={_show(env.get(AUTH_ENV, ''))} is not a known mode; "
                "use static (the URL's password), iam (RDS IAM tokens) or secret "
                f"(Secrets Manager, with {SECRET_ARN_ENV})"
            )
        auth: AuthMode = auth_raw  # type: ignore[assignment]  # checked just above
        secret_arn = _secret_id(env, SECRET_ARN_ENV)
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
            database_url=_database_url(env),
            auth=auth,
            secret_arn=secret_arn,
            iam_region=_region(env, IAM_REGION_ENV),
            pre_ping_idle_seconds=_non_negative_float(
                env, PRE_PING_IDLE_SECONDS_ENV, "60, or 0 to ping at every invocation"
            ),
            statement_timeout_margin_ms=_bounded_int(
                env, STATEMENT_TIMEOUT_MARGIN_MS_ENV, "500", _MAX_MARGIN_MS
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
        if self.database_url is None:
            if self.auth == "secret":
                from lambda_pool.url import make_url

                return make_url(SECRET_ONLY_URL)
            raise ArgumentError(
                f"no database URL: set {DATABASE_URL_ENV} (e.g. "
                "postgresql://USER@HOST:5432/DBNAME), or pass with_connection(url=...) "
                "or with_connection(engine=...)"
            )
        return _parse_database_url(self.database_url)

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
    from lambda_pool.exc import CredentialsError

    try:
        return provider_from_url(query, url.username, url.host, url.port)
    except (ArgumentError, CredentialsError) as exc:
        # Name the variable that asked for these credentials (messages hold no secret).
        raise type(exc)(f"{AUTH_ENV}={settings.auth}: {exc}") from None
