"""Ling-lite (BailingMoe v1, the LLM of Ming-Lite-Omni), written transformers-style.

Module and parameter names follow the official checkpoints (inclusionAI/Ling `modeling_bailing_moe.py`,
Ming-Lite-Omni's variant with modality routers) so loading needs little mapping: `model.word_embeddings`,
`attention.query_key_value` / `attention.dense`, `mlp.gate`, `mlp.shared_experts`, `model.norm`, `lm_head`.
The routed experts are fused (`mlp.experts.gate_up_proj` / `down_proj`, models/moe.py); models/checkpoint.py
converts the official per-expert keys both ways.

The building blocks here (norm, RoPE with an optional partial rotary factor, fused-QKV attention with
optional QK-norm, decoder layer) are shared with Ling-mini-2.0 (models/ling_mini.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from models.backbones import BACKBONES, check_config_keys
from models.moe import (GatedMLP, MultiGateRouter, SigmoidGroupRouter, SoftmaxTopKRouter, SparseMoeBlock,
                        init_moe_module)
from models.rope import LingRope, MultimodalRope, is_3d_rope, split_position_ids


ROPE_TYPES = ("3D",)  # rope_scaling types accepted besides None (1-D RoPE)


class LingLiteConfig(PretrainedConfig):
    """BailingMoe config: the fields and defaults of the official `BailingMoeConfig` (inclusionAI/Ling
    `models/configuration_bailing_moe.py`; Ming-Lite-Omni's copy, `configuration_bailing_moe.py`, adds
    `multi_gate=False` and `image_patch_token=126346`), so an absent config.json field means what it means
    to the official code. Note those defaults are not Ling-lite's: e.g. `use_bias=True`, `rms_norm_eps=1e-5`,
    `norm_head=False`, `num_experts=16`, dropouts 0.1; a release's config.json states its own values.

    - `num_key_value_heads=0` (the official default) means one KV head per attention head.
    - `rope_scaling`: None (1-D RoPE) or `{"type": "3D", ...}` (Ming-Lite-Omni v1.5: the multimodal 3-D
      positions of `BailingMoe3DRotaryEmbedding`); the type is kept as `rope_scaling_type`. The official
      `linear` / `dynamic` / `yarn` scalings are not implemented and are refused.
    - `image_start_token` / `video_start_token`: read by Ming v1.5's `get_rope_index` (modeling_bailingmm.py).
    - `embedding_dropout`, `output_dropout`, `use_sliding_window`, `sliding_window`, `max_window_layers`: stored
      as the official class does; its modeling code never reads them, and neither does ours.
    """

    model_type = "bailing_moe"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 30592,
        hidden_size: int = 1024,
        intermediate_size: int | None = None,
        num_hidden_layers: int = 24,
        num_attention_heads: int = 16,
        num_key_value_heads: int = 0,
        hidden_act: str = "silu",
        use_qkv_bias: bool = False,
        use_bias: bool = True,
        rms_norm_eps: float = 1e-5,
        norm_head: bool = False,
        tie_word_embeddings: bool = False,
        embedding_dropout: float = 0.1,
        attention_dropout: float = 0.1,
        output_dropout: float = 0.1,
        initializer_range: float = 0.02,
        max_position_embeddings: int = 16384,
        rope_theta: float = 10000.0,
        use_cache: bool = True,
        use_sliding_window: bool = False,
        sliding_window: int = 4096,
        max_window_layers: int = 28,
        rope_scaling: dict | None = None,
        pad_token_id: int | None = 126081,
        num_experts: int = 16,
        num_shared_experts: int = 0,
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        moe_intermediate_size: int | None = None,
        first_k_dense_replace: int = 0,
        head_dim: int | None = None,
        output_router_logits: bool = False,
        # Ming-Lite-Omni's additions
        multi_gate: bool = False,
        image_patch_token: int | None = 126346,
        image_start_token: int | None = None,
        video_start_token: int | None = None,
        eos_token_id: int | None = None,  # not an argument of the official class: PretrainedConfig's default
        rope_scaling_type: str | None = None,  # a saved config's form of rope_scaling (ours)
        **kwargs: Any,
    ) -> None:
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"rope_scaling={rope_scaling!r} must be a mapping with a `type`")
            # official: `rope_scaling["type"]`; transformers' newer spelling is `rope_type`
            rope_scaling_type = rope_scaling.get("type", rope_scaling.get("rope_type"))
        if rope_scaling_type is not None and rope_scaling_type not in ROPE_TYPES:
            raise ValueError(f"rope_scaling.type={rope_scaling_type!r} is not implemented (implemented: 1-D RoPE "
                             f"with rope_scaling=null, and {', '.join(map(repr, ROPE_TYPES))})")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.hidden_act = hidden_act
        self.use_qkv_bias = use_qkv_bias
        self.use_bias = use_bias
        self.rms_norm_eps = rms_norm_eps
        self.norm_head = norm_head
        self.embedding_dropout = embedding_dropout
        self.attention_dropout = attention_dropout
        self.output_dropout = output_dropout
        self.initializer_range = initializer_range
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rope_scaling_type = rope_scaling_type
        self.use_cache = use_cache
        self.use_sliding_window = use_sliding_window
        self.sliding_window = sliding_window
        self.max_window_layers = max_window_layers
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.moe_intermediate_size = moe_intermediate_size
        self.first_k_dense_replace = first_k_dense_replace
        # official: `head_dim or hidden_size // num_attention_heads`
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.output_router_logits = output_router_logits
        self.multi_gate = multi_gate
        self.image_patch_token = image_patch_token
        self.image_start_token = image_start_token
        self.video_start_token = video_start_token
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


# --------------------------------------------------------------------------------------------------
# Building blocks (shared with Ling-mini-2.0)

class LingRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q, k [B, heads, T, D]; cos, sin [B, T, rot] with rot <= D (partial RoPE keeps the rest)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def rope(x: torch.Tensor) -> torch.Tensor:
        if rot == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        return torch.cat([x_rot * cos + rotate_half(x_rot) * sin, x_pass], dim=-1)

    return rope(q), rope(k)


def eager_attention(module: nn.Module, query, key, value, attention_mask, scaling: float, dropout: float = 0.0, **kwargs):
    groups = module.num_key_value_groups
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class LingAttention(nn.Module):
    """Fused-QKV GQA attention (`query_key_value`, `dense`); QK-norm (`query_layernorm`, `key_layernorm`)
    when `config.use_qk_norm` (Ling 2.0)."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        self.query_key_value = nn.Linear(config.hidden_size, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim,
                                         bias=config.use_qkv_bias)
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.use_bias)
        self.use_qk_norm = bool(getattr(config, "use_qk_norm", False))
        if self.use_qk_norm:
            self.query_layernorm = LingRMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.key_layernorm = LingRMSNorm(self.head_dim, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None, past_key_values: Cache | None = None, **kwargs: Any) -> torch.Tensor:
        bsz, q_len, _ = hidden_states.shape
        qkv = self.query_key_value(hidden_states).view(bsz, q_len, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        query, key, value = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        if self.use_qk_norm:
            query, key = self.query_layernorm(query), self.key_layernorm(key)
        query, key = apply_rotary(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention)
        out, _ = attention(self, query, key, value, attention_mask,
                           dropout=self.config.attention_dropout if self.training else 0.0, scaling=self.scaling)
        return self.dense(out.reshape(bsz, q_len, -1).contiguous())


def build_router(config: PretrainedConfig) -> nn.Module:
    if getattr(config, "score_function", "softmax") == "sigmoid":
        return SigmoidGroupRouter(config)
    return MultiGateRouter(config) if getattr(config, "multi_gate", False) else SoftmaxTopKRouter(config)


def is_moe_layer(config: PretrainedConfig, layer_idx: int) -> bool:
    return bool(config.num_experts) and layer_idx >= config.first_k_dense_replace


class LingDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.attention = LingAttention(config, layer_idx)
        self.mlp = (SparseMoeBlock(config, build_router(config)) if is_moe_layer(config, layer_idx)
                    else GatedMLP(config, config.intermediate_size))
        self.input_layernorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values: Cache | None = None, modality_ids: torch.Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.attention(self.input_layernorm(hidden_states), position_embeddings, attention_mask,
                                       past_key_values=past_key_values)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        if isinstance(self.mlp, SparseMoeBlock):
            hidden_states = self.mlp(hidden_states, modality_ids)
        else:
            hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


def align_modality_ids(modality_ids: torch.Tensor | None, past_length: int, length: int) -> torch.Tensor | None:
    """Modality ids for the `length` tokens of this forward. Ids as long as the input are used as they are;
    otherwise they cover absolute positions from 0 (the prompt, as `generate` passes them on every step)
    and positions beyond them are text (generated tokens)."""
    if modality_ids is None or modality_ids.shape[-1] == length:
        return modality_ids
    end = past_length + length
    if modality_ids.shape[-1] < end:
        modality_ids = F.pad(modality_ids, (0, end - modality_ids.shape[-1]), value=0)
    return modality_ids[..., past_length:end]


# --------------------------------------------------------------------------------------------------

class LingPreTrainedModel(PreTrainedModel):
    config_class = LingLiteConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LingDecoderLayer", "LingMTPLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = False
    _supports_attention_backend = True

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:  # the experts live in models/moe.py
        return True

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        std = self.config.initializer_range
        init_moe_module(module, std)
        if isinstance(module, LingRope):  # MultimodalRope too
            init.copy_(module.inv_freq, module.compute_inv_freq())


class LingLiteModel(LingPreTrainedModel):
    def __init__(self, config: LingLiteConfig) -> None:
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(self._build_layers(config))
        self.norm = LingRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = MultimodalRope(config) if is_3d_rope(config) else LingRope(config)
        self.gradient_checkpointing = False
        self.post_init()

    def _build_layers(self, config) -> list[nn.Module]:
        return [LingDecoderLayer(config, i) for i in range(config.num_hidden_layers)]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, use_cache: bool | None = None,
                modality_ids: torch.LongTensor | None = None, output_hidden_states: bool | None = None,
                **kwargs: Any) -> MoeModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        if not use_cache:
            past_key_values = None
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        length = inputs_embeds.shape[1]
        if position_ids is None:
            position_ids = (torch.arange(length, device=inputs_embeds.device) + past).unsqueeze(0)
        modality_ids = align_modality_ids(modality_ids, past, length)
        sequence_positions, position_ids = split_position_ids(position_ids)  # 3-D RoPE: [4, B, T] (models/rope.py)
        mask = create_causal_mask(config=self.config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  past_key_values=past_key_values, position_ids=sequence_positions)
        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, attention_mask=mask, position_embeddings=position_embeddings,
                                  past_key_values=past_key_values, modality_ids=modality_ids, use_cache=use_cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        output = MoeModelOutputWithPast(last_hidden_state=hidden_states, past_key_values=past_key_values,
                                        hidden_states=tuple(all_hidden) if all_hidden is not None else None)
        # what the MTP layers of Ling-mini-2.0 need (not part of the public output)
        output.extras = {"inputs_embeds": inputs_embeds, "mask": mask, "position_embeddings": position_embeddings,
                         "modality_ids": modality_ids}
        return output


