"""Training batches from WebDataset shards: split by rank, shuffled by (seed, epoch), resumable exactly.

Shards are read with stock `webdataset` (one shard at a time); samples are turned into processor
samples (media bytes + conversation, or a caption as in img2dataset / video2dataset layouts), processed
and collated. Each rank takes every `world_size`-th shard of the epoch's seeded shard order and yields
the same number of batches as every other rank (the smallest rank's count, from `sizes.json`), so no
rank waits forever in a collective. The position is (epoch, shard index, samples read in that shard):
a restart skips exactly what was consumed. Bad samples and truncated shards are skipped and counted.

Runs in the training process (no DataLoader workers): decoding cost is measured by
benchmarks/dataloader.py when it exists; worker sharding of this stream is future work.
"""
from __future__ import annotations

import json
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds

from data.manifest import CAPTION_PROMPTS
from data.media import MediaError
from data.processor import ProcessorError

MEDIA_KINDS = {"img": "images", "jpg": "images", "jpeg": "images", "png": "images", "webp": "images",
               "aud": "audios", "wav": "audios", "flac": "audios", "mp3": "audios",
               "vid": "videos", "mp4": "videos", "mkv": "videos", "webm": "videos"}


class ShardSampleError(ValueError):
    """A shard member group is not a usable sample (e.g. no `.json` and no `.txt` caption)."""


def to_sample(group: dict[str, Any]) -> dict[str, Any]:
    """A WebDataset member group -> a processor sample (media stay bytes; the processor decodes them)."""
    key = group["__key__"]
    record = json.loads(group["json"]) if "json" in group else {}
    sample: dict[str, Any] = {"id": key, "images": [], "audios": [], "videos": []}
    for member in sorted(k for k in group if not k.startswith("__") and k not in ("json", "txt")):
        kind = MEDIA_KINDS.get(member.split(".")[0].rstrip("0123456789")) or MEDIA_KINDS.get(member.split(".")[-1])
        if kind:
            sample[kind].append(group[member])
    if "conversation" in record:
        sample["conversation"] = record["conversation"]
    else:
        caption = record.get("caption") or (group["txt"].decode("utf-8") if "txt" in group else None)
        if not caption:
            raise ShardSampleError(f"sample {key}: no .json conversation and no caption")
        kind = next((k for k in ("images", "videos", "audios") if sample[k]), None)
        sample["conversation"] = [{"role": "user", "content": CAPTION_PROMPTS[kind] if kind else "Write a sentence."},
                                  {"role": "assistant", "content": caption}]
    return sample


class ShardBatches:
    """Collated batches over shards for one rank, epoch after epoch, with an exact resumable position."""

    def __init__(self, shard_dir: str | Path, process: Callable[[dict], dict], collate: Callable[[list], dict],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        shard_dir = Path(shard_dir)
        self.shards = sorted(shard_dir.glob("*.tar"))
        if len(self.shards) < world_size:
            raise ValueError(f"{shard_dir} has {len(self.shards)} shard(s) for {world_size} ranks")
        sizes_file = shard_dir / "sizes.json"
        sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
        self.sizes = [int(sizes.get(s.name, 0)) for s in self.shards]
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch, self.shard_index, self.read_in_shard, self.yielded = 0, 0, 0, 0
        self.skipped: Counter[str] = Counter()

    def _rank_shards(self, epoch: int) -> list[int]:
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        return order.tolist()[self.rank::self.world_size]

    def batches_per_epoch(self, epoch: int) -> int:
        """The same for every rank: the smallest rank's sample count (from sizes.json) in whole batches."""
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        per_rank = [sum(self.sizes[i] for i in order.tolist()[r::self.world_size]) for r in range(self.world_size)]
        return min(per_rank) // self.batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            shards, budget, examples = self._rank_shards(self.epoch), self.batches_per_epoch(self.epoch), []
            while self.shard_index < len(shards) and self.yielded < budget:
                for example in self._read_shard(shards[self.shard_index]):
                    examples.append(example)
                    if len(examples) == self.batch_size:
                        self.yielded += 1
                        yield self.collate(examples)
                        examples = []
                        if self.yielded == budget:
                            break
                else:
                    self.shard_index, self.read_in_shard = self.shard_index + 1, 0
                    continue
                break
            self.epoch, self.shard_index, self.read_in_shard, self.yielded = self.epoch + 1, 0, 0, 0

    def _read_shard(self, index: int) -> Iterator[dict[str, Any]]:
        reader = iter(wds.WebDataset(str(self.shards[index]), shardshuffle=False, empty_check=False))
        for _ in range(self.read_in_shard):  # resume: skip what an earlier run consumed
            next(reader, None)
        while True:
            try:
                group = next(reader)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, ValueError) as err:  # a truncated or corrupt tar
                self.skipped[f"unreadable shard ({type(err).__name__})"] += 1
                return
            self.read_in_shard += 1
            try:
                yield self.process(to_sample(group))
            except (ShardSampleError, MediaError, ProcessorError, json.JSONDecodeError) as err:
                self.skipped[type(err).__name__] += 1

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "shard_index": self.shard_index, "read_in_shard": self.read_in_shard,
                "yielded": self.yielded,
                "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "rank", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data {key} changed since the checkpoint ({state[key]} -> {getattr(self, key)})")
        self.epoch, self.shard_index = state["epoch"], state["shard_index"]
        self.read_in_shard, self.yielded = state["read_in_shard"], state["yielded"]
        self.skipped = Counter(state.get("skipped", {}))
