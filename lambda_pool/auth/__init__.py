"""Credential providers: static passwords, Secrets Manager secrets, RDS IAM tokens.

A provider is what ``create_engine(url, credentials=provider)`` asks for credentials on
every new connection (see ``docs/ARCHITECTURE.md``, "Credentials ↔ engine").  boto3 and
Powertools are imported only when a provider first needs them, and each provider's
module only when its name is first looked up here: a static-password engine never loads
the IAM signer or the Secrets Manager reader.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lambda_pool.auth.base import CredentialProvider, Credentials
    from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url, strip_auth_query
    from lambda_pool.auth.iam import IAMCredentials, check_tls_sslmode
    from lambda_pool.auth.registry import forget_all_cached_credentials
    from lambda_pool.auth.secrets import SecretLocation, SecretsManagerCredentials
    from lambda_pool.auth.static import StaticCredentials

# Public name -> the module that defines it (loaded on first access, PEP 562).
_LAZY = {
    "AUTH_QUERY_KEYS": "lambda_pool.auth.from_url",
    "CredentialProvider": "lambda_pool.auth.base",
    "Credentials": "lambda_pool.auth.base",
    "IAMCredentials": "lambda_pool.auth.iam",
    "SecretLocation": "lambda_pool.auth.secrets",
    "SecretsManagerCredentials": "lambda_pool.auth.secrets",
    "StaticCredentials": "lambda_pool.auth.static",
    "check_tls_sslmode": "lambda_pool.auth.iam",
    "forget_all_cached_credentials": "lambda_pool.auth.registry",
    "provider_from_url": "lambda_pool.auth.from_url",
    "strip_auth_query": "lambda_pool.auth.from_url",
}

__all__ = [
    "AUTH_QUERY_KEYS",
    "CredentialProvider",
    "Credentials",
    "IAMCredentials",
    "SecretLocation",
    "SecretsManagerCredentials",
    "StaticCredentials",
    "check_tls_sslmode",
    "forget_all_cached_credentials",
    "provider_from_url",
    "strip_auth_query",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lambda_pool.auth' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
