"""Round trips of a warm invocation through the SQLAlchemy adapter (issue 9).

The same measurement as ``tests/test_round_trips.py``: a throw-away PostgreSQL logs
every statement with the backend's pid, a fault proxy in front of it counts server
replies (one per round trip), and each test compares a warm adapter invocation with a
raw psycopg connection held across invocations doing the same statements, measured the
same way in the same test.  The adapter owes the session its reset at return and sends
it with the next transaction's ``BEGIN``; the tests check what the user relies on along
with the counts: nothing one invocation set reaches the next, however the next one
talks to the server, errors raised by the statement that caused them, the pre-ping, the
deadline and SQLAlchemy's own reset on return.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from wire_support import Wire, logging_wire

from lambda_pool.exc import DeadlineExceededError

psycopg = pytest.importorskip("psycopg")
sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import event, text  # noqa: E402

from lambda_pool import deadlines  # noqa: E402
from lambda_pool.sqlalchemy import forget_cached_engines, warm_engine  # noqa: E402

_RESET = re.compile(
    r"BEGIN; CLOSE ALL; .*DEALLOCATE ALL; UNLISTEN \*; SELECT pg_advisory_unlock_all\(\); "
    r".*DISCARD TEMP; DISCARD SEQUENCES; COMMIT"
)


@pytest.fixture(scope="module")
def wire() -> Iterator[Wire]:
    with logging_wire("CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, v int)") as found:
        yield found


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    yield
    for engine in forget_cached_engines():
        engine.dispose()


class RawHeld:
    """The floor: one psycopg connection kept in a global, committed per invocation."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url)

    def run(self, *statements: tuple[str, Any]) -> Callable[[], Any]:
        def call() -> Any:
            result = None
            for sql, params in statements:
                cursor = self.conn.execute(sql, params)
                result = cursor.fetchall() if cursor.description else None
            self.conn.commit()
            return result

        return call

    def pid(self) -> int:
        return int(self.conn.info.backend_pid)


@pytest.fixture
def raw(wire: Wire) -> Iterator[RawHeld]:
    held = RawHeld(wire.url)
    yield held
    held.conn.close()


def _plugin_engine(wire: Wire, **query: str) -> Any:
    extra = "".join(f"&{key}={value}" for key, value in query.items())
    return sqlalchemy.create_engine(f"{wire.url}?plugin=lambda_pool{extra}")


@pytest.fixture(params=["warm_engine", "plugin"])
def engine(request: pytest.FixtureRequest, wire: Wire) -> Iterator[Any]:
    """The adapter's warm engine, as ``warm_engine(url)`` and as ``?plugin=lambda_pool``."""
    built = warm_engine(wire.url) if request.param == "warm_engine" else _plugin_engine(wire)
    yield built
    built.dispose()


def _backend_pid(engine: Any) -> int:
    """The warm connection's backend, read without a round trip."""
    record = engine.pool._record
    return int(record.dbapi_connection.info.backend_pid)


def _select_one(engine: Any) -> Callable[[], int]:
    def call() -> int:
        with engine.connect() as conn:
            value = int(conn.execute(text("SELECT 1")).scalar_one())
            conn.commit()
            return value

    return call


def test_a_warm_select_one_takes_two_round_trips_where_a_raw_held_connection_takes_three(
    wire: Wire, raw: RawHeld, engine: Any
) -> None:
    call = _select_one(engine)
    call()  # opens the connection
    call()  # returns it owing the reset, as every warm invocation does
    replies, statements = wire.count(call, lambda: _backend_pid(engine))
    raw_call = raw.run(("SELECT 1", None))
    raw_call()
    raw_replies, raw_statements = wire.count(raw_call, raw.pid)

    assert raw_replies == 3 and raw_statements == ["BEGIN", "SELECT 1", "COMMIT"]
    assert replies == len(statements) == 2 < raw_replies
    # The previous invocation's reset travels with this one's BEGIN and first
    # statement; nothing is sent at return.
    assert _RESET.fullmatch(statements[0].removesuffix("; BEGIN; SELECT 1"))
    assert statements[0].endswith("; COMMIT; BEGIN; SELECT 1")
    assert statements[1] == "COMMIT"
    assert not any("DISCARD ALL" in s for s in statements)


