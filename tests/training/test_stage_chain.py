"""The paper's stage pipeline on tiny-omni through the CLI (`tools/train.py`): alignment trains the projectors
only; OrdMoE SFT starts from the alignment export (`init_from`) and finishes; a resumed stage needs no
`init_from` any more. The shipped recipes chain stage to stage, and bad stage inputs are refused before
anything is written."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import models  # noqa: F401
import training.loop as loop
from data.demo_data import build_demo_data
from models.build import build_model, load_model_config
from models.config import load_config, read_yaml
from tests.models.releases import ling_mini_config, ming_config, write_release
from tools.train import main as train_main
from training.checkpoint import latest_checkpoint, seed_everything
from training.config import TrainConfig
from training.engine import deepspeed_config
from training.export import export_trained
from training.run_log import read_metrics
from training.validate import NotOnThisMachine, check_data, check_model, check_objective, check_tokenizer

REPO = Path(__file__).resolve().parents[2]
STAGES = ("align", "pretrain", "sft-ntp", "sft-ordmoe")
FAMILIES = ("tiny-omni", "ling-mini-omni", "ming-lite-omni")
PROJECTORS = ("linear_proj.", "linear_proj_audio.")
SHORT = ["steps=2", "data.batch_size=2", "data.num_workers=0", "log_every=1", "--no-progress"]


def recipe(family: str, stage: str) -> str:
    return f"configs/train/{family}-{stage}.yaml"


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> list[str]:
    """The demo shards (a small build) as overrides of the tiny-omni recipes' runs/demo_data paths."""
    paths = build_demo_data(tmp_path_factory.mktemp("demo") / "demo_data", samples_per_kind=2)
    return [f"data.shards={paths['train_shards']}", f"data.eval_manifest={paths['eval']}"]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run) / "model.safetensors"))


