"""Tier plans: which expert rank positions form each OrdMoE tier (METHOD.md section 2).

A tier is a set of *rank positions* (1 = the expert with the highest router score for that token).
The plan is computed once, as data, from `(n, K, C, plan)`; routing then reads the positions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

PlanName = Literal["uniform", "high_only", "random", "uneven", "explicit"]
Basis = Literal["per_token", "global"]
LayerScope = Literal["all", "shallow", "deep", "even"]


@dataclass
class TierConfig:
    """The `tiers:` section of an objective config (before the model's n and K are known)."""

    num_tiers: int = 3  # C in the paper; 1 = plain training
    plan: PlanName = "uniform"
    ranks: list[str | list[int]] | None = None  # uneven/explicit: per tier "1-6" / "25-27, 40" / [59, 60, 61]
    basis: Basis = "per_token"
    layers: LayerScope | list[int] = "all"  # a list holds MoE-layer indices (0 = first MoE layer)
    seed: int = 0  # the random plan's permutations derive from (seed, step, layer)

    def __post_init__(self) -> None:
        if self.num_tiers < 1:
            raise ValueError(f"tiers.num_tiers must be >= 1, got {self.num_tiers}")
        if self.plan in ("uneven", "explicit"):
            if not self.ranks:
                raise ValueError(f"tiers.plan={self.plan!r} needs tiers.ranks (one rank list per tier)")
            if len(self.ranks) != self.num_tiers:
                raise ValueError(f"tiers.num_tiers={self.num_tiers} but tiers.ranks lists "
                                 f"{len(self.ranks)} tiers: C must match the tier plan")
            parsed = [parse_ranks(r) for r in self.ranks]
            _check_disjoint(parsed)
        elif self.ranks is not None:
            raise ValueError(f"tiers.ranks is only read by the uneven/explicit plans, not {self.plan!r}")


@dataclass(frozen=True)
class TierPlan:
    """Rank positions (0-based) of every tier for a model with `num_experts` routed experts, top-`top_k`."""

    num_experts: int
    top_k: int
    positions: tuple[tuple[int, ...], ...]
    plan: PlanName = "uniform"
    basis: Basis = "per_token"
    layers: LayerScope | tuple[int, ...] = "all"
    seed: int = 0
    _scope_cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def num_tiers(self) -> int:
        return len(self.positions)

    def ranks(self, tier: int) -> tuple[int, ...]:
        """1-based rank positions of `tier` (1-based)."""
        return tuple(p + 1 for p in self.positions[tier - 1])

    def describe(self) -> list[str]:
        """`["tier 1: ranks 1-6", "tier 2: ranks 25-30", ...]`."""
        return [f"tier {c}: ranks {format_ranks(self.ranks(c))}" for c in range(1, self.num_tiers + 1)]

    def layers_in_scope(self, num_moe_layers: int) -> frozenset[int]:
        """MoE-layer indices (0-based, in model order) whose routing follows the tiers."""
        if num_moe_layers not in self._scope_cache:
            self._scope_cache[num_moe_layers] = resolve_layer_scope(self.layers, num_moe_layers)
        return self._scope_cache[num_moe_layers]


def build_tier_plan(config: TierConfig, num_experts: int, top_k: int) -> TierPlan:
    """Turn a tier config into rank positions for `num_experts` experts and top-`top_k` routing."""
    n, k, c = num_experts, top_k, config.num_tiers
    if not 1 <= k <= n:
        raise ValueError(f"top_k={k} must be between 1 and num_experts={n}")
    if config.plan in ("uniform", "random", "high_only") and c * k > n:
        raise ValueError(f"plan {config.plan!r} needs C*K <= n for disjoint tiers, "
                         f"but C={c}, K={k}, n={n} (C*K={c * k})")
    blocks = n // k
    if config.plan in ("uniform", "random"):
        starts = [0] if c == 1 else [0] + [(i * ((blocks - 1) // (c - 1))) * k for i in range(1, c - 1)] + [n - k]
        positions = [tuple(range(s, s + k)) for s in starts]
    elif config.plan == "high_only":
        positions = [tuple(range(i * k, (i + 1) * k)) for i in range(c)]
    else:
        positions = [tuple(r - 1 for r in parse_ranks(spec)) for spec in config.ranks or []]
        for tier, pos in enumerate(positions, 1):
            bad = [p + 1 for p in pos if not 0 <= p < n]
            if bad:
                raise ValueError(f"tier {tier} has rank(s) {bad} outside 1..{n} (the model has {n} experts)")
    _check_disjoint([[p + 1 for p in pos] for pos in positions])
    layers = config.layers if isinstance(config.layers, str) else tuple(config.layers)
    return TierPlan(num_experts=n, top_k=k, positions=tuple(positions), plan=config.plan,
                    basis=config.basis, layers=layers, seed=config.seed)


def resolve_layer_scope(layers: str | tuple[int, ...], num_moe_layers: int) -> frozenset[int]:
    """`all | shallow | deep | even | [indices]` -> the set of in-scope MoE-layer indices."""
    m = num_moe_layers
    if layers == "all":
        return frozenset(range(m))
    if layers == "shallow":
        return frozenset(range(m // 2))
    if layers == "deep":
        return frozenset(range(m // 2, m))
    if layers == "even":
        return frozenset(range(0, m, 2))
    if isinstance(layers, str):
        raise ValueError(f"unknown layer scope {layers!r}; use all, shallow, deep, even or a list of MoE-layer indices")
    bad = [i for i in layers if not 0 <= i < m]
    if bad:
        raise ValueError(f"layer scope lists MoE layer(s) {bad}, but the model has MoE layers 0..{m - 1}")
    return frozenset(layers)


def parse_ranks(spec: str | list[int]) -> list[int]:
    """`"1-6, 25-27"` or `[1, 2, 3]` -> sorted 1-based rank list."""
    if isinstance(spec, list):
        ranks = list(spec)
    else:
        ranks = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            if not match:
                raise ValueError(f"cannot read rank range {part!r} in {spec!r}; write e.g. '1-6, 25-27'")
            lo, hi = int(match[1]), int(match[2] or match[1])
            if hi < lo:
                raise ValueError(f"rank range {part!r} runs backwards")
            ranks.extend(range(lo, hi + 1))
    if not ranks:
        raise ValueError(f"tier rank list {spec!r} is empty")
    if len(set(ranks)) != len(ranks):
        raise ValueError(f"tier rank list {spec!r} repeats a rank")
    if min(ranks) < 1:
        raise ValueError(f"ranks are 1-based (1 = highest score); {spec!r} has {min(ranks)}")
    return sorted(ranks)


def format_ranks(ranks: tuple[int, ...] | list[int]) -> str:
    """`(1, 2, 3, 7)` -> `"1-3, 7"`."""
    out, ranks = [], sorted(ranks)
    start = prev = ranks[0]
    for r in ranks[1:] + [None]:
        if r is not None and r == prev + 1:
            prev = r
            continue
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
        if r is not None:
            start = prev = r
    return ", ".join(out)


def _check_disjoint(tiers: list[list[int]]) -> None:
    seen: dict[int, int] = {}
    for tier, ranks in enumerate(tiers, 1):
        for r in ranks:
            if r in seen:
                raise ValueError(f"tiers {seen[r]} and {tier} overlap at rank {r}; tiers must be disjoint")
            seen[r] = tier
