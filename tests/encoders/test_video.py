"""Video through the vision encoders: real clips, temporal merging and pooling, token counts, audio track."""
import numpy as np
import pytest
import torch

from data.media import load_video
from models.encoders import AUDIO_ENCODERS, VISION_ENCODERS, build_video_encoder

TINY = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 48,
        "fullatt_block_indexes": [1], "min_pixels": 3136, "max_pixels": 12544}


@pytest.fixture(scope="module")
def qwen():
    torch.manual_seed(0)
    return VISION_ENCODERS.build("qwen2_5_vl", TINY).eval()


@pytest.mark.parametrize("name", ["mmaction2_demo_arm_wrestling.mp4", "flipping_a_pancake.mkv"])
def test_real_video_token_counts_match_with_and_without_pooling(qwen, assets, name):
    clip = load_video(assets / name, num_frames=8)
    unpooled, pooled = build_video_encoder(qwen), build_video_encoder(qwen, {"temporal_pool": 3})
    plain, merged = unpooled.preprocess(clip.frames), pooled.preprocess(clip.frames)
    t, h, w = plain.grid_thw[0].tolist()
    assert t == 4  # the tower's temporal patch merges pairs of consecutive frames
    assert plain.num_tokens == [4 * h * w // 4] and merged.num_tokens == [2 * h * w // 4]  # ceil(4 / 3) = 2 steps
    with torch.no_grad():
        full = unpooled(plain.pixel_values, plain.grid_thw)
        pooled_features = pooled(merged.pixel_values, merged.grid_thw)
    assert full.shape == (plain.num_tokens[0], 48) and pooled_features.shape == (merged.num_tokens[0], 48)
    steps = full.reshape(4, -1, 48)
    torch.testing.assert_close(pooled_features.reshape(2, -1, 48), torch.stack([steps[:3].mean(0), steps[3]]))


def test_odd_frame_counts_repeat_the_last_frame(qwen, assets):
    clip = load_video(assets / "mmaction2_demo_arm_wrestling.mp4", num_frames=5)
    video = build_video_encoder(qwen)
    inputs = video.preprocess(clip.frames)
    assert inputs.grid_thw[0, 0] == 3
    with torch.no_grad():
        assert video(inputs.pixel_values, inputs.grid_thw).shape[0] == inputs.num_tokens[0]


def test_timm_video_frames_pooled_in_groups(assets):
    encoder = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224"}).eval()
    video = build_video_encoder(encoder, {"temporal_pool": 4})
    clip = load_video(assets / "flipping_a_pancake.mkv", num_frames=6)
    inputs = video.preprocess(clip.frames)
    assert inputs.num_tokens == [196 * 2]  # 6 frames -> groups of 4 and 2
    with torch.no_grad():
        assert video(inputs.pixel_values, inputs.grid_thw).shape == (392, 192)


def test_video_audio_track_goes_through_the_audio_encoder(assets):
    clip = load_video(assets / "flipping_a_pancake.mkv", num_frames=4, with_audio=True)
    encoder = AUDIO_ENCODERS.build("whisper", {"d_model": 32, "encoder_layers": 1, "encoder_attention_heads": 2,
                                               "encoder_ffn_dim": 64}).eval()
    inputs = encoder.preprocessor()([clip.audio])
    with torch.no_grad():
        features = encoder(inputs)
    assert features.shape[0] == inputs.frames_per_clip[0] == pytest.approx(50 * 10.4, abs=3)


def test_bad_frames_and_settings_are_refused(qwen):
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        build_video_encoder(qwen).preprocess(np.zeros((0, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="non-empty uint8 array"):
        build_video_encoder(qwen).preprocess(np.zeros((2, 32, 32, 3), dtype=np.float32))
    from models.config import ConfigError
    with pytest.raises(ConfigError, match="temporal_pool must be >= 1"):
        build_video_encoder(qwen, {"temporal_pool": 0})
