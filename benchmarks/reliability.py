"""``python -m benchmarks.reliability``: inject every fault, write docs/reliability.md.

Each scenario runs real ``@with_connection()`` handlers against a throw-away PostgreSQL
(and a fault-injecting loopback proxy, real processes, moto for AWS) and records, per
fault: the outcome the handler's caller sees (the exception type, or none), how long the
faulted invocation took against its deadline (the Lambda context's remaining time), what
the next invocation did, and the data lost.  Data lost is checked from another
connection: every invocation writes two rows in one transaction, so a successful one
must have left both, a failed one none or both (both = the commit reached the server
before the fault), never one.

The table in docs/reliability.md is this module's output: regenerate it, never edit it.

Options: ``--quick`` (small storm, short deadlines: the smoke test), ``--out PATH``
(default ``docs/reliability.md``; ``-`` prints it), ``--only NAME`` (repeatable).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import multiprocessing
import os
import platform
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "docs" / "reliability.md"
TABLE = "reliability_rows"
#: The invocations' remaining time (Lambda's default function timeout is 3 s).
DEADLINE_MS = 3000
#: with_connection's margin (its default): the blocking steps end this much sooner.
MARGIN_MS = 500
#: Lambda's documented time between SIGTERM and SIGKILL (with external extensions).
SHUTDOWN_BUDGET_MS = 300


@dataclass(frozen=True)
class StormSettings:
    processes: int
    invocations: int
    max_connections: int
    idle_seconds: float


FULL_STORM = StormSettings(processes=40, invocations=10, max_connections=20, idle_seconds=0.1)
QUICK_STORM = StormSettings(processes=6, invocations=3, max_connections=5, idle_seconds=0.1)


@dataclass
class Row:
    """One line of the table."""

    fault: str
    injected: str
    engine: str
    outcome: str
    elapsed_ms: float | None
    deadline_ms: int | None
    next_invocation: str
    data_lost: str
    #: What the time column measured, when it is not "the faulted invocation".
    timing_note: str = ""

    def cells(self) -> list[str]:
        if self.elapsed_ms is None:
            timing = "n/a"
        else:
            timing = f"{self.elapsed_ms:.0f} ms"
            notes = [self.timing_note] if self.timing_note else []
            if self.deadline_ms is None:
                notes.append("no deadline")
            else:
                timing += f" of {self.deadline_ms} ms"
            if notes:
                timing += f" ({'; '.join(notes)})"
        return [
            self.fault,
            self.injected,
            self.engine,
            self.outcome,
            timing,
            self.next_invocation,
            self.data_lost,
        ]


@dataclass
class Invocation:
    """One handler call: its id (the rows it writes), what the caller saw, how long."""

    ident: str
    error: BaseException | None = None
    elapsed_ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def describe_error(error: BaseException | None) -> str:
    """The exception as the handler's caller sees it: type, SQLSTATE, lambda-pool step."""
    if error is None:
        return "no error"
    name = type(error).__name__
    details = []
    state = getattr(error, "sqlstate", None)
    if isinstance(state, str):
        details.append(state)
    step = getattr(error, "step", None)
    if isinstance(step, str) and step:
        details.append(f"step {step}")
    attempts = getattr(error, "attempts", None)
    if isinstance(attempts, int) and attempts:
        details.append(f"{attempts} attempts")
    return f"`{name}`" + (f" ({', '.join(details)})" if details else "")


# --------------------------------------------------------------------------- the lab


