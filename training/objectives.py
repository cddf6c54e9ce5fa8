"""Training heads: `ntp` (the baseline) and `ordmoe` (METHOD.md sections 4 and 5), as registered objectives.

An objective runs the forward pass(es) of one micro-batch and hands each loss term to the engine
(`training/engine.py`: `backward(term)`, then `backward_shared(...)` once for the shared inputs). Because
L is a sum of per-path terms with constant coefficients, back-propagating path by path gives the
exact gradient of L with the activation memory of one path (Finding 3); paths whose advantage is
exactly 0 carry no gradient and are skipped (Finding 2). What every path shares (embeddings,
encoder features) is computed once: the paths start from a detached copy and its gradient is sent
back through the shared part in one final backward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn

from models.registry import Registry
from models.routing import TierRouting, moe_routers
from models.tiers import TierConfig, build_tier_plan
from training.losses import (advantages, expert_rank_loss, load_balance_loss, mean_token_logprob,
                             next_token_loss, supervised_samples, tier_order_agreement, token_logprobs)

OBJECTIVES: Registry = Registry("objective")


class GradientSink(Protocol):
    """The part of an engine (training/engine.py) an objective back-propagates through."""

    def backward(self, loss: torch.Tensor) -> None: ...

    def backward_shared(self, outputs: torch.Tensor, grad: torch.Tensor) -> None: ...


class Autograd:
    """A plain callable `backward(term)` as a sink; the shared inputs go through torch autograd."""

    def __init__(self, backward: Callable[[torch.Tensor], None]) -> None:
        self.backward = backward

    def backward_shared(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        torch.autograd.backward(outputs, grad_tensors=grad)


class Reducer(Protocol):
    """The part of an engine that sums over ranks (the aux-loss-free bias update needs global loads)."""

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ObjectiveConfig:
    """The `objective:` section of a training config. Defaults are the paper's (METHOD.md 4)."""

    name: Literal["ntp", "ordmoe"] = "ordmoe"
    tiers: TierConfig = field(default_factory=TierConfig)
    rewards: list[float] | None = None  # r_1 > ... > r_C; default evenly spaced 1..0 ([1, .5, 0] for C=3)
    advantage: Literal["zscore", "centered", "raw"] = "zscore"
    lambda_erl: float = 1.0
    lambda_bal: float = 1.0
    balance_tokens: Literal["attention", "labels"] = "attention"  # tokens L_bal counts (pad never counts)
    bias_update_rate: float = 0.0  # aux-loss-free expert-bias update for sigmoid routers (0 = off)
    execution: Literal["sequential", "batched", "naive"] = "sequential"  # naive: all paths, one backward
    skip_zero_advantage: bool = True
    diag_every: int = 50  # measure skipped tiers (no grad) every this many steps
    rank_loss_floor: float | None = None  # opt-in safeguard: no push below this Lbar (Finding 4)

    def __post_init__(self) -> None:
        c = self.tiers.num_tiers
        if self.name == "ntp" and c != 1:
            self.tiers = TierConfig(num_tiers=1)
            c = 1
        if self.rewards is None:
            self.rewards = [1 - i / (c - 1) for i in range(c)] if c > 1 else [1.0]
        if len(self.rewards) != c:
            raise ValueError(f"rewards has {len(self.rewards)} values but the tier plan has C={c} tiers")
        if any(a <= b for a, b in zip(self.rewards, self.rewards[1:])):
            raise ValueError(f"rewards must be strictly decreasing (r_1 > r_2 > ... > r_C), got {self.rewards}")
        if self.diag_every < 1:
            raise ValueError(f"diag_every must be >= 1, got {self.diag_every}")


@dataclass
class StepResult:
    loss: float
    parts: dict[str, float]


