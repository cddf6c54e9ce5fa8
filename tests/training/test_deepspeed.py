"""DeepSpeed ZeRO-2/3 through the real launcher (2 CPU processes, gloo), against the single-process engine.

Tolerances (fp32): gradients of one step within 1e-5 relative (norm) of the all-paths reference; after
N AdamW steps every weight within 2e-2 of what training changed (|w_ds - w_plain| / |w_plain - w_0|):
Adam normalises each element by its own gradient scale, so reduction-order noise in near-zero gradients
moves a few elements by up to lr; a dropped or doubled path moves whole tensors by O(1) of the update.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import models  # noqa: F401
from models.config import from_dict
from training.config import TrainConfig
from training.engine import DeepSpeedConfigError, deepspeed_config

ROOT = Path(__file__).resolve().parents[2]
CASES = ROOT / "tests" / "training" / "deepspeed_cases.py"
GRAD_TOLERANCE = 1e-5
UPDATE_TOLERANCE = 2e-2


def launch(out: Path, cases: str, steps: int = 2, nan: str = "", timeout: int = 900, extra: tuple = ()) -> dict:
    """`deepspeed --num_gpus 2 deepspeed_cases.py ...` (the real launcher); its JSON results."""
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(29500 + os.getpid() % 1000), str(CASES),
           "--out", str(out), "--cases", cases, "--steps", str(steps), "--nan", nan, *extra]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return json.loads(out.read_text())


def check_case(name: str, case: dict) -> None:
    assert not case["grad_missing"], f"{name}: no gradient for {case['grad_missing'][:5]}"
    worst = max(case["grad_errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < GRAD_TOLERANCE, f"{name}: gradient of {worst[0]} off by {worst[1]:.2e} (relative)"
    assert len(set(case["rank_checksums"])) == 1, f"{name}: ranks hold different weights {case['rank_checksums']}"
    assert not case["missing_params"], f"{name}: missing {case['missing_params'][:5]}"
    worst = max(case["param_errors"].items(), key=lambda kv: kv[1])
    assert worst[1] < UPDATE_TOLERANCE, f"{name}: {worst[0]} differs from the single-process run by {worst[1]:.2e}"
    assert case["norms"] == pytest.approx(case["plain_norms"], rel=1e-5), name


def check_nan(name: str, nan: dict) -> None:
    norms, sums = nan["norms"], nan["checksums"]
    assert norms[0] is not None and norms[1] is None and norms[2] is not None, f"{name}: {norms}"
    assert all(len(set(s)) == 1 for s in sums), f"{name}: ranks disagree {sums}"
    assert sums[1] == sums[0], f"{name}: the skipped step changed the weights"
    assert sums[2] != sums[1]
    assert nan["plain_norms"][1] is None
    worst = max(nan["param_errors"].values())
    assert worst < UPDATE_TOLERANCE, f"{name}: after the skip the run left the single-process run ({worst:.2e})"


def test_zero2_and_zero3_match_one_process_and_skip_nan_on_every_rank(tmp_path):
    """One launch: ZeRO-2 OrdMoE (sequential, sigmoid routers with the aux-loss-free bias), ZeRO-3 OrdMoE
    (batched), and a NaN on rank 1 under ZeRO-3."""
    results = launch(tmp_path / "results.json", "2:ordmoe:sequential:tiny-ling-mini,3:ordmoe:batched", nan="3")
    assert results["world_size"] == 2
    for name, case in results["cases"].items():
        check_case(name, case)
    check_nan("zero3", results["nan"]["3"])


@pytest.mark.slow
def test_every_stage_objective_and_execution(tmp_path):
    specs = [f"{stage}:{spec}" for stage in (2, 3)
             for spec in ("ntp:sequential", "ordmoe:sequential", "ordmoe:batched")]
    results = launch(tmp_path / "results.json", ",".join(specs), steps=3, nan="2", timeout=1800)
    for name, case in results["cases"].items():
        check_case(name, case)
    check_nan("zero2", results["nan"]["2"])


# ---- the DeepSpeed JSON ----------------------------------------------------------------------------------
def train_config(**overrides) -> TrainConfig:
    data = {"model": "configs/models/tiny-ling-lite.yaml", "grad_accum": 2, "data": {"batch_size": 4},
            "engine": "deepspeed", "deepspeed": "configs/deepspeed/zero2.json", **overrides}
    return from_dict(TrainConfig, data, source="test")


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_fill_from_the_training_config(name):
    config = train_config(optim={"lr": 3e-4, "grad_clip": 0.7, "weight_decay": 0.1})
    ds = deepspeed_config(ROOT / f"configs/deepspeed/{name}.json", config, world_size=8, bf16=True)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 64 and ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["managed_gradient_accumulation"] is False
    if "optimizer" in ds:
        assert ds["optimizer"]["params"] == {"lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1}
    else:
        assert ds["zero_allow_untested_optimizer"] is True


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "ds.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, message", [
    ('{"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8}',
     r"train_micro_batch_size_per_gpu=8 contradicts data.batch_size=4"),
    ('{"zero_optimization": {"stage": 2}, "train_batch_size": 32}', r"train_batch_size=32 contradicts"),
    ('{"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}',
     r"gradient_accumulation_steps=4 contradicts grad_accum=2"),
    ('{"zero_optimization": {"stage": 2}, "gradient_clipping": 5.0}', r"gradient_clipping=5.0 contradicts optim.grad_clip"),
    ('{"zero_optimization": {"stage": 2}, "fp16": {"enabled": true}}', r"fp16.enabled=True contradicts"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 0.1}}}',
     r"optimizer.params.lr=0.1 contradicts optim.lr"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "Lamb"}}', r"optimizer.type must be Adam or AdamW"),
    ('{"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}', r"scheduler must be \"auto\""),
    ('{"zero_optimization": {"stage": 1}}', r"zero_optimization.stage must be 2 or 3, got 1"),
    ('{"train_batch_size": "auto"}', r"zero_optimization.stage must be 2 or 3"),
    ('{"zero_optimization": {"stage": 2}, "managed_gradient_accumulation": true}',
     r"managed_gradient_accumulation=True contradicts"),
    ('{"zero_optimization": {"stage": 2},', r"not valid JSON"),
    ('[1, 2]', r"a DeepSpeed config is a JSON object"),
])
def test_bad_deepspeed_json_names_the_file_and_both_fields(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(DeepSpeedConfigError, match=message) as err:
        deepspeed_config(path, train_config(), world_size=2, bf16=False)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_missing_deepspeed_json_is_one_line_naming_the_file(tmp_path):
    with pytest.raises(DeepSpeedConfigError, match=r"nope.json: no such DeepSpeed config file"):
        deepspeed_config(tmp_path / "nope.json", train_config(), world_size=2, bf16=False)


def test_engine_and_deepspeed_keys_go_together():
    with pytest.raises(ValueError, match="engine: deepspeed needs deepspeed:"):
        train_config(deepspeed=None)
    with pytest.raises(ValueError, match="only read with engine: deepspeed"):
        from_dict(TrainConfig, {"model": "m.yaml", "deepspeed": "configs/deepspeed/zero2.json"}, source="test")


def test_plain_engine_refuses_a_multi_process_launch(monkeypatch):
    from training.engine import build_engine
    monkeypatch.setenv("WORLD_SIZE", "2")
    config = from_dict(TrainConfig, {"model": "configs/models/tiny-ling-lite.yaml"}, source="test")
    with pytest.raises(ValueError, match="engine: plain runs one process, but the launcher started 2"):
        build_engine(torch.nn.Linear(2, 2), config)


def omni_demo_cases(tmp_path, cases: str) -> dict:
    """tiny-omni on demo samples, OrdMoE C = 3, grad_accum 2: each micro-batch is a seeded draw of demo
    samples, so ranks hold different modalities (idle encoders run on blank inputs)."""
    from data.demo_data import build_demo_data
    build_demo_data(tmp_path / "demo", samples_per_kind=4)
    return launch(tmp_path / "results.json", cases, steps=2, timeout=1800, extra=("--demo-data", str(tmp_path / "demo")))


@pytest.mark.slow
def test_tiny_omni_on_demo_samples_matches_one_process_under_zero2(tmp_path):
    for name, case in omni_demo_cases(tmp_path, "2:ordmoe:sequential:tiny-omni")["cases"].items():
        check_case(name, case)


def test_tiny_omni_on_demo_samples_matches_one_process_under_zero3(tmp_path):
    """In the default suite: the case that once fell out of step (ranks with different audio clip counts)."""
    for name, case in omni_demo_cases(tmp_path, "3:ordmoe:batched:tiny-omni")["cases"].items():
        check_case(name, case)
