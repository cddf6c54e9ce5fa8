"""DataLoader workers over resumable batch streams, with the position of every worker in the checkpoint.

A `ResumableStream` (shards, a mixture, a manifest) is split into `num_streams` independent streams,
one per DataLoader worker; stream `s` produces `(batch, position)` pairs, where `position` is the
state that resumes it right after that batch. Batches are collated in the workers (decoding and
collation run there, not in the training process), so the workers' read-ahead runs past what training
consumed: `StreamLoader` therefore records, per stream, the position that came *with* the last batch
it handed out, and the stream that comes next. DataLoader hands out batches round-robin over its
workers, so on resume worker `w` takes stream `(w + next_stream) % num_streams` and the order
continues exactly.

A worker that stops answering (a hung decoder, a stopped process) fails the run after `timeout_s` with a
`DataTimeoutError` that names the sample it was on; every worker is killed first, so none is left behind.
Every sample goes through `process_sample`: any exception skips it, counted by reason, and its stream's
`SampleJournal` (data/crash_journal.py) records it as in flight meanwhile, so a crash can be blamed on it.
"""
from __future__ import annotations

import atexit
import json
import os
import signal
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Protocol

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.crash_journal import CRASHED, SKIP_LIST, SampleJournal


class ResumableStream(Protocol):
    """What `StreamLoader` needs from a batch stream (ShardStream, MixtureStream, ManifestStream)."""

    kind: str
    num_streams: int  # set by StreamLoader: one stream per worker
    journal: SampleJournal | None  # the in-flight record of each stream, and the samples that crashed the run

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


def process_sample(work: Callable[[], Any], shard: str, key: str, skips: SkipTally,
                   journal: SampleJournal | None, where: str = "") -> Any | None:
    """`work()` (decode and process sample `key` of `shard`), or None when the sample is skipped: any
    exception, counted by its reason with a message naming the sample (prefixed by `where`), and without
    trying a sample of the run's crash list. Meanwhile `journal` holds the sample as in flight."""
    prefix = f"{where}: " if where else ""
    if journal is not None:
        if (shard, key) in journal.crashed:
            skips.add(CRASHED, f"{prefix}sample {key}: crashed the run (in flight when its process died, two "
                               f"attempts in a row; listed in {SKIP_LIST})")
            return None
        journal.begin(shard, key)
    try:
        return work()
    except Exception as err:  # noqa: BLE001 -- decoders and user data raise anything; the reason is tallied
        skips.add(skip_reason(err), prefix + describe_error(err, key))
        return None
    finally:
        if journal is not None:
            journal.end()


class DataTimeoutError(RuntimeError):
    """No batch came from a DataLoader worker within `data.timeout_s`; the run can resume."""


class _Watchdog:
    """A thread that calls `on_timeout` once when `since` (the start of a wait, None: not waiting) is more
    than `seconds` ago. `firing` is set first (`on_timeout` makes the waiting thread fail); `outcome()` waits
    for what `on_timeout` returned."""

    def __init__(self, seconds: float, on_timeout: Callable[[], str]) -> None:
        self.seconds, self.on_timeout = seconds, on_timeout
        self.since: float | None = None
        self.firing = False
        self._result = ""
        self._closed, self._fired = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._watch, name="data-timeout", daemon=True)
        self._thread.start()
        _LIVE_WATCHDOGS.add(self)

    def _watch(self) -> None:
        while not self._closed.wait(min(1.0, self.seconds / 4)):
            since = self.since
            if since is not None and time.monotonic() - since > self.seconds:
                self.firing = True
                try:
                    self._result = self.on_timeout()
                finally:
                    self._fired.set()
                return

    def outcome(self) -> str:
        self._fired.wait(30)
        return self._result

    def close(self) -> None:
        self._closed.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


# A daemon thread still running when the interpreter finalises is torn down by pthread_exit, which aborts
# the process through torch's C++ frames ("terminate called without an active exception", exit code 134):
# the watchdogs of streams nobody closed stop before that.
_LIVE_WATCHDOGS: weakref.WeakSet[_Watchdog] = weakref.WeakSet()
atexit.register(lambda: [watchdog.close() for watchdog in list(_LIVE_WATCHDOGS)])


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
        # no DataLoader timeout: its wait on the queue is not the only place a stopped worker can hold this
        # process (receiving a batch's tensors asks the sending worker for them); the watchdog covers all of it
        loader = DataLoader(workers, batch_size=None, collate_fn=_as_is, num_workers=self.num_workers,
                            prefetch_factor=self.prefetch_factor if self.num_workers else None,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            multiprocessing_context=self.start_method if self.num_workers else None)
        batches = iter(loader)
        watchdog = _Watchdog(self.timeout_s, lambda: self._kill_late_worker(batches, workers.start_stream)) \
            if self.timeout_s else None
        try:
            while True:
                if watchdog is not None:
                    watchdog.since = time.monotonic()
                try:
                    stream, batch, position = next(batches)
                except StopIteration:
                    return
                except Exception as err:  # noqa: BLE001 -- whatever the killed worker left the receiving end with
                    if watchdog is None or not watchdog.firing:
                        raise
                    raise self._stop_workers(batches, watchdog.outcome()) from err
                if watchdog is not None:
                    watchdog.since = None
                self.positions[stream] = position
                self.next_stream = (stream + 1) % self.num_streams
                yield batch
        finally:
            if watchdog is not None:
                watchdog.close()

    def _kill_late_worker(self, batches: Any, start_stream: int) -> str:
        """(Watchdog thread) Keep the sample the late worker is on, SIGKILL it (a stopped or hung process
        ignores anything else), and say which it was: the training process then gets an error at once."""
        stream = self.next_stream  # workers take turns, so the late one is the one whose stream comes next
        worker = (stream - start_stream) % self.num_streams
        journal = self.stream.journal
        sample = journal.keep_stuck(stream) if journal is not None else None
        process = batches._workers[worker]  # torch's own worker list: nothing public has the pids
        if process.is_alive():
            os.kill(process.pid, signal.SIGKILL)
        on = f" on sample {sample['key']} of {sample['shard']}" if sample else ""
        return f"DataLoader worker {worker} (data stream {stream}) stopped answering{on}"

    def _stop_workers(self, batches: Any, late: str) -> DataTimeoutError:
        """After a timeout: stop the other workers too (SIGKILL for any that does not stop, which would hang
        this process's exit), and say what happened."""
        processes = list(batches._workers)
        batches._shutdown_workers()  # unregisters them from torch's SIGCHLD check, stops the healthy ones
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGKILL)
            process.join(timeout=10)
        return DataTimeoutError(
            f"no batch in data.timeout_s={self.timeout_s:g} s: {late} (a hung decoder, a stopped process) and "
            f"was killed, with the other workers. The run is resumable from its last checkpoint; a sample that "
            f"stops a worker at two attempts in a row is skipped. Raise data.timeout_s if batches are just slow")

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
