"""``lambda-pool demo``: the life of a Lambda container, locally, in one table.

The sample handler (``samples/psycopg_handler``) runs inside the real ``awslambdaric``
runtime client, driven by :class:`lambda_pool.testing.runtime.LocalLambda`, against an
embedded PostgreSQL (or ``DATABASE_URL``).  Two runs, side by side:

1. **lambda-pool's warm cache**, authenticating with RDS IAM tokens (signed offline with
   fake AWS credentials, as under moto): a cold start, warm invocations reusing one
   connection, an idle gap that makes the next checkout pre-ping, a token expiry
   (shortened to a few seconds) that retires the connection at checkout, a handler error
   that rolls back and keeps the connection, and a shutdown whose SIGTERM closes it;
2. **the NullPool default**: the same invocations, each opening its own connection.

For each invocation it prints whether it was cold or warm, what happened to the
connection, the backends the server shows, and the time.  A real RDS checks the IAM
token at connect; the embedded server trusts the demo's IAM role over TLS instead (it
cannot verify AWS signatures), so the token path runs exactly as in Lambda up to the
server's check.  Without TLS-capable PostgreSQL binaries the first run uses the
password in the URL and says so.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from lambda_pool.testing.postgres import EmbeddedPostgres, ExternalPostgres, PostgresServer
from lambda_pool.testing.runtime import InvocationResult, LocalLambda

_SAMPLE = Path(__file__).resolve().parent.parent / "samples" / "psycopg_handler"
_IAM_ROLE = "lambda_pool_demo_iam"
#: Token life left after the margin: the connection is retired this long after connect.
_TOKEN_SECONDS = 6
_PRE_PING_IDLE_SECONDS = 1.0
_FAILING_STEP = "handler raises"


@dataclass
class Row:
    """One line of the table."""

    number: int
    step: str
    start: str
    result: str
    backend_pid: int | None
    connection: str
    server_backends: int
    ms: float


@dataclass
class RunSummary:
    """What one run cost: backends opened on the server and invocation times."""

    title: str
    rows: list[Row]
    backends_opened: int
    after_shutdown: int
    init_ms: float

    @property
    def warm_median_ms(self) -> float:
        warm = [row.ms for row in self.rows if row.start == "warm" and row.result == "ok"]
        return statistics.median(warm) if warm else float("nan")

    @property
    def as_expected(self) -> bool:
        """Every invocation succeeded but the one told to fail, which raised ValueError."""
        for row in self.rows:
            expected = "ValueError" if row.step == _FAILING_STEP else "ok"
            if row.result != expected:
                return False
        return self.after_shutdown == 0


#: Where the demo prints; ``main(out=...)`` redirects it (tests read the table).
_stream: TextIO | None = None


def _say(message: str) -> None:
    print(message, file=_stream or sys.stdout, flush=True)


@contextlib.contextmanager
def _database(tls: bool | None) -> Iterator[PostgresServer]:
    url = os.environ.get("DATABASE_URL")
    if url:
        _say(f"[demo] using DATABASE_URL ({_mask(url)})")
        yield ExternalPostgres(url)
        return
    _say("[demo] starting an embedded PostgreSQL ...")
    began = time.perf_counter()
    with EmbeddedPostgres(ssl=tls) as server:
        transport = "with TLS" if server.ssl_enabled else "without TLS"
        _say(
            f"[demo] PostgreSQL {server.version.split()[0]} on 127.0.0.1:{server.port} "
            f"{transport} ({time.perf_counter() - began:.1f} s)"
        )
        yield server
    _say("[demo] embedded PostgreSQL stopped")


def _mask(url: str) -> str:
    from lambda_pool.url import make_url

    return make_url(url).render_as_string(hide_password=True)


def _prepare_iam_role(server: PostgresServer) -> bool:
    """Create the demo's IAM role and let it in over TLS; False when that is impossible."""
    if not isinstance(server, EmbeddedPostgres) or not server.ssl_enabled:
        return False
    with server.admin_connect() as admin:
        exists = admin.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (_IAM_ROLE,))
        if exists.fetchone() is None:
            admin.execute(f'CREATE ROLE "{_IAM_ROLE}" LOGIN')
        admin.execute(f'GRANT ALL ON SCHEMA public TO "{_IAM_ROLE}"')
        admin.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{_IAM_ROLE}"')
        hba = server.data_dir / "pg_hba.conf"
        # RDS would verify the IAM signature here; the embedded server cannot, so this
        # one role is trusted over TLS only (a plain connection is still refused).
        line = f"hostssl all {_IAM_ROLE} 127.0.0.1/32 trust\n"
        text = hba.read_text()
        if line not in text:
            hba.write_text(line + text)
        admin.execute("SELECT pg_reload_conf()")
    return True


