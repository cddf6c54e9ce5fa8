"""Shared by the benchmark scripts: device choice, timing, memory accounting, the summary line."""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as `python benchmarks/x.py` from anywhere


def pick_device(quick: bool) -> torch.device:
    """The GPU when there is one (unless --quick asks for the CPU), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() and not quick else "cpu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class SavedTensorMeter:
    """Peak bytes of the storages autograd holds for backward (activation memory), on any device.

    Storages are counted once however many saved tensors view them (weights saved by every path
    are one storage), and released when the graph drops its last reference.
    """

    def __init__(self, exclude: set[int] | None = None) -> None:
        self.live = 0
        self.peak = 0
        self.refs: dict[int, int] = {}
        self.exclude = exclude or set()  # storages not to count (the parameters)

    @contextlib.contextmanager
    def track(self) -> Iterator["SavedTensorMeter"]:
        meter = self

        class Held:
            __slots__ = ("tensor", "key", "bytes")

            def __init__(self, tensor: torch.Tensor) -> None:
                storage = tensor.untyped_storage()
                self.tensor, self.key, self.bytes = tensor, storage.data_ptr(), storage.nbytes()
                if self.key in meter.exclude:
                    self.bytes = 0
                if meter.refs.get(self.key, 0) == 0:
                    meter.live += self.bytes
                    meter.peak = max(meter.peak, meter.live)
                meter.refs[self.key] = meter.refs.get(self.key, 0) + 1

            def __del__(self) -> None:
                meter.refs[self.key] -= 1
                if meter.refs[self.key] == 0:
                    meter.live -= self.bytes

        with torch.autograd.graph.saved_tensors_hooks(Held, lambda held: held.tensor):
            yield self


def peak_memory(fn: Callable[[], object], device: torch.device, model: torch.nn.Module) -> tuple[int, str]:
    """Peak memory of one call: all allocations on a GPU; activations held for backward on the CPU."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated() - before, "peak allocated above the resident model"
    meter = SavedTensorMeter(exclude={p.untyped_storage().data_ptr() for p in model.parameters()})
    with meter.track():
        fn()
    return meter.peak, "peak activation bytes held for backward"


def summary_line(name: str, **values: float) -> str:
    return f"{name}: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


TINY_OMNI = REPO / "configs/models/tiny-omni.yaml"


def tiny_omni(device: torch.device) -> tuple[torch.nn.Module, Any, Any]:
    """The tiny omni model (seed 0) on `device`, its config, and its processor."""
    import models  # noqa: F401  (registers the components)
    from data.processor import OmniProcessor
    from models.build import build_model, load_model_config

    config = load_model_config(TINY_OMNI)
    config.tokenizer = str(REPO / config.tokenizer)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    return model, config, OmniProcessor.for_model(model, config.tokenizer, config.max_length)


def demo_shards() -> Path:
    """Train shards of the demo dataset (6 samples of each kind), built once under runs/."""
    from data.demo_data import build_demo_data

    data_dir = REPO / "runs" / "bench_demo_data"
    if not (data_dir / "eval.jsonl").is_file():
        build_demo_data(data_dir, samples_per_kind=6)
    return data_dir / "train_shards"
