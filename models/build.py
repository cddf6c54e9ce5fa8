"""Model configs (`configs/models/*.yaml`) -> models. A model is built from its config first; weights
are loaded into it afterwards (never the reverse)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from models.backbones import build_backbone
from models.config import from_dict, read_yaml


@dataclass
class BackboneSection:
    name: str  # a key of the BACKBONES registry
    config: dict[str, Any] = field(default_factory=dict)  # fields of the backbone's config class
    checkpoint: str | None = None  # an official checkpoint directory to load after building


@dataclass
class ModelConfig:
    backbone: BackboneSection


def load_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, read_yaml(path), source=str(path))


def build_model(config: ModelConfig | str | Path, source: str = "<config>") -> nn.Module:
    """Build the model a config describes (random init, then its checkpoint if it names one)."""
    if not isinstance(config, ModelConfig):
        source, config = str(config), load_model_config(config)
    return build_backbone(config.backbone.name, config.backbone.config, source=source)
