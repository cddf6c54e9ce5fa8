"""`make demo`: train the tiny omni model with OrdMoE on the CPU, then measure its tiers.

1. builds the demo dataset (shapes, words, beeps, moving squares, real speech, text) as shards;
2. trains `configs/train/demo-omni.yaml`: tiny-omni (tiny Ling-lite with Ming's modality routers, a
   Qwen2.5-VL vision tower, a Whisper encoder), C = 3, from those shards;
3. probes every tier on the held-out samples (tier 1 > tier 2 > tier 3 ?) for each layer scope,
   and prints where the logs, plots and checkpoints are.
Any `key=value` arguments override the training config (e.g. `steps=100`); `data_dir=` moves the dataset.
"""
from __future__ import annotations

import sys

from pathlib import Path

from data.demo_data import build_demo_data
from tools import probe_tiers, train

CONFIG = "configs/train/demo-omni.yaml"
OUTPUT = "runs/demo"
DATA = "runs/demo_data"


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    output = next((o.split("=", 1)[1] for o in overrides if o.startswith("output_dir=")), OUTPUT)
    data = next((o.split("=", 1)[1] for o in overrides if o.startswith("data_dir=")), DATA)
    overrides = [o for o in overrides if not o.startswith("data_dir=")]
    overrides = [f"data.shards={data}/train_shards", f"data.eval_manifest={data}/eval.jsonl", *overrides]
    if not (Path(data) / "eval.jsonl").is_file():
        print(f"== 0/2 building the demo dataset in {data}")
        build_demo_data(data)
    print(f"== 1/2 training {CONFIG} (tiny omni model, OrdMoE with C = 3) on the CPU")
    status = train.main([CONFIG, f"output_dir={output}", *overrides])
    if status:
        return status
    print("\n== 2/2 per-tier log-likelihood on the held-out samples")
    status = probe_tiers.main([output])
    if status == 0:
        print(f"\nlogs: {output}/metrics.jsonl, TensorBoard: {output}/tensorboard, plots: "
              f"{output}/training_curves.png and {output}/tier_probe/tier_probe.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
