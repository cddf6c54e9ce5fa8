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
from pathlib import Path

import torch
from torch import nn

from encoders.checkpoint import load_strict, read_prefixed
from models.checkpoint import CheckpointError, from_official, validate

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


def load_ming_checkpoint(model: nn.Module, path: str | Path, components: dict[str, str] | None = None) -> None:
    """A whole Ming-Lite-Omni checkpoint directory into an OmniModel built from its release (or a config).

    `components` maps a checkpoint component (the first key part) to ours, "" for one deliberately not
    loaded: Ming-Lite-Omni v1 keeps its Whisper encoder in `whisper_encoder.*` / `linear_proj_whisper.*`
    next to a SANM encoder (`audio.*`, `linear_proj_audio.*`) that is not built here (models/release.py)."""
    components = components or {}
    tensors = read_prefixed(path, ("",))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
        head = components.get(head, head)
        if head:
            groups.setdefault(head, {})[rest] = tensor
    expected = {name for name, child in model.named_children() if child is not None}
    extra = sorted(set(groups) - expected)
    if extra:
        raise CheckpointError(f"{path}: components {extra} have no counterpart in this model "
                              f"(it has {sorted(expected)}); e.g. a talker needs its own model")
    for name in sorted(expected):
        if name not in groups:
            raise CheckpointError(f"{path}: no `{name}.*` keys, but the model has a {name} component")
        part = groups[name]
        if name == "model":
            load_llm(model.model, part, f"{path} (LLM, keys under 'model.')")
            continue
        if name == "audio":
            part = {openai_whisper_to_transformers(k): v for k, v in part.items()}
            table = model.audio.embed_positions.weight
            if "embed_positions.weight" in part and part["embed_positions.weight"].shape[0] > table.shape[0]:
                # Ming's table covers 300 s (15000 positions); sinusoid rows do not depend on the table
                # length, so the first rows are exactly the 30-s table this encoder uses per chunk.
                part["embed_positions.weight"] = part["embed_positions.weight"][: table.shape[0]]
        load_strict(getattr(model, name), part, f"{path} ({name}.*)")
