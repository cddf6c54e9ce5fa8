"""Self-describing model directories: a checkpoint or an export that loads in one call, anywhere.

A model directory holds

    model.safetensors        the weights (every parameter and buffer of the model's state dict)
    model_config.yaml        the model config, fully resolved: `base:` chains merged, the tokenizer copied
                             in (`tokenizer: tokenizer.json`, relative to the directory), initial-weight
                             checkpoints dropped (the trained weights are in model.safetensors)
    tokenizer.json           when the model has a tokenizer
    processor_config.json    what the processor needs besides the model: max_length, chat template,
                             video frames, temporal pooling, a video's audio track

so a run directory copied to another machine evaluates there without its training config.
`load_trained(path)` takes a run directory (its latest valid checkpoint), a checkpoint directory or an
export directory, and for convenience a model YAML (built, with the checkpoints it names).
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_model, save_file, save_model
from tokenizers import Tokenizer
from torch import nn

from data.processor import OmniProcessor
from models.build import ModelConfig, build_model, load_model_config
from models.config import ConfigError, from_dict, read_yaml, to_dict
from models.release import is_release_dir
from training.checkpoint import latest_checkpoint, unshared

MODEL_CONFIG = "model_config.yaml"
TOKENIZER = "tokenizer.json"
PROCESSOR_CONFIG = "processor_config.json"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1

# Paths a model config may hold: read relative to the working directory (as build_model reads them).
_INITIAL_WEIGHTS = (("checkpoint",), ("backbone", "checkpoint"), ("vision", "checkpoint"), ("audio", "checkpoint"))


def write_model_files(directory: str | Path, model_config: str | Path | ModelConfig | dict[str, Any],
                      tokenizer: str | Path | Tokenizer | None = None, max_length: int | None = None,
                      template: str = "ming") -> Path:
    """Write `model_config.yaml`, `tokenizer.json` (when there is one) and `processor_config.json` into
    `directory`, each atomically. `model_config` is a YAML path, a `ModelConfig` or its dict; `tokenizer`
    overrides the config's (e.g. a text run's tokenizer trained into its output directory)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config, source = _config_dict(model_config)
    config = json.loads(json.dumps(config))  # a deep copy of plain data
    dropped = [f"{'.'.join(keys)}={value}" for keys in _INITIAL_WEIGHTS
               if (value := _pop_path(config, keys)) is not None]
    tokenizer = tokenizer if tokenizer is not None else config.get("tokenizer")
    if tokenizer is not None:
        if isinstance(tokenizer, Tokenizer):
            _write_atomic(directory / TOKENIZER, tokenizer.to_str())
        else:
            tokenizer_path = _existing(tokenizer, f"{source}: tokenizer")
            if tokenizer_path.resolve() != (directory / TOKENIZER).resolve():
                _copy_atomic(tokenizer_path, directory / TOKENIZER)
        config["tokenizer"] = TOKENIZER
    if max_length is not None:
        config["max_length"] = max_length
    parsed = from_dict(ModelConfig, _absolute_tokenizer(config, directory), source=source)  # fail here, not at load
    header = f"# resolved from {source} by training/export.py (base chain merged, tokenizer copied in)\n"
    if dropped:
        header += f"# initial weights it named (the trained weights are in {WEIGHTS}): {', '.join(dropped)}\n"
    _write_atomic(directory / MODEL_CONFIG, header + yaml.safe_dump(config, sort_keys=False))
    processor = {"format_version": FORMAT_VERSION, "max_length": parsed.max_length, "template": template,
                 "num_frames": parsed.video.num_frames, "temporal_pool": parsed.video.temporal_pool,
                 "video_audio": parsed.video.with_audio}
    _write_atomic(directory / PROCESSOR_CONFIG, json.dumps(processor, indent=2) + "\n")
    return directory


