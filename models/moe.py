"""Shared MoE machinery of the Ling backbones: fused experts, the three router kinds, the sparse block.

Router contract (models/routing.py relies on it): every MoE block keeps its router in `gate` and its fused
experts in `experts` (plus `shared_experts` when it has them). The block calls

    router_logits, weights, indices = self.gate(hidden_states_2d, modality_ids)

with `hidden_states_2d` [N, H] and `modality_ids` a LongTensor [N] or None, and feeds exactly the returned
`(indices, weights)` to `self.experts`, so a forward hook on the gate can replace them (tier routing). The
logits are float32 [N, E], pre-softmax / pre-sigmoid (for `multi_gate`: each token's own modality router);
the weights come back in the hidden dtype.

Routers carry `routing_family` ("softmax" | "sigmoid_bias"), `num_experts`, `top_k`; sigmoid routers also
`expert_bias` (buffer [E], used for selection only), `routed_scaling_factor` and `norm_topk_prob`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

# Modality ids carried by every token (the omni model's placeholder scatter sets them).
TEXT, IMAGE, AUDIO, VIDEO = 0, 1, 2, 3
# Ming-Lite-Omni routes video frames through the image router: its `prompt_wrap_vision` writes video
# features and their span into `image_start_indices`/`image_end_indices` (modeling_bailingmm.py).
MODALITY_TO_ROUTER = (0, 1, 2, 1)  # text, image, audio, video -> gate, image_gate, audio_gate, image_gate


@use_experts_implementation
class FusedExperts(nn.Module):
    """All routed experts of one layer as two 3-D tensors (SwiGLU experts).

    `gate_up_proj[e]` is `cat([gate_proj.weight, up_proj.weight])` of official expert `e` ([2I, H]) and
    `down_proj[e]` its `down_proj.weight` ([H, I]). `config._experts_implementation` picks the kernel:
    `grouped_mm` (default), `batched_mm`, or this class's `forward` (`eager`, a loop over the experts hit).
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.hidden_dim = config.hidden_size
        self.intermediate_dim = config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_experts, 2 * self.intermediate_dim, self.hidden_dim))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim, self.intermediate_dim))
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Eager reference: loops over the experts that received tokens (not a default path)."""
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            hit = torch.unique(top_k_index).tolist()
        for expert in hit:
            token, slot = torch.where(top_k_index == expert)
            gate, up = F.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = F.linear(self.act_fn(gate) * up, self.down_proj[expert]) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"


class GatedMLP(nn.Module):
    """SwiGLU MLP with the official parameter names (`gate_proj`, `up_proj`, `down_proj`): dense layers and
    shared experts (whose intermediate size is `moe_intermediate_size * num_shared_experts`)."""

    def __init__(self, config, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


# --------------------------------------------------------------------------------------------------
# Routers

class SoftmaxTopKRouter(nn.Module):
    """BailingMoe (Ling-lite) gate: softmax over all experts, top-K, optionally renormalised over the K.

    With `norm_topk_prob` the weights equal a softmax over the chosen experts' logits (METHOD.md eq. 1).
    Official Ling computes the logits in the hidden dtype; here they are computed in float32 (the contract).
    """

    routing_family = "softmax"

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.hidden_dim = config.hidden_size
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def compute_logits(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        return F.linear(hidden_states.float(), self.weight.float())

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None = None):
        logits = self.compute_logits(hidden_states, modality_ids)
        scores = logits.softmax(dim=-1)
        weights, indices = torch.topk(scores, k=self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights.to(hidden_states.dtype), indices

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


class MultiGateRouter(SoftmaxTopKRouter):
    """Ming-Lite-Omni `multi_gate`: one softmax router per modality over the same experts.

    `weight` is the text router (official `mlp.gate.weight`), `image_weight` / `audio_weight` the official
    `mlp.image_gate.weight` / `mlp.audio_gate.weight`. Each token uses the router of its modality id
    (0 text, 1 image, 2 audio, 3 video -> image, as Ming routes video frames); `modality_ids=None` = all text.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self.image_weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.audio_weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))

    def compute_logits(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None) -> torch.Tensor:
        if modality_ids is None:
            return F.linear(hidden_states.float(), self.weight.float())
        if modality_ids.shape != hidden_states.shape[:1]:
            raise ValueError(f"modality_ids has shape {tuple(modality_ids.shape)}, expected [{hidden_states.shape[0]}]")
        table = torch.tensor(MODALITY_TO_ROUTER, device=modality_ids.device)
        if modality_ids.numel() and (modality_ids.min() < 0 or modality_ids.max() >= len(MODALITY_TO_ROUTER)):
            raise ValueError(f"modality ids must be 0 text, 1 image, 2 audio or 3 video; got {modality_ids.unique().tolist()}")
        router = table[modality_ids]  # [N] in {0, 1, 2}
        stacked = torch.cat([self.weight, self.image_weight, self.audio_weight]).float()  # [3E, H]
        all_logits = F.linear(hidden_states.float(), stacked).view(-1, 3, self.num_experts)
        return all_logits.gather(1, router.view(-1, 1, 1).expand(-1, 1, self.num_experts)).squeeze(1)


