"""Timing helpers for the benchmark scripts in tools/ (ratios measured in one run)."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Mapping


def time_interleaved(
    fns: Mapping[str, Callable[[], object]], warmup: int = 3, rounds: int = 5, steps: int = 5
) -> dict:
    """Median seconds per call of each function.

    The functions are timed in alternating rounds (a, b, a, b, ...) so that a
    slow moment of the machine affects all of them alike; each round runs
    `steps` calls and the median over rounds is reported.
    """
    for fn in fns.values():
        for _ in range(warmup):
            _block(fn())
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(steps):
                result = fn()
            _block(result)
            samples[name].append((time.perf_counter() - start) / steps)
    return {name: statistics.median(s) for name, s in samples.items()}


def _block(result):
    """Wait for asynchronous TensorFlow work by reading the result back."""
    if result is None:
        return
    if isinstance(result, (tuple, list)):
        for r in result:
            _block(r)
    elif isinstance(result, dict):
        for r in result.values():
            _block(r)
    elif hasattr(result, "numpy"):
        result.numpy()
