"""Training batches from WebDataset shards, split by rank and worker, shuffled by (seed, epoch), resumable exactly.

Shards are read with stock `webdataset` (one shard at a time); samples become processor samples
(media bytes + conversation, or a caption as in img2dataset / video2dataset layouts), are processed
and batched. Every epoch has one seeded shard order, the same on every rank: rank `r` takes every
`world_size`-th shard of it and its DataLoader worker `w` every `num_streams`-th of those, so ranks and
workers read disjoint shards. Inside a shard, samples go through a seeded shuffle buffer.

Equal batch counts: without packing, every rank yields the same number of batches per epoch (the
smallest rank's sample count from `sizes.json`, in whole batches, spread over its workers), so no rank
waits forever in a collective. The stream runs epoch after epoch, so a step-based run never ends
early on one rank even when bad samples or packing make epochs uneven.

Position of a stream: (epoch, shard index, samples emitted by that shard's shuffle buffer, batches
yielded, skip counts). Resuming re-reads the current shard's tar without decoding up to the position,
replaying the same shuffle. Bad samples and truncated shards are skipped and counted.
"""
from __future__ import annotations

import json
import random
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from braceexpand import braceexpand

from data.batching import make_batcher
from data.loader import SkipTally
from data.manifest import CAPTION_PROMPTS
from data.media import MediaError
from data.processor import ProcessorError

MEDIA_KINDS = {"img": "images", "jpg": "images", "jpeg": "images", "png": "images", "webp": "images",
               "aud": "audios", "wav": "audios", "flac": "audios", "mp3": "audios",
               "vid": "videos", "mp4": "videos", "mkv": "videos", "webm": "videos"}
SAMPLE_ERRORS = (MediaError, ProcessorError, json.JSONDecodeError, UnicodeDecodeError)
# The shuffle buffer also stops growing at this many raw sample bytes per worker: 1000 video samples of a
# few MB each would otherwise hold gigabytes in every worker.
SHUFFLE_BUFFER_BYTES = 256 << 20


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


def describe(err: Exception, group: dict[str, Any]) -> str:
    """A skip reason that names the sample (most of our errors already do)."""
    key = str(group.get("__key__"))
    return str(err) if key in str(err) else f"sample {key}: {type(err).__name__}: {err}"


def count_samples(shard: Path) -> int:
    """Samples in a tar shard, from its member headers (no decoding); for shards without a sizes.json."""
    keys = set()
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.isfile():
                    directory, _, name = member.name.rpartition("/")
                    keys.add((directory, name.split(".", 1)[0]))
    except (tarfile.TarError, OSError):
        pass  # a truncated shard counts what it has; reading it later skips and reports the damage
    return len(keys)


def read_sizes(source: str | Path, shards: list[str]) -> list[int] | None:
    """Samples per shard of a local directory: from `sizes.json` (ours), else img2dataset / video2dataset's
    `<shard>_stats.json` (`successes`), else counted from the tar headers. None for remote shards (URLs)."""
    if not is_local(source):
        return None
    sizes_file = Path(source) / "sizes.json"
    try:
        sizes = json.loads(sizes_file.read_text()) if sizes_file.is_file() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{sizes_file} is not valid JSON ({err}); delete it to count samples from the tars") from None
    paths = [Path(s) for s in shards]
    return [int(sizes[p.name]) if p.name in sizes else _tool_stats_size(p) or count_samples(p) for p in paths]


def _tool_stats_size(shard: Path) -> int | None:
    stats = shard.with_name(f"{shard.stem}_stats.json")
    try:
        return int(json.loads(stats.read_text())["successes"]) if stats.is_file() else None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # not the layout we know: count the tar instead


def is_local(source: str | Path) -> bool:
    return Path(source).is_dir()


def list_shards(source: str | Path) -> list[str]:
    """The shards of `source`: a local directory's `*.tar` files, sorted, or a brace pattern of shard URLs
    as webdataset opens them (`pipe:aws s3 cp s3://bucket/{00000..00099}.tar -`, `https://.../{0..9}.tar`)."""
    if is_local(source):
        shards = sorted(str(p) for p in Path(source).glob("*.tar"))
        if not shards:
            raise ValueError(f"{source} has no .tar shards (write them with tools/make_shards.py)")
        return shards
    text = str(source)
    if not (text.startswith("pipe:") or "://" in text or "{" in text):
        raise FileNotFoundError(f"shard directory not found: {source} (or give a brace pattern of shard URLs)")
    return list(braceexpand(text))


