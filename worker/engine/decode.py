"""One decode step over the static slot buffers, with the HF modules' own weights.

Rows are slots ``0..rows-1``; inactive rows compute garbage that nothing reads (they sit at
position 0 with a valid mask, so nothing turns NaN). The step only slices and indexes static
buffers with Python ints fixed per (rows, length) bucket, so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.engine.attention import apply_rope, gqa_attention
from worker.engine.fused import mlp, rms_norm
from worker.engine.parts import MllamaParts
from worker.engine.slots import SlotCache


class DecodeStep:
    """Callable ``(rows, length) -> logits [rows, V]`` for the next token of slots ``0..rows-1``.

    ``length`` bounds the self-attention span: every active row's position must be below it.
    Reads ``cache.tokens`` / ``cache.positions`` and writes the new self K/V at each position.
    """

    def __init__(
        self, parts: MllamaParts, cache: SlotCache, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        self.parts = parts
        self.cache = cache
        self.cos, self.sin = rope

    def __call__(self, rows: int, length: int) -> torch.Tensor:
        parts, cache, g = self.parts, self.cache, self.parts.geometry
        positions = cache.positions[:rows]
        slot_rows = cache.rows[:rows]
        # [rows, 1, D]: broadcast over heads of q [rows, H, D] / k [rows, Hkv, D].
        cos = self.cos[positions][:, None]
        sin = self.sin[positions][:, None]
        self_mask = (cache.key_positions[:length][None, :] <= positions[:, None])[:, None]
        cross_mask = cache.cross_mask[:rows][:, None]
        row_gate = cache.row_gate[:rows]

        hidden = parts.embed_tokens(cache.tokens[:rows])  # [rows, hidden]
        heads, kv_heads, dim = g.num_heads, g.num_kv_heads, g.head_dim
        for layer_index, (layer, fused) in enumerate(zip(parts.layers, parts.fused, strict=True)):
            x = rms_norm(layer.input_layernorm, hidden)
            if layer_index in g.cross_layers:
                cross = g.cross_layers.index(layer_index)
                attn = layer.cross_attn
                q = attn.q_norm(attn.q_proj(x).view(rows, heads, dim))
                k = cache.cross_k[cross, :rows].transpose(1, 2)
                v = cache.cross_v[cross, :rows].transpose(1, 2)
                out = gqa_attention(q[:, :, None], k, v, cross_mask, attn.scaling)
                hidden = hidden + layer.cross_attn_attn_gate.tanh() * attn.o_proj(out[:, 0])
                x = rms_norm(layer.post_attention_layernorm, hidden)
                hidden = hidden + layer.cross_attn_mlp_gate.tanh() * (
                    mlp(layer.mlp, fused.gate_up, x) * row_gate
                )
            else:
                index = g.self_layers.index(layer_index)
                attn = layer.self_attn
                if fused.qkv is not None:
                    qkv = F.linear(x, fused.qkv)
                else:
                    qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
                # q and k rotate together: one rotary pass over H + Hkv heads.
                qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
                qk = apply_rope(qk, cos, sin)
                q, k = qk[:, :heads], qk[:, heads:]
                v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
                cache.self_k[index].index_put_((slot_rows, positions), k)
                cache.self_v[index].index_put_((slot_rows, positions), v)
                keys = cache.self_k[index, :rows, :length].transpose(1, 2)
                values = cache.self_v[index, :rows, :length].transpose(1, 2)
                out = gqa_attention(q[:, :, None], keys, values, self_mask, attn.scaling)
                hidden = hidden + attn.o_proj(out[:, 0])
                x = rms_norm(layer.post_attention_layernorm, hidden)
                hidden = hidden + mlp(layer.mlp, fused.gate_up, x)
        return parts.lm_head(rms_norm(parts.norm, hidden))
