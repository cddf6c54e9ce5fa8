"""Tier-aware routing: switch every MoE layer of any backbone between standard top-K and one tier.

The router contract: every MoE block has a `gate` module whose forward returns
`(router_logits [N, E] float32, weights [N, K], indices [N, K])` and the block feeds the returned
`(indices, weights)` to its experts. That holds for our Ling backbones and for transformers' own
MoE models (qwen3_moe, olmoe, mixtral, deepseek_v3), so tier routing is one forward hook on each
gate that may replace `(weights, indices)`; the experts never know about tiers.

Which path a forward runs is a `RoutingState` held by the model's `TierRouting`. With activation
checkpointing the backward recomputes each layer *after* the forward's `with routing.path(c):`
block has exited; `checkpoint_context` (passed to torch's checkpoint as `context_fn`) captures
the state at forward time and restores it for the recomputation, so the gradient stays exact.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from models.tiers import TierPlan

Family = Literal["softmax", "sigmoid_bias"]


@dataclass(frozen=True)
class RouterSpec:
    """How a router family scores, ranks and weights experts (METHOD.md section 1)."""

    family: Family
    bias_attr: str | None = None  # selection-only expert bias (sigmoid_bias routers)
    scaling_attr: str | None = None  # routed_scaling_factor


# transformers' own routers, by class name (they do not carry a `routing_family` attribute).
_NATIVE_ROUTERS: dict[str, RouterSpec] = {
    "Qwen3MoeTopKRouter": RouterSpec("softmax"),
    "OlmoeTopKRouter": RouterSpec("softmax"),
    "MixtralTopKRouter": RouterSpec("softmax"),
    "DeepseekV3TopkRouter": RouterSpec("sigmoid_bias", "e_score_correction_bias", "routed_scaling_factor"),
}


def router_spec(router: nn.Module) -> RouterSpec:
    """The spec of a router module: from its `routing_family` attribute, else from the known native classes."""
    family = getattr(router, "routing_family", None)
    if family == "softmax":
        return RouterSpec("softmax")
    if family == "sigmoid_bias":
        return RouterSpec("sigmoid_bias", "expert_bias", "routed_scaling_factor")
    if type(router).__name__ in _NATIVE_ROUTERS:
        return _NATIVE_ROUTERS[type(router).__name__]
    raise TypeError(f"{type(router).__name__} is not a known router: give it `routing_family = 'softmax'` or "
                    f"'sigmoid_bias' (see models/routing.py for the router contract)")


def moe_routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """`(name, gate)` of every MoE block (a module with `gate` and `experts` children), in model order.

    Blocks inside multi-token-prediction layers (`is_mtp_layer`) are left out: they are an auxiliary
    head, not part of the forward whose tiers OrdMoE ranks.
    """
    mtp = tuple(f"{name}." for name, module in model.named_modules() if getattr(module, "is_mtp_layer", False))
    return [(f"{name}.gate" if name else "gate", block.gate) for name, block in model.named_modules()
            if isinstance(getattr(block, "gate", None), nn.Module) and isinstance(getattr(block, "experts", None), nn.Module)
            and not (mtp and f"{name}.".startswith(mtp))]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Routing maths in fp32 (fp64 stays fp64): bf16 softmax over 256 experts loses the ordering."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------------
# The tier rule itself: pure functions of the router logits.

def ranking_scores(logits: torch.Tensor, spec: RouterSpec, router: nn.Module) -> torch.Tensor:
    """Scores that order the experts of each token: the logits (softmax is monotone) or sigmoid + bias."""
    if spec.family == "softmax":
        return logits
    return logits.sigmoid() + getattr(router, spec.bias_attr).to(logits.dtype)


def routing_probabilities(logits: torch.Tensor, spec: RouterSpec) -> torch.Tensor:
    """Per-token expert probabilities (sigmoid scores normalised to sum 1 for sigmoid routers)."""
    if spec.family == "softmax":
        return at_least_fp32(logits).softmax(dim=-1)
    scores = at_least_fp32(logits).sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True)


def select_tier_experts(scores: torch.Tensor, positions: tuple[int, ...], basis: str = "per_token",
                        probabilities: torch.Tensor | None = None) -> torch.Tensor:
    """Experts at rank `positions` (0-based, ascending) of each token's descending score order -> [N, |tier|].

    Only the part of the ranking the tier reaches is computed: a top-k from whichever end of the
    ranking is nearer (a full sort of 256 scores per token costs more than the tier's experts save).
    `basis="global"` ranks once for all tokens by their mean routing probability (METHOD.md 2).
    """
    index = torch.tensor(positions, device=scores.device)
    if basis == "global":
        mean_probability = probabilities.mean(dim=0)
        order = torch.sort(mean_probability, descending=True, stable=True).indices
        return order[index].unsqueeze(0).expand(scores.shape[0], -1)
    num_experts, first, last = scores.shape[-1], positions[0], positions[-1]
    if last + 1 <= num_experts - first:  # nearer the top: the highest last+1 scores, in rank order
        return torch.topk(scores, last + 1, dim=-1).indices[:, index]
    lowest = torch.topk(scores, num_experts - first, dim=-1, largest=False).indices  # ascending: rank E-1-j
    return lowest[:, num_experts - 1 - index]


def tier_weights(logits: torch.Tensor, indices: torch.Tensor, spec: RouterSpec, router: nn.Module) -> torch.Tensor:
    """Weights of a tier's experts: softmax over the tier's logits only, or normalised sigmoid x scaling."""
    chosen = at_least_fp32(logits).gather(-1, indices)
    if spec.family == "softmax":
        return chosen.softmax(dim=-1)
    scores = chosen.sigmoid()
    return scores / scores.sum(dim=-1, keepdim=True) * float(getattr(router, spec.scaling_attr, 1.0))


# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RoutingState:
    """Which path a forward runs. `tiers=1` is standard routing (METHOD.md 3, Decision: path 1 is the
    model's own routing); `tiers=c` restricts in-scope layers to tier c; a tuple gives one tier per
    batch row (batched execution of several paths in one forward)."""

    tiers: int | tuple[int, ...] = 1
    record: bool = False  # keep every MoE layer's logits/indices/weights in `TierRouting.records`
    step: int = 0  # seeds the random plan's permutations (deterministic across recomputation)
    token_mask: torch.Tensor | None = None  # [N] bool: tokens that count for the global basis


@dataclass
class RouterRecord:
    """What one MoE layer did in the last recorded forward."""

    layer: int  # MoE-layer index, 0 = first MoE layer
    name: str
    logits: torch.Tensor  # [N, E] float32, keeps its autograd graph (the balance loss needs it)
    weights: torch.Tensor  # [N, k]
    indices: torch.Tensor  # [N, k]
    spec: RouterSpec
    in_scope: bool


class TierRouting:
    """Tier routing attached to one model: `with routing.path(3): model(...)` runs tier 3."""

    def __init__(self, model: nn.Module, plan: TierPlan | None = None) -> None:
        self.routers = moe_routers(model)
        if not self.routers:
            raise ValueError(f"{type(model).__name__} has no MoE layers (no module with `gate` and `experts`): "
                             f"OrdMoE tiers need an MoE backbone")
        self.specs = [router_spec(gate) for _, gate in self.routers]
        self.num_experts = _same_attr(self.routers, "num_experts")
        self.top_k = _same_attr(self.routers, "top_k")
        self.state = RoutingState()
        self.records: dict[int, RouterRecord] = {}
        self.plan: TierPlan | None = None
        self._handles = [gate.register_forward_hook(self._make_hook(i)) for i, (_, gate) in enumerate(self.routers)]
        if plan is not None:
            self.set_plan(plan)

    @classmethod
    def attach(cls, model: nn.Module, plan: TierPlan | None = None) -> "TierRouting":
        """Attach (once) and return the model's tier routing; later calls update the plan."""
        existing = getattr(model, "tier_routing", None)
        if existing is None:
            existing = cls(model, plan)
            model.tier_routing = existing
        elif plan is not None:
            existing.set_plan(plan)
        return existing

    @property
    def num_moe_layers(self) -> int:
        return len(self.routers)

    def set_plan(self, plan: TierPlan) -> None:
        if (plan.num_experts, plan.top_k) != (self.num_experts, self.top_k):
            raise ValueError(f"tier plan is for n={plan.num_experts}, K={plan.top_k} but the model routes "
                             f"top-{self.top_k} of {self.num_experts} experts")
        self.plan = plan
        self._scope = plan.layers_in_scope(self.num_moe_layers)

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ---- choosing the path ------------------------------------------------------------------------
    @contextlib.contextmanager
    def using(self, state: RoutingState) -> Iterator[RoutingState]:
        previous, self.state = self.state, state
        try:
            yield state
        finally:
            self.state = previous

    def path(self, tiers: int | tuple[int, ...] = 1, *, record: bool = False, step: int = 0,
             token_mask: torch.Tensor | None = None) -> contextlib.AbstractContextManager[RoutingState]:
        """Context manager: forwards inside it run `tiers` (1 = standard; see `RoutingState`)."""
        wanted = set(tiers) if isinstance(tiers, tuple) else {tiers}
        if wanted != {1}:
            if self.plan is None:
                raise ValueError("no tier plan is set: call set_plan() before routing a tier path")
            bad = sorted(t for t in wanted if not 1 <= t <= self.plan.num_tiers)
            if bad:
                raise ValueError(f"tier(s) {bad} do not exist; the plan has tiers 1..{self.plan.num_tiers}")
        return self.using(RoutingState(tiers=tiers, record=record, step=step, token_mask=token_mask))

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        """`context_fn` for torch.utils.checkpoint: the recomputation sees the forward's routing state."""
        return contextlib.nullcontext(), self.using(replace(self.state, record=False))

    def enable_activation_checkpointing(self, model: nn.Module, every_n_layers: int = 1) -> None:
        """Turn on transformers' activation checkpointing with the routing state carried into recomputation."""
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False, "context_fn": self.checkpoint_context},
            every_n_layers=every_n_layers)

    def clear_records(self) -> None:
        self.records = {}

    def recorded(self) -> list[RouterRecord]:
        return [self.records[i] for i in sorted(self.records)]

    # ---- the hook ---------------------------------------------------------------------------------
    def _make_hook(self, layer: int):
        def hook(router: nn.Module, args: tuple, output: tuple) -> tuple:
            logits, weights, indices = output
            state = self.state
            in_scope = self.plan is not None and layer in self._scope
            if in_scope and state.tiers != 1:
                weights, indices = self._route(layer, router, logits, weights, indices, state)
            if state.record:
                self.records[layer] = RouterRecord(layer, self.routers[layer][0], logits, weights, indices,
                                                   self.specs[layer], in_scope)
            return logits, weights, indices
        return hook

    def _route(self, layer: int, router: nn.Module, logits: torch.Tensor, std_weights: torch.Tensor,
               std_indices: torch.Tensor, state: RoutingState) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(state.tiers, int):
            w, i = self._route_tokens(layer, router, logits, state.tiers, state, state.token_mask)
            return w.to(std_weights.dtype), i
        # One tier per batch row: route each row group with its own tier, pad to a common width with
        # zero-weight slots (uneven plans have tiers of different sizes; a zero weight adds nothing).
        rows = torch.tensor(state.tiers, device=logits.device)
        token_tiers = rows.repeat_interleave(logits.shape[0] // len(state.tiers))
        groups = []
        for tier in sorted(set(state.tiers)):
            where = (token_tiers == tier).nonzero().squeeze(-1)
            if tier == 1:
                groups.append((where, std_weights[where], std_indices[where]))
            else:
                mask = state.token_mask[where] if state.token_mask is not None else None
                groups.append((where, *self._route_tokens(layer, router, logits[where], tier, state, mask)))
        width = max(g[2].shape[1] for g in groups)
        weights = at_least_fp32(logits.new_zeros(logits.shape[0], width))
        indices = std_indices.new_zeros(logits.shape[0], width)
        for where, w, i in groups:
            weights[where, : w.shape[1]] = w.to(weights.dtype)
            indices[where, : i.shape[1]] = i
        return weights.to(std_weights.dtype), indices

    def _route_tokens(self, layer: int, router: nn.Module, logits: torch.Tensor, tier: int, state: RoutingState,
                      token_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        spec, plan = self.specs[layer], self.plan
        positions = plan.positions[tier - 1]
        with torch.no_grad():  # the selection is discrete; gradients flow through the weights only
            if plan.plan == "random":
                scores = torch.rand(logits.shape, generator=self._generator(layer, state.step, logits.device),
                                    device=logits.device)
            else:
                scores = ranking_scores(logits.detach(), spec, router)
            probabilities = None
            if plan.basis == "global":
                probabilities = routing_probabilities(logits.detach(), spec)
                if token_mask is not None:
                    probabilities = probabilities[token_mask]
            indices = select_tier_experts(scores, positions, plan.basis, probabilities)
        return tier_weights(logits, indices, spec, router), indices

    def _generator(self, layer: int, step: int, device: torch.device) -> torch.Generator:
        seed = (self.plan.seed * 1_000_003 + step) * 1_000_003 + layer
        return torch.Generator(device=device).manual_seed(seed % (2**63 - 1))


def _same_attr(routers: list[tuple[str, nn.Module]], attr: str) -> int:
    values = {getattr(gate, attr, None) for _, gate in routers}
    if len(values) != 1 or None in values:
        raise ValueError(f"MoE layers disagree on (or do not expose) `{attr}`: {sorted(map(str, values))}")
    return values.pop()
