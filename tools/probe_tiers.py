"""Per-tier log-likelihood of a trained model: `python -m tools.probe_tiers RUN_DIR [options]`.

RUN_DIR is a training output directory (its latest checkpoint is used) or a checkpoint directory;
the held-out split of the run's own data is probed. Writes tier_probe.{md,json,png} and prints the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


import models  # noqa: F401  (registers the backbones)
from models.build import build_model
from models.config import from_dict, read_yaml
from models.tiers import TierConfig
from training.checkpoint import load_model_weights, resolve_checkpoint
from training.config import TrainConfig
from training.engine import resolve_device
from training.data import held_out_batches
from training.tier_probe import format_table, probe_tiers, save_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training run directory or checkpoint directory")
    parser.add_argument("--tiers", type=int, default=None, help="C (default: the run's objective)")
    parser.add_argument("--plan", default=None, help="uniform | high_only | random (default: the run's)")
    parser.add_argument("--scopes", nargs="+", default=["all", "shallow", "deep", "even"])
    parser.add_argument("--max-batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=None, help="report directory (default: RUN/tier_probe)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    checkpoint = resolve_checkpoint(args.run)
    run_dir = checkpoint.parent.parent
    config = from_dict(TrainConfig, read_yaml(run_dir / "train_config.yaml"), source=str(run_dir / "train_config.yaml"))
    tiers = config.objective.tiers
    if args.tiers or args.plan:
        tiers = TierConfig(num_tiers=args.tiers or max(tiers.num_tiers, 3), plan=args.plan or tiers.plan,
                           basis=tiers.basis, seed=tiers.seed)
    if tiers.num_tiers < 2:
        tiers = TierConfig(num_tiers=3)  # a baseline run still has tiers worth measuring

    device = resolve_device(args.device)
    model = build_model(config.model)
    load_model_weights(checkpoint, model)
    model.to(device)
    batches = held_out_batches(config, model, args.max_batches, args.batch_size)
    scores = probe_tiers(model, batches, tiers, args.scopes, device)
    out = Path(args.out) if args.out else run_dir / "tier_probe"
    paths = save_report(scores, out, meta={"checkpoint": str(checkpoint), "tiers": tiers.__dict__})
    print(format_table(scores))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
