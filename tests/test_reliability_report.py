"""``python -m benchmarks.reliability`` runs end to end in a tiny mode and writes its table.

A smoke test: two of the scenarios (terminate and read-only failover) against a
throw-away server, written to a temporary file.  It checks the document's shape and that
every row verified its data from another connection ("none" lost).  The full run that
writes docs/reliability.md is ``.venv/bin/python -m benchmarks.reliability``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_reliability_script_writes_a_table_with_every_row_verified(tmp_path: Path) -> None:
    out = tmp_path / "reliability.md"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.reliability",
            "--quick",
            "--only",
            "terminate",
            "--only",
            "readonly",
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "do not edit by hand" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    header, body = rows[0], rows[1:]
    assert "data lost" in header and "time taken vs deadline" in header
    faults = [row.split(" | ")[0].lstrip("| ") for row in body]
    assert faults == [
        "terminate (idle)",
        "terminate (mid-transaction)",
        "terminate (mid-statement)",
        "read-only failover",
    ]
    for row in body:
        assert row.rstrip(" |").endswith("none"), row
    read_only = body[-1]
    assert "ReadOnlySqlTransaction" in read_only and "old one discarded" in read_only