class Lab:
    """A server, its admin helpers, and the two-rows-per-invocation bookkeeping."""

    def __init__(self, server: Any, deadline_ms: int) -> None:
        self.server = server
        self.deadline_ms = deadline_ms
        with self.admin() as conn:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (ident text, part int)")
            conn.execute(f"GRANT ALL ON {TABLE} TO {server.user}")

    def admin(self) -> Any:
        import psycopg

        return psycopg.connect(self.server.admin_dsn, dbname=self.server.dbname, autocommit=True)

    def url(self, tag: str, driver: str = "psycopg", **params: Any) -> str:
        """The application URL with a fresh application_name (so a fresh warm engine)."""
        name = f"rel_{tag}_{uuid.uuid4().hex[:8]}"
        url: str = self.server.dsn_for(
            self.server.user, self.server.password, application_name=name, **params
        )
        return url.replace("postgresql://", f"postgresql+{driver}://", 1)

    @staticmethod
    def app_name(url: str) -> str:
        return url.split("application_name=", 1)[1].split("&", 1)[0]

    def pids(self, url: str) -> list[int]:
        with self.admin() as conn:
            rows = conn.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                (self.app_name(url),),
            ).fetchall()
        return [int(row[0]) for row in rows]

    def terminate(self, pid: int) -> None:
        with self.admin() as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def wait_for_no_backends(self, url: str, timeout: float) -> float | None:
        """Seconds until the URL's backends are gone, or None if still there at timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.pids(url):
                return time.monotonic() - started
            time.sleep(0.02)
        return None

    def data_lost(self, invocations: Sequence[Invocation]) -> str:
        """Checked from another connection; "none" when every invocation is all or nothing
        and every success is there."""
        if not invocations:
            return "none"
        with self.admin() as conn:
            rows = conn.execute(
                f"SELECT ident, count(*) FROM {TABLE} WHERE ident = ANY(%s) GROUP BY ident",
                ([inv.ident for inv in invocations],),
            ).fetchall()
        found = {str(ident): int(count) for ident, count in rows}
        lost = [inv for inv in invocations if inv.ok and found.get(inv.ident, 0) != 2]
        half = [inv for inv in invocations if found.get(inv.ident, 0) not in (0, 2)]
        landed = [inv for inv in invocations if not inv.ok and found.get(inv.ident, 0) == 2]
        problems = []
        if lost:
            problems.append(f"{len(lost)} committed invocation(s) missing")
        if half:
            problems.append(f"{len(half)} half-written")
        text = "; ".join(problems) if problems else "none"
        if landed:
            text += (
                f" ({len(landed)} failed invocation(s) committed all the same: the COMMIT "
                "reached the server, the reply did not reach the client)"
            )
        return text


def writing_handler(url: str, **options: Any) -> Callable[..., Any]:
    """A warm ``with_connection`` handler writing the event's two rows in one transaction;
    ``event["during"]`` (a function of the connection) runs between the two writes,
    ``event["after"]`` after the last statement (so before the commit)."""
    from lambda_pool import with_connection

    options.setdefault("warm", True)

    @with_connection(url, **options)
    def handler(event: dict[str, Any], context: Any, connection: Any) -> int:
        connection.execute(f"INSERT INTO {TABLE} VALUES (%s, 1)", (event["ident"],))
        during = event.get("during")
        if during is not None:
            during(connection)
        connection.execute(f"INSERT INTO {TABLE} VALUES (%s, 2)", (event["ident"],))
        row = connection.execute("SELECT pg_backend_pid()").fetchone()
        after = event.get("after")
        if after is not None:
            after(connection)
        return int(row[0])

    return handler


def invoke(
    handler: Callable[..., Any], deadline_ms: int | None, **event: Any
) -> tuple[Invocation, Any]:
    """Call the handler as the runtime would (a fresh context with ``deadline_ms`` left)."""
    from lambda_pool.testing.context import LambdaContext

    ident = uuid.uuid4().hex
    context: Any = LambdaContext(remaining_ms=deadline_ms) if deadline_ms else object()
    record = Invocation(ident)
    started = time.monotonic()
    result = None
    try:
        result = handler({"ident": ident, **event}, context)
    except Exception as exc:
        record.error = exc
    record.elapsed_ms = (time.monotonic() - started) * 1000
    return record, result


def _dispose_all() -> None:
    from lambda_pool import lifecycle

    lifecycle.dispose_all()


# --------------------------------------------------------------------------- scenarios


def scenario_terminate(lab: Lab) -> list[Row]:
    rows = []
    # Between invocations: the warm cache notices without a round trip.
    url = lab.url("term_idle")
    handler = writing_handler(url)
    first, pid = invoke(handler, lab.deadline_ms)
    lab.terminate(pid)
    time.sleep(0.1)
    faulted, new_pid = invoke(handler, lab.deadline_ms)
    rows.append(
        Row(
            "terminate (idle)",
            "`pg_terminate_backend` of the warm backend between invocations",
            "psycopg, warm",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            "n/a (the faulted one reconnected)"
            if faulted.ok and new_pid != pid
            else describe_error(faulted.error),
            lab.data_lost([first, faulted]),
        )
    )
    _dispose_all()

    # During the invocation, between its two writes.
    url = lab.url("term_mid")
    handler = writing_handler(url)
    warm, pid = invoke(handler, lab.deadline_ms)
    faulted, _ = invoke(handler, lab.deadline_ms, during=lambda conn: lab.terminate(pid))
    after, _ = invoke(handler, lab.deadline_ms)
    rows.append(
        Row(
            "terminate (mid-transaction)",
            "`pg_terminate_backend` between the handler's two writes",
            "psycopg, warm",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            describe_error(after.error),
            lab.data_lost([warm, faulted, after]),
        )
    )
    _dispose_all()
    rows.append(_async_terminate(lab))
    return rows


def _async_terminate(lab: Lab) -> Row:
    """asyncpg: the backend is terminated while a statement runs."""
    import asyncio

    import lambda_pool
    from lambda_pool import warm_async_engine

    url = lab.url("term_async", driver="asyncpg")
    engine = warm_async_engine(url)

    async def one(ident: str, kill: bool) -> Invocation:
        record = Invocation(ident)
        started = time.monotonic()
        try:
            with lambda_pool.deadline((lab.deadline_ms - MARGIN_MS) / 1000):
                await one_transaction(ident, kill)
        except Exception as exc:
            record.error = exc
        record.elapsed_ms = (time.monotonic() - started) * 1000
        return record

    async def one_transaction(ident: str, kill: bool) -> None:
        async with engine.connect() as conn:
            await conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 1)", (ident,))
            if kill:
                pid = (await conn.execute("SELECT pg_backend_pid()")).fetchone()[0]  # type: ignore[index]
                loop = asyncio.get_running_loop()
                loop.call_later(0.2, lab.terminate, pid)
                await conn.execute("SELECT pg_sleep(2)")
            await conn.execute(f"INSERT INTO {TABLE} VALUES (%s, 2)", (ident,))
            await conn.commit()

    async def run() -> list[Invocation]:
        out = [await one(uuid.uuid4().hex, False), await one(uuid.uuid4().hex, True)]
        out.append(await one(uuid.uuid4().hex, False))
        await engine.dispose()
        return out

    warm, faulted, after = asyncio.run(run())
    return Row(
        "terminate (mid-statement)",
        "`pg_terminate_backend` while `pg_sleep` runs",
        "asyncpg, warm async engine under `lambda_pool.deadline(2.5)`",
        describe_error(faulted.error),
        faulted.elapsed_ms,
        lab.deadline_ms,
        describe_error(after.error),
        lab.data_lost([warm, faulted, after]),
    )


def _crash_restart(lab: Lab) -> None:
    """Restart every session of the server: SIGKILL one backend, so the postmaster ends
    all of them and recovers (what a crash or an immediate restart does to clients)."""
    import psycopg

    victim = psycopg.connect(lab.server.admin_dsn, autocommit=True)
    pid = victim.info.backend_pid
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        victim.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with lab.admin() as conn:
                conn.execute("SELECT 1")
            return
        except psycopg.OperationalError:
            time.sleep(0.05)
    raise RuntimeError("the server did not come back after the crash restart")


def scenario_restart(lab: Lab) -> list[Row]:
    url = lab.url("restart")
    handler = writing_handler(url)
    warm, _ = invoke(handler, lab.deadline_ms)
    _crash_restart(lab)
    between, _ = invoke(handler, lab.deadline_ms)
    restart_during = {"done": False}

    def restart_now(conn: Any) -> None:
        if not restart_during["done"]:
            restart_during["done"] = True
            _crash_restart(lab)

    faulted, _ = invoke(handler, lab.deadline_ms, during=restart_now)
    after, _ = invoke(handler, lab.deadline_ms)
    _dispose_all()
    return [
        Row(
            "server restart (idle)",
            "all sessions ended by crash recovery (a backend SIGKILLed) between invocations",
            "psycopg, warm",
            describe_error(between.error),
            between.elapsed_ms,
            lab.deadline_ms,
            "n/a (the faulted one reconnected)" if between.ok else "",
            lab.data_lost([warm, between]),
        ),
        Row(
            "server restart (mid-transaction)",
            "the same, between the handler's two writes",
            "psycopg, warm",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            describe_error(after.error),
            lab.data_lost([faulted, after]),
        ),
    ]


def _container_child(url: str, ident: str, hold: bool, ready: Any) -> None:
    """A Lambda container in its own process: one invocation, then (``hold``) a second
    that blocks mid-transaction, or idles until a signal."""
    from lambda_pool.testing.context import LambdaContext

    handler = writing_handler(url)
    handler({"ident": uuid.uuid4().hex}, LambdaContext(remaining_ms=DEADLINE_MS))
    if hold:

        def block(conn: Any) -> None:
            ready.set()
            conn.execute("SELECT pg_sleep(60)")

        handler({"ident": ident, "during": block}, LambdaContext(remaining_ms=DEADLINE_MS))
    else:
        ready.set()
        time.sleep(60)


def scenario_kill_and_sigterm(lab: Lab) -> list[Row]:
    rows = []
    context = multiprocessing.get_context("fork")
    for name, sig, hold in (
        ("container killed (SIGKILL) mid-transaction", signal.SIGKILL, True),
        ("shutdown (SIGTERM) of an idle warm container", signal.SIGTERM, False),
    ):
        url = lab.url("proc")
        ident = uuid.uuid4().hex
        ready = context.Event()
        child = context.Process(target=_container_child, args=(url, ident, hold, ready))
        child.start()
        if not ready.wait(30):
            child.kill()
            raise RuntimeError("the container process did not get going")
        time.sleep(0.2)
        started = time.monotonic()
        os.kill(child.pid or 0, sig)
        child.join(30)
        gone = lab.wait_for_no_backends(url, timeout=DEADLINE_MS / 1000 * 4)
        elapsed = (time.monotonic() - started) * 1000 if gone is not None else None
        outcome = (
            "no outcome (process gone); the server rolled back"
            if sig == signal.SIGKILL
            else f"process exited by SIGTERM (status {child.exitcode}); engines disposed"
        )
        backend = "n/a (no server backend left)" if elapsed is not None else "backend still open"
        rows.append(
            Row(
                name,
                f"`os.kill(container, {sig.name})`"
                + (
                    " while a statement runs; its `SET LOCAL statement_timeout` ends it"
                    if hold
                    else ""
                ),
                "psycopg, warm (separate process)",
                outcome,
                elapsed,
                lab.deadline_ms if sig == signal.SIGKILL else SHUTDOWN_BUDGET_MS,
                backend,
                lab.data_lost([Invocation(ident, error=RuntimeError("killed"))])
                if hold
                else "none",
                timing_note="until the server had no backend of the container"
                + ("" if hold else "; vs Lambda's shutdown budget"),
            )
        )
    return rows


def scenario_read_only(lab: Lab) -> list[Row]:
    def set_read_only(on: bool) -> None:
        with lab.admin() as conn:
            value = "on" if on else "off"
            conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {value}")
            conn.execute("SELECT pg_reload_conf()")
        time.sleep(0.3)

    url = lab.url("readonly")
    handler = writing_handler(url)
    warm, pid = invoke(handler, lab.deadline_ms)
    set_read_only(True)
    try:
        faulted, _ = invoke(handler, lab.deadline_ms)
        again, _ = invoke(handler, lab.deadline_ms)
        pids_after = lab.pids(url)
    finally:
        set_read_only(False)
    after, _ = invoke(handler, lab.deadline_ms)
    _dispose_all()
    replaced = pid not in pids_after
    return [
        Row(
            "read-only failover",
            "`ALTER SYSTEM SET default_transaction_read_only = on` + reload (the old writer "
            "after a failover), then back",
            "psycopg, warm",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            f"{describe_error(again.error)} on a new backend"
            + (" (old one discarded)" if replaced else " (old one kept!)")
            + f"; once writable: {describe_error(after.error)}",
            lab.data_lost([warm, faulted, again, after]),
        )
    ]


def scenario_secret_rotation(lab: Lab) -> list[Row]:
    import json
    import secrets

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    import boto3
    from aws_lambda_powertools.utilities import parameters
    from aws_lambda_powertools.utilities.parameters.base import (  # type: ignore[attr-defined]
        DEFAULT_PROVIDERS,
    )
    from moto import mock_aws

    from lambda_pool.auth import SecretsManagerCredentials

    # Read through Powertools Parameters (boto3, which moto intercepts; lambda-pool picks
    # it when the function imported it), starting from an empty shared provider.
    parameters.clear_caches()  # type: ignore[no-untyped-call]
    DEFAULT_PROVIDERS.pop("secrets", None)

    role = f"rel_sm_{uuid.uuid4().hex[:8]}"
    first = secrets.token_urlsafe(16)
    lab.server.create_role(role, first)
    with lab.admin() as conn:
        conn.execute(f"GRANT ALL ON {TABLE} TO {role}")
    with mock_aws():
        client = boto3.client("secretsmanager", region_name="us-east-1")

        def value(password: str) -> str:
            return json.dumps({"username": role, "password": password})

        arn = client.create_secret(Name=role, SecretString=value(first))["ARN"]
        provider = SecretsManagerCredentials(arn, max_age=300)
        url = lab.url("secret").replace(f"{lab.server.user}:{lab.server.password}@", "")
        handler = writing_handler(url, credentials=provider, warm=False)
        warm, _ = invoke(handler, lab.deadline_ms)
        second = secrets.token_urlsafe(16)
        lab.server.set_password(role, second)
        client.put_secret_value(SecretId=arn, SecretString=value(second))
        faulted, _ = invoke(handler, lab.deadline_ms)
        after, _ = invoke(handler, lab.deadline_ms)
    _dispose_all()
    return [
        Row(
            "secret rotation",
            "the role's password and the Secrets Manager secret changed (moto) while the "
            "old value is cached; a new connection per invocation",
            "psycopg, NullPool, `SecretsManagerCredentials`",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            describe_error(after.error),
            lab.data_lost([warm, faulted, after]),
        )
    ]


def scenario_token_expiry(lab: Lab) -> list[Row]:
    if not lab.server.ssl_enabled:
        return [
            Row(
                "IAM token expiry",
                "skipped: this PostgreSQL has no TLS (IAM tokens are sent over TLS only)",
                "psycopg, warm, `IAMCredentials`",
                "n/a",
                None,
                None,
                "n/a",
                "n/a",
            )
        ]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from moto import mock_aws

    from lambda_pool.auth import IAMCredentials

    class Clock:
        def __init__(self) -> None:
            self.now = time.time()

        def __call__(self) -> float:
            return self.now

    clock = Clock()
    role = f"rel_iam_{uuid.uuid4().hex[:8]}"
    with mock_aws():
        provider = IAMCredentials(
            lab.server.host, lab.server.port, role, region="us-east-1", clock=clock
        )
        token = provider.get()
        assert token.password is not None and token.expires_at is not None
        # Stand-in for RDS's token check: the role's password is the current token.
        lab.server.create_role(role, token.password)
        with lab.admin() as conn:
            conn.execute(f"GRANT ALL ON {TABLE} TO {role}")
        url = lab.url("iam", sslmode="require").replace(
            f"{lab.server.user}:{lab.server.password}@", f"{role}@"
        )
        handler = writing_handler(url, credentials=provider)
        warm, pid = invoke(handler, lab.deadline_ms)
        # botocore stamps whole seconds: wait for a different token, then expire the old.
        while int(time.time()) <= int(clock.now):
            time.sleep(0.05)
        clock.now = token.expires_at + 1
        fresh = provider.get()
        assert fresh.password is not None
        lab.server.set_password(role, fresh.password)
        faulted, new_pid = invoke(handler, lab.deadline_ms)
    _dispose_all()
    return [
        Row(
            "IAM token expiry",
            "the warm connection's token expired (provider clock moved past it) and the "
            "server accepts only the new token",
            "psycopg, warm, `IAMCredentials` (moto)",
            describe_error(faulted.error),
            faulted.elapsed_ms,
            lab.deadline_ms,
            "n/a (the faulted one reconnected"
            + (" on a new backend)" if new_pid != pid else ", same backend!)"),
            lab.data_lost([warm, faulted]),
        )
    ]


# --------------------------------------------------------------------------- black holes


def scenario_black_hole(lab: Lab) -> list[Row]:
    """The network goes silent (TCP stays up) at each blocking step of an invocation."""
    from lambda_pool import event as pool_event
    from lambda_pool.testing.faults import FaultProxy

    rows = []
    with FaultProxy.in_front_of(lab.server.dsn) as proxy:

        def through_proxy(tag: str) -> str:
            return proxy.url_for(lab.url(tag))

        def hole(_connection: Any = None) -> None:
            proxy.black_hole()

        def run(
            step: str, handler: Callable[..., Any], warm: Invocation | None, **event: Any
        ) -> None:
            faulted, _ = invoke(handler, lab.deadline_ms, **event)
            proxy.pass_through()  # the network heals: held bytes are delivered
            time.sleep(0.5)
            after, _ = invoke(handler, lab.deadline_ms)
            rows.append(
                Row(
                    f"black hole at {step}",
                    f"loopback proxy stops forwarding (nothing closed) {WHEN[step]}",
                    "psycopg, " + ("NullPool" if step == "connect" else "warm"),
                    describe_error(faulted.error),
                    faulted.elapsed_ms,
                    lab.deadline_ms,
                    describe_error(after.error),
                    lab.data_lost([inv for inv in (warm, faulted, after) if inv is not None]),
                )
            )
            _dispose_all()

        # connect: a new connection per invocation, the network already silent.
        hole()
        run("connect", writing_handler(through_proxy("bh_connect"), warm=False), None)

        # pre-ping: the warm connection sat idle past the pre-ping threshold.
        handler = writing_handler(through_proxy("bh_ping"), pre_ping_idle_seconds=0.2)
        warm, _ = invoke(handler, lab.deadline_ms)
        time.sleep(0.4)
        hole()
        run("pre-ping", handler, warm)

        # statement: back to back, so the first statement is the first I/O.
        handler = writing_handler(through_proxy("bh_statement"))
        warm, _ = invoke(handler, lab.deadline_ms)
        hole()
        run("statement", handler, warm)

        # commit: after the last statement of the handler.
        handler = writing_handler(through_proxy("bh_commit"))
        warm, _ = invoke(handler, lab.deadline_ms)
        run("commit", handler, warm, after=hole)

        # reset on return: the pool's reset event fires just before the reset.
        handler = writing_handler(through_proxy("bh_reset"))
        warm, _ = invoke(handler, lab.deadline_ms)
        armed = {"on": True}

        def hole_before_reset(*_args: Any) -> None:
            if armed["on"]:
                armed["on"] = False
                hole()

        pool_event.listen(handler.engine, "reset", hole_before_reset)  # type: ignore[attr-defined]
        run("reset", handler, warm)

        for driver in ("psycopg", "asyncpg"):
            rows.append(_async_black_hole(lab, proxy, driver))
    return rows


def _async_black_hole(lab: Lab, proxy: Any, driver: str) -> Row:
    """An async warm engine's statement under ``lambda_pool.deadline()``: silent network."""
    import asyncio

    import lambda_pool
    from lambda_pool import warm_async_engine

    engine = warm_async_engine(proxy.url_for(lab.url(f"bh_async_{driver}", driver=driver)))
    bound_s = (lab.deadline_ms - MARGIN_MS) / 1000

    async def one(silence: bool) -> Invocation:
        record = Invocation(uuid.uuid4().hex)
        started = time.monotonic()
        try:
            with lambda_pool.deadline(bound_s):
                async with engine.connect() as conn:
                    if silence:
                        proxy.black_hole()
                    for part in (1, 2):
                        await conn.execute(
                            f"INSERT INTO {TABLE} VALUES (%s, %s)", (record.ident, part)
                        )
                    await conn.commit()
        except Exception as exc:
            record.error = exc
        record.elapsed_ms = (time.monotonic() - started) * 1000
        return record

    async def run() -> list[Invocation]:
        out = [await one(False), await one(True)]
        proxy.pass_through()
        await asyncio.sleep(0.5)
        out.append(await one(False))
        await engine.dispose()
        return out

    warm, faulted, after = asyncio.run(run())
    return Row(
        "black hole at statement",
        "the same, inside `async with engine.connect()` before the first statement",
        f"{driver}, warm async engine under `lambda_pool.deadline(2.5)`",
        describe_error(faulted.error),
        faulted.elapsed_ms,
        lab.deadline_ms,
        describe_error(after.error),
        lab.data_lost([warm, faulted, after]),
    )