class SigmoidGroupRouter(nn.Module):
    """BailingMoeV2 (Ling-mini-2.0) / DeepSeek-V3 gate: sigmoid scores, a selection-only `expert_bias`,
    group-limited top-K (the `topk_group` of `n_group` groups with the highest sum of their two best biased
    scores), weights = the chosen unbiased scores, renormalised (`norm_topk_prob`), times `routed_scaling_factor`.
    """

    routing_family = "sigmoid_bias"

    def __init__(self, config) -> None:
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = int(config.n_group or 1)
        self.topk_group = int(config.topk_group or 1)
        self.norm_topk_prob = bool(getattr(config, "norm_topk_prob", True))
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.hidden_dim = config.hidden_size
        if self.num_experts % self.n_group:
            raise ValueError(f"num_experts={self.num_experts} is not divisible by n_group={self.n_group}")
        if self.topk_group * (self.num_experts // self.n_group) < self.top_k:
            raise ValueError(f"topk_group={self.topk_group} groups of {self.num_experts // self.n_group} experts "
                             f"cannot hold num_experts_per_tok={self.top_k}")
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.hidden_dim))
        self.register_buffer("expert_bias", torch.zeros(self.num_experts), persistent=True)

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None = None):
        logits = F.linear(hidden_states.float(), self.weight.float())
        scores = logits.sigmoid()
        choice = scores + self.expert_bias.float()
        if self.n_group > 1 and self.topk_group < self.n_group:
            n = choice.shape[0]
            per_group = self.num_experts // self.n_group
            grouped = choice.view(n, self.n_group, per_group)
            group_scores = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            group_idx = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_idx, True)
            choice = choice.masked_fill(~group_mask.unsqueeze(-1).expand_as(grouped).reshape(n, -1), float("-inf"))
        indices = torch.topk(choice, k=self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * self.routed_scaling_factor
        return logits, weights.to(hidden_states.dtype), indices

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, n_group={self.n_group}, "
                f"topk_group={self.topk_group}, routed_scaling_factor={self.routed_scaling_factor}")


# --------------------------------------------------------------------------------------------------

class SparseMoeBlock(nn.Module):
    """Router (`gate`) + fused routed experts (`experts`) + optional `shared_experts` (always on)."""

    def __init__(self, config, router: nn.Module) -> None:
        super().__init__()
        self.gate = router
        self.experts = FusedExperts(config)
        shared = int(getattr(config, "num_shared_experts", 0) or 0)
        self.shared_experts = GatedMLP(config, config.moe_intermediate_size * shared) if shared > 0 else None

    def forward(self, hidden_states: torch.Tensor, modality_ids: torch.Tensor | None = None) -> torch.Tensor:
        shape = hidden_states.shape
        x = hidden_states.reshape(-1, shape[-1])
        ids = modality_ids.reshape(-1) if modality_ids is not None else None
        _, weights, indices = self.gate(x, ids)
        out = self.experts(x, indices, weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.view(shape)


def init_moe_module(module: nn.Module, std: float) -> None:
    """`_init_weights` part for the modules above (random init; a checkpoint overwrites everything)."""
    from transformers import initialization as init

    if isinstance(module, FusedExperts):
        init.normal_(module.gate_up_proj, mean=0.0, std=std)
        init.normal_(module.down_proj, mean=0.0, std=std)
    elif isinstance(module, (SoftmaxTopKRouter, SigmoidGroupRouter)):
        for param in module.parameters(recurse=False):
            init.normal_(param, mean=0.0, std=std)
        if isinstance(module, SigmoidGroupRouter):
            init.zeros_(module.expert_bias)
