"""Round trips of a warm invocation, counted twice: by the server and on the wire (issue 9).

A throw-away PostgreSQL logs every statement with the backend's pid
(``log_statement=all``), and the fault proxy in front of it counts server replies (one
per round trip).  Each test warms a handler up, clears the counters, runs it again and
compares the counts with a raw psycopg connection held across invocations doing the
same statements, measured the same way in the same test.  What the user relies on is
checked with them: the rows, an error raised by the statement that caused it, and no
session state (``SET``, temporary tables, prepared statements, advisory locks,
``LISTEN``) reaching the next invocation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from wire_support import Wire, logging_wire

from lambda_pool import with_connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.warm import forget_cached_engines

psycopg = pytest.importorskip("psycopg")


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with logging_wire(
        "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, v int); "
        "CREATE TABLE IF NOT EXISTS checked (v int, CONSTRAINT v_positive "
        "CHECK (v > 0) NOT VALID, CONSTRAINT v_unique UNIQUE (v) "
        "DEFERRABLE INITIALLY DEFERRED)"
    ) as found:
        yield found


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    yield
    for engine in forget_cached_engines():
        engine.dispose_for_shutdown()  # blocking and asyncio engines alike


def _context() -> LambdaContext:
    return LambdaContext(remaining_ms=30_000)


def _invoke(handler: Callable[..., Any]) -> Any:
    return handler({}, _context())


class RawHeld:
    """The floor: one psycopg connection kept in a global, committed per invocation."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)

    def run(self, *statements: tuple[str, Any]) -> Callable[[], Any]:
        def call() -> Any:
            result = None
            with self.conn.cursor() as cursor:
                for sql, params in statements:
                    cursor.execute(sql, params)
                    result = cursor.fetchall() if cursor.description else None
            self.conn.commit()
            return result

        return call

    def pid(self) -> int:
        return int(self.conn.info.backend_pid)

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw(wire: Wire) -> Iterator[RawHeld]:
    held = RawHeld(wire.url)
    yield held
    held.close()


def _warm_pid(handler: Callable[..., Any]) -> Callable[[], int]:
    def pid() -> int:
        record = handler.engine.pool._slots.record  # type: ignore[attr-defined]
        return int(record.dbapi_connection.info.backend_pid)

    return pid


def test_select_one_takes_two_round_trips_where_a_raw_held_connection_takes_three(
    wire: Wire, raw: RawHeld
) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT 1").scalar())

    assert _invoke(handler) == 1  # warm-up: opens the connection
    replies, statements = wire.count(lambda: _invoke(handler), _warm_pid(handler))
    raw_call = raw.run(("SELECT 1", None))
    raw_call()
    raw_replies, raw_statements = wire.count(raw_call, raw.pid)

    assert raw_replies == 3 and raw_statements == ["BEGIN", "SELECT 1", "COMMIT"]
    assert replies == 2 < raw_replies
    assert len(statements) == 2
    opening = re.fullmatch(r"BEGIN; SET LOCAL statement_timeout = (\d+); SELECT 1", statements[0])
    assert opening is not None and 0 < int(opening.group(1)) < 30_000
    assert statements[1].startswith("COMMIT; ") and "pg_advisory_unlock_all()" in statements[1]


def test_insert_and_select_take_no_more_round_trips_than_raw(wire: Wire, raw: RawHeld) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> int:
        connection.execute("INSERT INTO items (v) VALUES (%s)", (7,))
        return int(connection.execute("SELECT count(*) FROM items WHERE v = %s", (7,)).scalar())

    first = _invoke(handler)
    replies, statements = wire.count(lambda: _invoke(handler), _warm_pid(handler))
    raw_call = raw.run(
        ("INSERT INTO items (v) VALUES (%s)", (7,)),
        ("SELECT count(*) FROM items WHERE v = %s", (7,)),
    )
    raw_call()
    raw_replies, _ = wire.count(raw_call, raw.pid)

    assert raw_replies == 4
    assert replies == 4  # statements with parameters need the extended protocol
    assert statements[0].startswith("BEGIN; SET LOCAL statement_timeout = ")
    assert statements[1:3] == [
        "INSERT INTO items (v) VALUES ($1)",
        "SELECT count(*) FROM items WHERE v = $1",
    ]
    assert statements[3].startswith("COMMIT; ") and len(statements) == 4
    with psycopg.connect(wire.server.dsn) as check:
        count = check.execute("SELECT count(*) FROM items WHERE v = 7").fetchone()[0]
    assert count >= first + 1  # both invocations committed (raw added two more)


