"""Training checkpoints that cannot be lost: written atomically by every rank, verified on load, pruned by
write order, resumed exactly.

Layout of `<output_dir>/checkpoints/`:

    step-00000100/            one checkpoint: what the ranks' `write` put there, for example
        model.safetensors     the full weights (main rank; `write_weights` refuses NaN/Inf)
        trainer.pt ...        engine state, data position (`write_trainer_state`; loaded with `weights_only=True`)
        rng-rank{r}.pt        each rank's RNG states: torch, python, numpy, CUDA (`save_rng_state`)
        meta.json             step, write sequence, finite, world size, each file's size and SHA-256, the caller's meta
    latest                    the name of the checkpoint to resume from (a `step-N` sibling, nothing else)
    .tmp-step-00000100.<host>.<pid>   a write in progress: per process, removed as stale by the next writer
    .trash-...                a checkpoint being deleted (renamed first, so a crash never leaves half of one)

`save_checkpoint` is engine-agnostic: every rank calls `write(tmp_dir)` to write its files into one
temporary directory; then the main rank records what was written, renames the directory into place
and moves `latest` (the commit point). `latest_checkpoint` verifies sizes and SHA-256 and falls back
to the previous complete checkpoint when the newest is damaged.

Fault injection: `ORDMOE_CHECKPOINT_FAULT=<point>[@<step>]` makes the process SIGKILL itself at that
point of a write (see `FAULT_POINTS`), so tests can stop a real run at each step of the protocol.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model, save_file, save_model
from torch import nn

META = "meta.json"
WEIGHTS = "model.safetensors"
TRAINER_STATE = "trainer.pt"
LATEST = "latest"
FORMAT_VERSION = 2
FAULT_ENV = "ORDMOE_CHECKPOINT_FAULT"
# Where a write can be stopped, in the order a write passes them ("pruning": after the first old
# checkpoint was moved aside, before it is deleted).
FAULT_POINTS = ("tmp_created", "weights_written", "trainer_state_written", "meta_written", "renamed",
                "latest_updated", "pruning")
_RESERVED_META = ("format", "step", "sequence", "written_at", "finite", "world_size", "files")
_CHECKPOINT_NAME = re.compile(r"step-\d+")
_STALE_PREFIXES = (".tmp-", ".trash-")
_verified: dict[str, tuple] = {}  # checkpoint -> `_signature` when it last verified in this process
_writing_step: int | None = None  # the step of the write in progress, for the fault points inside `write`


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (damaged, foreign, incompatible) or cannot be written."""


class NonFiniteWeightsError(CheckpointError):
    """The weights handed to the writer hold NaN or Inf: such a state is never checkpointed."""


