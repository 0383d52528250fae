"""The card's measured device-to-device bandwidth, and the decode-step floor it implies."""

from __future__ import annotations

import time

import torch


def measure_copy_bandwidth(device: str, size_bytes: int = 2 << 30, iters: int = 10) -> dict:
    """Time ``dst.copy_(src)`` of ``size_bytes``; each copy reads and writes that many bytes.

    ``bytes_per_s`` counts both (the traffic a weight read competes with); CUDA events time
    it on a GPU, the wall clock on a CPU.
    """
    on_cuda = torch.device(device).type == "cuda"
    n = size_bytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm-up
    if on_cuda:
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1000.0
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t0
    del src, dst
    if on_cuda:
        torch.cuda.empty_cache()
    moved = 2 * n * 2 * iters  # read + write, bf16
    return {
        "size_bytes": n * 2,
        "iters": iters,
        "seconds": seconds,
        "bytes_per_s": moved / seconds,
        "method": "tensor.copy_ timed with CUDA events" if on_cuda else "tensor.copy_ (CPU)",
    }


def decode_floor_ms(
    *,
    weight_bytes: float,
    batch: float,
    cross_bytes_per_image: float,
    self_bytes_per_token: float,
    context_tokens: float,
    bytes_per_s: float,
) -> dict[str, float]:
    """The least time one decode step can take at ``batch``: every byte it must read
    (decode weights, each row's cross-attention cache and self-attention cache) at the
    measured bandwidth."""
    cache = batch * (cross_bytes_per_image + self_bytes_per_token * context_tokens)
    return {
        "batch": batch,
        "weight_bytes": weight_bytes,
        "cache_bytes": cache,
        "floor_ms": (weight_bytes + cache) / bytes_per_s * 1000.0,
    }
