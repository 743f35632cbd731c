"""The warm invocation's inline checkout and return keep every rule of the procedures.

A warm ``@with_connection()`` invocation checks the kept connection out and gives it
back without the pool's generator procedures when no I/O and no listener needs them
(``WarmPool.connect`` / ``WarmPool.return_after_session_reset``).  These tests run real
handlers against the real server and pin what must not change: one backend reused and
counted once per invocation, nothing of the session reaching the next invocation,
psycopg's prepared-statement cache emptied with the server's, listeners still fired once
each, the idle ping still sent, a separate connection still closed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest

from lambda_pool import event, with_connection
from lambda_pool.testing.context import LambdaContext
from lambda_pool.testing.postgres import PostgresServer

psycopg = pytest.importorskip("psycopg")


def _invoke(handler: Callable[..., Any], event_: Any = None) -> Any:
    return handler(event_ or {}, LambdaContext(remaining_ms=30_000))


def _backends(url: str, application_name: str) -> int:
    with psycopg.connect(url, autocommit=True) as admin:
        row = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        ).fetchone()
        return int(row[0])


def _url(lp_postgres_url: str, application_name: str) -> str:
    return f"{lp_postgres_url}?application_name={application_name}"


def test_each_warm_invocation_reuses_one_backend_and_counts_one_reuse(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    try:
        pids = {_invoke(handler) for _ in range(6)}
        stats = handler.engine.pool.stats  # type: ignore[attr-defined]
        assert len(pids) == 1
        assert (stats.opened, stats.reused) == (1, 5)
        assert handler.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert _backends(lp_postgres_url, lp_application_name) == 1
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


def test_session_state_set_by_one_invocation_is_gone_at_the_next(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> Any:
        if event.get("dirty"):
            connection.execute("SET work_mem = '7MB'")
            connection.execute("CREATE TEMP TABLE quick_leftover (x int)")
            connection.execute("PREPARE quick_leftover_stmt AS SELECT 1")
            connection.execute("SELECT pg_advisory_lock(4242)")
            return None
        return connection.execute(
            "SELECT current_setting('work_mem'), "
            "(SELECT count(*) FROM pg_prepared_statements), "
            "(SELECT count(*) FROM pg_class WHERE relname = 'quick_leftover'), "
            "(SELECT count(*) FROM pg_locks WHERE locktype = 'advisory')"
        ).one()

    try:
        clean = _invoke(handler)
        _invoke(handler, {"dirty": True})
        assert _invoke(handler) == clean
        assert clean[1:] == (0, 0, 0)
        assert handler.engine.pool.stats.opened == 1  # type: ignore[attr-defined]
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


def test_statements_psycopg_prepared_are_prepared_again_after_the_reset(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    # prepare_threshold=0: psycopg prepares every statement with parameters at once, and
    # keeps its name in a cache; the reset deallocates it on the server with the COMMIT,
    # so the return must empty psycopg's cache too, or the next invocation would execute
    # a statement that no longer exists.
    @with_connection(
        _url(lp_postgres_url, lp_application_name), connect_args={"prepare_threshold": 0}
    )
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT %s::int + 1", (event["n"],)).scalar())

    try:
        assert [_invoke(handler, {"n": n}) for n in range(5)] == [1, 2, 3, 4, 5]
        assert handler.engine.pool.stats.opened == 1  # type: ignore[attr-defined]
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


def test_checkout_reset_and_checkin_listeners_fire_once_per_invocation(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT 1").scalar())

    fired: list[str] = []
    engine = handler.engine  # type: ignore[attr-defined]
    try:
        _invoke(handler)
        for name in ("checkout", "reset", "checkin"):
            event.listen(engine, name, lambda *args, name=name: fired.append(name))
        for _ in range(3):
            _invoke(handler)
        assert fired == ["checkout", "reset", "checkin"] * 3
        assert engine.pool.stats.opened == 1
    finally:
        engine.dispose()


def test_a_connection_idle_past_the_threshold_is_pinged_before_reuse(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name), pre_ping_idle_seconds=0)
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT 1").scalar())

    try:
        for _ in range(4):
            _invoke(handler)
        stats = handler.engine.pool.stats  # type: ignore[attr-defined]
        assert (stats.opened, stats.pre_pings, stats.reused) == (1, 3, 3)
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


def test_an_invocation_inside_another_gets_a_separate_connection_closed_on_return(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    url = _url(lp_postgres_url, lp_application_name)

    @with_connection(url)
    def inner(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    @with_connection(engine=inner.engine)  # type: ignore[attr-defined]
    def outer(event: Any, context: Any, connection: Any) -> tuple[int, int]:
        mine = int(connection.execute("SELECT pg_backend_pid()").scalar())
        return mine, _invoke(inner)

    try:
        kept = _invoke(inner)
        mine, separate = _invoke(outer)
        assert mine == kept != separate
        assert _backends(lp_postgres_url, lp_application_name) == 1
        assert _invoke(inner) == kept
        assert inner.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
    finally:
        inner.engine.dispose()  # type: ignore[attr-defined]


def test_a_backend_terminated_between_invocations_is_replaced_without_an_error(
    lp_postgres: PostgresServer, lp_postgres_url: str, lp_application_name: str
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    try:
        first = _invoke(handler)
        # Waits until the backend is gone: its goodbye is then on the socket.
        assert lp_postgres.terminate(lp_application_name) == 1
        second = _invoke(handler)
        assert second != first
        assert handler.engine.pool.stats.opened == 2  # type: ignore[attr-defined]
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


_RULES: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    # (case, WarmConnectionInfo changes, ReusePolicy/other settings, connection state)
    ("reusable", {}, {}, "idle"),
    ("opened by another process", {"opener_pid": -1}, {}, "idle"),
    ("opened before a SnapStart restore", {"opened_generation": -1}, {}, "idle"),
    ("its last reset failed", {"reset_failed": True}, {}, "idle"),
    ("idle longer than the threshold", {"last_used_at": -3600.0}, {}, "idle"),
    ("the wall clock went backwards", {"last_used_at": 3600.0}, {}, "idle"),
    ("pinged at every checkout", {}, {"pre_ping_idle_seconds": 0.0}, "idle"),
    ("never pinged", {"last_used_at": -3600.0}, {"pre_ping_idle_seconds": None}, "idle"),
    ("older than recycle", {"opened_at": -3600.0}, {"recycle": 60.0}, "idle"),
    ("credentials expired", {}, {"expired": True}, "idle"),
    (
        "credentials expired, recycle on expiry off",
        {},
        {"expired": True, "recycle_on_credentials_expiry": False},
        "idle",
    ),
    ("left in a transaction", {}, {}, "in transaction"),
    ("closed", {}, {}, "closed"),
    ("the server said goodbye", {}, {}, "terminated"),
]


@pytest.mark.parametrize(
    ("case", "info_changes", "settings", "state"), _RULES, ids=[rule[0] for rule in _RULES]
)
def test_the_quick_reuse_check_agrees_with_the_guards_decision(
    lp_postgres: PostgresServer,
    lp_postgres_url: str,
    lp_application_name: str,
    case: str,
    info_changes: dict[str, Any],
    settings: dict[str, Any],
    state: str,
) -> None:
    import dataclasses

    from lambda_pool.warm import Reuse, ReusePolicy, warm_engine
    from lambda_pool.warm.guard import WARM_INFO_KEY

    engine = warm_engine(_url(lp_postgres_url, lp_application_name))
    try:
        with engine.connect() as connection:
            connection.execute("SELECT 1")
            connection.commit()
        pool = engine.pool
        record = pool._slots.record  # type: ignore[attr-defined]
        guard = pool._guard  # type: ignore[attr-defined]
        info = record.info[WARM_INFO_KEY]
        now = guard.clock()
        for name, change in info_changes.items():
            # Times are given relative to now; the rest as they are.
            value = now + change if name in {"last_used_at", "opened_at"} else change
            setattr(info, name, value)
        policy_changes = {
            key: value
            for key, value in settings.items()
            if key in {f.name for f in dataclasses.fields(ReusePolicy)}
        }
        guard.policy = dataclasses.replace(guard.policy, **policy_changes)
        expire_at = now - 1.0 if settings.get("expired") else None
        conn = record.dbapi_connection
        if state == "in transaction":
            conn.execute("SELECT 1")
        elif state == "closed":
            conn.close()
        elif state == "terminated":
            assert lp_postgres.terminate(lp_application_name) == 1

        decision = guard.decide(conn, info, expire_at)
        assert guard.reusable_now(conn, info, expire_at) is isinstance(decision, Reuse), (
            case,
            decision,
        )
        if case in {"reusable", "never pinged", "credentials expired, recycle on expiry off"}:
            assert isinstance(decision, Reuse), case
        if state == "in transaction":
            conn.rollback()
    finally:
        engine.dispose()


def test_an_interruption_in_the_warm_checkout_gives_the_slot_back_and_keeps_the_connection(
    lp_postgres_url: str, lp_application_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> int:
        return int(connection.execute("SELECT pg_backend_pid()").scalar())

    try:
        first = _invoke(handler)
        guard = handler.engine.pool._guard  # type: ignore[attr-defined]
        real = guard.reusable_now
        resets: list[object] = []
        event.listen(handler.engine, "reset", lambda *args: resets.append(args))  # type: ignore[attr-defined]

        def interrupted(*args: Any) -> bool:
            monkeypatch.setattr(guard, "reusable_now", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(guard, "reusable_now", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _invoke(handler)
        # Given back at once, untouched: not left for the garbage collector to return
        # (which would reset a session nobody used).
        assert handler.engine.pool.checkedout() == 0  # type: ignore[attr-defined]
        assert resets == []
        assert _invoke(handler) == first
        stats = handler.engine.pool.stats  # type: ignore[attr-defined]
        assert (stats.opened, stats.overflow_connections) == (1, 0)
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "setting",
    ["default", "autocommit", "isolation_level", "read_only", "deferrable", "pipeline", "in_tx"],
)
def test_the_opening_check_reads_psycopgs_fields_as_its_properties_do(
    lp_postgres_url: str, setting: str
) -> None:
    """``psycopg_opens_in_pipeline`` reads the fields behind psycopg's properties (every
    invocation asks); each public setting that changes ``BEGIN`` must still turn it off,
    and the answer must be the one the public properties give."""
    from lambda_pool.dialects.psycopg import psycopg_opens_in_pipeline

    def by_properties(conn: Any) -> bool:
        return (
            not conn.autocommit
            and conn.info.transaction_status == 0
            and conn.isolation_level is None
            and conn.read_only is None
            and conn.deferrable is None
            and getattr(conn, "_pipeline", None) is None
        )

    with psycopg.connect(lp_postgres_url) as conn:
        for name in ("_autocommit", "_isolation_level", "_read_only", "_deferrable", "_pipeline"):
            assert hasattr(conn, name), f"psycopg no longer has {name}: the fallback runs"
        with contextlib.ExitStack() as stack:
            if setting == "autocommit":
                conn.autocommit = True
            elif setting == "isolation_level":
                conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            elif setting == "read_only":
                conn.read_only = True
            elif setting == "deferrable":
                conn.deferrable = True
            elif setting == "pipeline":
                stack.enter_context(conn.pipeline())
            elif setting == "in_tx":
                conn.execute("SELECT 1")
            expected = setting == "default"
            assert by_properties(conn) is expected
            assert psycopg_opens_in_pipeline(conn) is expected


# What one warm invocation of a psycopg @with_connection() handler running one statement
# calls in lambda-pool (issue 9 goal 2: every Python call costs about a thousand
# instructions, billed at every invocation).  A change that adds a call, or that sends
# the invocation off the lane (the pool's procedures, a second reset), changes this set:
# update it knowingly, with `make bench`'s "Client CPU per warm invocation" beside it.
_WARM_INVOCATION_CALLS = {
    "handler.py:handler": 1,  # the decorator's wrapper
    "handler.py:__init__": 1,  # _Deadline: the bound and the statement policy in one
    "testing/context.py:get_remaining_time_in_millis": 1,
    "warm/warm_pool.py:connect": 1,
    "pool/base.py:__init__": 1,  # the LentWarmConnection proxy
    "warm/guard.py:reusable_now": 1,
    "engine_core.py:__init__": 1,  # the InvocationConnection
    "handler.py:execute": 1,
    "dialects/psycopg.py:psycopg_opens_in_pipeline": 1,
    "handler.py:_prelude_now": 1,
    "dialects/psycopg.py:psycopg_execute_opening": 1,
    "dialects/psycopg.py:opening_query": 1,
    "dialects/psycopg.py:opening_outcome": 1,
    "dialects/_psycopg_deadline.py:wait": 2,
    "result.py:__init__": 1,
    "handler.py:_commit_and_return_in_lane": 1,
    "dialects/psycopg.py:psycopg_commit_then": 1,
    "warm/warm_pool.py:return_after_session_reset": 1,
    "pool/base.py:__del__": 1,  # the proxy, freed
}


def test_a_warm_invocation_calls_only_the_lanes_functions_once_each(
    lp_postgres_url: str, lp_application_name: str
) -> None:
    import cProfile
    import pstats
    from pathlib import Path

    import lambda_pool

    package = str(Path(lambda_pool.__file__).parent) + "/"

    @with_connection(_url(lp_postgres_url, lp_application_name))
    def handler(event: Any, context: Any, connection: Any) -> None:
        connection.execute("SELECT 1")

    context = LambdaContext(remaining_ms=30_000)
    try:
        for _ in range(3):  # cold, then warm: caches filled
            handler({}, context)
        profile = cProfile.Profile()
        profile.enable()
        handler({}, context)
        profile.disable()
        called: dict[str, int] = {}
        for (filename, _, name), row in pstats.Stats(profile).stats.items():  # type: ignore[attr-defined]
            if filename.startswith(package):
                key = f"{filename[len(package) :]}:{name}"
                called[key] = called.get(key, 0) + row[1]
        # Once any engine of the process was instrumented (an earlier test may have),
        # the wrapper asks whether this one is: one call more, never on this path alone.
        assert called.pop("observability.py:instrumentation_for", 0) <= 1
        assert called == _WARM_INVOCATION_CALLS
    finally:
        handler.engine.dispose()  # type: ignore[attr-defined]