class DiskFullError(OSError):
    """ENOSPC (or a quota) while writing: `str()` is `no space left on <path>`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(errno.ENOSPC, f"no space left on {path}")
        self.path = Path(path)

    def __str__(self) -> str:
        return f"no space left on {self.path}"


class CheckpointWarning(UserWarning):
    """A damaged or missing checkpoint was passed over for an older complete one."""


# ---- writing ---------------------------------------------------------------------------------------------
def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir: str | Path, step: int, write: Callable[[Path], None], meta: dict[str, Any],
                    keep: int, *, is_main: bool = True, barrier: Callable[[], None] | None = None,
                    finite: bool = True, world_size: int = 1) -> Path:
    """Write checkpoint `step` of the run in `output_dir`; returns its directory.

    Every rank calls this. The protocol (each `barrier()` is one collective all ranks reach):
      1. the main rank removes stale temporary directories and creates this write's own,
         `.tmp-step-N.<host>.<pid>` (the main rank's host and PID, so two attempts never share one);
      2. barrier; the other ranks find that directory by its `.tmp-step-N.` prefix (the only one: the
         main rank removed the others, and the run lock keeps other trainers away);
      3. every rank calls `write(tmp_dir)`, then barrier;
      4. the main rank records each file's size and SHA-256 in `meta.json` with `meta`, `finite`
         (the caller's word that the state is healthy: pruning never deletes the newest finite
         checkpoint), `world_size` and a write sequence; fsyncs; renames the directory into place;
         points `latest` at it (the commit point); prunes to `keep` checkpoints by write order,
         never the one `latest` names nor the newest finite one; barrier.
    A failure in `write` on one rank ends that process; its launcher (torchrun, deepspeed) then stops the
    others, and the next writer removes the partial directory. A full disk raises `DiskFullError` after
    removing the partial directory; earlier checkpoints are untouched.
    """
    global _writing_step
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    clash = sorted(set(meta) & set(_RESERVED_META))
    if clash:
        raise ValueError(f"checkpoint meta keys {clash} are written by save_checkpoint itself")
    _requested_fault()  # refuse a misspelt fault point before anything is written
    sync = barrier or (lambda: None)
    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    _writing_step = step
    try:
        tmp = None
        if is_main:
            with _disk_full_as_error(root):
                root.mkdir(parents=True, exist_ok=True)
                remove_stale_writes(output_dir)
                tmp = root / f".tmp-{final.name}.{socket.gethostname()}.{os.getpid()}"
                tmp.mkdir()
            fault_point("tmp_created")
        sync()
        if tmp is None:
            tmp = _find_write_in_progress(root, final.name)
        try:
            with _disk_full_as_error(root):
                write(tmp)
        except BaseException:
            if is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        sync()
        if is_main:
            try:
                with _disk_full_as_error(root):
                    _write_meta(tmp, root, step, meta, finite, world_size)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            fault_point("meta_written")
            with _disk_full_as_error(root):
                _move_into_place(tmp, final)
                fault_point("renamed")
                write_atomic(root / LATEST, final.name)
                fault_point("latest_updated")
                _prune(root, keep, final.name)
        sync()
    finally:
        _writing_step = None
    return final


def write_weights(directory: str | Path, weights: nn.Module | Mapping[str, torch.Tensor]) -> Path:
    """`model.safetensors` from a model or a (e.g. ZeRO-3 gathered) state dict; raises
    `NonFiniteWeightsError` naming the first tensor holding NaN or Inf, before writing anything."""
    path = Path(directory) / WEIGHTS
    tensors = weights.state_dict() if isinstance(weights, nn.Module) else weights
    _check_finite(tensors)
    if isinstance(weights, nn.Module):
        save_model(weights, str(path))  # drops tied duplicates, as `load_model` expects
    else:
        save_file(unshared(tensors), str(path))
    fault_point("weights_written")
    return path


def write_trainer_state(directory: str | Path, state: dict[str, Any], name: str = TRAINER_STATE) -> Path:
    """`trainer.pt` (or another name, e.g. per rank): tensors and plain values only."""
    path = Path(directory) / name
    with path.open("wb") as file:  # a Python file: a full disk surfaces as OSError(ENOSPC), not "unexpected pos"
        torch.save(state, file)
    fault_point("trainer_state_written")
    return path


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Replace `path` with `data` so readers see the old or the new content, never a torn file (temp file
    beside it, fsync, rename, fsync the directory). Raises `DiskFullError` when the disk is full."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with _disk_full_as_error(path.parent), tmp.open("wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def remove_stale_writes(output_dir: str | Path) -> list[Path]:
    """Remove the temporary and half-deleted directories earlier writers left under `checkpoints/`
    (crashed or killed mid-write). Call it on the main rank only, once the run owns `output_dir`."""
    root = checkpoint_root(output_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(_STALE_PREFIXES)] if root.is_dir() else []
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def fault_point(name: str) -> None:
    """SIGKILL this process here when `ORDMOE_CHECKPOINT_FAULT` names `name` (and the step being written,
    when given as `name@step`). Engines call it at the points of their own `write` too."""
    fault = _requested_fault()
    if fault is not None and fault[0] == name and fault[1] in (None, _writing_step):
        os.kill(os.getpid(), signal.SIGKILL)


def _requested_fault() -> tuple[str, int | None] | None:
    """(point, step or None) from `ORDMOE_CHECKPOINT_FAULT`; a misspelt point is an error, not a no-op."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return None
    point, _, at_step = spec.partition("@")
    if point not in FAULT_POINTS or not (at_step == "" or at_step.isdigit()):
        raise ValueError(f"{FAULT_ENV}={spec}: expected <point>[@<step>] with a point among {', '.join(FAULT_POINTS)}")
    return point, int(at_step) if at_step else None


# ---- finding and loading -------------------------------------------------------------------------------
def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The checkpoint a run resumes from: the one `latest` names when it verifies, else the newest
    complete one by write order (with a `CheckpointWarning` naming what was damaged). None when the run
    has no checkpoint; `CheckpointError` when it has some but none is valid, or `latest` is foreign."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)),
                        key=_write_order, reverse=True) if root.is_dir() else []
    problems = []
    if pointer.exists():
        name = _sibling_name(pointer)
        named = root / name
        problem = checkpoint_problem(named)
        if problem is None:
            return named
        problems.append(problem)
        candidates = [p for p in candidates if p.name != name]
    elif not candidates:
        return None
    else:
        problems.append(f"{pointer} is missing")
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            warnings.warn(f"{'; '.join(problems)}: resuming from {candidate} instead", CheckpointWarning,
                          stacklevel=2)
            return candidate
        problems.append(problem)
    raise CheckpointError(f"no valid checkpoint in {root}: {'; '.join(problems)}. Restore one, or start over "
                          f"in a new output_dir")


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest valid checkpoint) or a checkpoint directory (verified) -> the checkpoint."""
    path = Path(path)
    if (path / META).is_file() or (path / WEIGHTS).is_file():
        verify_checkpoint(path)
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint directory ({WEIGHTS} + {META}) nor a run "
                                f"directory with {checkpoint_root(path).name}/")
    return latest


def verify_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's meta once every file it lists has its recorded size and SHA-256; else
    `CheckpointError` naming the damaged file."""
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(problem)
    return read_meta(path)


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with the checkpoint at `path` (one line naming the file), or None when it is complete."""
    path = Path(path)
    if not path.is_dir():
        return f"{path} is missing"
    try:
        meta = read_meta(path)
    except CheckpointError as err:
        return str(err)
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return f"{path / META} lists no files (written before checkpoints were verified): it cannot be checked"
    for name, record in files.items():
        file = path / name
        if not _inside(file, path):
            return f"{path / META} lists {name!r}, outside the checkpoint"
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != record.get("size"):
            return f"{file} has {size} bytes, {META} recorded {record.get('size')} (truncated or rewritten)"
    key, signature = str(path.resolve()), _signature(path, files)
    if _verified.get(key) == signature:  # hashed already by this process (e.g. the run check, then the loop)
        return None
    digests = _sha256_all([path / name for name in files])
    for (name, record), digest in zip(files.items(), digests):
        if digest != record.get("sha256"):
            return f"{path / name} does not match the SHA-256 in {META} (corrupted)"
    _verified[key] = signature
    return None


def read_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's `meta.json` as written (not verified: see `verify_checkpoint`)."""
    file = Path(path) / META
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file} is unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{file} is not a JSON object")
    return meta


