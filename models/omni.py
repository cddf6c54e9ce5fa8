"""OmniModel: encoders -> projectors -> placeholder scatter -> MoE LLM, assembled from one config.

Module names follow Ming-Lite-Omni (`BailingMMNativeForConditionalGeneration`): `vision` (vision
tower), `audio` (audio encoder), `linear_proj` / `linear_proj_audio` (projectors) and `model` (the LLM),
so its checkpoints map onto this model almost key for key (models/ming_checkpoint.py).

Encoder features, projected to the LLM width, replace the placeholder tokens of their kind in the
embedded sequence (`<imagePatch>`, `<videoPatch>`, `<audioPatch>`); every token carries a modality id
(0 text, 1 image, 2 audio, 3 video) that Ming-style `multi_gate` routers use to pick their router.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from encoders.audio import AudioInputs
from models.backbones import build_backbone
from models.encoders import AUDIO_ENCODERS, VISION_ENCODERS, build_video_encoder
from models.projectors import Projector, build_projector


class OmniConfig(PretrainedConfig):
    """Components by registry key, each with its own config mapping (as in configs/models/*-omni.yaml)."""

    model_type = "ordmoe_omni"

    def __init__(self, backbone: dict | None = None, vision: dict | None = None, audio: dict | None = None,
                 video: dict | None = None, vision_projector: dict | None = None, audio_projector: dict | None = None,
                 placeholder_ids: dict | None = None, **kwargs: Any) -> None:
        self.backbone = backbone or {}
        self.vision = vision
        self.audio = audio
        self.video = video or {}  # VideoSection fields: num_frames, temporal_pool, with_audio
        # `normalize: true` L2-normalises projected features, as Ming-Lite-Omni does for images and audio
        self.vision_projector = vision_projector or {"name": "mlp2x_gelu"}
        self.audio_projector = audio_projector or {"name": "conv_audio", "depth": 2, "kernel_size": 3, "stride": 2}
        self.placeholder_ids = placeholder_ids or {}  # {"image": id, "video": id, "audio": id} of the patch tokens
        kwargs.pop("text_config", None)  # a saved copy of the LLM's config; OmniModel sets the live one
        super().__init__(**kwargs)


class OmniModel(PreTrainedModel, GenerationMixin):
    config_class = OmniConfig
    base_model_prefix = "omni"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    main_input_name = "input_ids"

    def __init__(self, config: OmniConfig) -> None:
        super().__init__(config)
        backbone = config.backbone
        self.model = build_backbone(backbone["name"], backbone.get("config", {}), source="OmniConfig.backbone")
        hidden = self.model.config.hidden_size
        self.vision = self.linear_proj = self.audio = self.linear_proj_audio = self.video = None
        if config.vision:
            self.vision = VISION_ENCODERS.build(config.vision["name"], config.vision.get("config", {}))
            self.linear_proj = _projector(config.vision_projector, self.vision.output_dim, hidden)
            self.video = build_video_encoder(self.vision, config.video)  # shares the vision weights
        if config.audio:
            self.audio = AUDIO_ENCODERS.build(config.audio["name"], config.audio.get("config", {}))
            self.linear_proj_audio = _projector(config.audio_projector, self.audio.output_dim, hidden)
        self._llm_takes_modality = "modality_ids" in inspect.signature(self.model.forward).parameters
        config.text_config = self.model.config  # generation sizes its KV cache from the LLM's config
        self.post_init()

    # ---- embeddings ----------------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    # ---- embedding with media -------------------------------------------------------------------------
    def embed_inputs(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """`(inputs_embeds, forward kwargs)`: text embeddings with encoder features at the placeholders.

        This is the part every OrdMoE path shares (training/objectives.py computes it once per batch).
        """
        input_ids = batch["input_ids"]
        embeds = self.get_input_embeddings()(input_ids)
        for kind, features in self._media_features(batch).items():
            if kind not in self.config.placeholder_ids:
                raise ValueError(f"no placeholder token id for {kind}: build the model with a `tokenizer` in its config")
            mask = input_ids == self.config.placeholder_ids[kind]
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(self._count_mismatch(kind, mask, features, batch))
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
        if self._llm_takes_modality and batch.get("modality_ids") is not None:
            kwargs["modality_ids"] = batch["modality_ids"]
        return embeds, kwargs

    def _media_features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        out = {}
        for kind, pixels, encode in (("image", "pixel_values", self.vision), ("video", "pixel_values_videos", self.video)):
            if batch.get(pixels) is not None:
                if encode is None:
                    raise ValueError(f"the batch has {kind} inputs but this model has no vision encoder")
                features = self.linear_proj(encode(batch[pixels], batch[f"{kind}_grid_thw"]))
                out[kind] = _normalized(features, self.config.vision_projector)
        if batch.get("audio_features") is not None:
            if self.audio is None:
                raise ValueError("the batch has audio inputs but this model has no audio encoder")
            inputs = AudioInputs(batch["audio_features"], batch["audio_chunk_frames"],
                                 batch["audio_chunks_per_clip"].tolist(), batch["audio_frames_per_clip"].tolist())
            # one clip at a time: the conv projector must not run across clip boundaries
            features = torch.cat([self.linear_proj_audio.project(clip) for clip in self.audio(inputs)])
            out["audio"] = _normalized(features, self.config.audio_projector)
        return out

    def _count_mismatch(self, kind: str, mask: torch.Tensor, features: torch.Tensor, batch: dict[str, Any]) -> str:
        per_sample = mask.sum(dim=-1).tolist()
        names = batch.get("ids") or list(range(len(per_sample)))
        detail = ", ".join(f"sample {n}: {c}" for n, c in zip(names, per_sample))
        return (f"{int(mask.sum())} <{kind}Patch> placeholder tokens but the {kind} encoder gave "
                f"{features.shape[0]} features ({detail}); the placeholder expansion must come from this model's "
                f"processor (data/processor.py)")

    # ---- forward / generate ---------------------------------------------------------------------------
    def forward(self, input_ids: torch.LongTensor | None = None, attention_mask: torch.Tensor | None = None,
                modality_ids: torch.LongTensor | None = None, inputs_embeds: torch.Tensor | None = None,
                labels: torch.LongTensor | None = None, past_key_values=None, use_cache: bool | None = None,
                position_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.LongTensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.LongTensor | None = None, audio_features: torch.Tensor | None = None,
                audio_chunk_frames: torch.LongTensor | None = None,
                audio_chunks_per_clip: torch.LongTensor | None = None,
                audio_frames_per_clip: torch.LongTensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Media tensors are those of data/processor.py's `collate`; they are read only while the input
        still holds placeholder tokens (the prompt), not on later cached generation steps."""
        if inputs_embeds is None:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids,
                     "position_ids": position_ids}
            if self._has_placeholders(input_ids):
                batch.update(pixel_values=pixel_values, image_grid_thw=image_grid_thw,
                             pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
                             audio_features=audio_features, audio_chunk_frames=audio_chunk_frames,
                             audio_chunks_per_clip=audio_chunks_per_clip, audio_frames_per_clip=audio_frames_per_clip)
            inputs_embeds, extra = self.embed_inputs(batch)
        else:
            extra = {k: v for k, v in (("attention_mask", attention_mask), ("position_ids", position_ids)) if v is not None}
            if self._llm_takes_modality and modality_ids is not None:
                extra["modality_ids"] = modality_ids
        outputs = self.model(inputs_embeds=inputs_embeds, labels=labels, past_key_values=past_key_values,
                             use_cache=use_cache, **extra, **kwargs)
        return CausalLMOutputWithPast(loss=outputs.loss, logits=outputs.logits,
                                      past_key_values=outputs.past_key_values)

    def _has_placeholders(self, input_ids: torch.Tensor) -> bool:
        ids = list(self.config.placeholder_ids.values())
        return bool(ids) and bool(torch.isin(input_ids, torch.tensor(ids, device=input_ids.device)).any())

    def _init_weights(self, module: nn.Module) -> None:
        """Projectors (the encoders and the LLM initialise their own parameters)."""
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                init.zeros_(module.bias)


def _projector(section: dict[str, Any], in_dim: int, out_dim: int) -> Projector:
    options = {k: v for k, v in section.items() if k not in ("name", "normalize")}
    return build_projector(section["name"], in_dim, out_dim, **options)


def _normalized(features: torch.Tensor, section: dict[str, Any]) -> torch.Tensor:
    return F.normalize(features, dim=-1) if section.get("normalize", False) else features
