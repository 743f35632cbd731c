"""RDS IAM through the engines: a ``sslmode`` that allows plain text is refused up front.

RDS accepts IAM tokens only over TLS, and a token sent in clear can be replayed for its
15 minutes.  ``sslmode=disable|allow|prefer`` in the URL or in ``connect_args`` together
with IAM credentials is therefore an ``ArgumentError`` at ``create_engine()``: no token
is signed, no socket opened.  Signing is real boto3 under moto (the ``aws`` fixture).
"""

from __future__ import annotations

from typing import Any

import pytest

from lambda_pool import create_engine, lifecycle
from lambda_pool.asyncio import create_async_engine
from lambda_pool.auth import IAMCredentials
from lambda_pool.exc import ArgumentError
from lambda_pool.testing.postgres import PostgresServer

REGION = "eu-west-1"
PLAIN_TEXT_MODES = ["disable", "allow", "prefer"]


class CountingFactory:
    """Real boto3 rds clients; counts how many were made (none = nothing was signed)."""

    def __init__(self) -> None:
        self.made = 0

    def __call__(self, region: str) -> Any:
        import boto3

        self.made += 1
        return boto3.client("rds", region_name=region)


def _provider(pg: PostgresServer, factory: CountingFactory) -> IAMCredentials:
    return IAMCredentials(pg.host, pg.port, "iam_user", region=REGION, client_factory=factory)


def _factories() -> list[Any]:
    return [
        pytest.param(create_engine, "postgresql+psycopg", id="sync-psycopg"),
        pytest.param(create_async_engine, "postgresql+psycopg", id="async-psycopg"),
        pytest.param(create_async_engine, "postgresql+asyncpg", id="async-asyncpg"),
    ]


@pytest.mark.parametrize("sslmode", PLAIN_TEXT_MODES)
@pytest.mark.parametrize(("factory", "scheme"), _factories())
@pytest.mark.parametrize("where", ["url", "connect_args"])
def test_iam_with_a_plain_text_sslmode_is_refused_and_nothing_is_opened(
    aws: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    sslmode: str,
    factory: Any,
    scheme: str,
    where: str,
) -> None:
    pg = embedded_postgres
    signer = CountingFactory()
    url = f"{scheme}://iam_user@{pg.host}:{pg.port}/{pg.dbname}"
    url += f"?application_name={unique_application_name}"
    kwargs: dict[str, Any] = {"credentials": _provider(pg, signer)}
    if where == "url":
        url += f"&sslmode={sslmode}"
    else:
        kwargs["connect_args"] = {"sslmode": sslmode}
    engines_before = len(lifecycle.registered_engines())

    with pytest.raises(ArgumentError, match="only over TLS") as refused:
        factory(url, **kwargs)

    assert f"sslmode={sslmode!r}" in str(refused.value)
    assert "require" in str(refused.value)  # says what to use instead
    assert signer.made == 0  # no token was signed
    assert pg.backend_count(unique_application_name) == 0
    assert len(lifecycle.registered_engines()) == engines_before


def test_iam_url_with_connect_args_disabling_tls_is_refused(
    aws: str, embedded_postgres: PostgresServer
) -> None:
    pg = embedded_postgres
    url = f"postgresql://iam_user@{pg.host}:{pg.port}/{pg.dbname}?auth=iam&region={REGION}"
    with pytest.raises(ArgumentError, match="only over TLS"):
        create_engine(url, connect_args={"sslmode": "disable"})


def test_asyncpg_ssl_false_is_refused_with_iam(aws: str, embedded_postgres: PostgresServer) -> None:
    pg = embedded_postgres
    signer = CountingFactory()
    with pytest.raises(ArgumentError, match="only over TLS"):
        create_async_engine(
            f"postgresql+asyncpg://iam_user@{pg.host}:{pg.port}/{pg.dbname}",
            credentials=_provider(pg, signer),
            connect_args={"ssl": False},
        )
    assert signer.made == 0


@pytest.mark.parametrize("sslmode", [None, "require", "verify-ca", "verify-full"])
def test_iam_with_tls_modes_builds_the_engine_without_connecting(
    aws: str, embedded_postgres: PostgresServer, sslmode: str | None
) -> None:
    pg = embedded_postgres
    signer = CountingFactory()
    url = f"postgresql://iam_user@{pg.host}:{pg.port}/{pg.dbname}"
    if sslmode is not None:
        url += f"?sslmode={sslmode}"
    engine = create_engine(url, credentials=_provider(pg, signer))
    assert engine.credentials is not None
    assert signer.made == 0  # signing waits for the first connect


def test_plain_text_sslmode_without_iam_is_still_allowed(embedded_postgres: PostgresServer) -> None:
    engine = create_engine(embedded_postgres.dsn + "?sslmode=disable")
    with engine.connect() as conn:
        assert conn.execute("SELECT 1").scalar() == 1
