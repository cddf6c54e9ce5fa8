"""Audio encoder: the Whisper encoder (transformers' class) on log-mel features of 16 kHz mono audio.

Whisper sees 30-s windows (3000 mel frames -> 1500 encoder frames, 50 per second). Longer audio is cut
into 30-s chunks; each chunk is encoded and the valid frames of all chunks of one clip are concatenated,
so any length works. `frame_stride` > 1 mean-pools groups of that many consecutive frames (the last
group may be shorter) before the projector, to shorten the sequence the LLM sees.

Interface: `preprocessor()([waveforms]) -> AudioInputs` (with `frames_per_clip`, known before the
encoder runs), `forward(AudioInputs) -> [frames, d_model] per clip` (`encode` is the same call),
`output_dim`, `load_checkpoint(path)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from encoders.checkpoint import check_fields, load_strict, read_config, read_prefixed

SAMPLE_RATE = 16_000
CHUNK_SECONDS = 30
# Whisper config fields that decide parameter shapes.
WHISPER_ARCHITECTURE_FIELDS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                               "num_mel_bins", "max_source_positions")


@dataclass
class AudioInputs:
    """Preprocessed clips: one row of features per 30-s chunk, and how the chunks map back to clips."""

    features: torch.Tensor  # [chunks, n_mels, 3000] log-mel
    chunk_frames: torch.Tensor  # [chunks] valid encoder frames in each chunk
    chunks_per_clip: list[int]
    frames_per_clip: list[int]  # output rows of each clip (after `frame_stride`, before the projector)


def strided_frames(frames: int, stride: int) -> int:
    return math.ceil(frames / stride)


class WhisperAudioEncoder(WhisperEncoder):
    """transformers' WhisperEncoder, unchanged (`conv1`, `conv2`, `embed_positions`, `layers.*`, `layer_norm`).

    `config.frame_stride` (default 1) is the frame pooling above; it is stored on the config so it travels
    with saved models.
    """

    @property
    def output_dim(self) -> int:
        return self.config.d_model

    @property
    def frame_stride(self) -> int:
        return getattr(self.config, "frame_stride", 1)

    def preprocessor(self) -> "WhisperPreprocessor":
        return WhisperPreprocessor(n_mels=self.config.num_mel_bins, frame_stride=self.frame_stride)

    def forward(self, inputs: AudioInputs) -> list[torch.Tensor]:
        """One `[frames_per_clip[i], d_model]` tensor per clip."""
        hidden = super().forward(inputs.features.to(self.dtype)).last_hidden_state
        chunks = [h[:n] for h, n in zip(hidden, inputs.chunk_frames.tolist())]
        out, start = [], 0
        for count in inputs.chunks_per_clip:
            clip = torch.cat(chunks[start:start + count])
            start += count
            if self.frame_stride > 1:
                groups = clip.split(self.frame_stride)
                clip = torch.stack([group.mean(dim=0) for group in groups])
            out.append(clip)
        return out

    def encode(self, inputs: AudioInputs) -> list[torch.Tensor]:
        return self(inputs)

    def load_checkpoint(self, path: str | Path) -> None:
        """A Whisper checkpoint directory in the transformers layout (`model.encoder.*`; `encoder.*` for a
        saved WhisperModel encoder alone)."""
        if (Path(path) / "config.json").is_file():
            check_fields(self.config.to_dict(), read_config(path), WHISPER_ARCHITECTURE_FIELDS, f"{path}/config.json")
        load_strict(self, read_prefixed(path, ("model.encoder.", "encoder.")), f"{path} (Whisper encoder)")


class WhisperPreprocessor:
    """Log-mel features with transformers' WhisperFeatureExtractor (`n_mels` 80 or 128) of 16 kHz mono audio
    (data/media.py's `load_audio` resamples and down-mixes anything else)."""

    def __init__(self, n_mels: int = 80, frame_stride: int = 1) -> None:
        self.extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE)
        self.chunk = CHUNK_SECONDS * SAMPLE_RATE
        self.frame_stride = frame_stride

    def __call__(self, clips: list[np.ndarray]) -> AudioInputs:
        pieces, chunks_per_clip = [], []
        for index, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size == 0:
                raise ValueError(f"audio clip {index} must be a non-empty mono 16 kHz waveform, got shape {clip.shape} "
                                 f"(decode with data.media.load_audio, which down-mixes and resamples)")
            parts = [clip[i:i + self.chunk] for i in range(0, len(clip), self.chunk)]
            pieces += parts
            chunks_per_clip.append(len(parts))
        out = self.extractor(pieces, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="max_length",
                             return_attention_mask=True)
        chunk_frames = (out["attention_mask"].sum(-1) + 1) // 2  # the encoder's conv2 has stride 2
        frames, start = [], 0
        for count in chunks_per_clip:
            frames.append(strided_frames(int(chunk_frames[start:start + count].sum()), self.frame_stride))
            start += count
        return AudioInputs(out["input_features"], chunk_frames, chunks_per_clip, frames)
