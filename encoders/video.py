"""Video: sampled frames go through the vision encoder, then consecutive time steps are pooled.

Frame sampling and decoding live in data/media.py (`load_video`). A clip's frames are preprocessed by
the vision encoder's own preprocessing: the Qwen2.5-VL tower merges pairs of consecutive frames into
one temporal patch (an odd count repeats the last frame), a timm model sees every frame. The encoder's
features are then mean-pooled over groups of `temporal_pool` consecutive time steps (the last group
may be shorter): tokens = ceil(steps / temporal_pool) x tokens per step. `temporal_pool: 1` keeps
every step. A clip's audio track (`load_video(..., with_audio=True)`) goes through the audio encoder
like any audio; the processor places it right after the video span.

`VideoEncoder` is not an `nn.Module`: it borrows the vision encoder, whose parameters the model owns
once (no duplicated state-dict keys).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from encoders.vision import VisionInputs


class VideoEncoder:
    """`preprocess(frames) -> VisionInputs`, `__call__(pixel_values_videos, video_grid_thw) -> [tokens, dim]`."""

    def __init__(self, vision: nn.Module, temporal_pool: int = 1) -> None:
        if temporal_pool < 1:
            raise ValueError(f"temporal_pool must be >= 1, got {temporal_pool}")
        self.vision = vision
        self.temporal_pool = temporal_pool
        self._preprocessor = None

    @property
    def output_dim(self) -> int:
        return self.vision.output_dim

    def num_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Tokens of each video after pooling, from its grid alone."""
        steps = grid_thw[:, 0].tolist()
        per_step = [n // t for n, t in zip(self.vision.num_tokens(grid_thw), steps)]
        return [math.ceil(t / self.temporal_pool) * p for t, p in zip(steps, per_step)]

    def token_grid(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """[videos, 3] (time steps after pooling, h, w) of the output tokens, for 3-D RoPE."""
        grid = self.vision.token_grid(grid_thw).clone()
        grid[:, 0] = (grid[:, 0] + self.temporal_pool - 1) // self.temporal_pool
        return grid

    def preprocess(self, frames: np.ndarray) -> VisionInputs:
        """uint8 frames [T, H, W, 3] -> encoder inputs of one clip, with its token count after pooling."""
        if self._preprocessor is None:
            self._preprocessor = self.vision.preprocessor()
        inputs = self._preprocessor.video(frames)
        return VisionInputs(inputs.pixel_values, inputs.grid_thw, self.num_tokens(inputs.grid_thw))

    def __call__(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        features = self.vision(pixel_values, grid_thw)
        if self.temporal_pool == 1:
            return features
        out = []
        for clip, steps in zip(features.split(self.vision.num_tokens(grid_thw)), grid_thw[:, 0].tolist()):
            # rows are ordered time step first (Qwen's merger and timm's frames alike)
            grid = clip.reshape(steps, -1, clip.shape[-1])
            pooled = torch.stack([group.mean(dim=0) for group in grid.split(self.temporal_pool)])
            out.append(pooled.reshape(-1, clip.shape[-1]))
        return torch.cat(out)
