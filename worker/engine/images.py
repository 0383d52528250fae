"""Images into slots: vision tower, projector and every cross layer's K/V, batched per tile count.

An admission's distinct images are grouped by real tile count and encoded in chunks of
``VISION_BATCHES`` sizes (one captured graph each on CUDA), each launched on its own by the
caller. Each chunk's projector and the K/V
projections of all cross layers run as one GEMM each, then the K/V are copied into every slot
that asked for that image.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.fused import fusable, fuse_linears, rms_norm
from worker.engine.inputs import PreparedRequest, to_device
from worker.engine.parts import MllamaParts
from worker.engine.slots import SlotCache
from worker.engine.vision import VisionGraphs, VisionTower, batch_sizes


@dataclass(frozen=True)
class ImageJob:
    """One distinct image of an admission and the slots that receive its cross K/V."""

    prepared: PreparedRequest
    slots: tuple[int, ...]

    @property
    def tiles(self) -> int:
        return int(self.prepared.aspect_ratio_mask.sum())


@dataclass(frozen=True)
class ImageChunk:
    """Images of one tile count encoded together: one vision graph replay."""

    jobs: tuple[ImageJob, ...]
    tiles: int


class PhaseClock:
    """Marks on one stream, read once the work is done: CUDA events on CUDA, else wall time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._marks: dict[str, torch.cuda.Event | float] = {}

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._marks[name] = event
        else:
            self._marks[name] = time.perf_counter()

    def ms(self, start: str, end: str) -> float:
        """Milliseconds between two marks (on CUDA: call once ``end`` has completed)."""
        a, b = self._marks[start], self._marks[end]
        if isinstance(a, float) and isinstance(b, float):
            return (b - a) * 1000.0
        return a.elapsed_time(b)  # type: ignore[union-attr]


class CrossProjection:
    """Projector, then every cross layer's K (normed) and V, each as one GEMM over a chunk."""

    def __init__(self, parts: MllamaParts) -> None:
        g = parts.geometry
        self.projector = parts.projector
        self.attns = [parts.layers[i].cross_attn for i in g.cross_layers]
        linears = [m for attn in self.attns for m in (attn.k_proj, attn.v_proj)]
        self.kv: nn.Module | None = fuse_linears(*linears) if fusable(*linears) else None
        self.norm_weight = torch.stack([attn.k_norm.weight.detach() for attn in self.attns])
        self.eps = self.attns[0].k_norm.variance_epsilon
        self.kv_heads, self.head_dim = g.num_kv_heads, g.head_dim

    def __call__(self, vision_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Vision states [U, m, vision_output_dim] -> K, V [layers, U, m, Hkv, D]."""
        states = self.projector(vision_states)
        count, length, _ = states.shape
        layers = len(self.attns)
        if self.kv is not None:
            kv = self.kv(states).view(count, length, layers, 2, -1, self.head_dim)
            k = rms_norm(self.norm_weight[:, None, :], kv[:, :, :, 0], self.eps)
            return k.permute(2, 0, 1, 3, 4), kv[:, :, :, 1].permute(2, 0, 1, 3, 4)
        shape = (count, length, self.kv_heads, self.head_dim)
        ks = [attn.k_norm(attn.k_proj(states).view(shape)) for attn in self.attns]
        vs = [attn.v_proj(states).view(shape) for attn in self.attns]
        return torch.stack(ks), torch.stack(vs)


class ImageEncoder:
    """Writes the cross K/V of admitted images into their slots (on the current stream)."""

    def __init__(
        self,
        parts: MllamaParts,
        cache: SlotCache,
        *,
        skip_padding_tiles: bool,
        cuda_graphs: bool,
    ) -> None:
        self.parts = parts
        self.cache = cache
        self.tower = VisionTower(parts.vision, skip_padding_tiles=skip_padding_tiles)
        self.graphs = VisionGraphs(
            self.tower, use_graphs=cuda_graphs and parts.device.type == "cuda"
        )
        self.project = CrossProjection(parts)

    @property
    def skip_padding_tiles(self) -> bool:
        return self.tower.skip_padding_tiles

    def capture(self) -> None:
        image_size = self.parts.vision.config.image_size
        self.graphs.capture(image_size, self.parts.dtype, self.parts.device)

    def chunks(self, jobs: Sequence[ImageJob]) -> list[ImageChunk]:
        """``jobs`` grouped by tile count and cut into ``VISION_BATCHES`` sizes, each one
        launch of :meth:`encode_chunk`."""
        by_tiles: dict[int, list[ImageJob]] = {}
        for job in jobs:
            by_tiles.setdefault(job.tiles, []).append(job)
        chunks = []
        for tiles, group in sorted(by_tiles.items()):
            start = 0
            for size in batch_sizes(len(group)):
                chunks.append(ImageChunk(tuple(group[start : start + size]), tiles))
                start += size
        return chunks

    def encode_chunk(self, chunk: ImageChunk) -> PhaseClock:
        """Launch one chunk's vision tower, projector and K/V writes into its slots; its clock
        is marked ``start``, ``vision_end`` (tower done) and ``end`` (K/V written)."""
        jobs, tiles = chunk.jobs, chunk.tiles
        device, cache = self.parts.device, self.cache
        clock = PhaseClock(device)
        clock.mark("start")
        pixels = torch.stack([to_device(job.prepared.pixel_values, device) for job in jobs])
        ratios = to_device(torch.tensor([job.prepared.aspect_ratio_id for job in jobs]), device)
        states = self.graphs.run(pixels, ratios, tiles)
        clock.mark("vision_end")
        k, v = self.project(states)
        # Chunk row of each receiving slot: one image may go to several slots.
        rows = torch.tensor([i for i, job in enumerate(jobs) for _ in job.slots])
        slots = torch.tensor([slot for job in jobs for slot in job.slots])
        rows, slots = to_device(rows, device), to_device(slots, device)
        length = k.shape[2]
        cache.cross_k[:, slots, :length] = k[:, rows]
        cache.cross_v[:, slots, :length] = v[:, rows]
        clock.mark("end")
        return clock