def test_statements_with_parameters_take_no_more_round_trips_than_raw(
    wire: Wire, raw: RawHeld, engine: Any
) -> None:
    def call() -> int:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO items (v) VALUES (:v)"), {"v": 7})
            return int(
                conn.execute(text("SELECT count(*) FROM items WHERE v = :v"), {"v": 7}).scalar()
            )

    first = call()
    replies, statements = wire.count(call, lambda: _backend_pid(engine))
    raw_call = raw.run(
        ("INSERT INTO items (v) VALUES (%s)", (7,)),
        ("SELECT count(*) FROM items WHERE v = %s", (7,)),
    )
    raw_call()
    raw_replies, _ = wire.count(raw_call, raw.pid)

    assert raw_replies == 4
    assert replies == 4 <= raw_replies
    assert statements[0].endswith("; COMMIT; BEGIN")
    assert statements[1:] == [
        "INSERT INTO items (v) VALUES ($1)",
        "SELECT count(*) FROM items WHERE v = $1",
        "COMMIT",
    ]
    assert call() == first + 4  # every invocation committed its row (two were raw)


def test_transaction_pooling_sends_no_reset_and_fewer_round_trips_than_raw(
    wire: Wire, raw: RawHeld
) -> None:
    engine = _plugin_engine(wire, transaction_pooling="true")
    try:
        call = _select_one(engine)
        call()
        replies, statements = wire.count(call, lambda: _backend_pid(engine))
    finally:
        engine.dispose()
    raw_call = raw.run(("SELECT 1", None))
    raw_call()
    raw_replies, _ = wire.count(raw_call, raw.pid)

    assert replies == 2 < raw_replies
    assert statements == ["BEGIN; SELECT 1", "COMMIT"]


@pytest.mark.parametrize("how", ["warm_engine", "plugin"])
def test_with_deferral_off_the_reset_is_discard_all_at_return(
    wire: Wire, raw: RawHeld, how: str
) -> None:
    engine = (
        warm_engine(wire.url, defer_session_reset=False)
        if how == "warm_engine"
        else _plugin_engine(wire, defer_session_reset="false")
    )
    try:
        call = _select_one(engine)
        call()
        replies, statements = wire.count(call, lambda: _backend_pid(engine))
    finally:
        engine.dispose()
    raw_call = raw.run(("SELECT 1", None))
    raw_call()
    raw_replies, _ = wire.count(raw_call, raw.pid)

    assert replies == 3 <= raw_replies
    assert statements == ["BEGIN; SELECT 1", "COMMIT", "DISCARD ALL"]


def test_rows_of_a_statement_sent_with_begin_are_as_psycopg_returns_them(
    wire: Wire, engine: Any
) -> None:
    _select_one(engine)()  # the next checkout owes a reset: it travels with the rows
    with engine.connect() as conn:
        result = conn.execute(
            text(
                "SELECT 1 AS n, '100%' AS s, NULL::int AS nothing, 2.5::numeric AS d, "
                "ARRAY[1, 2] AS a FROM generate_series(1, 2)"
            )
        )
        keys, rows = list(result.keys()), result.all()
        conn.commit()
        update = conn.execute(text("UPDATE items SET v = v WHERE v = -42"))
        several = conn.execute(text("INSERT INTO items (v) VALUES (-43); SELECT 41 + 1"))
        conn.rollback()
    from decimal import Decimal

    assert keys == ["n", "s", "nothing", "d", "a"]
    assert rows == [(1, "100%", None, Decimal("2.5"), [1, 2])] * 2
    assert update.rowcount == 0
    assert several.rowcount == 1  # the first statement's result, as psycopg gives it


