"""Media decoding for training, evaluation and inference: images, audio, video (+ its audio track).

Every loader takes a path or the file's bytes (WebDataset hands over bytes) and an optional `name` used in
error messages (e.g. the shard member). Anything that cannot be decoded (missing, empty, corrupt, no video
stream, no samples, non-finite values, too large) raises `MediaError` naming the source and the problem, with
a short `reason` code the data pipeline tallies skips by; nothing is silently skipped here (the pipeline
decides whether to count and skip a sample).

Bounded cost: sizes are read from the header before anything is decoded. An image declaring more than
`max_pixels` (default `MAX_IMAGE_PIXELS`, 2**25, well under PIL's own bomb limit) and audio or video longer
than `max_seconds` are refused without decoding, so a 17 KB PNG that declares 13000 x 13000 pixels or an
hour-long clip costs a header read.

- images: PIL, EXIF orientation applied, RGB. 16-bit and float greyscale are scaled to 8 bits (not clipped
  to white); palette, greyscale+alpha and RGBA images are composited on white, as transformers'
  `image_transforms.convert_to_rgb` does.
- audio: soundfile (PyAV for formats libsndfile cannot read), every channel count down-mixed to mono,
  every sample rate resampled to 16 kHz with torchaudio's `resample`; float32, finite (NaN / Inf refused).
- video: up to `num_frames` frames sampled uniformly (the centre frame of each of `num_frames` equal
  segments), decoded with decord, or PyAV when decord is missing or fails. A clip with fewer frames than
  requested returns all its frames (`short_video="all"`, the default) or exactly `num_frames` frames by
  repeating frames evenly in time order (`short_video="repeat"`). Optionally its audio track, as above.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import av
import numpy as np
import soundfile as sf
import torch
import torchaudio.functional
from PIL import Image, ImageOps, UnidentifiedImageError

SAMPLE_RATE = 16_000
MAX_IMAGE_PIXELS = 1 << 25  # 33.5 M pixels (e.g. 8192 x 4096): ~100 MB as RGB; PIL's own limit is 89 M
Source = Union[str, Path, bytes, bytearray]


class MediaError(ValueError):
    """A media item cannot be decoded; the message names the source and the problem, `reason` classifies it
    (e.g. `image_too_large`, `audio_non_finite`) for skip tallies."""

    def __init__(self, message: str, reason: str = "undecodable") -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # picklable with its reason (DataLoader workers send exceptions to the main process)
        return type(self), (str(self), self.reason)


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
            raise MediaError(f"{label}: file not found", "file_not_found")
        data = path.read_bytes()
    if not data:
        raise MediaError(f"{label}: empty file (0 bytes)", "empty_file")
    return data


def _check_duration(seconds: float | None, max_seconds: float | None, kind: str, label: str) -> None:
    if max_seconds is not None and seconds is not None and seconds > max_seconds:
        raise MediaError(f"{label}: {kind} of {seconds:.1f} s is longer than the {max_seconds:g} s allowed "
                         f"(refused before decoding)", f"{kind}_too_long")


def _check_finite(values: np.ndarray, kind: str, label: str) -> None:
    if not np.isfinite(values).all():
        bad = int(values.size - np.isfinite(values).sum())
        raise MediaError(f"{label}: {kind} has {bad} non-finite value(s) (NaN or Inf)", f"{kind}_non_finite")


# ---- images --------------------------------------------------------------------------------------------
def load_image(source: Source, name: str | None = None, max_pixels: int | None = MAX_IMAGE_PIXELS) -> Image.Image:
    """An RGB PIL image, EXIF-transposed (photos taken sideways come out upright); see the module docstring."""
    label = describe(source, name)
    data = _read_bytes(source, name)
    try:
        with warnings.catch_warnings():  # our own limit below replaces PIL's DecompressionBombWarning
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only
        pixels = image.width * image.height
        if max_pixels is not None and pixels > max_pixels:
            raise MediaError(f"{label}: image declares {image.width}x{image.height} = {pixels / 1e6:.1f} M pixels, "
                             f"more than data.max_image_pixels={max_pixels} (refused before decoding)",
                             "image_too_large")
        image.load()  # decode now: a truncated file fails here, not later in a worker
        image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:  # over PIL's own limit (only when max_pixels is None)
        raise MediaError(f"{label}: image too large ({err})", "image_too_large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, MediaError):
            raise
        raise MediaError(f"{label}: not a decodable image ({type(err).__name__}: {err})", "undecodable_image") from None
    if image.width == 0 or image.height == 0:
        raise MediaError(f"{label}: image has no pixels ({image.width}x{image.height})", "undecodable_image")
    return to_rgb(image, label)


def _full_scale(mode: str, values: np.ndarray) -> float:
    """The value that means white: 16-bit modes 65535; 32-bit int (`I`, e.g. 16-bit TIFF) 65535 unless the
    values fit 8 bits; float (`F`) 1.0 when the values lie in [0, 1], else 255."""
    if mode.startswith("I;16"):
        return 65535.0
    peak = float(values.max(initial=0))
    if mode == "F":
        return 1.0 if peak <= 1.0 else 255.0
    return 255.0 if peak <= 255 else 65535.0


def to_rgb(image: Image.Image, label: str = "image") -> Image.Image:
    """8-bit RGB: high-bit-depth greyscale scaled (PIL's convert would clip 16-bit values to white), alpha and
    palette transparency composited on white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            _check_finite(values, "image", label)
        grey = np.clip(np.rint(values * (255.0 / _full_scale(image.mode, values))), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# ---- audio ---------------------------------------------------------------------------------------------
def to_mono_16k(samples: np.ndarray, rate: int, label: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """[frames, channels] or [frames] float at `rate` -> float32 mono at `sample_rate`."""
    if samples.size == 0:
        raise MediaError(f"{label}: audio has no samples", "audio_empty")
    _check_finite(samples, "audio", label)
    mono = samples.mean(axis=1) if samples.ndim == 2 else samples
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if rate != sample_rate:
        mono = torchaudio.functional.resample(torch.from_numpy(mono), rate, sample_rate).numpy()
    return mono


def load_audio(source: Source, name: str | None = None, sample_rate: int = SAMPLE_RATE,
               max_seconds: float | None = None) -> np.ndarray:
    """float32 mono waveform at `sample_rate` (16 kHz) from any rate and channel count; clips longer than
    `max_seconds` (by the header) are refused before decoding."""
    label = describe(source, name)
    data = _read_bytes(source, name)
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as soundfile_error:
        try:  # e.g. AAC/M4A, which libsndfile does not read
            decoded = _audio_track(data, label, sample_rate, max_seconds)
        except MediaError as err:
            if err.reason != "undecodable_audio":
                raise
            reason = str(err).removeprefix(f"{label}: ")
            raise MediaError(f"{label}: not decodable audio (soundfile: {soundfile_error}; PyAV: {reason})",
                             "undecodable_audio") from None
        if decoded is None:
            raise MediaError(f"{label}: not decodable audio (soundfile: {soundfile_error}; PyAV: no audio stream)",
                             "undecodable_audio") from None
        return decoded
    _check_duration(info.frames / info.samplerate if info.samplerate > 0 else None, max_seconds, "audio", label)
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise MediaError(f"{label}: not decodable audio (soundfile: {err})", "undecodable_audio") from None
    return to_mono_16k(samples, rate, label, sample_rate)


def container_seconds(container: "av.container.InputContainer") -> float | None:
    """A container's duration from its header (None when it does not say)."""
    if container.duration is not None and container.duration > 0:
        return container.duration / av.time_base
    durations = [float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base]
    return max(durations) if durations else None


def _audio_track(data: bytes, label: str, sample_rate: int = SAMPLE_RATE,
                 max_seconds: float | None = None) -> np.ndarray | None:
    """The first audio stream of a container, mono at `sample_rate`; None when it has no audio stream."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.audio:
                return None
            _check_duration(container_seconds(container), max_seconds, "audio", label)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            pieces = []
            for frame in container.decode(audio=0):
                pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            pieces += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]
    except MediaError:
        raise
    except (av.FFmpegError, ValueError) as err:
        raise MediaError(f"{label}: cannot decode the audio track ({type(err).__name__}: {err})",
                         "undecodable_audio") from None
    if not pieces or sum(p.size for p in pieces) == 0:
        raise MediaError(f"{label}: the audio track has no samples", "audio_empty")
    wave = np.concatenate(pieces).astype(np.float32)
    _check_finite(wave, "audio", label)
    return wave


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


def window_indices(total: int, fps: float, num_frames: int, short_video: Literal["all", "repeat"] = "all",
                   window: tuple[float, float] | None = None) -> list[int]:
    """`sample_indices` over the frames inside `window` (start, end seconds; the whole clip when None)."""
    if window is None:
        return sample_indices(total, num_frames, short_video)
    if fps <= 0:
        raise ValueError("the clip declares no frame rate, so a time window cannot be located")
    first = min(max(0, int(window[0] * fps)), total - 1)
    last = max(first, min(total - 1, int(np.ceil(window[1] * fps)) - 1))
    return [first + i for i in sample_indices(last - first + 1, num_frames, short_video)]


def _frames_decord(data: bytes, num_frames: int, short_video: str,
                   window: tuple[float, float] | None = None) -> tuple[np.ndarray, list[int], int, float]:
    import decord  # optional: PyAV is the fallback

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0))
    total, fps = len(reader), float(reader.get_avg_fps())
    indices = window_indices(total, fps, num_frames, short_video, window)
    return reader.get_batch(indices).asnumpy(), indices, total, fps


def _frames_pyav(data: bytes, num_frames: int, short_video: str,
                 window: tuple[float, float] | None = None) -> tuple[np.ndarray, list[int], int, float]:
    with av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or 0)
        total = sum(1 for _ in container.decode(video=0))  # container frame counts are unreliable (mkv: 0)
    indices = window_indices(total, fps, num_frames, short_video, window)
    wanted = set(indices)
    frames: dict[int, np.ndarray] = {}
    with av.open(io.BytesIO(data)) as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                frames[number] = frame.to_ndarray(format="rgb24")
            if number >= indices[-1]:
                break
    return np.stack([frames[i] for i in indices]), indices, total, fps


def video_seconds(source: Source) -> float | None:
    """The duration a container declares, from its header (None when unreadable: decoding then reports it)."""
    try:
        with av.open(io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else str(source)) as container:
            return container_seconds(container)
    except (av.FFmpegError, ValueError, OSError):
        return None


def load_video(source: Source, num_frames: int = 8, name: str | None = None, with_audio: bool = False,
               short_video: Literal["all", "repeat"] = "all",
               backend: Literal["auto", "decord", "pyav"] = "auto", max_seconds: float | None = None,
               window: tuple[float, float] | None = None) -> VideoClip:
    """Up to `num_frames` uniformly sampled RGB frames (decord, falling back to PyAV), and the audio track;
    clips longer than `max_seconds` (by the container header) are refused before decoding. `window`
    (start, end seconds) samples only the frames inside it (e.g. MVBench's start/end bounds)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if short_video not in ("all", "repeat"):
        raise ValueError(f"short_video must be 'all' or 'repeat', got {short_video!r}")
    label = describe(source, name)
    data = _read_bytes(source, name)
    if max_seconds is not None:
        _check_duration(video_seconds(data), max_seconds, "video", label)
    readers = {"decord": _frames_decord, "pyav": _frames_pyav}
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    problems = []
    for reader in order:
        try:
            frames, indices, total, fps = readers[reader](data, num_frames, short_video, window)
            break
        except ImportError as err:  # decord is not installed
            problems.append(f"{reader}: {err}")
        except Exception as err:  # noqa: BLE001 -- decord and FFmpeg raise many types; try the next reader
            problems.append(f"{reader}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    else:
        raise MediaError(f"{label}: not a decodable video ({'; '.join(problems)})", "undecodable_video")
    if frames.size == 0:
        raise MediaError(f"{label}: the video has no frames", "undecodable_video")
    audio = _audio_track(data, label, max_seconds=max_seconds) if with_audio else None
    return VideoClip(frames=frames, indices=indices, total_frames=total, fps=fps, audio=audio)


# ---- limits for a training stream ---------------------------------------------------------------------
@dataclass(frozen=True)
class MediaLimits:
    """What a sample's media may cost, checked from headers before decoding."""

    max_image_pixels: int | None = MAX_IMAGE_PIXELS
    max_audio_seconds: float | None = None
    max_video_seconds: float | None = None


def media_limits(processor: Any, max_image_pixels: int | None = MAX_IMAGE_PIXELS,
                 max_audio_seconds: float | None = None, max_video_seconds: float | None = None) -> MediaLimits:
    """Limits for a processor: without `max_audio_seconds`, the longest audio whose placeholder tokens can fit
    the processor's `max_length` (measured on one 30-s chunk through its own audio preprocessor and token
    count, with 10% slack: the processor's exact length check then decides). A video's audio track counts
    against the same bound when the processor takes it (`video_audio`)."""
    audio, tokens, max_length = (getattr(processor, name, None) for name in ("audio", "audio_tokens", "max_length"))
    if max_audio_seconds is None and audio is not None and tokens is not None and max_length:
        chunk = audio([np.zeros(30 * SAMPLE_RATE, dtype=np.float32)])
        per_chunk = max(1, int(tokens(int(chunk.frames_per_clip[0]))))
        max_audio_seconds = 30.0 * max_length / per_chunk * 1.1 + 1.0
    if getattr(processor, "video_audio", False) and max_audio_seconds is not None:
        max_video_seconds = min(max_video_seconds or max_audio_seconds, max_audio_seconds)
    return MediaLimits(max_image_pixels, max_audio_seconds, max_video_seconds)


def decode_media(sample: dict[str, Any], limits: MediaLimits, where: str) -> dict[str, Any]:
    """Images and audio decoded within `limits` (the processor takes decoded items), videos' durations checked
    from their headers (the processor samples their frames); raises MediaError naming the member."""
    def label(kind: str, index: int) -> str:
        names = sample.get(f"{kind}_members")
        item = sample[kind][index]
        return f"{where}/{names[index]}" if names else str(item) if isinstance(item, (str, Path)) else \
            f"{where}/{kind[:-1]}{index}"

    decoded = dict(sample)
    decoded["images"] = [load_image(item, label("images", i), limits.max_image_pixels) if _encoded(item) else item
                         for i, item in enumerate(sample.get("images") or [])]
    decoded["audios"] = [load_audio(item, label("audios", i), max_seconds=limits.max_audio_seconds)
                         if _encoded(item) else item for i, item in enumerate(sample.get("audios") or [])]
    if limits.max_video_seconds is not None:
        for i, item in enumerate(sample.get("videos") or []):
            seconds = video_seconds(item) if _encoded(item) else None
            if seconds is not None and seconds > limits.max_video_seconds:
                raise MediaError(f"{label('videos', i)}: video of {seconds:.1f} s is longer than the "
                                 f"{limits.max_video_seconds:g} s allowed (refused before decoding)", "video_too_long")
    for kind in ("images", "audios", "videos"):
        decoded.pop(f"{kind}_members", None)
    return decoded


def _encoded(item: Any) -> bool:
    return isinstance(item, (str, Path, bytes, bytearray))
