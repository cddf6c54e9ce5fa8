"""Per-tier log-likelihood of a trained model: `python -m tools.probe_tiers RUN_DIR [options]`.

RUN_DIR is a training output directory (its latest checkpoint is used) or a checkpoint directory;
the held-out split of the run's own data is probed. Writes tier_probe.{md,json,png} and prints the table;
held-out samples that could not be used are counted by reason (stderr and the report's `held_out`).
A run of C = 1 (the baseline) is probed with 3 tiers unless `--tiers` says otherwise. Bad arguments, a
directory without a valid checkpoint or a tier plan the model cannot hold are one `error:` line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import models  # noqa: F401  (registers the backbones)
from models.build import build_model
from models.config import ConfigError, from_dict, read_yaml
from models.routing import moe_routers
from models.tiers import TierConfig, build_tier_plan, resolve_layer_scope
from training.checkpoint import CheckpointError, load_model_weights, resolve_checkpoint
from training.config import TrainConfig
from training.data import held_out_batches
from training.engine import resolve_device
from training.tier_probe import format_table, probe_tiers, save_report
from training.validate import positive_int

PLANS = ("uniform", "high_only", "random")
NAMED_SCOPES = ("all", "shallow", "deep", "even")


def tier_count(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("a tier probe compares tiers: must be >= 2")
    return value


def layer_scope(text: str) -> str | list[int]:
    """`all`, `shallow`, `deep`, `even`, or comma-separated MoE-layer indices (`0,2`)."""
    if text in NAMED_SCOPES:
        return text
    try:
        layers = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join(NAMED_SCOPES)} or MoE-layer indices like 0,2") from None
    if min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: MoE-layer indices start at 0")
    return layers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="training run directory or checkpoint directory")
    parser.add_argument("--tiers", type=tier_count, default=None, help="C (default: the run's objective; 3 for C = 1)")
    parser.add_argument("--plan", default=None, choices=PLANS, help="tier plan (default: the run's)")
    parser.add_argument("--scopes", nargs="+", type=layer_scope, default=list(NAMED_SCOPES))
    parser.add_argument("--max-batches", type=positive_int, default=8)
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--out", default=None, help="report directory (default: RUN/tier_probe)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    try:
        return probe(args)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def probe(args: argparse.Namespace) -> int:
    checkpoint = resolve_checkpoint(args.run)
    run_dir = checkpoint.parent.parent
    saved = run_dir / "train_config.yaml"
    config = from_dict(TrainConfig, read_yaml(saved), source=str(saved))
    config = replace(config, output_dir=str(run_dir))  # wherever the run directory is now (its tokenizer)
    tiers = config.objective.tiers
    if args.tiers or args.plan:
        tiers = TierConfig(num_tiers=args.tiers or max(tiers.num_tiers, 3), plan=args.plan or tiers.plan,
                           basis=tiers.basis, seed=tiers.seed)
    if tiers.num_tiers < 2:
        tiers = TierConfig(num_tiers=3)  # a baseline run (C = 1) still has tiers worth measuring
    try:
        device = resolve_device(args.device)
    except RuntimeError:
        raise ConfigError(f"--device {args.device!r} is not a device; use auto, cpu, cuda or cuda:N") from None

    model = build_model(config.model)
    routers = moe_routers(model)
    if not routers:
        raise ConfigError(f"{saved}: model {config.model} has no MoE layers: nothing to probe")
    gate = routers[0][1]
    for scope in args.scopes:  # every setting is checked before the first forward pass
        try:
            build_tier_plan(tiers, gate.num_experts, gate.top_k)
            resolve_layer_scope(scope if isinstance(scope, str) else tuple(scope), len(routers))
        except ValueError as err:
            raise ConfigError(f"{run_dir}: --tiers {tiers.num_tiers} --plan {tiers.plan} --scopes {scope}: {err} "
                              f"({config.model}: {gate.num_experts} experts, top-{gate.top_k}, "
                              f"{len(routers)} MoE layers)") from None
    load_model_weights(checkpoint, model)
    model.to(device)
    batches, skips = held_out_batches(config, model, args.max_batches, args.batch_size)
    if skips.counts:
        print(f"held-out data: {skips}", file=sys.stderr)
    scores = probe_tiers(model, batches, tiers, args.scopes, device)
    out = Path(args.out) if args.out else run_dir / "tier_probe"
    held_out = {"batches": len(batches), "samples": sum(len(b["input_ids"]) for b in batches),
                "skipped": dict(skips.counts), "last_skip": skips.last}
    paths = save_report(scores, out, meta={"checkpoint": str(checkpoint), "tiers": tiers.__dict__,
                                           "held_out": held_out})
    print(format_table(scores))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