@pytest.mark.pgbouncer
def test_transaction_pooling_through_pgbouncer_keeps_working(pgbouncer: Any) -> None:
    """The merged ``BEGIN`` through a real PgBouncer in transaction mode, with another
    client taking the server session between invocations."""
    engine = sqlalchemy.create_engine(
        f"{pgbouncer.dsn}{'&' if '?' in pgbouncer.dsn else '?'}"
        "plugin=lambda_pool&transaction_pooling=true"
    )
    other = pgbouncer.connect()
    try:
        results = []
        for n in range(8):
            with engine.connect() as conn:
                results.append(int(conn.execute(text("SELECT 2")).scalar_one()))
                results.append(
                    int(conn.execute(text("SELECT CAST(:n AS int) * 2"), {"n": n}).scalar_one())
                )
                conn.commit()
            other.execute("SELECT 1")  # another client on the session the engine released
            other.commit()
    finally:
        other.close()
        engine.dispose()
    assert results == [v for n in range(8) for v in (2, n * 2)]


_DIRTY = (
    "SET application_name = 'leaked'",
    "SET SESSION statement_timeout = 12345",
    "SET search_path = leaked_schema, public",
    "CREATE TEMP TABLE leaked_temp (x int)",
    "PREPARE leaked_plan AS SELECT 1",
    "SELECT pg_advisory_lock(4242)",
    "LISTEN leaked_channel",
    "DECLARE leaked_cursor CURSOR WITH HOLD FOR SELECT 1",
)
_STATE = (
    "SELECT pg_backend_pid(), current_setting('application_name'), "
    "current_setting('statement_timeout'), current_setting('search_path'), "
    "to_regclass('pg_temp.leaked_temp'), "
    "(SELECT count(*) FROM pg_prepared_statements WHERE name = 'leaked_plan'), "
    "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()), "
    "(SELECT count(*) FROM pg_listening_channels()), "
    "(SELECT count(*) FROM pg_cursors WHERE name = 'leaked_cursor')"
)
_NAMES = ("pid", "app", "timeout", "path", "temp", "prepared", "locks", "listening", "cursors")


def _dirty(engine: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        for statement in _DIRTY:
            conn.execute(text(statement))
        conn.commit()  # LISTEN takes effect at commit; the rest survives it
        return dict(zip(_NAMES, conn.execute(text(_STATE)).one(), strict=True))


def _assert_clean(clean: dict[str, Any], dirty: dict[str, Any]) -> None:
    assert dirty["app"] == "leaked" and dirty["temp"] is not None and dirty["locks"] == 1
    assert dirty["prepared"] == 1 and dirty["listening"] == 1 and dirty["cursors"] == 1
    assert clean["pid"] == dirty["pid"]  # the same session, reused
    assert clean["app"] != "leaked"
    assert clean["timeout"] != "12345ms"
    assert "leaked_schema" not in clean["path"]
    assert clean["temp"] is None
    assert clean["prepared"] == 0
    assert clean["locks"] == 0
    assert clean["listening"] == 0
    assert clean["cursors"] == 0


def _through_sqlalchemy(engine: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(zip(_NAMES, conn.execute(text(_STATE)).one(), strict=True))


def _through_the_driver_in_autocommit(engine: Any) -> dict[str, Any]:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        return dict(zip(_NAMES, conn.execute(text(_STATE)).one(), strict=True))


def _through_the_raw_driver_connection(engine: Any) -> dict[str, Any]:
    raw = engine.raw_connection()
    try:
        row = raw.driver_connection.execute(_STATE).fetchone()
        raw.driver_connection.rollback()
        return dict(zip(_NAMES, row, strict=True))
    finally:
        raw.close()


def _through_a_driver_transaction_block(engine: Any) -> dict[str, Any]:
    raw = engine.raw_connection()
    try:
        driver = raw.driver_connection
        with driver.transaction():
            row = driver.execute(_STATE).fetchone()
        return dict(zip(_NAMES, row, strict=True))
    finally:
        raw.close()


def _through_a_server_side_cursor(engine: Any) -> dict[str, Any]:
    with engine.connect().execution_options(stream_results=True) as conn:
        return dict(zip(_NAMES, conn.execute(text(_STATE)).one(), strict=True))


def _through_copy(engine: Any) -> dict[str, Any]:
    raw = engine.raw_connection()
    try:
        cursor = raw.driver_connection.cursor()
        with cursor.copy(f"COPY ({_STATE}) TO STDOUT") as copy:
            copy.set_types(["int4", "text", "text", "text", "text"] + ["int8"] * 4)
            (row,) = list(copy.rows())
        raw.driver_connection.rollback()
        return dict(zip(_NAMES, row, strict=True))
    finally:
        raw.close()


@pytest.mark.parametrize(
    "reader",
    [
        _through_sqlalchemy,
        _through_the_driver_in_autocommit,
        _through_the_raw_driver_connection,
        _through_a_driver_transaction_block,
        _through_a_server_side_cursor,
        _through_copy,
    ],
)
def test_nothing_one_invocation_leaves_in_the_session_reaches_the_next(
    wire: Wire, engine: Any, reader: Callable[[Any], dict[str, Any]]
) -> None:
    dirty = _dirty(engine)
    clean = reader(engine)

    _assert_clean(clean, dirty)


def test_the_session_state_stays_unseen_by_the_pool_until_the_next_checkout(
    wire: Wire, engine: Any
) -> None:
    """What the deferral keeps between invocations is the session's own: the advisory
    lock a handler forgot is held until the next checkout (not released at return)."""
    dirty = _dirty(engine)
    with psycopg.connect(wire.server.dsn, autocommit=True) as other:
        held = other.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
            (dirty["pid"],),
        ).fetchone()[0]
        assert held == 1
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        released = other.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = %s",
            (dirty["pid"],),
        ).fetchone()[0]
        assert released == 0


