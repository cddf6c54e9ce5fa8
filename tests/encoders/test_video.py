import numpy as np
import pytest

import models  # noqa: F401
from encoders.video import video_inputs
from models.encoders import VISION_ENCODERS

TINY = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 48,
        "fullatt_block_indexes": [1], "min_pixels": 3136, "max_pixels": 12544}


def test_real_video_frames_are_merged_in_pairs_by_the_qwen_tower(video_frames):
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY)
    inputs = video_inputs(encoder.preprocessor(), video_frames)  # 8 frames
    t, h, w = inputs.grid_thw[0].tolist()
    assert t == 4  # temporal patch 2: consecutive frames merged
    features = encoder.encode(inputs.pixel_values, inputs.grid_thw)
    assert features.shape[0] == inputs.num_tokens[0] == t * h * w // 4


def test_timm_video_is_pooled_over_frame_groups(video_frames):
    encoder = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224", "temporal_merge": 4})
    inputs = video_inputs(encoder.preprocessor(), video_frames)
    assert inputs.num_tokens == [196 * 2]  # 8 frames -> 2 groups of 4
    assert encoder.encode(inputs.pixel_values, inputs.grid_thw).shape == (392, 192)


def test_bad_frames_are_refused():
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY)
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        video_inputs(encoder.preprocessor(), np.zeros((0, 32, 32, 3), dtype=np.uint8))
