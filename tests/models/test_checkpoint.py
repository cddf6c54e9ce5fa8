"""Official checkpoint layout: a tiny checkpoint written here by hand in the official layout (config.json,
2+ shards, index, per-expert keys, official names) loads, and export reproduces it bit for bit; broken
checkpoints fail with errors naming the keys and the config field."""
import json

import pytest
import torch
from safetensors.torch import save_file

from models.checkpoint import CheckpointError, read_official_tensors, save_official
from models.ling_lite import LingLiteForCausalLM
from models.ling_mini import LingMiniForCausalLM

LITE = dict(model_type="bailing_moe", architectures=["BailingMoeForCausalLM"], vocab_size=300, hidden_size=32,
            intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            num_experts=16, num_shared_experts=2, num_experts_per_tok=4, moe_intermediate_size=8,
            first_k_dense_replace=1, norm_topk_prob=True, norm_head=True, multi_gate=True, rope_theta=600000,
            max_position_embeddings=256, rms_norm_eps=1e-6, use_bias=False, use_qkv_bias=False,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, hidden_act="silu",
            _attn_implementation="flash_attention_2", torch_dtype="bfloat16")
MINI = dict(model_type="bailing_moe_v2", architectures=["BailingMoeV2ForCausalLM"], vocab_size=300, hidden_size=32,
            intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            num_experts=16, num_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
            routed_scaling_factor=2.5, moe_intermediate_size=8, first_k_dense_replace=1, partial_rotary_factor=0.5,
            use_qk_norm=True, num_nextn_predict_layers=1, mtp_loss_scaling_factor=0.1, score_function="sigmoid",
            moe_router_enable_expert_bias=True, rope_theta=600000, max_position_embeddings=256,
            tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, hidden_act="silu")


def official_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """The key set of an official BailingMoe / BailingMoeV2 checkpoint, written out independently of our code."""
    h, v = c["hidden_size"], c["vocab_size"]
    heads, kv = c["num_attention_heads"], c["num_key_value_heads"]
    hd = c.get("head_dim") or h // heads
    e, mi, shared = c["num_experts"], c["moe_intermediate_size"], c["num_shared_experts"]
    v2 = c["model_type"] == "bailing_moe_v2"
    shapes = {"model.word_embeddings.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}

    def attention(p):
        shapes[p + "attention.query_key_value.weight"] = ((heads + 2 * kv) * hd, h)
        shapes[p + "attention.dense.weight"] = (h, heads * hd)
        if v2:
            shapes[p + "attention.query_layernorm.weight"] = (hd,)
            shapes[p + "attention.key_layernorm.weight"] = (hd,)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)

    def moe(p):
        shapes[p + "mlp.gate.weight"] = (e, h)
        if c.get("multi_gate"):
            shapes[p + "mlp.image_gate.weight"] = (e, h)
            shapes[p + "mlp.audio_gate.weight"] = (e, h)
        if v2:
            shapes[p + "mlp.gate.expert_bias"] = (e,)
        for i in range(e):
            shapes[p + f"mlp.experts.{i}.gate_proj.weight"] = (mi, h)
            shapes[p + f"mlp.experts.{i}.up_proj.weight"] = (mi, h)
            shapes[p + f"mlp.experts.{i}.down_proj.weight"] = (h, mi)
        shapes[p + "mlp.shared_experts.gate_proj.weight"] = (mi * shared, h)
        shapes[p + "mlp.shared_experts.up_proj.weight"] = (mi * shared, h)
        shapes[p + "mlp.shared_experts.down_proj.weight"] = (h, mi * shared)

    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        attention(p)
        if layer < c["first_k_dense_replace"]:
            shapes[p + "mlp.gate_proj.weight"] = (c["intermediate_size"], h)
            shapes[p + "mlp.up_proj.weight"] = (c["intermediate_size"], h)
            shapes[p + "mlp.down_proj.weight"] = (h, c["intermediate_size"])
        else:
            moe(p)
    for k in range(c.get("num_nextn_predict_layers", 0)):
        p = f"model.layers.{c['num_hidden_layers'] + k}."
        attention(p)
        moe(p)
        for name in ("enorm", "hnorm", "final_layernorm"):
            shapes[p + f"{name}.weight"] = (h,)
        shapes[p + "eh_proj.weight"] = (h, 2 * h)
    return shapes


def official_tensors(c: dict, dtype=torch.float32, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in official_shapes(c).items():
        t = torch.randn(shape, generator=g) * (0.02 if key.endswith("expert_bias") else 0.2)
        if key.endswith("norm.weight"):
            t = 1 + 0.1 * t
        out[key] = t.to(torch.float32 if key.endswith("expert_bias") else dtype)
    return out


def write_official(path, config: dict, tensors: dict[str, torch.Tensor], shards: int = 3) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, path / name)
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))


CASES = [(LingLiteForCausalLM, LITE), (LingMiniForCausalLM, MINI)]


