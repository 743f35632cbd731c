"""Interleaved timing: rounds of every contender in shuffled order, medians per contender.

Running contender A for a while and then contender B lets a burst of load from a
neighbour land on only one of them.  Here each round runs a short block of every
contender, in an order shuffled per round, so load spikes spread over all of them;
the median over rounds then drops the rounds a spike hit.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Case", "median", "run_block", "run_interleaved"]

Op = Callable[[], object]


@dataclass
class Case:
    """One contender of a micro-benchmark: a ready-to-call operation and its labels."""

    id: str
    label: str
    op: Op
    #: Cases of one group are compared with each other (same driver, same pre-ping setting).
    group: str
    #: Non-empty for a baseline of its group: the ratio column it anchors (``"SQLAlchemy"``).
    role: str = ""
    #: Called after timing, before teardown: facts worth recording (e.g. pool counters).
    facts: Callable[[], dict[str, Any]] | None = None
    samples_ns: list[float] = field(default_factory=list)


def run_block(op: Op, count: int) -> float:
    """Call ``op`` ``count`` times back to back; nanoseconds per call."""
    start = time.perf_counter_ns()
    for _ in range(count):
        op()
    return (time.perf_counter_ns() - start) / count


def run_interleaved(
    cases: Sequence[Case],
    *,
    rounds: int,
    ops_per_round: int,
    warmup_ops: int,
    seed: int = 20240601,
) -> None:
    """Fill every case's ``samples_ns`` with one ns/op figure per round.

    The garbage collector is off during a block (as :mod:`timeit` does) so that a
    collection triggered by one contender's garbage is not billed to another.
    """
    rng = random.Random(seed)
    for case in cases:
        run_block(case.op, warmup_ops)
    order = list(cases)
    for _ in range(rounds):
        rng.shuffle(order)
        for case in order:
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                case.samples_ns.append(run_block(case.op, ops_per_round))
            finally:
                if gc_was_enabled:
                    gc.enable()
        gc.collect()


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values, so a missing figure never looks like zero)."""
    return statistics.median(values) if values else float("nan")
