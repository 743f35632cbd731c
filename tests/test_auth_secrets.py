"""Secrets Manager credentials: read through Powertools, cached, re-read on rotation.

AWS is moto (the plugin's ``aws`` fixture); the database is the real embedded PostgreSQL,
whose role password is changed to simulate a rotation.
"""

from __future__ import annotations

import json
import logging
import secrets
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import FakeClock

from lambda_pool.auth import (
    SecretsManagerCredentials,
    forget_all_cached_credentials,
    provider_from_url,
)
from lambda_pool.exc import ArgumentError, CredentialsError


@pytest.fixture
def sm(aws: str) -> Iterator[Any]:
    """A moto Secrets Manager client; Powertools' shared provider and cache start empty."""
    import boto3
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters.base import DEFAULT_PROVIDERS

    # Powertools keeps one module-level provider (client + cache) for get_secret; a
    # client or value left from another test would answer for this one.
    parameters.clear_caches()
    DEFAULT_PROVIDERS.pop("secrets", None)
    yield boto3.client("secretsmanager", region_name=aws)
    parameters.clear_caches()
    DEFAULT_PROVIDERS.pop("secrets", None)


def _secret_value(**fields: Any) -> str:
    value = {"engine": "postgres", "host": "db.internal", "port": 5432, "dbname": "app"}
    value.update(fields)
    return json.dumps(value)


def _create(sm: Any, **fields: Any) -> str:
    created = sm.create_secret(
        Name=f"lambda-pool/test/{uuid.uuid4().hex[:8]}", SecretString=_secret_value(**fields)
    )
    return str(created["ARN"])