class LingLiteForCausalLM(LingPreTrainedModel, GenerationMixin):
    """Ling-lite causal LM. `forward(..., modality_ids [B, T])` selects Ming's modality routers per token
    (0 text, 1 image, 2 audio, 3 video; None = all text). With `norm_head` the LM head's weight is divided
    by its L2 norm over the vocabulary axis (official `torch.norm(lm_head.weight, dim=0)`, i.e. per hidden
    column), detached, as the official training branch does; eval gives the same numbers."""

    _tied_weights_keys = {"lm_head.weight": "model.word_embeddings.weight"}
    model_class = LingLiteModel

    def __init__(self, config: LingLiteConfig) -> None:
        super().__init__(config)
        self.model = self.model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._normed_head: tuple[Any, torch.Tensor] | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def get_decoder(self) -> LingLiteModel:
        return self.model

    def head_weight(self) -> torch.Tensor:
        weight = self.lm_head.weight
        if not getattr(self.config, "norm_head", False):
            return weight
        cacheable = not torch.is_grad_enabled() or not weight.requires_grad
        key = (weight.data_ptr(), weight._version, weight.dtype, weight.device)
        if cacheable and self._normed_head is not None and self._normed_head[0] == key:
            return self._normed_head[1]
        norm = torch.linalg.vector_norm(weight.float(), dim=0, keepdim=True).detach()
        normed = (weight.float() / (norm + 1e-7)).to(weight.dtype)
        if cacheable:
            self._normed_head = (key, normed)
        return normed

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden_states, self.head_weight().to(hidden_states.dtype))

    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.LongTensor | None = None, past_key_values: Cache | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, modality_ids: torch.LongTensor | None = None,
                logits_to_keep: int | torch.Tensor = 0, output_hidden_states: bool | None = None,
                **kwargs: Any) -> MoeCausalLMOutputWithPast:
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             modality_ids=modality_ids, output_hidden_states=output_hidden_states)
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden_states = hidden_states[:, -logits_to_keep:]
        elif isinstance(logits_to_keep, torch.Tensor):
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.compute_logits(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **_loss_kwargs(kwargs))
        return MoeCausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values,
                                         hidden_states=outputs.hidden_states)

    # ---- official checkpoints ------------------------------------------------------------------
    @classmethod
    def from_official(cls, path, **kwargs: Any) -> "LingLiteForCausalLM":
        """Build from an official checkpoint directory (config.json + safetensors); see models/checkpoint.py."""
        from models.checkpoint import load_official
        return load_official(path, cls, **kwargs)

    def save_official(self, path, max_shard_size: int | str = "5GB") -> None:
        from models.checkpoint import save_official
        save_official(self, path, max_shard_size=max_shard_size)


def _loss_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k in ("num_items_in_batch", "ignore_index", "shift_labels")}


@BACKBONES.register("ling-lite")
def ling_lite(config: dict[str, Any], source: str = "<config>") -> LingLiteForCausalLM:
    """Ling-lite (BailingMoe v1) with random weights; `config` holds LingLiteConfig fields."""
    check_config_keys(LingLiteConfig, config, source)
    return LingLiteForCausalLM(LingLiteConfig(**config))
