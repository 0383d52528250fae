"""fp8 (e4m3) weights with per-output-channel scales, quantised at load from bf16 weights.

:class:`Fp8Linear` replaces the language model's ``nn.Linear`` layers; its forward quantises
each activation row with a scale of its own and runs one tensor-core GEMM, ``torch._scaled_mm``
with rowwise scales (fp32 ``[rows, 1]`` for the activation, ``[1, out]`` for the weight). On
CUDA the activation quantisation (amax, scale, cast) is one Triton kernel. Nothing in the
forward syncs with the host or branches on values, so it runs inside the engine's CUDA graphs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from producer.errors import ConfigurationError
from worker.model.fp8_tiles import ALL_GEMV_TILES, ALL_MATMUL_TILES

logger = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
#: Modules every quantized precision leaves in the compute dtype: the vision side, lm_head.
SKIP_MODULES = ("model.vision_model", "model.multi_modal_projector", "lm_head")
#: fp8 tensor cores: Ada (sm_89) and Hopper (sm_90) onwards.
MIN_CAPABILITY = (8, 9)
# A zero row would give a zero scale and 0/0 in the cast.
_MIN_AMAX = 1e-12


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [rows, k] as e4m3 with one fp32 scale per row [rows, 1]: ``x ~= q * scale``."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=_MIN_AMAX)
    scale = amax / FP8_MAX
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize_rows` of an activation: one Triton kernel on CUDA where its probe passed
    (:func:`quantiser_serves`), torch ops elsewhere."""
    if x.device.type != "cuda" or not quantiser_serves(x.device):
        return quantize_rows(x)
    from worker.model.fp8_kernel import quantize_rows_kernel  # Triton: CUDA hosts only

    return quantize_rows_kernel(x, FP8, FP8_MAX, _MIN_AMAX)


@functools.cache
def quantiser_serves(device: torch.device) -> bool:
    """Whether the Triton quantiser compiles on ``device`` and agrees with
    :func:`quantize_rows` (scales equal, codes within one e4m3 step); probed once, at load."""
    x = torch.linspace(-3.0, 5.0, 3 * 640, device=device).view(3, 640).bfloat16()
    try:
        from worker.model.fp8_kernel import quantize_rows_kernel

        q, scale = quantize_rows_kernel(x, FP8, FP8_MAX, _MIN_AMAX)
        q_ref, scale_ref = quantize_rows(x)
        step = q_ref.float().abs() * 2**-3 + 2**-9
        agrees = torch.allclose(scale, scale_ref) and bool(
            ((q.float() - q_ref.float()).abs() <= step).all()
        )
    except Exception as exc:  # a compiler or launch failure: quantise with torch ops instead
        logger.warning("fp8 activations are quantised by torch ops: the kernel failed: %s", exc)
        return False
    if not agrees:
        logger.warning("fp8 activations are quantised by torch ops: the kernel disagreed")
    return agrees


# The probe's tolerance for the GEMV and GEMM: max |kernel - reference| / max |reference|, the
# reference being fp32 sums of the same e4m3 values (only the summation order differs).
PROBE_TOLERANCE = 1e-2


@functools.cache
def matmul_kernels_serve(device: torch.device) -> bool:
    """Whether the Triton GEMV and GEMM compile on ``device`` at every tile shape they may
    launch (a card with less shared memory may refuse some) and agree with
    dequantise-then-matmul; probed once, at load, after :func:`quantiser_serves`."""
    if not quantiser_serves(device):
        return False
    generator = torch.Generator(device=device).manual_seed(0)
    weight, w_scale = quantize_rows(
        torch.randn(256, 2048, generator=generator, device=device).bfloat16()
    )
    w_scale = w_scale.t().contiguous()
    dequantized = weight.float() * w_scale.t()
    x = torch.randn(64, 2048, generator=generator, device=device).bfloat16()
    q, q_scale = quantize_rows(x)  # per row: the GEMV quantises x[:1] to q[:1] itself
    reference = (q.float() * q_scale) @ dequantized.t()
    try:
        from worker.model import fp8_kernel as kernel

        products = [
            (kernel.fp8_gemv(x[:1], weight, w_scale, tiles, FP8_MAX, _MIN_AMAX), reference[:1])
            for tiles in ALL_GEMV_TILES
        ] + [
            (kernel.fp8_matmul(q[:rows], q_scale[:rows], weight, w_scale, tiles), reference[:rows])
            for tiles in ALL_MATMUL_TILES
            for rows in (5, 20, 64)  # each row tile (16, 32, 64), at the stages that fit
        ]
        errors = [
            ((out.float() - ref).abs().max() / ref.abs().max()).item() for out, ref in products
        ]
    except Exception as exc:  # a compiler or launch failure: cuBLASLt's GEMMs instead
        logger.warning("fp8 Linears run cuBLASLt's GEMMs: a Triton GEMV or GEMM failed: %s", exc)
        return False
    if max(errors) > PROBE_TOLERANCE:
        logger.warning("fp8 Linears run cuBLASLt's GEMMs: the Triton ones disagreed: %s", errors)
        return False
    return True