WHEN = {
    "connect": "before the invocation (NullPool: it must connect)",
    "pre-ping": "while the warm connection sat idle past `pre_ping_idle_seconds`",
    "statement": "between two back-to-back invocations",
    "commit": "after the handler's last statement",
    "reset": "after the commit, before the reset on return",
}


# --------------------------------------------------------------------------- capacity storm


def _storm_container(
    url: str,
    invocations: int,
    idle_seconds: float,
    deadline_ms: int | None,
    start: Any,
    results: Any,
) -> None:
    handler = writing_handler(url)
    start.wait()
    outcomes = []
    for _ in range(invocations):
        record, _ = invoke(handler, deadline_ms)
        outcomes.append(
            (
                record.ident,
                _storm_kind(record.error),
                record.elapsed_ms,
                getattr(record.error, "attempts", None),
            )
        )
        time.sleep(idle_seconds)
    results.put(outcomes)


def _storm_kind(error: BaseException | None) -> str:
    """The error's type (and lambda-pool step): the storm's outcomes grouped."""
    if error is None:
        return "no error"
    step = getattr(error, "step", "")
    return f"`{type(error).__name__}`" + (f" (step {step})" if step else "")


def run_storm(lab: Lab, settings: StormSettings, deadline_ms: int | None) -> Row:
    """``settings.processes`` warm containers (real processes) start at once."""
    context = multiprocessing.get_context("fork")
    start, results = context.Event(), context.Queue()
    url = lab.url("storm")
    args = (url, settings.invocations, settings.idle_seconds, deadline_ms, start, results)
    processes = [
        context.Process(target=_storm_container, args=args) for _ in range(settings.processes)
    ]
    for process in processes:
        process.start()
    time.sleep(0.5)  # every container imported and waiting: one burst
    start.set()
    outcomes: list[tuple[str, str, float, int | None]] = []
    for _ in processes:
        outcomes += results.get(timeout=600)
    for process in processes:
        process.join(60)
    total = settings.processes * settings.invocations
    errors = Counter(kind for _, kind, _, _ in outcomes if kind != "no error")
    ok = total - sum(errors.values())
    parts = [f"{ok} of {total} ok"]
    for kind, count in errors.most_common():
        attempts = [n for _, k, _, n in outcomes if k == kind and n]
        spread = f", {min(attempts)}-{max(attempts)} attempts" if attempts else ""
        parts.append(f"{count} {kind}{spread}")
    failed_times = [ms for _, kind, ms, _ in outcomes if kind != "no error"]
    records = [
        Invocation(ident, None if kind == "no error" else RuntimeError(kind), ms)
        for ident, kind, ms, _ in outcomes
    ]
    slowest_failure = max(failed_times, default=None)
    label = {None: " (count-based retries: no deadline)", 10_000: " (a burst that fits)"}
    return Row(
        "capacity storm" + label.get(deadline_ms, ""),
        f"{settings.processes} processes x {settings.invocations} invocations at once, warm, "
        f"`max_connections={settings.max_connections}`",
        "psycopg, warm (processes)",
        "; ".join(parts),
        slowest_failure if slowest_failure is not None else max(o[2] for o in outcomes),
        deadline_ms,
        "n/a",
        lab.data_lost(records),
        timing_note="slowest failure" if slowest_failure is not None else "slowest invocation",
    )


