"""Text prefill of newly admitted requests (their cross K/V already in their slots), batched.

Prompts are right-padded, so every row's positions start at 0 and its real tokens land at cache
indices 0..n-1 of its slot, the same as HF's unpadded single-request run. Admissions run at
bucketed shapes (rows x width), replayed from CUDA graphs captured at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from worker.engine.attention import apply_rope, gqa_attention
from worker.engine.graphs import capture_graphs, pick
from worker.engine.inputs import to_device
from worker.engine.parts import MllamaParts
from worker.engine.slots import SlotCache

logger = logging.getLogger(__name__)

# Prompts admitted together at most, as bucket sizes; the engine admits up to the largest.
PREFILL_ROWS = (1, 2, 4, 8)
# Prompt width buckets; a longer prompt runs eagerly at its own width.
PREFILL_WIDTHS = (32, 64, 128, 256, 512)
# Never cuDNN attention: it builds a plan for each new shape, and a long prompt runs eagerly.
PREFILL_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def visible_tiles(rows: torch.Tensor, unseen: torch.Tensor) -> torch.Tensor:
    """The tiles each token attends to, from the processor's per-token tile rows [..., tiles].

    HF quirk kept on purpose: a token that sees no tile (before the image) gets an all-zero
    additive mask, so it attends to every vision token, padding tiles included; only its
    cross-attention MLP output is zeroed by the gate. ``unseen`` [..., tiles] (broadcast) says
    which tiles such a token attends to: all of them as HF does, or the real ones only where
    padding tiles were never encoded.
    """
    return torch.where(rows.any(dim=-1, keepdim=True), rows, unseen)


def cross_masks(
    rows: torch.Tensor, unseen: torch.Tensor, num_patches: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token tile rows [..., tiles] as an attention mask [..., tiles*P] (see
    :func:`visible_tiles`) and HF's full-text-row gate [..., 1]."""
    visible = visible_tiles(rows, unseen)
    return visible.repeat_interleave(num_patches, dim=-1), rows.any(dim=-1, keepdim=True).to(dtype)


