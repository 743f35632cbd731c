"""The fleet plot, written as SVG with the standard library (no plotting dependency).

One figure per run: the top panel shows the server's fleet backends and the invocations
in flight over time, the phases as shaded bands and the connection limit as a dashed
line; the bottom panel shows invocations finished per second, ok and failed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from xml.sax.saxutils import escape

from lambda_pool.fleet.run import FleetResult

__all__ = ["fleet_svg"]

_WIDTH, _TOP_H, _BOTTOM_H = 760, 260, 120
_LEFT, _RIGHT, _PAD = 56, 16, 30
_PHASE_COLOURS = {
    "start": "#f3f3f3",
    "burst": "#fff4d6",
    "sustained": "#e6f2ff",
    "frozen": "#e8e8ff",
    "thaw": "#e6ffe9",
}


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10.0 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def _polyline(points: Sequence[tuple[float, float]], colour: str, width: float = 1.6) -> str:
    if not points:
        return ""
    path = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    return (
        f'<polyline fill="none" stroke="{colour}" stroke-width="{width}" '
        f'stroke-linejoin="round" points="{path}"/>'
    )


def fleet_svg(result: FleetResult, title: str, limits: Mapping[str, float] | None = None) -> str:
    """The run's timeline as an SVG document; ``limits`` draws labelled dashed lines."""
    end = max(
        [result.elapsed_s]
        + [b for _, b in result.phases.values()]
        + [s.t_s for s in result.samples]
    )
    end = max(end, 0.1)
    width_plot = _WIDTH - _LEFT - _RIGHT
    top0, top1 = _PAD, _PAD + _TOP_H
    bottom0 = top1 + 40
    bottom1 = bottom0 + _BOTTOM_H
    height = bottom1 + 40
    limits = dict(limits or {})
    y_max = _nice_max(
        max(
            [s.total for s in result.samples]
            + [s.in_flight for s in result.samples]
            + list(limits.values())
            + [1]
        )
        * 1.05
    )

    def x(t: float) -> float:
        return _LEFT + width_plot * t / end

    def y_top(v: float) -> float:
        return top1 - _TOP_H * v / y_max

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="sans-serif" font-size="11">',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{_LEFT}" y="18" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for phase, (a, b) in result.phases.items():
        colour = _PHASE_COLOURS.get(phase, "#f8f8f8")
        for y0, y1 in ((top0, top1), (bottom0, bottom1)):
            out.append(
                f'<rect x="{x(a):.1f}" y="{y0}" width="{max(0.5, x(b) - x(a)):.1f}" '
                f'height="{y1 - y0}" fill="{colour}"/>'
            )
        out.append(
            f'<text x="{(x(a) + x(b)) / 2:.1f}" y="{top0 + 12}" text-anchor="middle" '
            f'fill="#666">{escape(phase)}</text>'
        )
    # axes and grid
    for i in range(5):
        value = y_max * i / 4
        yy = y_top(value)
        out.append(
            f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" stroke="#ddd"/>'
        )
        out.append(f'<text x="{_LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{value:g}</text>')
    for label, value in limits.items():
        yy = y_top(value)
        out.append(
            f'<line x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{yy:.1f}" y2="{yy:.1f}" '
            'stroke="#c00" stroke-dasharray="5,4"/>'
        )
        out.append(
            f'<text x="{_WIDTH - _RIGHT - 4}" y="{yy - 4:.1f}" text-anchor="end" '
            f'fill="#c00">{escape(label)} = {value:g}</text>'
        )
    samples = sorted(result.samples, key=lambda s: s.t_s)
    out.append(_polyline([(x(s.t_s), y_top(s.in_flight)) for s in samples], "#999", 1.2))
    out.append(_polyline([(x(s.t_s), y_top(s.total)) for s in samples], "#1f5fbf", 2.0))
    legend_y = top1 + 16
    out.append(
        f'<text x="{_LEFT}" y="{legend_y}"><tspan fill="#1f5fbf">━ server backends '
        '(pg_stat_activity)</tspan>  <tspan fill="#999">━ invocations in flight</tspan></text>'
    )
    # bottom panel: invocations finished per second
    buckets = max(1, math.ceil(end))
    ok = [0] * buckets
    failed = [0] * buckets
    for record in result.records:
        finished = record.started_s + record.outcome.duration_ms / 1000.0
        index = min(buckets - 1, max(0, int(finished)))
        (ok if record.outcome.ok else failed)[index] += 1
    b_max = _nice_max(
        max(a + b for a, b in zip(ok, failed, strict=True)) * 1.05 if result.records else 1
    )
    bar_w = width_plot / buckets
    for i, (good, bad) in enumerate(zip(ok, failed, strict=True)):
        h_ok = _BOTTOM_H * good / b_max
        h_bad = _BOTTOM_H * bad / b_max
        left = _LEFT + i * bar_w + 0.5
        out.append(
            f'<rect x="{left:.1f}" y="{bottom1 - h_ok:.1f}" width="{max(0.5, bar_w - 1):.1f}" '
            f'height="{h_ok:.1f}" fill="#5a9e5a"/>'
        )
        if bad:
            out.append(
                f'<rect x="{left:.1f}" y="{bottom1 - h_ok - h_bad:.1f}" '
                f'width="{max(0.5, bar_w - 1):.1f}" height="{h_bad:.1f}" fill="#d04040"/>'
            )
    out.append(f'<text x="{_LEFT - 6}" y="{bottom0 + 4}" text-anchor="end">{b_max:g}</text>')
    out.append(f'<text x="{_LEFT - 6}" y="{bottom1 + 4}" text-anchor="end">0</text>')
    ticks = 10 if end > 10 else max(1, int(end))
    for i in range(ticks + 1):
        t = end * i / ticks
        out.append(f'<text x="{x(t):.1f}" y="{bottom1 + 14}" text-anchor="middle">{t:.0f}</text>')
    out.append(
        f'<text x="{_LEFT}" y="{bottom1 + 30}"><tspan fill="#5a9e5a">■ ok</tspan> '
        '<tspan fill="#d04040">■ failed</tspan> invocations finished per second; '
        "time in seconds since the run began</text>"
    )
    out.append("</svg>")
    return "\n".join(part for part in out if part) + "\n"
