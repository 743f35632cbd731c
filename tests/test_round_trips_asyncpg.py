"""Round trips of a warm asyncpg invocation against a raw asyncpg connection held in a
global (issue 9), counted by the server and on the wire.

A throw-away PostgreSQL logs every statement with the backend's pid
(``log_statement=all``: a simple query is a ``statement:`` line, asyncpg's bind and
execute an ``execute <name>:`` one), and the fault proxy in front of it counts server
replies (one per round trip).  Each test warms a handler up, clears the counters, runs
it again and compares with a raw held asyncpg connection doing
``async with conn.transaction(): await conn.fetch(...)`` in the same test, measured the
same way.  What the user relies on is checked with them: rows, errors raised by the
statement that caused them, a failed ``COMMIT``, and no session state reaching the next
invocation while asyncpg's own cached statements stay usable.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from wire_support import Wire, logging_wire

from lambda_pool import with_connection
from lambda_pool.dialects.asyncpg import asyncpg_commit_then
from lambda_pool.testing.context import LambdaContext
from lambda_pool.warm import forget_cached_engines
from lambda_pool.warm.reset import ASYNCPG_RESET_FAILED_SQLSTATE, ASYNCPG_SESSION_RESET

asyncpg = pytest.importorskip("asyncpg")


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with logging_wire(
        "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, v int); "
        "CREATE TABLE IF NOT EXISTS checked (v int, CONSTRAINT v_unique UNIQUE (v) "
        "DEFERRABLE INITIALLY DEFERRED); "
        "CREATE TABLE IF NOT EXISTS shape (a int); "
        "INSERT INTO shape VALUES (1)"
    ) as found:
        yield found


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    yield
    for engine in forget_cached_engines():
        engine.dispose_for_shutdown()


def _invoke(handler: Callable[..., Any], event: Any = None) -> Any:
    return handler(event or {}, LambdaContext(remaining_ms=30_000))


def _backend_pid(handler: Callable[..., Any]) -> int:
    """The server pid of the handler's warm connection (read locally, no round trip)."""
    record = handler.engine.pool._slots.record  # type: ignore[attr-defined]
    return int(record.dbapi_connection.get_server_pid())


