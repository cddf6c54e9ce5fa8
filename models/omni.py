"""OmniModel: encoders -> projectors -> placeholder scatter -> MoE LLM, assembled from one config.

Module names follow Ming-Lite-Omni (`BailingMMNativeForConditionalGeneration`): `vision` (vision
tower), `audio` (audio encoder), `linear_proj` / `linear_proj_audio` (projectors) and `model` (the LLM),
so its checkpoints map onto this model almost key for key (models/ming_checkpoint.py).

Encoder features, projected to the LLM width, replace the patch tokens of their span in the embedded
sequence (`<image>` + `<imagePatch>`... + `</image>`, likewise video and audio; Ming's release marks video
frames with `<imagePatch>` too, so a patch token's kind is the kind of the span it sits in); every token
carries a modality id (0 text, 1 image, 2 audio, 3 video) that Ming-style `multi_gate` routers use to pick
their router.

With an LLM configured for 3-D RoPE (`rope_scaling: {type: 3D}`, Ming-Lite-Omni v1.5) the model computes
the t/h/w position ids of every token itself (models/rope.py), in `embed_inputs` for training and in
`generate`, where each new token continues from the prompt's maximum + 1.

`run_idle_encoders` (default False): an encoder runs only when the batch holds its modality, so two
processes with different batches run different graphs. Data-parallel engines that shard or reduce per
module (DeepSpeed ZeRO-3 gathers each module's weights when it runs; ZeRO-2 reduces gradients in
buckets) need every process to run the same modules in the same order. With the switch on, an encoder
the batch does not use runs on a minimal dummy input (what its own preprocessor makes of a blank image,
two blank video frames, 0.1 s of silence) and `0 * features.sum()` joins the embeddings: the same graph
on every process, a zero gradient, the same outputs. The model knows nothing of training; the engine
(training/engine.py) turns it on when it runs more than one process.
"""
from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutputWithPast

from encoders.audio import AudioInputs
from models.backbones import build_backbone
from models.encoders import AUDIO_ENCODERS, VISION_ENCODERS, build_video_encoder
from models.projectors import Projector, build_projector
from models.rope import VisionSpans, is_3d_rope, rope_index, sequence_positions


