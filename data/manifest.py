"""JSONL manifests of multimodal samples (the format tools/make_shards.py reads), as a resumable batch stream.

One sample per line: `{"id"?, "conversation": [{"role", "content"}] | "caption": str, "image" | "images",
"audio" | "audios", "video" | "videos"}` with media paths relative to the manifest. Samples are decoded
and processed on the fly; a sample that cannot be (corrupt media, a marker without its media, too long)
is skipped and counted by reason, never fatal (whatever the exception), and one that crashed the process
twice in a row is skipped (data/crash_journal.py); media sizes are checked from their headers first
(data/media.py `MediaLimits`). A line that is not a sample record (not JSON, not an
object, no conversation or caption, media fields that are not paths) is refused by `read_manifest`,
naming the line. The stream position is (epoch, samples consumed), so a restart continues with the next
unseen sample of the same seeded order (data/loader.py runs it in DataLoader workers).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data.batching import make_batcher
from data.crash_journal import SampleJournal
from data.loader import SkipTally, process_sample
from data.media import MediaLimits, decode_media, media_limits

MEDIA_FIELDS = {"image": "images", "audio": "audios", "video": "videos"}
CAPTION_PROMPTS = {"images": "<image>\nDescribe the image.", "videos": "<video>\nDescribe the video.",
                   "audios": "<audio>\nTranscribe the audio."}


class ManifestError(ValueError):
    """A manifest line is not a sample; the message names the file and the line."""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Samples with media paths made absolute and captions turned into a one-exchange conversation."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{number}: not JSON ({err.msg})") from None
        samples.append(to_sample(record, path.parent, f"{path.name}:{number}"))
    return samples


def to_sample(record: dict[str, Any], root: Path, where: str) -> dict[str, Any]:
    """A manifest record -> a processor sample (`id`, `conversation`, media lists of absolute paths)."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: a sample must be a JSON object")
    sample: dict[str, Any] = {"id": str(record.get("id", where))}
    for single, plural in MEDIA_FIELDS.items():
        items = record.get(plural, [record[single]] if single in record else [])
        if isinstance(items, str):
            items = [items]
        if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
            raise ManifestError(f"{where}: `{plural}` must be a list of file paths, got {json.dumps(items)[:60]}")
        sample[plural] = [str(root / item) for item in items]
    if "conversation" in record:
        sample["conversation"] = record["conversation"]
    elif "caption" in record:
        if not isinstance(record["caption"], str) or not record["caption"].strip():
            raise ManifestError(f"{where}: `caption` must be a non-empty string, got {json.dumps(record['caption'])[:60]}")
        kind = next((k for k in ("images", "videos", "audios") if sample[k]), None)
        prompt = CAPTION_PROMPTS[kind] if kind else "Write a sentence."
        sample["conversation"] = [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": record["caption"]}]
    else:
        raise ManifestError(f"{where}: needs `conversation` or `caption`")
    for key in ("answer", "question"):
        if key in record:
            sample[key] = record[key]
    return sample


class ManifestStream:
    """Processed batches over manifest samples, epoch after epoch, split by rank and DataLoader worker.

    Each epoch has one seeded order; of its `world_size * num_streams` interleaved slices, rank `r`'s
    worker `w` reads slice `r * num_streams + w`, cut to the length of the shortest slice so every rank
    yields the same number of batches. The position is (epoch, samples consumed, batches yielded).
    `drop_last=False` (evaluation) also yields each epoch's last, partial batch. `source` (the manifest's
    path) and a sample's id name it in the crash journal.
    """

    kind = "manifest"

    def __init__(self, samples: list[dict[str, Any]], process: Callable[[dict], Any], collate: Callable[[list], Any],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True,
                 drop_last: bool = True, pack_length: int | None = None, pad_id: int = 0,
                 limits: MediaLimits | None = None, journal: SampleJournal | None = None,
                 source: str = "manifest") -> None:
        self.num_streams = 1  # StreamLoader sets one stream per DataLoader worker
        self.limits = limits if limits is not None else media_limits(process)
        self.journal, self.source = journal, source
        if not samples:
            raise ValueError("the manifest has no samples")
        self.samples, self.process, self.collate, self.batch_size = samples, process, collate, batch_size
        self.seed, self.rank, self.world_size, self.shuffle, self.drop_last = seed, rank, world_size, shuffle, drop_last
        self.pack_length, self.pad_id = pack_length, pad_id

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "shuffle": self.shuffle,
                "packed": self.pack_length is not None, "samples": len(self.samples)}

    def epoch_of(self, position: dict[str, Any]) -> int:
        return position["epoch"]

    def stream_samples(self, epoch: int, stream: int) -> list[int]:
        """Indices of the samples stream `stream` of this rank reads in `epoch`."""
        slots = self.world_size * self.num_streams
        order = (torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
                 if self.shuffle else torch.arange(len(self.samples)))
        return order[self.rank * self.num_streams + stream::slots][: len(self.samples) // slots].tolist()

    def validate(self) -> None:
        per_stream = len(self.samples) // (self.world_size * self.num_streams)
        if per_stream < (self.batch_size if self.drop_last and self.pack_length is None else 1):
            raise ValueError(f"{len(self.samples)} manifest samples over {self.world_size} rank(s) x "
                             f"{self.num_streams} worker(s) leave {per_stream} per worker, not one batch of "
                             f"{self.batch_size}; lower data.num_workers or batch_size")

    def stream_batches(self, stream: int, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        pos = {key: (position or {}).get(key, 0) for key in ("epoch", "index")}
        skips = SkipTally(position)
        if self.journal is not None:
            self.journal.open(stream)

        def snapshot() -> dict[str, Any]:  # the position after a batch; the epoch's last batch points at the next
            if pos["index"] == len(indices) or (budget is not None and yielded_this_epoch == budget):
                return {"epoch": pos["epoch"] + 1, "index": 0, **skips.state()}
            return {**pos, **skips.state()}

        while True:
            indices = self.stream_samples(pos["epoch"], stream)
            batcher = make_batcher(self.collate, self.batch_size, self.pack_length, self.pad_id)
            budget = len(indices) // self.batch_size if self.drop_last and self.pack_length is None else None
            yielded_this_epoch, resumed_mid_epoch = 0, pos["index"] > 0
            while pos["index"] < len(indices) and (budget is None or yielded_this_epoch < budget):
                sample = self.samples[indices[pos["index"]]]
                before = {**pos, **skips.state()}
                pos["index"] += 1
                example = process_sample(lambda: self.process(decode_media(sample, self.limits, sample["id"])),
                                         self.source, sample["id"], skips, self.journal)
                if example is None:
                    continue
                if not batcher.fits(example):  # packing: this example opens the next batch
                    yielded_this_epoch += 1
                    yield batcher.flush(), before
                batcher.add(example)
                if batcher.full:
                    yielded_this_epoch += 1
                    yield batcher.flush(), snapshot()
            if budget is None and not batcher.empty:
                yielded_this_epoch += 1
                yield batcher.flush(), snapshot()  # the epoch's partial batch (evaluation, packing)
            if yielded_this_epoch == 0 and not resumed_mid_epoch:
                raise ValueError(f"rank {self.rank} worker {stream}: a whole manifest epoch gave no batch "
                                 f"({skips})")
            pos.update(epoch=pos["epoch"] + 1, index=0)

    def one_epoch(self) -> Iterator[tuple[Any, dict[str, Any]]]:
        """The first epoch's `(batch, position after it)` pairs in this process, in order (evaluation; the
        position's skip tally counts the samples skipped so far)."""
        self.num_streams = 1
        for batch, position in self.stream_batches(0, None):
            yield batch, position
            if position["epoch"] > 0:
                return