class TierObjective:
    """L = L_NTP(path 1) + lambda_ERL * L_ERL + lambda_bal * L_bal(path 1); with C = 1 this is `ntp`."""

    def __init__(self, config: ObjectiveConfig, model: nn.Module) -> None:
        self.config = config
        self.num_tiers = config.tiers.num_tiers
        has_moe = bool(moe_routers(model))
        if self.num_tiers > 1 and not has_moe:
            raise ValueError(f"objective 'ordmoe' needs an MoE model, but {type(model).__name__} has no MoE layers")
        self.routing = TierRouting.attach(model) if has_moe else None
        if self.routing is not None:
            self.routing.set_plan(build_tier_plan(config.tiers, self.routing.num_experts, self.routing.top_k))
        self.advantages = advantages(config.rewards, config.advantage)
        self.grad_tiers = [c for c in range(1, self.num_tiers + 1)
                           if c == 1 or not (config.skip_zero_advantage and self.advantages[c - 1] == 0.0)]
        self._expert_loads: list[torch.Tensor] = []  # summed over the micro-batches of the current step

    # ---- one micro-batch ----------------------------------------------------------------------------
    def __call__(self, model: nn.Module, batch: dict[str, Any],
                 backward: GradientSink | Callable[[torch.Tensor], None] | None = None, step: int = 0) -> StepResult:
        """Run the paths for `batch`; back-propagate each term through `backward` (an engine, or a callable
        taking the term) when training. Returns L and its parts.

        `step` is the 1-based optimizer step: skipped tiers are measured when it is a multiple of `diag_every`.
        """
        labels = batch["labels"]
        training = backward is not None
        sink = backward if backward is None or hasattr(backward, "backward_shared") else Autograd(backward)
        with torch.set_grad_enabled(training):
            shared, forward_kwargs = shared_inputs(model, batch)
        start = shared.detach().requires_grad_(True) if training and shared.requires_grad else shared
        mask_tokens = _balance_mask(self.config.balance_tokens, batch)
        # packed rows: Lbar, the rank loss and tier agreement stay per packed sample, not per row
        packed = batch.get("sample_index")
        segments = packed[:, 1:] if packed is not None else None  # the sample of each target token
        per_sample = {"segments": segments, "num_samples": len(batch["ids"]) if packed is not None else 0}
        sample_mask = supervised_samples(labels[:, 1:] != -100, **per_sample)
        has_targets = (labels[:, 1:] != -100).any()

        measure_all = self.num_tiers > 1 and (not training or step % self.config.diag_every == 0)
        grad_tiers = self.grad_tiers if self.config.execution != "naive" else list(range(1, self.num_tiers + 1))
        lbar: dict[int, torch.Tensor] = {}
        parts: dict[str, float] = {}
        total = 0.0

        def term_for(tier: int, logits: torch.Tensor, records) -> torch.Tensor:
            logprobs, mask = token_logprobs(logits, labels)
            lbar[tier] = mean_token_logprob(logprobs, mask, **per_sample)
            erl = expert_rank_loss({tier: lbar[tier]}, self.advantages, sample_mask, self.config.rank_loss_floor)
            term = self.config.lambda_erl * erl if self.num_tiers > 1 else torch.zeros((), device=logits.device)
            parts[f"erl_tier{tier}"] = erl.item()
            if tier == 1:
                ntp = next_token_loss(logprobs, mask)
                bal = load_balance_loss(records, mask_tokens) if records else torch.zeros((), device=logits.device)
                if training:
                    self._add_expert_loads([_expert_load(r, mask_tokens) for r in records])
                parts.update(ntp=ntp.item(), bal=bal.item())
                term = term + ntp + self.config.lambda_bal * bal * has_targets
            return term

        with torch.set_grad_enabled(training):
            if self.config.execution == "batched" and len(grad_tiers) > 1:
                rows = tuple(t for t in grad_tiers for _ in range(shared.shape[0]))
                stacked = {k: _repeat(v, len(grad_tiers), _batch_dim(k, v)) for k, v in forward_kwargs.items()}
                logits = self._forward(model, _repeat(start, len(grad_tiers)), stacked,
                                       rows, record=True, step=step, token_mask=_repeat(mask_tokens, len(grad_tiers)))
                records = self._path_one_records(shared.shape[0] * shared.shape[1])
                terms = [term_for(t, chunk, records if t == 1 else None)
                         for t, chunk in zip(grad_tiers, logits.chunk(len(grad_tiers)))]
                loss = sum(terms)
                total += loss.item()
                if training:
                    sink.backward(loss)
            else:
                pending = 0.0
                for tier in grad_tiers:
                    logits = self._forward(model, start, forward_kwargs, tier, record=tier == 1, step=step,
                                           token_mask=mask_tokens)
                    records = self.routing.recorded() if (tier == 1 and self.routing) else None
                    term = term_for(tier, logits, records)
                    del logits
                    if self.config.execution == "naive":
                        pending = pending + term
                        continue
                    total += term.item()
                    if training:
                        sink.backward(term)
                if self.config.execution == "naive":
                    total += pending.item()
                    if training:
                        sink.backward(pending)
            if self.routing is not None:
                self.routing.clear_records()

        if measure_all:
            with torch.no_grad():
                for tier in range(1, self.num_tiers + 1):
                    if tier not in lbar:
                        logits = self._forward(model, start.detach(), forward_kwargs, tier, record=False,
                                               step=step, token_mask=mask_tokens)
                        lbar[tier] = mean_token_logprob(*token_logprobs(logits, labels), **per_sample)
        if training and start is not shared and start.grad is not None:
            # The shared part (embeddings, encoders) gets the summed gradient of all paths, once. The
            # engine already scaled that gradient (accumulation) in the path backwards, so it is not
            # scaled a second time; the engine owns the backward (DeepSpeed reduces it like the others).
            sink.backward_shared(shared, start.grad)

        for tier, value in lbar.items():
            parts[f"logp_tier{tier}"] = (value * sample_mask).sum().item() / max(int(sample_mask.sum()), 1)
        if self.num_tiers > 1:
            parts["erl"] = sum(parts.pop(f"erl_tier{t}", 0.0) for t in range(1, self.num_tiers + 1))
            if len(lbar) == self.num_tiers:
                parts["tier_order_agreement"] = tier_order_agreement(lbar, sample_mask)
        else:
            parts.pop("erl_tier1", None)
            parts["erl"] = 0.0
        parts["supervised_tokens"] = float((labels[:, 1:] != -100).sum())
        return StepResult(loss=float(total), parts=parts)

    def _add_expert_loads(self, loads: list[torch.Tensor]) -> None:
        if not self._expert_loads:
            self._expert_loads = loads
        else:
            for total, load in zip(self._expert_loads, loads):
                total += load

    def after_optimizer_step(self, reducer: Reducer | None = None, applied: bool = True) -> None:
        """Aux-loss-free balancing (sigmoid routers): nudge each expert's selection bias toward even load.

        The load is the step's: summed over its micro-batches and, through `reducer`, over ranks (every
        rank then applies the same update). A skipped step (`applied=False`) updates nothing.
        """
        loads, self._expert_loads = self._expert_loads, []
        rate = self.config.bias_update_rate
        if rate == 0 or self.routing is None or not loads or not applied:
            return
        if reducer is not None:
            flat = reducer.sum_over_ranks(torch.cat(loads))
            loads = list(flat.split([len(load) for load in loads]))
        for (_, router), spec, load in zip(self.routing.routers, self.routing.specs, loads):
            if spec.family != "sigmoid_bias":
                continue
            bias = getattr(router, spec.bias_attr)
            bias.add_(rate * torch.sign(load.mean() - load).to(bias.dtype))

    # ---- helpers ------------------------------------------------------------------------------------
    def _forward(self, model: nn.Module, embeds: torch.Tensor, kwargs: dict[str, Any], tiers, *, record: bool,
                 step: int, token_mask: torch.Tensor | None) -> torch.Tensor:
        # use_cache=False: a training forward must not fill a KV cache (memory), and transformers only
        # derives the packed-sequence mask from position_ids when there is no cache
        if self.routing is None:
            return model(inputs_embeds=embeds, use_cache=False, **kwargs).logits
        with self.routing.path(tiers, record=record, step=step, token_mask=token_mask):
            return model(inputs_embeds=embeds, use_cache=False, **kwargs).logits

    def _path_one_records(self, num_tokens: int):
        """Router records of the path-1 rows of a batched forward (they come first)."""
        if self.routing is None:
            return None
        k = self.routing.top_k
        return [type(r)(r.layer, r.name, r.logits[:num_tokens], r.weights[:num_tokens, :k],
                        r.indices[:num_tokens, :k], r.spec, r.in_scope) for r in self.routing.recorded()]


