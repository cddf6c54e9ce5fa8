"""Time and peak memory of one OrdMoE training step against plain next-token training.

Three ways to take one optimizer step on the same model and batch:
  ntp    - the baseline (one forward, one backward)
  naive  - OrdMoE as written in the paper: all C paths forward, one backward of the summed loss
  ours   - per-path backward (activation memory of one path) and zero-advantage paths skipped
Printed as ratios against ntp; the last line is for the largest config measured.
"""
from __future__ import annotations

import argparse

import torch

from common import REPO, peak_memory, pick_device, summary_line, time_it

import models  # noqa: F401  (registers the backbones)
from models.build import load_model_config, build_model
from models.tiers import TierConfig
from training.objectives import ObjectiveConfig, build_objective

VARIANTS = {
    "ntp": ObjectiveConfig(name="ntp"),
    "naive": ObjectiveConfig(tiers=TierConfig(num_tiers=3), execution="naive", skip_zero_advantage=False),
    "ours": ObjectiveConfig(tiers=TierConfig(num_tiers=3), execution="sequential"),
}

SIZES = {  # overrides of the tiny Ling-lite config; batch x sequence per step
    "tiny": ({}, 8, 128),
    "mid": ({"hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 8, "num_key_value_heads": 2, "num_experts": 32, "num_experts_per_tok": 4}, 8, 256),
    "large": ({"hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 704, "num_hidden_layers": 8,
               "num_attention_heads": 16, "num_key_value_heads": 4, "num_experts": 64, "num_experts_per_tok": 6},
              8, 1024),
}


def measure(size: str, device: torch.device, repeats: int) -> dict[str, tuple[float, int]]:
    overrides, batch_size, seq_len = SIZES[size]
    config = load_model_config(REPO / "configs/models/tiny-ling-lite.yaml")
    config.backbone.config.update(overrides)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    vocab = config.backbone.config["vocab_size"]
    ids = torch.randint(0, vocab, (batch_size, seq_len), device=device)
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    dtype = torch.bfloat16 if device.type == "cuda" else None
    results = {}
    for name, objective_config in VARIANTS.items():
        objective = build_objective(objective_config, model)

        def step():
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                objective(model, batch, backward=lambda loss: loss.backward(), step=1)
            model.zero_grad(set_to_none=True)

        seconds = time_it(step, device, repeats)
        memory, memory_kind = peak_memory(step, device, model)
        results[name] = (seconds, memory)
    print(f"\n{size}: batch {batch_size} x {seq_len} tokens on {device} ({memory_kind}); "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    print(f"{'variant':8s} {'step ms':>9s} {'x ntp':>6s} {'memory MiB':>11s} {'x ntp':>6s}")
    base_time, base_mem = results["ntp"]
    for name, (seconds, memory) in results.items():
        print(f"{name:8s} {seconds * 1e3:9.1f} {seconds / base_time:6.2f} {memory / 2**20:11.1f} {memory / base_mem:6.2f}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, small sizes, under a minute")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    device = pick_device(args.quick)
    sizes = ["tiny", "mid"] if args.quick or device.type == "cpu" else ["tiny", "mid", "large"]
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {size: measure(size, device, repeats) for size in sizes}
    largest = results[sizes[-1]]
    (t_ntp, m_ntp), (t_naive, m_naive), (t_ours, m_ours) = largest["ntp"], largest["naive"], largest["ours"]
    print(summary_line("ordmoe_step", time_ratio=t_ours / t_ntp, mem_ratio=m_ours / m_ntp,
                       naive_time_ratio=t_naive / t_ntp, naive_mem_ratio=m_naive / m_ntp))


if __name__ == "__main__":
    main()
