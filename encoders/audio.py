"""Audio encoder: the Whisper encoder (transformers' class) on log-mel features of 16 kHz mono audio.

Audio longer than Whisper's 30-s window is cut into 30-s chunks; each chunk is encoded and the valid
frames of all chunks of one clip are concatenated (50 frames per second), so any length works.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30


@dataclass
class AudioInputs:
    """Preprocessed clips: one row of features per 30-s chunk, and how the chunks map back to clips."""

    features: torch.Tensor  # [chunks, n_mels, 3000]
    chunk_frames: torch.Tensor  # [chunks] valid encoder frames in each chunk
    chunks_per_clip: list[int]
    frames_per_clip: list[int]  # encoder frames of each clip (before any projector downsampling)


class WhisperAudioEncoder(WhisperEncoder):
    """transformers' WhisperEncoder, unchanged (`conv1`, `conv2`, `embed_positions`, `layers.*`, `layer_norm`)."""

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    def preprocessor(self) -> "WhisperPreprocessor":
        return WhisperPreprocessor(n_mels=self.config.num_mel_bins)

    def encode(self, inputs: AudioInputs) -> list[torch.Tensor]:
        """One `[frames, d_model]` tensor per clip."""
        hidden = self(inputs.features.to(self.dtype)).last_hidden_state
        chunks = [h[:n] for h, n in zip(hidden, inputs.chunk_frames.tolist())]
        out, start = [], 0
        for count in inputs.chunks_per_clip:
            out.append(torch.cat(chunks[start:start + count]))
            start += count
        return out


class WhisperPreprocessor:
    """Log-mel features with transformers' WhisperFeatureExtractor (`n_mels` 80 or 128)."""

    def __init__(self, n_mels: int = 80) -> None:
        self.extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE)
        self.chunk = CHUNK_SECONDS * SAMPLE_RATE

    def __call__(self, clips: list[np.ndarray]) -> AudioInputs:
        pieces, chunks_per_clip = [], []
        for clip in clips:
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"audio must be a non-empty mono waveform, got shape {clip.shape}")
            parts = [clip[i:i + self.chunk] for i in range(0, len(clip), self.chunk)]
            pieces += parts
            chunks_per_clip.append(len(parts))
        out = self.extractor(pieces, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length",
                             return_attention_mask=True)
        chunk_frames = (out["attention_mask"].sum(-1) + 1) // 2  # the encoder's conv2 has stride 2
        per_clip = torch.tensor(chunks_per_clip)
        clip_of_chunk = torch.arange(len(clips)).repeat_interleave(per_clip)
        frames_per_clip = torch.zeros(len(clips), dtype=torch.long).index_add_(0, clip_of_chunk, chunk_frames)
        return AudioInputs(out["input_features"], chunk_frames, chunks_per_clip, frames_per_clip.tolist())
