"""``lambda-pool doctor URL``: check a database URL step by step, as a Lambda user would.

Each step (URL, credentials, DNS, TCP, TLS, authentication, server, latency, capacity)
runs only when the ones before it passed, is bounded by the timeout, and ends in a
verdict with advice for the step that failed.  The TLS step speaks PostgreSQL's
``SSLRequest`` by hand (a few bytes on a socket) so it can tell "the server refuses
TLS" apart from "authentication failed", which a driver's single error cannot; with
``sslmode=verify-ca``/``verify-full`` it verifies the certificate as libpq will
(``sslrootcert``, else ``~/.postgresql/root.crt``).  A URL with several hosts has each
host checked in turn, as libpq tries them.

:func:`run` never raises for anything about the database or the URL: every error
becomes a failed check with advice, so the command never shows a traceback.  Nothing
here prints a password, token or secret value: messages are masked where a secret
part of the URL appears as a word, never by blind substring replacement (a password
``x`` must not turn "does not exist" into "does not e***ist").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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

#: Where RDS and Aurora's CA certificates are published (all regions in one file).
RDS_CA_BUNDLE_URL = "https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem"
_VERIFY_MODES = ("verify-ca", "verify-full")
_CA_ADVICE = (
    "sslmode={mode} checks the server's certificate against a root certificate: download "
    f"the RDS CA bundle ({RDS_CA_BUNDLE_URL}), ship it with the function and add "
    "sslrootcert=/path/to/global-bundle.pem to the URL (libpq otherwise looks for "
    "~/.postgresql/root.crt); or use sslmode=require, which encrypts without verifying."
)
# asyncpg-only URL keys: doctor checks the server through libpq (psycopg), which would
# refuse them as unknown options.
_ASYNCPG_ONLY_KEYS = (
    "command_timeout",
    "statement_cache_size",
    "max_cached_statement_lifetime",
    "max_cacheable_statement_size",
)


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

    def as_dict(self) -> dict[str, Any]:
        """The report as plain data (``lambda-pool doctor --json``)."""
        return {
            "url": self.url,
            "ok": self.ok,
            "verdict": self.verdict,
            "checks": [dataclasses.asdict(check) for check in self.checks],
        }


class _StepFailed(Exception):
    """Stops the run after a failed step; the check is already recorded."""


def check_timeout(timeout: object) -> float:
    """``timeout`` as seconds > 0, at most an hour; else :class:`lambda_pool.exc.ArgumentError`."""
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not math.isfinite(timeout)
        or not 0 < timeout <= 3600
    ):
        raise exc.ArgumentError(
            f"timeout={timeout!r}: give the seconds allowed per step, a number above 0 "
            "and at most 3600 (e.g. 5)"
        )
    return float(timeout)


def run(url: str, *, timeout: float = 5.0) -> Report:
    """Run every check against ``url`` and return the report.

    Never raises for a bad database or URL (each problem is a failed check); a bad
    ``timeout`` raises :class:`~lambda_pool.exc.ArgumentError`.
    """
    from lambda_pool.url import make_url

    timeout = check_timeout(timeout)
    try:
        parsed = make_url(url)
    except exc.ArgumentError as error:
        report = Report(url="<unparseable>")
        report.checks.append(
            Check(
                "url",
                "fail",
                str(error),
                "Use postgresql://USER[:PASSWORD]@HOST[:PORT]/DB (percent-encode '@', '/', "
                "'?' and '#' in the password) or a libpq key=value string.",
            )
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
    except Exception as error:  # a bug or a surprise still ends as a failed check
        report.checks.append(
            Check(
                "doctor",
                "fail",
                f"{type(error).__name__}: {_safe_message(error, parsed)}",
                "An unexpected error in doctor itself; please report it with this line.",
            )
        )
    return report


def _steps(parsed: Any, timeout: float) -> Iterator[Check]:
    credentials = _check_credentials(parsed)
    if credentials is not None:
        yield credentials
        if credentials.status == "fail":
            return
    targets = _targets(parsed)
    reachable = 0
    for number, (host, port) in enumerate(targets, start=1):
        label = f" (host {number} of {len(targets)})" if len(targets) > 1 else ""
        checks = list(_check_host(host, port, parsed, timeout, label))
        failed = any(check.status == "fail" for check in checks)
        if failed and len(targets) > 1 and number < len(targets):
            # libpq goes on to the next host: this one's failure is a warning.
            checks = [
                dataclasses.replace(c, status="warn") if c.status == "fail" else c for c in checks
            ]
        yield from checks
        if not failed:
            reachable += 1
            break
    if reachable == 0:
        return
    yield from _check_session(parsed, timeout)


def _targets(parsed: Any) -> list[tuple[str, int]]:
    """Every (host, port) libpq will try, in order."""
    hosts_value = parsed.query.get("host", parsed.host or "localhost")
    ports_value = parsed.query.get("port", str(parsed.port or ""))
    hosts = [h for value in _values(hosts_value) for h in value.split(",")]
    ports = [p for value in _values(ports_value) for p in value.split(",")]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [
        (host or "localhost", int(port) if port.strip() else 5432)
        for host, port in zip(hosts, ports + [""] * (len(hosts) - len(ports)), strict=False)
    ]


def _values(value: Any) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _check_credentials(parsed: Any) -> Check | None:
    """Build the credential provider the URL asks for: a configuration problem (no
    region, a non-TLS sslmode with IAM) is the client's, said before any network step."""
    from lambda_pool.auth.from_url import AUTH_QUERY_KEYS, provider_from_url

    if not AUTH_QUERY_KEYS.intersection(parsed.query):
        return None
    try:
        provider = provider_from_url(parsed.query, parsed.username, parsed.host, parsed.port)
    except (exc.ArgumentError, exc.CredentialsError) as error:
        return Check(
            "credentials",
            "fail",
            _safe_message(error, parsed),
            "A client-side setting: fix the URL's auth=/secret=/region= or the "
            "environment (AWS_REGION) as the message says.",
        )
    kind = type(provider).__name__ if provider is not None else "the URL's password"
    return Check("credentials", "ok", f"{kind} configured")


