"""`init_from:`: a stage starts from the previous stage's weights (paper pipeline: alignment -> pretraining -> SFT).

`init_from` names the previous stage's run directory (its latest valid checkpoint), one checkpoint
directory, or an export directory (training/export.py). The model is built from this run's `model:`
and the weights are loaded strictly: every key, every shape. `check_init_from` refuses, before
training, a directory whose model is another architecture (fingerprint: the component names and every
parameter's name and shape), naming the config fields that differ. `apply_init_from` is what the loop
calls; it runs before the engine is built, on the plain module, so it works for every engine.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from tokenizers import Tokenizer
from torch import nn

from models.build import ModelConfig, build_model
from models.config import ConfigError, to_dict
from models.release import is_release_dir
from training.checkpoint import checkpoint_root
from training.config import TrainConfig
from training.export import MODEL_CONFIG, TOKENIZER, WEIGHTS, load_model_dir_config, resolve_model_dir

# Model-config fields that do not change the weights: where files are, and how the processor cuts samples.
_NOT_ARCHITECTURE = ("tokenizer", "checkpoint", "release", "release_files", "checkpoint_components", "max_length",
                     "video")


class InitFromError(ConfigError):
    """`init_from` names no usable model directory, or one of another architecture; names the path and field."""


class InitFromMissing(InitFromError):
    """`init_from` names nothing that exists yet: the previous stage has not been trained (or not here)."""


def init_model_dir(init_from: str | Path) -> Path:
    """The model directory (`model.safetensors` + `model_config.yaml`) that `init_from` names."""
    path = Path(init_from)
    if path.is_file() or is_release_dir(path) and not (path / MODEL_CONFIG).is_file():
        raise InitFromError(f"init_from = {str(init_from)!r} is a model config or a released checkpoint, not a "
                            f"trained stage; put it in `model:` (its weights load at build time)")
    try:
        model_dir = resolve_model_dir(path)
    except FileNotFoundError as err:
        raise InitFromMissing(f"init_from = {str(init_from)!r}: {err} (run the previous stage first, or point at its "
                              f"output_dir)") from None
    if not (model_dir / WEIGHTS).is_file():
        raise InitFromError(f"init_from = {str(init_from)!r}: {model_dir / WEIGHTS} is missing")
    return model_dir


def is_resuming(config: TrainConfig) -> bool:
    """The run continues from its own checkpoint, which holds every weight: `init_from` is not applied.

    The same rule as the loop's resume (`config.resume` and a checkpoint in `output_dir`); which
    checkpoint is valid is the loop's and the run directory's business."""
    root = checkpoint_root(config.output_dir)
    return config.resume and root.is_dir() and any(root.glob("step-*"))


def meta_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape: the part of a model's fingerprint that a strict load needs."""
    # a ZeRO-3 parameter (built under zero.Init) is an empty placeholder; ds_shape is its real shape
    return {name: tuple(getattr(tensor, "ds_shape", tensor.shape)) for name, tensor in
            model.state_dict(keep_vars=True).items()}


def check_init_from(config: TrainConfig, model_config: ModelConfig, shapes: Mapping[str, Sequence[int]],
                    tokenizer: Path | None, source: str) -> str | None:
    """Refuse an `init_from` that cannot start this run; returns the line `--check` prints (None: no init_from).

    `model_config` / `shapes`: this run's model (its config and state-dict shapes, built on `meta`);
    `tokenizer`: the file the run tokenizes with (token ids must mean the same in both stages)."""
    if config.init_from is None:
        return None
    if is_resuming(config):
        return f"{config.init_from} (not applied: the run resumes from its own checkpoint)"
    where = f"{source}: init_from = {config.init_from!r}"
    if config.data.kind == "text" and config.data.tokenizer is None:
        raise InitFromError(f"{where}: a text run trains a new tokenizer unless data.tokenizer is set; set it to the "
                            f"previous stage's ({config.init_from}/.../{TOKENIZER}) so token ids keep their meaning")
    try:
        model_dir = init_model_dir(config.init_from)
        found = load_model_dir_config(model_dir)
    except InitFromError as err:  # its own kind (InitFromMissing: not trained yet), with the file named
        raise type(err)(f"{source}: {err}") from None
    except (ConfigError, FileNotFoundError) as err:
        raise InitFromError(f"{where}: {err}") from None
    differences = config_differences(model_config, found)
    names = [key for key in ("backbone.name", "vision.name", "audio.name") if key in differences]
    found_shapes = _meta_model_shapes(found, str(model_dir / MODEL_CONFIG))
    mismatch = shape_mismatch(dict(shapes), found_shapes)
    if names or mismatch:
        fields = "; ".join(differences[key] for key in (names or list(differences))[:4]) or "no config field"
        raise InitFromError(f"{where} ({model_dir / MODEL_CONFIG}) is another architecture than model = "
                            f"{config.model!r}: {fields}" + (f" ({mismatch})" if mismatch else ""))
    previous = model_dir / TOKENIZER
    if tokenizer is not None and previous.is_file() and tokenizer.is_file() and \
            Tokenizer.from_file(str(tokenizer)).get_vocab() != Tokenizer.from_file(str(previous)).get_vocab():
        raise InitFromError(f"{where}: its tokenizer ({model_dir / TOKENIZER}) is not the one this run reads "
                            f"({tokenizer}): token ids would change meaning between the stages")
    return str(model_dir)


