"""Figures from a fleet run: invocations, errors, latency, connects, backends, memory.

:func:`summarize` turns a :class:`~lambda_pool.fleet.run.FleetResult` into a plain dict
(the ``--json`` document); :func:`format_table` prints it for a terminal. Latency is the
handler's own duration measured inside the container (what Lambda bills), split into
*cold* (a container's first invocation: its first connect), *warm* (the rest of the
burst and sustained phases) and *thaw* (after the frozen phase).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lambda_pool.fleet.run import FleetResult, InvocationRecord

__all__ = ["format_table", "percentile", "summarize"]


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` quantile with linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _latency(records: Iterable[InvocationRecord]) -> dict[str, Any]:
    durations = [r.outcome.duration_ms for r in records]
    return {
        "count": len(durations),
        "p50_ms": _round(percentile(durations, 0.50)),
        "p95_ms": _round(percentile(durations, 0.95)),
        "p99_ms": _round(percentile(durations, 0.99)),
        "max_ms": _round(max(durations) if durations else None),
    }


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def _kind(record: InvocationRecord) -> str:
    if record.phase == "thaw":
        return "thaw"
    return "cold" if record.outcome.cold else "warm"


def summarize(result: FleetResult) -> dict[str, Any]:
    """The run's figures as a JSON-ready dict."""
    records = result.records
    ok = [r for r in records if r.outcome.ok]
    failed = [r for r in records if not r.outcome.ok]
    errors = Counter(r.outcome.error_type or "?" for r in failed)
    examples: dict[str, str] = {}
    for record in failed:
        examples.setdefault(record.outcome.error_type or "?", record.outcome.error or "")
    kinds = ("cold", "warm", "thaw")
    latency = {kind: _latency(r for r in ok if _kind(r) == kind) for kind in kinds}
    connects = sum(r.outcome.connects for r in records)
    connects_by_phase = {
        phase: {
            "invocations": len(group),
            "connects": sum(r.outcome.connects for r in group),
            "per_invocation": _round(
                sum(r.outcome.connects for r in group) / len(group) if group else None, 3
            ),
        }
        for phase in ("burst", "sustained", "thaw")
        if (group := [r for r in records if r.phase == phase])
    }
    traffic = [s for s in result.samples if s.phase in ("burst", "sustained")]
    frozen_samples = [s for s in result.samples if s.phase == "frozen"]
    memory_rss = [m["rss_kb"] for m in result.memory]
    memory_pss = [m["pss_kb"] for m in result.memory if "pss_kb" in m]
    settings = result.server_settings
    failure_timing = [r.outcome.duration_ms for r in failed]
    config = result.config
    return {
        "run_id": result.run_id,
        "target": result.target_kind,
        "config": {
            "containers": config.containers,
            "runtime": config.runtime,
            "start_method": config.start_method if config.runtime == "process" else None,
            "warm": config.warm,
            "handler": config.handler,
            "ramp_s": config.ramp_s,
            "sustain_s": config.sustain_s,
            "think_ms": config.think_ms,
            "idle_s": config.idle_s,
            "thaw_invocations": config.thaw_invocations,
            "deadline_ms": config.deadline_ms,
            "max_invocations": config.max_invocations,
        },
        "server": settings,
        "invocations": {
            "total": len(records),
            "ok": len(ok),
            "failed": len(failed),
            "timed_out": sum(1 for r in records if r.outcome.timed_out),
            "capacity_errors": sum(1 for r in failed if r.outcome.capacity),
            "errors": dict(errors.most_common()),
            "error_examples": examples,
            # Lambda would have ended these with "Task timed out" instead of the error.
            "failed_past_deadline": sum(
                1 for r in failed if r.outcome.duration_ms > config.deadline_ms
            ),
            "failed_after_ms": {
                "p50": _round(percentile(failure_timing, 0.5)),
                "max": _round(max(failure_timing) if failure_timing else None),
            },
            "by_phase": dict(Counter(r.phase for r in records)),
        },
        "rows_inserted": result.rows_inserted,
        "latency_ms": latency,
        "connects": {
            "total": connects,
            "per_invocation": _round(connects / len(records) if records else None, 3),
            # Failed invocations may have ended before their connect completed.
            "per_ok_invocation": _round(
                sum(r.outcome.connects for r in ok) / len(ok) if ok else None, 3
            ),
            "by_phase": connects_by_phase,
        },
        "backends": {
            "peak": max((s.total for s in result.samples), default=None),
            "peak_during_traffic": max((s.total for s in traffic), default=None),
            "mean_during_traffic": _round(
                sum(s.total for s in traffic) / len(traffic) if traffic else None
            ),
            "per_container_peak": _round(
                max((s.total for s in traffic), default=0) / config.containers, 3
            ),
            "peak_idle_in_transaction": max(
                (s.idle_in_transaction for s in result.samples), default=None
            ),
            "during_freeze_max": max((s.total for s in frozen_samples), default=None),
            "after_stop": result.backends_after_stop,
            "samples": len(result.samples),
        },
        "frozen": result.frozen,
        "pooler": result.pooler,
        "memory_kb": {
            "containers_measured": len(memory_rss),
            "rss_mean": _round(sum(memory_rss) / len(memory_rss) if memory_rss else None, 0),
            "rss_max": max(memory_rss, default=None),
            "pss_mean": _round(sum(memory_pss) / len(memory_pss) if memory_pss else None, 0),
            "pss_total": sum(memory_pss) if memory_pss else None,
            "coordinator_rss": (result.coordinator_memory or {}).get("rss_kb"),
        },
        "init_ms": {
            "count": len(result.init_ms),
            "p50": _round(percentile(result.init_ms, 0.5)),
            "p95": _round(percentile(result.init_ms, 0.95)),
            "errors": result.init_errors[:5],
        },
        "phases_s": result.phases,
        "elapsed_s": result.elapsed_s,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)


