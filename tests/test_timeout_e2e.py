"""A Lambda timeout in the real runtime leaves no query running on the server.

Lambda kills a timed-out environment with SIGKILL.  PostgreSQL notices a vanished
client only when it next talks to it, so a query in flight would run on, holding locks
and a connection slot, for as long as it takes.  ``@with_connection()`` bounds every
statement by the invocation's remaining time minus a margin, so the server cancels the
query before the deadline; these tests drive that through ``awslambdaric`` and look at
``pg_stat_activity`` afterwards.
"""

from __future__ import annotations

import os
import sys
import textwrap
import time
from pathlib import Path

import pytest

from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.testing.runtime import LocalLambda

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent

HANDLER = """
import time

from lambda_pool import exc, with_connection


@with_connection(statement_timeout=STATEMENT_TIMEOUT)
def handler(event, context, connection):
    try:
        connection.execute("SELECT pg_sleep(60)")
    except exc.StatementTimeoutError:
        if not event.get("overrun"):
            raise
    # A handler that swallows the error and keeps working runs into Lambda's timeout.
    time.sleep(60)
"""


def _active_queries(server: PostgresServer, app: str) -> list[str]:
    return [
        str(b["query"])
        for b in server.backends(app)
        if b["state"] == "active" and "pg_sleep" in str(b["query"])
    ]


def _function(tmp_path: Path, server: PostgresServer, app: str, timeout: str) -> LocalLambda:
    (tmp_path / "app.py").write_text(textwrap.dedent(HANDLER).replace("STATEMENT_TIMEOUT", timeout))
    url = server.dsn_for(server.user, server.password, application_name=app)
    return LocalLambda(
        "app.handler",
        tmp_path,
        env={
            "LAMBDA_POOL_DATABASE_URL": url,
            "LAMBDA_POOL_STATEMENT_TIMEOUT_MARGIN_MS": "500",
            "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]),
        },
        python=sys.executable,
        timeout_s=2.0,
    )


def _wait_until_no_query(server: PostgresServer, app: str, seconds: float = 5.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while (running := _active_queries(server, app)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return running


def test_a_query_longer_than_the_invocation_fails_with_statement_timeout_before_the_deadline(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    with _function(tmp_path, embedded_postgres, unique_application_name, '"deadline"') as fn:
        result = fn.invoke({})
        running = _active_queries(embedded_postgres, unique_application_name)

    assert not result.timed_out
    assert result.error_type == "StatementTimeoutError", fn.logs()
    assert "remaining time" in (result.error_message or "")
    assert running == []


def test_an_invocation_killed_at_its_deadline_leaves_no_running_query(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    with _function(tmp_path, embedded_postgres, unique_application_name, '"deadline"') as fn:
        result = fn.invoke({"overrun": True})
        running = _wait_until_no_query(embedded_postgres, unique_application_name)

    assert result.timed_out
    assert running == []


def test_without_the_server_bound_the_client_deadline_ends_the_invocation_and_cancels_the_query(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    """``statement_timeout=None`` removes the server-side bound only: the client still
    stops waiting by the invocation's deadline (lambda_pool.deadlines), sends a cancel
    so the query does not run on, and discards the connection."""
    with _function(tmp_path, embedded_postgres, unique_application_name, "None") as fn:
        result = fn.invoke({})
        running = _wait_until_no_query(embedded_postgres, unique_application_name)

    assert not result.timed_out
    assert result.error_type == "DeadlineExceededError", fn.logs()
    assert "the statement did not finish" in (result.error_message or "")
    assert running == []
