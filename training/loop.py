"""The training loop: config in, checkpoints, logs and plots out. Resumes exactly after a crash."""
from __future__ import annotations

import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from models.build import build_model
from training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig
from training.data import train_stream
from training.engine import PlainEngine, resolve_device
from training.objectives import build_objective
from training.run_log import RunLog, plot_training_curves
from training.run_dir import start_run


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
            frozen += param.numel()
    return frozen


def make_deterministic() -> None:
    """Deterministic kernels: multithreaded index/scatter reductions otherwise differ in the last bits."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # required by cuBLAS in deterministic mode
    torch.use_deterministic_algorithms(True)


def train(config: TrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Run (or resume) the training job `config` describes; returns the final metrics."""
    start_run(config)  # validate the whole run, then claim output_dir: lock, resume/overwrite rules, run.json, event
    if config.deterministic:
        make_deterministic()
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    model = build_model(config.model)
    frozen = freeze_parameters(model, config.freeze)
    model.to(device)
    objective = build_objective(config.objective, model)
    if config.gradient_checkpointing:
        if objective.routing is not None:  # carries the routing state into the recomputation
            objective.routing.enable_activation_checkpointing(model)
        else:
            model.activation_checkpointing_enable({"use_reentrant": False})
    batches = train_stream(config, model)
    engine = PlainEngine(model, config, device)

    step = 0
    checkpoint = latest_checkpoint(output_dir) if config.resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model)
        engine.load_state_dict(state["engine"])
        batches.load_state_dict(state["data"])
        step = int(state["step"])

    log = RunLog(output_dir)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if checkpoint is None:
        log.log(0, {"event": "start", "trainable_params": trainable, "frozen_params": frozen,
                    "tier_plan": objective.routing.plan.describe() if objective.routing else []})
    stream = iter(batches)
    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="train", disable=not show_progress, dynamic_ncols=True)
    metrics: dict[str, Any] = {}
    reported_skips = sum(batches.skipped.values()) if hasattr(batches, "skipped") else 0
    while step < config.steps:
        started = time.perf_counter()
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        waited = 0.0
        for _ in range(config.grad_accum):
            fetch = time.perf_counter()
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in next(stream).items()}
            waited += time.perf_counter() - fetch
            with engine.autocast():
                result = objective(model, batch, backward=engine.backward, step=step + 1)
            for key, value in {"loss": result.loss, **result.parts}.items():
                sums[key] += value
                counts[key] += 1
        grad_norm = engine.step()
        objective.after_optimizer_step()
        step += 1
        elapsed = time.perf_counter() - started
        metrics = {k: sums[k] / counts[k] for k in sums}
        metrics["supervised_tokens"] = sums["supervised_tokens"]
        metrics.update(lr=engine.lr, grad_norm=grad_norm, step_seconds=elapsed, data_wait=waited / elapsed,
                       tokens_per_second=sums["supervised_tokens"] / elapsed, epoch=batches.epoch)
        if hasattr(batches, "mixture_shares"):  # the mixture as drawn so far, to compare with its weights
            metrics.update({f"share_{name}": share for name, share in batches.mixture_shares().items()})
        if hasattr(batches, "skipped"):  # bad samples are skipped, counted and shown, never fatal
            metrics["skipped_samples"] = sum(batches.skipped.values())
            if metrics["skipped_samples"] > reported_skips:
                log.log(step, {"event": "skipped", "count": metrics["skipped_samples"], "latest": batches.last_skip,
                               "by_reason": dict(batches.skipped)})
                progress.write(f"skipped {metrics['skipped_samples']} bad sample(s) so far; "
                               f"latest: {batches.last_skip}")
                reported_skips = metrics["skipped_samples"]
        progress.update(1)
        if step == 1 or step % config.log_every == 0 or step == config.steps:
            log.log(step, metrics)
            progress.set_postfix({k: f"{metrics[k]:.3f}" if isinstance(metrics[k], float) else metrics[k]
                                  for k in ("loss", "ntp", "erl", "tier_order_agreement", "data_wait",
                                            "skipped_samples")
                                  if k in metrics})
        if (config.save_every and step % config.save_every == 0) or step == config.steps:
            save_checkpoint(output_dir, step, model,
                            {"step": step, "engine": engine.state_dict(), "data": batches.state_dict()},
                            {"model_config": str(config.model), "metrics": metrics}, keep=config.keep_checkpoints)
    progress.close()
    log.close()
    plot_training_curves(log.path, output_dir / "training_curves.png")
    if hasattr(batches, "skipped"):  # the final summary names the skip reasons (this rank's counts)
        metrics["skipped_by_reason"] = dict(batches.skipped)
    return metrics
