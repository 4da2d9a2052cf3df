"""Timing for the benchmarks: medians over interleaved rounds after a warm-up."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

MIN_SECONDS = 2.0  # fast measurements repeat until they have taken at least this long


def timed_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, tuple[float, object]]:
    """:func:`timed` for several computations at once, run in rounds (each once per round,
    in the given order) after one warm-up round: name -> (median seconds, last result). The
    number of rounds follows the slowest, as in :func:`timed`."""
    results, first = {}, 0.0
    for name, fn in fns.items():  # warm-up round
        start = time.perf_counter()
        results[name] = fn()
        first = max(first, time.perf_counter() - start)
    rounds = max(1, repeats, math.ceil(MIN_SECONDS / max(first, 1e-6)))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in fns}


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """(median seconds of ``repeats`` runs after one warm-up run, the last run's result). A
    measurement whose warm-up took less than ``MIN_SECONDS / repeats`` runs more often, so that
    the median of a few-millisecond computation is not one scheduler hiccup."""
    return timed_interleaved({"fn": fn}, repeats)["fn"]
