"""The vision tower without a dense mask: tiles bucketed, one CUDA graph per bucket.

HF's ``MllamaVisionModel`` pads every image to ``max_tiles`` tiles of ``P + pad`` tokens (1601 + 7
on the real model) and builds a dense ``(tiles * (P + pad))^2`` additive mask that masks only
pairs of two padding tokens: a real token attends to every token, a padding token (a padding
tile's or a padding patch's) to the real tokens only. That mask keeps SDPA off its flash path.

Here the tokens of an image are ordered real first: ``R = n * P`` real tokens (the ``n`` real
tiles), then the padding tiles' patches, then every encoded tile's padding patches. Attention
is then two unmasked SDPA calls per layer: the first ``R`` queries over all keys, the rest over
the first ``R`` keys. Every per-token operation is order-independent, so this computes HF's
function exactly (up to float summation order).

On CUDA in bf16 or fp16 the tower may run that attention as one Triton kernel instead
(``worker.engine.tile_attention``): at start-up it times both at each shape it runs and keeps
the kernel where it agrees with SDPA and is faster (:func:`kernel_wins`).

``skip_padding_tiles`` encodes the real tiles only (their padding patches kept): a one-tile
image then costs about a sixteenth of the attention and a quarter of the GEMMs of a four-tile
one. It changes the function for images of fewer tiles than ``max_tiles``: their real tokens
no longer see the padding tiles' tokens (the trained model did), and prompt tokens before the
image see the real tiles only. Four-tile images are encoded exactly as HF does either way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.fused import concat_linears
from worker.engine.graphs import capture_graphs
from worker.engine.timing import median_cuda_ms

logger = logging.getLogger(__name__)

#: Images per vision call; a group of one tile count runs in chunks of these sizes.
VISION_BATCHES = (1, 2, 4)
#: The Triton attention serves a shape only if it is this much faster than SDPA there (a
#: tie keeps SDPA) and within KERNEL_TOLERANCE of it (max error / max |SDPA|).
KERNEL_MARGIN = 0.97
KERNEL_TOLERANCE = 2e-2


#: An attention over the fused q/k/v projection's output: ``(qkv, heads, real) -> out``.
Attention = Callable[[torch.Tensor, int, int], torch.Tensor]


def kernel_wins(sdpa_ms: float, kernel_ms: float, error: float) -> bool:
    """Whether the tower runs the Triton attention at a shape where SDPA took ``sdpa_ms``,
    the kernel ``kernel_ms``, and the kernel's output was ``error`` off SDPA's."""
    return error <= KERNEL_TOLERANCE and kernel_ms <= KERNEL_MARGIN * sdpa_ms


@dataclass(frozen=True)
class VisionShape:
    """Token counts of one image with ``tiles`` real tiles, ``encoded`` tiles encoded."""

    tiles: int
    encoded: int
    patches: int  # P: tokens per tile, class token included
    padding: int  # padding patches per tile

    @property
    def real(self) -> int:
        """Queries that attend to every key: the real tiles' patches."""
        return self.tiles * self.patches

    @property
    def outputs(self) -> int:
        """Tokens kept as cross-attention states: every encoded tile's patches."""
        return self.encoded * self.patches

    @property
    def length(self) -> int:
        return self.encoded * (self.patches + self.padding)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, real: int) -> torch.Tensor:
    """HF's tile-padding attention without its mask. q, k, v [B, S, H, D], real tokens first;
    queries ``:real`` see every key, the others the first ``real`` keys. Returns [B, S, H * D]."""
    batch, length, heads, dim = q.shape
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if real == length:
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    else:
        # Concatenated along the tokens of [B, S, H, D]: one copy into the layout o_proj reads.
        out = torch.cat(
            [
                F.scaled_dot_product_attention(q[:, :, :real], k, v).transpose(1, 2),
                F.scaled_dot_product_attention(
                    q[:, :, real:], k[:, :, :real], v[:, :, :real]
                ).transpose(1, 2),
            ],
            dim=1,
        )
    return out.reshape(batch, length, heads * dim)


