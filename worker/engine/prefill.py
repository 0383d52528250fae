"""Text prefill of newly admitted requests (their cross K/V already in their slots), batched.

Prompts are right-padded, so every row's positions start at 0 and its real tokens land at cache
indices 0..n-1 of its slot, the same as HF's unpadded single-request run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from worker.engine.attention import apply_rope, gqa_attention
from worker.engine.inputs import to_device
from worker.engine.parts import MllamaParts
from worker.engine.slots import SlotCache


def cross_masks(
    rows: torch.Tensor, unseen: torch.Tensor, num_patches: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """The processor's per-token tile rows [..., tiles] as an attention mask [..., tiles*P] and
    HF's full-text-row gate [..., 1].

    HF quirk kept on purpose: a token that sees no tile (before the image) gets an all-zero
    additive mask, so it attends to every vision token, padding tiles included; only its
    cross-attention MLP output is zeroed by the gate. ``unseen`` [..., tiles] (broadcast) says
    which tiles such a token attends to: all of them as HF does, or the real ones only where
    padding tiles were never encoded.
    """
    sees_any = rows.any(dim=-1, keepdim=True)
    visible = torch.where(sees_any, rows, unseen)
    return visible.repeat_interleave(num_patches, dim=-1), sees_any.to(dtype)


def prefill_text(
    parts: MllamaParts,
    cache: SlotCache,
    rope: tuple[torch.Tensor, torch.Tensor],
    slots: torch.Tensor,
    prompts: Sequence[Sequence[int]],
    cross_rows: Sequence[torch.Tensor],
    unseen: torch.Tensor,
) -> torch.Tensor:
    """Run the prompts through the decoder, writing their self K/V into ``slots``.

    Cross K/V must already be in the slots; ``unseen`` [A, tiles] as in :func:`cross_masks`.
    Returns the logits of each prompt's last token [A, V].
    """
    g = parts.geometry
    device = parts.device
    count = len(prompts)
    lengths_list = [len(p) for p in prompts]
    width = max(lengths_list)

    input_ids = torch.zeros(count, width, dtype=torch.long)
    rows = torch.zeros(count, width, g.max_tiles, dtype=torch.bool)
    for i, (prompt, row) in enumerate(zip(prompts, cross_rows, strict=True)):
        input_ids[i, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
        rows[i, : len(prompt)] = row
    input_ids = to_device(input_ids, device)
    rows = to_device(rows, device)
    lengths = to_device(torch.tensor(lengths_list), device)

    positions = torch.arange(width, device=device)
    real = positions[None, :] < lengths[:, None]  # [A, T]
    self_mask = (positions[None, :] <= positions[:, None])[None] & real[:, None, :]
    cross_mask, row_gate = cross_masks(
        rows, to_device(unseen, device)[:, None], g.num_patches, parts.dtype
    )
    cos, sin = rope[0][:width], rope[1][:width]
    # Every row writes all ``width`` positions of its slot (no data-dependent indexing, so no
    # host sync): K/V past a prompt's end are masked in decode until decode overwrites them.
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

    last = hidden[torch.arange(count, device=device), lengths - 1]
    return parts.lm_head(parts.norm(last))
