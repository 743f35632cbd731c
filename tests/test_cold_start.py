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


def _loaded_after(code: str) -> set[str]:
    """The lambda_pool modules in ``sys.modules`` after ``code`` ran in a fresh interpreter.

    (``-X importtime`` does not report modules loaded by ``importlib.import_module``, as
    ``lambda_pool.__getattr__`` and the dialect registry load theirs.)
    """
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport sys\n"
            "print('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'lambda_pool'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(completed.stdout.split())


# Issue 13, goal 1: what a static-password engine costs at Init is mostly these modules
# (unmarshalling, class bodies, one import each). A module added here is a cold-start
# cost every user pays: load it at first use instead, or change this list knowingly.
STATIC_ENGINE_MODULES = {
    "lambda_pool",
    "lambda_pool._drive",
    "lambda_pool._record",
    "lambda_pool._registry",
    "lambda_pool.conninfo",
    "lambda_pool.deadlines",
    "lambda_pool.dialects",
    "lambda_pool.dialects.base",
    "lambda_pool.dialects.psycopg",
    "lambda_pool.engine",
    "lambda_pool.engine_core",
    "lambda_pool.engine_setup",
    "lambda_pool.event",
    "lambda_pool.exc",
    "lambda_pool.result",
    "lambda_pool.url",
}


def test_the_engine_knows_every_connect_retry_keyword() -> None:
    # engine_setup names them itself so that connect_retry loads at the first connect.
    from lambda_pool import connect_retry, engine_setup

    assert engine_setup._RETRY_KEYWORDS == connect_retry.KEYWORDS


def test_a_static_engine_loads_exactly_the_pinned_lambda_pool_modules() -> None:
    loaded = _loaded_after(
        "import lambda_pool\nlambda_pool.create_engine('postgresql://u:p@127.0.0.1:1/db')"
    )

    assert loaded == STATIC_ENGINE_MODULES


def test_a_default_pool_is_built_at_first_use_and_read_directly_after() -> None:
    # create_engine() checks everything but builds a keyword-less NullPool at the first
    # use of engine.pool (connect, raw_connection, event.listen on the pool...): the pool
    # machinery is loaded then, and later reads are plain attribute reads.
    code = (
        "import sys, lambda_pool\n"
        "from lambda_pool import event\n"
        "engine = lambda_pool.create_engine('postgresql://u:p@127.0.0.1:1/db')\n"
        "event.listen(engine, 'connect', lambda dbapi, record: None)\n"
        "engine.dispose()\n"
        "engine.dispose_for_shutdown()\n"
        "print('before', 'lambda_pool.pool' in sys.modules, 'pool' in vars(engine),\n"
        "      type(engine).__name__, isinstance(engine, lambda_pool.Engine))\n"
        "pool = engine.pool\n"
        "print('after', type(pool).__name__, vars(engine)['pool'] is pool is engine.pool)\n"
        "# Built: the engine is a plain Engine again, with no descriptor named pool on any\n"
        "# class of it (one would keep each checkout's engine.pool read unspecialised).\n"
        "print('class', type(engine) is lambda_pool.Engine,\n"
        "      any('pool' in vars(cls) for cls in type(engine).__mro__))\n"
        "print('listener', len(pool._merge_listeners('connect')))\n"
        "engine.dispose()\n"
        "print('disposed', engine.pool is not pool, type(engine.pool).__name__)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert completed.stdout.split("\n")[:5] == [
        "before False False Engine True",
        "after NullPool True",
        "class True False",
        "listener 1",
        "disposed True NullPool",
    ]


def test_an_async_engines_default_pool_is_built_at_first_use_too() -> None:
    code = (
        "from lambda_pool.asyncio import AsyncEngine, create_async_engine\n"
        "engine = create_async_engine('postgresql+psycopg://u:p@127.0.0.1:1/db')\n"
        "print('pool' in vars(engine), type(engine).__name__, isinstance(engine, AsyncEngine))\n"
        "pool = engine.pool\n"
        "print(type(pool).__name__, pool.is_async, type(engine) is AsyncEngine)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert completed.stdout.split("\n")[:2] == ["False AsyncEngine True", "NullPool True True"]


def test_pool_keywords_build_the_pool_in_create_engine() -> None:
    # A pool keyword is checked against its pool class at create_engine(), so that pool
    # is built there as before (only the keyword-less default waits).
    code = (
        "import lambda_pool\n"
        "engine = lambda_pool.create_engine('postgresql://u:p@127.0.0.1:1/db', pool_size=1)\n"
        "print(type(vars(engine)['pool']).__name__)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert completed.stdout.strip() == "QueuePool"


def test_the_url_split_finds_what_sqlalchemys_url_regex_finds() -> None:
    # lambda_pool.url splits a URL with string methods instead of compiling SQLAlchemy's
    # grammar (0.4 ms per cold start): same groups, '@' and ':' backtracking included.
    import random
    import re

    from lambda_pool.url import _split_url

    grammar = re.compile(
        r"""
            (?P<name>[\w+]+)://
            (?:
                (?P<username>[^:/]*)
                (?::(?P<password>[^@]*))?
            @)?
            (?P<hostlist>[^/?]*)
            (?:/(?P<database>[^?]*))?
            (?:\?(?P<query>.*))?
        """,
        re.X | re.S,
    )

    def expected(text: str) -> tuple[str | None, ...] | None:
        match = grammar.match(text)
        if match is None:
            return None
        assert match.end() == len(text)
        return match.group("name", "username", "password", "hostlist", "database", "query")

    rng = random.Random(13)
    alphabet = "ab:/@?+_\n é%3.=&-[],"
    prefixes = ["postgresql://", "postgresql+psycopg://", "sqlite:///", "é_1://", "a b://"]
    prefixes += ["://", "x:/", "", "+://"]
    for _ in range(20000):
        text = rng.choice(prefixes) + "".join(
            rng.choice(alphabet) for _ in range(rng.randint(0, 16))
        )
        assert _split_url(text) == expected(text), text


def test_the_plain_constants_copy_pickle_and_print_like_enum_members() -> None:
    import copy
    import pickle

    from lambda_pool.engine_core import ConnOp
    from lambda_pool.pool.core import Op, Stale

    assert copy.copy(Op.CLOSE) is copy.deepcopy(Op.CLOSE) is pickle.loads(pickle.dumps(Op.CLOSE))
    assert repr(Stale.RECYCLE) == "<Stale.RECYCLE: 'recycle'>"
    assert (Stale.RECYCLE.name, Stale.RECYCLE.value) == ("RECYCLE", "recycle")
    assert ConnOp.CLOSE is not Op.CLOSE and ConnOp.CLOSE != Op.CLOSE
    assert {ConnOp.EXECUTE: 1}[ConnOp.EXECUTE] == 1
