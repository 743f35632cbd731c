"""``lambda_pool.config``: LAMBDA_POOL_* settings are read, validated and explained."""

from __future__ import annotations

from typing import Any

import pytest

from lambda_pool import exc, with_connection
from lambda_pool.auth import IAMCredentials, SecretsManagerCredentials
from lambda_pool.config import Settings, credentials_for
from lambda_pool.engine import Connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.url import make_url


def test_defaults_when_nothing_is_set() -> None:
    settings = Settings.from_env({})
    assert settings.auth == "static"
    assert settings.margin_ms == 500
    assert settings.pre_ping_idle_seconds is None
    assert settings.transaction_pooling is False
    assert settings.register_extension is False
    assert settings.warm is True


def test_every_variable_is_read() -> None:
    settings = Settings.from_env(
        {
            "LAMBDA_POOL_DATABASE_URL": "postgresql://app@db.example.com/app",
            "LAMBDA_POOL_AUTH": "IAM",
            "LAMBDA_POOL_IAM_REGION": "eu-west-1",
            "LAMBDA_POOL_PRE_PING_IDLE_SECONDS": "30",
            "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "750",
            "LAMBDA_POOL_TRANSACTION_POOLING": "true",
            "LAMBDA_POOL_REGISTER_EXTENSION": "1",
            "LAMBDA_POOL_WARM": "0",
        }
    )
    assert settings.auth == "iam"
    assert settings.iam_region == "eu-west-1"
    assert settings.pre_ping_idle_seconds == 30.0
    assert settings.margin_ms == 750
    assert settings.transaction_pooling is True
    assert settings.register_extension is True
    assert settings.warm is False


def test_missing_url_error_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LAMBDA_POOL_DATABASE_URL", raising=False)
    monkeypatch.delenv("LAMBDA_POOL_AUTH", raising=False)
    with pytest.raises(exc.ArgumentError, match="set LAMBDA_POOL_DATABASE_URL"):
        with_connection()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LAMBDA_POOL_AUTH": "kerberos"}, "LAMBDA_POOL_AUTH='kerberos' is not a known mode"),
        ({"LAMBDA_POOL_AUTH": "secret"}, "needs LAMBDA_POOL_SECRET_ARN"),
        ({"LAMBDA_POOL_SECRET_ARN": "prod/db"}, "set LAMBDA_POOL_AUTH=secret"),
        ({"LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "half"}, "MARGIN_MS='half' is not a whole"),
        ({"LAMBDA_POOL_PRE_PING_IDLE_SECONDS": "-5"}, "IDLE_SECONDS='-5' is not a number >= 0"),
        ({"LAMBDA_POOL_TRANSACTION_POOLING": "maybe"}, "POOLING='maybe' is not a boolean"),
        ({"LAMBDA_POOL_REGISTER_EXTENSION": "yes please"}, "EXTENSION='yes please'"),
    ],
)
def test_bad_values_are_refused_with_what_to_do(environ: dict[str, str], message: str) -> None:
    with pytest.raises(exc.ArgumentError, match=message):
        Settings.from_env(environ)


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("postgresql://u:s3cr3t@h:port/db", "port must be an integer"),
        ("foo://u:s3cr3t@h/db", "unsupported database scheme"),
        ("postgresql://u:s3cr3t@h:\u00b2/db", "port must be an integer"),
        ("postgresql://u:s3cr3t@h:" + "9" * 5000 + "/db", "port must be an integer"),
        ("postgresql://app:s3cr3t/appdb", "the URL has no '@'"),
        ("postgresql://app:s3c@r3t@h/appdb", "percent-encode '@'"),
        ("postgresql://u:s3cr3t@h/db?sslmode=garbage", "sslmode='garbage'"),
        ("postgresql://u:s3cr3t@h/db?connect_timeout=abc", "connect_timeout='abc'"),
        ("postgresql+asyncpg://u:s3cr3t@h/db?connect_timeout=abc", "connect_timeout='abc'"),
        ("postgresql+asyncpg://u:s3cr3t@h/db?options=-c%20a%3D%27b", "unclosed quote"),
        ("postgresql://u:s3cr3t@h/db?auth=kerberos", "auth='kerberos'"),
        ("postgresql://u:s3cr3t@h/db?auth=iam&secret=x", "both auth=iam and secret"),
        ("postgresql://h/db?auth=iam&region=eu-west-1", "auth=iam needs the database user"),
        ("host=h password='s3cr3t", "never closed"),
    ],
)
def test_bad_url_fails_at_init_naming_the_variable_without_the_password(
    url: str, fragment: str
) -> None:
    with pytest.raises(exc.ArgumentError) as info:
        Settings.from_env({"LAMBDA_POOL_DATABASE_URL": url})
    message = str(info.value)
    assert message.startswith("LAMBDA_POOL_DATABASE_URL is not a valid database URL: ")
    assert fragment in message
    for piece in ("s3cr3t", "s3c", "r3t"):
        assert piece not in message