def prefill_forward(
    parts: MllamaParts,
    cache: SlotCache,
    rope: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    input_ids: torch.Tensor,
    rows: torch.Tensor,
    lengths: torch.Tensor,
    unseen: torch.Tensor,
) -> torch.Tensor:
    """Run right-padded prompts through the decoder, writing their self K/V into ``slots``.

    On the device: ``slots`` [A], ``input_ids`` [A, T], ``rows`` [A, T, tiles] (the processor's
    cross-attention rows), ``lengths`` [A], ``unseen`` [A, tiles] as in :func:`cross_masks`.
    Cross K/V must already be in the slots. Returns the logits of each prompt's last token
    [A, V]. No host sync and no data-dependent shape: it can be captured in a CUDA graph.
    """
    g = parts.geometry
    count, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device)
    real = positions[None, :] < lengths[:, None]  # [A, T]
    self_mask = (positions[None, :] <= positions[:, None])[None] & real[:, None, :]
    cross_mask, row_gate = cross_masks(rows, unseen[:, None], g.num_patches, parts.dtype)
    cos, sin = rope[0][:width], rope[1][:width]
    # Every row writes all ``width`` positions of its slot (no data-dependent indexing): K/V
    # past a prompt's end are masked in decode until decode overwrites them.
    write_slots = slots[:, None].expand(count, width)
    write_positions = positions[None, :].expand(count, width)

    hidden = parts.embed_tokens(input_ids)
    for layer_index, layer in enumerate(parts.layers):
        if layer_index in g.cross_layers:
            cross = g.cross_layers.index(layer_index)
            attn = layer.cross_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(count, width, g.num_heads, g.head_dim).transpose(1, 2)
            q = attn.q_norm(q)
            k = cache.cross_k[cross, slots].transpose(1, 2)
            v = cache.cross_v[cross, slots].transpose(1, 2)
            out = attn.o_proj(gqa_attention(q, k, v, cross_mask, attn.scaling))
            hidden = hidden + layer.cross_attn_attn_gate.tanh() * out
            mlp = layer.mlp(layer.post_attention_layernorm(hidden)) * row_gate
            hidden = hidden + layer.cross_attn_mlp_gate.tanh() * mlp
        else:
            index = g.self_layers.index(layer_index)
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = attn.q_proj(x).view(count, width, g.num_heads, g.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(count, width, g.num_kv_heads, g.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(count, width, g.num_kv_heads, g.head_dim).transpose(1, 2)
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
            cache.self_k[index].index_put_((write_slots, write_positions), k.transpose(1, 2))
            cache.self_v[index].index_put_((write_slots, write_positions), v.transpose(1, 2))
            hidden = hidden + attn.o_proj(gqa_attention(q, k, v, self_mask, attn.scaling))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    last = hidden[torch.arange(count, device=hidden.device), lengths - 1]
    return parts.lm_head(parts.norm(last))


class TextPrefill:
    """Prefills admitted prompts at bucketed shapes: rows rounded up to a ``PREFILL_ROWS`` size
    (padding rows repeat the last prompt, so they write the same K/V to the same slot), width
    to a ``PREFILL_WIDTHS`` size within ``max_seq_len``. On CUDA each bucket is a graph captured
    at start-up on a pool of its own (a replay on a side stream may overlap decode graphs).
    """

    def __init__(
        self,
        parts: MllamaParts,
        cache: SlotCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        use_graphs: bool,
    ) -> None:
        self.parts = parts
        self.cache = cache
        self.rope = rope
        self.use_graphs = use_graphs
        self.widths = sorted({min(w, cache.max_seq_len) for w in PREFILL_WIDTHS})
        self.capture_s = 0.0
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._static: dict[str, torch.Tensor] = {}

    def capture(self) -> None:
        """Capture every bucket, largest first. The warm-up runs write K/V garbage into slot 0,
        so call this before any slot is in use."""
        if not self.use_graphs:
            return
        start = time.perf_counter()
        device, tiles = self.parts.device, self.parts.geometry.max_tiles
        rows, width = max(PREFILL_ROWS), self.widths[-1]
        self._static = {
            "slots": torch.zeros(rows, dtype=torch.long, device=device),
            "input_ids": torch.zeros(rows, width, dtype=torch.long, device=device),
            "rows": torch.zeros(rows, width, tiles, dtype=torch.bool, device=device),
            "lengths": torch.ones(rows, dtype=torch.long, device=device),
            "unseen": torch.ones(rows, tiles, dtype=torch.bool, device=device),
        }
        widths = list(reversed(self.widths))
        keys = [(count, width) for count in reversed(PREFILL_ROWS) for width in widths]
        with sdpa_kernel(PREFILL_BACKENDS):
            self._graphs = capture_graphs(keys, lambda key: self._forward(*key), device)
        self.capture_s = time.perf_counter() - start
        logger.info(
            "captured %d prefill graphs (rows %s x widths %s) in %.1f s",
            len(self._graphs), PREFILL_ROWS, self.widths, self.capture_s,
        )  # fmt: skip

    def _forward(self, count: int, width: int) -> torch.Tensor:
        s = self._static
        return prefill_forward(
            self.parts, self.cache, self.rope, s["slots"][:count], s["input_ids"][:count, :width],
            s["rows"][:count, :width], s["lengths"][:count], s["unseen"][:count],
        )  # fmt: skip

    def run(
        self,
        slots: Sequence[int],
        prompts: Sequence[Sequence[int]],
        cross_rows: Sequence[torch.Tensor],
        unseen: torch.Tensor,
    ) -> torch.Tensor:
        """Prefill ``prompts`` (token ids, with their cross-attention rows [n, tiles] and
        ``unseen`` [A, tiles]) into ``slots``; the logits of each last token [A, V], valid
        until the next call."""
        count = len(prompts)
        longest = max(len(p) for p in prompts)
        bucket = pick(list(PREFILL_ROWS), count)
        try:
            width = pick(self.widths, longest)
        except ValueError:
            width = longest  # beyond the largest bucket: eager at its own width
        pad = [count - 1] * (bucket - count)
        order = [*range(count), *pad]
        input_ids = torch.zeros(bucket, width, dtype=torch.long)
        rows = torch.zeros(bucket, width, self.parts.geometry.max_tiles, dtype=torch.bool)
        for i, source in enumerate(order):
            prompt = prompts[source]
            input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
            rows[i, : len(prompt)] = cross_rows[source]
        host = {
            "slots": torch.tensor([slots[i] for i in order], dtype=torch.long),
            "input_ids": input_ids,
            "rows": rows,
            "lengths": torch.tensor([len(prompts[i]) for i in order], dtype=torch.long),
            "unseen": unseen[order],
        }
        graph = self._graphs.get((bucket, width))
        if graph is None:
            device = self.parts.device
            inputs = {name: to_device(tensor, device) for name, tensor in host.items()}
            with sdpa_kernel(PREFILL_BACKENDS):
                return prefill_forward(self.parts, self.cache, self.rope, **inputs)[:count]
        for name, tensor in host.items():
            target = self._static[name][tuple(map(slice, tensor.shape))]
            target.copy_(tensor.pin_memory(), non_blocking=True)
        graph[0].replay()
        return graph[1][:count]
