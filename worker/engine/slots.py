"""Per-slot cache buffers and memory planning.

A slot holds one running request: its self-attention K/V for up to ``max_seq_len`` tokens in the
self-attention layers, and the cross-attention K/V of its image in the cross-attention layers
only (computed once at admission). Row ``i`` of every decode batch is slot ``i``, so decode reads
the caches through slices, never gathers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from worker.engine.parts import Geometry

CPU_SLOTS = 8
CPU_SEQ_LEN = 512
GPU_SEQ_LEN = 4096
MAX_AUTO_SLOTS = 128
# Images encoded in one vision-tower call; bounds the prefill workspace.
VISION_BATCH = 4


@dataclass(frozen=True)
class Capacity:
    max_slots: int
    max_seq_len: int
    bytes_per_slot: int
    workspace_bytes: int


def bytes_per_slot(geometry: Geometry, max_seq_len: int, dtype: torch.dtype) -> int:
    """Self K/V for ``max_seq_len`` tokens plus cross K/V for one full image, K and V."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    token_bytes = 2 * geometry.num_kv_heads * geometry.head_dim * itemsize
    tokens = len(geometry.self_layers) * max_seq_len + len(geometry.cross_layers) * (
        geometry.cross_len
    )
    return tokens * token_bytes


def workspace_bytes(geometry: Geometry, vision_config: object, dtype: torch.dtype) -> int:
    """A generous bound on what prefill needs besides the caches (vision tower activations)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    hidden = vision_config.hidden_size
    layers = vision_config.num_hidden_layers + vision_config.num_global_layers
    padded = geometry.max_tiles * (geometry.num_patches + 7)
    per_image = (
        (layers + 1) * padded * hidden  # every layer's output is kept for the intermediate taps
        + padded * padded  # the dense tile-padding mask
        + 4 * padded * vision_config.intermediate_size
        + 3 * padded * vision_config.vision_output_dim
    ) * itemsize
    return VISION_BATCH * per_image + (1 << 30)


def cache_budget(
    free: int, allocated: int, memory_fraction: float, memory_limit: int | None, workspace: int
) -> int:
    """Bytes the slot caches may take: ``memory_fraction`` of the ``free`` device memory and,
    with a ``memory_limit``, no more than that limit leaves beside the ``allocated`` tensors (the
    weights, quantized or not, at their real size), less the prefill ``workspace``."""
    budget = int(free * memory_fraction)
    if memory_limit is not None:
        budget = min(budget, memory_limit - allocated)
    return budget - workspace


def plan_capacity(
    geometry: Geometry,
    vision_config: object,
    dtype: torch.dtype,
    device: torch.device,
    *,
    max_slots: int | None,
    max_seq_len: int | None,
    memory_fraction: float,
    memory_limit: int | None = None,
) -> Capacity:
    """Choose slots and sequence length: given values are checked, missing ones derived.

    On CUDA the budget is :func:`cache_budget` of the memory free now (after the weights). On
    other devices missing values get small defaults.
    """
    if max_seq_len is None:
        default = GPU_SEQ_LEN if device.type == "cuda" else CPU_SEQ_LEN
        max_seq_len = min(default, geometry.max_position_embeddings)
    if max_seq_len < 2:
        raise ValueError(f"max_seq_len must be at least 2, got {max_seq_len}")
    per_slot = bytes_per_slot(geometry, max_seq_len, dtype)
    workspace = workspace_bytes(geometry, vision_config, dtype)
    if device.type != "cuda":
        return Capacity(max_slots or CPU_SLOTS, max_seq_len, per_slot, workspace)

    torch.cuda.empty_cache()  # blocks the allocator keeps but does not use count as free
    free, _total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    budget = cache_budget(free, allocated, memory_fraction, memory_limit, workspace)
    fit = max(budget, 0) // per_slot
    if max_slots is None:
        max_slots = min(fit, MAX_AUTO_SLOTS)
        if max_slots < 1:
            raise ValueError(
                f"no slot of {max_seq_len} tokens fits: {per_slot / 2**30:.2f} GiB per slot, "
                f"{budget / 2**30:.2f} GiB budget; lower max_seq_len"
            )
    elif max_slots > fit:
        raise ValueError(
            f"{max_slots} slots of {max_seq_len} tokens need {max_slots * per_slot / 2**30:.1f} GiB"
            f", only {budget / 2**30:.1f} GiB is available; at most {fit} fit"
        )
    return Capacity(max_slots, max_seq_len, per_slot, workspace)


class SlotCache:
    """Static device buffers of all slots; addresses never change (CUDA graphs replay them)."""

    def __init__(
        self,
        geometry: Geometry,
        max_slots: int,
        max_seq_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        g = geometry
        self.max_slots = max_slots
        self.max_seq_len = max_seq_len
        kv = (g.num_kv_heads, g.head_dim)
        # Zeros, not empty: masked keys still enter q.k, and NaN garbage would leak through.
        self_shape = (len(g.self_layers), max_slots, max_seq_len, *kv)
        self.self_k = torch.zeros(self_shape, dtype=dtype, device=device)
        self.self_v = torch.zeros_like(self.self_k)
        cross_shape = (len(g.cross_layers), max_slots, g.cross_len, *kv)
        self.cross_k = torch.zeros(cross_shape, dtype=dtype, device=device)
        self.cross_v = torch.zeros_like(self.cross_k)
        # Decode inputs, one row per slot.
        self.tokens = torch.zeros(max_slots, dtype=torch.long, device=device)
        # An inactive row decodes at the last position, which no request's K/V ever uses (the
        # last generated token is never fed back): its garbage K/V write there cannot clobber
        # a prompt being prefilled into that slot meanwhile on another stream.
        self.parking = max_seq_len - 1
        self.positions = torch.full((max_slots,), self.parking, dtype=torch.long, device=device)
        self.active = torch.zeros(max_slots, dtype=torch.long, device=device)
        # All True on a fresh slot: a fully masked row would give NaN even on padded rows.
        self.cross_mask = torch.ones(max_slots, g.cross_len, dtype=torch.bool, device=device)
        # The same as a count of vision tokens: a row's visible tiles are always its first ones.
        self.cross_length = torch.full((max_slots,), g.cross_len, dtype=torch.int32, device=device)
        # HF's full_text_row_masked_out_mask for the decode rows: 0 if the row sees no tile.
        self.row_gate = torch.ones(max_slots, 1, dtype=dtype, device=device)
        self.rows = torch.arange(max_slots, device=device)
        self.key_positions = torch.arange(max_seq_len, device=device)
        # Sampling parameters, read right after the decode graph.
        self.temperature = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.top_p = torch.ones(max_slots, dtype=torch.float32, device=device)
        self.greedy = torch.ones(max_slots, dtype=torch.bool, device=device)

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.self_k, self.self_v, self.cross_k, self.cross_v)
        )

    def release(self, slot: int) -> None:
        """Make a finished slot an inert padded row (its cross K/V stay, for reuse)."""
        # A fill of a one-row slice is a kernel launch; ``active[slot] = 0`` would copy a CPU
        # scalar over and wait for the decode step in flight (~a step per finished request).
        self.active[slot : slot + 1].fill_(0)
        self.positions[slot : slot + 1].fill_(self.parking)
        self.greedy[slot : slot + 1].fill_(True)

    def copy_cross(self, src: int, dst: int) -> None:
        self.cross_k[:, dst].copy_(self.cross_k[:, src])
        self.cross_v[:, dst].copy_(self.cross_v[:, src])

    def move(self, src: int, dst: int, length: int) -> None:
        """Move a running request from slot ``src`` to ``dst``: its first ``length`` self K/V,
        its cross K/V and its decode state. ``src`` is released (its cross K/V stay)."""
        self.self_k[:, dst, :length].copy_(self.self_k[:, src, :length])
        self.self_v[:, dst, :length].copy_(self.self_v[:, src, :length])
        self.copy_cross(src, dst)
        state = (
            self.tokens, self.positions, self.active, self.cross_mask, self.cross_length,
            self.row_gate,
        )  # fmt: skip
        for buffer in (*state, self.temperature, self.top_p, self.greedy):
            buffer[dst] = buffer[src]
        self.release(src)