def test_notifications_for_the_last_invocations_listen_do_not_reach_the_next(
    wire: Wire, engine: Any
) -> None:
    with engine.connect() as conn:
        conn.execute(text("LISTEN leaked_channel"))
        conn.commit()
    with psycopg.connect(wire.server.dsn, autocommit=True) as other:
        other.execute("NOTIFY leaked_channel, 'for the last invocation'")
    time.sleep(0.1)  # delivered to the idle session's socket
    with engine.connect() as conn:
        conn.execute(text("LISTEN fresh_channel"))
        conn.commit()
        driver = conn.connection.driver_connection
        got = [n.payload for n in driver.notifies(timeout=0.2, stop_after=1)]
    assert got == []


def test_psycopgs_prepared_statements_stay_consistent_across_the_deferred_reset(
    wire: Wire,
) -> None:
    # Every statement prepared server-side: the reset's DEALLOCATE ALL drops them, and
    # psycopg must forget them too or the next execution names one that is gone.
    engine = warm_engine(wire.url, connect_args={"prepare_threshold": 0})

    def call() -> int:
        with engine.connect() as conn:
            value = int(conn.execute(text("SELECT CAST(:n AS int) + 1"), {"n": 41}).scalar_one())
            prepared = conn.execute(text("SELECT count(*) FROM pg_prepared_statements"))
            assert int(prepared.scalar_one()) >= 1
            conn.commit()
            return value

    assert [call(), call(), call()] == [42, 42, 42]


def test_a_statement_error_is_raised_by_the_statement_that_caused_it(
    wire: Wire, engine: Any
) -> None:
    _dirty(engine)  # the next checkout owes a reset
    with engine.connect() as conn:
        with pytest.raises(sqlalchemy.exc.DataError) as raised:
            conn.execute(text("SELECT 1 / 0"))
        assert isinstance(raised.value.orig, psycopg.errors.DivisionByZero)
        assert "SELECT 1 / 0" in str(raised.value)
        conn.rollback()
        # The reset went through before the failing statement, and was not undone by
        # the rollback of the transaction the statement failed.
        state = dict(zip(_NAMES, conn.execute(text(_STATE)).one(), strict=True))
    assert state["app"] != "leaked" and state["temp"] is None and state["locks"] == 0


