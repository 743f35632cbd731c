"""Credential providers: static passwords, Secrets Manager secrets, RDS IAM tokens.

A provider is what ``create_engine(url, credentials=provider)`` asks for credentials on
every new connection (see ``docs/ARCHITECTURE.md``, "Credentials ↔ engine").  boto3 and
Powertools are imported only when a provider first needs them.
"""

from __future__ import annotations

from lambda_pool.auth.base import CredentialProvider, Credentials
from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url, strip_auth_query
from lambda_pool.auth.iam import IAMCredentials, check_tls_sslmode
from lambda_pool.auth.registry import forget_all_cached_credentials
from lambda_pool.auth.secrets import SecretLocation, SecretsManagerCredentials
from lambda_pool.auth.static import StaticCredentials

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