def test_reads_username_and_password_from_the_secret_json(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    creds = SecretsManagerCredentials(arn).get()
    assert (creds.user, creds.password) == ("app_user", "pw-one")
    assert creds.expires_at is None
    assert dict(creds.connect_args) == {}


def test_exposes_host_port_and_dbname_and_a_url_without_password(sm: Any) -> None:
    arn = _create(sm, username="app user", password="pw-one", port="6432")
    provider = SecretsManagerCredentials(arn)
    location = provider.location()
    assert (location.username, location.host, location.port, location.dbname) == (
        "app user",
        "db.internal",
        6432,
        "app",
    )
    assert provider.url() == "postgresql+psycopg://app%20user@db.internal:6432/app"
    assert "pw-one" not in provider.url("postgresql")


def test_value_is_cached_for_max_age_on_the_providers_clock(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    clock = FakeClock()
    provider = SecretsManagerCredentials(arn, max_age=300, clock=clock)
    assert provider.get().password == "pw-one"

    sm.put_secret_value(
        SecretId=arn, SecretString=_secret_value(username="app_user", password="pw-two")
    )
    clock.advance(299)
    assert provider.get().password == "pw-one"
    clock.advance(1)
    assert provider.get().password == "pw-two"


def test_refresh_forces_a_re_read_past_every_cache(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    provider = SecretsManagerCredentials(arn, max_age=300)
    assert provider.get().password == "pw-one"
    sm.put_secret_value(
        SecretId=arn, SecretString=_secret_value(username="app_user", password="pw-two")
    )
    assert provider.get().password == "pw-one"
    provider.refresh()
    assert provider.get().password == "pw-two"


def test_forget_all_cached_credentials_re_reads_secrets(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    provider = SecretsManagerCredentials(arn)
    provider.get()
    sm.put_secret_value(
        SecretId=arn, SecretString=_secret_value(username="app_user", password="pw-two")
    )
    forget_all_cached_credentials()
    assert provider.get().password == "pw-two"


def test_region_is_taken_from_the_secret_arn(sm: Any, aws: str) -> None:
    import boto3

    other = "eu-central-1" if aws != "eu-central-1" else "eu-west-1"
    remote = boto3.client("secretsmanager", region_name=other)
    created = remote.create_secret(
        Name="lambda-pool/test/remote", SecretString=_secret_value(username="u", password="p")
    )
    provider = SecretsManagerCredentials(created["ARN"])
    assert provider.region == other
    assert provider.get().user == "u"


def test_secret_name_with_explicit_region(sm: Any, aws: str) -> None:
    import boto3

    remote = boto3.client("secretsmanager", region_name="ap-southeast-2")
    remote.create_secret(Name="by-name", SecretString=_secret_value(username="u", password="p"))
    assert SecretsManagerCredentials("by-name", region="ap-southeast-2").get().user == "u"
    with pytest.raises(CredentialsError, match="ResourceNotFoundException"):
        SecretsManagerCredentials("by-name").get()


def test_missing_secret_is_a_credentials_error_naming_the_aws_error(sm: Any) -> None:
    with pytest.raises(CredentialsError, match="ResourceNotFoundException") as info:
        SecretsManagerCredentials("does/not/exist").get()
    assert "does/not/exist" in str(info.value)
    assert info.value.__context__ is None


def test_secret_without_password_key_names_the_key_not_the_values(sm: Any) -> None:
    arn = _create(sm, username="app_user", token="s3cr3t-value")
    with pytest.raises(CredentialsError, match="'password'") as info:
        SecretsManagerCredentials(arn).get()
    assert "s3cr3t-value" not in str(info.value)
    assert "token" in str(info.value)


def test_secret_that_is_not_json_does_not_leak_its_value(sm: Any) -> None:
    raw = "not-json-" + secrets.token_hex(8)
    arn = sm.create_secret(Name=f"plain-{uuid.uuid4().hex[:6]}", SecretString=raw)["ARN"]
    with pytest.raises(CredentialsError, match="not a JSON object") as info:
        SecretsManagerCredentials(arn).get()
    assert raw not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_secret_value_never_appears_in_repr_str_logs_or_errors(
    sm: Any, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-" + secrets.token_hex(12)
    arn = _create(sm, username="app_user", password=password)
    broken = sm.create_secret(
        Name=f"broken-{uuid.uuid4().hex[:6]}", SecretString=json.dumps({"password": password})
    )["ARN"]
    # Only lambda-pool's own reads are under test: the setup calls above log their
    # request bodies at DEBUG (botocore's doing, and the test's).
    caplog.clear()
    caplog.set_level(logging.DEBUG)

    provider = SecretsManagerCredentials(arn)
    creds = provider.get()
    provider.refresh()
    provider.get()
    with pytest.raises(CredentialsError) as info:
        SecretsManagerCredentials(broken).get()

    assert any("GetSecretValue" in r.getMessage() for r in caplog.records), "no SDK debug seen"
    shown = [repr(creds), str(creds), f"{creds!s}", repr(provider), str(info.value), caplog.text]
    shown += [r.getMessage() for r in caplog.records]
    for text in shown:
        assert password not in text
    assert "'***'" in repr(creds)


def test_max_age_must_be_non_negative_seconds() -> None:
    with pytest.raises(ArgumentError, match="max_age"):
        SecretsManagerCredentials("x", max_age=-1)
    with pytest.raises(ArgumentError, match="secret"):
        SecretsManagerCredentials("")


def test_secret_url_with_host_uses_the_urls_location(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    provider = provider_from_url({"secret": arn, "secret_max_age": "60"}, None, "db.url", 5432)
    assert isinstance(provider, SecretsManagerCredentials)
    assert provider.max_age == 60
    assert dict(provider.get().connect_args) == {}


def test_secret_url_without_host_connects_where_the_secret_points(sm: Any) -> None:
    arn = _create(sm, username="app_user", password="pw-one")
    provider = provider_from_url(f"auth=secret&secret={arn}", None, None, None)
    assert isinstance(provider, SecretsManagerCredentials)
    assert dict(provider.get().connect_args) == {
        "host": "db.internal",
        "port": 5432,
        "dbname": "app",
    }


def test_secret_url_conflicts_are_argument_errors() -> None:
    with pytest.raises(ArgumentError, match="secret="):
        provider_from_url("auth=secret", None, "h", None)
    with pytest.raises(ArgumentError, match="choose one"):
        provider_from_url("auth=password&secret=x", None, "h", None)
    with pytest.raises(ArgumentError, match="secret_max_age"):
        provider_from_url("secret=x&secret_max_age=soon", None, "h", None)


# --------------------------------------------------------------------------- real server


def _connect(pg: Any, creds: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname=pg.dbname,
        user=creds.user,
        password=creds.password,
        connect_timeout=10,
        **dict(creds.connect_args),
    )


def test_rotation_stale_credentials_fail_and_refresh_then_succeeds(
    sm: Any, embedded_postgres: Any
) -> None:
    import psycopg

    pg = embedded_postgres
    role = f"sm_{uuid.uuid4().hex[:10]}"
    old, new = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    pg.create_role(role, old)
    arn = _create(sm, username=role, password=old, host=pg.host, port=pg.port, dbname=pg.dbname)
    provider = SecretsManagerCredentials(arn, max_age=300)
    with _connect(pg, provider.get()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)

    # Rotation: the server's password changes and the secret gets a new AWSCURRENT.
    pg.set_password(role, new)
    sm.put_secret_value(
        SecretId=arn,
        SecretString=_secret_value(
            username=role, password=new, host=pg.host, port=pg.port, dbname=pg.dbname
        ),
    )
    with pytest.raises(psycopg.OperationalError, match="authentication failed") as info:
        _connect(pg, provider.get())
    assert new not in str(info.value) and old not in str(info.value)

    provider.refresh()
    with _connect(pg, provider.get()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


def test_secret_alone_is_enough_to_connect(sm: Any, embedded_postgres: Any) -> None:
    import psycopg

    pg = embedded_postgres
    role = f"sm_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    pg.create_role(role, password)
    arn = _create(
        sm, username=role, password=password, host=pg.host, port=pg.port, dbname=pg.dbname
    )
    provider = SecretsManagerCredentials(arn)
    creds = provider.get()
    with psycopg.connect(provider.url("postgresql"), password=creds.password) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            role,
            pg.dbname,
        )

    # The same through the URL convention: no host in the URL, so the credentials'
    # driver keywords carry the secret's host, port and dbname.
    located = provider_from_url(f"secret={arn}", None, None, None)
    assert located is not None
    creds = located.get()
    with psycopg.connect(
        "", user=creds.user, password=creds.password, **dict(creds.connect_args)
    ) as conn:
        assert conn.execute("SELECT current_user, current_database()").fetchone() == (
            role,
            pg.dbname,
        )


# --------------------------------------------------------------------------- through the engine


def _rotate(sm: Any, pg: Any, arn: str, role: str, password: str) -> None:
    """What a rotation Lambda does: new password on the server, new AWSCURRENT version."""
    pg.set_password(role, password)
    sm.put_secret_value(
        SecretId=arn,
        SecretString=_secret_value(
            username=role, password=password, host=pg.host, port=pg.port, dbname=pg.dbname
        ),
    )


def test_engine_caller_sees_no_error_when_the_secret_was_rotated(
    sm: Any, embedded_postgres: Any
) -> None:
    from lambda_pool import create_engine

    pg = embedded_postgres
    role = f"sm_{uuid.uuid4().hex[:10]}"
    first = secrets.token_urlsafe(16)
    pg.create_role(role, first)
    arn = _create(sm, username=role, password=first, host=pg.host, port=pg.port, dbname=pg.dbname)
    provider = SecretsManagerCredentials(arn, max_age=300)
    engine = create_engine(f"postgresql://{pg.host}:{pg.port}/{pg.dbname}", credentials=provider)
    try:
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == role
        stale = provider.get()

        _rotate(sm, pg, arn, role, secrets.token_urlsafe(16))
        assert provider.get() is stale  # still cached: the next connect will be refused once
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == role
        assert provider.get() is not stale
    finally:
        engine.dispose()


def test_engine_from_a_secret_url_without_host_connects_and_survives_rotation(
    sm: Any, embedded_postgres: Any
) -> None:
    from lambda_pool import create_engine

    pg = embedded_postgres
    role = f"sm_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    pg.create_role(role, password)
    arn = _create(
        sm, username=role, password=password, host=pg.host, port=pg.port, dbname=pg.dbname
    )
    engine = create_engine(f"postgresql:///?secret={arn}&secret_max_age=600")
    try:
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user, current_database()").one() == (
                role,
                pg.dbname,
            )
        _rotate(sm, pg, arn, role, secrets.token_urlsafe(16))
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == role
        assert password not in repr(engine)
    finally:
        engine.dispose()


def test_a_moto_mock_in_a_fresh_process_is_answered_through_the_sdk() -> None:
    # The standard-library reader would go past moto's in-process mock to the real
    # endpoint; while mock_aws is active, "auto" takes the SDK path (Powertools).
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import json, os, sys
        os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                          AWS_REGION="eu-west-1", AWS_DEFAULT_REGION="eu-west-1")
        import boto3
        from moto import mock_aws
        from lambda_pool.auth import SecretsManagerCredentials
        assert "aws_lambda_powertools.utilities.parameters" not in sys.modules
        with mock_aws():
            arn = boto3.client("secretsmanager").create_secret(
                Name="s", SecretString=json.dumps({"username": "u", "password": "p"})
            )["ARN"]
            print(SecretsManagerCredentials(arn).get().user)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "u"
