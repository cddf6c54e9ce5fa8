"""The plain-torch engine (one CPU or GPU): optimizer, schedule, precision, accumulation, clipping.

It is what the objective talks to through `backward(term)`; a DeepSpeed engine offers the same
four methods (`autocast`, `backward`, `step`, `state_dict`), so the objective and the loop are
unchanged when it plugs in.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from training.config import TrainConfig
from training.schedule import cosine_with_warmup


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and 1-D buffers-as-parameters (common LLM practice)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class PlainEngine:
    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.grad_accum = config.grad_accum
        self.grad_clip = config.optim.grad_clip
        trainable = [p for p in model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("every parameter is frozen: check `freeze` in the training config")
        optim = config.optim
        self.optimizer = torch.optim.AdamW(parameter_groups(model, optim.weight_decay), lr=optim.lr,
                                           betas=tuple(optim.betas), eps=optim.eps)
        self.scheduler = cosine_with_warmup(self.optimizer, config.steps, optim.warmup_steps, optim.min_lr_ratio)
        wants_bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if wants_bf16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the pre-clipping global gradient norm."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
