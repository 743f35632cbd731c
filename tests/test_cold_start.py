"""Every Lambda cold start pays for ``import lambda_pool``: heavy libraries stay out of it.

Measured the way the project asks, with ``python -X importtime`` in a fresh interpreter,
for each entry point a handler module touches at Init.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("boto3", "botocore", "sqlalchemy", "aws_lambda_powertools", "asyncpg", "psycopg")


def _imported_modules(code: str) -> set[str]:
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    modules = set()
    for line in completed.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            modules.add(line.rsplit("|", 1)[1].strip())
    assert modules, completed.stderr[-2000:]
    return modules


@pytest.mark.parametrize(
    "code",
    [
        "import lambda_pool",
        "from lambda_pool import create_engine, event, with_connection, warm_engine",
        "from lambda_pool import install_shutdown_hooks, instrument, IAMCredentials",
        "import lambda_pool.config, lambda_pool.lifecycle, lambda_pool.testing.plugin",
    ],
)
def test_importing_lambda_pool_loads_no_driver_aws_or_sqlalchemy_module(code: str) -> None:
    modules = _imported_modules(code)

    loaded = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert loaded == []
    assert "lambda_pool" in modules


def test_only_the_urls_driver_is_imported_when_an_engine_is_made() -> None:
    # create_engine() imports the driver so that a missing one fails at Init with the
    # extra to install, not at the first invocation; nothing else heavy comes with it.
    made = _imported_modules(
        "import lambda_pool; lambda_pool.create_engine('postgresql://u@127.0.0.1:1/db')"
    )

    assert any(m.split(".")[0] == "psycopg" for m in made)
    assert not any(m.split(".")[0] in ("boto3", "sqlalchemy", "asyncpg") for m in made)


def test_a_blocking_handler_module_does_not_pay_for_asyncio() -> None:
    modules = _imported_modules(
        "from lambda_pool import with_connection, warm_engine, install_shutdown_hooks"
    )

    assert "asyncio" not in modules
