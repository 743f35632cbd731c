"""``@with_connection()`` in the real awslambdaric runtime: Init, warm reuse, deadline, SIGTERM."""

from __future__ import annotations

import signal
import textwrap
from pathlib import Path

import pytest

from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.testing.runtime import LocalLambda

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")

pytestmark = pytest.mark.e2e

APP = textwrap.dedent(
    """
    from lambda_pool import with_connection

    @with_connection()
    def handler(event, context, connection):
        if event.get("sleep"):
            connection.execute("SELECT pg_sleep(%s)", (event["sleep"],))
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
        return {"pid": row[0]}
    """
)


def test_in_the_runtime_warm_reuse_deadline_error_and_sigterm_at_shutdown(
    tmp_path: Path, embedded_postgres: PostgresServer, unique_application_name: str
) -> None:
    (tmp_path / "app.py").write_text(APP)
    url = embedded_postgres.dsn_for(
        embedded_postgres.user,
        embedded_postgres.password,
        application_name=unique_application_name,
    )
    env = {"LAMBDA_POOL_DATABASE_URL": url, "LAMBDA_POOL_REGISTER_EXTENSION": "1"}
    with LocalLambda("app.handler", tmp_path, env=env, timeout_s=3.0) as fn:
        fn.start()
        assert fn.extensions_registered == 1  # registered during Init by the decorator

        pids = {fn.invoke({}).payload["pid"] for _ in range(5)}
        assert len(pids) == 1
        assert embedded_postgres.backend_count(unique_application_name) == 1

        # 3 s function timeout, 500 ms margin: PostgreSQL stops the query first, the
        # runtime reports our error and the environment lives on.
        slow = fn.invoke({"sleep": 10})
        assert slow.error_type == "StatementTimeoutError", slow
        assert not slow.timed_out
        assert fn.invoke({}).payload["pid"] in pids

        status = fn.shutdown(grace=0.5)

    # The extension made Lambda send SIGTERM (without it: SIGKILL, status -9); the
    # shutdown hook disposed the engine and re-raised SIGTERM as before it was installed.
    assert status == -signal.SIGTERM
    assert embedded_postgres.wait_for_backend_count(0, unique_application_name) == 0
