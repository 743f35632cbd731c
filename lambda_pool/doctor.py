"""``lambda-pool doctor URL``: check a database URL step by step, as a Lambda user would.

Each step (URL, DNS, TCP, TLS, authentication, server, latency, capacity) runs only
when the ones before it passed, is bounded by the timeout, and ends in a verdict
with advice for the step that failed.  The TLS step speaks PostgreSQL's
``SSLRequest`` by hand (a few bytes on a socket) so it can tell "the server refuses
TLS" apart from "authentication failed", which a driver's single error cannot.
Nothing here prints a password, token or secret value.
"""

from __future__ import annotations

import socket
import ssl
import statistics
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

from lambda_pool import exc

#: PostgreSQL's SSLRequest code (protocol 1234.5679), sent before any startup packet.
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)


@dataclass
class Check:
    """The outcome of one step: passed, failed (with advice) or skipped."""

    step: str
    status: str  # "ok" | "fail" | "skip" | "warn"
    detail: str
    advice: str = ""
    elapsed_ms: float | None = None


@dataclass
class Report:
    """Every check in order, plus the verdict they add up to."""

    url: str
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(check.status in ("ok", "warn", "skip") for check in self.checks)

    @property
    def verdict(self) -> str:
        failed = [check for check in self.checks if check.status == "fail"]
        if not failed:
            return "OK: this database is reachable and usable from here."
        first = failed[0]
        return f"FAILED at {first.step}: {first.detail}"


class _StepFailed(Exception):
    """Stops the run after a failed step; the check is already recorded."""


def run(url: str, *, timeout: float = 5.0) -> Report:
    """Run every check against ``url`` and return the report (never raises for a bad database)."""
    from lambda_pool.url import make_url

    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        report = Report(url="<unparseable>")
        report.checks.append(
            Check("url", "fail", str(error), "Use postgresql://USER[:PASSWORD]@HOST[:PORT]/DB.")
        )
        return report
    report = Report(url=parsed.render_as_string(hide_password=True))
    if parsed.get_backend_name() != "postgresql":
        report.checks.append(
            Check(
                "url",
                "fail",
                f"doctor checks PostgreSQL servers; this URL is for {parsed.get_backend_name()!r}",
                "Give a postgresql:// URL.",
            )
        )
        return report
    report.checks.append(Check("url", "ok", report.url))
    try:
        for check in _steps(parsed, timeout):
            report.checks.append(check)
            if check.status == "fail":
                break
    except _StepFailed:
        pass
    return report


def _steps(parsed: Any, timeout: float) -> Iterator[Check]:
    host = parsed.host or "localhost"
    port = int(parsed.port or 5432)
    if host.startswith("/"):
        yield Check("dns", "skip", f"unix socket directory {host}")
        yield Check("tcp", "skip", "unix socket")
        yield Check("tls", "skip", "unix socket")
    else:
        started = time.perf_counter()
        addresses = _resolve(host, port, timeout)
        elapsed = (time.perf_counter() - started) * 1000
        if isinstance(addresses, str):
            yield Check(
                "dns",
                "fail",
                f"cannot resolve {host!r}: {addresses}",
                "Check the host name. Inside a VPC, the function needs DNS resolution "
                "enabled on the VPC, and a private endpoint needs the function in that VPC.",
                elapsed,
            )
            return
        yield Check("dns", "ok", f"{host} -> {', '.join(addresses)}", elapsed_ms=elapsed)

        started = time.perf_counter()
        try:
            sock = socket.create_connection((addresses[0], port), timeout=timeout)
        except OSError as error:
            elapsed = (time.perf_counter() - started) * 1000
            reason = "timed out" if isinstance(error, socket.timeout) else str(error)
            yield Check(
                "tcp",
                "fail",
                f"cannot connect to {addresses[0]}:{port}: {reason}",
                "A timeout usually means a security group or network ACL drops the "
                "traffic: allow the function's security group on the database's port. "
                "'Connection refused' means nothing listens there: check the port.",
                elapsed,
            )
            return
        yield Check(
            "tcp",
            "ok",
            f"connected to {addresses[0]}:{port}",
            elapsed_ms=(time.perf_counter() - started) * 1000,
        )
        with sock:
            yield _check_tls(sock, host, parsed, timeout)

    yield from _check_session(parsed, timeout)


