"""Batching: fixed-size batches and sequence packing, which must not change what the model computes per sample."""
import pytest
import torch

from data.batching import FixedBatcher, PackedBatcher, collate_packed
from models.config import from_dict
from training.objectives import ObjectiveConfig, build_objective


def example(length, name, first=1):
    ids = torch.arange(first, first + length)
    return {"id": name, "input_ids": ids, "labels": ids.clone(), "modality_ids": torch.zeros(length, dtype=torch.long)}


def test_fixed_batcher_closes_after_batch_size_examples():
    batcher = FixedBatcher(list, 2)
    batcher.add("a")
    assert batcher.fits("b") and not batcher.full
    batcher.add("b")
    assert batcher.full and not batcher.fits("c") and batcher.flush() == ["a", "b"]


def test_packing_is_first_fit_with_restarting_positions():
    batcher = PackedBatcher(rows=2, length=8, pad_id=0)
    for length, name in ((5, "a"), (4, "b"), (3, "c"), (4, "d")):
        assert batcher.fits(example(length, name))
        batcher.add(example(length, name))
    assert batcher.full and not batcher.fits(example(1, "e"))  # rows hold a+c and b+d: 8 tokens each
    batch = batcher.flush()
    assert batch["ids"] == ["a", "c", "b", "d"]
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["sample_index"].tolist() == [[0] * 5 + [1] * 3, [2] * 4 + [3] * 4]
    assert batch["labels"][0, 5] == -100 and batch["labels"][0, 6] == 2  # no loss across a sample boundary
    assert "attention_mask" not in batch


def test_a_sample_longer_than_a_packed_row_names_itself():
    with pytest.raises(ValueError, match="sample long: 9 tokens"):
        PackedBatcher(rows=1, length=8, pad_id=0).fits(example(9, "long"))


def test_padding_forms_its_own_segment():
    batch = collate_packed([[example(3, "a")], [example(5, "b")]], pad_id=0, length=8)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 0, 1]
    assert batch["sample_index"][0].tolist() == [0, 0, 0, -1, -1]


@pytest.fixture
def padded_and_packed(processor, photo, speech):
    """Image, audio and text samples as one padded batch and as two packed rows."""
    samples = [
        {"id": "photo", "images": [photo], "conversation": [{"role": "user", "content": "<image>\nHow many cats?"},
                                                            {"role": "assistant", "content": "Two cats on a sofa."}]},
        {"id": "speech", "audios": [speech], "conversation": [{"role": "user", "content": "<audio>\nTranscribe."},
                                                              {"role": "assistant", "content": "She had your suit."}]},
        {"id": "text", "conversation": [{"role": "user", "content": "What is a tensor?"},
                                        {"role": "assistant", "content": "A multi-dimensional array."}]},
    ]
    examples = [processor(s) for s in samples]
    for e in examples:  # the packed collate drops each sample's first label; do the same for the padded rows
        e["labels"][0] = -100
    packer = PackedBatcher(rows=2, length=sum(len(e["input_ids"]) for e in examples[:2]), pad_id=processor.pad_id)
    for e in examples:
        packer.add(e)
    packed = packer.flush()
    assert packed["input_ids"].shape[0] == 2 and packed["ids"] == ["photo", "speech", "text"]
    return processor.collate(examples), packed


def ordmoe(model, execution="sequential"):
    config = {"name": "ordmoe", "tiers": {"num_tiers": 3}, "execution": execution}
    return build_objective(from_dict(ObjectiveConfig, config), model)


@pytest.mark.parametrize("execution", ["sequential", "batched"])
def test_packed_batch_gives_the_same_per_sample_losses_as_padded_rows(tiny_omni, padded_and_packed, execution):
    model, _ = tiny_omni
    padded, packed = padded_and_packed
    objective = ordmoe(model, execution)
    with torch.no_grad():
        reference, result = objective(model, padded), objective(model, packed)
    for key in ("logp_tier1", "logp_tier2", "logp_tier3", "ntp", "erl", "bal", "supervised_tokens"):
        assert result.parts[key] == pytest.approx(reference.parts[key], rel=1e-4, abs=1e-5), key


def test_packed_batch_gives_the_same_gradients_as_padded_rows(tiny_omni, padded_and_packed):
    model, _ = tiny_omni
    padded, packed = padded_and_packed
    grads = []
    for batch in (padded, packed):
        model.zero_grad(set_to_none=True)
        ordmoe(model)(model, batch, backward=lambda loss: loss.backward(), step=1)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("vision.") for n in grads[0])
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-5, msg=name)
