"""Validate a whole training run before anything is written.

`validate_run(config, source)` checks, in order, the output directory (as a path: nothing is created),
the device, the model (its YAML, the registry names, the files it names; then the model itself built on
the `meta` device: shapes only, no memory, no weights), the tier plan, `freeze` and `optim.lr_groups`
against that model, the tokenizer, `init_from` (the same architecture and tokenizer), the data sources
and the numbers. Every problem is a `RunRefused`: one line naming the file and the
key, which `tools/train.py` prints with exit code 2. The state of the output directory (resume,
overwrite, the lock) is checked next by `training/run_dir.py`, also before anything is written.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from data.manifest import read_manifest
from data.pipeline import list_shards
from data.tokenizer import CORPUS
from models.backbones import BACKBONES
from models.build import ModelConfig, build_model, load_model_config
from models.config import ConfigError, from_dict, to_dict
from models.encoders import AUDIO_ENCODERS, VISION_ENCODERS
from models.parameters import count_parameters
from models.release import ReleaseNotFound
from models.routing import moe_routers
from models.tiers import build_tier_plan
from training.config import TrainConfig
from training.init_from import InitFromError, InitFromMissing, check_init_from, meta_shapes
from training.param_groups import unmatched_pattern_message


class RunRefused(ConfigError):
    """A run that cannot start as configured; the message is one line naming the file and the key."""


class NotOnThisMachine(RunRefused):
    """The run needs an input this machine does not have yet (a hub release not downloaded, shards or a manifest
    not written, an `init_from` stage not trained); the config itself may be right. `tools/train.py --check` lists these instead of refusing."""


@dataclass
class ModelSummary:
    path: str  # the model YAML (or a model directory's model_config.yaml)
    config: ModelConfig
    class_name: str
    total_params: int
    active_params: int
    vocab_size: int  # rows of the input embedding
    parameter_names: list[str]
    parameter_shapes: dict[str, tuple[int, ...]]  # every state-dict entry (the fingerprint `init_from` must match)
    untrainable: list[str]  # parameters built with requires_grad=False (e.g. fixed position tables)
    num_experts: int = 0  # 0: no MoE layers
    top_k: int = 0
    moe_layers: int = 0


@dataclass
class RunPlan:
    """What a validated run will do; `describe()` is what `tools/train.py --check` prints."""

    source: str
    config: TrainConfig
    output_dir: Path
    device: torch.device
    model: ModelSummary
    tier_plan: list[str]  # "tier c: ranks ..." lines; empty for C = 1
    tokenizer: Path  # the file the run tokenizes with (for a text run without one: trained into output_dir)
    data: list[str]  # one line per data source
    init_from: str | None = None  # the model directory the weights start from (or why it is not applied)
    pipe_commands: list[str] = field(default_factory=list)  # `pipe:` shard URLs: shell commands the run executes

    def describe(self) -> str:
        c, m = self.config, self.model
        groups = ", ".join(f"{g.name} {g.lr:g} ({g.pattern})" for g in c.optim.lr_groups)
        moe = f", {m.moe_layers} MoE layers of {m.num_experts} experts, top-{m.top_k}" if m.num_experts else ""
        lines = [f"config: {self.source}",
                 f"model: {m.path} -> {m.class_name}: {m.total_params:,} parameters, {m.active_params:,} active{moe}",
                 *([f"init_from: {self.init_from}"] if self.init_from else []),
                 f"objective: {c.objective.name}, C={c.objective.tiers.num_tiers}"
                 + (f" ({c.objective.tiers.plan}, layers {c.objective.tiers.layers}): " + "; ".join(self.tier_plan)
                    if self.tier_plan else ""),
                 f"tokenizer: {self.tokenizer}" + ("" if self.tokenizer.is_file() else " (trained at the start)"),
                 *[f"data: {line}" for line in self.data],
                 f"batch: {c.data.batch_size} per device x {c.grad_accum} accumulation"
                 + (f", seq_len {c.data.seq_len}" if c.data.kind == "text" else f", max_length {m.config.max_length}"),
                 f"steps: {c.steps} (lr {c.optim.lr:g}, warm-up {c.optim.warmup_steps}; checkpoint every "
                 f"{c.save_every or c.steps}, keep {c.keep_checkpoints})",
                 *([f"lr groups (first match wins): {groups}; the rest {c.optim.lr:g}"] if groups else []),
                 *([f"frozen: {', '.join(c.freeze)}"] if c.freeze else []),
                 f"device: {self.device}, precision {c.precision}, deterministic {c.deterministic}"]
        lines += [f"runs shell command: {command}" for command in self.pipe_commands]
        return "\n".join(lines)


_last_validated: tuple[str, str] | None = None  # (config as JSON, its source) of the last validated config


def validated_source(config: TrainConfig) -> str:
    """The file name the CLI validated this very config under (`train()` validates again, and names it)."""
    if _last_validated is not None and _last_validated[0] == json.dumps(as_plain(config), sort_keys=True):
        return _last_validated[1]
    return "<TrainConfig>"


def validate_run(config: TrainConfig, source: str = "<TrainConfig>",
                 missing: list[str] | None = None) -> RunPlan | None:
    """Check everything a run needs before it writes anything; raises `RunRefused` naming file and key.

    With a `missing` list (`tools/train.py --check`), an input this machine lacks (`NotOnThisMachine`) is
    appended to it instead, the checks that need it are skipped, the rest still run, and None is returned."""
    global _last_validated
    _last_validated = (json.dumps(as_plain(config), sort_keys=True), source)
    output_dir = check_output_path(config, source)
    check_numbers(config, source)
    device = check_device(config, source)
    model = _or_missing(missing, check_model, config, source,
                        then=" (then the model, tier plan, tokenizer and init_from checks run)")
    if model is not None:
        tier_plan = check_objective(config, model, source)
        tokenizer = check_tokenizer(config, model, source, output_dir)
        init_from = _or_missing(missing, check_init, config, model, tokenizer, source)
    data = _or_missing(missing, check_data, config, source)
    if missing:
        return None
    return RunPlan(source=source, config=config, output_dir=output_dir, device=device, model=model,
                   tier_plan=tier_plan, tokenizer=tokenizer, data=data, init_from=init_from,
                   pipe_commands=pipe_commands(config))


def _or_missing(missing: list[str] | None, check, *args, then: str = ""):
    """`check(*args)`; or, when it needs an input this machine lacks and `missing` is given, None with the
    reason appended to `missing`."""
    try:
        return check(*args)
    except NotOnThisMachine as err:
        if missing is None:
            raise
        missing.append(f"{err}{then}")
        return None


# ---- the output directory, as a path ------------------------------------------------------------------------
def check_output_path(config: TrainConfig, source: str) -> Path:
    """`output_dir` must name a directory of its own that this process can create or write into."""
    text = config.output_dir
    if not text.strip():
        raise RunRefused(f"{source}: output_dir is empty; name a directory of its own for the run, "
                         f"e.g. output_dir=runs/my-run")
    path = Path(text).expanduser()
    resolved = path.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise RunRefused(f"{source}: output_dir = {text!r} is the current directory or one above it; a run "
                         f"needs a directory of its own, e.g. output_dir=runs/my-run")
    if path.exists() and not path.is_dir():
        raise RunRefused(f"{source}: output_dir = {text!r} is a file, not a directory")
    existing = next(p for p in (path, *path.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunRefused(f"{source}: output_dir = {text!r}: {existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == path else f"cannot be created: {existing} is not writable"
        raise RunRefused(f"{source}: output_dir = {text!r} {what} by this user")
    return path


def check_numbers(config: TrainConfig, source: str) -> None:
    """Sizes the dataclasses leave to the run (0 means 'off' only where the config says so)."""
    positive = {"data.batch_size": config.data.batch_size, "data.seq_len": config.data.seq_len}
    for key, value in positive.items():
        if value < 1:
            raise RunRefused(f"{source}: {key} = {value} must be >= 1")
    if config.save_every < 0:
        raise RunRefused(f"{source}: save_every = {config.save_every} must be >= 0 (0: only the final checkpoint)")


def check_device(config: TrainConfig, source: str) -> torch.device:
    name = config.device
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise RunRefused(f"{source}: device = {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunRefused(f"{source}: device = {name!r} but this machine has no usable CUDA GPU "
                             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RunRefused(f"{source}: device = {name!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise RunRefused(f"{source}: device = {name!r} but MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise RunRefused(f"{source}: device = {name!r}: the trainer runs on cpu, cuda or mps")
    return device


# ---- the model, built on the meta device ---------------------------------------------------------------------
def model_config_path(model: str) -> Path:
    """The YAML a `model:` value names: the file itself, or a model directory's `model_config.yaml`."""
    path = Path(model)
    return path / "model_config.yaml" if path.is_dir() else path


