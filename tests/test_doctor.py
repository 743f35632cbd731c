"""`lambda-pool doctor URL` against the real test server and against things that are not one."""

from __future__ import annotations

import io
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import require_tls

from lambda_pool import cli, doctor
from lambda_pool.exc import ArgumentError
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


# --------------------------------------------------------------------------- issue 11 §6


def _no_traceback(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return out + err


@pytest.fixture
def no_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No region, no AWS credentials, no instance metadata: a laptop without AWS setup."""
    for name in (
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def _iam_url(pg: PostgresServer, query: str) -> str:
    return f"postgresql://{pg.user}@127.0.0.1:{pg.port}/{pg.dbname}?{query}"


@pytest.mark.usefixtures("no_aws")
@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("auth=iam", "needs the database's AWS region"),
        ("auth=iam&region=eu-west-1&sslmode=disable", "tokens only over TLS"),
    ],
)
def test_credential_settings_fail_at_a_credentials_step_without_a_traceback(
    embedded_postgres: PostgresServer,
    capsys: pytest.CaptureFixture[str],
    query: str,
    fragment: str,
) -> None:
    assert cli.main(["doctor", _iam_url(embedded_postgres, query)]) == 1
    out = _no_traceback(capsys)
    assert "FAILED at credentials" in out and fragment in out
    assert "client-side" in out
    assert "server's log" not in out


@pytest.mark.usefixtures("no_aws")
def test_a_secret_without_a_region_is_a_client_side_credentials_failure(
    embedded_postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    pg = embedded_postgres
    url = f"postgresql://127.0.0.1:{pg.port}/{pg.dbname}?secret=prod/db"
    assert cli.main(["doctor", "--timeout", "2", url]) == 1
    out = _no_traceback(capsys)
    assert "FAILED at credentials" in out
    assert "AWS_REGION" in out and "server's log" not in out


@pytest.mark.usefixtures("no_aws")
def test_iam_without_aws_credentials_is_a_client_side_credentials_failure(
    embedded_postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tls(embedded_postgres)
    url = _iam_url(embedded_postgres, "auth=iam&region=eu-west-1&sslmode=require")
    assert cli.main(["doctor", "--timeout", "3", url]) == 1
    out = _no_traceback(capsys)
    assert "FAILED at credentials" in out
    assert "AWS credentials" in out and "server's log" not in out


def test_auth_static_is_accepted_like_lambda_pool_auth(
    embedded_postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["doctor", embedded_postgres.dsn + "?auth=static"]) == 0
    assert "OK: this database" in _no_traceback(capsys)


@pytest.mark.parametrize("timeout", ["-1", "0", "nan", "inf", "soon"])
def test_a_bad_timeout_is_a_usage_error_not_a_traceback(
    timeout: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["doctor", "--timeout", timeout, "postgresql://u@127.0.0.1/db"])
    assert info.value.code == 2
    assert "above 0" in _no_traceback(capsys)
    with pytest.raises(ArgumentError, match="above 0"):
        doctor.run(
            "postgresql://u@127.0.0.1/db", timeout=float(timeout) if timeout != "soon" else 0
        )


@pytest.mark.parametrize(
    ("query", "fragment"),
    [("sslmode=bogus", "sslmode='bogus'"), ("connect_timeout=abc", "connect_timeout='abc'")],
)
def test_bad_parameter_values_fail_at_the_url_step(
    embedded_postgres: PostgresServer, query: str, fragment: str
) -> None:
    report = doctor.run(f"{embedded_postgres.dsn}?{query}")
    assert _statuses(report) == {"url": "fail"}
    assert fragment in report.verdict


def _libpq_accepts(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=5).close()
    except psycopg.OperationalError:
        return False
    return True


def test_verify_full_without_a_root_certificate_gives_the_rds_ca_advice(
    embedded_postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    require_tls(embedded_postgres)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.postgresql/root.crt
    url = f"{embedded_postgres.dsn}?sslmode=verify-full"
    assert not _libpq_accepts(url)
    assert cli.main(["doctor", url]) == 1
    out = _no_traceback(capsys)
    assert "FAILED at tls" in out
    assert doctor.RDS_CA_BUNDLE_URL in out and "sslrootcert=" in out
    assert "database name" not in out


def test_verify_ca_agrees_with_libpq_for_the_right_and_a_wrong_root(
    embedded_postgres: PostgresServer, tmp_path: Path
) -> None:
    require_tls(embedded_postgres)
    right = embedded_postgres.ssl_root_cert
    assert right is not None
    wrong = tmp_path / "other-ca.pem"
    import certifi

    wrong.write_text(Path(certifi.where()).read_text())
    for root, ok in ((right, True), (str(wrong), False)):
        url = f"{embedded_postgres.dsn}?sslmode=verify-ca&sslrootcert={root}"
        assert _libpq_accepts(url) is ok
        report = doctor.run(url)
        assert report.ok is ok, report.checks
        if not ok:
            assert _statuses(report)["tls"] == "fail"
            assert doctor.RDS_CA_BUNDLE_URL in report.checks[-1].advice


def test_json_output_and_the_url_from_the_environment(
    embedded_postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("LAMBDA_POOL_DATABASE_URL", embedded_postgres.dsn)
    assert cli.main(["doctor", "--json"]) == 0
    document = json.loads(_no_traceback(capsys))
    assert document["ok"] is True
    assert document["verdict"].startswith("OK")
    assert embedded_postgres.password not in json.dumps(document)
    steps = [check["step"] for check in document["checks"]]
    assert steps[:2] == ["url", "dns"] and "capacity" in steps
    assert {"status", "detail", "advice", "elapsed_ms"} <= set(document["checks"][0])


def test_several_hosts_are_tried_in_turn_like_libpq(
    embedded_postgres: PostgresServer,
) -> None:
    pg = embedded_postgres
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    url = f"postgresql://{pg.user}:{pg.password}@127.0.0.1:{closed},127.0.0.1:{pg.port}/{pg.dbname}"
    report = doctor.run(url, timeout=3)
    assert report.ok, report.checks
    tcp = [check for check in report.checks if check.step == "tcp"]
    assert [check.status for check in tcp] == ["warn", "ok"]
    assert "host 1 of 2" in tcp[0].detail


def test_masking_hides_the_password_as_a_word_and_leaves_other_words_whole() -> None:
    from lambda_pool.url import make_url

    parsed = make_url("postgresql://u:x@h/db?sslpassword=s3cr3t")
    error = OSError('root certificate file "/etc/root.crt" does not exist; x; password=x y')
    message = doctor._safe_message(error, parsed)
    assert message == 'root certificate file "/etc/root.crt" does not exist; ***; password=*** y'
    assert doctor._safe_message(OSError("bad s3cr3t here"), parsed) == "bad *** here"


def test_python_m_lambda_pool_and_version() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "lambda_pool", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("lambda-pool ")
    assert result.stdout.split()[1][0].isdigit()


def test_asyncpg_urls_and_key_value_strings_are_checked_through_libpq(
    embedded_postgres: PostgresServer,
) -> None:
    pg = embedded_postgres
    asyncpg_url = pg.dsn.replace("postgresql://", "postgresql+asyncpg://") + "?command_timeout=5"
    conninfo = (
        f"host=127.0.0.1 port={pg.port} dbname={pg.dbname} user={pg.user} password='{pg.password}'"
    )
    for url in (asyncpg_url, conninfo):
        report = doctor.run(url)
        assert report.ok, report.checks
        assert pg.password not in repr(report)
        assert _statuses(report)["authentication"] == "ok"
