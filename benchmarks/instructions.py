"""Client CPU per warm invocation, counted in instructions (valgrind's callgrind).

Time on a shared 2-core machine moves by 2x between runs, and the server's work shares
the cores with the client's.  Instructions executed by the client process do not: the
same code, inputs and interpreter give nearly the same count whatever else the machine
does (within a few percent between runs: how often the client polls before a reply is
there depends on the server's speed).
Each contender runs in a fresh process under ``valgrind --tool=callgrind`` twice, once
with ``small`` and once with ``large`` invocations after the same warm-up; the count per
invocation is the difference divided by the difference in invocations, so start-up,
imports, connecting and exit cancel out (the server runs outside valgrind and is not
counted).

Contenders: the raw psycopg connection held in a global (``SELECT 1``, ``commit()``);
the floor of a correct warm invocation (that connection sending the two messages the
warm handler sends, session reset and deadline included); and a warm
``@with_connection()`` handler, deadline on and ``statement_timeout=None``.  And a pool
checkout + return, no I/O: lambda-pool's ``QueuePool`` against psycopg_pool's
``getconn``/``putconn``.

``python -m benchmarks.instructions MODE COUNT`` is the worker a run starts (``URL`` in
the environment).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.report import Row, Section, ratio
from benchmarks.server import Database

__all__ = ["measure_instructions"]

RAW = "raw held"
PSYCOPG_POOL = "psycopg_pool"
#: (worker mode, row id, label, the baseline its ratio is taken against)
MODES = (
    ("raw", "instructions.raw_held", "raw psycopg connection held in a global (the floor)", RAW),
    (
        "floor",
        "instructions.raw_held.lambda_pool_messages",
        "raw held, sending the warm handler's two messages (reset, deadline)",
        RAW,
    ),
    (
        "handler",
        "instructions.lambda_pool.with_connection",
        "lambda-pool @with_connection() warm handler, deadline on",
        RAW,
    ),
    (
        "handler_no_timeout",
        "instructions.lambda_pool.with_connection.no_timeout",
        "lambda-pool @with_connection() warm handler, statement_timeout=None",
        RAW,
    ),
    (
        "queuepool",
        "instructions.checkout.lambda_pool.queuepool",
        "[checkout + return] lambda-pool QueuePool (engine.raw_connection().close())",
        PSYCOPG_POOL,
    ),
    (
        "psycopg_pool",
        "instructions.checkout.psycopg_pool.getconn",
        "[checkout + return] psycopg_pool getconn/putconn",
        PSYCOPG_POOL,
    ),
)
#: The row each baseline is.
BASELINE_ROWS = {
    RAW: "instructions.raw_held",
    PSYCOPG_POOL: "instructions.checkout.psycopg_pool.getconn",
}
_COLLECTED = re.compile(r"Collected : (\d+)")


def _operation(mode: str, url: str) -> Any:
    """The invocation ``mode`` stands for, ready to call (run inside the worker)."""
    if mode == "queuepool":
        import lambda_pool

        engine = lambda_pool.create_engine(
            "postgresql+psycopg" + url[url.index("://") :], poolclass=lambda_pool.QueuePool
        )

        def checkout() -> None:
            engine.raw_connection().close()

        return checkout
    if mode == "psycopg_pool":
        from psycopg_pool import ConnectionPool

        pool = ConnectionPool(url, min_size=1, max_size=1, open=True)
        pool.wait()

        def getconn() -> None:
            pool.putconn(pool.getconn())

        return getconn
    if mode == "raw":
        import psycopg

        conn = psycopg.connect(url, prepare_threshold=None)

        def raw() -> None:
            conn.execute("SELECT 1")
            conn.commit()

        return raw
    if mode == "floor":
        from benchmarks.invocation import raw_with_handler_messages

        # The worker's connection lives as long as its process: the stack is never closed.
        return raw_with_handler_messages(contextlib.ExitStack(), url)
    import lambda_pool
    from lambda_pool.testing.context import LambdaContext

    timeout = None if mode == "handler_no_timeout" else "deadline"
    scheme_url = "postgresql+psycopg" + url[url.index("://") :]

    @lambda_pool.with_connection(scheme_url, statement_timeout=timeout)
    def handler(event: Any, context: Any, connection: Any) -> None:
        connection.execute("SELECT 1")

    context = LambdaContext(remaining_ms=24 * 3600 * 1000)

    def invoke() -> None:
        handler({}, context)

    return invoke


def _worker(mode: str, count: int) -> None:
    op = _operation(mode, os.environ["URL"])
    for _ in range(20):  # warm-up: the connection opened, caches filled
        op()
    # A collection landing in one run and not the other would outweigh a short run's
    # difference: none runs while the invocations do (their cycles are freed at exit,
    # which both runs pay in proportion).
    gc.collect()
    gc.disable()
    for _ in range(count):
        op()


def _instructions(mode: str, count: int, url: str, python: str = sys.executable) -> int:
    completed = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            python,
            "-m",
            "benchmarks.instructions",
            mode,
            str(count),
        ],
        env=dict(os.environ, URL=url),
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    found = _COLLECTED.search(completed.stderr)
    if completed.returncode != 0 or found is None:
        raise RuntimeError(
            f"callgrind run of {mode!r} failed (exit {completed.returncode}): "
            f"{completed.stderr[-2000:]}"
        )
    return int(found.group(1))


def measure_instructions(db: Database, *, quick: bool) -> Section:
    """Instructions per warm invocation of each contender (thousands), against raw held."""
    small, large = (40, 120) if quick else (100, 400)
    # A checkout is a fifth of an invocation: more of them for the same precision.
    scale = {"queuepool": 10, "psycopg_pool": 10}
    section = Section(
        name="instructions",
        title="Client CPU per warm invocation (instructions, callgrind)",
        unit="k instr/op",
        baselines=[RAW, PSYCOPG_POOL],
        notes=[
            "instructions the client process executes per invocation (valgrind callgrind): "
            f"({large} - {small} invocations) difference, so start-up and connect cancel out",
            "nearly the same count whatever the machine is doing (a few percent between runs: "
            "how often the client polls before the reply is there)",
        ],
    )
    if shutil.which("valgrind") is None:
        section.notes.append("not measured: valgrind is not installed (apt-get install valgrind)")
        return section
    # Quick mode (the smoke test) counts the two ends only: each run starts an
    # interpreter under valgrind, about ten seconds.  A full run counts each contender
    # three times, interleaved, and keeps the median: how often the client polls before
    # a reply is there moves a single count by a few percent.
    modes = [m for m in MODES if not quick or m[0] in {"raw", "handler"}]
    repeats = 1 if quick else 3
    url = db.libpq_url
    samples: dict[str, list[float]] = {row_id: [] for _, row_id, _, _ in modes}
    for _ in range(repeats):
        for mode, row_id, _, _ in modes:
            few, many = small * scale.get(mode, 1), large * scale.get(mode, 1)
            per_op = (_instructions(mode, many, url) - _instructions(mode, few, url)) / (many - few)
            samples[row_id].append(per_op / 1000.0)
    counts = {row_id: statistics.median(values) for row_id, values in samples.items()}
    for _, row_id, label, baseline in modes:
        value = counts[row_id]
        anchor = counts.get(BASELINE_ROWS[baseline])
        section.rows.append(
            Row(
                id=row_id,
                label=label,
                median=value,
                samples=samples[row_id],
                ratios={
                    name: ratio(value, anchor) if name == baseline else None
                    for name in section.baselines
                },
            )
        )
    if not quick:
        _add_other_interpreters(section, url, small, large, repeats)
    return section


def other_interpreters() -> list[tuple[str, str]]:
    """``(version, python)`` of the other interpreters this checkout has a virtualenv
    for (``make test PYTHON=python3.13`` makes ``.venv-3.13``), lambda-pool installed."""
    root = Path(__file__).resolve().parent.parent
    found = []
    for venv in sorted(root.glob(".venv-3.*")):
        python = venv / "bin" / "python"
        version = venv.name.removeprefix(".venv-")
        if (venv / ".installed").exists() and python.exists() and version != _THIS_VERSION:
            found.append((version, str(python)))
    return found


_THIS_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"


def _add_other_interpreters(
    section: Section, url: str, small: int, large: int, repeats: int
) -> None:
    """The raw held connection and the warm handler again on each other interpreter
    (3.12 and 3.13 where their virtualenvs exist), each read against that interpreter's
    own raw held connection: the goal holds on the Pythons Lambda runs, not on one."""
    for version, python in other_interpreters():
        baseline = f"{RAW} (python {version})"
        section.baselines.append(baseline)
        found: dict[str, list[float]] = {"raw": [], "handler": []}
        for _ in range(repeats):
            for mode in found:
                few = _instructions(mode, small, url, python)
                many = _instructions(mode, large, url, python)
                found[mode].append((many - few) / (large - small) / 1000.0)
        raw = statistics.median(found["raw"])
        for mode, row_id, label in (
            ("raw", f"instructions.raw_held.python{version}", MODES[0][2]),
            ("handler", f"instructions.lambda_pool.with_connection.python{version}", MODES[2][2]),
        ):
            value = statistics.median(found[mode])
            section.rows.append(
                Row(
                    id=row_id,
                    label=f"[python {version}] {label}",
                    median=value,
                    samples=found[mode],
                    ratios={
                        name: ratio(value, raw) if name == baseline else None
                        for name in section.baselines
                    },
                )
            )


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]))
