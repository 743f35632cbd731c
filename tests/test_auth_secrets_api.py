"""Secrets Manager without boto3: signed ``GetSecretValue`` over HTTP, and the Lambda extension.

AWS is moto in server mode (``ThreadedMotoServer``: a real HTTP endpoint on loopback,
reached through ``AWS_ENDPOINT_URL_SECRETS_MANAGER`` as the AWS SDKs reach it); with its
IAM checks switched on, moto verifies the request's SigV4 signature and the caller's
policy.  The database is the real embedded PostgreSQL.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import textwrap
import threading
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from support import FakeClock

from lambda_pool.auth import SecretsManagerCredentials
from lambda_pool.exc import ArgumentError, CredentialsError

REGION = "eu-west-1"
_KEY_ID, _SECRET_KEY, _SESSION_TOKEN = "testing", "testing", "testing-session-token"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """moto's AWS as an HTTP server on a loopback port; yields its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        pytest.skip("moto's server is not installed: pip install 'moto[server]'")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _post(url: str, data: bytes = b"") -> None:
    # text/plain: a form content type would make the server parse the body away.
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "text/plain"}
    )
    with urllib.request.urlopen(request) as answer:
        answer.read()


@pytest.fixture
def endpoint(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A reset moto server, and an environment that points the SDKs and lambda-pool at it."""
    _post(f"{moto_endpoint}/moto-api/reset")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", raising=False)
    monkeypatch.delenv("POWERTOOLS_PARAMETERS_MAX_AGE", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", _KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", _SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", _SESSION_TOKEN)
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/lambda-pool-test/config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/lambda-pool-test/credentials")
    yield moto_endpoint
    _post(f"{moto_endpoint}/moto-api/reset-auth", b"inf")


def _client(endpoint: str, service: str = "secretsmanager", **keys: str) -> Any:
    import boto3

    return boto3.client(
        service,
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=keys.get("key_id", _KEY_ID),
        aws_secret_access_key=keys.get("secret_key", _SECRET_KEY),
    )


def _secret_value(**fields: Any) -> str:
    value: dict[str, Any] = {"engine": "postgres", "host": "db.internal", "port": 5432}
    value.update(fields)
    return json.dumps(value)


def _create(endpoint: str, raw: str | None = None, **fields: Any) -> str:
    created = _client(endpoint).create_secret(
        Name=f"lambda-pool/api/{uuid.uuid4().hex[:8]}",
        SecretString=_secret_value(**fields) if raw is None else raw,
    )
    return str(created["ARN"])


def _put(endpoint: str, arn: str, **fields: Any) -> None:
    _client(endpoint).put_secret_value(SecretId=arn, SecretString=_secret_value(**fields))


# --------------------------------------------------------------------------- reading


def test_reads_the_secret_with_a_signed_get_secret_value_call(endpoint: str) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one", dbname="app")
    provider = SecretsManagerCredentials(arn, reader="api")
    creds = provider.get()
    assert (creds.user, creds.password, creds.expires_at) == ("app_user", "pw-one", None)
    assert provider.url() == "postgresql+psycopg://app_user@db.internal:5432/app"


def test_a_secret_name_is_read_in_aws_region(endpoint: str) -> None:
    name = f"by-name-{uuid.uuid4().hex[:6]}"
    _client(endpoint).create_secret(
        Name=name, SecretString=_secret_value(username="u", password="p")
    )
    assert SecretsManagerCredentials(name, reader="api").get().user == "u"


def test_cached_for_max_age_then_rotation_is_seen(endpoint: str) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one")
    clock = FakeClock()
    provider = SecretsManagerCredentials(arn, max_age=120, clock=clock, reader="api")
    assert provider.get().password == "pw-one"
    _put(endpoint, arn, username="app_user", password="pw-two")
    clock.advance(119)
    assert provider.get().password == "pw-one"
    clock.advance(1)
    assert provider.get().password == "pw-two"


def test_refresh_re_reads_at_once(endpoint: str) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one")
    provider = SecretsManagerCredentials(arn, reader="api")
    assert provider.get().password == "pw-one"
    _put(endpoint, arn, username="app_user", password="pw-two")
    assert provider.get().password == "pw-one"
    provider.refresh()
    assert provider.get().password == "pw-two"


def test_max_age_defaults_to_powertools_variable_then_300(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert SecretsManagerCredentials("x", reader="api").max_age == 300
    monkeypatch.setenv("POWERTOOLS_PARAMETERS_MAX_AGE", "45")
    arn = _create(endpoint, username="app_user", password="pw-one")
    clock = FakeClock()
    provider = SecretsManagerCredentials(arn, clock=clock, reader="api")
    assert provider.max_age == 45
    provider.get()
    _put(endpoint, arn, username="app_user", password="pw-two")
    clock.advance(44)
    assert provider.get().password == "pw-one"
    clock.advance(1)
    assert provider.get().password == "pw-two"
    # An explicit max_age wins over the variable, as in Powertools.
    assert SecretsManagerCredentials(arn, max_age=7, reader="api").max_age == 7


def test_a_bad_powertools_max_age_variable_is_an_argument_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("POWERTOOLS_PARAMETERS_MAX_AGE", "soon")
    with pytest.raises(ArgumentError, match="POWERTOOLS_PARAMETERS_MAX_AGE"):
        SecretsManagerCredentials("x")
    with pytest.raises(ArgumentError, match="reader"):
        SecretsManagerCredentials("x", max_age=1, reader="boto3")


# --------------------------------------------------------------------------- errors


def test_missing_secret_is_a_credentials_error_naming_the_aws_code(endpoint: str) -> None:
    with pytest.raises(CredentialsError, match="ResourceNotFoundException") as info:
        SecretsManagerCredentials("does/not/exist", reader="api").get()
    assert "does/not/exist" in str(info.value)
    assert info.value.__context__ is None and info.value.__cause__ is None


def test_a_value_that_is_not_json_is_an_error_that_does_not_show_it(endpoint: str) -> None:
    raw = "not-json-" + secrets.token_hex(8)
    arn = _create(endpoint, raw=raw)
    with pytest.raises(CredentialsError, match="not a JSON object") as info:
        SecretsManagerCredentials(arn, reader="api").get()
    assert raw not in str(info.value)
    assert info.value.__context__ is None


def test_json_without_a_password_names_the_keys_not_the_values(endpoint: str) -> None:
    arn = _create(endpoint, username="app_user", token="s3cr3t-value")
    with pytest.raises(CredentialsError, match="'password'") as info:
        SecretsManagerCredentials(arn, reader="api").get()
    assert "s3cr3t-value" not in str(info.value)


def test_an_unreachable_endpoint_is_a_clear_error(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(CredentialsError, match="could not be reached"):
        SecretsManagerCredentials("any", reader="api").get()


def test_no_region_is_a_clear_error(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    with pytest.raises(CredentialsError, match="no AWS region"):
        SecretsManagerCredentials("by-name", reader="api").get()


@pytest.fixture
def iam_checked(endpoint: str) -> Iterator[dict[str, str]]:
    """A secret, a user allowed to read secrets and one who is not; moto's IAM checks on."""
    arn = _create(endpoint, username="app_user", password="pw-allowed")
    iam = _client(endpoint, "iam")
    keys = {}
    for user, actions in (("reader", ["secretsmanager:GetSecretValue"]), ("outsider", ["s3:*"])):
        name = f"{user}-{uuid.uuid4().hex[:6]}"
        iam.create_user(UserName=name)
        policy = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}],
        }
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
    _post(f"{endpoint}/moto-api/reset-auth", b"0")
    yield {
        "arn": arn,
        "key_id": keys["reader"][0],
        "secret_key": keys["reader"][1],
        "outsider_key_id": keys["outsider"][0],
        "outsider_secret_key": keys["outsider"][1],
    }


