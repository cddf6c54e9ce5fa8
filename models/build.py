"""Model configs (`configs/models/*.yaml`, or a released checkpoint's directory) -> models. A model is built
from its config first; weights are loaded into it afterwards (never the reverse).

A release directory (models/release.py) is read field by field into the same `ModelConfig`; a YAML with
`release: <directory or hub id>` starts from it and adds our settings (processor, video sampling, or
explicit overrides). Built on the meta device (parameter counts), a model reads no weights, and a release
needs nothing but its config.json (and its tokenizer for an omni model's media token ids)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from data.tokenizer import media_token_ids, pad_token_id
from models.backbones import build_backbone
from models.config import ConfigError, from_dict, merge, read_yaml
from models.encoders import VideoSection


@dataclass
class BackboneSection:
    name: str  # a key of the BACKBONES registry
    config: dict[str, Any] = field(default_factory=dict)  # fields of the backbone's config class
    checkpoint: str | None = None  # an official checkpoint directory to load after building


@dataclass
class ComponentSection:
    name: str  # a key of VISION_ENCODERS / AUDIO_ENCODERS
    config: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # a Qwen2.5-VL / Whisper checkpoint directory to load after building


@dataclass
class ProjectorSections:
    vision: dict[str, Any] = field(default_factory=lambda: {"name": "mlp2x_gelu"})
    audio: dict[str, Any] = field(default_factory=lambda: {"name": "conv_audio", "depth": 2, "kernel_size": 3,
                                                           "stride": 2})


@dataclass
class ModelConfig:
    """A model YAML: the backbone, and for an omni model its encoders, projectors and tokenizer."""

    backbone: BackboneSection | None = None  # required unless `release` gives it
    vision: ComponentSection | None = None
    audio: ComponentSection | None = None
    projectors: ProjectorSections = field(default_factory=ProjectorSections)
    tokenizer: str | None = None  # tokenizer.json with the placeholder tokens (needed to feed media)
    checkpoint: str | None = None  # a whole Ming-Lite-Omni checkpoint directory (omni models)
    video: VideoSection = field(default_factory=VideoSection)  # frames per clip, temporal pooling
    max_length: int = 2048  # processor: longest sample in tokens
    # a released checkpoint's directory (or hub id in the local cache) the sections above come from
    release: str | None = None
    release_files: dict[str, str] = field(default_factory=dict)  # role -> file of the release (set from it)
    # checkpoint component -> ours, for whole-model checkpoints that name a component otherwise ("": not loaded)
    checkpoint_components: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backbone is None:
            raise ValueError("missing required key 'backbone' (or `release:`, a released checkpoint's directory)")

    @property
    def is_omni(self) -> bool:
        return self.vision is not None or self.audio is not None


def load_model_config(path: str | Path) -> ModelConfig:
    """A model YAML, or a release directory (its config.json translated, models/release.py)."""
    from models.release import is_release_dir, release_model_config, resolve_release
    if is_release_dir(path):
        return from_dict(ModelConfig, release_model_config(path), source=str(Path(path) / "config.json"))
    data = read_yaml(path)
    if "release" in data:
        if not isinstance(data["release"], str):
            raise ConfigError(f"{path}: release = {data['release']!r} must be a directory or a hub id")
        directory = resolve_release(data.pop("release"), Path(path).parent, source=str(path))
        data = merge(release_model_config(directory), data)
    return from_dict(ModelConfig, data, source=str(path))


def build_model(config: ModelConfig | str | Path, source: str = "<config>") -> nn.Module:
    """Build the model a config describes: a backbone alone, or an OmniModel around it (random init)."""
    if not isinstance(config, ModelConfig):
        source, config = str(config), load_model_config(config)
    shapes_only = torch.empty(0).device.type == "meta"  # on the meta device: no weights (a tokenizer if present)
    if config.release is not None and not shapes_only and config.release in (config.checkpoint, config.backbone.checkpoint):
        from models.release import check_release_files  # its weights are loaded from it: every file must be there
        check_release_files(config.release)
    if not config.is_omni:
        model = build_backbone(config.backbone.name, config.backbone.config, source=source)
        if config.backbone.checkpoint and not shapes_only:
            load_backbone_checkpoint(model, config.backbone.checkpoint)
        return model
    from models.omni import OmniConfig, OmniModel
    placeholder_ids, span_ids, special = {}, {}, {}
    if config.tokenizer is not None and (not shapes_only or Path(config.tokenizer).is_file()):
        tokenizer = Tokenizer.from_file(config.tokenizer)
        kinds = (("image", "video") if config.vision else ()) + (("audio",) if config.audio else ())
        try:  # the tokenizer's own span tokens (the Ming release: video frames are <imagePatch>)
            span_ids = {kind: list(ids) for kind, ids in media_token_ids(tokenizer, config.tokenizer, kinds).items()}
        except ValueError as err:
            raise ConfigError(f"{source}: {err}") from None
        placeholder_ids = {kind: ids[1] for kind, ids in span_ids.items()}
        vocab = config.backbone.config.get("vocab_size")
        if vocab is not None and tokenizer.get_vocab_size() > vocab:
            raise ConfigError(f"{source}: the tokenizer has {tokenizer.get_vocab_size()} tokens but "
                              f"backbone.config.vocab_size is {vocab}")
        special = {"eos_token_id": tokenizer.token_to_id("<|endoftext|>"), "pad_token_id": pad_token_id(tokenizer)}
    section = lambda s: {"name": s.name, "config": s.config} if s else None  # noqa: E731
    omni = OmniConfig(backbone={"name": config.backbone.name, "config": config.backbone.config},
                      vision=section(config.vision), audio=section(config.audio), video=asdict(config.video),
                      vision_projector=config.projectors.vision, audio_projector=config.projectors.audio,
                      placeholder_ids=placeholder_ids, span_ids=span_ids, **special)
    model = OmniModel(omni)
    if not shapes_only:
        load_component_checkpoints(model, config)
    return model


def load_backbone_checkpoint(llm: nn.Module, path: str) -> None:
    """An official Ling checkpoint (per-expert keys, converted) or a transformers checkpoint (natives), strictly."""
    from encoders.checkpoint import read_prefixed
    from models.ming_checkpoint import load_llm
    if hasattr(llm, "save_official"):  # our Ling backbones: the official layout
        load_llm(llm, read_prefixed(path, ("",)), f"{path} (official checkpoint)")
        return
    loaded, info = type(llm).from_pretrained(path, config=llm.config, output_loading_info=True, local_files_only=True)
    check_loading_info(info, path, type(llm).__name__)
    llm.load_state_dict(loaded.state_dict(), strict=True)


def check_loading_info(info: dict[str, Any], path: str | Path, model_name: str) -> None:
    """`from_pretrained(..., output_loading_info=True)`'s report, as strict as `load_state_dict(strict=True)`."""
    from models.checkpoint import CheckpointError
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise CheckpointError(f"{path} does not match {model_name}: {problems}")


def load_component_checkpoints(model: nn.Module, config: ModelConfig) -> None:
    """Whole-model (Ming) checkpoint first, then any per-component checkpoint the config names."""
    from models.ming_checkpoint import load_ming_checkpoint
    if config.checkpoint:
        load_ming_checkpoint(model, config.checkpoint, config.checkpoint_components)
    if config.vision is not None and config.vision.checkpoint:
        model.vision.load_checkpoint(config.vision.checkpoint)
    if config.audio is not None and config.audio.checkpoint:
        model.audio.load_checkpoint(config.audio.checkpoint)
    if config.backbone.checkpoint:
        load_backbone_checkpoint(model.model, config.backbone.checkpoint)
