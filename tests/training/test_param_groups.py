"""Per-group learning rates by parameter-name pattern (first match wins), the weight-decay split inside each
group, the schedule scaling every group's own lr, and patterns that take no trainable parameter refused."""
import pytest
import torch

import models  # noqa: F401
from models.build import build_model
from models.config import ConfigError, from_dict
from training.config import OptimConfig
from training.param_groups import group_lrs, parameter_groups
from training.schedule import cosine_with_warmup

OMNI = "configs/models/tiny-omni.yaml"


@pytest.fixture(scope="module")
def omni():
    torch.manual_seed(0)
    return build_model(OMNI)


def optim(**values) -> OptimConfig:
    return from_dict(OptimConfig, values, source="t", prefix="optim")


def by_name(groups):
    """parameter name -> (group name, lr, weight decay), read back from the optimizer groups."""
    ids = {}
    for group in groups:
        for param in group["params"]:
            assert id(param) not in ids, "a parameter is in two groups"
            ids[id(param)] = (group["name"], group["lr"], group["weight_decay"])
    return ids


def test_first_matching_pattern_wins_and_the_rest_keeps_optim_lr(omni):
    config = optim(lr=2e-5, weight_decay=0.1, lr_groups=[
        {"pattern": "linear_proj_audio.*", "lr": 3e-4, "name": "audio_projector"},
        {"pattern": "linear_proj*", "lr": 1e-3},  # both projectors, but the audio one matched first
        {"pattern": "vision.*", "lr": 2e-6}])
    groups = parameter_groups(omni, config)
    assert groups[0]["name"] == "default" and groups[0]["lr"] == 2e-5  # the logged `lr` stays optim.lr's
    assigned = by_name(groups)
    trainable = [(n, p) for n, p in omni.named_parameters() if p.requires_grad]
    assert len(assigned) == len(trainable)  # every trainable parameter once; audio.embed_positions is not one
    for name, param in trainable:
        group, lr, decay = assigned[id(param)]
        want = ("audio_projector", 3e-4) if name.startswith("linear_proj_audio.") else \
            ("linear_proj", 1e-3) if name.startswith("linear_proj.") else \
            ("vision", 2e-6) if name.startswith("vision.") else ("default", 2e-5)
        assert (group, lr) == want, name
        assert decay == (0.0 if param.ndim < 2 or "norm" in name else 0.1), name


def test_without_lr_groups_it_is_the_decay_split_alone(omni):
    groups = parameter_groups(omni, optim(weight_decay=0.01))
    assert [(g["name"], g["weight_decay"]) for g in groups] == [("default", 0.01), ("default", 0.0)]
    assert group_lrs(groups) == {"lr_default": 2e-5}


def test_frozen_parameters_are_left_out(omni):
    for name, param in omni.named_parameters():
        param.requires_grad_(name.startswith("linear_proj"))
    try:
        groups = parameter_groups(omni, optim(lr_groups=[{"pattern": "linear_proj.*", "lr": 1e-3}]))
    finally:
        for name, param in omni.named_parameters():
            param.requires_grad_(name != "audio.embed_positions.weight")
    assert {g["name"] for g in groups} == {"default", "linear_proj"}  # default: linear_proj_audio.*
    assert sum(p.numel() for g in groups for p in g["params"]) == \
        sum(p.numel() for n, p in omni.named_parameters() if n.startswith("linear_proj"))


@pytest.mark.parametrize("pattern, why", [
    ("vison.*", "matches no parameter name"),
    ("audio.embed_positions.*", "matches only frozen parameters"),
    ("linear_proj.0.*", "an earlier pattern takes every parameter"),
])
def test_a_pattern_that_takes_no_trainable_parameter_is_an_error(omni, pattern, why):
    config = optim(lr_groups=[{"pattern": "linear_proj*", "lr": 1e-3}, {"pattern": pattern, "lr": 1e-4}])
    with pytest.raises(ConfigError, match=why) as err:
        parameter_groups(omni, config)
    message = str(err.value)
    assert message.startswith(f"optim.lr_groups[1].pattern = {pattern!r}")
    assert "top-level modules: ['audio', 'linear_proj', 'linear_proj_audio', 'model', 'vision']" in message


def test_the_schedule_scales_every_group_by_the_same_factor(omni):
    config = optim(lr=1e-3, lr_groups=[{"pattern": "linear_proj*", "lr": 1e-2}, {"pattern": "vision.*", "lr": 1e-5}])
    optimizer = torch.optim.AdamW(parameter_groups(omni, config), lr=config.lr)
    schedule = cosine_with_warmup(optimizer, total_steps=10, warmup_steps=2, min_lr_ratio=0.1)
    base = [g["initial_lr"] for g in optimizer.param_groups]
    assert sorted(set(base)) == [1e-5, 1e-3, 1e-2]
    for _ in range(6):
        optimizer.step()
        schedule.step()
        factors = [g["lr"] / b for g, b in zip(optimizer.param_groups, base)]
        assert max(factors) - min(factors) < 1e-12
    assert 0.1 < factors[0] < 1.0  # in the cosine part
    lrs = group_lrs(optimizer.param_groups)
    assert lrs["lr_linear_proj"] == pytest.approx(1e-2 * factors[0]) and set(lrs) == \
        {"lr_default", "lr_linear_proj", "lr_vision"}


def test_one_adam_step_moves_each_group_by_its_own_lr(omni):
    """Adam's first step moves every weight by about lr (m / sqrt(v) = sign(g)): the groups reach the update."""
    model = build_model(OMNI)
    config = optim(lr=1e-4, lr_groups=[{"pattern": "linear_proj.*", "lr": 1e-2}])
    optimizer = torch.optim.AdamW(parameter_groups(model, config), lr=config.lr, weight_decay=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert all(moved[n] == pytest.approx(1e-2, rel=1e-3) for n in moved if n.startswith("linear_proj."))
    assert all(moved[n] == pytest.approx(1e-4, rel=1e-2) for n in moved if not n.startswith("linear_proj."))


@pytest.mark.parametrize("bad, match", [
    ({"pattern": "", "lr": 1e-3}, "pattern is empty"),
    ({"pattern": "vision.*", "lr": 0}, "must be > 0"),
    ({"pattern": "vision.*", "lr": 1e-3, "name": "default"}, "distinct and not 'default'"),
])
def test_bad_lr_groups_name_the_key(bad, match):
    with pytest.raises(ConfigError, match=match):
        optim(lr_groups=[bad])
