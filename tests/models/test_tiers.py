import pytest

from models.config import ConfigError, from_dict
from models.tiers import TierConfig, build_tier_plan, format_ranks, resolve_layer_scope


def ranks(n, k, c, plan="uniform", **kw):
    return [format_ranks(tier) for tier in
            (build_tier_plan(TierConfig(num_tiers=c, plan=plan, **kw), n, k).ranks(t) for t in range(1, c + 1))]


@pytest.mark.parametrize("c, expected", [
    (2, ["1-6", "59-64"]),
    (3, ["1-6", "25-30", "59-64"]),
    (4, ["1-6", "19-24", "37-42", "59-64"]),
])
def test_uniform_matches_paper_n64_k6(c, expected):
    assert ranks(64, 6, c) == expected


def test_uniform_matches_paper_n256_k8():
    assert ranks(256, 8, 3) == ["1-8", "121-128", "249-256"]


def test_high_only_and_random_positions():
    assert ranks(64, 6, 3, "high_only") == ["1-6", "7-12", "13-18"]
    assert ranks(256, 8, 3, "high_only") == ["1-8", "9-16", "17-24"]
    # random keeps the uniform positions; the ordering it indexes is a random permutation
    assert ranks(64, 6, 3, "random") == ["1-6", "25-30", "59-64"]


def test_uneven_plan_from_strings_and_lists():
    assert ranks(64, 6, 3, "uneven", ranks=["1-6", "25-27", [59, 60, 61]]) == ["1-6", "25-27", "59-61"]


def test_single_tier_is_plain_training():
    plan = build_tier_plan(TierConfig(num_tiers=1), 64, 6)
    assert plan.describe() == ["tier 1: ranks 1-6"]


@pytest.mark.parametrize("n, k, c, plan, kw, message", [
    (16, 6, 3, "uniform", {}, "C*K <= n"),
    (16, 4, 5, "high_only", {}, "C*K <= n"),
    (64, 6, 2, "explicit", {"ranks": ["1-6", "60-65"]}, "outside 1..64"),
])
def test_invalid_plans_fail_with_reason(n, k, c, plan, kw, message):
    with pytest.raises(ValueError, match=message):
        build_tier_plan(TierConfig(num_tiers=c, plan=plan, **kw), n, k)


@pytest.mark.parametrize("data, message", [
    ({"num_tiers": 2, "plan": "explicit", "ranks": ["1-6", "5-9"]}, "overlap at rank 5"),
    ({"num_tiers": 3, "plan": "explicit", "ranks": ["1-6", "9-12"]}, "C must match"),
    ({"num_tiers": 3, "plan": "uneven"}, "needs tiers.ranks"),
    ({"num_tiers": 3, "plan": "best"}, "must be one of"),
    ({"num_tiers": "3"}, "must be an integer"),
    ({"num_teirs": 3}, "did you mean 'tiers.num_tiers'"),
])
def test_config_errors_name_the_key_and_file(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        from_dict(TierConfig, data, source="train.yaml", prefix="tiers")
    assert "train.yaml" in str(err.value)


def test_layer_scopes():
    assert resolve_layer_scope("all", 6) == set(range(6))
    assert resolve_layer_scope("shallow", 6) == {0, 1, 2}
    assert resolve_layer_scope("deep", 6) == {3, 4, 5}
    assert resolve_layer_scope("even", 6) == {0, 2, 4}
    assert resolve_layer_scope((1, 4), 6) == {1, 4}
    with pytest.raises(ValueError, match="MoE layers 0..5"):
        resolve_layer_scope((7,), 6)