class RawHeld:
    """The floor: one asyncpg connection kept in a global, on its own event loop, each
    invocation one ``conn.transaction()`` with asyncpg's default statement cache."""

    def __init__(self, url: str, **connect_args: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.conn = self.loop.run_until_complete(asyncpg.connect(url, **connect_args))

    def run(self, *statements: tuple[str, tuple[Any, ...]]) -> Callable[[], Any]:
        async def work() -> Any:
            result = None
            async with self.conn.transaction():
                for sql, args in statements:
                    result = await self.conn.fetch(sql, *args)
            return result

        return lambda: self.loop.run_until_complete(work())

    def pid(self) -> int:
        return int(self.conn.get_server_pid())

    def close(self) -> None:
        self.loop.run_until_complete(self.conn.close())
        self.loop.close()


@pytest.fixture
def raw(wire: Wire) -> Iterator[RawHeld]:
    held = RawHeld(wire.url)
    yield held
    held.close()


def _assert_commit_carries_the_reset(statement: str) -> None:
    assert statement.startswith("COMMIT; RESET ALL; SET SESSION AUTHORIZATION DEFAULT; DO ")
    assert "pg_advisory_unlock_all()" in statement and "DISCARD TEMP" in statement


def test_select_one_takes_no_more_round_trips_than_a_raw_held_asyncpg_connection(
    wire: Wire, raw: RawHeld
) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> int:
        return int((await connection.execute("SELECT 1")).scalar())

    assert _invoke(handler) == 1  # warm-up: opens the connection, prepares SELECT 1
    replies, statements = wire.count(lambda: _invoke(handler), _backend_pid(handler))
    raw_call = raw.run(("SELECT 1", ()))
    raw_call()
    raw_replies, raw_statements = wire.count(raw_call, raw.pid())

    assert raw_replies == 3 and len(raw_statements) == 3  # BEGIN, SELECT 1, COMMIT
    assert replies == 3 <= raw_replies
    assert len(statements) == 3
    opening = re.fullmatch(r"BEGIN; SET LOCAL statement_timeout = (\d+)", statements[0])
    assert opening is not None and 0 < int(opening.group(1)) < 30_000
    assert statements[1] == "SELECT 1"  # asyncpg's cached statement: bind and execute
    _assert_commit_carries_the_reset(statements[2])


def test_insert_and_select_take_no_more_round_trips_than_raw(wire: Wire, raw: RawHeld) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> int:
        await connection.execute("INSERT INTO items (v) VALUES (%s)", (7,))
        result = await connection.execute("SELECT count(*) FROM items WHERE v = %s", (7,))
        return int(result.scalar())

    first = _invoke(handler)
    replies, statements = wire.count(lambda: _invoke(handler), _backend_pid(handler))
    raw_call = raw.run(
        ("INSERT INTO items (v) VALUES ($1)", (7,)),
        ("SELECT count(*) FROM items WHERE v = $1", (7,)),
    )
    raw_call()
    raw_replies, _ = wire.count(raw_call, raw.pid())

    assert raw_replies == 4
    assert replies == 4 <= raw_replies
    assert statements[0].startswith("BEGIN; SET LOCAL statement_timeout = ")
    assert statements[1:3] == [
        "INSERT INTO items (v) VALUES ($1)",
        "SELECT count(*) FROM items WHERE v = $1",
    ]
    _assert_commit_carries_the_reset(statements[3])
    assert len(statements) == 4
    assert raw_call()[0][0] >= first + 3  # every invocation committed, raw's included


def test_without_statement_timeout_begin_goes_alone_and_three_round_trips_remain(
    wire: Wire,
) -> None:
    @with_connection(wire.url_for_driver("asyncpg"), statement_timeout=None)
    async def handler(event: Any, context: Any, connection: Any) -> int:
        return int((await connection.execute("SELECT 1")).scalar())

    _invoke(handler)
    replies, statements = wire.count(lambda: _invoke(handler), _backend_pid(handler))

    assert replies == 3
    assert statements[:2] == ["BEGIN", "SELECT 1"]
    _assert_commit_carries_the_reset(statements[2])
    assert len(statements) == 3


def test_transaction_pooling_keeps_no_prepared_statement_and_sends_no_reset(wire: Wire) -> None:
    """Behind a transaction pooler no statement may outlive its transaction: asyncpg's
    cache is off, so each statement is prepared (unnamed) and executed, two round trips,
    as on a raw held connection opened for a pooler (``statement_cache_size=0``); the
    return only rolls back what is open (nothing after COMMIT)."""
    query = "SELECT count(*) FROM pg_prepared_statements"

    @with_connection(wire.url_for_driver("asyncpg"), transaction_pooling=True)
    async def handler(event: Any, context: Any, connection: Any) -> int:
        return int((await connection.execute(query)).scalar())

    assert _invoke(handler) == 0
    replies, statements = wire.count(lambda: _invoke(handler), _backend_pid(handler))
    raw = RawHeld(wire.url, statement_cache_size=0)
    try:
        raw_call = raw.run((query, ()))
        raw_call()
        raw_replies, _ = wire.count(raw_call, raw.pid())
    finally:
        raw.close()

    assert _invoke(handler) == 0
    assert raw_replies == 4
    assert replies == 4 <= raw_replies  # BEGIN with SET LOCAL; prepare; execute; COMMIT
    assert statements[0].startswith("BEGIN; SET LOCAL statement_timeout = ")
    assert statements[-1] == "COMMIT" and len(statements) == 3
    assert not any("RESET" in s or "DISCARD" in s for s in statements)


def test_nothing_one_invocation_leaves_in_the_session_reaches_the_next(wire: Wire) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> dict[str, Any]:
        if event.get("dirty"):
            for statement in (
                "SET application_name = 'leaked'",
                "SET SESSION statement_timeout = 12345",
                "SELECT set_config('role', current_user, false)",  # SET ROLE
                "CREATE TEMP TABLE leaked_temp (x int)",
                "PREPARE leaked_plan AS SELECT 1",
                "PREPARE __asyncpg_stmt_leaked__ AS SELECT 2",
                "SELECT pg_advisory_lock(4242)",
                "LISTEN leaked_channel",
                "DECLARE leaked_cursor CURSOR WITH HOLD FOR SELECT 1",
                "SELECT nextval('items_id_seq')",
            ):
                await connection.execute(statement)
            await connection.commit()  # LISTEN takes effect at commit; the rest survives it
        row = (
            await connection.execute(
                "SELECT pg_backend_pid(), current_setting('application_name'), "
                "current_setting('statement_timeout'), current_setting('role'), "
                "to_regclass('pg_temp.leaked_temp'), "
                "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql), "
                "(SELECT count(*) FROM pg_prepared_statements WHERE NOT from_sql), "
                "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                " AND pid = pg_backend_pid()), "
                "(SELECT count(*) FROM pg_listening_channels()), "
                "(SELECT count(*) FROM pg_cursors WHERE name = 'leaked_cursor')"
            )
        ).one()
        names = (
            "pid",
            "app",
            "timeout",
            "role",
            "temp",
            "user_prepared",
            "asyncpg_prepared",
            "locks",
            "listening",
            "cursors",
        )
        return dict(zip(names, row, strict=True))

    @with_connection(wire.url_for_driver("asyncpg"))
    async def last_value(event: Any, context: Any, connection: Any) -> str:
        try:
            await connection.execute("SELECT lastval()")
        except asyncpg.exceptions.ObjectNotInPrerequisiteStateError:
            return "not yet defined in this session"
        return "defined"

    _invoke(handler)  # warm-up: the first return proves the reset alone
    dirty = _invoke(handler, {"dirty": True})
    clean = _invoke(handler)

    assert dirty["app"] == "leaked" and dirty["temp"] is not None and dirty["locks"] == 1
    assert dirty["user_prepared"] == 2 and dirty["listening"] == 1 and dirty["cursors"] == 1
    assert dirty["role"] != "none"
    assert clean["pid"] == dirty["pid"]  # the same session, reused
    assert clean["app"] != "leaked"
    assert clean["role"] == "none"
    assert clean["temp"] is None
    assert clean["user_prepared"] == 0  # a user's PREPARE goes, whatever its name
    assert clean["asyncpg_prepared"] >= 1  # asyncpg's cached statements stay
    assert clean["locks"] == 0
    assert clean["listening"] == 0
    assert clean["cursors"] == 0
    assert clean["timeout"] != "12345ms"  # the handler's own SET LOCAL, not the session's
    assert _invoke(last_value) == "not yet defined in this session"  # DISCARD SEQUENCES


