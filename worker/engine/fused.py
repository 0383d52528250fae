"""Fewer, larger kernels for the decode step: fused projections and one-kernel RMSNorm.

A decode step at small batch is bound by kernel count as much as by weight bytes: each of the
40 layers ran ~45 kernels. Concatenating q/k/v and gate/up weights turns five GEMVs into two;
the HF modules keep working on views of the fused tensors, so no weight is stored twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's fused weights; ``qkv`` is None for cross-attention layers."""

    qkv: torch.Tensor | None  # [(H + 2 Hkv) * D, hidden]
    gate_up: torch.Tensor | None  # [2 * intermediate, hidden]


def _plain(*modules: nn.Module) -> bool:
    # Quantized Linear subclasses (bitsandbytes) pack their weights: nothing to concatenate.
    return all(type(m) is nn.Linear and m.bias is None for m in modules)


def _fuse(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate the weights along the output dim and re-point each Linear at its rows."""
    fused = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def fuse_layers(layers: list[nn.Module], cross_layers: tuple[int, ...]) -> list[FusedLayer] | None:
    """Fuse every layer's projections in place, or return None if any is not a plain Linear."""
    mlps = [(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers]
    attns = [
        (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        for i, layer in enumerate(layers)
        if i not in cross_layers
    ]
    if not all(_plain(*group) for group in (*mlps, *attns)):
        return None
    fused = []
    for i, layer in enumerate(layers):
        qkv = None
        if i not in cross_layers:
            attn = layer.self_attn
            qkv = _fuse(attn.q_proj, attn.k_proj, attn.v_proj)
        fused.append(FusedLayer(qkv=qkv, gate_up=_fuse(layer.mlp.gate_proj, layer.mlp.up_proj)))
    return fused


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """HF's Mllama RMSNorm (fp32 statistics, weight applied in the input dtype), one kernel."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    return norm.weight * normed.to(x.dtype)


def mlp(layer_mlp: nn.Module, gate_up: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The gated MLP, with gate and up in one GEMM when fused."""
    if gate_up is None:
        return layer_mlp(x)
    gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
    return layer_mlp.down_proj(layer_mlp.act_fn(gate) * up)
