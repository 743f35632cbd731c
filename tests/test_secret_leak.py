"""No password reaches a log record, a repr, an exception or the CLI's output, in any URL form.

Each test runs a whole flow against the real embedded PostgreSQL with the root,
psycopg, botocore, Powertools and lambda-pool loggers at DEBUG: build an engine,
connect, fail to connect with a wrong password, fail at Init through
``LAMBDA_POOL_DATABASE_URL``, run a ``with_connection`` handler with a Powertools
Logger, and ``lambda-pool doctor``.  Everything that could show a secret is collected
(formatted records with their tracebacks and extras, reprs, exception texts and
tracebacks, stdout and stderr) and searched for the password, raw and URL-encoded.
"""

from __future__ import annotations

import asyncio
import io
import logging
import secrets
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

from lambda_pool import cli, create_engine, doctor, with_connection
from lambda_pool.asyncio import create_async_engine
from lambda_pool.engine import Connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer

# Characters that need care in every form: URL delimiters, a quote, a space.
PASSWORD = "Qz7 leak@pw:/?#'" + secrets.token_hex(6)
WRONG = "Wr0ng leak@pw:/" + secrets.token_hex(6)
ROLE = "lp_leak_role"
LOGGERS = (
    "",
    "psycopg",
    "botocore",
    "aws_lambda_powertools",
    "lambda_pool",
    "asyncio",
    "sqlalchemy",
)


def _forms(secret: str) -> list[str]:
    """The ways a secret can be spelt in what we capture."""
    return [secret, quote(secret, safe=""), quote_plus(secret), secret.replace("'", "\\'")]


class Evidence:
    """Every text a user or an operator could see during the flow."""

    def __init__(self) -> None:
        self.texts: list[str] = []
        self.records: list[logging.LogRecord] = []

    def add(self, *items: object) -> None:
        for item in items:
            self.texts.append(item if isinstance(item, str) else repr(item))

    def add_error(self, error: BaseException) -> None:
        self.texts.append(str(error))
        self.texts.append(repr(error))
        self.texts.append("".join(traceback.format_exception(error)))

    def expect_error(self, action: Callable[[], object]) -> BaseException:
        try:
            action()
        except Exception as error:  # every kind counts: we only look at its text
            self.add_error(error)
            return error
        raise AssertionError("the action was expected to fail")

    def assert_no_secret(self) -> None:
        blob = "\n".join(self.texts)
        for secret in (PASSWORD, WRONG):
            for form in _forms(secret):
                assert form not in blob, f"a password leaked: ...{_around(blob, form)}..."
        # The distinctive middle of each password (its random tail) must not show either:
        # a malformed URL could show a password's tail as a host or port.
        for secret in (PASSWORD, WRONG):
            assert secret[-12:] not in blob


def _around(blob: str, needle: str) -> str:
    at = blob.find(needle)
    return blob[max(0, at - 80) : at].replace(needle, "<SECRET>")


class _Capture(logging.Handler):
    def __init__(self, evidence: Evidence) -> None:
        super().__init__(logging.DEBUG)
        self.evidence = evidence
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.evidence.records.append(record)
        # The formatted line (with any traceback), the raw args and every extra field.
        self.evidence.texts.append(self.format(record))
        self.evidence.texts.append(repr(record.args))
        self.evidence.texts.append(repr(record.__dict__))


def _logging_state() -> dict[str, tuple[list[logging.Handler], int]]:
    loggers = [logging.getLogger()] + [
        logger
        for logger in logging.Logger.manager.loggerDict.values()
        if isinstance(logger, logging.Logger)
    ]
    return {logger.name: (list(logger.handlers), logger.level) for logger in loggers}


def _restore_logging(before: dict[str, tuple[list[logging.Handler], int]]) -> None:
    """Undo what the flow did to logging: echo=True and Powertools add handlers bound
    to this test's captured stdout, which later tests must not write to."""
    for name, (handlers, _level) in _logging_state().items():
        logger = logging.getLogger(name) if name != "root" else logging.getLogger()
        kept, old_level = before.get(name, ([], logging.NOTSET))
        for handler in handlers:
            if handler not in kept:
                logger.removeHandler(handler)
        logger.setLevel(old_level)


@pytest.fixture
def evidence(capsys: pytest.CaptureFixture[str]) -> Iterator[Evidence]:
    found = Evidence()
    handler = _Capture(found)
    before = _logging_state()
    root = logging.getLogger()
    root.addHandler(handler)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield found
    finally:
        _restore_logging(before)
        out, err = capsys.readouterr()
        found.add(out, err)
    found.assert_no_secret()


