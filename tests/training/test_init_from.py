"""`init_from`: a stage's weights come from the previous stage's run, checkpoint or export directory, strictly;
another architecture, a missing directory or another tokenizer is refused before training, naming path and field."""
from pathlib import Path

import pytest
import torch
import yaml
from tokenizers import Tokenizer

import models  # noqa: F401
from models.build import build_model, load_model_config
from models.config import from_dict
from training.checkpoint import save_checkpoint, write_weights
from training.config import TrainConfig
from training.export import WEIGHTS, export_trained, write_model_files
from training.init_from import InitFromError, apply_init_from, check_init_from, load_init_weights, meta_shapes

LING = "configs/models/tiny-ling-lite.yaml"
OMNI = "configs/models/tiny-omni.yaml"
TOKENIZER = "configs/tokenizers/tiny-omni/tokenizer.json"


def seeded(path: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(path)


def variant(tmp_path, path: str, **backbone_config) -> str:
    """A copy of model YAML `path` with some backbone.config values changed."""
    data = yaml.safe_load(open(path))
    data["backbone"]["config"].update(backbone_config)
    out = tmp_path / f"variant-{'-'.join(backbone_config)}.yaml"
    out.write_text(yaml.safe_dump(data))
    return str(out)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def run_dir(tmp_path, model, model_config: str, steps=(1, 2)):
    """A run directory as the trainer writes it: checkpoints/step-N (weights + model files) and `latest`."""
    output = tmp_path / "run"
    for step in steps:
        def write(directory, step=step):
            with torch.no_grad():
                next(model.parameters()).add_(step)  # each checkpoint its own weights
            write_weights(directory, model)
            write_model_files(directory, model_config)
        save_checkpoint(output, step, write, {"model_config": model_config}, keep=3)
    return output


def config(**values) -> TrainConfig:
    return from_dict(TrainConfig, {"model": OMNI, "data": {"kind": "shards", "shards": "unused"}, **values}, source="t")


@pytest.mark.parametrize("form", ["export", "checkpoint", "run"])
def test_weights_load_from_an_export_a_checkpoint_or_a_run(form, tmp_path):
    trained = seeded(LING, 1)
    if form == "export":
        source = export_trained(tmp_path / "export", trained, LING)
    else:
        source = run_dir(tmp_path, trained, LING)  # `trained` now holds the latest checkpoint's weights
        if form == "checkpoint":
            source = source / "checkpoints" / "step-00000002"
    fresh = seeded(LING, 2)
    assert not same_weights(fresh, trained)
    assert load_init_weights(fresh, source).name == WEIGHTS
    assert same_weights(fresh, trained)


def test_a_run_directory_loads_its_latest_checkpoint_not_an_older_one(tmp_path):
    trained = seeded(LING, 1)
    output = run_dir(tmp_path, trained, LING, steps=(1, 2, 3))
    fresh = seeded(LING, 2)
    assert load_init_weights(fresh, output).parent.name == "step-00000003"
    assert same_weights(fresh, trained)


def test_a_shape_mismatch_names_the_file_and_the_key_and_changes_nothing(tmp_path):
    export = export_trained(tmp_path / "export", seeded(LING, 1), LING)
    model = seeded(variant(tmp_path, LING, vocab_size=1024), 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = r"embed.*\[1024, 64\] in this run's model, \[512, 64\] in init_from"
    with pytest.raises(InitFromError, match=r"model\.safetensors.*" + shapes) as err:
        load_init_weights(model, export)
    assert str(export) in str(err.value) and "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_and_unexpected_keys_are_named(tmp_path):
    trained = seeded(LING, 1)
    state = dict(trained.state_dict())
    dropped = next(k for k in state if k.endswith("norm.weight"))
    state.pop(dropped)
    directory = tmp_path / "export"
    directory.mkdir()
    write_weights(directory, state)
    write_model_files(directory, LING)
    with pytest.raises(InitFromError, match=f"missing keys.*{dropped}"):
        load_init_weights(seeded(LING, 2), directory)


def test_init_from_is_not_applied_without_it_or_when_the_run_resumes(tmp_path):
    export = export_trained(tmp_path / "export", seeded(OMNI, 1), OMNI)
    model = seeded(OMNI, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_init_from(model, config(output_dir=str(tmp_path / "new"))) is None
    resuming = run_dir(tmp_path, seeded(OMNI, 3), OMNI, steps=(1,))
    assert apply_init_from(model, config(init_from=str(export), output_dir=str(resuming))) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert apply_init_from(model, config(init_from=str(export), output_dir=str(resuming), resume=False)) is not None
    assert not torch.equal(before[next(iter(before))], model.state_dict()[next(iter(before))])


def _check(tmp_path, init_from, model=OMNI, tokenizer=TOKENIZER, **values):
    """`check_init_from` as validate_run calls it: this run's model config and shapes (built on meta)."""
    run = config(model=model, init_from=str(init_from), output_dir=str(tmp_path / "new"), **values)
    with torch.device("meta"):
        shapes = meta_shapes(build_model(model))
    return check_init_from(run, load_model_config(model), shapes, tokenizer and Path(tokenizer), "stage.yaml")


def test_the_same_architecture_passes_and_check_names_the_model_directory(tmp_path):
    export = export_trained(tmp_path / "export", seeded(OMNI, 1), OMNI)
    assert _check(tmp_path, export) == str(export)


def test_another_architecture_is_refused_naming_the_path_and_the_field(tmp_path):
    export = export_trained(tmp_path / "export", seeded(LING, 1), LING)  # the text model, no encoders
    with pytest.raises(InitFromError) as err:
        _check(tmp_path, export)
    message = str(err.value)
    assert message.startswith("stage.yaml: init_from = ") and str(export) in message
    assert "another architecture" in message and "vision.name" in message and "\n" not in message


def test_other_shapes_of_the_same_backbone_name_the_differing_field(tmp_path):
    fewer = variant(tmp_path, LING, num_experts=8)
    export = export_trained(tmp_path / "export", seeded(fewer, 1), fewer)
    with pytest.raises(InitFromError, match=r"backbone\.config\.num_experts = 16 in model, 8 in init_from.*shape"):
        _check(tmp_path, export, model=LING, tokenizer=None, data={"kind": "text", "tokenizer": TOKENIZER})


@pytest.mark.parametrize("what", ["missing", "yaml", "empty_dir"])
def test_a_path_that_is_no_trained_stage_is_refused(what, tmp_path):
    path = {"missing": tmp_path / "runs" / "align", "yaml": OMNI, "empty_dir": tmp_path}[what]
    hint = {"missing": "run the previous stage first", "yaml": "put it in `model:`", "empty_dir": "neither"}[what]
    with pytest.raises(InitFromError, match=hint) as err:
        _check(tmp_path, path)
    assert f"init_from = {str(path)!r}" in str(err.value)


def test_another_tokenizer_is_refused(tmp_path):
    export = export_trained(tmp_path / "export", seeded(OMNI, 1), OMNI)
    other = tmp_path / "other.json"
    tokenizer = Tokenizer.from_file(TOKENIZER)  # the same ids plus one: another tokenizer all the same
    tokenizer.add_tokens(["<brand-new-token>"])
    tokenizer.save(str(other))
    with pytest.raises(InitFromError, match="tokenizer.*token ids would change meaning"):
        _check(tmp_path, export, tokenizer=other)


def test_a_text_stage_must_reuse_the_previous_tokenizer(tmp_path):
    export = export_trained(tmp_path / "export", seeded(LING, 1), LING, tokenizer=TOKENIZER)
    with pytest.raises(InitFromError, match="data.tokenizer"):
        _check(tmp_path, export, model=LING, tokenizer=None, data={"kind": "text"})


ZERO3_LOAD = """
import sys, torch, deepspeed
import models
from models.build import load_model_config
from training.init_from import load_init_weights
from training.zero_init import build_for_engine
deepspeed.init_distributed(dist_backend="gloo")
ds = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": False}}
model = build_for_engine(load_model_config(sys.argv[1]), ds)
assert all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()), "not partitioned"
load_init_weights(model, sys.argv[2])
expected = torch.load(sys.argv[3], weights_only=True)
for name, param in model.named_parameters():
    with deepspeed.zero.GatheredParameters([param]):
        assert torch.equal(param.data, expected[name]), name
print("loaded into partitions")
"""


def test_zero3_partitions_take_the_init_from_weights(tmp_path):
    """Under ZeRO-3 (zero.Init, a world of one over gloo) each rank streams its slice of init_from's tensors
    into its partitions; gathered, they are the exported weights bit for bit."""
    import os
    import subprocess
    import sys
    trained = seeded(LING, 1)
    source = export_trained(tmp_path / "export", trained, LING)
    torch.save({k: v.detach().clone() for k, v in trained.named_parameters()}, tmp_path / "expected.pt")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(20000 + os.getpid() % 20000), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run([sys.executable, "-c", ZERO3_LOAD, LING, str(source), str(tmp_path / "expected.pt")],
                         cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "loaded into partitions" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