def test_without_statement_timeout_no_set_is_sent_and_two_round_trips_remain(
    wire: Wire,
) -> None:
    @with_connection(wire.url, statement_timeout=None)
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT 1").scalar())

    _invoke(handler)
    replies, statements = wire.count(lambda: _invoke(handler), _warm_pid(handler))

    assert replies == 2
    assert statements[0] == "BEGIN; SELECT 1"
    assert statements[1].startswith("COMMIT; ") and len(statements) == 2


def test_transaction_pooling_sends_no_discard_and_takes_two_round_trips(wire: Wire) -> None:
    @with_connection(wire.url, transaction_pooling=True)
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT 1").scalar())

    _invoke(handler)
    replies, statements = wire.count(lambda: _invoke(handler), _warm_pid(handler))

    assert replies == 2
    assert statements[0].startswith("BEGIN; SET LOCAL statement_timeout = ")
    assert statements[-1] == "COMMIT" and len(statements) == 2
    assert not any("DISCARD" in s or "RESET" in s for s in statements)


def test_nothing_one_invocation_leaves_in_the_session_reaches_the_next(wire: Wire) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> dict[str, Any]:
        if event.get("dirty"):
            connection.execute("SET application_name = 'leaked'")
            connection.execute("SET SESSION statement_timeout = 12345")
            connection.execute("CREATE TEMP TABLE leaked_temp (x int)")
            connection.execute("PREPARE leaked_plan AS SELECT 1")
            connection.execute("SELECT pg_advisory_lock(4242)")
            connection.execute("LISTEN leaked_channel")
            connection.execute("DECLARE leaked_cursor CURSOR WITH HOLD FOR SELECT 1")
            connection.commit()  # LISTEN takes effect at commit; the rest survives it
        row = connection.execute(
            "SELECT pg_backend_pid(), current_setting('application_name'), "
            "current_setting('statement_timeout'), to_regclass('pg_temp.leaked_temp'), "
            "(SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked_plan'), "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            " AND pid = pg_backend_pid()), "
            "(SELECT count(*) FROM pg_listening_channels()), "
            "(SELECT count(*) FROM pg_cursors WHERE name = 'leaked_cursor')"
        ).one()
        names = ("pid", "app", "timeout", "temp", "prepared", "locks", "listening", "cursors")
        return dict(zip(names, row, strict=True))

    dirty = _invoke(lambda e, c: handler({"dirty": True}, c))
    clean = _invoke(handler)

    assert dirty["app"] == "leaked" and dirty["temp"] is not None and dirty["locks"] == 1
    assert dirty["prepared"] == 1 and dirty["listening"] == 1 and dirty["cursors"] == 1
    assert clean["pid"] == dirty["pid"]  # the same session, reused
    assert clean["app"] != "leaked"
    assert clean["temp"] is None
    assert clean["prepared"] == 0
    assert clean["locks"] == 0
    assert clean["listening"] == 0
    assert clean["cursors"] == 0
    assert clean["timeout"] != "12345ms"  # the handler's own SET LOCAL, not the session's


