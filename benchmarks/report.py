"""Results: rows with a median and ratios against the peers of the same run; table and JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.timing import Case, median

__all__ = ["Row", "Section", "add_case_rows", "format_sections", "ratio", "write_json"]


@dataclass
class Row:
    """One contender's result: ``median`` in the section's unit, ``ratios`` by baseline name."""

    id: str
    label: str
    median: float
    samples: list[float]
    ratios: dict[str, float | None] = field(default_factory=dict)
    #: What was observed besides time (e.g. the warm pool's counters), for the JSON.
    facts: dict[str, Any] = field(default_factory=dict)
    #: Cells of the section's ``extra_columns`` (e.g. round trips counted), by heading.
    extra: dict[str, str] = field(default_factory=dict)


@dataclass
class Section:
    """A table: its rows share a unit and the baselines their ratios are taken against."""

    name: str
    title: str
    unit: str
    #: Ratio column headings, in order (keys of ``Row.ratios``).
    baselines: list[str]
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Headings of columns printed after the ratios, filled from ``Row.extra``.
    extra_columns: list[str] = field(default_factory=list)


def ratio(value: float, baseline: float | None) -> float | None:
    """``value / baseline``; ``None`` when there is no usable baseline."""
    if baseline is None or not math.isfinite(baseline) or baseline <= 0:
        return None
    return value / baseline


def add_case_rows(
    section: Section, cases: Sequence[Case], facts: dict[str, dict[str, Any]] | None = None
) -> None:
    """Append a row per timed case (µs), each ratio against its group's case of that role.

    Every name in ``section.baselines`` is a role; a group without a case of that role
    gets ``None`` (printed as a dash) in that column.
    """
    facts = facts or {}
    medians = {case.id: median(case.samples_ns) / 1000.0 for case in cases}
    anchors = {(case.group, case.role): medians[case.id] for case in cases if case.role}
    for case in cases:
        value = medians[case.id]
        section.rows.append(
            Row(
                id=case.id,
                label=case.label,
                median=value,
                samples=[sample / 1000.0 for sample in case.samples_ns],
                ratios={
                    name: ratio(value, anchors.get((case.group, name)))
                    for name in section.baselines
                },
                facts=facts.get(case.id, {}),
            )
        )


def _number(value: float) -> str:
    if not math.isfinite(value):
        return "n/a"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio_text(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def format_section(section: Section) -> str:
    """A fixed-width table of one section, its notes underneath."""
    headers = [
        "contender",
        f"median {section.unit}",
        *(f"x {b}" for b in section.baselines),
        *section.extra_columns,
    ]
    body = [
        [
            row.label,
            _number(row.median),
            *(_ratio_text(row.ratios.get(b)) for b in section.baselines),
            *(row.extra.get(name, "") for name in section.extra_columns),
        ]
        for row in section.rows
    ]
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def render(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest]).rstrip()

    lines = [section.title, "=" * len(section.title), render(headers)]
    lines.append("  ".join("-" * width for width in widths))
    lines.extend(render(cells) for cells in body)
    lines.extend(f"  * {note}" for note in section.notes)
    return "\n".join(lines)


def format_sections(sections: Sequence[Section]) -> str:
    """Every section's table, separated by blank lines."""
    return "\n\n".join(format_section(section) for section in sections)


def write_json(path: Path, meta: dict[str, Any], sections: Sequence[Section]) -> None:
    """``{"meta": …, "sections": {name: {unit, baselines, rows: [...]}}}`` to ``path``."""
    document = {
        "meta": meta,
        "sections": {
            section.name: {
                "title": section.title,
                "unit": section.unit,
                "baselines": section.baselines,
                "extra_columns": section.extra_columns,
                "notes": section.notes,
                "rows": [asdict(row) for row in section.rows],
            }
            for section in sections
        },
    }
    path.write_text(json.dumps(_finite(document), indent=2) + "\n", encoding="utf-8")


def _finite(value: Any) -> Any:
    """``value`` with NaN/infinity replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
