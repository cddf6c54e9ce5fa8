"""Projectors: encoder features -> LLM width. `linear`, `mlp{N}x_gelu` (any N) and Ming's `conv_audio`.

Module layouts follow Ming-Lite-Omni's `linear_proj` / `linear_proj_audio` (nn.Sequential indices), so
its checkpoints load without renaming: `mlp2x_gelu` = Linear, GELU, Linear (keys `.0`, `.2`);
`conv_audio` = Conv1d(stride), Transpose, [GELU, Linear] x (depth - 1), Transpose (keys `.0`, `.3`, ...).

Every projector is a `Projector` (an nn.Sequential): `forward` keeps Ming's input layout
(`[..., dim]`, or channels first `[B, dim, frames]` for `conv_audio`); `project(features [n, in_dim])
-> [num_tokens(n), out_dim]` is the layout-independent call for one item; `num_tokens(n)` gives the
output length ahead of time (the processor expands placeholders with it).
"""
from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from models.registry import Registry

PROJECTORS: Registry = Registry("projector")
MLP_NAME = re.compile(r"mlp(\d+)x_gelu")


class Transpose(nn.Module):
    """Swap two dimensions (conv layers want channels first, linear layers last)."""

    def __init__(self, dim0: int, dim1: int) -> None:
        super().__init__()
        self.dims = (dim0, dim1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(*self.dims)


class Projector(nn.Sequential):
    """A token-wise projector (linear / MLP): as many output rows as input rows."""

    channels_first = False

    def num_tokens(self, num_inputs: int) -> int:
        return num_inputs

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[n, in_dim] -> [num_tokens(n), out_dim] for one item (e.g. one audio clip)."""
        if self.channels_first:
            return self(features.T.unsqueeze(0))[0].T
        return self(features)


class ConvProjector(Projector):
    """Ming's audio projector: a strided Conv1d over frames, then an MLP; channels-first in and out."""

    channels_first = True

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__(*layers)
        conv = layers[0]
        self.kernel_size, self.stride = conv.kernel_size[0], conv.stride[0]

    def num_tokens(self, num_inputs: int) -> int:
        return conv_output_frames(num_inputs, self.kernel_size, self.stride)


def mlp_layers(in_dim: int, out_dim: int, depth: int) -> list[nn.Module]:
    if depth < 1:
        raise ValueError(f"an MLP projector needs depth >= 1, got {depth}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    return layers


@PROJECTORS.register("linear")
def linear(in_dim: int, out_dim: int) -> Projector:
    return Projector(nn.Linear(in_dim, out_dim))


@PROJECTORS.register("mlp_gelu")
def mlp_gelu(in_dim: int, out_dim: int, depth: int = 2) -> Projector:
    """LLaVA's `mlp{depth}x_gelu`: Linear, then (GELU, Linear) x (depth - 1). `build_projector` maps the
    name `mlp{N}x_gelu` here with depth N."""
    return Projector(*mlp_layers(in_dim, out_dim, depth))


@PROJECTORS.register("conv_audio")
def conv_audio(in_dim: int, out_dim: int, depth: int = 2, kernel_size: int = 3, stride: int = 2) -> ConvProjector:
    """Ming's `linear_proj_audio`: Conv1d(in, out, kernel, stride, padding kernel // 2) downsamples the frames
    by `stride`, then (GELU, Linear) x (depth - 1) (Ming's `mlp_depth`, `ds_kernel_size`, `ds_stride`)."""
    layers: list[nn.Module] = [nn.Conv1d(in_dim, out_dim, kernel_size, stride=stride, padding=kernel_size // 2),
                               Transpose(-1, -2)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
    layers.append(Transpose(-1, -2))
    return ConvProjector(*layers)


def conv_output_frames(frames: int, kernel_size: int = 3, stride: int = 2) -> int:
    """Frames after `conv_audio`'s convolution (padding kernel_size // 2)."""
    return (frames + 2 * (kernel_size // 2) - kernel_size) // stride + 1


def build_projector(name: str, in_dim: int, out_dim: int, **options: Any) -> Projector:
    """A projector by registry key; `mlp2x_gelu`, `mlp3x_gelu`, ... are `mlp_gelu` with that depth."""
    match = MLP_NAME.fullmatch(name)
    if match:
        if "depth" in options:
            raise ValueError(f"projector {name!r} already says its depth; drop depth={options['depth']}")
        return PROJECTORS.build("mlp_gelu", in_dim, out_dim, depth=int(match[1]), **options)
    return PROJECTORS.build(name, in_dim, out_dim, **options)