def format_table(summary: dict[str, Any]) -> str:
    """A terminal report of :func:`summarize`'s figures."""
    config = summary["config"]
    server = summary["server"]
    inv = summary["invocations"]
    back = summary["backends"]
    mem = summary["memory_kb"]
    lines = [
        f"fleet {summary['run_id']}: {config['containers']} containers "
        f"({config['runtime']}, {'warm cache' if config['warm'] else 'NullPool'}) → "
        f"{summary['target']} (max_connections {server.get('max_connections')}, "
        f"reserved {server.get('superuser_reserved_connections')}"
        + (
            f"+{server['reserved_connections']}"
            if server.get("reserved_connections") not in (None, "0")
            else ""
        )
        + f", idle_session_timeout {server.get('idle_session_timeout')})",
        f"traffic: ramp {config['ramp_s']} s, sustained {config['sustain_s']} s, think "
        f"{config['think_ms']} ms, frozen {config['idle_s']} s, deadline "
        f"{config['deadline_ms']} ms; elapsed {summary['elapsed_s']} s",
        "",
        f"invocations  {inv['total']:>7}  ok {inv['ok']}  failed {inv['failed']}  "
        f"(capacity {inv['capacity_errors']}, timed out {inv['timed_out']})  "
        f"rows inserted {_cell(summary['rows_inserted'])}",
    ]
    for name, count in inv["errors"].items():
        example = summary["invocations"]["error_examples"].get(name, "")
        lines.append(f"  {count:>6} x {name}: {example[:110]}")
    if inv["failed"]:
        timing = inv["failed_after_ms"]
        lines.append(
            f"  failures arrived after p50 {_cell(timing['p50'])} ms, max {_cell(timing['max'])}"
            f" ms (deadline {config['deadline_ms']} ms)"
        )
    lines += ["", f"{'latency ms':<12}{'count':>8}{'p50':>9}{'p95':>9}{'p99':>9}{'max':>9}"]
    for kind, row in summary["latency_ms"].items():
        if row["count"]:
            lines.append(
                f"{kind:<12}{row['count']:>8}"
                + "".join(
                    f"{_cell(row[key]):>9}" for key in ("p50_ms", "p95_ms", "p99_ms", "max_ms")
                )
            )
    conn = summary["connects"]
    lines += [
        "",
        f"connects     {conn['total']} ({_cell(conn['per_invocation'])} per invocation; "
        + ", ".join(
            f"{phase} {_cell(row['per_invocation'])}" for phase, row in conn["by_phase"].items()
        )
        + ")",
        f"backends     peak {_cell(back['peak_during_traffic'])} during traffic, mean "
        f"{_cell(back['mean_during_traffic'])}, per container {_cell(back['per_container_peak'])}"
        f", after stop {_cell(back['after_stop'])}",
    ]
    frozen = summary["frozen"]
    if frozen:
        at, before = frozen.get("at_freeze", {}), frozen.get("before_thaw", {})
        lines.append(
            f"frozen       server backends {_cell(at.get('server_backends'))} at freeze → "
            f"{_cell(before.get('server_backends'))} before thaw; held by frozen containers "
            f"{_cell(at.get('held_by_frozen_containers'))} → "
            f"{_cell(before.get('held_by_frozen_containers'))}"
        )
    pooler = summary["pooler"].get("after_sustained") if summary["pooler"] else None
    if pooler:
        lines.append("pgbouncer    " + ", ".join(f"{key} {value}" for key, value in pooler.items()))
    lines.append(
        f"memory       per container RSS {_cell((mem['rss_mean'] or 0) / 1024)} MiB "
        f"(max {_cell((mem['rss_max'] or 0) / 1024)}), PSS {_cell((mem['pss_mean'] or 0) / 1024)}"
        f" MiB; fleet PSS {_cell((mem['pss_total'] or 0) / 1024)} MiB"
        f" over {mem['containers_measured']} containers; coordinator RSS "
        f"{_cell((mem['coordinator_rss'] or 0) / 1024)} MiB"
    )
    init = summary["init_ms"]
    lines.append(f"init         p50 {_cell(init['p50'])} ms, p95 {_cell(init['p95'])} ms")
    for error in init["errors"]:
        lines.append(f"  init error: {error[:150]}")
    return "\n".join(lines)
