"""The atomic checkpoint writer: verified, pruned by write order, refused when damaged or foreign."""
import errno
import json
import os
import random
import threading

import numpy as np
import pytest
import torch
from torch import nn

from training import checkpoint as ckpt
from training.checkpoint import (CheckpointError, CheckpointWarning, DiskFullError, NonFiniteWeightsError,
                                 check_world_size, latest_checkpoint, load_model_weights, load_rng_state, read_meta,
                                 resolve_checkpoint, save_checkpoint, save_rng_state, verify_checkpoint, write_atomic,
                                 write_trainer_state, write_weights)


def _model(value: float = 0.5) -> nn.Module:
    model = nn.Linear(4, 3)
    nn.init.constant_(model.weight, value)
    return model


def _writer(model: nn.Module, step: int):
    def write(directory):
        write_weights(directory, model)
        write_trainer_state(directory, {"step": step, "data": {"position": torch.tensor([step])}})
        save_rng_state(directory, rank=0)
    return write


def _save(run, step, keep=2, finite=True, value=0.5, **kwargs):
    return save_checkpoint(run, step, _writer(_model(value), step), {"note": "test"}, keep, finite=finite, **kwargs)


def _names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_a_checkpoint_records_every_file_and_loads_back(tmp_path):
    path = _save(tmp_path, 3, value=0.25)
    assert latest_checkpoint(tmp_path) == path == resolve_checkpoint(tmp_path) == resolve_checkpoint(path)
    meta = verify_checkpoint(path)
    assert meta["step"] == 3 and meta["finite"] is True and meta["world_size"] == 1 and meta["note"] == "test"
    assert sorted(meta["files"]) == ["model.safetensors", "rng-rank0.pt", "trainer.pt"]
    assert meta["files"]["model.safetensors"]["size"] == (path / "model.safetensors").stat().st_size
    model = _model(0.0)
    load_model_weights(path, model)
    assert torch.equal(model.weight, torch.full((3, 4), 0.25))
    assert torch.load(path / "trainer.pt", weights_only=True)["step"] == 3
    assert _names(tmp_path) == ["latest", "step-00000003"]  # no temporary directory left


def test_a_run_without_checkpoints_has_no_latest(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    (tmp_path / "checkpoints").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_pruning_follows_write_order_not_step_numbers(tmp_path):
    """An older run's higher steps (resume=false leftovers) are pruned first; the new checkpoint never is."""
    for step in (8, 9):
        _save(tmp_path, step)
    for step in (1, 2, 3):
        latest = _save(tmp_path, step)
        assert latest_checkpoint(tmp_path) == latest and latest.is_dir()
    assert _names(tmp_path) == ["latest", "step-00000002", "step-00000003"]
    assert [read_meta(tmp_path / "checkpoints" / n)["sequence"] for n in _names(tmp_path)[1:]] == [4, 5]


def test_pruning_keeps_the_newest_finite_checkpoint(tmp_path):
    _save(tmp_path, 1)
    for step in (2, 3, 4):
        _save(tmp_path, step, keep=1, finite=False)
    assert _names(tmp_path) == ["latest", "step-00000001", "step-00000004"]


def test_non_finite_weights_are_never_written(tmp_path):
    previous = _save(tmp_path, 1)
    model = _model()
    with torch.no_grad():
        model.bias[1] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="'bias' holds NaN or Inf"):
        save_checkpoint(tmp_path, 2, _writer(model, 2), {}, keep=1)
    assert _names(tmp_path) == ["latest", "step-00000001"] and latest_checkpoint(tmp_path) == previous


@pytest.mark.parametrize("pointer", ["../elsewhere", "/tmp/step-00000001", "step-00000001/../../x", "a/step-1",
                                     "", "latest", "step-00000001\n../x", ".tmp-step-00000002.host.1"])
