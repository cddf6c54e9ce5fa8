"""The loss terms of METHOD.md section 4 as pure functions of logits, labels and router records."""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from models.routing import RouterRecord, at_least_fp32, routing_probabilities

IGNORE_INDEX = -100
Advantage = Literal["zscore", "centered", "raw"]


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token log-probabilities `[B, T-1]` and the supervised-token mask (label != -100).

    `labels` are aligned with the inputs (as the processor builds them); the shift happens here.
    """
    logits, targets = logits[:, :-1], labels[:, 1:]
    mask = targets != IGNORE_INDEX
    logprobs = -F.cross_entropy(at_least_fp32(logits.reshape(-1, logits.shape[-1])), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="none").view(targets.shape)
    return logprobs, mask


def mean_token_logprob(logprobs: torch.Tensor, mask: torch.Tensor, segments: torch.Tensor | None = None,
                       num_samples: int = 0) -> torch.Tensor:
    """Lbar per sample: the mean log-prob over its supervised tokens (0 for a sample with none).

    A sample is a row, or with `segments` (packed rows: the sample number of each target token, -1 on
    padding, shaped like `mask`) each of the batch's `num_samples` packed samples.
    """
    if segments is None:
        return (logprobs * mask).sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)
    sums = _per_sample_sum(logprobs * mask, segments, num_samples)
    return sums / _per_sample_sum(mask.to(logprobs.dtype), segments, num_samples).clamp(min=1)


def supervised_samples(mask: torch.Tensor, segments: torch.Tensor | None = None, num_samples: int = 0) -> torch.Tensor:
    """Which samples (rows, or packed samples with `segments`) have at least one supervised token."""
    if segments is None:
        return mask.any(dim=-1)
    return _per_sample_sum(mask.float(), segments, num_samples) > 0


def _per_sample_sum(values: torch.Tensor, segments: torch.Tensor, num_samples: int) -> torch.Tensor:
    keep = segments >= 0  # padding (-1) belongs to no sample
    return values.new_zeros(num_samples).index_add(0, segments.clamp(min=0).reshape(-1), (values * keep).reshape(-1))


def next_token_loss(logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over all supervised tokens of the batch (0, not NaN, when there are none)."""
    return -(logprobs * mask).sum() / mask.sum().clamp(min=1)


def advantages(rewards: list[float] | tuple[float, ...], kind: Advantage = "zscore") -> list[float]:
    """Per-tier advantages from the fixed rewards.

    `zscore` (the paper): (r - mean) / std with the population std (A = 0 where std = 0). Scaling
    the rewards cancels here, so [1,.5,0], [2,1,0] and [.5,.25,0] train identically (METHOD Finding 1);
    `centered` (r - mean) keeps the scale; `raw` uses the rewards as they are.
    """
    r = torch.tensor(rewards, dtype=torch.float64)
    if kind == "raw":
        return r.tolist()
    centered = r - r.mean()
    if kind == "centered":
        return centered.tolist()
    std = r.std(unbiased=False)
    return (centered / std).tolist() if std > 0 else [0.0] * len(rewards)


def expert_rank_loss(tier_mean_logprobs: dict[int, torch.Tensor], tier_advantages: list[float],
                     sample_mask: torch.Tensor, floor: float | None = None) -> torch.Tensor:
    """L_ERL = -mean_over_samples( sum_c A_c * Lbar_c ) over the given tiers (1-based keys).

    Samples without supervised tokens are left out of the mean. `floor` (opt-in, METHOD Finding 4)
    stops pushing down a negative-advantage tier whose Lbar is already below it.
    """
    total = torch.zeros((), device=sample_mask.device)
    for tier, lbar in tier_mean_logprobs.items():
        a = tier_advantages[tier - 1]
        if floor is not None and a < 0:
            lbar = torch.clamp(lbar, min=floor)
        total = total + (a * lbar * sample_mask).sum()
    return -total / sample_mask.sum().clamp(min=1)


def load_balance_loss(records: list[RouterRecord], token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """L_bal = n * sum_i f_i * P_i per MoE layer, averaged over layers (METHOD.md section 4).

    f_i: share of (token, slot) assignments to expert i; P_i: mean routing probability of expert i
    (softmax, or per-token-normalised sigmoid scores); both over the tokens in `token_mask`.
    """
    losses = []
    for record in records:
        n = record.logits.shape[-1]
        probabilities = routing_probabilities(record.logits, record.spec)
        indices = record.indices
        if token_mask is not None:
            probabilities, indices = probabilities[token_mask], indices[token_mask]
        if probabilities.shape[0] == 0:
            continue
        counts = torch.zeros(n, device=indices.device).index_add_(
            0, indices.reshape(-1), torch.ones(indices.numel(), device=indices.device))
        f = counts / indices.numel()
        losses.append(n * (f * probabilities.mean(dim=0)).sum())
    if not losses:
        return torch.zeros((), device=records[0].logits.device if records else "cpu")
    return torch.stack(losses).mean()


def tier_order_agreement(tier_mean_logprobs: dict[int, torch.Tensor], sample_mask: torch.Tensor) -> float:
    """Share of samples whose tier log-probs are strictly ordered tier 1 > tier 2 > ... > tier C."""
    stacked = torch.stack([tier_mean_logprobs[c] for c in sorted(tier_mean_logprobs)], dim=0)
    ordered = (stacked[:-1] > stacked[1:]).all(dim=0) & sample_mask.bool()
    return ordered.sum().item() / max(int(sample_mask.sum().item()), 1)
