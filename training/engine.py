"""Engines: everything that changes when training runs on one device or on many.

`training/loop.py` and `training/objectives.py` talk only to the `Engine` protocol below. Two
implementations:

- `PlainEngine`: one process, one CPU or GPU; torch AdamW, our cosine schedule, optional bf16 autocast.
- `DeepSpeedEngine`: DeepSpeed ZeRO stage 2 or 3 over every process of the launch (`deepspeed ...` or
  `torchrun ...`), gloo on CPU and nccl on GPU, bf16 parameters on GPU and fp32 on CPU.

Several backward passes per micro-batch (OrdMoE: one per routing tier, then one for the shared inputs)
are exact under ZeRO because the DeepSpeed engine runs with `managed_gradient_accumulation: false`:
every `engine.backward` reduce-scatters its gradients and *adds* them to the rank's gradient partition,
and only `engine.step()` closes the accumulation window (DeepSpeed 0.19 `DeepSpeedEngine.step`,
`finalize_gradient_accumulation_boundary` in `runtime/zero/stage_1_and_2.py` and `stage3.py`). Before
each backward we open a new accumulation phase (`optimizer.clear_backward_seen_flag()`, what
`DeepSpeedEngine.forward` does) so ZeRO-3 adds to its partitions instead of overwriting them; the
tests in tests/training/test_deepspeed.py check every gradient against the single-process reference.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from training.checkpoint import load_model_weights, write_weights
from training.config import TrainConfig
from training.param_groups import group_lrs, parameter_groups
from training.schedule import cosine_with_warmup

ENGINE_STATE = "engine.pt"  # PlainEngine: optimizer + schedule (tensors and plain values, weights_only load)
DEEPSPEED_STATE = "deepspeed"  # DeepSpeedEngine: DeepSpeed's own sharded checkpoint (one tag directory)


class Engine(Protocol):
    """What the training loop and the objective need from an engine (one per process)."""

    model: nn.Module  # the module to call: full parameters on PlainEngine and ZeRO-2, gathered on demand under ZeRO-3
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on the one process that writes logs, plots, the tokenizer and the progress bar."""

    @property
    def lr(self) -> float: ...

    @property
    def group_lrs(self) -> dict[str, float]:
        """`lr_<name>` of every parameter group (`optim.lr_groups`), as scheduled now."""

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch on this engine's device, floating tensors in its compute dtype."""

    def autocast(self) -> contextlib.AbstractContextManager: ...

    def accumulate(self) -> contextlib.AbstractContextManager:
        """Around all micro-batches of one optimizer step."""

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate one loss term of one micro-batch (scaled by 1 / grad_accum)."""

    def backward_shared(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        """Back-propagate `grad` (already scaled) into `outputs`, the inputs every path shares."""

    def step(self, finite: bool = True) -> float | None:
        """Clip, update, schedule; the pre-clipping gradient norm, or None when the step was skipped because
        a loss (`finite=False` on any rank) or a gradient was NaN/Inf on some rank."""

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Numeric metrics averaged over ranks (same keys on every rank)."""

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` summed over ranks, in place."""

    def barrier(self) -> None: ...

    def save(self, directory: Path) -> None:
        """Write this rank's engine state into a checkpoint directory (main rank: also `model.safetensors`)."""

    def load(self, directory: Path) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every weight of the model, gathered onto the main rank (None on the others)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def launch_world() -> tuple[int, int, int]:
    """(rank, local rank, world size) that the launcher (`deepspeed`, `torchrun`, SLURM via either) set."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)),
            int(os.environ.get("WORLD_SIZE", 1)))


def _trainable_groups(model: nn.Module, config: TrainConfig) -> list[dict]:
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("every parameter is frozen: check `freeze` in the training config")
    return parameter_groups(model, config.optim)


def _wants_bf16(config: TrainConfig, device: torch.device) -> bool:
    return config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")


def _move(batch: dict[str, Any], device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    def place(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        value = value.to(device, non_blocking=True)
        return value.to(dtype) if dtype is not None and value.is_floating_point() else value
    return {key: place(value) for key, value in batch.items()}


def _grads_finite(parameters) -> bool:
    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.stack([g.detach().float().abs().max() for g in grads]).isfinite().all())


class PlainEngine:
    """One process on one device: today's trainer (torch AdamW, cosine schedule, optional bf16 autocast)."""

    rank = 0
    world_size = 1

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model = model.to(device)
        self.device = device
        self.grad_accum = config.grad_accum
        self.grad_clip = config.optim.grad_clip
        optim = config.optim
        self.optimizer = torch.optim.AdamW(_trainable_groups(model, config), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps)
        self.scheduler = cosine_with_warmup(self.optimizer, config.steps, optim.warmup_steps, optim.min_lr_ratio)
        self.autocast_dtype = torch.bfloat16 if _wants_bf16(config, device) else None

    @property
    def is_main(self) -> bool:
        return True

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def group_lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer.param_groups)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _move(batch, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def accumulate(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # gradients add up in .grad until step()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def backward_shared(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        torch.autograd.backward(outputs, grad_tensors=grad)

    def step(self, finite: bool = True) -> float | None:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        if not (finite and _grads_finite(params)):
            self.optimizer.zero_grad(set_to_none=True)
            return None
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return metrics

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def barrier(self) -> None:
        pass

    def save(self, directory: Path) -> None:
        write_weights(directory, self.model)  # refuses NaN/Inf weights
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                   directory / ENGINE_STATE)

    def load(self, directory: Path) -> None:
        load_model_weights(directory, self.model)
        state = torch.load(directory / ENGINE_STATE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return None  # the model itself holds every weight


# ---- DeepSpeed -----------------------------------------------------------------------------------------
class DeepSpeedConfigError(ValueError):
    """The DeepSpeed JSON is missing, malformed, or contradicts the training config."""


def deepspeed_config(path: str | Path, config: TrainConfig, world_size: int, bf16: bool) -> dict[str, Any]:
    """The DeepSpeed JSON at `path` with its `"auto"` values filled from the training config.

    A value that is not `"auto"` must agree with the training config, so there is one source of truth.
    """
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"{path}: no such DeepSpeed config file (deepspeed: in the training config)") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DeepSpeedConfigError(f"{path}: cannot read the DeepSpeed config ({err})") from None
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}: not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    if not isinstance(ds, dict):
        raise DeepSpeedConfigError(f"{path}: a DeepSpeed config is a JSON object, got {type(ds).__name__}")

    def fill(node: dict, key: str, value: Any, train_key: str, where: str = "") -> None:
        name = f"{where}{key}"
        current = node.get(key, "auto")
        if current == "auto":
            node[key] = value
        elif current != value and not (isinstance(value, float) and isinstance(current, (int, float))
                                      and math.isclose(current, value)):
            raise DeepSpeedConfigError(f"{path}: {name}={current!r} contradicts {train_key}={value!r} in the "
                                       f"training config (set it to \"auto\" or make them agree)")

    zero = ds.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage") not in (2, 3):
        raise DeepSpeedConfigError(f"{path}: zero_optimization.stage must be 2 or 3, got "
                                   f"{zero.get('stage') if isinstance(zero, dict) else zero!r}")
    micro, accum = config.data.batch_size, config.grad_accum
    fill(ds, "train_micro_batch_size_per_gpu", micro, "data.batch_size")
    fill(ds, "gradient_accumulation_steps", accum, "grad_accum")
    fill(ds, "train_batch_size", micro * accum * world_size,
         f"data.batch_size x grad_accum x world size ({micro} x {accum} x {world_size})")
    fill(ds, "gradient_clipping", float(config.optim.grad_clip), "optim.grad_clip")
    for section, enabled in (("bf16", bf16), ("fp16", False)):
        node = ds.setdefault(section, {})
        if node == "auto":
            node = ds[section] = {}
        fill(node, "enabled", enabled, "precision" if section == "bf16" else
             "precision (fp16 is not supported: use bf16)", f"{section}.")
    # a NaN/Inf gradient skips the step on every rank (the guard of training/loop.py relies on it)
    fill(ds["bf16"], "check_grad_overflow", True, "the non-finite guard", "bf16.")
    # our step() closes the accumulation window, so several backwards per micro-batch add up (module doc)
    fill(ds, "managed_gradient_accumulation", False, "the engine (several backward passes per micro-batch)")
    optim = config.optim
    if "optimizer" in ds:  # DeepSpeed's own optimizer (needed for offload: DeepSpeedCPUAdam)
        node = ds["optimizer"]
        if not isinstance(node, dict) or node.get("type", "").lower() not in ("adam", "adamw"):
            raise DeepSpeedConfigError(f"{path}: optimizer.type must be Adam or AdamW (the training config's "
                                       f"optimizer), got {node!r}")
        params = node.setdefault("params", {})
        fill(params, "lr", float(optim.lr), "optim.lr", "optimizer.params.")
        fill(params, "betas", [float(b) for b in optim.betas], "optim.betas", "optimizer.params.")
        fill(params, "eps", float(optim.eps), "optim.eps", "optimizer.params.")
        fill(params, "weight_decay", float(optim.weight_decay), "optim.weight_decay", "optimizer.params.")
    else:  # torch AdamW, as the plain engine (ZeRO partitions its state all the same)
        ds.setdefault("zero_allow_untested_optimizer", True)
    if ds.get("scheduler", "auto") != "auto":
        raise DeepSpeedConfigError(f"{path}: scheduler must be \"auto\" or absent: the schedule is the training "
                                   f"config's optim.warmup_steps / optim.min_lr_ratio (linear warm-up, cosine)")
    ds.pop("scheduler", None)
    ds.setdefault("steps_per_print", 10**9)  # our loop logs; DeepSpeed's own step prints would duplicate it
    return ds


class DeepSpeedEngine:
    """DeepSpeed ZeRO-2/3 over every process of the launch; `deepspeed.initialize` with our optimizer/schedule."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, rank: int,
                 world_size: int) -> None:
        import deepspeed

        self.device, self.rank, self.world_size = device, rank, world_size
        if world_size > 1 and hasattr(model, "run_idle_encoders"):
            # ZeRO gathers (stage 3) and reduces (stage 2 buckets) per module: every rank must run every
            # encoder, whatever its batch holds (models/omni.py; zero gradient, same outputs)
            model.run_idle_encoders = True
        bf16 = _wants_bf16(config, device)
        self.ds_config = deepspeed_config(config.deepspeed, config, world_size, bf16)
        self.stage = self.ds_config["zero_optimization"]["stage"]
        self.dtype = torch.bfloat16 if bf16 else torch.float32
        if self.stage == 3:
            _gather_encoder_tables(model)
        optim = config.optim
        groups = _trainable_groups(model, config)
        client_optimizer = None
        if "optimizer" not in self.ds_config:
            client_optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)
        engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=client_optimizer, model_parameters=groups if client_optimizer is None else None,
            lr_scheduler=lambda opt: cosine_with_warmup(opt, config.steps, optim.warmup_steps, optim.min_lr_ratio),
            config=self.ds_config)
        self.ds = engine
        self.model = engine.module
        self._window_open = False  # a backward ran since the last step

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    @property
    def group_lrs(self) -> dict[str, float]:
        return group_lrs(self.optimizer.param_groups)

    def prepare_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        return _move(batch, self.device, self.dtype)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # parameters are in the compute dtype (DeepSpeed bf16 / fp32)

    def accumulate(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # step() closes the window (managed_gradient_accumulation: false)

    def backward(self, loss: torch.Tensor) -> None:
        self._begin_backward()
        self.ds.backward(loss)  # scales by 1 / gradient_accumulation_steps

    def backward_shared(self, outputs: torch.Tensor, grad: torch.Tensor) -> None:
        # d/d(outputs) of sum(outputs * grad) is `grad`: the shared part gets exactly the paths' summed
        # gradient, through DeepSpeed's backward (its reduction hooks), without a second scaling
        self._begin_backward()
        self.ds.backward((outputs * grad.to(outputs.dtype)).sum(), scale_wrt_gas=False)

    def _begin_backward(self) -> None:
        """Each backward is a new accumulation phase (what `DeepSpeedEngine.forward` does before a micro-batch).

        ZeRO-3 *copies* a gradient into its partition in the first phase of a window (`micro_step_id == 0`,
        `partition_grads` in stage3.py) and adds after. A parameter first reached in a later phase (the
        embeddings: only the shared backward reaches them) would then add onto the previous step's
        partition. So the window starts from zeroed partitions and every phase adds.
        """
        optimizer = self.ds.optimizer
        optimizer.clear_backward_seen_flag()
        if self.stage == 3:
            if not self._window_open:
                optimizer.grad_partitions_flat_buffer.zero_()
            optimizer.micro_step_id = max(optimizer.micro_step_id, 1)
        self._window_open = True

    def step(self, finite: bool = True) -> float | None:
        self._window_open = False
        if not self._all(finite):  # a NaN/Inf loss on some rank: no rank updates
            self._discard_gradients()
            return None
        self.ds.step()  # DeepSpeed skips a non-finite gradient itself (global norm, reduced over ranks)
        if not self.ds.was_step_applied():
            return None
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def _discard_gradients(self) -> None:
        """Drop the window's accumulated gradient partitions, as DeepSpeed's own overflow branch does
        (`DeepSpeedZeroOptimizer.step` in stage_1_and_2.py; ZeRO-3 copies, not adds, after `zero_grad`)."""
        optimizer = self.ds.optimizer
        optimizer.zero_grad(set_to_none=True)
        if self.stage == 2:
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
            optimizer.micro_step_id = INITIAL_MICRO_STEP_ID
            for group in list(optimizer.averaged_gradients):
                optimizer.averaged_gradients[group] = None
            for group in list(optimizer.all_grad_tensors):
                optimizer.all_grad_tensors[group] = None

    def _all(self, flag: bool) -> bool:
        value = torch.tensor([0.0 if flag else 1.0], device=self.device)
        torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
        return value.item() == 0.0

    def reduce_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        keys = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        if not keys:
            return metrics
        values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(values)
        return {**metrics, **{k: v / self.world_size for k, v in zip(keys, values.tolist())}}

    def sum_over_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        torch.distributed.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        torch.distributed.barrier()

    def save(self, directory: Path) -> None:
        """DeepSpeed's sharded state (every rank) and, on the main rank, the full `model.safetensors`."""
        self.ds.save_checkpoint(str(directory), tag=DEEPSPEED_STATE, save_latest=False)
        state = self.full_state_dict()
        if self.is_main:
            write_weights(directory, self.model if state is None else state)

    def load(self, directory: Path) -> None:
        path, _ = self.ds.load_checkpoint(str(directory), tag=DEEPSPEED_STATE, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}/{DEEPSPEED_STATE}: no DeepSpeed state to resume from")

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """ZeRO-3: every parameter gathered (one at a time, so no rank holds the model twice) onto the main
        rank's CPU; buffers are not partitioned. ZeRO-2 keeps full parameters on every rank: None."""
        if self.stage != 3:
            return None
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        seen: dict[int, str] = {}
        for name, tensor in _named_tensors(self.model):
            if id(tensor) in seen:  # tied weights are stored once, as save_model does
                continue
            seen[id(tensor)] = name
            gather = [tensor] if hasattr(tensor, "ds_id") else []
            with deepspeed.zero.GatheredParameters(gather, modifier_rank=None):
                if self.is_main:
                    state[name] = tensor.detach().to("cpu", copy=True).contiguous()
        return state if self.is_main else None


ENCODERS = ("vision", "audio")  # the omni model's encoder towers (models/omni.py)


def _gather_encoder_tables(model: nn.Module) -> None:
    """ZeRO-3 gathers a module's parameters when that module's forward runs. Encoders read positional tables
    by slicing the embedding's `.weight` instead of calling it (Whisper: `embed_positions.weight[:frames]`),
    which would read an empty partition: each embedding table of an encoder is gathered for the encoder's
    whole forward (and backward) instead."""
    import deepspeed

    for name in ENCODERS:
        encoder = getattr(model, name, None)
        if isinstance(encoder, nn.Module):
            for module in encoder.modules():
                if isinstance(module, nn.Embedding):
                    deepspeed.zero.register_external_parameter(encoder, module.weight)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers under their state-dict names."""
    names = set(model.state_dict().keys())
    for name, param in model.named_parameters(remove_duplicate=False):
        yield name, param
    for name, buffer in model.named_buffers(remove_duplicate=False):
        if name in names:
            yield name, buffer


def prepare_launch(config: TrainConfig) -> tuple[torch.device, dict[str, Any] | None]:
    """This process's device and, under DeepSpeed, its process group and the filled DeepSpeed JSON: what
    `training/zero_init.py` needs before the model exists (zero.Init partitions while building)."""
    _, local_rank, world_size = launch_world()
    device = resolve_device(config.device)
    if config.engine == "plain":
        if world_size > 1:
            raise ValueError(f"engine: plain runs one process, but the launcher started {world_size} "
                             f"(WORLD_SIZE): set engine: deepspeed and deepspeed: configs/deepspeed/zero2.json")
        return device, None
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    init_process_group(device)
    return device, deepspeed_config(config.deepspeed, config, world_size, _wants_bf16(config, device))


def build_engine(model: nn.Module, config: TrainConfig) -> Engine:
    """The engine `config.engine` names, on the device this process owns (LOCAL_RANK under a launcher)."""
    device, _ = prepare_launch(config)  # a second call only reads the environment again
    if config.engine == "plain":
        return PlainEngine(model, config, device)
    rank, _, world_size = launch_world()
    return DeepSpeedEngine(model, config, device, rank, world_size)


def init_process_group(device: torch.device) -> None:
    """One process group for the launch: nccl on GPU, gloo on CPU (a single process is a world of one)."""
    import deepspeed

    if torch.distributed.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
