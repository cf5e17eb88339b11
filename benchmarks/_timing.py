"""Timing helpers for benchmarks: compile once, then the median of repeated runs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_seconds(fn: Callable, *args, repeats: int = 5) -> float:
    """Median wall time of ``fn(*args)`` after one warm-up call (which compiles)."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, args_for: Callable, repeats: int = 5) -> dict:
    """Median times of several functions measured in alternation, so that machine noise hits them alike."""
    for name, fn in fns.items():
        jax.block_until_ready(fn(*args_for(0)))
    samples = {name: [] for name in fns}
    for r in range(repeats):
        for name, fn in fns.items():
            args = args_for(r + 1)
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in samples.items()}