@pytest.mark.parametrize(
    ("sql", "params"),
    [("SELECT 1 / 0", None), ("SELECT 1 / %s", (0,))],
    ids=["sent with BEGIN", "with parameters, after BEGIN"],
)
def test_a_statement_error_is_raised_by_the_statement_that_caused_it(
    wire: Wire, sql: str, params: Any
) -> None:
    seen: list[str] = []

    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> str:
        try:
            connection.execute(sql, params)
        except psycopg.errors.DivisionByZero:
            seen.append("first statement")
            connection.rollback()
        return str(connection.execute("SELECT 'after'").scalar())

    assert _invoke(handler) == "after"
    assert seen == ["first statement"]
    assert _invoke(handler) == "after"


def test_a_text_holding_several_statements_still_runs_as_its_first_statement(
    wire: Wire,
) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> Any:
        first = connection.execute("INSERT INTO items (v) VALUES (99); SELECT 41 + 1")
        return first.rowcount, connection.execute("SELECT current_setting('statement_timeout')")

    rowcount, timeout = _invoke(handler)
    assert rowcount == 1
    assert timeout.scalar() != "0"  # SET LOCAL still applied to the transaction


def test_a_commit_that_fails_raises_and_the_next_invocation_starts_clean(wire: Wire) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> int:
        connection.execute("SET application_name = 'before_failed_commit'")
        # Deferred: both rows go in, the unique check fails at COMMIT.
        connection.execute("INSERT INTO checked (v) VALUES (%s), (%s)", (5, 5))
        return 1

    @with_connection(wire.url)
    def reader(event: Any, context: Any, connection: Any) -> tuple[str, int]:
        row = connection.execute(
            "SELECT current_setting('application_name'), (SELECT count(*) FROM checked WHERE v = 5)"
        ).one()
        return str(row[0]), int(row[1])

    with pytest.raises(psycopg.errors.UniqueViolation):
        _invoke(handler)
    app, rows = _invoke(reader)
    assert rows == 0  # nothing committed
    assert app != "before_failed_commit"  # the session was reset after the failed COMMIT


def test_rows_of_a_statement_sent_with_begin_are_typed_as_psycopg_returns_them(
    wire: Wire,
) -> None:
    @with_connection(wire.url)
    def handler(event: Any, context: Any, connection: Any) -> Any:
        result = connection.execute(
            "SELECT 1 AS n, 'x' AS s, NULL::int AS nothing, 2.5::numeric AS d, "
            "ARRAY[1, 2] AS a FROM generate_series(1, 2)"
        )
        return result.keys(), result.all(), connection.execute("UPDATE items SET v = v WHERE false")

    keys, rows, update = _invoke(handler)
    assert list(keys) == ["n", "s", "nothing", "d", "a"]
    from decimal import Decimal

    assert rows == [(1, "x", None, Decimal("2.5"), [1, 2])] * 2
    assert update.rowcount == 0


def test_async_psycopg_takes_the_blocking_paths_two_round_trips(wire: Wire) -> None:
    @with_connection(wire.url)
    async def handler(event: Any, context: Any, connection: Any) -> int:
        return int((await connection.execute("SELECT 1")).scalar())

    def pid() -> int:
        record = handler.engine.pool._slots.record  # type: ignore[attr-defined]
        return int(record.dbapi_connection.info.backend_pid)

    assert _invoke(handler) == 1
    replies, statements = wire.count(lambda: _invoke(handler), pid)

    assert replies == 2
    assert statements[0].startswith("BEGIN; SET LOCAL statement_timeout = ")
    assert statements[0].endswith("; SELECT 1")
    assert statements[1].startswith("COMMIT; ") and len(statements) == 2


def test_a_statement_sent_with_begin_travels_in_the_connections_client_encoding(
    wire: Wire,
) -> None:
    @with_connection(wire.url, connect_args={"client_encoding": "LATIN1"})
    def handler(event: Any, context: Any, connection: Any) -> Any:
        return connection.execute("SELECT 'café' AS mot, current_setting('client_encoding')").one()

    assert tuple(_invoke(handler)) == ("café", "LATIN1")