def config_differences(expected: ModelConfig, found: ModelConfig) -> dict[str, str]:
    """Dotted config key -> 'key = run's value in model, its value in init_from' for every field that differs,
    file locations and processor settings left out (`_NOT_ARCHITECTURE`); `.name` fields first."""
    left, right = _flat(to_dict(expected)), _flat(to_dict(found))
    keys = sorted(set(left) | set(right), key=lambda k: (not k.endswith(".name"), k))
    return {key: f"{key} = {left.get(key)!r} in model, {right.get(key)!r} in init_from" for key in keys
            if left.get(key) != right.get(key) and key.split(".")[0] not in _NOT_ARCHITECTURE
            and not key.endswith(".checkpoint")}


def shape_mismatch(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, tuple[int, ...]]) -> str | None:
    """The first key missing on either side or of another shape, said in words; None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [key for key in expected if key in found and tuple(expected[key]) != tuple(found[key])]
    if wrong:
        key = wrong[0]
        return (f"{len(wrong)} tensor(s) of another shape, e.g. {key}: {list(expected[key])} in this run's model, "
                f"{list(found[key])} in init_from")
    if missing or unexpected:
        return (f"{len(missing)} key(s) of this run's model missing in init_from, e.g. {missing[:2]}; "
                f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}")
    return None


def load_init_weights(model: nn.Module, init_from: str | Path) -> Path:
    """Load the weights of the model directory `init_from` names into `model`, strictly; returns the file.

    Raises `InitFromError` naming the file and the first key that is missing, unexpected or of another
    shape, before any weight is changed."""
    weights = init_model_dir(init_from) / WEIGHTS
    with safe_open(str(weights), framework="pt") as file:
        found = {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    expected = meta_shapes(model)
    wrong = [key for key in found if key in expected and found[key] != expected[key]]
    if wrong:  # safetensors' own load would fail halfway through, with torch's size-mismatch message
        raise InitFromError(f"{weights}: {shape_mismatch(expected, {k: found[k] for k in wrong})} (init_from = "
                            f"{str(init_from)!r}; this run's model is built from `model:`)")
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3: each rank fills its own partitions
        _stream_into_partitions(model, weights, found, str(init_from))
        return weights
    missing, unexpected = load_model(model, str(weights), strict=False)  # tied weights are stored once
    if missing or unexpected:
        raise InitFromError(f"{weights} does not match this run's model (init_from = {str(init_from)!r}): missing "
                            f"keys {sorted(missing)[:3]}, unexpected keys {sorted(unexpected)[:3]}")
    return weights


def _stream_into_partitions(model: nn.Module, weights: Path, found: Mapping[str, tuple[int, ...]], init_from: str) -> None:
    """Every tensor of `weights` into this rank's slice of the same-named tensor (training/zero_init.py), with
    the strict checks of the plain path: a key of ours absent from the file must be a tied copy of one in it."""
    from models.checkpoint import Placement
    from training.zero_init import TensorRead, stream_checkpoints
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(set(found) - set(state))
    stored = {id(state[key]) for key in found if key in state}
    missing = sorted(key for key in state if key not in found and id(state[key]) not in stored)
    if missing or unexpected:
        raise InitFromError(f"{weights} does not match this run's model (init_from = {init_from!r}): missing "
                            f"keys {missing[:3]}, unexpected keys {unexpected[:3]}")
    stream_checkpoints(model, [TensorRead(weights, key, Placement(key, 0, shape)) for key, shape in found.items()])


def apply_init_from(model: nn.Module, config: TrainConfig) -> Path | None:
    """The loop's call: load `config.init_from` into the freshly built `model`, unless there is none or the
    run resumes (its checkpoint, loaded after this, holds every weight, so a resume never depends on the
    previous stage's directory still being there). Returns the weights file loaded, if any."""
    if config.init_from is None or is_resuming(config):
        return None
    return load_init_weights(model, config.init_from)


def _meta_model_shapes(model_config: ModelConfig, source: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a model directory's model, built on `meta` (its config names no initial weights: export drops them)."""
    try:
        with torch.device("meta"):
            return meta_shapes(build_model(model_config, source=source))
    except (ConfigError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise InitFromError(f"{source}: the init_from model cannot be built: {str(err).splitlines()[0]}") from None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
