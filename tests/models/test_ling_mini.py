"""Ling-mini-2.0 (BailingMoeV2): MTP loss and its weighting, partial RoPE, QK-norm, KV-cache generation,
activation checkpointing, sigmoid routers under tier routing, full-size parameter counts on meta."""
import pytest
import torch
import torch.nn.functional as F

import models.ling_mini  # noqa: F401  (registers the backbone)
from models.backbones import build_backbone
from models.build import build_model, load_model_config
from models.ling_lite import apply_rotary
from models.ling_mini import LingMiniConfig, LingMiniForCausalLM
from models.moe import SigmoidGroupRouter
from models.parameters import count_parameters
from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    values = load_model_config("configs/models/tiny-ling-mini.yaml").backbone.config
    values.update(overrides)
    model = build_backbone("ling-mini-2.0", values)
    for name, p in model.named_parameters():
        if "norm" not in name:
            torch.nn.init.normal_(p, std=0.2)
    for module in model.modules():
        if isinstance(module, SigmoidGroupRouter):
            module.expert_bias.normal_(std=0.3)
    return model.eval()


INPUT = torch.randint(2, 512, (2, 11), generator=torch.Generator().manual_seed(3))


def test_registry_builds_the_tiny_config():
    model = build_model("configs/models/tiny-ling-mini.yaml")
    assert isinstance(model, LingMiniForCausalLM) and model.config.model_type == "bailing_moe_v2"
    out = model(INPUT)
    assert out.logits.shape == (2, 11, 512) and out.logits.isfinite().all()
    assert out.mtp_logits is None and out.mtp_loss is None  # MTP runs only for training / on request
    layer = model.model.layers[1]
    assert isinstance(layer.mlp.gate, SigmoidGroupRouter) and layer.attention.use_qk_norm
    assert not hasattr(model.model.layers[0].mlp, "gate")  # first_k_dense_replace=1