@pytest.mark.parametrize(
    ("sql", "params"),
    [("SELECT 1 / 0", None), ("SELECT 1 / %s", (0,))],
    ids=["no parameters", "with parameters"],
)
def test_a_statement_error_is_raised_by_the_statement_that_caused_it(
    wire: Wire, sql: str, params: Any
) -> None:
    seen: list[str] = []

    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> str:
        try:
            await connection.execute(sql, params)
        except asyncpg.exceptions.DivisionByZeroError:
            seen.append("first statement")
            await connection.rollback()
        return str((await connection.execute("SELECT 'after'")).scalar())

    assert _invoke(handler) == "after"
    assert _invoke(handler) == "after"  # warm, the statements cached
    assert seen == ["first statement", "first statement"]


def test_a_commit_that_fails_raises_and_the_next_invocation_starts_clean(wire: Wire) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> int:
        await connection.execute("SET application_name = 'before_failed_commit'")
        if event.get("fail"):
            # Deferred: both rows go in, the unique check fails at COMMIT.
            await connection.execute("INSERT INTO checked (v) VALUES (%s), (%s)", (5, 5))
        return 1

    @with_connection(wire.url_for_driver("asyncpg"))
    async def reader(event: Any, context: Any, connection: Any) -> tuple[str, int, int]:
        row = (
            await connection.execute(
                "SELECT current_setting('application_name'), "
                "(SELECT count(*) FROM checked WHERE v = 5), pg_backend_pid()"
            )
        ).one()
        return str(row[0]), int(row[1]), int(row[2])

    _invoke(handler)  # warm: the reset travels with COMMIT from now on
    pid = _backend_pid(handler)
    with pytest.raises(asyncpg.exceptions.UniqueViolationError):
        _invoke(handler, {"fail": True})
    app, rows, reader_pid = _invoke(reader)
    assert rows == 0  # nothing committed
    assert app != "before_failed_commit"  # the session was reset after the failed COMMIT
    assert reader_pid == pid  # and kept


def _on_raw_connection(url: str, work: Callable[[Any], Any]) -> Any:
    loop = asyncio.new_event_loop()
    try:
        conn = loop.run_until_complete(asyncpg.connect(url))
        try:
            return loop.run_until_complete(work(conn))
        finally:
            loop.run_until_complete(conn.close())
    finally:
        loop.close()


