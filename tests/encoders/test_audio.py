"""The Whisper encoder on real speech, as Ming-Lite-Omni v1.5 runs it: each clip at its own length (openai-whisper
log-mel, no padding to 30 s), batches that equal clips alone, windows for long clips, pooling, checkpoints."""
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration
from transformers.audio_utils import mel_filter_bank

from data.media import load_audio
from encoders.checkpoint import CheckpointError
from models.encoders import AUDIO_ENCODERS

TEST_ASSETS = Path(__file__).resolve().parent.parent / "assets"
TINY = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64, "num_mel_bins": 80}
DECODER = {"decoder_layers": 1, "decoder_attention_heads": 2, "decoder_ffn_dim": 64, "vocab_size": 100,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
           "max_target_positions": 32}


def openai_whisper_log_mel(wave: np.ndarray, n_mels: int) -> torch.Tensor:
    """openai-whisper's `audio.log_mel_spectrogram` (the official WhisperFrontend's call), written out: [n_mels, T]."""
    stft = torch.stft(torch.from_numpy(wave), 400, 160, window=torch.hann_window(400), return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filter_bank(num_frequency_bins=201, num_mel_filters=n_mels, min_frequency=0.0,
                                               max_frequency=8000.0, sampling_rate=16000, norm="slaney",
                                               mel_scale="slaney")).float().T
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("n_mels", [80, 128])
def test_a_3_second_clip_is_encoded_at_its_own_length_with_the_official_mel(n_mels):
    wave = load_audio(TEST_ASSETS / "speech_recognition_english.wav")  # 2.74 s at 44.1 kHz, resampled to 16 kHz
    encoder = AUDIO_ENCODERS.build("whisper", {**TINY, "num_mel_bins": n_mels}).eval()
    inputs = encoder.preprocessor()([wave])
    mel_frames = len(wave) // 160
    assert inputs.features.shape == (mel_frames, n_mels) and inputs.chunk_frames.tolist() == [mel_frames]
    torch.testing.assert_close(inputs.features.T, openai_whisper_log_mel(wave, n_mels), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        features = encoder(inputs)
    assert features.shape == ((mel_frames - 1) // 2 + 1, 32) == (inputs.frames_per_clip[0], 32)
    assert features.shape[0] < 150 < 1500  # not a 30-s window


def test_a_batch_of_clips_of_different_lengths_equals_each_clip_alone(assets):
    encoder = AUDIO_ENCODERS.build("whisper", TINY).eval()
    preprocess = encoder.preprocessor()
    waves = [load_audio(assets / "LDC93S1.wav"), load_audio(assets / "sense_and_sensibility_0880.wav")[:47_840],
             load_audio(TEST_ASSETS / "speech_recognition_english.wav"), load_audio(assets / "jfk.flac")]
    assert len({len(w) // 160 % 2 for w in waves}) == 2  # odd and even mel lengths (conv2's last frame differs)
    batch = preprocess(waves)
    with torch.no_grad():
        together = encoder(batch).split(batch.frames_per_clip)
        for index, wave in enumerate(waves):
            alone = preprocess([wave])
            assert torch.equal(batch.features.split(batch.chunk_frames.tolist())[index], alone.features)
            features = encoder(alone)
            assert together[index].shape == features.shape == (alone.frames_per_clip[0], 32)
            torch.testing.assert_close(together[index], features, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["jfk.flac", "1272-128104-0000.flac", "LDC93S1.wav", "BAC009S0764W0121.wav"])
def test_real_speech_frames_match_the_prediction(assets, name):
    encoder = AUDIO_ENCODERS.build("whisper", TINY).eval()
    wave = load_audio(assets / name)
    inputs = encoder.preprocessor()([wave])
    with torch.no_grad():
        features = encoder(inputs)
    assert features.shape == (inputs.frames_per_clip[0], encoder.output_dim) == (inputs.frames_per_clip[0], 32)
    assert inputs.frames_per_clip[0] == pytest.approx(len(wave) / 16000 * 50, abs=1)  # 50 frames per second


def test_audio_longer_than_the_positional_table_is_cut_into_windows_and_strided():
    encoder = AUDIO_ENCODERS.build("whisper", {**TINY, "frame_stride": 4}).eval()
    clip = np.random.default_rng(0).normal(size=16000 * 70).astype(np.float32) * 0.1  # 70 s, table: 30 s
    inputs = encoder.preprocessor()([clip, clip[:16000]])
    assert inputs.chunks_per_clip == [3, 1] and inputs.features.shape == (7100, 80)
    assert inputs.chunk_frames.tolist() == [3000, 3000, 1000, 100]  # mel frames of each window
    assert inputs.frames_per_clip == [875, 13]  # ceil(3500 / 4), ceil(50 / 4)
    with torch.no_grad():
        long, short = encoder(inputs).split(inputs.frames_per_clip)
        plain = AUDIO_ENCODERS.build("whisper", TINY).eval()
        plain.load_state_dict(encoder.state_dict())
        unpooled = plain(inputs).split(plain.preprocessor()([clip, clip[:16000]]).frames_per_clip)[1]
    assert long.shape == (875, 32) and short.shape == (13, 32)
    torch.testing.assert_close(short[0], unpooled[:4].mean(0))
    torch.testing.assert_close(short[-1], unpooled[48:].mean(0))  # the last group holds the 2 leftover frames
    ming = AUDIO_ENCODERS.build("whisper", {**TINY, "max_source_positions": 15000})  # Ming's 300-s table
    assert ming.preprocessor()([clip]).chunks_per_clip == [1]


def test_stereo_or_empty_waveforms_are_refused_by_the_preprocessor():
    preprocessor = AUDIO_ENCODERS.build("whisper", TINY).preprocessor()
    with pytest.raises(ValueError, match="clip 0 must be a mono 16 kHz waveform of at least 20 ms.*load_audio"):
        preprocessor([np.zeros((2, 1600), dtype=np.float32)])
    with pytest.raises(ValueError, match="clip 1 must be a mono 16 kHz waveform"):
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


def test_whisper_section_rejects_an_empty_positional_table():
    from models.config import ConfigError
    with pytest.raises(ConfigError, match="max_source_positions must be >= 1"):
        AUDIO_ENCODERS.build("whisper", {**TINY, "max_source_positions": 0})
