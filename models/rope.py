"""3-D multimodal RoPE: Ming-Lite-Omni v1.5's `rope_scaling: {"type": "3D"}` (Qwen2.5-VL's M-RoPE).

Every token gets three position ids (temporal, height, width). Text tokens (span delimiters and audio
patches included) get the same id in all three rows, one more than the token before. The patch tokens of
an image or video span get `start + (t, h, w)` over the span's token grid after the 2x2 spatial merge, with
`start` the position the span's first patch would have as text; the text after a span continues from the
span's maximum + 1. The rotary dimensions are split into sections ([16, 24, 24] frequency pairs of a
128-dim head, in proportion for smaller heads), each section rotated by one of the three rows.

This follows the official code (inclusionAI/Ming at d97e2f3):
- `modeling_bailingmm.py` `BailingMMNativeForConditionalGeneration.get_rope_index`: the position ids,
  padding (value 1) and `rope_deltas` (max + 1 - padded length, so that generated tokens continue at the
  prompt's maximum + 1, `modeling_bailing_moe.py` `prepare_inputs_for_generation`);
- `modeling_bailing_moe.py` `BailingMoe3DRotaryEmbedding` and `apply_multimodal_rotary_pos_emb`: the
  frequencies and the section split.

One departure, where the official function is ambiguous: Ming marks video frames with `<imagePatch>`, the
image patch token, so `get_rope_index` cannot tell an image span from a video span by its patch tokens and
(a tie in `ed_image < ed_video`) gives the next video's grid to whichever span comes first. Prompts with
only images, only videos, or videos before images get the same ids either way; we tell the kinds apart by
the span's start token (`<image>` / `<video>`), so prompts with an image before a video are right too.
Video time steps are `t` (what the official `generate` computes, which passes no `second_per_grid_ts`),
or `int(t * second_per_grid * tokens_per_second)` when the seconds per temporal grid step are given.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

ROPE_3D = "3D"
PADDING_POSITION = 1  # get_rope_index fills padded positions with 1


def is_3d_rope(config: Any) -> bool:
    """An LLM config with `rope_scaling: {type: 3D}` (models/ling_lite.py keeps the type as `rope_scaling_type`)."""
    if getattr(config, "rope_scaling_type", None) is not None:
        return config.rope_scaling_type == ROPE_3D
    for name in ("rope_scaling", "rope_parameters"):  # other config classes (transformers >= 5 renames it)
        value = getattr(config, name, None)
        if isinstance(value, dict) and (value.get("type") or value.get("rope_type")) == ROPE_3D:
            return True
    return False


def mrope_section(rotary_dim: int) -> tuple[int, int, int]:
    """Frequency pairs per row (t, h, w): a quarter, three eighths, three eighths of them, i.e. the official
    [16, 24, 24] for 128-dim heads (the only size the official code supports), scaled for smaller heads."""
    pairs = rotary_dim // 2
    if pairs % 8:
        raise ValueError(f"3-D RoPE splits the rotary dims as [16, 24, 24] does for 128-dim heads; rotary_dim "
                         f"{rotary_dim} (head_dim x partial_rotary_factor) must be a multiple of 16")
    return pairs // 4, 3 * pairs // 8, 3 * pairs // 8


class LingRope(nn.Module):
    """Default RoPE over the first `int(head_dim * partial_rotary_factor)` dims of each head (rotate-half)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.rotary_dim = int(config.head_dim * float(getattr(config, "partial_rotary_factor", 1.0) or 1.0))
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        dim = self.rotary_dim
        return 1.0 / (float(self.config.rope_theta) ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        """`[B, T, rotary_dim / 2]` angles: position x inverse frequency."""
        return position_ids[..., None].float() * self.inv_freq.to(position_ids.device).float()

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.cat([self.frequencies(position_ids.to(x.device))] * 2, dim=-1)  # both rotate-half halves
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class MultimodalRope(LingRope):
    """Rotary cos/sin for 3-D position ids `[3, B, T]` (a `[B, T]` tensor means text: all rows equal, which is
    exactly 1-D RoPE). Same interface and output layout as the 1-D `LingRope`."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.section = mrope_section(self.rotary_dim)

    def frequencies(self, position_ids: torch.Tensor) -> torch.Tensor:
        if position_ids.ndim == 2:
            position_ids = position_ids.unsqueeze(0).expand(3, -1, -1)
        freqs = super().frequencies(position_ids)  # [3, B, T, rot/2]
        # frequency pairs [0, s0) follow row t, [s0, s0 + s1) row h, the rest row w; the two rotate-half halves
        # repeat the same split (apply_multimodal_rotary_pos_emb's `mrope_section * 2`)
        return torch.cat([part[row] for row, part in enumerate(freqs.split(list(self.section), dim=-1))], dim=-1)


def split_position_ids(position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sequence positions for the attention mask, positions for the rotary embedding)`.

    3-D inputs are `[4, B, T]` (transformers' Qwen2-VL layout): row 0 the 1-D sequence positions (they tell
    packed samples apart when there is no attention mask), rows 1-3 t/h/w. 1-D inputs `[B, T]` serve both."""
    if position_ids.ndim == 3:
        if position_ids.shape[0] != 4:
            raise ValueError(f"3-D position ids must be [4, batch, length] (sequence row + t/h/w), got "
                             f"{tuple(position_ids.shape)}")
        return position_ids[0], position_ids[1:]
    return position_ids, position_ids


@dataclass(frozen=True)
class VisionSpans:
    """Token ids that open image and video spans and the patch tokens inside them (Ming's release: the same
    `<imagePatch>` for both)."""

    image_start: int
    image_patch: int
    video_start: int
    video_patch: int


def rope_index(input_ids: torch.Tensor, spans: VisionSpans, image_grids: torch.Tensor | None = None,
               video_grids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
               segment_positions: torch.Tensor | None = None,
               video_second_per_grid: Sequence[float] | None = None,
               tokens_per_second: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D position ids `[3, B, T]` and rope deltas `[B, 1]` (max + 1 - T per row).

    `image_grids` / `video_grids` `[n, 3]`: each item's token grid (t, h, w) as the LLM sees it (after the
    spatial merge and any temporal pooling), in the order the spans appear in the row-major batch.
    `attention_mask` marks real tokens (left or right padding); `segment_positions` are the 1-D position ids
    of packed rows (each sample restarts at 0) so every packed sample gets positions of its own.
    """
    batch, length = input_ids.shape
    positions = torch.full((3, batch, length), PADDING_POSITION, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    images = _grids(image_grids, [None] * (0 if image_grids is None else len(image_grids)))
    seconds = list(video_second_per_grid) if video_second_per_grid is not None else None
    videos = _grids(video_grids, seconds or [None] * (0 if video_grids is None else len(video_grids)))
    ids = input_ids.cpu()
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.cpu().bool()
    for row in range(batch):
        index = real[row].nonzero().flatten()
        if index.numel() == 0:
            continue
        starts = [0]
        if segment_positions is not None:
            restart = (segment_positions[row].cpu()[index] == 0).nonzero().flatten().tolist()
            starts = sorted(set(starts + restart))
        row_positions = torch.cat([
            _segment(ids[row, index[a:b]], spans, images, videos, tokens_per_second, row)
            for a, b in zip(starts, starts[1:] + [index.numel()])], dim=1)
        positions[:, row, index] = row_positions
        deltas[row] = row_positions.max() + 1 - length
    for kind, grids in (("image", images), ("video", videos)):
        left = sum(1 for _ in grids)
        if left:
            raise ValueError(f"{left} {kind} grid(s) left over: the batch has fewer {kind} spans than {kind} inputs")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def _grids(grids: torch.Tensor | None, seconds: list) -> Iterator[tuple[list[int], float | None]]:
    if grids is None:
        return iter(())
    if len(seconds) != len(grids):
        raise ValueError(f"{len(seconds)} video_second_per_grid values for {len(grids)} videos")
    return iter(list(zip(grids.tolist(), seconds)))


def _segment(ids: torch.Tensor, spans: VisionSpans, images: Iterator, videos: Iterator, tokens_per_second: float,
             row: int) -> torch.Tensor:
    """Positions `[3, n]` of one sample's tokens, from 0."""
    n = ids.numel()
    out = torch.empty(3, n, dtype=torch.long)
    patch = (ids == spans.image_patch) | (ids == spans.video_patch)
    opener = torch.zeros_like(patch)
    opener[1:] = (ids[:-1] == spans.image_start) | (ids[:-1] == spans.video_start)
    cursor, next_position = 0, 0
    for start in (patch & opener).nonzero().flatten().tolist():
        is_image = int(ids[start - 1]) == spans.image_start
        kind, source = ("image", images) if is_image else ("video", videos)
        try:
            (t, h, w), seconds = next(source)
        except StopIteration:
            raise ValueError(f"batch row {row}: more <{kind}> spans than {kind} grids") from None
        out[:, cursor:start] = torch.arange(start - cursor) + next_position
        next_position += start - cursor
        count = t * h * w
        expected = spans.image_patch if is_image else spans.video_patch
        run = ids[start:start + count]
        if run.numel() != count or not bool((run == expected).all()) or (start + count < n and patch[start + count]):
            raise ValueError(f"batch row {row}: the {kind} span at token {start} does not hold exactly {count} patch "
                             f"tokens (its grid is t={t}, h={h}, w={w} after merging)")
        steps = torch.arange(t)
        if seconds is not None:  # absolute time: get_rope_index's `use_abs_time_pos`
            steps = (steps * seconds * tokens_per_second).long()
        block = torch.stack([steps.repeat_interleave(h * w), torch.arange(h).repeat_interleave(w).repeat(t),
                             torch.arange(w).repeat(t * h)])
        out[:, start:start + count] = block + next_position
        next_position = int(out[:, start:start + count].max()) + 1
        cursor = start + count
    out[:, cursor:] = torch.arange(n - cursor) + next_position
    return out


def sequence_positions(attention_mask: torch.Tensor | None, length: int, batch: int,
                       device: torch.device | None = None) -> torch.Tensor:
    """1-D positions `[B, T]` counting real tokens (0 on padding), as transformers' generation prepares them."""
    if attention_mask is None:
        return torch.arange(length, device=device).unsqueeze(0).expand(batch, -1)
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
