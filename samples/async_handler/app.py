"""lambda-pool sample: an asyncio handler on ``lambda_pool.warm.warm_async_engine``.

Lambda calls Python handlers synchronously, so an async handler needs an event loop to
run on.  The obvious ``asyncio.run(main())`` per invocation is wrong here: it creates a
new loop each time and closes it at the end, and an asyncio connection (psycopg's
``AsyncConnection``, asyncpg's ``Connection``) belongs to the loop it was opened on —
its socket is registered with that loop's selector and its futures with that loop.  A
connection kept from one invocation could not serve the next one (used from a
different loop it fails with errors such as "Future attached to a different loop"), so
every invocation would pay for a new connection, losing the point of a warm one.

So this module creates ONE event loop at Init and runs every invocation on it with
``run_until_complete``.  Between invocations the loop is simply not running (Lambda
freezes the environment); the warm connection stays registered with it and is ready
for the next invocation.

The engine is ``lambda_pool.warm.warm_async_engine``: the warm-container cache of the
sync path, for asyncio.  One connection is kept and handed out again only when it is
safe (same process, no SnapStart restore, not closed, idle after the previous
invocation's reset, younger than its recycle and credentials deadlines, same event
loop); it is pre-pinged only after sitting idle longer than
``LAMBDA_POOL_PRE_PING_IDLE_SECONDS`` (default 60) or when the server has written to it
(it does so to an idle session only to end it), so back-to-back invocations skip the
round trip a ``pool_pre_ping=True`` pool pays at every checkout.  On return the session
is rolled back and reset with ``DISCARD ALL`` (skipped with
``LAMBDA_POOL_TRANSACTION_POOLING``), so nothing one invocation set leaks into the next.
Should the loop ever change (``asyncio.run()`` per invocation), the pool notices and
opens a new connection on the new loop instead of using the old loop's.

Configuration: the ``LAMBDA_POOL_*`` variables, as for ``@with_connection()``
(see :class:`lambda_pool.config.Settings`).  ``{"fail": true}`` raises ``ValueError``
after the INSERT: the transaction rolls back and the connection stays pooled.
"""

from __future__ import annotations

import asyncio
from typing import Any

from lambda_pool import event as pool_event
from lambda_pool import lifecycle
from lambda_pool.asyncio import AsyncConnection
from lambda_pool.config import Settings, credentials_for
from lambda_pool.warm import warm_async_engine

SOURCE = "async"

# --- Init: runs once per execution environment ------------------------------------------
settings = Settings.from_env()
_url = settings.url()
# postgresql:// (or postgresql+psycopg://) uses psycopg's AsyncConnection; a
# postgresql+asyncpg:// URL would use asyncpg with the same code below.
engine = warm_async_engine(
    _url,
    credentials=credentials_for(settings, _url),
    pre_ping_idle_seconds=settings.pre_ping_idle_seconds,
    transaction_pooling=settings.transaction_pooling,
    # Bounds how old a session gets (pre-ping after idle gaps covers a dropped one).
    pool_recycle=3600,
)

# The one loop every invocation runs on (see the module docstring).  Not set as the
# thread's current loop on purpose: nothing else should schedule work on it between
# invocations, when the environment may be frozen.
_LOOP = asyncio.new_event_loop()

# Dispose on SIGTERM / at exit / around SnapStart.  Shutdown disposal of an async engine
# is synchronous and needs no loop (``AsyncEngine.dispose_for_shutdown``), so it works
# while _LOOP is idle.  SIGTERM reaches Lambda functions only with an extension registered.
lifecycle.install_shutdown_hooks()
if settings.register_extension:
    lifecycle.register_internal_extension()

# Connections the pool opened in this environment: unchanged across an invocation means
# it reused the pooled one.
_opened = 0


@pool_event.listens_for(engine, "connect")
def _count_connect(dbapi_connection: Any, connection_record: Any) -> None:
    global _opened
    _opened += 1


_schema_ready = False


async def _ensure_schema(conn: AsyncConnection) -> None:
    """Create the shared ``visits`` table once per container, committed on its own."""
    global _schema_ready
    if _schema_ready:
        return
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS visits (
                id bigserial PRIMARY KEY,
                source text NOT NULL,
                request_id text NOT NULL,
                visited_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        await conn.commit()
    except Exception as exc:
        # Two cold starts racing: IF NOT EXISTS is not atomic, the loser fails with
        # unique_violation (23505) or duplicate_table (42P07); the table exists either
        # way.  ``sqlstate`` is set by both psycopg and asyncpg.
        if getattr(exc, "sqlstate", None) not in ("23505", "42P07"):
            raise
        await conn.rollback()
    _schema_ready = True


async def _handle(event: dict[str, Any], context: Any) -> dict[str, Any]:
    opened_before = _opened
    async with engine.connect() as conn:
        await _ensure_schema(conn)
        try:
            # SET LOCAL (set_config(..., true)): bound this invocation's statements by
            # its remaining time; ends with the transaction, so nothing leaks.
            remaining = context.get_remaining_time_in_millis() - settings.margin_ms
            await conn.execute(
                "SELECT set_config('statement_timeout', %s, true)", (str(max(remaining, 1)),)
            )
            await conn.execute(
                "INSERT INTO visits (source, request_id) VALUES (%s, %s)",
                (SOURCE, context.aws_request_id),
            )
            if event.get("fail"):
                raise ValueError("the event asked this invocation to fail")
            visits = (
                await conn.execute("SELECT count(*) FROM visits WHERE source = %s", (SOURCE,))
            ).scalar()
            backend_pid = (await conn.execute("SELECT pg_backend_pid()")).scalar()
            await conn.commit()
        except BaseException:
            # Explicit, although returning the connection rolls back too: the INSERT
            # must be gone before the error reaches Lambda.
            await conn.rollback()
            raise
    return {
        "visits": visits,
        "backend_pid": backend_pid,
        "reused": _opened == opened_before,
    }


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """The synchronous entry point Lambda calls: run the coroutine on the module's loop."""
    return _LOOP.run_until_complete(_handle(event, context))
