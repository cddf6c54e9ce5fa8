"""Train a model: `python -m tools.train configs/train/tiny-ordmoe.yaml [key=value ...]`.

Overrides use dotted keys, e.g. `objective.tiers.num_tiers=4 optim.lr=1e-4 steps=50`. A run resumes
from the latest checkpoint in its `output_dir` unless `resume=false`.
"""
from __future__ import annotations

import argparse
import json
import sys

import models  # noqa: F401  (registers the backbones)
from models.config import ConfigError, load_config
from training.config import TrainConfig
from training.loop import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested sections")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = train(config, show_progress=not args.no_progress)
    print(json.dumps({"output_dir": config.output_dir, **{k: round(v, 5) if isinstance(v, float) else v
                                                          for k, v in metrics.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
