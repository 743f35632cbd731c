"""Cold start per credential mode: imports, engine and first query, in a fresh process each.

What a Lambda cold start pays before its first query: every import, the engine, the
credentials (an RDS IAM token signed, a secret read) and the first connect.  Each
contender is a statement run by ``python -c`` in a new process that times itself from
before its first import to after ``SELECT 1`` returned (interpreter start-up, the same
for all, is left out).  Processes run interleaved in a shuffled order, after one untimed
run of each, and the table shows medians with ratios against lambda-pool's row of the
same mode.

Modes and contenders:

* **static** (password in the URL): lambda-pool, SQLAlchemy ``create_engine``, and
  ``psycopg.connect`` alone as the floor.
* **iam**: lambda-pool (``?auth=iam``; token signed in-process), SQLAlchemy with the
  ``do_connect`` recipe (a boto3 rds client's ``generate_db_auth_token`` per connect), and
  aws-advanced-python-wrapper's ``iam`` plugin when it is importable here (it refuses to
  sign for an IP address, so its token names an RDS-like ``iam_host``).  The server
  stands in for RDS by trusting the IAM role over TLS only (it cannot check the token).
* **secret** (Secrets Manager, moto in server mode on loopback): lambda-pool
  (``?secret=ARN``: one signed ``GetSecretValue`` without boto3), lambda-pool through
  Powertools Parameters (what a function already using Powertools gets), and SQLAlchemy
  after boto3's ``get_secret_value``.

The section runs its own throw-away PostgreSQL (with TLS when the binaries have it),
since the IAM stand-in needs a ``pg_hba.conf`` line; ``--database-url`` does not apply.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import logging
import os
import random
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from benchmarks.imports import fresh_output
from benchmarks.report import Row, Section, ratio
from benchmarks.timing import median

__all__ = ["measure_coldstart"]

_REGION = "us-east-1"
_IAM_ROLE = "lp_bench_iam"
_FAKE_AWS = {
    "AWS_ACCESS_KEY_ID": "AKIDBENCHMARK",
    "AWS_SECRET_ACCESS_KEY": "benchmark-secret-key",
    "AWS_SESSION_TOKEN": "benchmark-session-token",
    "AWS_REGION": _REGION,
    "AWS_DEFAULT_REGION": _REGION,
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}

_TEMPLATE = """\
import time as _bench_time
_bench_t0 = _bench_time.perf_counter()
{statement}
_bench_ms = (_bench_time.perf_counter() - _bench_t0) * 1000.0
import sys as _bench_sys
print(repr((_bench_ms, "boto3" in _bench_sys.modules)))
"""


@dataclass(frozen=True)
class _Contender:
    id: str
    mode: str
    label: str
    statement: str
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class _Server:
    """Where the contenders connect: the URL pieces each mode needs."""

    host: str
    port: int
    dbname: str
    user: str
    password: str
    tls: bool
    secret_arn: str | None = None
    moto_endpoint: str | None = None


def _run(contender: _Contender, timeout: float = 120.0) -> tuple[float, bool]:
    # No profile or endpoint of the caller's: every mode signs with the fake credentials.
    env: dict[str, str | None] = dict.fromkeys(
        ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL")
    )
    env.update(_FAKE_AWS)
    env.update(contender.env)
    line = fresh_output(
        _TEMPLATE.format(statement=contender.statement),
        f"cold start of {contender.label!r}",
        python=contender.python,
        env_changes=env,
        timeout=timeout,
    )
    elapsed, boto3_loaded = ast.literal_eval(line)
    return float(elapsed), bool(boto3_loaded)


def _static(server: _Server) -> list[_Contender]:
    from urllib.parse import quote

    netloc = f"{quote(server.user)}:{quote(server.password)}@{server.host}:{server.port}"
    url = f"postgresql://{netloc}/{server.dbname}"
    sa_url = f"postgresql+psycopg://{netloc}/{server.dbname}"
    return [
        _Contender(
            "coldstart.static.lambda_pool",
            "static",
            "lambda-pool create_engine(url) + first query",
            f"""import lambda_pool
engine = lambda_pool.create_engine({url!r})
with engine.connect() as conn:
    conn.execute("SELECT 1").scalar()""",
        ),
        _Contender(
            "coldstart.static.sqlalchemy",
            "static",
            "SQLAlchemy create_engine(url) + first query",
            f"""import sqlalchemy
