"""Large models start without materialising everything on every rank (training/zero_init.py).

ZeRO-3 through the real launcher (`deepspeed --num_gpus 2`, CPU, gloo): official-layout releases written here
(tests/models/releases.py: official key names, per-expert tensors, 2 shards; a transformers-native Qwen3-MoE
checkpoint as `save_pretrained` writes it for the hub) are built under
`deepspeed.zero.Init` and streamed into the partitions. On every rank: each parameter is partitioned (about
1/2 of it held), its gathered value equals the single-process strictly loaded model bit for bit, the buffers
are those of a plain fp32 build (also under a bf16 zero.Init), and the logits through training/engine.py's
DeepSpeedEngine equal the single-process logits. This file is also the script the launcher runs (`--worker`).
The plain / ZeRO-2 path (meta device, one copy) is checked in process.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import models  # noqa: E402,F401
from models.build import build_model  # noqa: E402
from models.checkpoint import CheckpointError  # noqa: E402
from tests.models.releases import ling_mini_config, ming_config, write_release  # noqa: E402
from training.zero_init import build_for_engine  # noqa: E402

def write_native(directory: Path, name: str = "tiny-qwen3-moe") -> None:
    """A transformers-native backbone checkpoint as the hub has it (`save_pretrained`: per-expert tensors),
    and a model YAML naming it."""
    torch.manual_seed(0)
    build_model(f"configs/models/{name}.yaml").save_pretrained(directory / "checkpoint")
    config = yaml.safe_load((ROOT / "configs" / "models" / f"{name}.yaml").read_text())
    config["backbone"]["checkpoint"] = str(directory / "checkpoint")
    (directory / "model.yaml").write_text(yaml.safe_dump(config))


RELEASES = {  # name -> writes a tiny release in the official layout into the directory it is given
    # sigmoid routers: a persistent fp32 expert_bias buffer, MTP layer
    "ling-mini-2.0": lambda directory: write_release(directory, ling_mini_config()),
    # encoders, modality routers, the 15000-row Whisper table
    "ming-lite-omni-1.5": lambda directory: write_release(directory, ming_config("1.5")),
    # a transformers-native backbone: transformers' own ZeRO-3 load (training/zero_init.py native_partitioned)
    "qwen3-moe": write_native,
}


def source_of(directory: Path) -> Path:
    """What build_model / build_for_engine take: a release directory, or the model YAML beside a checkpoint."""
    return directory / "model.yaml" if (directory / "model.yaml").is_file() else directory
IDS = [[11, 12, 13, 14, 15, 16, 17], [21, 22, 23, 24, 25, 26, 27]]


def quietly_build(directory: Path) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return build_model(directory)


def logits_of(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=torch.tensor(IDS)).logits.detach()


# ---- the worker (one process per rank) --------------------------------------------------------------
def ds_config(stage: int, bf16: bool, world: int) -> dict:
    from models.config import from_dict
    from training.config import TrainConfig
    from training.engine import deepspeed_config
    train = from_dict(TrainConfig, {"model": "configs/models/tiny-ling-lite.yaml", "engine": "deepspeed",
                                    "deepspeed": f"configs/deepspeed/zero{stage}.json", "device": "cpu",
                                    "precision": "bf16" if bf16 else "fp32"}, source="test_zero_init")
    return train, deepspeed_config(ROOT / train.deepspeed, train, world, bf16)


def check_release(directory: Path, rank: int, world: int) -> dict:
    import deepspeed
    from training.engine import DeepSpeedEngine

    reference = quietly_build(directory).eval()
    train, ds = ds_config(3, False, world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_for_engine(directory, ds)
    params = dict(model.named_parameters())
    unpartitioned = [n for n, p in params.items() if not hasattr(p, "ds_tensor")]
    held = sum(p.ds_tensor.numel() for p in params.values() if hasattr(p, "ds_tensor"))
    differ = []
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if not torch.equal(param.data, reference.get_parameter(name).data):
                differ.append(name)
    expected_buffers = dict(reference.named_buffers())
    bad_buffers = [n for n, b in model.named_buffers()
                   if b.dtype != expected_buffers[n].dtype or not torch.equal(b, expected_buffers[n])]

    # bf16 zero.Init: parameters are bf16 partitions, buffers stay the fp32 values of a plain build
    _, ds16 = ds_config(3, True, world)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = build_for_engine(directory, ds16)
    bad16 = [n for n, b in model16.named_buffers()
             if b.dtype != torch.float32 or not torch.equal(b, expected_buffers[n])]
    differ16 = []
    for name, param in model16.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            expected = reference.get_parameter(name).data.bfloat16()
            if param.dtype != torch.bfloat16 or not torch.equal(param.data, expected):
                differ16.append(name)
    del model16

    engine = DeepSpeedEngine(model, train, torch.device("cpu"), rank, world)
    engine.model.eval()
    with torch.no_grad():
        error = float((logits_of(engine.model) - logits_of(reference)).abs().max())
    return {"unpartitioned": unpartitioned, "held": held, "total": sum(p.numel() for p in reference.parameters()),
            "differ": differ, "bad_buffers": bad_buffers, "bad_buffers_bf16": bad16, "differ_bf16": differ16,
            "logit_error": error}


def worker() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--releases", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()
    from training.engine import init_process_group, launch_world
    rank, _, world = launch_world()
    init_process_group(torch.device("cpu"))
    results = {name: check_release(source_of(Path(args.releases) / name), rank, world) for name in RELEASES}
    Path(args.out, f"rank{rank}.json").write_text(json.dumps({"world_size": world, **results}, indent=1))
    torch.distributed.barrier()


# ---- the tests -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def releases(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("releases")
    for name, write in RELEASES.items():
        (root / name).mkdir()
        write(root / name)
    return root


@pytest.mark.slow
def test_zero3_ranks_hold_partitions_of_the_strictly_loaded_model(releases, tmp_path):
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(29500 + (os.getpid() + 500) % 1000), __file__,
           "--worker", "--releases", str(releases), "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert results["world_size"] == 2
        for name in RELEASES:
            case = results[name]
            assert not case["unpartitioned"], f"{name} rank {rank}: not partitioned: {case['unpartitioned'][:5]}"
            assert case["held"] <= case["total"] / 2 + 1000, f"{name} rank {rank}: {case['held']} of {case['total']}"
            assert not case["differ"], f"{name} rank {rank}: gathered partitions differ: {case['differ'][:5]}"
            assert not case["bad_buffers"], f"{name} rank {rank}: buffers {case['bad_buffers']}"
            assert not case["bad_buffers_bf16"], f"{name} rank {rank}: bf16 build buffers {case['bad_buffers_bf16']}"
            assert not case["differ_bf16"], f"{name} rank {rank}: bf16 partitions differ: {case['differ_bf16'][:5]}"
            assert case["logit_error"] < 1e-5, f"{name} rank {rank}: logits off by {case['logit_error']:.2e}"


@pytest.mark.parametrize("name", RELEASES)
def test_plain_build_is_one_copy_equal_to_the_strict_load(name, releases):
    """No ZeRO-3: built on the meta device and filled tensor by tensor; same weights, buffers and logits."""
    directory = source_of(releases / name)
    reference = quietly_build(directory).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_for_engine(directory, None).eval()
    expected = reference.state_dict()
    got = model.state_dict()
    assert got.keys() == expected.keys()
    assert not [k for k in expected if not torch.equal(got[k], expected[k])]
    buffers = dict(reference.named_buffers())
    assert all(torch.equal(b, buffers[n]) and b.dtype == buffers[n].dtype for n, b in model.named_buffers())
    with torch.no_grad():
        torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)


def test_a_bad_checkpoint_fails_before_any_weight_is_allocated(releases, tmp_path):
    """Validation reads the safetensors headers only: a mis-shaped expert names its key and config field."""
    config = ling_mini_config()
    bad = {"model.layers.1.mlp.experts.3.up_proj.weight": torch.zeros(config["moe_intermediate_size"] + 1,
                                                                     config["hidden_size"])}
    directory = write_release(tmp_path / "bad", config, tensors=bad)
    with pytest.raises(CheckpointError, match=r"experts\.3\.up_proj\.weight.*moe_intermediate_size"):
        build_for_engine(directory, None)


if __name__ == "__main__":
    worker()
