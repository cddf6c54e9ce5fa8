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
