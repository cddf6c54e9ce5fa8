"""Released checkpoints built straight from their directory, checked against the official layout, not ours.

The release directories are written by tests/models/releases.py from the official config.json field names
and the official modeling code's module names and shapes; nothing here goes through our exporters
(`save_official`, `to_official`), so a wrong name or a wrong meaning in the converters fails.

Key lists: no release `model.safetensors.index.json` was reachable from this project (no hub access), so
the fixed lists below are written from the official modeling code's module names and the full-size
config values (model cards; Ming's config.json at inclusionAI/Ming d97e2f3) and say so.
"""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from models.build import build_model, load_model_config
from models.checkpoint import official_layout
from models.config import ConfigError
from models.ming_checkpoint import release_layout
from models.parameters import count_parameters
from tests.models.releases import (ling_lite_config, ling_mini_config, ming_config, release_keys, write_release)

FAMILIES = {
    "ling-lite": lambda **kw: ling_lite_config(**kw),
    "ling-lite-1.5": lambda **kw: ling_lite_config(**{"max_position_embeddings": 32768, **kw}),
    "ling-mini-2.0": lambda **kw: ling_mini_config(**kw),
    "ming-lite-omni-1": lambda **kw: ming_config("1", **kw),
    "ming-lite-omni-1.5": lambda **kw: ming_config("1.5", **kw),
}


def official_tensors(directory):
    out = {}
    for file in sorted(directory.glob("model-*.safetensors")):
        out.update(load_file(file))
    return out


def build_quietly(directory):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # v1's "SANM encoder not built" warning is tested on its own
        return build_model(directory)


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    return {name: write_release(tmp_path_factory.mktemp(name), make()) for name, make in FAMILIES.items()}


# --------------------------------------------------------------------------------------------------
# every family: an unmodified release directory builds, strictly, with the release's own values

@pytest.mark.parametrize("family", FAMILIES)
def test_release_directory_builds_and_loads_every_tensor(family, releases):
    directory = releases[family]
    model = build_quietly(directory).eval()
    tensors = official_tensors(directory)
    if family.startswith("ling"):
        llm, prefix = model, ""
    else:
        llm, prefix = model.model, "model."
        torch.testing.assert_close(model.vision.patch_embed.proj.weight, tensors["vision.patch_embed.proj.weight"])
        torch.testing.assert_close(model.linear_proj[0].weight, tensors["linear_proj.0.weight"])
    torch.testing.assert_close(llm.lm_head.weight, tensors[prefix + "lm_head.weight"])
    torch.testing.assert_close(llm.model.word_embeddings.weight, tensors[prefix + "model.word_embeddings.weight"])
    ids = torch.tensor([[11, 12, 13, 14, 15]])
    logits = (model(input_ids=ids) if prefix else model(ids)).logits
    assert logits.shape[-1] == llm.config.vocab_size and logits.isfinite().all()


def test_release_values_are_taken_not_our_defaults(releases):
    config = load_model_config(releases["ming-lite-omni-1.5"])
    llm = config.backbone.config
    assert llm["rms_norm_eps"] == 1e-5 and llm["norm_head"] is False  # v1.5's values, not a transcription
    assert llm["rope_scaling"] == {"type": "3D", "factor": None}
    assert (llm["image_start_token"], llm["video_start_token"]) == (3, 6)
    with pytest.warns(UserWarning, match="SANM"):
        v1 = load_model_config(releases["ming-lite-omni-1"]).backbone.config
    assert v1["rms_norm_eps"] == 1e-6 and v1["rope_scaling"] is None  # v1 and v1.5 stay apart
    model = build_quietly(releases["ming-lite-omni-1.5"])
    assert model.model.config.rope_scaling_type == "3D" and model.model.config.rms_norm_eps == 1e-5
    assert (config.vision.config["min_pixels"], config.vision.config["max_pixels"]) == (78400, 802816)
    assert config.projectors.audio == {"name": "conv_audio", "depth": 2, "kernel_size": 3, "stride": 2, "normalize": True}
    assert config.projectors.vision == {"name": "mlp_gelu", "depth": 2, "normalize": True}
    files = config.release_files
    assert {"config", "tokenizer", "tokenizer_config", "preprocessor_config", "am_mvn"} <= set(files)
    assert files["am_mvn"].endswith("am.mvn") and config.tokenizer == files["tokenizer"]


