"""Engine building blocks without a model: buckets, memory planning, sampling, GQA attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker.engine.attention import gqa_attention
from worker.engine.fused import EAGER_KERNELS, compiled_kernels
from worker.engine.graphs import batch_buckets, length_buckets, pick
from worker.engine.parts import Geometry
from worker.engine.sampling import sample, top_p_filter
from worker.engine.slots import bytes_per_slot, cache_budget, plan_capacity

REAL_11B = Geometry(
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    num_layers=40,
    cross_layers=(3, 8, 13, 18, 23, 28, 33, 38),
    vocab_size=128256,
    num_patches=1601,
    max_tiles=4,
    max_position_embeddings=131072,
)


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]
    assert batch_buckets(37) == [1, 2, 4, 8, 16, 24, 32, 37]
    assert length_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert length_buckets(100) == [100]
    assert length_buckets(600) == [256, 512, 600]
    assert pick([1, 2, 4, 8], 3) == 4 and pick([1, 2, 4, 8], 8) == 8
    with pytest.raises(ValueError):
        pick([1, 2, 4], 5)


def test_slot_bytes_of_the_real_model():
    assert REAL_11B.cross_len == 6404
    assert REAL_11B.self_layers == tuple(i for i in range(40) if i % 5 != 3)
    per_slot = bytes_per_slot(REAL_11B, 4096, torch.bfloat16)
    self_kv = 32 * 4096 * 2 * 8 * 128 * 2
    cross_kv = 8 * 6404 * 2 * 8 * 128 * 2
    assert per_slot == self_kv + cross_kv  # ~537 MB + ~210 MB


def test_plan_on_cpu_uses_small_defaults():
    class Vision:
        hidden_size, num_hidden_layers, num_global_layers = 32, 4, 2
        intermediate_size, vision_output_dim = 64, 96

    plan = plan_capacity(
        REAL_11B, Vision, torch.float32, torch.device("cpu"),
        max_slots=None, max_seq_len=None, memory_fraction=0.9,
    )  # fmt: skip
    assert (plan.max_slots, plan.max_seq_len) == (8, 512)
    plan = plan_capacity(
        REAL_11B, Vision, torch.float32, torch.device("cpu"),
        max_slots=3, max_seq_len=64, memory_fraction=0.9,
    )  # fmt: skip
    assert (plan.max_slots, plan.max_seq_len) == (3, 64)


def test_cache_budget_within_a_memory_limit():
    gib = 2**30
    # No limit: a fraction of what is free, less the workspace.
    assert cache_budget(60 * gib, 10 * gib, 0.9, None, 2 * gib) == int(54 * gib) - 2 * gib
    # A 24 GiB limit binds: the weights already allocated count against it.
    assert cache_budget(60 * gib, 9 * gib, 0.9, 24 * gib, 2 * gib) == 13 * gib
    # A limit above what is free: the free memory binds.
    assert cache_budget(10 * gib, 9 * gib, 0.9, 80 * gib, 2 * gib) == 7 * gib
    # Weights beyond the limit: nothing left (the planner then refuses, naming the budget).
    assert cache_budget(60 * gib, 30 * gib, 0.9, 24 * gib, 2 * gib) < 0


def test_top_p_filter_keeps_the_smallest_reaching_set():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    scores = probs.log()
    kept = top_p_filter(scores, torch.tensor([0.7, 1.0])).isfinite()
    assert kept.tolist() == [[True, True, False, False], [True, True, True, True]]


def test_sample_greedy_rows_take_argmax_and_others_follow_distribution():
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).repeat(4000, 1)
    greedy = torch.zeros(4000, dtype=torch.bool)
    greedy[:10] = True
    temperature = torch.ones(4000)
    top_p = torch.ones(4000)
    tokens = sample(logits, greedy, temperature, top_p, any_sampling=True, any_top_p=False)
    assert (tokens[:10] == 1).all()
    counts = torch.bincount(tokens[10:], minlength=4).float() / 3990
    assert torch.allclose(counts, logits[0].softmax(-1), atol=0.03)
    only_greedy = sample(logits, greedy, temperature, top_p, any_sampling=False, any_top_p=False)
    assert (only_greedy == 1).all()


def test_gqa_attention_matches_repeated_kv():
    torch.manual_seed(0)
    batch, heads, kv_heads, length, keys, dim = 3, 8, 2, 5, 11, 16
    q = torch.randn(batch, heads, length, dim)
    k = torch.randn(batch, kv_heads, keys, dim)
    v = torch.randn(batch, kv_heads, keys, dim)
    mask = torch.rand(batch, length, keys) > 0.3
    mask[..., 0] = True
    out = gqa_attention(q, k, v, mask, dim**-0.5)
    repeat = heads // kv_heads
    expected = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(repeat, dim=1),
        v.repeat_interleave(repeat, dim=1),
        attn_mask=mask[:, None],
    )
    assert torch.allclose(out, expected.transpose(1, 2).reshape(batch, length, -1), atol=1e-5)
    one = gqa_attention(q[:, :, :1], k, v, mask[:, :1], dim**-0.5)
    assert torch.allclose(one, expected[:, :, :1].transpose(1, 2).reshape(batch, 1, -1), atol=1e-5)


def test_pointwise_kernels_match_hf_modules():
    from transformers.models.mllama.modeling_mllama import MllamaTextRMSNorm

    torch.manual_seed(0)
    norm = MllamaTextRMSNorm(16, eps=1e-5)
    norm.weight.data = torch.rand(16, dtype=torch.bfloat16)
    hidden = torch.randn(3, 16, dtype=torch.bfloat16)
    delta = torch.randn(3, 16, dtype=torch.bfloat16)
    gate = torch.tensor([0.5], dtype=torch.bfloat16).tanh()
    rows = torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.bfloat16)
    added, normed = EAGER_KERNELS.add_rms_norm(hidden, delta, gate, rows, norm.weight, 1e-5)
    expected = hidden + gate * (rows * delta)
    assert torch.equal(added, expected)
    assert torch.equal(normed, norm(expected))

    gate_up = torch.randn(3, 8)
    assert torch.equal(EAGER_KERNELS.silu_and_mul(gate_up), F.silu(gate_up[:, :4]) * gate_up[:, 4:])

    heads, kv_heads, dim = 4, 2, 8
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim)
    cos, sin = torch.randn(3, 1, dim), torch.randn(3, 1, dim)
    q, k, v = EAGER_KERNELS.rotate_qkv(qkv, cos, sin, heads, kv_heads)
    qk = qkv[:, : (heads + kv_heads) * dim].view(3, heads + kv_heads, dim)
    rotated = qk * cos + torch.cat((-qk[..., dim // 2 :], qk[..., : dim // 2]), -1) * sin
    assert torch.equal(q, rotated[:, :heads]) and torch.equal(k, rotated[:, heads:])
    assert torch.equal(v, qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim))
    assert compiled_kernels(torch.device("cpu"), torch.float32) is EAGER_KERNELS
