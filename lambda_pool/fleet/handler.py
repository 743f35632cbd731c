"""The fleet's default Lambda function: one short transaction per invocation.

Each invocation inserts one row naming the run, the container and the request, and
reads back how many rows its container has written, in one transaction that
``@with_connection()`` commits. The rows are the handlers' own record of what
succeeded: after a run, rows for the run id must equal the invocations reported ok.

The table is created by the coordinator before the containers start
(:data:`lambda_pool.fleet.schema.SCHEMA`), so
no invocation pays for DDL or races another over the catalog. Settings come from the
environment like any Lambda function (``LAMBDA_POOL_DATABASE_URL``, ``LAMBDA_POOL_WARM``,
``LAMBDA_POOL_TRANSACTION_POOLING``).
"""

from __future__ import annotations

from typing import Any

from lambda_pool import event, with_connection
from lambda_pool.fleet.schema import TABLE

__all__ = ["connects_total", "handler"]

_connects = 0


def connects_total() -> int:
    """How many database connections this container has opened so far."""
    return _connects


@with_connection()
def handler(event_: dict[str, Any], context: Any, connection: Any) -> dict[str, Any]:
    """Record this invocation; answer with the backend that served it and the row count."""
    backend_pid = connection.execute(
        f"INSERT INTO {TABLE} (run_id, container, request_id, backend_pid) "
        "VALUES (%s, %s, %s, pg_backend_pid()) RETURNING backend_pid",
        (str(event_.get("run", "")), int(event_.get("container", -1)), context.aws_request_id),
    ).scalar()
    rows = connection.execute(
        f"SELECT count(*) FROM {TABLE} WHERE run_id = %s AND container = %s",
        (str(event_.get("run", "")), int(event_.get("container", -1))),
    ).scalar()
    return {"backend_pid": backend_pid, "rows": rows, "connects_total": _connects}


def _count_connect(dbapi_connection: Any, connection_record: Any) -> None:
    global _connects
    _connects += 1


# Counted here, not by the coordinator, so the count also reaches it through the real
# runtime (``--runtime ric``), where the process is awslambdaric's.
event.listen(handler.engine, "connect", _count_connect)  # type: ignore[attr-defined]
