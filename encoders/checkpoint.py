"""Encoder weights from component checkpoints in the official transformers layouts.

A checkpoint directory holds `model.safetensors` or shards listed in `model.safetensors.index.json`,
and `config.json`. An encoder's keys sit under a prefix (`model.visual.` / `visual.` for Qwen2.5-VL,
`model.encoder.` for Whisper). Loading is strict: missing, unexpected or mis-shaped keys and
architecture fields that disagree with the encoder's config are errors that list them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

SHOWN = 8  # keys listed in an error before "..."


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into; the message names the directory and the keys."""


def safetensors_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint directory (single file or index of shards)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index} lists shard(s) that do not exist: {', '.join(absent)}")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_prefixed(path: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first of `prefixes` found in the checkpoint, with the prefix removed."""
    files = safetensors_files(path)
    keys: dict[str, Path] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            keys.update({key: file for key in handle.keys()})
    for prefix in prefixes:
        chosen = {key: file for key, file in keys.items() if key.startswith(prefix)}
        if chosen:
            tensors = {}
            for file in {f for f in chosen.values()}:
                with safe_open(str(file), framework="pt") as handle:
                    tensors.update({k[len(prefix):]: handle.get_tensor(k) for k, f in chosen.items() if f == file})
            return tensors
    sample = ", ".join(sorted(keys)[:SHOWN])
    raise CheckpointError(f"{path}: no keys under {' or '.join(map(repr, prefixes))} (it has e.g. {sample})")


def read_config(path: str | Path, section: str | None = None) -> dict[str, Any]:
    """`config.json` of a checkpoint directory, or one section of it (e.g. `vision_config`)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{path}: no config.json")
    config = json.loads(file.read_text())
    if section is None:
        return config
    if section not in config:
        raise CheckpointError(f"{file} has no `{section}` (keys: {', '.join(sorted(config))})")
    return config[section]


def check_fields(expected: dict[str, Any], found: dict[str, Any], fields: tuple[str, ...], source: str) -> None:
    """Architecture fields the checkpoint's config states must equal the encoder's."""
    differ = [f"{name}: checkpoint {found[name]!r} vs encoder {expected[name]!r}"
              for name in fields if name in found and name in expected and found[name] != expected[name]]
    if differ:
        raise CheckpointError(f"{source} describes another architecture: {'; '.join(differ)}")


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `module`; missing, unexpected or mis-shaped keys are listed in the error."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(k for k in tensors if k not in expected)
    shapes = [f"{k}: checkpoint {tuple(tensors[k].shape)} vs encoder {tuple(v.shape)}"
              for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {type(module).__name__}:"]
        for label, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                parts.append(f"{label}: {', '.join(items[:SHOWN])}" + (" ..." if len(items) > SHOWN else ""))
        raise CheckpointError("\n".join(parts))
    module.load_state_dict(tensors, strict=True)
