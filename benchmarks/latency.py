"""Invocation cost through a slow network: round trips counted twice, and time.

A throw-away PostgreSQL logs every statement (``log_statement=all``); lambda-pool's
fault-injecting proxy (:class:`lambda_pool.testing.faults.FaultProxy`) sits in front of
it and delays each server reply by a fixed latency (0.5 ms, like a hop inside a VPC;
2 ms, like a hop through a proxy), and counts the replies.  Each contender runs the
same invocation, ``SELECT 1`` in a transaction committed at the end:

* a raw psycopg connection held in a global (the floor);
* lambda-pool's warm ``@with_connection()`` handler, with the deadline's
  ``statement_timeout`` (the default) and without (``statement_timeout=None``);
* SQLAlchemy's ``QueuePool`` with ``pool_pre_ping=True``;
* psycopg_pool with ``check=ConnectionPool.check_connection``;
* lambda-pool's ``NullPool`` (a new connection per invocation);

then the same behind PgBouncer in transaction mode (the proxy then sits in front of
PgBouncer; lambda-pool runs with ``transaction_pooling=True``), when ``pgbouncer`` is
installed.  Round trips come from the proxy's reply counter and from the server's
statement log over one warm invocation (never from arithmetic); time is the median
of interleaved rounds, as in the other sections.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import Section, add_case_rows
from benchmarks.timing import Case, run_interleaved

__all__ = ["LATENCIES_MS", "measure_latency"]

LATENCIES_MS = (0.5, 2.0)
RAW = "raw held"
# "<pid>|<application_name>|... LOG:  statement: SELECT 1" (and extended-protocol "execute").
_LOG_LINE = re.compile(r"^\d+\|.*?LOG:  (?:statement|execute [^:]*): (.*)$")
_SETTINGS = {"log_statement": "all", "log_line_prefix": "%p|%a|"}


@dataclass
class Route:
    """Where the contenders connect: straight to the server, or through PgBouncer."""

    name: str
    #: libpq URL through the latency proxy.
    url: str
    bouncer: bool


class StatementLog:
    """Statements the server logged after a mark (the log is written after the reply)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def mark(self) -> int:
        return self._path.stat().st_size

    def since(self, mark: int) -> list[str]:
        # The logger writes a little after the reply: read until two reads agree.
        previous: list[str] | None = None
        for _ in range(40):
            with self._path.open("rb") as log:
                log.seek(mark)
                text = log.read().decode("utf-8", "replace")
            found = [m.group(1).strip() for m in map(_LOG_LINE.match, text.splitlines()) if m]
            if found == previous and found:
                return found
            previous = found
            time.sleep(0.03)
        return previous or []


def _with_scheme(url: str, scheme: str) -> str:
    return scheme + url[url.index("://") :]


def _contenders(stack: contextlib.ExitStack, route: Route) -> list[tuple[str, str, Any, bool]]:
    """``(key, label, invocation, is_raw)`` for every contender on ``route``."""
    import psycopg
    import sqlalchemy
    from psycopg_pool import ConnectionPool

    import lambda_pool
    from lambda_pool.testing.context import LambdaContext

    url = route.url
    lp_url = _with_scheme(url, "postgresql+psycopg")
    lp_options: dict[str, Any] = {"transaction_pooling": True} if route.bouncer else {}
    # prepare_threshold=None: PgBouncer in transaction mode and prepared statements do
    # not mix; the same for every contender, so the statements compared are the same.
    raw = psycopg.connect(url, prepare_threshold=None)
    stack.callback(raw.close)

    def raw_held() -> None:
        raw.execute("SELECT 1")
        raw.commit()

    def decorated(statement_timeout: Any) -> Callable[[], None]:
        @lambda_pool.with_connection(lp_url, statement_timeout=statement_timeout, **lp_options)
        def handler(event: Any, context: Any, connection: Any) -> None:
            connection.execute("SELECT 1")

        stack.callback(handler.engine.dispose)  # type: ignore[attr-defined]

        def invoke() -> None:
            handler({}, LambdaContext(remaining_ms=30_000))

        return invoke

    sa = sqlalchemy.create_engine(
        lp_url,
        poolclass=sqlalchemy.pool.QueuePool,
        pool_pre_ping=True,
        connect_args={"prepare_threshold": None},
    )
    stack.callback(sa.dispose)
    select_1 = sqlalchemy.text("SELECT 1")

    def sqlalchemy_preping() -> None:
        with sa.connect() as conn:
            conn.execute(select_1)
            conn.commit()

    pool = ConnectionPool(
        url,
        min_size=1,
        max_size=2,
        open=True,
        check=ConnectionPool.check_connection,
        kwargs={"prepare_threshold": None},
        name=f"latency-{route.name}",
    )
    stack.callback(pool.close)
    pool.wait(timeout=30.0)

    def psycopg_pool_check() -> None:
        with pool.connection() as conn:
            conn.execute("SELECT 1")

    nullpool = lambda_pool.create_engine(lp_url, **lp_options)
    stack.callback(nullpool.dispose)

    def nullpool_connect() -> None:
        with nullpool.connect() as conn:
            conn.execute("SELECT 1")
            conn.commit()

    return [
        ("raw", "raw psycopg connection held in a global", raw_held, True),
        ("warm", "lambda-pool @with_connection() warm, deadline on", decorated("deadline"), False),
        (
            "warm.no_deadline",
            "lambda-pool @with_connection() warm, statement_timeout=None",
            decorated(None),
            False,
        ),
        (
            "sqlalchemy.preping",
            "SQLAlchemy QueuePool, pool_pre_ping=True",
            sqlalchemy_preping,
            False,
        ),
        ("psycopg_pool.check", "psycopg_pool with check=", psycopg_pool_check, False),
        ("nullpool", "lambda-pool NullPool: connect per invocation", nullpool_connect, False),
    ]


