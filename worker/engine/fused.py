"""Fewer, larger kernels for the decode step: fused projections and fused pointwise work.

A decode step at small batch is bound by kernel count as much as by weight bytes: each of the
40 layers ran ~45 kernels. Concatenating q/k/v and gate/up weights turns five GEMVs into two;
the HF modules keep working on views of the fused tensors, so no weight is stored twice. Plain
Linears fuse into one Linear, the engine's NF4 Linears (``nf4.py``) into one NF4 Linear. The
pointwise work between the GEMMs (residual add + RMSNorm, rotary, SiLU-and-multiply) is written
as plain functions that :func:`pointwise_kernels` compiles into one Triton kernel each on CUDA.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.attention import apply_rope
from worker.engine.nf4 import Nf4Linear, concat_nf4
from worker.model.fp8 import Fp8Linear, concat_fp8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FusedLayer:
    """One decoder layer's fused projections; ``qkv`` is None for cross-attention layers.

    Each is a bias-free Linear: an ``nn.Linear`` over the concatenated weights, or an
    :class:`~worker.model.fp8.Fp8Linear` / :class:`~worker.engine.nf4.Nf4Linear` over the
    concatenated quantized weights and their scales.
    """

    qkv: nn.Module | None  # hidden -> (H + 2 Hkv) * D
    gate_up: nn.Module | None  # hidden -> 2 * intermediate


def fusable(*modules: nn.Module) -> bool:
    """Whether :func:`fuse_linears` fuses these: all plain bias-free Linears, all fp8 or all
    NF4 ones (bitsandbytes' own Linear subclasses are not concatenated)."""
    if all(type(m) is nn.Linear and m.bias is None for m in modules):
        return True
    return any(all(isinstance(m, kind) for m in modules) for kind in (Fp8Linear, Nf4Linear))


def concat_linears(*linears: nn.Linear) -> torch.Tensor:
    """Concatenate the weights along the output dim and re-point each Linear at its rows."""
    fused = torch.cat([lin.weight.data for lin in linears])
    start = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def fuse_linears(*linears: nn.Module) -> nn.Module:
    """One module computing the linears' outputs concatenated; each keeps working on a view
    of the fused weight. All plain bias-free ``nn.Linear``, all fp8 or all NF4 (see
    :func:`fusable`)."""
    if isinstance(linears[0], Fp8Linear):
        return concat_fp8(*linears)
    if isinstance(linears[0], Nf4Linear):
        return concat_nf4(*linears)
    weight = concat_linears(*linears)
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def fuse_layers(layers: list[nn.Module], cross_layers: tuple[int, ...]) -> list[FusedLayer] | None:
    """Fuse every layer's projections in place, or return None if any cannot be (see
    :func:`fusable`: one kind of Linear throughout)."""
    mlps = [(layer.mlp.gate_proj, layer.mlp.up_proj) for layer in layers]
    attns = [
        (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)
        for i, layer in enumerate(layers)
        if i not in cross_layers
    ]
    if not fusable(*(m for group in (*mlps, *attns) for m in group)):
        return None
    probe = torch.linspace(-4.0, 4.0, 17)
    if not all(torch.allclose(layer.mlp.act_fn(probe), F.silu(probe)) for layer in layers):
        return None  # the fused MLP computes silu(gate) * up
    fused = []
    for i, layer in enumerate(layers):
        qkv = None
        if i not in cross_layers:
            attn = layer.self_attn
            qkv = fuse_linears(attn.q_proj, attn.k_proj, attn.v_proj)
        gate_up = fuse_linears(layer.mlp.gate_proj, layer.mlp.up_proj)
        fused.append(FusedLayer(qkv=qkv, gate_up=gate_up))
    return fused


def rms_norm(weight: torch.Tensor, x: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Mllama RMSNorm: fp32 statistics, the weight applied in the input dtype."""
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def add_rms_norm(
    hidden: torch.Tensor,
    delta: torch.Tensor,
    gate: torch.Tensor,
    row_gate: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual update then the next RMSNorm: ``hidden + gate * (row_gate * delta)`` and
    its normed form. HF's order of operations; ``gate`` and ``row_gate`` are ones where the
    layer has none (exact in any dtype)."""
    hidden = hidden + gate * (row_gate * delta)
    return hidden, rms_norm(weight, hidden, eps)


def rotate_qkv(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split a fused q/k/v projection [rows, (H + 2 Hkv) * D] into q [rows, H, D] and k, v
    [rows, Hkv, D], q and k rotated (``cos``/``sin`` [rows, 1, D])."""
    rows = qkv.shape[0]
    dim = cos.shape[-1]
    qk = qkv[:, : (heads + kv_heads) * dim].view(rows, heads + kv_heads, dim)
    qk = apply_rope(qk, cos, sin)
    v = qkv[:, (heads + kv_heads) * dim :].view(rows, kv_heads, dim)
    return qk[:, :heads], qk[:, heads:], v


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of a fused gate/up projection [rows, 2 * intermediate]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@dataclass(frozen=True)
class PointwiseKernels:
    """The decode step's pointwise functions, compiled or as written."""

    add_rms_norm: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    rotate_qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]


EAGER_KERNELS = PointwiseKernels(add_rms_norm, rotate_qkv, silu_and_mul)


def compiled_kernels(device: torch.device, dtype: torch.dtype) -> PointwiseKernels:
    """The pointwise functions compiled by Inductor into one kernel each, or the eager ones
    (with the reason logged) where compiling fails or the device is not CUDA.

    Shapes are dynamic, so one compilation serves every decode bucket. Intermediate roundings
    are emulated, so a compiled kernel gives the same bits as the eager ops it replaces. A
    probe call compiles them here, at start-up, where a missing compiler shows at once.
    """
    if device.type != "cuda":
        return EAGER_KERNELS
    kernels = PointwiseKernels(
        **{
            field.name: torch.compile(getattr(EAGER_KERNELS, field.name), dynamic=True)
            for field in fields(PointwiseKernels)
        }
    )
    try:
        from torch._inductor import config as inductor_config

        inductor_config.emulate_precision_casts = True
        rows, heads, kv_heads, dim = 2, 4, 2, 8
        x = torch.ones(rows, heads * dim, dtype=dtype, device=device)
        one = torch.ones(1, dtype=dtype, device=device)
        kernels.add_rms_norm(x, x, one, one, x[0], 1e-5)
        rope = torch.ones(rows, 1, dim, dtype=dtype, device=device)
        qkv = torch.ones(rows, (heads + 2 * kv_heads) * dim, dtype=dtype, device=device)
        kernels.rotate_qkv(qkv, rope, rope, heads, kv_heads)
        kernels.silu_and_mul(x)
    except Exception as exc:  # any compiler failure means: run eagerly
        logger.warning("decode runs uncompiled pointwise ops: compiling them failed: %s", exc)
        return EAGER_KERNELS
    return kernels
