"""Capacity storms: more warm Lambda containers (real processes) than the server has slots.

A dedicated server with ``max_connections=5`` keeps 2 slots for the application role (3
are reserved for superusers).  Four processes start at the same moment, each running
``@with_connection()`` invocations on a warm engine: two get a slot and keep it across
their invocations (as warm containers do), the other two are refused with SQLSTATE 53300
until a holder exits.  Between invocations a container idles, keeping its warm
connection (and its slot), like a warm Lambda container between requests.  The holders
keep their slot longer than the old count-based retries lasted (at most 4 attempts and
0.7 s of backoff), so the test shows the
deadline-based budget: a storm that fits in the deadline ends with no failure, one that
does not ends with :class:`~lambda_pool.exc.CapacityExhaustedError` before the deadline.
What was committed is checked from another connection: exactly the successful
invocations' rows.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lambda_pool.testing.postgres import EmbeddedPostgres

#: Slots the application role can use: max_connections minus the superuser reserve (3).
MAX_CONNECTIONS = 5
PROCESSES = 4


@pytest.fixture(scope="module")
def small_server() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(ssl=False, max_connections=MAX_CONNECTIONS) as server:
        yield server


@pytest.fixture
def table(small_server: EmbeddedPostgres) -> Iterator[str]:
    name = f"storm_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(small_server.admin_dsn, dbname=small_server.dbname) as conn:
        conn.execute(f"CREATE TABLE {name} (worker int, n int)")
        conn.execute(f"GRANT ALL ON {name} TO {small_server.user}")
    yield name
    with psycopg.connect(small_server.admin_dsn, dbname=small_server.dbname) as conn:
        conn.execute(f"DROP TABLE {name}")


class _CountRefusals(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.refusals = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "refused for lack of connection slots" in record.getMessage():
            self.refusals += 1


def _container(
    worker: int,
    url: str,
    table: str,
    invocations: int,
    idle_seconds: float,
    remaining_ms: int,
    start: Any,
    results: Any,
) -> None:
    """One warm Lambda container: ``invocations`` invocations one after the other."""
    from lambda_pool import with_connection
    from lambda_pool.testing.context import LambdaContext

    counter = _CountRefusals()
    engine_log = logging.getLogger("lambda_pool.engine")
    engine_log.addHandler(counter)
    engine_log.setLevel(logging.INFO)
    margin_ms = 200

    @with_connection(url, warm=True, timeout_margin_ms=margin_ms)
    def handler(event: Any, context: Any, connection: Any) -> None:
        connection.execute(f"INSERT INTO {table} VALUES (%s, %s)", (worker, event["n"]))
        connection.execute("SELECT pg_sleep(0.02)")

    outcomes: list[dict[str, Any]] = []
    start.wait()
    for n in range(invocations):
        began = time.monotonic()
        outcome: dict[str, Any] = {"worker": worker, "n": n, "error": None}
        try:
            # with_connection bounds the invocation by the context's time minus the margin.
            handler({"n": n}, LambdaContext(remaining_ms=remaining_ms))
        except Exception as exc:
            outcome.update(
                error=type(exc).__name__,
                message=str(exc),
                attempts=getattr(exc, "attempts", None),
                elapsed_ms=getattr(exc, "elapsed_ms", None),
                cause=type(exc.__cause__).__name__ if exc.__cause__ else None,
                cause_message=str(exc.__cause__) if exc.__cause__ else None,
            )
        outcome["seconds"] = time.monotonic() - began
        outcomes.append(outcome)
        time.sleep(idle_seconds)
    results.put((outcomes, counter.refusals))


def _storm(
    server: EmbeddedPostgres,
    table: str,
    *,
    invocations: int,
    idle_seconds: float,
    remaining_ms: int,
) -> tuple[list[dict[str, Any]], int]:
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    processes = [
        context.Process(
            target=_container,
            args=(
                worker,
                server.dsn,
                table,
                invocations,
                idle_seconds,
                remaining_ms,
                start,
                results,
            ),
        )
        for worker in range(PROCESSES)
    ]
    for process in processes:
        process.start()
    start.set()
    outcomes: list[dict[str, Any]] = []
    refusals = 0
    try:
        for _ in processes:
            found, refused = results.get(timeout=120)
            outcomes += found
            refusals += refused
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    assert server.backend_count(user=server.user) == 0  # every container closed its own
    return outcomes, refusals


def _committed(server: EmbeddedPostgres, table: str) -> set[tuple[int, int]]:
    with psycopg.connect(server.dsn) as conn:
        return {(int(w), int(n)) for w, n in conn.execute(f"SELECT worker, n FROM {table}")}


def test_a_storm_that_fits_in_the_deadline_ends_without_a_failure(
    small_server: EmbeddedPostgres, table: str
) -> None:
    # The first two containers hold their slots for 4 x 0.4 s; the 8 s deadline leaves
    # the other two time to wait for them.
    outcomes, refusals = _storm(
        small_server, table, invocations=4, idle_seconds=0.4, remaining_ms=8000
    )
    failures = [outcome for outcome in outcomes if outcome["error"]]
    assert refusals > 0, "the storm never met the connection limit"
    assert failures == []
    assert len(outcomes) == PROCESSES * 4
    assert _committed(small_server, table) == {(o["worker"], o["n"]) for o in outcomes}


def test_a_storm_that_does_not_fit_fails_before_the_deadline_saying_capacity_was_exhausted(
    small_server: EmbeddedPostgres, table: str
) -> None:
    # The holders keep their slots for 3 x 0.8 s; a waiter has 1 s (minus the margin).
    remaining_ms = 1000
    outcomes, refusals = _storm(
        small_server, table, invocations=3, idle_seconds=0.8, remaining_ms=remaining_ms
    )
    failures = [outcome for outcome in outcomes if outcome["error"]]
    assert refusals > 0
    exhausted = [f for f in failures if f["error"] == "CapacityExhaustedError"]
    assert exhausted, "a waiter should have run out of time"
    # A waiter that got its slot with too little time left for its statement fails on
    # the statement's deadline instead: also before the deadline, also nothing written.
    assert {f["error"] for f in failures} <= {"CapacityExhaustedError", "DeadlineExceededError"}
    for failure in exhausted:
        assert failure["attempts"] >= 2
        assert failure["elapsed_ms"] < remaining_ms
        assert "capacity exhausted" in failure["message"]
        assert failure["cause"] == "OperationalError"
        assert "connection slots are reserved" in failure["cause_message"]
        assert small_server.password not in failure["message"]
    succeeded = {(o["worker"], o["n"]) for o in outcomes if not o["error"]}
    assert _committed(small_server, table) == succeeded  # nothing lost, nothing extra
