"""Tier routing on transformers' own MoE models (the router contract our backbones share)."""
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan


def qwen3_moe(norm_topk_prob=True, layers=3):
    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=16, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob,
                            decoder_sparse_step=1, mlp_only_layers=[])
    model = Qwen3MoeForCausalLM(config).eval()
    for p in model.parameters():  # transformers initialises routers to zero: make routing non-trivial
        torch.nn.init.normal_(p, std=0.2)
    return model


def deepseek_v3():
    torch.manual_seed(0)
    config = DeepseekV3Config(vocab_size=97, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              n_routed_experts=16, num_experts_per_tok=2, n_group=4, topk_group=2,
                              n_shared_experts=1, routed_scaling_factor=2.5, first_k_dense_replace=0,
                              kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
                              v_head_dim=8)
    model = DeepseekV3ForCausalLM(config).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    for _, gate in TierRouting(model).routers:
        gate.e_score_correction_bias.normal_(std=0.5)
    return model


def attach(model, c=3, **kw):
    routing = TierRouting(model)
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=c, **kw), routing.num_experts, routing.top_k))
    return routing


INPUT = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("norm", [True, False])
def test_path_one_is_standard_routing_bit_for_bit(norm):
    model = qwen3_moe(norm_topk_prob=norm)
    reference = model(INPUT).logits
    routing = attach(model)
    with routing.path(1):
        assert torch.equal(model(INPUT).logits, reference)


def test_tier_path_uses_only_tier_experts_with_softmax_weights_over_the_tier():
    model = qwen3_moe()
    routing = attach(model, c=3)  # n=16, K=2: tiers = ranks 1-2, 7-8, 15-16
    assert routing.plan.describe() == ["tier 1: ranks 1-2", "tier 2: ranks 7-8", "tier 3: ranks 15-16"]
    for tier, positions in [(2, [6, 7]), (3, [14, 15])]:
        with routing.path(tier, record=True):
            model(INPUT)
        records = routing.recorded()
        assert len(records) == 3
        for record in records:
            order = record.logits.float().argsort(dim=-1, descending=True)
            assert torch.equal(record.indices.sort(-1).values, order[:, positions].sort(-1).values)
            expected = record.logits.float().gather(-1, record.indices).softmax(-1)
            torch.testing.assert_close(record.weights.float(), expected)


def test_sigmoid_router_ranks_with_bias_and_weights_by_normalised_sigmoid():
    model = deepseek_v3()
    routing = attach(model, c=3)  # n=16, K=2
    with routing.path(3, record=True):
        model(INPUT)
    for record, (_, gate) in zip(routing.recorded(), routing.routers):
        scores = record.logits.sigmoid() + gate.e_score_correction_bias
        lowest = scores.argsort(dim=-1)[:, :2]  # ranks 15-16 are the two lowest selection scores
        assert torch.equal(record.indices.sort(-1).values, lowest.sort(-1).values)
        chosen = record.logits.sigmoid().gather(-1, record.indices)
        torch.testing.assert_close(record.weights, chosen / chosen.sum(-1, keepdim=True) * 2.5)


def test_path_one_sigmoid_keeps_group_limited_standard_routing():
    model = deepseek_v3()
    reference = model(INPUT).logits
    routing = attach(model)
    with routing.path(1):
        assert torch.equal(model(INPUT).logits, reference)


def test_layer_scope_leaves_other_layers_standard():
    model = qwen3_moe()
    routing = attach(model, c=3, layers="even")
    with routing.path(1, record=True):
        model(INPUT)
    standard = [r.indices.clone() for r in routing.recorded()]
    with routing.path(3, record=True):
        model(INPUT)
    tiered = routing.recorded()
    assert [r.in_scope for r in tiered] == [True, False, True]
    assert not torch.equal(tiered[0].indices, standard[0])
    # layer 1 routes standard on its (different) hidden states: its experts are its own top-2
    top2 = tiered[1].logits.topk(2, dim=-1).indices
    assert torch.equal(tiered[1].indices.sort(-1).values, top2.sort(-1).values)


@pytest.mark.parametrize("plan", [{}, {"plan": "uneven", "ranks": ["1-2", "5-7", "16"]}])
def test_batched_rows_equal_separate_paths(plan):
    """One forward with a tier per batch row; uneven tiers pad with zero-weight slots."""
    model = qwen3_moe()
    routing = attach(model, c=3, **plan)
    separate = []
    for tier in (1, 2, 3):
        with routing.path(tier):
            separate.append(model(INPUT).logits)
    with routing.path((1, 1, 2, 2, 3, 3)):
        batched = model(INPUT.repeat(3, 1)).logits
    torch.testing.assert_close(batched, torch.cat(separate), atol=1e-5, rtol=1e-5)


def test_global_basis_gives_every_token_the_same_experts():
    model = qwen3_moe()
    routing = attach(model, c=2, basis="global")
    with routing.path(2, record=True):
        model(INPUT)
    for record in routing.recorded():
        assert (record.indices == record.indices[0]).all()
        mean_probability = record.logits.float().softmax(-1).mean(0)
        assert set(record.indices[0].tolist()) == set(mean_probability.argsort()[:2].tolist())


