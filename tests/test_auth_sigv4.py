"""The standard-library SigV4 signer gives exactly what botocore gives.

Both sides sign at the same instant: botocore reads the time through
``botocore.auth.get_current_datetime``, which the equivalence tests pin with
``unittest.mock.patch`` (only the clock is fixed; the signing code that runs is botocore's).
"""

from __future__ import annotations

import datetime
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import pytest

from lambda_pool.auth import IAMCredentials
from lambda_pool.auth.iam import token_validity
from lambda_pool.auth.sigv4 import (
    AwsCredentials,
    credentials_from_environment,
    presign_rds_auth_token,
    sign_json_request,
)
from lambda_pool.exc import CredentialsError

FIXED = datetime.datetime(2026, 3, 4, 5, 6, 7)
ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJHMEUCIQD+abc=="

_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
)


@pytest.fixture
def no_aws_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """No credentials anywhere botocore looks; yields a folder for config files."""
    for name in _AWS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    yield tmp_path


def _boto3_token(credentials: AwsCredentials, host: str, port: int, user: str, region: str) -> str:
    import boto3
    import botocore.auth

    session = boto3.session.Session(
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        aws_session_token=credentials.token,
    )
    client = session.client("rds", region_name=region)
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=FIXED):
        token: str = client.generate_db_auth_token(
            DBHostname=host, Port=port, DBUsername=user, Region=region
        )
    return token


@pytest.mark.parametrize("region", ["eu-west-1", "us-east-1", "cn-north-1", "us-gov-west-1"])
@pytest.mark.parametrize("token", [None, SESSION_TOKEN], ids=["long-term", "session"])
@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("mydb.cluster-abc123.eu-west-1.rds.amazonaws.com", 5432),
        ("MyDB.Cluster-ABC.rds.amazonaws.com.cn", 6543),
        ("10.0.3.17", 443),  # the scheme's default port is not signed, but kept in the URL
        ("proxy.proxy-xyz.us-gov-west-1.rds.amazonaws.com", 1),
    ],
)
def test_token_is_byte_identical_to_boto3s(
    region: str, token: str | None, host: str, port: int
) -> None:
    credentials = AwsCredentials(ACCESS_KEY, SECRET_KEY, token)
    for user in ("app_user", "iam-user.1", "o'brien"):
        expected = _boto3_token(credentials, host, port, user, region)
        assert presign_rds_auth_token(host, port, user, region, credentials, now=FIXED) == expected


@pytest.mark.parametrize(
    "user",
    ["user with space", "ünïcødé", "a+b=c&d?e/f%g", "semi;colon:at@hash#", "tilde~dot.dash-_"],
)
def test_users_with_special_characters_are_encoded_as_boto3_encodes_them(user: str) -> None:
    credentials = AwsCredentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    host = "db.example.internal"
    expected = _boto3_token(credentials, host, 5432, user, "ap-southeast-2")
    assert presign_rds_auth_token(host, 5432, user, "ap-southeast-2", credentials, now=FIXED) == (
        expected
    )
    assert parse_qs(urlsplit("https://" + expected).query)["DBUser"] == [user]


def test_timezone_aware_time_is_signed_in_utc() -> None:
    credentials = AwsCredentials(ACCESS_KEY, SECRET_KEY)
    plus_two = datetime.timezone(datetime.timedelta(hours=2))
    aware = FIXED.replace(tzinfo=datetime.timezone.utc).astimezone(plus_two)
    assert presign_rds_auth_token("h", 5432, "u", "eu-west-1", credentials, now=aware) == (
        presign_rds_auth_token("h", 5432, "u", "eu-west-1", credentials, now=FIXED)
    )


def test_signed_json_request_matches_botocores_sigv4_auth() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    url = "https://secretsmanager.eu-west-1.amazonaws.com/"
    body = b'{"SecretId": "prod/db"}'
    own = {
        "Content-Type": "application/x-amz-json-1.1",
        "X-Amz-Target": "secretsmanager.GetSecretValue",
    }
    for token in (None, SESSION_TOKEN):
        request = AWSRequest(method="POST", url=url, data=body, headers=dict(own))
        signer = SigV4Auth(
            Credentials(ACCESS_KEY, SECRET_KEY, token), "secretsmanager", "eu-west-1"
        )
        with mock.patch("botocore.auth.get_current_datetime", return_value=FIXED):
            signer.add_auth(request)
        headers = sign_json_request(
            url,
            body,
            own,
            service="secretsmanager",
            region="eu-west-1",
            credentials=AwsCredentials(ACCESS_KEY, SECRET_KEY, token),
            now=FIXED,
        )
        assert headers["Authorization"] == request.headers["Authorization"]
        assert headers["X-Amz-Date"] == request.headers["X-Amz-Date"]
        assert headers.get("X-Amz-Security-Token") == request.headers.get("X-Amz-Security-Token")


