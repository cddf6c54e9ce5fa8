"""Encoder registries: a model config's `vision:` / `audio:` section names one of these by key.

A factory takes the section's `config` mapping (validated against the dataclass below: unknown keys and
wrong types fail naming the key and the file) and returns the encoder with random weights, or with the
weights of `checkpoint` for timm. Load official checkpoints afterwards with `encoder.load_checkpoint(dir)`.
Defaults are those of transformers' own config classes. `freeze: true` turns off the encoder's gradients.

Every encoder has `output_dim`, `forward(...)`, `num_tokens(...)` / `preprocessor()` (token counts known
before running) and `load_checkpoint(path)`; see encoders/vision.py and encoders/audio.py.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn
from transformers import WhisperConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from encoders.audio import WhisperAudioEncoder
from encoders.video import VideoEncoder
from encoders.vision import QwenVisionEncoder, TimmVisionEncoder
from models.config import from_dict
from models.registry import Registry

VISION_ENCODERS: Registry = Registry("vision encoder")
AUDIO_ENCODERS: Registry = Registry("audio encoder")


@dataclass
class QwenVisionSection:
    """Qwen2.5-VL vision tower: the fields of transformers' Qwen2_5_VLVisionConfig, plus preprocessing."""

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 31])
    initializer_range: float = 0.02
    min_pixels: int = 56 * 56  # dynamic resolution: each image's pixel count is kept in [min, max]
    max_pixels: int = 28 * 28 * 1280
    freeze: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels} and {self.max_pixels}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"fullatt_block_indexes {bad} are outside the {self.depth} blocks")


@dataclass
class TimmVisionSection:
    """Any timm model by name, without pretrained download (`checkpoint`: a local state-dict file)."""

    model_name: str
    feature_layer: int = -1  # -1: last block (after the final norm); -2: penultimate block, as LLaVA
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {img_size: 384}
    freeze: bool = False


@dataclass
class WhisperSection:
    """Whisper encoder: the encoder fields of transformers' WhisperConfig, plus frame pooling."""

    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    num_mel_bins: int = 80
    max_source_positions: int = 1500  # encoder frames of the positional table: 30 s (Whisper), 300 s (Ming's 15000)
    activation_function: str = "gelu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0
    scale_embedding: bool = False
    init_std: float = 0.02
    frame_stride: int = 1  # mean-pool this many consecutive encoder frames (before the projector)
    freeze: bool = False

    def __post_init__(self) -> None:
        if self.frame_stride < 1:
            raise ValueError(f"frame_stride must be >= 1, got {self.frame_stride}")
        if self.max_source_positions < 1:
            raise ValueError(f"max_source_positions must be >= 1, got {self.max_source_positions}")


@dataclass
class VideoSection:
    """How videos are sampled and encoded (through the vision encoder)."""

    num_frames: int = 8  # frames sampled uniformly per clip (data/media.py load_video)
    temporal_pool: int = 1  # mean-pool this many consecutive time steps of the vision features
    with_audio: bool = False  # also encode the clip's audio track (needs an audio encoder)

    def __post_init__(self) -> None:
        if self.num_frames < 1 or self.temporal_pool < 1:
            raise ValueError(f"num_frames and temporal_pool must be >= 1, got {self.num_frames}, {self.temporal_pool}")


def _frozen(module: nn.Module, freeze: bool) -> nn.Module:
    if freeze:
        module.requires_grad_(False)
    return module


@VISION_ENCODERS.register("qwen2_5_vl")
def qwen2_5_vl(config: dict[str, Any], source: str = "<config>", prefix: str = "vision.config") -> QwenVisionEncoder:
    """Qwen2.5-VL's vision tower; `min_pixels` / `max_pixels` set its dynamic resolution."""
    section = from_dict(QwenVisionSection, dict(config), source, prefix)
    fields = asdict(section)
    freeze = fields.pop("freeze")
    pixels = {key: fields.pop(key) for key in ("min_pixels", "max_pixels")}
    vision_config = Qwen2_5_VLVisionConfig(**fields)
    for key, value in pixels.items():  # kept on the config so they travel with saved checkpoints
        setattr(vision_config, key, value)
    return _frozen(QwenVisionEncoder(vision_config), freeze)


@VISION_ENCODERS.register("timm")
def timm_encoder(config: dict[str, Any], source: str = "<config>", prefix: str = "vision.config") -> TimmVisionEncoder:
    """Any timm model: `{model_name: vit_tiny_patch16_224, feature_layer: -2, checkpoint: path?, freeze: true}`."""
    section = from_dict(TimmVisionSection, dict(config), source, prefix)
    encoder = TimmVisionEncoder(section.model_name, section.feature_layer, section.checkpoint, section.model_kwargs)
    return _frozen(encoder, section.freeze)


@AUDIO_ENCODERS.register("whisper")
def whisper(config: dict[str, Any], source: str = "<config>", prefix: str = "audio.config") -> WhisperAudioEncoder:
    """The Whisper encoder (d_model, encoder_layers, num_mel_bins, ...), optional frame pooling."""
    section = from_dict(WhisperSection, dict(config), source, prefix)
    fields = asdict(section)
    freeze, frame_stride = fields.pop("freeze"), fields.pop("frame_stride")
    whisper_config = WhisperConfig(**fields)
    whisper_config.frame_stride = frame_stride  # travels with saved checkpoints
    return _frozen(WhisperAudioEncoder(whisper_config), freeze)


def build_video_encoder(vision: nn.Module, config: dict[str, Any] | VideoSection | None = None,
                        source: str = "<config>", prefix: str = "video") -> VideoEncoder:
    """Videos through `vision` (the model's vision encoder) with the section's temporal pooling."""
    section = config if isinstance(config, VideoSection) else from_dict(VideoSection, dict(config or {}), source, prefix)
    return VideoEncoder(vision, section.temporal_pool)
