"""The pieces of an HF ``MllamaForConditionalGeneration`` the engine runs, and their geometry.

Only public module attributes are used (the same in transformers 5.17 and 5.24), so prefill and
decode call the model's own Linear, RMSNorm and MLP modules with its own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worker.engine.fused import FusedLayer, fuse_layers
from worker.engine.nf4 import adopt_bnb_linears


@dataclass(frozen=True)
class Geometry:
    """Shapes the caches and the decode loop are built from."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    cross_layers: tuple[int, ...]  # indices into the decoder layers
    vocab_size: int  # rows of lm_head
    num_patches: int  # vision tokens per tile, class token included
    max_tiles: int
    max_position_embeddings: int

    @property
    def self_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_layers) if i not in self.cross_layers)

    @property
    def cross_len(self) -> int:
        """Cross-attention tokens of one image at its largest (4 tiles x 1601 on the real model)."""
        return self.max_tiles * self.num_patches

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


class MllamaParts:
    """Handles on the vision tower, projector and text decoder of an Mllama model."""

    def __init__(self, model: nn.Module) -> None:
        inner = getattr(model, "model", model)
        self.vision: nn.Module = inner.vision_model
        self.projector: nn.Module = inner.multi_modal_projector
        text = inner.language_model
        self.embed_tokens: nn.Module = text.embed_tokens
        self.layers: list[nn.Module] = list(text.layers)
        self.norm: nn.Module = text.norm
        self.rotary_emb: nn.Module = text.rotary_emb
        self.lm_head: nn.Module = model.lm_head

        text_config = model.config.text_config
        vision_config = model.config.vision_config
        num_heads = text_config.num_attention_heads
        self.geometry = Geometry(
            hidden_size=text_config.hidden_size,
            num_heads=num_heads,
            num_kv_heads=text_config.num_key_value_heads,
            head_dim=text_config.hidden_size // num_heads,
            num_layers=text_config.num_hidden_layers,
            cross_layers=tuple(sorted(text_config.cross_attention_layers)),
            vocab_size=self.lm_head.out_features,
            num_patches=(vision_config.image_size // vision_config.patch_size) ** 2 + 1,
            max_tiles=vision_config.max_num_tiles,
            max_position_embeddings=text_config.max_position_embeddings,
        )
        # bitsandbytes' NF4 Linears become Nf4Linears on their own storage, so they fuse.
        adopt_bnb_linears(text)
        # Decode-path weights fused in place (None entries: not fusable, left as they are).
        fused = fuse_layers(self.layers, self.geometry.cross_layers)
        self.fused: list[FusedLayer] = fused or [
            FusedLayer(qkv=None, gate_up=None) for _ in self.layers
        ]
        first = next(model.parameters())
        self.device = first.device
        # The compute dtype, also of quantized models (their norms stay in it).
        self.dtype = self.norm.weight.dtype

    def rope_table(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [length, head_dim] for positions 0..length-1, from the model's own rotary
        module, so a lookup gives exactly what HF computes for that position."""
        positions = torch.arange(length, device=self.device)[None]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        cos, sin = self.rotary_emb(probe, positions)
        return cos[0].contiguous(), sin[0].contiguous()
