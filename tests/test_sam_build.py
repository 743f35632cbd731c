"""The deploy path a user takes, with the real SAM CLI: ``sam build`` on a copy of the repository.

Once per session the repository (tracked and untracked, not ignored files: what a fresh
clone plus local edits holds) is copied to a temporary folder and built with the real
``sam build`` (aws-sam-cli, installed into ``.venv-sam`` when it is not there, exactly
as docs/deploy.md tells users). Then, for every function of template.yaml:

* its built folder holds ``lambda_pool``, the extras the function imports, and none of
  the packages only tests need, nor a copy of Powertools where the layer provides it;
* every ``.py`` in it has a hash-checked ``.pyc`` for the runtime's Python, whose hash
  matches the source (what Lambda validates, since SAM's zip dates all files 1980-01-01);
* it runs in the real awslambdaric runtime client (``lambda_pool.local_invoke``, what
  ``lambda-pool invoke`` uses) against the embedded PostgreSQL: a cold invocation, warm
  ones on the same server backend (pg_stat_activity), then Shutdown's SIGTERM leaves no
  backend behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lambda_pool.local_invoke import (
    InvokeError,
    LambdaRuntime,
    find_python,
    function_environment,
    link_distributions,
    read_function_spec,
)
from lambda_pool.testing.postgres import PostgresServer
from lambda_pool.testing.runtime import LocalLambda

pytestmark = pytest.mark.sam

ROOT = Path(__file__).resolve().parent.parent
SAM_VENV = ROOT / ".venv-sam"
RUNTIME_VERSION = "3.12"  # template.yaml Globals.Function.Runtime (test_template checks it)
SKIP_IN_COPY = {".git", ".aws-sam", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}

# Import names each built folder must hold, and must not hold.
POSTGRES = {"lambda_pool", "psycopg", "psycopg_binary"}
SECRETS = {"boto3", "botocore", "aws_lambda_powertools"}
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "PsycopgFunction": (POSTGRES | SECRETS, {"sqlalchemy", "asyncpg", "aws_xray_sdk"}),
    "SqlAlchemyFunction": (POSTGRES | SECRETS | {"sqlalchemy"}, {"asyncpg", "aws_xray_sdk"}),
    "AsyncFunction": (POSTGRES | SECRETS, {"sqlalchemy", "asyncpg", "aws_xray_sdk"}),
    "PowertoolsFunction": (POSTGRES | SECRETS | {"aws_xray_sdk"}, {"sqlalchemy", "asyncpg"}),
    # The layer brings Powertools and the runtime boto3: no copy may shadow them.
    "PowertoolsLayerFunction": (POSTGRES, SECRETS | {"aws_xray_sdk", "sqlalchemy"}),
}
# Packages of the test tooling (lambda-pool[testing,dev]) that no function needs.
TEST_ONLY = {
    "pytest",
    "_pytest",
    "pytest_asyncio",
    "moto",
    "responses",
    "pgserver",
    "awslambdaric",
    "runtime_client",
    "cfnlint",
    "samtranslator",
    "mypy",
    "ruff",
    "cryptography",
}


def _sam() -> str:
    """The sam executable: on PATH, in .venv-sam, or installed there now."""
    found = os.environ.get("LAMBDA_POOL_SAM") or shutil.which("sam")
    if found:
        return found
    sam = SAM_VENV / "bin" / "sam"
    if not sam.exists():
        # aws-sam-cli pins many packages: its own environment, never .venv.
        steps = [
            [sys.executable, "-m", "venv", str(SAM_VENV)],
            [str(SAM_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet", "aws-sam-cli"],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True, timeout=900, check=False)
            if done.returncode != 0:
                pytest.skip(
                    "the SAM CLI is not installed and could not be (pip install aws-sam-cli "
                    f"into .venv-sam): {done.stderr.strip()[-300:]}"
                )
    return str(sam)


def _copy_repository(into: Path) -> Path:
    """The checkout's files as a clone would have them, plus local edits."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    target = into / "lambda-pool"
    if listed.returncode == 0:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file() and not SKIP_IN_COPY & set(Path(name).parts):
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target / name)
    else:  # not a git checkout (a source archive)
        shutil.copytree(
            ROOT,
            target,
            ignore=lambda _dir, names: [
                n for n in names if n in SKIP_IN_COPY or n.startswith(".venv")
            ],
        )
    return target


