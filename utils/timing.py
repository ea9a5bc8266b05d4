"""Timing that a notebook and a benchmark can trust: warm up, repeat, keep the best run."""

from __future__ import annotations

import time
from typing import Callable

import torch


def best_of(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Seconds for the fastest of ``repeat`` calls of ``fn()``, after ``warmup`` untimed calls.

    The minimum is the least noisy estimate on a shared machine: slower runs measure the
    neighbours, not the code. CUDA work is synchronised so the time covers the kernels.
    """
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best