def check_model(config: TrainConfig, source: str) -> ModelSummary:
    from models.release import is_release_dir
    if is_release_dir(config.model) and not (Path(config.model) / "model_config.yaml").is_file():
        try:  # a released checkpoint's directory (models/release.py)
            return summarize_model(load_model_config(config.model), config.model)
        except ConfigError as err:
            raise RunRefused(f"{source}: model: {err}") from None
    path = model_config_path(config.model)
    if not path.is_file():
        where = "a model directory without model_config.yaml" if Path(config.model).is_dir() else "no such file"
        raise RunRefused(f"{source}: model = {config.model!r}: {where} (a configs/models/*.yaml file or a model "
                         f"directory written by this trainer)")
    try:
        if Path(config.model).is_dir():
            from training.export import load_model_dir_config  # a checkpoint or export directory
            model_config = load_model_dir_config(path.parent)
        else:
            model_config = load_model_config(path)
    except ReleaseNotFound as err:
        raise NotOnThisMachine(f"{source}: model: {err}") from None
    except ConfigError as err:
        raise RunRefused(f"{source}: model: {err}") from None
    return summarize_model(model_config, str(path))


def summarize_model(model_config: ModelConfig, path: str) -> ModelSummary:
    """Registry names, the files the config names, then the model built on `meta` for its shapes."""
    for key, registry, section in (("backbone.name", BACKBONES, model_config.backbone),
                                   ("vision.name", VISION_ENCODERS, model_config.vision),
                                   ("audio.name", AUDIO_ENCODERS, model_config.audio)):
        if section is not None and section.name not in registry:
            try:
                registry.get(section.name)
            except KeyError as err:  # its message suggests the closest registered name
                raise RunRefused(f"{path}: {key}: {err.args[0]}") from None
    for key, value in checkpoint_paths(model_config).items():
        if not Path(value).exists():
            raise RunRefused(f"{path}: {key} = {value!r}: no such checkpoint directory")
    if model_config.tokenizer is not None:
        check_tokenizer_file(Path(model_config.tokenizer), f"{path}: tokenizer")
    return _meta_summary(json.dumps(to_dict(model_config), sort_keys=True), path)


