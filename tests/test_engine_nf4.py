"""The engine's NF4 path: bitsandbytes' format read bit for bit, fused, and multiplied by
bitsandbytes' own kernels on the fused storage."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from bench.quality import nf4_linear
from worker.engine.fused import fuse_linears
from worker.engine.nf4 import Nf4Linear, adopt_bnb_linears, dequantize_nf4, from_bnb

bnb = pytest.importorskip("bitsandbytes")
functional = pytest.importorskip("bitsandbytes.functional")

# The 11B text model's projections: fused q/k/v, o, fused gate/up, down (out, in).
SHAPES_11B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]


def _bnb_linear(out_features: int, in_features: int, *, blocksize: int = 64, nested: bool = False):
    weight = torch.randn(out_features, in_features, dtype=torch.bfloat16)
    return nf4_linear(weight, blocksize=blocksize, nested=nested)


def _bnb_weight(linear) -> torch.Tensor:
    return functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_dequantize_is_bitsandbytes_bit_for_bit(dtype: torch.dtype, blocksize: int) -> None:
    torch.manual_seed(0)
    weight = torch.randn(24, 512, dtype=dtype) * 3
    packed, state = functional.quantize_4bit(weight, quant_type="nf4", blocksize=blocksize)
    ours = dequantize_nf4(packed.view(24, 256), state.absmax.view(24, -1), state.code, dtype)
    assert torch.equal(ours, functional.dequantize_4bit(packed, state))


def test_bnb_linear_becomes_an_nf4_linear_on_its_storage() -> None:
    torch.manual_seed(0)
    linear = _bnb_linear(16, 256)
    own = from_bnb(linear)
    assert own.blocksize == 64
    assert own.packed.data_ptr() == linear.weight.data.data_ptr()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)
    assert torch.equal(own(x), F.linear(x, _bnb_weight(linear)))


def test_double_quantisation_stays_on_bitsandbytes() -> None:
    parent = torch.nn.Sequential(_bnb_linear(16, 256, nested=True), _bnb_linear(16, 256))
    assert adopt_bnb_linears(parent) == 1
    assert isinstance(parent[0], bnb.nn.Linear4bit) and isinstance(parent[1], Nf4Linear)
    with pytest.raises(ValueError, match="double quantisation"):
        from_bnb(parent[0])


def test_a_failed_probe_leaves_every_linear4bit_as_it_is(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import worker.engine.nf4 as nf4

    monkeypatch.setattr(nf4, "kernel_failure", lambda linear: "it is off by 0.5 at 16 rows")
    parent = torch.nn.Sequential(_bnb_linear(16, 256), _bnb_linear(16, 256))
    assert adopt_bnb_linears(parent) == 0
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in parent)
    assert "unfused: it is off by 0.5" in caplog.text


def test_fused_nf4_is_the_linears_concatenated() -> None:
    torch.manual_seed(0)
    bnbs = [_bnb_linear(rows, 128) for rows in (32, 16, 16)]
    linears = [from_bnb(linear) for linear in bnbs]
    fused = fuse_linears(*linears)
    assert isinstance(fused, Nf4Linear) and fused.out_features == 64
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    reference = F.linear(x, torch.cat([_bnb_weight(linear) for linear in bnbs]))
    assert torch.equal(fused(x), reference)
    assert torch.equal(torch.cat([linear(x) for linear in linears], dim=-1), reference)
    assert linears[1].packed.data_ptr() == fused.packed[32].data_ptr()  # views, not copies


def test_bnb_matmul_on_fused_storage_is_each_linear4bit_concatenated() -> None:
    """What CUDA runs (bitsandbytes' ``matmul_4bit`` on the fused storage), here on bitsandbytes'
    CPU implementation: the same as each ``Linear4bit`` on its own."""
    torch.manual_seed(0)
    bnbs = [_bnb_linear(rows, 128) for rows in (32, 16, 16)]
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        expected = torch.cat([linear(x) for linear in bnbs], dim=-1)
        linears = [from_bnb(linear) for linear in bnbs]
        fused = fuse_linears(*linears)
        assert torch.equal(fused.bnb_matmul(x), expected)
        assert torch.equal(linears[1].bnb_matmul(x), bnbs[1](x))  # a view of the fused storage


def _quantise_text_linears(model) -> dict[str, torch.Tensor]:
    """Swap every Linear of the text decoder for a bitsandbytes NF4 one (quantised on the CPU);
    returns the dequantised weights by module name."""
    weights = {}
    layers = model.model.language_model.layers
    for name, module in list(layers.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        parent, _, attr = name.rpartition(".")
        quantised = bnb.nn.Linear4bit(
            module.in_features, module.out_features, bias=False, compute_dtype=torch.float32
        )
        quantised.weight = bnb.nn.Params4bit(
            module.weight.data,
            requires_grad=False,
            quant_type="nf4",
            blocksize=64,
            compress_statistics=False,
        )
        quantised = quantised.to("cpu")
        setattr(layers.get_submodule(parent), attr, quantised)
        weights[name] = _bnb_weight(quantised)
    return weights


def test_engine_on_bnb_nf4_weights_equals_generate_on_their_dequantised_form(tiny_model_dir):
    """The engine adopts bitsandbytes' modules, fuses them and (on the CPU) decodes with
    dequantise-then-matmul: the same tokens as HF on plain Linears of the dequantised weights."""
    from test_engine_continuous import hf_greedy

    from worker.engine import ContinuousEngine
    from worker.model.generation import GenerationRequest
    from worker.model.loading import load_model

    model, processor = load_model(str(tiny_model_dir), precision="fp32", device="cpu")
    reference_model, _ = load_model(str(tiny_model_dir), precision="fp32", device="cpu")
    for name, weight in _quantise_text_linears(model).items():
        reference_model.model.language_model.layers.get_submodule(name).weight.data = weight

    engine = ContinuousEngine(model, processor, max_slots=2, max_seq_len=96)
    assert isinstance(engine.parts.fused[0].gate_up, Nf4Linear)  # adopted, then fused
    noise = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (40, 56, 3), generator=noise, dtype=torch.uint8).numpy()
    requests = {
        f"r{i}": GenerationRequest(Image.fromarray(pixels), question, tokens)
        for i, (question, tokens) in enumerate([("Describe this image.", 12), ("Count", 6)])
    }
    for key, request in requests.items():
        engine.submit(key, request)
    results = {}
    while engine.has_work():
        results |= {done.key: done for done in engine.step_outputs()}
    for key, request in requests.items():
        expected = hf_greedy(reference_model, processor, request)
        tokens = results[key].token_ids
        assert tokens and tokens == expected[: len(tokens)], key


def test_quality_check_scores_nf4_against_the_weights_it_came_from() -> None:
    """``bench.quality`` (what nf4_check and fp8_check run on the 11B), on the mini model."""
    from bench import model_factory as mf
    from bench.quality import agreement, noise_image, quantize_nf4

    model = mf.build_random_model(mf.build_config("mini"), device="cpu", dtype=torch.float32)
    result = agreement(model, mf.build_processor(), quantize_nf4, steps=4, image=noise_image(0))
    assert result["steps"] == 4
    assert 0 < result["rel_logits_err_mean"] < 1
    assert 0 <= result["top1_agreement"] <= 1
    layer = model.model.language_model.layers[0]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear  # left in the compute dtype, as load_model does