def test_environment_credentials_are_read_as_botocore_reads_them() -> None:
    assert credentials_from_environment({}) is None
    assert credentials_from_environment({"AWS_ACCESS_KEY_ID": "a"}) is None
    found = credentials_from_environment({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s"})
    assert found == AwsCredentials("a", "s", None)
    legacy = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "s", "AWS_SECURITY_TOKEN": "t"}
    assert credentials_from_environment(legacy) == AwsCredentials("a", "s", "t")
    both = {**legacy, "AWS_SESSION_TOKEN": "new"}
    assert credentials_from_environment(both) == AwsCredentials("a", "s", "new")


def test_credentials_repr_shows_no_key_or_token() -> None:
    credentials = AwsCredentials(ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)
    for text in (repr(credentials), str(credentials), repr([credentials])):
        assert SECRET_KEY not in text and SESSION_TOKEN not in text and ACCESS_KEY not in text


# --------------------------------------------------------------------------- through IAMCredentials


def test_provider_signs_with_the_lambda_environment_credentials_as_boto3_would(
    monkeypatch: pytest.MonkeyPatch, no_aws_environment: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    host = "mydb.cluster-abc123.us-gov-west-1.rds.amazonaws.com"
    provider = IAMCredentials(host, 5432, "app_user", region="us-gov-west-1")
    token = provider.get().password
    assert token is not None

    import boto3
    import botocore.auth

    # boto3 signing at the second the provider signed (read back from X-Amz-Date).
    signed_at = datetime.datetime.utcfromtimestamp(token_validity(token)[0])
    client = boto3.client("rds", region_name="us-gov-west-1")
    with mock.patch.object(botocore.auth, "get_current_datetime", return_value=signed_at):
        expected = client.generate_db_auth_token(
            DBHostname=host, Port=5432, DBUsername="app_user", Region="us-gov-west-1"
        )
    assert token == expected


def test_without_environment_credentials_the_botocore_chain_supplies_them(
    no_aws_environment: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (no_aws_environment / "credentials").write_text(
        "[local]\naws_access_key_id = AKIAPROFILEKEY\naws_secret_access_key = profile-secret\n"
    )
    monkeypatch.setenv("AWS_PROFILE", "local")
    token = IAMCredentials("h.example", 5432, "u", region="eu-west-1").get().password
    assert token is not None
    credential = parse_qs(urlsplit("https://" + token).query)["X-Amz-Credential"][0]
    assert credential.startswith("AKIAPROFILEKEY/")
    assert "X-Amz-Security-Token" not in token


def test_no_credentials_anywhere_is_a_credentials_error_without_context(
    no_aws_environment: Path,
) -> None:
    with pytest.raises(CredentialsError, match="no AWS credentials") as info:
        IAMCredentials("h.example", 5432, "app_user", region="eu-west-1").get()
    assert "'app_user'" in str(info.value)
    assert info.value.__context__ is None


def test_signing_from_the_environment_imports_neither_boto3_nor_botocore() -> None:
    code = textwrap.dedent(
        """
        import os, sys
        os.environ.update(AWS_ACCESS_KEY_ID="AKIDEXAMPLE", AWS_SECRET_ACCESS_KEY="s",
                          AWS_SESSION_TOKEN="t", AWS_REGION="eu-west-1")
        from lambda_pool.auth import IAMCredentials
        token = IAMCredentials("db.example", 5432, "app_user").get().password
        assert token.startswith("db.example:5432/?Action=connect&DBUser=app_user&"), token[:40]
        print(sorted({m.split(".")[0] for m in sys.modules} & {"boto3", "botocore"}))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert completed.stdout.strip() == "[]"


def test_a_client_factory_still_signs_through_boto3(aws: str) -> None:
    made: list[Any] = []

    def factory(region: str) -> Any:
        import boto3

        client = boto3.client("rds", region_name=region)
        made.append(client)
        return client

    IAMCredentials("h.example", 5432, "u", region="eu-west-1", client_factory=factory).get()
    assert len(made) == 1
