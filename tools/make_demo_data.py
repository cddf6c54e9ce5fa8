"""Build the demo dataset offline: `python -m tools.make_demo_data [OUT_DIR] [--per-kind N]`.

Shapes to count, words to read, beeps to count, squares to track, real speech to transcribe and text
questions: train shards + a held-out JSONL manifest with answers (data/demo_data.py).
"""
from __future__ import annotations

import argparse
import sys
import time

from data.demo_data import build_demo_data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="runs/demo_data")
    parser.add_argument("--per-kind", type=int, default=12, help="generated samples of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    paths = build_demo_data(args.out_dir, args.per_kind, seed=args.seed)
    print(f"demo data in {time.perf_counter() - started:.1f} s: " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
