"""`lambda-pool doctor URL` against the real test server and against things that are not one."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator

import pytest

from lambda_pool import cli, doctor
from lambda_pool.testing.postgres import PostgresServer


def _statuses(report: doctor.Report) -> dict[str, str]:
    return {check.step: check.status for check in report.checks}


def test_a_healthy_server_passes_every_step_and_reports_version_and_capacity(
    embedded_postgres: PostgresServer,
) -> None:
    report = doctor.run(embedded_postgres.dsn, timeout=5)

    assert report.ok, report.checks
    statuses = _statuses(report)
    assert statuses["authentication"] == "ok"
    assert statuses["tls"] in ("ok", "warn")
    details = {check.step: check.detail for check in report.checks}
    assert embedded_postgres.version.split()[0] in details["server"]
    assert "max_connections=" in details["capacity"]
    assert "round trip" in details["latency"]


def test_a_wrong_password_fails_at_authentication_with_advice_and_no_password(
    embedded_postgres: PostgresServer,
) -> None:
    secret = "not-the-password-5f1e"
    report = doctor.run(embedded_postgres.dsn_for(embedded_postgres.user, secret), timeout=5)
    out = io.StringIO()
    doctor.print_report(report, out)

    assert not report.ok
    assert _statuses(report)["authentication"] == "fail"
    assert "password authentication failed" in out.getvalue()
    assert "advice:" in out.getvalue()
    assert secret not in out.getvalue()
    assert secret not in repr(report)


def test_a_closed_port_fails_at_tcp(embedded_postgres: PostgresServer) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    report = doctor.run(f"postgresql://u:p@127.0.0.1:{port}/db", timeout=2)

    assert _statuses(report)["tcp"] == "fail"
    assert "refused" in report.verdict


def test_an_unknown_host_fails_at_dns() -> None:
    report = doctor.run("postgresql://u:p@no-such-host.invalid/db", timeout=2)

    assert _statuses(report) == {"url": "ok", "dns": "fail"}
    assert "no-such-host.invalid" in report.verdict


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP but never says a word, like a hung proxy."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        yield listener.getsockname()[1]


def test_a_server_that_never_answers_fails_within_the_timeout_with_a_clear_message(
    silent_listener: int,
) -> None:
    report = doctor.run(f"postgresql://u:p@127.0.0.1:{silent_listener}/db", timeout=0.5)

    assert _statuses(report)["tls"] == "fail"
    assert "no answer to the TLS request" in report.verdict


@pytest.mark.parametrize(
    ("url", "expected"),
    [("mysql://u@h/d", "unsupported database scheme"), ("not a url", "could not parse")],
)
def test_a_bad_url_is_reported_at_the_url_step(url: str, expected: str) -> None:
    report = doctor.run(url)

    assert _statuses(report) == {"url": "fail"}
    assert expected in report.verdict


def test_the_command_exits_zero_for_a_healthy_server_and_one_otherwise(
    embedded_postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", embedded_postgres.dsn]) == 0
    assert "OK: this database is reachable" in capsys.readouterr().out
    assert cli.main(["doctor", "--timeout", "1", "postgresql://u:p@127.0.0.1:1/db"]) == 1
    assert "FAILED at tcp" in capsys.readouterr().out
