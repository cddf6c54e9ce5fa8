"""Architecture summary and parameter counts of a model config, built on the `meta` device (no memory).

    python -m tools.model_info configs/models/ling-mini-2.0.yaml --tiers 3 --plan uniform

Ends with `params: total=<int> active=<int>`; `--tiers` adds one `tier <c>: ranks ...` line per tier.
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


def human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="model config YAML (configs/models/*.yaml)")
    parser.add_argument("--tiers", type=int, default=None, help="C: also print the tier plan's rank positions")
    parser.add_argument("--plan", default="uniform", help="uniform | high_only | random (with --tiers)")
    args = parser.parse_args(argv)
    try:
        config = load_model_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    with torch.device("meta"):
        model = build_model(config, source=args.config)

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
            print("error: --tiers needs an MoE model", file=sys.stderr)
            return 2
        plan = build_tier_plan(TierConfig(num_tiers=args.tiers, plan=args.plan), gate.num_experts, gate.top_k)
        for line in plan.describe():
            print(line)
    print(f"params: total={counts.total} active={counts.active}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
