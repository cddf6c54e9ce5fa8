"""Official Ling checkpoints in, official Ling checkpoints out.

Layout read and written: `config.json` + `model.safetensors`, or shards `model-0000i-of-0000n.safetensors`
with `model.safetensors.index.json` (`{"metadata": {"total_size": ...}, "weight_map": {key: file}}`).

Our modules keep the official names, so only two things are mapped:

- routed experts: official `...mlp.experts.{e}.gate_proj.weight` / `up_proj` [I, H] and `down_proj` [H, I]
  <-> our fused `...mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `...mlp.experts.down_proj` [E, H, I];
- Ming's modality routers: official `...mlp.image_gate.weight` / `...mlp.audio_gate.weight`
  <-> our `...mlp.gate.image_weight` / `...mlp.gate.audio_weight` (`...mlp.gate.weight` is the text router).

Loading is strict: every expected key must be present with the expected shape and nothing else may be
there (a `CheckpointError` lists the first offending keys and, for shapes, the config field that
disagrees), so no weight is ever left at its random initialisation. Export then import is bit-identical.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from encoders.checkpoint import (INDEX_FILE, SINGLE_FILE, CheckpointError,  # one error type for every checkpoint
                                 checkpoint_files, read_tensors)

CONFIG_NAME = "config.json"
# Non-persistent buffers some exporters still write; they are recomputed, never loaded.
IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")
SHOWN = 8  # offending keys listed in an error

_EXPERTS = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<kind>gate_up_proj|down_proj)$")
_MODALITY_GATE = re.compile(r"^(?P<block>.+\.mlp)\.gate\.(?P<modality>image|audio)_weight$")
_OFFICIAL_EXPERT = re.compile(r"^(?P<block>.+\.mlp)\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")


# --------------------------------------------------------------------------------------------------
# Name mapping (ours <-> official), shapes only: works on the meta device.

def _our_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers, by name (the state dict without its non-persistent buffers)."""
    return dict(model.state_dict(keep_vars=True))


