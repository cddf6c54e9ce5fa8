"""Grouping processed examples into batches: a fixed number of examples, or packed rows of tokens.

Both batchers answer `fits(example)` before an example is added, so a stream can close the open batch
*before* reading on and record a position that includes only what went into yielded batches (exact
resume). Packing (`PackedBatcher`) fills `rows` rows of up to `length` tokens greedily in arrival
order (first fit): every example keeps its own position ids (0, 1, ...), labels and media, and the
collated batch carries no `attention_mask`, so transformers' mask builders (and ours, which use them)
derive a block-diagonal causal mask from the restarting `position_ids`: packed samples never attend
to each other. `sample_index` [B, T] names each token's sample (-1 on padding) so per-sample
quantities (OrdMoE's Lbar) stay per sample, and the first token of each packed sample is unsupervised
so no loss crosses a sample boundary.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from data.processor import IGNORE_INDEX, MEDIA_TENSORS, MODALITY_IDS


class FixedBatcher:
    """`batch_size` examples per batch, collated by `collate`."""

    def __init__(self, collate: Callable[[list], Any], batch_size: int) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.collate, self.batch_size, self.examples = collate, batch_size, []

    def fits(self, example: Any) -> bool:
        return len(self.examples) < self.batch_size

    def add(self, example: Any) -> None:
        self.examples.append(example)

    @property
    def full(self) -> bool:
        return len(self.examples) == self.batch_size

    @property
    def empty(self) -> bool:
        return not self.examples

    def flush(self) -> Any:
        batch, self.examples = self.collate(self.examples), []
        return batch


class PackedBatcher:
    """`rows` rows of at most `length` tokens, each holding as many whole examples as fit (first fit)."""

    def __init__(self, rows: int, length: int, pad_id: int) -> None:
        if rows < 1 or length < 2:
            raise ValueError(f"packing needs rows >= 1 and length >= 2, got rows={rows} length={length}")
        self.rows, self.length, self.pad_id = rows, length, pad_id
        self.packed: list[list[dict[str, Any]]] = []
        self.used: list[int] = []

    def _row_for(self, example: dict[str, Any]) -> int | None:
        size = len(example["input_ids"])
        if size > self.length:
            raise ValueError(f"sample {example.get('id')}: {size} tokens do not fit a packed row of {self.length}; "
                             f"the processor's max_length must not exceed the packing length")
        for row, used in enumerate(self.used):
            if used + size <= self.length:
                return row
        return len(self.used) if len(self.used) < self.rows else None

    def fits(self, example: dict[str, Any]) -> bool:
        return self._row_for(example) is not None

    def add(self, example: dict[str, Any]) -> None:
        row = self._row_for(example)
        if row is None:
            raise ValueError("add() on a full packed batch: call fits() first")
        if row == len(self.used):
            self.packed.append([])
            self.used.append(0)
        self.packed[row].append(example)
        self.used[row] += len(example["input_ids"])

    @property
    def full(self) -> bool:
        return len(self.used) == self.rows and all(used == self.length for used in self.used)

    @property
    def empty(self) -> bool:
        return not self.packed

    def flush(self) -> dict[str, Any]:
        batch = collate_packed(self.packed, self.pad_id, self.length)
        self.packed, self.used = [], []
        return batch


def make_batcher(collate: Callable[[list], Any], batch_size: int, pack_length: int | None = None,
                 pad_id: int = 0) -> FixedBatcher | PackedBatcher:
    """Packed rows of `pack_length` tokens when it is set, else `batch_size` examples per batch."""
    if pack_length is not None:
        return PackedBatcher(batch_size, pack_length, pad_id)
    return FixedBatcher(collate, batch_size)


def collate_packed(rows: list[list[dict[str, Any]]], pad_id: int, length: int) -> dict[str, Any]:
    """Packed rows -> one batch; media tensors are concatenated in row-major sample order, the order in
    which their placeholder tokens appear in the flattened `input_ids`."""
    width = min(length, max(sum(len(e["input_ids"]) for e in row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    modality_ids = torch.full((len(rows), width), MODALITY_IDS["text"], dtype=torch.long)
    sample_index = torch.full((len(rows), width), -1, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    examples = [e for row in rows for e in row]
    number = 0
    for r, row in enumerate(rows):
        start = 0
        for example in row:
            end = start + len(example["input_ids"])
            input_ids[r, start:end] = example["input_ids"]
            labels[r, start:end] = example["labels"]
            labels[r, start] = IGNORE_INDEX  # never predict a sample's first token from the previous sample
            modality_ids[r, start:end] = example["modality_ids"]
            sample_index[r, start:end] = number
            position_ids[r, start:end] = torch.arange(end - start)
            start, number = end, number + 1
        # padding counts on from 0 as its own segment: real tokens before it never see it (causal)
        position_ids[r, start:] = torch.arange(width - start)
    batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels, "modality_ids": modality_ids,
                             "position_ids": position_ids, "sample_index": sample_index,
                             "ids": [e.get("id") for e in examples]}
    for key in MEDIA_TENSORS:
        parts = [e[key] for e in examples if key in e]
        if parts:
            batch[key] = torch.cat(parts)
    return batch