def _check_host(host: str, port: int, parsed: Any, timeout: float, label: str) -> Iterator[Check]:
    if host.startswith("/"):
        yield Check("dns", "skip", f"unix socket directory {host}{label}")
        yield Check("tcp", "skip", "unix socket")
        yield Check("tls", "skip", "unix socket")
        return
    started = time.perf_counter()
    addresses = _resolve(host, port, timeout)
    elapsed = (time.perf_counter() - started) * 1000
    if isinstance(addresses, str):
        yield Check(
            "dns",
            "fail",
            f"cannot resolve {host!r}{label}: {addresses}",
            "Check the host name. Inside a VPC, the function needs DNS resolution "
            "enabled on the VPC, and a private endpoint needs the function in that VPC.",
            elapsed,
        )
        return
    yield Check("dns", "ok", f"{host} -> {', '.join(addresses)}{label}", elapsed_ms=elapsed)

    started = time.perf_counter()
    try:
        sock = socket.create_connection((addresses[0], port), timeout=timeout)
    except OSError as error:
        elapsed = (time.perf_counter() - started) * 1000
        reason = "timed out" if isinstance(error, socket.timeout) else str(error)
        yield Check(
            "tcp",
            "fail",
            f"cannot connect to {addresses[0]}:{port}{label}: {reason}",
            "A timeout usually means a security group or network ACL drops the "
            "traffic: allow the function's security group on the database's port. "
            "'Connection refused' means nothing listens there: check the port.",
            elapsed,
        )
        return
    yield Check(
        "tcp",
        "ok",
        f"connected to {addresses[0]}:{port}{label}",
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )
    with sock:
        yield _check_tls(sock, host, parsed, timeout)


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
    context, problem = _tls_context(parsed, sslmode)
    if context is None:
        return Check("tls", "fail", problem, _CA_ADVICE.format(mode=sslmode))
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
    except ssl.SSLCertVerificationError as error:
        return Check(
            "tls",
            "fail",
            f"the server's certificate does not verify ({sslmode}): {error.verify_message}",
            _CA_ADVICE.format(mode=sslmode)
            + (
                " With verify-full the host name in the URL must be one the certificate "
                "names (the cluster or proxy endpoint, not a CNAME or an IP address)."
                if sslmode == "verify-full"
                else ""
            ),
            (time.perf_counter() - started) * 1000,
        )
    except (OSError, ssl.SSLError) as error:
        return Check("tls", "fail", f"TLS handshake failed: {error}", "Check the server's TLS.")
    verified = " and its certificate verified" if sslmode in _VERIFY_MODES else ""
    return Check(
        "tls",
        "ok",
        f"{version} offered{verified}",
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


def _tls_context(parsed: Any, sslmode: str) -> tuple[ssl.SSLContext | None, str]:
    """The context libpq's ``sslmode`` implies, or ``(None, why)`` when it cannot be built."""
    if sslmode not in _VERIFY_MODES:
        # libpq encrypts without verifying in these modes; so does this check.
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context, ""
    root = str(parsed.query.get("sslrootcert", "")) or os.path.expanduser("~/.postgresql/root.crt")
    try:
        if root == "system":
            context = ssl.create_default_context()
        else:
            if not os.path.exists(root):
                return None, (
                    f"sslmode={sslmode} needs a root certificate and {root} does not exist"
                )
            context = ssl.create_default_context(cafile=root)
    except (OSError, ssl.SSLError) as error:
        return None, f"the root certificate {root} cannot be loaded: {error}"
    context.check_hostname = sslmode == "verify-full"
    context.verify_mode = ssl.CERT_REQUIRED
    return context, ""


def _uses_iam(parsed: Any) -> bool:
    return str(parsed.query.get("auth", "")).lower() == "iam"


def _check_session(parsed: Any, timeout: float) -> Iterator[Check]:
    from lambda_pool.engine import create_engine

    if parsed.get_driver_name() != "psycopg":
        # doctor checks the server through libpq, whatever driver the URL names.
        parsed = parsed.set(drivername="postgresql+psycopg").difference_update_query(
            _ASYNCPG_ONLY_KEYS
        )
    try:
        engine = create_engine(parsed, connect_args={"connect_timeout": max(1, math.ceil(timeout))})
    except (exc.ArgumentError, exc.CredentialsError, exc.DriverNotInstalledError) as error:
        yield Check(
            "authentication",
            "fail",
            _safe_message(error, parsed),
            "A client-side setting, not the server: fix what the message names.",
        )
        return
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
    lowered = text.lower()
    sslmode = str(parsed.query.get("sslmode", "prefer"))
    if isinstance(error, exc.CredentialsError):
        return Check(
            "credentials",
            "fail",
            text,
            "The credentials could not be obtained on this machine (a client-side "
            "problem): check AWS_REGION, that AWS credentials are available (the function's "
            "role; locally a profile or AWS_ACCESS_KEY_ID), and that they may read the "
            "secret or call rds-db:connect.",
            elapsed,
        )
    if (
        "root certificate" in lowered
        or "certificate verify failed" in lowered
        or ("certificate" in lowered and sslmode in _VERIFY_MODES)
    ):
        return Check("tls", "fail", text, _CA_ADVICE.format(mode=sslmode), elapsed)
    if sqlstate in ("28P01", "28000") or "authentication failed" in lowered:
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
    if sqlstate == "3D000" or re.search(r'database ".*" does not exist', text):
        return Check("authentication", "fail", text, "Check the database name in the URL.", elapsed)
    if "timeout" in lowered:
        return Check(
            "authentication",
            "fail",
            text,
            "The server accepted TCP but did not finish the login in time: is it overloaded?",
            elapsed,
        )
    psycopg = _psycopg()
    if psycopg is not None and isinstance(error, psycopg.ProgrammingError):
        return Check(
            "authentication",
            "fail",
            text,
            "libpq refused a connection parameter (a client-side setting): fix the URL's "
            "query as the message says.",
            elapsed,
        )
    if psycopg is not None and isinstance(error, psycopg.OperationalError) and "FATAL" in text:
        return Check("authentication", "fail", text, "See the server's log for details.", elapsed)
    return Check(
        "authentication",
        "fail",
        text,
        "The connection failed before the server judged it: check the URL's parameters "
        "and this machine's network and TLS setup.",
        elapsed,
    )


def _psycopg() -> Any:
    import sys

    return sys.modules.get("psycopg")


def _secrets(parsed: Any) -> list[str]:
    """The secret parts of the URL: its password and any secret-named query value."""
    from lambda_pool.conninfo import is_secret_query_key

    found = [str(parsed.password)] if parsed.password else []
    for key, value in parsed.query.items():
        if is_secret_query_key(key):
            found.extend(_values(value))
    return [secret for secret in found if secret]


def _safe_message(error: BaseException, parsed: Any) -> str:
    """The first line of the error, with the URL's secrets masked where they stand as
    words (or as a ``password=`` value), so ordinary words are never cut up."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.I)
    for secret in sorted(_secrets(parsed), key=len, reverse=True):
        text = re.sub(rf"(?<![\w]){re.escape(secret)}(?![\w])", "***", text)
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


def print_json(report: Report, out: TextIO) -> None:
    """Print the report as one JSON document (``--json``)."""
    json.dump(report.as_dict(), out, indent=2)
    out.write("\n")
