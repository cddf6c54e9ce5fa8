"""Checkpoints into an OmniModel: whole Ming-Lite-Omni checkpoints, or one component at a time.

- `load_ming_checkpoint`: the official Ming-Lite-Omni layout (`BailingMMNativeForConditionalGeneration`,
  its Whisper-encoder version): `vision.*` (Qwen2.5-VL tower, same names as ours), `audio.*` (an
  openai-whisper `AudioEncoder`: renamed to transformers' WhisperEncoder names), `linear_proj.*`,
  `linear_proj_audio.*` (same layouts as our projectors) and `model.*` (Ling-lite: per-expert keys and
  `image_gate`/`audio_gate`, converted by models/checkpoint.py).
- `load_llm`: official Ling keys into the LLM (encoders load their own checkpoints: `load_checkpoint`).

Every load is strict: missing, unexpected or mis-shaped keys raise CheckpointError listing them.
"""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from encoders.checkpoint import check_shapes, read_prefixed
from models.checkpoint import (CheckpointError, Placement, from_official, official_placements, place_tensors,
                               validate)

_POSITIONS = "embed_positions.weight"  # the Whisper encoder's sinusoid table
# openai-whisper AudioEncoder names <-> transformers WhisperEncoder names ("{}" = block index)
_WHISPER_NAMES = [
    ("positional_embedding", "embed_positions.weight"),
    ("ln_post.", "layer_norm."),
    ("conv1.", "conv1."),
    ("conv2.", "conv2."),
    ("blocks.{}.attn.query.", "layers.{}.self_attn.q_proj."),
    ("blocks.{}.attn.key.", "layers.{}.self_attn.k_proj."),
    ("blocks.{}.attn.value.", "layers.{}.self_attn.v_proj."),
    ("blocks.{}.attn.out.", "layers.{}.self_attn.out_proj."),
    ("blocks.{}.attn_ln.", "layers.{}.self_attn_layer_norm."),
    ("blocks.{}.mlp.0.", "layers.{}.fc1."),
    ("blocks.{}.mlp.2.", "layers.{}.fc2."),
    ("blocks.{}.mlp_ln.", "layers.{}.final_layer_norm."),
]


def _rename(key: str, pairs: list[tuple[str, str]]) -> str:
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(re.escape("{}"), r"(\d+)")
        if m := re.match(pattern, key):
            return target.format(*m.groups()) + key[m.end():]
    return key


def openai_whisper_to_transformers(key: str) -> str:
    return _rename(key, _WHISPER_NAMES)


def transformers_to_openai_whisper(key: str) -> str:
    return _rename(key, [(theirs, ours) for ours, theirs in _WHISPER_NAMES])


def release_layout(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """official Ming-Lite-Omni (v1.5) key -> shape this OmniModel loads (the Whisper table: rows it reads)."""
    from models.checkpoint import official_layout
    layout: dict[str, tuple[int, ...]] = {}
    for name, child in model.named_children():
        if child is None or name == "video":
            continue
        if name == "model":
            layout.update({f"model.{k}": shape for k, (_, shape) in official_layout(child).items()})
            continue
        for key, tensor in child.state_dict().items():
            official = transformers_to_openai_whisper(key) if name == "audio" else key
            layout[f"{name}.{official}"] = tuple(tensor.shape)
    return layout


def load_llm(llm: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Official Ling keys (per-expert, `image_gate`/`audio_gate`) into our Ling module, strictly."""
    validate(llm, {k: tuple(v.shape) for k, v in tensors.items()}, source=source)
    llm.load_state_dict(from_official(llm, tensors), strict=True)


def _components(keys: Iterable[str], model: nn.Module, path: str | Path,
                components: dict[str, str] | None) -> dict[str, dict[str, str]]:
    """Our component -> {key inside it: checkpoint key}; every component of the model and nothing else."""
    components = components or {}
    groups: dict[str, dict[str, str]] = {}
    for key in keys:
        head, _, rest = key.partition(".")
        head = components.get(head, head)
        if head:
            groups.setdefault(head, {})[rest] = key
    expected = {name for name, child in model.named_children() if child is not None}
    extra = sorted(set(groups) - expected)
    if extra:
        raise CheckpointError(f"{path}: components {extra} have no counterpart in this model "
                              f"(it has {sorted(expected)}); e.g. a talker needs its own model")
    for name in sorted(expected):
        if name not in groups:
            raise CheckpointError(f"{path}: no `{name}.*` keys, but the model has a {name} component")
    return groups


def ming_placements(model: nn.Module, shapes: dict[str, tuple[int, ...]], path: str | Path,
                    components: dict[str, str] | None = None) -> dict[str, Placement]:
    """Checkpoint key -> its Placement in the OmniModel's state dict, validated strictly from the shapes alone
    (the safetensors headers), so it works on the meta device. Keys of components mapped to "" are left out."""
    placements: dict[str, Placement] = {}
    for name, part in sorted(_components(shapes, model, path, components).items()):
        if name == "model":
            validate(model.model, {rest: tuple(shapes[key]) for rest, key in part.items()},
                     source=f"{path} (LLM, keys under 'model.')")
            official = official_placements(model.model)
            placements.update({key: replace(official[rest], target=f"model.{official[rest].target}")
                               for rest, key in part.items()})
            continue
        module = getattr(model, name)
        rename = openai_whisper_to_transformers if name == "audio" else (lambda k: k)
        found = {rename(rest): tuple(shapes[key]) for rest, key in part.items()}
        table = module.state_dict().get(_POSITIONS) if name == "audio" else None
        if table is not None and _POSITIONS in found and found[_POSITIONS][0] > table.shape[0]:
            # Ming's table covers 300 s (15000 positions); sinusoid rows do not depend on the table
            # length, so the first rows are exactly the 30-s table this encoder uses per chunk.
            found[_POSITIONS] = (table.shape[0], *found[_POSITIONS][1:])
        check_shapes(module, found, f"{path} ({name}.*)")
        placements.update({key: Placement(f"{name}.{rename(rest)}", 0, found[rename(rest)])
                           for rest, key in part.items()})
    return placements


def load_ming_checkpoint(model: nn.Module, path: str | Path, components: dict[str, str] | None = None) -> None:
    """A whole Ming-Lite-Omni checkpoint directory into an OmniModel built from its release (or a config).

    `components` maps a checkpoint component (the first key part) to ours, "" for one deliberately not
    loaded: Ming-Lite-Omni v1 keeps its Whisper encoder in `whisper_encoder.*` / `linear_proj_whisper.*`
    next to a SANM encoder (`audio.*`, `linear_proj_audio.*`) that is not built here (models/release.py)."""
    tensors = read_prefixed(path, ("",))
    placements = ming_placements(model, {k: tuple(v.shape) for k, v in tensors.items()}, path, components)
    state = place_tensors(model, placements, {k: v for k, v in tensors.items() if k in placements})
    model.load_state_dict(state, strict=True)
