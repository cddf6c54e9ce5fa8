"""A run directory is owned by one run.

`start_run(config, source)` is the first thing `train()` does: it validates the run
(`training/validate.py`), checks what the output directory holds, and only then claims it:

- `run.lock` holds the PID and host of the trainer that owns the directory, under an `flock` held for
  the trainer's lifetime (the kernel drops it when the process dies, so a lock left by a killed trainer
  is stale by construction; it is taken over with a warning naming the old PID). A second trainer is
  refused, naming both.
- `run.json` records what a resume must not change: the model config (fingerprint and content), the
  tokenizer's SHA-256, the tier plan, the batch shape and every training option not listed in
  `MAY_CHANGE_ON_RESUME`. A resume that differs is refused, naming the fields, before anything is
  touched.
- `resume=false` over a directory that holds a run is refused unless `overwrite=true`, which moves the
  old run aside to `<output_dir>.replaced-<time>/`; two runs never share a directory.
- `train_config.yaml` and `run.json` are written atomically, after all of that succeeded; each start
  appends a `start` / `resume` event to `metrics.jsonl` naming the step it continues from, and the rows
  of steps that will be replayed are moved out (`training/run_log.py`), so the log reads as one run.
"""
from __future__ import annotations

import atexit
import errno
import fcntl
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from training.checkpoint import checkpoint_root, latest_checkpoint, read_meta, write_atomic
from training.config import TrainConfig
from training.run_log import begin_attempt
from training.validate import RunPlan, RunRefused, as_plain, checkpoint_paths, validate_run, validated_source

LOCK = "run.lock"
RECORD = "run.json"
TRAIN_CONFIG = "train_config.yaml"
# Files that mark a directory as a training run's (anything else in a non-empty output_dir is refused).
RUN_FILES = (LOCK, RECORD, TRAIN_CONFIG, "metrics.jsonl", "checkpoints", "tensorboard", "tokenizer.json",
             "training_curves.png", "tier_probe")

# Training options a resumed run may change: how long it runs and how it logs, the learning-rate schedule,
# where and how it computes (same math). Everything else of the config must match `run.json`; the model,
# the tokenizer and the tier plan are compared by content (a moved file is the same model).
MAY_CHANGE_ON_RESUME = (
    "steps", "optim.lr", "optim.min_lr_ratio", "optim.warmup_steps", "optim.weight_decay", "optim.grad_clip",
    "log_every", "save_every", "keep_checkpoints", "resume", "overwrite", "output_dir",
    "device", "precision", "deterministic", "gradient_checkpointing", "max_nonfinite_steps",
    "objective.execution", "objective.diag_every",
    "data.prefetch_factor", "data.timeout_s", "data.eval_manifest",
    "init_from",  # read only by a fresh start: a resume loads its own checkpoint
    "model", "data.tokenizer", "objective.tiers",  # compared by content below
)

_held: dict[str, int] = {}  # run directories this process holds: resolved path -> lock file descriptor


class RunDirWarning(UserWarning):
    """Something about the run directory the user should know (a stale lock taken over, a run moved aside)."""


@dataclass
class RunState:
    """What the output directory holds and what this start will do with it."""

    mode: str  # "new" | "restart" (a run without checkpoints) | "resume" | "overwrite" | "follower" (not rank 0)
    checkpoint: Path | None = None  # resume: the newest checkpoint (verified when the run starts)
    record: dict[str, Any] | None = None  # the run's run.json, when it has one


@dataclass
class RunStart:
    plan: RunPlan
    mode: str
    step: int  # the step the run continues from (0: from scratch)
    checkpoint: Path | None
    moved_aside: Path | None = None