def fused_split_attention(qkv: torch.Tensor, heads: int, real: int) -> torch.Tensor:
    """:func:`split_attention` of the fused q/k/v projection's output ``qkv``
    [B, S, 3 * heads * D] (q, then k, then v): the tower's SDPA path, as an :data:`Attention`."""
    batch, length, _ = qkv.shape
    q, k, v = (t.reshape(batch, length, heads, -1) for t in qkv.chunk(3, dim=-1))
    return split_attention(q, k, v, real)


def attention_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """How far an attention's output is off SDPA's: max |got - want| / max |want|."""
    return float((got.float() - want.float()).abs().max() / want.float().abs().max())


class VisionTower:
    """Callable ``(pixel_values [B, max_tiles, 3, H, W], aspect_ratio_ids [B], tiles)`` ->
    vision states [B, encoded * P, vision_output_dim] (the projector's input), for B images of
    ``tiles`` real tiles each. Runs the HF modules' own weights (q/k/v concatenated in place)."""

    def __init__(
        self, vision: nn.Module, *, skip_padding_tiles: bool, triton_attention: bool = True
    ) -> None:
        self.vision = vision
        self.skip_padding_tiles = skip_padding_tiles
        self.triton_attention = triton_attention
        config = vision.config
        self.max_tiles = config.max_num_tiles
        self.patches = (config.image_size // config.patch_size) ** 2 + 1
        self.padding = (8 - self.patches % 8) % 8
        self.heads = config.attention_heads
        self.taps = tuple(config.intermediate_layers_indices)
        self.layers = [*vision.transformer.layers, *vision.global_transformer.layers]
        self.local_layers = len(vision.transformer.layers)
        self.qkv = [self._qkv_weight(layer.self_attn) for layer in self.layers]
        # The kernel :meth:`choose_attention` kept, by (length, real) token counts.
        self._attention: dict[tuple[int, int], Attention] = {}

    @staticmethod
    def _qkv_weight(attn: nn.Module) -> torch.Tensor | None:
        linears = (attn.q_proj, attn.k_proj, attn.v_proj)
        if all(type(m) is nn.Linear and m.bias is None for m in linears):
            return concat_linears(*linears)
        return None

    @property
    def kernel_shapes(self) -> frozenset[tuple[int, int]]:
        """(length, real) token counts at which :meth:`choose_attention` kept the kernel."""
        return frozenset(self._attention)

    def choose_attention(self, dtype: torch.dtype, device: torch.device) -> list[dict]:
        """Time SDPA and the Triton attention at each shape this tower runs (the largest
        vision batch, random q/k/v) and keep the kernel where :func:`kernel_wins`; only on
        CUDA in bf16 or fp16 with 80-channel heads and fused q/k/v, and unless the tower was
        built with ``triton_attention=False`` (SDPA only). Returns the timings."""
        dim = self.vision.hidden_size // self.heads
        usable = (self.triton_attention and device.type == "cuda"
                  and dtype in (torch.bfloat16, torch.float16)
                  and dim == 80 and all(w is not None for w in self.qkv))  # fmt: skip
        if not usable:
            return []
        try:
            from worker.engine.tile_attention import tile_attention
        except ImportError as exc:  # no Triton
            logger.info("vision attention: SDPA (%s)", exc)
            return []
        timings = self._keep_kernel_where_faster(tile_attention, dtype, device)
        torch.cuda.empty_cache()  # the probe's tensors: the graphs captured next use their own pool
        return timings

    def _keep_kernel_where_faster(
        self, kernel: Attention, dtype: torch.dtype, device: torch.device
    ) -> list[dict]:
        timings, kept = [], {}
        batch, width = max(VISION_BATCHES), 3 * self.vision.hidden_size
        generator = torch.Generator(device=device).manual_seed(0)
        for tiles in range(1, self.max_tiles + 1):
            shape = self.shape(tiles)
            qkv = torch.randn(batch, shape.length, width, generator=generator, device=device,
                              dtype=dtype)  # fmt: skip
            entry = {"tiles": tiles, "length": shape.length, "real": shape.real}
            try:
                entry["error"] = attention_error(
                    kernel(qkv, self.heads, shape.real),
                    fused_split_attention(qkv, self.heads, shape.real),
                )
                for key, attention in (("sdpa_ms", fused_split_attention), ("kernel_ms", kernel)):
                    entry[key] = median_cuda_ms(
                        lambda fn=attention, qkv=qkv, r=shape.real: fn(qkv, self.heads, r), 5
                    )
            except Exception as exc:  # a compile or launch failure: SDPA at this shape
                entry["failed"] = f"{type(exc).__name__}: {exc}"
            else:
                if kernel_wins(entry["sdpa_ms"], entry["kernel_ms"], entry["error"]):
                    kept[(shape.length, shape.real)] = kernel
            timings.append(entry)
        self._attention = kept
        logger.info("vision attention, Triton kernel at %d of %d shapes: %s", len(kept),
                    len(timings), timings)  # fmt: skip
        return timings

    def shape(self, tiles: int) -> VisionShape:
        encoded = tiles if self.skip_padding_tiles else self.max_tiles
        return VisionShape(tiles, encoded, self.patches, self.padding)

    def _embed(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, encoded: int):
        """HF's patch, class and tile embeddings then ``layernorm_pre``: [B, encoded, P, dim]."""
        v = self.vision
        batch, dim, tiles = pixel_values.shape[0], v.hidden_size, self.max_tiles
        conv = v.patch_embedding
        pixels = pixel_values[:, :encoded].flatten(0, 1).to(conv.weight.device, conv.weight.dtype)
        x = conv(pixels).flatten(2).transpose(1, 2).reshape(batch, encoded, -1, dim)
        pre = v.pre_tile_positional_embedding
        x = x + pre.embedding(aspect_ratio_ids).view(batch, tiles, 1, dim)[:, :encoded] * (
            pre.gate.tanh()
        )
        x = torch.cat([v.class_embedding.expand(batch, encoded, 1, dim).to(x.dtype), x], dim=2)
        pos = v.gated_positional_embedding
        gate = pos.gate.tanh()
        x = x + ((1 - gate) * pos.embedding)
        tile_pos = pos.tile_embedding(aspect_ratio_ids).view(batch, tiles, self.patches, dim)
        x = x + gate * tile_pos[:, :encoded]
        return v.layernorm_pre(x)

    def _layer(self, index: int, x: torch.Tensor, real: int) -> torch.Tensor:
        layer = self.layers[index]
        attn = layer.self_attn
        batch, length, _ = x.shape
        h = layer.input_layernorm(x)
        qkv = self.qkv[index]
        if qkv is not None:
            attention = self._attention.get((length, real), fused_split_attention)
            attended = attention(F.linear(h, qkv), self.heads, real)
        else:  # quantised q/k/v: their outputs apart
            q, k, v = (m(h).reshape(batch, length, self.heads, -1)
                       for m in (attn.q_proj, attn.k_proj, attn.v_proj))  # fmt: skip
            attended = split_attention(q, k, v, real)
        out = attn.o_proj(attended)
        if layer.is_gated:
            out = layer.gate_attn.tanh() * out
        x = x + out
        out = layer.mlp(layer.post_attention_layernorm(x))
        if layer.is_gated:
            out = layer.gate_ffn.tanh() * out
        return x + out

    def __call__(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, tiles: int
    ) -> torch.Tensor:
        shape = self.shape(tiles)
        v = self.vision
        batch, dim = pixel_values.shape[0], v.hidden_size
        embedded = self._embed(pixel_values, aspect_ratio_ids, shape.encoded)
        pad = embedded.new_zeros(batch, shape.encoded * self.padding, dim)
        x = torch.cat([embedded.reshape(batch, shape.outputs, dim), pad], dim=1)
        taps = []
        for index in range(self.local_layers):
            x = self._layer(index, x, shape.real)
            if index in self.taps:
                taps.append(x[:, : shape.outputs])
        x = v.layernorm_post(x)
        post = v.post_tile_positional_embedding
        tile_emb = post.embedding(aspect_ratio_ids).view(batch, self.max_tiles, 1, dim)
        tile_emb = (tile_emb * post.gate.tanh())[:, : shape.encoded]
        per_token = torch.cat(
            [
                tile_emb.expand(batch, shape.encoded, self.patches, dim).reshape(batch, -1, dim),
                tile_emb.expand(batch, shape.encoded, self.padding, dim).reshape(batch, -1, dim),
            ],
            dim=1,
        )
        x = x + per_token
        for index in range(self.local_layers, len(self.layers)):
            x = self._layer(index, x, shape.real)
        # HF's layout: the last state, then the taps interleaved per channel (stack on dim -1).
        return torch.cat([x[:, : shape.outputs], torch.stack(taps, dim=-1).flatten(-2)], dim=-1)


class VisionGraphs:
    """Runs a :class:`VisionTower` per (tiles, batch) bucket, replaying CUDA graphs on CUDA.

    The graphs are captured at start-up on their own memory pool, so a replay on a side stream
    may overlap decode graphs. The output of a replay is overwritten by the next one.
    """

    def __init__(self, tower: VisionTower, *, use_graphs: bool) -> None:
        self.tower = tower
        self.use_graphs = use_graphs
        self.capture_s = 0.0
        self.attention_timings: list[dict] = []
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._pixels: torch.Tensor | None = None
        self._ratios: torch.Tensor | None = None

    def capture(self, image_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Choose the tower's attention per shape (:meth:`VisionTower.choose_attention`), then
        capture every bucket (all tile counts, every batch size), largest first."""
        self.attention_timings = self.tower.choose_attention(dtype, device)
        if not self.use_graphs:
            return
        start = time.perf_counter()
        tiles = self.tower.max_tiles
        biggest = max(VISION_BATCHES)
        self._pixels = torch.zeros(biggest, tiles, 3, image_size, image_size, dtype=dtype,
                                   device=device)  # fmt: skip
        self._ratios = torch.ones(biggest, dtype=torch.long, device=device)
        keys = [(real, count) for count in reversed(VISION_BATCHES) for real in range(tiles, 0, -1)]

        def run(key: tuple[int, int]) -> torch.Tensor:
            real, count = key
            return self.tower(self._pixels[:count], self._ratios[:count], real)

        with torch.inference_mode():
            self._graphs = capture_graphs(keys, run, device)
        self.capture_s = time.perf_counter() - start
        logger.info(
            "captured %d vision graphs (tiles 1-%d x batches %s) in %.1f s",
            len(self._graphs), tiles, VISION_BATCHES, self.capture_s,
        )  # fmt: skip

    def run(
        self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor, tiles: int
    ) -> torch.Tensor:
        """States [B, encoded * P, vision_output_dim] of B (a VISION_BATCHES size) images of
        ``tiles`` real tiles each."""
        count = pixel_values.shape[0]
        if not self.use_graphs:
            return self.tower(pixel_values, aspect_ratio_ids, tiles)
        assert self._pixels is not None and self._ratios is not None
        self._pixels[:count].copy_(pixel_values, non_blocking=True)
        self._ratios[:count].copy_(aspect_ratio_ids, non_blocking=True)
        graph, out = self._graphs[(tiles, count)]
        graph.replay()
        return out


def batch_sizes(count: int) -> list[int]:
    """Split ``count`` images into VISION_BATCHES sizes, largest first (7 -> 4, 2, 1)."""
    sizes = []
    for size in sorted(VISION_BATCHES, reverse=True):
        while count >= size:
            sizes.append(size)
            count -= size
    return sizes
