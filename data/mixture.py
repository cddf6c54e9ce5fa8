"""Resampled mode: an endless weighted mixture of shard datasets (image-text, text-only, audio, video, ...).

Each stream (one per rank and DataLoader worker) owns a seeded `random.Random`: for every sample it
draws a dataset by weight, then takes that dataset's next sample from the shard it has open, opening
a uniformly drawn shard (with replacement, as webdataset's `resampled=True`) when the open one runs
out. Streams are seeded by (seed, rank, worker), so they draw independently; there are no epochs,
only nominal ones (samples drawn / samples in all datasets).

The position is the generator's state plus, per dataset, the open shard and how many of its samples
were emitted: a restart continues the same draws, exactly.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from data.batching import make_batcher
from data.crash_journal import SampleJournal
from data.loader import SkipTally
from data.pipeline import MediaLimits, ShardReader, list_shards, media_limits, process_group, read_sizes


@dataclass
class MixtureSource:
    """One dataset of a mixture: a directory (or brace pattern of URLs) of shards and its sampling weight
    (any positive scale)."""

    name: str
    shards: str
    weight: float = 1.0


class MixtureStream:
    """Endless batches drawn from weighted shard datasets; see the module docstring."""

    kind = "mixture"

    def __init__(self, sources: list[MixtureSource], process: Callable[[dict], Any], collate: Callable[[list], Any],
                 batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle_buffer: int = 0,
                 pack_length: int | None = None, pad_id: int = 0, limits: MediaLimits | None = None,
                 journal: SampleJournal | None = None) -> None:
        self.num_streams = 1  # StreamLoader sets one stream per DataLoader worker
        self.limits = limits if limits is not None else media_limits(process)
        self.journal = journal
        if not sources:
            raise ValueError("a mixture needs at least one dataset")
        names = [s.name for s in sources]
        if len(set(names)) != len(names):
            raise ValueError(f"mixture dataset names must be unique, got {names}")
        for source in sources:
            if not source.weight > 0:
                raise ValueError(f"mixture dataset {source.name!r}: weight must be > 0, got {source.weight}")
        self.sources = sources
        self.shards = {s.name: list_shards(s.shards) for s in sources}
        sizes = [read_sizes(s.shards, self.shards[s.name]) for s in sources]
        self.sizes = {s.name: size for s, size in zip(sources, sizes)}  # None for remote shards
        self.total_samples = None if None in sizes else sum(map(sum, sizes))  # None: remote shards, no epochs
        self.process, self.collate, self.batch_size = process, collate, batch_size
        self.seed, self.rank, self.world_size, self.shuffle_buffer = seed, rank, world_size, shuffle_buffer
        self.pack_length, self.pad_id = pack_length, pad_id

    def identity(self) -> dict[str, Any]:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size,
                "shuffle_buffer": self.shuffle_buffer, "packed": self.pack_length is not None,
                "datasets": {s.name: [str(s.shards), s.weight] for s in self.sources}}

    def validate(self) -> None:
        """Any number of workers can draw from a mixture: each has its own generator."""

    def epoch_of(self, position: dict[str, Any]) -> int:
        if not self.total_samples:
            return 0
        return sum(position.get("drawn", {}).values()) // self.total_samples

    def stream_batches(self, stream: int, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        rng = random.Random(f"{self.seed}/{self.rank}/{stream}")  # string seeds hash deterministically
        if position is not None:
            version, state, gauss = position["rng"]
            rng.setstate((version, tuple(state), gauss))
        drawn, skips = Counter((position or {}).get("drawn", {})), SkipTally(position)
        if self.journal is not None:
            self.journal.open(stream)
        # dataset name -> [open shard, its shuffle seed, samples emitted from it]
        open_shards = {name: list(entry) for name, entry in (position or {}).get("open", {}).items()}
        shard_readers: dict[str, ShardReader] = {}
        readers: dict[str, Iterator[dict[str, Any]]] = {}

        def open_reader(name: str) -> None:
            shard, shard_seed, emitted = open_shards[name]
            sizes = self.sizes[name]
            shard_readers[name] = ShardReader(self.shards[name][shard], shard_seed, self.shuffle_buffer,
                                              expected=sizes[shard] if sizes else None)
            readers[name] = shard_readers[name].groups(emitted)

        for name in open_shards:
            open_reader(name)
        weights = [s.weight for s in self.sources]
        batcher = make_batcher(self.collate, self.batch_size, self.pack_length, self.pad_id)

        def snapshot() -> dict[str, Any]:
            version, state, gauss = rng.getstate()
            return {"rng": [version, list(state), gauss], "open": {k: list(v) for k, v in open_shards.items()},
                    "drawn": dict(drawn), **skips.state()}

        def next_group(name: str) -> dict[str, Any]:
            for _ in range(2 * len(self.shards[name]) + 8):  # bounded: a dataset of only broken shards fails loudly
                if name in readers:
                    group = next(readers[name], None)
                    if group is not None:
                        open_shards[name][2] += 1
                        return group
                    for reason, message, lost in shard_readers[name].report():
                        skips.add(reason, f"{name}: {message}", lost)
                    del readers[name], open_shards[name]
                open_shards[name] = [rng.randrange(len(self.shards[name])), rng.getrandbits(62), 0]
                open_reader(name)
            source = next(s.shards for s in self.sources if s.name == name)
            raise ValueError(f"mixture dataset {name!r}: no readable sample in {len(self.shards[name])} shard(s) of "
                             f"{source}")

        while True:
            before = snapshot()
            name = rng.choices(self.sources, weights)[0].name
            group = next_group(name)
            drawn[name] += 1
            example = process_group(group, self.process, self.limits, skips, self.journal)
            if example is None:
                continue
            if not batcher.fits(example):
                yield batcher.flush(), before
            batcher.add(example)
            if batcher.full:
                yield batcher.flush(), snapshot()
