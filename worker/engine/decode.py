"""One decode step over the static slot buffers, with the HF modules' own weights.

Rows are slots ``0..rows-1``; inactive rows compute garbage that nothing reads (they sit at
position 0 with a valid mask, so nothing turns NaN). The step only slices and indexes static
buffers with Python ints fixed per (rows, length) bucket, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from worker.engine.attention import gqa_attention
from worker.engine.fused import EAGER_KERNELS, PointwiseKernels, compiled_kernels, rms_norm
from worker.engine.parts import MllamaParts
from worker.engine.slots import SlotCache


def _aligned_width(width: int) -> int:
    # SDPA's memory-efficient kernel copies an attention bias whose strides are not multiples of
    # 8 on every call; a padded buffer avoids that copy in each of the 40 layers.
    return -(-width // 8) * 8


class DecodeStep:
    """Callable ``(rows, length) -> logits [rows, V]`` for the next token of slots ``0..rows-1``.

    ``length`` bounds the self-attention span: every active row's position must be below it.
    Reads ``cache.tokens`` / ``cache.positions`` and writes the new self K/V at each position.
    ``compiled`` fuses the pointwise work between the GEMMs where it can (see ``fused.py``).
    """

    def __init__(
        self,
        parts: MllamaParts,
        cache: SlotCache,
        rope: tuple[torch.Tensor, torch.Tensor],
        *,
        compiled: bool = False,
    ) -> None:
        self.parts = parts
        self.cache = cache
        self.cos, self.sin = rope
        g = parts.geometry
        dtype, device = parts.dtype, parts.device
        self.kernels: PointwiseKernels = (
            compiled_kernels(device, dtype) if compiled else EAGER_KERNELS
        )
        # tanh of the cross-attention gates, once: they are constants at inference.
        self.attn_gates = {
            i: parts.layers[i].cross_attn_attn_gate.detach().tanh() for i in g.cross_layers
        }
        self.mlp_gates = {
            i: parts.layers[i].cross_attn_mlp_gate.detach().tanh() for i in g.cross_layers
        }
        self.one = torch.ones(1, dtype=dtype, device=device)
        self.ones = torch.ones(cache.max_slots, 1, dtype=dtype, device=device)
        # Additive attention biases, rebuilt once per step for all layers.
        slots = cache.max_slots
        self.self_bias = torch.zeros(
            slots, _aligned_width(cache.max_seq_len), dtype=dtype, device=device
        )
        self.cross_bias = torch.zeros(
            slots, _aligned_width(g.cross_len), dtype=dtype, device=device
        )

    @staticmethod
    def _bias(buffer: torch.Tensor, attend: torch.Tensor) -> torch.Tensor:
        """``attend`` [rows, S] bool as an additive bias [rows, 1, S] in ``buffer``'s rows."""
        rows, span = attend.shape
        view = buffer[:rows, :span]
        view.zero_()
        view.masked_fill_(~attend, float("-inf"))
        width = buffer.stride(0)
        return buffer.as_strided((rows, 1, span), (width, width, 1))

    def __call__(self, rows: int, length: int) -> torch.Tensor:
        parts, cache, g, kernels = self.parts, self.cache, self.parts.geometry, self.kernels
        positions = cache.positions[:rows]
        slot_rows = cache.rows[:rows]
        # [rows, 1, D]: broadcast over heads of q [rows, H, D] / k [rows, Hkv, D].
        cos = self.cos[positions][:, None]
        sin = self.sin[positions][:, None]
        self_bias = self._bias(
            self.self_bias, cache.key_positions[:length][None, :] <= positions[:, None]
        )
        cross_bias = self._bias(self.cross_bias, cache.cross_mask[:rows])
        row_gate = cache.row_gate[:rows]
        ones = self.ones[:rows]

        hidden = parts.embed_tokens(cache.tokens[:rows])  # [rows, hidden]
        first = parts.layers[0].input_layernorm
        x = rms_norm(first.weight, hidden, first.variance_epsilon)
        heads, kv_heads, dim = g.num_heads, g.num_kv_heads, g.head_dim
        for layer_index, (layer, fused) in enumerate(zip(parts.layers, parts.fused, strict=True)):
            post = layer.post_attention_layernorm
            after = (
                parts.layers[layer_index + 1].input_layernorm
                if layer_index + 1 < g.num_layers
                else parts.norm
            )
            if layer_index in g.cross_layers:
                cross = g.cross_layers.index(layer_index)
                attn = layer.cross_attn
                q = attn.q_norm(attn.q_proj(x).view(rows, heads, dim))
                k = cache.cross_k[cross, :rows].transpose(1, 2)
                v = cache.cross_v[cross, :rows].transpose(1, 2)
                out = gqa_attention(q[:, :, None], k, v, cross_bias, attn.scaling)
                attn_gate = self.attn_gates[layer_index]
                mlp_gate, mlp_rows = self.mlp_gates[layer_index], row_gate
            else:
                index = g.self_layers.index(layer_index)
                attn = layer.self_attn
                if fused.qkv is not None:
                    qkv = fused.qkv(x)
                else:
                    qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
                q, k, v = kernels.rotate_qkv(qkv, cos, sin, heads, kv_heads)
                cache.self_k[index].index_put_((slot_rows, positions), k)
                cache.self_v[index].index_put_((slot_rows, positions), v)
                keys = cache.self_k[index, :rows, :length].transpose(1, 2)
                values = cache.self_v[index, :rows, :length].transpose(1, 2)
                out = gqa_attention(q[:, :, None], keys, values, self_bias, attn.scaling)
                attn_gate, mlp_gate, mlp_rows = self.one, self.one, ones
            hidden, x = kernels.add_rms_norm(
                hidden, attn.o_proj(out[:, 0]), attn_gate, ones, post.weight, post.variance_epsilon
            )
            if fused.gate_up is not None:
                mlp = layer.mlp.down_proj(kernels.silu_and_mul(fused.gate_up(x)))
            else:
                mlp = layer.mlp(x)
            hidden, x = kernels.add_rms_norm(
                hidden, mlp, mlp_gate, mlp_rows, after.weight, after.variance_epsilon
            )
        return parts.lm_head(x)
