"""The pytest plugin (entry point ``pytest11: lambda_pool``): fixtures for a real PostgreSQL,
PgBouncer, moto-backed AWS, Lambda contexts and fault injection.

The plugin is active in every project that installs the ``testing`` extra, so every
fixture is named ``lp_*``: a project's own ``aws`` or ``postgresql`` fixture (as moto's
and pytest-postgresql's documentation write them) never collides with ours, and our
fixtures depend only on each other, never on a name a project can override.

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
    from lambda_pool.testing.faults import FaultProxy
    from lambda_pool.testing.pgbouncer import PgBouncer
    from lambda_pool.testing.postgres import PostgresServer

AWS_REGION = "us-east-1"

_TLS_CHOICES = ("auto", "on", "off")


def pytest_addoption(parser: pytest.Parser) -> None:
    """``--lp-postgres-*`` options (and ini keys of the same names with ``_``) that choose
    the session's server; the ``LAMBDA_POOL_TEST_DSN`` / ``LAMBDA_POOL_PG_BINDIR``
    environment variables still work and the command line wins over both."""
    group = parser.getgroup("lambda-pool", "lambda-pool's PostgreSQL for tests")
    group.addoption(
        "--lp-postgres-dsn",
        default=None,
        help="use this existing server instead of starting one (as LAMBDA_POOL_TEST_DSN)",
    )
    group.addoption(
        "--lp-postgres-bindir",
        default=None,
        help="PostgreSQL binaries to start the throw-away server with (as LAMBDA_POOL_PG_BINDIR)",
    )
    group.addoption(
        "--lp-postgres-tls",
        default=None,
        choices=_TLS_CHOICES,
        help="TLS on the throw-away server: on (fail without a TLS build), off, auto (default)",
    )
    parser.addini("lp_postgres_dsn", "default for --lp-postgres-dsn", default=None)
    parser.addini("lp_postgres_bindir", "default for --lp-postgres-bindir", default=None)
    parser.addini("lp_postgres_tls", "default for --lp-postgres-tls (auto|on|off)", default=None)


def _option(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(f"--{name.replace('_', '-')}", default=None)
    if value is None:
        value = config.getini(name) or None
    return None if value is None else str(value)


def _server_from_options(config: pytest.Config) -> PostgresServer:
    import os

    from lambda_pool.testing.postgres import (
        ENV_BINDIR,
        EmbeddedPostgres,
        ExternalPostgres,
        from_env,
    )

    dsn = _option(config, "lp_postgres_dsn")
    if dsn:
        return ExternalPostgres(dsn)
    tls = _option(config, "lp_postgres_tls") or "auto"
    if tls not in _TLS_CHOICES:
        raise pytest.UsageError(f"lp_postgres_tls = {tls!r}: use one of {', '.join(_TLS_CHOICES)}")
    bindir = _option(config, "lp_postgres_bindir")
    if bindir:
        # The server reads the binaries' place from the environment; set it for this
        # session only (the variable is restored when the fixture ends).
        os.environ[ENV_BINDIR] = bindir
    ssl = {"on": True, "off": False}.get(tls)
    return from_env() if ssl is None else EmbeddedPostgres(ssl=ssl)


@pytest.fixture(scope="session")
def lp_postgres(pytestconfig: pytest.Config) -> Iterator[PostgresServer]:
    """The session's PostgreSQL: the server of ``--lp-postgres-dsn`` /
    ``LAMBDA_POOL_TEST_DSN``, or a throw-away one started on first use and stopped at the
    end of the session (and at interpreter exit)."""
    import os

    from lambda_pool.testing.postgres import ENV_BINDIR

    saved_bindir = os.environ.get(ENV_BINDIR)
    server = _server_from_options(pytestconfig)
    try:
        server.start()
        try:
            yield server
        finally:
            server.stop()
    finally:
        if saved_bindir is None:
            os.environ.pop(ENV_BINDIR, None)
        else:
            os.environ[ENV_BINDIR] = saved_bindir


@pytest.fixture
def lp_postgres_url(lp_postgres: PostgresServer) -> str:
    """The application URL ``postgresql://lambda_pool:PW@127.0.0.1:PORT/lambda_pool_test``."""
    return lp_postgres.dsn


