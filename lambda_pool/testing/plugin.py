"""The pytest plugin (entry point ``pytest11: lambda_pool``): fixtures for a real PostgreSQL,
PgBouncer, moto-backed AWS and Lambda contexts.

It is loaded into every pytest run where lambda-pool is installed, so it imports nothing
heavy at module level: servers, moto and boto3 are imported inside the fixtures that use them.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from lambda_pool.testing.context import LambdaContext
    from lambda_pool.testing.pgbouncer import PgBouncer
    from lambda_pool.testing.postgres import PostgresServer

AWS_REGION = "us-east-1"


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[PostgresServer]:
    """The session's PostgreSQL: the server of ``LAMBDA_POOL_TEST_DSN`` or a throw-away one.

    Started on first use and stopped at the end of the session (and at interpreter exit).
    """
    from lambda_pool.testing.postgres import from_env

    server = from_env()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(embedded_postgres: PostgresServer) -> str:
    """The application URL ``postgresql://lambda_pool:PW@127.0.0.1:PORT/lambda_pool_test``."""
    return embedded_postgres.dsn


@pytest.fixture
def unique_application_name(request: pytest.FixtureRequest) -> str:
    """A fresh ``application_name`` (under PostgreSQL's 63 bytes) to count a test's backends."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:40]
    return f"lpt_{stem}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Fake credentials, region ``us-east-1`` and moto's ``mock_aws`` for the test; yields
    the region. Skips when moto is not installed."""
    try:
        from moto import mock_aws
    except ImportError:
        pytest.skip("moto not installed: pip install 'lambda-pool[testing]'")
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    fake = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_SECURITY_TOKEN": "testing",
        "AWS_DEFAULT_REGION": AWS_REGION,
        "AWS_REGION": AWS_REGION,
        # Never let a developer's real ~/.aws files leak into a test.
        "AWS_CONFIG_FILE": "/nonexistent/lambda-pool-test/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lambda-pool-test/credentials",
    }
    for name, value in fake.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        yield AWS_REGION


@pytest.fixture
def db_secret(aws: str, embedded_postgres: PostgresServer) -> str:
    """A moto Secrets Manager secret with the app credentials; yields its ARN.

    The value is the JSON RDS writes: ``{"username", "password", "host", "port", "dbname",
    "engine": "postgres"}``. Use the ARN (or its name) as ``SecretId``.
    """
    import boto3

    client = boto3.client("secretsmanager", region_name=aws)
    value = {
        "username": embedded_postgres.user,
        "password": embedded_postgres.password,
        "host": embedded_postgres.host,
        "port": embedded_postgres.port,
        "dbname": embedded_postgres.dbname,
        "engine": "postgres",
    }
    created = client.create_secret(
        Name=f"lambda-pool/test/db-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(value)
    )
    return str(created["ARN"])


@pytest.fixture
def lambda_context() -> Callable[..., LambdaContext]:
    """Factory: ``lambda_context(remaining_ms=3000, **attrs)`` -> a fresh `LambdaContext`
    (new ``aws_request_id`` per call) whose remaining time counts down from creation."""
    from lambda_pool.testing.context import LambdaContext

    def make(remaining_ms: int = 3000, **attrs: Any) -> LambdaContext:
        return LambdaContext(remaining_ms=remaining_ms, **attrs)

    return make


@pytest.fixture(scope="session")
def pgbouncer(embedded_postgres: PostgresServer) -> Iterator[PgBouncer]:
    """A real PgBouncer (transaction mode) in front of the session's PostgreSQL.

    Skips when the binary is missing. Connect with ``prepare_threshold=None``.
    """
    from lambda_pool.testing.pgbouncer import PgBouncer, find_pgbouncer

    if find_pgbouncer() is None:
        pytest.skip("pgbouncer not installed: apt-get install pgbouncer")
    bouncer = PgBouncer(embedded_postgres)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


# --------------------------------------------------------------------------- invoking handlers
# (lambda_invoker: cold and warm in-process invocations, lambda_pool.testing.invoke)

if TYPE_CHECKING:
    from lambda_pool.testing.invoke import LambdaInvoker


@pytest.fixture
def lambda_invoker(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., LambdaInvoker]]:
    """Factory: ``lambda_invoker("app.py", env={...})`` -> a `LambdaInvoker`.

    ``invoker.cold(event)`` imports the handler afresh (a new container: engines disposed,
    warm cache empty), ``invoker.warm(event)`` calls it again; both return the handler's
    result or raise its exception.  A relative file path is resolved against pytest's
    rootdir.  At teardown every invoker forgets its module, disposes lambda-pool's
    engines (no connection outlives the test) and restores the environment.
    """
    from lambda_pool.testing.invoke import LambdaInvoker

    made: list[LambdaInvoker] = []

    def make(target: str, attribute: str = "handler", **kwargs: Any) -> LambdaInvoker:
        kwargs.setdefault("root", request.config.rootpath)
        invoker = LambdaInvoker(target, attribute, **kwargs)
        made.append(invoker)
        return invoker

    yield make
    # Newest first, so environment changes unwind in reverse order of application.
    for invoker in reversed(made):
        invoker.close()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Close every engine lambda-pool made while the session's output is still open.

    Otherwise the ``atexit`` shutdown hook does it after pytest has closed its captured
    streams, and any pool logging then fails noisily.  The engines are forgotten, so the
    hook has nothing left to do.
    """
    import sys

    lifecycle = sys.modules.get("lambda_pool.lifecycle")
    if lifecycle is None:
        return
    lifecycle.dispose_all()
    for engine in lifecycle.registered_engines():
        lifecycle.unregister(engine)
