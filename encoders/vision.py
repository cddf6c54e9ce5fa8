"""Vision encoders: the Qwen2.5-VL vision tower (Ming-Lite-Omni's) and any timm model, with their preprocessing.

Every vision encoder offers the same interface (the OmniModel and the processor rely on nothing else):

- `preprocessor()` -> an object with `images(list[PIL.Image]) -> VisionInputs` and
  `video(frames uint8 [T, H, W, 3]) -> VisionInputs`; `VisionInputs.num_tokens` says, before the
  encoder runs, how many feature rows each item will become (placeholder expansion needs it);
- `forward(pixel_values, grid_thw) -> [sum(num_tokens), output_dim]`: all items of a batch,
  concatenated in order (`encode` is the same call);
- `num_tokens(grid_thw) -> list[int]`, `token_grid(grid_thw) -> [items, 3]` (t, h, w of the output tokens,
  for 3-D RoPE) and `output_dim`;
- `load_checkpoint(path)`: strict loading from a component checkpoint directory.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

from encoders.checkpoint import CheckpointError, check_fields, load_strict, read_config, read_prefixed

# Qwen2.5-VL vision-config fields that decide parameter shapes or the token layout.
QWEN_ARCHITECTURE_FIELDS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                            "spatial_merge_size", "temporal_patch_size", "out_hidden_size", "window_size",
                            "fullatt_block_indexes", "hidden_act")


@dataclass
class VisionInputs:
    """Preprocessed images or videos: encoder inputs plus the token count of each item.

    `grid_thw` [items, 3]: Qwen: temporal, height, width patch grid (before the 2x2 merge);
    timm: [frames, 1, tokens per frame].
    """

    pixel_values: torch.Tensor
    grid_thw: torch.Tensor
    num_tokens: list[int]


class QwenVisionEncoder(Qwen2_5_VisionTransformerPretrainedModel):
    """transformers' Qwen2.5-VL vision transformer (window attention, 2x2 patch merger), unchanged.

    Parameter names are those of Qwen2.5-VL's `visual.*` and Ming-Lite-Omni's `vision.*` checkpoints;
    `forward` returns the merged patch features instead of a ModelOutput.
    """

    @property
    def output_dim(self) -> int:
        return self.config.out_hidden_size

    @property
    def merge_unit(self) -> int:
        return self.config.spatial_merge_size ** 2

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """`pixel_values` [patches, C*T*P*P] from the preprocessor -> [sum(num_tokens), out_hidden_size]."""
        return super().forward(pixel_values.to(self.dtype), grid_thw=grid_thw, **kwargs).pooler_output

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self(pixel_values, grid_thw)

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw.prod(-1) // self.merge_unit).tolist()

    def token_grid(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[items, 3] (t, h, w) of the merged tokens, the grid 3-D RoPE numbers (models/rope.py)."""
        merge = self.config.spatial_merge_size
        return torch.stack([grid_thw[:, 0], grid_thw[:, 1] // merge, grid_thw[:, 2] // merge], dim=-1)

    def preprocessor(self) -> "QwenPreprocessor":
        pixels = {k: getattr(self.config, k) for k in ("min_pixels", "max_pixels") if hasattr(self.config, k)}
        return QwenPreprocessor(patch_size=self.config.patch_size, merge_size=self.config.spatial_merge_size,
                                temporal_patch_size=self.config.temporal_patch_size, **pixels)

    def load_checkpoint(self, path: str | Path) -> None:
        """A Qwen2.5-VL checkpoint directory: `vision_config` in config.json, weights under `model.visual.`
        (transformers >= 4.52) or `visual.` (the original release)."""
        if (Path(path) / "config.json").is_file():
            check_fields(self.config.to_dict(), read_config(path, "vision_config"), QWEN_ARCHITECTURE_FIELDS,
                         f"{path}/config.json vision_config")
        load_strict(self, read_prefixed(path, ("model.visual.", "visual.")), f"{path} (Qwen2.5-VL vision tower)")


class QwenPreprocessor:
    """Dynamic resolution: each image is resized to a multiple of 28 px (patch 14 x merge 2) with its pixel
    count in [min_pixels, max_pixels]; pairs of consecutive video frames form one temporal patch (an odd
    frame count repeats the last frame)."""

    def __init__(self, min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280, patch_size: int = 14,
                 merge_size: int = 2, temporal_patch_size: int = 2) -> None:
        options = dict(min_pixels=min_pixels, max_pixels=max_pixels, patch_size=patch_size, merge_size=merge_size,
                       temporal_patch_size=temporal_patch_size)
        self.image_processor = Qwen2VLImageProcessor(**options)
        self.video_processor = Qwen2VLVideoProcessor(**options, cap_pixels_per_frame=True)
        self.merge_unit = merge_size ** 2

    def images(self, images: list[Image.Image]) -> VisionInputs:
        out = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        grid = out["image_grid_thw"]
        return VisionInputs(out["pixel_values"], grid, (grid.prod(-1) // self.merge_unit).tolist())

    def video(self, frames: np.ndarray) -> VisionInputs:
        check_frames(frames)
        out = self.video_processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
        grid = out["video_grid_thw"]
        return VisionInputs(out["pixel_values_videos"], grid, (grid.prod(-1) // self.merge_unit).tolist())


class TimmVisionEncoder(nn.Module):
    """Any timm image model as a patch-token encoder (prefix/CLS tokens dropped).

    `feature_layer`: the block whose output is used (-1 the last, after the final norm; -2 the
    penultimate block, as LLaVA does). `checkpoint`: a local timm state-dict file (.safetensors, .pth);
    the classifier head is not built, so `head.*` keys in the file are ignored.
    """

    def __init__(self, model_name: str, feature_layer: int = -1, checkpoint: str | None = None,
                 model_kwargs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model_name = model_name
        self.model = timm.create_model(model_name, pretrained=False, num_classes=0, **(model_kwargs or {}))
        self.feature_layer = feature_layer
        self.num_prefix_tokens = getattr(self.model, "num_prefix_tokens", 0)
        if checkpoint:
            self.load_checkpoint(checkpoint)
        self.tokens_per_frame = self._tokens_per_frame()

    @property
    def output_dim(self) -> int:
        return self.model.num_features

    def load_checkpoint(self, path: str | Path) -> None:
        if not Path(path).is_file():
            raise CheckpointError(f"timm checkpoint file not found: {path}")
        state = timm.models.load_state_dict(str(path), weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        load_strict(self.model, state, f"{path} (timm {self.model_name})")

    def _tokens_per_frame(self) -> int:
        grid = getattr(getattr(self.model, "patch_embed", None), "grid_size", None)
        if grid is not None:  # ViT-style: one token per patch
            return int(np.prod(grid))
        _, height, width = self.model.pretrained_cfg.get("input_size", (3, 224, 224))
        with torch.no_grad():  # any other backbone: measure once on a blank frame
            probe = torch.zeros(1, 3, height, width, device=next(self.model.parameters()).device)
            return self._frame_tokens(probe).shape[1]

    def _frame_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[frames, 3, H, W] -> [frames, tokens, dim]."""
        if self.feature_layer == -1:
            tokens = self.model.forward_features(pixel_values)
            return tokens[:, self.num_prefix_tokens:] if tokens.ndim == 3 else tokens.flatten(2).transpose(1, 2)
        tokens = self.model.forward_intermediates(pixel_values, indices=[self.feature_layer], norm=False,
                                                  intermediates_only=True)[0]  # prefix tokens already removed
        return tokens.flatten(2).transpose(1, 2) if tokens.ndim == 4 else tokens

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """`pixel_values` [frames, 3, H, W] (an image is one frame) -> [frames * tokens_per_frame, dim]."""
        tokens = self._frame_tokens(pixel_values.to(next(self.model.parameters()).dtype))
        return tokens.reshape(-1, tokens.shape[-1])

    def encode(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self(pixel_values, grid_thw)

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        return (grid_thw[:, 0] * grid_thw[:, 2]).tolist()

    def token_grid(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[items, 3]: frames x 1 x tokens per frame (a timm model's tokens have no 2-D layout we rely on)."""
        return grid_thw.clone()

    def preprocessor(self) -> "TimmPreprocessor":
        return TimmPreprocessor(self.model, self.tokens_per_frame)


class TimmPreprocessor:
    """timm's own eval transform for the model (resize, centre crop, normalise): a fixed token count."""

    def __init__(self, model: nn.Module, tokens_per_frame: int) -> None:
        config = timm.data.resolve_data_config({}, model=model)
        self.transform = timm.data.create_transform(**config)
        self.tokens = tokens_per_frame

    def images(self, images: list[Image.Image]) -> VisionInputs:
        pixels = torch.stack([self.transform(image.convert("RGB")) for image in images])
        grid = torch.tensor([[1, 1, self.tokens]] * len(images))
        return VisionInputs(pixels, grid, [self.tokens] * len(images))

    def video(self, frames: np.ndarray) -> VisionInputs:
        check_frames(frames)
        pixels = torch.stack([self.transform(Image.fromarray(frame)) for frame in frames])
        return VisionInputs(pixels, torch.tensor([[len(frames), 1, self.tokens]]), [len(frames) * self.tokens])


def check_frames(frames: np.ndarray) -> None:
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0 \
            or frames.dtype != np.uint8:
        shape = getattr(frames, "shape", None)
        raise ValueError(f"video frames must be a non-empty uint8 array [T, H, W, 3], got "
                         f"{type(frames).__name__} of shape {shape} and dtype {getattr(frames, 'dtype', None)}")
