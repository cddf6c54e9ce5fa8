"""The training config (`configs/train/*.yaml`): one dataclass tree, validated when loaded."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import torch

from data.mixture import MixtureSource
from training.objectives import ObjectiveConfig


@dataclass
class LrGroup:
    """Parameters whose full name matches `pattern` (shell-style, `fnmatch`: `linear_proj.*`, `vision.*`)
    train at `lr` instead of `optim.lr`; the schedule scales it like every other group's."""

    pattern: str
    lr: float
    name: str | None = None  # logged as `lr_<name>`; default: the pattern's letters (`linear_proj.*`: linear_proj)

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError("pattern is empty; give a parameter-name pattern such as 'linear_proj.*'")
        if self.lr <= 0:
            raise ValueError(f"lr of pattern {self.pattern!r} must be > 0, got {self.lr}")
        self.name = self.name or re.sub(r"[^0-9A-Za-z]+", "_", self.pattern).strip("_") or "group"


@dataclass
class OptimConfig:
    """AdamW with linear warm-up then cosine decay to `min_lr_ratio * lr` (paper: lr 2e-5, cosine)."""

    lr: float = 2e-5
    # per-group learning rates, first matching pattern wins; the other parameters keep `lr` (training/param_groups.py)
    lr_groups: list[LrGroup] = field(default_factory=list)
    min_lr_ratio: float = 0.0
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas needs two values, got {self.betas}")
        names = [group.name for group in self.lr_groups]
        if "default" in names or len(set(names)) != len(names):
            raise ValueError(f"optim.lr_groups names must be distinct and not 'default' (the rest), got {names}")


@dataclass
class DataConfig:
    """Where batches come from. `text`: a corpus file cut into chunks (language-model stage).

    Without `corpus`, the bundled corpus (data/corpus/, Python standard-library docstrings) is used;
    without `tokenizer`, a BPE sized to the model's vocabulary is trained on the corpus into output_dir.
    """

    kind: Literal["text", "manifest", "shards"] = "text"
    corpus: str | None = None  # text
    tokenizer: str | None = None  # text (multimodal data use the model config's tokenizer)
    manifest: str | None = None  # manifest: JSONL of samples (conversation or caption + media paths)
    shards: str | None = None  # shards: a directory of WebDataset tars, or a brace pattern of URLs (pipe:, https:)
    mixture: list[MixtureSource] = field(default_factory=list)  # shards, resampled: [{name, shards, weight}]
    num_workers: int = 0  # DataLoader worker processes decoding samples (0: in the training process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    timeout_s: float = 600  # with workers: fail (resumably) when no batch comes for this long; 0 waits forever
    shuffle_buffer: int = 1000  # samples shuffled together inside a shard, at most 256 MiB (0: shard order)
    pack: bool = False  # pack several samples per row of the model's max_length (batch_size = rows)
    eval_manifest: str | None = None  # held-out samples for the tier probe
    seq_len: int = 128
    batch_size: int = 16  # micro-batch per device
    eval_fraction: float = 0.05
    # media bounds, read from headers before decoding (data/media.py MediaLimits); a sample over them is skipped
    max_image_pixels: int = 1 << 25  # width x height (PIL's own bomb limit is 89 M)
    max_audio_seconds: float | None = None  # None: the longest clip whose tokens fit the model's max_length
    max_video_seconds: float | None = 3600.0

    def __post_init__(self) -> None:
        if self.max_image_pixels < 1 or (self.max_audio_seconds is not None and self.max_audio_seconds <= 0) or \
                (self.max_video_seconds is not None and self.max_video_seconds <= 0):
            raise ValueError("data.max_image_pixels, data.max_audio_seconds and data.max_video_seconds must be > 0")
        if self.kind == "manifest" and self.manifest is None:
            raise ValueError("data.kind=manifest needs data.manifest (a JSONL file of samples)")
        if self.kind == "shards" and (self.shards is None) == (not self.mixture):
            raise ValueError("data.kind=shards needs exactly one of data.shards (a directory of WebDataset .tar "
                             "shards, read epoch by epoch) or data.mixture (weighted directories, resampled)")
        if self.num_workers < 0 or self.prefetch_factor < 1 or self.shuffle_buffer < 0 or self.timeout_s < 0:
            raise ValueError("data.num_workers, data.shuffle_buffer and data.timeout_s must be >= 0, "
                             "data.prefetch_factor >= 1")
        if self.pack and self.kind == "text":
            raise ValueError("data.pack works with multimodal data (manifest or shards); text chunks are full already")


@dataclass
class TrainConfig:
    model: str  # a configs/models/*.yaml file, or a checkpoint directory written by this trainer
    # the previous stage's weights (its run, checkpoint or export directory), loaded into `model`'s architecture;
    # not applied when the run resumes from its own checkpoint (training/init_from.py)
    init_from: str | None = None
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    seed: int = 0
    deterministic: bool | None = None  # bit-reproducible runs and resumes; None: true on CPU, false on GPU (README)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    gradient_checkpointing: bool = False
    freeze: list[str] = field(default_factory=list)  # parameter-name prefixes kept frozen in this stage
    device: str = "auto"
    output_dir: str = "runs/default"
    log_every: int = 10
    save_every: int = 0  # 0: only the final checkpoint
    keep_checkpoints: int = 2
    resume: bool = True  # continue from output_dir's latest checkpoint when there is one
    overwrite: bool = False  # resume=false over an earlier run: move it aside to <output_dir>.replaced-<time>/
    engine: Literal["plain", "deepspeed"] = "plain"  # deepspeed: ZeRO over every process of the launch
    deepspeed: str | None = None  # the DeepSpeed JSON (configs/deepspeed/zero2.json, zero3.json, zero3_offload.json)
    max_nonfinite_steps: int = 5  # a NaN/Inf loss or gradient skips the step; this many in a row stop the run

    def __post_init__(self) -> None:
        if self.deterministic is None:  # CPU runs resume bit-exact by default; GPU kernels pay for it (README)
            self.deterministic = self.device == "cpu" or (self.device == "auto" and not torch.cuda.is_available())
        for key in ("steps", "grad_accum", "log_every", "keep_checkpoints", "max_nonfinite_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if (self.engine == "deepspeed") != (self.deepspeed is not None):
            raise ValueError("engine: deepspeed needs deepspeed: <a DeepSpeed JSON, e.g. configs/deepspeed/zero2.json>, "
                             f"and deepspeed: is only read with engine: deepspeed (got engine={self.engine!r}, "
                             f"deepspeed={self.deepspeed!r})")
