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

# openai-whisper AudioEncoder names -> transformers WhisperEncoder names
_WHISPER_RENAMES = [
    (r"^positional_embedding$", "embed_positions.weight"),
    (r"^ln_post\.", "layer_norm."),
    (r"^blocks\.(\d+)\.attn\.query\.", r"layers.\1.self_attn.q_proj."),
    (r"^blocks\.(\d+)\.attn\.key\.", r"layers.\1.self_attn.k_proj."),
    (r"^blocks\.(\d+)\.attn\.value\.", r"layers.\1.self_attn.v_proj."),
    (r"^blocks\.(\d+)\.attn\.out\.", r"layers.\1.self_attn.out_proj."),
    (r"^blocks\.(\d+)\.attn_ln\.", r"layers.\1.self_attn_layer_norm."),
    (r"^blocks\.(\d+)\.mlp\.0\.", r"layers.\1.fc1."),
    (r"^blocks\.(\d+)\.mlp\.2\.", r"layers.\1.fc2."),
    (r"^blocks\.(\d+)\.mlp_ln\.", r"layers.\1.final_layer_norm."),
]


def openai_whisper_to_transformers(key: str) -> str:
    for pattern, replacement in _WHISPER_RENAMES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return key


def load_llm(llm: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Official Ling keys (per-expert, `image_gate`/`audio_gate`) into our Ling module, strictly."""
    validate(llm, {k: tuple(v.shape) for k, v in tensors.items()}, source=source)
    llm.load_state_dict(from_official(llm, tensors), strict=True)


def load_ming_checkpoint(model: nn.Module, path: str | Path) -> None:
    """A whole Ming-Lite-Omni checkpoint directory into an OmniModel built from the ming-lite-omni config."""
    tensors = read_prefixed(path, ("",))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        head, _, rest = key.partition(".")
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