def test_a_reset_failing_after_its_commit_does_not_report_the_commit_as_failed(
    wire: Wire,
) -> None:
    failing_reset = (
        "DO $$BEGIN PERFORM 1 / 0; EXCEPTION WHEN OTHERS THEN RAISE EXCEPTION USING "
        f"ERRCODE = '{ASYNCPG_RESET_FAILED_SQLSTATE}', MESSAGE = SQLERRM; END$$"
    )

    async def work(conn: Any) -> tuple[bool, bool, int]:
        await conn.execute("BEGIN; INSERT INTO items (v) VALUES (-41)")
        failed = await asyncpg_commit_then(conn, failing_reset)
        await conn.execute("BEGIN; INSERT INTO items (v) VALUES (-42)")
        succeeded = await asyncpg_commit_then(conn, ASYNCPG_SESSION_RESET)
        rows = await conn.fetchval("SELECT count(*) FROM items WHERE v IN (-41, -42)")
        return failed, succeeded, int(rows)

    assert _on_raw_connection(wire.url, work) == (False, True, 2)


def test_a_cached_statement_whose_result_type_changed_fails_once_then_is_prepared_anew(
    wire: Wire,
) -> None:
    """As with asyncpg itself inside a transaction: the server refuses the stale cached
    statement and the error aborts the transaction, so it cannot be retried there; the
    cache is emptied, and the next invocation prepares the statement anew."""

    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> tuple[Any, ...]:
        return tuple((await connection.execute("SELECT * FROM shape")).one())

    assert _invoke(handler) == (1,)

    async def alter(conn: Any) -> None:
        await conn.execute("ALTER TABLE shape ADD COLUMN b int DEFAULT 2")

    _on_raw_connection(wire.url, alter)
    with pytest.raises(asyncpg.exceptions.InvalidCachedStatementError):
        _invoke(handler)
    assert _invoke(handler) == (1, 2)


@pytest.fixture
def plpgsql_only_for_the_app_role(wire: Wire) -> Iterator[str]:
    """``USAGE`` on PL/pgSQL revoked from ``PUBLIC`` and granted to the application role
    only, and a role ``no_plpgsql`` the application role may ``SET ROLE`` to."""
    server = wire.server
    with server.admin_connect() as admin:
        admin.execute("DROP ROLE IF EXISTS no_plpgsql")
        admin.execute("CREATE ROLE no_plpgsql NOLOGIN")
        admin.execute(f'GRANT no_plpgsql TO "{server.user}"')
        admin.execute("REVOKE USAGE ON LANGUAGE plpgsql FROM PUBLIC")
        admin.execute(f'GRANT USAGE ON LANGUAGE plpgsql TO "{server.user}"')
    try:
        yield "no_plpgsql"
    finally:
        with server.admin_connect() as admin:
            admin.execute("GRANT USAGE ON LANGUAGE plpgsql TO PUBLIC")
            admin.execute(f'REVOKE USAGE ON LANGUAGE plpgsql FROM "{server.user}"')
            admin.execute("DROP ROLE no_plpgsql")


def _session_state_handler(url: str) -> Callable[..., Any]:
    @with_connection(url)
    async def handler(event: Any, context: Any, connection: Any) -> tuple[Any, ...]:
        row = (
            await connection.execute(
                "SELECT current_user, current_setting('application_name'), "
                "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql)"
            )
        ).one()
        for statement in event.get("dirty", ()):
            await connection.execute(statement)
        return tuple(row)

    return handler


def test_a_role_switched_to_without_plpgsql_does_not_stop_the_reset_sent_with_commit(
    wire: Wire, plpgsql_only_for_the_app_role: str
) -> None:
    handler = _session_state_handler(wire.url_for_driver("asyncpg"))
    dirty = [f"SET ROLE {plpgsql_only_for_the_app_role}", "PREPARE leaked_plan AS SELECT 1"]

    _invoke(handler)  # warm-up: the reset proves itself alone
    _, statements = wire.count(lambda: _invoke(handler, {"dirty": dirty}), _backend_pid(handler))
    user, _, prepared = _invoke(handler)

    _assert_commit_carries_the_reset(statements[-1])
    assert user == wire.server.user and prepared == 0


