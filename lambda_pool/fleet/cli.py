"""``lambda-pool fleet``: the options, the target's setup, and the printed/written report."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from lambda_pool.exc import ArgumentError

__all__ = ["add_arguments", "main", "open_target"]


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(
            f"{text!r}: write NAME=VALUE, e.g. idle_session_timeout=5s"
        )
    return key.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``fleet`` subcommand's options (every loop they set is bounded)."""
    traffic = parser.add_argument_group("traffic")
    traffic.add_argument("--containers", type=int, default=20, help="fleet size N (default 20)")
    traffic.add_argument(
        "--ramp", type=float, default=2.0, metavar="S", help="burst: 0→N containers in S seconds"
    )
    traffic.add_argument(
        "--sustain", type=float, default=3.0, metavar="S", help="sustained phase, seconds"
    )
    traffic.add_argument(
        "--think-ms", type=float, default=50.0, help="pause between a container's invocations"
    )
    traffic.add_argument(
        "--idle",
        type=float,
        default=0.0,
        metavar="S",
        help="then freeze every container (SIGSTOP) for S seconds and thaw it (0 = no freeze)",
    )
    traffic.add_argument(
        "--thaw-invocations", type=int, default=2, help="invocations per container after thaw"
    )
    traffic.add_argument(
        "--deadline-ms", type=int, default=3000, help="per-invocation deadline (the context's)"
    )
    traffic.add_argument(
        "--grace",
        type=float,
        default=2.0,
        metavar="S",
        help="wait this long past the deadline before killing a container (busy machines)",
    )
    traffic.add_argument(
        "--max-invocations", type=int, default=10_000, help="bound per container (default 10000)"
    )
    containers = parser.add_argument_group("containers")
    containers.add_argument(
        "--nullpool",
        action="store_true",
        help="LAMBDA_POOL_WARM=0: a connection per invocation instead of the warm cache",
    )
    containers.add_argument(
        "--runtime",
        choices=("process", "ric"),
        default="process",
        help="process: a light process per container (default); ric: the real awslambdaric "
        "through LocalLambda (fidelity, heavier)",
    )
    containers.add_argument(
        "--start-method",
        choices=("forkserver", "spawn"),
        default="forkserver",
        help="forkserver: fork from a server that imported the libraries once (default); "
        "spawn: a fresh interpreter per container",
    )
    containers.add_argument(
        "--handler",
        default="lambda_pool.fleet.handler.handler",
        help="module.function to run (default: the fleet's INSERT + SELECT handler)",
    )
    containers.add_argument("--code-dir", help="folder holding the handler's module")
    containers.add_argument(
        "--container-log",
        type=Path,
        metavar="PATH",
        help="append the containers' output here (default: a new file in the temp folder, "
        "named at the end)",
    )
    target = parser.add_argument_group("target")
    target.add_argument(
        "--target",
        choices=("postgres", "pgbouncer"),
        default="postgres",
        help="embedded PostgreSQL, or PgBouncer (transaction mode) in front of it",
    )
    target.add_argument("--database-url", help="run against this database instead")
    target.add_argument(
        "--transaction-pooling",
        action="store_true",
        help="with --database-url: it is PgBouncer/RDS Proxy in transaction mode",
    )
    target.add_argument(
        "--max-connections", type=int, default=100, help="embedded server's max_connections"
    )
    target.add_argument("--pool-size", type=int, default=10, help="PgBouncer default_pool_size")
    target.add_argument(
        "--server-setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="postgresql.conf line for the embedded server (repeatable)",
    )
    target.add_argument(
        "--pgbouncer-setting",
        type=_setting,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pgbouncer.ini line (repeatable), e.g. server_idle_timeout=5",
    )
    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, metavar="PATH", help="write the figures as JSON")
    output.add_argument("--svg", type=Path, metavar="PATH", help="write the timeline plot")
    output.add_argument("--quiet", action="store_true", help="no progress lines")


@contextlib.contextmanager
def open_target(args: argparse.Namespace) -> Iterator[Any]:
    """The target the options name, torn down when the block ends."""
    from lambda_pool.fleet import targets

    if args.database_url:
        with targets.external(
            args.database_url, transaction_pooling=args.transaction_pooling
        ) as target:
            yield target
        return
    server_settings = dict(args.server_setting)
    if args.target == "pgbouncer":
        from lambda_pool.testing.pgbouncer import find_pgbouncer

        if find_pgbouncer() is None:
            raise ArgumentError(
                "--target pgbouncer needs the pgbouncer binary: apt-get install pgbouncer"
            )
        with targets.through_pgbouncer(
            args.pool_size,
            max_connections=args.max_connections,
            server_settings=server_settings,
            pgbouncer_settings=dict(args.pgbouncer_setting),
            max_client_conn=max(1000, args.containers + 100),
        ) as target:
            yield target
        return
    with targets.embedded(args.max_connections, server_settings) as target:
        yield target


def main(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the fleet the options describe; print the table, write JSON/SVG when asked."""
    out = out if out is not None else sys.stdout  # read now: tests and shells replace it
    from lambda_pool.fleet.report import format_table, summarize
    from lambda_pool.fleet.run import FleetConfig, run_fleet

    log_path = args.container_log
    if log_path is None and args.runtime == "process":
        handle, name = tempfile.mkstemp(prefix="lambda-pool-fleet-", suffix=".log")
        os.close(handle)
        log_path = Path(name)
    config = FleetConfig(
        containers=args.containers,
        ramp_s=args.ramp,
        sustain_s=args.sustain,
        think_ms=args.think_ms,
        idle_s=args.idle,
        thaw_invocations=args.thaw_invocations,
        deadline_ms=args.deadline_ms,
        grace_s=args.grace,
        max_invocations=args.max_invocations,
        warm=not args.nullpool,
        runtime=args.runtime,
        start_method=args.start_method,
        handler=args.handler,
        code_dir=args.code_dir,
        container_log=str(log_path) if log_path is not None else None,
    )
    config.check()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"… {message}", file=sys.stderr, flush=True)

    with open_target(args) as target:
        result = run_fleet(config, target, progress=progress)
        pool_size = args.pool_size if target.pgbouncer is not None else None
    summary = summarize(result)
    print(format_table(summary), file=out)
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"JSON written to {args.json}", file=out)
    if args.svg is not None:
        from lambda_pool.fleet.svg import fleet_svg

        args.svg.write_text(
            fleet_svg(result, f"lambda-pool fleet {result.run_id}", _limits(summary, pool_size))
        )
        print(f"plot written to {args.svg}", file=out)
    if log_path is not None:
        print(f"container output in {log_path}", file=out)
    return 0


def _limits(summary: dict[str, Any], pool_size: int | None) -> dict[str, float]:
    """Dashed lines for the plot: usable connection slots, and PgBouncer's pool size."""
    server = summary["server"]
    limits: dict[str, float] = {}
    try:
        usable = int(server["max_connections"]) - int(server["superuser_reserved_connections"])
        usable -= int(server.get("reserved_connections") or 0)
        limits["max_connections - reserved"] = usable
    except (KeyError, TypeError, ValueError):
        pass
    if pool_size is not None:
        limits["PgBouncer pool size"] = pool_size
    return limits


def run(argv: Sequence[str] | None = None) -> int:
    """``python -m lambda_pool.fleet.cli``: the same as ``lambda-pool fleet``."""
    parser = argparse.ArgumentParser(prog="lambda-pool fleet")
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
