"""A sample that kills its process, where no `except` can catch it, is named and after two crashes in a row
skipped; every other sample is still trained. The real CLI on a crafted shard; the kill is the data path's
fault point (`ORDMOE_DATA_FAULT=<key>` SIGKILLs the process processing that key, as a segfaulting decoder)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from data.crash_journal import CRASHED, FAULT_ENV, SKIP_LIST

ROOT = Path(__file__).resolve().parents[2]
KEYS = [f"s{i}" for i in range(9)]  # batches of 2 without shuffling: [s0 s1] [s2 s3] [s4 BAD] ...
BAD = "s5"


def write_shard(directory: Path) -> Path:
    directory.mkdir()
    image = io.BytesIO()
    Image.new("RGB", (56, 56), (20, 40, 200)).save(image, format="PNG")
    record = json.dumps({"conversation": [{"role": "user", "content": "<image>\nWhat colour?"},
                                          {"role": "assistant", "content": "Blue."}], "images": ["img0.png"]})
    with tarfile.open(directory / "shard-000000.tar", "w") as tar:
        for key in KEYS:
            for suffix, data in (("json", record.encode()), ("img0.png", image.getvalue())):
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (directory / "sizes.json").write_text(json.dumps({"shard-000000.tar": len(KEYS)}))
    return directory


def launch(config: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, FAULT_ENV: BAD, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tools.train", str(config), "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # three trainer launches: about 50 s of CPU (tests/data/test_crash_journal.py is the fast check)
@pytest.mark.parametrize("workers", [0, 1])
def test_a_sample_that_kills_the_process_is_skipped_after_two_crashes_in_a_row(tmp_path, workers):
    run = tmp_path / "run"
    config = {"model": str(ROOT / "configs/models/tiny-omni.yaml"), "steps": 4, "save_every": 1, "log_every": 1,
              "device": "cpu", "output_dir": str(run), "objective": {"name": "ntp"},
              "data": {"kind": "shards", "shards": str(write_shard(tmp_path / "shards")), "batch_size": 2,
                       "shuffle_buffer": 0, "num_workers": workers}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))

    first = launch(tmp_path / "train.yaml")  # dies in the sample: the whole trainer, or its DataLoader worker
    assert first.returncode != 0, first.stderr[-2000:]
    second = launch(tmp_path / "train.yaml")  # retried once (one crash may be a kill from outside), dies again
    assert second.returncode != 0 and f"data: sample {BAD} of " in second.stderr and "retried once" in second.stderr
    third = launch(tmp_path / "train.yaml")  # the fault point is still armed: only skipping the sample gets past it
    assert third.returncode == 0, third.stderr[-3000:]
    assert "skipped from now on" in third.stderr

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    named = [(r["event"], r["key"], Path(r["shard"]).name) for r in rows if r.get("event") in ("crash_suspect",
                                                                                                "crashed_sample")]
    assert named == [("crash_suspect", BAD, "shard-000000.tar"), ("crashed_sample", BAD, "shard-000000.tar")]
    skipped = [r for r in rows if r.get("event") == "skipped"][-1]
    assert skipped["by_reason"] == {CRASHED: 1} and f"sample {BAD}: crashed the run" in skipped["latest"]
    summary = json.loads(third.stdout[third.stdout.index('{\n "output_dir"'):])  # after the progress lines
    assert summary["skipped_by_reason"] == {CRASHED: 1}
    assert [e["key"] for e in json.loads((run / SKIP_LIST).read_text())["skipped"]] == [BAD]

    # every other sample trained: the epoch's one shard read whole, 4 batches of 2 = the 8 samples but BAD
    state = torch.load(run / "checkpoints/step-00000004/trainer.pt", weights_only=True)["data"]
    position = state["positions"]["0"]
    assert (position["epoch"], position["emitted"], position["yielded"]) == (0, len(KEYS), 4)
    assert position["skipped"] == {CRASHED: 1}
