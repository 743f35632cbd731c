"""The asyncio psycopg 3 dialect: ``postgresql(+psycopg)://`` with ``create_async_engine``.

Uses ``psycopg.AsyncConnection``; connect arguments, error classification, transaction
pooling, terminate and the running-statement check are the blocking dialect's
(:class:`PsycopgRules`: one set of rules for both), only the I/O here is awaited, and
the shutdown cancel is the synchronous ``cancel()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lambda_pool.deadlines import step
from lambda_pool.dialects.base import AsyncDialect, ExecResult
from lambda_pool.dialects.psycopg import (
    PsycopgRules,
    commit_then_outcome,
    opening_outcome,
    opening_query,
    psycopg_exec_result,
)

__all__ = ["AsyncPsycopgDialect", "apsycopg_commit_then", "apsycopg_execute_opening"]


class AsyncPsycopgDialect(PsycopgRules, AsyncDialect):
    """``psycopg.AsyncConnection`` connections."""

    async def connect(self, cparams: Mapping[str, Any]) -> Any:
        """An :class:`~lambda_pool.dialects._psycopg_deadline.AsyncDeadlineConnection`
        (connect and every later wait end by the current deadline)."""
        self.load_driver()
        from lambda_pool.dialects._psycopg_deadline import AsyncDeadlineConnection

        return await AsyncDeadlineConnection.connect(**cparams)

    async def do_ping(self, dbapi_conn: Any) -> bool:
        # Same single round trip as the blocking dialect.
        with step("pre-ping"):
            if not self.ping_needs_autocommit(dbapi_conn):
                await dbapi_conn.execute("")
                return True
            await dbapi_conn.set_autocommit(True)
            try:
                await dbapi_conn.execute("")
            finally:
                if not dbapi_conn.closed:
                    await dbapi_conn.set_autocommit(False)
            return True

    async def do_rollback(self, dbapi_conn: Any) -> None:
        await dbapi_conn.rollback()

    async def do_commit(self, dbapi_conn: Any) -> None:
        await dbapi_conn.commit()

    async def do_close(self, dbapi_conn: Any) -> None:
        await dbapi_conn.close()

    def do_cancel(self, dbapi_conn: Any, timeout: float) -> bool:
        """Cancel the running statement without the event loop: the synchronous
        ``AsyncConnection.cancel()`` (``cancel_safe()`` is a coroutine, and the loop may
        be gone or busy in that very statement).  Not bounded by ``timeout`` itself: the
        caller runs it in a thread it stops waiting for."""
        dbapi_conn.cancel()
        return True

    async def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        from psycopg.rows import tuple_row

        async with dbapi_conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(sql, params)
            rows = await cursor.fetchall() if cursor.description is not None else []
            return psycopg_exec_result(cursor, rows)


async def apsycopg_execute_opening(
    conn: Any,
    sql: str,
    params: Sequence[Any] | Mapping[str, Any] | None,
    prelude: Sequence[str],
) -> ExecResult:
    """:func:`lambda_pool.dialects.psycopg.psycopg_execute_opening` for psycopg's
    ``AsyncConnection``: ``BEGIN``, ``prelude`` (and ``sql`` when it takes no parameters)
    in one simple query, ``sql`` with parameters after it."""
    from psycopg import generators

    query, with_statement = opening_query(sql, params, prelude, conn.info.encoding)
    async with conn.lock:
        conn.pgconn.send_query(query)
        results = await conn.wait(generators.execute(conn.pgconn))
    outcome = opening_outcome(conn, results, len(prelude), with_statement)
    if outcome is not None:
        return ExecResult(*outcome)
    from psycopg.rows import tuple_row

    async with conn.cursor(row_factory=tuple_row) as cursor:
        await cursor.execute(sql, params)
        rows = await cursor.fetchall() if cursor.description is not None else []
        return psycopg_exec_result(cursor, rows)


async def apsycopg_commit_then(conn: Any, statements: str) -> bool:
    """:func:`lambda_pool.dialects.psycopg.psycopg_commit_then` for psycopg's
    ``AsyncConnection``: ``COMMIT`` and ``statements`` in one simple query."""
    from psycopg import generators

    async with conn.lock:
        conn.pgconn.send_query(f"COMMIT; {statements}".encode(conn.info.encoding))
        results = await conn.wait(generators.execute(conn.pgconn))
    return commit_then_outcome(results, conn.info.encoding)
