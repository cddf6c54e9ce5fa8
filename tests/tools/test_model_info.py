import re

import pytest

from tools.model_info import main


def run(capsys, *argv):
    assert main(list(argv)) == 0
    return capsys.readouterr().out.strip().splitlines()


def params(lines):
    match = re.fullmatch(r"params: total=(\d+) active=(\d+)", lines[-1])
    assert match, lines[-1]
    return int(match[1]), int(match[2])


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    """Full-size release directories holding only what a parameter count needs: config.json, the tokenizer
    and preprocessor config (the real-model YAMLs name release directories, absent in CI)."""
    from tests.models.releases import ling_lite_config, ling_mini_config, ming_config, write_release
    made = {"ling-lite": ling_lite_config(tiny=False), "ling-mini-2.0": ling_mini_config(tiny=False),
            "ming-lite-omni": ming_config("1.5", tiny=False)}
    return {name: write_release(tmp_path_factory.mktemp(name), config, weights=False) for name, config in made.items()}


def test_ling_mini_full_size_counts_and_tier_ranks(capsys, releases):
    lines = run(capsys, str(releases["ling-mini-2.0"]), "--tiers", "3", "--plan", "uniform")
    total, active = params(lines)
    assert 15.5e9 < total < 16.8e9 and 1.2e9 < active < 1.6e9, (total, active)
    assert lines[-4:-1] == ["tier 1: ranks 1-8", "tier 2: ranks 121-128", "tier 3: ranks 249-256"]


def test_ling_lite_full_size_counts_and_tier_ranks(capsys, releases):
    lines = run(capsys, str(releases["ling-lite"]), "--tiers", "4")
    total, active = params(lines)
    assert 16e9 < total < 17.5e9 and 2.5e9 < active < 3.0e9, (total, active)
    assert lines[-5:-1] == ["tier 1: ranks 1-6", "tier 2: ranks 19-24", "tier 3: ranks 37-42", "tier 4: ranks 59-64"]


def test_bad_config_is_an_error_not_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("backbone:\n  name: ling-lite\n  confg: {}\n")
    assert main([str(bad)]) == 2
    assert "unknown key 'backbone.confg'" in capsys.readouterr().err


@pytest.mark.parametrize("config, llm_total", [("ming-lite-omni", 16.8e9), ("configs/models/ling-mini-omni.yaml", 16.25e9)])
def test_full_size_omni_configs_report_every_component(capsys, releases, tmp_path, config, llm_total):
    if config.endswith(".yaml"):  # our composition on the Ling-mini-2.0 release
        from pathlib import Path
        (tmp_path / "m.yaml").write_text(f"base: {Path(config).resolve()}\nrelease: {releases['ling-mini-2.0']}\n")
        config = str(tmp_path / "m.yaml")
    else:
        config = str(releases[config])
    lines = run(capsys, config)
    components = {line.split()[0] for line in lines[3:-1]}
    assert components == {"model", "vision", "audio", "linear_proj", "linear_proj_audio"}
    total, active = params(lines)
    assert llm_total + 1.3e9 < total < llm_total + 1.5e9  # + Qwen2.5-VL tower, Whisper-large encoder, projectors
    assert active < total
