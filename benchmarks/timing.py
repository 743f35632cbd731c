"""Interleaved timing: rounds of every contender in shuffled order, medians per contender.

Running contender A for a while and then contender B lets a burst of load from a
neighbour land on only one of them.  Here each round runs a short block of every
contender, in an order shuffled per round, so load spikes spread over all of them;
the median over rounds then drops the rounds a spike hit.

Async contenders (``Case.loop`` set) are coroutine functions: their block runs on that
event loop, timed inside the coroutine, so ``run_until_complete`` itself is not billed.
Sync and async cases share one code path for shuffling, warm-up and the GC.
"""

from __future__ import annotations

import asyncio
import gc
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AsyncOp", "Case", "median", "run_ablock", "run_block", "run_interleaved"]

Op = Callable[[], object]
AsyncOp = Callable[[], Awaitable[object]]


@dataclass
class Case:
    """One contender of a micro-benchmark: a ready-to-call operation and its labels."""

    id: str
    label: str
    #: A plain function, or (with ``loop``) a coroutine function.
    op: Op | AsyncOp
    #: Cases of one group are compared with each other (same driver, same pre-ping setting).
    group: str
    #: Non-empty for a baseline of its group: the ratio column it anchors (``"SQLAlchemy"``).
    role: str = ""
    #: Called after timing, before teardown: facts worth recording (e.g. pool counters).
    facts: Callable[[], dict[str, Any]] | None = None
    #: The event loop an async ``op`` runs on (``None``: ``op`` is a plain function).
    loop: asyncio.AbstractEventLoop | None = None
    #: Async cases only: awaited after each block, untimed, so work the contender left
    #: running in the background (e.g. psycopg_pool's reset task) ends before the next
    #: contender's block instead of being billed to it.
    settle: Callable[[], Awaitable[object]] | None = None
    samples_ns: list[float] = field(default_factory=list)

    def block(self, count: int) -> float:
        """Run ``op`` ``count`` times; nanoseconds per call."""
        if self.loop is None:
            return run_block(self.op, count)
        return self.loop.run_until_complete(run_ablock(self.op, count, self.settle))


def run_block(op: Op, count: int) -> float:
    """Call ``op`` ``count`` times back to back; nanoseconds per call."""
    start = time.perf_counter_ns()
    for _ in range(count):
        op()
    return (time.perf_counter_ns() - start) / count


async def run_ablock(
    op: Op | AsyncOp, count: int, settle: Callable[[], Awaitable[object]] | None = None
) -> float:
    """Await ``op()`` ``count`` times back to back; nanoseconds per call (``settle`` untimed)."""
    start = time.perf_counter_ns()
    for _ in range(count):
        await op()  # type: ignore[misc]
    elapsed = time.perf_counter_ns() - start
    if settle is not None:
        await settle()
    return elapsed / count


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
        case.block(warmup_ops)
    order = list(cases)
    for _ in range(rounds):
        rng.shuffle(order)
        for case in order:
            gc_was_enabled = gc.isenabled()
            gc.disable()
            try:
                case.samples_ns.append(case.block(ops_per_round))
            finally:
                if gc_was_enabled:
                    gc.enable()
        gc.collect()


def median(values: Sequence[float]) -> float:
    """The median (``nan`` for no values, so a missing figure never looks like zero)."""
    return statistics.median(values) if values else float("nan")
