"""OrdMoE training of the tiny omni model on a JSONL manifest of real media, then the tier probe."""
import json
import shutil

import pytest
import torch

from models.config import from_dict
from tools.probe_tiers import main as probe_main
from training.checkpoint import latest_checkpoint
from training.config import TrainConfig
from training.loop import train
from training.run_log import read_metrics


@pytest.fixture
def manifests(tmp_path, assets):
    for name in ("coco_000000039769.png", "ai2d_00002168.png", "LDC93S1.wav", "1272-128104-0000.flac",
                 "mmaction2_demo_arm_wrestling.mp4"):
        shutil.copy(assets / name, tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    train_rows = [
        {"id": "cats", "image": "coco_000000039769.png",
         "conversation": [{"role": "user", "content": "<image>\nHow many cats?"}, {"role": "assistant", "content": "2"}]},
        {"id": "ai2d", "caption": "A diagram of a life cycle.", "image": "ai2d_00002168.png"},
        {"id": "timit", "audio": "LDC93S1.wav", "caption": "She had your dark suit in greasy wash water all year."},
        {"id": "libri", "audio": "1272-128104-0000.flac",
         "caption": "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES"},
        {"id": "video", "video": "mmaction2_demo_arm_wrestling.mp4",
         "conversation": [{"role": "user", "content": "<video>\nWhat are they doing?"},
                          {"role": "assistant", "content": "Arm wrestling."}]},
        {"id": "text", "conversation": [{"role": "user", "content": "What is a tensor?"},
                                        {"role": "assistant", "content": "A multi-dimensional array."}]},
        {"id": "corrupt", "image": "broken.png", "caption": "never seen"},
        {"id": "orphan-marker", "conversation": [{"role": "user", "content": "<image> What is this?"},
                                                 {"role": "assistant", "content": "Nothing."}]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train_rows))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in train_rows[:6]))
    return tmp_path


def test_ordmoe_on_a_multimodal_manifest_skips_bad_samples_and_probes_tiers(manifests, tmp_path, capsys):
    config = from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / "run"), "steps": 4, "log_every": 1,
        "data": {"kind": "manifest", "manifest": str(manifests / "train.jsonl"),
                 "eval_manifest": str(manifests / "eval.jsonl"), "batch_size": 2},
        "objective": {"name": "ordmoe", "tiers": {"num_tiers": 3}, "diag_every": 2}, "optim": {"lr": 1e-3}},
        source="test")
    metrics = train(config, show_progress=False)
    assert metrics["skipped_samples"] == 2  # the corrupt image and the marker without its image
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(rows) == 4 and all("logp_tier1" in r for r in rows) and "logp_tier2" in rows[1]
    assert latest_checkpoint(tmp_path / "run").name == "step-00000004"

    capsys.readouterr()
    assert probe_main([str(tmp_path / "run"), "--max-batches", "2", "--batch-size", "3", "--scopes", "all"]) == 0
    assert "| all | 3 | 13-16 |" in capsys.readouterr().out


def test_manifest_without_its_file_is_a_clear_error(tmp_path):
    with pytest.raises(Exception, match="data.kind=manifest needs data.manifest"):
        from_dict(TrainConfig, {"model": "configs/models/tiny-omni.yaml", "data": {"kind": "manifest"}}, source="t")


def test_ordmoe_trains_from_webdataset_shards(manifests, tmp_path):
    from tools.make_shards import main as make_shards
    assert make_shards([str(manifests / "train.jsonl"), str(tmp_path / "shards"), "--max-samples", "3"]) == 0
    config = from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / "run"), "steps": 2, "log_every": 1,
        "data": {"kind": "shards", "shards": str(tmp_path / "shards"), "batch_size": 2, "num_workers": 2},
        "objective": {"name": "ordmoe"}}, source="test")
    metrics = train(config, show_progress=False)
    assert metrics["skipped_samples"] == 1  # the marker without its image (the corrupt image never got written)
    state = torch.load(latest_checkpoint(tmp_path / "run") / "trainer.pt", weights_only=True)
    assert state["data"]["next_stream"] == 0 and sorted(state["data"]["positions"]) == ["0", "1"]


