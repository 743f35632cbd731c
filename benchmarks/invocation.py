"""Invocation cost: what one simulated Lambda invocation spends on its database.

Each operation is the body of a handler: check a connection out, ``SELECT 1``,
commit, give it back.  With lambda-pool's default ``NullPool`` that means a new
connection (TCP, TLS when the server offers it, authentication, backend start) and
its close every time; with the warm engine, the container's one connection reused.
The ratio is why the warm cache exists.  Compared with the ``NullPool`` row, and with
the floor: a raw psycopg connection held in a global doing the same statements
(``SELECT 1``, ``commit()``), which no pool can beat.

The ``@with_connection()`` rows are what a Lambda handler pays per warm invocation
(deadline on: ``SET LOCAL statement_timeout`` and the client-side bound; and with
``statement_timeout=None``).  Besides the time per invocation, each row records the
client's own CPU (user time of this process, ``getrusage``) per invocation against the
raw held connection's, measured in a second interleaved pass: wall time on loopback
includes the server's work, which both sides share.
"""

from __future__ import annotations

import contextlib
import gc
import random
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks import contenders
from benchmarks.report import Section, add_case_rows
from benchmarks.server import Database
from benchmarks.timing import Case, run_interleaved

__all__ = ["measure_invocation", "raw_with_handler_messages"]

NULLPOOL = "NullPool"
RAW = "raw held"
WARM_WALL = "warm pass us/op (x raw)"
WARM_CPU = "user CPU us/op (x raw)"


def _invocation(engine: Any) -> Any:
    def op() -> None:
        with engine.connect() as conn:
            conn.execute("SELECT 1")
            conn.commit()

    return op


def _raw_held(stack: contextlib.ExitStack, url: str) -> Any:
    """The floor: one psycopg connection opened once and kept, as a global would be."""
    import psycopg

    conn = psycopg.connect(url)
    stack.callback(conn.close)

    def op() -> None:
        conn.execute("SELECT 1")
        conn.commit()

    return op


def raw_with_handler_messages(stack: contextlib.ExitStack, url: str) -> Any:
    """The floor of a correct warm invocation: a raw held psycopg connection sending the
    two messages lambda-pool's warm handler sends (``BEGIN; SET LOCAL statement_timeout;
    SELECT 1`` and ``COMMIT; <session reset>``) with the deadline set, through the same
    functions, and nothing else: what remains between this row and the handler's is
    lambda-pool's own work; between this row and the raw held one, the reset's."""
    import psycopg

    from lambda_pool import deadlines
    from lambda_pool.dialects._psycopg_deadline import DeadlineConnection
    from lambda_pool.dialects.psycopg import psycopg_commit_then, psycopg_execute_opening
    from lambda_pool.warm.reset import SESSION_RESET_STATEMENTS

    conn = DeadlineConnection.connect(url, prepare_threshold=None)
    stack.callback(conn.close)
    assert isinstance(conn, psycopg.Connection)
    prelude = ["SET LOCAL statement_timeout = 86400000"]

    def op() -> None:
        with deadlines.use(deadlines.Deadline.after(86400.0)):
            psycopg_execute_opening(conn, "SELECT 1", None, prelude)
            psycopg_commit_then(conn, SESSION_RESET_STATEMENTS)

    return op


def _decorated(stack: contextlib.ExitStack, url: str, statement_timeout: Any) -> Case:
    """A warm ``@with_connection()`` handler running ``SELECT 1``, invoked as Lambda
    would (a context whose remaining time is far from the end)."""
    import lambda_pool
    from lambda_pool.testing.context import LambdaContext

    @lambda_pool.with_connection(url, statement_timeout=statement_timeout)
    def handler(event: Any, context: Any, connection: Any) -> None:
        connection.execute("SELECT 1")

    stack.callback(handler.engine.dispose)  # type: ignore[attr-defined]
    context = LambdaContext(remaining_ms=24 * 3600 * 1000)

    def invoke() -> None:
        handler({}, context)

    engine = handler.engine  # type: ignore[attr-defined]
    if statement_timeout is None:
        return Case(
            "invocation.lambda_pool.with_connection.no_timeout",
            "lambda-pool @with_connection() warm handler, statement_timeout=None",
            invoke,
            "invocation",
            facts=contenders.warm_stats_since_now(engine),
        )
    return Case(
        "invocation.lambda_pool.with_connection",
        "lambda-pool @with_connection() warm handler, deadline on",
        invoke,
        "invocation",
        facts=contenders.warm_stats_since_now(engine),
    )


