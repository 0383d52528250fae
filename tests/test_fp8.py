"""fp8 (e4m3) weights: quantisation, the Linear against a dequantise-then-matmul reference, the
fused projections, the tiny model through the engine, and the refusals. CPU in CI: torch's CPU
``_scaled_mm`` takes e4m3 with rowwise scales (torch 2.13; 2.11's takes per-tensor scales only).
``VLMQ_TEST_DEVICE=cuda`` runs the Linear and tiny model checks on a GPU, through the Triton
quantiser, GEMV and GEMM, the engine's CUDA graphs and compiled kernels; ``bench.fp8_check`` times
the full-size GEMMs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from test_engine_continuous import DEVICE, drain, hf_greedy, make_requests
from torch import nn

from producer.errors import ConfigurationError
from worker.engine import ContinuousEngine
from worker.engine.inputs import prompt_text
from worker.model.fp8 import (
    FP8,
    Fp8Linear,
    check_fp8_device,
    concat_fp8,
    quantize_language_model,
    quantize_rows,
)
from worker.settings import WorkerSettings


def linear(out_features: int, in_features: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_features, out_features, bias=False, dtype=torch.bfloat16, device=DEVICE)
    # Channels of very different magnitudes, as real weights have: per-channel scales matter.
    with torch.no_grad():
        scales = torch.logspace(-2, 1, out_features, dtype=torch.bfloat16, device=DEVICE)
        lin.weight.mul_(scales[:, None])
    return lin


def activations(rows: int, features: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(rows, features) * torch.logspace(-1, 2, rows)[:, None]
    return x.bfloat16().to(DEVICE)


def test_quantize_rows_round_trip_within_e4m3_rounding() -> None:
    x = activations(16, 256, seed=0).float().cpu()
    x[3] = 0.0  # a zero row must not divide by zero
    q, scale = quantize_rows(x)
    assert q.dtype == FP8 and scale.shape == (16, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 relative for normals; subnormals are
    # spaced 2^-9 (in units of the scale).
    bound = x.abs() * 2**-4 + scale * 2**-9
    assert torch.all((back - x).abs() <= bound)
    assert torch.equal(back[3], x[3])
    # Each row's largest value is represented exactly (it maps to 448).
    assert torch.allclose(back.abs().amax(-1), x.abs().amax(-1))


def test_fp8_linear_matches_dequantize_then_matmul() -> None:
    lin = linear(96, 256, seed=1)
    fp8 = Fp8Linear.from_linear(lin)
    x = activations(7, 256, seed=2)
    out = fp8(x)
    assert out.dtype == torch.bfloat16 and out.shape == (7, 96)

    q, scale = quantize_rows(x)
    reference = (q.float() * scale) @ fp8.dequantized().t()
    # Same products summed in fp32; the output's bf16 rounding (and the summation order) set
    # the difference: half a bf16 ulp of each value, plus a little of the row's largest.
    atol = 1e-3 * reference.abs().amax(-1, keepdim=True)
    assert torch.all((out.float() - reference).abs() <= reference.abs() * 2**-8 + atol)
    # Against the bf16 Linear itself: fp8 rounding of both operands, a few percent.
    exact = lin(x).float()
    assert ((out.float() - exact).norm() / exact.norm()).item() < 0.06


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton quantiser runs on CUDA")
def test_activation_kernel_equals_quantize_rows() -> None:
    from worker.model.fp8 import quantize_activation

    for cols in (64, 4096, 14336):  # a block per row, up to the MLP's width
        x = activations(9, cols, seed=cols)
        x[2] = 0.0
        q, scale = quantize_activation(x)
        q_ref, scale_ref = quantize_rows(x)
        torch.testing.assert_close(scale, scale_ref, rtol=1e-6, atol=0)
        # Triton's fp32 division may differ from torch's in the last bit: one e4m3 step at most.
        step = q_ref.float().abs() * 2**-3 + 2**-9
        assert torch.all((q.float() - q_ref.float()).abs() <= step)


@pytest.mark.skipif(DEVICE != "cuda", reason="the Triton GEMV and GEMM run on CUDA")
def test_kernels_match_their_references_at_every_row_count() -> None:
    from worker.model.fp8 import matmul_kernels_serve

    assert matmul_kernels_serve(torch.device(DEVICE))
    lin = linear(96, 256, seed=6)
    fp8 = Fp8Linear.from_linear(lin)
    for rows in (1, 2, 16, 64, 65):  # the GEMV, the GEMM, and cuBLASLt past 64 rows
        x = activations(rows, 256, seed=rows)
        q, scale = quantize_rows(x)
        reference = (q.float() * scale) @ fp8.dequantized().t()
        out = fp8(x).float()
        atol = 1e-3 * reference.abs().amax(-1, keepdim=True)
        assert torch.all((out - reference).abs() <= reference.abs() * 2**-8 + atol), rows


def test_tiles_fit_the_weight_and_the_shared_memory() -> None:
    from worker.model.fp8_tiles import MATMUL, MATMUL_WIDE, Tiles, fit, stages_that_fit

    assert fit(MATMUL, 6144, 4096) == MATMUL
    assert fit(MATMUL, 96, 256) == Tiles(32, 256, 4, 5)  # shrunk to divide 96 outputs
    assert fit(MATMUL, 6144, 48) is None  # a 16-wide K block: below fp8 tensor cores' 32
    hopper, ada = 232448, 101376  # bytes a block may use (Triton's limit)
    # (256 x (64 + 64)) bytes a stage at 64 rows: Hopper holds MATMUL's 5, Ada 3.
    assert stages_that_fit(MATMUL, 64, hopper) == 5
    assert stages_that_fit(MATMUL, 64, ada) == 3
    assert stages_that_fit(MATMUL, 16, ada) == 4  # 20 KiB a stage at 16 rows (counting all 5)
    assert stages_that_fit(MATMUL_WIDE, 64, ada) == MATMUL_WIDE.stages


def test_fp8_linear_keeps_leading_dims() -> None:
    fp8 = Fp8Linear.from_linear(linear(32, 64, seed=3))
    x = activations(6, 64, seed=4).view(2, 3, 64)
    torch.testing.assert_close(fp8(x), fp8(x.reshape(6, 64)).view(2, 3, 32))


def test_fused_fp8_linear_equals_the_separate_ones_and_shares_their_weights() -> None:
    parts = [Fp8Linear.from_linear(linear(n, 128, seed=n)) for n in (64, 32, 32)]
    x = activations(5, 128, seed=5)
    separate = torch.cat([p(x) for p in parts], dim=-1)
    fused = concat_fp8(*parts)
    assert (fused.out_features, fused.in_features) == (128, 128)
    torch.testing.assert_close(fused(x), separate, rtol=2**-7, atol=1e-3)
    # The parts are views of the fused tensors and still compute what they did.
    assert parts[1].weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(torch.cat([p(x) for p in parts], dim=-1), separate)


@pytest.fixture(scope="module")
def models(tiny_model_dir: Path):
    """The tiny model in bf16 and a copy with its language model quantised to fp8 (the
    quantisation called directly: ``load_model`` refuses fp8 on the CPU)."""
    from worker.model.loading import load_model

    bf16, processor = load_model(str(tiny_model_dir), precision="bf16", device=DEVICE)
    fp8 = copy.deepcopy(bf16)
    quantize_language_model(fp8)
    return bf16, fp8, processor


def test_only_the_language_model_is_quantized(models) -> None:
    bf16, fp8, _ = models
    quantized = [name for name, m in fp8.named_modules() if isinstance(m, Fp8Linear)]
    plain = [name for name, m in bf16.named_modules() if type(m) is nn.Linear]
    assert quantized == [n for n in plain if n.startswith("model.language_model.")]
    assert type(fp8.lm_head) is nn.Linear and fp8.lm_head.weight.dtype == torch.bfloat16


def test_fp8_logits_close_to_bf16(models) -> None:
    bf16, fp8, processor = models
    request = next(iter(make_requests(1, seed=0).values()))
    inputs = processor(
        images=[[request.image]],
        text=[prompt_text(processor, request.question)],
        add_special_tokens=False,
        return_tensors="pt",
    ).to(DEVICE)
    with torch.inference_mode():
        a, b = bf16(**inputs).logits.float()[0], fp8(**inputs).logits.float()[0]
    rel = ((a - b).norm(dim=-1) / a.norm(dim=-1)).max().item()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    # The tiny random model has many near-ties; measured 0.05 and 0.9 at this seed.
    assert rel < 0.1 and agree >= 0.8, (rel, agree)


def test_engine_runs_fp8_with_fused_projections(models) -> None:
    _, fp8, processor = models
    engine = ContinuousEngine(fp8, processor, max_slots=4, max_seq_len=128)
    assert all(isinstance(f.gate_up, Fp8Linear) for f in engine.parts.fused)
    requests = make_requests(4, seed=0)
    for key, request in requests.items():
        engine.submit(key, request)
    results = drain(engine)

    same = total = 0
    for key, request in requests.items():
        assert results[key].error is None
        reference = hf_greedy(fp8, processor, request)
        tokens = results[key].token_ids
        same += sum(a == b for a, b in zip(tokens, reference, strict=False))
        total += len(reference)
    # The fused GEMMs round differently from HF's separate ones, so a near-tie of the tiny
    # random model may flip a token and the rest of that answer; measured 66 of 67 equal.
    assert same >= 0.9 * total, (same, total)


def test_fp8_is_refused_off_cuda(tiny_model_dir: Path) -> None:
    from worker.model.loading import load_model

    with pytest.raises(ConfigurationError, match=r"'fp8' needs a CUDA GPU .* use precision"):
        check_fp8_device("cpu")
    with pytest.raises(ConfigurationError, match="fp8"):
        load_model(str(tiny_model_dir), precision="fp8", device="cpu")
    env = {"VLMQ_MODEL": "m", "VLMQ_PRECISION": "fp8", "VLMQ_DEVICE": "cpu"}
    with pytest.raises(ConfigurationError, match="fp8 tensor cores; use VLMQ_DEVICE=cuda"):
        WorkerSettings.from_env(env)


def test_fp8_is_refused_on_cards_without_fp8(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(ConfigurationError, match=r"A100 has 8\.0: use precision 'bf16'"):
        check_fp8_device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_device("cuda")