def test_ordmoe_trains_on_a_packed_weighted_mixture(manifests, tmp_path):
    from tools.make_shards import main as make_shards
    assert make_shards([str(manifests / "train.jsonl"), str(tmp_path / "shards"), "--max-samples", "3"]) == 0
    mixture = [{"name": "media", "shards": str(tmp_path / "shards"), "weight": 3},
               {"name": "again", "shards": str(tmp_path / "shards"), "weight": 1}]
    config = from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / "run"), "steps": 3, "log_every": 1,
        "data": {"kind": "shards", "mixture": mixture, "batch_size": 2, "pack": True},
        "objective": {"name": "ordmoe", "diag_every": 1}}, source="test")
    metrics = train(config, show_progress=False)
    assert metrics["supervised_tokens"] > 0 and 0.0 <= metrics["tier_order_agreement"] <= 1.0
    assert metrics["share_media"] + metrics["share_again"] == pytest.approx(1.0) and 0 <= metrics["data_wait"] < 1
    state = torch.load(latest_checkpoint(tmp_path / "run") / "trainer.pt", weights_only=True)
    assert state["data"]["kind"] == "mixture" and sum(state["data"]["positions"]["0"]["drawn"].values()) >= 3


def test_crash_with_dataloader_workers_resumes_to_the_same_weights(manifests, tmp_path, restore_determinism,
                                                                   crash_run, run_weights):
    """Shards read by 2 workers, a crash after step 3: the resumed run sees the same batches, ends bit-equal."""
    from tools.make_shards import main as make_shards
    assert make_shards([str(manifests / "train.jsonl"), str(tmp_path / "shards"), "--max-samples", "2"]) == 0

    def config(name):
        return from_dict(TrainConfig, {
            "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / name), "steps": 5, "save_every": 3,
            "deterministic": True, "data": {"kind": "shards", "shards": str(tmp_path / "shards"), "batch_size": 1,
                                            "num_workers": 2, "shuffle_buffer": 2},
            "objective": {"name": "ordmoe"}, "optim": {"lr": 1e-3}}, source="test")

    train(config("reference"), show_progress=False)
    crash_run(lambda: train(config("crashed"), show_progress=False), at_step=4)
    train(config("crashed"), show_progress=False)  # resumes from step 3, workers at their saved positions
    expected, resumed = run_weights(tmp_path / "reference"), run_weights(tmp_path / "crashed")
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_tiny_omni_learns_answers_that_depend_on_the_prompt(tmp_path):
    """A guard on the demo model itself: with Ling's norm_head this 64-wide head gives every prompt the same
    answer (the demo's held-out answers were all empty). 16 sums, 300 steps: most first answer tokens right."""
    from training.export import load_trained

    numbers = ["zero", "one", "two", "three", "four", "five", "six"]
    pairs = {f"What is {numbers[a]} plus {numbers[b]}?": numbers[a + b] for a in range(4) for b in range(4)}
    rows = [{"id": f"q{i}", "conversation": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(pairs.items())]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / "run"), "steps": 300, "log_every": 300,
        "seed": 0, "data": {"kind": "manifest", "manifest": str(tmp_path / "train.jsonl"), "batch_size": 8,
                            "num_workers": 0},
        "objective": {"name": "ntp", "tiers": {"num_tiers": 1}}, "optim": {"lr": 2e-3, "warmup_steps": 5}},
        source="test")
    train(config, show_progress=False)
    model, processor = load_trained(tmp_path / "run")
    predicted, expected = [], []
    with torch.no_grad():
        for row, answer in zip(rows, pairs.values()):
            batch = processor.collate([processor(row, generation=True)])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           modality_ids=batch["modality_ids"], use_cache=False).logits[0, -1]
            predicted.append(int(logits.argmax()))
            expected.append(processor.tokenizer.encode(answer, add_special_tokens=False).ids[0])
    correct = sum(p == e for p, e in zip(predicted, expected))
    # measured: 12 of 16 right, 6 different first tokens; with norm_head, <|endoftext|> for all 16
    assert correct >= 8 and len(set(predicted)) >= 4, [processor.tokenizer.id_to_token(p) for p in predicted]
