"""Invocation cost: what one simulated Lambda invocation spends on its database.

Each operation is the body of a handler: check a connection out, ``SELECT 1``,
commit, give it back.  With lambda-pool's default ``NullPool`` that means a new
connection (TCP, TLS when the server offers it, authentication, backend start) and
its close every time; with the warm engine, the container's one connection reused.
The ratio is why the warm cache exists.  Compared with the ``NullPool`` row, and with
the floor: a raw psycopg connection held in a global doing the same statements
(``SELECT 1``, ``commit()``), which no pool can beat.
"""

from __future__ import annotations

import contextlib
from typing import Any

from benchmarks import contenders
from benchmarks.report import Section, add_case_rows
from benchmarks.server import Database
from benchmarks.timing import Case, run_interleaved

__all__ = ["measure_invocation"]

NULLPOOL = "NullPool"
RAW = "raw held"


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
        ]
        run_interleaved(cases, rounds=rounds, ops_per_round=ops_per_round, warmup_ops=warmup_ops)
        facts = {case.id: case.facts() for case in cases if case.facts is not None}

    section = Section(
        name="invocation",
        title="Invocation (checkout, SELECT 1, commit, return)",
        unit="us/op",
        baselines=[NULLPOOL, RAW],
        notes=[
            "x NullPool < 1 means cheaper than opening a connection per invocation",
            "x raw held: against a psycopg connection kept in a global, the same statements",
            f"median of {rounds} interleaved rounds x {ops_per_round} invocations",
        ],
    )
    add_case_rows(section, cases, facts)
    return section
