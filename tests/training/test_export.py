"""Self-describing model directories: export, copy elsewhere, load in one call, same outputs."""
import shutil

import pytest
import torch
import yaml

import models  # noqa: F401
from models.build import build_model, load_model_config
from models.config import from_dict
from training.config import TrainConfig
from training.export import MODEL_CONFIG, export_trained, load_trained, write_model_files
from training.loop import train


def _logits(model, processor, photo):
    sample = {"id": "cat", "images": [photo], "conversation": [{"role": "user", "content": "<image>\nHow many cats?"}]}
    batch = processor.collate([processor(sample, generation=True)], padding_side="left")
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k not in ("ids", "labels")}).logits


def test_export_moved_to_another_place_loads_with_the_same_outputs(tmp_path, photo, monkeypatch):
    config = load_model_config("configs/models/tiny-omni.yaml")
    torch.manual_seed(3)
    model = build_model(config).eval()
    export_trained(tmp_path / "export", model, "configs/models/tiny-omni.yaml")
    moved = shutil.copytree(tmp_path / "export", tmp_path / "elsewhere" / "model")
    shutil.rmtree(tmp_path / "export")
    monkeypatch.chdir(tmp_path)  # no path may depend on the repository being the working directory
    loaded, processor = load_trained(moved)
    assert not loaded.training
    assert torch.equal(_logits(model, processor, photo), _logits(loaded, processor, photo))


def test_model_files_are_resolved_and_self_contained(tmp_path):
    base = tmp_path / "configs"
    base.mkdir()
    shutil.copy("configs/tokenizers/tiny-omni/tokenizer.json", base / "tok.json")
    (base / "parent.yaml").write_text(yaml.safe_dump(yaml.safe_load(open("configs/models/tiny-ling-lite.yaml"))))
    child = dict(yaml.safe_load(open("configs/models/tiny-omni.yaml")), base="parent.yaml", tokenizer="tok.json",
                 max_length=512)
    child["vision"]["checkpoint"] = "/nowhere/qwen2.5-vl"
    (base / "child.yaml").write_text(yaml.safe_dump(child))
    write_model_files(tmp_path / "out", base / "child.yaml", max_length=256)
    saved = yaml.safe_load((tmp_path / "out" / MODEL_CONFIG).read_text())
    assert "base" not in saved and saved["backbone"]["config"]["num_experts"] == 16  # the base chain is merged
    assert saved["tokenizer"] == "tokenizer.json" and (tmp_path / "out" / "tokenizer.json").is_file()
    assert "checkpoint" not in saved["vision"]  # trained weights live in model.safetensors
    assert saved["max_length"] == 256
    assert "/nowhere/qwen2.5-vl" in (tmp_path / "out" / MODEL_CONFIG).read_text()  # still recorded, as a comment


def test_a_missing_file_is_named(tmp_path):
    export_trained(tmp_path / "export", build_model("configs/models/tiny-omni.yaml"), "configs/models/tiny-omni.yaml")
    (tmp_path / "export" / "processor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="processor_config.json"):
        load_trained(tmp_path / "export")
    with pytest.raises(FileNotFoundError, match="no such run"):
        load_trained(tmp_path / "nothing")


def test_a_run_directory_loads_its_latest_checkpoint_after_being_copied(tmp_path, monkeypatch, photo):
    config = from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(tmp_path / "run"), "steps": 2, "log_every": 1,
        "data": {"kind": "text", "tokenizer": "configs/tokenizers/tiny-omni/tokenizer.json", "seq_len": 32,
                 "batch_size": 2}, "objective": {"name": "ntp"}}, source="test")
    train(config, show_progress=False)
    from training.checkpoint import latest_checkpoint
    checkpoint = latest_checkpoint(tmp_path / "run")
    assert (checkpoint / MODEL_CONFIG).is_file(), \
        "training/loop.py must write the model files into every checkpoint (training.export.write_model_files)"
    trained, processor = load_trained(tmp_path / "run")
    shutil.copytree(tmp_path / "run", tmp_path / "copy" / "run")
    shutil.rmtree(tmp_path / "run")
    monkeypatch.chdir(tmp_path / "copy")
    copied, _ = load_trained("run")
    assert torch.equal(_logits(trained, processor, photo), _logits(copied, processor, photo))
