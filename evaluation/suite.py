"""Run benchmarks on a model (and its tier paths) and collect the report; score stored predictions.

`evaluate(...)` is what `tools/eval.py` calls: for every benchmark, its samples from `--data-root`, then
per model path (the standard routing, then tier 2..C with `tiers`) generation through the cache and the
benchmark's scorer. A benchmark whose data is missing or malformed is reported as such; the others run.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from data.processor import OmniProcessor
from evaluation.benchmark import BENCHMARKS, Benchmark, DataError, MissingData, Result, Sample, Score
from evaluation.cache import PredictionCache
from evaluation.report import Report, ReportRow
from evaluation.runner import GenerationStats, distributed_rank, run_generation
from evaluation.tier_paths import installed_plan, tier_paths, tier_plan_for
from models.tiers import TierConfig


@dataclass
class ModelUnderTest:
    model: nn.Module
    processor: OmniProcessor
    label: str  # the report row's name
    fingerprint: str  # content hash of config + weights (evaluation/cache.py fingerprint)


def load_samples(benchmark: Benchmark, limit: int | None = None) -> list[Sample]:
    """The benchmark's first `limit` samples; ids must be unique (the cache is keyed by them)."""
    samples = list(islice(benchmark.samples(), limit))
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise DataError(f"{benchmark.name}: sample id {sample.id!r} occurs twice in {benchmark.locate()}")
        seen.add(sample.id)
    return samples


def score_results(benchmark: Benchmark, results: list[Result]) -> Score:
    """The benchmark's score, with the samples that had no prediction counted as errors."""
    score = benchmark.score(results)
    score.errors = sum(r.error is not None for r in results)
    return score


def evaluate(subject: ModelUnderTest, names: list[str], data_root: str | Path, output_dir: str | Path,
             protocol: str = "vlmevalkit", batch_size: int = 8, limit: int | None = None,
             tiers: TierConfig | None = None, device: torch.device | str = "cpu",
             show_progress: bool = True, num_frames: int | None = None) -> tuple[Report, dict[str, GenerationStats]]:
    """The report (meaningful on rank 0) and, per (benchmark, row), the generation counts. `num_frames`: frames
    per video of the video benchmarks (None: the paper's 128); other counts are cached apart."""
    report = Report(benchmarks=list(names), protocol=protocol)
    paths = [None]
    plan = None
    if tiers is not None and tiers.num_tiers > 1:
        plan = tier_plan_for(subject.model, tiers)
        paths += tier_paths(plan)[1:]  # tier 1 is the standard routing, bit for bit: the first row
    rows = [ReportRow(subject.label if path is None else f"{subject.label} [{path.label}]",
                      info={"fingerprint": _path_fingerprint(subject.fingerprint, path),
                            "tier": None if path is None else path.tier}) for path in paths]
    if plan is not None:
        rows[0].label += f" [tier 1/{plan.num_tiers}: standard routing]"
    stats: dict[str, GenerationStats] = {}
    for name in names:
        frames = num_frames if BENCHMARKS.get(name).modality == "video" else None
        benchmark = BENCHMARKS.build(name, data_root, protocol, **({} if frames is None else {"num_frames": frames}))
        cached_as = name if frames is None else f"{name}-{frames}frames"
        try:
            samples = load_samples(benchmark, limit)
        except MissingData as err:
            report.missing[name] = str(err)
            continue
        except DataError as err:
            report.failed[name] = str(err)
            continue
        for path, row in zip(paths, rows):
            cache = PredictionCache(output_dir, row.info["fingerprint"], cached_as, protocol)
            if distributed_rank()[0] == 0:
                cache.write_model_card({"label": row.label, "fingerprint": subject.fingerprint,
                                        "tier": None if path is None else path.label})
            context = None
            if path is not None:
                context = _tier_context(subject.model, plan, path.tier)
            results, stats[f"{name} / {row.label}"] = run_generation(
                subject.model, subject.processor, samples, cache, benchmark.max_new_tokens, batch_size, device,
                show_progress, desc=f"{name}" + ("" if path is None else f" tier {path.tier}"), context=context)
            if distributed_rank()[0] == 0:
                row.scores[name] = score_results(benchmark, results)
    report.rows = rows
    return report, stats


def _tier_context(model: nn.Module, plan, tier: int):
    """A context factory: the plan installed and tier `tier` routed, both undone on exit."""
    import contextlib

    @contextlib.contextmanager
    def context():
        with installed_plan(model, plan) as routing, routing.path(tier):
            yield
    return context


def _path_fingerprint(fingerprint: str, path) -> str:
    if path is None:
        return fingerprint
    key = f"{fingerprint}/tier{path.tier}of{path.num_tiers}/{path.plan}/{path.ranks}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