def _function_url(server: PostgresServer, app_name: str, iam: bool) -> str:
    if iam:
        margin = 900 - _TOKEN_SECONDS
        return (
            f"postgresql://{_IAM_ROLE}@{server.host}:{server.port}/{server.dbname}"
            f"?auth=iam&region=us-east-1&token_margin={margin}&sslmode=require"
            f"&application_name={app_name}"
        )
    return server.dsn_for(server.user, server.password, application_name=app_name)


def _environment(url: str, warm: bool) -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parent.parent)
    return {
        "LAMBDA_POOL_DATABASE_URL": url,
        "LAMBDA_POOL_WARM": "1" if warm else "0",
        "LAMBDA_POOL_PRE_PING_IDLE_SECONDS": str(_PRE_PING_IDLE_SECONDS),
        "LAMBDA_POOL_REGISTER_EXTENSION": "1",
        # Signed offline: generate_db_auth_token never calls AWS, as under moto.
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "PYTHONPATH": os.pathsep.join([str(_SAMPLE), package_root]),
    }


def _connection_note(result: InvocationResult, previous_pid: int | None, warm: bool) -> str:
    payload = result.payload if isinstance(result.payload, dict) else {}
    pool = payload.get("connection") or {}
    if not isinstance(pool, dict):
        pool = {}
    pid = payload.get("backend_pid")
    if not warm:
        return "opened, closed on return"
    if pool.get("replaced"):
        return f"recycled: {pool['replaced']}"
    if pool.get("opened") or pid != previous_pid:
        return "opened"
    if pool.get("pre_ping"):
        return "reused after pre-ping"
    return "reused"