def test_absent_fields_take_the_official_class_defaults(tmp_path):
    config = ling_mini_config()
    del config["partial_rotary_factor"], config["routed_scaling_factor"]
    model = build_model(write_release(tmp_path, config))
    # BailingMoeV2Attention: partial_rotary_factor absent -> 1.0; BailingMoeV2Config: routed_scaling_factor=1.0
    assert model.model.rotary_emb.rotary_dim == config["head_dim"]
    assert model.model.layers[1].mlp.gate.routed_scaling_factor == 1.0


@pytest.mark.parametrize("family, section", [("ling-lite", None), ("ling-mini-2.0", None),
                                             ("ming-lite-omni-1.5", "llm_config"), ("ming-lite-omni-1.5", "vision_config"),
                                             ("ming-lite-omni-1.5", "audio_config"), ("ming-lite-omni-1", None)])
def test_an_unknown_field_is_refused_with_its_name(family, section, tmp_path):
    config = FAMILIES[family]()
    (config[section] if section else config)["attention_sink_size"] = 4
    write_release(tmp_path, config, weights=False)
    warnings.simplefilter("ignore")  # v1's SANM warning
    with pytest.raises(ConfigError, match=r"config\.json: field `" + (section + r"\." if section else "")
                       + r"attention_sink_size` is unknown"):
        load_model_config(tmp_path)


def test_a_changed_generation_default_is_named_in_a_warning(tmp_path):
    write_release(tmp_path, ling_lite_config(temperature=0.7), weights=False)
    with pytest.warns(UserWarning, match=r"temperature=0\.7.*not applied"):
        load_model_config(tmp_path)


def test_v1_builds_its_whisper_path_and_says_the_sanm_encoder_is_not_built(releases):
    with pytest.warns(UserWarning, match="SANM audio encoder .* not built"):
        model = build_model(releases["ming-lite-omni-1"])
    tensors = official_tensors(releases["ming-lite-omni-1"])
    torch.testing.assert_close(model.audio.conv1.weight, tensors["whisper_encoder.conv1.weight"])
    torch.testing.assert_close(model.linear_proj_audio[0].weight, tensors["linear_proj_whisper.0.weight"])


def test_a_yaml_names_the_release_and_adds_only_our_settings(releases, tmp_path):
    (tmp_path / "m.yaml").write_text(f"release: {releases['ling-mini-2.0']}\n"
                                     "backbone: {config: {mtp_loss_scaling_factor: 0.1}}\nmax_length: 4096\n")
    config = load_model_config(tmp_path / "m.yaml")
    assert config.max_length == 4096 and config.backbone.config["mtp_loss_scaling_factor"] == 0.1
    assert config.backbone.config["routed_scaling_factor"] == 2.5 and config.backbone.name == "ling-mini-2.0"
    (tmp_path / "hub.yaml").write_text("release: inclusionAI/No-Such-Release\n")
    with pytest.raises(ConfigError, match=r"hub\.yaml: release 'inclusionAI/No-Such-Release' .*huggingface-cli download"):
        load_model_config(tmp_path / "hub.yaml")


def test_model_info_reads_a_release_directory(releases, capsys):
    from tools.model_info import main
    assert main([str(releases["ling-mini-2.0"])]) == 0
    assert "MoE layers: 2; routed experts: 16, top-4; router: sigmoid_bias" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# bad input at build time, naming the file and the field

def broken(tmp_path, family="ming-lite-omni-1.5", **config_changes):
    return write_release(tmp_path, FAMILIES[family](**config_changes))


def test_a_missing_shard_is_named(tmp_path):
    directory = broken(tmp_path, "ling-lite")
    (directory / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"model\.safetensors\.index\.json names shard\(s\) missing .*model-00002-of-00002"):
        build_model(directory)


def test_a_missing_index_is_named(tmp_path):
    directory = broken(tmp_path, "ling-mini-2.0")
    (directory / "model.safetensors.index.json").unlink()
    with pytest.raises(ConfigError, match=r"shards model-00001-of-00002\.safetensors.* but no model\.safetensors\.index\.json"):
        build_model(directory)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "am.mvn"])
def test_a_missing_tokenizer_or_preprocessor_file_is_named(name, tmp_path):
    directory = broken(tmp_path)
    (directory / name).unlink()
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        build_model(directory)


def test_an_unsupported_architecture_is_named(tmp_path):
    write_release(tmp_path, ling_lite_config(architectures=["DeepseekV2ForCausalLM"]), weights=False)
    with pytest.raises(ConfigError, match=r"config\.json: field `architectures` = \['DeepseekV2ForCausalLM'\] is not supported"):
        build_model(tmp_path)


