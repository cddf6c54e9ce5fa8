"""Measure the paper's core claim on your own model: tier 1 > tier 2 > ... > tier C.

For every layer scope and tier, the model is run on held-out batches with only that tier's experts
in the in-scope MoE layers; the result is the mean token log-likelihood and the token accuracy of
the supervised tokens. Path 1 is standard routing, so tier 1 is the same for every scope.
"""
from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan, format_ranks
from training.losses import token_logprobs
from training.objectives import shared_inputs


@dataclass
class TierScore:
    scope: str
    tier: int
    ranks: str
    mean_logprob: float  # per supervised token
    token_accuracy: float
    tokens: int


@torch.no_grad()
def probe_tiers(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], tiers: TierConfig,
                scopes: Iterable[str | list[int]] = ("all",), device: torch.device | str = "cpu",
                show_progress: bool = True) -> list[TierScore]:
    """Per-scope, per-tier mean log-likelihood and accuracy over `batches` (re-iterated per setting)."""
    batches = list(batches)
    attached, was_training = getattr(model, "tier_routing", None), model.training
    routing = TierRouting.attach(model)
    found_plan = routing.plan
    model.eval()
    try:
        return _probe(model, routing, batches, tiers, scopes, device, show_progress)
    finally:  # the model leaves as it came: its plan (a training objective's), its mode, no foreign hooks
        if attached is None:
            routing.detach()
            del model.tier_routing
        elif found_plan is not None:
            routing.set_plan(found_plan)
        model.train(was_training)


def _probe(model: nn.Module, routing: TierRouting, batches: list[dict[str, torch.Tensor]], tiers: TierConfig,
           scopes: Iterable[str | list[int]], device: torch.device | str, show_progress: bool) -> list[TierScore]:
    results = []
    settings = [(scope, tier) for scope in scopes for tier in range(1, tiers.num_tiers + 1)]
    for scope, tier in tqdm(settings, desc="probe tiers", disable=not show_progress):
        layers = scope if isinstance(scope, str) else list(scope)
        plan = build_tier_plan(replace(tiers, layers=layers), routing.num_experts, routing.top_k)
        routing.set_plan(plan)
        logprob_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            embeds, kwargs = shared_inputs(model, batch)
            with routing.path(tier):
                logits = model(inputs_embeds=embeds, use_cache=False, **kwargs).logits
            logprobs, mask = token_logprobs(logits, batch["labels"])
            predicted = logits[:, :-1].argmax(dim=-1)
            logprob_sum += (logprobs * mask).sum().item()
            correct += ((predicted == batch["labels"][:, 1:]) & mask).sum().item()
            count += int(mask.sum())
        results.append(TierScore(scope=str(scope), tier=tier, ranks=format_ranks(plan.ranks(tier)),
                                 mean_logprob=logprob_sum / max(count, 1), token_accuracy=correct / max(count, 1),
                                 tokens=count))
    return results


def is_ordered(scores: list[TierScore], scope: str) -> bool:
    """True when the scope's tiers are strictly ordered by log-likelihood, tier 1 highest."""
    values = [s.mean_logprob for s in sorted(scores, key=lambda s: s.tier) if s.scope == scope]
    return all(a > b for a, b in zip(values, values[1:]))


def format_table(scores: list[TierScore]) -> str:
    lines = ["| scope | tier | ranks | mean log-lik | token acc | tokens |", "|---|---|---|---|---|---|"]
    for s in scores:
        lines.append(f"| {s.scope} | {s.tier} | {s.ranks} | {s.mean_logprob:.4f} | {s.token_accuracy:.4f} | {s.tokens} |")
    scopes = dict.fromkeys(s.scope for s in scores)
    lines.append("")
    lines += [f"- {scope}: tiers {'are' if is_ordered(scores, scope) else 'are NOT'} ordered 1 > 2 > ... > C"
              for scope in scopes]
    return "\n".join(lines)


def save_report(scores: list[TierScore], out_dir: str | Path, meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write `tier_probe.md`, `tier_probe.json` and `tier_probe.png` (grouped bars) into `out_dir`. `meta` goes
    into the JSON; its `held_out` skip tally (`skipped` by reason, `last_skip`) also into the table's notes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "tier_probe.md", "json": out / "tier_probe.json", "png": out / "tier_probe.png"}
    held_out = (meta or {}).get("held_out", {})
    skipped = f"\nheld-out samples skipped: {held_out['skipped']}; latest: {held_out['last_skip']}\n" \
        if held_out.get("skipped") else ""
    paths["md"].write_text(format_table(scores) + "\n" + skipped)
    paths["json"].write_text(json.dumps({"meta": meta or {}, "scores": [s.__dict__ for s in scores]}, indent=2))

    scopes = list(dict.fromkeys(s.scope for s in scores))
    num_tiers = max(s.tier for s in scores)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8 / num_tiers
    for ax, field, label in [(axes[0], "mean_logprob", "mean token log-likelihood"),
                             (axes[1], "token_accuracy", "token accuracy")]:
        for tier in range(1, num_tiers + 1):
            values = [next(getattr(s, field) for s in scores if s.scope == sc and s.tier == tier) for sc in scopes]
            ax.bar([i + (tier - 1) * width for i in range(len(scopes))], values, width, label=f"tier {tier}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(scopes))], scopes)
        ax.set_xlabel("layer scope")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=110)
    plt.close(fig)
    return paths