def _run(
    server: PostgresServer,
    title: str,
    *,
    warm: bool,
    iam: bool,
    invocations: int,
) -> RunSummary:
    app_name = f"lambda_pool_demo_{'warm' if warm else 'nullpool'}_{os.getpid()}"
    url = _function_url(server, app_name, iam)

    def observe() -> dict[str, Any]:
        return {"backends": server.backend_count(app_name)}

    _say("")
    _say(f"== {title}")
    header = (
        f"{'#':>3}  {'step':<28} {'start':<5} {'result':<12} {'backend':>8}  "
        f"{'connection':<30} {'server':>6} {'ms':>8}"
    )
    _say(header)
    _say("-" * len(header))
    rows: list[Row] = []
    pids: set[int] = set()
    previous_pid: int | None = None
    with LocalLambda(
        "app.handler",
        _SAMPLE,
        env=_environment(url, warm),
        function_name=f"lambda-pool-demo-{'warm' if warm else 'nullpool'}",
        timeout_s=10.0,
        python=sys.executable,
        observe=observe,
    ) as function:
        began = time.monotonic()

        def invoke(step: str, event: dict[str, Any] | None = None) -> None:
            nonlocal previous_pid
            result = function.invoke(event or {})
            payload = result.payload if isinstance(result.payload, dict) else {}
            pid = payload.get("backend_pid")
            if isinstance(pid, int):
                pids.add(pid)
            row = Row(
                number=len(rows) + 1,
                step=step,
                start="cold" if result.cold else "warm",
                result="ok" if result.ok else str(result.error_type),
                backend_pid=pid if isinstance(pid, int) else None,
                connection=(
                    _connection_note(result, previous_pid, warm)
                    if result.ok
                    else "rolled back, kept"
                    if warm
                    else "rolled back, closed"
                ),
                server_backends=int((result.observed or {}).get("backends", 0)),
                ms=result.duration_ms,
            )
            if isinstance(pid, int):
                previous_pid = pid
            rows.append(row)
            pid_text = str(row.backend_pid) if row.backend_pid is not None else "-"
            _say(
                f"{row.number:>3}  {row.step:<28} {row.start:<5} {row.result:<12} "
                f"{pid_text:>8}  {row.connection:<30} {row.server_backends:>6} {row.ms:>8.1f}"
            )

        invoke("first invocation")
        init_ms = function.init_duration_ms or 0.0
        _say(f"     (Init of the cold start took {init_ms:.1f} ms before it)")
        for index in range(invocations):
            invoke(f"warm invocation {index + 1}")
        function.idle(_PRE_PING_IDLE_SECONDS * 1.5)
        invoke(f"after {_PRE_PING_IDLE_SECONDS * 1.5:.1f} s idle")
        if iam and warm:
            # Wait past the token's shortened life: the next checkout retires it.
            remaining = _TOKEN_SECONDS + 1.5 - (time.monotonic() - began)
            if remaining > 0:
                function.idle(remaining)
            invoke("after the IAM token expired")
        invoke(_FAILING_STEP, {"fail": True})
        invoke("next invocation")
        function.shutdown(grace=0.5)
    after = server.wait_for_backend_count(0, application_name=app_name, timeout=5)
    _say(f"     shutdown (SIGTERM): server backends of this function now {after}")
    return RunSummary(
        title=title, rows=rows, backends_opened=len(pids), after_shutdown=after, init_ms=init_ms
    )


def main(invocations: int = 8, out: TextIO | None = None, tls: bool | None = None) -> int:
    """Run both scenarios and print the tables; 0 when every expected outcome was seen.

    ``tls=False`` starts the embedded server without TLS (as with PostgreSQL binaries
    built without OpenSSL), which replaces IAM tokens by the URL's password.
    """
    global _stream
    _stream = out
    if not (_SAMPLE / "app.py").exists():
        _say(f"[demo] the sample handler is missing: {_SAMPLE / 'app.py'}")
        return 2
    if invocations < 1:
        _say("[demo] --invocations must be at least 1")
        return 2
    started = time.perf_counter()
    with _database(tls) as server:
        iam = _prepare_iam_role(server)
        if not iam:
            _say(
                "[demo] no TLS-capable PostgreSQL: both runs use the URL's password "
                "instead of IAM tokens (apt-get install postgresql for TLS)"
            )
        warm = _run(
            server,
            "lambda-pool warm cache"
            + (" with RDS IAM tokens" if iam else "")
            + " (@with_connection)",
            warm=True,
            iam=iam,
            invocations=invocations,
        )
        null = _run(
            server,
            "NullPool default (a connection per invocation)"
            + (" with RDS IAM tokens" if iam else ""),
            warm=False,
            iam=iam,
            invocations=invocations,
        )
    _say("")
    _say("== Summary")
    for summary in (warm, null):
        _say(
            f"  {summary.title}: {len(summary.rows)} invocations, "
            f"{summary.backends_opened} backends opened, "
            f"median warm invocation {summary.warm_median_ms:.1f} ms, "
            f"{summary.after_shutdown} left after shutdown"
        )
    ratio = null.warm_median_ms / warm.warm_median_ms if warm.warm_median_ms else float("nan")
    _say(
        f"  A warm invocation with NullPool took {ratio:.1f}x as long as with the warm cache "
        "in this run (ratios only mean something within one run)."
    )
    healthy = warm.as_expected and null.as_expected
    verdict = "every invocation behaved as expected" if healthy else "UNEXPECTED results above"
    _say(
        f"[demo] finished in {time.perf_counter() - started:.1f} s: {verdict}; "
        "nothing left running."
    )
    return 0 if healthy else 1