@dataclass(frozen=True)
class Placement:
    """Where one official tensor lives in ours: the flat range [offset, offset + numel) of `target`, read as `shape`.

    Every official tensor is one contiguous block of one of our tensors (an expert's gate rows, then its
    up rows, inside the fused [E, 2I, H]), so a loader can copy any slice of it without building the
    others (training/zero_init.py streams checkpoints into ZeRO-3 partitions this way)."""

    target: str  # our state-dict key
    offset: int  # first element in the flattened target
    shape: tuple[int, ...]  # the official tensor's shape (a leading-rows prefix when the file holds more rows)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def official_placements(model: nn.Module) -> dict[str, Placement]:
    """official key -> its Placement in our state dict, in model order."""
    placements: dict[str, Placement] = {}
    for ours, tensor in _our_tensors(model).items():
        shape = tuple(tensor.shape)
        if m := _EXPERTS.match(ours):
            num_experts, rows, cols = shape
            for e in range(num_experts):
                base, start = f"{m['block']}.experts.{e}", e * rows * cols
                if m["kind"] == "gate_up_proj":
                    half = (rows // 2, cols)
                    placements[f"{base}.gate_proj.weight"] = Placement(ours, start, half)
                    placements[f"{base}.up_proj.weight"] = Placement(ours, start + math.prod(half), half)
                else:
                    placements[f"{base}.down_proj.weight"] = Placement(ours, start, (rows, cols))
        elif m := _MODALITY_GATE.match(ours):
            placements[f"{m['block']}.{m['modality']}_gate.weight"] = Placement(ours, 0, shape)
        else:
            placements[ours] = Placement(ours, 0, shape)
    return placements


def official_layout(model: nn.Module) -> dict[str, tuple[str, tuple[int, ...]]]:
    """official key -> (our key, official shape), in model order."""
    return {key: (place.target, place.shape) for key, place in official_placements(model).items()}


def to_official(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights under the official key names (per-expert tensors), as contiguous copies."""
    tensors = _our_tensors(model)
    return {key: tensors[place.target].detach().reshape(-1)[place.offset:place.offset + place.numel]
            .view(place.shape).clone() for key, place in official_placements(model).items()}


def place_tensors(model: nn.Module, placements: dict[str, Placement],
                  tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors -> our state dict, each copied into its Placement (a tensor that is a whole one of
    ours is taken as it is). `tensors` must already be validated against `placements`."""
    ours = _our_tensors(model)
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        place = placements[key]
        shape = ours[place.target].shape
        values = tensor.reshape(-1)[:place.numel]  # a leading-rows prefix when the file holds more rows
        if place.numel == shape.numel():
            state[place.target] = values.view(shape)
            continue
        if place.target not in state:
            state[place.target] = torch.empty(shape, dtype=tensor.dtype, device=tensor.device)
        state[place.target].view(-1)[place.offset:place.offset + place.numel] = values
    return state


def from_official(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official-named tensors -> our state dict (fusing experts). `tensors` must already be validated."""
    return place_tensors(model, official_placements(model), tensors)


# --------------------------------------------------------------------------------------------------
# Validation

def _dim_fields(key: str, config: Any) -> list[str] | None:
    """What config fields each dimension of an official tensor comes from (for error messages)."""
    name = key.rsplit(".", 1)[0] if key.endswith((".weight", ".bias", ".expert_bias")) else key
    experts = "num_experts"
    if key.endswith(".expert_bias"):
        return [experts]
    if re.search(r"\.mlp\.(image_|audio_)?gate\.weight$", key):
        return [experts, "hidden_size"]
    if name.endswith(("word_embeddings", "lm_head")):
        return ["vocab_size", "hidden_size"]
    if ".experts." in name:
        return (["hidden_size", "moe_intermediate_size"] if name.endswith("down_proj")
                else ["moe_intermediate_size", "hidden_size"])
    if ".shared_experts." in name:
        inter = "moe_intermediate_size*num_shared_experts"
        return ["hidden_size", inter] if name.endswith("down_proj") else [inter, "hidden_size"]
    if re.search(r"\.mlp\.(gate|up)_proj$", name):
        return ["intermediate_size", "hidden_size"]
    if name.endswith(".mlp.down_proj"):
        return ["hidden_size", "intermediate_size"]
    if name.endswith("query_key_value"):
        return ["(num_attention_heads+2*num_key_value_heads)*head_dim", "hidden_size"]
    if name.endswith("attention.dense"):
        return ["hidden_size", "num_attention_heads*head_dim"]
    if name.endswith(("query_layernorm", "key_layernorm")):
        return ["head_dim"]
    if name.endswith("eh_proj"):
        return ["hidden_size", "2*hidden_size"]
    if name.endswith(("norm", "layernorm", "enorm", "hnorm")):
        return ["hidden_size"]
    return None


def _field_value(expression: str, config: Any) -> str:
    names = re.findall(r"[a-z_]+", expression)
    values = ", ".join(f"{n}={getattr(config, n, '?')}" for n in dict.fromkeys(names))
    if len(names) == 1 and expression == names[0]:
        return values
    try:
        result = eval(expression, {}, {n: getattr(config, n) for n in names})  # noqa: S307 - our own expressions
        return f"{expression}={result} ({values})"
    except Exception:  # noqa: BLE001
        return f"{expression} ({values})"


def _shape_message(key: str, got: tuple[int, ...], expected: tuple[int, ...], config: Any) -> str:
    text = f"{key} has shape {list(got)} but the config says "
    fields = _dim_fields(key, config)
    if fields and len(got) == len(expected) == len(fields):
        wrong = [f for f, a, b in zip(fields, got, expected) if a != b]
        return text + "; ".join(_field_value(f, config) for f in wrong) + f" (expected {list(expected)})"
    return text + f"{list(expected)}"


def _hints(missing: list[str], unexpected: list[str], config: Any) -> list[str]:
    hints = []

    def expert_ids(keys: list[str]) -> set[int]:
        return {int(m["e"]) for k in keys if (m := _OFFICIAL_EXPERT.match(k))}

    def layer_ids(keys: list[str]) -> set[int]:
        return {int(m[1]) for k in keys if (m := re.match(r"^model\.layers\.(\d+)\.", k))}

    if unexpected and expert_ids(unexpected):
        hints.append(f"the checkpoint has experts up to index {max(expert_ids(unexpected))} but the config says "
                     f"num_experts={config.num_experts}")
    elif missing and expert_ids(missing) and not unexpected:
        hints.append(f"the checkpoint lacks experts {min(expert_ids(missing))}..{max(expert_ids(missing))}: "
                     f"does it have fewer than num_experts={config.num_experts}?")
    layers = config.num_hidden_layers + int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    if unexpected and layer_ids(unexpected) and min(layer_ids(unexpected)) >= layers:
        hints.append(f"the checkpoint has layers up to {max(layer_ids(unexpected))} but the config says "
                     f"num_hidden_layers={config.num_hidden_layers}"
                     + (f" (+ num_nextn_predict_layers={config.num_nextn_predict_layers})"
                        if hasattr(config, "num_nextn_predict_layers") else ""))
    return hints


def validate(model: nn.Module, shapes: dict[str, tuple[int, ...]], source: str = "checkpoint") -> None:
    """Compare checkpoint key -> shape with what the model expects; raise CheckpointError on any difference."""
    layout = official_layout(model)
    missing = [k for k in layout if k not in shapes]
    unexpected = sorted(k for k in shapes if k not in layout)
    mismatched = [(k, shapes[k], layout[k][1]) for k in layout if k in shapes and tuple(shapes[k]) != layout[k][1]]
    if not (missing or unexpected or mismatched):
        return
    config = model.config
    lines = [f"{source} does not match the {type(model).__name__} its config describes:"]
    if mismatched:
        lines.append(f"{len(mismatched)} shape mismatch(es):")
        lines += [f"  {_shape_message(k, tuple(g), e, config)}" for k, g, e in mismatched[:SHOWN]]
    if missing:
        lines.append(f"{len(missing)} missing key(s): {', '.join(missing[:SHOWN])}" + (" ..." if len(missing) > SHOWN else ""))
    if unexpected:
        lines.append(f"{len(unexpected)} unexpected key(s): {', '.join(unexpected[:SHOWN])}"
                     + (" ..." if len(unexpected) > SHOWN else ""))
    lines += [f"hint: {h}" for h in _hints(missing, unexpected, config)]
    raise CheckpointError("\n".join(lines))


# --------------------------------------------------------------------------------------------------
# Files

def read_config(path: str | Path) -> dict[str, Any]:
    """config.json as a dict; a Ming (bailingmm) config yields its `llm_config`."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{path}: no {CONFIG_NAME}")
    data = json.loads(file.read_text())
    return data.get("llm_config", data)


def read_shapes(files: dict[str, Path], stored: dict[str, str] | None = None) -> dict[str, tuple[int, ...]]:
    """key -> shape from the safetensors headers; `stored` maps a key to its name in the file (prefixes)."""
    stored = stored or {}
    shapes: dict[str, tuple[int, ...]] = {}
    by_file: dict[Path, list[str]] = {}
    for key, file in files.items():
        by_file.setdefault(file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            present = set(f.keys())
            lost = [stored.get(k, k) for k in keys if stored.get(k, k) not in present]
            if lost:
                raise CheckpointError(f"{file.name} lacks key(s) its index assigns to it: {', '.join(lost[:SHOWN])}")
            for key in keys:
                shapes[key] = tuple(f.get_slice(stored.get(key, key)).get_shape())
    return shapes


def load_official(path: str | Path, model_class: type, *, prefix: str | None = None, dtype: torch.dtype | None = None,
                  config_overrides: dict[str, Any] | None = None, device: str | torch.device = "cpu"):
    """Build `model_class` from an official checkpoint directory.

    The model is built on the meta device and every parameter and persistent buffer is assigned from the
    checkpoint (strictly validated first). `prefix` selects the LLM's keys inside a larger checkpoint
    (default: "model." for a Ming `bailingmm` config with an `llm_config`, else ""); other keys are then
    ignored. `dtype` casts floating tensors (default: as stored).
    """
    path = Path(path)
    raw = json.loads((path / CONFIG_NAME).read_text()) if (path / CONFIG_NAME).is_file() else None
    values = read_config(path)
    if prefix is None:
        prefix = "model." if raw is not None and "llm_config" in raw else ""
    values = {k: v for k, v in values.items()
              if k not in ("architectures", "auto_map", "_attn_implementation", "attn_implementation", "torch_dtype",
                           "dtype", "transformers_version", "model_type", "_name_or_path")}
    values.update(config_overrides or {})
    config = model_class.config_class(**values)
    with torch.device("meta"):
        model = model_class(config)

    files = {k[len(prefix):]: f for k, f in checkpoint_files(path).items() if k.startswith(prefix)}
    files = {k: f for k, f in files.items() if not IGNORED_KEYS.match(k)}
    stored = {k: prefix + k for k in files}
    shapes = read_shapes(files, stored)
    validate(model, shapes, source=str(path) + (f" (keys under {prefix!r})" if prefix else ""))
    tensors = dict(read_tensors(files, stored))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("expert_bias") else v
                   for k, v in tensors.items()}
    state = from_official(model, tensors)
    model.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(model)
    model.to(device)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"{path}: tensors left uninitialised after loading: {', '.join(leftover[:SHOWN])}")
    model.eval()
    return model


def _materialise_buffers(model: nn.Module) -> None:
    """Recompute non-persistent buffers (RoPE frequencies) that the meta-device build left empty."""
    for module in model.modules():
        if hasattr(module, "compute_inv_freq"):
            module.register_buffer("inv_freq", module.compute_inv_freq(), persistent=False)


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, re.IGNORECASE)
    if not m:
        raise ValueError(f"max_shard_size {size!r}: use bytes or e.g. '5GB', '500MB'")
    unit = (m[2] or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m[1]) * scale)


