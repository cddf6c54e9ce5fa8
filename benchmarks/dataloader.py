"""Data throughput per worker (one process) and the share of a training step spent waiting for data.

  image_per_worker : 448-px JPEG decode + Qwen2.5-VL preprocessing + chat tokenization, samples/s
  audio_per_worker : 10-s audio decode (resampled to 16 kHz mono) + Whisper log-mel features, samples/s
  video_decord / video_pyav : 32-frame uniform sampling + decode of the bundled 10-s clip, clips/s
  data_wait        : share of a tiny-omni OrdMoE training step (demo shards, batch 4) spent in next(batch),
                     with DataLoader workers (data_wait_inline: decoding in the training process, the naive way)
"""
from __future__ import annotations

import argparse
import io
import time

import numpy as np
import soundfile as sf
import torch
from PIL import Image

from common import REPO, TINY_OMNI, demo_shards, pick_device, summary_line, tiny_omni

from data.media import load_audio, load_video
from models.config import from_dict
from training.config import TrainConfig
from training.data import train_stream
from training.objectives import ObjectiveConfig, build_objective


def rate(fn, seconds: float) -> float:
    """Calls per second of `fn` over about `seconds` (after one warm-up call)."""
    fn()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, short timings, under a minute")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the data_wait measurement")
    args = parser.parse_args()
    device = pick_device(args.quick)
    seconds = 3.0 if args.quick else 15.0
    torch.set_num_threads(1)  # one worker = one core
    model, _, processor = tiny_omni(torch.device("cpu"))  # decode rates on the CPU; the step below on `device`

    photo = Image.open(REPO / "data/assets/coco_000000039769.png").convert("RGB").resize((448, 448))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    jpeg = buffer.getvalue()
    image_sample = {"id": "img", "images": [jpeg], "conversation": [
        {"role": "user", "content": "<image>\nHow many cats are there?"}, {"role": "assistant", "content": "Two."}]}
    image_rate = rate(lambda: processor(image_sample), seconds)

    speech = load_audio(REPO / "data/assets/jfk.flac")[: 16000 * 10]  # 10 s, from 44.1 kHz stereo
    buffer = io.BytesIO()
    sf.write(buffer, np.asarray(speech), 16000, format="FLAC")
    flac = buffer.getvalue()
    features = model.audio.preprocessor()
    audio_rate = rate(lambda: features([load_audio(flac)]), seconds)

    clip = (REPO / "data/assets/mmaction2_demo_arm_wrestling.mp4").read_bytes()
    decord_rate = rate(lambda: load_video(clip, 32, backend="decord"), seconds)
    pyav_rate = rate(lambda: load_video(clip, 32, backend="pyav"), seconds)

    shards = demo_shards()
    model.to(device).train()
    objective = build_objective(ObjectiveConfig(), model)
    steps = 8 if args.quick else 30
    inline = data_wait(model, objective, shards, device, steps, num_workers=0)
    workers = data_wait(model, objective, shards, device, steps, num_workers=args.workers)
    print(f"device {device}; decode rates: one process, one thread; data_wait: tiny-omni OrdMoE step (batch 4), "
          f"{args.workers} DataLoader worker(s) vs decoding in the training process ({inline:.3f})")
    print(summary_line("dataloader", image_per_worker=image_rate, audio_per_worker=audio_rate,
                       video_decord=decord_rate, video_pyav=pyav_rate, data_wait=workers, data_wait_inline=inline))


def data_wait(model, objective, shards, device, steps: int, num_workers: int) -> float:
    """Share of the training-step wall time spent in next(batch) (the first step, set-up, excluded)."""
    config = from_dict(TrainConfig, {"model": str(TINY_OMNI),
                                     "data": {"kind": "shards", "shards": str(shards),
                                              "batch_size": 4, "num_workers": num_workers}}, source="benchmark")
    stream = iter(train_stream(config, model, journal=False))
    waiting = total = 0.0
    for step in range(steps + 1):
        start = time.perf_counter()
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(stream).items()}
        fetched = time.perf_counter()
        objective(model, batch, backward=lambda loss: loss.backward(), step=step + 1)
        model.zero_grad(set_to_none=True)
        if step:
            waiting += fetched - start
            total += time.perf_counter() - start
    return waiting / total

if __name__ == "__main__":
    main()
