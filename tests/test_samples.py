"""The samples a user copies work: cold and warm invocations in-process, real PostgreSQL.

Each test gives the sample its own schema (``options=-csearch_path=...`` in the URL, so
the sample's ``visits`` table is created there and counts start at zero) and its own
``application_name``, so the backends it opens can be counted in ``pg_stat_activity``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lambda_pool.testing.invoke import LambdaInvoker
from lambda_pool.testing.postgres import PostgresServer

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"

# sample folder -> the ``source`` its rows carry in the shared ``visits`` table
STATIC_AUTH_SAMPLES = {
    "psycopg_handler": "psycopg",
    "sqlalchemy_orm": "sqlalchemy",
    "async_handler": "async",
}

Invoker = Callable[..., LambdaInvoker]


@pytest.fixture
def schema(embedded_postgres: PostgresServer, unique_application_name: str) -> Iterator[str]:
    """A fresh schema owned by the application role, dropped afterwards."""
    from psycopg import sql

    name = unique_application_name.lower()
    with embedded_postgres.admin_connect(dbname=embedded_postgres.dbname) as admin:
        admin.execute(
            sql.SQL("CREATE SCHEMA {} AUTHORIZATION {}").format(
                sql.Identifier(name), sql.Identifier(embedded_postgres.user)
            )
        )
    yield name
    with embedded_postgres.admin_connect(dbname=embedded_postgres.dbname) as admin:
        admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(name)))


@pytest.fixture
def database_url(
    embedded_postgres: PostgresServer, unique_application_name: str, schema: str
) -> str:
    """The app role's URL, tagged with the test's application_name, in the test's schema."""
    return embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
        options=f"-csearch_path={schema}",
    )


