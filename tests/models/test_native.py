"""transformers' own MoE LLMs as backbones: unchanged numerics, checkpoints, tiers and the objective."""
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import models  # noqa: F401
from models.build import build_model, load_model_config
from models.checkpoint import CheckpointError
from models.config import ConfigError
from models.native import NATIVE_FAMILIES
from models.routing import TierRouting
from models.tiers import TierConfig, build_tier_plan
from training.objectives import ObjectiveConfig, build_objective

FAMILIES = {"qwen3_moe": "tiny-qwen3-moe", "olmoe": "tiny-olmoe", "mixtral": "tiny-mixtral",
            "deepseek_v3": "tiny-deepseek-v3"}
INPUT = torch.randint(3, 500, (2, 11), generator=torch.Generator().manual_seed(0))


def build(family):
    torch.manual_seed(0)
    model = build_model(f"configs/models/{FAMILIES[family]}.yaml").eval()
    for name, param in model.named_parameters():  # transformers zero-initialises some routers
        if "gate" in name:
            torch.nn.init.normal_(param, std=0.3)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_standard_forward_equals_the_unmodified_transformers_model(family):
    ours = build(family)
    config_class, model_class = NATIVE_FAMILIES[family]
    config = load_model_config(f"configs/models/{FAMILIES[family]}.yaml").backbone.config
    plain = model_class(config_class(**config)).eval()
    plain.load_state_dict(ours.state_dict())
    routing = TierRouting.attach(ours)
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=2), routing.num_experts, routing.top_k))
    with torch.no_grad(), routing.path(1):
        diff = (ours(INPUT).logits - plain(INPUT).logits).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_tier_paths_use_only_tier_experts(family):
    model = build(family)
    routing = TierRouting.attach(model)
    routing.set_plan(build_tier_plan(TierConfig(num_tiers=2), routing.num_experts, routing.top_k))
    positions = list(routing.plan.positions[1])
    with torch.no_grad(), routing.path(2, record=True):
        model(INPUT)
    assert len(routing.recorded()) == len(routing.routers) > 0
    for record, (_, gate) in zip(routing.recorded(), routing.routers):
        scores = record.logits.float()
        if record.spec.family == "sigmoid_bias":
            scores = scores.sigmoid() + gate.e_score_correction_bias
        order = scores.argsort(dim=-1, descending=True)[:, positions]
        assert torch.equal(record.indices.sort(-1).values, order.sort(-1).values)


@pytest.mark.parametrize("family", FAMILIES)
def test_ordmoe_step_runs_and_matches_gradient_checkpointing(family):
    def grads(checkpointing):
        model = build(family).train()
        objective = build_objective(ObjectiveConfig(tiers=TierConfig(num_tiers=2)), model)
        if checkpointing:
            objective.routing.enable_activation_checkpointing(model)
        batch = {"input_ids": INPUT, "labels": INPUT, "attention_mask": torch.ones_like(INPUT)}
        result = objective(model, batch, backward=lambda loss: loss.backward(), step=1)
        assert {"ntp", "erl", "bal", "logp_tier2"} <= result.parts.keys()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3"])
def test_checkpoints_load_strictly(family, tmp_path):
    model = build(family)
    model.save_pretrained(tmp_path / "ckpt")
    data = yaml.safe_load(open(f"configs/models/{FAMILIES[family]}.yaml"))
    data["backbone"]["checkpoint"] = str(tmp_path / "ckpt")
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data))
    loaded = build_model(tmp_path / "m.yaml")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    dropped = sorted(weights)[-1]
    del weights[dropped]
    save_file(weights, str(tmp_path / "ckpt" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing_keys"):
        build_model(tmp_path / "m.yaml")


def test_config_typo_in_a_native_backbone_names_the_field(tmp_path):
    (tmp_path / "m.yaml").write_text("backbone: {name: mixtral, config: {num_local_expert: 8}}\n")
    with pytest.raises(ConfigError, match="num_local_expert"):
        build_model(tmp_path / "m.yaml")