def test_a_connection_broken_while_idle_is_replaced_by_the_pre_ping_that_resets_it(
    wire: Wire, raw: RawHeld
) -> None:
    engine = warm_engine(wire.url, pre_ping_idle_seconds=0)
    call = _select_one(engine)
    call()
    call()
    # A ping is due at every checkout: the owed reset is the ping (one round trip).
    replies, statements = wire.count(call, lambda: _backend_pid(engine))
    assert replies == 3 and _RESET.fullmatch(statements[0])
    assert statements[1:] == ["BEGIN; SELECT 1", "COMMIT"]

    old_pid = _backend_pid(engine)
    with psycopg.connect(wire.server.dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    time.sleep(0.1)
    assert call() == 1  # no error: replaced in the checkout
    assert _backend_pid(engine) != old_pid
    assert engine.pool.stats.as_dict()["pre_ping_failures"] >= 1  # type: ignore[attr-defined]


def test_a_connection_broken_while_idle_fails_its_first_statement_and_is_replaced(
    wire: Wire, engine: Any
) -> None:
    """Without a pre-ping due, as before the deferral: the first statement finds the
    connection broken, SQLAlchemy invalidates it and the next checkout opens another."""
    call = _select_one(engine)
    call()
    old_pid = _backend_pid(engine)
    with psycopg.connect(wire.server.dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (old_pid,))
    time.sleep(0.1)
    try:
        call()
    except sqlalchemy.exc.DBAPIError as error:
        assert error.connection_invalidated
    assert call() == 1
    assert _backend_pid(engine) != old_pid


def test_the_deferred_reset_is_bounded_by_the_deadline(wire: Wire) -> None:
    engine = warm_engine(wire.url)
    call = _select_one(engine)
    call()
    old_pid = _backend_pid(engine)
    with (
        wire.proxy.faulted("black_hole"),
        deadlines.deadline(0.5),
        pytest.raises(DeadlineExceededError),
    ):
        call()
    assert call() == 1  # a new connection, reset or not, answers
    assert _backend_pid(engine) != old_pid


def test_sqlalchemy_rolls_back_on_close_without_commit_and_its_reset_event_fires(
    wire: Wire, engine: Any
) -> None:
    from sqlalchemy.pool import PoolResetState

    resets: list[PoolResetState] = []
    event.listen(engine, "reset", lambda dbapi, record, state: resets.append(state))
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO items (v) VALUES (-1)"))
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
        conn.commit()
    with engine.connect() as conn:
        left = int(conn.execute(text("SELECT count(*) FROM items WHERE v = -1")).scalar())

    assert left == 0  # rolled back when the first connection closed without commit
    assert len(resets) == 3  # SQLAlchemy's reset event, once per return


def test_a_second_concurrent_checkout_is_separate_and_closed(wire: Wire, engine: Any) -> None:
    with engine.connect() as first, engine.connect() as second:
        pids = {
            int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
            for conn in (first, second)
        }
    assert len(pids) == 2
    assert engine.pool.checkedout() == 0


def test_session_defaults_the_last_invocation_set_do_not_shape_the_reset_or_the_next(
    wire: Wire, engine: Any
) -> None:
    """The reset's own transaction starts under the old session's defaults (read-only,
    serializable); it still runs, and the next transaction starts under the defaults."""
    with engine.connect() as conn:
        conn.execute(text("SET SESSION default_transaction_read_only = on"))
        conn.execute(text("SET SESSION default_transaction_isolation = 'serializable'"))
        conn.execute(text("CREATE TEMP TABLE leaked_temp (x int)"))
        conn.commit()
    with engine.connect() as conn:
        conn.execute(text("INSERT INTO items (v) VALUES (-44)"))
        isolation = conn.execute(text("SELECT current_setting('transaction_isolation')"))
        assert isolation.scalar_one() == "read committed"
        temp = conn.execute(text("SELECT to_regclass('pg_temp.leaked_temp')")).scalar_one()
        assert temp is None
        conn.rollback()