def shard_name(shard: str) -> str:
    """The file name in a shard path or URL, for messages."""
    return shard.rstrip(" -").split("/")[-1]


class ShardReader:
    """The groups of one shard through a seeded shuffle buffer, resumable after `emitted` groups.

    A truncated or corrupt tar ends the groups early and sets `error`; the caller counts it. Resuming
    re-reads the tar from its start (without decoding any media) to replay the same shuffle.
    """

    def __init__(self, path: str | Path, seed: int, shuffle_buffer: int,
                 max_buffer_bytes: int = SHUFFLE_BUFFER_BYTES) -> None:
        self.path, self.seed, self.shuffle_buffer, self.max_buffer_bytes = path, seed, shuffle_buffer, max_buffer_bytes
        self.error: str | None = None  # set when the tar turned out truncated or corrupt
        self.peak_buffer_bytes = 0

    def _raw(self) -> Iterator[dict[str, Any]]:
        dataset = wds.WebDataset(str(self.path), shardshuffle=False, empty_check=False,
                                 nodesplitter=None, workersplitter=None)  # we split by rank/worker ourselves
        reader = iter(dataset)
        while True:
            try:
                yield next(reader)
            except StopIteration:
                return
            except (tarfile.TarError, OSError, ValueError) as err:
                self.error = f"unreadable shard ({type(err).__name__})"
                return

    def groups(self, emitted: int = 0) -> Iterator[dict[str, Any]]:
        """Groups in shuffled order, without the first `emitted` (already consumed before a restart)."""
        shuffled = self._shuffled() if self.shuffle_buffer > 1 else self._raw()
        for index, group in enumerate(shuffled):
            if index >= emitted:
                yield group

    def _shuffled(self) -> Iterator[dict[str, Any]]:
        rng, buffer, held = random.Random(self.seed), [], 0
        for group in self._raw():
            held += _group_bytes(group)
            self.peak_buffer_bytes = max(self.peak_buffer_bytes, held)
            if len(buffer) < self.shuffle_buffer and held <= self.max_buffer_bytes:
                buffer.append(group)
                continue
            index = rng.randrange(len(buffer)) if buffer else 0
            if buffer:
                buffer[index], group = group, buffer[index]
            held -= _group_bytes(group)
            yield group
        rng.shuffle(buffer)
        yield from buffer


def _group_bytes(group: dict[str, Any]) -> int:
    return sum(len(value) for value in group.values() if isinstance(value, bytes))


