"""Vision encoders on real photos: token counts known before running, official checkpoints, config errors."""
import json

import pytest
import timm
import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from data.media import load_image
from encoders.checkpoint import CheckpointError
from models.config import ConfigError
from models.encoders import VISION_ENCODERS

TINY = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 48,
        "fullatt_block_indexes": [1], "min_pixels": 3136, "max_pixels": 50176}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
        "num_key_value_heads": 1, "vocab_size": 128, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}}
ARCHITECTURE = {k: v for k, v in TINY.items() if k not in ("min_pixels", "max_pixels")}


@pytest.fixture(scope="module")
def photos(assets):
    return [load_image(assets / name) for name in ("coco_000000039769.png", "mathvista_testmini_pid106.png",
                                                   "ai2d_00002168.png")]


def test_qwen_token_counts_are_known_before_running(photos):
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY).eval()
    inputs = encoder.preprocessor().images(photos)
    assert inputs.num_tokens == encoder.num_tokens(inputs.grid_thw)
    with torch.no_grad():
        features = encoder(inputs.pixel_values, inputs.grid_thw)
    assert features.shape == (sum(inputs.num_tokens), encoder.output_dim) == (sum(inputs.num_tokens), 48)
    assert all(0 < n <= 64 for n in inputs.num_tokens)  # max_pixels 224 x 224 -> at most 8 x 8 merged tokens
    assert len(set(inputs.num_tokens)) > 1  # dynamic resolution: different aspect ratios, different counts
    one = encoder.preprocessor().images([photos[1]])  # each image's features are independent of the others
    with torch.no_grad():
        alone = encoder(one.pixel_values, one.grid_thw)
    torch.testing.assert_close(alone, features[inputs.num_tokens[0]: sum(inputs.num_tokens[:2])], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prefix", ["model.visual.", "visual."])
def test_qwen2_5_vl_checkpoint_vision_part_loads_without_missing_keys(tmp_path, prefix):
    official = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT, vision_config=ARCHITECTURE))
    official.save_pretrained(tmp_path)
    reference = official.model.visual.state_dict()
    if prefix == "visual.":  # the original Qwen2.5-VL release's key names, in two shards
        for file in tmp_path.glob("*.safetensors"):
            file.unlink()
        keys = sorted(reference)
        shards = {"model-00001-of-00002.safetensors": keys[:5], "model-00002-of-00002.safetensors": keys[5:]}
        for name, part in shards.items():
            save_file({prefix + k: reference[k].contiguous() for k in part}, str(tmp_path / name))
        (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {prefix + k: name for name, part in shards.items() for k in part}}))
    assert json.loads((tmp_path / "config.json").read_text())["vision_config"]["depth"] == 2
    encoder = VISION_ENCODERS.build("qwen2_5_vl", TINY)
    encoder.load_checkpoint(tmp_path)
    assert encoder.state_dict().keys() == reference.keys()
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, reference[name]), name


def test_qwen_checkpoint_of_another_architecture_or_incomplete_fails_clearly(tmp_path):
    official = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=TEXT,
                                                                   vision_config={**ARCHITECTURE, "depth": 3}))
    official.save_pretrained(tmp_path / "deeper")
    with pytest.raises(CheckpointError, match="depth: checkpoint 3 vs encoder 2"):
        VISION_ENCODERS.build("qwen2_5_vl", TINY).load_checkpoint(tmp_path / "deeper")
    tensors = {f"visual.{k}": v for k, v in VISION_ENCODERS.build("qwen2_5_vl", TINY).state_dict().items()
               if not k.startswith("merger.mlp.2")}
    (tmp_path / "partial").mkdir()
    save_file(tensors, str(tmp_path / "partial" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"missing keys: merger\.mlp\.2\.weight, merger\.mlp\.2\.bias"):
        VISION_ENCODERS.build("qwen2_5_vl", TINY).load_checkpoint(tmp_path / "partial")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        VISION_ENCODERS.build("qwen2_5_vl", TINY).load_checkpoint(tmp_path)


def test_timm_encoder_drops_prefix_tokens_and_selects_a_layer(photos):
    last = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224"}).eval()
    torch.manual_seed(0)
    penultimate = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224", "feature_layer": -2}).eval()
    penultimate.load_state_dict(last.state_dict())
    inputs = last.preprocessor().images(photos[:2])
    assert inputs.num_tokens == [196, 196]  # 14 x 14 patches; the CLS token is dropped
    with torch.no_grad():
        final, second_last = last(inputs.pixel_values, inputs.grid_thw), penultimate(inputs.pixel_values, inputs.grid_thw)
        blocks = last.model.forward_intermediates(inputs.pixel_values, indices=[10], norm=False,
                                                  intermediates_only=True)[0]
    assert final.shape == second_last.shape == (392, 192) and last.output_dim == 192
    torch.testing.assert_close(second_last, blocks.flatten(2).transpose(1, 2).reshape(-1, 192))
    assert not torch.allclose(final, second_last)


def test_timm_local_checkpoint_and_freezing(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    save_file(source.state_dict(), str(tmp_path / "vit.safetensors"))  # includes head.* (ignored)
    encoder = VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224", "freeze": True,
                                             "checkpoint": str(tmp_path / "vit.safetensors")})
    assert torch.equal(encoder.model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert not any(p.requires_grad for p in encoder.parameters())
    save_file({k: v for k, v in source.state_dict().items() if k != "cls_token"}, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys: cls_token"):
        VISION_ENCODERS.build("timm", {"model_name": "vit_tiny_patch16_224",
                                       "checkpoint": str(tmp_path / "broken.safetensors")})


def test_config_sections_are_typed_and_freeze_works():
    frozen = VISION_ENCODERS.build("qwen2_5_vl", {**TINY, "freeze": True})
    assert not any(p.requires_grad for p in frozen.parameters())
    assert frozen.config.max_pixels == 50176  # travels with the saved config
    with pytest.raises(ConfigError, match=r"tiny.yaml: unknown key 'vision.config.depht'.*did you mean 'vision.config.depth'"):
        VISION_ENCODERS.build("qwen2_5_vl", {"depht": 2}, "tiny.yaml")
    with pytest.raises(ConfigError, match="vision.config.hidden_size = 'wide' must be an integer"):
        VISION_ENCODERS.build("qwen2_5_vl", {"hidden_size": "wide"})
    with pytest.raises(ConfigError, match="fullatt_block_indexes"):
        VISION_ENCODERS.build("qwen2_5_vl", {**TINY, "fullatt_block_indexes": [5]})
    with pytest.raises(ConfigError, match="missing required key 'vision.config.model_name'"):
        VISION_ENCODERS.build("timm", {})
    with pytest.raises(KeyError, match="Known vision encoders: qwen2_5_vl, timm"):
        VISION_ENCODERS.build("clip", {})


def test_a_siglip_vit_without_class_token(photos):
    config = {"model_name": "vit_base_patch16_siglip_224", "feature_layer": -2,
              "model_kwargs": {"depth": 3, "embed_dim": 32, "num_heads": 2}}  # SigLIP's layout, tiny
    encoder = VISION_ENCODERS.build("timm", config).eval()
    assert encoder.num_prefix_tokens == 0 and encoder.output_dim == 32
    inputs = encoder.preprocessor().images(photos[:1])
    assert inputs.pixel_values.shape == (1, 3, 224, 224) and inputs.num_tokens == [196]
    with torch.no_grad():
        assert encoder(inputs.pixel_values, inputs.grid_thw).shape == (196, 32)
