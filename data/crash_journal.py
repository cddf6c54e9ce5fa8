"""What a crash must not hide: the sample each data stream was processing when its process died.

A sample can kill its process where no `except` reaches it: a decoder that segfaults, an allocation the
OOM killer answers, a hang that ends at `data.timeout_s`. So before a stream decodes a sample it writes
(shard, key) into its own small file, `<output_dir>/data_journal/rank<r>-stream<s>.inflight`, and blanks
it when the sample is done. A record left behind names the sample in flight when the process died. At the
next start, before any worker runs, the main rank reads them all (`recover_crashed_samples`):

- a sample in flight at this crash and at the one before it (two attempts in a row) is blamed: it goes
  into `<output_dir>/crashed_samples.json`, the run's skip list, and is skipped from then on, counted as
  `crashed_run`. A resumed run replays the samples after its checkpoint, so a bad sample is met again;
- a sample in flight at this crash only is a suspect, retried once: a SIGKILL from outside, a preemption
  or a node failure leaves a record too, and one crash cannot tell them apart from a bad sample.

A clean stop leaves nothing: a Python exception is a skip (the record is blanked), and a DataLoader worker
that gets SIGTERM (the DataLoader's own shutdown, a scheduler's stop) blanks its record before it exits. A
worker that stops answering is killed after `data.timeout_s` (data/loader.py); the sample it was on is kept
as `rank<r>-stream<s>.stuck`, and counts like a crash.

The record is rewritten in place by one `pwrite`, without fsync: page-cache writes outlive the process
that made them, which is all a process crash needs. After a machine crash the file may hold an older
record; that counts once, like any suspect.

Fault injection: `ORDMOE_DATA_FAULT=<key>` makes the process that processes sample `key` SIGKILL itself
while the sample is in flight (a test's stand-in for a segfaulting decoder).
"""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from torch.utils.data import get_worker_info

FAULT_ENV = "ORDMOE_DATA_FAULT"
JOURNAL_DIR = "data_journal"
SKIP_LIST = "crashed_samples.json"
CRASHED = "crashed_run"  # the skip reason of a blamed sample
IN_FLIGHT, STUCK = ".inflight", ".stuck"


class SampleJournal:
    """One rank's side: the run's skip list (`crashed`), and the in-flight record of the stream it runs.

    Built in the training process and copied into each DataLoader worker, where `open(stream)` starts the
    stream's record; `begin` / `end` bracket each sample."""

    def __init__(self, output_dir: str | Path, rank: int = 0) -> None:
        self.output_dir, self.rank = Path(output_dir), rank
        self.directory = self.output_dir / JOURNAL_DIR
        self.crashed = {(e["shard"], e["key"]) for e in read_skip_list(self.output_dir)["skipped"]}
        self.fault = os.environ.get(FAULT_ENV) or None
        self._fd: int | None = None
        self._size = 0  # bytes the record file holds (a shorter record is padded with spaces)

    def path(self, stream: int, suffix: str = IN_FLIGHT) -> Path:
        return self.directory / f"rank{self.rank}-stream{stream}{suffix}"

    def open(self, stream: int) -> None:
        """Start stream `stream`'s record, in the process that runs it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._fd is not None:
            os.close(self._fd)
        self._fd, self._size = os.open(self.path(stream), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 0
        if get_worker_info() is not None:  # a DataLoader worker: a SIGTERM is a stop, not the sample's fault
            signal.signal(signal.SIGTERM, self._stop)

    def begin(self, shard: str, key: str) -> None:
        record = json.dumps({"shard": shard, "key": key, "pid": os.getpid()}).encode()
        os.pwrite(self._fd, record.ljust(self._size), 0)
        self._size = max(self._size, len(record))
        if key == self.fault:
            os.kill(os.getpid(), signal.SIGKILL)

    def end(self) -> None:
        os.pwrite(self._fd, b" " * self._size, 0)

    def keep_stuck(self, stream: int) -> dict[str, Any] | None:
        """The sample stream `stream` is on, kept as stuck (its worker is about to be killed); None if idle."""
        record = read_record(self.path(stream))
        if record is not None:
            self.path(stream, STUCK).write_text(json.dumps(record))
        return record

    def __getstate__(self) -> dict[str, Any]:  # a spawned worker opens its own record
        return {**self.__dict__, "_fd": None, "_size": 0}

    def _stop(self, signum: int, frame: Any) -> None:
        if self._fd is not None:
            self.end()
        os._exit(0)  # as torch's own worker SIGTERM handler: the DataLoader reports no dead worker


def read_record(path: Path) -> dict[str, Any] | None:
    """A journal file's record; None when blank (nothing in flight) or unreadable (a torn write: no blame)."""
    try:
        record = json.loads(path.read_bytes().strip() or b"null")
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and {"shard", "key"} <= set(record) else None


def read_skip_list(output_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """`crashed_samples.json`: `skipped` (blamed samples) and `suspects` (in flight at the last crash only)."""
    path = Path(output_dir) / SKIP_LIST
    if not path.is_file():
        return {"skipped": [], "suspects": []}
    try:
        state = json.loads(path.read_text())
        return {"skipped": list(state["skipped"]), "suspects": list(state["suspects"])}
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: unreadable skip list ({err}); fix or delete it (its samples are then "
                         f"retried)") from None


def recover_crashed_samples(output_dir: str | Path) -> list[dict[str, Any]]:
    """Read what the last attempt's journal files hold, update the skip list, blank the journal; returns
    one `crash_suspect` or `crashed_sample` event per sample found in flight. Call it on the main rank at
    start, before any stream runs."""
    output_dir = Path(output_dir)
    directory = output_dir / JOURNAL_DIR
    # a stuck worker's sample is in both files: its `.stuck` record says how it ended
    files = sorted(directory.glob(f"*{STUCK}")) + sorted(directory.glob(f"*{IN_FLIGHT}")) if directory.is_dir() else []
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in files:
        record = read_record(path)
        if record is not None:
            how = "stopped answering (data.timeout_s)" if path.suffix == STUCK else "its process died"
            found.setdefault((record["shard"], record["key"]), {"shard": record["shard"], "key": record["key"],
                                                                "stream": path.stem, "how": how})
    state = read_skip_list(output_dir)
    skipped = {(e["shard"], e["key"]) for e in state["skipped"]}
    previous = {(e["shard"], e["key"]) for e in state["suspects"]}
    events, suspects = [], []
    for sample, record in found.items():
        if sample in skipped:
            continue
        if sample in previous:
            state["skipped"].append({**record, "crashes": 2})
            events.append({"event": "crashed_sample", **record, "crashes": 2})
        else:
            suspects.append(record)
            events.append({"event": "crash_suspect", **record, "crashes": 1})
    if events or state["suspects"]:  # suspects are of the last crash only: a clean attempt clears them
        state["suspects"] = suspects
        _replace(output_dir / SKIP_LIST, json.dumps(state, indent=1))
    for path in files:
        path.unlink()
    return events


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all (a temp file beside it, fsync, rename)."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    with tmp.open("w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)
