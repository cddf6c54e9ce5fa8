"""`make demo`: train the tiny MoE model with OrdMoE on the CPU, then measure its tiers.

1. trains `configs/train/tiny-ordmoe-text.yaml` (tiny Ling-lite, C = 3, offline docstring corpus);
2. probes every tier on the held-out split (tier 1 > tier 2 > tier 3 ?) for each layer scope;
3. prints where the logs, plots and checkpoints are.
Any `key=value` arguments override the training config (e.g. `steps=50`).
"""
from __future__ import annotations

import sys

from tools import probe_tiers, train

CONFIG = "configs/train/tiny-ordmoe-text.yaml"
OUTPUT = "runs/demo"


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    print(f"== 1/2 training {CONFIG} (OrdMoE, C = 3) on the CPU")
    status = train.main([CONFIG, f"output_dir={OUTPUT}", *overrides])
    if status:
        return status
    print("\n== 2/2 per-tier log-likelihood on held-out text")
    status = probe_tiers.main([OUTPUT])
    if status == 0:
        print(f"\nlogs: {OUTPUT}/metrics.jsonl, TensorBoard: {OUTPUT}/tensorboard, plots: "
              f"{OUTPUT}/training_curves.png and {OUTPUT}/tier_probe/tier_probe.png")
    return status


if __name__ == "__main__":
    sys.exit(main())
