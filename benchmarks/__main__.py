"""``python -m benchmarks``: run every section side by side, print the tables, write JSON.

Options: ``--quick`` (few iterations, for the smoke test), ``--json PATH``,
``--database-url URL`` (else ``$DATABASE_URL``, else a throw-away embedded
PostgreSQL on loopback), ``--only SECTION`` (repeatable: ``import``, ``checkout``,
``invocation``, ``instructions``, ``async``, ``latency``, ``coldstart``; ``instructions``
counts the client's instructions per warm invocation under valgrind (benchmarks/
instructions.py); ``async`` is the asyncio checkout
and invocation tables; ``latency`` (benchmarks/latency.py) and ``coldstart`` run their own
embedded servers (and moto server); ``deploy``, run only
when named, measures the ``sam build`` output into docs/deploy.md; ``fleet``, run
only when named, rewrites docs/scale.md through benchmarks/fleet.py; ``reliability``, also
only when named, rewrites docs/reliability.md through benchmarks/reliability.py).

A full run of every section (``make bench``) also writes the charts (``docs/*.svg``) and
the generated part of docs/benchmarks.md (benchmarks/page.py); ``--docs-dir DIR`` writes
them elsewhere (any mode), ``--no-docs`` not at all.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.async_pools import measure_async
from benchmarks.checkout import measure_checkout
from benchmarks.coldstart import measure_coldstart
from benchmarks.imports import measure_imports
from benchmarks.instructions import measure_instructions
from benchmarks.invocation import measure_invocation
from benchmarks.latency import measure_latency
from benchmarks.report import Section, format_sections, write_json
from benchmarks.server import database

SECTIONS = ("import", "checkout", "invocation", "instructions", "async", "latency", "coldstart")
DOCS = Path(__file__).resolve().parents[1] / "docs"
#: Sections that need the PostgreSQL server.
DATABASE_SECTIONS = ("checkout", "invocation", "instructions", "async")


@dataclass(frozen=True)
class Settings:
    """How many samples each section takes."""

    import_repeats: int
    checkout_rounds: int
    checkout_ops: int
    checkout_warmup: int
    invocation_rounds: int
    invocation_ops: int
    invocation_warmup: int
    coldstart_repeats: int = 9
    latency_rounds: int = 5
    latency_ops: int = 10


FULL = Settings(
    import_repeats=7,
    checkout_rounds=15,
    checkout_ops=200,
    checkout_warmup=50,
    invocation_rounds=9,
    invocation_ops=10,
    invocation_warmup=2,
)
QUICK = Settings(
    import_repeats=2,
    checkout_rounds=3,
    checkout_ops=20,
    checkout_warmup=5,
    invocation_rounds=3,
    invocation_ops=2,
    invocation_warmup=1,
    coldstart_repeats=1,
    latency_rounds=1,
    latency_ops=2,
)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="lambda-pool against SQLAlchemy's pool and psycopg_pool, in one run; "
        "figures are ratios within the run.",
    )
    parser.add_argument("--quick", action="store_true", help="few iterations (smoke test)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results as JSON")
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="PostgreSQL to measure against (default: $DATABASE_URL, else a throw-away "
        "embedded server on loopback)",
    )
    parser.add_argument(
        "--only",
        action="append",
        choices=(*SECTIONS, "fleet", "reliability", "deploy"),
        help="run only this section (repeatable; default: all); 'async' is the asyncio "
        "checkout and invocation sections; 'fleet' (only when asked) runs the fleet "
        "scenarios and rewrites docs/scale.md",
    )
    parser.add_argument(
        "--docs-dir",
        type=Path,
        metavar="DIR",
        help="write the SVG charts and the generated part of benchmarks.md into DIR "
        "(default: docs/ after a full run of every section)",
    )
    parser.add_argument(
        "--no-docs", action="store_true", help="never write the charts and the page"
    )
    return parser.parse_args(argv)


def _versions() -> dict[str, str]:
    versions = {}
    for name in ("lambda-pool", "SQLAlchemy", "psycopg", "psycopg-pool", "asyncpg", "greenlet"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _meta(settings: Settings, quick: bool) -> dict[str, Any]:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "settings": settings.__dict__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": list(load) if load else None,
        "versions": _versions(),
        "caveat": "ratios are meaningful within this run only; absolute figures are not claims",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected sections, print their tables; 0 on success."""
    args = _parse(argv)
    settings = QUICK if args.quick else FULL
    wanted = tuple(args.only) if args.only else SECTIONS
    if "deploy" in wanted:
        # Cold `import app` of the sam build output (benchmarks/deploy.py, docs/deploy.md).
        from benchmarks import deploy

        deploy.main(["--quick"] if args.quick else [])
        wanted = tuple(name for name in wanted if name != "deploy")
        if not wanted:
            return 0
    if "fleet" in wanted:
        # Its own page (docs/scale.md, benchmarks/fleet.py), not a table of this run.
        from benchmarks import fleet

        fleet.main(["--quick"] if args.quick else [])
        wanted = tuple(name for name in wanted if name != "fleet")
        if not wanted:
            return 0
    if "reliability" in wanted:
        # Its own page too (docs/reliability.md, benchmarks/reliability.py).
        from benchmarks import reliability

        reliability.main(["--quick"] if args.quick else [])
        wanted = tuple(name for name in wanted if name != "reliability")
        if not wanted:
            return 0
    meta = _meta(settings, args.quick)
    started = time.perf_counter()
    sections: list[Section] = []
    if "import" in wanted:
        sections.append(measure_imports(settings.import_repeats))
    if any(name in wanted for name in DATABASE_SECTIONS):
        with database(args.database_url) as db:
            meta["server"] = db.describe()
            if "checkout" in wanted:
                sections.append(
                    measure_checkout(
                        db,
                        rounds=settings.checkout_rounds,
                        ops_per_round=settings.checkout_ops,
                        warmup_ops=settings.checkout_warmup,
                    )
                )
            if "invocation" in wanted:
                sections.append(
                    measure_invocation(
                        db,
                        rounds=settings.invocation_rounds,
                        ops_per_round=settings.invocation_ops,
                        warmup_ops=settings.invocation_warmup,
                    )
                )
            if "instructions" in wanted:
                sections.append(measure_instructions(db, quick=args.quick))
            if "async" in wanted:
                sections += measure_async(
                    db,
                    checkout_rounds=settings.checkout_rounds,
                    checkout_ops=settings.checkout_ops,
                    checkout_warmup=settings.checkout_warmup,
                    invocation_rounds=settings.invocation_rounds,
                    invocation_ops=settings.invocation_ops,
                    invocation_warmup=settings.invocation_warmup,
                )
    if "latency" in wanted:
        sections.append(
            measure_latency(
                rounds=settings.latency_rounds, ops_per_round=settings.latency_ops, quick=args.quick
            )
        )
    if "coldstart" in wanted:
        sections.append(measure_coldstart(settings.coldstart_repeats))
    meta["elapsed_seconds"] = round(time.perf_counter() - started, 2)

    server = meta.get("server")
    header = [
        f"lambda-pool benchmarks ({'quick' if args.quick else 'full'}) — python {meta['python']}, "
        f"{meta['cpu_count']} CPUs, load {meta['load_average_at_start']}"
    ]
    if server:
        header.append(
            f"PostgreSQL {server['server_version']} via {server['source']}, "
            f"host {server['host']}, TLS {'on' if server['tls'] else 'off'}"
        )
    header.append(
        "Ratios compare contenders measured in this same run; absolute figures are not claims."
    )
    print("\n".join(header))
    print()
    print(format_sections(sections))
    print()
    print(f"elapsed {meta['elapsed_seconds']} s")
    if args.json is not None:
        write_json(args.json, meta, sections)
        print(f"JSON written to {args.json}")
    docs = args.docs_dir
    if docs is None and not args.quick and set(wanted) == set(SECTIONS):
        docs = DOCS
    if docs is not None and not args.no_docs:
        from benchmarks.page import write_page

        for path in write_page(docs, meta, sections, "\n".join(header)):
            print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
