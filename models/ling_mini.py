"""Ling-mini-2.0 (BailingMoeV2), written transformers-style on the Ling-lite building blocks.

Differences from Ling-lite, all as in inclusionAI/Ling-V2 `modeling_bailing_moe_v2.py`: sigmoid router with a
selection-only `expert_bias` buffer and group-limited top-K scaled by `routed_scaling_factor`; QK-norm
(`attention.query_layernorm` / `key_layernorm`); partial RoPE (`partial_rotary_factor`: Ling-mini-2.0 sets 0.5
= half of each head, absent = 1.0); the first `first_k_dense_replace` layers dense; `num_nextn_predict_layers`
multi-token-prediction layers stored after the decoder layers (`model.layers.{num_hidden_layers + k}`).

MTP (DeepSeek-V3 style, depth k = 0, 1, ...): the layer combines the previous depth's hidden state (the
final-normed main hidden state for k = 0) with the embedding of the token k+1 ahead,
`eh_proj(cat[enorm(emb(x_{t+k+1})), hnorm(h_t)])`, runs attention + MoE, `final_layernorm`, and the shared
`lm_head` predicts token t+k+2. When `labels` are given, `loss = ce + mtp_loss_scaling_factor * sum_k mtp_k`
(official weighting); `mtp_loss` (the unscaled sum) and `mtp_logits` are returned separately. The MTP layers
run only when labels are given or `return_mtp=True` (generation never needs them; the official code also
runs them while decoding, which changes nothing in the main logits).

MTP input, as the official `BailingMoeV2Model.forward` (`roll_tensor(input_ids, shifts=-1)`, fill value 0, then
`word_embeddings`): at each depth the input ids are shifted one more position left, the freed last position
holds token id 0, and the shifted ids are embedded. Two deliberate departures, neither affecting any
supervised target: called with `inputs_embeds` only (multimodal inputs), the main input embeddings are
shifted instead of re-embedding ids (the freed positions still get the embedding of token id 0; media
positions keep their features where the official code would embed the placeholder token); and the MTP
targets are shifted per row (the official flattens the batch before the loss's own shift, so each row's
last position is scored against the next row's second label).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from models.backbones import BACKBONES, check_config_keys
from models.ling_lite import (LingAttention, LingLiteForCausalLM, LingLiteModel, LingRMSNorm, _loss_kwargs,
                              build_router)
from models.moe import SparseMoeBlock


class LingMiniConfig(PretrainedConfig):
    """BailingMoeV2 config: the fields and defaults of the official `BailingMoeV2Config`
    (inclusionAI/Ling-V2 `models/configuration_bailing_moe_v2.py`), so an absent config.json field means
    what it means to the official code. Defaults worth knowing (all from that class unless noted):
    `routed_scaling_factor=1.0`, `num_nextn_predict_layers=0`, `mtp_loss_scaling_factor=0`, `n_group=8`,
    `topk_group=4`, `use_qk_norm=True`, `moe_router_enable_expert_bias=True`, `rms_norm_eps=1e-6`,
    `head_dim=128`, `first_k_dense_replace=1`, `rope_scaling=None`.

    Fields the official class does not declare but its modeling code or the release config.json use:
    - `partial_rotary_factor`: absent -> 1.0 (full RoPE), as `BailingMoeV2Attention.__init__`
      (`... if hasattr(config, "partial_rotary_factor") else 1.0`) and transformers' default RoPE init read it;
      Ling-mini-2.0's config.json sets 0.5.
    - `score_function`, `norm_topk_prob`, `router_dtype`: `BailingMoeV2Gate` always scores with a sigmoid,
      always renormalises the top-K weights (K > 1) and always computes in float32, whatever these say; so
      only those values are accepted (another value would describe a model the official code does not run).
    - `moe_shared_expert_intermediate_size`: must equal `moe_intermediate_size * num_shared_experts`, the
      size `BailingMoeV2SparseMoeBlock` builds.
    - `moe_router_enable_expert_bias`: the official gate registers and adds `expert_bias` regardless, so
      `False` is refused rather than silently computing with the bias.
    """

    model_type = "bailing_moe_v2"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 157184,
        hidden_size: int = 2048,
        intermediate_size: int = 5120,
        num_hidden_layers: int = 20,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 4,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = False,
        rms_norm_eps: float = 1e-6,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.0,  # stored; the official modeling code never reads it
        attention_dropout: float = 0.0,
        output_dropout: float = 0.0,  # stored; the official modeling code never reads it
        initializer_range: float = 0.02,
        max_position_embeddings: int = 32768,
        rope_theta: float = 600000.0,
        use_cache: bool = True,
        max_window_layers: int = 20,  # stored; the official modeling code never reads it
        rope_scaling: dict | None = None,
        pad_token_id: int | None = 156892,
        eos_token_id: int | None = 156892,
        num_experts: int = 256,
        num_shared_experts: int = 1,
        num_experts_per_tok: int = 8,
        n_group: int = 8,
        topk_group: int = 4,
        moe_intermediate_size: int = 512,
        first_k_dense_replace: int = 1,
        head_dim: int | None = 128,
        output_router_logits: bool = False,
        use_qk_norm: bool = True,
        num_nextn_predict_layers: int = 0,
        mtp_loss_scaling_factor: float = 0.0,
        moe_router_enable_expert_bias: bool = True,
        routed_scaling_factor: float = 1.0,
        # not declared by the official class (see the docstring)
        partial_rotary_factor: float = 1.0,
        score_function: str = "sigmoid",
        norm_topk_prob: bool = True,
        router_dtype: str = "fp32",
        moe_shared_expert_intermediate_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        if rope_scaling is not None:
            raise ValueError(f"rope_scaling={rope_scaling!r}: only the default RoPE is implemented for BailingMoeV2")
        if score_function != "sigmoid":
            raise ValueError(f"score_function={score_function!r}: BailingMoeV2Gate always scores with 'sigmoid'")
        if norm_topk_prob is not True:
            raise ValueError(f"norm_topk_prob={norm_topk_prob!r}: BailingMoeV2Gate always renormalises the top-K weights")
        if router_dtype != "fp32":
            raise ValueError(f"router_dtype={router_dtype!r}: BailingMoeV2Gate always routes in float32 ('fp32')")
        if moe_router_enable_expert_bias is not True:
            raise ValueError("moe_router_enable_expert_bias=False: BailingMoeV2Gate always adds its expert_bias")
        if not 0.0 < float(partial_rotary_factor) <= 1.0:
            raise ValueError(f"partial_rotary_factor={partial_rotary_factor!r} must be in (0, 1]")
        shared = moe_intermediate_size * (num_shared_experts or 0)
        if moe_shared_expert_intermediate_size not in (None, shared):
            raise ValueError(f"moe_shared_expert_intermediate_size={moe_shared_expert_intermediate_size} but "
                             f"moe_intermediate_size * num_shared_experts = {shared}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta  # rope_scaling is None (checked above), so nothing to store
        self.partial_rotary_factor = float(partial_rotary_factor)
        self.use_cache = use_cache
        self.max_window_layers = max_window_layers
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.moe_intermediate_size = moe_intermediate_size
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        # official: `head_dim or hidden_size // num_attention_heads`
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.output_router_logits = output_router_logits
        self.use_qk_norm = use_qk_norm
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.mtp_loss_scaling_factor = mtp_loss_scaling_factor
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.routed_scaling_factor = routed_scaling_factor
        self.norm_topk_prob = norm_topk_prob
        self.score_function = score_function
        self.router_dtype = router_dtype
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class LingMTPLayer(GradientCheckpointingLayer):
    """One multi-token-prediction depth (official `BailingMoeV2MTPLayer` names)."""

    is_mtp_layer = True

    def __init__(self, config: LingMiniConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.enorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.input_layernorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.attention = LingAttention(config, layer_idx)
        self.post_attention_layernorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config, build_router(config))
        self.final_layernorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_embeds: torch.Tensor, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                modality_ids: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        hidden_states = self.eh_proj(torch.cat([self.enorm(input_embeds), self.hnorm(hidden_states)], dim=-1))
        residual = hidden_states
        hidden_states = residual + self.attention(self.input_layernorm(hidden_states), position_embeddings,
                                                  attention_mask)
        residual = hidden_states
        hidden_states = residual + self.mlp(self.post_attention_layernorm(hidden_states), modality_ids)
        return self.final_layernorm(hidden_states)


class LingMiniModel(LingLiteModel):
    config_class = LingMiniConfig

    def _build_layers(self, config) -> list[nn.Module]:
        return super()._build_layers(config) + [LingMTPLayer(config, config.num_hidden_layers + k)
                                                for k in range(config.num_nextn_predict_layers)]

    @property
    def mtp_layers(self) -> list[LingMTPLayer]:
        return list(self.layers[self.config.num_hidden_layers:])


@dataclass
class LingMiniCausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` includes `mtp_loss_scaling_factor * mtp_loss`; `mtp_loss` is the unscaled sum over MTP depths."""

    mtp_loss: torch.FloatTensor | None = None
    mtp_logits: tuple[torch.FloatTensor, ...] | None = None


