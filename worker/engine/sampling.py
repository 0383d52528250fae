"""Per-row next-token choice on the device: greedy, temperature and top-p, no host sync.

Sampling draws with the exponential-race trick (argmax of p / Exp(1) noise is a draw from p),
which needs no ``multinomial`` and is safe inside CUDA graphs.
"""

from __future__ import annotations

import torch


def top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep each row's smallest set of tokens whose probability reaches its ``top_p`` [B]
    (transformers' TopPLogitsWarper, with one top-p per row)."""
    sorted_scores, sorted_indices = scores.sort(dim=-1)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    sorted_remove = cumulative <= (1.0 - top_p[:, None])
    sorted_remove[:, -1] = False
    remove = sorted_remove.scatter(1, sorted_indices, sorted_remove)
    return scores.masked_fill(remove, -float("inf"))


def sample(
    logits: torch.Tensor,
    greedy: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    *,
    any_sampling: bool,
    any_top_p: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token per row [B] from ``logits`` [B, V].

    ``greedy`` [B] bool rows take the argmax; the others sample at their ``temperature`` [B]
    within their ``top_p`` [B]. ``any_sampling`` / ``any_top_p`` are host-side facts about the
    live rows that let all-greedy batches skip the sampling kernels.
    """
    argmax = logits.argmax(dim=-1)
    if not any_sampling:
        return argmax
    safe_temperature = torch.where(greedy, 1.0, temperature)
    scores = logits.float() / safe_temperature[:, None]
    if any_top_p:
        scores = top_p_filter(scores, torch.where(greedy, 1.0, top_p))
    probs = scores.softmax(dim=-1)
    noise = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy, argmax, drawn)
