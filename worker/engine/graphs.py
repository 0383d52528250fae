"""Bucketed decode: one CUDA graph per (rows, length) bucket, captured once at start-up.

Without CUDA graphs (CPU, or ``cuda_graphs=False``) the same buckets run eagerly, so the padded
rows and the length bound are exercised the same way in CPU tests.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

import torch

logger = logging.getLogger(__name__)

StepFn = Callable[[int, int], torch.Tensor]
Key = TypeVar("Key", bound=Hashable)
# CUDA stream priorities (lower is higher): decode runs before admission where both have
# kernels ready.
DECODE_PRIORITY = -1
ADMISSION_PRIORITY = 0


def capture_graphs(
    keys: Iterable[Key],
    run: Callable[[Key], torch.Tensor],
    device: torch.device,
    priority: int = ADMISSION_PRIORITY,
) -> dict[Key, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """Capture ``run(key)`` for each key on a memory pool of their own, each after one warm-up
    run (lazy inits and kernel selection off-graph); give the keys largest first, so smaller
    shapes reuse the pool's memory. Each graph's output is overwritten by its next replay.

    ``priority`` is the one the graphs' kernels run at, wherever they are replayed: PyTorch
    instantiates graphs with ``cudaGraphInstantiateFlagUseNodePriority``, so each kernel keeps
    the priority of the stream it was captured on, not that of the stream it is replayed on.
    """
    graphs = {}
    pool = torch.cuda.graph_pool_handle()
    stream = torch.cuda.Stream(device, priority=priority)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for key in keys:
            run(key)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = run(key)
            graphs[key] = (graph, out)
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    return graphs


def batch_buckets(max_slots: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 (SGLang's 16, 24, 32, ...), always ending at ``max_slots``."""
    sizes = [1, 2, 4, *range(8, max_slots + 1, 8)]
    return sorted({s for s in sizes if s < max_slots} | {max_slots})


def length_buckets(max_seq_len: int, smallest: int = 256) -> list[int]:
    """Powers of two from ``smallest``, always ending at ``max_seq_len``: attention reads only
    the bucket's span of each row's K/V, not all ``max_seq_len`` positions."""
    sizes = []
    size = smallest
    while size < max_seq_len:
        sizes.append(size)
        size *= 2
    return [*sizes, max_seq_len]


def pick(buckets: list[int], value: int) -> int:
    """The smallest bucket holding ``value``."""
    index = bisect.bisect_left(buckets, value)
    if index == len(buckets):
        raise ValueError(f"{value} is beyond the largest bucket {buckets[-1]}")
    return buckets[index]


class DecodeGraphs:
    """Runs a decode step function at bucketed shapes, replaying captured graphs on CUDA."""

    def __init__(
        self, step: StepFn, rows: list[int], lengths: list[int], *, use_graphs: bool
    ) -> None:
        self.step = step
        self.rows = rows
        self.lengths = lengths
        self.use_graphs = use_graphs
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.capture_s = 0.0

    def capture(self) -> None:
        """Capture every bucket, largest first, sharing one memory pool. The warm-up runs write
        K/V garbage at the slots' current positions, so call this before any slot is in use."""
        if not self.use_graphs:
            return
        start = time.perf_counter()
        keys = [(rows, length) for rows in reversed(self.rows) for length in reversed(self.lengths)]
        device = torch.device("cuda", torch.cuda.current_device())
        self._graphs = capture_graphs(
            keys, lambda key: self.step(*key), device, priority=DECODE_PRIORITY
        )
        self.capture_s = time.perf_counter() - start
        logger.info(
            "captured %d decode graphs (rows %s x lengths %s) in %.1f s",
            len(self._graphs), self.rows, self.lengths, self.capture_s,
        )  # fmt: skip

    def run(self, rows: int, length: int) -> torch.Tensor:
        """Logits [bucket_rows, V] for slots 0..bucket_rows-1 (``rows`` rounded up to a bucket,
        ``length`` up to a length bucket). The result is reused by the next replay."""
        key = (pick(self.rows, rows), pick(self.lengths, length))
        if not self.use_graphs:
            return self.step(*key)
        graph, out = self._graphs[key]
        graph.replay()
        return out
