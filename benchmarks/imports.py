"""Cold-start import cost: each statement timed in a fresh interpreter, medians of N.

A Lambda cold start pays for every module its handler imports.  Each contender is a
statement run by ``python -c`` in a new process; the process times the statement
itself with ``time.perf_counter`` (interpreter start-up, the same for every contender,
is left out) and prints milliseconds.  Processes run interleaved, contender after
contender, after one untimed run of each (so byte-code caches are warm for all).

Two groups, each compared with its lambda-pool row:

* **module**: what ``import`` costs before anything is used.
* **ready**: an engine created and the driver imported: everything a handler needs
  before its first connect.  (SQLAlchemy's psycopg dialect module and lambda-pool's
  ``create_engine`` both import psycopg; ``import psycopg`` alone is the floor.)

Besides, what a static-password engine adds on top of its driver (issue 13, goal 1: at
most 10 ms and 1.04x), paired in one process: ``import psycopg`` timed, then ``import
lambda_pool; lambda_pool.create_engine(url)`` timed on top of it.  The medians of the
added milliseconds and of the per-process ratio go into a note and the ``facts`` of the
``ready.lambda_pool`` row.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

from benchmarks.report import Row, Section, ratio
from benchmarks.timing import median

__all__ = ["IMPORT_CASES", "PAIRED_URL", "ImportCase", "measure_imports", "time_paired"]

_URL = "postgresql://user@localhost:5432/db"
_SA_URL = "postgresql+psycopg://user@localhost:5432/db"


@dataclass(frozen=True)
class ImportCase:
    """A statement to time in a fresh interpreter, and the lambda-pool row it is compared with."""

    id: str
    label: str
    statement: str
    baseline: str


_MODULE_BASELINE = "import.lambda_pool.create_engine_attr"
_READY_BASELINE = "ready.lambda_pool"

IMPORT_CASES: tuple[ImportCase, ...] = (
    ImportCase("import.lambda_pool", "import lambda_pool", "import lambda_pool", _MODULE_BASELINE),
    ImportCase(
        _MODULE_BASELINE,
        "import lambda_pool; lambda_pool.create_engine",
        "import lambda_pool\nlambda_pool.create_engine",
        _MODULE_BASELINE,
    ),
    ImportCase(
        "import.sqlalchemy",
        "import sqlalchemy, sqlalchemy.pool, sqlalchemy.dialects.postgresql.psycopg",
        "import sqlalchemy\nimport sqlalchemy.pool\nimport sqlalchemy.dialects.postgresql.psycopg",
        _MODULE_BASELINE,
    ),
    ImportCase(
        _READY_BASELINE,
        "lambda_pool.create_engine(url) + psycopg",
        f"import lambda_pool\nlambda_pool.create_engine({_URL!r})\nimport psycopg",
        _READY_BASELINE,
    ),
    ImportCase(
        "ready.sqlalchemy",
        "sqlalchemy.create_engine(url) + psycopg",
        f"import sqlalchemy\nsqlalchemy.create_engine({_SA_URL!r})\nimport psycopg",
        _READY_BASELINE,
    ),
    ImportCase("ready.psycopg_pool", "import psycopg_pool", "import psycopg_pool", _READY_BASELINE),
    ImportCase("ready.psycopg", "import psycopg (floor)", "import psycopg", _READY_BASELINE),
)

_TEMPLATE = """\
import time as _bench_time
_bench_t0 = _bench_time.perf_counter()
{statement}
print(repr((_bench_time.perf_counter() - _bench_t0) * 1000.0))
"""


def fresh_output(
    code: str,
    what: str,
    *,
    python: str = sys.executable,
    env_changes: Mapping[str, str | None] | None = None,
    timeout: float = 60.0,
) -> str:
    """The last line ``code`` prints in a fresh interpreter (``python``).

    A stray ``PYTHONSTARTUP``, ``-X importtime`` or ``PYTHONDONTWRITEBYTECODE`` from the
    caller must not skew one contender, so they are removed; ``env_changes`` then sets
    (or, with ``None``, removes) more.  A failure raises ``RuntimeError`` naming ``what``.
    """
    env = dict(os.environ)
    for name in ("PYTHONSTARTUP", "PYTHONPROFILEIMPORTTIME", "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    completed = subprocess.run(
        [python, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if completed.returncode != 0:
        raise RuntimeError(
            f"{what} failed (exit {completed.returncode}): {completed.stderr.strip()[-2000:]}"
        )
    return completed.stdout.strip().splitlines()[-1]


def time_statement(statement: str, *, timeout: float = 60.0) -> float:
    """Milliseconds ``statement`` takes in a fresh interpreter (this one's executable)."""
    code = _TEMPLATE.format(statement=statement)
    return float(fresh_output(code, f"timing {statement!r}", timeout=timeout))


_PAIRED_TEMPLATE = """\
import time as _bench_time
_bench_t0 = _bench_time.perf_counter()
import psycopg
_bench_t1 = _bench_time.perf_counter()
import lambda_pool
lambda_pool.create_engine({url!r})
_bench_t2 = _bench_time.perf_counter()
print(repr(((_bench_t1 - _bench_t0) * 1000.0, (_bench_t2 - _bench_t1) * 1000.0)))
"""

#: The URL of the paired measurement (a static password: no credential module loads).
PAIRED_URL = "postgresql://u:p@h/d"


def time_paired(*, timeout: float = 60.0) -> tuple[float, float]:
    """``(import psycopg, lambda-pool on top of it)`` in milliseconds, in one fresh process."""
    code = _PAIRED_TEMPLATE.format(url=PAIRED_URL)
    line = fresh_output(code, "the paired import timing", timeout=timeout)
    floor, added = line.strip("()").split(",")
    return float(floor), float(added)


def measure_imports(repeats: int, *, seed: int = 20240601) -> Section:
    """Time every :data:`IMPORT_CASES` statement ``repeats`` times, interleaved."""
    rng = random.Random(seed)
    for each in IMPORT_CASES:  # untimed: byte-code caches written, page cache warm
        time_statement(each.statement)
    time_paired()
    samples: dict[str, list[float]] = {case.id: [] for case in IMPORT_CASES}
    paired: list[tuple[float, float]] = []
    order: list[ImportCase | None] = [*IMPORT_CASES, None]  # None: the paired process
    for _ in range(repeats):
        rng.shuffle(order)
        for case in order:
            if case is None:
                paired.append(time_paired())
            else:
                samples[case.id].append(time_statement(case.statement))
    medians = {case_id: median(values) for case_id, values in samples.items()}
    paired_added = median([added for _, added in paired])
    paired_ratio = median([(floor + added) / floor for floor, added in paired])
    section = Section(
        name="import",
        title="Import cost (cold start, fresh interpreter per sample)",
        unit="ms",
        baselines=["lambda-pool"],
        notes=[
            "module rows compare with 'import lambda_pool; lambda_pool.create_engine'; "
            "ready rows (engine created, driver imported) with "
            "'lambda_pool.create_engine(url) + psycopg'",
            f"median of {repeats} interleaved fresh processes; interpreter start-up excluded",
            'static engine on top of its driver, paired in one process ("import psycopg", '
            f'then "import lambda_pool; lambda_pool.create_engine({PAIRED_URL!r})"): '
            f"+{paired_added:.1f} ms, {paired_ratio:.3f}x (issue 13 goal: <= 10 ms, <= 1.04x)",
        ],
    )
    for case in IMPORT_CASES:
        value = medians[case.id]
        section.rows.append(
            Row(
                id=case.id,
                label=case.label,
                median=value,
                samples=samples[case.id],
                ratios={"lambda-pool": ratio(value, medians[case.baseline])},
                facts=(
                    {
                        "paired_added_ms": paired_added,
                        "paired_ratio": paired_ratio,
                        "paired_samples": [list(pair) for pair in paired],
                    }
                    if case.id == _READY_BASELINE
                    else {}
                ),
            )
        )
    return section
