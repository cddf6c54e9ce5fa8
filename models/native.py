"""transformers' own MoE LLMs as backbones, used unchanged: qwen3_moe, olmoe, mixtral, deepseek_v3.

Their MoE blocks already follow the router contract (a `gate` returning `(logits, weights, indices)`
that the block feeds to its `experts`), so tier routing attaches to them with forward hooks
(models/routing.py knows their router classes); nothing here patches or subclasses them.
"""
from __future__ import annotations

from typing import Any

from transformers import (DeepseekV3Config, DeepseekV3ForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                          OlmoeForCausalLM, PretrainedConfig, PreTrainedModel, Qwen3MoeConfig, Qwen3MoeForCausalLM)

from models.backbones import BACKBONES, check_config_keys

NATIVE_FAMILIES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    "qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
    "olmoe": (OlmoeConfig, OlmoeForCausalLM),
    "mixtral": (MixtralConfig, MixtralForCausalLM),
    "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
}


def _register(name: str, config_class: type[PretrainedConfig], model_class: type[PreTrainedModel]) -> None:
    def factory(config: dict[str, Any], source: str = "<config>") -> PreTrainedModel:
        check_config_keys(config_class, config, source)
        return model_class(config_class(**config))

    factory.__doc__ = f"transformers' {model_class.__name__}, unchanged (fields of {config_class.__name__})."
    BACKBONES.register(name)(factory)


for _name, (_config_class, _model_class) in NATIVE_FAMILIES.items():
    _register(_name, _config_class, _model_class)
