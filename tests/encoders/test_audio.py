import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperForConditionalGeneration

import models  # noqa: F401
from models.checkpoint import CheckpointError
from models.encoders import AUDIO_ENCODERS
from models.ming_checkpoint import load_audio_encoder, openai_whisper_to_transformers

TINY = {"d_model": 32, "encoder_layers": 2, "encoder_attention_heads": 2, "encoder_ffn_dim": 64,
        "num_mel_bins": 80, "max_source_positions": 1500}


def test_real_speech_frames_match_the_prediction(speech):
    encoder = AUDIO_ENCODERS.build("whisper", TINY).eval()
    inputs = encoder.preprocessor()([speech])
    (features,) = encoder.encode(inputs)
    assert features.shape == (inputs.frames_per_clip[0], 32)
    assert inputs.frames_per_clip[0] == pytest.approx(len(speech) / 16000 * 50, abs=2)  # 50 frames per second


def test_long_audio_is_chunked_into_30_second_windows():
    encoder = AUDIO_ENCODERS.build("whisper", TINY).eval()
    clip = np.random.default_rng(0).normal(size=16000 * 70).astype(np.float32) * 0.1  # 70 s
    inputs = encoder.preprocessor()([clip, clip[:16000]])
    assert inputs.chunks_per_clip == [3, 1] and inputs.features.shape[0] == 4
    long, short = encoder.encode(inputs)
    assert long.shape[0] == inputs.frames_per_clip[0] == 3500 and short.shape[0] == inputs.frames_per_clip[1] == 50


def test_stereo_or_empty_audio_is_refused_by_the_preprocessor():
    preprocessor = AUDIO_ENCODERS.build("whisper", TINY).preprocessor()
    with pytest.raises(ValueError, match="mono"):
        preprocessor([np.zeros((2, 1600), dtype=np.float32)])
    with pytest.raises(ValueError, match="non-empty"):
        preprocessor([np.zeros(0, dtype=np.float32)])


def test_whisper_checkpoint_encoder_loads_without_missing_keys(tmp_path):
    config = WhisperConfig(**TINY, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                           max_target_positions=32)
    official = WhisperForConditionalGeneration(config)
    official.save_pretrained(tmp_path)
    encoder = AUDIO_ENCODERS.build("whisper", TINY)
    load_audio_encoder(encoder, tmp_path)
    reference = official.model.encoder.state_dict()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_whisper_checkpoint_of_another_width_fails_with_shapes(tmp_path):
    official = WhisperForConditionalGeneration(WhisperConfig(**{**TINY, "d_model": 48}, decoder_layers=1,
                                                             decoder_attention_heads=2, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    official.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="shape mismatches: conv1.weight"):
        load_audio_encoder(AUDIO_ENCODERS.build("whisper", TINY), tmp_path)


def test_openai_whisper_names_map_to_transformers_names():
    assert openai_whisper_to_transformers("blocks.3.attn.query.weight") == "layers.3.self_attn.q_proj.weight"
    assert openai_whisper_to_transformers("blocks.3.mlp.2.bias") == "layers.3.fc2.bias"
    assert openai_whisper_to_transformers("positional_embedding") == "embed_positions.weight"
    assert openai_whisper_to_transformers("ln_post.weight") == "layer_norm.weight"
    assert openai_whisper_to_transformers("conv1.weight") == "conv1.weight"