def checkpoint_paths(model_config: ModelConfig) -> dict[str, str]:
    """The initial-weight checkpoints a model config names, by key."""
    sections = {"checkpoint": model_config, "backbone.checkpoint": model_config.backbone,
                "vision.checkpoint": model_config.vision, "audio.checkpoint": model_config.audio}
    return {key: s.checkpoint for key, s in sections.items() if s is not None and s.checkpoint}


@lru_cache(maxsize=8)
def _meta_summary(config_json: str, path: str) -> ModelSummary:
    """Build without weights on `meta` (the CLI validates, then `train()` validates again: built once)."""
    model_config = from_dict(ModelConfig, json.loads(config_json), source=path)
    no_weights = dataclasses.replace(
        model_config, checkpoint=None, backbone=dataclasses.replace(model_config.backbone, checkpoint=None),
        vision=model_config.vision and dataclasses.replace(model_config.vision, checkpoint=None),
        audio=model_config.audio and dataclasses.replace(model_config.audio, checkpoint=None))
    try:
        with torch.device("meta"):
            model = build_model(no_weights, source=path)
    except ConfigError as err:
        raise RunRefused(str(err).splitlines()[0]) from None
    except (ValueError, TypeError, KeyError, AttributeError, AssertionError) as err:  # a backbone's own checks
        raise RunRefused(f"{path}: backbone.config: the model cannot be built: "
                         f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    counts = count_parameters(model)
    routers = moe_routers(model)
    gate = routers[0][1] if routers else None
    return ModelSummary(path=path, config=model_config, class_name=type(model).__name__, total_params=counts.total,
                        active_params=counts.active, vocab_size=model.get_input_embeddings().num_embeddings,
                        parameter_names=[name for name, _ in model.named_parameters()],
                        parameter_shapes=meta_shapes(model),
                        untrainable=[name for name, param in model.named_parameters() if not param.requires_grad],
                        num_experts=gate.num_experts if gate else 0, top_k=gate.top_k if gate else 0,
                        moe_layers=len(routers))


def check_objective(config: TrainConfig, model: ModelSummary, source: str) -> list[str]:
    """The tier plan against the model's experts and MoE layers; the freeze prefixes and the lr-group patterns
    against its parameters."""
    for prefix in config.freeze:
        if not any(name.startswith(prefix) for name in model.parameter_names):
            roots = sorted({name.split(".")[0] for name in model.parameter_names})
            raise RunRefused(f"{source}: freeze: prefix {prefix!r} matches no parameter of {model.path}; "
                             f"top-level modules: {roots}")
    frozen = set(model.untrainable)
    trainable = [n for n in model.parameter_names if n not in frozen and not n.startswith(tuple(config.freeze))]
    problem = unmatched_pattern_message(config.optim.lr_groups, trainable, model.parameter_names)
    if problem:
        raise RunRefused(f"{source}: {problem} (model {model.path})")
    tiers = config.objective.tiers
    if tiers.num_tiers == 1:
        return []
    if not model.num_experts:
        raise RunRefused(f"{source}: objective.tiers.num_tiers = {tiers.num_tiers} needs an MoE model, but "
                         f"{model.path} ({model.class_name}) has no MoE layers; use objective.name=ntp")
    try:
        plan = build_tier_plan(tiers, model.num_experts, model.top_k)
        plan.layers_in_scope(model.moe_layers)
    except ValueError as err:
        raise RunRefused(f"{source}: objective.tiers: {err} (model {model.path}: {model.num_experts} experts, "
                         f"top-{model.top_k}, {model.moe_layers} MoE layers)") from None
    return plan.describe()


def check_init(config: TrainConfig, model: ModelSummary, tokenizer: Path, source: str) -> str | None:
    """`init_from`: a model directory of this run's architecture and tokenizer (training/init_from.py)."""
    try:
        return check_init_from(config, model.config, model.parameter_shapes, tokenizer, source)
    except InitFromMissing as err:  # the previous stage is not trained yet
        raise NotOnThisMachine(str(err)) from None
    except InitFromError as err:
        raise RunRefused(str(err)) from None


# ---- tokenizer and data ------------------------------------------------------------------------------------
def check_tokenizer_file(path: Path, what: str) -> Tokenizer:
    if not path.is_file():
        raise RunRefused(f"{what} = {str(path)!r}: no such file (relative paths are read from {Path.cwd()})")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception on a malformed file
        raise RunRefused(f"{what} = {str(path)!r}: not a readable tokenizer.json "
                         f"({str(err).splitlines()[0][:120]})") from None


def check_tokenizer(config: TrainConfig, model: ModelSummary, source: str, output_dir: Path) -> Path:
    """The tokenizer the run reads: `data.tokenizer` (text), trained into output_dir, or the model's."""
    data = config.data
    if data.kind != "text":
        if model.config.tokenizer is None:
            raise RunRefused(f"{source}: data.kind = {data.kind!r} needs the model config's tokenizer, but "
                             f"{model.path} has no `tokenizer:`")
        return Path(model.config.tokenizer)
    corpus = Path(data.corpus) if data.corpus else CORPUS
    if not corpus.is_file() or corpus.stat().st_size == 0:
        raise RunRefused(f"{source}: data.corpus = {str(corpus)!r}: no such file, or empty")
    if data.tokenizer is None:
        return output_dir / "tokenizer.json"  # trained on the corpus, sized to the model, at the start
    tokenizer = check_tokenizer_file(Path(data.tokenizer), f"{source}: data.tokenizer")
    if tokenizer.get_vocab_size() > model.vocab_size:
        raise RunRefused(f"{source}: data.tokenizer = {data.tokenizer!r} has {tokenizer.get_vocab_size()} tokens "
                         f"but the model's embedding ({model.path}) has {model.vocab_size} rows")
    return Path(data.tokenizer)


def check_data(config: TrainConfig, source: str) -> list[str]:
    """Every data source exists and holds something; one description line per source. Sources that are not
    on this machine yet are all named in one `NotOnThisMachine`, each with what writes it."""
    data = config.data
    if data.kind == "text":
        return [f"text chunks of {data.corpus or CORPUS} ({data.eval_fraction:.0%} held out)"]
    lines, absent = [], []

    def attempt(describe) -> None:
        try:
            lines.append(describe())
        except FileNotFoundError as err:
            absent.append(str(err))

    if data.kind == "manifest":
        attempt(lambda: _manifest_line(source, "data.manifest", data.manifest))
    else:
        sources = [("data.shards", data.shards, None)] if data.shards else [
            (f"data.mixture[{i}].shards", s.shards, s) for i, s in enumerate(data.mixture)]
        for key, shards, mixed in sources:
            attempt(lambda: _shards_line(source, key, shards, mixed))
    if data.eval_manifest is not None:
        attempt(lambda: _manifest_line(source, "data.eval_manifest", data.eval_manifest) + " (held out, tier probe)")
    if absent:
        raise NotOnThisMachine(f"{source}: " + "; ".join(absent))
    return lines


def _shards_line(source: str, key: str, shards: str, mixed: Any) -> str:
    """One shard source's description; FileNotFoundError when none of it is on this machine."""
    try:
        found = list_shards(shards)
    except FileNotFoundError as err:  # its message says how to write them
        raise FileNotFoundError(f"{key} = {shards!r}: {err}") from None
    except ValueError as err:
        raise RunRefused(f"{source}: {key} = {shards!r}: {err}") from None
    if _is_local_pattern(shards) and not any(Path(shard).is_file() for shard in found):
        raise FileNotFoundError(f"{key} = {shards!r}: none of its {len(found)} files is here; point it at your "
                                f"shards (tools/make_shards.py writes them)")
    share = f" (dataset {mixed.name!r}, weight {mixed.weight:g})" if mixed else ""
    return f"{len(found)} shard(s) from {shards}{share}"


def _is_local_pattern(shards: str) -> bool:
    """A brace pattern of local files (not `pipe:` commands or URLs, which only the run can open)."""
    return not str(shards).startswith("pipe:") and "://" not in str(shards)


def _manifest_line(source: str, key: str, path: str | None) -> str:
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"{key} = {path!r}: no such file (the demo's: `python -m tools.make_demo_data`; "
                                f"your own: a JSONL manifest, data/manifest.py)")
    try:
        samples = read_manifest(path)
    except ValueError as err:  # ManifestError names the file and the line
        raise RunRefused(f"{source}: {key}: {err}") from None
    if not samples:
        raise RunRefused(f"{source}: {key} = {path!r} holds no samples")
    return f"{len(samples)} samples from {path}"


def pipe_commands(config: TrainConfig) -> list[str]:
    """Shard URLs that are shell commands (`pipe:`): trusted input, logged at every start."""
    shards = [config.data.shards] + [s.shards for s in config.data.mixture]
    return [s for s in shards if s and str(s).startswith("pipe:")]


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def as_plain(value: Any) -> Any:
    """JSON-ready copy of a config tree (paths and tuples made plain)."""
    return json.loads(json.dumps(to_dict(value), default=str))
