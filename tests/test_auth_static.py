"""Static credentials, the ``Credentials`` value, and the URL query convention's plain cases."""

from __future__ import annotations

import dataclasses
import secrets
import subprocess
import sys
import uuid
from typing import Any

import pytest

import lambda_pool
from lambda_pool.auth import (
    AUTH_QUERY_KEYS,
    CredentialProvider,
    Credentials,
    IAMCredentials,
    SecretsManagerCredentials,
    StaticCredentials,
    provider_from_url,
    strip_auth_query,
)
from lambda_pool.exc import ArgumentError


def test_package_root_re_exports_the_providers() -> None:
    assert lambda_pool.StaticCredentials is StaticCredentials
    assert lambda_pool.SecretsManagerCredentials is SecretsManagerCredentials
    assert lambda_pool.IAMCredentials is IAMCredentials


def test_importing_auth_loads_no_aws_sdk_or_driver() -> None:
    code = (
        "import sys, lambda_pool.auth, lambda_pool\n"
        "lambda_pool.StaticCredentials\n"
        "heavy = [m for m in ('boto3', 'botocore', 'aws_lambda_powertools', 'psycopg')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == ""


def test_credentials_repr_and_str_hide_the_password() -> None:
    password = secrets.token_urlsafe(12)
    creds = Credentials("app_user", password, 123.0, {"sslmode": "require", "sslpassword": "k"})
    for text in (repr(creds), str(creds), f"{creds}", repr([creds]), repr({"c": creds})):
        assert password not in text
        assert "'***'" in text
        assert "app_user" in text
    assert "'sslmode': 'require'" in repr(creds)
    assert "'sslpassword': '***'" in repr(creds)


def test_credentials_are_immutable_including_connect_args() -> None:
    creds = Credentials("u", "p", None, {"sslmode": "require"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        creds.password = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        creds.connect_args["sslmode"] = "disable"  # type: ignore[index]


def test_expired_compares_against_expires_at() -> None:
    assert not Credentials("u", "p", None).expired(1e12)
    creds = Credentials("u", "p", 100.0)
    assert not creds.expired(99.9)
    assert creds.expired(100.0)


def test_static_provider_returns_the_same_never_expiring_credentials() -> None:
    provider = StaticCredentials("app_user", "pw", connect_args={"sslmode": "prefer"})
    first = provider.get()
    provider.refresh()
    assert provider.get() is first
    assert (first.user, first.password, first.expires_at) == ("app_user", "pw", None)
    assert dict(first.connect_args) == {"sslmode": "prefer"}
    assert isinstance(provider, CredentialProvider)
    assert "pw" not in repr(provider)


def test_every_provider_satisfies_the_protocol(aws: str) -> None:
    for provider in (
        StaticCredentials("u", "p"),
        SecretsManagerCredentials("some/secret"),
        IAMCredentials("db.example.com", 5432, "u"),
    ):
        assert isinstance(provider, CredentialProvider)
        assert isinstance(provider.clock(), float)


def test_static_provider_rejects_a_missing_user() -> None:
    with pytest.raises(ArgumentError, match="user"):
        StaticCredentials("", "pw")


def test_static_credentials_authenticate_a_real_connection(embedded_postgres: Any) -> None:
    import psycopg

    pg = embedded_postgres
    role = f"st_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    pg.create_role(role, password)
    creds = StaticCredentials(role, password).get()
    with psycopg.connect(
        host=pg.host, port=pg.port, dbname=pg.dbname, user=creds.user, password=creds.password
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


@pytest.mark.parametrize("query", ["", "sslmode=require", "auth=password", {"auth": "PASSWORD"}])
def test_url_without_auth_or_secret_asks_for_no_provider(query: Any) -> None:
    assert provider_from_url(query, "u", "h", 5432) is None


def test_unknown_auth_value_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError, match="auth=iam"):
        provider_from_url("auth=kerberos", "u", "h", 5432)


def test_repeated_query_key_is_an_argument_error() -> None:
    with pytest.raises(ArgumentError, match="exactly once"):
        provider_from_url("auth=iam&auth=password", "u", "h", 5432)


def test_strip_auth_query_leaves_only_driver_parameters() -> None:
    query = "auth=iam&region=eu-west-1&token_margin=30&sslmode=require&application_name=x"
    assert strip_auth_query(query) == {"sslmode": "require", "application_name": "x"}
    assert strip_auth_query({"secret": "arn", "secret_max_age": "5", "connect_timeout": "3"}) == {
        "connect_timeout": "3"
    }
    assert {"auth", "secret", "region", "token_margin", "secret_max_age"} == AUTH_QUERY_KEYS
