"""Lazy video and audio-track references for benchmark samples, decoded only when the processor needs them.

A video benchmark holds hundreds of samples in memory at once (the runner lists them to shard and resume);
a `VideoFrames` holds a path and how to sample it, and its `load()` (called by data/processor.py when the
sample's batch comes) decodes just the sampled frames with data/media.py (decord, PyAV fallback). Frames
come from a video file (mp4, webm, mkv, gif, ...) or from a folder of frame images (MVBench's TVQA frames).
A missing file, a video with no frames or a broken stream raises `MediaError` naming the path, which the
runner records as that sample's error.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data.media import MediaError, VideoClip, load_audio, load_image, load_video, sample_indices

PAPER_FRAMES = 128  # frames per video in the paper's video evaluation, uniformly sampled
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclass(frozen=True)
class VideoFrames:
    """`num_frames` frames sampled uniformly from `source`, optionally within `window` (seconds).

    `frame_rate` is the rate of a folder of frame images (a file's rate comes from its container)."""

    source: Path
    num_frames: int = PAPER_FRAMES
    window: tuple[float, float] | None = None
    frame_rate: float = 3.0

    def load(self) -> VideoClip:
        if self.source.is_dir():
            return self._load_folder()
        return load_video(self.source, self.num_frames, name=str(self.source), window=self.window)

    def _load_folder(self) -> VideoClip:
        files = sorted(p for p in self.source.iterdir() if p.suffix.lower() in FRAME_SUFFIXES)
        if not files:
            raise MediaError(f"{self.source}: a frame folder with no {'/'.join(FRAME_SUFFIXES)} images",
                             "undecodable_video")
        first, last = 0, len(files) - 1
        if self.window is not None:
            first = min(max(0, int(self.window[0] * self.frame_rate)), last)
            last = max(first, min(last, int(self.window[1] * self.frame_rate)))
        indices = [first + i for i in sample_indices(last - first + 1, self.num_frames)]
        images = [load_image(files[i]) for i in indices]
        size = images[0].size  # frames of one folder share a size; a stray one is resized, not a crash
        frames = np.stack([np.asarray(im if im.size == size else im.resize(size)) for im in images])
        return VideoClip(frames=frames, indices=indices, total_frames=len(files), fps=self.frame_rate)


@dataclass(frozen=True)
class AudioTrack:
    """The audio track of a video file (or an audio file), as 16 kHz mono float32."""

    source: Path

    def load(self) -> np.ndarray:
        return load_audio(self.source, name=f"{self.source} (audio track)")
