"""The pytest plugin's fixtures give what they promise: URLs, names, moto AWS, contexts."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import psycopg

from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer


def test_postgres_url_connects_as_the_application_role(
    postgres_url: str, embedded_postgres: PostgresServer
) -> None:
    assert postgres_url == embedded_postgres.dsn
    with psycopg.connect(postgres_url) as conn:
        row = conn.execute("SELECT current_user, current_database()").fetchone()
    assert row == (embedded_postgres.user, embedded_postgres.dbname)


def test_unique_application_name_differs_per_test_and_fits_postgres(
    unique_application_name: str, embedded_postgres: PostgresServer
) -> None:
    assert len(unique_application_name.encode()) <= 63
    with psycopg.connect(embedded_postgres.dsn, application_name=unique_application_name) as conn:
        row = conn.execute("SHOW application_name").fetchone()
    assert row == (unique_application_name,)


def test_aws_fixture_serves_a_moto_secret_to_boto3(aws: str) -> None:
    import boto3

    assert aws == "us-east-1"
    assert os.environ["AWS_DEFAULT_REGION"] == "us-east-1"
    client = boto3.client("secretsmanager")
    client.create_secret(Name="plain", SecretString="s3cret")
    assert client.get_secret_value(SecretId="plain")["SecretString"] == "s3cret"


def test_db_secret_holds_credentials_that_log_in(
    db_secret: str, embedded_postgres: PostgresServer
) -> None:
    import boto3

    value = json.loads(
        boto3.client("secretsmanager").get_secret_value(SecretId=db_secret)["SecretString"]
    )
    assert value["engine"] == "postgres"
    assert value["port"] == embedded_postgres.port
    with psycopg.connect(
        host=value["host"],
        port=value["port"],
        user=value["username"],
        password=value["password"],
        dbname=value["dbname"],
    ) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (value["username"],)


def test_lambda_context_remaining_time_decreases(
    lambda_context: Callable[..., LambdaContext],
) -> None:
    ctx = lambda_context(remaining_ms=3000)
    first = ctx.get_remaining_time_in_millis()
    assert 0 < first <= 3000
    time.sleep(0.05)
    assert ctx.get_remaining_time_in_millis() < first


def test_lambda_context_has_the_runtime_attributes(
    lambda_context: Callable[..., LambdaContext],
) -> None:
    one, two = lambda_context(), lambda_context(function_name="orders")
    assert one.aws_request_id != two.aws_request_id
    assert two.invoked_function_arn.endswith(":function:orders")
    assert two.log_group_name == "/aws/lambda/orders"
    assert isinstance(one.memory_limit_in_mb, int)
    assert one.function_version == "$LATEST"


def test_lambda_context_never_reports_negative_time() -> None:
    now = [100.0]
    ctx = LambdaContext(remaining_ms=500, clock=lambda: now[0])
    assert ctx.get_remaining_time_in_millis() == 500
    now[0] += 0.2
    assert ctx.get_remaining_time_in_millis() == 300
    now[0] += 10
    assert ctx.get_remaining_time_in_millis() == 0