@pytest.mark.parametrize("family, where", [("ling-lite", None), ("ming-lite-omni-1.5", "llm_config")])
def test_an_unimplemented_rope_scaling_is_refused(family, where, tmp_path):
    config = FAMILIES[family]()
    (config[where] if where else config)["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    write_release(tmp_path, config, weights=False)
    with pytest.raises(ConfigError, match=r"config\.json: " + (where + ": " if where else "") + r"rope_scaling\.type='yarn'"):
        build_model(tmp_path)


def test_a_mis_shaped_tensor_names_the_key_and_the_config_field(tmp_path):
    config = ling_lite_config()
    bad = torch.zeros(config["num_experts"], config["hidden_size"] + 1)
    directory = write_release(tmp_path, config, tensors={"model.layers.1.mlp.gate.weight": bad})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate\.weight has shape \[8, 65\].*hidden_size=64"):
        build_model(directory)


# --------------------------------------------------------------------------------------------------
# fixed release key lists at full size (built on the meta device from a full-size config.json)

LING_LITE_KEYS = {  # 16.8B: 28 layers, 64 experts top-6 + 2 shared, GQA 16/4 x 128
    "model.word_embeddings.weight": (126464, 2048),
    "model.layers.0.input_layernorm.weight": (2048,),
    "model.layers.0.attention.query_key_value.weight": (3072, 2048),
    "model.layers.0.attention.dense.weight": (2048, 2048),
    "model.layers.0.post_attention_layernorm.weight": (2048,),
    "model.layers.0.mlp.gate.weight": (64, 2048),
    "model.layers.0.mlp.experts.0.gate_proj.weight": (1408, 2048),
    "model.layers.0.mlp.experts.0.up_proj.weight": (1408, 2048),
    "model.layers.0.mlp.experts.63.down_proj.weight": (2048, 1408),
    "model.layers.0.mlp.shared_experts.gate_proj.weight": (2816, 2048),
    "model.layers.0.mlp.shared_experts.down_proj.weight": (2048, 2816),
    "model.layers.27.mlp.experts.5.gate_proj.weight": (1408, 2048),
    "model.norm.weight": (2048,),
    "lm_head.weight": (126464, 2048),
}
LING_MINI_KEYS = {  # 16.26B: 20 layers (layer 0 dense), 256 experts top-8 + 1 shared, QK-norm, 1 MTP layer
    "model.word_embeddings.weight": (157184, 2048),
    "model.layers.0.attention.query_key_value.weight": (3072, 2048),
    "model.layers.0.attention.query_layernorm.weight": (128,),
    "model.layers.0.attention.key_layernorm.weight": (128,),
    "model.layers.0.mlp.gate_proj.weight": (5120, 2048),
    "model.layers.0.mlp.down_proj.weight": (2048, 5120),
    "model.layers.1.mlp.gate.weight": (256, 2048),
    "model.layers.1.mlp.gate.expert_bias": (256,),
    "model.layers.1.mlp.experts.255.up_proj.weight": (512, 2048),
    "model.layers.1.mlp.shared_experts.up_proj.weight": (512, 2048),
    "model.layers.19.mlp.experts.0.down_proj.weight": (2048, 512),
    "model.layers.20.eh_proj.weight": (2048, 4096),
    "model.layers.20.enorm.weight": (2048,),
    "model.layers.20.hnorm.weight": (2048,),
    "model.layers.20.final_layernorm.weight": (2048,),
    "model.layers.20.attention.dense.weight": (2048, 2048),
    "model.layers.20.mlp.gate.expert_bias": (256,),
    "model.layers.20.mlp.experts.7.gate_proj.weight": (512, 2048),
    "model.norm.weight": (2048,),
    "lm_head.weight": (157184, 2048),
}
MING_15_KEYS = {  # Qwen2.5-VL tower (32 blocks, 1280 -> 8192), Whisper-large encoder, mlp_depth 2, Ling-lite
    "vision.patch_embed.proj.weight": (1280, 3, 2, 14, 14),
    "vision.blocks.0.norm1.weight": (1280,),
    "vision.blocks.0.attn.qkv.weight": (3840, 1280),
    "vision.blocks.0.attn.qkv.bias": (3840,),
    "vision.blocks.0.attn.proj.weight": (1280, 1280),
    "vision.blocks.0.mlp.gate_proj.weight": (3456, 1280),
    "vision.blocks.0.mlp.gate_proj.bias": (3456,),
    "vision.blocks.31.mlp.down_proj.weight": (1280, 3456),
    "vision.merger.ln_q.weight": (1280,),
    "vision.merger.mlp.0.weight": (5120, 5120),
    "vision.merger.mlp.2.weight": (8192, 5120),
    "audio.conv1.weight": (1280, 128, 3),
    "audio.conv2.weight": (1280, 1280, 3),
    "audio.blocks.0.attn.query.weight": (1280, 1280),
    "audio.blocks.0.attn.query.bias": (1280,),
    "audio.blocks.0.attn.key.weight": (1280, 1280),
    "audio.blocks.0.attn_ln.weight": (1280,),
    "audio.blocks.0.mlp.0.weight": (5120, 1280),
    "audio.blocks.31.mlp.2.weight": (1280, 5120),
    "audio.blocks.31.mlp_ln.bias": (1280,),
    "audio.ln_post.weight": (1280,),
    "linear_proj.0.weight": (2048, 8192),
    "linear_proj.2.weight": (2048, 2048),
    "linear_proj_audio.0.weight": (2048, 1280, 3),
    "linear_proj_audio.3.weight": (2048, 2048),
    "model.model.word_embeddings.weight": (126464, 2048),
    "model.model.layers.0.mlp.gate.weight": (64, 2048),
    "model.model.layers.0.mlp.image_gate.weight": (64, 2048),
    "model.model.layers.0.mlp.audio_gate.weight": (64, 2048),
    "model.model.layers.27.mlp.experts.63.down_proj.weight": (2048, 1408),
    "model.lm_head.weight": (126464, 2048),
}
ABSENT = {"ling-lite": ["model.layers.0.attention.query_layernorm.weight", "model.layers.0.mlp.gate.expert_bias",
                        "model.layers.0.mlp.image_gate.weight", "model.layers.28.input_layernorm.weight"],
          "ling-mini-2.0": ["model.layers.0.mlp.gate.weight", "model.layers.21.eh_proj.weight"],
          "ming-lite-omni-1.5": ["audio.blocks.0.attn.key.bias", "whisper_encoder.conv1.weight", "talker.lm_head.weight"]}
FULL = {"ling-lite": (lambda: ling_lite_config(tiny=False), LING_LITE_KEYS, 3 + 28 * (4 + 1 + 64 * 3 + 3)),
        "ling-mini-2.0": (lambda: ling_mini_config(tiny=False), LING_MINI_KEYS,
                          3 + 9 + 19 * (6 + 2 + 256 * 3 + 3) + (6 + 4 + 2 + 256 * 3 + 3)),
        "ming-lite-omni-1.5": (lambda: ming_config("1.5", tiny=False), MING_15_KEYS, None)}


@pytest.fixture(scope="module")
def full_size(tmp_path_factory):
    out = {}
    for name, (make, _, _) in FULL.items():
        directory = write_release(tmp_path_factory.mktemp(name), make(), weights=False)
        with torch.device("meta"):
            out[name] = build_model(directory)
    return out


def our_layout(name, model):
    return release_layout(model) if name.startswith("ming") else {k: s for k, (_, s) in official_layout(model).items()}


@pytest.mark.parametrize("name", FULL)
def test_full_size_key_list(name, full_size):
    make, fixed, count = FULL[name]
    layout = our_layout(name, full_size[name])
    for key, shape in fixed.items():
        assert key in layout, key
        assert layout[key] == shape, (key, layout[key], shape)
    for key in ABSENT[name]:
        assert key not in layout, key
    if count is not None:
        assert len(layout) == count
    # and exactly the keys the official module structure has (tests/models/releases.py)
    expected = release_keys(make())
    assert set(layout) == set(expected)
    assert {k: s for k, s in layout.items() if s != expected[k]} == {}
    if name.startswith("ming"):
        assert layout["audio.positional_embedding"] == (15000, 1280)  # n_ctx: 300 s of encoder frames


def test_full_size_parameter_counts_from_release_configs(full_size):
    lite, mini = count_parameters(full_size["ling-lite"]), count_parameters(full_size["ling-mini-2.0"])
    assert abs(lite.total / 1e9 - 16.8) < 0.05 and abs(lite.active / 1e9 - 2.75) < 0.02  # Ling-lite model card
    assert abs(mini.total / 1e9 - 16.26) < 0.01 and abs(mini.active / 1e9 - 1.43) < 0.01  # Ling-V2 README
    ming = count_parameters(full_size["ming-lite-omni-1.5"], component_depth=1).components
    assert abs(ming["model"][0] / 1e9 - 16.8) < 0.05


# --------------------------------------------------------------------------------------------------
# semantics: official tensors land where our modules read them

def test_query_weight_of_query_key_value_lands_in_our_q_projection(tmp_path, monkeypatch):
    config = ling_lite_config()
    nh, nkv, hd, H = 4, 2, 16, 64
    qkv = torch.randn((nh + 2 * nkv) * hd, H)
    directory = write_release(tmp_path, config, tensors={"model.layers.0.attention.query_key_value.weight": qkv})
    model = build_model(directory).eval()
    model.config._attn_implementation = "eager"
    import models.ling_lite as ling_lite
    seen = {}
    original = ling_lite.eager_attention

    def capture(module, query, key, value, *args, **kwargs):
        if module.layer_idx == 0:
            seen.update(query=query, key=key)
        return original(module, query, key, value, *args, **kwargs)

    monkeypatch.setattr(ling_lite, "eager_attention", capture)
    ids = torch.tensor([[11, 12, 13]])
    x = model.model.layers[0].input_layernorm(model.model.word_embeddings(ids))
    model(ids)
    # official BailingMoeAttention: rows [0, nh*hd) of query_key_value are the query heads, then keys, values;
    # at position 0 RoPE is the identity, so our query there is exactly W_q x (per head)
    q_official = (x[0, 0] @ qkv[: nh * hd].T).view(nh, hd)
    k_official = (x[0, 0] @ qkv[nh * hd:(nh + nkv) * hd].T).view(nkv, hd)
    torch.testing.assert_close(seen["query"][0, :, 0], q_official, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(seen["key"][0, :, 0], k_official, atol=1e-5, rtol=1e-5)
    # the attention logit of position 1 on position 0, head 3 (GQA: key head 1), as the official code computes it
    q1 = seen["query"][0, 3, 1]
    logit = q1 @ k_official[1] / hd ** 0.5
    torch.testing.assert_close(logit, (seen["query"] @ seen["key"].repeat_interleave(2, 1).transpose(2, 3))[0, 3, 1, 0]
                               / hd ** 0.5)


def test_expert_5_gate_proj_lands_in_expert_5(tmp_path):
    config = ling_mini_config()
    H, inter = config["hidden_size"], config["moe_intermediate_size"]
    p = "model.layers.1.mlp.experts.5."
    official = {f"{p}gate_proj.weight": torch.randn(inter, H), f"{p}up_proj.weight": torch.randn(inter, H),
                f"{p}down_proj.weight": torch.randn(H, inter)}
    model = build_model(write_release(tmp_path, config, tensors=official)).eval()
    experts = model.model.layers[1].mlp.experts
    x = torch.randn(7, H)
    # official BailingMoeV2MLP: down_proj(silu(gate_proj(x)) * up_proj(x))
    expected = F.linear(F.silu(F.linear(x, official[f"{p}gate_proj.weight"])) * F.linear(x, official[f"{p}up_proj.weight"]),
                        official[f"{p}down_proj.weight"])
    only_5 = torch.full((7, 1), 5)
    torch.testing.assert_close(experts(x, only_5, torch.ones(7, 1)), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(experts(x, torch.full((7, 1), 4), torch.ones(7, 1)), expected, atol=1e-3)


def test_whisper_positional_embedding_lands_where_our_encoder_reads_it(tmp_path):
    config = ming_config("1.5")
    n_state, n_ctx = 32, 15000
    table = torch.randn(n_ctx, n_state)
    zero_convs = {f"audio.{c}.{p}": torch.zeros(shape) for c, shapes in
                  (("conv1", {"weight": (n_state, 128, 3), "bias": (n_state,)}),
                   ("conv2", {"weight": (n_state, n_state, 3), "bias": (n_state,)})) for p, shape in shapes.items()}
    directory = write_release(tmp_path, config, tensors={"audio.positional_embedding": table, **zero_convs})
    model = build_model(directory).eval()
    seen = []
    hook = model.audio.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    inputs = model.audio.preprocessor()([np.zeros(16000, dtype=np.float32)])
    with torch.no_grad():
        model.audio(inputs)
    hook.remove()
    # with zero convolutions (gelu(0) = 0) the first block reads exactly the positional rows of the frames
    first = seen[0][0]
    torch.testing.assert_close(first, table[: first.shape[0]])


def test_load_trained_and_training_validation_take_a_release_directory(releases):
    from training.export import load_trained
    model, processor = load_trained(releases["ming-lite-omni-1.5"])
    assert type(model).__name__ == "OmniModel" and processor is not None
    llm, _ = load_trained(releases["ling-lite"])
    torch.testing.assert_close(llm.lm_head.weight, official_tensors(releases["ling-lite"])["lm_head.weight"])
