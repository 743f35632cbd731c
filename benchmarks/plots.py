"""SVG bar charts of a run, written with the standard library.

Horizontal bars, one per contender, in groups (the groups of a section: same driver,
same latency …), each bar labelled with its figure.  Hand-written rather than through
matplotlib: the charts are simple, the virtualenv does not carry matplotlib, and a
plotting stack would be a heavy dependency for three pictures.  The SVG is plain text
(deterministic for the same figures), so it diffs and renders on GitHub.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from xml.sax.saxutils import escape

__all__ = ["Bar", "Group", "bar_chart"]

_WIDTH = 980
_LABEL_WIDTH = 470
_BAR_AREA = 400
_ROW = 20
_GROUP_GAP = 12
_TOP = 52
_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3")


@dataclass(frozen=True)
class Bar:
    label: str
    value: float
    #: Printed after the bar instead of the plain figure (e.g. "3 replies, 3 statements").
    text: str = ""
    #: Drawn in the accent colour (lambda-pool's own rows).
    accent: bool = False


@dataclass(frozen=True)
class Group:
    title: str
    bars: Sequence[Bar]


def _figure(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def bar_chart(title: str, unit: str, groups: Sequence[Group], *, note: str = "") -> str:
    """An SVG document: ``groups`` of bars on one linear scale (0 to the largest value)."""
    values = [bar.value for group in groups for bar in group.bars if math.isfinite(bar.value)]
    top = max(values, default=1.0) or 1.0
    rows = sum(len(group.bars) + 1 for group in groups)
    height = _TOP + rows * _ROW + len(groups) * _GROUP_GAP + (28 if note else 12)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{height}" '
        f'viewBox="0 0 {_WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" '
        'font-size="12">',
        f'<rect width="{_WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="12" y="22" font-size="15" font-weight="bold">{escape(title)}</text>',
        f'<text x="12" y="40" fill="#555555">{escape(unit)}</text>',
    ]
    y = _TOP
    for index, group in enumerate(groups):
        out.append(
            f'<text x="12" y="{y + 14}" font-weight="bold" fill="#333333">'
            f"{escape(group.title)}</text>"
        )
        y += _ROW
        for bar in group.bars:
            colour = _COLOURS[index % len(_COLOURS)] if not bar.accent else "#c44e52"
            length = 0.0
            if math.isfinite(bar.value) and bar.value > 0:
                length = max(1.0, _BAR_AREA * bar.value / top)
            shown = bar.text or (_figure(bar.value) if math.isfinite(bar.value) else "n/a")
            out += [
                f'<text x="{_LABEL_WIDTH - 8}" y="{y + 14}" text-anchor="end">'
                f"{escape(bar.label)}</text>",
                f'<rect x="{_LABEL_WIDTH}" y="{y + 3}" width="{length:.1f}" height="{_ROW - 6}" '
                f'fill="{colour}"/>',
                f'<text x="{_LABEL_WIDTH + length + 6:.1f}" y="{y + 14}" fill="#333333">'
                f"{escape(shown)}</text>",
            ]
            y += _ROW
        y += _GROUP_GAP
    if note:
        out.append(f'<text x="12" y="{y + 12}" fill="#555555">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