@pytest.fixture
def role(embedded_postgres: PostgresServer) -> str:
    embedded_postgres.create_role(ROLE, PASSWORD)
    return ROLE


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _conninfo_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _url(form: str, pg: PostgresServer, password: str, closed_port: int) -> str:
    host = f"127.0.0.1:{pg.port}"
    if form == "userinfo":
        return f"postgresql://{ROLE}:{quote(password, safe='')}@{host}/{pg.dbname}"
    if form == "query":
        return f"postgresql://{ROLE}@{host}/{pg.dbname}?password={quote(password, safe='')}"
    if form == "conninfo":
        return (
            f"host=127.0.0.1 port={pg.port} dbname={pg.dbname} user={ROLE} "
            f"password={_conninfo_quote(password)}"
        )
    if form == "multihost":
        return (
            f"postgres://{ROLE}:{quote(password, safe='')}@127.0.0.1:{closed_port},{host}"
            f"/{pg.dbname}"
        )
    raise AssertionError(form)


FORMS = ("userinfo", "query", "conninfo", "multihost")


@pytest.mark.parametrize("form", FORMS)
def test_engine_connect_failed_connect_and_doctor_never_show_the_password(
    form: str,
    role: str,
    embedded_postgres: PostgresServer,
    closed_port: int,
    evidence: Evidence,
) -> None:
    good = _url(form, embedded_postgres, PASSWORD, closed_port)
    bad = _url(form, embedded_postgres, WRONG, closed_port)

    engine = create_engine(good, pool_size=1, echo=True, echo_pool="debug")
    evidence.add(engine, engine.url, str(engine.url), engine.pool)
    with engine.connect() as conn:
        evidence.add(conn, conn.execute("SELECT current_user").scalar())
    engine.dispose()

    failing = create_engine(bad)
    evidence.add(failing, failing.url)
    evidence.expect_error(failing.connect)
    failing.dispose()

    for url in (good, bad):
        report = doctor.run(url, timeout=5)
        out = io.StringIO()
        doctor.print_report(report, out)
        evidence.add(report, out.getvalue())
    assert cli.main(["doctor", good]) == 0
    assert cli.main(["doctor", bad]) == 1

    # The flow ran and was logged: this test would see a leak.
    names = {record.name.split(".")[0] for record in evidence.records}
    assert "lambda_pool" in names
    assert any("OK: this database" in text for text in evidence.texts)
    assert any("authentication" in text and "FAIL" in text for text in evidence.texts)


