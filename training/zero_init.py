"""Models that start at scale: built without materialising every weight on every rank, then loaded from
their official checkpoints shard by shard, one tensor at a time.

    model = build_for_engine(config.model, ds_config)   # ds_config: the filled DeepSpeed JSON, or None

- ZeRO-3 (`zero_optimization.stage: 3`): built inside `deepspeed.zero.Init`, so each rank keeps only its
  partition of every parameter (`param.ds_tensor`, a contiguous 1/N of the flattened weight). Each rank then
  copies *its own slice* of every official tensor from the safetensors file into that partition, reading only
  the rows that overlap it (`safe_open(...).get_slice`). We chose this over gathering each parameter and
  loading it on rank 0 (`GatheredParameters(modifier_rank=0)`): that holds a whole parameter on every rank
  (the largest, one layer's fused experts, is 738 MB in bf16 for Ming-Lite-Omni) and sends the model over
  the network twice. Slices need no communication, and a rank's host working set is one slice of one
  parameter plus a row.
- A transformers-native backbone checkpoint (Qwen3-MoE, OLMoE, ...) under ZeRO-3 goes through transformers'
  own ZeRO-3 loading (`native_partitioned`): rank 0 reads one shard file at a time and each module's weights are
  gathered while it copies them in. That holds a shard on rank 0's host and sends the LLM over the network once;
  our slice streaming would need transformers' key conversions re-implemented.
- ZeRO-2 / plain (`ds_config` None or stage 2): every rank needs the whole model. When the checkpoints
  cover every weight it is built on the meta device, allocated once (`to_empty`) and filled tensor by
  tensor: one copy in host memory, and no random init. Otherwise it is built with random weights (still one
  copy) and the checkpoints overwrite it in place.

Keys are converted by the same `Placement`s the in-memory loaders use (models/checkpoint.py
`official_placements`, models/ming_checkpoint.py `ming_placements`). Checkpoints are validated strictly
from their safetensors headers before any weight is read, against a twin of the model on the meta device.
Buffers are never partitioned: non-persistent ones (RoPE frequencies) are recomputed in fp32, as a plain
build has them (zero.Init creates every float tensor in the training dtype; the meta device leaves them empty).
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import PreTrainedModel
from transformers.initialization import no_init_weights

from models.build import ModelConfig, build_model, check_loading_info, load_backbone_checkpoint, load_model_config
from models.checkpoint import CheckpointError, Placement, checkpoint_files, official_placements, read_shapes, validate
from models.ming_checkpoint import ming_placements


@dataclass(frozen=True)
class TensorRead:
    """One official tensor: where it is stored and where it goes."""

    file: Path
    key: str  # its name inside the file
    place: Placement


def without_checkpoints(config: ModelConfig) -> ModelConfig:
    """The same architecture with every checkpoint field cleared (building it reads no weights)."""
    strip = lambda section: dataclasses.replace(section, checkpoint=None) if section else None  # noqa: E731
    return dataclasses.replace(config, checkpoint=None, backbone=strip(config.backbone), vision=strip(config.vision),
                               audio=strip(config.audio))


def _is_ling(llm: nn.Module) -> bool:
    return hasattr(llm, "save_official")  # our Ling backbones read and write the official layout


def checkpoint_reads(model: nn.Module, config: ModelConfig) -> list[TensorRead]:
    """Every tensor the config's official checkpoints give (a whole Ming checkpoint, `checkpoint:`; an official
    Ling backbone, `backbone.checkpoint:`), strictly validated from the headers. `model` may be on the meta
    device. A later checkpoint replaces what an earlier one gave (the backbone's replaces Ming's LLM)."""
    reads: dict[tuple[str, int], TensorRead] = {}
    if config.checkpoint:
        files = checkpoint_files(config.checkpoint)
        placements = ming_placements(model, read_shapes(files), config.checkpoint, config.checkpoint_components)
        reads.update({(p.target, p.offset): TensorRead(files[k], k, p) for k, p in placements.items()})
    llm, prefix = (model.model, "model.") if config.is_omni else (model, "")
    if config.backbone.checkpoint and _is_ling(llm):
        path = config.backbone.checkpoint
        files = checkpoint_files(path)
        validate(llm, read_shapes(files), source=f"{path} (official checkpoint)")
        for key, place in official_placements(llm).items():
            place = dataclasses.replace(place, target=prefix + place.target)
            reads[(place.target, place.offset)] = TensorRead(files[key], key, place)
    return list(reads.values())


@dataclass(frozen=True)
class _Slot:
    """What this rank holds of one of our tensors: `flat` is elements [start, start + flat.numel()) of it."""

    flat: torch.Tensor
    start: int


def _slots(model: nn.Module) -> dict[str, _Slot]:
    slots = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if hasattr(tensor, "ds_tensor"):  # a ZeRO-3 parameter: this rank's partition (the last one is padded)
            size = tensor.ds_tensor.ds_numel
            start = size * torch.distributed.get_rank(group=tensor.ds_process_group)
            slots[name] = _Slot(tensor.ds_tensor.narrow(0, 0, max(0, min(size, tensor.ds_numel - start))), start)
        else:
            slots[name] = _Slot(tensor.detach().view(-1), 0)
    return slots


def _flat_range(stored: Any, begin: int, end: int) -> torch.Tensor:
    """Elements [begin, end) of a flattened safetensors tensor, reading only the rows that hold them."""
    shape = stored.get_shape()
    row = 1
    for size in shape[1:]:
        row *= size
    first, last = begin // row, -(-end // row)
    return stored[first:last].reshape(-1)[begin - first * row:end - first * row]


def stream_checkpoints(model: nn.Module, reads: list[TensorRead]) -> None:
    """Copy each read into what this rank holds of its target (a ZeRO-3 partition, or the whole tensor), one
    file open at a time and one tensor slice in memory at a time; then check that every target is complete."""
    slots = _slots(model)
    written: dict[str, int] = defaultdict(int)
    by_file: dict[Path, list[TensorRead]] = defaultdict(list)
    for read in reads:
        by_file[read.file].append(read)
    with torch.no_grad():
        for file, file_reads in by_file.items():
            with safe_open(str(file), framework="pt") as handle:
                for read in file_reads:
                    place, slot = read.place, slots[read.place.target]
                    begin = max(place.offset, slot.start)
                    end = min(place.offset + place.numel, slot.start + slot.flat.numel())
                    if begin >= end:  # another rank's slice
                        continue
                    values = _flat_range(handle.get_slice(read.key), begin - place.offset, end - place.offset)
                    slot.flat[begin - slot.start:end - slot.start].copy_(values)
                    written[place.target] += end - begin
    incomplete = sorted(t for t in {r.place.target for r in reads} if written[t] != slots[t].flat.numel())
    if incomplete:
        raise CheckpointError(f"the checkpoints left part of {', '.join(incomplete[:8])} unloaded "
                              f"({len(incomplete)} tensor(s))")


def _owners(model: nn.Module) -> dict[str, PreTrainedModel | None]:
    """Module name -> the nearest PreTrainedModel at or above it (whose `_init_weights` initialises it)."""
    owners: dict[str, PreTrainedModel | None] = {}
    for name, module in model.named_modules():
        parent = owners.get(name.rpartition(".")[0]) if name else None
        owners[name] = module if isinstance(module, PreTrainedModel) else parent
    return owners


def recompute_buffers(model: nn.Module) -> None:
    """Non-persistent float buffers (RoPE frequencies) in fp32, computed by the `_init_weights` of the model
    that owns them (transformers' rotary embeddings; ours in models/ling_lite.py), as a plain build has them."""
    persistent = set(model.state_dict(keep_vars=True))
    owners = _owners(model)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        stale = [n for n, b in module.named_buffers(recurse=False)
                 if b is not None and b.is_floating_point() and prefix + n not in persistent]
        if not stale:
            continue
        if owners[name] is None or any(True for _ in module.parameters(recurse=False)):
            raise TypeError(f"{prefix}{stale[0]}: cannot recompute this buffer ({type(module).__name__} has weights "
                            f"or no owning PreTrainedModel)")
        for buffer in stale:
            module._buffers[buffer] = torch.empty(module._buffers[buffer].shape, dtype=torch.float32,
                                                  device=module._buffers[buffer].device)
        owners[name]._init_weights(module)


def initialize_partitioned(model: nn.Module, loaded: set[str]) -> None:
    """Random init of the ZeRO-3 modules whose weights no checkpoint gives, one module's own parameters gathered
    at a time, by the owning model's `_init_weights` (what a plain build's `post_init` applies; transformers'
    own init walks the model with `smart_apply`, which zero.Init's gathering `Module.apply` does not see)."""
    owners = _owners(model)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        params = dict(module.named_parameters(recurse=False))
        if not params or all(prefix + n in loaded for n in params):
            continue
        with _gathered(list(params.values())):
            owners[name]._init_weights(module)


def _gathered(params: list[nn.Parameter]) -> contextlib.AbstractContextManager:
    """ZeRO-3 parameters whole on every rank; rank 0's values are kept on exit."""
    import deepspeed
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def load_own_checkpoints(model: nn.Module, config: ModelConfig, ds_config: dict[str, Any] | None) -> nn.Module:
    """Checkpoints in other layouts, through their own loaders: Qwen2.5-VL / Whisper encoder directories
    (small next to the LLM; under ZeRO-3 gathered one encoder at a time) and transformers-native backbones
    (under ZeRO-3 the LLM is replaced by transformers' own partitioned load). Returns the model."""
    partitioned = is_stage3(ds_config)
    if config.is_omni:
        for section, module in ((config.vision, model.vision), (config.audio, model.audio)):
            if section is not None and section.checkpoint:
                with _gathered(list(module.parameters())) if partitioned else contextlib.nullcontext():
                    module.load_checkpoint(section.checkpoint)  # every rank validates; rank 0's copy is kept
    llm = model.model if config.is_omni else model
    if not config.backbone.checkpoint or _is_ling(llm):
        return model
    if not partitioned:
        load_backbone_checkpoint(llm, config.backbone.checkpoint)
        return model
    llm = native_partitioned(type(llm), llm.config, config.backbone.checkpoint, ds_config)
    if not config.is_omni:
        return llm
    model.model = llm
    return model


def native_partitioned(model_class: type[PreTrainedModel], llm_config: Any, path: str,
                       ds_config: dict[str, Any]) -> PreTrainedModel:
    """A transformers-native checkpoint loaded the way transformers does under ZeRO-3: while an
    `HfDeepSpeedConfig` is alive, `from_pretrained` builds under `deepspeed.zero.Init` and copies each module's
    tensors in on rank 0 with that module's weights gathered (its own key conversions included: the hub's
    per-expert tensors into fused experts), one shard file at a time. As strict as the plain load."""
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(dict(ds_config))  # noqa: F841 (transformers holds only a weak reference)
    try:
        llm, info = model_class.from_pretrained(path, config=llm_config, output_loading_info=True,
                                                local_files_only=True, dtype=torch.float32)
    finally:
        unset_hf_deepspeed_config()
    check_loading_info(info, path, model_class.__name__)
    return llm


def is_stage3(ds_config: dict[str, Any] | None) -> bool:
    return ds_config is not None and ds_config.get("zero_optimization", {}).get("stage") == 3


def build_partitioned(architecture: ModelConfig, ds_config: dict[str, Any], loaded: set[str], source: str) -> nn.Module:
    """Built inside `deepspeed.zero.Init` without its random init (each parameter is partitioned as soon as its
    module is built); then what no checkpoint gives is initialised module by module."""
    import deepspeed
    with deepspeed.zero.Init(config_dict_or_path=dict(ds_config)), no_init_weights():
        model = build_model(architecture, source)
    for buffer in model.buffers():  # persistent float buffers (the expert bias) in fp32, as in a plain build
        if buffer.is_floating_point():
            buffer.data = buffer.data.float()
    initialize_partitioned(model, loaded)
    return model


def build_for_engine(model_config: ModelConfig | str | Path, ds_config: dict[str, Any] | None = None) -> nn.Module:
    """The model of `model_config` with its checkpoints loaded, ready for the engine `ds_config` describes (the
    filled DeepSpeed JSON, training/engine.py `deepspeed_config`; None for the plain engine).

    Under ZeRO-3 the process group must exist (training/engine.py `init_process_group`) and every rank calls this."""
    if isinstance(model_config, ModelConfig):
        source, config = "<config>", model_config
    else:
        source, config = str(model_config), load_model_config(model_config)
    architecture = without_checkpoints(config)
    if config.release is not None and config.release in (config.checkpoint, config.backbone.checkpoint):
        from models.release import check_release_files  # its weights are loaded from it: every file must be there
        check_release_files(config.release)
    with torch.device("meta"):
        twin = build_model(architecture, source)
    reads = checkpoint_reads(twin, config)  # every official checkpoint validated before a weight is allocated
    loaded = {r.place.target for r in reads}
    partitioned = is_stage3(ds_config)
    twin_llm, prefix = (twin.model, "model.") if config.is_omni else (twin, "")
    if partitioned and config.backbone.checkpoint and not _is_ling(twin_llm):
        if not config.is_omni:  # the whole model is transformers': nothing of ours to build first
            return native_partitioned(type(twin), twin.config, config.backbone.checkpoint, ds_config)
        loaded |= {prefix + name for name in twin_llm.state_dict()}  # replaced whole: no random init
    if partitioned:
        model = build_partitioned(architecture, ds_config, loaded, source)
    elif loaded >= set(twin.state_dict()):
        model = twin.to_empty(device="cpu")
    else:
        model = build_model(architecture, source)  # random weights, overwritten in place by the checkpoints
    stream_checkpoints(model, reads)
    recompute_buffers(model)
    return load_own_checkpoints(model, config, ds_config)