class OmniConfig(PretrainedConfig):
    """Components by registry key, each with its own config mapping (as in configs/models/*-omni.yaml)."""

    model_type = "ordmoe_omni"

    def __init__(self, backbone: dict | None = None, vision: dict | None = None, audio: dict | None = None,
                 video: dict | None = None, vision_projector: dict | None = None, audio_projector: dict | None = None,
                 placeholder_ids: dict | None = None, span_ids: dict | None = None, **kwargs: Any) -> None:
        self.backbone = backbone or {}
        self.vision = vision
        self.audio = audio
        self.video = video or {}  # VideoSection fields: num_frames, temporal_pool, with_audio
        # `normalize: true` L2-normalises projected features, as Ming-Lite-Omni does for images and audio
        self.vision_projector = vision_projector or {"name": "mlp2x_gelu"}
        self.audio_projector = audio_projector or {"name": "conv_audio", "depth": 2, "kernel_size": 3, "stride": 2}
        self.placeholder_ids = placeholder_ids or {}  # {"image": id, "video": id, "audio": id} of the patch tokens
        self.span_ids = span_ids or {}  # {"image": [start, patch, end], ...}: the tokenizer's span tokens
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
        self.run_idle_encoders = False  # see the module docstring: the same graph on every process
        self._idle_inputs: dict[str, torch.Tensor] | None = None
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
        self.rope_3d = is_3d_rope(self.model.config)
        if self.rope_3d and config.vision and not all(kind in config.span_ids for kind in ("image", "video")):
            raise ValueError("3-D RoPE needs the image and video span token ids (OmniConfig.span_ids): build the "
                             "model with a `tokenizer` in its config")
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
        if self.run_idle_encoders:  # every encoder, in one order: the batch's inputs, else the idle ones
            used = set(_media_kinds(batch))
            features_by_kind = {}
            given = {k: v for k, v in batch.items() if v is not None}
            for kind, features in self._media_features({**self.idle_inputs(), **given}).items():
                if kind in used:
                    features_by_kind[kind] = features
                else:  # the same graph on every process, a zero gradient, the same embeddings
                    embeds = embeds + 0 * features.sum().to(embeds.dtype)
        else:
            features_by_kind = self._media_features(batch)
        for kind, features in features_by_kind.items():
            if kind not in self.config.placeholder_ids:
                raise ValueError(f"no placeholder token id for {kind}: build the model with a `tokenizer` in its config")
            mask = self.patch_mask(input_ids, kind)
            if int(mask.sum()) != features.shape[0]:
                raise ValueError(self._count_mismatch(kind, mask, features, batch))
            embeds = embeds.masked_scatter(mask.unsqueeze(-1), features.to(embeds.dtype))
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if batch.get(k) is not None}
        if self.rope_3d:
            kwargs["position_ids"] = self.position_ids(batch)
        if self._llm_takes_modality and batch.get("modality_ids") is not None:
            kwargs["modality_ids"] = batch["modality_ids"]
        return embeds, kwargs

    def patch_mask(self, input_ids: torch.Tensor, kind: str) -> torch.Tensor:
        """[B, T] bool: the patch tokens whose features come from `kind`'s encoder. When two kinds share a patch
        token (Ming: video frames are `<imagePatch>` inside `<video>`), the span's start token decides."""
        patch = self.config.placeholder_ids[kind]
        mask = input_ids == patch
        sharing = [k for k, p in self.config.placeholder_ids.items() if p == patch and k != kind]
        if not sharing:
            return mask
        if not all(k in self.config.span_ids for k in [kind, *sharing]):
            raise ValueError(f"{kind} and {sharing} share the patch token {patch}: OmniConfig.span_ids must name "
                             f"their start tokens")
        starts = torch.tensor([self.config.span_ids[k][0] for k in self.config.span_ids], device=input_ids.device)
        is_start = torch.isin(input_ids, starts)
        index = torch.arange(input_ids.shape[-1], device=input_ids.device).expand_as(input_ids)
        last_start = torch.where(is_start, index, -1).cummax(dim=-1).values
        opened_by = input_ids.gather(-1, last_start.clamp_min(0))
        return mask & (last_start >= 0) & (opened_by == self.config.span_ids[kind][0])

    def position_ids(self, batch: dict[str, Any]) -> torch.Tensor:
        """3-D RoPE position ids `[4, B, T]` (sequence row + t/h/w, models/rope.py) of a whole batch: left or
        right padded (`attention_mask`), or packed rows (2-D `position_ids` restarting at each sample)."""
        given = batch.get("position_ids")
        if given is not None and given.ndim == 3:
            return given
        input_ids, mask = batch["input_ids"], batch.get("attention_mask")
        grids = {}
        for kind, key, encoder in (("image", "image_grid_thw", self.vision), ("video", "video_grid_thw", self.video)):
            if batch.get(key) is not None:
                grids[kind] = encoder.token_grid(batch[key])
        image, video = self.config.span_ids.get("image", (-1, -1)), self.config.span_ids.get("video", (-1, -1))
        spans = VisionSpans(image_start=image[0], image_patch=image[1], video_start=video[0], video_patch=video[1])
        seconds = batch.get("video_second_per_grid")
        tokens_per_second = getattr(getattr(self.vision, "config", None), "tokens_per_second", 2)
        rope, _ = rope_index(input_ids, spans, grids.get("image"), grids.get("video"), attention_mask=mask,
                             segment_positions=given,
                             video_second_per_grid=seconds.tolist() if seconds is not None else None,
                             tokens_per_second=tokens_per_second)
        sequence = given if given is not None else sequence_positions(mask, input_ids.shape[1], input_ids.shape[0],
                                                                      input_ids.device)
        return torch.cat([sequence.unsqueeze(0).to(rope.device), rope])

    def idle_inputs(self) -> dict[str, Any]:
        """Batch entries of a minimal input for every encoder (cached on CPU): what its own preprocessor makes
        of a blank 56 x 56 image, two blank video frames and 0.1 s of silence."""
        if self._idle_inputs is None:
            inputs: dict[str, Any] = {}
            if self.vision is not None:
                image = self.vision.preprocessor().images([Image.new("RGB", (56, 56))])
                video = self.video.preprocess(np.zeros((2, 56, 56, 3), dtype=np.uint8))
                inputs.update(pixel_values=image.pixel_values, image_grid_thw=image.grid_thw,
                              pixel_values_videos=video.pixel_values, video_grid_thw=video.grid_thw)
            if self.audio is not None:
                audio = self.audio.preprocessor()([np.zeros(1600, dtype=np.float32)])
                inputs.update(audio_features=audio.features, audio_chunk_frames=audio.chunk_frames,
                              audio_chunks_per_clip=torch.tensor(audio.chunks_per_clip),
                              audio_frames_per_clip=torch.tensor(audio.frames_per_clip))
            self._idle_inputs = inputs
        device = self.get_input_embeddings().weight.device
        return {k: v.to(device) for k, v in self._idle_inputs.items()}

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
            features = _project_clips(self.linear_proj_audio, self.audio(inputs).split(inputs.frames_per_clip))
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
                audio_frames_per_clip: torch.LongTensor | None = None,
                video_second_per_grid: torch.Tensor | None = None, **kwargs: Any) -> CausalLMOutputWithPast:
        """Media tensors are those of data/processor.py's `collate`; they are read only while the input
        still holds placeholder tokens (the prompt), not on later cached generation steps."""
        if self.rope_3d and past_key_values is not None and past_key_values.get_seq_length() > 0 \
                and (position_ids is None or position_ids.ndim != 3):
            raise ValueError("3-D RoPE: a forward on top of a KV cache needs the new tokens' 3-D position_ids "
                             "[4, B, T] (generate computes them; they continue from the prompt's maximum + 1)")
        if inputs_embeds is None:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask, "modality_ids": modality_ids,
                     "position_ids": position_ids, "image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw,
                     "video_second_per_grid": video_second_per_grid}
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

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> torch.Tensor:
        """3-D RoPE: the prompt's `[4, B, T]` position ids (transformers calls this once, before the first step)."""
        if not self.rope_3d:
            return super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        return self.position_ids({**model_kwargs, "input_ids": model_kwargs.get("input_ids", inputs_tensor)})

    def _update_model_kwargs_for_generation(self, outputs: Any, model_kwargs: dict, is_encoder_decoder: bool = False,
                                            num_new_tokens: int = 1) -> dict:
        """3-D RoPE: a new token's t/h/w positions are the maximum over the real tokens before it + 1 (the
        official `rope_deltas`); transformers would continue each row from its last value."""
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, is_encoder_decoder,
                                                                   num_new_tokens)
        positions = model_kwargs.get("position_ids")
        if positions is None or positions.ndim != 3:
            return model_kwargs
        before = positions[1:, :, :-num_new_tokens]
        mask = model_kwargs.get("attention_mask")
        if mask is not None:
            before = before.masked_fill(~mask[:, :-num_new_tokens].bool().unsqueeze(0), -1)
        top = before.amax(dim=(0, 2))
        positions = positions.clone()
        positions[1:, :, -num_new_tokens:] = (top[:, None] + 1 + torch.arange(num_new_tokens, device=top.device))
        model_kwargs["position_ids"] = positions
        return model_kwargs

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


def _media_kinds(batch: dict[str, Any]) -> list[str]:
    """The modalities whose encoder inputs `batch` holds."""
    keys = (("image", "pixel_values"), ("video", "pixel_values_videos"), ("audio", "audio_features"))
    return [kind for kind, key in keys if batch.get(key) is not None]


def _project_clips(projector: Projector, clips: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """Every clip's `projector.project(clip)`, concatenated, in ONE call of the projector: ZeRO-3 gathers a
    module's weights each time it runs, so the number of calls must not depend on the batch. A clip never
    reads another's frames: a convolution reads zeros past a clip's end either way (its own padding, or the
    zeros the shorter clips are padded with), and only the outputs of the clip's own frames are kept."""
    if not projector.channels_first:
        return projector(torch.cat(clips))
    padded = pad_sequence(clips, batch_first=True).transpose(1, 2)  # [clips, dim, longest]
    out = projector(padded).transpose(1, 2)  # [clips, tokens, dim]
    return torch.cat([rows[:projector.num_tokens(len(clip))] for rows, clip in zip(out, clips)])


def _normalized(features: torch.Tensor, section: dict[str, Any]) -> torch.Tensor:
    return F.normalize(features, dim=-1) if section.get("normalize", False) else features
