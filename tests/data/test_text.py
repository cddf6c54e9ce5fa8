"""Text chunks for language modelling: rank splitting and exact resume."""
from itertools import islice

import pytest
import torch

from data.text import ChunkBatches


def chunk_ids(batches, count):
    return [int(row[0]) for batch in islice(batches, count) for row in batch["input_ids"]]


def test_ranks_take_disjoint_equal_shares_of_each_epoch():
    chunks = torch.arange(22).repeat_interleave(4).view(22, 4)  # chunk i is all i
    ranks = [ChunkBatches(chunks, batch_size=2, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [chunk_ids(r, r.batches_per_epoch) for r in ranks]
    assert len(seen[0]) == len(seen[1]) == 10 and not set(seen[0]) & set(seen[1])


def test_resume_continues_the_epoch():
    chunks = torch.arange(12).repeat_interleave(3).view(12, 3)
    full = chunk_ids(ChunkBatches(chunks, batch_size=2, seed=5), 9)
    first = ChunkBatches(chunks, batch_size=2, seed=5)
    head = chunk_ids(first, 4)
    resumed = ChunkBatches(chunks, batch_size=2, seed=5)
    resumed.load_state_dict(first.state_dict())
    assert head + chunk_ids(resumed, 5) == full
    with pytest.raises(ValueError, match="world_size changed"):
        ChunkBatches(chunks, batch_size=2, seed=5, world_size=2).load_state_dict(first.state_dict())
