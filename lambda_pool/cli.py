"""The ``lambda-pool`` command (also ``python -m lambda_pool``): ``demo`` (the local demo),
``doctor [URL]`` (connection checks; ``--json``; the URL defaults to
``LAMBDA_POOL_DATABASE_URL``)
and ``fleet`` (many containers against one database, :mod:`lambda_pool.fleet`).

Subcommands import their modules only when chosen, so ``lambda-pool --help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lambda-pool")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _seconds(text: str) -> float:
    """``--timeout``: seconds above 0 and at most 3600, or a usage error (never a traceback)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds above 0 and at most 3600 (e.g. 5)"
        )
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambda-pool",
        description="PostgreSQL connections from AWS Lambda: demo and diagnostics.",
    )
    parser.add_argument("--version", action="version", version=f"lambda-pool {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a sample handler through cold and warm Lambda invocations locally",
        description=(
            "Run the sample handler through the real awslambdaric runtime client against "
            "a throw-away embedded PostgreSQL (or --database-url) and print what each "
            "invocation cost in connections and time."
        ),
    )
    demo.add_argument(
        "--invocations", type=int, default=8, help="warm invocations per run (default 8)"
    )
    demo.add_argument(
        "--database-url",
        default=None,
        help="run against this server instead of an embedded one; the demo works in a "
        "schema of its own and drops it at the end (no rows left behind)",
    )

    doctor = commands.add_parser(
        "doctor",
        help="check a database URL: DNS, TCP, TLS, authentication, latency, capacity",
        description=(
            "Check a database URL step by step and give advice for the step that fails. "
            "Exit status 0 when every step passed, 1 otherwise."
        ),
    )
    doctor.add_argument(
        "url",
        nargs="?",
        help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?auth=iam] or a libpq key=value "
        "string (default: $LAMBDA_POOL_DATABASE_URL)",
    )
    doctor.add_argument(
        "--timeout", type=_seconds, default=5.0, help="seconds allowed per step (default 5)"
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    fleet = commands.add_parser(
        "fleet",
        help="run a fleet of Lambda-like containers against a database and report",
        description=(
            "Start N container processes, drive a burst, a sustained phase and a freeze/thaw "
            "against an embedded PostgreSQL, PgBouncer in front of it, or --database-url; "
            "report invocations, errors, latency, connects and server backends "
            "(docs/scale.md)."
        ),
    )
    from lambda_pool.fleet.cli import add_arguments as add_fleet_arguments

    add_fleet_arguments(fleet)
    invoke = commands.add_parser(
        "invoke",
        help="run a built function folder (sam build) in the real runtime client, no Docker",
        description=(
            "Run a function folder written by 'sam build' as Lambda does: the real "
            "awslambdaric, the runtime's Python, the folder first on sys.path; against "
            "--database-url or an embedded PostgreSQL. Prints each result as JSON (docs/deploy.md)."
        ),
    )
    from lambda_pool.local_invoke import add_arguments as add_invoke_arguments

    add_invoke_arguments(invoke)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "doctor":
        from lambda_pool import doctor

        url = args.url or os.environ.get("LAMBDA_POOL_DATABASE_URL", "").strip()
        if not url:
            parser.error("doctor needs a URL: give one, or set LAMBDA_POOL_DATABASE_URL")
        report = doctor.run(url, timeout=args.timeout)
        if args.json:
            doctor.print_json(report, sys.stdout)
        else:
            doctor.print_report(report, sys.stdout)
        return 0 if report.ok else 1
    if args.command == "invoke":
        from lambda_pool import local_invoke

        return local_invoke.main(args)
    if args.command == "fleet":
        from lambda_pool.fleet import cli as fleet_cli

        return fleet_cli.main(args)
    from lambda_pool import demo

    return int(demo.main(invocations=args.invocations, database_url=args.database_url))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