def scenario_storm(lab: Lab, settings: StormSettings) -> list[Row]:
    from lambda_pool.testing.postgres import EmbeddedPostgres

    rows = []
    with EmbeddedPostgres(ssl=False, max_connections=settings.max_connections) as server:
        storm_lab = Lab(server, lab.deadline_ms)
        for deadline_ms in (lab.deadline_ms, 10_000, None):
            rows.append(run_storm(storm_lab, settings, deadline_ms))
    return rows


# --------------------------------------------------------------------------- the run

SCENARIOS: dict[str, Callable[[Lab], list[Row]]] = {
    "restart": scenario_restart,
    "terminate": scenario_terminate,
    "process": scenario_kill_and_sigterm,
    "readonly": scenario_read_only,
    "secret": scenario_secret_rotation,
    "token": scenario_token_expiry,
    "blackhole": scenario_black_hole,
}


def _versions() -> str:
    found = []
    for name in ("lambda-pool", "psycopg", "asyncpg", "moto"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def render(rows: Sequence[Row], *, quick: bool, server_version: str, elapsed_s: float) -> str:
    header = [
        "fault",
        "how it was injected",
        "engine",
        "outcome the handler's caller sees",
        "time taken vs deadline",
        "next invocation",
        "data lost",
    ]
    lines = [
        "# Reliability: what each injected fault does to an invocation",
        "",
        "<!-- Generated by `python -m benchmarks.reliability`; do not edit by hand. -->",
        "",
        "Every row is a fault injected on this machine into real `@with_connection()` "
        "handlers (or the async engines) against a throw-away PostgreSQL on loopback. "
        f"Unless said otherwise each invocation had {DEADLINE_MS} ms left "
        f"(`LambdaContext(remaining_ms={DEADLINE_MS})`, margin {MARGIN_MS} ms). *Data lost* "
        "is checked from another connection: every invocation writes two rows in one "
        "transaction, so a success must have left both and a failure none (or both, when "
        "the commit reached the server before the fault), never one. The server runs with "
        "`synchronous_commit = on` (the test servers turn it off for speed, and a crash "
        "restart would then lose acknowledged commits whatever the client does).",
        "",
        f"Run: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
        f"{'quick mode (small storm)' if quick else 'full mode'}, PostgreSQL {server_version}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs, {_versions()}; "
        f"{elapsed_s:.0f} s in all. Timings are from one run on a shared machine.",
        "",
        "| " + " | ".join(header) + " |",
        "| " + " | ".join("---" for _ in header) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row.cells()) + " |")
    lines += [
        "",
        "How to read the capacity-storm rows. The containers (real processes) start at "
        "the same moment and keep their warm connection between invocations, as warm "
        "Lambda containers do, so the ones without a slot wait for a container to exit; "
        "`max_connections` minus the 3 superuser slots is what the application gets. "
        "With a deadline the connect is retried for as long as the deadline leaves room "
        "for one more attempt (`lambda_pool.connect_retry`), then fails with "
        "`CapacityExhaustedError` before the deadline; a connect attempt that was started "
        "in time but then took longer ends with `DeadlineExceededError` (step connect). "
        f"The {DEADLINE_MS} ms row is a burst that need not fit (the last containers wait "
        "for about two waves of others), the 10 s row one that should. The count-based row is "
        "the policy that applies without a deadline (a context that cannot tell its "
        "remaining time), and was the only one before: 4 attempts, then the server's "
        "own error, whatever time was left.",
        "",
    ]
    return "\n".join(lines)


