"""The asyncio psycopg 3 dialect: ``postgresql(+psycopg)://`` with ``create_async_engine``.

Uses ``psycopg.AsyncConnection``; connect arguments and error classification are
the blocking dialect's (one set of rules for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from lambda_pool.dialects.base import AsyncDialect, ExecResult
from lambda_pool.dialects.psycopg import (
    PSYCOPG_TRANSACTION_POOLING_ARGS,
    psycopg_connect_args,
    psycopg_is_auth_failure,
    psycopg_is_capacity_error,
    psycopg_is_disconnect,
)

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from lambda_pool.url import URL

__all__ = ["AsyncPsycopgDialect"]


class AsyncPsycopgDialect(AsyncDialect):
    """``psycopg.AsyncConnection`` connections."""

    name: ClassVar[str] = "postgresql"
    driver: ClassVar[str] = "psycopg"
    driver_module: ClassVar[str] = "psycopg"
    extra: ClassVar[str] = "postgres"

    def create_connect_args(self, url: URL) -> dict[str, Any]:
        return psycopg_connect_args(url)

    async def connect(self, cparams: Mapping[str, Any]) -> Any:
        psycopg = self.load_driver()
        return await psycopg.AsyncConnection.connect(**cparams)

    async def do_ping(self, dbapi_conn: Any) -> bool:
        # Same single round trip as the blocking dialect: an empty query, in
        # autocommit when idle so no transaction is left open.
        psycopg = self.load_driver()
        idle = dbapi_conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        if dbapi_conn.autocommit or not idle:
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

    def do_terminate(self, dbapi_conn: Any) -> None:
        """Close at once without awaiting (disposal at shutdown, no event loop left)."""
        dbapi_conn.pgconn.finish()

    async def execute(
        self, dbapi_conn: Any, sql: str, params: Sequence[Any] | Mapping[str, Any] | None
    ) -> ExecResult:
        from psycopg.rows import tuple_row

        async with dbapi_conn.cursor(row_factory=tuple_row) as cursor:
            await cursor.execute(sql, params)
            if cursor.description is None:
                return ExecResult((), [], cursor.rowcount, returns_rows=False)
            keys = tuple(column.name for column in cursor.description)
            rows = await cursor.fetchall()
            return ExecResult(keys, rows, cursor.rowcount, returns_rows=True)

    def is_disconnect(self, exc: BaseException, dbapi_conn: Any) -> bool:
        return psycopg_is_disconnect(exc, dbapi_conn)

    def is_auth_failure(self, exc: BaseException) -> bool:
        return psycopg_is_auth_failure(exc)

    def is_capacity_error(self, exc: BaseException) -> bool:
        return psycopg_is_capacity_error(exc)

    def transaction_pooling_args(self) -> dict[str, Any]:
        return dict(PSYCOPG_TRANSACTION_POOLING_ARGS)