def test_random_plan_is_seeded_by_step():
    model = qwen3_moe()
    routing = attach(model, c=2, plan="random")

    def experts(step):
        with routing.path(2, record=True, step=step):
            model(INPUT)
        return routing.recorded()[0].indices

    assert torch.equal(experts(5), experts(5))
    assert not torch.equal(experts(5), experts(6))


@pytest.mark.parametrize("plan", ["uniform", "random"])
def test_gradient_checkpointing_recomputes_with_the_forward_routing_state(plan):
    def grads(checkpointing):
        model = qwen3_moe().train()
        routing = attach(model, c=3, plan=plan)
        if checkpointing:
            routing.enable_activation_checkpointing(model)
        with routing.path(3, step=11):
            loss = model(INPUT, labels=INPUT).loss
        loss.backward()  # outside the `with`: recomputation must still route tier 3
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_errors_are_explicit():
    with pytest.raises(ValueError, match="no MoE layers"):
        TierRouting(torch.nn.Linear(2, 2))
    model = qwen3_moe()
    routing = TierRouting(model)
    with pytest.raises(ValueError, match="no tier plan"):
        routing.path(2)
    with pytest.raises(ValueError, match="n=64, K=6"):
        routing.set_plan(build_tier_plan(TierConfig(num_tiers=3), 64, 6))
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=3), 16, 2))
    with pytest.raises(ValueError, match=r"tier\(s\) \[4\]"):
        routing.path(4)


def test_plain_checkpointing_without_the_routing_context_recomputes_the_wrong_path():
    """The pitfall the routing context exists for: checkpoint recomputation after the `with` exits."""
    model = qwen3_moe().train()
    routing = attach(model, c=3)
    model.activation_checkpointing_enable({"use_reentrant": False})
    with routing.path(3):
        loss = model(INPUT, labels=INPUT).loss
    with pytest.raises(Exception, match="recomputation|different"):
        loss.backward()  # recomputes standard routing: torch detects the mismatch (or the gradient is wrong)


# ---- the same guarantees on our own backbones (built from their tiny configs) ------------------------

def ling(name):
    from models.build import build_model
    torch.manual_seed(0)
    return build_model(f"configs/models/{name}.yaml").eval()


LING_INPUT = torch.randint(2, 500, (2, 9), generator=torch.Generator().manual_seed(2))
MODALITIES = torch.tensor([[0, 1, 1, 1, 0, 2, 2, 0, 0], [0, 0, 3, 3, 3, 0, 0, 0, 0]])


@pytest.mark.parametrize("name", ["tiny-ling-lite", "tiny-ling-mini"])
def test_ling_path_one_is_standard_and_tiers_use_tier_experts(name):
    model = ling(name)
    reference = model(LING_INPUT, modality_ids=MODALITIES).logits
    routing = attach(model, c=3)
    with routing.path(1):
        assert torch.equal(model(LING_INPUT, modality_ids=MODALITIES).logits, reference)
    n, k = routing.num_experts, routing.top_k
    positions = list(routing.plan.positions[2])
    with routing.path(3, record=True):
        model(LING_INPUT, modality_ids=MODALITIES)
    for record, (_, gate) in zip(routing.recorded(), routing.routers):
        scores = record.logits if record.spec.family == "softmax" else record.logits.sigmoid() + gate.expert_bias
        order = scores.argsort(dim=-1, descending=True)
        assert torch.equal(record.indices.sort(-1).values, order[:, positions].sort(-1).values)
        assert record.indices.shape[1] == len(positions) == k and n == routing.num_experts


def test_multi_gate_tiers_rank_by_each_tokens_own_modality_router():
    model = ling("tiny-ling-lite")
    routing = attach(model, c=2)
    gate = routing.routers[0][1]
    seen = {}
    handle = gate.register_forward_pre_hook(lambda module, args: seen.update(hidden=args[0].detach()))
    with routing.path(2, record=True):
        model(LING_INPUT, modality_ids=MODALITIES)
    handle.remove()
    record, tokens = routing.recorded()[0], MODALITIES.reshape(-1)
    routers = {0: gate.weight, 1: gate.image_weight, 2: gate.audio_weight, 3: gate.image_weight}  # video -> image
    for modality, weight in routers.items():
        rows = (tokens == modality).nonzero().squeeze(-1)
        own = seen["hidden"][rows].float() @ weight.float().T
        torch.testing.assert_close(record.logits[rows], own)
        order = own.argsort(dim=-1, descending=True)[:, list(routing.plan.positions[1])]
        assert torch.equal(record.indices[rows].sort(-1).values, order.sort(-1).values)


@pytest.mark.parametrize("name", ["tiny-ling-lite", "tiny-ling-mini"])
def test_ling_gradient_checkpointing_keeps_tier_gradients(name):
    def grads(checkpointing):
        model = ling(name).train()
        routing = attach(model, c=3)
        if checkpointing:
            routing.enable_activation_checkpointing(model)
        with routing.path(3):
            loss = model(LING_INPUT, labels=LING_INPUT, modality_ids=MODALITIES).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name_ in plain:
        torch.testing.assert_close(checkpointed[name_], plain[name_], rtol=1e-5, atol=1e-7, msg=name_)
