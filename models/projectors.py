"""Projectors: encoder features -> LLM width. `linear`, `mlp{N}x_gelu` (any N) and Ming's `conv_audio`.

Module layouts follow Ming-Lite-Omni's `linear_proj` / `linear_proj_audio` (nn.Sequential indices), so
its checkpoints load without renaming: `mlp2x_gelu` = Linear, GELU, Linear (keys `.0`, `.2`);
`conv_audio` = Conv1d(stride), Transpose, [GELU, Linear] x (depth - 1), Transpose (keys `.0`, `.3`, ...).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from models.registry import Registry

PROJECTORS: Registry = Registry("projector")


class Transpose(nn.Module):
    """Swap two dimensions (conv layers want channels first, linear layers last)."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dims = (dim0, dim1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(*self.dims)


def mlp_gelu(in_dim: int, out_dim: int, depth: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, out_dim))


@PROJECTORS.register("mlp_gelu")
def mlp(in_dim: int, out_dim: int, depth: int = 2) -> nn.Module:
    """LLaVA's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1)."""
    return mlp_gelu(in_dim, out_dim, depth)


@PROJECTORS.register("conv_audio")
def conv_audio(in_dim: int, out_dim: int, depth: int = 2, kernel_size: int = 3, stride: int = 2) -> nn.Module:
    """Ming's audio projector: a strided Conv1d over frames (downsampling by `stride`), then an MLP.

    Input and output are channels-first `[B, dim, frames]`, as Ming's `linear_proj_audio`.
    """
    layers: list[nn.Module] = [nn.Conv1d(in_dim, out_dim, kernel_size, stride=stride, padding=kernel_size // 2),
                               Transpose(-1, -2)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    layers.append(Transpose(-1, -2))
    return nn.Sequential(*layers)


def conv_output_frames(frames: int, kernel_size: int = 3, stride: int = 2) -> int:
    """Frames after `conv_audio`'s convolution (padding kernel_size // 2)."""
    return (frames + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def build_projector(name: str, in_dim: int, out_dim: int, **options: Any) -> nn.Module:
    """`mlp2x_gelu` / `mlp3x_gelu` ... are `mlp_gelu` with that depth (the LLaVA naming)."""
    match = re.fullmatch(r"mlp(\d+)x_gelu", name)
    if match:
        return PROJECTORS.build("mlp_gelu", in_dim, out_dim, depth=int(match[1]), **options)
    return PROJECTORS.build(name, in_dim, out_dim, **options)