@pytest.fixture(scope="session")
def runtime_python() -> str:
    try:
        return find_python(RUNTIME_VERSION)
    except InvokeError as exc:
        pytest.skip(f"sam build needs the functions' runtime: {exc}")


@pytest.fixture(scope="session")
def sam_build(tmp_path_factory: pytest.TempPathFactory, runtime_python: str) -> Path:
    """``.aws-sam/build`` of a fresh copy of the repository (built once per session)."""
    sam = _sam()
    project = _copy_repository(tmp_path_factory.mktemp("sam"))
    env = {
        **os.environ,
        # The Makefiles run python3.12 (samples/function.mk): the one found goes first.
        "PATH": os.pathsep.join([str(Path(runtime_python).parent), os.environ.get("PATH", "")]),
        "LAMBDA_BUILD_PYTHON": runtime_python,
        "SAM_CLI_TELEMETRY": "0",
        "AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
    }
    # Under `make test`, make's own variables (MAKEFLAGS: PYTHON=... and the like) would
    # reach the Makefiles sam build runs.
    for name in ("VIRTUAL_ENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(name, None)
    done = subprocess.run(
        [sam, "build"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert done.returncode == 0, f"sam build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "Build Succeeded" in done.stdout
    return project / ".aws-sam" / "build"


@pytest.fixture(scope="session")
def lambda_runtime(runtime_python: str) -> Iterator[LambdaRuntime]:
    try:
        with LambdaRuntime(RUNTIME_VERSION, python=runtime_python) as runtime:
            yield runtime
    except InvokeError as exc:
        pytest.skip(str(exc))


def _top_level_names(folder: Path) -> set[str]:
    names = set()
    for entry in folder.iterdir():
        if entry.name.endswith((".dist-info", ".libs")) or entry.name == "__pycache__":
            continue
        names.add(entry.name.removesuffix(".py") if entry.suffix == ".py" else entry.name)
    return names


# --- what sam build wrote ----------------------------------------------------------------


def test_sam_build_writes_one_folder_per_template_function(sam_build: Path) -> None:
    folders = {p.name for p in sam_build.iterdir() if p.is_dir()}
    assert folders == set(EXPECTED)
    for name in EXPECTED:
        spec = read_function_spec(sam_build / name)
        assert (spec.handler, spec.runtime) == ("app.handler", f"python{RUNTIME_VERSION}")
        assert (sam_build / name / "app.py").is_file()
        assert (sam_build / name / "lambda_pool" / "__init__.py").is_file()


@pytest.mark.parametrize("function", sorted(EXPECTED))
def test_built_function_holds_its_extras_and_no_test_packages(
    sam_build: Path, function: str
) -> None:
    names = _top_level_names(sam_build / function)
    required, absent = EXPECTED[function]
    assert required <= names, f"missing: {sorted(required - names)}"
    assert not (absent | TEST_ONLY) & names, sorted((absent | TEST_ONLY) & names)
    # lambda-pool came from the copied checkout (built into a wheel), not from an index.
    project = sam_build.parent.parent
    for module in ("__init__.py", "url.py", "handler.py"):
        copied = (project / "lambda_pool" / module).read_bytes()
        assert (sam_build / function / "lambda_pool" / module).read_bytes() == copied
    assert list((sam_build / function).glob("lambda_pool-*.dist-info"))


_CHECK_PYC = r"""
import importlib.util, json, sys
from pathlib import Path

root = Path(sys.argv[1])
tag = sys.implementation.cache_tag
report = {"sources": 0, "missing": [], "not_checked_hash": [], "stale": []}
for source in root.rglob("*.py"):
    report["sources"] += 1
    pyc = Path(importlib.util.cache_from_source(str(source)))
    if not pyc.exists():
        report["missing"].append(str(source.relative_to(root)))
        continue
    head = pyc.read_bytes()[:16]
    flags = int.from_bytes(head[4:8], "little")
    if head[:4] != importlib.util.MAGIC_NUMBER or flags != 0b11:
        report["not_checked_hash"].append(str(pyc.relative_to(root)))
    elif head[8:16] != importlib.util.source_hash(source.read_bytes()):
        report["stale"].append(str(source.relative_to(root)))
print(json.dumps(report))
"""


@pytest.mark.parametrize("function", sorted(EXPECTED))
def test_every_module_has_hash_checked_bytecode_for_the_runtime(
    sam_build: Path, function: str, runtime_python: str
) -> None:
    # Run by the runtime's interpreter: its magic number and source-hash key apply.
    done = subprocess.run(
        [runtime_python, "-c", _CHECK_PYC, str(sam_build / function)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["sources"] > 100  # lambda_pool and its dependencies
    assert report["missing"] == []
    assert report["not_checked_hash"] == []
    assert report["stale"] == []


# --- the built functions in the real runtime client -------------------------------------


@pytest.fixture(scope="session")
def powertools_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stand-in for the public Powertools layer's python/ folder (the same packages)."""
    layer = tmp_path_factory.mktemp("powertools-layer") / "python"
    link_distributions(
        ["aws-lambda-powertools", "aws-xray-sdk"],
        layer,
        required=("aws-lambda-powertools", "aws-xray-sdk"),
    )
    return layer


@pytest.mark.e2e
@pytest.mark.parametrize("function", sorted(EXPECTED))
def test_built_function_runs_warm_on_one_backend_and_closes_it_at_shutdown(
    sam_build: Path,
    lambda_runtime: LambdaRuntime,
    powertools_layer: Path,
    embedded_postgres: PostgresServer,
    unique_application_name: str,
    function: str,
) -> None:
    app = unique_application_name
    spec = read_function_spec(sam_build / function, timeout_s=20.0)
    url = embedded_postgres.dsn_for(
        embedded_postgres.user, embedded_postgres.password, application_name=app
    )
    layers = [powertools_layer] if function == "PowertoolsLayerFunction" else []

    def backends() -> dict[str, Any]:
        return {"pids": [b["pid"] for b in embedded_postgres.backends(app)]}

    with LocalLambda(
        spec.handler,
        spec.folder,
        env={
            **function_environment(spec, url),
            "PYTHONPATH": lambda_runtime.search_path(spec.folder, layers),
        },
        function_name=function,
        timeout_s=spec.timeout_s,
        memory_mb=spec.memory_mb,
        python=lambda_runtime.python,
        execution_env=f"AWS_Lambda_{spec.runtime}",
        observe=backends,
    ) as fn:
        cold = fn.invoke({})
        assert cold.ok, f"{cold.error_type}: {cold.error_message}\n{fn.logs()}"
        warm = [fn.invoke({}) for _ in range(3)]
        assert all(r.ok for r in warm), [r.error_message for r in warm]
        assert fn.extensions_registered == 1
        status = fn.shutdown(grace=3.0)
        left = embedded_postgres.wait_for_backend_count(0, app, timeout=10)

    assert cold.cold and not any(r.cold for r in warm)
    pid = cold.payload["backend_pid"]
    assert [r.payload["backend_pid"] for r in warm] == [pid] * 3
    # The server agrees: one backend of this function, the one the handler reported.
    assert all(r.observed == {"pids": [pid]} for r in (cold, *warm))
    visits = [r.payload["visits"] for r in (cold, *warm)]
    assert visits == list(range(visits[0], visits[0] + 4))
    # SIGTERM (the function registered lambda-pool's extension) closed the connection.
    assert status != -9, fn.logs()
    assert left == 0
    # The interpreter ran the runtime's version, from the built folder and the runtime
    # packages only (an empty virtual environment).
    assert lambda_runtime.python.endswith("python")
    assert spec.folder.is_relative_to(sam_build)
