"""The ``lambda-pool`` command: ``demo`` (the local demo), ``doctor URL`` (connection checks)
and ``fleet`` (many containers against one database, :mod:`lambda_pool.fleet`).

Subcommands import their modules only when chosen, so ``lambda-pool --help`` stays instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lambda-pool",
        description="PostgreSQL connections from AWS Lambda: demo and diagnostics.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="run a sample handler through cold and warm Lambda invocations locally",
        description=(
            "Run the sample handler through the real awslambdaric runtime client against "
            "an embedded PostgreSQL (or DATABASE_URL when set) and print what each "
            "invocation cost in connections and time."
        ),
    )
    demo.add_argument(
        "--invocations", type=int, default=8, help="warm invocations per run (default 8)"
    )

    doctor = commands.add_parser(
        "doctor",
        help="check a database URL: DNS, TCP, TLS, authentication, latency, capacity",
    )
    doctor.add_argument("url", help="postgresql://USER[:PASSWORD]@HOST[:PORT]/DB[?auth=iam]")
    doctor.add_argument(
        "--timeout", type=float, default=5.0, help="seconds allowed per step (default 5)"
    )
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from lambda_pool import doctor

        report = doctor.run(args.url, timeout=args.timeout)
        doctor.print_report(report, sys.stdout)
        return 0 if report.ok else 1
    if args.command == "fleet":
        from lambda_pool.fleet import cli as fleet_cli

        return fleet_cli.main(args)
    from lambda_pool import demo

    return int(demo.main(invocations=args.invocations))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
