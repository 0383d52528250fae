"""GPU time of a callable, as the start-up probes and the bench measure it."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def median_cuda_ms(fn: Callable[[], object], reps: int) -> float:
    """Median milliseconds of ``fn()`` on the current CUDA stream over ``reps`` runs, after
    one untimed run (kernel selection, compilation and allocation happen outside the
    timings)."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
