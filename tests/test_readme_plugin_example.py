"""The documented pytest plugin example (docs/testing.md, "pytest plugin example") runs.

The code block is extracted from the page and run in a fresh pytest session (pytester,
in a subprocess: the example's ``app`` module and plugin state must not mix with this
session's), against this session's PostgreSQL through ``LAMBDA_POOL_TEST_DSN``, with the
psycopg sample as its ``app.py``, exactly as the page tells a user to set it up.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lambda_pool.testing.postgres import PostgresServer

pytest_plugins = ("pytester",)

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "testing.md"
SAMPLE_APP = ROOT / "samples" / "psycopg_handler" / "app.py"


def plugin_example() -> str:
    """The first ```python block under the "pytest plugin example" heading."""
    text = PAGE.read_text()
    section = re.search(r"^## pytest plugin example\n(.*?)(?=^## )", text, re.M | re.S)
    assert section, "docs/testing.md has no '## pytest plugin example' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), re.M | re.S)
    assert block, "the 'pytest plugin example' section has no python code block"
    return block.group(1)


def test_example_is_ten_lines() -> None:
    # The README includes this block verbatim; its length is part of the promise.
    assert len(plugin_example().splitlines()) == 10


def test_documented_plugin_example_passes(
    pytester: pytest.Pytester,
    embedded_postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shutil.copy(SAMPLE_APP, pytester.path / "app.py")
    pytester.makepyfile(test_example=plugin_example())
    # The inner session's embedded_postgres fixture then uses this session's server
    # instead of starting its own.
    monkeypatch.setenv("LAMBDA_POOL_TEST_DSN", embedded_postgres.dsn)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=1)


def test_documented_example_fails_when_the_handler_misbehaves(
    pytester: pytest.Pytester,
    embedded_postgres: PostgresServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The example must be able to fail: a handler that opens a connection per
    # invocation (warm=False) breaks its backend-reuse assertion.
    source = SAMPLE_APP.read_text().replace(
        "@with_connection()\n", "@with_connection(warm=False)\n"
    )
    assert "@with_connection(warm=False)\n" in source
    (pytester.path / "app.py").write_text(source)
    pytester.makepyfile(test_example=plugin_example())
    monkeypatch.setenv("LAMBDA_POOL_TEST_DSN", embedded_postgres.dsn)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*backend_pid*"])
