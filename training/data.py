"""Batches for a training run, whatever the data: a text corpus, a JSONL manifest, or WebDataset shards.

Every stream yields collated batches forever (epoch after epoch) and has `state_dict` / `load_state_dict`
(its position, saved in checkpoints) and `epoch`; multimodal streams also count skipped samples, and keep
an in-flight journal under output_dir so that a sample that crashed the run is named and, after two
crashes in a row, skipped (data/crash_journal.py).
"""
from __future__ import annotations

import json
import os
import sys
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.crash_journal import SampleJournal, recover_crashed_samples
from data.manifest import ManifestStream, read_manifest
from data.loader import SkipTally, StreamLoader
from data.media import MediaLimits, media_limits
from data.mixture import MixtureStream
from data.pipeline import ShardStream
from data.processor import OmniProcessor
from data.text import ChunkBatches, TextChunks
from data.tokenizer import CORPUS, train_tokenizer
from models.build import load_model_config
from training.config import TrainConfig
from training.run_log import METRICS, last_attempt


def processor_for(model: nn.Module, config: TrainConfig) -> OmniProcessor:
    model_config = load_model_config(config.model)
    if model_config.tokenizer is None:
        raise ValueError(f"{config.model}: multimodal data needs the model config's `tokenizer`")
    return OmniProcessor.for_model(model, model_config.tokenizer, model_config.max_length,
                                   num_frames=model_config.video.num_frames,
                                   temporal_pool=model_config.video.temporal_pool)


def ensure_tokenizer(config: TrainConfig, vocab_size: int) -> Path:
    """The text run's tokenizer: `data.tokenizer`, or a BPE sized to the model trained once on the corpus
    into output_dir (deterministic; written to a temporary file and renamed, so it is never torn)."""
    if config.data.tokenizer is not None:
        return Path(config.data.tokenizer)
    tokenizer = Path(config.output_dir) / "tokenizer.json"
    if not tokenizer.is_file():
        tmp = tokenizer.with_name(f".tmp-{tokenizer.name}.{os.getpid()}")
        try:
            train_tokenizer(config.data.corpus or CORPUS, tmp, vocab_size)
            os.replace(tmp, tokenizer)
        finally:
            tmp.unlink(missing_ok=True)
    return tokenizer


def text_chunks(config: TrainConfig, model: nn.Module) -> TextChunks:
    data = config.data
    vocab = model.get_input_embeddings().num_embeddings
    tokenizer = ensure_tokenizer(config, vocab)
    chunks = TextChunks(data.corpus or CORPUS, tokenizer, data.seq_len, data.eval_fraction)
    if chunks.tokenizer.get_vocab_size() > vocab:
        raise ValueError(f"tokenizer {tokenizer} has {chunks.tokenizer.get_vocab_size()} tokens but the model's "
                         f"embedding has {vocab} rows")
    return chunks


def train_stream(config: TrainConfig, model: nn.Module, journal: bool = True) -> Any:
    """The training batch stream `config.data` describes. `journal`: keep the crash journal in output_dir
    (the main rank first turns what the last attempt left there into events; see `crash_journal`)."""
    data = config.data
    rank, world = distributed_rank()
    if data.kind == "text":
        return ChunkBatches(text_chunks(config, model).train, data.batch_size, seed=config.seed, rank=rank,
                            world_size=world)
    processor = processor_for(model, config)
    common = dict(process=processor, collate=processor.collate, batch_size=data.batch_size, seed=config.seed,
                  rank=rank, world_size=world, pack_length=processor.max_length if data.pack else None,
                  pad_id=processor.pad_id, limits=stream_limits(config, processor),
                  journal=crash_journal(config, rank) if journal else None)
    if data.kind == "manifest":
        stream = ManifestStream(read_manifest(data.manifest), source=str(data.manifest), **common)
    elif data.mixture:
        stream = MixtureStream(data.mixture, shuffle_buffer=data.shuffle_buffer, **common)
    else:
        stream = ShardStream(data.shards, shuffle_buffer=data.shuffle_buffer, **common)
    return StreamLoader(stream, num_workers=data.num_workers, prefetch_factor=data.prefetch_factor,
                        pin_memory=torch.cuda.is_available(), timeout_s=data.timeout_s)


def crash_journal(config: TrainConfig, rank: int) -> SampleJournal:
    """This rank's crash journal. The main rank runs first (the other ranks wait at the engine's barrier):
    it reads what the last attempt left in flight, logs a `crash_suspect` (retried once) or `crashed_sample`
    (skipped from now on) event per sample into metrics.jsonl, at the step the run continues from, and
    says so on stderr."""
    output_dir = Path(config.output_dir)
    if rank == 0:
        events = recover_crashed_samples(output_dir)
        step = (last_attempt(output_dir / METRICS) or {}).get("step", 0) if events else 0
        for event in events:
            with (output_dir / METRICS).open("a") as log:
                log.write(json.dumps({"step": step, **event}) + "\n")
            then = ("skipped from now on (crashed_samples.json)" if event["event"] == "crashed_sample"
                    else "retried once; skipped if it is in flight at the next crash too")
            print(f"data: sample {event['key']} of {event['shard']} was in flight when the last attempt "
                  f"stopped ({event['how']}; {event['crashes']} attempt(s) in a row): {then}", file=sys.stderr)
    return SampleJournal(output_dir, rank)


def stream_limits(config: TrainConfig, processor: OmniProcessor) -> MediaLimits:
    """`data.max_*` media bounds (audio: from the model's max_length unless set)."""
    data = config.data
    return media_limits(processor, data.max_image_pixels, data.max_audio_seconds, data.max_video_seconds)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def held_out_batches(config: TrainConfig, model: nn.Module, max_batches: int,
                     batch_size: int) -> tuple[list[dict], SkipTally]:
    """Held-out batches in a fixed order (the text split, or `data.eval_manifest`), and the samples skipped
    while building them, by reason."""
    data = config.data
    if data.kind == "text":
        chunks = text_chunks(config, model).eval
        stream = ChunkBatches(chunks, min(batch_size, len(chunks)), shuffle=False)
        return list(islice(stream, min(max_batches, stream.batches_per_epoch))), SkipTally()
    if data.eval_manifest is None:
        raise ValueError("data.eval_manifest is not set: nothing held out to probe")
    processor = processor_for(model, config)
    samples = read_manifest(data.eval_manifest)
    stream = ManifestStream(samples, processor, processor.collate, min(batch_size, len(samples)), shuffle=False,
                            drop_last=False, limits=stream_limits(config, processor))
    pairs = list(islice(stream.one_epoch(), max_batches))
    return [batch for batch, _ in pairs], SkipTally(pairs[-1][1] if pairs else None)
