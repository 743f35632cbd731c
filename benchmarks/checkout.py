"""Checkout + return cost: one connection taken from a pool and given back, per operation.

Contenders, each built as its library's users build it:

* lambda-pool ``create_engine(url, poolclass=QueuePool)`` → ``engine.raw_connection().close()``
* SQLAlchemy ``create_engine(url, poolclass=QueuePool)`` → the same calls
* psycopg_pool ``ConnectionPool``: ``putconn(getconn())`` and ``with pool.connection()``
* lambda-pool's warm engine (``WarmPool``): its fast path (connection reused without a
  round trip), and its path after an idle gap (``pre_ping_idle_seconds=0``: a ping at
  every checkout).  Its return also resets the session (``DISCARD ALL``, one round
  trip), which the other pools do not do: that is the price of handing the next
  invocation a clean session, and it is part of the figure.

Drivers: sqlite3 (a file database; lambda-pool and SQLAlchemy only) and psycopg.  Each
with and without pre-ping (psycopg_pool: ``check=ConnectionPool.check_connection``).
Ratios are taken within a group (same driver, same pre-ping setting).

Contention: 8 threads share a pool of 4 connections (``pool_size=4, max_overflow=0``;
psycopg_pool ``min_size=max_size=4``), each checking out and returning in a loop, so
callers wait for each other.  The figure is wall time per checkout+return over the
whole burst (all threads started together; thread start-up is in every row alike).
"""

from __future__ import annotations

import contextlib
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import contenders
from benchmarks.report import Section, add_case_rows
from benchmarks.server import Database
from benchmarks.timing import Case, run_interleaved

__all__ = ["measure_checkout"]

SQLALCHEMY = "SQLAlchemy"
PSYCOPG_POOL = "psycopg_pool"


def _raw_checkout(engine: Any) -> Any:
    def op() -> None:
        engine.raw_connection().close()

    return op


def _getconn_putconn(pool: Any) -> Any:
    def op() -> None:
        pool.putconn(pool.getconn())

    return op


def _connection_cm(pool: Any) -> Any:
    def op() -> None:
        with pool.connection():
            pass

    return op


def _sqlite_cases(stack: contextlib.ExitStack, directory: Path) -> list[Case]:
    import sqlalchemy.pool

    import lambda_pool

    url = f"sqlite:///{directory / 'bench.db'}"
    cases = []
    for ping in (False, True):
        group = f"sqlite3{' + pre-ping' if ping else ''}"
        suffix = ".preping" if ping else ""
        ours = contenders.lambda_pool_engine(
            stack, url, poolclass=lambda_pool.QueuePool, pool_pre_ping=ping
        )
        theirs = contenders.sqlalchemy_engine(
            stack, url, poolclass=sqlalchemy.pool.QueuePool, pool_pre_ping=ping
        )
        cases += [
            Case(
                f"checkout.sqlite.lambda_pool.queuepool{suffix}",
                f"[{group}] lambda-pool QueuePool",
                _raw_checkout(ours),
                group,
            ),
            Case(
                f"checkout.sqlite.sqlalchemy.queuepool{suffix}",
                f"[{group}] SQLAlchemy QueuePool",
                _raw_checkout(theirs),
                group,
                role=SQLALCHEMY,
            ),
        ]
    return cases


def _psycopg_cases(stack: contextlib.ExitStack, db: Database) -> list[Case]:
    import sqlalchemy.pool

    import lambda_pool

    cases: list[Case] = []
    for ping in (False, True):
        group = f"psycopg{' + pre-ping' if ping else ''}"
        suffix = ".preping" if ping else ""
        ours = contenders.lambda_pool_engine(
            stack, db.lambda_pool_url, poolclass=lambda_pool.QueuePool, pool_pre_ping=ping
        )
        theirs = contenders.sqlalchemy_engine(
            stack, db.sqlalchemy_url, poolclass=sqlalchemy.pool.QueuePool, pool_pre_ping=ping
        )
        peer = contenders.psycopg_pool(stack, db.libpq_url, check=ping)
        cases += [
            Case(
                f"checkout.psycopg.lambda_pool.queuepool{suffix}",
                f"[{group}] lambda-pool QueuePool",
                _raw_checkout(ours),
                group,
            ),
            Case(
                f"checkout.psycopg.sqlalchemy.queuepool{suffix}",
                f"[{group}] SQLAlchemy QueuePool",
                _raw_checkout(theirs),
                group,
                role=SQLALCHEMY,
            ),
            Case(
                f"checkout.psycopg.psycopg_pool.getconn{suffix}",
                f"[{group}] psycopg_pool getconn/putconn{' (check)' if ping else ''}",
                _getconn_putconn(peer),
                group,
                role=PSYCOPG_POOL,
            ),
            Case(
                f"checkout.psycopg.psycopg_pool.connection{suffix}",
                f"[{group}] psycopg_pool with pool.connection(){' (check)' if ping else ''}",
                _connection_cm(peer),
                group,
            ),
        ]
    # pre_ping_idle_seconds=0: a ping at every checkout, the path a checkout takes
    # after the container sat idle.
    warm_ping = _warm(stack, db, pre_ping_idle_seconds=0.0)
    cases.append(
        Case(
            "checkout.psycopg.lambda_pool.warm.preping",
            "[psycopg + pre-ping] lambda-pool warm engine (after idle: ping)",
            _raw_checkout(warm_ping),
            "psycopg + pre-ping",
            facts=contenders.warm_stats_since_now(warm_ping),
        )
    )
    return cases + _session_reset_cases(stack, db)


