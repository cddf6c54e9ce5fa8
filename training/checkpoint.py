"""Training checkpoints: written atomically, found again after a crash, resumed exactly.

Layout: `<output_dir>/checkpoints/step-00000100/` holding `model.safetensors`, `trainer.pt`
(optimizer, schedule, RNG, data position: tensors and plain values only, loaded with
`weights_only=True`) and `meta.json`; `<output_dir>/checkpoints/latest` names the newest. A
checkpoint is written into a `.tmp` directory and renamed into place, so a crash mid-write never
leaves a half checkpoint that resume would pick up.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, model: nn.Module, trainer_state: dict[str, Any],
                    meta: dict[str, Any], keep: int = 2) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / "model.safetensors"))
    torch.save({**trainer_state, "rng": rng_state()}, tmp / "trainer.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _write_atomic(root / "latest", final.name)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_root(output_dir)
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer.pt").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing: "
                                f"remove the pointer or restore the checkpoint")
    return path


def load_checkpoint(path: Path, model: nn.Module) -> dict[str, Any]:
    """Load model weights (strict) into `model`; return the trainer state and restore the RNGs."""
    load_model_weights(path, model)
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    set_rng_state(state.pop("rng"))
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> the checkpoint directory."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint directory (model.safetensors) nor a run "
                                f"directory with checkpoints/latest")
    return latest


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Strictly load a trainer checkpoint's weights into a model built from the same config."""
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{path}/model.safetensors does not match the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
