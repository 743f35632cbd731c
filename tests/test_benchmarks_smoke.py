"""``python -m benchmarks --quick`` runs end to end against the test server.

A smoke test only: it checks that every contender was measured (a positive number),
that each took the path it is named after (pool counters, the server's statement log,
the proxy's reply counter), and that the JSON, the table, the SVG charts and the
generated page are complete.  It never asserts speed: timings on a shared machine are
not something a test can hold to.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

import pytest

from lambda_pool.testing.pgbouncer import find_pgbouncer
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
        "checkout.contention.lambda_pool.queuepool",
        "checkout.contention.sqlalchemy.queuepool",
        "checkout.contention.psycopg_pool.getconn",
    ],
    "invocation": [
        "invocation.raw_held",
        "invocation.raw_held.lambda_pool_messages",
        "invocation.lambda_pool.nullpool",
        "invocation.lambda_pool.warm",
        "invocation.lambda_pool.warm.preping",
        "invocation.lambda_pool.with_connection",
        "invocation.lambda_pool.with_connection.no_timeout",
    ],
    "instructions": [
        "instructions.raw_held",
        "instructions.lambda_pool.with_connection",
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
        f"async_invocation.{driver}.{name}"
        for driver in ("psycopg", "asyncpg")
        for name in (
            "raw_held",
            "lambda_pool.nullpool",
            "lambda_pool.warm",
            "lambda_pool.warm.preping",
        )
    ],
    # Quick mode: the first latency (0.5 ms) only; PgBouncer's rows when it is installed.
    "latency": [
        f"latency.{route}.0.5ms.{name}"
        for route in ("direct", *(("pgbouncer",) if find_pgbouncer() else ()))
        for name in (
            "raw",
            "warm",
            "warm.no_deadline",
            "sqlalchemy.preping",
            "psycopg_pool.check",
            "nullpool",
        )
    ],
}


@pytest.fixture(scope="module")
def quick_run(
    embedded_postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], str]:
    """One ``--quick`` run against the session's server: (JSON document, stdout)."""
    base = tmp_path_factory.mktemp("bench")
    path = base / "results.json"
    env = dict(os.environ, DATABASE_URL=embedded_postgres.dsn)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--json",
            str(path),
            "--docs-dir",
            str(base / "docs"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        # The instructions section starts four interpreters under valgrind.
        timeout=420,
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
    if section == "instructions" and shutil.which("valgrind") is None:
        pytest.skip("valgrind is not installed (apt-get install valgrind)")
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
        ("invocation", "invocation.raw_held", "raw held"),
        ("async_invocation", "async_invocation.psycopg.raw_held", "raw held"),
        ("async_invocation", "async_invocation.asyncpg.raw_held", "raw held"),
        ("latency", "latency.direct.0.5ms.raw", "raw held"),
        ("checkout", "checkout.contention.psycopg_pool.getconn", "psycopg_pool"),
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
    invocation = _rows(document, "invocation")
    for row_id in (
        "invocation.lambda_pool.with_connection",
        "invocation.lambda_pool.with_connection.no_timeout",
    ):
        fast = invocation[row_id]["facts"]
        assert fast["opened"] == 1 and fast["reused"] > 0 and fast["pre_pings"] == 0, row_id
    for row_id, row in invocation.items():
        # The warm pass measured every contender but NullPool (a connect per call).
        cpu = row["facts"].get("client_user_cpu_us")
        assert (cpu is None) == (row_id == "invocation.lambda_pool.nullpool"), row_id
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


def test_latency_rows_took_the_path_they_are_named_after(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    """Each row's own server statement log and reply count show its path."""
    document, stdout = quick_run
    rows = _rows(document, "latency")
    routes = {row["facts"]["route"] for row in rows.values()}
    if "pgbouncer" not in routes:
        assert "PgBouncer rows not measured" in stdout and "apt-get install pgbouncer" in stdout
    for route in routes:

        def facts(name: str, route: str = route) -> dict[str, Any]:
            found: dict[str, Any] = rows[f"latency.{route}.0.5ms.{name}"]["facts"]
            assert found["replies"] > 0 and found["statements"] == len(found["statement_log"])
            return found

        raw = facts("raw")
        assert raw["statement_log"] == ["BEGIN", "SELECT 1", "COMMIT"]
        assert raw["replies"] == 3
        deadline_on = " ".join(facts("warm")["statement_log"])
        deadline_off = " ".join(facts("warm.no_deadline")["statement_log"])
        assert "statement_timeout" in deadline_on and "SELECT 1" in deadline_on
        assert "statement_timeout" not in deadline_off and "SELECT 1" in deadline_off
        # A pre-ping / check: one more statement before the invocation's own three.
        for pinged in ("sqlalchemy.preping", "psycopg_pool.check"):
            log = facts(pinged)["statement_log"]
            assert log[-3:] == ["BEGIN", "SELECT 1", "COMMIT"] and len(log) == 4, pinged
        # Connect per invocation: handshake replies on the wire that the log never shows.
        nullpool = facts("nullpool")
        assert nullpool["statement_log"] == ["BEGIN", "SELECT 1", "COMMIT"]
        assert nullpool["replies"] > nullpool["statements"]


def test_quick_run_writes_svg_charts_and_the_generated_page(
    quick_run: tuple[dict[str, Any], str],
) -> None:
    _, stdout = quick_run
    written = [
        Path(line.split(": ", 1)[1]) for line in stdout.splitlines() if line.startswith("written: ")
    ]
    names = sorted(path.name for path in written)
    assert names == [
        "bench-checkout.svg",
        "bench-invocation.svg",
        "bench-round-trips.svg",
        "benchmarks.md",
    ]
    for path in written:
        if path.suffix == ".svg":
            root = ElementTree.parse(path).getroot()
            assert root.tag == "{http://www.w3.org/2000/svg}svg"
            assert len(root.findall("{http://www.w3.org/2000/svg}rect")) > 3, path.name
    page = next(path for path in written if path.suffix == ".md").read_text(encoding="utf-8")
    assert page.count("<!-- benchmarks:generated:begin") == 1
    assert page.count("<!-- benchmarks:generated:end -->") == 1
    for image in ("bench-invocation.svg", "bench-round-trips.svg", "bench-checkout.svg"):
        assert f"]({image})" in page
    assert "### Goals" in page and "Invocation through a slow network" in page