def shared_inputs(model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """What every path shares, computed once: `(inputs_embeds, other forward kwargs)`.

    Multimodal models provide `embed_inputs(batch)` (encoders + placeholder scatter); a plain LM
    embeds its `input_ids`.
    """
    if hasattr(model, "embed_inputs"):
        return model.embed_inputs(batch)
    embeds = model.get_input_embeddings()(batch["input_ids"])
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids", "modality_ids") if batch.get(k) is not None}
    return embeds, kwargs


def _balance_mask(kind: str, batch: dict[str, Any]) -> torch.Tensor | None:
    """The tokens L_bal averages over: supervised ones, or all real ones (padding is never counted)."""
    if kind == "labels":
        return (batch["labels"] != -100).reshape(-1)
    if batch.get("attention_mask") is not None:
        return batch["attention_mask"].bool().reshape(-1)
    if batch.get("sample_index") is not None:  # packed rows carry no attention_mask
        return (batch["sample_index"] >= 0).reshape(-1)
    return None


def _expert_load(record, token_mask: torch.Tensor | None) -> torch.Tensor:
    indices = record.indices if token_mask is None else record.indices[token_mask]
    n = record.logits.shape[-1]
    return torch.bincount(indices.reshape(-1), minlength=n).float().detach()


def _repeat(value: Any, times: int, dim: int = 0) -> Any:
    return torch.cat([value] * times, dim=dim) if isinstance(value, torch.Tensor) else value


def _batch_dim(key: str, value: Any) -> int:
    """3-D RoPE position ids are [4, B, T] (models/rope.py): their batch is dim 1."""
    return 1 if key == "position_ids" and isinstance(value, torch.Tensor) and value.ndim == 3 else 0


@OBJECTIVES.register("ntp")
def ntp(config: ObjectiveConfig, model: nn.Module) -> TierObjective:
    """Baseline: cross-entropy on supervised tokens + lambda_bal * L_bal (C is 1 whatever the tiers say)."""
    return TierObjective(config, model)


@OBJECTIVES.register("ordmoe")
def ordmoe(config: ObjectiveConfig, model: nn.Module) -> TierObjective:
    """OrdMoE: ntp + lambda_ERL * expert rank loss over C routing tiers."""
    return TierObjective(config, model)


def build_objective(config: ObjectiveConfig, model: nn.Module) -> TierObjective:
    return OBJECTIVES.build(config.name, config, model)