class Fp8Linear(nn.Module):
    """A bias-free Linear with e4m3 weights [out, in] and fp32 scales [1, out]; bf16 out."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor) -> None:
        super().__init__()
        if weight.dtype != FP8 or scale.shape != (1, weight.shape[0]):
            raise ValueError("Fp8Linear takes an e4m3 weight [out, in] and its scale [1, out]")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """``linear``'s weight quantised with one scale per output channel."""
        if linear.bias is not None:
            raise ValueError("Fp8Linear has no bias; Mllama's language model Linears have none")
        weight, scale = quantize_rows(linear.weight.detach())
        return cls(weight, scale.t().contiguous())

    def dequantized(self) -> torch.Tensor:
        """The weight as fp32 [out, in], for references and tests."""
        return self.weight.float() * self.scale.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        if rows.device.type == "cuda" and matmul_kernels_serve(rows.device):
            from worker.model.fp8_kernel import linear  # Triton: CUDA hosts only

            out = linear(rows, self.weight, self.scale, FP8, FP8_MAX, _MIN_AMAX)
            if out is not None:
                return out.view(*x.shape[:-1], self.out_features)
        q, scale = quantize_activation(rows)
        # weight.t() of a row-major [out, in] is the column-major [in, out] _scaled_mm wants.
        out = torch._scaled_mm(
            q, self.weight.t(), scale_a=scale, scale_b=self.scale, out_dtype=torch.bfloat16
        )
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, e4m3"


def concat_fp8(*linears: Fp8Linear) -> Fp8Linear:
    """One Fp8Linear computing ``linears`` side by side; each is re-pointed at its rows of the
    fused weight and scale, so nothing is stored twice."""
    weight = torch.cat([lin.weight for lin in linears])
    scale = torch.cat([lin.scale for lin in linears], dim=1)
    start = 0
    for lin in linears:
        end = start + lin.out_features
        lin.weight, lin.scale = weight[start:end], scale[:, start:end]
        start = end
    return Fp8Linear(weight, scale)


def replace_linears(model: nn.Module, convert: Callable[[nn.Linear], nn.Module]) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` outside :data:`SKIP_MODULES` by
    ``convert(linear)``, in place, one at a time (each old weight freed as it goes); returns
    their names."""
    targets = [
        name
        for name, module in model.named_modules()
        if type(module) is nn.Linear and not name.startswith(SKIP_MODULES)
    ]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, convert(getattr(parent, child)))
    return targets


def quantize_language_model(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` of ``model`` outside :data:`SKIP_MODULES` by an
    :class:`Fp8Linear`, in place, freeing each bf16 weight as it goes; returns how many."""
    targets = replace_linears(model, Fp8Linear.from_linear)
    devices = {model.get_submodule(name).weight.device for name in targets}
    for device in devices:
        if device.type == "cuda":
            matmul_kernels_serve(device)  # probed at load, not inside a CUDA graph capture
    return len(targets)


def check_fp8_device(device: str) -> None:
    """ConfigurationError, saying what to use instead, unless ``device`` has fp8 tensor cores."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        raise ConfigurationError(
            f"Precision 'fp8' needs a CUDA GPU with fp8 tensor cores (Ada or Hopper); {device!r} "
            "is none here: set a CUDA device, or use precision 'bf16' or 'fp32' on the CPU."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        raise ConfigurationError(
            f"Precision 'fp8' needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper); "
            f"{name} has {capability[0]}.{capability[1]}: use precision 'bf16', or 'nf4' for "
            "a smaller memory footprint."
        )
