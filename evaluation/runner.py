"""The generation runner: a benchmark's samples -> stored `Result`s, batched, sharded, resumable.

Greedy decoding through the model's own processor (data/processor.py, the one training used) with the KV
cache, prompts left-padded so every row's answer starts at the same column, `max_new_tokens` per
benchmark. Under `torchrun` each rank takes every world-size-th sample still to do (no sample is dropped;
ranks may get one sample more or fewer, generation needs no collective), appends its results to its own
cache part, and rank 0 gathers and scores. A sample that cannot be processed (a corrupt image, a prompt
longer than the context) becomes a `Result` with its `error`, never a crash.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from data.processor import OmniProcessor, ProcessorError
from evaluation.benchmark import Result, Sample
from evaluation.cache import PredictionCache

MODEL_INPUTS_EXCLUDED = ("labels", "ids")


@dataclass
class GenerationStats:
    generated: int = 0  # samples generated in this call (0 when everything came from the cache)
    cached: int = 0  # samples whose stored result was reused
    errors: int = 0  # samples that failed in this call (counted, stored with their reason)
    seconds: float = 0.0


def distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@torch.no_grad()
def generate_batch(model: nn.Module, processor: OmniProcessor, examples: list[dict[str, Any]],
                   max_new_tokens: int, device: torch.device | str = "cpu") -> list[str]:
    """Greedy answers to already-processed prompts (`processor(sample, generation=True)`), in order."""
    batch = processor.collate(examples, padding_side="left")
    inputs = {k: v.to(device) for k, v in batch.items() if k not in MODEL_INPUTS_EXCLUDED}
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                            use_cache=True, pad_token_id=processor.pad_id, eos_token_id=processor.eos_id)
    answers = []
    for row in output[:, batch["input_ids"].shape[1]:].tolist():
        if processor.eos_id in row:
            row = row[: row.index(processor.eos_id)]
        answers.append(processor.tokenizer.decode([t for t in row if t != processor.pad_id],
                                                  skip_special_tokens=True).strip())
    return answers


def run_generation(model: nn.Module, processor: OmniProcessor, samples: Sequence[Sample], cache: PredictionCache,
                   max_new_tokens: int, batch_size: int = 8, device: torch.device | str = "cpu",
                   show_progress: bool = True, desc: str = "generate",
                   context: Callable[[], Any] | None = None) -> tuple[list[Result], GenerationStats]:
    """Results for every sample of `samples` (in their order) on rank 0, generating only the ones the cache
    lacks. `context()` wraps each `generate` call (e.g. a tier path). Other ranks return `[]`."""
    started = time.perf_counter()
    rank, world = distributed_rank()
    stored = cache.load()
    todo = [s for s in samples if s.id not in stored]
    mine = todo[rank::world]
    stats = GenerationStats(cached=len(samples) - len(todo))
    progress = tqdm(total=len(mine), desc=desc, disable=not show_progress or rank != 0, dynamic_ncols=True)
    for chunk in _chunks(mine, batch_size):
        results = _generate_chunk(model, processor, chunk, max_new_tokens, device, context)
        cache.append(rank, results)
        stats.generated += sum(r.error is None for r in results)
        stats.errors += sum(r.error is not None for r in results)
        progress.update(len(chunk))
        if stats.errors:
            progress.set_postfix(errors=stats.errors)
    progress.close()
    if world > 1:
        torch.distributed.barrier()
        totals = torch.tensor([stats.generated, stats.errors], device=device)  # nccl reduces on the GPU
        torch.distributed.all_reduce(totals)
        stats.generated, stats.errors = (int(v) for v in totals)
    stats.seconds = time.perf_counter() - started
    if rank != 0:
        if world > 1:
            torch.distributed.barrier()  # rank 0 merges the parts before anyone reads them again
        return [], stats
    everything = cache.load()
    missing = [s.id for s in samples if s.id not in everything]
    if missing:
        raise RuntimeError(f"{cache.stem}: {len(missing)} sample(s) have no result after generation "
                           f"(e.g. {missing[:3]}); a rank failed to write {cache.directory}")
    results = [everything[s.id] for s in samples]
    cache.finish(results)
    if world > 1:
        torch.distributed.barrier()
    return results, stats


def _generate_chunk(model: nn.Module, processor: OmniProcessor, chunk: list[Sample], max_new_tokens: int,
                    device: torch.device | str, context: Callable[[], Any] | None) -> list[Result]:
    results: dict[str, Result] = {}
    ready: list[tuple[Sample, dict]] = []
    for sample in chunk:
        try:
            ready.append((sample, processor(sample.processor_input(), generation=True)))
        except ProcessorError as err:  # a corrupt image, a missing file, a prompt too long: this sample only
            results[sample.id] = Result(sample.id, None, sample.answer, sample.meta, error=str(err))
    if ready:
        with context() if context is not None else contextlib.nullcontext():
            answers = generate_batch(model, processor, [e for _, e in ready], max_new_tokens, device)
        for (sample, _), answer in zip(ready, answers):
            results[sample.id] = Result(sample.id, answer, sample.answer, sample.meta)
    return [results[s.id] for s in chunk]


def _chunks(items: list[Sample], size: int) -> Iterator[list[Sample]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
