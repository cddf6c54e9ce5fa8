"""Vision encoders: the Qwen2.5-VL vision tower (Ming-Lite-Omni's) and any timm model, with their preprocessing.

Each encoder has `encode(pixel_values, grid_thw) -> [num_tokens, output_dim]` (all images of a batch,
concatenated in order) and a preprocessor that knows, before the encoder runs, how many tokens every
image will become (the processor expands each `<image>` marker to exactly that many placeholders).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor


@dataclass
class VisionInputs:
    """Preprocessed images (or videos): encoder inputs plus the token count of each item."""

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor  # [items, 3]: temporal, height, width patch grid (timm: [frames, 1, 1])
    num_tokens: list[int]


class QwenVisionEncoder(Qwen2_5_VisionTransformerPretrainedModel):
    """transformers' Qwen2.5-VL vision transformer (window attention, 2x2 patch merger), unchanged;
    parameter names are those of Qwen2.5-VL's `visual.*` and Ming-Lite-Omni's `vision.*` checkpoints."""

    @property
    def output_dim(self) -> int:
        return self.config.out_hidden_size

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self(pixel_values.to(self.dtype), grid_thw=grid_thw).pooler_output

    def preprocessor(self) -> "QwenPreprocessor":
        pixels = {k: getattr(self.config, k) for k in ("min_pixels", "max_pixels") if hasattr(self.config, k)}
        return QwenPreprocessor(patch_size=self.config.patch_size, merge_size=self.config.spatial_merge_size,
                                temporal_patch_size=self.config.temporal_patch_size, **pixels)


class QwenPreprocessor:
    """Dynamic resolution: each image is resized to a multiple of 28 px (patch 14 x merge 2) with its
    pixel count in [min_pixels, max_pixels]; consecutive video frames are merged in pairs (temporal patch 2)."""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                 merge_size: int = 2, temporal_patch_size: int = 2) -> None:
        options = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
                       temporal_patch_size=temporal_patch_size)
        self.images_processor = Qwen2VLImageProcessor(**options)
        self.video_processor = Qwen2VLVideoProcessor(**options, cap_pixels_per_frame=True)
        self.merge_unit = merge_size ** 2

    def images(self, images: list[Image.Image]) -> VisionInputs:
        out = self.images_processor(images=images, return_tensors="pt")
        grid = out["image_grid_thw"]
        return VisionInputs(out["pixel_values"], grid, (grid.prod(-1) // self.merge_unit).tolist())

    def video(self, frames: np.ndarray) -> VisionInputs:
        """`frames` uint8 [T, H, W, 3]; an odd frame count repeats the last frame (temporal patch 2)."""
        out = self.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
        grid = out["video_grid_thw"]
        return VisionInputs(out["pixel_values_videos"], grid, (grid.prod(-1) // self.merge_unit).tolist())


class TimmVisionEncoder(nn.Module):
    """Any timm image model as a patch-token encoder (prefix/CLS tokens dropped).

    `feature_layer` picks the block whose output is used (-1 last, -2 penultimate as LLaVA does);
    video frames are mean-pooled over groups of `temporal_merge` consecutive frames.
    """

    def __init__(self, model_name: str, feature_layer: int = -1, checkpoint: str | None = None,
                 temporal_merge: int = 2, **model_kwargs) -> None:
        super().__init__()
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **model_kwargs)
        if checkpoint:
            state = timm.models.load_state_dict(checkpoint)
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            missing = [k for k in missing if not k.startswith("head")]
            if missing or unexpected:
                raise ValueError(f"{checkpoint} does not fit timm model {model_name}: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
        self.feature_layer = feature_layer
        self.temporal_merge = temporal_merge
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)

    @property
    def output_dim(self) -> int:
        return self.model.num_features

    def preprocessor(self) -> "TimmPreprocessor":
        return TimmPreprocessor(self)

    @torch.no_grad()
    def tokens_per_frame(self) -> int:
        """Patch tokens one frame becomes, measured once with a blank frame of the model's input size."""
        _, height, width = self.model.default_cfg.get("input_size", (3, 224, 224))
        probe = torch.zeros(1, 3, height, width, device=next(self.model.parameters()).device)
        return self.encode(probe, torch.ones(1, 3, dtype=torch.long)).shape[0]

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`pixel_values` [frames, 3, H, W]; `grid_thw[:, 0]` frames per item (1 for an image)."""
        if self.feature_layer == -1:
            tokens = self.model.forward_features(pixel_values)
            tokens = tokens[:, self.num_prefix_tokens:] if tokens.ndim == 3 else tokens.flatten(2).transpose(1, 2)
        else:  # timm's intermediates come without prefix tokens
            tokens = self.model.forward_intermediates(pixel_values, indices=[self.feature_layer], output_fmt="NLC",
                                                      intermediates_only=True, norm=False)[0]
        out = []
        for item in tokens.split(grid_thw[:, 0].tolist()):
            if item.shape[0] > 1:  # a video: pool consecutive frames
                groups = item.split(self.temporal_merge)
                item = torch.stack([g.mean(dim=0) for g in groups])
            out.append(item.reshape(-1, item.shape[-1]))
        return torch.cat(out)


class TimmPreprocessor:
    """timm's own eval transform for the model (resize, crop, normalise)."""

    def __init__(self, encoder: TimmVisionEncoder) -> None:
        config = timm.data.resolve_data_config({}, model=encoder.model)
        self.transform = timm.data.create_transform(**config)
        self.tokens = encoder.tokens_per_frame()
        self.temporal_merge = encoder.temporal_merge

    def images(self, images: list[Image.Image]) -> VisionInputs:
        pixels = torch.stack([self.transform(image.convert("RGB")) for image in images])
        grid = torch.ones(len(images), 3, dtype=torch.long)
        return VisionInputs(pixels, grid, [self.tokens] * len(images))

    def video(self, frames: np.ndarray) -> VisionInputs:
        pixels = torch.stack([self.transform(Image.fromarray(frame)) for frame in frames])
        groups = -(-len(frames) // self.temporal_merge)
        grid = torch.tensor([[len(frames), 1, 1]])
        return VisionInputs(pixels, grid, [self.tokens * groups])
