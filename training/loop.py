"""The training loop: config in, checkpoints, logs and plots out. Resumes exactly after a crash.

The loop is the same on one device and under DeepSpeed: everything distribution changes (devices,
backward passes, the optimizer step, checkpoint state, metric reduction, which rank writes) is the
engine's (`training/engine.py`). The loop never calls torch.distributed itself.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from training.checkpoint import (TRAINER_STATE, check_world_size, latest_checkpoint, load_rng_state,
                                 remove_stale_writes, save_checkpoint, save_rng_state, seed_everything,
                                 write_trainer_state)
from training.config import TrainConfig
from training.data import train_stream
from training.engine import Engine, build_engine, prepare_launch
from training.export import write_model_files
from training.init_from import apply_init_from
from training.objectives import build_objective
from training.run_log import RunLog, plot_training_curves
from training.run_dir import start_run
from training.zero_init import build_for_engine

SUMMED_METRICS = ("supervised_tokens", "skipped_samples")  # totals over ranks; everything else is averaged


class NonFiniteTrainingError(RuntimeError):
    """`max_nonfinite_steps` steps in a row had a NaN/Inf loss or gradient."""


def freeze_parameters(model: nn.Module, prefixes: list[str]) -> int:
    """Freeze every parameter whose name starts with one of `prefixes`; returns how many were frozen."""
    frozen = 0
    for prefix in prefixes:
        matched = [p for n, p in model.named_parameters() if n.startswith(prefix)]
        if not matched:
            roots = sorted({n.split(".")[0] for n, _ in model.named_parameters()})
            raise ValueError(f"freeze prefix {prefix!r} matches no parameter; top-level modules: {roots}")
        for param in matched:
            param.requires_grad_(False)
            frozen += getattr(param, "ds_numel", param.numel())  # ZeRO-3: the full size
    return frozen


def make_deterministic() -> None:
    """Deterministic kernels: multithreaded index/scatter reductions otherwise differ in the last bits."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS in deterministic mode
    torch.use_deterministic_algorithms(True)


def trainer_state_name(rank: int) -> str:
    """Each rank's data position and step: `trainer.pt` for rank 0, `trainer-rank{r}.pt` for the others."""
    return TRAINER_STATE if rank == 0 else f"trainer-rank{rank}.pt"


def out_of_memory_message(config: TrainConfig, error: BaseException) -> str:
    stage = "plain engine" if config.engine == "plain" else f"DeepSpeed config {config.deepspeed}"
    return (f"out of memory on the device ({error.__class__.__name__}). Lower the memory per rank with: "
            f"data.batch_size={config.data.batch_size} (the micro-batch; raise grad_accum={config.grad_accum} to keep "
            f"the global batch), gradient_checkpointing={config.gradient_checkpointing} (true recomputes activations), "
            f"objective.execution={config.objective.execution} (sequential holds one path's activations, batched all "
            f"C), the ZeRO stage ({stage}: zero_optimization.stage 3 partitions parameters) and offload "
            f"(configs/deepspeed/zero3_offload.json puts optimizer state and parameters in host memory)")


