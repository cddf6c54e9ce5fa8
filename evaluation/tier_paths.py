"""Evaluate a model on its OrdMoE tier paths, leaving its routing as it was found.

`installed_plan(model, plan)` installs a tier plan for the duration of a block and then restores the plan
the model had (or removes the tier routing it attached), so evaluating tier paths never changes what a
later standard evaluation or training step of the same model object runs.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from models.routing import TierRouting
from models.tiers import TierConfig, TierPlan, build_tier_plan, format_ranks


@dataclass(frozen=True)
class TierPath:
    tier: int
    num_tiers: int
    plan: str  # the plan kind (uniform, high_only, ...)
    ranks: str  # "5-8"

    @property
    def label(self) -> str:
        return f"tier {self.tier}/{self.num_tiers} ({self.plan}, ranks {self.ranks})"


@contextlib.contextmanager
def installed_plan(model: nn.Module, plan: TierPlan) -> Iterator[TierRouting]:
    existing = getattr(model, "tier_routing", None)
    previous = existing.plan if existing is not None else None
    routing = TierRouting.attach(model)
    routing.set_plan(plan)
    try:
        yield routing
    finally:
        if existing is None:
            routing.detach()
            del model.tier_routing
        elif previous is not None:
            routing.set_plan(previous)
        else:
            routing.plan = None  # no plan: every forward is standard routing again


def tier_plan_for(model: nn.Module, config: TierConfig) -> TierPlan:
    """The plan `config` describes, sized to the model's router (experts, top-K)."""
    routing = getattr(model, "tier_routing", None)
    probe = routing or TierRouting(model)
    try:
        return build_tier_plan(config, probe.num_experts, probe.top_k)
    finally:
        if routing is None:
            probe.detach()


def tier_paths(plan: TierPlan) -> list[TierPath]:
    return [TierPath(tier, plan.num_tiers, plan.plan, format_ranks(plan.ranks(tier)))
            for tier in range(1, plan.num_tiers + 1)]