@pytest.fixture
def lp_database(lp_postgres: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database for this test, owned by the application user; yields its
    URL. Dropped at teardown, ending any session still connected to it."""
    from psycopg import sql

    stem = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:30]
    name = f"lpt_{stem}_{uuid.uuid4().hex[:10]}"
    with lp_postgres.admin_connect() as admin:
        admin.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(name), sql.Identifier(lp_postgres.user)
            )
        )
    try:
        yield lp_postgres.dsn_for(lp_postgres.user, lp_postgres.password, dbname=name)
    finally:
        with lp_postgres.admin_connect() as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def lp_application_name(request: pytest.FixtureRequest) -> str:
    """A fresh ``application_name`` (under PostgreSQL's 63 bytes) to count a test's backends."""
    stem = re.sub(r"[^A-Za-z0-9_]+", "_", request.node.name)[:40]
    return f"lpt_{stem}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def lp_aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
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
def lp_db_secret(lp_aws: str, lp_postgres: PostgresServer) -> str:
    """A moto Secrets Manager secret with the app credentials; yields its ARN.

    The value is the JSON RDS writes: ``{"username", "password", "host", "port", "dbname",
    "engine": "postgres"}``. Use the ARN (or its name) as ``SecretId``.
    """
    import boto3

    client = boto3.client("secretsmanager", region_name=lp_aws)
    value = {
        "username": lp_postgres.user,
        "password": lp_postgres.password,
        "host": lp_postgres.host,
        "port": lp_postgres.port,
        "dbname": lp_postgres.dbname,
        "engine": "postgres",
    }
    created = client.create_secret(
        Name=f"lambda-pool/test/db-{uuid.uuid4().hex[:8]}", SecretString=json.dumps(value)
    )
    return str(created["ARN"])


@pytest.fixture
def lp_lambda_context() -> Callable[..., LambdaContext]:
    """Factory: ``lp_lambda_context(remaining_ms=3000, **attrs)`` -> a fresh `LambdaContext`
    (new ``aws_request_id`` per call) whose remaining time counts down from creation."""
    from lambda_pool.testing.context import LambdaContext

    def make(remaining_ms: int = 3000, **attrs: Any) -> LambdaContext:
        return LambdaContext(remaining_ms=remaining_ms, **attrs)

    return make


@pytest.fixture(scope="session")
def lp_pgbouncer(lp_postgres: PostgresServer) -> Iterator[PgBouncer]:
    """A real PgBouncer (transaction mode) in front of the session's PostgreSQL.

    Skips when the binary is missing. Connect with ``prepare_threshold=None``.
    """
    from lambda_pool.testing.pgbouncer import PgBouncer, find_pgbouncer

    if find_pgbouncer() is None:
        pytest.skip("pgbouncer not installed: apt-get install pgbouncer")
    bouncer = PgBouncer(lp_postgres)
    bouncer.start()
    try:
        yield bouncer
    finally:
        bouncer.stop()


@pytest.fixture
def lp_fault_proxy(lp_postgres: PostgresServer) -> Iterator[FaultProxy]:
    """A started fault-injecting TCP proxy (`lambda_pool.testing.faults.FaultProxy`) on
    127.0.0.1 in front of the session's PostgreSQL, in pass-through mode.

    ``lp_fault_proxy.url_for(postgres_url)`` routes a DSN through it; switch faults with
    ``black_hole()``, ``latency(ms)``, ``reset()``, ``half_close()``,
    ``black_hole_mid_reply(n)`` and ``pass_through()``.  Closed (every flow ended, every
    thread joined) at the end of the test.
    """
    from lambda_pool.testing.faults import FaultProxy

    with FaultProxy(lp_postgres.host, lp_postgres.port) as proxy:
        yield proxy


# --------------------------------------------------------------------------- invoking handlers
# (lp_lambda_invoker: cold and warm in-process invocations, lambda_pool.testing.invoke)

if TYPE_CHECKING:
    from lambda_pool.testing.invoke import LambdaInvoker


@pytest.fixture
def lp_lambda_invoker(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., LambdaInvoker]]:
    """Factory: ``lp_lambda_invoker("app.py", env={...})`` -> a `LambdaInvoker`.

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
