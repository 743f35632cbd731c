"""lambda-pool sample: Powertools Logger, Metrics and Tracer around ``@with_connection``.

The decorators apply bottom-up, so ``@with_connection`` is the innermost: its checkout,
commit or rollback run inside the traced segment, inside the logger's Lambda context,
and the metrics it records exist before ``@metrics.log_metrics`` flushes them (one EMF
JSON document on stdout per invocation, which CloudWatch turns into metrics).

Credentials: with ``LAMBDA_POOL_AUTH=secret`` the user and password come from the
Secrets Manager secret ``LAMBDA_POOL_SECRET_ARN``, read through Powertools Parameters
(``parameters.get_secret(..., transform="json")``; lambda-pool's
``SecretsManagerCredentials(..., reader="powertools")`` calls it), so it costs one API call
per ``POWERTOOLS_PARAMETERS_MAX_AGE`` seconds (Powertools' default: 300) and is read again
bypassing the cache once when the database rejects the password (rotation).
With ``LAMBDA_POOL_AUTH=iam`` the decorator signs RDS IAM tokens instead.

Environment (template.yaml sets it): ``POWERTOOLS_SERVICE_NAME``,
``POWERTOOLS_METRICS_NAMESPACE``, ``LAMBDA_POOL_DATABASE_URL``, ``LAMBDA_POOL_AUTH``,
``LAMBDA_POOL_SECRET_ARN``, optionally ``POWERTOOLS_PARAMETERS_MAX_AGE``.  Locally,
``POWERTOOLS_TRACE_DISABLED=true`` keeps the tracer from looking for an X-Ray daemon.
"""

from __future__ import annotations

import os
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import MetricUnit

from lambda_pool import with_connection
from lambda_pool.auth import SecretsManagerCredentials

SOURCE = "powertools"

logger = Logger()  # service name: POWERTOOLS_SERVICE_NAME
metrics = Metrics()  # namespace: POWERTOOLS_METRICS_NAMESPACE
tracer = Tracer()


def _credentials() -> SecretsManagerCredentials | None:
    """The secret's credentials in ``secret`` mode; ``None`` lets the decorator decide.

    Built once per container (module scope), so the cache lives across invocations.
    """
    if os.environ.get("LAMBDA_POOL_AUTH", "").lower() != "secret":
        return None
    # No max_age: Powertools' own resolution applies (POWERTOOLS_PARAMETERS_MAX_AGE, else
    # 300 s). A long cache is safe: the password changes only on rotation, and a rotation
    # is caught by the re-read after the authentication failure.
    return SecretsManagerCredentials(os.environ["LAMBDA_POOL_SECRET_ARN"], reader="powertools")


_schema_ready = False


def _ensure_schema(connection: Any) -> None:
    """Create the shared ``visits`` table once per container, committed on its own."""
    global _schema_ready
    if _schema_ready:
        return
    import psycopg

    try:
        connection.execute(
            """
            CREATE TABLE IF NOT EXISTS visits (
                id bigserial PRIMARY KEY,
                source text NOT NULL,
                request_id text NOT NULL,
                visited_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        connection.commit()
    except (psycopg.errors.UniqueViolation, psycopg.errors.DuplicateTable):
        connection.rollback()  # a concurrent cold start created it first
    _schema_ready = True


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
@with_connection(logger=logger, metrics=metrics, tracer=tracer, credentials=_credentials())
def handler(event: dict[str, Any], context: Any, connection: Any) -> dict[str, Any]:
    """Record one visit; ``{"fail": true}`` raises after the INSERT to show the rollback."""
    _ensure_schema(connection)
    with tracer.provider.in_subsegment("## record_visit"):
        connection.execute(
            "INSERT INTO visits (source, request_id) VALUES (%s, %s)",
            (SOURCE, context.aws_request_id),
        )
    if event.get("fail"):
        logger.warning("failing on request", extra={"event": event})
        raise ValueError("the event asked this invocation to fail")
    visits = connection.execute("SELECT count(*) FROM visits WHERE source = %s", (SOURCE,)).scalar()
    backend_pid = connection.execute("SELECT pg_backend_pid()").scalar()
    metrics.add_metric(name="VisitRecorded", unit=MetricUnit.Count, value=1)
    logger.info("visit recorded", extra={"visits": visits, "backend_pid": backend_pid})
    return {"visits": visits, "backend_pid": backend_pid}
