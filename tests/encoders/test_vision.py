import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

import models  # noqa: F401
from models.checkpoint import CheckpointError
from models.encoders import VISION_ENCODERS
from models.ming_checkpoint import load_vision_tower

TINY = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 48,
        "fullatt_block_indexes": [1], "min_pixels": 3136, "max_pixels": 50176}


def test_qwen_tower_token_count_is_known_before_running(photo):
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY)
    inputs = encoder.preprocessor().images([photo, photo.resize((100, 60))])
    features = encoder.encode(inputs.pixel_values, inputs.grid_thw)
    assert features.shape == (sum(inputs.num_tokens), 48)
    assert inputs.num_tokens[0] <= 64  # max_pixels 224 x 224 -> at most 8 x 8 merged tokens
    assert inputs.num_tokens[1] < inputs.num_tokens[0]


def test_timm_encoder_drops_prefix_tokens_and_selects_a_layer(photo):
    last = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224"})
    penultimate = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224", "feature_layer": -2})
    inputs = last.preprocessor().images([photo])
    assert inputs.num_tokens == [196]  # 14 x 14 patches, no CLS token
    assert last.encode(inputs.pixel_values, inputs.grid_thw).shape == (196, 192)
    assert penultimate.encode(inputs.pixel_values, inputs.grid_thw).shape == (196, 192)


def test_qwen2_5_vl_checkpoint_vision_part_loads_without_missing_keys(tmp_path):
    text = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "vocab_size": 128, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}}
    vision = {k: v for k, v in TINY.items() if k not in ("min_pixels", "max_pixels")}
    official = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=text, vision_config=vision))
    official.save_pretrained(tmp_path)
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY)
    load_vision_tower(encoder, tmp_path)
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, official.model.visual.state_dict()[name]), name


def test_wrong_tower_size_names_the_keys(tmp_path):
    official = VISION_ENCODERS.build("qwen2_5_vl", {**TINY, "depth": 3})
    from safetensors.torch import save_file
    save_file({f"visual.{k}": v.contiguous() for k, v in official.state_dict().items()}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected keys: blocks.2"):
        load_vision_tower(VISION_ENCODERS.build("qwen2_5_vl", TINY), tmp_path)


def test_unknown_encoder_lists_the_known_ones():
    with pytest.raises(KeyError, match="Known vision encoders: qwen2_5_vl, timm"):
        VISION_ENCODERS.build("clip", {})