def test_latest_must_name_a_sibling_checkpoint(tmp_path, pointer):
    _save(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").write_text(pointer)
    with pytest.raises(CheckpointError, match="refusing to follow it"):
        latest_checkpoint(tmp_path)


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _flip_a_byte(path):
    data = bytearray((path / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(data))


# damage done to the newest checkpoint -> the text the fallback warning names
DAMAGE = {
    "truncated weights": (_truncate, r"step-00000002/model.safetensors has \d+ bytes, meta.json recorded \d+"),
    "flipped byte": (_flip_a_byte, r"step-00000002/model.safetensors does not match the SHA-256"),
    "missing trainer state": (lambda p: (p / "trainer.pt").unlink(), r"step-00000002/trainer.pt is missing"),
    "missing rng": (lambda p: (p / "rng-rank0.pt").unlink(), r"step-00000002/rng-rank0.pt is missing"),
    "torn meta": (lambda p: (p / "meta.json").write_text('{"step": 2, "fi'), r"step-00000002/meta.json is unreadable"),
    "meta without files": (lambda p: (p / "meta.json").write_text('{"step": 2}'), r"lists no files"),
    "directory gone": (lambda p: [f.unlink() for f in p.iterdir()] and p.rmdir(), r"step-00000002 is missing"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    previous = _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    hurt, named = DAMAGE[damage]
    hurt(newest)
    with pytest.warns(CheckpointWarning, match=named):
        assert latest_checkpoint(tmp_path) == previous


def test_a_missing_pointer_falls_back_to_the_newest_written(tmp_path):
    _save(tmp_path, 5)
    newest = _save(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest").unlink()
    with pytest.warns(CheckpointWarning, match="latest is missing"):
        assert latest_checkpoint(tmp_path) == newest


def test_nothing_valid_is_a_clear_error(tmp_path):
    for step in (1, 2):
        _truncate(_save(tmp_path, step))
    with pytest.raises(CheckpointError, match=r"no valid checkpoint in .*step-00000002/model.safetensors.*"
                                              r"step-00000001/model.safetensors"):
        latest_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="step-00000001/model.safetensors has"):
        resolve_checkpoint(tmp_path / "checkpoints" / "step-00000001")


def _full_disk_in_weights(directory):
    (directory / "model.safetensors").write_bytes(b"partial")
    raise OSError(errno.ENOSPC, "No space left on device")


def _full_disk_in_safetensors(directory):
    raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")


class _FullFile:
    """A file that takes 100 bytes, then fails as a full disk does."""

    def __init__(self, path):
        self.file = open(path, "wb")
        self.left = 100

    def write(self, data):
        if len(data) > self.left:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.left -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def _full_disk_in_torch_save(directory, monkeypatch):
    monkeypatch.setattr(type(directory), "open", lambda self, mode="r": _FullFile(self))
    write_trainer_state(directory, {"big": torch.zeros(10_000)})


FULL_DISKS = {"OSError in a write": _full_disk_in_weights, "safetensors' error text": _full_disk_in_safetensors,
              "torch.save into a full file": _full_disk_in_torch_save}


@pytest.mark.parametrize("where", FULL_DISKS)
def test_a_full_disk_keeps_the_last_checkpoint_and_removes_the_partial_one(tmp_path, monkeypatch, where):
    previous = _save(tmp_path, 1)
    fill = FULL_DISKS[where]
    write = (lambda d: fill(d, monkeypatch)) if where == "torch.save into a full file" else fill
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path / 'checkpoints'}") as error:
        save_checkpoint(tmp_path, 2, write, {}, keep=1)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert _names(tmp_path) == ["latest", "step-00000001"] and latest_checkpoint(tmp_path) == previous


def test_stale_temporary_directories_are_removed_by_the_next_write(tmp_path):
    root = tmp_path / "checkpoints"
    for stale in (".tmp-step-00000007.otherhost.12", ".trash-step-00000003.12"):
        (root / stale).mkdir(parents=True)
        (root / stale / "model.safetensors").write_bytes(b"half")
    (root / ".tmp-latest.12").write_text("step-0000")
    _save(tmp_path, 1)
    assert _names(tmp_path) == ["latest", "step-00000001"]


def test_rewriting_a_step_replaces_it(tmp_path):
    _save(tmp_path, 1, value=0.1)
    path = _save(tmp_path, 1, value=0.2)
    model = _model(0.0)
    load_model_weights(latest_checkpoint(tmp_path), model)
    assert torch.equal(model.weight, torch.full((3, 4), 0.2)) and _names(tmp_path) == ["latest", path.name]


def test_meta_keys_of_the_writer_are_reserved(tmp_path):
    with pytest.raises(ValueError, match=r"\['files', 'step'\]"):
        save_checkpoint(tmp_path, 1, _writer(_model(), 1), {"step": 1, "files": {}}, keep=1)


def test_every_rank_writes_into_one_directory(tmp_path):
    """Two ranks (threads sharing a real barrier): one checkpoint lists both ranks' files."""
    barrier = threading.Barrier(2, timeout=30)
    results, errors = {}, []

    def rank(r):
        def write(directory):
            if r == 0:
                write_weights(directory, _model())
            write_trainer_state(directory, {"rank": r}, name=f"trainer-rank{r}.pt")
        try:
            results[r] = save_checkpoint(tmp_path, 4, write, {}, keep=1, is_main=r == 0, barrier=barrier.wait,
                                         world_size=2)
        except BaseException as err:  # surfaced below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results[0] == results[1] == latest_checkpoint(tmp_path)
    meta = verify_checkpoint(results[0])
    assert sorted(meta["files"]) == ["model.safetensors", "trainer-rank0.pt", "trainer-rank1.pt"]
    assert meta["world_size"] == 2


def test_resuming_with_another_world_size_names_both(tmp_path):
    path = save_checkpoint(tmp_path, 1, _writer(_model(), 1), {}, keep=1, world_size=2)
    with pytest.raises(CheckpointError, match=r"world_size=2.*world_size=1"):
        check_world_size(path, 1)
    check_world_size(path, 2)
    check_world_size(path, 1, can_reshard=True)


def test_rng_state_round_trips_per_rank(tmp_path):
    for rank in (0, 1):
        torch.manual_seed(rank), random.seed(rank), np.random.seed(rank)
        save_rng_state(tmp_path, rank)
    expected = (torch.rand(3), random.random(), np.random.rand())  # rank 1's stream
    torch.manual_seed(9), random.seed(9), np.random.seed(9)
    assert load_rng_state(tmp_path, 1)
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    assert np.random.rand() == expected[2]
    assert not load_rng_state(tmp_path, 2)  # a rank the checkpoint lacks (a resharded resume)


def test_write_atomic_replaces_whole_files_or_nothing(tmp_path, monkeypatch):
    target = tmp_path / "tokenizer.json"
    write_atomic(target, '{"old": 1}')
    write_atomic(target, b'{"new": 2}')
    assert json.loads(target.read_text()) == {"new": 2}

    monkeypatch.setattr(ckpt.Path, "open", lambda self, mode="r": _FullFile(self))
    with pytest.raises(DiskFullError, match=f"no space left on {tmp_path}"):
        write_atomic(target, "x" * 1000)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"new": 2} and sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("spec", ["after_everything", "renamed@two", "@3"])
def test_an_unknown_fault_point_is_refused_before_writing(tmp_path, monkeypatch, spec):
    monkeypatch.setenv(ckpt.FAULT_ENV, spec)
    with pytest.raises(ValueError, match=r"expected <point>\[@<step>\] with a point among tmp_created"):
        _save(tmp_path, 1)
    assert not (tmp_path / "checkpoints").exists()


def test_a_fault_point_for_another_step_lets_the_write_through(tmp_path, monkeypatch):
    monkeypatch.setenv(ckpt.FAULT_ENV, "renamed@7")
    assert latest_checkpoint(tmp_path) is None and _save(tmp_path, 1) == latest_checkpoint(tmp_path)


def test_seed_everything_fixes_every_generator_a_checkpoint_saves():
    ckpt.seed_everything(5)
    first = ckpt.rng_state()
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.seed_everything(5)
    second = ckpt.rng_state()
    assert torch.equal(first["torch"], second["torch"]) and first["python"] == second["python"]
    assert torch.equal(first["numpy"]["keys"], second["numpy"]["keys"])


def test_a_verified_checkpoint_is_hashed_once_per_process_unless_it_changes(tmp_path, monkeypatch):
    path = _save(tmp_path, 1)
    hashed = []
    real = ckpt._sha256_all
    monkeypatch.setattr(ckpt, "_sha256_all", lambda paths, **kw: hashed.append(len(paths)) or real(paths, **kw))
    verify_checkpoint(path)
    verify_checkpoint(path)
    assert hashed == [3]
    _flip_a_byte(path)
    weights = path / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # past a coarse clock tick
    with pytest.raises(CheckpointError, match="model.safetensors does not match the SHA-256"):
        verify_checkpoint(path)
