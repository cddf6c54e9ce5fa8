"""Video evaluation input path: 128 uniformly sampled frames per sample, decoded, preprocessed and encoded by
the tiny omni model's vision tower, for a batch of videos; peak memory against the naive way.

  ours  : evaluation/video_media.py `VideoFrames` (decord, PyAV fallback; only the sampled frames decoded
          into memory), the processor, the model's video encoder, one batch
  naive : every frame of every video decoded at full resolution with PyAV, then the same 128 picked
Each way runs in its own process, so `peak_rss_mb` is that way's own peak resident memory.

    python benchmarks/video_eval.py --quick
    video_eval: frames_per_s=... peak_rss_mb=... naive_frames_per_s=... naive_peak_rss_mb=... memory_ratio=...
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch

from common import pick_device, summary_line, tiny_omni

from data.media import sample_indices
from evaluation.video_media import PAPER_FRAMES, VideoFrames


def write_clip(path: Path, frames: int, width: int, height: int, seed: int) -> Path:
    """A moving-gradient clip (H.264 when available, else MPEG-4) of `frames` frames at 30 fps."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        try:
            stream = container.add_stream("libx264", rate=30)
        except (av.FFmpegError, ValueError):
            stream = container.add_stream("mpeg4", rate=30)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            frame = np.roll(base, 4 * t, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def naive_clip(path: Path, num_frames: int) -> np.ndarray:
    """The naive way: decode every frame at full resolution, keep them all, then pick the sampled ones."""
    with av.open(str(path)) as container:
        every = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    return np.stack([every[i] for i in sample_indices(len(every), num_frames)])


def run_way(way: str, videos: list[Path], num_frames: int, device: torch.device) -> dict[str, float]:
    model, _, processor = tiny_omni(device)
    model.eval()
    processor.max_length = 1 << 16  # 128 frames are ~3.8k video tokens, more than tiny-omni's context; only encoded here
    prompt = [{"role": "user", "content": "<video>\nWhat happens?"}]
    start = time.perf_counter()
    examples = []
    for index, path in enumerate(videos):
        video = VideoFrames(path, num_frames) if way == "ours" else naive_clip(path, num_frames)
        examples.append(processor({"id": str(index), "conversation": prompt, "videos": [video]}, generation=True))
    batch = processor.collate(examples, padding_side="left")
    with torch.no_grad():
        features = model.video(batch["pixel_values_videos"].to(device), batch["video_grid_thw"].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"frames_per_s": len(videos) * num_frames / seconds, "peak_rss_mb": peak_kb / 1024,
            "features": int(features.shape[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, 2 clips of 960x540, 20 s")
    parser.add_argument("--num-frames", type=int, default=PAPER_FRAMES)
    parser.add_argument("--way", choices=("ours", "naive"), help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--videos", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = pick_device(args.quick)
    if args.way:
        print(json.dumps(run_way(args.way, [Path(v) for v in args.videos], args.num_frames, device)))
        return
    count, seconds, (width, height) = (2, 20, (960, 540)) if args.quick else (8, 60, (1280, 720))
    with tempfile.TemporaryDirectory() as tmp:
        videos = [str(write_clip(Path(tmp) / f"clip{i}.mp4", 30 * seconds, width, height, i)) for i in range(count)]
        results = {}
        for way in ("ours", "naive"):
            command = [sys.executable, __file__, "--way", way, "--num-frames", str(args.num_frames),
                       *(["--quick"] if args.quick else []), "--videos", *videos]
            child = subprocess.run(command, capture_output=True, text=True, check=True)
            results[way] = json.loads(child.stdout.strip().splitlines()[-1])
    assert results["ours"]["features"] == results["naive"]["features"]  # the same frames were encoded
    print(f"{count} clips of {width}x{height}, {seconds} s at 30 fps; {args.num_frames} frames each; device {device}")
    print(summary_line("video_eval", frames_per_s=results["ours"]["frames_per_s"],
                       peak_rss_mb=results["ours"]["peak_rss_mb"],
                       naive_frames_per_s=results["naive"]["frames_per_s"],
                       naive_peak_rss_mb=results["naive"]["peak_rss_mb"],
                       memory_ratio=results["naive"]["peak_rss_mb"] / results["ours"]["peak_rss_mb"]))


if __name__ == "__main__":
    main()
