"""Throughput of one MoE layer at the Ling-mini-2.0 shape: our expert compute and tier routing.

  expert_speedup = per-expert Python loop time / our time (transformers' grouped_mm on fused weights),
                   for a training step of the layer (forward + backward); forward alone is printed too
  tier_overhead  = tier-3 routing time / standard routing time (same layer, same tokens)

Ling-mini-2.0's layer: hidden 2048, 256 routed experts (top-8, 8 groups, top-4 groups, sigmoid +
bias), expert intermediate 512, 1 shared expert. On a CPU the widths are scaled down (printed).
"""
from __future__ import annotations

import argparse

import torch

from common import pick_device, summary_line, time_it

from models.ling_mini import LingMiniConfig
from models.moe import SigmoidGroupRouter, SparseMoeBlock
from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan


def moe_layer(hidden: int, intermediate: int, implementation: str, device: torch.device,
              dtype: torch.dtype) -> SparseMoeBlock:
    config = LingMiniConfig(hidden_size=hidden, moe_intermediate_size=intermediate, num_experts=256,
                            num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                            num_shared_experts=1)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    block = SparseMoeBlock(config, SigmoidGroupRouter(config))
    for param in block.parameters():
        torch.nn.init.normal_(param, std=hidden ** -0.5)
    return block.to(device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, scaled-down widths, under a minute")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    device = pick_device(args.quick)
    if device.type == "cuda":
        hidden, intermediate, tokens, dtype = 2048, 512, args.tokens or 8192, torch.bfloat16
    else:
        hidden, intermediate, tokens, dtype = 512, 128, args.tokens or (512 if args.quick else 2048), torch.float32
    repeats = args.repeats or (2 if args.quick else 10)
    print(f"device {device}, {dtype}; layer: hidden {hidden}, 256 experts top-8, expert intermediate "
          f"{intermediate}, 1 shared; {tokens} tokens" + (" (scaled down from hidden 2048 / 512)" if hidden < 2048 else ""))

    x = torch.randn(tokens, hidden, device=device, dtype=dtype)
    timings = {}
    for implementation in ("eager", "grouped_mm"):
        block = moe_layer(hidden, intermediate, implementation, device, dtype)
        timings[implementation, "forward"] = time_it(lambda: block(x), device, repeats)

        def train_step():
            y = block(x.requires_grad_(True))
            y.backward(torch.ones_like(y))  # a dense gradient (CPU grouped_mm backward rejects zero strides)

        slow = implementation == "eager" and args.quick  # the loop's backward takes seconds: once is enough
        timings[implementation, "train"] = time_it(train_step, device, 1 if slow else repeats, warmup=0 if slow else 1)

    block = moe_layer(hidden, intermediate, "grouped_mm", device, dtype)
    routing = TierRouting(block)
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=3), routing.num_experts, routing.top_k))

    def forward_path(tier: int):
        with routing.path(tier):
            block(x)

    standard = time_it(lambda: forward_path(1), device, repeats)
    tier3 = time_it(lambda: forward_path(3), device, repeats)

    print(f"{'experts':24s} {'forward tok/s':>14s} {'fwd+bwd tok/s':>14s}")
    names = {"eager": "per-expert Python loop", "grouped_mm": "ours (grouped_mm)"}
    for implementation in ("eager", "grouped_mm"):
        print(f"{names[implementation]:24s} {tokens / timings[implementation, 'forward']:14,.0f} "
              f"{tokens / timings[implementation, 'train']:14,.0f}")
    forward_speedup = timings["eager", "forward"] / timings["grouped_mm", "forward"]
    train_speedup = timings["eager", "train"] / timings["grouped_mm", "train"]
    print(f"speedup: forward {forward_speedup:.2f}x, forward+backward {train_speedup:.2f}x")
    print(f"routing: standard {tokens / standard:,.0f} tok/s, tier 3 {tokens / tier3:,.0f} tok/s")
    print(summary_line("moe_layer", expert_speedup=train_speedup, tier_overhead=tier3 / standard,
                       forward_speedup=forward_speedup))


if __name__ == "__main__":
    main()