engine = sqlalchemy.create_engine({sa_url!r})
with engine.connect() as conn:
    conn.exec_driver_sql("SELECT 1").scalar()""",
        ),
        _Contender(
            "coldstart.static.psycopg",
            "static",
            "psycopg.connect + first query (floor)",
            f"""import psycopg
with psycopg.connect({url!r}) as conn:
    conn.execute("SELECT 1").fetchone()""",
        ),
    ]


def _aws_wrapper_python() -> str | None:
    """An interpreter that has aws-advanced-python-wrapper, or None.

    ``LAMBDA_POOL_BENCH_AWS_WRAPPER_PYTHON`` names one (e.g. a separate venv's python),
    else this interpreter if it can import the package.
    """
    named = os.environ.get("LAMBDA_POOL_BENCH_AWS_WRAPPER_PYTHON")
    if named:
        return named
    if importlib.util.find_spec("aws_advanced_python_wrapper") is not None:
        return sys.executable
    return None


def _iam(server: _Server) -> list[_Contender]:
    host, port, db, user = server.host, server.port, server.dbname, _IAM_ROLE
    contenders = [
        _Contender(
            "coldstart.iam.lambda_pool",
            "iam",
            "lambda-pool ?auth=iam (token signed in-process)",
            f"""import lambda_pool
engine = lambda_pool.create_engine(
    "postgresql://{user}@{host}:{port}/{db}?auth=iam&region={_REGION}&sslmode=require"
)
with engine.connect() as conn:
    conn.execute("SELECT 1").scalar()""",
        ),
        _Contender(
            "coldstart.iam.sqlalchemy",
            "iam",
            "SQLAlchemy + do_connect recipe (boto3 generate_db_auth_token)",
            f"""import boto3
import sqlalchemy
from sqlalchemy import event
rds = boto3.client("rds", region_name={_REGION!r})
engine = sqlalchemy.create_engine(
    "postgresql+psycopg://{user}@{host}:{port}/{db}", connect_args={{"sslmode": "require"}}
)
@event.listens_for(engine, "do_connect")
def _provide_token(dialect, conn_rec, cargs, cparams):
    cparams["password"] = rds.generate_db_auth_token(
        DBHostname={host!r}, Port={port}, DBUsername={user!r}, Region={_REGION!r}
    )
with engine.connect() as conn:
    conn.exec_driver_sql("SELECT 1").scalar()""",
        ),
    ]
    wrapper_python = _aws_wrapper_python()
    if wrapper_python is not None:
        contenders.append(
            _Contender(
                "coldstart.iam.aws_wrapper",
                "iam",
                "aws-advanced-python-wrapper, iam plugin (psycopg)",
                f"""from aws_advanced_python_wrapper import AwsWrapperConnection
from psycopg import Connection
conn = AwsWrapperConnection.connect(
    Connection.connect,
    "host={host} port={port} dbname={db} user={user} sslmode=require",
    plugins="iam",
    iam_region={_REGION!r},
    iam_host="bench.cluster-abc123.{_REGION}.rds.amazonaws.com",
    wrapper_dialect="pg",
)
cursor = conn.cursor()
cursor.execute("SELECT 1")
cursor.fetchone()
conn.close()""",
                python=wrapper_python,
            )
        )
    return contenders


def _secret(server: _Server) -> list[_Contender]:
    arn = server.secret_arn
    env = {"AWS_ENDPOINT_URL_SECRETS_MANAGER": str(server.moto_endpoint)}
    return [
        _Contender(
            "coldstart.secret.lambda_pool",
            "secret",
            "lambda-pool ?secret=ARN (signed GetSecretValue, no boto3)",
            f"""import lambda_pool
engine = lambda_pool.create_engine("postgresql:///?secret={arn}")
with engine.connect() as conn:
    conn.execute("SELECT 1").scalar()""",
            env=env,
        ),
        _Contender(
            "coldstart.secret.lambda_pool.powertools",
            "secret",
            "lambda-pool ?secret=ARN, function already on Powertools Parameters",
            f"""from aws_lambda_powertools.utilities import parameters
import lambda_pool
engine = lambda_pool.create_engine("postgresql:///?secret={arn}")
with engine.connect() as conn:
    conn.execute("SELECT 1").scalar()""",
            env=env,
        ),
        _Contender(
            "coldstart.secret.sqlalchemy",
            "secret",
            "SQLAlchemy after boto3 get_secret_value",
            f"""import json
import boto3
import sqlalchemy
value = json.loads(
    boto3.client("secretsmanager").get_secret_value(SecretId={arn!r})["SecretString"]
)
engine = sqlalchemy.create_engine(
    sqlalchemy.URL.create(
        "postgresql+psycopg",
        username=value["username"],
        password=value["password"],
        host=value["host"],
        port=value["port"],
        database=value["dbname"],
    )
)
with engine.connect() as conn:
    conn.exec_driver_sql("SELECT 1").scalar()""",
            env=env,
        ),
    ]


def _trust_iam_role_over_tls(pg: Any) -> None:
    """The IAM stand-in: the role logs in over TLS without a password check (RDS checks the
    token; PostgreSQL cannot), and never over plain TCP."""
    pg.trust_role_over_tls(_IAM_ROLE)


@contextlib.contextmanager
def _moto_secret(server: _Server) -> Iterator[str | None]:
    """A moto server on loopback holding the database's secret; yields its ARN (or None)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name=_REGION,
            aws_access_key_id=_FAKE_AWS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=_FAKE_AWS["AWS_SECRET_ACCESS_KEY"],
        )
        value = {
            "username": server.user,
            "password": server.password,
            "host": server.host,
            "port": server.port,
            "dbname": server.dbname,
        }
        import json

        arn = client.create_secret(Name="lambda-pool/bench/db", SecretString=json.dumps(value))
        server.moto_endpoint = endpoint
        yield str(arn["ARN"])
    finally:
        moto.stop()


