"""A DataLoader worker that stops answering (SIGSTOP) fails the real trainer after data.timeout_s with one line
that names the knob and says the run is resumable; no hang, and the stopped worker is killed, not orphaned."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from data.demo_data import build_demo_data

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 3
SLACK_S = 30  # the DataLoader's own shutdown waits 5 s for the stopped worker; the rest is a busy machine


@pytest.mark.slow  # one trainer launch, 20-40 s on a shared CPU
def test_a_stopped_worker_fails_the_run_after_timeout_s_and_is_killed(tmp_path):
    shards = build_demo_data(tmp_path / "demo", samples_per_kind=6)["train_shards"]
    run = tmp_path / "run"
    config = {"model": str(ROOT / "configs/models/tiny-omni.yaml"), "steps": 10_000, "save_every": 0,
              "log_every": 1, "device": "cpu", "output_dir": str(run), "objective": {"name": "ntp"},
              "data": {"kind": "shards", "shards": str(shards), "batch_size": 1, "num_workers": 1,
                       "timeout_s": TIMEOUT_S}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    trainer = subprocess.Popen([sys.executable, "-m", "tools.train", str(tmp_path / "train.yaml"), "--no-progress"],
                               cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        metrics = run / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.is_file() and any("loss" in json.loads(line) for line in metrics.read_text().splitlines())):
            assert trainer.poll() is None and time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.5)
        (worker,) = psutil.Process(trainer.pid).children()  # the one DataLoader worker
        worker.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        _, stderr = trainer.communicate(timeout=TIMEOUT_S + SLACK_S)  # a hang fails here
    finally:
        if trainer.poll() is None:
            os.killpg(trainer.pid, signal.SIGKILL)
            trainer.wait()
    assert trainer.returncode != 0
    assert time.monotonic() - stopped < TIMEOUT_S + SLACK_S
    last = stderr.strip().splitlines()[-1]
    assert "data.timeout_s=3 s" in last and "resumable" in last and "worker 0" in last, stderr[-2000:]
    assert not psutil.pid_exists(worker.pid) or worker.status() == psutil.STATUS_ZOMBIE  # killed, not orphaned
