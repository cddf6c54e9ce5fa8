"""Encoder registries: a config's `vision:` / `audio:` section names one of these by key.

A factory takes the section's `config` mapping and returns the encoder module (random weights; load a
checkpoint afterwards). Every encoder has `output_dim`, `encode(...)` and `preprocessor()`, which
returns the matching preprocessing (the processor uses it to count placeholder tokens).
"""
from __future__ import annotations

from typing import Any

from torch import nn
from transformers import WhisperConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from encoders.audio import WhisperAudioEncoder
from encoders.vision import QwenVisionEncoder, TimmVisionEncoder
from models.backbones import check_config_keys
from models.registry import Registry

VISION_ENCODERS: Registry = Registry("vision encoder")
AUDIO_ENCODERS: Registry = Registry("audio encoder")

QWEN_PREPROCESSING = ("min_pixels", "max_pixels")  # preprocessing, not architecture


@VISION_ENCODERS.register("qwen2_5_vl")
def qwen2_5_vl(config: dict[str, Any], source: str = "<config>") -> nn.Module:
    """Qwen2.5-VL's vision tower; `min_pixels` / `max_pixels` set its dynamic resolution."""
    fields = {k: v for k, v in config.items() if k not in QWEN_PREPROCESSING}
    check_config_keys(Qwen2_5_VLVisionConfig, fields, source)
    vision_config = Qwen2_5_VLVisionConfig(**fields)
    for key in QWEN_PREPROCESSING:  # kept on the config so they travel with saved checkpoints
        if key in config:
            setattr(vision_config, key, config[key])
    return QwenVisionEncoder(vision_config)


@VISION_ENCODERS.register("timm")
def timm_encoder(config: dict[str, Any], source: str = "<config>") -> nn.Module:
    """Any timm model: `{model_name: vit_tiny_patch16_224, feature_layer: -2, checkpoint: path?, ...}`."""
    if "model_name" not in config:
        raise ValueError(f"{source}: the timm vision encoder needs `model_name` (e.g. vit_base_patch16_siglip_224)")
    return TimmVisionEncoder(**config)


@AUDIO_ENCODERS.register("whisper")
def whisper(config: dict[str, Any], source: str = "<config>") -> nn.Module:
    """The Whisper encoder; fields of transformers' WhisperConfig (d_model, encoder_layers, num_mel_bins, ...)."""
    check_config_keys(WhisperConfig, config, source)
    return WhisperAudioEncoder(WhisperConfig(**config))
