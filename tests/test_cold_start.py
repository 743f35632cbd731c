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


_AUTH_MODULES = {
    "lambda_pool.auth.iam",
    "lambda_pool.auth.sigv4",
    "lambda_pool.auth.secrets",
    "lambda_pool.auth.secrets_http",
    "lambda_pool.auth.static",
}


def _lambda_pool_auth_modules(modules: set[str]) -> set[str]:
    return modules & _AUTH_MODULES


def test_a_static_password_engine_loads_no_credential_module() -> None:
    # Goal 1 of the cold-start issue: only what the URL needs. A password in the URL
    # needs no IAM signer (hashlib's OpenSSL binding), no secrets reader, no URL parsing
    # of credential keys.
    made = _imported_modules(
        "import lambda_pool; lambda_pool.create_engine('postgresql://u:p@127.0.0.1:1/db')"
    )

    assert _lambda_pool_auth_modules(made) == set()
    assert "lambda_pool.auth.from_url" not in made
    assert "_hashlib" not in made


def test_an_iam_engine_loads_the_signer_only_when_it_first_signs() -> None:
    made = _imported_modules(
        "import lambda_pool; lambda_pool.create_engine("
        "'postgresql://u@127.0.0.1:1/db?auth=iam&region=eu-west-1')"
    )

    assert _lambda_pool_auth_modules(made) == {"lambda_pool.auth.iam"}


def test_a_secret_engine_loads_the_http_reader_only_when_it_first_reads() -> None:
    made = _imported_modules(
        "import lambda_pool; lambda_pool.create_engine("
        "'postgresql://127.0.0.1:1/db?secret=prod/db&region=eu-west-1')"
    )

    assert _lambda_pool_auth_modules(made) == {"lambda_pool.auth.secrets"}
    assert "http.client" not in made
    assert not any(m.split(".")[0] in ("boto3", "botocore") for m in made)


def test_a_blocking_handler_module_does_not_pay_for_asyncio() -> None:
    modules = _imported_modules(
        "from lambda_pool import with_connection, warm_engine, install_shutdown_hooks"
    )

    assert "asyncio" not in modules


def test_a_static_engine_generates_no_dataclass_code() -> None:
    # @dataclass execs generated source per class (about a millisecond each, paid at every
    # cold start); the value classes create_engine needs are plain __slots__ classes.
    code = (
        "import dataclasses, sys\n"
        "made = []\n"
        "original = dataclasses._process_class\n"
        "def spy(cls, *args, **kwargs):\n"
        "    made.append(cls.__module__ + '.' + cls.__qualname__)\n"
        "    return original(cls, *args, **kwargs)\n"
        "dataclasses._process_class = spy\n"
        "import lambda_pool\n"
        "lambda_pool.create_engine('postgresql://u:p@127.0.0.1:1/db')\n"
        "print([name for name in made if name.startswith('lambda_pool')])\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert completed.stdout.strip() == "[]"


def test_the_plain_value_classes_compare_print_and_freeze_like_dataclasses() -> None:
    import copy
    import dataclasses
    import pickle

    from lambda_pool.connect_retry import ConnectRetryPolicy
    from lambda_pool.engine_setup import ConnectAttempt
    from lambda_pool.pool.base import PoolResetState

    policy = ConnectRetryPolicy(retries=2, backoff=0.5)
    assert policy == ConnectRetryPolicy(2, 0.5) != ConnectRetryPolicy(3, 0.5)
    assert hash(policy) == hash(ConnectRetryPolicy(2, 0.5))
    assert repr(policy) == (
        "ConnectRetryPolicy(retries=2, backoff=0.5, max_backoff=2.0, max_total=10.0)"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.retries = 5  # type: ignore[misc]
    assert copy.deepcopy(policy) == pickle.loads(pickle.dumps(policy)) == policy
    state = PoolResetState(transaction_was_reset=True, terminate_only=False, asyncio_safe=True)
    assert state == PoolResetState(True, False, True)
    attempt = ConnectAttempt(is_async=False)
    attempt.connection = "opened"
    assert repr(attempt) == "ConnectAttempt(is_async=False, connection='opened')"
    with pytest.raises(TypeError):
        hash(attempt)