def check_world_size(path: str | Path, world_size: int, *, can_reshard: bool = False) -> None:
    """Refuse to resume a checkpoint written by another number of processes, naming both, unless the
    engine can reshard its state (then the RNG of ranks the checkpoint lacks starts from the seed)."""
    saved = int(read_meta(path).get("world_size", 1))
    if saved != world_size and not can_reshard:
        raise CheckpointError(f"{path} was written by {saved} process(es) (world_size={saved}); this run has "
                              f"world_size={world_size}: relaunch with {saved} process(es), or start a new "
                              f"output_dir from its weights (init_from)")


def load_model_weights(path: str | Path, model: nn.Module) -> None:
    """Strictly load a trainer checkpoint's weights into a model built from the same config."""
    missing, unexpected = load_model(model, str(Path(path) / WEIGHTS), strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}/{WEIGHTS} does not match the model: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")


# ---- RNG -------------------------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed every generator a checkpoint saves (torch, CUDA, python, numpy), so that what resume restores
    is the same in every process that runs the same config."""
    torch.manual_seed(seed)  # also seeds every CUDA device
    random.seed(seed)
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """This process's RNG states as tensors and plain values (loadable with `weights_only=True`)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"],
                         numpy["has_gauss"], numpy["cached_gaussian"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rng_state(directory: str | Path, rank: int = 0) -> Path:
    """`rng-rank{rank}.pt`: this rank's RNG states."""
    path = Path(directory) / f"rng-rank{rank}.pt"
    with path.open("wb") as file:
        torch.save(rng_state(), file)
    return path


def load_rng_state(directory: str | Path, rank: int = 0) -> bool:
    """Restore this rank's RNG states; False (nothing restored) when the checkpoint has none for `rank`
    (a resharded resume)."""
    path = Path(directory) / f"rng-rank{rank}.pt"
    if not path.is_file():
        return False
    set_rng_state(torch.load(path, map_location="cpu", weights_only=True))
    return True


# ---- pieces ----------------------------------------------------------------------------------------------
def _write_meta(tmp: Path, root: Path, step: int, meta: dict[str, Any], finite: bool, world_size: int) -> None:
    written = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != META)
    files = {file.relative_to(tmp).as_posix(): {"size": file.stat().st_size, "sha256": digest}
             for file, digest in zip(written, _sha256_all(written, fsync=True))}
    sequence = 1 + max((_write_order(p)[0] for p in root.iterdir()
                        if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)), default=0)
    record = {"format": FORMAT_VERSION, "step": step, "sequence": sequence, "written_at": time.time(),
              "finite": bool(finite), "world_size": world_size, "files": files, **meta}
    with (tmp / META).open("w") as handle:
        handle.write(json.dumps(record, indent=2, default=str))
        handle.flush()
        os.fsync(handle.fileno())
    for directory in {tmp, *(p.parent for p in tmp.rglob("*") if p.is_file())}:
        _fsync_dir(directory)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a checkpoint already there (same step, an earlier attempt) is moved aside
    first and deleted after, since a directory cannot be atomically replaced."""
    aside = None
    if final.exists():
        aside = final.with_name(f".trash-{final.name}.{os.getpid()}")
        os.replace(final, aside)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _prune(root: Path, keep: int, latest: str) -> None:
    """Delete all but the `keep` most recently written checkpoints; never the one `latest` names, nor the
    newest finite one. Write order, not step number: a directory may hold an older run's higher steps."""
    checkpoints = sorted((p for p in root.iterdir() if p.is_dir() and _CHECKPOINT_NAME.fullmatch(p.name)),
                         key=_write_order, reverse=True)
    kept = {p.name for p in checkpoints[:keep]} | {latest}
    newest_finite = next((p for p in checkpoints if _is_finite(p)), None)
    if newest_finite is not None:
        kept.add(newest_finite.name)
    for old in checkpoints:
        if old.name in kept:
            continue
        aside = old.with_name(f".trash-{old.name}.{os.getpid()}")
        os.replace(old, aside)
        fault_point("pruning")
        shutil.rmtree(aside, ignore_errors=True)


