"""One run per output directory: a second trainer is refused, a killed trainer's lock is taken over, a
crash and resume read as one run in metrics.jsonl, overwrite moves the old run aside."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tools import train
from training.run_dir import RunDirWarning
from training.run_log import RunLog, read_metrics

REPO = Path(__file__).resolve().parents[2]
TEXT = "configs/train/tiny-ordmoe-text.yaml"
SMALL = ["data.batch_size=2", "data.seq_len=16", "log_every=1", "--no-progress"]


@pytest.fixture(autouse=True)
def keep_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def wait_for_first_step(run: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the trainer holds the lock and has logged a step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-2000:]
        try:
            holder = json.loads((run / "run.lock").read_text() or "null")
            logged = any("loss" in row for row in read_metrics(run / "metrics.jsonl"))
        except (FileNotFoundError, ValueError):
            holder, logged = None, False
        if holder and holder["pid"] == process.pid and logged:
            return
        time.sleep(0.5)
    raise AssertionError("the first trainer never logged a step")


def test_second_trainer_is_refused_and_a_killed_trainers_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "tools.train", TEXT, "steps=100000", *SMALL, f"output_dir={run}"],
                             cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_first_step(run, first)
        capsys.readouterr()
        assert train.main([TEXT, "steps=2", *SMALL, f"output_dir={run}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and TEXT in err and "output_dir" in err
        assert f"pid {first.pid} on {socket.gethostname()}" in err and f"pid {os.getpid()}" in err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    with pytest.warns(RunDirWarning, match=f"taking over the lock of pid {first.pid}"):
        assert train.main([TEXT, "steps=2", *SMALL, f"output_dir={run}"]) == 0
    start = [r for r in read_metrics(run / "metrics.jsonl") if r.get("event") in ("start", "resume") and "attempt" in r]
    assert start[-1]["took_over_lock_of"]["pid"] == first.pid and start[-1]["mode"] == "restart"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2]
    assert any("loss" in r and r["replayed_by_attempt"] == 2 for r in read_metrics(run / "metrics.replayed.jsonl"))


def test_crash_resume_reads_as_one_run_and_overwrite_moves_the_old_run_aside(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = [TEXT, *SMALL, "save_every=2", f"output_dir={run}"]
    real_log = RunLog.log

    def crash_after_step_5(self, step, metrics):
        real_log(self, step, metrics)
        if step == 5 and "loss" in metrics:
            raise RuntimeError("simulated node failure")

    monkeypatch.setattr(RunLog, "log", crash_after_step_5)
    with pytest.raises(RuntimeError, match="simulated node failure"):
        train.main([*argv, "steps=6"])
    monkeypatch.setattr(RunLog, "log", real_log)
    assert train.main([*argv, "steps=6"]) == 0  # resumes from step 4: step 5 is replayed
    assert train.main([*argv, "steps=7"]) == 0  # steps may change on resume
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6, 7]
    events = [(r["event"], r["step"], r["attempt"]) for r in rows if "attempt" in r]
    assert events == [("start", 0, 1), ("resume", 4, 2), ("resume", 6, 3)]
    replayed = read_metrics(run / "metrics.replayed.jsonl")
    assert [(r["step"], r["replayed_by_attempt"]) for r in replayed if "loss" in r] == [(5, 2)]

    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    with pytest.warns(RunDirWarning, match="moved the previous run"):
        assert train.main([TEXT, *SMALL, "steps=1", "resume=false", "overwrite=true", f"output_dir={run}"]) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.replaced-")]
    assert len(aside) == 1 and sorted(p.name for p in (aside[0] / "checkpoints").iterdir()) == before
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss" in r] == [1] and rows[0]["attempt"] == 1
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    assert json.loads((run / "run.json").read_text())["train_config"]["steps"] == 1
