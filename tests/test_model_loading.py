"""load_model: the one loading path, on the tiny model, and its refusals."""

import importlib.util
from pathlib import Path

import pytest
import torch

from producer.errors import ConfigurationError
from worker.model.loading import load_model

NO_CUDA = not torch.cuda.is_available()


def test_tiny_model_loads_back_in_fp32_on_cpu(tiny_model_dir: Path) -> None:
    model, processor = load_model(str(tiny_model_dir), precision="fp32", device="cpu")

    assert type(model).__name__ == "MllamaForConditionalGeneration"
    assert model.dtype == torch.float32
    assert model.device.type == "cpu"
    assert not model.training
    assert model.config._attn_implementation == "sdpa"
    assert type(processor).__name__ == "MllamaProcessor"
    assert processor.tokenizer.padding_side == "left"


def test_bf16_casts_the_weights(tiny_model_dir: Path) -> None:
    model, _ = load_model(str(tiny_model_dir), precision="bf16", device="cpu")

    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("precision", ["fp4", "BF16", ""])
def test_unknown_precision_is_refused(tiny_model_dir: Path, precision: str) -> None:
    with pytest.raises(ConfigurationError, match="precision"):
        load_model(str(tiny_model_dir), precision=precision, device="cpu")


def test_bitsandbytes_needs_cuda(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="CUDA"):
        load_model(str(tiny_model_dir), precision="nf4", device="cpu")


def test_int8_is_refused_as_removed(tiny_model_dir: Path) -> None:
    with pytest.raises(
        ConfigurationError, match=r"precision=int8 was removed: .* Use bf16, or nf4"
    ):
        load_model(str(tiny_model_dir), precision="int8", device="cpu")


@pytest.mark.skipif(not NO_CUDA, reason="CUDA is available here")
def test_cuda_device_without_cuda_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="cpu"):
        load_model(str(tiny_model_dir), precision="fp32", device="cuda")


def test_unknown_device_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="device"):
        load_model(str(tiny_model_dir), precision="fp32", device="gpu0")


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed"
)
def test_flash_attention_without_flash_attn_is_refused(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="flash"):
        load_model(
            str(tiny_model_dir),
            precision="fp32",
            attn_implementation="flash_attention_2",
            device="cpu",
        )


@pytest.mark.parametrize("path", ["/no/such/model", "./missing-model", "~/nope/llama", "a/b/c"])
def test_missing_model_directory_says_so(path: str) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_model(path, precision="fp32", device="cpu")


def test_model_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(ConfigurationError, match="not a directory"):
        load_model(str(file), precision="fp32", device="cpu")