def test_moto_verifies_the_signature_and_the_policy(
    iam_checked: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_checked["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_checked["secret_key"])
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    provider = SecretsManagerCredentials(iam_checked["arn"], reader="api")
    assert provider.get().password == "pw-allowed"

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_checked["outsider_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_checked["outsider_secret_key"])
    with pytest.raises(CredentialsError, match="AWS error AccessDenied") as info:
        SecretsManagerCredentials(iam_checked["arn"], reader="api").get()
    assert "pw-allowed" not in str(info.value)
    assert info.value.__context__ is None

    # Credentials put right: the same provider's re-read succeeds (they are read per call).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_checked["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", iam_checked["secret_key"])
    provider.refresh()
    assert provider.get().password == "pw-allowed"


def test_a_wrong_secret_key_is_reported_by_its_aws_code_only(
    iam_checked: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = "wrong-" + secrets.token_hex(8)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", iam_checked["key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    with pytest.raises(CredentialsError, match="AWS error SignatureDoesNotMatch") as info:
        SecretsManagerCredentials(iam_checked["arn"], reader="api").get()
    assert wrong not in str(info.value)


def test_the_secret_never_reaches_logs_repr_or_errors(
    endpoint: str, caplog: pytest.LogCaptureFixture
) -> None:
    password = "pw-" + secrets.token_hex(12)
    arn = _create(endpoint, username="app_user", password=password)
    broken = _create(endpoint, raw=json.dumps({"password": password}))
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    provider = SecretsManagerCredentials(arn, reader="api")
    creds = provider.get()
    provider.refresh()
    provider.get()
    with pytest.raises(CredentialsError) as info:
        SecretsManagerCredentials(broken, reader="api").get()
    assert any("(api)" in r.getMessage() for r in caplog.records)
    shown = [repr(creds), str(creds), repr(provider), str(info.value), caplog.text]
    for text in shown:
        assert password not in text
        assert _SESSION_TOKEN not in text


# --------------------------------------------------------------------------- the extension


class _ExtensionStandIn(http.server.ThreadingHTTPServer):
    """What the Parameters and Secrets extension does, on loopback (its binary is Lambda's).

    ``GET /secretsmanager/get?secretId=...`` with the session token in
    ``X-Aws-Parameters-Secrets-Token``; answers GetSecretValue's JSON, from a cache that
    outlives the test (like the extension's TTL).
    """

    def __init__(self, endpoint: str, token: str) -> None:
        self.endpoint = endpoint
        self.token = token
        self.requests = 0
        self.cache: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _ExtensionHandler)


class _ExtensionHandler(http.server.BaseHTTPRequestHandler):
    server: _ExtensionStandIn

    def do_GET(self) -> None:
        self.server.requests += 1
        parts = urlsplit(self.path)
        if self.headers.get("X-Aws-Parameters-Secrets-Token") != self.server.token:
            self._answer(401, b"")
            return
        if parts.path != "/secretsmanager/get":
            self._answer(404, b"")
            return
        secret_id = parse_qs(parts.query)["secretId"][0]
        if secret_id not in self.server.cache:
            from botocore.exceptions import ClientError

            try:
                value = _client(self.server.endpoint).get_secret_value(SecretId=secret_id)
            except ClientError as exc:
                self._answer(400, json.dumps({"__type": exc.response["Error"]["Code"]}).encode())
                return
            value.pop("ResponseMetadata", None)
            self.server.cache[secret_id] = json.dumps(value, default=str).encode()
        self._answer(200, self.server.cache[secret_id])

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: the test reads the counters instead."""


@pytest.fixture
def extension(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[_ExtensionStandIn]:
    server = _ExtensionStandIn(endpoint, _SESSION_TOKEN)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(server.server_address[1]))
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_auto_reads_through_the_extension_when_its_port_is_set(
    endpoint: str, extension: _ExtensionStandIn
) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one")
    provider = SecretsManagerCredentials(arn)
    assert provider.get().password == "pw-one"
    assert extension.requests == 1


def test_a_forced_re_read_bypasses_the_extensions_cache(
    endpoint: str, extension: _ExtensionStandIn
) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one")
    provider = SecretsManagerCredentials(arn, reader="extension")
    assert provider.get().password == "pw-one"
    _put(endpoint, arn, username="app_user", password="pw-two")
    provider.refresh()
    # The extension would still answer pw-one from its cache; the API has pw-two.
    assert provider.get().password == "pw-two"
    assert extension.requests == 1


def test_the_extension_refusing_the_token_is_a_clear_error(
    endpoint: str, extension: _ExtensionStandIn, monkeypatch: pytest.MonkeyPatch
) -> None:
    arn = _create(endpoint, username="app_user", password="pw-one")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "stale-token")
    with pytest.raises(CredentialsError, match="extension answered HTTP 401"):
        SecretsManagerCredentials(arn, reader="extension").get()
    with pytest.raises(CredentialsError, match="ResourceNotFoundException"):
        monkeypatch.setenv("AWS_SESSION_TOKEN", _SESSION_TOKEN)
        SecretsManagerCredentials("does/not/exist", reader="extension").get()


def test_an_extension_that_is_not_there_is_a_clear_error(
    endpoint: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PARAMETERS_SECRETS_EXTENSION_HTTP_PORT", str(_free_port()))
    with pytest.raises(CredentialsError, match="layer attached"):
        SecretsManagerCredentials("any").get()


# --------------------------------------------------------------------------- Powertools' path


@pytest.fixture
def powertools_parameters() -> Iterator[Any]:
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters.base import DEFAULT_PROVIDERS

    parameters.clear_caches()
    DEFAULT_PROVIDERS.pop("secrets", None)
    yield parameters
    parameters.clear_caches()
    DEFAULT_PROVIDERS.pop("secrets", None)


@pytest.mark.parametrize(("variable", "sees_rotation"), [(None, False), ("0", True)])
def test_powertools_path_leaves_max_age_to_powertools(
    endpoint: str,
    powertools_parameters: Any,
    monkeypatch: pytest.MonkeyPatch,
    variable: str | None,
    sees_rotation: bool,
) -> None:
    if variable is not None:
        monkeypatch.setenv("POWERTOOLS_PARAMETERS_MAX_AGE", variable)
    name = f"by-name-{uuid.uuid4().hex[:6]}"
    _client(endpoint).create_secret(
        Name=name, SecretString=_secret_value(username="app_user", password="pw-one")
    )
    # The function's own get_secret call fills Powertools' shared cache (a name, not an
    # ARN: the default provider, whose cache lambda-pool shares).
    assert powertools_parameters.get_secret(name, transform="json")["password"] == "pw-one"
    _put(endpoint, name, username="app_user", password="pw-two")

    provider = SecretsManagerCredentials(name)  # auto: Powertools is already imported
    expected = "pw-two" if sees_rotation else "pw-one"
    assert provider.get().password == expected
    assert provider.max_age == (300 if variable is None else 0)


# --------------------------------------------------------------------------- real server


def test_engine_re_reads_the_secret_after_an_authentication_failure(
    endpoint: str, embedded_postgres: Any
) -> None:
    from lambda_pool import create_engine

    pg = embedded_postgres
    role = f"api_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    pg.create_role(role, password)
    arn = _create(
        endpoint, username=role, password=password, host=pg.host, port=pg.port, dbname=pg.dbname
    )
    provider = SecretsManagerCredentials(arn, reader="api")
    engine = create_engine(f"postgresql://{pg.host}:{pg.port}/{pg.dbname}", credentials=provider)
    try:
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == role
        stale = provider.get()

        # Rotation: the server's password changes and the secret gets a new AWSCURRENT.
        rotated = secrets.token_urlsafe(16)
        pg.set_password(role, rotated)
        _put(endpoint, arn, username=role, password=rotated, host=pg.host, port=pg.port)
        engine.dispose()  # the next connect is a new one, with the cached (stale) password
        assert provider.get() is stale
        with engine.connect() as conn:
            assert conn.execute("SELECT current_user").scalar() == role
        assert provider.get().password == rotated
        assert rotated not in repr(engine) and password not in repr(engine)
    finally:
        engine.dispose()


def test_a_fresh_process_reads_the_secret_from_the_url_without_boto3(
    endpoint: str, embedded_postgres: Any
) -> None:
    pg = embedded_postgres
    role = f"api_{uuid.uuid4().hex[:10]}"
    password = secrets.token_urlsafe(16)
    pg.create_role(role, password)
    arn = _create(
        endpoint, username=role, password=password, host=pg.host, port=pg.port, dbname=pg.dbname
    )
    code = textwrap.dedent(
        f"""
        import sys
        import lambda_pool
        engine = lambda_pool.create_engine({f"postgresql:///?secret={arn}"!r})
        with engine.connect() as conn:
            print(conn.execute("SELECT current_user").scalar())
        engine.dispose()
        heavy = {{"boto3", "botocore", "aws_lambda_powertools"}}
        print(sorted({{m.split(".")[0] for m in sys.modules}} & heavy))
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=60,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.split("\n")[:2] == [role, "[]"]
