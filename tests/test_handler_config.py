"""``lambda_pool.config``: LAMBDA_POOL_* settings are read, validated and explained."""

from __future__ import annotations

import pytest

from lambda_pool import exc, with_connection
from lambda_pool.auth import IAMCredentials, SecretsManagerCredentials
from lambda_pool.config import Settings, credentials_for
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


@pytest.mark.parametrize("url", ["postgresql://u:s3cr3t@h:port/db", "foo://u:s3cr3t@h/db"])
def test_bad_url_names_the_variable_without_the_password(url: str) -> None:
    settings = Settings.from_env({"LAMBDA_POOL_DATABASE_URL": url})
    with pytest.raises(exc.ArgumentError, match="LAMBDA_POOL_DATABASE_URL is not a valid") as info:
        settings.url()
    assert "s3cr3t" not in str(info.value)
    assert "s3cr3t" not in repr(settings)


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
