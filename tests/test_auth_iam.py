"""RDS IAM tokens: signed by real boto3 (under moto, the plugin's ``aws`` fixture), cached
until near expiry, TLS only.

The embedded PostgreSQL stands in for RDS: a role's password is set to the issued token,
so a connection authenticates exactly when it presents that token over TLS.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import uuid
import weakref
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
from support import FakeClock

from lambda_pool.auth import (
    IAMCredentials,
    forget_all_cached_credentials,
    provider_from_url,
)
from lambda_pool.auth.iam import token_validity
from lambda_pool.exc import ArgumentError, CredentialsError

REGION = "eu-west-1"
HOST = "mydb.cluster-abc123.eu-west-1.rds.amazonaws.com"


class CountingClient:
    """A real boto3 rds client whose generate_db_auth_token calls are counted."""

    def __init__(self, client: Any, rewrite_expires: str | None = None) -> None:
        self._client = client
        self._rewrite_expires = rewrite_expires
        self.generated = 0

    def generate_db_auth_token(self, **kwargs: Any) -> str:
        self.generated += 1
        token: str = self._client.generate_db_auth_token(**kwargs)
        if self._rewrite_expires is not None:
            token = token.replace("X-Amz-Expires=900", f"X-Amz-Expires={self._rewrite_expires}")
        return token


class CountingFactory:
    """The injected client factory: real boto3 clients, wrapped to count signings."""

    def __init__(self, rewrite_expires: str | None = None) -> None:
        self.clients: list[CountingClient] = []
        self.regions: list[str] = []
        self._rewrite_expires = rewrite_expires

    def __call__(self, region: str) -> CountingClient:
        import boto3

        self.regions.append(region)
        client = CountingClient(boto3.client("rds", region_name=region), self._rewrite_expires)
        self.clients.append(client)
        return client

    @property
    def generated(self) -> int:
        return sum(c.generated for c in self.clients)


def _query(token: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit("https://" + token).query)


def test_token_is_a_presigned_connect_url_valid_for_900_seconds(aws: str) -> None:
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION)
    creds = provider.get()

    assert creds.user == "app_user"
    assert creds.password is not None
    assert creds.password.startswith(f"{HOST}:5432/?")
    query = _query(creds.password)
    assert query["Action"] == ["connect"]
    assert query["DBUser"] == ["app_user"]
    assert query["X-Amz-Expires"] == ["900"]
    assert f"/{REGION}/rds-db/aws4_request" in query["X-Amz-Credential"][0]
    assert dict(creds.connect_args) == {"sslmode": "require"}


def test_expires_at_is_the_tokens_own_issue_time_plus_lifetime_minus_margin(
    aws: str,
) -> None:
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION, margin=60)
    creds = provider.get()
    assert creds.password is not None
    issued_at, lifetime = token_validity(creds.password)
    assert lifetime == 900
    assert creds.expires_at is not None
    # X-Amz-Date has whole seconds, so allow the sub-second truncation and the test's run.
    assert abs(creds.expires_at - (issued_at + 900 - 60)) < 2.0


def test_lifetime_is_read_from_x_amz_expires_not_assumed(aws: str) -> None:
    factory = CountingFactory(rewrite_expires="300")
    clock = FakeClock()
    provider = IAMCredentials(
        HOST, 5432, "app_user", region=REGION, margin=60, clock=clock, client_factory=factory
    )
    creds = provider.get()
    assert creds.expires_at is not None
    assert clock.now + 300 - 60 - 2.0 < creds.expires_at <= clock.now + 300 - 60

    clock.advance(300 - 60)
    provider.get()
    assert factory.generated == 2


def test_token_is_generated_once_and_reused_within_its_lifetime(aws: str) -> None:
    factory = CountingFactory()
    clock = FakeClock()
    provider = IAMCredentials(
        HOST, 5432, "app_user", region=REGION, clock=clock, client_factory=factory
    )
    first = provider.get()
    assert first.expires_at is not None
    for _ in range(5):
        assert provider.get() is first
    clock.advance(first.expires_at - clock.now - 1)
    assert provider.get() is first
    assert factory.generated == 1
    assert factory.regions == [REGION]


def test_new_token_after_the_clock_passes_expires_at(aws: str) -> None:
    factory = CountingFactory()
    clock = FakeClock()
    provider = IAMCredentials(
        HOST, 5432, "app_user", region=REGION, clock=clock, client_factory=factory
    )
    first = provider.get()
    assert first.expires_at is not None
    clock.now = first.expires_at
    second = provider.get()

    assert factory.generated == 2
    assert second is not first
    assert second.expires_at is not None
    assert second.expires_at > first.expires_at
    assert second.expires_at - clock.now == pytest.approx(900 - 60, abs=2.0)


def test_concurrent_first_calls_share_one_token(aws: str) -> None:
    factory = CountingFactory()
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION, client_factory=factory)
    barrier = threading.Barrier(8)
    results: list[str | None] = []

    def worker() -> None:
        barrier.wait()
        results.append(provider.get().password)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert factory.generated == 1
    assert len(set(results)) == 1


def test_refresh_signs_a_new_token_with_a_new_client(aws: str) -> None:
    factory = CountingFactory()
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION, client_factory=factory)
    provider.get()
    provider.refresh()
    provider.get()
    assert factory.generated == 2
    # The client is rebuilt too: stale signing credentials may be why auth failed.
    assert len(factory.clients) == 2


def test_forget_all_cached_credentials_makes_every_provider_sign_again(aws: str) -> None:
    factory = CountingFactory()
    a = IAMCredentials(HOST, 5432, "a_user", region=REGION, client_factory=factory)
    b = IAMCredentials(HOST, 5433, "b_user", region=REGION, client_factory=factory)
    a.get()
    b.get()
    assert forget_all_cached_credentials() >= 2
    a.get()
    b.get()
    assert factory.generated == 4


def test_registry_does_not_keep_providers_alive(aws: str) -> None:
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION)
    ref = weakref.ref(provider)
    del provider
    gc.collect()
    assert ref() is None
    forget_all_cached_credentials()


@pytest.mark.parametrize("sslmode", ["disable", "allow", "prefer"])
def test_non_tls_sslmode_is_refused_with_iam(aws: str, sslmode: str) -> None:
    with pytest.raises(ArgumentError, match="TLS"):
        IAMCredentials(HOST, 5432, "app_user", region=REGION, sslmode=sslmode)
    with pytest.raises(ArgumentError, match="only over TLS"):
        provider_from_url(f"auth=iam&sslmode={sslmode}", "app_user", HOST, 5432)


@pytest.mark.parametrize("sslmode", ["verify-ca", "verify-full"])
def test_stricter_tls_sslmode_is_kept(aws: str, sslmode: str) -> None:
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION, sslmode=sslmode)
    assert dict(provider.get().connect_args) == {"sslmode": sslmode}


def test_region_comes_from_aws_region_then_aws_default_region(
    aws: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_REGION", "us-east-2")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "ap-south-1")
    assert IAMCredentials(HOST, 5432, "u").region == "us-east-2"
    monkeypatch.delenv("AWS_REGION")
    assert IAMCredentials(HOST, 5432, "u").region == "ap-south-1"
    assert IAMCredentials(HOST, 5432, "u", region="eu-central-1").region == "eu-central-1"


def test_missing_region_is_a_clear_credentials_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(CredentialsError, match="AWS_REGION"):
        IAMCredentials(HOST, 5432, "app_user")


def test_signing_without_aws_credentials_is_a_credentials_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION)
    with pytest.raises(CredentialsError, match="no AWS credentials") as info:
        provider.get()
    assert "app_user" in str(info.value)
    assert info.value.__context__ is None


def test_sdk_error_text_never_reaches_the_exception(aws: str) -> None:
    from botocore.exceptions import ClientError

    leaked = "SECRET-" + uuid.uuid4().hex

    class FailingClient:
        def generate_db_auth_token(self, **kwargs: Any) -> str:
            raise ClientError(
                {"Error": {"Code": "AccessDenied", "Message": f"token {leaked} rejected"}},
                "GenerateDbAuthToken",
            )

    provider = IAMCredentials(
        HOST, 5432, "app_user", region=REGION, client_factory=lambda region: FailingClient()
    )
    with pytest.raises(CredentialsError) as info:
        provider.get()
    assert "AccessDenied" in str(info.value)
    assert leaked not in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None


def test_token_never_appears_in_repr_str_or_logs(
    aws: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    provider = IAMCredentials(HOST, 5432, "app_user", region=REGION)
    creds = provider.get()
    token = creds.password
    assert token is not None
    signature = _query(token)["X-Amz-Signature"][0]
    shown = [repr(creds), str(creds), f"{creds}", repr([creds]), repr(provider), caplog.text]
    shown += [r.getMessage() for r in caplog.records]
    for text in shown:
        assert token not in text
        assert signature not in text
    assert any("signed an RDS IAM token" in r.getMessage() for r in caplog.records)


def test_invalid_margin_and_port_are_argument_errors(aws: str) -> None:
    with pytest.raises(ArgumentError, match="margin"):
        IAMCredentials(HOST, 5432, "u", margin=900)
    with pytest.raises(ArgumentError, match="margin"):
        IAMCredentials(HOST, 5432, "u", margin=-1)
    with pytest.raises(ArgumentError, match="port"):
        IAMCredentials(HOST, 0, "u")
    with pytest.raises(ArgumentError, match="host"):
        IAMCredentials("", 5432, "u")


def test_iam_url_builds_a_provider_for_the_urls_user_host_and_port(aws: str) -> None:
    clock = FakeClock()
    provider = provider_from_url(
        "auth=iam&region=us-west-2&token_margin=120&sslmode=verify-full",
        "app_user",
        HOST,
        6543,
        clock=clock,
    )
    assert isinstance(provider, IAMCredentials)
    assert (provider.host, provider.port, provider.user) == (HOST, 6543, "app_user")
    assert provider.region == "us-west-2"
    creds = provider.get()
    assert creds.password is not None
    assert creds.password.startswith(f"{HOST}:6543/?")
    assert creds.expires_at == pytest.approx(clock.now + 900 - 120, abs=2.0)
    assert dict(creds.connect_args) == {"sslmode": "verify-full"}


def test_iam_url_without_user_or_host_is_an_argument_error(aws: str) -> None:
    with pytest.raises(ArgumentError, match="user and host"):
        provider_from_url({"auth": "iam"}, None, HOST, 5432)
    with pytest.raises(ArgumentError, match="user and host"):
        provider_from_url({"auth": "iam"}, "u", None, None)
    with pytest.raises(ArgumentError, match="choose one"):
        provider_from_url("auth=iam&secret=x", "u", HOST, 5432)


# --------------------------------------------------------------------------- real server


def _connect(pg: Any, creds: Any, **extra: Any) -> Any:
    import psycopg

    return psycopg.connect(
        host=pg.host,
        port=pg.port,
        dbname=pg.dbname,
        user=creds.user,
        password=creds.password,
        connect_timeout=10,
        **{**dict(creds.connect_args), **extra},
    )


def test_issued_token_authenticates_a_real_connection_over_tls(
    aws: str, embedded_postgres: Any
) -> None:
    pg = embedded_postgres
    if not pg.ssl_enabled:
        pytest.skip("the test PostgreSQL has no TLS (binaries built without OpenSSL)")
    role = f"iam_{uuid.uuid4().hex[:10]}"
    provider = IAMCredentials(pg.host, pg.port, role, region=REGION)
    creds = provider.get()
    assert creds.password is not None
    # Stand-in for RDS's token check: the role's password is the token itself.
    pg.create_role(role, creds.password)

    with _connect(pg, creds) as conn:
        row = conn.execute(
            "SELECT current_user, ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    assert row == (role, True)


def test_next_token_is_what_the_server_accepts_after_expiry(
    aws: str, embedded_postgres: Any
) -> None:
    import psycopg

    pg = embedded_postgres
    if not pg.ssl_enabled:
        pytest.skip("the test PostgreSQL has no TLS (binaries built without OpenSSL)")
    role = f"iam_{uuid.uuid4().hex[:10]}"
    clock = FakeClock()
    provider = IAMCredentials(pg.host, pg.port, role, region=REGION, clock=clock)
    first = provider.get()
    assert first.password is not None and first.expires_at is not None
    pg.create_role(role, first.password)
    with _connect(pg, first):
        pass

    # A second later the signer stamps a different X-Amz-Date, hence a different token.
    while token_validity(first.password)[0] >= int(time.time()):
        time.sleep(0.05)
    clock.now = first.expires_at + 1
    second = provider.get()
    assert second.password is not None and second.password != first.password
    pg.set_password(role, second.password)  # "RDS" now only knows the fresh token

    with pytest.raises(psycopg.OperationalError):
        _connect(pg, first)
    with _connect(pg, second) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)


# --------------------------------------------------------------------------- through the engine


def _wait_for_next_signing_second(token: str) -> None:
    """Sleep until botocore's X-Amz-Date (whole seconds) will differ from ``token``'s."""
    while token_validity(token)[0] >= int(time.time()):
        time.sleep(0.05)


def test_engine_retires_a_connection_at_checkout_once_its_token_expired(
    aws: str, embedded_postgres: Any, unique_application_name: str
) -> None:
    from lambda_pool import create_engine

    pg = embedded_postgres
    if not pg.ssl_enabled:
        pytest.skip("the test PostgreSQL has no TLS (binaries built without OpenSSL)")
    role = f"iam_{uuid.uuid4().hex[:10]}"
    clock = FakeClock()
    factory = CountingFactory()
    provider = IAMCredentials(
        pg.host, pg.port, role, region=REGION, clock=clock, client_factory=factory
    )
    first = provider.get()
    assert first.password is not None and first.expires_at is not None
    pg.create_role(role, first.password)  # "RDS" accepts the current token

    engine = create_engine(
        f"postgresql://{pg.host}:{pg.port}/{pg.dbname}?application_name={unique_application_name}",
        credentials=provider,
        pool_size=1,
    )
    try:
        with engine.connect() as conn:
            pid, user, ssl = conn.execute(
                "SELECT pg_backend_pid(), current_user, ssl FROM pg_stat_ssl "
                "WHERE pid = pg_backend_pid()"
            ).one()
        assert (user, ssl) == (role, True)

        # Still within the token's life: the pooled connection is handed out again.
        clock.now = first.expires_at - 1
        with engine.connect() as conn:
            assert conn.execute("SELECT pg_backend_pid()").scalar() == pid
        assert factory.generated == 1

        # Past expires_at: the next checkout retires it and connects with a new token,
        # which is now the only one "RDS" accepts.
        _wait_for_next_signing_second(first.password)
        clock.now = first.expires_at
        second = provider.get()
        assert second.password is not None and second.password != first.password
        pg.set_password(role, second.password)
        with engine.connect() as conn:
            new_pid, user = conn.execute("SELECT pg_backend_pid(), current_user").one()
        assert new_pid != pid
        assert user == role
        assert factory.generated == 2
        # The retired backend is gone from the server; only the fresh one remains.
        assert pg.wait_for_backend_count(1, unique_application_name) == 1
    finally:
        engine.dispose()