def start_run(config: TrainConfig, source: str | None = None) -> RunStart | None:
    """Validate, check the output directory, claim it, write the run files; see the module docstring.
    Every rank validates; the main rank (launcher's RANK 0) owns the directory. None on other ranks."""
    plan = validate_run(config, source or validated_source(config))
    if not is_main_process():
        return None  # its first collective (the engine's rendezvous) waits until rank 0 has claimed the directory
    inspect_run_dir(plan)  # refuse before creating anything
    directory = plan.output_dir
    directory.mkdir(parents=True, exist_ok=True)
    taken_over = RunLock(directory).acquire(source)
    state = inspect_run_dir(plan)  # again, now that no other trainer can change it
    moved = move_aside(directory) if state.mode == "overwrite" else None
    write_atomic(directory / TRAIN_CONFIG, yaml.safe_dump(as_plain(config), sort_keys=False))
    if config.data.kind == "text":
        from training.data import ensure_tokenizer
        ensure_tokenizer(config, plan.model.vocab_size)
    record = run_record(plan)
    if state.record is None or state.mode in ("new", "overwrite"):
        write_atomic(directory / RECORD, json.dumps(record, indent=1))
    elif state.record["tokenizer"]["sha256"] != record["tokenizer"]["sha256"]:  # a tokenizer retrained meanwhile
        raise RunRefused(f"{source}: output_dir = {str(directory)!r}: its tokenizer {record['tokenizer']['path']} "
                         f"is not the one the run started with (SHA-256 differs)")
    checkpoint = latest_checkpoint(directory) if state.mode == "resume" else None  # verified, with fallback
    step = checkpoint_step(checkpoint) if checkpoint is not None else 0
    event = {"event": "resume" if checkpoint is not None else "start", "mode": state.mode,
             "checkpoint": checkpoint.name if checkpoint is not None else None, "pid": os.getpid(),
             "host": socket.gethostname(), "argv": sys.argv, "model": plan.model.path,
             "total_params": plan.model.total_params, "tier_plan": plan.tier_plan, "engine": config.engine,
             "world_size": int(os.environ.get("WORLD_SIZE", "1")), "freeze": list(config.freeze),
             **({"moved_aside": str(moved)} if moved else {}),
             **({"took_over_lock_of": taken_over} if taken_over else {}),
             **({"pipe_commands": plan.pipe_commands} if plan.pipe_commands else {})}
    begin_attempt(directory, step, event)
    if plan.pipe_commands and checkpoint is not None:
        print(f"{directory}: resuming runs the shard command(s) of its config again: "
              + "; ".join(plan.pipe_commands), file=sys.stderr)
    return RunStart(plan=plan, mode=state.mode, step=step, checkpoint=checkpoint, moved_aside=moved)


def is_main_process() -> bool:
    """True outside a launcher and on its RANK 0: the one process that owns the run directory."""
    return int(os.environ.get("RANK", "0")) == 0


def inspect_run_dir(plan: RunPlan) -> RunState:
    """What `plan.output_dir` holds and what a start does with it; refuses (`RunRefused`) a directory that
    another trainer owns, that is not a run's, or whose run this config may not continue. Writes nothing.
    Under a launcher only rank 0 looks: the others would see its lock as another trainer's."""
    directory, config, source = plan.output_dir, plan.config, plan.source
    if not is_main_process():  # the main rank holds the lock and may be moving files: nothing to read here
        return RunState("follower")
    name = f"output_dir = {config.output_dir!r}"
    if not directory.is_dir() or not any(directory.iterdir()):
        return RunState("new")
    holder = RunLock(directory).other_holder()
    if holder is not None:
        raise RunRefused(f"{source}: {name} is in use by another trainer ({describe_holder(holder)}); this "
                         f"trainer is pid {os.getpid()} on {socket.gethostname()}. Wait for it to finish or "
                         f"choose another output_dir")
    entries = sorted(p.name for p in directory.iterdir())
    if not set(entries) & set(RUN_FILES):
        raise RunRefused(f"{source}: {name} holds files that are not a training run's ({', '.join(entries[:4])}"
                         f"{', ...' if len(entries) > 4 else ''}); choose a new or empty directory")
    record = read_record(directory)
    checkpoints = sorted(p.name for p in checkpoint_root(directory).glob("step-*")) if \
        checkpoint_root(directory).is_dir() else []
    has_run = bool(checkpoints) or record is not None or (directory / "metrics.jsonl").is_file()
    if not has_run:
        return RunState("new")
    if config.overwrite:
        return RunState("overwrite", record=record)
    what = f"checkpoints up to {checkpoints[-1]}" if checkpoints else "a run without checkpoints"
    if not config.resume:
        raise RunRefused(f"{source}: {name} holds {what} and resume=false; resume it (resume=true), choose "
                         f"another output_dir, or set overwrite=true to move the old run aside")
    if record is not None:
        differences = compare_records(record, run_record(plan, hash_tokenizer=False), directory)
        if differences:
            raise RunRefused(f"{source}: {name} holds {what} of a run that differs in {'; '.join(differences)}. "
                             f"Resume with the run's settings, choose another output_dir, or set "
                             f"overwrite=true to move the old run aside")
    elif checkpoints:
        warnings.warn(f"{directory} has no {RECORD} (a run started before run records): resuming without the "
                      f"compatibility check", RunDirWarning, stacklevel=2)
    if not checkpoints:
        return RunState("restart", record=record)
    return RunState("resume", checkpoint=checkpoint_root(directory) / checkpoints[-1], record=record)


