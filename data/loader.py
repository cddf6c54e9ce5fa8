"""DataLoader workers over resumable batch streams, with the position of every worker in the checkpoint.

A `ResumableStream` (shards, a mixture, a manifest) is split into `num_streams` independent streams,
one per DataLoader worker; stream `s` produces `(batch, position)` pairs, where `position` is the
state that resumes it right after that batch. Batches are collated in the workers (decoding and
collation run there, not in the training process), so the workers' read-ahead runs past what training
consumed: `StreamLoader` therefore records, per stream, the position that came *with* the last batch
it handed out, and the stream that comes next. DataLoader hands out batches round-robin over its
workers, so on resume worker `w` takes stream `(w + next_stream) % num_streams` and the order
continues exactly.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader, IterableDataset, get_worker_info


class ResumableStream(Protocol):
    """What `StreamLoader` needs from a batch stream (ShardStream, MixtureStream, ManifestStream)."""

    kind: str
    num_streams: int  # set by StreamLoader: one stream per worker

    def stream_batches(self, stream: int, position: dict[str, Any] | None) -> Iterator[tuple[Any, dict[str, Any]]]:
        """`(batch, position after it)` pairs of stream `stream`, from `position` (None: the start)."""

    def identity(self) -> dict[str, Any]:
        """What must not change between a checkpoint and its resume (seed, ranks, datasets)."""

    def validate(self) -> None:
        """Raise a clear error when this stream cannot feed `num_streams` workers."""

    def epoch_of(self, position: dict[str, Any]) -> int:
        """The epoch a stream's position is in."""


class SkipTally:
    """Bad samples one stream skipped: counts by reason, and the latest reason in full (it names the sample).

    Its `state()` is part of the stream's position, which is how `StreamLoader` reports skips from workers.
    """

    def __init__(self, position: dict[str, Any] | None = None) -> None:
        position = position or {}
        self.counts: Counter[str] = Counter(position.get("skipped", {}))
        self.last, self.last_at = position.get("last_skip", ""), position.get("last_skip_at", -1.0)

    def add(self, reason: str, detail: str, count: int = 1) -> None:
        """`count` samples lost for `reason` (a damaged shard may lose several at once)."""
        self.counts[reason] += count
        self.last, self.last_at = detail, time.time()

    def state(self) -> dict[str, Any]:
        return {"skipped": dict(self.counts), "last_skip": self.last, "last_skip_at": self.last_at}

    def __str__(self) -> str:
        return f"{dict(self.counts)} skipped; latest: {self.last or '-'}"


def skip_reason(err: BaseException) -> str:
    """The tally key of a skipped sample: the `reason` our errors carry (also when wrapped, e.g. a MediaError
    inside the processor's ProcessorError), else the exception type."""
    if isinstance(err, json.JSONDecodeError):
        return "bad_json"
    if isinstance(err, UnicodeDecodeError):  # its own `reason` attribute is the codec's message
        return "bad_text_encoding"
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(getattr(seen, "reason", None), str) and not isinstance(seen, UnicodeError):
            return seen.reason
        seen = seen.__cause__ or seen.__context__
    return type(err).__name__


def describe_error(err: BaseException, key: str) -> str:
    """A skip message that names the sample (most of our errors already do) and, when unknown, the error type."""
    detail = str(err) or type(err).__name__
    return detail if key in detail else f"sample {key}: {type(err).__name__}: {detail}"


class _WorkerStreams(IterableDataset):
    """The IterableDataset DataLoader runs: each worker takes its stream and tags batches with positions."""

    def __init__(self, source: ResumableStream, start_stream: int, positions: dict[int, dict[str, Any]]) -> None:
        super().__init__()
        self.source, self.start_stream, self.positions = source, start_stream, positions

    def __iter__(self) -> Iterator[tuple[int, Any, dict[str, Any]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = (worker + self.start_stream) % workers
        for batch, position in self.source.stream_batches(stream, self.positions.get(stream)):
            yield stream, batch, position


def _as_is(item: Any) -> Any:
    return item  # batches are collated in the workers already


class StreamLoader:
    """Batches of a `ResumableStream` through `num_workers` DataLoader workers (0: in this process)."""

    def __init__(self, stream: ResumableStream, num_workers: int = 0, prefetch_factor: int = 2,
                 pin_memory: bool = False, timeout_s: float = 0, start_method: str | None = None) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.stream, self.num_workers = stream, num_workers
        self.prefetch_factor, self.pin_memory = prefetch_factor, pin_memory
        self.timeout_s = timeout_s if num_workers else 0  # a stuck worker (e.g. a hung decoder) fails the run
        self.start_method = start_method  # None: the platform's default (fork on Linux, spawn on macOS)
        self.num_streams = stream.num_streams = max(1, num_workers)
        self.positions: dict[int, dict[str, Any]] = {}
        self.next_stream = 0

    def __iter__(self) -> Iterator[Any]:
        self.stream.num_streams = self.num_streams
        self.stream.validate()
        workers = _WorkerStreams(self.stream, self.next_stream, dict(self.positions))
        loader = DataLoader(workers, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=self.pin_memory, persistent_workers=False, timeout=self.timeout_s,
                            multiprocessing_context=self.start_method if self.num_workers else None)
        batches = iter(loader)
        while True:
            try:
                stream, batch, position = next(batches)
            except StopIteration:
                return
            except RuntimeError as err:
                if "timed out" not in str(err):
                    raise
                raise RuntimeError(f"no batch from data stream {self.next_stream} in {self.timeout_s:g} s: a sample "
                                   f"may have hung its decoder; the run can resume from its last checkpoint "
                                   f"(raise data.timeout_s if batches are just slow)") from err
            self.positions[stream] = position
            self.next_stream = (stream + 1) % self.num_streams
            yield batch

    @property
    def epoch(self) -> float:
        """The epoch of the stream furthest behind (every sample of earlier epochs has been seen)."""
        return min((self.stream.epoch_of(p) for p in self.positions.values()), default=0)

    @property
    def skipped(self) -> Counter[str]:
        """Bad samples skipped so far, by reason, over all streams."""
        total: Counter[str] = Counter()
        for position in self.positions.values():
            total.update(position.get("skipped", {}))
        return total

    @property
    def last_skip(self) -> str:
        """The most recent skip reason in full (it names the sample and shard)."""
        latest = max(self.positions.values(), key=lambda p: p.get("last_skip_at", -1), default={})
        return latest.get("last_skip", "")

    def mixture_shares(self) -> dict[str, float]:
        """Share of the samples drawn from each dataset so far, over all streams (mixtures; else empty)."""
        drawn: Counter[str] = Counter()
        for position in self.positions.values():
            drawn.update(position.get("drawn", {}))
        total = sum(drawn.values())
        return {name: count / total for name, count in sorted(drawn.items())} if total else {}

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.stream.kind, "num_streams": self.num_streams, "next_stream": self.next_stream,
                "positions": {str(k): v for k, v in self.positions.items()}, **self.stream.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        expected = {"kind": self.stream.kind, "num_streams": self.num_streams, **self.stream.identity()}
        for key, value in expected.items():
            if state.get(key) != value:
                hint = " (data.num_workers)" if key == "num_streams" else ""
                raise ValueError(f"data {key}{hint} changed since the checkpoint ({state.get(key)} -> {value}): "
                                 f"the saved stream positions would not resume exactly")
        self.positions = {int(k): v for k, v in state["positions"].items()}
        self.next_stream = int(state["next_stream"])