def test_mtp_loss_is_returned_and_added_with_the_official_weighting():
    model = tiny()
    labels = INPUT.clone()
    labels[0, :3] = -100
    out = model(INPUT, labels=labels)
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    (mtp_logits,) = out.mtp_logits
    # depth 0 predicts the token two ahead: position t is scored against labels[t + 2], per row
    mtp = F.cross_entropy(mtp_logits[:, :-2].reshape(-1, 512), labels[:, 2:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.mtp_loss, mtp)
    torch.testing.assert_close(out.loss, ce + model.config.mtp_loss_scaling_factor * mtp)


def test_mtp_layer_combines_the_next_token_embedding_with_the_main_hidden_state():
    model = tiny()
    out = model(INPUT, return_mtp=True)
    main = model.model(INPUT).last_hidden_state
    layer = model.model.layers[model.config.num_hidden_layers]
    assert layer.is_mtp_layer
    # official BailingMoeV2Model.forward: roll the ids left, the freed last position holds token id 0, embed
    shifted_ids = torch.cat([INPUT[:, 1:], torch.zeros_like(INPUT[:, :1])], 1)
    shifted = model.model.word_embeddings(shifted_ids)
    positions = torch.arange(11).unsqueeze(0)
    rope = model.model.rotary_emb(main, positions)
    mask = torch.full((11, 11), float("-inf")).triu(1)[None, None]
    expected = layer(shifted, main, attention_mask=mask, position_embeddings=rope)
    torch.testing.assert_close(out.mtp_logits[0], F.linear(expected, model.lm_head.weight), atol=1e-5, rtol=1e-5)


def test_mtp_last_position_is_the_embedding_of_token_id_0_also_from_inputs_embeds():
    model = tiny()
    with torch.no_grad():
        model.model.word_embeddings.weight[0].normal_(std=3.0)  # token 0 must matter at the last position
    from_ids = model(INPUT, return_mtp=True).mtp_logits[0]
    from_embeds = model(inputs_embeds=model.model.word_embeddings(INPUT), return_mtp=True).mtp_logits[0]
    torch.testing.assert_close(from_embeds, from_ids)
    with torch.no_grad():
        model.model.word_embeddings.weight[0].zero_()  # what a zero-vector fill would compute
    zero_filled = model(INPUT, return_mtp=True).mtp_logits[0]
    torch.testing.assert_close(zero_filled[:, :-1], from_ids[:, :-1])  # causal: only the last position changes
    assert not torch.allclose(zero_filled[:, -1], from_ids[:, -1], atol=1e-3)


def test_absent_partial_rotary_factor_means_full_rope_as_the_official_code():
    values = load_model_config("configs/models/tiny-ling-mini.yaml").backbone.config
    values.pop("partial_rotary_factor")
    model = build_backbone("ling-mini-2.0", values)
    assert model.config.partial_rotary_factor == 1.0
    assert model.model.rotary_emb.rotary_dim == model.config.head_dim  # 16 of 16
    assert LingMiniConfig().partial_rotary_factor == 1.0


def test_official_defaults_of_the_configuration_class():
    # inclusionAI/Ling-V2 models/configuration_bailing_moe_v2.py, BailingMoeV2Config.__init__
    config = LingMiniConfig()
    official = {"routed_scaling_factor": 1.0, "num_nextn_predict_layers": 0, "mtp_loss_scaling_factor": 0,
                "n_group": 8, "topk_group": 4, "use_qk_norm": True, "moe_router_enable_expert_bias": True,
                "rms_norm_eps": 1e-6, "head_dim": 128, "first_k_dense_replace": 1,
                "initializer_range": 0.02, "max_window_layers": 20, "tie_word_embeddings": False}
    assert {k: getattr(config, k) for k in official} == official


@pytest.mark.parametrize("field, value", [("score_function", "softmax"), ("norm_topk_prob", False),
                                          ("router_dtype", "bf16"), ("moe_router_enable_expert_bias", False),
                                          ("rope_scaling", {"type": "yarn", "factor": 4.0})])
def test_values_the_official_code_would_not_honour_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        LingMiniConfig(**{field: value})


def test_partial_rope_rotates_only_the_first_part_of_each_head():
    model = tiny()
    rope = model.model.rotary_emb
    assert rope.rotary_dim == 8  # head_dim 16 * partial_rotary_factor 0.5
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos, sin = rope(q, torch.arange(5).unsqueeze(0))
    q2, k2 = apply_rotary(q, k, cos, sin)
    assert torch.equal(q2[..., 8:], q[..., 8:]) and torch.equal(k2[..., 8:], k[..., 8:])
    assert not torch.allclose(q2[..., 1:, :8], q[..., 1:, :8])
    torch.testing.assert_close(q2[..., 0, :], q[..., 0, :])  # position 0: identity


def test_kv_cache_generation_equals_no_cache_generation():
    model = tiny()
    cached = model.generate(INPUT, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = model.generate(INPUT, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape == (2, 19) and torch.equal(cached, uncached)


def test_activation_checkpointing_gives_the_same_gradients_mtp_included():
    model = tiny()

    def grads(checkpointing):
        model.zero_grad()
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        model(INPUT, labels=INPUT).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert model.model.layers[-1].gradient_checkpointing  # the MTP layer too
    assert plain.keys() == checkpointed.keys() and any(".layers.3." in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tier_routing_sees_sigmoid_routers():
    model = tiny()
    routing = TierRouting(model)
    assert {s.family for s in routing.specs} == {"sigmoid_bias"}
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=3), routing.num_experts, routing.top_k))
    reference = model(INPUT).logits
    with routing.path(1):
        assert torch.equal(model(INPUT).logits, reference)
    with routing.path(3):
        assert not torch.allclose(model(INPUT).logits, reference)


def test_config_rejects_inconsistent_shared_expert_size():
    with pytest.raises(ValueError, match="moe_shared_expert_intermediate_size"):
        LingMiniConfig(moe_intermediate_size=512, num_shared_experts=1, moe_shared_expert_intermediate_size=1024)
    LingMiniConfig(moe_intermediate_size=512, num_shared_experts=1, moe_shared_expert_intermediate_size=512)


def test_full_size_on_meta_has_the_model_card_parameter_counts(tmp_path):
    from tests.models.releases import ling_mini_config, write_release
    directory = write_release(tmp_path, ling_mini_config(tiny=False), weights=False)  # a release's config.json only
    with torch.device("meta"):
        model = build_model(directory)
    counts = count_parameters(model)
    total, active = counts.total, counts.active
    # README of inclusionAI/Ling-V2: "1.43B activated of 16.26B total params", non-embedding active 789M
    assert abs(total / 1e9 - 16.26) < 0.01, total
    assert abs(active / 1e9 - 1.43) < 0.01, active
    embeddings = model.model.word_embeddings.weight.numel() + model.lm_head.weight.numel()
    assert abs((active - embeddings) / 1e6 - 789) < 1
    with_mtp = count_parameters(model, include_mtp=True).total
    assert with_mtp > total + 0.8e9  # the MTP layer is one more MoE layer (~0.83B)
    block = model.model.layers[1].mlp
    assert (block.gate.num_experts, block.gate.top_k, block.gate.n_group, block.gate.topk_group) == (256, 8, 8, 4)