def stored_visits(server: PostgresServer, schema: str, source: str) -> int:
    """Committed rows, read from outside the function (what any other client sees)."""
    from psycopg import sql

    with server.admin_connect(dbname=server.dbname) as admin:
        row = admin.execute(
            sql.SQL("SELECT count(*) FROM {}.visits WHERE source = %s").format(
                sql.Identifier(schema)
            ),
            (source,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def sample(lambda_invoker: Invoker, folder: str, env: dict[str, str]) -> LambdaInvoker:
    if not (SAMPLES / folder / "app.py").exists():
        pytest.skip(f"samples/{folder} is not written yet")
    return lambda_invoker(str(SAMPLES / folder / "app.py"), env=env)


# --- the three samples configured with a password in the URL ----------------------------


@pytest.mark.parametrize("folder", sorted(STATIC_AUTH_SAMPLES))
def test_cold_then_warm_invocations_count_visits_on_one_backend(
    folder: str,
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
) -> None:
    fn = sample(lambda_invoker, folder, {"LAMBDA_POOL_DATABASE_URL": database_url})

    cold = fn.cold({})
    warm = [fn.warm({}) for _ in range(4)]

    assert cold["visits"] == 1
    assert [r["visits"] for r in warm] == [2, 3, 4, 5]
    assert cold["reused"] is False
    assert all(r["reused"] is True for r in warm)
    assert {r["backend_pid"] for r in warm} == {cold["backend_pid"]}
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert stored_visits(embedded_postgres, schema, STATIC_AUTH_SAMPLES[folder]) == 5


@pytest.mark.parametrize("folder", sorted(STATIC_AUTH_SAMPLES))
def test_failing_invocation_rolls_back_and_the_next_one_succeeds_on_the_same_backend(
    folder: str,
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
) -> None:
    source = STATIC_AUTH_SAMPLES[folder]
    fn = sample(lambda_invoker, folder, {"LAMBDA_POOL_DATABASE_URL": database_url})
    first = fn.cold({})

    with pytest.raises(ValueError, match="asked this invocation to fail"):
        fn.warm({"fail": True})
    assert stored_visits(embedded_postgres, schema, source) == 1

    after = fn.warm({})
    assert after["visits"] == 2
    assert after["backend_pid"] == first["backend_pid"]
    assert stored_visits(embedded_postgres, schema, source) == 2
    assert embedded_postgres.backend_count(unique_application_name) == 1


@pytest.mark.parametrize("folder", sorted(STATIC_AUTH_SAMPLES))
def test_failure_on_the_cold_start_does_not_lose_the_table(
    folder: str,
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    schema: str,
) -> None:
    # The table is created on first use; the first invocation's rollback must not take
    # it away while the module believes it exists.
    fn = sample(lambda_invoker, folder, {"LAMBDA_POOL_DATABASE_URL": database_url})
    with pytest.raises(ValueError):
        fn.cold({"fail": True})
    assert fn.warm({})["visits"] == 1
    assert stored_visits(embedded_postgres, schema, STATIC_AUTH_SAMPLES[folder]) == 1


@pytest.mark.parametrize("folder", sorted(STATIC_AUTH_SAMPLES))
def test_a_new_container_opens_a_new_backend_and_the_old_one_is_closed(
    folder: str,
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
) -> None:
    fn = sample(lambda_invoker, folder, {"LAMBDA_POOL_DATABASE_URL": database_url})
    first = fn.cold({})
    fn.warm({})
    second = fn.cold({})

    assert second["reused"] is False
    assert second["backend_pid"] != first["backend_pid"]
    assert second["visits"] == 3  # rows are in the database, not in the container
    assert embedded_postgres.wait_for_backend_count(1, unique_application_name) == 1


# --- Powertools: secret from Secrets Manager (moto), EMF metrics on stdout ---------------


def emf_documents(stdout: str) -> list[dict[str, Any]]:
    """The CloudWatch Embedded Metric Format documents among stdout's JSON lines."""
    documents = []
    for line in stdout.splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            document = json.loads(line)
        except ValueError:
            continue
        if isinstance(document, dict) and "_aws" in document:
            documents.append(document)
    return documents


def metric_names(document: dict[str, Any]) -> set[str]:
    return {
        metric["Name"]
        for directive in document["_aws"]["CloudWatchMetrics"]
        for metric in directive["Metrics"]
    }


@pytest.fixture
def powertools_env(
    db_secret: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
) -> dict[str, str]:
    """Secret mode: the URL names no user or password, the moto secret holds them."""
    url = (
        f"postgresql://{embedded_postgres.host}:{embedded_postgres.port}/"
        f"{embedded_postgres.dbname}?application_name={unique_application_name}"
        f"&options=-csearch_path%3D{schema}"
    )
    return {
        "LAMBDA_POOL_DATABASE_URL": url,
        "LAMBDA_POOL_AUTH": "secret",
        "LAMBDA_POOL_SECRET_ARN": db_secret,
        "POWERTOOLS_SERVICE_NAME": "lambda-pool-samples",
        "POWERTOOLS_METRICS_NAMESPACE": "LambdaPoolTest",
        # No X-Ray daemon here; the tracer's decorators still run, as no-ops.
        "POWERTOOLS_TRACE_DISABLED": "true",
    }


def test_powertools_sample_reads_its_secret_and_emits_metrics_per_invocation(
    lambda_invoker: Invoker,
    powertools_env: dict[str, str],
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pytest.importorskip("aws_lambda_powertools")
    assert "password" not in powertools_env["LAMBDA_POOL_DATABASE_URL"]
    fn = sample(lambda_invoker, "powertools_handler", powertools_env)

    cold = fn.cold({})
    cold_docs = emf_documents(capsys.readouterr().out)
    warm = fn.warm({})
    warm_docs = emf_documents(capsys.readouterr().out)

    # The credentials came from the moto secret: the URL has none.
    assert (cold["visits"], warm["visits"]) == (1, 2)
    assert warm["backend_pid"] == cold["backend_pid"]
    assert embedded_postgres.backend_count(unique_application_name) == 1
    # One EMF document per invocation, flushed by @metrics.log_metrics, in our namespace.
    assert len(cold_docs) == 1 and len(warm_docs) == 1
    for document in (*cold_docs, *warm_docs):
        namespaces = {d["Namespace"] for d in document["_aws"]["CloudWatchMetrics"]}
        assert namespaces == {"LambdaPoolTest"}
        assert document["service"] == "lambda-pool-samples"
        # Powertools writes a metric's values as a list (several add_metric calls).
        assert document["VisitRecorded"] in (1.0, [1.0])
    # lambda-pool's own metrics, fed by with_connection(metrics=...).
    assert "ConnectionsOpened" in metric_names(cold_docs[0])
    assert "ConnectionsReused" in metric_names(warm_docs[0])
    assert "ConnectionsOpened" not in metric_names(warm_docs[0])


def test_powertools_sample_rolls_back_a_failing_invocation(
    lambda_invoker: Invoker,
    powertools_env: dict[str, str],
    embedded_postgres: PostgresServer,
    schema: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("aws_lambda_powertools")
    fn = sample(lambda_invoker, "powertools_handler", powertools_env)
    fn.cold({})
    with pytest.raises(ValueError):
        fn.warm({"fail": True})
    assert stored_visits(embedded_postgres, schema, "powertools") == 1
    assert fn.warm({})["visits"] == 2
    # Logger's records carry the Lambda context @logger.inject_lambda_context added.
    # (Read through caplog and the sample's own formatter: Powertools binds its stream
    # handler once per process, so in-process its stdout is not this test's.)
    recorded = [r for r in caplog.records if r.getMessage() == "visit recorded"]
    assert recorded
    line = json.loads(fn.module.logger.registered_formatter.format(recorded[-1]))
    assert fn.last_context is not None
    assert line["function_request_id"] == fn.last_context.aws_request_id
    assert line["visits"] == 2


# --- the asyncio sample: the warm-container cache for async engines -----------------------


@pytest.mark.parametrize("driver", ["psycopg", "asyncpg"])
def test_async_sample_keeps_one_warm_connection_without_a_round_trip_per_invocation(
    driver: str,
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
) -> None:
    pytest.importorskip(driver)
    url = database_url.replace("postgresql://", f"postgresql+{driver}://", 1)
    fn = sample(lambda_invoker, "async_handler", {"LAMBDA_POOL_DATABASE_URL": url})

    cold = fn.cold({})
    warm = [fn.warm({}) for _ in range(5)]

    assert [r["visits"] for r in (cold, *warm)] == [1, 2, 3, 4, 5, 6]
    assert {r["backend_pid"] for r in warm} == {cold["backend_pid"]}
    assert embedded_postgres.backend_count(unique_application_name) == 1
    engine = fn.module.engine
    assert engine.driver == driver
    stats = engine.pool.stats.as_dict()
    # Back-to-back invocations: reused as is, no pre-ping (a pool_pre_ping=True pool
    # would have made five round trips).
    assert (stats["opened"], stats["reused"], stats["pre_pings"]) == (1, 5, 0)
    assert stored_visits(embedded_postgres, schema, "async") == 6


def test_async_sample_replaces_a_terminated_backend_between_invocations(
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    schema: str,
) -> None:
    fn = sample(lambda_invoker, "async_handler", {"LAMBDA_POOL_DATABASE_URL": database_url})
    first = fn.cold({})
    assert embedded_postgres.terminate(unique_application_name) == 1

    after = fn.warm({})

    assert after["visits"] == 2
    assert after["reused"] is False
    assert after["backend_pid"] != first["backend_pid"]
    assert embedded_postgres.backend_count(unique_application_name) == 1
    assert fn.module.engine.pool.stats.replaced == {"pre_ping_failed": 1}
    assert stored_visits(embedded_postgres, schema, "async") == 2


def test_async_sample_leaks_no_session_state_into_the_next_invocation(
    lambda_invoker: Invoker,
    database_url: str,
    embedded_postgres: PostgresServer,
) -> None:
    fn = sample(lambda_invoker, "async_handler", {"LAMBDA_POOL_DATABASE_URL": database_url})
    fn.cold({})

    async def leave_state_behind() -> None:
        # What a handler might do and forget: a session setting, committed.
        async with fn.module.engine.connect() as conn:
            await conn.execute("SET statement_timeout = 4321")
            await conn.commit()

    async def statement_timeout() -> str:
        async with fn.module.engine.connect() as conn:
            return str((await conn.execute("SHOW statement_timeout")).scalar())

    # The event loop the decorated async handler runs on (one per container).
    from lambda_pool.handler_async import container_loop

    loop = container_loop()
    assert loop is not None
    loop.run_until_complete(leave_state_behind())
    assert fn.warm({})["reused"] is True
    assert loop.run_until_complete(statement_timeout()) == "0"