# ---- run.json: what a resume must keep ------------------------------------------------------------------
def run_record(plan: RunPlan, hash_tokenizer: bool = True) -> dict[str, Any]:
    """The run-level fingerprint kept in `run.json`."""
    config, model = plan.config, plan.model
    model_config = as_plain(model.config)
    for key in checkpoint_paths(model.config):  # initial weights: read once, at the first start
        node = model_config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = None
    tokenizer = plan.tokenizer
    return {
        "format": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {"path": model.path, "fingerprint": sha256_text(json.dumps(model_config, sort_keys=True)),
                  "config": model_config},
        "tokenizer": {"path": str(tokenizer),
                      "sha256": sha256_file(tokenizer) if hash_tokenizer and tokenizer.is_file() else None},
        "tier_plan": {"tiers": as_plain(config.objective.tiers), "ranks": plan.tier_plan},
        "batch": {"batch_size": config.data.batch_size, "seq_len": config.data.seq_len,
                  "grad_accum": config.grad_accum, "pack": config.data.pack, "num_workers": config.data.num_workers,
                  "world_size": int(os.environ.get("WORLD_SIZE", "1"))},
        "train_config": as_plain(config),
    }


def compare_records(saved: dict[str, Any], current: dict[str, Any], directory: Path) -> list[str]:
    """The fields in which `current` differs from the run's `saved` record, as `field: saved -> current`."""
    out = []
    if saved["model"]["fingerprint"] != current["model"]["fingerprint"]:
        changed = sorted(_diff(saved["model"]["config"], current["model"]["config"]),
                         key=lambda d: (d[0].count("."), d[0]))  # `backbone.name` before its config fields
        shown = [f"model config {key}: {a!r} -> {b!r}" for key, a, b in changed[:4]] or ["model config"]
        out += shown + ([f"{len(changed) - 4} more model config fields"] if len(changed) > 4 else [])
    tokenizer = Path(saved["tokenizer"]["path"])
    if saved["tokenizer"]["sha256"] and Path(current["tokenizer"]["path"]).is_file():
        digest = sha256_file(Path(current["tokenizer"]["path"]))
        if digest != saved["tokenizer"]["sha256"]:
            out.append(f"tokenizer: {current['tokenizer']['path']} has SHA-256 {digest[:12]}..., the run started "
                       f"with {tokenizer} at {saved['tokenizer']['sha256'][:12]}...")
    if saved["tier_plan"] != current["tier_plan"]:
        out += [f"objective.tiers.{key}: {a!r} -> {b!r}" for key, a, b in
                _diff(saved["tier_plan"]["tiers"], current["tier_plan"]["tiers"])] or [
            f"tier plan: {saved['tier_plan']['ranks']} -> {current['tier_plan']['ranks']}"]
    out += [f"{'data.' if key in ('batch_size', 'seq_len', 'pack', 'num_workers') else ''}{key}: {a!r} -> {b!r}"
            for key, a, b in _diff(saved["batch"], current["batch"])]
    covered = {f"data.{k}" for k in ("batch_size", "seq_len", "pack", "num_workers")} | {"grad_accum"}
    out += [f"{key}: {a!r} -> {b!r}" for key, a, b in _diff(saved["train_config"], current["train_config"])
            if key not in covered and not _may_change(key)]
    return out


