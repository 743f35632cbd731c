"""Why the build ships hash-checked bytecode: SAM's 1980-01-01 zip dates defeat timestamps.

A package is compiled both ways, zipped as SAM zips it and unpacked with the zip's dates
(benchmarks/deploy.py's helpers), then imported by a new interpreter that may not write
bytecode (Lambda's /var/task is read-only). ``python -v`` says which ``.pyc`` it used.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is a folder of the checkout, not installed

from benchmarks.deploy import unzip_with_dates, zip_like_sam  # noqa: E402


def _ship(tmp_path: Path, mode: str) -> Path:
    staged = tmp_path / "staged"
    (staged / "pkg").mkdir(parents=True)
    (staged / "pkg" / "__init__.py").write_text("VALUE = 42\n")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "--invalidation-mode", mode, str(staged)],
        check=True,
    )
    zip_like_sam(staged, tmp_path / "function.zip")
    task = tmp_path / "task"
    unzip_with_dates(tmp_path / "function.zip", task)
    return task


def _import_verbose(task: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-v", "-c", "import pkg; assert pkg.VALUE == 42"],
        cwd=task,
        env={**os.environ, "PYTHONPATH": str(task), "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stderr


def test_sam_zip_dates_every_entry_1980(tmp_path: Path) -> None:
    task = _ship(tmp_path, "timestamp")
    with zipfile.ZipFile(tmp_path / "function.zip") as zipped:
        assert {i.date_time for i in zipped.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    assert (task / "pkg" / "__init__.py").stat().st_mtime < 400_000_000  # 1980 local time


@pytest.mark.parametrize(
    ("mode", "used"),
    [("timestamp", False), ("checked-hash", True)],
)
def test_only_hash_checked_bytecode_survives_the_zip(tmp_path: Path, mode: str, used: bool) -> None:
    trace = _import_verbose(_ship(tmp_path, mode))
    pyc = f"pkg/__pycache__/__init__.{sys.implementation.cache_tag}.pyc"
    assert (f"code object from '{tmp_path / 'task' / pyc}'" in trace) is used, trace
    assert ("bytecode is stale for 'pkg'" in trace) is not used