def _block_cost(op: Callable[[], None], count: int) -> tuple[float, float]:
    """``(wall µs, user CPU µs)`` per call of ``count`` calls back to back."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    start = time.perf_counter()
    for _ in range(count):
        op()
    wall = time.perf_counter() - start
    user = resource.getrusage(resource.RUSAGE_SELF).ru_utime - before
    return wall / count * 1e6, user / count * 1e6


def _warm_pass(cases: Sequence[Case], *, rounds: int, ops: int) -> dict[str, tuple[float, float]]:
    """Median ``(wall µs, user CPU µs)`` per call of each case, over rounds run
    interleaved in shuffled order with the garbage collector off in a block.

    The warm contenders only (no connect per call), so blocks can be long: ``getrusage``
    counts in scheduler ticks on some kernels, and a block spanning many of them keeps
    the rounding small."""
    rng = random.Random(20261202)
    samples: dict[str, list[tuple[float, float]]] = {case.id: [] for case in cases}
    order = list(cases)
    for _ in range(rounds):
        rng.shuffle(order)
        for case in order:
            gc.disable()
            try:
                samples[case.id].append(_block_cost(case.op, ops))  # type: ignore[arg-type]
            finally:
                gc.enable()
        gc.collect()
    return {
        key: (
            statistics.median(wall for wall, _ in values),
            statistics.median(user for _, user in values),
        )
        for key, values in samples.items()
    }


def measure_invocation(
    db: Database, *, rounds: int, ops_per_round: int, warmup_ops: int
) -> Section:
    """Time NullPool against the warm engine (fast path, and pinging), interleaved."""
    with contextlib.ExitStack() as stack:
        nullpool = contenders.lambda_pool_engine(stack, db.lambda_pool_url)
        warm = contenders.warm_engine(stack, db.lambda_pool_url, pre_ping_idle_seconds=3600.0)
        warm_ping = contenders.warm_engine(stack, db.lambda_pool_url, pre_ping_idle_seconds=0.0)
        group = "invocation"
        cases = [
            Case(
                "invocation.raw_held",
                "raw psycopg connection held in a global (the floor)",
                _raw_held(stack, db.libpq_url),
                group,
                role=RAW,
            ),
            Case(
                "invocation.lambda_pool.nullpool",
                "lambda-pool create_engine() default (NullPool): connect each time",
                _invocation(nullpool),
                group,
                role=NULLPOOL,
            ),
            Case(
                "invocation.lambda_pool.warm",
                "lambda-pool warm engine (fast path)",
                _invocation(warm),
                group,
                facts=contenders.warm_stats_since_now(warm),
            ),
            Case(
                "invocation.lambda_pool.warm.preping",
                "lambda-pool warm engine (after idle: ping)",
                _invocation(warm_ping),
                group,
                facts=contenders.warm_stats_since_now(warm_ping),
            ),
            Case(
                "invocation.raw_held.lambda_pool_messages",
                "raw held, sending the warm handler's two messages (reset, deadline)",
                raw_with_handler_messages(stack, db.libpq_url),
                group,
            ),
            _decorated(stack, db.lambda_pool_url, "deadline"),
            _decorated(stack, db.lambda_pool_url, None),
        ]
        run_interleaved(cases, rounds=rounds, ops_per_round=ops_per_round, warmup_ops=warmup_ops)
        facts = {case.id: case.facts() for case in cases if case.facts is not None}
        warm_cases = [case for case in cases if case.role != NULLPOOL]
        warm_costs = _warm_pass(warm_cases, rounds=max(5, rounds), ops=max(50, ops_per_round * 20))

    section = Section(
        name="invocation",
        title="Invocation (checkout, SELECT 1, commit, return)",
        unit="us/op",
        baselines=[NULLPOOL, RAW],
        notes=[
            "x NullPool < 1 means cheaper than opening a connection per invocation",
            "x raw held: against a psycopg connection kept in a global, the same statements",
            f"median of {rounds} interleaved rounds x {ops_per_round} invocations",
            "warm pass: the contenders that keep a connection again, in longer blocks "
            f"({max(5, rounds)} interleaved rounds x {max(50, ops_per_round * 20)}): time per "
            "invocation and this process's user CPU (getrusage) per invocation, each "
            "against the raw held connection's; loopback time includes the server's work",
        ],
        extra_columns=[WARM_WALL, WARM_CPU],
    )
    add_case_rows(section, cases, facts)
    raw_wall, raw_cpu = warm_costs["invocation.raw_held"]
    for row in section.rows:
        if row.id not in warm_costs:
            continue
        wall, user = warm_costs[row.id]
        row.extra[WARM_WALL] = f"{wall:,.0f} ({wall / raw_wall:.2f}x)"
        row.extra[WARM_CPU] = f"{user:,.1f} ({user / raw_cpu:.2f}x)" if raw_cpu > 0 else "n/a"
        row.facts["warm_pass_us"] = round(wall, 1)
        row.facts["client_user_cpu_us"] = round(user, 1)
    return section
