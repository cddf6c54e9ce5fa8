"""The training loop end to end on the bundled corpus: loss falls, tiers are reported, resume is exact."""
import json

import pytest
import torch

import models  # noqa: F401
from data.tokenizer import CORPUS, train_tokenizer
from models.config import from_dict
from training.checkpoint import latest_checkpoint
from training.config import TrainConfig
from training.loop import train
from training.run_log import read_metrics

MODEL = "configs/models/tiny-ling-lite.yaml"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Real English text (the bundled standard-library docstrings) and a BPE tokenizer sized to the model."""
    tokenizer = train_tokenizer(CORPUS, tmp_path_factory.mktemp("corpus") / "tokenizer.json", vocab_size=512)
    return {"corpus": str(CORPUS), "tokenizer": str(tokenizer)}


@pytest.fixture
def config(tmp_path, corpus):
    def make(directory=tmp_path, **overrides) -> TrainConfig:
        return _config(directory, corpus, **overrides)
    return make


def _config(tmp_path, corpus, **overrides) -> TrainConfig:
    data = {"model": MODEL, "output_dir": str(tmp_path / "run"), "steps": 8, "log_every": 1, "seed": 3,
            "data": {"seq_len": 32, "batch_size": 4, **corpus}, "optim": {"lr": 3e-3, "warmup_steps": 2},
            "objective": {"tiers": {"num_tiers": 3}, "diag_every": 2}}
    for key, value in overrides.items():
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(TrainConfig, data, source="test")


@pytest.mark.slow
def test_ordmoe_training_on_real_text_lowers_the_loss_and_reports_tiers(tmp_path, config):
    cfg = config(steps=300, log_every=25, **{"objective.diag_every": 25, "optim.lr": 2e-3,
                                                         "data.seq_len": 64, "data.batch_size": 8})
    train(cfg, show_progress=False)
    rows = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "ntp" in r]
    assert rows[0]["step"] == 1
    assert rows[-1]["ntp"] < rows[0]["ntp"] - 0.5, (rows[0]["ntp"], rows[-1]["ntp"])
    last = rows[-1]
    assert {"logp_tier1", "logp_tier2", "logp_tier3", "tier_order_agreement", "erl", "bal"} <= last.keys()
    print("per-tier mean token log-prob:", {k: round(v, 3) for k, v in last.items() if k.startswith("logp")})
    assert (tmp_path / "run" / "training_curves.png").stat().st_size > 0


def test_crash_mid_training_resumes_to_the_same_weights(tmp_path, config, restore_determinism, crash_run,
                                                        run_weights):
    reference = tmp_path / "reference"
    train(config(reference, save_every=3, deterministic=True), show_progress=False)

    crashed = tmp_path / "crashed"
    crash_run(lambda: train(config(crashed, save_every=3, deterministic=True), show_progress=False), at_step=5)
    assert latest_checkpoint(crashed / "run").name == "step-00000003"
    train(config(crashed, save_every=3, deterministic=True), show_progress=False)  # resumes from step 3

    expected, resumed = run_weights(reference / "run"), run_weights(crashed / "run")
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_checkpoints_are_atomic_and_pruned(tmp_path, config):
    train(config(save_every=2, keep_checkpoints=2), show_progress=False)
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000006", "step-00000008"]
    meta = json.loads((root / "step-00000008" / "meta.json").read_text())
    assert meta["step"] == 8 and "loss" in meta["metrics"]


def test_every_loss_part_is_logged(tmp_path, config):
    train(config(), show_progress=False)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rows[0]["event"] == "start" and rows[0]["tier_plan"] == ["tier 1: ranks 1-4", "tier 2: ranks 5-8", "tier 3: ranks 13-16"]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 9))
    assert {"ntp", "erl", "bal", "lr", "grad_norm", "logp_tier1", "logp_tier3"} <= step_rows[0].keys()
    assert "logp_tier2" in step_rows[1] and "logp_tier2" not in step_rows[0]  # measured every diag_every=2


def test_unknown_freeze_prefix_names_the_modules(config):
    with pytest.raises(ValueError, match="matches no parameter"):
        train(config(freeze=["vision_tower"]), show_progress=False)