def roll_left(x: torch.Tensor, shift: int, fill: float | int) -> torch.Tensor:
    """Shift along dim 1 by `shift` positions to the left, filling the tail with `fill` (per row)."""
    out = torch.roll(x, shifts=-shift, dims=1)
    out[:, -shift:] = fill
    return out


class LingMiniForCausalLM(LingLiteForCausalLM):
    config_class = LingMiniConfig
    model_class = LingMiniModel

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, modality_ids: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                return_mtp: bool = False, **kwargs: Any) -> LingMiniCausalLMOutput:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             modality_ids=modality_ids, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        main_hidden = hidden_states
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.compute_logits(hidden_states)
        loss = None
        loss_kwargs = _loss_kwargs(kwargs)
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **loss_kwargs)

        mtp_loss = mtp_logits = None
        depth = self.config.num_nextn_predict_layers
        if depth > 0 and (labels is not None or return_mtp):
            extras = outputs.extras
            if past_key_values is not None and past_key_values.get_seq_length() > main_hidden.shape[1]:
                raise ValueError("MTP layers need the whole sequence in one forward (no KV-cache prefix)")
            embeds = extras["inputs_embeds"]
            shifted_ids = input_ids
            length = embeds.shape[1]
            positions = (position_ids if position_ids is not None
                         else torch.arange(length, device=embeds.device).unsqueeze(0))
            mask = create_causal_mask(config=self.config, inputs_embeds=embeds, attention_mask=attention_mask,
                                      past_key_values=None, position_ids=positions)
            h, mtp_logits, losses = main_hidden, [], []
            shifted_labels = labels
            for layer in self.model.mtp_layers:
                if shifted_ids is not None:  # official: shift the ids, fill with token id 0, embed
                    shifted_ids = roll_left(shifted_ids, 1, 0)
                    embeds = self.model.word_embeddings(shifted_ids)
                else:
                    embeds = roll_left(embeds, 1, 0.0)
                    embeds[:, -1] = self.model.word_embeddings.weight[0].to(embeds.dtype)
                h = layer(embeds, h, attention_mask=mask, position_embeddings=extras["position_embeddings"],
                          modality_ids=extras["modality_ids"])
                mtp_logits.append(self.compute_logits(h))
                if labels is not None:
                    shifted_labels = roll_left(shifted_labels, 1, -100)
                    losses.append(self.loss_function(mtp_logits[-1], shifted_labels, self.vocab_size, **loss_kwargs))
            mtp_logits = tuple(mtp_logits)
            if losses:
                mtp_loss = torch.stack(losses).sum()
                loss = loss + self.config.mtp_loss_scaling_factor * mtp_loss
        return LingMiniCausalLMOutput(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                      hidden_states=outputs.hidden_states, mtp_loss=mtp_loss, mtp_logits=mtp_logits)


@BACKBONES.register("ling-mini-2.0")
def ling_mini(config: dict[str, Any], source: str = "<config>") -> LingMiniForCausalLM:
    """Ling-mini-2.0 (BailingMoeV2) with random weights; `config` holds LingMiniConfig fields."""
    check_config_keys(LingMiniConfig, config, source)
    return LingMiniForCausalLM(LingMiniConfig(**config))
