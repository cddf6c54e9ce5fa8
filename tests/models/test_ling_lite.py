"""Ling-lite (BailingMoe v1 with Ming's modality routers): registry build, generation with a KV cache,
modality routing, norm_head, activation checkpointing, full-size parameter counts on the meta device."""
import pytest
import torch
import torch.nn.functional as F

import models.ling_lite  # noqa: F401  (registers the backbone)
from models.backbones import build_backbone
from models.build import build_model, load_model_config
from models.config import ConfigError
from models.ling_lite import LingLiteConfig, LingLiteForCausalLM
from models.parameters import count_parameters
from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    values = load_model_config("configs/models/tiny-ling-lite.yaml").backbone.config
    values.update(overrides)
    model = build_backbone("ling-lite", values)
    for name, p in model.named_parameters():  # larger weights: routing decisions that differ between routers
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    return model.eval()


INPUT = torch.randint(2, 512, (2, 11), generator=torch.Generator().manual_seed(3))


def test_registry_builds_the_tiny_config_and_gives_finite_logits():
    model = build_model("configs/models/tiny-ling-lite.yaml")
    assert isinstance(model, LingLiteForCausalLM)
    assert model.config.model_type == "bailing_moe" and model.config.multi_gate
    out = model(INPUT)
    assert out.logits.shape == (2, 11, 512) and out.logits.isfinite().all()
    assert model.config._experts_implementation == "grouped_mm"


def test_unknown_config_field_is_rejected():
    with pytest.raises(ConfigError, match="num_expert"):
        build_backbone("ling-lite", {"num_expert": 4}, source="x.yaml")


@pytest.mark.parametrize("with_modalities", [False, True])
def test_kv_cache_generation_equals_no_cache_generation(with_modalities):
    model = tiny()
    kwargs = {"modality_ids": torch.randint(0, 4, INPUT.shape, generator=torch.Generator().manual_seed(5))} \
        if with_modalities else {}
    cached = model.generate(INPUT, max_new_tokens=8, do_sample=False, use_cache=True, **kwargs)
    uncached = model.generate(INPUT, max_new_tokens=8, do_sample=False, use_cache=False, **kwargs)
    assert cached.shape == (2, 19)
    assert torch.equal(cached, uncached)


def test_kv_cache_logits_equal_full_forward_logits():
    model = tiny()
    full = model(INPUT).logits
    first = model(INPUT[:, :7], use_cache=True)
    rest = model(INPUT[:, 7:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, atol=1e-5, rtol=1e-5)


def test_modality_ids_select_the_modality_routers():
    model = tiny()
    text = model(INPUT).logits
    torch.testing.assert_close(model(INPUT, modality_ids=torch.zeros_like(INPUT)).logits, text)
    image = torch.zeros_like(INPUT)
    image[:, 3:8] = 1
    with_image = model(INPUT, modality_ids=image).logits
    torch.testing.assert_close(with_image[:, :3], text[:, :3])  # causal: earlier text tokens are unaffected
    assert not torch.allclose(with_image[:, 3:], text[:, 3:])
    video = torch.where(image == 1, 3, 0)
    torch.testing.assert_close(model(INPUT, modality_ids=video).logits, with_image)  # video routes like image (Ming)
    audio = torch.where(image == 1, 2, 0)
    assert not torch.allclose(model(INPUT, modality_ids=audio).logits, with_image)


def test_norm_head_divides_the_head_by_its_norm_over_the_vocabulary():
    model = tiny()
    hidden = model.model(INPUT).last_hidden_state
    weight = model.lm_head.weight
    expected = F.linear(hidden, weight / (weight.norm(dim=0, keepdim=True) + 1e-7))
    torch.testing.assert_close(model(INPUT).logits, expected)
    model.config.norm_head = False
    torch.testing.assert_close(model(INPUT).logits, F.linear(hidden, weight))


def gradients(model, labels, checkpointing):
    model.zero_grad()
    model.train()
    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model(INPUT, labels=labels, modality_ids=(INPUT % 3)).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_gradients():
    model = tiny()
    assert model.supports_gradient_checkpointing
    plain = gradients(model, INPUT, checkpointing=False)
    checkpointed = gradients(model, INPUT, checkpointing=True)
    assert any(layer.gradient_checkpointing for layer in model.model.layers)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tier_routing_attaches_to_every_moe_layer():
    model = tiny()
    routing = TierRouting(model)
    assert routing.num_moe_layers == 2 and {s.family for s in routing.specs} == {"softmax"}
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=3), routing.num_experts, routing.top_k))
    reference = model(INPUT).logits
    with routing.path(1):
        assert torch.equal(model(INPUT).logits, reference)
    with routing.path(3):
        assert not torch.allclose(model(INPUT).logits, reference)


def test_experts_implementation_can_be_switched_on_the_model():
    model = tiny()
    reference = model(INPUT).logits
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    torch.testing.assert_close(model(INPUT).logits, reference, atol=1e-5, rtol=1e-5)


def test_full_size_on_meta_has_the_model_card_parameter_counts(tmp_path):
    from tests.models.releases import ling_lite_config, write_release
    directory = write_release(tmp_path, ling_lite_config(tiny=False), weights=False)  # a release's config.json only
    with torch.device("meta"):
        model = build_model(directory)
    counts = count_parameters(model)
    total, active = counts.total, counts.active
    # model card: 16.8B total, 2.75B activated (embeddings and LM head included)
    assert abs(total / 1e9 - 16.8) < 0.05, total
    assert abs(active / 1e9 - 2.75) < 0.02, active
    assert model.model.layers[0].mlp.gate.top_k == 6 and model.model.layers[0].mlp.experts.num_experts == 64


def test_official_defaults_of_the_configuration_class():
    # inclusionAI/Ling models/configuration_bailing_moe.py, BailingMoeConfig.__init__ (+ Ming's multi_gate,
    # image_patch_token): an absent config.json field means what it means to the official code
    config = LingLiteConfig()
    official = {"vocab_size": 30592, "hidden_size": 1024, "intermediate_size": None, "num_hidden_layers": 24,
                "use_bias": True, "use_qkv_bias": False, "rms_norm_eps": 1e-5, "norm_head": False,
                "embedding_dropout": 0.1, "attention_dropout": 0.1, "output_dropout": 0.1,
                "initializer_range": 0.02, "max_position_embeddings": 16384, "rope_theta": 10000.0,
                "pad_token_id": 126081, "num_experts": 16, "num_shared_experts": 0, "num_experts_per_tok": 2,
                "norm_topk_prob": True, "moe_intermediate_size": None, "first_k_dense_replace": 0,
                "head_dim": 64, "multi_gate": False, "image_patch_token": 126346, "rope_scaling_type": None}
    assert {k: getattr(config, k) for k in official} == official
    assert config.num_key_value_heads == 16  # official default 0: one KV head per attention head


def test_rope_scaling_3d_is_accepted_and_other_types_refused():
    assert LingLiteConfig(rope_scaling={"type": "3D", "factor": None}).rope_scaling_type == "3D"
    assert LingLiteConfig(rope_scaling=None).rope_scaling_type is None
    for scaling in ({"type": "yarn", "factor": 4.0}, {"rope_type": "linear", "factor": 2.0}):
        with pytest.raises(ValueError, match="rope_scaling.type"):
            LingLiteConfig(rope_scaling=scaling)
