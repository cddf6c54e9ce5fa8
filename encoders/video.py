"""Video: sampled frames go through the vision encoder's preprocessing and tower.

Frame sampling and decoding live in data/media.py; here a clip's frames become vision inputs: the
Qwen2.5-VL tower merges pairs of consecutive frames (temporal patch 2), a timm encoder mean-pools
groups of `temporal_merge` frames. A clip's audio track goes through the audio encoder like any audio.
"""
from __future__ import annotations

import numpy as np

from encoders.vision import QwenPreprocessor, TimmPreprocessor, VisionInputs


def video_inputs(preprocessor: QwenPreprocessor | TimmPreprocessor, frames: np.ndarray) -> VisionInputs:
    """uint8 frames [T, H, W, 3] -> encoder inputs with the clip's token count."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"video frames must be a non-empty uint8 array [T, H, W, 3], got shape {frames.shape}")
    return preprocessor.video(frames)
