"""The plugin lives beside users' own fixtures: ``lp_*`` names, options, fresh databases.

A project that installs the ``testing`` extra gets the plugin in every pytest run, so
these run real pytest sessions (pytester, in a subprocess) with conftests written the
way moto's and pytest-postgresql's documentation write theirs.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from lambda_pool.testing.context import CognitoIdentity, LambdaContext
from lambda_pool.testing.postgres import PostgresServer

pytest_plugins = ("pytester",)

SAMPLE_APP = Path(__file__).resolve().parents[1] / "samples" / "psycopg_handler" / "app.py"


def _run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q", *args)


def test_a_users_own_aws_fixture_does_not_break_the_plugins_secret(
    pytester: pytest.Pytester, embedded_postgres: PostgresServer
) -> None:
    # moto's documented conftest: an ``aws`` fixture that yields an S3 client.
    pytester.makeconftest(
        """
        import boto3, os, pytest
        from moto import mock_aws

        @pytest.fixture
        def aws():
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            with mock_aws():
                yield boto3.client("s3", region_name="us-east-1")
        """
    )
    pytester.makepyfile(
        test_theirs="""
        import json, boto3, psycopg

        def test_both(aws, lp_db_secret):
            aws.create_bucket(Bucket="mine")
            assert [b["Name"] for b in aws.list_buckets()["Buckets"]] == ["mine"]
            value = json.loads(boto3.client("secretsmanager", region_name="us-east-1")
                               .get_secret_value(SecretId=lp_db_secret)["SecretString"])
            with psycopg.connect(host=value["host"], port=value["port"], user=value["username"],
                                 password=value["password"], dbname=value["dbname"]) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        """
    )
    result = _run(pytester, f"--lp-postgres-dsn={embedded_postgres.dsn}")
    result.assert_outcomes(passed=1)


def test_the_plugin_registers_only_lp_names(pytester: pytest.Pytester) -> None:
    result = _run(pytester, "--fixtures")
    listed = {
        line.split()[0]
        for line in result.stdout.lines
        if line and not line.startswith((" ", "-", "=")) and "[" not in line.split()[0]
    }
    ours = {name for name in listed if name.startswith("lp_")}
    assert {"lp_postgres", "lp_aws", "lp_db_secret", "lp_lambda_invoker", "lp_database"} <= ours
    for generic in ("aws", "db_secret", "embedded_postgres", "lambda_invoker", "pgbouncer"):
        assert generic not in listed


def test_dsn_option_points_every_fixture_at_an_existing_server(
    pytester: pytest.Pytester, embedded_postgres: PostgresServer
) -> None:
    pytester.makepyfile(
        test_dsn=f"""
        def test_port(lp_postgres):
            assert lp_postgres.port == {embedded_postgres.port}
        """
    )
    _run(pytester, f"--lp-postgres-dsn={embedded_postgres.dsn}").assert_outcomes(passed=1)
    # The same through the ini file.
    pytester.makeini(f"[pytest]\nlp_postgres_dsn = {embedded_postgres.dsn}\n")
    _run(pytester).assert_outcomes(passed=1)


def test_a_bad_tls_choice_in_the_ini_file_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nlp_postgres_tls = maybe\n")
    pytester.makepyfile(test_tls="def test_x(lp_postgres):\n    pass\n")
    result = _run(pytester)
    assert "lp_postgres_tls = 'maybe'" in result.stdout.str() + result.stderr.str()
    assert result.ret != 0


def test_each_test_gets_a_fresh_database_that_is_dropped_after(
    pytester: pytest.Pytester, embedded_postgres: PostgresServer, tmp_path: Path
) -> None:
    record = tmp_path / "seen.jsonl"
    pytester.makepyfile(
        test_fresh=f"""
        import json, psycopg

        def _use(url):
            with psycopg.connect(url) as conn:
                name = conn.execute("SELECT current_database()").fetchone()[0]
                tables = conn.execute(
                    "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0]
                conn.execute("CREATE TABLE mine (id int)")
            with open({str(record)!r}, "a") as out:
                out.write(json.dumps([name, tables]) + "\\n")

        def test_one(lp_database):
            _use(lp_database)

        def test_two(lp_database):
            _use(lp_database)
        """
    )
    _run(pytester, f"--lp-postgres-dsn={embedded_postgres.admin_dsn}").assert_outcomes(passed=2)
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len({name for name, _ in seen}) == 2
    assert [tables for _, tables in seen] == [0, 0]
    with embedded_postgres.admin_connect() as admin:
        left = admin.execute(
            "SELECT count(*) FROM pg_database WHERE datname = ANY(%s)", ([n for n, _ in seen],)
        ).fetchone()
    assert left == (0,)


def test_the_plugin_example_runs_with_a_users_generic_fixtures_present(
    pytester: pytest.Pytester, embedded_postgres: PostgresServer
) -> None:
    # pytest-postgresql's habit: a ``postgresql`` fixture; ours must not care.
    pytester.makeconftest(
        """
        import pytest

        @pytest.fixture
        def postgresql():
            return "not a server"

        @pytest.fixture
        def lambda_invoker():
            return None
        """
    )
    shutil.copy(SAMPLE_APP, pytester.path / "app.py")
    pytester.makepyfile(
        test_app=textwrap.dedent(
            """
            def test_cold_then_warm(lp_lambda_invoker, lp_postgres, postgresql):
                url = lp_postgres.dsn_for(lp_postgres.user, lp_postgres.password,
                                          application_name="ns_fn")
                fn = lp_lambda_invoker("app.py", env={"LAMBDA_POOL_DATABASE_URL": url})
                cold, warm = fn.cold({}), fn.warm({})
                assert warm["backend_pid"] == cold["backend_pid"]
            """
        )
    )
    _run(pytester, f"--lp-postgres-dsn={embedded_postgres.dsn}").assert_outcomes(passed=1)


def test_context_has_every_attribute_and_method_of_the_runtimes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from awslambdaric.lambda_context import LambdaContext as RuntimeContext

    runtime = RuntimeContext("id", None, None, 0, "arn:aws:lambda:us-east-1:1:function:f")
    public = {name for name in vars(runtime) if not name.startswith("_")}
    public |= {name for name in dir(RuntimeContext) if not name.startswith("_")}
    ours = LambdaContext()
    missing = sorted(name for name in public if not hasattr(ours, name) and name != "w3c")
    assert missing == []
    assert ours.identity == CognitoIdentity(None, None)
    assert ours.client_context is None and ours.tenant_id is None
    ours.log("hello from the handler")
    assert capsys.readouterr().out == "hello from the handler"
