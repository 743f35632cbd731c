"""``python -m benchmarks --quick`` runs end to end against the test server.

A smoke test only: it checks that every contender was measured (a positive number)
and that the JSON and the table are complete.  It never asserts speed: timings on a
shared machine are not something a test can hold to.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lambda_pool.testing.postgres import PostgresServer

REPO_ROOT = Path(__file__).resolve().parents[1]

#: SQLAlchemy's asyncio engine needs greenlet; without it the run leaves its rows out
#: (and says so), and ``test_sqlalchemy_async_rows_...`` below skips naming the fix.
HAS_GREENLET = importlib.util.find_spec("greenlet") is not None

SQLALCHEMY_ASYNC_CHECKOUT = [
    "async_checkout.psycopg.sqlalchemy.queuepool",
    "async_checkout.psycopg.sqlalchemy.queuepool.preping",
    "async_checkout.psycopg.sqlalchemy.connect",
    "async_checkout.psycopg.sqlalchemy.queuepool.discard",
]

EXPECTED: dict[str, list[str]] = {
    "import": [
        "import.lambda_pool",
        "import.lambda_pool.create_engine_attr",
        "import.sqlalchemy",
        "ready.lambda_pool",
        "ready.sqlalchemy",
        "ready.psycopg_pool",
        "ready.psycopg",
    ],
    "checkout": [
        f"checkout.{name}{suffix}"
        for suffix in ("", ".preping")
        for name in (
            "sqlite.lambda_pool.queuepool",
            "sqlite.sqlalchemy.queuepool",
            "psycopg.lambda_pool.queuepool",
            "psycopg.sqlalchemy.queuepool",
            "psycopg.psycopg_pool.getconn",
            "psycopg.psycopg_pool.connection",
            "psycopg.lambda_pool.warm",
        )
    ]
    + [
        "checkout.psycopg.sqlalchemy.queuepool.discard",
        "checkout.psycopg.psycopg_pool.getconn.discard",
    ],
    "invocation": [
        "invocation.lambda_pool.nullpool",
        "invocation.lambda_pool.warm",
        "invocation.lambda_pool.warm.preping",
    ],
    "async_checkout": [
        "async_checkout.psycopg.lambda_pool.queuepool",
        "async_checkout.psycopg.lambda_pool.queuepool.preping",
        "async_checkout.psycopg.lambda_pool.connect",
        "async_checkout.psycopg.lambda_pool.warm",
        "async_checkout.psycopg.lambda_pool.warm.preping",
        "async_checkout.psycopg.psycopg_pool.getconn",
        "async_checkout.psycopg.psycopg_pool.getconn.preping",
        "async_checkout.psycopg.psycopg_pool.connection",
        "async_checkout.psycopg.psycopg_pool.getconn.discard",
    ]
    + (SQLALCHEMY_ASYNC_CHECKOUT if HAS_GREENLET else []),
    "async_invocation": [
        f"async_invocation.{driver}.lambda_pool.{name}"
        for driver in ("psycopg", "asyncpg")
        for name in ("nullpool", "warm", "warm.preping")
    ],
}


@pytest.fixture(scope="module")
def quick_run(
    embedded_postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], str]:
    """One ``--quick`` run against the session's server: (JSON document, stdout)."""
    path = tmp_path_factory.mktemp("bench") / "results.json"
    env = dict(os.environ, DATABASE_URL=embedded_postgres.dsn)
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(path.read_text(encoding="utf-8")), completed.stdout


def _rows(document: dict[str, Any], section: str) -> dict[str, dict[str, Any]]:
    return {row["id"]: row for row in document["sections"][section]["rows"]}


@pytest.mark.parametrize("section", sorted(EXPECTED))
def test_quick_run_measures_every_contender_with_a_positive_figure(
    quick_run: tuple[dict[str, Any], str], section: str
) -> None:
    document, _ = quick_run
    rows = _rows(document, section)
    assert sorted(rows) == sorted(EXPECTED[section])
    for row_id, row in rows.items():
        median = row["median"]
        assert isinstance(median, (int, float)) and math.isfinite(median) and median > 0, row_id
        assert row["samples"] and all(sample > 0 for sample in row["samples"]), row_id