def test_a_server_refusing_the_asyncpg_reset_is_reset_with_discard_all(
    wire: Wire, plpgsql_only_for_the_app_role: str
) -> None:
    handler = _session_state_handler(wire.url_for_driver("asyncpg"))
    with wire.server.admin_connect() as admin:
        admin.execute(f'REVOKE USAGE ON LANGUAGE plpgsql FROM "{wire.server.user}"')
    dirty = ["SET application_name = 'leaked'", "PREPARE leaked_plan AS SELECT 1"]

    _invoke(handler, {"dirty": dirty})  # the reset is refused: DISCARD ALL instead
    replies, statements = wire.count(
        lambda: _invoke(handler, {"dirty": dirty}), _backend_pid(handler)
    )
    _, app, prepared = _invoke(handler)

    assert app != "leaked" and prepared == 0
    assert statements[-2:] == ["COMMIT", "DISCARD ALL"]  # not tried again
    assert not any(s.startswith("COMMIT; ") for s in statements)
    # The statements' prepares (DISCARD ALL dropped asyncpg's cache), and no closes.
    assert replies == len(statements) + 3


def test_a_handler_error_rolls_back_with_the_reset_in_as_many_round_trips_as_raw(
    wire: Wire, raw: RawHeld
) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> Any:
        row = (
            await connection.execute(
                "SELECT current_setting('application_name'), "
                "(SELECT count(*) FROM pg_prepared_statements WHERE from_sql)"
            )
        ).one()
        if event.get("fail"):
            await connection.execute("SET application_name = 'leaked'")
            await connection.execute("PREPARE leaked_plan AS SELECT 1")
            raise ValueError("the handler failed")
        return tuple(row)

    class Failed(Exception):
        pass

    async def raw_failing() -> None:
        async with raw.conn.transaction():
            await raw.conn.fetch("SELECT 1")
            raise Failed

    def raw_call() -> None:
        with pytest.raises(Failed):
            raw.loop.run_until_complete(raw_failing())

    def failing() -> None:
        with pytest.raises(ValueError, match="the handler failed"):
            _invoke(handler, {"fail": True})

    assert _invoke(handler) == ("", 0)  # warm-up: the reset proves itself alone
    failing()  # its statements are prepared and cached
    replies, statements = wire.count(failing, _backend_pid(handler))
    raw_call()
    raw_replies, raw_statements = wire.count(raw_call, raw.pid())

    assert raw_replies == 3 and raw_statements[-1].startswith("ROLLBACK")
    # BEGIN with SET LOCAL; the row; SET; PREPARE; ROLLBACK with the reset: the raw
    # connection's BEGIN, statement and ROLLBACK, plus the two statements it does not run.
    assert replies == raw_replies + 2
    assert statements[-1].startswith("ROLLBACK; RESET ALL; SET SESSION AUTHORIZATION DEFAULT;")
    assert _invoke(handler) == ("", 0)  # nothing of the failed invocation stayed


def test_a_handler_returning_after_a_failed_statement_rolls_back_with_the_reset(
    wire: Wire,
) -> None:
    @with_connection(wire.url_for_driver("asyncpg"))
    async def handler(event: Any, context: Any, connection: Any) -> str:
        await connection.execute("SET application_name = 'leaked'")
        try:
            await connection.execute("SELECT 1 / 0")
        except asyncpg.exceptions.DivisionByZeroError:
            return "caught"
        return "not raised"

    @with_connection(wire.url_for_driver("asyncpg"))
    async def reader(event: Any, context: Any, connection: Any) -> str:
        return str(
            (await connection.execute("SELECT current_setting('application_name')")).scalar()
        )

    assert _invoke(handler) == "caught"
    _, statements = wire.count(lambda: _invoke(handler), _backend_pid(handler))
    assert statements[-1].startswith("ROLLBACK; RESET ALL;")
    assert _invoke(reader) == ""


def test_a_session_authorization_set_by_a_superuser_handler_is_reset(wire: Wire) -> None:
    admin_url = wire.proxy.url_for(wire.server.admin_dsn)

    @with_connection(admin_url.replace("postgresql://", "postgresql+asyncpg://", 1))
    async def handler(event: Any, context: Any, connection: Any) -> tuple[str, str]:
        row = (await connection.execute("SELECT session_user, current_user")).one()
        if event.get("switch"):
            await connection.execute(f'SET SESSION AUTHORIZATION "{wire.server.user}"')
        return str(row[0]), str(row[1])

    admin = wire.server.admin_user
    assert _invoke(handler) == (admin, admin)  # warm-up: the reset proves itself alone
    _invoke(handler, {"switch": True})  # the reset travels with this COMMIT
    assert _invoke(handler) == (admin, admin)