def export_trained(directory: str | Path, model: nn.Module, model_config: str | Path | ModelConfig | dict[str, Any],
                   tokenizer: str | Path | Tokenizer | None = None, state_dict: dict[str, torch.Tensor] | None = None,
                   max_length: int | None = None, template: str = "ming") -> Path:
    """An export directory: `model.safetensors` plus the files of `write_model_files`. `state_dict` (e.g.
    gathered from ZeRO-3 shards) is written instead of `model`'s own. The directory appears complete or
    not at all (written beside it, then renamed into place)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        if state_dict is None:
            save_model(model, str(tmp / WEIGHTS))
        else:
            save_file(unshared(state_dict), str(tmp / WEIGHTS))
        write_model_files(tmp, model_config, tokenizer, max_length, template)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_trained(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, OmniProcessor | None]:
    """`(model in eval mode, processor)` from a run directory, a checkpoint / export directory, or a model
    YAML. The processor is None only for a model without a tokenizer."""
    model_dir = resolve_model_dir(path)
    if model_dir.is_file() or is_release_dir(model_dir) and not (model_dir / MODEL_CONFIG).is_file():
        # a model YAML or a released checkpoint's directory: build it (with the weights it names)
        config = load_model_config(model_dir)
        model = build_model(config, source=str(model_dir))
        processor_settings: dict[str, Any] = {"template": "ming"}
    else:
        config = load_model_dir_config(model_dir)
        model = build_model(config, source=str(model_dir / MODEL_CONFIG))
        _load_weights(model, model_dir / WEIGHTS)
        processor_settings = json.loads((model_dir / PROCESSOR_CONFIG).read_text())
    model.to(device).eval()
    return model, build_processor(model, config, processor_settings)


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory -> its latest valid checkpoint; a checkpoint / export directory or a YAML -> itself."""
    path = Path(path)
    if path.is_file() or is_release_dir(path) and not (path / MODEL_CONFIG).is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such run, checkpoint or export directory, or model config file")
    if (path / WEIGHTS).is_file():
        if not (path / MODEL_CONFIG).is_file():
            raise FileNotFoundError(f"{path} has {WEIGHTS} but no {MODEL_CONFIG}: it was written before model "
                                    f"directories were self-describing; re-export it with training/export.py "
                                    f"write_model_files(directory, model_config)")
        return path
    checkpoint = latest_checkpoint(path)
    if checkpoint is None:
        raise FileNotFoundError(f"{path} is neither a model directory ({WEIGHTS} + {MODEL_CONFIG}) nor a run "
                                f"directory with checkpoints/latest")
    return resolve_model_dir(checkpoint)


def load_model_dir_config(model_dir: str | Path) -> ModelConfig:
    """The `ModelConfig` of a model directory, its tokenizer path made absolute."""
    model_dir = Path(model_dir)
    source = model_dir / MODEL_CONFIG
    for name in (MODEL_CONFIG, PROCESSOR_CONFIG):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"{model_dir}: missing {name} (written by training/export.py write_model_files)")
    data = yaml.safe_load(source.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return from_dict(ModelConfig, _absolute_tokenizer(data, model_dir), source=str(source))


def build_processor(model: nn.Module, config: ModelConfig, settings: dict[str, Any]) -> OmniProcessor | None:
    """The processor of a model: its encoders' preprocessing, its tokenizer, the saved processor settings."""
    if config.tokenizer is None:
        return None
    return OmniProcessor.for_model(model, config.tokenizer, settings.get("max_length", config.max_length),
                                   template=settings.get("template", "ming"),
                                   num_frames=settings.get("num_frames", config.video.num_frames),
                                   video_audio=settings.get("video_audio", config.video.with_audio),
                                   temporal_pool=settings.get("temporal_pool", config.video.temporal_pool))


# ---- pieces -------------------------------------------------------------------------------------------------
def _config_dict(model_config: str | Path | ModelConfig | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(model_config, ModelConfig):
        return to_dict(model_config), "<ModelConfig>"
    if isinstance(model_config, dict):
        return dict(model_config), "<dict>"
    path = Path(model_config)
    if is_release_dir(path) and not (path / MODEL_CONFIG).is_file():  # a released checkpoint (models/release.py)
        return to_dict(load_model_config(path)), str(path / "config.json")
    if path.is_dir():  # a model directory (e.g. a previous stage's checkpoint): its resolved config
        return yaml.safe_load((path / MODEL_CONFIG).read_text()), str(path / MODEL_CONFIG)
    data = read_yaml(path)
    if "release" in data:  # a YAML on a release: its sections resolved from the release
        return to_dict(load_model_config(path)), str(path)
    if data.get("tokenizer") is not None:
        data["tokenizer"] = str(_existing(data["tokenizer"], f"{path}: tokenizer", path.parent))
    return data, str(path)


def _existing(value: str | Path, what: str, also_under: Path | None = None) -> Path:
    """A path as build_model reads it (relative to the working directory), else relative to `also_under`."""
    path = Path(value)
    for candidate in (path, (also_under / path) if also_under and not path.is_absolute() else None):
        if candidate is not None and candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"{what} = {value}: file not found (relative paths are read from the working "
                            f"directory {Path.cwd()})")


def _absolute_tokenizer(config: dict[str, Any], directory: Path) -> dict[str, Any]:
    if config.get("tokenizer") == TOKENIZER:
        config = dict(config, tokenizer=str((directory / TOKENIZER).resolve()))
    return config


def _pop_path(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    node = config
    for key in keys[:-1]:
        node = node.get(key)
        if not isinstance(node, dict):
            return None
    return node.pop(keys[-1], None)


def _load_weights(model: nn.Module, weights: Path) -> None:
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing (a model directory keeps its weights in {WEIGHTS})")
    missing, unexpected = load_model(model, str(weights), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"{weights} does not match the model its {MODEL_CONFIG} builds: missing keys "
                           f"{sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _copy_atomic(source: Path, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