def test_alignment_then_ordmoe_sft_starts_from_the_alignment_export(demo, tmp_path, monkeypatch, restore_determinism):
    align, sft = tmp_path / "align", tmp_path / "sft"
    assert train_main([recipe("tiny-omni", "align"), *demo, *SHORT, f"output_dir={align}"]) == 0
    seed_everything(0)  # the recipe's seed: the weights the alignment run started from
    initial = build_model("configs/models/tiny-omni.yaml").state_dict()
    aligned = weights(align)
    changed = {key for key in initial if not torch.equal(initial[key], aligned[key])}
    assert any(key.startswith("linear_proj.") for key in changed)
    assert all(key.startswith(PROJECTORS) for key in changed), sorted(changed - set(PROJECTORS))[:5]

    started = {}  # the weights the engine receives: after build_model and init_from, before any step
    build_engine = loop.build_engine

    def spy(model, config):
        started["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return build_engine(model, config)

    monkeypatch.setattr(loop, "build_engine", spy)
    sft_args = [recipe("tiny-omni", "sft-ordmoe"), *demo, *SHORT, f"init_from={align}", f"output_dir={sft}"]
    assert train_main(sft_args) == 0
    assert started["weights"].keys() == aligned.keys()
    assert all(torch.equal(started["weights"][k], aligned[k]) for k in aligned)
    assert latest_checkpoint(sft).name == "step-00000002"
    rows = [row for row in read_metrics(sft / "metrics.jsonl") if "loss" in row]
    assert len(rows) == 2 and all("erl" in row for row in rows)  # OrdMoE ran: the rank loss is logged
    trained = weights(sft)
    assert any(not torch.equal(trained[k], aligned[k]) for k in trained if k.startswith("model."))  # LLM trains now

    shutil.rmtree(align)  # a resumed stage continues from its own checkpoint: init_from is not read again
    assert train_main([*sft_args, "steps=3"]) == 0
    assert latest_checkpoint(sft).name == "step-00000003"


def other_architecture(tmp_path) -> Path:
    torch.manual_seed(0)
    return export_trained(tmp_path / "text-model", build_model("configs/models/tiny-ling-lite.yaml"),
                          "configs/models/tiny-ling-lite.yaml")


# (id, stage, overrides, what the one-line message names besides the stage file)
BAD = [
    ("init_from_other_architecture", "sft-ordmoe", ["init_from={other}"],
     ["init_from = '{other}'", "another architecture", "vision.name"]),
    ("init_from_missing", "sft-ordmoe", ["init_from={tmp}/runs/nope"],
     ["init_from = '{tmp}/runs/nope'", "no such run"]),
    ("init_from_a_model_yaml", "pretrain", ["init_from=configs/models/tiny-omni.yaml"], ["init_from", "`model:`"]),
    ("lr_pattern_matches_nothing", "pretrain", ["optim.lr_groups=[{pattern: 'vison.*', lr: 1.0e-3}]"],
     ["optim.lr_groups[0].pattern = 'vison.*'", "matches no parameter", "top-level modules"]),
    ("lr_pattern_only_frozen", "align", ["optim.lr_groups=[{pattern: 'vision.*', lr: 1.0e-3}]"],
     ["optim.lr_groups[0].pattern = 'vision.*'", "only frozen"]),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_stage_input_is_refused_before_training(case, demo, tmp_path, capsys):
    _, stage, overrides, parts = case
    other = other_architecture(tmp_path)

    def fill(text: str) -> str:
        return text.replace("{other}", str(other)).replace("{tmp}", str(tmp_path))

    out = tmp_path / "out"
    argv = [recipe("tiny-omni", stage), *demo, *SHORT, f"output_dir={out}", *map(fill, overrides)]
    capsys.readouterr()
    assert train_main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {recipe('tiny-omni', stage)}"), lines
    for part in parts:
        assert fill(part) in lines[0], lines[0]
    assert not out.exists()


@pytest.mark.slow
def test_the_four_tiny_recipes_chain_through_python_m_tools_train(demo, tmp_path):
    """The shipped recipes as a user runs them, one process per stage; a stage of another architecture too."""
    starts_from = {"pretrain": "align", "sft-ntp": "pretrain", "sft-ordmoe": "pretrain"}
    for stage in STAGES:
        chained = [f"init_from={tmp_path / starts_from[stage]}"] if stage in starts_from else []
        done = subprocess.run([sys.executable, "-m", "tools.train", recipe("tiny-omni", stage), *demo, *SHORT,
                               f"output_dir={tmp_path / stage}", *chained], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout)["output_dir"] == str(tmp_path / stage)
    refused = subprocess.run([sys.executable, "-m", "tools.train", recipe("tiny-omni", "sft-ordmoe"), *demo, *SHORT,
                              f"output_dir={tmp_path / 'refused'}", f"init_from={other_architecture(tmp_path)}"],
                             cwd=REPO, capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert "init_from" in refused.stderr and not (tmp_path / "refused").exists()


# ---- the shipped recipes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_each_stage_starts_from_the_previous_stages_output_dir(family):
    stages = {stage: read_yaml(REPO / recipe(family, stage)) for stage in STAGES}
    assert "init_from" not in stages["align"] and stages["align"]["freeze"] == ["model.", "vision.", "audio."]
    assert stages["pretrain"]["init_from"] == stages["align"]["output_dir"] and stages["pretrain"]["freeze"] == []
    for sft in ("sft-ntp", "sft-ordmoe"):
        assert stages[sft]["init_from"] == stages["pretrain"]["output_dir"]
    assert len({s["output_dir"] for s in stages.values()}) == 4
    assert stages["sft-ntp"]["objective"]["name"] == "ntp" and stages["sft-ordmoe"]["objective"]["name"] == "ordmoe"
    assert stages["sft-ordmoe"]["objective"]["tiers"]["num_tiers"] == 3
    same = [{k: v for k, v in stages[sft].items() if k not in ("objective", "output_dir")}
            for sft in ("sft-ntp", "sft-ordmoe")]
    assert same[0] == same[1]  # the OrdMoE SFT differs from the baseline's only in its objective
    if family != "tiny-omni":  # the paper's SFT: AdamW, lr 2e-5, cosine to 0, 16 per GPU; DeepSpeed ZeRO
        for sft in ("sft-ntp", "sft-ordmoe"):
            optim, data = stages[sft]["optim"], stages[sft]["data"]
            assert optim["lr"] == 2e-5 and optim.get("min_lr_ratio", 0) == 0 and not optim.get("lr_groups")
            assert data["batch_size"] == 16 and stages[sft]["engine"] == "deepspeed"


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> dict[str, str]:
    """The real families' model YAMLs on tiny release directories (tests/models/releases.py) with tiny towers:
    the same module names and code paths as the 16 B models, built in a second."""
    root = tmp_path_factory.mktemp("releases")
    releases = {"ming-lite-omni": write_release(root / "ming", ming_config(version="1"), weights=False),
                "ling-mini-omni": write_release(root / "mini", ling_mini_config(), weights=False)}
    out = {}
    for family, release in releases.items():
        data = read_yaml(REPO / f"configs/models/{family}.yaml")
        data["release"] = str(release)
        if "vision" in data:
            data["vision"]["config"].update(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                            out_hidden_size=64, fullatt_block_indexes=[1])
            data["audio"]["config"].update(d_model=32, encoder_layers=2, encoder_attention_heads=2,
                                           encoder_ffn_dim=64)
        (root / f"{family}.yaml").write_text(yaml.safe_dump(data))
        out[family] = str(root / f"{family}.yaml")
    return out


@pytest.mark.filterwarnings("ignore:.*SANM audio encoder")
@pytest.mark.parametrize("family", ["ling-mini-omni", "ming-lite-omni"])
@pytest.mark.parametrize("stage", STAGES)
def test_real_model_recipes_fit_their_architecture(family, stage, stand_ins, tmp_path):
    """Freeze prefixes, lr-group patterns, the tier plan and the DeepSpeed JSON of each real recipe, checked
    against the family's architecture (its own release is not on this machine)."""
    path = recipe(family, stage)
    config = load_config(TrainConfig, REPO / path, [f"model={stand_ins[family]}", f"output_dir={tmp_path}"])
    model = check_model(config, path)
    check_objective(config, model, path)
    check_tokenizer(config, model, path, tmp_path)
    with pytest.raises(NotOnThisMachine, match=r"none of its \d+ files is here"):  # the placeholders parse
        check_data(config, path)
    trainable = [n for n in model.parameter_names
                 if n not in model.untrainable and not n.startswith(tuple(config.freeze))]
    if stage == "align":
        assert trainable and all(name.startswith(PROJECTORS) for name in trainable)
    else:
        assert len(trainable) == len(model.parameter_names) - len(model.untrainable)
    ds = deepspeed_config(REPO / config.deepspeed, config, world_size=8, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["zero_optimization"]["stage"] == 3
    assert load_model_config(stand_ins[family]).is_omni
