"""Media decoding for training, evaluation and inference: images, audio, video (+ its audio track).

Every loader takes a path or the file's bytes (WebDataset hands over bytes) and an optional `name` used in
error messages (e.g. the shard member). Anything that cannot be decoded (missing, empty, corrupt, no video
stream, no samples) raises `MediaError` naming the source and the problem; nothing is silently skipped here
(the data pipeline decides whether to count and skip a sample).

- images: PIL, EXIF orientation applied, RGB.
- audio: soundfile (PyAV for formats libsndfile cannot read), every channel count down-mixed to mono,
  every sample rate resampled to 16 kHz with torchaudio's `resample`; float32 in [-1, 1].
- video: up to `num_frames` frames sampled uniformly (the centre frame of each of `num_frames` equal
  segments), decoded with decord, or PyAV when decord is missing or fails. A clip with fewer frames than
  requested returns all its frames (`short_video="all"`, the default) or exactly `num_frames` frames by
  repeating frames evenly in time order (`short_video="repeat"`). Optionally its audio track, as above.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Union

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional
from PIL import Image, ImageOps, UnidentifiedImageError

SAMPLE_RATE = 16_000
Source = Union[str, Path, bytes, bytearray]


class MediaError(ValueError):
    """A media item cannot be decoded; the message names the source and the problem."""


@dataclass
class VideoClip:
    """Sampled frames of one video, with where they came from and, if asked for, the audio track."""

    frames: np.ndarray  # uint8 [T, H, W, 3]
    indices: list[int]  # frame numbers in the source
    total_frames: int
    fps: float
    audio: np.ndarray | None = None  # float32 16 kHz mono; None when not asked for or the clip has none


def describe(source: Source, name: str | None = None) -> str:
    if name:
        return name
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    return str(source)


def _read_bytes(source: Source, name: str | None) -> bytes:
    """The file's bytes; a missing or empty file is a MediaError."""
    label = describe(source, name)
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise MediaError(f"{label}: file not found")
        data = path.read_bytes()
    if not data:
        raise MediaError(f"{label}: empty file (0 bytes)")
    return data


# ---- images --------------------------------------------------------------------------------------------
def load_image(source: Source, name: str | None = None) -> Image.Image:
    """An RGB PIL image, EXIF-transposed (photos taken sideways come out upright)."""
    label = describe(source, name)
    data = _read_bytes(source, name)
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # decode now: a truncated file fails here, not later in a worker
        image = ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"{label}: not a decodable image ({type(err).__name__}: {err})") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{label}: image has no pixels ({image.width}x{image.height})")
    return image.convert("RGB")


# ---- audio ---------------------------------------------------------------------------------------------
def to_mono_16k(samples: np.ndarray, rate: int, label: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[frames, channels] or [frames] float at `rate` -> float32 mono at `sample_rate`."""
    if samples.size == 0:
        raise MediaError(f"{label}: audio has no samples")
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return mono


def load_audio(source: Source, name: str | None = None, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """float32 mono waveform at `sample_rate` (16 kHz) from any rate and channel count."""
    label = describe(source, name)
    data = _read_bytes(source, name)
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as soundfile_error:
        try:  # e.g. AAC/M4A, which libsndfile does not read
            decoded = _audio_track(data, label, sample_rate)
        except MediaError as err:
            reason = str(err).removeprefix(f"{label}: ")
            raise MediaError(f"{label}: not decodable audio (soundfile: {soundfile_error}; PyAV: {reason})") from None
        if decoded is None:
            raise MediaError(f"{label}: not decodable audio (soundfile: {soundfile_error}; PyAV: no audio stream)") from None
        return decoded
    return to_mono_16k(samples, rate, label, sample_rate)


def _audio_track(data: bytes, label: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray | None:
    """The first audio stream of a container, mono at `sample_rate`; None when it has no audio stream."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return None
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            pieces = []
            for frame in container.decode(audio=0):
                pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except (av.FFmpegError, ValueError) as err:
        raise MediaError(f"{label}: cannot decode the audio track ({type(err).__name__}: {err})") from None
    if not pieces or sum(p.size for p in pieces) == 0:
        raise MediaError(f"{label}: the audio track has no samples")
    return np.concatenate(pieces).astype(np.float32)


# ---- video ---------------------------------------------------------------------------------------------
def sample_indices(total: int, num_frames: int, short_video: Literal["all", "repeat"] = "all") -> list[int]:
    """Uniform sampling: the centre frame of each of `num_frames` equal segments (see the module docstring
    for clips shorter than `num_frames`)."""
    if total <= 0:
        raise ValueError("a video with no frames cannot be sampled")
    if total <= num_frames:
        if short_video == "all":
            return list(range(total))
        return np.floor(np.arange(num_frames) * total / num_frames).astype(int).tolist()
    return np.floor((np.arange(num_frames) + 0.5) * total / num_frames).astype(int).tolist()


def _frames_decord(data: bytes, num_frames: int, short_video: str) -> tuple[np.ndarray, list[int], int, float]:
    import decord  # optional: PyAV is the fallback

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    total = len(reader)
    indices = sample_indices(total, num_frames, short_video)
    return reader.get_batch(indices).asnumpy(), indices, total, float(reader.get_avg_fps())


def _frames_pyav(data: bytes, num_frames: int, short_video: str) -> tuple[np.ndarray, list[int], int, float]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0)
        total = sum(1 for _ in container.decode(video=0))  # container frame counts are unreliable (mkv: 0)
    indices = sample_indices(total, num_frames, short_video)
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24")
            if number >= indices[-1]:
                break
    return np.stack([frames[i] for i in indices]), indices, total, fps


def load_video(source: Source, num_frames: int = 8, name: str | None = None, with_audio: bool = False,
               short_video: Literal["all", "repeat"] = "all",
               backend: Literal["auto", "decord", "pyav"] = "auto") -> VideoClip:
    """Up to `num_frames` uniformly sampled RGB frames (decord, falling back to PyAV), and the audio track."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if short_video not in ("all", "repeat"):
        raise ValueError(f"short_video must be 'all' or 'repeat', got {short_video!r}")
    label = describe(source, name)
    data = _read_bytes(source, name)
    readers = {"decord": _frames_decord, "pyav": _frames_pyav}
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    problems = []
    for reader in order:
        try:
            frames, indices, total, fps = readers[reader](data, num_frames, short_video)
            break
        except ImportError as err:  # decord is not installed
            problems.append(f"{reader}: {err}")
        except Exception as err:  # noqa: BLE001 -- decord and FFmpeg raise many types; try the next reader
            problems.append(f"{reader}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    else:
        raise MediaError(f"{label}: not a decodable video ({'; '.join(problems)})")
    audio = _audio_track(data, label) if with_audio else None
    return VideoClip(frames=frames, indices=indices, total_frames=total, fps=fps, audio=audio)
