"""The crash journal: a sample in flight when its process died is a suspect; in flight at two crashes in a row
it is skipped, counted as `crashed_run`. A clean stop (an exception, a worker's SIGTERM) blames nothing, and a
worker that stops answering leaves its sample as stuck."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time
from itertools import islice

import pytest

from data.crash_journal import CRASHED, FAULT_ENV, SampleJournal, read_skip_list, recover_crashed_samples
from data.loader import DataTimeoutError, StreamLoader
from data.manifest import ManifestStream

SOURCE = "m.jsonl"
ITEMS = [{"id": f"m{i}"} for i in range(6)]


def stream(output_dir, process=lambda sample: sample["id"]) -> ManifestStream:
    return ManifestStream(ITEMS, process, list, 1, shuffle=False, journal=SampleJournal(output_dir), source=SOURCE)


def read_epoch(output_dir) -> list[str]:
    return [batch[0] for batch in islice(StreamLoader(stream(output_dir)), len(ITEMS) - 1)]


def attempt(output_dir) -> int:
    """One attempt in a forked process (the fault point SIGKILLs it); its exit code."""
    process = multiprocessing.get_context("fork").Process(target=read_epoch, args=(output_dir,))
    process.start()
    process.join(60)
    return process.exitcode


def events(output_dir) -> list[tuple[str, str]]:
    return [(e["event"], e["key"]) for e in recover_crashed_samples(output_dir)]


def test_a_sample_that_kills_its_process_twice_in_a_row_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "m3")
    assert attempt(tmp_path) == -signal.SIGKILL
    assert events(tmp_path) == [("crash_suspect", "m3")]  # one crash: maybe a kill from outside; retried
    assert attempt(tmp_path) == -signal.SIGKILL
    assert events(tmp_path) == [("crashed_sample", "m3")]
    assert [(e["shard"], e["key"]) for e in read_skip_list(tmp_path)["skipped"]] == [(SOURCE, "m3")]
    loader = StreamLoader(stream(tmp_path))  # the fault point is still armed: the sample is never tried
    assert [batch[0] for batch in islice(loader, 5)] == ["m0", "m1", "m2", "m4", "m5"]
    assert loader.skipped == {CRASHED: 1} and "sample m3: crashed the run" in loader.last_skip
    assert events(tmp_path) == []


def test_only_crashes_in_a_row_blame_a_sample(tmp_path):
    journal = SampleJournal(tmp_path)
    journal.open(0)
    journal.begin(SOURCE, "m1")  # left in flight: a crash
    assert events(tmp_path) == [("crash_suspect", "m1")]
    assert events(tmp_path) == []  # an attempt that ended cleanly: the suspect is cleared
    journal.open(0)
    journal.begin(SOURCE, "m1")
    assert events(tmp_path) == [("crash_suspect", "m1")]  # not two in a row
    journal.open(0)
    journal.begin(SOURCE, "m1")
    journal.end()
    journal.begin(SOURCE, "m2")  # a shorter record over a longer one
    assert events(tmp_path) == [("crash_suspect", "m2")]


def test_exceptions_and_a_workers_sigterm_blame_nothing(tmp_path):
    def terminated_in_m2(sample):
        if sample["id"] == "m1":
            raise ValueError("bad sample")  # a skip: the record is blanked
        if sample["id"] == "m2":
            os.kill(os.getpid(), signal.SIGTERM)  # a stop (the DataLoader's shutdown, a scheduler) mid-sample
        return sample["id"]

    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(islice(StreamLoader(stream(tmp_path, terminated_in_m2), num_workers=1), 5))
    assert events(tmp_path) == []


def test_a_worker_killed_mid_sample_leaves_it_in_flight(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "m2")
    with pytest.raises(RuntimeError, match="DataLoader worker .* exited unexpectedly"):
        list(islice(StreamLoader(stream(tmp_path), num_workers=1), 5))
    assert events(tmp_path) == [("crash_suspect", "m2")]


def test_a_worker_that_stops_answering_is_killed_and_its_sample_kept_as_stuck(tmp_path):
    def hangs_in_m2(sample):
        if sample["id"] == "m2":
            time.sleep(30)  # a hang: the worker is killed in it
        return sample["id"]

    loader = StreamLoader(stream(tmp_path, hangs_in_m2), num_workers=1, timeout_s=1)
    late = f"data.timeout_s=1 s: DataLoader worker 0 .* stopped answering on sample m2 of {SOURCE}"
    with pytest.raises(DataTimeoutError, match=late):
        list(islice(loader, 5))
    assert [(e["event"], e["key"], e["how"]) for e in recover_crashed_samples(tmp_path)] == [
        ("crash_suspect", "m2", "stopped answering (data.timeout_s)")]
