"""Fixtures of the training tests: process-wide determinism, and the weights of a run's latest checkpoint."""
import pytest
import torch
from safetensors.torch import load_file

from training.checkpoint import latest_checkpoint


@pytest.fixture
def restore_determinism():
    """`deterministic: true` flips a process-wide switch; put it back for the other tests."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture
def run_weights():
    """run directory -> the state dict of its latest checkpoint."""
    return lambda run_dir: load_file(str(latest_checkpoint(run_dir) / "model.safetensors"))


@pytest.fixture
def crash_run(monkeypatch):
    """`crash_run(run, at_step)`: call `run()`, failing it inside the optimizer step number `at_step`."""
    import training.engine as engine
    real_step = engine.PlainEngine.step

    def crash(run, at_step: int) -> None:
        calls = {"n": 0}

        def failing_step(self, *args, **kwargs):
            calls["n"] += 1
            if calls["n"] == at_step:
                raise RuntimeError("simulated node failure")
            return real_step(self, *args, **kwargs)

        monkeypatch.setattr(engine.PlainEngine, "step", failing_step)
        with pytest.raises(RuntimeError, match="simulated node failure"):
            run()
        monkeypatch.setattr(engine.PlainEngine, "step", real_step)

    return crash
