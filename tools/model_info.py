"""Architecture summary and parameter counts of a model config, built on the `meta` device (no memory).

    python -m tools.model_info configs/models/ling-mini-2.0.yaml --tiers 3 --plan uniform

Ends with `params: total=<int> active=<int>`; `--tiers` adds one `tier <c>: ranks ...` line per tier.
A bad config or an impossible tier plan is one `error:` line naming the file and the key, exit code 2.
"""
from __future__ import annotations

import argparse
import sys

import torch

import models  # noqa: F401  (registers the components)
from models.build import build_model, load_model_config
from models.config import ConfigError
from models.parameters import count_parameters
from models.routing import moe_routers, router_spec
from models.tiers import TierConfig, build_tier_plan
from training.validate import positive_int

# The plans a tier count alone defines (uneven / explicit need rank lists: write them in a training config).
PLANS = ("uniform", "high_only", "random")


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="model config YAML (configs/models/*.yaml)")
    parser.add_argument("--tiers", type=positive_int, default=None, help="C: also print the tier plan's rank positions")
    parser.add_argument("--plan", default="uniform", choices=PLANS, help="the tier plan (with --tiers)")
    args = parser.parse_args(argv)
    try:
        config = load_model_config(args.config)
        with torch.device("meta"):
            model = build_model(config, source=args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyError as err:  # an unknown registry name; the message suggests the closest one
        print(f"error: {args.config}: {err.args[0]}", file=sys.stderr)
        return 2

    print(f"model: {args.config} -> {type(model).__name__}")
    routers = moe_routers(model)
    if routers:
        gate = routers[0][1]
        print(f"MoE layers: {len(routers)}; routed experts: {gate.num_experts}, top-{gate.top_k}; "
              f"router: {router_spec(gate).family}")
    counts = count_parameters(model)
    print(f"{'component':28s} {'total':>10s} {'active':>10s}")
    for name, (total, active) in counts.components.items():
        print(f"{name:28s} {human(total):>10s} {human(active):>10s}")
    if args.tiers:
        if not routers:
            print(f"error: {args.config}: --tiers needs an MoE model; {type(model).__name__} has no MoE layers",
                  file=sys.stderr)
            return 2
        try:
            plan = build_tier_plan(TierConfig(num_tiers=args.tiers, plan=args.plan), gate.num_experts, gate.top_k)
        except ValueError as err:
            print(f"error: {args.config}: --tiers {args.tiers} --plan {args.plan}: {err}", file=sys.stderr)
            return 2
        for line in plan.describe():
            print(line)
    print(f"params: total={counts.total} active={counts.active}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
