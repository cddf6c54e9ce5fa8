"""Checkpoint faults through the real trainer: SIGKILL at every point of a write, damaged files, a full
disk, a diverging run. Each row states the fault and what must follow; "exact" means the relaunch ends
with the same bytes of weights, engine state, data position and RNG as an uninterrupted run."""
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from data.tokenizer import CORPUS, train_tokenizer
from tools.train import main as train_cli
from training import checkpoint as ckpt
from training.checkpoint import (CheckpointError, CheckpointWarning, DiskFullError, latest_checkpoint,
                                 verify_checkpoint)

REPO = Path(__file__).resolve().parents[2]
CONFIG = "configs/train/tiny-ordmoe-text.yaml"
STEPS = 3


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(CORPUS, tmp_path_factory.mktemp("tokenizer") / "tokenizer.json", vocab_size=512)


def _argv(run: Path, tokenizer: Path, *extra: str) -> list[str]:
    return [CONFIG, f"output_dir={run}", f"steps={STEPS}", "save_every=1", "keep_checkpoints=1",
            "deterministic=true", "log_every=1", "data.seq_len=16", "data.batch_size=2", f"data.tokenizer={tokenizer}",
            "optim.warmup_steps=1", *extra, "--no-progress"]


@pytest.fixture(autouse=True)
def restore_determinism():
    """`deterministic: true` flips a process-wide switch; put it back for the other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tokenizer):
    """The uninterrupted run, every checkpoint kept: step -> checkpoint directory."""
    before = torch.are_deterministic_algorithms_enabled()
    run = tmp_path_factory.mktemp("reference") / "run"
    assert train_cli(_argv(run, tokenizer, f"keep_checkpoints={STEPS}")) == 0
    torch.use_deterministic_algorithms(before)
    return {step: run / "checkpoints" / f"step-{step:08d}" for step in range(1, STEPS + 1)}


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def assert_exact(checkpoint: Path, expected: Path) -> None:
    """Every file of the two checkpoints holds the same values (meta.json aside: times and sequences)."""
    names = sorted(verify_checkpoint(checkpoint)["files"])
    assert names == sorted(verify_checkpoint(expected)["files"])
    for name in names:
        if name.endswith(".safetensors"):
            same = _same(load_file(str(checkpoint / name)), load_file(str(expected / name)))
        elif name.endswith(".pt"):
            same = _same(torch.load(checkpoint / name, weights_only=True), torch.load(expected / name, weights_only=True))
        else:
            continue  # model_config.yaml, tokenizer.json ...: written from the same inputs
        assert same, f"{checkpoint.name}/{name} differs from the uninterrupted run"


# point (and step) the write is killed at -> the checkpoint a relaunch resumes from (None: from scratch)
KILLS = [
    pytest.param("tmp_created@2", 1, marks=pytest.mark.slow),
    pytest.param("weights_written@2", 1, marks=pytest.mark.slow),
    pytest.param("trainer_state_written@2", 1, marks=pytest.mark.slow),
    pytest.param("meta_written@2", 1),  # everything written but not renamed: the temp dir is ignored, then removed
    pytest.param("renamed@2", 1),  # step 2 complete in place, `latest` still names step 1: the commit point
    pytest.param("latest_updated@2", 2, marks=pytest.mark.slow),
    pytest.param("pruning@2", 2, marks=pytest.mark.slow),  # step 1 half deleted (moved aside first)
    pytest.param("weights_written@1", None, marks=pytest.mark.slow),  # the first write: nothing to resume
]


@pytest.mark.parametrize("fault, resumes_from", KILLS)
def test_sigkill_inside_a_checkpoint_write_then_relaunch_is_exact(tmp_path, tokenizer, reference, fault,
                                                                  resumes_from):
    run = tmp_path / "run"
    argv = _argv(run, tokenizer)
    killed = subprocess.run([sys.executable, "-m", "tools.train", *argv], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, ckpt.FAULT_ENV: fault}, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    found = latest_checkpoint(run)
    if resumes_from is None:
        assert found is None
    else:
        assert found.name == f"step-{resumes_from:08d}"
        assert_exact(found, reference[resumes_from])

    assert train_cli(argv) == 0  # the same command again
    final = latest_checkpoint(run)
    assert final.name == f"step-{STEPS:08d}"
    assert_exact(final, reference[STEPS])
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")] == []  # stale dirs removed


def test_a_truncated_file_in_the_latest_checkpoint_falls_back_and_stays_exact(tmp_path, tokenizer, reference):
    run = tmp_path / "run"
    argv = _argv(run, tokenizer, "keep_checkpoints=2")
    assert train_cli(argv) == 0
    weights = run / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.warns(CheckpointWarning, match=rf"step-{STEPS:08d}/model.safetensors has 1000 bytes.*"
                                               rf"resuming from .*step-{STEPS - 1:08d}"):
        assert train_cli(argv) == 0  # replays the last step from the previous checkpoint
    assert_exact(latest_checkpoint(run), reference[STEPS])


def test_latest_pointing_outside_the_run_is_refused(tmp_path, tokenizer):
    run = tmp_path / "run"
    argv = _argv(run, tokenizer, "steps=1")
    assert train_cli(argv) == 0
    outside = tmp_path / "elsewhere"
    shutil.copytree(run / "checkpoints" / "step-00000001", outside)
    (run / "checkpoints" / "latest").write_text(f"../../{outside.name}")
    with pytest.raises(CheckpointError, match=r"names '../../elsewhere'.*refusing to follow it"):
        train_cli(_argv(run, tokenizer, "steps=2"))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, tokenizer, monkeypatch):
    """The weights writer fails half-way at step 2, as safetensors does on a full disk."""
    real = ckpt.save_model
    calls = {"n": 0}

    def filling(model, filename, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(filename).write_bytes(b"\0" * 4096)  # the part that fitted
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(model, filename, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_model", filling)
    run = tmp_path / "run"
    with pytest.raises(DiskFullError, match=f"no space left on {run / 'checkpoints'}"):
        train_cli(_argv(run, tokenizer))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000001"]
    assert latest_checkpoint(run).name == "step-00000001"


def test_a_diverging_run_never_checkpoints_non_finite_weights_and_keeps_the_last_healthy_one(tmp_path, tokenizer):
    """lr 1e30: step 1 blows the weights up, every later gradient is non-finite and skipped until the run
    stops. The checkpoints of skipped steps are marked not finite, so pruning (keep 1) keeps step 1."""
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="NaN"):
        train_cli(_argv(run, tokenizer, "steps=8", "optim.lr=1.0e+30", "optim.grad_clip=0"))
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-00000001", "step-00000005"]
    for checkpoint in checkpoints:
        weights = load_file(str(checkpoint / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in weights.values()), f"{checkpoint.name} holds NaN/Inf"
    assert [verify_checkpoint(c)["finite"] for c in checkpoints] == [True, False]
