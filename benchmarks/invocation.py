"""Invocation cost: what one simulated Lambda invocation spends on its database.

Each operation is the body of a handler: check a connection out, ``SELECT 1``,
commit, give it back.  With lambda-pool's default ``NullPool`` that means a new
connection (TCP, TLS when the server offers it, authentication, backend start) and
its close every time; with the warm engine, the container's one connection reused.
The ratio is why the warm cache exists.  Compared with the ``NullPool`` row.
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


def _invocation(engine: Any) -> Any:
    def op() -> None:
        with engine.connect() as conn:
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
        baselines=[NULLPOOL],
        notes=[
            "x NullPool < 1 means cheaper than opening a connection per invocation",
            f"median of {rounds} interleaved rounds x {ops_per_round} invocations",
        ],
    )
    add_case_rows(section, cases, facts)
    return section
