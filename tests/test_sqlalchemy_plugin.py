"""``?plugin=lambda_pool`` gives an ordinary ``sqlalchemy.create_engine`` lambda-pool's
serverless behaviour: warm reuse, credentials, rotation, shutdown, psycopg 3."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import engine_from_config, text  # noqa: E402
from sqlalchemy.pool import NullPool, QueuePool  # noqa: E402

from lambda_pool import lifecycle  # noqa: E402
from lambda_pool.exc import ArgumentError  # noqa: E402
from lambda_pool.sqlalchemy import WarmSQLAlchemyPool  # noqa: E402
from lambda_pool.testing.postgres import PostgresServer  # noqa: E402


@pytest.fixture
def engines() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for engine in made:
        engine.dispose()


def _pid(conn: Any) -> int:
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


def _plain_url(pg: PostgresServer, app: str, **query: str) -> str:
    # Written as a user writes it: postgresql://, no driver named.
    url = pg.dsn_for(pg.user, pg.password, application_name=app, **query)
    assert url.startswith("postgresql://")
    return url


def test_plugin_in_the_url_gives_a_warm_engine_on_psycopg3_that_reuses_one_backend(
    embedded_postgres: PostgresServer, unique_application_name: str, engines: list[Any]
) -> None:
    url = _plain_url(embedded_postgres, unique_application_name, plugin="lambda_pool")
    engine = sqlalchemy.create_engine(url)
    engines.append(engine)
    assert engine.dialect.driver == "psycopg"
    assert isinstance(engine.pool, WarmSQLAlchemyPool)
    pids = set()
    for _ in range(5):
        with engine.connect() as conn:
            pids.add(_pid(conn))
    assert len(pids) == 1
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert "plugin" not in engine.url.query


def test_the_shutdown_hook_closes_a_plugin_engines_connection(
    embedded_postgres: PostgresServer, unique_application_name: str, engines: list[Any]
) -> None:
    engine = sqlalchemy.create_engine(
        _plain_url(embedded_postgres, unique_application_name), plugins=["lambda_pool"]
    )
    engines.append(engine)
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    assert embedded_postgres.backend_count(unique_application_name) == 1
    lifecycle.dispose_all()
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0


def test_alembic_style_engine_from_config_gets_the_plugin_too(
    embedded_postgres: PostgresServer, unique_application_name: str, engines: list[Any]
) -> None:
    url = _plain_url(embedded_postgres, unique_application_name, plugin="lambda_pool")
    # What Alembic's env.py does with the ini file's sqlalchemy.url.
    engine = engine_from_config({"sqlalchemy.url": url}, prefix="sqlalchemy.")
    engines.append(engine)
    assert isinstance(engine.pool, WarmSQLAlchemyPool)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT 41 + 1")).scalar_one() == 42


def test_warm_false_gives_nullpool_and_a_callers_pool_wins(
    embedded_postgres: PostgresServer, unique_application_name: str, engines: list[Any]
) -> None:
    cold = sqlalchemy.create_engine(
        _plain_url(embedded_postgres, unique_application_name, plugin="lambda_pool", warm="false")
    )
    engines.append(cold)
    assert isinstance(cold.pool, NullPool)
    with cold.connect() as conn:
        first = _pid(conn)
    with cold.connect() as conn:
        assert _pid(conn) != first
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0

    sized = sqlalchemy.create_engine(
        _plain_url(embedded_postgres, unique_application_name, plugin="lambda_pool"),
        pool_size=2,
    )
    engines.append(sized)
    assert isinstance(sized.pool, QueuePool)


def test_secret_in_the_url_supplies_the_credentials_and_survives_a_rotation(
    aws: str, db_secret: str, embedded_postgres: PostgresServer, engines: list[Any]
) -> None:
    import boto3

    pg = embedded_postgres
    role = f"rot_{uuid.uuid4().hex[:10]}"
    pg.create_role(role, "first-password")
    client = boto3.client("secretsmanager", region_name=aws)
    value = json.loads(client.get_secret_value(SecretId=db_secret)["SecretString"])
    value.update(username=role, password="first-password")
    client.put_secret_value(SecretId=db_secret, SecretString=json.dumps(value))
    # No user or password in the URL: both come from the secret.
    url = (
        f"postgresql://{pg.host}:{pg.port}/{pg.dbname}"
        f"?plugin=lambda_pool&warm=false&secret={db_secret}"
    )
    engine = sqlalchemy.create_engine(url)
    engines.append(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == role

    # Rotation: the server and the secret change; the engine's cached copy is stale.
    pg.set_password(role, "second-password")
    value["password"] = "second-password"
    client.put_secret_value(SecretId=db_secret, SecretString=json.dumps(value))
    with engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == role


@pytest.mark.parametrize(
    ("query", "named"),
    [
        ({"warm": "maybe"}, "warm='maybe'"),
        ({"pre_ping_idle_seconds": "-3"}, "pre_ping_idle_seconds='-3'"),
        ({"auth": "iam", "sslmode": "disable"}, "sslmode"),
        ({"warm": "false", "transaction_pooling": "true"}, "transaction_pooling"),
    ],
)
def test_bad_plugin_settings_are_argument_errors_naming_the_key(
    embedded_postgres: PostgresServer, query: dict[str, str], named: str
) -> None:
    url = _plain_url(embedded_postgres, "lpt_bad", plugin="lambda_pool", **query)
    with pytest.raises(ArgumentError, match=named) as caught:
        sqlalchemy.create_engine(url)
    assert embedded_postgres.password not in str(caught.value)


def test_an_async_engine_with_the_plugin_is_refused_with_advice(
    embedded_postgres: PostgresServer,
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    url = _plain_url(embedded_postgres, "lpt_async", plugin="lambda_pool").replace(
        "postgresql://", "postgresql+psycopg://"
    )
    with pytest.raises(ArgumentError, match="warm_async_engine"):
        create_async_engine(url)
