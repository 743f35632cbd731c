"""Pool activity as Powertools logs, EMF metrics and X-Ray subsegments, under real decorators.

Powertools runs for real: Logger writes JSON to a StringIO, Metrics prints EMF JSON to
stdout on flush, Tracer runs with ``POWERTOOLS_TRACE_DISABLED=1`` (no X-Ray daemon here)
and its provider's ``in_subsegment`` is wrapped to record which subsegments are opened,
and inside which.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from lambda_pool import instrument, with_connection
from lambda_pool.auth import StaticCredentials
from lambda_pool.config import Settings
from lambda_pool.engine import Connection
from lambda_pool.observability import CONNECT_SUBSEGMENT, instrumentation_for
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.warm import warm_engine

pytest.importorskip("aws_lambda_powertools")

from aws_lambda_powertools import Logger, Metrics, Tracer

MakeContext = Callable[..., LambdaContext]


@dataclass
class Powertools:
    logger: Logger
    metrics: Metrics
    tracer: Tracer
    log_stream: io.StringIO
    subsegments: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)

    def log_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_stream.getvalue().splitlines() if line]

    def pool_events(self) -> list[dict[str, Any]]:
        return [line for line in self.log_lines() if "lambda_pool_event" in line]


def emf_blobs(stdout: str) -> list[dict[str, Any]]:
    blobs = []
    for line in stdout.splitlines():
        if line.startswith("{") and '"_aws"' in line:
            blobs.append(json.loads(line))
    return blobs


def metric_names(blob: dict[str, Any]) -> set[str]:
    return {
        metric["Name"]
        for directive in blob["_aws"]["CloudWatchMetrics"]
        for metric in directive["Metrics"]
    }


@pytest.fixture
def powertools(monkeypatch: pytest.MonkeyPatch) -> Iterator[Powertools]:
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "1")
    monkeypatch.delenv("POWERTOOLS_DEV", raising=False)
    service = f"lp-{uuid.uuid4().hex[:8]}"
    stream = io.StringIO()
    logger = Logger(service=service, stream=stream, level="DEBUG")
    metrics = Metrics(namespace="LambdaPoolTest", service=service)
    metrics.clear_metrics()
    tracer = Tracer(service=service)
    tools = Powertools(logger, metrics, tracer, stream)

    original = tracer.provider.in_subsegment
    stack: list[str] = []

    @contextlib.contextmanager
    def recording_in_subsegment(name: str | None = None, **kwargs: Any) -> Iterator[Any]:
        tools.subsegments.append((str(name), tuple(stack)))
        stack.append(str(name))
        try:
            with original(name=name, **kwargs) as subsegment:
                yield subsegment
        finally:
            stack.pop()

    monkeypatch.setattr(tracer.provider, "in_subsegment", recording_in_subsegment)
    yield tools
    metrics.clear_metrics()


@pytest.fixture
def app_url(
    embedded_postgres: PostgresServer, unique_application_name: str, monkeypatch: pytest.MonkeyPatch
) -> str:
    url = embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    )
    monkeypatch.delenv("LAMBDA_POOL_AUTH", raising=False)
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", url)
    return url


def pid_of(connection: Connection) -> int:
    return int(connection.execute("SELECT pg_backend_pid()").scalar())


def test_recommended_order_emits_metrics_logs_and_connect_subsegment(
    app_url: str,
    powertools: Powertools,
    lambda_context: MakeContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger, metrics, tracer = powertools.logger, powertools.metrics, powertools.tracer

    @metrics.log_metrics
    @tracer.capture_lambda_handler
    @logger.inject_lambda_context
    @with_connection(logger=logger, metrics=metrics, tracer=tracer)
    def handler(event: Any, context: Any, connection: Connection) -> int:
        return pid_of(connection)

    cold = lambda_context()
    first = handler({}, cold)
    cold_out = capsys.readouterr().out
    warm_pid = handler({}, lambda_context())
    warm_out = capsys.readouterr().out
    assert warm_pid == first

    (cold_blob,) = emf_blobs(cold_out)
    assert {"ConnectionsOpened", "ConnectMs", "CheckoutWaitMs"} <= metric_names(cold_blob)
    assert "ConnectionsReused" not in metric_names(cold_blob)
    assert cold_blob["ConnectionsOpened"] in (1.0, [1.0])  # one connection opened
    (warm_blob,) = emf_blobs(warm_out)
    assert {"ConnectionsReused", "CheckoutWaitMs"} <= metric_names(warm_blob)
    assert "ConnectionsOpened" not in metric_names(warm_blob)

    events = powertools.pool_events()
    opened = [line for line in events if line["lambda_pool_event"] == "connection_opened"]
    assert len(opened) == 1
    assert opened[0]["backend_pid"] == first
    assert opened[0]["pool"] == "WarmPool"
    assert opened[0]["connect_ms"] > 0
    # Innermost decorator: the line carries inject_lambda_context's keys.
    assert opened[0]["function_request_id"] == cold.aws_request_id
    kinds = [line["lambda_pool_event"] for line in events]
    assert kinds.count("connection_checkout") == 2
    assert "connection_reused" in kinds
    assert all(
        "wait_ms" in line for line in events if line["lambda_pool_event"] == "connection_checkout"
    )

    connects = [parents for name, parents in powertools.subsegments if name == CONNECT_SUBSEGMENT]
    assert connects == [("## handler",)]  # once (cold start), inside the handler's subsegment


def test_outermost_order_still_passes_connection_and_reports(
    app_url: str,
    powertools: Powertools,
    lambda_context: MakeContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    logger, metrics, tracer = powertools.logger, powertools.metrics, powertools.tracer

    @with_connection(logger=logger, metrics=metrics, tracer=tracer)
    @logger.inject_lambda_context
    @tracer.capture_lambda_handler
    @metrics.log_metrics
    def handler(event: Any, context: Any, connection: Connection) -> int:
        return pid_of(connection)

    first = handler({}, lambda_context())
    cold_out = capsys.readouterr().out
    assert handler({}, lambda_context()) == first
    warm_out = capsys.readouterr().out

    (cold_blob,) = emf_blobs(cold_out)
    assert {"ConnectionsOpened", "ConnectMs", "CheckoutWaitMs"} <= metric_names(cold_blob)
    (warm_blob,) = emf_blobs(warm_out)
    assert {"ConnectionsReused", "CheckoutWaitMs"} <= metric_names(warm_blob)
    events = powertools.pool_events()
    assert [
        line["backend_pid"] for line in events if line["lambda_pool_event"] == "connection_opened"
    ] == [first]
    # Checked out before the handler's subsegment opens: a top-level connect subsegment.
    assert [p for n, p in powertools.subsegments if n == CONNECT_SUBSEGMENT] == [()]
    assert ("## handler", ()) in powertools.subsegments


def test_replaced_warm_connection_is_reported_with_its_reason(
    app_url: str,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    powertools: Powertools,
    lambda_context: MakeContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    metrics = powertools.metrics

    @metrics.log_metrics
    @with_connection(logger=powertools.logger, metrics=metrics)
    def handler(event: Any, context: Any, connection: Connection) -> int:
        return pid_of(connection)

    first = handler({}, lambda_context())
    embedded_postgres.terminate(unique_application_name)
    capsys.readouterr()
    second = handler({}, lambda_context())
    (blob,) = emf_blobs(capsys.readouterr().out)

    assert second != first
    assert {"ConnectionsRecycled", "PrePingFailures", "ConnectionsOpened"} <= metric_names(blob)
    recycled = [
        line
        for line in powertools.pool_events()
        if line["lambda_pool_event"] == "connection_recycled"
    ]
    assert [line["reason"] for line in recycled] == ["pre_ping_failed"]


def test_statement_timeout_is_counted_and_logged(
    app_url: str,
    powertools: Powertools,
    lambda_context: MakeContext,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lambda_pool.exc import StatementTimeoutError

    metrics = powertools.metrics

    @metrics.log_metrics
    @with_connection(logger=powertools.logger, metrics=metrics, timeout_margin_ms=500)
    def handler(event: Any, context: Any, connection: Connection) -> None:
        connection.execute("SELECT pg_sleep(3)")

    with pytest.raises(StatementTimeoutError):
        handler({}, lambda_context(remaining_ms=1000))
    (blob,) = emf_blobs(capsys.readouterr().out)
    assert "StatementTimeouts" in metric_names(blob)
    (line,) = [
        line
        for line in powertools.pool_events()
        if line["lambda_pool_event"] == "statement_timeout"
    ]
    assert line["margin_ms"] == 500 and 0 < line["timeout_ms"] <= 500


def test_instrument_twice_reports_each_event_once(
    embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    std_logger = logging.getLogger(f"lambda_pool.test.{uuid.uuid4().hex}")
    std_logger.setLevel(logging.DEBUG)
    std_logger.addHandler(Collect())
    engine = warm_engine(
        embedded_postgres.dsn_for(
            embedded_postgres.user,
            embedded_postgres.password,
            application_name=unique_application_name,
        )
    )
    first = instrument(engine, logger=std_logger)
    assert instrument(engine, logger=std_logger) is first
    with engine.connect() as connection:
        connection.execute("SELECT 1")

    opened = [r for r in records if getattr(r, "lambda_pool_event", None) == "connection_opened"]
    assert len(opened) == 1
    assert isinstance(getattr(opened[0], "backend_pid", None), int)

    first.close()
    assert instrumentation_for(engine) is None
    records.clear()
    engine.dispose()
    with engine.connect() as connection:
        connection.execute("SELECT 1")
    assert [r for r in records if hasattr(r, "lambda_pool_event")] == []


def test_no_password_appears_in_logs_metrics_or_reprs(
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    powertools: Powertools,
    lambda_context: MakeContext,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    password = embedded_postgres.password
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, password, application_name=unique_application_name
    )
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", url)
    monkeypatch.delenv("LAMBDA_POOL_AUTH", raising=False)
    logger, metrics, tracer = powertools.logger, powertools.metrics, powertools.tracer

    @metrics.log_metrics
    @tracer.capture_lambda_handler
    @logger.inject_lambda_context(log_event=True)
    @with_connection(logger=logger, metrics=metrics, tracer=tracer)
    def handler(event: Any, context: Any, connection: Connection) -> str:
        logger.info("handler ran", extra={"connection": repr(connection)})
        return repr(connection)

    provider = StaticCredentials(embedded_postgres.user, password)

    @metrics.log_metrics
    @with_connection(
        f"postgresql://{embedded_postgres.host}:{embedded_postgres.port}/"
        f"{embedded_postgres.dbname}?application_name={unique_application_name}",
        credentials=provider,
        logger=logger,
        metrics=metrics,
    )
    def with_provider(event: Any, context: Any, connection: Connection) -> str:
        return repr(connection)

    shown = [handler({}, lambda_context()), handler({}, lambda_context())]
    shown.append(with_provider({}, lambda_context()))
    engine = handler.engine  # type: ignore[attr-defined]
    shown += [
        repr(engine),
        str(engine.url),
        repr(engine.pool),
        repr(instrumentation_for(engine)),
        repr(Settings.from_env()),
        repr(provider),
    ]
    captured = capsys.readouterr()
    everything = "\n".join([*shown, captured.out, captured.err, powertools.log_stream.getvalue()])

    assert powertools.pool_events()  # something was logged, so the check below means something
    assert emf_blobs(captured.out)
    assert password not in everything


def test_importing_the_package_and_handler_loads_no_heavy_library() -> None:
    code = (
        "import sys, lambda_pool, lambda_pool.handler, lambda_pool.observability, "
        "lambda_pool.config\n"
        "heavy = {'aws_lambda_powertools', 'boto3', 'botocore', 'sqlalchemy', 'psycopg', "
        "'asyncpg', 'aws_xray_sdk'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