def train(config: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the training job `config` describes; returns the final metrics."""
    # validate the whole run, then (rank 0 only) claim output_dir: lock, resume/overwrite rules, run.json, the
    # start event. The other ranks touch output_dir only after the engine's process group (its rendezvous
    # waits for rank 0) and the barrier below, so they never see a directory rank 0 is still claiming.
    start_run(config)
    if config.deterministic:
        make_deterministic()
    seed_everything(config.seed)
    _, ds_config = prepare_launch(config)  # the process group first: under ZeRO-3 zero.Init partitions while building
    model = build_for_engine(config.model, ds_config)
    apply_init_from(model, config)  # the previous stage's weights; skipped on resume (the checkpoint holds all)
    frozen = freeze_parameters(model, config.freeze)
    objective = build_objective(config.objective, model)
    if config.gradient_checkpointing:
        if objective.routing is not None:  # carries the routing state into the recomputation
            objective.routing.enable_activation_checkpointing(model)
        else:
            model.activation_checkpointing_enable({"use_reentrant": False})
    engine = build_engine(model, config)
    model = engine.model
    output_dir = Path(config.output_dir)
    if engine.is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_writes(output_dir)  # what a killed write left behind
        batches = train_stream(config, model)  # first: a text run trains its tokenizer into output_dir once
    engine.barrier()
    if not engine.is_main:
        batches = train_stream(config, model)

    step = 0
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        check_world_size(checkpoint, engine.world_size)
        engine.load(checkpoint)
        state = torch.load(checkpoint / trainer_state_name(engine.rank), map_location="cpu", weights_only=True)
        batches.load_state_dict(state["data"])
        step = int(state["step"])
        load_rng_state(checkpoint, engine.rank)

    log = RunLog(output_dir) if engine.is_main else None
    # the attempt's `start` / `resume` row is start_run's; the first step row of the attempt adds the sizes
    # (ZeRO-3 partitions parameters: `ds_numel` is the full size)
    sizes = {"trainable_params": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad),
             "frozen_params": frozen}
    stream = iter(batches)
    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="train", dynamic_ncols=True,
                    disable=not (show_progress and engine.is_main))
    metrics: dict[str, Any] = {}
    reported_skips = sum(batches.skipped.values()) if hasattr(batches, "skipped") else 0
    nonfinite_in_row, nonfinite_total = 0, 0
    while step < config.steps:
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        waited = 0.0
        sample_keys: list[str] = []
        try:
            with engine.accumulate():
                for _ in range(config.grad_accum):
                    fetch = time.perf_counter()
                    batch = engine.prepare_batch(next(stream))
                    waited += time.perf_counter() - fetch
                    sample_keys += [str(i) for i in batch.get("ids", []) if i is not None]
                    with engine.autocast():
                        result = objective(model, batch, backward=engine, step=step + 1)
                    for key, value in {"loss": result.loss, **result.parts}.items():
                        sums[key] += value
                        counts[key] += 1
            grad_norm = engine.step(finite=math.isfinite(sums["loss"]))
        except torch.OutOfMemoryError as err:
            raise RuntimeError(out_of_memory_message(config, err)) from err
        objective.after_optimizer_step(engine, applied=grad_norm is not None)
        step += 1
        elapsed = time.perf_counter() - started
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics["supervised_tokens"] = sums["supervised_tokens"]
        metrics.update(lr=engine.lr, step_seconds=elapsed, data_wait=waited / elapsed, epoch=batches.epoch)
        if config.optim.lr_groups:
            metrics.update(engine.group_lrs)
        if hasattr(batches, "mixture_shares"):  # the mixture as drawn so far, to compare with its weights
            metrics.update({f"share_{name}": share for name, share in batches.mixture_shares().items()})
        if hasattr(batches, "skipped"):  # bad samples are skipped, counted and shown, never fatal
            metrics["skipped_samples"] = sum(batches.skipped.values())
        metrics = engine.reduce_metrics(metrics)
        for key in SUMMED_METRICS:
            if key in metrics:
                metrics[key] = round(metrics[key] * engine.world_size)
        metrics["tokens_per_second"] = metrics["supervised_tokens"] / elapsed
        if grad_norm is None:  # a NaN/Inf loss or gradient on some rank: every rank skipped the update
            nonfinite_in_row += 1
            nonfinite_total += 1
            if log is not None:
                log.log(step, {"event": "nonfinite_skip", "in_a_row": nonfinite_in_row, "total": nonfinite_total,
                               "loss": sums["loss"], "sample_keys": sample_keys})
            progress.write(f"step {step}: non-finite loss or gradient, update skipped ({nonfinite_in_row} in a row, "
                           f"{nonfinite_total} in all){'; samples: ' + ', '.join(sample_keys) if sample_keys else ''}")
            if nonfinite_in_row >= config.max_nonfinite_steps:
                progress.close()
                if log is not None:
                    log.close()
                raise NonFiniteTrainingError(
                    f"{nonfinite_in_row} steps in a row had a NaN/Inf loss or gradient (max_nonfinite_steps="
                    f"{config.max_nonfinite_steps}); stopped without checkpointing them. The last checkpoint is "
                    f"the last finite state. Try a lower optim.lr={config.optim.lr}, a longer optim.warmup_steps="
                    f"{config.optim.warmup_steps}, optim.grad_clip={config.optim.grad_clip}, precision="
                    f"{config.precision}, or check the data (samples: {', '.join(sample_keys) or 'keys not recorded'})")
        else:
            nonfinite_in_row = 0
        metrics.update(grad_norm=grad_norm if grad_norm is not None else float("nan"), nonfinite_steps=nonfinite_total)
        if log is not None and hasattr(batches, "skipped") and metrics["skipped_samples"] > reported_skips:
            log.log(step, {"event": "skipped", "count": metrics["skipped_samples"], "latest": batches.last_skip,
                           "by_reason": dict(batches.skipped)})
            progress.write(f"skipped {metrics['skipped_samples']} bad sample(s) so far; latest: {batches.last_skip}")
            reported_skips = metrics["skipped_samples"]
        progress.update(1)
        if log is not None and (step == 1 or step % config.log_every == 0 or step == config.steps):
            log.log(step, {**metrics, **sizes})
            sizes = {}
            progress.set_postfix({k: f"{metrics[k]:.3f}" if isinstance(metrics[k], float) else metrics[k]
                                  for k in ("loss", "ntp", "erl", "tier_order_agreement", "data_wait",
                                            "skipped_samples", "nonfinite_steps")
                                  if k in metrics})
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            save(config, engine, batches, step, metrics)
    progress.close()
    if log is not None:
        log.close()
        plot_training_curves(log.path, output_dir / "training_curves.png")
    if hasattr(batches, "skipped"):  # the final summary names the skip reasons (this rank's counts)
        metrics["skipped_by_reason"] = dict(batches.skipped)
    return metrics


def save(config: TrainConfig, engine: Engine, batches: Any, step: int, metrics: dict[str, Any]) -> Path:
    """One checkpoint through the atomic writer: every rank writes its engine state, data position and RNG;
    the main rank also the full weights and the model files (a self-describing model directory)."""
    output_dir = Path(config.output_dir)

    def write(directory: Path) -> None:
        engine.save(directory)
        write_trainer_state(directory, {"step": step, "data": batches.state_dict()},
                            name=trainer_state_name(engine.rank))
        save_rng_state(directory, engine.rank)
        if engine.is_main:
            tokenizer = output_dir / "tokenizer.json" if config.data.kind == "text" and config.data.tokenizer is None \
                else config.data.tokenizer if config.data.kind == "text" else None
            write_model_files(directory, config.model, tokenizer)

    return save_checkpoint(output_dir, step, write, {"model_config": str(config.model), "metrics": metrics},
                           keep=config.keep_checkpoints, is_main=engine.is_main, barrier=engine.barrier,
                           finite=math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]),
                           world_size=engine.world_size)