def measure_coldstart(repeats: int, *, seed: int = 20240601) -> Section:
    """Time every contender ``repeats`` times in fresh processes, interleaved."""
    from lambda_pool.testing.postgres import EmbeddedPostgres

    section = Section(
        name="coldstart",
        title="Cold start per credential mode (imports + engine + credentials + first query)",
        unit="ms",
        baselines=["lambda-pool"],
    )
    with EmbeddedPostgres() as pg:
        server = _Server(pg.host, pg.port, pg.dbname, pg.user, pg.password, pg.ssl_enabled)
        contenders = _static(server)
        if server.tls:
            _trust_iam_role_over_tls(pg)
            contenders += _iam(server)
            if not any(c.id == "coldstart.iam.aws_wrapper" for c in contenders):
                section.notes.append(
                    "aws-advanced-python-wrapper: not importable here (set "
                    "LAMBDA_POOL_BENCH_AWS_WRAPPER_PYTHON to a venv's python that has it)"
                )
        else:
            section.notes.append("iam rows left out: the PostgreSQL binaries have no TLS")
        with _moto_secret(server) as arn:
            if arn is None:
                section.notes.append("secret rows left out: moto[server] is not installed")
            else:
                server.secret_arn = arn
                contenders += _secret(server)
            _measure(section, contenders, repeats, seed)
    section.notes += [
        "ratios against lambda-pool's row of the same mode; 'boto3' = boto3 was imported",
        f"median of {repeats} interleaved fresh processes; interpreter start-up excluded",
        "server: throw-away PostgreSQL on loopback; IAM role trusted over TLS (RDS would "
        "check the token); Secrets Manager: moto server on loopback",
    ]
    return section


def _measure(section: Section, contenders: list[_Contender], repeats: int, seed: int) -> None:
    rng = random.Random(seed)
    loaded: dict[str, bool] = {}
    for contender in contenders:  # untimed: byte-code caches written, page cache warm
        loaded[contender.id] = _run(contender)[1]
    samples: dict[str, list[float]] = {c.id: [] for c in contenders}
    order = list(contenders)
    for _ in range(repeats):
        rng.shuffle(order)
        for contender in order:
            samples[contender.id].append(_run(contender)[0])
    medians = {key: median(values) for key, values in samples.items()}
    anchors = {c.mode: medians[c.id] for c in contenders if c.id.endswith(".lambda_pool")}
    for contender in contenders:
        value = medians[contender.id]
        suffix = " [boto3]" if loaded[contender.id] else ""
        section.rows.append(
            Row(
                id=contender.id,
                label=f"{contender.mode}: {contender.label}{suffix}",
                median=value,
                samples=samples[contender.id],
                ratios={"lambda-pool": ratio(value, anchors.get(contender.mode))},
                facts={"mode": contender.mode, "boto3_imported": loaded[contender.id]},
            )
        )
