"""Build the demo dataset offline: `python -m tools.make_demo_data [OUT_DIR] [--per-kind N]`.

Shapes to count, words to read, beeps to count, squares to track, real speech to transcribe and text
questions: train shards + a held-out JSONL manifest with answers (data/demo_data.py). OUT_DIR must be
empty or an earlier output of this tool (which it then rebuilds), unless --overwrite; exit status 2 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time

from data.demo_data import DemoDirectoryError, build_demo_data
from data.manifest import ManifestError
from tools.arguments import positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", nargs="?", default="runs/demo_data")
    parser.add_argument("--per-kind", type=positive_int, default=12, help="generated samples of each kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a directory holding other files (they are kept, never deleted)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        paths = build_demo_data(args.out_dir, args.per_kind, seed=args.seed, overwrite=args.overwrite)
    except (DemoDirectoryError, ManifestError) as err:
        print(f"error: {err}" + (" (--overwrite)" if "overwrite" in str(err) else ""), file=sys.stderr)
        return 2
    print(f"demo data in {time.perf_counter() - started:.1f} s: " + ", ".join(f"{k}={v}" for k, v in paths.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
