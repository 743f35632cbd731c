"""lambda-pool sample: an ``async def`` handler through ``@with_connection()``.

Every invocation records a visit and answers with the number of visits, the PostgreSQL
backend that served it and whether the warm connection was reused.  Configuration comes
from the environment (template.yaml sets it), as for the blocking samples:

* ``LAMBDA_POOL_DATABASE_URL`` — ``postgresql://user@host:5432/db?sslmode=require``
  (psycopg's ``AsyncConnection``; ``postgresql+asyncpg://`` runs the same code on
  asyncpg)
* ``LAMBDA_POOL_AUTH`` — ``static`` (password in the URL), ``iam`` or ``secret``
  (with ``LAMBDA_POOL_SECRET_ARN``)

The decorator does what an async handler needs on Lambda: it runs the coroutine on one
event loop kept for the environment's life (not ``asyncio.run()`` per invocation, which
would make a new loop each time and lose the warm connection bound to the old one), and
passes an ``AsyncConnection`` from the warm-container cache.  It bounds statements by the
invocation's remaining time, commits when the handler returns and rolls back when it
raises: ``{"fail": true}`` raises ``ValueError`` after the INSERT, the visit is not
counted, and the connection stays warm for the next invocation.
"""

from __future__ import annotations

from typing import Any

from lambda_pool import with_connection
from lambda_pool.asyncio import AsyncConnection

SOURCE = "async"

# Module scope lives as long as the execution environment: the table is created once per
# container, not per invocation.
_schema_ready = False
# The warm pool's "opened" counter after the previous invocation: unchanged at this
# invocation's checkout means the pooled connection was reused.
_opened_seen: tuple[object, int] | None = None


async def _ensure_schema(connection: AsyncConnection) -> None:
    """Create the table on first use, in its own committed transaction (so a failing
    invocation's rollback cannot take it away while ``_schema_ready`` says it exists)."""
    global _schema_ready
    if _schema_ready:
        return
    try:
        await connection.execute(
            """
            CREATE TABLE IF NOT EXISTS visits (
                id bigserial PRIMARY KEY,
                source text NOT NULL,
                request_id text NOT NULL,
                visited_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        await connection.commit()
    except Exception as exc:
        # Two cold starts racing: IF NOT EXISTS is not atomic, the loser fails with
        # unique_violation (23505) or duplicate_table (42P07); the table exists either
        # way.  ``sqlstate`` is set by both psycopg and asyncpg.
        if getattr(exc, "sqlstate", None) not in ("23505", "42P07"):
            raise
        await connection.rollback()
    _schema_ready = True


def _reused(connection: AsyncConnection) -> bool:
    """Whether this invocation's checkout reused the warm connection (from
    ``engine.pool.stats``; a NullPool engine, ``LAMBDA_POOL_WARM=0``, never reuses)."""
    global _opened_seen
    stats = getattr(connection.engine.pool, "stats", None)
    if stats is None:
        return False
    before, _opened_seen = _opened_seen, (stats, stats.opened)
    # A different stats object means a new engine (a new container in tests).
    return before is not None and before[0] is stats and before[1] == stats.opened


@with_connection(pool_recycle=3600)  # bounds how old a session gets
async def handler(
    event: dict[str, Any], context: Any, connection: AsyncConnection
) -> dict[str, Any]:
    """Record one visit; committed when this returns, rolled back when it raises."""
    reused = _reused(connection)
    await _ensure_schema(connection)
    await connection.execute(
        "INSERT INTO visits (source, request_id) VALUES (%s, %s)",
        (SOURCE, context.aws_request_id),
    )
    if event.get("fail"):
        # After the INSERT on purpose: the rollback is what makes it disappear.
        raise ValueError("the event asked this invocation to fail")
    visits = (
        await connection.execute("SELECT count(*) FROM visits WHERE source = %s", (SOURCE,))
    ).scalar()
    backend_pid = (await connection.execute("SELECT pg_backend_pid()")).scalar()
    return {"visits": visits, "backend_pid": backend_pid, "reused": reused}


# The engine the decorator built (the warm AsyncEngine): ``engine.pool.stats`` has the
# warm cache's counters.  Shutdown (SIGTERM, exit) disposes it without needing the loop.
engine = handler.engine  # type: ignore[attr-defined]
