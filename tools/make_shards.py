"""Write WebDataset shards from a JSONL manifest: `python -m tools.make_shards MANIFEST OUT_DIR [options]`.

Media are decoded while writing; undecodable samples, empty and duplicate keys are reported with their
manifest line and left out (exit status 1 for them only with --strict). Exit status 2 when OUT_DIR is not
ours to write (see data/shards.py) or when nothing at all was written (OUT_DIR is then left unchanged).
"""
from __future__ import annotations

import argparse
import sys

from data.manifest import ManifestError
from data.shards import NothingWritten, write_shards
from tools.arguments import non_negative_int, positive_float, positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("manifest")
    parser.add_argument("out_dir")
    parser.add_argument("--max-samples", type=positive_int, default=1000, help="samples per shard at most")
    parser.add_argument("--max-bytes", type=positive_float, default=1e9, help="bytes per shard at most")
    parser.add_argument("--workers", type=non_negative_int, default=0, help="processes reading and validating media")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the shards an earlier make_shards wrote in OUT_DIR (other files are kept)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when any sample was left out")
    args = parser.parse_args(argv)
    try:
        stats = write_shards(args.manifest, args.out_dir, args.max_samples, int(args.max_bytes),
                             workers=args.workers, overwrite=args.overwrite)
    except ManifestError as err:
        for skipped in err.stats.skipped if isinstance(err, NothingWritten) else []:
            print(f"  line {skipped['line']}: {skipped['reason']}", file=sys.stderr)
        print(f"error: {err}" + (" (--overwrite)" if "overwrite" in str(err) else ""), file=sys.stderr)
        return 2
    print(f"{stats.written} samples in {len(stats.shards)} shard(s) under {args.out_dir}; "
          f"modalities {dict(stats.modalities)}; {len(stats.skipped)} left out")
    for skipped in stats.skipped:
        print(f"  line {skipped['line']}: {skipped['reason']}", file=sys.stderr)
    return 1 if args.strict and stats.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