@pytest.mark.parametrize("form", FORMS)
def test_with_connection_and_powertools_at_debug_never_show_the_password(
    form: str,
    role: str,
    embedded_postgres: PostgresServer,
    closed_port: int,
    evidence: Evidence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from aws_lambda_powertools import Logger

    # Powertools writes its JSON lines to its own handler; this one keeps them.
    output = io.StringIO()
    logger = Logger(
        service=f"lp-leak-{form}", level="DEBUG", logger_handler=logging.StreamHandler(output)
    )
    for password, expected in ((PASSWORD, ROLE), (WRONG, None)):
        monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", _url(form, embedded_postgres, password, 1))
        monkeypatch.setenv("LAMBDA_POOL_WARM", "0")

        @with_connection(logger=logger)
        def handler(event: Any, context: Any, connection: Connection) -> Any:
            return connection.execute("SELECT current_user").scalar()

        if expected is None:
            evidence.expect_error(lambda: handler({}, LambdaContext(remaining_ms=10_000)))
        else:
            assert handler({}, LambdaContext(remaining_ms=10_000)) == expected
    evidence.add(output.getvalue())
    assert '"service":"lp-leak-' in output.getvalue().replace(" ", "")


@pytest.mark.parametrize(
    "url",
    [
        # An unescaped '@' in the password: its tail would read as the host.
        f"postgresql://{ROLE}:{PASSWORD}@127.0.0.1:5432/db",
        f"postgresql://{ROLE}:{quote(PASSWORD, safe='@')}@127.0.0.1:5432/db",
        # No host at all: the password reads as a port.
        f"postgresql://{ROLE}:{PASSWORD.replace(' ', '').split('@')[0]}{PASSWORD[-12:]}/db",
        # A port no int() should see.
        f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:\u00b2/db",
        f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:{'9' * 5000}/db",
        # Values the driver would refuse, next to a query password.
        f"postgresql://{ROLE}@h/db?password={quote(PASSWORD, safe='')}&sslmode=garbage",
        f"postgresql+asyncpg://{ROLE}@h/db?password={quote(PASSWORD, safe='')}&connect_timeout=x",
        f"postgresql://{ROLE}@h/db?password={quote(PASSWORD, safe='')}&options=-c%20a%3D%27b",
        # A key=value string with an unquoted space inside the password.
        f"host=h user={ROLE} password={PASSWORD.replace(chr(39), '')} dbname=db",
        f"host=h user={ROLE} password='{PASSWORD.replace(chr(39), '')}",
    ],
)
def test_init_errors_from_malformed_urls_never_show_the_password(
    url: str, evidence: Evidence, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lambda_pool.exc import ArgumentError

    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", url)
    error = evidence.expect_error(with_connection)
    assert isinstance(error, ArgumentError)
    assert "LAMBDA_POOL_DATABASE_URL" in str(error)
    evidence.expect_error(lambda: create_engine(url))
    from lambda_pool import sqlalchemy as adapter

    evidence.expect_error(lambda: adapter.create_engine(url))
    report = doctor.run(url)
    out = io.StringIO()
    doctor.print_report(report, out)
    evidence.add(report, out.getvalue())
    assert [check.step for check in report.checks] == ["url"]


@pytest.mark.parametrize("form", FORMS)
def test_sqlalchemy_adapter_never_shows_the_password(
    form: str,
    role: str,
    embedded_postgres: PostgresServer,
    closed_port: int,
    evidence: Evidence,
) -> None:
    from sqlalchemy import text

    from lambda_pool import sqlalchemy as adapter

    for password in (PASSWORD, WRONG):
        engine = adapter.create_engine(
            _url(form, embedded_postgres, password, closed_port), echo="debug"
        )
        evidence.add(engine, engine.url, str(engine.url), engine.pool)
        if password == PASSWORD:
            with engine.connect() as conn:
                evidence.add(conn, conn.execute(text("SELECT current_user")).scalar())
        else:
            evidence.expect_error(engine.connect)
        engine.dispose()
    assert any(record.name.startswith("sqlalchemy") for record in evidence.records)


def test_asyncpg_engine_and_failed_connect_never_show_the_password(
    role: str, embedded_postgres: PostgresServer, evidence: Evidence
) -> None:
    pg = embedded_postgres
    base = f"postgresql+asyncpg://{ROLE}@127.0.0.1:{pg.port}/{pg.dbname}?password="

    async def flow() -> None:
        engine = create_async_engine(base + quote(PASSWORD, safe=""))
        evidence.add(engine, engine.url)
        async with engine.connect() as conn:
            evidence.add(conn, (await conn.execute("SELECT current_user")).scalar())
        await engine.dispose()
        failing = create_async_engine(base + quote(WRONG, safe=""))
        evidence.add(failing)
        try:
            await failing.connect()
        except Exception as error:
            evidence.add_error(error)
        else:
            raise AssertionError("a wrong password connected")
        await failing.dispose()

    asyncio.run(flow())


def test_secrets_manager_flow_at_botocore_debug_never_shows_the_password(
    role: str,
    embedded_postgres: PostgresServer,
    evidence: Evidence,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import json

    import boto3
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters.base import DEFAULT_PROVIDERS
    from moto import mock_aws

    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": "/nonexistent/lp-leak/config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lp-leak/credentials",
    }.items():
        monkeypatch.setenv(name, value)
    pg = embedded_postgres
    parameters.clear_caches()
    DEFAULT_PROVIDERS.pop("secrets", None)
    try:
        with mock_aws():
            client = boto3.client("secretsmanager", region_name="us-east-1")
            # Storing the secret is the test's setup, not lambda-pool: botocore would log
            # the request body at DEBUG.
            sdk = logging.getLogger("botocore")
            sdk.setLevel(logging.WARNING)
            arn = client.create_secret(
                Name="lp-leak/db",
                SecretString=json.dumps({"username": ROLE, "password": PASSWORD}),
            )["ARN"]
            sdk.setLevel(logging.DEBUG)
            monkeypatch.setenv(
                "LAMBDA_POOL_DATABASE_URL", f"postgresql://127.0.0.1:{pg.port}/{pg.dbname}"
            )
            monkeypatch.setenv("LAMBDA_POOL_AUTH", "secret")
            monkeypatch.setenv("LAMBDA_POOL_SECRET_ARN", arn)
            monkeypatch.setenv("LAMBDA_POOL_WARM", "0")

            @with_connection()
            def handler(event: Any, context: Any, connection: Connection) -> Any:
                return connection.execute("SELECT current_user").scalar()

            assert handler({}, LambdaContext(remaining_ms=10_000)) == ROLE
            # The SDK was at DEBUG and spoke: the test would see a leak.
            assert any(r.name.startswith("botocore") for r in evidence.records)
    finally:
        parameters.clear_caches()
        DEFAULT_PROVIDERS.pop("secrets", None)


def test_connect_args_named_like_secrets_are_masked_wherever_shown() -> None:
    from lambda_pool.auth import Credentials, StaticCredentials

    args = {
        "sslpassword": PASSWORD,
        "passwd": PASSWORD,
        "api_token": PASSWORD,
        "secret": PASSWORD,
        "sslmode": "require",
    }
    credentials = Credentials("app", PASSWORD, None, args)
    provider = StaticCredentials("app", PASSWORD, connect_args=args)
    shown = repr(credentials) + str(credentials) + repr(provider) + repr(provider.get())
    for form in _forms(PASSWORD):
        assert form not in shown
    assert "'sslmode': 'require'" in shown