def _resolve(host: str, port: int, timeout: float) -> list[str] | str:
    """Resolve ``host`` within ``timeout`` (getaddrinfo itself has no timeout)."""
    outcome: dict[str, Any] = {}

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            outcome["addresses"] = sorted({str(info[4][0]) for info in infos})
        except OSError as error:
            outcome["error"] = str(error)

    worker = threading.Thread(target=lookup, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return f"no answer within {timeout:g} s"
    if "error" in outcome:
        return str(outcome["error"])
    return list(outcome["addresses"])


def _check_tls(sock: socket.socket, host: str, parsed: Any, timeout: float) -> Check:
    started = time.perf_counter()
    sslmode = str(parsed.query.get("sslmode", "prefer"))
    try:
        sock.sendall(_SSL_REQUEST)
        answer = sock.recv(1)
    except TimeoutError:
        return Check(
            "tls",
            "fail",
            "no answer to the TLS request within the timeout",
            "Something accepts TCP on this port but does not speak PostgreSQL's protocol "
            "(or is overloaded): check the port and what listens on it.",
        )
    except OSError as error:
        return Check(
            "tls",
            "fail",
            f"the server closed the connection on the TLS request: {error}",
            "Is this port a PostgreSQL server (or a proxy speaking its protocol)?",
        )
    if answer == b"N":
        needs_tls = sslmode in ("require", "verify-ca", "verify-full") or _uses_iam(parsed)
        return Check(
            "tls",
            "fail" if needs_tls else "warn",
            "the server does not offer TLS",
            "IAM authentication and sslmode=require need TLS: enable ssl on the server."
            if needs_tls
            else "Traffic is unencrypted; RDS and Aurora offer TLS: use sslmode=require.",
            (time.perf_counter() - started) * 1000,
        )
    if answer != b"S":
        return Check(
            "tls",
            "fail",
            f"unexpected answer {answer!r} to the TLS request",
            "This does not look like a PostgreSQL server or proxy.",
        )
    context = ssl.create_default_context()
    # Only the handshake is checked here; certificate verification is the driver's job
    # with sslmode=verify-full and the RDS CA bundle, which doctor cannot know.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
    except (OSError, ssl.SSLError) as error:
        return Check("tls", "fail", f"TLS handshake failed: {error}", "Check the server's TLS.")
    return Check(
        "tls", "ok", f"{version} offered", elapsed_ms=(time.perf_counter() - started) * 1000
    )


def _uses_iam(parsed: Any) -> bool:
    return str(parsed.query.get("auth", "")).lower() == "iam"


def _check_session(parsed: Any, timeout: float) -> Iterator[Check]:
    from lambda_pool.engine import create_engine

    engine = create_engine(parsed, connect_args={"connect_timeout": max(1, round(timeout))})
    started = time.perf_counter()
    try:
        connection = engine.connect()
    except Exception as error:  # every driver error becomes advice, none escapes
        elapsed = (time.perf_counter() - started) * 1000
        yield _classify_connect_error(error, parsed, elapsed)
        engine.dispose()
        return
    connect_ms = (time.perf_counter() - started) * 1000
    try:
        yield Check(
            "authentication", "ok", f"logged in as {parsed.username!r}", elapsed_ms=connect_ms
        )
        version = connection.execute("SHOW server_version").scalar()
        yield Check("server", "ok", f"PostgreSQL {version}")
        round_trips = []
        for _ in range(5):
            began = time.perf_counter()
            connection.execute("SELECT 1").scalar()
            round_trips.append((time.perf_counter() - began) * 1000)
        yield Check(
            "latency",
            "ok",
            f"connect {connect_ms:.1f} ms, round trip {statistics.median(round_trips):.2f} ms "
            "(median of 5)",
        )
        limit = int(connection.execute("SHOW max_connections").scalar())
        in_use = int(
            connection.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            ).scalar()
        )
        share = in_use / limit if limit else 0.0
        yield Check(
            "capacity",
            "warn" if share >= 0.8 else "ok",
            f"{in_use} of max_connections={limit} in use ({share:.0%})",
            "Close to the limit: every concurrent Lambda environment holds a connection; "
            "put RDS Proxy or PgBouncer (transaction mode) in front, or cap the function's "
            "reserved concurrency."
            if share >= 0.8
            else "",
        )
    finally:
        connection.close()
        engine.dispose()


def _classify_connect_error(error: BaseException, parsed: Any, elapsed: float) -> Check:
    sqlstate = getattr(error, "sqlstate", None)
    text = _safe_message(error, parsed)
    if sqlstate in ("28P01", "28000") or "authentication failed" in text:
        if _uses_iam(parsed):
            advice = (
                "IAM: the database user needs 'GRANT rds_iam TO user', the function's role "
                "needs rds-db:connect on arn:aws:rds-db:REGION:ACCOUNT:dbuser:RESOURCE_ID/USER, "
                "and the token must be for this host, port and user."
            )
        else:
            advice = (
                "Check the user and password; with Secrets Manager, check the secret holds "
                "the current password (rotation) and the role may read it."
            )
        return Check("authentication", "fail", text, advice, elapsed)
    if sqlstate == "3D000" or "does not exist" in text:
        return Check("authentication", "fail", text, "Check the database name in the URL.", elapsed)
    if "timeout" in text.lower():
        return Check(
            "authentication",
            "fail",
            text,
            "The server accepted TCP but did not finish the login in time: is it overloaded?",
            elapsed,
        )
    return Check("authentication", "fail", text, "See the server's log for details.", elapsed)


def _safe_message(error: BaseException, parsed: Any) -> str:
    """The first line of the error with any password in the URL masked."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if parsed.password:
        text = text.replace(str(parsed.password), "***")
    return text


_MARKS = {"ok": "ok  ", "fail": "FAIL", "skip": "skip", "warn": "warn"}


def print_report(report: Report, out: TextIO) -> None:
    """Print the report as a table, then the verdict and the advice for each problem."""
    print(f"lambda-pool doctor {report.url}", file=out)
    for check in report.checks:
        timing = f" ({check.elapsed_ms:.1f} ms)" if check.elapsed_ms is not None else ""
        print(f"  [{_MARKS[check.status]}] {check.step:<15} {check.detail}{timing}", file=out)
        if check.advice and check.status in ("fail", "warn"):
            print(f"         advice: {check.advice}", file=out)
    print(report.verdict, file=out)
