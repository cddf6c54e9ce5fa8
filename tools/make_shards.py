"""Write WebDataset shards from a JSONL manifest: `python -m tools.make_shards MANIFEST OUT_DIR [options]`.

Media are decoded while writing; undecodable samples are reported with their manifest line and left
out (exit status 1 for them only with --strict). See data/shards.py for the shard layout.
"""
from __future__ import annotations

import argparse
import sys

from data.manifest import ManifestError
from data.shards import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--max-samples", type=int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--workers", type=int, default=0, help="processes reading and validating media")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards already in OUT_DIR")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any sample was left out")
    args = parser.parse_args(argv)
    try:
        stats = write_shards(args.manifest, args.out_dir, args.max_samples, int(args.max_bytes),
                             workers=args.workers, overwrite=args.overwrite)
    except ManifestError as err:
        print(f"error: {err}" + (" (--overwrite)" if "already holds" in str(err) else ""), file=sys.stderr)
        return 2
    print(f"{stats.written} samples in {len(stats.shards)} shard(s) under {args.out_dir}; "
          f"modalities {dict(stats.modalities)}; {len(stats.skipped)} left out")
    for skipped in stats.skipped:
        print(f"  line {skipped['line']}: {skipped['reason']}", file=sys.stderr)
    return 1 if args.strict and stats.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
