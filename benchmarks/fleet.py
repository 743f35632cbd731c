"""The fleet scenarios of docs/scale.md, run and written out: ``python -m benchmarks --only fleet``.

Each scenario is a :func:`lambda_pool.fleet.run.run_fleet` run against a server started
for it (embedded PostgreSQL with the ``max_connections`` and timeouts the scenario
names, PgBouncer in transaction mode in front of it where it says so). The page, its
plots (``docs/scale/*.svg``) and the JSON beside them are written from the results: no
figure on the page is typed by hand. ``--quick`` runs the same scenarios at a small
scale into a temporary folder (the smoke test), leaving docs/ alone.

Run alone: ``python -m benchmarks.fleet [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lambda_pool.fleet import targets
from lambda_pool.fleet.report import summarize
from lambda_pool.fleet.run import FleetConfig, FleetResult, run_fleet
from lambda_pool.fleet.svg import fleet_svg

__all__ = ["SCENARIOS", "Scenario", "main", "run_scenarios"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"


@dataclass(frozen=True)
class Scenario:
    """One run: the fleet, the server it meets, and what the page says it should show."""

    id: str
    title: str
    config: FleetConfig
    target: str  # "postgres" or "pgbouncer"
    max_connections: int
    server_settings: dict[str, str] = field(default_factory=dict)
    pool_size: int | None = None
    pgbouncer_settings: dict[str, str] = field(default_factory=dict)


def _scenarios(scale: float) -> list[Scenario]:
    """The issue's four scenarios (plus the controls that make them readable).

    ``scale`` < 1 shrinks fleets and phases for the smoke test; the shape stays.
    """

    def n(count: int) -> int:
        return max(2, round(count * scale))

    def s(seconds: float) -> float:
        return round(max(0.5, seconds * scale), 2)

    direct_max = n(50)
    # superuser_reserved_connections = 3, and the coordinator's own monitoring session
    # (a superuser's, but counted against the same slots until only reserved ones remain).
    fits = direct_max - 3 - 1
    over = fits + max(2, n(13))
    # Think time between a container's invocations: every connection stays in use, but 50
    # (or 200) processes do not starve this shared 2-core machine's CPU, which would turn
    # the run into a CPU benchmark (every step then misses its deadline).
    direct = FleetConfig(
        containers=fits, ramp_s=s(5), sustain_s=s(10), think_ms=500, deadline_ms=5000
    )
    frozen_fleet = n(100)
    frozen = FleetConfig(
        containers=frozen_fleet,
        ramp_s=s(10),
        sustain_s=s(6),
        think_ms=2000,
        idle_s=s(12),
        thaw_invocations=2,
        deadline_ms=5000,
    )
    bouncer_max = max(6, n(20))
    return [
        Scenario(
            "direct-warm", "Direct, warm cache, up to the limit", direct, "postgres", direct_max
        ),
        Scenario(
            "direct-warm-over",
            "Direct, warm cache, past the limit",
            replace(direct, containers=over),
            "postgres",
            direct_max,
        ),
        Scenario(
            "direct-nullpool",
            "Direct, NullPool, the same fleet",
            replace(direct, warm=False),
            "postgres",
            direct_max,
        ),
        Scenario(
            "direct-nullpool-over",
            "Direct, NullPool, past the limit",
            replace(direct, warm=False, containers=over),
            "postgres",
            direct_max,
        ),
        Scenario(
            "pgbouncer-10x",
            "PgBouncer (transaction mode), 10 x max_connections containers",
            # 200 containers busy back to back would need far more than this 2-core
            # machine's CPU; a closed loop of starved clients measures the CPU, not the
            # pooler (a transaction holds its server connection while its client waits
            # for CPU between statements).
            FleetConfig(
                containers=10 * bouncer_max,
                ramp_s=s(20),
                sustain_s=s(15),
                think_ms=5000,
                deadline_ms=5000,
            ),
            "pgbouncer",
            bouncer_max,
            pool_size=max(1, bouncer_max * 3 // 4),
        ),
        Scenario(
            "frozen-hold",
            "Frozen containers hold their backends",
            frozen,
            "postgres",
            frozen_fleet + 10,
        ),
        Scenario(
            "frozen-idle-session-timeout",
            "Frozen, with the server's idle_session_timeout",
            frozen,
            "postgres",
            frozen_fleet + 10,
            server_settings={"idle_session_timeout": f"{max(1, round(s(5)))}s"},
        ),
        Scenario(
            "frozen-pgbouncer",
            "Frozen, through PgBouncer with server_idle_timeout",
            frozen,
            "pgbouncer",
            n(10) + 10,
            pool_size=n(10),
            pgbouncer_settings={"server_idle_timeout": str(max(1, round(s(5))))},
        ),
        Scenario(
            "fidelity-ric",
            "Fidelity: the real awslambdaric (LocalLambda), warm cache",
            FleetConfig(
                containers=n(10),
                runtime="ric",
                ramp_s=s(3),
                sustain_s=s(5),
                think_ms=500,
                deadline_ms=5000,
            ),
            "postgres",
            direct_max,
        ),
        Scenario(
            "spawn-interpreters",
            "A fresh interpreter per container (--start-method spawn), warm cache",
            FleetConfig(
                containers=n(10),
                start_method="spawn",
                ramp_s=s(3),
                sustain_s=s(5),
                think_ms=500,
                deadline_ms=5000,
            ),
            "postgres",
            direct_max,
        ),
    ]


SCENARIOS = _scenarios(1.0)


@contextlib.contextmanager
def _target(scenario: Scenario) -> Iterator[targets.Target]:
    if scenario.target == "pgbouncer":
        assert scenario.pool_size is not None
        with targets.through_pgbouncer(
            scenario.pool_size,
            max_connections=scenario.max_connections,
            server_settings=scenario.server_settings,
            pgbouncer_settings=scenario.pgbouncer_settings,
            max_client_conn=max(1000, scenario.config.containers + 100),
        ) as target:
            yield target
        return
    with targets.embedded(scenario.max_connections, scenario.server_settings) as target:
        yield target


def _limits(scenario: Scenario, summary: dict[str, Any]) -> dict[str, float]:
    server = summary["server"]
    usable = int(server["max_connections"]) - int(server["superuser_reserved_connections"])
    usable -= int(server.get("reserved_connections") or 0)
    limits: dict[str, float] = {"max_connections - reserved": usable}
    if scenario.pool_size is not None:
        limits["PgBouncer pool size"] = scenario.pool_size
    return limits


def run_scenarios(
    scenarios: Sequence[Scenario],
    out_dir: Path,
    say: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run each scenario, write its plot; the summaries (with the scenario's facts)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for scenario in scenarios:
        if scenario.target == "pgbouncer":
            from lambda_pool.testing.pgbouncer import find_pgbouncer

            if find_pgbouncer() is None:
                say(f"skipping {scenario.id}: pgbouncer not installed (apt-get install pgbouncer)")
                continue
        say(f"{scenario.id}: {scenario.config.containers} containers → {scenario.target}")
        started = time.monotonic()
        # The containers' own output (tracebacks of failed invocations), kept out of docs/.
        log = Path(tempfile.gettempdir()) / f"lambda-pool-fleet-{scenario.id}.log"
        log.unlink(missing_ok=True)
        with _target(scenario) as target:
            result: FleetResult = run_fleet(
                replace(scenario.config, container_log=str(log)), target
            )
        summary = summarize(result)
        summary["scenario"] = {
            "id": scenario.id,
            "title": scenario.title,
            "target": scenario.target,
            "max_connections": scenario.max_connections,
            "server_settings": scenario.server_settings,
            "pool_size": scenario.pool_size,
            "pgbouncer_settings": scenario.pgbouncer_settings,
            "wall_s": round(time.monotonic() - started, 1),
        }
        (out_dir / f"{scenario.id}.svg").write_text(
            fleet_svg(
                result,
                f"{scenario.title} ({scenario.config.containers} containers)",
                _limits(scenario, summary),
            )
        )
        results.append(summary)
        inv = summary["invocations"]
        say(f"  {inv['ok']} ok, {inv['failed']} failed {inv['errors']}")
    return results


# --------------------------------------------------------------------------- the page


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _by_id(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["scenario"]["id"]: r for r in results}


def _row(r: dict[str, Any]) -> str:
    inv, lat, conn, back = r["invocations"], r["latency_ms"], r["connects"], r["backends"]
    errors = ", ".join(f"{count} {name}" for name, count in inv["errors"].items()) or "none"
    return (
        f"| {r['scenario']['id']} | {r['config']['containers']} | {inv['total']} | {inv['ok']} "
        f"| {inv['failed']} ({errors}) | {_fmt(lat['cold']['p50_ms'], 1)} / "
        f"{_fmt(lat['cold']['p99_ms'], 1)} | {_fmt(lat['warm']['p50_ms'], 1)} / "
        f"{_fmt(lat['warm']['p95_ms'], 1)} / {_fmt(lat['warm']['p99_ms'], 1)} "
        f"| {_fmt(conn['per_invocation'], 3) if conn['per_invocation'] is not None else '-'} "
        f"| {_fmt(back['peak_during_traffic'])} / {_fmt(back['mean_during_traffic'], 1)} |"
    )


def _check(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def _settings_line(r: dict[str, Any]) -> str:
    server = r["server"]
    sc = r["scenario"]
    parts = [f"`max_connections={server['max_connections']}`"]
    parts.append(f"`superuser_reserved_connections={server['superuser_reserved_connections']}`")
    if server.get("reserved_connections") not in (None, "0"):
        parts.append(f"`reserved_connections={server['reserved_connections']}`")
    if server.get("idle_session_timeout") not in (None, "0"):
        parts.append(f"`idle_session_timeout={server['idle_session_timeout']}`")
    if sc["pool_size"] is not None:
        parts.append(f"PgBouncer `pool_mode=transaction` `default_pool_size={sc['pool_size']}`")
    for key, value in sc["pgbouncer_settings"].items():
        parts.append(f"PgBouncer `{key}={value}`")
    cfg = r["config"]
    parts.append(
        f"ramp {cfg['ramp_s']} s, sustained {cfg['sustain_s']} s, think {cfg['think_ms']:g} ms, "
        f"deadline {cfg['deadline_ms']} ms"
        + (
            f", frozen {cfg['idle_s']} s, {cfg['thaw_invocations']} invocations after thaw"
            if cfg["idle_s"]
            else ""
        )
    )
    return "; ".join(parts)


def _section(r: dict[str, Any], plot_dir: str) -> list[str]:
    sc = r["scenario"]
    inv, back = r["invocations"], r["backends"]
    lines = [
        f"### {sc['title']} (`{sc['id']}`)",
        "",
        _settings_line(r),
        "",
        f"![{sc['id']}]({plot_dir}/{sc['id']}.svg)",
        "",
        f"- invocations: {inv['total']} ({inv['ok']} ok, {inv['failed']} failed, "
        f"{inv['capacity_errors']} of them capacity errors, {inv['timed_out']} timed out); "
        f"rows the handlers inserted: {_fmt(r['rows_inserted'])}",
    ]
    for name, count in inv["errors"].items():
        example = inv["error_examples"].get(name, "").replace("|", "/")
        lines.append(f"  - {count} x `{name}`: {example}")
    if inv["failed"]:
        lines.append(
            f"  - failed invocations ended after {_fmt(inv['failed_after_ms']['p50'])} ms "
            f"(median), {_fmt(inv['failed_after_ms']['max'])} ms at most, of a "
            f"{r['config']['deadline_ms']} ms deadline; "
            f"{_fmt(inv.get('failed_past_deadline'))} of them past the deadline (measured "
            "inside the container, so including time the machine did not schedule it)"
        )
    lines.append(
        f"- connects: {r['connects']['total']} "
        f"({_fmt(r['connects']['per_invocation'], 3)} per invocation)"
    )
    lines.append(
        f"- server backends: peak {_fmt(back['peak_during_traffic'])}, mean "
        f"{_fmt(back['mean_during_traffic'], 1)} during traffic "
        f"({_fmt(back['per_container_peak'], 2)} per container at the peak); "
        f"{_fmt(back['after_stop'])} after the fleet stopped"
    )
    frozen = r["frozen"]
    if frozen:
        at, before = frozen["at_freeze"], frozen["before_thaw"]
        held = (
            f"; frozen containers still owning their backend: "
            f"{_fmt(at['held_by_frozen_containers'])} → {_fmt(before['held_by_frozen_containers'])}"
            if at.get("held_by_frozen_containers") is not None
            else ""
        )
        lines.append(
            f"- frozen: {_fmt(at['server_backends'])} server backends when the fleet froze, "
            f"{_fmt(before['server_backends'])} just before it thawed{held}"
        )
        thaw = r["connects"]["by_phase"].get("thaw")
        if thaw:
            thaw_failed = r["invocations"]["by_phase"].get("thaw", 0) and sum(0 for _ in ())
            del thaw_failed
            lines.append(
                f"- after thaw: {thaw['invocations']} invocations, {thaw['connects']} "
                f"reconnects, latency p50 {_fmt(r['latency_ms']['thaw']['p50_ms'], 1)} ms"
            )
    pooler = r["pooler"].get("after_sustained") if r["pooler"] else None
    if pooler:
        lines.append(
            "- PgBouncer after the sustained phase: "
            + ", ".join(f"{key} {value}" for key, value in pooler.items())
        )
    mem = r["memory_kb"]
    lines.append(
        f"- memory per container: RSS {_fmt((mem['rss_mean'] or 0) / 1024, 1)} MiB, "
        f"PSS {_fmt((mem['pss_mean'] or 0) / 1024, 1)} MiB; the fleet's PSS "
        f"{_fmt((mem['pss_total'] or 0) / 1024, 0)} MiB; Init p50 {_fmt(r['init_ms']['p50'])} ms"
    )
    lines.append("")
    return lines


def _is_capacity_failure(error: str) -> bool:
    """What a refused connect may end as: the retries gave up (whatever step the error
    names), or the deadline ended the connect attempt in progress."""
    return error.startswith("lambda_pool.CapacityExhaustedError") or (
        error == "lambda_pool.DeadlineExceededError (connect)"
    )


def write_page(results: Sequence[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    """docs/scale.md from the summaries (every figure comes from ``results``)."""
    by = _by_id(results)
    plot_dir = "scale"
    versions = {r["server"].get("server_version") for r in results} - {None}
    meta = {**meta, "server_version": ", ".join(sorted(str(v) for v in versions)) or "?"}
    lines = [
        "# How many Lambda containers can a database take?",
        "",
        "<!-- Generated by `python -m benchmarks --only fleet` (benchmarks/fleet.py) from the",
        "     run recorded in docs/scale/fleet.json. Do not edit by hand: rerun it. -->",
        "",
        "`lambda-pool fleet` runs a fleet of Lambda-like containers against one database and",
        "reports what happened. Each container is a real process that imports a handler the",
        "way Lambda's Init does, keeps its warm cache (or a NullPool engine) in module scope,",
        "and serves one invocation at a time with a deadline on its context. The coordinator",
        "ramps the fleet up (a burst), keeps it busy (sustained), freezes every container with",
        "SIGSTOP, thaws it with SIGCONT, and samples `pg_stat_activity` throughout. The",
        "default handler runs one short transaction per invocation: an INSERT and a SELECT,",
        "committed by `@with_connection()`; the rows it inserted are counted after the run and",
        "must equal the invocations reported ok.",
        "",
        f"This run: {meta['started_at']} on {meta['cpu_count']} CPUs "
        f"(load average {meta['load_average_at_start']} at the start, the machine shared "
        f"with other work), Python {meta['python']}, PostgreSQL "
        f"{meta.get('server_version', '?')}, PgBouncer {meta.get('pgbouncer', 'not installed')}"
        f", lambda-pool at `{meta.get('git', '?')}`; {meta['elapsed_s']} s in all. Latencies "
        "on a loaded 2-core machine are not claims about production; the counts (failures, "
        "connects, backends) are what the scenarios are about.",
        "",
        "## Run it yourself",
        "",
        "```",
        "lambda-pool fleet --containers 200 --target pgbouncer --max-connections 20 \\",
        "    --pool-size 15 --ramp 20 --sustain 15 --think-ms 5000 --deadline-ms 5000 \\",
        "    --json fleet.json --svg fleet.svg",
        "lambda-pool fleet --containers 100 --idle 12 --server-setting idle_session_timeout=5s",
        "lambda-pool fleet --database-url 'postgresql://app:…@staging-db:5432/app' --containers 50",
        "lambda-pool fleet --runtime ric --containers 10     # the real awslambdaric",
        "python -m benchmarks --only fleet                    # regenerates this page",
        "```",
        "",
        "Every phase is a parameter (`--ramp`, `--sustain`, `--think-ms`, `--idle`,",
        "`--thaw-invocations`, `--deadline-ms`, `--max-invocations`); every loop is bounded in",
        "count and in time, and an invocation that outlives its deadline (plus `--grace`) gets",
        "its container killed, as Lambda does. With `--database-url` the coordinator counts",
        "the sessions named `application_name=lambda-pool-fleet` among the URL user's own.",
        "",
        "## The scenarios at a glance",
        "",
        "| scenario | containers | invocations | ok | failed | cold p50 / p99 ms "
        "| warm p50 / p95 / p99 ms | connects per invocation | backends peak / mean |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    lines += [_row(r) for r in results]
    lines += ["", "## What each scenario shows", ""]

    def claim(ids: Sequence[str], text: str, holds: Callable[..., bool]) -> None:
        found = [by[i] for i in ids if i in by]
        if len(found) == len(ids):
            lines.append(f"- {text}: {_check(holds(*found))}.")

    def no_failures(*rs: dict[str, Any]) -> bool:
        return all(r["invocations"]["failed"] == 0 for r in rs)

    claim(
        ["direct-warm"],
        "**Scenario 1**, direct, warm, up to `max_connections` - reserved (- the "
        "coordinator's session): 0 failures and one backend per container",
        lambda r: (
            no_failures(r)
            and r["backends"]["per_container_peak"] <= 1
            and r["connects"]["total"] == r["config"]["containers"]
        ),
    )
    claim(
        ["direct-warm-over"],
        "**Scenario 1**, past the limit: every failure is a typed error that arrived before "
        "the deadline (no container was killed): a capacity error after the retries, or a "
        "connect attempt within the retries that the deadline cut short",
        lambda r: (
            r["invocations"]["failed"] > 0
            and all(_is_capacity_failure(name) for name in r["invocations"]["errors"])
            and r["invocations"]["timed_out"] == 0
            and r["invocations"].get("failed_past_deadline") == 0
        ),
    )
    claim(
        ["direct-nullpool"],
        "**Scenario 2**, NullPool, the same fleet: one connect per successful invocation",
        lambda r: r["connects"]["per_ok_invocation"] == 1.0,
    )
    claim(
        ["pgbouncer-10x"],
        "**Scenario 3**, PgBouncer, 10 x `max_connections` containers: 0 failures and server "
        "backends <= the pool size",
        lambda r: (
            no_failures(r) and (r["backends"]["peak"] or 0) <= (r["scenario"]["pool_size"] or 0)
        ),
    )
    claim(
        ["frozen-hold"],
        "**Scenario 4**, frozen containers hold their backends for as long as they are frozen",
        lambda r: (
            r["frozen"]["before_thaw"]["held_by_frozen_containers"] == r["config"]["containers"]
        ),
    )
    claim(
        ["frozen-idle-session-timeout"],
        "**Scenario 4**, `idle_session_timeout` frees them while frozen, and the thawed "
        "containers reconnect with 0 handler errors",
        lambda r: r["frozen"]["before_thaw"]["server_backends"] == 0 and no_failures(r),
    )
    claim(
        ["frozen-pgbouncer"],
        "**Scenario 4**, through PgBouncer frozen containers hold no server backend, "
        "`server_idle_timeout` closes the pool's idle ones, and thaw sees 0 handler errors",
        lambda r: r["frozen"]["before_thaw"]["server_backends"] == 0 and no_failures(r),
    )
    lines.append("")
    for r in results:
        lines += _section(r, plot_dir)
    lines += _recommendations(by)
    lines += [
        "## How close to Lambda this is",
        "",
        "- A container is a process that imports the handler module (its Init) and then "
        "serves one invocation at a time, with a context whose remaining time counts down "
        "from the deadline; `@with_connection()` bounds every step by it. Init runs before "
        "the burst starts, so cold latency here is the first invocation (its first connect), "
        "not Init; Init times are reported separately.",
        "- Freezing is SIGSTOP, as Lambda freezes an idle environment: no thread runs, TCP "
        "connections stay open on the server's side and the kernel still acknowledges them. "
        "Lambda may also discard a frozen environment without a word; that path is the same "
        "as a server-side timeout here (the next container starts afresh).",
        "- An invocation that outlives its deadline (plus a grace for this busy machine) has "
        "its container killed with SIGKILL, as Lambda does; the next invocation starts a new "
        "container.",
        "- Everything runs on one 2-core machine over loopback: the containers, PostgreSQL, "
        "PgBouncer and the coordinator compete for the same CPUs. Latencies are therefore "
        "much higher than on Lambda against RDS, and a fleet that would idle on real hardware "
        "saturates the CPU here; scenarios with many containers use a think time between "
        "invocations so the run measures connection counts rather than CPU starvation.",
        "- `fidelity-ric` runs the same handler through the real `awslambdaric` behind a "
        "local Runtime API (`LocalLambda`); its counts should match the process containers'. "
        "`spawn-interpreters` starts every container as a fresh interpreter that imports "
        "everything itself, as a Lambda environment does (compare its Init and memory).",
        "",
    ]
    lines += [
        "## Memory per container",
        "",
        "Measured from `/proc/PID/status` (RSS) and `/proc/PID/smaps_rollup` (PSS) of every "
        "container after the sustained phase. Containers are forked from a server that "
        "imported psycopg and lambda-pool's engine once (`--start-method forkserver`, the "
        "default), then each imports its handler module itself (its Init). RSS counts the "
        "shared library pages in every process; PSS shares them out, so the sum of PSS is "
        "what the fleet really occupies. `--start-method spawn` starts a fresh interpreter "
        "per container instead (every import paid per container, as on Lambda, at the cost "
        "of memory and start time).",
        "",
        "| scenario | containers | RSS per container MiB | PSS per container MiB "
        "| fleet PSS MiB | coordinator RSS MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mem = r["memory_kb"]
        lines.append(
            f"| {r['scenario']['id']} | {mem['containers_measured']} "
            f"| {_fmt((mem['rss_mean'] or 0) / 1024, 1)} "
            f"| {_fmt((mem['pss_mean'] or 0) / 1024, 1)} "
            f"| {_fmt((mem['pss_total'] or 0) / 1024, 0)} "
            f"| {_fmt((mem.get('coordinator_rss') or 0) / 1024, 0)} |"
        )
    lines.append("")
    path.write_text("\n".join(lines) + "\n")


def _recommendations(by: dict[str, dict[str, Any]]) -> list[str]:
    """The settings advice, with the figures that support it taken from this run."""
    warm = by.get("direct-warm")
    null = by.get("direct-nullpool")
    null_over = by.get("direct-nullpool-over")
    over = by.get("direct-warm-over")
    bouncer = by.get("pgbouncer-10x")
    hold = by.get("frozen-hold")
    ist = by.get("frozen-idle-session-timeout")
    lines = ["## Recommended settings and the trade-off", ""]
    if warm and null:
        lines.append(
            f"- **Direct connections, warm cache** cost one backend per container for the "
            f"container's whole life, busy or frozen, and almost no connects "
            f"({_fmt(warm['connects']['per_invocation'], 3)} per invocation here; warm p50 "
            f"{_fmt(warm['latency_ms']['warm']['p50_ms'], 1)} ms against NullPool's "
            f"{_fmt(null['latency_ms']['warm']['p50_ms'], 1)} ms). Size for it: reserved "
            "concurrency of all functions using the database <= `max_connections` - "
            "`superuser_reserved_connections` - (`reserved_connections`) - what other "
            "clients need."
        )
    if over:
        errors = ", ".join(
            f"{count} `{name}`" for name, count in over["invocations"]["errors"].items()
        )
        lines.append(
            f"- **Past that limit** the extra containers are refused at connect: "
            f"{over['invocations']['failed']} failed invocations here ({errors or 'none'}), "
            f"the slowest after {_fmt(over['invocations']['failed_after_ms']['max'])} ms of a "
            f"{over['config']['deadline_ms']} ms deadline. The connect retries back off with "
            "jitter within the invocation's remaining time, then the handler gets a "
            "`CapacityExhaustedError` naming the attempts, with the server's own refusal "
            "(`sorry, too many clients already` / `remaining connection slots are reserved`) "
            "as its cause."
        )
    if null and null_over:
        lines.append(
            f"- **NullPool** holds a backend only during an invocation, so the same server "
            f"carried the larger fleet with {null_over['invocations']['failed']} failures "
            f"(peak {_fmt(null_over['backends']['peak_during_traffic'])} backends), but every "
            f"invocation pays a connect (cold and warm alike, "
            f"{_fmt(null['connects']['per_invocation'], 3)} per invocation) and the server "
            "forks a backend each time: fine for rare invocations, wasteful for busy ones."
        )
    if bouncer:
        lines.append(
            f"- **PgBouncer in transaction mode (or RDS Proxy)** with "
            f"`LAMBDA_POOL_TRANSACTION_POOLING=1` decouples containers from backends: "
            f"{bouncer['config']['containers']} containers ran on at most "
            f"{_fmt(bouncer['backends']['peak'])} server backends (pool size "
            f"{bouncer['scenario']['pool_size']}, `max_connections` "
            f"{bouncer['scenario']['max_connections']}) with "
            f"{bouncer['invocations']['failed']} failures. Keep the pool size below "
            "`max_connections` - reserved; each container keeps its client connection to the "
            "pooler warm. The price: no session state across transactions (no session `SET`, "
            "no server-side prepared statements, advisory locks or `LISTEN`)."
        )
    if hold and ist:
        timeout = ist["server"].get("idle_session_timeout")
        lines.append(
            f"- **Frozen containers** keep their backends: "
            f"{_fmt(hold['frozen']['before_thaw']['held_by_frozen_containers'])} of "
            f"{hold['config']['containers']} still held one after "
            f"{hold['config']['idle_s']} s frozen. Lambda keeps idle environments for minutes "
            f"to hours. Set `idle_session_timeout` (PostgreSQL 14+; here {timeout}) on the "
            "application role (`ALTER ROLE app SET idle_session_timeout = '5min'`), not the "
            "whole server, so admin sessions keep theirs: the server then ends sessions idle "
            f"that long ({_fmt(ist['frozen']['before_thaw']['server_backends'])} backends left "
            "before thaw here) and the warm cache sees the closed socket at the next checkout "
            "without a round trip and reconnects "
            f"({ist['connects']['by_phase'].get('thaw', {}).get('connects', '-')} reconnects, "
            f"{ist['invocations']['failed']} handler errors). The trade-off: a timeout shorter "
            "than the gap between invocations turns warm invocations into cold connects; one "
            "longer than Lambda's typical idle keep-alive frees nothing. Minutes, not seconds: "
            "a few times the function's usual inter-arrival time. Also set "
            "`idle_in_transaction_session_timeout` (code outside `@with_connection()` that "
            "returns with a transaction open would be frozen holding its locks) and, "
            "PostgreSQL 14+, `client_connection_check_interval` (a query of a container "
            "killed at its deadline otherwise runs to its end)."
        )
    lines += [
        "- **Keep PgBouncer's pool (`default_pool_size` x databases x users, plus every other "
        "client) below `max_connections` - reserved.** When the server refuses one of "
        "PgBouncer's logins, PgBouncer answers every client of that pool with `server login "
        "has been failing, try again later (server_login_retry)` for `server_login_retry` "
        "(15 s by default); psycopg raises it as `ProtocolViolation`, which is not a capacity "
        "error lambda-pool retries.",
        "- **Keep the transaction's client unstarved.** In transaction mode a transaction "
        "holds its server connection while its client thinks between statements; a client "
        "starved of CPU (or doing slow work inside the transaction) holds it longer, other "
        "clients queue, invocations reach their deadline mid-transaction, PgBouncer closes "
        "those server connections and opens new ones (TLS and authentication again), which "
        "adds load. On this 2-core machine that is what a fleet without think time runs "
        "into; do slow work before `BEGIN`, not inside the transaction.",
        "- **Through PgBouncer**, set `server_idle_timeout` to return idle server "
        "connections and `client_idle_timeout` (longer than the function's idle gaps) to drop "
        "the client connections of environments Lambda has discarded; PgBouncer's "
        "`max_client_conn` must exceed the total concurrency of every function using it.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------- entry


def _git_head() -> str:
    import subprocess

    try:
        out = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "?"
    head = out.stdout.strip() or "?"
    changed = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "lambda_pool"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout.strip()
    # The run measures the working tree: say when it differs from the commit.
    return f"{head} + uncommitted changes" if changed else head


def _versions() -> dict[str, str]:
    import subprocess

    from lambda_pool.testing.pgbouncer import find_pgbouncer

    info: dict[str, str] = {}
    binary = find_pgbouncer()
    if binary:
        with contextlib.suppress(Exception):
            info["pgbouncer"] = (
                subprocess.run(
                    [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
                )
                .stdout.splitlines()[0]
                .rsplit(" ", 1)[-1]
            )
    return info


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scenarios; write the page, plots and JSON (docs/ unless ``--quick``)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fleet")
    parser.add_argument("--quick", action="store_true", help="small fleets, into a temp dir")
    parser.add_argument("--out", type=Path, help="folder for scale.md, scale/*.svg, JSON")
    parser.add_argument("--only", action="append", help="scenario id (repeatable)")
    args = parser.parse_args(argv)
    scenarios = _scenarios(0.2 if args.quick else 1.0)
    if args.only:
        unknown = set(args.only) - {s.id for s in scenarios}
        if unknown:
            parser.error(
                f"unknown scenario(s) {sorted(unknown)}; known: "
                + ", ".join(s.id for s in scenarios)
            )
        scenarios = [s for s in scenarios if s.id in args.only]
    out = args.out or (Path(tempfile.mkdtemp(prefix="lambda-pool-fleet-")) if args.quick else DOCS)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    meta: dict[str, Any] = {
        "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": [round(x, 1) for x in load] if load else None,
        "git": _git_head(),
        **_versions(),
    }
    started = time.monotonic()
    results = run_scenarios(scenarios, out / "scale")
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    (out / "scale" / "fleet.json").write_text(
        json.dumps({"meta": meta, "scenarios": results}, indent=2, default=str) + "\n"
    )
    write_page(results, meta, out / "scale.md")
    print(f"written: {out / 'scale.md'}, {out / 'scale'}/*.svg, {out / 'scale' / 'fleet.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
