"""Train a model: `python -m tools.train configs/train/tiny-ordmoe-text.yaml [key=value ...] [--check]`.

Overrides use dotted keys, e.g. `objective.tiers.num_tiers=4 optim.lr=1e-4 steps=50`. A run resumes
from the latest checkpoint in its `output_dir` unless `resume=false`. The whole run is validated before
anything is written (config, model, tier plan, tokenizer, data, output directory, device): a refusal is
one line naming the file and the key, exit code 2. `--check` validates and prints what the run would
do, and writes nothing; on a machine that lacks an input the config names (a hub release not downloaded
yet), it checks the rest, lists what is missing with the command that gets it, and exits 0.
"""
from __future__ import annotations

import argparse
import json
import sys

import models  # noqa: F401  (registers the backbones)
from data.loader import DataTimeoutError
from models.config import ConfigError, load_config
from training.config import TrainConfig
from training.loop import train
from training.run_dir import inspect_run_dir
from training.validate import validate_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="training config YAML (configs/train/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys for nested sections")
    parser.add_argument("--check", action="store_true", help="validate the run and print what it would do; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs still go to metrics.jsonl)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # `deepspeed` passes it; LOCAL_RANK is read
    args = parser.parse_intermixed_args(argv)  # options may come between the overrides
    source = args.config + (f" (with overrides {' '.join(args.overrides)})" if args.overrides else "")
    try:
        config = load_config(TrainConfig, args.config, args.overrides)
        missing: list[str] = []
        plan = validate_run(config, source, missing if args.check else None)
        if plan is None:  # --check on a machine without the release: the config is fine, an input is missing
            print(f"config: {source}: everything this machine can check is valid; before it can train here:")
            print("\n".join(f"- {line}" for line in missing))
            return 0
        state = inspect_run_dir(plan)
        if args.check:
            print(plan.describe())
            print(f"output_dir: {plan.output_dir} ({describe_state(state)})")
            return 0
        metrics = train(config, show_progress=not args.no_progress)
    except ConfigError as err:  # RunRefused too: the run was refused before it wrote anything
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)  # one line (YAML errors span several)
        return 2
    except DataTimeoutError as err:  # a worker stopped answering: the run is resumable from its last checkpoint
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": config.output_dir, **{k: round(v, 5) if isinstance(v, float) else v
                                                          for k, v in metrics.items()}}, indent=1))
    return 0


def describe_state(state) -> str:
    if state.mode == "resume":
        return f"resume from {state.checkpoint.name} (verified when the run starts)"
    return {"new": "a new run", "restart": "restart of a run that has no checkpoint yet",
            "follower": "rank > 0 of a launch (rank 0 owns the directory)",
            "overwrite": "overwrite: the old run is moved aside first"}[state.mode]


if __name__ == "__main__":
    sys.exit(main())
