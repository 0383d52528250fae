"""bitsandbytes' NF4 weights as a Linear of the engine's own: fusable, run by bitsandbytes' kernels.

The format (``Params4bit`` with ``quant_type='nf4'``, no double quantisation): the [out, in]
weight flattened row-major, two 4-bit codes per uint8 byte (high nibble first), quantised in
blocks of ``blocksize`` consecutive elements with one fp32 absmax each; an element is
``code[nibble] * absmax[block]`` computed in fp32, then cast to the compute dtype.
With ``in`` a multiple of the blocksize every block lies within one row, so packed rows (and
their absmax) of several Linears concatenate along the output dim into one fused weight, which
bitsandbytes' ``matmul_4bit`` multiplies as it would one ``Linear4bit``'s (q/k/v and gate/up
then cost one call each). A Triton kernel of our own that dequantised in registers was 2.5-7x
slower than bitsandbytes 0.50's kernels on an H100 at every row count from 1 to 64, and was
dropped (BENCHMARKS.md, issue 12).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)


def dequantize_nf4(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes [out, in / 2] uint8 and absmax [out, in / blocksize] fp32 -> [out, in]
    in ``dtype``, bit for bit what bitsandbytes' ``dequantize_4bit`` gives."""
    out = packed.shape[0]
    nibbles = torch.stack([packed >> 4, packed & 0xF], dim=-1).view(out, -1).long()
    values = code[nibbles].view(out, absmax.shape[1], -1) * absmax[:, :, None]
    return values.view(out, -1).to(dtype)


class Nf4Linear(nn.Module):
    """``y = x @ dequant(W)^T`` (no bias) from NF4 codes: bitsandbytes' ``matmul_4bit`` on CUDA
    (no host sync, so it captures in a CUDA graph), dequantise-then-matmul elsewhere."""

    def __init__(
        self, packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, dtype: torch.dtype
    ) -> None:
        super().__init__()
        out_features, half_in = packed.shape
        if half_in * 2 % absmax.shape[1] or absmax.shape[0] != out_features:
            raise ValueError(
                f"absmax {tuple(absmax.shape)} does not block packed codes {tuple(packed.shape)}"
            )
        self.in_features = half_in * 2
        self.out_features = out_features
        self.blocksize = self.in_features // absmax.shape[1]
        self.dtype = dtype
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", absmax, persistent=False)
        self.register_buffer("code", code, persistent=False)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, blocksize={self.blocksize}"

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] in the compute dtype."""
        return dequantize_nf4(self.packed, self.absmax, self.code, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cuda":
            return self.bnb_matmul(x)
        return F.linear(x, self.dequantized())

    def bnb_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """bitsandbytes' ``matmul_4bit`` on this Linear's storage, as a ``Linear4bit`` holding
        it would run."""
        import bitsandbytes as bnb
        from bitsandbytes.functional import QuantState

        # Built per call: fusion re-points ``packed`` and ``absmax`` at the fused storage.
        state = QuantState(
            absmax=self.absmax.reshape(-1),
            shape=torch.Size([self.out_features, self.in_features]),
            code=self.code,
            blocksize=self.blocksize,
            quant_type="nf4",
            dtype=self.dtype,
        )
        return bnb.matmul_4bit(x, self.packed.reshape(-1, 1).t(), quant_state=state)


def unsupported(module: nn.Module) -> str | None:
    """Why a bitsandbytes ``Linear4bit`` is not in the format :class:`Nf4Linear` reads, or None."""
    state = getattr(module.weight, "quant_state", None)
    if state is None:
        return "no quant_state (not quantised)"
    if module.bias is not None:
        return "a bias"
    if state.quant_type != "nf4":
        return f"quant_type {state.quant_type!r}"
    if state.nested:
        return "double quantisation (bnb_4bit_use_double_quant)"
    if state.shape[1] % state.blocksize:
        return "in_features not a whole number of blocks"
    return None


def from_bnb(module: nn.Module) -> Nf4Linear:
    """An :class:`Nf4Linear` on a bitsandbytes ``Linear4bit``'s own storage; raises
    ValueError where :func:`unsupported` gives a reason."""
    reason = unsupported(module)
    if reason:
        raise ValueError(f"Nf4Linear cannot read this Linear4bit: it has {reason}")
    state = module.weight.quant_state
    out_features, in_features = state.shape
    packed = module.weight.data.view(out_features, in_features // 2)
    absmax = state.absmax.view(out_features, in_features // state.blocksize)
    return Nf4Linear(packed, absmax, state.code, state.dtype)


# The start-up probe's tolerance: max |kernel - reference| / max |reference| (fp32 sums of
# bf16 products in another order differ by far less).
PROBE_TOLERANCE = 1e-2


def kernel_failure(linear: Nf4Linear) -> str | None:
    """Why bitsandbytes' kernels cannot serve ``linear`` from its own storage here, or None:
    they must match dequantise-then-matmul at one row (bitsandbytes' GEMV) and at 16. Only on
    CUDA (elsewhere the Linear runs the reference itself)."""
    if linear.packed.device.type != "cuda":
        return None
    weight = linear.dequantized()
    generator = torch.Generator(device=weight.device).manual_seed(0)
    try:
        for rows in (1, 16):
            x = torch.randn(rows, linear.in_features, generator=generator, device=weight.device).to(
                linear.dtype
            )
            reference = F.linear(x.float(), weight.float())
            error = (linear(x).float() - reference).abs().max() / reference.abs().max()
            if not error <= PROBE_TOLERANCE:
                return f"it is off by {error:.3g} of the output at {rows} rows"
    except Exception as exc:  # a launch failure: the Linear4bit modules stay
        return f"it failed: {exc}"
    return None


def adopt_bnb_linears(root: nn.Module) -> int:
    """Replace every bitsandbytes ``Linear4bit`` under ``root`` that :class:`Nf4Linear` can read
    by one on its storage, logging why any other stays; returns how many were replaced.
    On CUDA a probe (:func:`kernel_failure`) comes first: if it fails, every module stays a
    ``Linear4bit`` (unfused), with the reason logged."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return 0
    targets = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, Linear4bit)
    ]
    eligible = [child for _, _, child in targets if not unsupported(child)]
    failure = kernel_failure(from_bnb(eligible[0])) if eligible else None
    if failure:
        logger.warning("NF4 Linears stay bitsandbytes' modules, unfused: %s", failure)
        return 0
    kept: dict[str, int] = {}
    for parent, name, child in targets:
        reason = unsupported(child)
        if reason:
            kept[reason] = kept.get(reason, 0) + 1
        else:
            setattr(parent, name, from_bnb(child))
    for reason, count in kept.items():
        logger.warning("%d Linear4bit modules stay as they are (unfused): %s", count, reason)
    return len(targets) - sum(kept.values())


def concat_nf4(*linears: Nf4Linear) -> Nf4Linear:
    """One Nf4Linear over the linears' rows concatenated; each is re-pointed at its rows."""
    first = linears[0]
    if any(
        (lin.in_features, lin.blocksize, lin.dtype)
        != (first.in_features, first.blocksize, first.dtype)
        or not torch.equal(lin.code, first.code)
        for lin in linears
    ):
        raise ValueError("only NF4 linears of one input size, blocksize, dtype and code table fuse")
    fused = Nf4Linear(
        torch.cat([lin.packed for lin in linears]),
        torch.cat([lin.absmax for lin in linears]),
        first.code,
        first.dtype,
    )
    start = 0
    for lin in linears:
        rows = lin.out_features
        lin.packed = fused.packed[start : start + rows]
        lin.absmax = fused.absmax[start : start + rows]
        start += rows
    return fused
