"""The Whisper encoder on real speech: frame counts known before running, chunking, pooling, checkpoints."""
import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

from data.media import load_audio
from encoders.checkpoint import CheckpointError
from models.encoders import AUDIO_ENCODERS

TINY = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80}
DECODER = {"decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "vocab_size": 100,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
           "max_target_positions": 32}


@pytest.mark.parametrize("name", ["jfk.flac", "1272-128104-0000.flac", "LDC93S1.wav", "BAC009S0764W0121.wav"])
def test_real_speech_frames_match_the_prediction(assets, name):
    encoder = AUDIO_ENCODERS.build("whisper", TINY).eval()
    wave = load_audio(assets / name)
    inputs = encoder.preprocessor()([wave])
    with torch.no_grad():
        (features,) = encoder(inputs)
    assert features.shape == (inputs.frames_per_clip[0], encoder.output_dim) == (inputs.frames_per_clip[0], 32)
    assert inputs.frames_per_clip[0] == pytest.approx(len(wave) / 16000 * 50, abs=1)  # 50 frames per second


def test_long_audio_is_chunked_into_30_second_windows_and_strided():
    encoder = AUDIO_ENCODERS.build("whisper", {**TINY, "frame_stride": 4}).eval()
    clip = np.random.default_rng(0).normal(size=16000 * 70).astype(np.float32) * 0.1  # 70 s
    inputs = encoder.preprocessor()([clip, clip[:16000]])
    assert inputs.chunks_per_clip == [3, 1] and inputs.features.shape == (4, 80, 3000)
    assert inputs.chunk_frames.tolist() == [1500, 1500, 500, 50]
    assert inputs.frames_per_clip == [875, 13]  # ceil(3500 / 4), ceil(50 / 4)
    with torch.no_grad():
        long, short = encoder(inputs)
        plain = AUDIO_ENCODERS.build("whisper", TINY).eval()
        plain.load_state_dict(encoder.state_dict())
        unpooled = plain(inputs)[1]
    assert long.shape == (875, 32) and short.shape == (13, 32)
    torch.testing.assert_close(short[0], unpooled[:4].mean(0))
    torch.testing.assert_close(short[-1], unpooled[48:].mean(0))  # the last group holds the 2 leftover frames


def test_stereo_or_empty_waveforms_are_refused_by_the_preprocessor():
    preprocessor = AUDIO_ENCODERS.build("whisper", TINY).preprocessor()
    with pytest.raises(ValueError, match="clip 0 must be a non-empty mono 16 kHz waveform.*load_audio"):
        preprocessor([np.zeros((2, 1600), dtype=np.float32)])
    with pytest.raises(ValueError, match="clip 1 must be a non-empty mono"):
        preprocessor([np.zeros(1600, dtype=np.float32), np.zeros(0, dtype=np.float32)])


def test_whisper_checkpoint_encoder_loads_without_missing_keys(tmp_path):
    official = WhisperForConditionalGeneration(WhisperConfig(**TINY, **DECODER))
    official.save_pretrained(tmp_path)
    encoder = AUDIO_ENCODERS.build("whisper", TINY)
    encoder.load_checkpoint(tmp_path)
    reference = official.model.encoder.state_dict()
    assert encoder.state_dict().keys() == reference.keys()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_whisper_checkpoint_of_another_width_fails_naming_the_field(tmp_path):
    official = WhisperForConditionalGeneration(WhisperConfig(**{**TINY, "d_model": 48}, **DECODER))
    official.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="d_model: checkpoint 48 vs encoder 32"):
        AUDIO_ENCODERS.build("whisper", TINY).load_checkpoint(tmp_path)
    (tmp_path / "config.json").unlink()  # without a config, the shapes speak
    with pytest.raises(CheckpointError, match=r"shape mismatches: conv1.weight: checkpoint \(48, 80, 3\)"):
        AUDIO_ENCODERS.build("whisper", TINY).load_checkpoint(tmp_path)


def test_whisper_section_rejects_other_window_lengths():
    from models.config import ConfigError
    with pytest.raises(ConfigError, match="max_source_positions must be 1500"):
        AUDIO_ENCODERS.build("whisper", {**TINY, "max_source_positions": 15000})