@pytest.mark.parametrize("model_class,config", CASES, ids=["ling-lite", "ling-mini"])
def test_official_checkpoint_loads_and_round_trips_bit_identically(tmp_path, model_class, config):
    tensors = official_tensors(config)
    write_official(tmp_path / "official", config, tensors)
    model = model_class.from_official(tmp_path / "official")
    assert model.config._attn_implementation == "sdpa"  # the checkpoint's flash_attention_2 is not forced on us
    logits = model(torch.randint(0, 300, (2, 7))).logits
    assert logits.shape == (2, 7, 300) and logits.isfinite().all()
    # spot-check the fusion: expert 3 of layer 1
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.gate_up_proj[3, :8], tensors["model.layers.1.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(experts.gate_up_proj[3, 8:], tensors["model.layers.1.mlp.experts.3.up_proj.weight"])
    assert torch.equal(experts.down_proj[3], tensors["model.layers.1.mlp.experts.3.down_proj.weight"])
    if config.get("multi_gate"):
        assert torch.equal(model.model.layers[2].mlp.gate.audio_weight, tensors["model.layers.2.mlp.audio_gate.weight"])
    if config["model_type"] == "bailing_moe_v2":
        assert torch.equal(model.model.layers[3].mlp.gate.expert_bias, tensors["model.layers.3.mlp.gate.expert_bias"])

    written = save_official(model, tmp_path / "export", max_shard_size=40_000)
    assert len(written) >= 2 and (tmp_path / "export" / "model.safetensors.index.json").is_file()
    exported = read_official_tensors(tmp_path / "export")
    assert exported.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key
    again = model_class.from_official(tmp_path / "export")
    assert torch.equal(again(torch.arange(7)[None]).logits, model(torch.arange(7)[None]).logits)


def test_single_file_bf16_checkpoint_keeps_its_dtype(tmp_path):
    tensors = official_tensors(MINI, dtype=torch.bfloat16)
    write_official(tmp_path, MINI, tensors, shards=1)
    model = LingMiniForCausalLM.from_official(tmp_path)
    assert model.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert model(torch.arange(5)[None]).logits.isfinite().all()
    assert LingMiniForCausalLM.from_official(tmp_path, dtype=torch.float32).lm_head.weight.dtype == torch.float32


def broken(tmp_path, change):
    tensors = official_tensors(LITE)
    change(tensors)
    write_official(tmp_path, LITE, tensors)
    with pytest.raises(CheckpointError) as info:
        LingLiteForCausalLM.from_official(tmp_path)
    return str(info.value)


def test_missing_key_is_named(tmp_path):
    message = broken(tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    assert "1 missing key(s): model.layers.2.mlp.experts.5.up_proj.weight" in message


def test_unexpected_key_is_named(tmp_path):
    message = broken(tmp_path, lambda t: t.update({"model.layers.1.mlp.experts.16.up_proj.weight": torch.zeros(8, 32)}))
    assert "unexpected key(s): model.layers.1.mlp.experts.16.up_proj.weight" in message
    assert "num_experts=16" in message


def test_shape_mismatch_names_the_config_field(tmp_path):
    message = broken(tmp_path, lambda t: t.update({"model.layers.1.mlp.gate.weight": torch.zeros(8, 32)}))
    assert "model.layers.1.mlp.gate.weight has shape [8, 32] but the config says num_experts=16" in message
    message = broken(tmp_path, lambda t: t.update({"model.layers.2.mlp.experts.0.down_proj.weight": torch.zeros(32, 9)}))
    assert "model.layers.2.mlp.experts.0.down_proj.weight has shape [32, 9] but the config says moe_intermediate_size=8" in message
    message = broken(tmp_path, lambda t: t.update({"model.word_embeddings.weight": torch.zeros(301, 32)}))
    assert "but the config says vocab_size=300" in message


def test_fewer_experts_than_configured_fails_with_a_hint(tmp_path):
    def drop(t):
        for key in [k for k in t if ".experts.15." in k]:
            t.pop(key)
    message = broken(tmp_path, drop)
    assert "missing key(s)" in message and "num_experts=16" in message


def test_index_naming_an_absent_shard_fails(tmp_path):
    write_official(tmp_path, LITE, official_tensors(LITE))
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
        LingLiteForCausalLM.from_official(tmp_path)


def test_ming_style_checkpoint_with_llm_config_and_prefix(tmp_path):
    tensors = {f"model.{k}": v for k, v in official_tensors(LITE).items()}
    tensors["vision.blocks.0.weight"] = torch.zeros(3)  # other towers are ignored
    config = {"model_type": "bailingmm", "llm_config": LITE, "vision_config": {}}
    write_official(tmp_path, config, tensors)
    model = LingLiteForCausalLM.from_official(tmp_path)
    assert torch.equal(model.lm_head.weight, tensors["model.lm_head.weight"])
