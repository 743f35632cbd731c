"""lambda-pool sample: plain psycopg 3 through ``@with_connection()``.

Every invocation records a visit and answers with the number of visits, the PostgreSQL
backend that served it and what the warm cache did with the connection.  Configuration
comes from the environment (template.yaml sets it):

* ``LAMBDA_POOL_DATABASE_URL`` — ``postgresql://user@host:5432/db?sslmode=require``
* ``LAMBDA_POOL_AUTH`` — ``static`` (password in the URL), ``iam`` or ``secret``
  (with ``LAMBDA_POOL_SECRET_ARN``)

The event ``{"fail": true}`` raises ``ValueError`` after the INSERT: the decorator rolls
the transaction back, so the visit is not counted, and the connection stays warm for
the next invocation.
"""

from __future__ import annotations

from typing import Any

import psycopg

from lambda_pool import with_connection

SOURCE = "psycopg"

# Module scope lives as long as the execution environment: the table is created once per
# container, not per invocation.
_schema_ready = False
# The warm pool's counters after the previous invocation: the difference tells what
# happened at this invocation's checkout (opened, reused, pre-pinged, replaced).
_previous_stats: tuple[object, dict[str, Any]] | None = None


def _ensure_schema(connection: Any) -> None:
    """Create the table on first use, in its own committed transaction.

    Committed at once: if the invocation then fails, its rollback must not take the
    table away while ``_schema_ready`` already says it exists.
    """
    global _schema_ready
    if _schema_ready:
        return
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
        # Two cold starts racing: IF NOT EXISTS is not atomic in PostgreSQL, the loser
        # fails on the catalog's unique index.  The table exists either way.
        connection.rollback()
    _schema_ready = True


def _checkout_summary(connection: Any) -> dict[str, Any]:
    """What the warm cache did for this invocation, from ``engine.pool.stats``.

    Without a warm pool (``warm=False``: NullPool) every invocation opens a connection.
    """
    global _previous_stats
    stats = getattr(connection.engine.pool, "stats", None)
    if stats is None:
        return {"opened": True, "reused": False, "pre_ping": False, "replaced": None}
    now = stats.as_dict()
    # A different stats object means a new engine (a new container in tests): start over.
    before: dict[str, Any] = (
        _previous_stats[1]
        if _previous_stats is not None and _previous_stats[0] is stats
        else {"opened": 0, "reused": 0, "pre_pings": 0, "replaced": {}}
    )
    _previous_stats = (stats, now)
    replaced = [
        reason
        for reason, count in now["replaced"].items()
        if count > before["replaced"].get(reason, 0)
    ]
    return {
        "opened": now["opened"] > before["opened"],
        "reused": now["reused"] > before["reused"],
        "pre_ping": now["pre_pings"] > before["pre_pings"],
        "replaced": replaced[0] if replaced else None,
    }


# LAMBDA_POOL_WARM=0 (read by with_connection) switches to a NullPool engine, a
# connection per invocation: ``lambda-pool demo`` shows this same handler both ways.
@with_connection()
def handler(event: dict[str, Any], context: Any, connection: Any) -> dict[str, Any]:
    """Record one visit; committed when this returns, rolled back when it raises."""
    summary = _checkout_summary(connection)
    _ensure_schema(connection)
    connection.execute(
        "INSERT INTO visits (source, request_id) VALUES (%s, %s)",
        (SOURCE, context.aws_request_id),
    )
    if event.get("fail"):
        # After the INSERT on purpose: the rollback is what makes it disappear.
        raise ValueError("the event asked this invocation to fail")
    visits = connection.execute("SELECT count(*) FROM visits WHERE source = %s", (SOURCE,)).scalar()
    backend_pid = connection.execute("SELECT pg_backend_pid()").scalar()
    return {
        "visits": visits,
        "backend_pid": backend_pid,
        "reused": summary["reused"],
        "connection": summary,
    }