@contextlib.contextmanager
def _routes() -> Iterator[tuple[list[Route], Any, StatementLog, str | None]]:
    """The server, one latency proxy per route, the statement log, and why PgBouncer is
    left out (``None`` when it runs)."""
    from lambda_pool.testing.faults import FaultProxy
    from lambda_pool.testing.pgbouncer import PgBouncer, find_pgbouncer
    from lambda_pool.testing.postgres import EmbeddedPostgres

    with contextlib.ExitStack() as stack:
        server = stack.enter_context(EmbeddedPostgres(settings=_SETTINGS, ssl=False))
        proxies = []
        direct = stack.enter_context(FaultProxy.in_front_of(server.dsn))
        routes = [Route("direct", direct.url_for(server.dsn), bouncer=False)]
        proxies.append(direct)
        skipped: str | None = None
        if find_pgbouncer() is None:
            skipped = (
                "PgBouncer rows not measured: pgbouncer is not installed "
                "(apt-get install pgbouncer)"
            )
        else:
            bouncer = stack.enter_context(
                PgBouncer(server, pool_mode="transaction", default_pool_size=8)
            )
            front = stack.enter_context(FaultProxy.in_front_of(bouncer.dsn))
            routes.append(Route("pgbouncer", front.url_for(bouncer.dsn), bouncer=True))
            proxies.append(front)
        yield routes, proxies, StatementLog(server.log_file), skipped


def _count(invoke: Callable[[], None], proxy: Any, log: StatementLog) -> tuple[int, list[str]]:
    """``(server replies on the wire, statements in the server log)`` of one invocation."""
    time.sleep(0.05)  # earlier invocations' log lines are written
    mark = log.mark()
    proxy.clear_counters()
    invoke()
    replies = int(proxy.counters().replies)
    return replies, log.since(mark)


def measure_latency(*, rounds: int, ops_per_round: int, quick: bool = False) -> Section:
    """The latency table: every contender on every route, at each latency."""
    latencies = LATENCIES_MS[:1] if quick else LATENCIES_MS
    cases: list[Case] = []
    facts: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    with _routes() as (routes, proxies, log, skipped), contextlib.ExitStack() as stack:
        if skipped:
            notes.append(skipped)
        for route, proxy in zip(routes, proxies, strict=True):
            built = _contenders(stack, route)
            for ms in latencies:
                proxy.latency(ms)
                group = f"{ms:g} ms, {route.name}"
                group_cases = []
                for key, label, invoke, is_raw in built:
                    invoke()  # warm: connections open, caches filled
                    invoke()
                    replies, statements = _count(invoke, proxy, log)
                    case = Case(
                        f"latency.{route.name}.{ms:g}ms.{key}",
                        f"[{group}] {label}",
                        invoke,
                        group,
                        role=RAW if is_raw else "",
                    )
                    facts[case.id] = {
                        "latency_ms": ms,
                        "route": route.name,
                        "replies": replies,
                        "statements": len(statements),
                        "statement_log": statements,
                    }
                    group_cases.append(case)
                # Timed per latency: the proxy holds one latency at a time.
                run_interleaved(
                    group_cases, rounds=rounds, ops_per_round=ops_per_round, warmup_ops=1
                )
                cases += group_cases
            proxy.pass_through()

    section = Section(
        name="latency",
        title="Invocation through a slow network (SELECT 1 and commit; a proxy delays each reply)",
        unit="us/op",
        baselines=[RAW],
        extra_columns=["replies", "statements"],
        notes=[
            *notes,
            "replies: server replies counted by the proxy over one warm invocation (one per "
            "round trip); statements: what the server logged for it (log_statement=all)",
            "x raw held: against a psycopg connection held in a global doing the same "
            "statements on the same route and latency",
            "through PgBouncer (transaction mode) the proxy sits in front of PgBouncer; "
            "lambda-pool runs with transaction_pooling=True; every contender with "
            "prepare_threshold=None",
            f"median of {rounds} interleaved rounds x {ops_per_round} invocations per latency",
        ],
    )
    add_case_rows(section, cases, facts)
    for row in section.rows:
        row.extra = {
            "replies": str(row.facts.get("replies", "")),
            "statements": str(row.facts.get("statements", "")),
        }
    return section