def test_every_ratio_is_positive_and_each_baseline_is_one(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    document, _ = quick_run
    baselines = {
        ("import", "import.lambda_pool.create_engine_attr", "lambda-pool"),
        ("import", "ready.lambda_pool", "lambda-pool"),
        ("checkout", "checkout.psycopg.sqlalchemy.queuepool", "SQLAlchemy"),
        ("checkout", "checkout.psycopg.psycopg_pool.getconn.preping", "psycopg_pool"),
        ("invocation", "invocation.lambda_pool.nullpool", "NullPool"),
        ("async_checkout", "async_checkout.psycopg.psycopg_pool.getconn", "psycopg_pool"),
        ("async_checkout", "async_checkout.psycopg.psycopg_pool.connection", "psycopg_pool"),
        ("async_invocation", "async_invocation.psycopg.lambda_pool.nullpool", "NullPool"),
        ("async_invocation", "async_invocation.asyncpg.lambda_pool.nullpool", "NullPool"),
    }
    if HAS_GREENLET:
        baselines.add(("async_checkout", "async_checkout.psycopg.sqlalchemy.connect", "SQLAlchemy"))
    for section, row_id, baseline in baselines:
        assert _rows(document, section)[row_id]["ratios"][baseline] == pytest.approx(1.0)
    for section in EXPECTED:
        for row in document["sections"][section]["rows"]:
            for value in row["ratios"].values():
                assert value is None or value > 0, row["id"]


def test_warm_rows_took_the_path_they_are_named_after(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    document, _ = quick_run
    checkout = _rows(document, "checkout")
    fast = checkout["checkout.psycopg.lambda_pool.warm"]["facts"]
    pinged = checkout["checkout.psycopg.lambda_pool.warm.preping"]["facts"]
    assert fast["opened"] == 1 and fast["reused"] > 0 and fast["pre_pings"] == 0
    assert pinged["opened"] == 1 and pinged["pre_pings"] == pinged["reused"] > 0
    warm_rows = {
        "async_checkout": "async_checkout.psycopg.lambda_pool.warm",
        "async_invocation.psycopg": "async_invocation.psycopg.lambda_pool.warm",
        "async_invocation.asyncpg": "async_invocation.asyncpg.lambda_pool.warm",
    }
    for key, row_id in warm_rows.items():
        rows = _rows(document, key.split(".")[0])
        fast = rows[row_id]["facts"]
        pinged = rows[f"{row_id}.preping"]["facts"]
        assert fast["opened"] == 1 and fast["reused"] > 0 and fast["pre_pings"] == 0, row_id
        assert pinged["opened"] == 1 and pinged["pre_pings"] == pinged["reused"] > 0, row_id


def test_sqlalchemy_async_rows_are_measured_when_greenlet_is_installed(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    if not HAS_GREENLET:
        pytest.skip(
            "greenlet is not installed: SQLAlchemy's asyncio engine needs it "
            "(.venv/bin/pip install greenlet); the run leaves SQLAlchemy's async rows out"
        )
    document, stdout = quick_run
    rows = _rows(document, "async_checkout")
    for row_id in SQLALCHEMY_ASYNC_CHECKOUT:
        assert rows[row_id]["median"] > 0, row_id
    assert "SQLAlchemy rows not measured" not in stdout


def test_quick_run_prints_a_table_per_section_and_no_password(
    quick_run: tuple[dict[str, Any], str], embedded_postgres: PostgresServer
) -> None:
    document, stdout = quick_run
    for section in document["sections"].values():
        assert section["title"] in stdout
    password = embedded_postgres.password
    if password:
        assert password not in stdout
        assert password not in json.dumps(document)
