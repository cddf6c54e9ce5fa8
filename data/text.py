"""Plain-text language-model data: a corpus file cut into fixed-length token chunks, resumable exactly.

The corpus is tokenized once with a `tokenizers` tokenizer, split into `seq_len`-token chunks
(documents separated by EOS), and a held-out tail is kept for evaluation. Batches follow a
permutation drawn from `(seed, epoch)`, so the stream position is two integers and a restart
continues with the next unseen chunk.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer


class TextChunks:
    """All chunks of a corpus as a `[num_chunks, seq_len]` LongTensor, plus the held-out split."""

    def __init__(self, corpus: str | Path, tokenizer: Tokenizer | str | Path, seq_len: int,
                 eval_fraction: float = 0.05, eos_token: str = "<|endoftext|>") -> None:
        corpus = Path(corpus)
        if not corpus.is_file():
            raise FileNotFoundError(f"text corpus not found: {corpus}")
        if not isinstance(tokenizer, Tokenizer):
            tokenizer = Tokenizer.from_file(str(tokenizer))
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise ValueError(f"the tokenizer has no {eos_token!r} token to separate documents")
        documents = [d for d in corpus.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        ids: list[int] = []
        for encoding in tokenizer.encode_batch(documents, add_special_tokens=False):
            ids.extend(encoding.ids)
            ids.append(eos)
        num_chunks = len(ids) // seq_len
        if num_chunks < 2:
            raise ValueError(f"{corpus} gives {len(ids)} tokens: fewer than two chunks of seq_len={seq_len}")
        chunks = torch.tensor(ids[: num_chunks * seq_len]).view(num_chunks, seq_len)
        num_eval = max(1, int(num_chunks * eval_fraction))
        self.train, self.eval = chunks[:-num_eval], chunks[-num_eval:]
        self.tokenizer = tokenizer
        self.seq_len = seq_len


def lm_batch(chunks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every token is supervised in plain language modelling."""
    return {"input_ids": chunks, "labels": chunks.clone(), "attention_mask": torch.ones_like(chunks)}


class ChunkBatches:
    """Shuffled batches of chunks for one rank, epoch after epoch, with an exact resumable position.

    Rank `r` of `world_size` takes every `world_size`-th chunk of the epoch's seeded order, cut to the
    same count on every rank.
    """

    def __init__(self, chunks: torch.Tensor, batch_size: int, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size * world_size > len(chunks):
            raise ValueError(f"batch_size={batch_size} x {world_size} rank(s) is more than the {len(chunks)} chunks "
                             f"available")
        self.chunks, self.batch_size, self.seed, self.shuffle = chunks, batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0  # position: batches already taken in this epoch

    @property
    def batches_per_epoch(self) -> int:
        return len(self.chunks) // self.world_size // self.batch_size  # ragged tail dropped: equal batch shapes

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            order = self._order(self.epoch)[self.rank::self.world_size]
            while self.position < self.batches_per_epoch:
                start = self.position * self.batch_size
                self.position += 1
                yield lm_batch(self.chunks[order[start: start + self.batch_size]])
            self.epoch, self.position = self.epoch + 1, 0

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.chunks))
        return torch.randperm(len(self.chunks), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for key in ("seed", "world_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValueError(f"data {key} changed since the checkpoint ({state[key]} -> {getattr(self, key)}): "
                                 f"resuming would replay a different order")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