def test_bad_url_through_with_connection_names_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", "postgresql://u:s3cr3t@h/db?sslmode=garbage")
    with pytest.raises(exc.ArgumentError, match="LAMBDA_POOL_DATABASE_URL") as info:
        with_connection()
    assert "s3cr3t" not in str(info.value)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"LAMBDA_POOL_IAM_REGION": "Ireland"}, "IAM_REGION='Ireland' is not an AWS region"),
        ({"LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "9" * 5000}, "from 0 to 899999"),
        ({"LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "900000"}, "from 0 to 899999"),
        ({"LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "\u0665"}, "MARGIN_MS="),
        ({"LAMBDA_POOL_PRE_PING_IDLE_SECONDS": "inf"}, "IDLE_SECONDS='inf'"),
        ({"LAMBDA_POOL_PRE_PING_IDLE_SECONDS": "1e400"}, "IDLE_SECONDS='1e400'"),
        ({"LAMBDA_POOL_WARM": "sometimes"}, "LAMBDA_POOL_WARM='sometimes' is not a boolean"),
        (
            {"LAMBDA_POOL_AUTH": "secret", "LAMBDA_POOL_SECRET_ARN": "arn:aws:s3:::bucket"},
            "is not a Secrets Manager secret name or ARN",
        ),
        (
            {"LAMBDA_POOL_AUTH": "secret", "LAMBDA_POOL_SECRET_ARN": "prod db"},
            "is not a Secrets Manager secret name or ARN",
        ),
        ({"LAMBDA_POOL_DATABSE_URL": "postgresql://h/d"}, "did you mean LAMBDA_POOL_DATABASE_URL"),
        ({"LAMBDA_POOL_WRAM": "1"}, "did you mean LAMBDA_POOL_WARM"),
    ],
)
def test_every_variable_is_checked(environ: dict[str, str], message: str) -> None:
    with pytest.raises(exc.ArgumentError, match=message):
        Settings.from_env(environ)


def test_blank_variables_count_as_unset_and_unrelated_names_are_left_alone() -> None:
    settings = Settings.from_env(
        {
            "LAMBDA_POOL_WARM": " ",
            "LAMBDA_POOL_TRANSACTION_POOLING": "",
            "LAMBDA_POOL_IAM_REGION": "",
            "LAMBDA_POOL_TEST_DSN": "anything",
            "LAMBDA_POOL_PG_BINDIR": "/usr/lib/postgresql/16/bin",
        }
    )
    assert settings.warm is True
    assert settings.transaction_pooling is False
    assert settings.iam_region is None


@pytest.mark.parametrize(
    "region", ["eu-west-1", "us-gov-west-1", "cn-north-1", "ap-southeast-4", "il-central-1"]
)
def test_real_region_names_pass(region: str) -> None:
    assert Settings.from_env({"LAMBDA_POOL_IAM_REGION": region}).iam_region == region


def test_credentials_errors_name_lambda_pool_auth() -> None:
    settings = Settings.from_env(
        {"LAMBDA_POOL_DATABASE_URL": "postgresql://db.example.com/app", "LAMBDA_POOL_AUTH": "iam"}
    )
    with pytest.raises(exc.ArgumentError, match=r"^LAMBDA_POOL_AUTH=iam: auth=iam needs"):
        credentials_for(settings, settings.url())


def test_settings_repr_masks_a_query_password() -> None:
    settings = Settings.from_env(
        {"LAMBDA_POOL_DATABASE_URL": "postgresql://u@h/db?password=hunter2"}
    )
    assert "hunter2" not in repr(settings)
    assert "password=***" in repr(settings)


def test_repr_masks_the_password() -> None:
    settings = Settings.from_env({"LAMBDA_POOL_DATABASE_URL": "postgresql://u:hunter2@h/db"})
    assert "hunter2" not in repr(settings)
    assert "postgresql://u:***@h/db" in repr(settings)


def test_iam_auth_builds_an_iam_provider_for_the_url_user_and_host() -> None:
    settings = Settings.from_env(
        {
            "LAMBDA_POOL_DATABASE_URL": "postgresql://app@db.example.com:6432/app",
            "LAMBDA_POOL_AUTH": "iam",
            "LAMBDA_POOL_IAM_REGION": "eu-west-1",
        }
    )
    provider = credentials_for(settings, settings.url())
    assert isinstance(provider, IAMCredentials)


def test_iam_auth_without_user_is_explained() -> None:
    settings = Settings.from_env(
        {"LAMBDA_POOL_DATABASE_URL": "postgresql://db.example.com/app", "LAMBDA_POOL_AUTH": "iam"}
    )
    with pytest.raises(exc.ArgumentError, match="auth=iam needs the database user and host"):
        credentials_for(settings, settings.url())


def test_secret_auth_builds_a_secrets_manager_provider_and_needs_no_url() -> None:
    settings = Settings.from_env(
        {"LAMBDA_POOL_AUTH": "secret", "LAMBDA_POOL_SECRET_ARN": "prod/db"}
    )
    url = settings.url()
    assert url.host is None
    assert isinstance(credentials_for(settings, url), SecretsManagerCredentials)


def test_env_auth_and_url_query_auth_together_are_refused() -> None:
    settings = Settings.from_env({"LAMBDA_POOL_AUTH": "secret", "LAMBDA_POOL_SECRET_ARN": "x"})
    with pytest.raises(exc.ArgumentError, match="both choose credentials"):
        credentials_for(settings, make_url("postgresql://app@h/db?auth=iam"))


def test_static_auth_uses_the_url_credentials() -> None:
    settings = Settings.from_env({"LAMBDA_POOL_DATABASE_URL": "postgresql://u:p@h/db"})
    assert credentials_for(settings, settings.url()) is None


def test_statement_timeout_beyond_postgresqls_limit_is_refused_at_init(
    embedded_postgres: PostgresServer,
) -> None:
    with pytest.raises(exc.ArgumentError, match="at most 2147483647"):
        with_connection(url=embedded_postgres.dsn, statement_timeout=2**40)
    with pytest.raises(exc.ArgumentError, match="at most 2147483647"):
        with_connection(url=embedded_postgres.dsn, statement_timeout=2**31)


def test_statement_timeout_at_postgresqls_limit_is_set_by_the_server(
    embedded_postgres: PostgresServer,
) -> None:
    @with_connection(url=embedded_postgres.dsn, statement_timeout=2**31 - 1, warm=False)
    def show(event: Any, context: Any, connection: Connection) -> str:
        return str(connection.execute("SHOW statement_timeout").scalar())

    assert show({}, LambdaContext(remaining_ms=10_000)) == "2147483647ms"
