"""Models built from configs, with their components initialised from official checkpoints."""
import pytest
import torch
import yaml
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

import models  # noqa: F401
from models.build import build_model, load_model_config
from models.checkpoint import CheckpointError
from models.config import ConfigError


def test_omni_components_load_from_their_own_checkpoints(tmp_path):
    config = load_model_config("configs/models/tiny-omni.yaml")
    vision = {k: v for k, v in config.vision.config.items() if k not in ("min_pixels", "max_pixels")}
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 128, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}}
    qwen = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    qwen.save_pretrained(tmp_path / "qwen")
    whisper = WhisperForConditionalGeneration(WhisperConfig(**config.audio.config, decoder_layers=1,
                                                            decoder_attention_heads=2, vocab_size=100, pad_token_id=0,
                                                            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1))
    whisper.save_pretrained(tmp_path / "whisper")
    llm = build_model(config).model
    llm.save_official(tmp_path / "ling", max_shard_size=200_000)

    data = yaml.safe_load(open("configs/models/tiny-omni.yaml"))
    data["base"] = str((__import__("pathlib").Path("configs/models/tiny-ling-lite.yaml")).resolve())
    data["vision"]["checkpoint"] = str(tmp_path / "qwen")
    data["audio"]["checkpoint"] = str(tmp_path / "whisper")
    data["backbone"]["checkpoint"] = str(tmp_path / "ling")
    (tmp_path / "omni.yaml").write_text(yaml.safe_dump(data))
    model = build_model(tmp_path / "omni.yaml")
    for name, tensor in model.vision.state_dict().items():
        assert torch.equal(tensor, qwen.model.visual.state_dict()[name]), name
    for name, tensor in model.audio.state_dict().items():
        assert torch.equal(tensor, whisper.model.encoder.state_dict()[name]), name
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, llm.state_dict()[name]), name


def test_a_checkpoint_of_another_model_is_refused(tmp_path):
    build_model("configs/models/tiny-ling-mini.yaml").save_official(tmp_path / "mini")
    data = yaml.safe_load(open("configs/models/tiny-ling-lite.yaml"))
    data["backbone"]["checkpoint"] = str(tmp_path / "mini")
    (tmp_path / "lite.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(CheckpointError, match="does not match"):
        build_model(tmp_path / "lite.yaml")


def test_config_typos_name_the_key(tmp_path):
    (tmp_path / "m.yaml").write_text("backbone: {name: ling-lite}\nvison: {name: qwen2_5_vl}\n")
    with pytest.raises(ConfigError, match="unknown key 'vison' \\(did you mean 'vision'\\?\\)"):
        load_model_config(tmp_path / "m.yaml")
