"""The backbone registry: every MoE language model the zoo can build, by config name.

A backbone factory takes the `config` mapping of a model YAML's `backbone:` section and returns a
transformers `PreTrainedModel` causal LM whose MoE routers follow the router contract of
`models/routing.py` (forward returns `(router_logits, weights, indices)`), so tier routing can be
attached without touching the model.
"""
from __future__ import annotations

import inspect
from typing import Any

from transformers import PretrainedConfig, PreTrainedModel

from models.config import ConfigError
from models.registry import Registry

BACKBONES: Registry = Registry("backbone")


def config_fields(config_class: type[PretrainedConfig]) -> set[str]:
    """The fields a config class (and its PretrainedConfig bases) declares."""
    known: set[str] = set()
    for klass in config_class.__mro__:
        if klass is object:
            continue
        known |= set(inspect.signature(klass.__init__).parameters)
        known |= set(getattr(klass, "__annotations__", {}))
    return known - {"self", "kwargs", "args"}


def check_config_keys(config_class: type[PretrainedConfig], values: dict[str, Any], source: str) -> None:
    """PretrainedConfig swallows unknown kwargs silently; a typo in a YAML must fail instead."""
    unknown = sorted(set(values) - config_fields(config_class))
    if unknown:
        raise ConfigError(f"{source}: unknown {config_class.__name__} field(s) {unknown}")


def build_backbone(name: str, config: dict[str, Any], source: str = "<config>") -> PreTrainedModel:
    """Instantiate backbone `name` with random weights (load a checkpoint afterwards)."""
    return BACKBONES.get(name)(dict(config), source=source)
