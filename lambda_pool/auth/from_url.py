"""Build a credential provider from a database URL's query string.

The convention (lambda-pool's own query keys; ``strip_auth_query`` removes them before
the rest of the query goes to the driver)::

    postgresql+psycopg://app_user@db.example.com:5432/app?auth=iam&region=eu-west-1
        RDS IAM token for app_user at db.example.com:5432 (sslmode defaults to require;
        sslmode=disable/allow/prefer is refused). Optional: token_margin=<seconds>.
    postgresql+psycopg://db.example.com/app?secret=arn:aws:secretsmanager:...:secret:db
        user and password from the Secrets Manager secret (region from the ARN, else
        region=..., else AWS_REGION). Optional: secret_max_age=<seconds> (default: Powertools'
        POWERTOOLS_PARAMETERS_MAX_AGE, else 300).
    postgresql+psycopg:///?secret=prod/db
        no host in the URL: host, port and dbname are taken from the secret as well.
    auth=password, or auth=static (LAMBDA_POOL_AUTH's spelling), or no auth/secret key
        no provider: the URL's own user and password are used.

``auth=secret&secret=...`` is accepted as a longer spelling of ``secret=...``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from lambda_pool.exc import ArgumentError

if TYPE_CHECKING:
    from lambda_pool.auth.base import CredentialProvider

__all__ = ["AUTH_QUERY_KEYS", "provider_from_url", "strip_auth_query"]

# Query keys that configure credentials; they are not libpq parameters.
AUTH_QUERY_KEYS = frozenset({"auth", "secret", "region", "token_margin", "secret_max_age"})

QueryLike = Mapping[str, "str | Sequence[str]"] | str


def _single_values(query: QueryLike) -> dict[str, str]:
    """A query as ``{key: value}``; a repeated key is an error (which one would win?)."""
    items: Mapping[str, str | Sequence[str]]
    items = parse_qs(query.lstrip("?"), keep_blank_values=True) if isinstance(query, str) else query
    result: dict[str, str] = {}
    for key, value in items.items():
        if isinstance(value, str):
            result[key] = value
            continue
        values = list(value)
        if len(values) != 1:
            raise ArgumentError(f"URL query key {key!r} must be given exactly once")
        result[key] = values[0]
    return result


def strip_auth_query(query: QueryLike) -> dict[str, str]:
    """The query without lambda-pool's credential keys: what the driver should see."""
    return {k: v for k, v in _single_values(query).items() if k not in AUTH_QUERY_KEYS}


def _seconds(query: Mapping[str, str], key: str) -> int | None:
    raw = query.get(key)
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ArgumentError(f"URL query {key}= must be a whole number of seconds") from None


def provider_from_url(
    url_query: QueryLike,
    user: str | None,
    host: str | None,
    port: int | None,
    *,
    clock: Callable[[], float] = time.time,
) -> CredentialProvider | None:
    """The provider a URL's query asks for, or ``None`` when it asks for none.

    ``user``, ``host`` and ``port`` are the URL's own (``port`` ``None`` means 5432).
    Raises ``ArgumentError`` for an unknown ``auth=`` value, a conflicting combination,
    or an IAM URL that lacks a user or host or asks for a non-TLS ``sslmode``.
    """
    query = _single_values(url_query)
    auth = query.get("auth", "").lower()
    secret_id = query.get("secret")
    region = query.get("region") or None

    if auth == "static":
        auth = "password"  # LAMBDA_POOL_AUTH's name for the same choice
    if auth not in ("", "password", "iam", "secret"):
        raise ArgumentError(
            f"unknown auth={auth!r} in the URL: use auth=iam, auth=password (or static), "
            "or secret=<secret name or ARN>"
        )
    # Each provider's module is imported only for a URL that asks for it: a static-password
    # URL must not pay for the IAM signer's hashlib/OpenSSL or the secrets reader.
    if auth == "iam":
        from lambda_pool.auth.iam import IAMCredentials, check_tls_sslmode

        if secret_id is not None:
            raise ArgumentError(
                "the URL asks for both auth=iam and secret=...: choose one way to authenticate"
            )
        if not user or not host:
            raise ArgumentError(
                "auth=iam needs the database user and host in the URL "
                "(postgresql+psycopg://USER@HOST:PORT/DB?auth=iam)"
            )
        margin = _seconds(query, "token_margin")
        return IAMCredentials(
            host,
            port or 5432,
            user,
            region=region,
            margin=60 if margin is None else margin,
            clock=clock,
            sslmode=check_tls_sslmode(query.get("sslmode")),
        )
    if secret_id is not None or auth == "secret":
        if auth == "password":
            raise ArgumentError(
                "the URL asks for both auth=password (static) and secret=...: choose one way "
                "to authenticate"
            )
        if not secret_id:
            raise ArgumentError("auth=secret needs secret=<secret name or ARN> in the URL")
        from lambda_pool.auth.secrets import SecretsManagerCredentials

        return SecretsManagerCredentials(
            secret_id,
            max_age=_seconds(query, "secret_max_age"),
            region=region,
            clock=clock,
            include_location=not host,
        )
    return None
