"""Batched greedy generation (the evaluation runner's path) against one sample at a time, on tiny-omni with images.

  batched_speedup : wall time of one-by-one generation / batched generation (batch 8), same prompts and tokens
  samples_per_s   : samples answered per second, batched

The prompts mix the bundled real images (a photo, a diagram, charts) with questions of different lengths, so
batches are left-padded; each answer is up to `max_new_tokens` greedy tokens with the KV cache (a row that
ends early still rides along in its batch, so the comparison is, if anything, unfair to batching).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from PIL import Image

from common import REPO, pick_device, summary_line, tiny_omni

from evaluation.runner import generate_batch

IMAGES = ("coco_000000039769.png", "ai2d_00002168.png", "mathvista_testmini_pid106.png")
QUESTIONS = ("How many cats are there?", "What does the diagram show? Answer with one word.",
             "How many bars have values smaller than 1?", "Describe the picture in detail, including colours.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, 16 samples, 16 new tokens (under a minute)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None, help="interleaved timing rounds (median)")
    args = parser.parse_args()
    samples = args.samples or (16 if args.quick else 64)
    new_tokens = args.max_new_tokens or (16 if args.quick else 32)
    args.repeats = args.repeats or (1 if args.quick else 3)
    device = pick_device(args.quick)
    model, _, processor = tiny_omni(device)
    model.eval()
    images = [Image.open(REPO / "data" / "assets" / name).convert("RGB") for name in IMAGES]
    examples = [processor({"id": str(i), "images": [images[i % len(images)]],
                           "conversation": [{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]}]},
                          generation=True) for i in range(samples)]
    def one_by_one() -> None:
        for example in examples:
            generate_batch(model, processor, [example], new_tokens, device)

    def batched() -> None:
        for start in range(0, len(examples), args.batch_size):
            generate_batch(model, processor, examples[start:start + args.batch_size], new_tokens, device)

    generate_batch(model, processor, examples[: args.batch_size], 2, device)  # warm-up
    times: dict[str, list[float]] = {"single": [], "batched": []}
    cpu: dict[str, float] = {"single": 0.0, "batched": 0.0}  # process CPU time: what a shared machine cannot blur
    for _ in range(args.repeats):  # interleaved, so a busy machine slows both ways alike
        for name, run in (("single", one_by_one), ("batched", batched)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            cpu[name] += time.process_time() - cpu_start
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    seconds = {name: statistics.median(values) for name, values in times.items()}
    print(f"{samples} samples, {new_tokens} new tokens each, batch {args.batch_size} on {device}: "
          f"one by one {seconds['single']:.2f} s, batched {seconds['batched']:.2f} s (CPU time ratio "
          f"{cpu['single'] / cpu['batched']:.2f})")
    print(summary_line("eval_generate", batched_speedup=seconds["single"] / seconds["batched"],
                       samples_per_s=samples / seconds["batched"]))


if __name__ == "__main__":
    main()
