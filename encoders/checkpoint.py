"""Encoder weights from component checkpoints in the official transformers layouts.

A checkpoint directory holds `model.safetensors` or shards listed in `model.safetensors.index.json`,
and `config.json`. An encoder's keys sit under a prefix (`model.visual.` / `visual.` for Qwen2.5-VL,
`model.encoder.` for Whisper). Loading is strict: missing, unexpected or mis-shaped keys and
architecture fields that disagree with the encoder's config are errors that list them.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

SHOWN = 8  # keys listed in an error before "..."
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint does not fit the module it is loaded into; the message names the directory and the keys."""


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """key -> safetensors file of a checkpoint directory (a single file, or shards listed in the index)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {path}")
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({type(err).__name__}: {err})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: `weight_map` is not a key -> file mapping")
        absent = sorted({name for name in weight_map.values() if not (path / name).is_file()})
        if absent:
            raise CheckpointError(f"{index} names shard(s) that do not exist: {', '.join(absent[:SHOWN])}")
        return {key: path / name for key, name in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        with safe_open(str(single), framework="pt") as handle:
            return {key: single for key in handle.keys()}
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")


def read_tensors(files: dict[str, Path], stored: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) for each key of `files` (key -> file), opening each file once; `stored` maps a key to
    its name inside the file when they differ (a prefix was taken off)."""
    stored = stored or {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(str(file), framework="pt") as handle:
            lost = sorted(set(stored.get(k, k) for k in keys) - set(handle.keys()))
            if lost:
                raise CheckpointError(f"{file} lacks key(s) its index assigns to it: {', '.join(lost[:SHOWN])}")
            for key in keys:
                yield key, handle.get_tensor(stored.get(key, key))


def read_prefixed(path: str | Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Tensors under the first of `prefixes` found in the checkpoint, with the prefix removed."""
    files = checkpoint_files(path)
    for prefix in prefixes:
        chosen = {key[len(prefix):]: file for key, file in files.items() if key.startswith(prefix)}
        if chosen:
            return dict(read_tensors(chosen, {key: prefix + key for key in chosen}))
    sample = ", ".join(sorted(files)[:SHOWN])
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


def check_shapes(module: nn.Module, found: dict[str, tuple[int, ...]], source: str) -> None:
    """Checkpoint keys -> shapes against `module`'s state dict; missing, unexpected or mis-shaped keys are listed."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = [k for k in expected if k not in found]
    unexpected = sorted(k for k in found if k not in expected)
    shapes = [f"{k}: checkpoint {tuple(found[k])} vs encoder {s}" for k, s in expected.items()
              if k in found and tuple(found[k]) != s]
    if missing or unexpected or shapes:
        parts = [f"{source} does not fit {type(module).__name__}:"]
        for label, items in (("shape mismatches", shapes), ("missing keys", missing), ("unexpected keys", unexpected)):
            if items:
                parts.append(f"{label}: {', '.join(items[:SHOWN])}" + (" ..." if len(items) > SHOWN else ""))
        raise CheckpointError("\n".join(parts))


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `module`; missing, unexpected or mis-shaped keys are listed in the error."""
    check_shapes(module, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    module.load_state_dict(tensors, strict=True)
