"""The shared MoE machinery: expert kernels agree, routers match their reference formulas, the block
uses exactly what its gate returns (the router contract tier routing relies on)."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from models.moe import FusedExperts, MultiGateRouter, SigmoidGroupRouter, SoftmaxTopKRouter, SparseMoeBlock

H, E, K, I = 32, 16, 4, 24


def config(**kw):
    values = dict(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I, hidden_act="silu",
                  norm_topk_prob=True, n_group=4, topk_group=2, routed_scaling_factor=2.5, num_shared_experts=1,
                  _experts_implementation="grouped_mm")
    values.update(kw)
    return SimpleNamespace(**values)


def experts(implementation, seed=0):
    torch.manual_seed(seed)
    module = FusedExperts(config(_experts_implementation=implementation))
    torch.nn.init.normal_(module.gate_up_proj, std=0.2)
    torch.nn.init.normal_(module.down_proj, std=0.2)
    return module


def routing(n=37, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=g)
    indices = torch.rand(n, E, generator=g).topk(K, dim=-1).indices
    weights = torch.rand(n, K, generator=g)
    return hidden, indices, weights


def run(module, hidden, indices, weights):
    hidden = hidden.clone().requires_grad_()
    weights = weights.clone().requires_grad_()
    out = module(hidden, indices, weights)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * cotangent).sum().backward()
    return out.detach(), hidden.grad, weights.grad, module.gate_up_proj.grad, module.down_proj.grad


@pytest.mark.parametrize("other", ["eager", "batched_mm"])
def test_expert_implementations_agree_in_outputs_and_gradients(other):
    hidden, indices, weights = routing()
    reference = run(experts("grouped_mm"), hidden, indices, weights)
    result = run(experts(other), hidden, indices, weights)
    for a, b, name in zip(reference, result, ["output", "d hidden", "d weights", "d gate_up_proj", "d down_proj"]):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5, msg=name)


def test_experts_match_a_per_token_reference():
    module = experts("grouped_mm")
    hidden, indices, weights = routing(n=9)
    out = module(hidden, indices, weights)
    for t in range(hidden.shape[0]):
        expected = torch.zeros(H)
        for slot in range(K):
            e = indices[t, slot]
            gate, up = (module.gate_up_proj[e] @ hidden[t]).chunk(2)
            expected += weights[t, slot] * (module.down_proj[e] @ (F.silu(gate) * up))
        torch.testing.assert_close(out[t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_router_equals_the_reference_formula(norm):
    torch.manual_seed(0)
    router = SoftmaxTopKRouter(config(norm_topk_prob=norm))
    torch.nn.init.normal_(router.weight)
    x = torch.randn(23, H)
    logits, weights, indices = router(x)
    ref_logits = x @ router.weight.T
    probs = ref_logits.softmax(-1)
    top = probs.topk(K, dim=-1)
    expected = top.values / top.values.sum(-1, keepdim=True) if norm else top.values
    torch.testing.assert_close(logits, ref_logits)
    assert torch.equal(indices, top.indices)
    torch.testing.assert_close(weights, expected)
    if norm:  # METHOD.md eq. 1: a softmax over the chosen experts' logits only
        torch.testing.assert_close(weights, ref_logits.gather(-1, indices).softmax(-1))


def test_router_contract_dtypes_and_attributes():
    for router in (SoftmaxTopKRouter(config()), MultiGateRouter(config()), SigmoidGroupRouter(config())):
        torch.nn.init.normal_(router.weight)
        x = torch.randn(5, H, dtype=torch.bfloat16)
        logits, weights, indices = router(x.float().to(torch.bfloat16))
        assert logits.dtype == torch.float32 and logits.shape == (5, E)
        assert weights.dtype == torch.bfloat16 and weights.shape == indices.shape == (5, K)
        assert router.routing_family in ("softmax", "sigmoid_bias")
        assert (router.num_experts, router.top_k) == (E, K)
    sigmoid = SigmoidGroupRouter(config())
    assert sigmoid.expert_bias.shape == (E,) and sigmoid.routed_scaling_factor == 2.5 and sigmoid.norm_topk_prob
    assert "expert_bias" in sigmoid.state_dict()


def test_sigmoid_group_router_equals_deepseek_v3():
    torch.manual_seed(0)
    ours = SigmoidGroupRouter(config())
    ds = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=H, n_routed_experts=E, num_experts_per_tok=K, n_group=4,
                                               topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True))
    torch.nn.init.normal_(ours.weight)
    ours.expert_bias.normal_(std=0.3)
    ds.weight.data.copy_(ours.weight)
    ds.e_score_correction_bias.copy_(ours.expert_bias)
    x = torch.randn(50, H)
    logits, weights, indices = ours(x)
    ds_logits, ds_weights, ds_indices = ds(x)
    torch.testing.assert_close(logits, ds_logits)
    order, ds_order = indices.argsort(-1), ds_indices.argsort(-1)
    assert torch.equal(indices.gather(-1, order), ds_indices.gather(-1, ds_order))
    torch.testing.assert_close(weights.gather(-1, order), ds_weights.gather(-1, ds_order))


def test_sigmoid_router_limits_groups_and_uses_the_bias_for_selection_only():
    torch.manual_seed(0)
    router = SigmoidGroupRouter(config())
    torch.nn.init.normal_(router.weight)
    x = torch.randn(40, H)
    _, _, indices = router(x)
    assert all(len(set((row // (E // 4)).tolist())) <= 2 for row in indices)  # within topk_group=2 of 4 groups
    router.expert_bias[5] = 10.0  # forces expert 5 in, but its weight stays its own sigmoid score
    logits, weights, indices = router(x)
    assert (indices == 5).any(-1).all()
    scores = logits.sigmoid().gather(-1, indices)
    torch.testing.assert_close(weights, scores / scores.sum(-1, keepdim=True) * 2.5)


def test_multi_gate_routes_each_token_with_its_modality_router():
    torch.manual_seed(0)
    router = MultiGateRouter(config())
    for p in router.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(12, H)
    modality = torch.tensor([0, 1, 2, 3] * 3)
    logits, weights, indices = router(x, modality)
    per_router = {0: router.weight, 1: router.image_weight, 2: router.audio_weight, 3: router.image_weight}
    for t, m in enumerate(modality.tolist()):
        single = SoftmaxTopKRouter(config())
        single.weight.data.copy_(per_router[m])
        ref_logits, ref_weights, ref_indices = single(x[t : t + 1])
        torch.testing.assert_close(logits[t : t + 1], ref_logits)
        assert torch.equal(indices[t : t + 1], ref_indices)
        torch.testing.assert_close(weights[t : t + 1], ref_weights)
    text_only = router(x)  # None = all text
    torch.testing.assert_close(text_only[0], x @ router.weight.T)
    with pytest.raises(ValueError, match="modality ids"):
        router(x, torch.full((12,), 7))


def test_block_uses_exactly_what_its_gate_returns():
    torch.manual_seed(0)
    block = SparseMoeBlock(config(), SoftmaxTopKRouter(config()))
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 5, H)
    forced = torch.tensor([[0, 1, 2, 3]]).expand(10, K)
    forced_w = torch.full((10, K), 0.25)
    handle = block.gate.register_forward_hook(lambda mod, args, out: (out[0], forced_w, forced))
    out = block(x)
    handle.remove()
    flat = x.reshape(10, H)
    expected = block.experts(flat, forced, forced_w) + block.shared_experts(flat)
    torch.testing.assert_close(out.reshape(10, H), expected)
    assert not torch.allclose(block(x), out)  # without the hook the router's own choice is used