@dataclass
class Options:
    quick: bool
    out: str
    only: list[str] = field(default_factory=list)


def _parse(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reliability")
    parser.add_argument("--quick", action="store_true", help="small storm (smoke test)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="where to write ('-': stdout)")
    parser.add_argument("--only", action="append", choices=[*SCENARIOS, "storm"], help="repeatable")
    args = parser.parse_args(argv)
    return Options(quick=args.quick, out=args.out, only=args.only or [])


@contextlib.contextmanager
def _server() -> Iterator[Any]:
    from lambda_pool.testing.postgres import EmbeddedPostgres

    # The test servers trade crash safety for speed (synchronous_commit=off): a crash
    # restart would then lose commits the server had acknowledged, which says nothing
    # about lambda-pool.  With it on, a commit is in the WAL (the OS's cache is enough:
    # the postmaster restarts, the machine does not) before the client hears of it.
    with EmbeddedPostgres(settings={"synchronous_commit": "on"}) as server:
        yield server


def main(argv: Sequence[str] | None = None) -> int:
    options = _parse(argv)
    wanted = options.only or [*SCENARIOS, "storm"]
    started = time.monotonic()
    rows: list[Row] = []
    with _server() as server:
        lab = Lab(server, DEADLINE_MS)
        for name, scenario in SCENARIOS.items():
            if name in wanted:
                print(f"reliability: {name} ...", file=sys.stderr, flush=True)
                rows += scenario(lab)
        if "storm" in wanted:
            print("reliability: storm ...", file=sys.stderr, flush=True)
            rows += scenario_storm(lab, QUICK_STORM if options.quick else FULL_STORM)
        version = server.version
    text = render(
        rows, quick=options.quick, server_version=version, elapsed_s=time.monotonic() - started
    )
    if options.out == "-":
        print(text)
    else:
        Path(options.out).write_text(text)
        print(f"reliability: wrote {options.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
