"""The objectives against a plain reference: all C paths forward, one backward of the summed loss."""
import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from models.config import ConfigError, from_dict
from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan
from training.losses import advantages, load_balance_loss, mean_token_logprob, next_token_loss, token_logprobs
from training.objectives import ObjectiveConfig, build_objective


def tiny_moe(seed=0):
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            num_experts=12, num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[])
    config._experts_implementation = "eager"  # grouped_mm has no float64 kernel
    model = Qwen3MoeForCausalLM(config).double()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.15)
    return model


def make_batch():
    g = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 61, (3, 9), generator=g)
    labels = input_ids.clone()
    labels[:, :4] = -100          # prompt
    labels[1, 6:] = -100          # a shorter answer
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 7:] = 0      # padding
    labels[2, 7:] = -100
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def reference_gradients(model, config: ObjectiveConfig, batch):
    routing = TierRouting.attach(model)
    routing.set_plan(build_tier_plan(config.tiers, routing.num_experts, routing.top_k))
    lbar, ntp, bal = [], None, None
    for tier in range(1, config.tiers.num_tiers + 1):
        with routing.path(tier, record=tier == 1):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logprobs, mask = token_logprobs(logits, batch["labels"])
        lbar.append(mean_token_logprob(logprobs, mask))
        if tier == 1:
            ntp = next_token_loss(logprobs, mask)
            bal = load_balance_loss(routing.recorded(), batch["attention_mask"].bool().reshape(-1))
    a = advantages(config.rewards, config.advantage)
    erl = -sum(a[c] * lbar[c] for c in range(len(lbar))).mean()
    loss = ntp + config.lambda_erl * erl + config.lambda_bal * bal
    model.zero_grad()
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def objective_gradients(model, config: ObjectiveConfig, batch):
    objective = build_objective(config, model)
    model.zero_grad()
    result = objective(model, batch, backward=lambda term: term.backward())
    return result, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_gradients(got, expected, rel=1e-6):
    assert got.keys() == expected.keys()
    for name, grad in expected.items():
        err = (got[name] - grad).norm() / grad.norm().clamp(min=1e-30)
        assert err <= rel, f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("execution", ["sequential", "batched"])
@pytest.mark.parametrize("num_tiers", [2, 3, 4])
def test_gradients_equal_the_all_paths_reference(execution, num_tiers):
    config = ObjectiveConfig(tiers=TierConfig(num_tiers=num_tiers), execution=execution)
    model = tiny_moe()
    ref_loss, ref_grads = reference_gradients(model, config, make_batch())
    result, grads = objective_gradients(model, config, make_batch())
    assert result.loss == pytest.approx(ref_loss, rel=1e-9)
    assert_same_gradients(grads, ref_grads)


def test_engine_scaling_reaches_every_parameter_once():
    """An engine that scales each term (gradient accumulation) scales every gradient by the same factor."""
    config = ObjectiveConfig(tiers=TierConfig(num_tiers=3))
    model = tiny_moe()
    _, ref_grads = reference_gradients(model, config, make_batch())
    objective = build_objective(config, model)
    model.zero_grad()
    objective(model, make_batch(), backward=lambda term: (term / 4).backward())
    grads = {n: p.grad.clone() * 4 for n, p in model.named_parameters() if p.grad is not None}
    assert_same_gradients(grads, ref_grads)


def test_zero_advantage_tier_is_skipped_but_measured():
    config = ObjectiveConfig(tiers=TierConfig(num_tiers=3), diag_every=1)
    model = tiny_moe()
    objective = build_objective(config, model)
    assert objective.grad_tiers == [1, 3]  # A_2 = 0 with the symmetric default rewards
    result = objective(model, make_batch(), backward=lambda t: t.backward(), step=0)
    assert {"logp_tier1", "logp_tier2", "logp_tier3", "tier_order_agreement"} <= result.parts.keys()
    result = objective(model, make_batch(), backward=lambda t: t.backward(), step=1)
    assert "logp_tier2" in result.parts  # diag_every=1 measures every step
    config.diag_every = 10
    result = build_objective(config, model)(model, make_batch(), backward=lambda t: t.backward(), step=3)
    assert "logp_tier2" not in result.parts and "tier_order_agreement" not in result.parts


def test_single_tier_is_exactly_ntp():
    model = tiny_moe()
    ntp_result, ntp_grads = objective_gradients(model, ObjectiveConfig(name="ntp"), make_batch())
    one_result, one_grads = objective_gradients(model, ObjectiveConfig(tiers=TierConfig(num_tiers=1)), make_batch())
    assert one_result.loss == ntp_result.loss
    assert one_result.parts["erl"] == 0.0
    for name in ntp_grads:
        assert torch.equal(one_grads[name], ntp_grads[name]), name


def test_batch_without_supervised_tokens_contributes_zero_loss():
    model = tiny_moe()
    batch = make_batch()
    batch["labels"][:] = -100
    result, grads = objective_gradients(model, ObjectiveConfig(tiers=TierConfig(num_tiers=3)), batch)
    assert result.loss == 0.0
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads.values())


def test_evaluation_mode_measures_every_tier_without_gradients():
    model = tiny_moe()
    objective = build_objective(ObjectiveConfig(tiers=TierConfig(num_tiers=3)), model)
    result = objective(model, make_batch())
    assert all(p.grad is None for p in model.parameters())
    assert [k for k in result.parts if k.startswith("logp_tier")] == ["logp_tier1", "logp_tier3", "logp_tier2"]


@pytest.mark.parametrize("data, message", [
    ({"rewards": [1.0, 1.0, 0.0]}, "strictly decreasing"),
    ({"rewards": [1.0, 0.0]}, "C=3"),
    ({"tiers": {"num_tiers": 2, "plan": "explicit", "ranks": ["1-2", "3-4", "5-6"]}}, "C must match"),
    ({"execution": "parallel"}, "must be one of"),
])
def test_bad_objective_configs_fail_at_load(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ObjectiveConfig, data, source="configs/train/x.yaml", prefix="objective")


def test_ordmoe_on_a_dense_model_fails_at_start():
    from transformers import LlamaConfig, LlamaForCausalLM
    dense = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ValueError, match="needs an MoE model"):
        build_objective(ObjectiveConfig(), dense)
    build_objective(ObjectiveConfig(name="ntp"), dense)  # the baseline works on any causal LM
