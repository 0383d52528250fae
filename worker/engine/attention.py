"""Attention arithmetic shared by prefill and decode: rotary embedding and masked GQA."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as HF applies it; ``cos``/``sin`` broadcast against ``x``."""
    return (x * cos) + (rotate_half(x) * sin)


def gqa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Masked attention with grouped KV heads, without repeating K/V.

    q [B, H, T, D]; k, v [B, Hkv, S, D] (any strides with a contiguous last dim); mask [B, T, S]
    bool (True = attend, at least one True per row) or an additive bias in q's dtype (0 or
    -inf). Returns [B, T, H * D].

    Query heads h = kv_head * group + g (HF's ``repeat_kv`` order), so the group of query heads of
    one KV head becomes extra query rows: q as [B, Hkv, group * T, D].
    """
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    q = q.reshape(batch, kv_heads, group * length, dim)
    if length == 1 or group == 1:
        mask = mask[:, None]  # broadcasts over the query rows
    else:
        mask = mask[:, None].expand(batch, group, length, mask.shape[-1])
        mask = mask.reshape(batch, 1, group * length, mask.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # [B, Hkv, group*T, D] -> [B, H, T, D] -> [B, T, H*D]
    out = out.reshape(batch, heads, length, dim).transpose(1, 2)
    return out.reshape(batch, length, heads * dim)
