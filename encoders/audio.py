"""Audio encoder: the Whisper encoder (transformers' modules) on log-mel features of 16 kHz mono audio, each clip
at its own length, as Ming-Lite-Omni v1.5 encodes it.

The official code (inclusionAI/Ming d97e2f3) computes openai-whisper's `log_mel_spectrogram` of the whole clip
(audio_processing_bailingmm.py `WhisperFrontend`: n_fft 400, hop 160, Slaney mel filters, log10, floor at
max - 8, (x + 4) / 4; 128 mels for v1.5) with no padding to 30 s, and its encoder (modeling_whisper_encoder.py
`WhisperAudioEncoder.forward`) runs conv1, conv2 (stride 2), the first frames' positional embeddings, the blocks
and ln_post on exactly those frames: `(mel_frames - 1) // 2 + 1` encoder frames, 50 per second. transformers'
`WhisperFeatureExtractor` on one unpadded clip computes the same features (tested), and its `WhisperEncoder`
holds the same modules; we run them on variable lengths. (`am.mvn` in the release is the CMVN of the other
frontend, the Kaldi fbank + LFR `WavFrontend` of the non-Whisper audio encoder; the Whisper path never reads it.)

A clip longer than the positional table (`max_source_positions` encoder frames: 1500 = 30 s for Whisper, 15000 =
300 s for Ming's table) is cut into windows of that many frames; the official encoder refuses such clips.
Clips of different lengths in one batch are padded, and the padding is masked out (conv1's output past a
window's end is zeroed, attention ignores padded frames), so each clip's features equal the clip encoded alone;
the official batched call does not mask. `frame_stride` > 1 mean-pools groups of that many consecutive frames
(the last group may be shorter) before the projector.

Interface: `preprocessor()([waveforms]) -> AudioInputs` (with `frames_per_clip`, known before the encoder runs),
`forward(AudioInputs) -> [frames of every clip, d_model]`, clip after clip (`.split(inputs.frames_per_clip)`
gives the clips; `encode` is the same call), `output_dim`, `load_checkpoint(path)`. One tensor, not one per
clip: ZeRO-3 hooks every tensor a module returns and gathers its weights again in each hook's backward, so a
list as long as the batch's clip count would pair up with no other rank's gathers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from encoders.checkpoint import check_fields, load_strict, read_config, read_prefixed

SAMPLE_RATE = 16_000
HOP_LENGTH = 160  # one mel frame per 10 ms
# Whisper config fields that decide parameter shapes.
WHISPER_ARCHITECTURE_FIELDS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                               "num_mel_bins", "max_source_positions")


@dataclass
class AudioInputs:
    """Preprocessed clips: the log-mel frames of every window, frames first and window after window (so the
    inputs of several samples concatenate along dim 0), and how the windows map back to clips."""

    features: torch.Tensor  # [mel frames of all windows, n_mels]
    chunk_frames: torch.Tensor  # [windows] mel frames of each window (one window per clip unless it is too long)
    chunks_per_clip: list[int]
    frames_per_clip: list[int]  # output rows of each clip (after `frame_stride`, before the projector)


def encoder_frames(mel_frames: int | torch.Tensor) -> int | torch.Tensor:
    """Encoder output frames of a window: conv2 (kernel 3, stride 2, padding 1), as the official
    `(length - 3 + 2) // 2 + 1` (modeling_utils.py `encode_audio_segments`)."""
    return (mel_frames - 1) // 2 + 1


def strided_frames(frames: int, stride: int) -> int:
    return math.ceil(frames / stride)


class WhisperAudioEncoder(WhisperEncoder):
    """transformers' WhisperEncoder modules (`conv1`, `conv2`, `embed_positions`, `layers.*`, `layer_norm`),
    run at each window's own length (transformers' `forward` insists on 3000 frames).

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
        return WhisperPreprocessor(n_mels=self.config.num_mel_bins, frame_stride=self.frame_stride,
                                   max_source_positions=self.config.max_source_positions)

    def forward(self, inputs: AudioInputs) -> torch.Tensor:
        """`[sum(frames_per_clip), d_model]`, clip after clip; padding never changes a clip's features."""
        mel_lengths = inputs.chunk_frames.to(self.conv1.weight.device)
        windows = inputs.features.to(self.conv1.weight).split(inputs.chunk_frames.tolist())
        mel = pad_sequence(list(windows), batch_first=True).transpose(1, 2)  # [windows, n_mels, longest]
        hidden = F.gelu(self.conv1(mel))
        # a window alone ends at its last frame: zero what conv1 made of the padding, which conv2 would read
        hidden = hidden * (torch.arange(hidden.shape[-1], device=hidden.device) < mel_lengths[:, None]).unsqueeze(1)
        hidden = F.gelu(self.conv2(hidden)).transpose(1, 2)  # [windows, frames, d_model]
        lengths = encoder_frames(mel_lengths)
        frames = hidden.shape[1]
        if frames > self.config.max_source_positions:
            raise ValueError(f"an audio window of {frames} encoder frames exceeds max_source_positions="
                             f"{self.config.max_source_positions}: use this encoder's preprocessor, which cuts clips")
        hidden = hidden + self.embed_positions.weight[:frames].to(hidden.dtype)
        hidden = F.dropout(hidden, p=self.dropout, training=self.training)
        mask = None
        if bool((lengths < frames).any()):  # padded keys get no attention
            padded = torch.arange(frames, device=hidden.device)[None, :] >= lengths[:, None]
            mask = torch.zeros(len(lengths), 1, frames, frames, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(padded[:, None, None, :], torch.finfo(hidden.dtype).min)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden = layer(hidden, mask)
        hidden = self.layer_norm(hidden)
        chunks = [h[:n] for h, n in zip(hidden, lengths.tolist())]
        out, start = [], 0
        for count in inputs.chunks_per_clip:
            clip = torch.cat(chunks[start:start + count])
            start += count
            if self.frame_stride > 1:
                groups = clip.split(self.frame_stride)
                clip = torch.stack([group.mean(dim=0) for group in groups])
            out.append(clip)
        return torch.cat(out)

    def encode(self, inputs: AudioInputs) -> torch.Tensor:
        return self(inputs)

    def load_checkpoint(self, path: str | Path) -> None:
        """A Whisper checkpoint directory in the transformers layout (`model.encoder.*`; `encoder.*` for a
        saved WhisperModel encoder alone)."""
        if (Path(path) / "config.json").is_file():
            check_fields(self.config.to_dict(), read_config(path), WHISPER_ARCHITECTURE_FIELDS, f"{path}/config.json")
        load_strict(self, read_prefixed(path, ("model.encoder.", "encoder.")), f"{path} (Whisper encoder)")


class WhisperPreprocessor:
    """Log-mel features (`n_mels` 80 or 128) of 16 kHz mono audio (data/media.py's `load_audio` resamples and
    down-mixes anything else), clip by clip at the clip's own length, cut into windows of `window_frames` mel
    frames (twice the encoder's positions)."""

    def __init__(self, n_mels: int = 80, frame_stride: int = 1, max_source_positions: int = 1500) -> None:
        self.extractor = WhisperFeatureExtractor(feature_size=n_mels, sampling_rate=SAMPLE_RATE)
        self.window_frames = 2 * max_source_positions
        self.frame_stride = frame_stride

    def log_mel(self, clip: np.ndarray) -> torch.Tensor:
        """[frames, n_mels], `len(clip) // 160` frames: openai-whisper's `log_mel_spectrogram` of the clip alone."""
        out = self.extractor(clip, sampling_rate=SAMPLE_RATE, return_tensors="pt", padding="longest",
                             truncation=False, return_attention_mask=False)
        return out["input_features"][0].T

    def __call__(self, clips: list[np.ndarray]) -> AudioInputs:
        windows, chunks_per_clip, frames = [], [], []
        for index, clip in enumerate(clips):
            clip = np.asarray(clip, dtype=np.float32)
            if clip.ndim != 1 or clip.size < 2 * HOP_LENGTH:
                raise ValueError(f"audio clip {index} must be a mono 16 kHz waveform of at least 20 ms, got shape "
                                 f"{clip.shape} (decode with data.media.load_audio, which down-mixes and resamples)")
            parts = self.log_mel(clip).split(self.window_frames)
            windows += parts
            chunks_per_clip.append(len(parts))
            frames.append(strided_frames(sum(encoder_frames(len(part)) for part in parts), self.frame_stride))
        chunk_frames = torch.tensor([len(window) for window in windows])
        return AudioInputs(torch.cat(windows), chunk_frames, chunks_per_clip, frames)
