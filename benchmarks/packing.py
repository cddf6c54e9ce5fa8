"""Sequence packing against padding: the same samples through tiny-omni OrdMoE training steps, both ways.

  padding_share        : share of the padded batches' token slots that are padding (batch 4, padded to the longest)
  packed_padding_share : the same for packed rows of the model's max_length
  time_ratio           : wall time for all samples padded / packed (> 1: packing is faster), median of 3
"""
from __future__ import annotations

import argparse
from itertools import islice

import torch

from common import demo_shards, pick_device, summary_line, time_it, tiny_omni

from data.batching import PackedBatcher
from data.loader import StreamLoader
from data.pipeline import ShardStream
from models.config import from_dict
from training.objectives import ObjectiveConfig, build_objective


def run_steps(model, objective, batches, device) -> None:
    """One OrdMoE training step (C = 3, forward + backward) per batch."""
    for step, batch in enumerate(batches, 1):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        objective(model, batch, backward=lambda loss: loss.backward(), step=step)
        model.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, fewer samples, under a minute")
    args = parser.parse_args()
    device = pick_device(args.quick)
    model, config, processor = tiny_omni(device)
    model.train()
    objective = build_objective(from_dict(ObjectiveConfig, {"name": "ordmoe", "diag_every": 10**9}), model)

    stream = ShardStream(demo_shards(), processor, list, batch_size=1)  # processed, not collated
    count = 16 if args.quick else stream.batches_per_epoch(0)
    examples = [batch[0] for batch in islice(StreamLoader(stream), count)]

    padded = [processor.collate(examples[i:i + 4]) for i in range(0, len(examples) - 3, 4)]
    used = examples[: 4 * len(padded)]
    packer, packed = PackedBatcher(rows=1, length=config.max_length, pad_id=processor.pad_id), []
    for example in used:
        if not packer.fits(example):
            packed.append(packer.flush())
        packer.add(example)
    packed.append(packer.flush())

    real = sum(len(e["input_ids"]) for e in used)
    padding_share = 1 - real / sum(b["input_ids"].numel() for b in padded)
    packed_padding_share = 1 - real / sum(b["input_ids"].numel() for b in packed)
    padded_time = time_it(lambda: run_steps(model, objective, padded, device), device, repeats=3)
    packed_time = time_it(lambda: run_steps(model, objective, packed, device), device, repeats=3)
    print(f"device {device}; {len(used)} demo samples ({real} tokens): {len(padded)} padded batches of 4 "
          f"({padded_time:.2f} s) vs {len(packed)} packed rows of {config.max_length} ({packed_time:.2f} s)")
    print(summary_line("packing", padding_share=padding_share, packed_padding_share=packed_padding_share,
                       time_ratio=padded_time / packed_time))


if __name__ == "__main__":
    main()