OFFICIAL_ARCHITECTURES = {"bailing_moe": "BailingMoeForCausalLM", "bailing_moe_v2": "BailingMoeV2ForCausalLM"}


def official_config(model: nn.Module) -> dict[str, Any]:
    config = model.config.to_dict()
    for key in list(config):
        if key.startswith("_") or key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
            config.pop(key)
    config["architectures"] = [OFFICIAL_ARCHITECTURES.get(model.config.model_type, type(model).__name__)]
    dtypes = {p.dtype for p in model.parameters()}
    config["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.") if len(dtypes) == 1 else "float32"
    return config


def save_official(model: nn.Module, path: str | Path, max_shard_size: int | str = "5GB") -> list[Path]:
    """Write config.json + official-named safetensors (sharded with an index when larger than one shard)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    limit = _parse_size(max_shard_size)
    tensors = to_official(model)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    (path / CONFIG_NAME).write_text(json.dumps(official_config(model), indent=2, sort_keys=True) + "\n")
    for stale in [*path.glob("model-*-of-*.safetensors"), path / SINGLE_FILE, path / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
        return [path / SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, path / name, metadata=metadata)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [path / name for name in names]


def read_official_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an official checkpoint directory, by key (for tests and inspection)."""
    return dict(read_tensors(checkpoint_files(path)))


__all__ = ["CheckpointError", "load_official", "save_official", "to_official", "from_official", "official_layout",
           "Placement", "official_placements", "place_tensors",
           "validate", "read_config", "read_shapes", "read_official_tensors", "checkpoint_files"]