def read_record(directory: Path) -> dict[str, Any] | None:
    path = directory / RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not {"model", "tokenizer", "tier_plan", "batch", "train_config"} <= set(record):
            raise ValueError("not a run record")
    except ValueError as err:
        raise RunRefused(f"{path}: unreadable run record ({err}); restore it or start a new output_dir") from None
    return record


def _may_change(key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") or key.startswith(f"{k}[") for k in MAY_CHANGE_ON_RESUME)


def _diff(a: Any, b: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Leaf-level differences of two plain config trees, as (dotted key, a, b)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            out += _diff(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else str(key))
        return out
    return [] if a == b else [(prefix, a, b)]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint holds (`latest_checkpoint` verified its meta.json)."""
    return int(read_meta(checkpoint)["step"])


def move_aside(directory: Path) -> Path:
    """Move every file of the old run (not the lock this trainer holds) to `<dir>.replaced-<time>/`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = directory.with_name(f"{directory.name}.replaced-{stamp}")
    suffix = 1
    while aside.exists():
        aside = directory.with_name(f"{directory.name}.replaced-{stamp}-{suffix}")
        suffix += 1
    aside.mkdir()
    for entry in directory.iterdir():
        if entry.name != LOCK:
            os.rename(entry, aside / entry.name)
    warnings.warn(f"overwrite=true: moved the previous run in {directory} to {aside}", RunDirWarning, stacklevel=2)
    return aside


# ---- the lock ---------------------------------------------------------------------------------------------
def describe_holder(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')}, since {holder.get('started', '?')}"


class RunLock:
    """`run.lock`: an exclusive `flock` on the file, held as long as the trainer runs, and the holder's
    PID, host and start time as its content (for the messages: the kernel decides who holds it)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK
        self.key = str(self.directory.resolve())

    def holder(self) -> dict[str, Any] | None:
        try:
            content = json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None
        return content if isinstance(content, dict) else None

    def other_holder(self) -> dict[str, Any] | None:
        """The holder's record when another process holds the lock now, else None (writes nothing)."""
        if self.key in _held or not self.path.is_file():
            return None
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if _try_flock(fd):
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None
            return self.holder() or {"pid": "?", "host": "?"}
        finally:
            os.close(fd)

    def acquire(self, source: str) -> dict[str, Any] | None:
        """Take the lock (refusing when another process holds it); returns the stale holder taken over."""
        if self.key in _held:  # an earlier train() of this process (finished or failed): ours to reuse
            os.close(_held.pop(self.key))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_flock(fd):
            holder = self.holder() or {"pid": "?", "host": "?"}
            os.close(fd)
            raise RunRefused(f"{source}: output_dir = {str(self.directory)!r} is in use by another trainer "
                             f"({describe_holder(holder)}); this trainer is pid {os.getpid()} on "
                             f"{socket.gethostname()}")
        previous = self.holder()
        stale = previous if previous and previous.get("pid") != os.getpid() else None
        if stale:
            warnings.warn(f"{self.path}: taking over the lock of {describe_holder(stale)}: that trainer is gone "
                          f"(it did not release the lock)", RunDirWarning, stacklevel=2)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        _held[self.key] = fd
        return stale

    def release(self) -> None:
        fd = _held.pop(self.key, None)
        if fd is not None:
            os.ftruncate(fd, 0)  # an empty lock file: released cleanly, nothing stale to report
            os.close(fd)


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise


def _release_all() -> None:
    for key in list(_held):
        RunLock(Path(key)).release()


atexit.register(_release_all)