def _write_order(path: Path) -> tuple[int, int]:
    """(write sequence, step) from meta.json; a checkpoint without a readable sequence sorts oldest."""
    try:
        sequence = int(read_meta(path).get("sequence", 0))
    except (CheckpointError, TypeError, ValueError):
        sequence = 0
    return sequence, int(path.name.split("-")[1])


def _is_finite(path: Path) -> bool:
    try:
        return read_meta(path).get("finite") is True
    except CheckpointError:
        return False


def _sibling_name(pointer: Path) -> str:
    """The checkpoint name `latest` holds; refused unless it is a plain `step-N` sibling."""
    try:
        name = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{pointer} is unreadable ({err})") from None
    if not _CHECKPOINT_NAME.fullmatch(name):
        raise CheckpointError(f"{pointer} names {name!r}, which is not a checkpoint directory beside it "
                              f"(step-N): refusing to follow it. Fix or remove {pointer}")
    return name


def _find_write_in_progress(root: Path, name: str) -> Path:
    found = [p for p in root.glob(f".tmp-{name}.*") if p.is_dir()]
    if len(found) != 1:
        raise CheckpointError(f"{root}: expected one temporary directory .tmp-{name}.* created by the main rank, "
                              f"found {len(found)} (the checkpoint directory must be on a filesystem all ranks share)")
    return found[0]


class _disk_full_as_error:
    """Context manager: a full disk (ENOSPC or EDQUOT, however the library wraps it) -> `DiskFullError`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if error is not None and not isinstance(error, DiskFullError) and _is_disk_full(error, self.path):
            raise DiskFullError(self.path) from error
        return False


def _is_disk_full(error: BaseException, path: Path) -> bool:
    """torch.save reports a full disk as `RuntimeError: unexpected pos` (with the OSError as its context
    only when it wrote to a Python file), safetensors as `SafetensorError: ... No space left on device`;
    a write error on a filesystem with no byte left counts too."""
    if isinstance(error, (OSError, RuntimeError)) and _free_bytes(path) == 0:
        return True
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(path: Path) -> int | None:
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    try:
        return shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        return None


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    floating = [(name, t) for name, t in tensors.items() if torch.is_floating_point(t)]
    if not floating:
        return
    flags = torch.stack([torch.isfinite(t).all().cpu() for _, t in floating])  # one host sync per device
    if not bool(flags.all()):
        name = floating[int((~flags).nonzero()[0])][0]
        raise NonFiniteWeightsError(f"refusing to checkpoint step {_writing_step}: weight {name!r} holds NaN or "
                                    f"Inf (the earlier checkpoints are kept)")


def unshared(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (tied weights): give each key its own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[key] = tensor.clone().contiguous() if ident in seen or not tensor.is_contiguous() else tensor
        seen.add(ident)
    return out


def _sha256(path: Path, fsync: bool = False) -> str:
    with path.open("rb") as file:
        if fsync:  # the bytes hashed are the bytes on disk after a power cut
            os.fsync(file.fileno())
        return hashlib.file_digest(file, "sha256").hexdigest()


def _sha256_all(paths: list[Path], fsync: bool = False) -> list[str]:
    """SHA-256 of many files in threads (hashlib releases the GIL): sharded engine states are many large files."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, max(len(paths), 1))) as pool:
        return list(pool.map(lambda path: _sha256(path, fsync), paths))


def _signature(path: Path, files: Mapping[str, Any]) -> tuple:
    """What a verification saw: size, mtime and inode of meta.json and of every file it lists."""
    stats = [(name, (path / name).stat()) for name in (META, *files)]
    return tuple((name, st.st_size, st.st_mtime_ns, st.st_ino) for name, st in stats)


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
