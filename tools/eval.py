"""Evaluate a model on benchmarks: `python -m tools.eval MODEL --benchmarks NAMES|image|all --data-root DIR`.

MODEL is a training run directory (its latest checkpoint), a checkpoint or export directory
(training/export.py), or a model config YAML. Predictions are cached per (model, benchmark, protocol) under
`--output`, so an interrupted run resumes and a finished one re-scores without generating. Writes
report.md / report.json / report.png into `--output` and prints the table.

    python -m tools.eval runs/demo --benchmarks ai2d,mmstar --data-root ~/LMUData --limit 100
    torchrun --nproc-per-node 8 -m tools.eval runs/stage2 --benchmarks image --data-root /data/bench
    python -m tools.eval --rescore vila_13b_MMStar.xlsx --benchmarks mmstar      # no model needed
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import evaluation  # noqa: F401  (registers the benchmarks)
import models  # noqa: F401  (registers the backbones)
from evaluation.benchmark import BENCHMARKS, PROTOCOLS, DataError
from evaluation.cache import fingerprint, read_results
from evaluation.report import Report, ReportRow, to_markdown, write_report
from evaluation.suite import ModelUnderTest, evaluate, score_results
from evaluation.tables import read_table
from models.tiers import TierConfig
from training.export import MODEL_CONFIG, PROCESSOR_CONFIG, WEIGHTS, load_trained, resolve_model_dir
from tools.arguments import positive_int


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="run, checkpoint or export directory, or a model config YAML")
    parser.add_argument("--benchmarks", default="image",
                        help=f"comma-separated names or groups (all, image, video, speech); known: "
                             f"{', '.join(BENCHMARKS.names())}")
    parser.add_argument("--data-root", default="data/benchmarks", help="where the benchmarks' release files are")
    parser.add_argument("--output", default=None, help="report and prediction cache (default: MODEL/eval or eval)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="vlmevalkit",
                        help="whose prompts and scoring rules to follow where VLMEvalKit and lmms-eval differ")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each benchmark")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--frames", type=positive_int, default=None, metavar="N",
                        help="frames per video for the video benchmarks (default: the paper's 128, uniformly sampled)")
    parser.add_argument("--tiers", type=int, nargs="?", const=3, default=None, metavar="C",
                        help="also evaluate every OrdMoE tier path (C tiers, default 3): one report row per path")
    parser.add_argument("--tier-plan", default="uniform", help="the tier plan of --tiers (uniform, high_only, ...)")
    parser.add_argument("--rescore", default=None, metavar="FILE",
                        help="score stored predictions without a model: a predictions JSONL of this tool, or a "
                             "VLMEvalKit .xlsx / .tsv with a `prediction` column")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        names = BENCHMARKS.select(args.benchmarks)
        if args.rescore:
            report, output = rescore(Path(args.rescore), names, args.protocol, args.output)
        else:
            if args.model is None:
                parser.error("MODEL is required (or --rescore FILE)")
            report, output = run(args, names)
    except (DataError, FileNotFoundError, KeyError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report is None:  # a non-zero rank under torchrun
        return 0
    paths = write_report(report, output)
    print(to_markdown(report))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0


def run(args: argparse.Namespace, names: list[str]) -> tuple[Report | None, Path]:
    device, rank = _init_distributed(args.device)
    model_path = Path(args.model)
    if model_path.is_file():
        torch.manual_seed(0)  # a config's random init (or its named checkpoints) is then reproducible
    model, processor = load_trained(model_path, device)
    if processor is None:
        raise ValueError(f"{model_path}: the model has no tokenizer, so it cannot be prompted")
    subject = ModelUnderTest(model, processor, label=_label(model_path), fingerprint=model_fingerprint(model_path))
    output = Path(args.output) if args.output else (model_path / "eval" if model_path.is_dir() else Path("eval"))
    tiers = TierConfig(num_tiers=args.tiers, plan=args.tier_plan) if args.tiers else None
    report, _ = evaluate(subject, names, args.data_root, output, args.protocol, args.batch_size, args.limit,
                         tiers, device, show_progress=not args.no_progress, num_frames=args.frames)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return (report if rank == 0 else None), output


def rescore(path: Path, names: list[str], protocol: str, output: str | None) -> tuple[Report, Path]:
    """Score a predictions file: ours (JSONL of results) or VLMEvalKit's table; the benchmark is the one
    `--benchmarks` names, else the one whose name the file name contains."""
    if not path.is_file():
        raise FileNotFoundError(f"--rescore {path}: file not found")
    name = _benchmark_of(path, names)
    benchmark = BENCHMARKS.build(name, ".", protocol)
    if path.suffix == ".jsonl":
        results = read_results(path)
    else:
        results = benchmark.results_from_table(read_table(path, ("prediction",)), str(path))
    report = Report(benchmarks=[name], protocol=protocol,
                    rows=[ReportRow(path.stem, {name: score_results(benchmark, results)}, {"rescored": str(path)})])
    return report, Path(output) if output else path.parent / f"{path.stem}_rescored"


def model_fingerprint(path: Path) -> str:
    """Content hash of what the model computes: its resolved config, processor settings and weight bytes."""
    model_dir = resolve_model_dir(path)
    if model_dir.is_file():
        from models.config import read_yaml
        return fingerprint({"config": read_yaml(model_dir), "init_seed": 0})
    parts = {name: (model_dir / name).read_text() for name in (MODEL_CONFIG, PROCESSOR_CONFIG)}
    parts[MODEL_CONFIG] = "\n".join(line for line in parts[MODEL_CONFIG].splitlines() if not line.startswith("#"))
    tokenizer = model_dir / "tokenizer.json"
    if tokenizer.is_file():
        parts["tokenizer"] = tokenizer.read_text()
    return fingerprint(parts, [model_dir / WEIGHTS])


def _benchmark_of(path: Path, names: list[str]) -> str:
    if len(names) == 1:
        return names[0]
    stem = path.stem.lower().replace("-", "").replace("_", "")
    matches = [n for n in BENCHMARKS.names() if n.replace("-", "").replace("_", "") in stem]
    if len(matches) != 1:
        raise ValueError(f"--rescore {path}: name the benchmark with --benchmarks (the file name matches "
                         f"{matches or 'no benchmark'})")
    return matches[0]


def _label(path: Path) -> str:
    return path.name if path.is_file() else os.path.normpath(str(path))


def _init_distributed(device_name: str) -> tuple[torch.device, int]:
    """Under torchrun (WORLD_SIZE > 1): one process group, one GPU per rank (or gloo on the CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank = torch.distributed.get_rank() if world > 1 else 0
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local), rank
    return torch.device("cpu" if device_name == "auto" else device_name), rank


if __name__ == "__main__":
    sys.exit(main())