def _warm(stack: contextlib.ExitStack, db: Database, *, pre_ping_idle_seconds: float) -> Any:
    return contenders.warm_engine(
        stack, db.lambda_pool_url, pre_ping_idle_seconds=pre_ping_idle_seconds
    )


def _session_reset_cases(stack: contextlib.ExitStack, db: Database) -> list[Case]:
    """The warm engine's fast path against peers that also reset the session on return."""
    import sqlalchemy.pool

    group = "psycopg + DISCARD ALL"
    # Far above the run's length: every checkout takes the fast path (no ping).
    warm = _warm(stack, db, pre_ping_idle_seconds=3600.0)
    theirs = contenders.sqlalchemy_engine(
        stack, db.sqlalchemy_url, poolclass=sqlalchemy.pool.QueuePool, pool_reset_on_return=None
    )
    contenders.sqlalchemy_discard_all_on_return(theirs)
    peer = contenders.psycopg_pool(stack, db.libpq_url, check=False, reset=True)
    return [
        Case(
            "checkout.psycopg.lambda_pool.warm",
            f"[{group}] lambda-pool warm engine (fast path)",
            _raw_checkout(warm),
            group,
            facts=contenders.warm_stats_since_now(warm),
        ),
        Case(
            "checkout.psycopg.sqlalchemy.queuepool.discard",
            f"[{group}] SQLAlchemy QueuePool + reset listener",
            _raw_checkout(theirs),
            group,
            role=SQLALCHEMY,
        ),
        Case(
            "checkout.psycopg.psycopg_pool.getconn.discard",
            f"[{group}] psycopg_pool getconn/putconn, reset=",
            _getconn_putconn(peer),
            group,
            role=PSYCOPG_POOL,
        ),
    ]


CONTENTION_THREADS = 8
CONTENTION_POOL = 4


def _burst(one: Any, per_thread: int) -> Any:
    """``CONTENTION_THREADS`` threads, started together, each calling ``one`` ``per_thread``
    times; one call of the result is one burst."""

    def op() -> None:
        start = threading.Barrier(CONTENTION_THREADS)

        def work() -> None:
            start.wait()
            for _ in range(per_thread):
                one()

        threads = [threading.Thread(target=work) for _ in range(CONTENTION_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    return op


def _contention_cases(stack: contextlib.ExitStack, db: Database, per_thread: int) -> list[Case]:
    import sqlalchemy.pool
    from psycopg_pool import ConnectionPool

    import lambda_pool

    group = f"psycopg, {CONTENTION_THREADS} threads, pool of {CONTENTION_POOL}"
    sizes = {"pool_size": CONTENTION_POOL, "max_overflow": 0}
    ours = contenders.lambda_pool_engine(
        stack, db.lambda_pool_url, poolclass=lambda_pool.QueuePool, **sizes
    )
    theirs = contenders.sqlalchemy_engine(
        stack, db.sqlalchemy_url, poolclass=sqlalchemy.pool.QueuePool, **sizes
    )
    peer = ConnectionPool(
        db.libpq_url,
        min_size=CONTENTION_POOL,
        max_size=CONTENTION_POOL,
        open=True,
        name="bench-contention",
    )
    stack.callback(peer.close)
    peer.wait(timeout=30.0)
    return [
        Case(
            "checkout.contention.lambda_pool.queuepool",
            f"[{group}] lambda-pool QueuePool",
            _burst(_raw_checkout(ours), per_thread),
            group,
        ),
        Case(
            "checkout.contention.sqlalchemy.queuepool",
            f"[{group}] SQLAlchemy QueuePool",
            _burst(_raw_checkout(theirs), per_thread),
            group,
            role=SQLALCHEMY,
        ),
        Case(
            "checkout.contention.psycopg_pool.getconn",
            f"[{group}] psycopg_pool getconn/putconn",
            _burst(_getconn_putconn(peer), per_thread),
            group,
            role=PSYCOPG_POOL,
        ),
    ]


def measure_checkout(db: Database, *, rounds: int, ops_per_round: int, warmup_ops: int) -> Section:
    """Time every checkout contender, interleaved, and compare within each group."""
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lp-bench-")))
        cases = _sqlite_cases(stack, directory)
        cases += _psycopg_cases(stack, db)
        run_interleaved(cases, rounds=rounds, ops_per_round=ops_per_round, warmup_ops=warmup_ops)
        facts = {case.id: case.facts() for case in cases if case.facts is not None}
        # One burst per block: every thread makes ops_per_round checkouts.
        contention = _contention_cases(stack, db, ops_per_round)
        run_interleaved(contention, rounds=rounds, ops_per_round=1, warmup_ops=1)
        per_burst = CONTENTION_THREADS * ops_per_round
        for case in contention:
            case.samples_ns = [sample / per_burst for sample in case.samples_ns]
        cases += contention

    section = Section(
        name="checkout",
        title="Checkout + return (one connection out of the pool and back)",
        unit="us/op",
        baselines=[SQLALCHEMY, PSYCOPG_POOL],
        notes=[
            "ratios within a group: same driver, same pre-ping setting; "
            "x psycopg_pool is against getconn/putconn",
            "the warm engine resets the session on return (DISCARD ALL, one round trip), "
            "in both its rows; its fast path is compared with peers doing the same reset",
            "psycopg_pool runs reset= in a worker thread after putconn() returns: the caller "
            "does not wait for it, but the thread competes for the GIL and the cores",
            f"contention rows: {CONTENTION_THREADS} threads x {ops_per_round} checkouts "
            f"each on a pool of {CONTENTION_POOL}, wall time per checkout+return",
            f"median of {rounds} interleaved rounds x {ops_per_round} ops",
        ],
    )
    add_case_rows(section, cases, facts)
    return section
