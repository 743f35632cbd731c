"""``lambda-pool invoke``: a built function folder run in the real awslambdaric, from the shell.

The folder here is laid out as ``sam build`` lays one out (``build/<Function>`` with the
handler module and its packages, ``build/template.yaml`` beside it) but assembled from
this environment, for the interpreter running the tests, so it needs neither the SAM CLI
nor the package index; tests/test_sam_build.py runs the real ``sam build`` output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lambda_pool.local_invoke import InvokeError, link_distributions, read_function_spec
from lambda_pool.testing.postgres import PostgresServer

pytest.importorskip("awslambdaric", reason="pip install 'lambda-pool[testing]'")

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent
RUNTIME = f"python{sys.version_info.major}.{sys.version_info.minor}"
TEMPLATE = f"""\
AWSTemplateFormatVersion: "2010-09-09"
Transform: AWS::Serverless-2016-10-31
Parameters:
  FunctionTimeout:
    Type: Number
    Default: 20
Globals:
  Function:
    Runtime: {RUNTIME}
    Handler: app.handler
    Timeout: !Ref FunctionTimeout
Resources:
  PsycopgFunction:
    Type: AWS::Serverless::Function
    Properties:
      CodeUri: PsycopgFunction
      MemorySize: 256
      Environment:
        Variables:
          LAMBDA_POOL_DATABASE_URL: !Sub postgresql://app@${{AWS::Region}}.example/app
"""


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    build = tmp_path_factory.mktemp("aws-sam") / "build"
    folder = build / "PsycopgFunction"
    folder.mkdir(parents=True)
    shutil.copy(ROOT / "samples" / "psycopg_handler" / "app.py", folder / "app.py")
    shutil.copytree(
        ROOT / "lambda_pool", folder / "lambda_pool", ignore=shutil.ignore_patterns("__pycache__")
    )
    link_distributions(["psycopg", "psycopg-binary"], folder, required=("psycopg",))
    (build / "template.yaml").write_text(TEMPLATE)
    return build


def _invoke(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lambda_pool.cli", "invoke", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_spec_comes_from_the_built_template_globals_and_parameter_defaults(
    build_dir: Path,
) -> None:
    spec = read_function_spec(build_dir / "PsycopgFunction")
    assert (spec.handler, spec.runtime) == ("app.handler", RUNTIME)
    assert (spec.timeout_s, spec.memory_mb) == (20.0, 256)
    chosen = read_function_spec(build_dir / "PsycopgFunction", handler="app.other", timeout_s=5)
    assert (chosen.handler, chosen.timeout_s) == ("app.other", 5.0)
    with pytest.raises(InvokeError, match="handler module 'missing' is not in"):
        read_function_spec(build_dir / "PsycopgFunction", handler="missing.handler")


def test_invoke_prints_each_result_and_reuses_one_backend_then_closes_it(
    build_dir: Path,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    tmp_path: Path,
) -> None:
    app = unique_application_name
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, embedded_postgres.password, application_name=app
    )
    event = tmp_path / "event.json"
    event.write_text("{}")
    done = _invoke(
        str(build_dir / "PsycopgFunction"), "--event", str(event), "--times", "3",
        "--database-url", url,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(results) == 3
    assert len({r["backend_pid"] for r in results}) == 1
    assert [r["reused"] for r in results] == [False, True, True]
    assert "cold invocation" in done.stderr and done.stderr.count("warm invocation") == 2
    # The command waited for Shutdown: the function's SIGTERM hook closed the connection.
    assert embedded_postgres.wait_for_backend_count(0, app, timeout=10) == 0
    assert embedded_postgres.password not in done.stdout + done.stderr


def test_a_function_error_prints_the_error_object_and_exits_1(
    build_dir: Path, embedded_postgres: PostgresServer
) -> None:
    done = _invoke(
        str(build_dir / "PsycopgFunction"), "--event", "-", "--database-url", embedded_postgres.dsn,
        stdin='{"fail": true}',
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    error = json.loads(done.stdout)
    assert error["errorType"] == "ValueError"
    assert "asked this invocation to fail" in error["errorMessage"]


def test_the_function_sees_only_its_folder_and_the_runtime_packages(
    build_dir: Path, embedded_postgres: PostgresServer, tmp_path: Path
) -> None:
    # SQLAlchemy is installed where lambda-pool runs, but not in the built folder: as on
    # Lambda, importing it must fail instead of silently using the build machine's copy.
    folder = tmp_path / "build" / "PsycopgFunction"
    shutil.copytree(build_dir / "PsycopgFunction", folder, symlinks=True)
    (folder / "app.py").write_text(
        "import sqlalchemy\n\ndef handler(event, context):\n    return {}\n"
    )
    done = _invoke(
        str(folder), "--handler", "app.handler", "--runtime", RUNTIME,
        "--database-url", embedded_postgres.dsn,
    )  # fmt: skip
    assert done.returncode == 1
    error = json.loads(done.stdout)
    assert error["errorType"] == "Runtime.ImportModuleError"
    assert "sqlalchemy" in error["errorMessage"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["does-not-exist"], "is not a folder"),
        (["{folder}", "--event", "{missing}"], "cannot read the event"),
        (["{folder}", "--event", "{not_json}"], "is not JSON"),
        (["{folder}", "--runtime", "nodejs22.x"], "is not a Python runtime"),
        (["{folder}", "--env", "NO_EQUALS_SIGN"], "--env takes NAME=VALUE"),
        (["{folder}", "--python", "/nonexistent/python"], "not runnable"),
    ],
)
def test_mistakes_in_the_command_exit_2_with_a_message_and_no_traceback(
    build_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    not_json = tmp_path / "bad.json"
    not_json.write_text("{nope")
    values = {
        "folder": str(build_dir / "PsycopgFunction"),
        "missing": str(tmp_path / "missing.json"),
        "not_json": str(not_json),
    }
    done = _invoke(*(a.format(**values) for a in args))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("lambda-pool invoke: error: ")
    assert message in done.stderr
    assert "Traceback" not in done.stderr