class ShardStream:
    """Batches over one directory of shards for one rank, epoch after epoch, each worker on its own shards."""

    kind = "shards"

    def __init__(self, source: str | Path, process: Callable[[dict], Any], collate: Callable[[list], Any],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 pack_length: int | None = None, pad_id: int = 0) -> None:
        self.num_streams = 1  # StreamLoader sets one stream per DataLoader worker
        self.source = str(source)
        self.shards = list_shards(source)
        if len(self.shards) < world_size:
            raise ValueError(f"{self.source} has {len(self.shards)} shard(s) for {world_size} ranks")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.sizes = read_sizes(source, self.shards)  # None for remote shards: no per-epoch batch budget
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.pack_length, self.pad_id = pack_length, pad_id

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "packed": self.pack_length is not None}

    def epoch_of(self, position: dict[str, Any]) -> int:
        return position["epoch"]

    # ---- which shards, how many batches ------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def stream_shards(self, epoch: int, stream: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        return self._epoch_order(epoch)[rank::self.world_size][stream::self.num_streams]

    def batch_budget(self, epoch: int, stream: int) -> int | None:
        """Batches stream `stream` yields in `epoch` (None when packing or for remote shards: not known ahead).

        Every rank gets the smallest rank's total; within a rank it is spread so that no stream is asked
        for more than its shards hold and the streams stay as even as possible.
        """
        if self.pack_length is not None or self.sizes is None:
            return None
        caps = [[sum(self.sizes[i] for i in self.stream_shards(epoch, s, r)) // self.batch_size
                 for s in range(self.num_streams)] for r in range(self.world_size)]
        return even_split(min(sum(c) for c in caps), caps[self.rank])[stream]

    def batches_per_epoch(self, epoch: int = 0) -> int | None:
        """This rank's batches in `epoch` over all its workers (None when packing or for remote shards)."""
        budgets = [self.batch_budget(epoch, s) for s in range(self.num_streams)]
        return None if None in budgets else sum(budgets)

    def validate(self) -> None:
        per_rank = len(self.shards) // self.world_size
        if per_rank < self.num_streams:
            raise ValueError(f"{self.source}: {len(self.shards)} shard(s) over {self.world_size} rank(s) leave "
                             f"{per_rank} per rank for {self.num_streams} DataLoader workers; every worker needs a "
                             f"shard: lower data.num_workers or write more, smaller shards")
        if self.batches_per_epoch(0) == 0:
            raise ValueError(f"{self.source}: rank {self.rank} of {self.world_size} gets fewer samples than one "
                             f"batch of {self.batch_size} per worker; lower data.num_workers or batch_size")

    # ---- the stream ------------------------------------------------------------------------------------
    def stream_batches(self, stream: int, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        pos = {key: (position or {}).get(key, 0) for key in ("epoch", "shard_index", "emitted", "yielded")}
        skips = SkipTally(position)

        def snapshot(**changes: Any) -> dict[str, Any]:
            return {**pos, **skips.state(), **changes}

        empty_epochs = 0
        while True:
            shards, budget = self.stream_shards(pos["epoch"], stream), self.batch_budget(pos["epoch"], stream)
            if budget == 0:  # this epoch's shards hold less than a batch for this worker: the next epoch's may not
                empty_epochs += 1
                if empty_epochs == 100:
                    raise ValueError(f"{self.source}: worker {stream} of rank {self.rank} got less than one batch "
                                     f"of {self.batch_size} in 100 epochs in a row; lower data.num_workers")
                pos.update(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)
                continue
            empty_epochs = 0
            batcher = make_batcher(self.collate, self.batch_size, self.pack_length, self.pad_id)
            fresh_epoch, yielded_before = pos["shard_index"] == 0 and pos["emitted"] == 0, pos["yielded"]
            while pos["shard_index"] < len(shards) and (budget is None or pos["yielded"] < budget):
                path = self.shards[shards[pos["shard_index"]]]
                reader = ShardReader(path, self.seed * 1_000_003 + pos["epoch"] * 10_007 + shards[pos["shard_index"]],
                                     self.shuffle_buffer)
                for group in reader.groups(pos["emitted"]):
                    before = snapshot()
                    pos["emitted"] += 1
                    try:
                        example = self.process(to_sample(group))
                    except (ShardSampleError, *SAMPLE_ERRORS) as err:
                        skips.add(type(err).__name__, f"{shard_name(path)}: {describe(err, group)}")
                        continue
                    if not batcher.fits(example):  # packing: close the batch; this example starts the next
                        pos["yielded"] += 1
                        yield batcher.flush(), {**before, "yielded": pos["yielded"]}
                    batcher.add(example)
                    if batcher.full:
                        pos["yielded"] += 1
                        yield batcher.flush(), snapshot()
                        if budget is not None and pos["yielded"] == budget:
                            break
                else:
                    if reader.error:
                        skips.add(reader.error, f"{path}: {reader.error}, the rest of it is left out")
                    pos["shard_index"], pos["emitted"] = pos["shard_index"] + 1, 0
            if budget is None and not batcher.empty:  # the epoch's partial batch (packing, remote shards)
                pos["yielded"] += 1
                yield batcher.flush(), snapshot(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)
            elif fresh_epoch and pos["yielded"] == yielded_before:
                raise ValueError(f"rank {self.rank} worker {stream}: a whole epoch of {len(shards)} shard(s) in "
                                 f"{self.source} gave no batch of {self.batch_size} "
                                 f"({skips}); "
                                 f"lower data.num_workers or batch_size, or check the skip reasons")
            pos.update(epoch=pos["epoch"] + 1, shard_index=0, emitted=0, yielded=0)


def even_split(total: int, caps: list[int]) -> list[int]:
    """`total` spread over slots holding at most `caps[i]` each, as evenly as possible (earlier slots first)."""
    if total > sum(caps):
        raise ValueError(f"cannot place {total} in slots of {caps}")
    level_low, level_high = 0, max(caps, default=0)
    while level_low < level_high:  # the highest level L with sum(min(cap, L)) <= total
        level = (level_low + level_high + 1) // 2
        if sum(min(c, level) for c in caps) <= total:
            level_low = level
        else:
            level_high = level - 1
    shares = [min(c, level_low) for c in caps]
    for i, cap in enumerate(caps):
        if sum(shares) == total:
            break
        if cap > shares[i]:
            shares[i] += 1
    return shares
