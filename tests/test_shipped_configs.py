"""What the repository ships works as shipped: every file in configs/ builds or loads, and every command
in the README's code blocks runs (shortened: one step, tiny batches, a temporary output directory).

Both lists are read from disk, so a config or README command someone adds later is tested too.
"""
from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest
import torch

import models  # noqa: F401  (registers the components)
from data.tokenizer import load_tokenizer
from models.build import load_model_config
from models.config import load_config
from training.config import TrainConfig
from training.engine import deepspeed_config
from training.validate import (check_data, check_model, check_numbers, check_objective, check_tokenizer,
                               summarize_model)

REPO = Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.relative_to(REPO) for p in (REPO / "configs").rglob("*") if p.is_file())
SHORT = ["steps=1", "data.batch_size=2", "data.seq_len=16", "log_every=1", "save_every=0", "--no-progress"]


def load_shipped(path: Path, tmp_path: Path) -> str:
    """Build or load one shipped file the way the code that reads it does; returns what it is."""
    kind = path.parts[1]
    if kind == "models":
        summary = summarize_model(load_model_config(path), str(path))  # built on the meta device
        assert summary.total_params > 0
        return f"{summary.class_name} {summary.total_params:,}"
    if kind == "train":
        config = load_config(TrainConfig, path, [f"output_dir={tmp_path / 'run'}"])
        check_numbers(config, str(path))
        model = check_model(config, str(path))
        check_objective(config, model, str(path))
        check_tokenizer(config, model, str(path), tmp_path / "run")
        sources = [config.data.shards, config.data.manifest, config.data.eval_manifest,
                   *(s.shards for s in config.data.mixture)]
        if not any(s and s.startswith("runs/") for s in sources):  # runs/...: data a tool writes (make demo)
            check_data(config, str(path))
        return f"{config.objective.name} on {model.class_name}"
    if kind == "deepspeed":
        config = TrainConfig(model="configs/models/tiny-ling-lite.yaml", engine="deepspeed", deepspeed=str(path))
        ds = deepspeed_config(path, config, world_size=2, bf16=False)
        return f"ZeRO-{ds['zero_optimization']['stage']}"
    if kind == "tokenizers" and path.name == "tokenizer.json":
        return f"{load_tokenizer(path).get_vocab_size()} tokens"
    raise AssertionError(f"{path}: no loader for this kind of file; teach tests/test_shipped_configs.py to load it")


def absent_release(path: Path) -> str | None:
    """A real-model YAML whose release (directory or hub id) is not on this machine: nothing to build from."""
    if path.suffix not in (".yaml", ".yml") or not {"models", "train"} & set(path.parts):
        return None
    from models.config import read_yaml
    if "train" in path.parts:  # a stage recipe: the release of the model YAML it trains
        model = read_yaml(path).get("model")
        reason = absent_release(Path(model)) if isinstance(model, str) and model.endswith((".yaml", ".yml")) else None
        return reason and f"{path} trains {reason}"
    release = read_yaml(path).get("release")
    if release is None or Path(release).expanduser().is_dir():
        return None
    try:
        from huggingface_hub import snapshot_download
        snapshot_download(release, local_files_only=True)
        return None
    except Exception:
        return f"{path} names the release {release!r}, which is not on this machine (no hub access here)"


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p) for p in CONFIGS])
def test_every_shipped_config_builds_or_loads(path, tmp_path):
    reason = absent_release(path)
    if reason:
        pytest.skip(reason)
    assert load_shipped(path, tmp_path)


# ---- README commands ----------------------------------------------------------------------------------------
def readme_commands() -> list[tuple[str, list[str]]]:
    """(command, the `# ...` comment lines right after it) for every command line of a bash code block."""
    text = (REPO / "README.md").read_text()
    out: list[tuple[str, list[str]]] = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            if line.startswith("#") and out:
                out[-1][1].append(line.lstrip("# ").strip())
            elif line.strip():
                out.append((line.split(" #")[0].strip(), []))
    return out


COMMANDS = readme_commands()


def skip_reason(argv: list[str]) -> str | None:
    if argv[0] == "make":
        return "make targets set up a venv and run the whole suite or demo (the demo is tests/tools/test_demo*)"
    if argv[0] in ("torchrun", "deepspeed", "accelerate"):
        return f"{argv[0]} launches several processes (GPUs); the engines have their own multi-process tests"
    if argv[:2] != ["python", "-m"] or not argv[2].startswith("tools."):
        return f"not a tools/ command: {argv[0]}"
    for arg in argv:
        if arg.startswith("configs/models/") and (reason := absent_release(REPO / arg)):
            return reason
    return None


def missing_input(argv: list[str]) -> str | None:
    """An input path no earlier README command creates (a real checkpoint, benchmark data, a download)."""
    for arg in argv:
        value = arg.split("=", 1)[1] if "=" in arg and not arg.startswith("-") else arg
        looks_like_path = "/" in value or "~" in value or re.search(r"\.(ya?ml|json|jsonl|xlsx|tsv|tar|parquet)$", value)
        if looks_like_path and not arg.startswith(("output_dir=", "--out")) and not Path(value).expanduser().exists():
            return value
    return None


def run_readme_command(command: str, expected: list[str], runs: Path, capsys) -> str | None:
    """Run one README command (shortened, its `runs/` moved to `runs`); the reason it was skipped, or None."""
    argv = shlex.split(command)
    reason = skip_reason(argv)
    if reason:
        return reason
    argv = [re.sub(r"^((?:[\w.]+=)?)runs/", lambda m: f"{m.group(1)}{runs}/", a) for a in argv]
    tool, args = argv[2].removeprefix("tools."), argv[3:]
    if tool == "train":
        config = load_config(TrainConfig, args[0], [a for a in args[1:] if "=" in a])
        if not any(a.startswith("output_dir=") for a in args):
            args.append(f"output_dir={runs}/{Path(config.output_dir).name}")
        args += SHORT
    elif tool == "probe_tiers":
        args += ["--max-batches", "1", "--batch-size", "2", "--scopes", "all", "deep"]
    elif tool == "make_demo_data":
        args += ["--per-kind", "2"]
    inputs = args[1:] if tool == "make_demo_data" else args  # its first argument is the directory it writes
    missing = missing_input(inputs)
    if missing:
        return f"needs {missing}, which no earlier README command creates (a real checkpoint or data set)"
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        assert importlib.import_module(f"tools.{tool}").main(args) == 0, command
    finally:
        torch.use_deterministic_algorithms(deterministic)
    out = capsys.readouterr().out
    for line in expected:  # a README comment with the exact output line ("params: total=...") must be true
        if line.startswith("params:"):
            assert line in out, f"README says {line!r}; `{command}` printed:\n{out}"
    return None


def test_readme_commands_run_in_order(tmp_path, capsys):
    """Every command of the README's bash blocks, in order, in one test: a command may read what an earlier
    one wrote (a probe reads the run a train command wrote), so they share one temporary `runs/`."""
    skipped = {command: run_readme_command(command, expected, tmp_path / "readme_runs", capsys)
               for command, expected in COMMANDS}
    ran = [command for command, reason in skipped.items() if reason is None]
    assert any("tools.train" in command for command in ran) and any("probe_tiers" in command for command in ran)
    print("\n".join(f"skipped: {command}: {reason}" for command, reason in skipped.items() if reason))


TRAIN_CONFIGS = [p for p in CONFIGS if "train" in p.parts]


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=[str(p) for p in TRAIN_CONFIGS])
def test_every_shipped_recipe_passes_check_as_a_first_command(path, tmp_path, capsys):
    """`tools.train RECIPE --check`, a user's first command, exits 0 on a machine without the recipe's inputs:
    what it cannot check yet (a release not downloaded, shards not written, an earlier stage not trained) is
    listed with the command that provides it, and nothing is written."""
    from tools.train import main as train_main
    output = tmp_path / "run"
    assert train_main([str(path), f"output_dir={output}", "--check"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    if absent_release(path):
        assert "before it can train here" in out and "huggingface-cli download" in out, out
    assert not output.exists()


@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if absent_release(p)], ids=lambda p: str(p))
def test_training_a_recipe_whose_release_is_absent_refuses_in_one_line(path, tmp_path, capsys):
    """Without --check the run refuses before writing anything: one line, exit 2, the download command."""
    from tools.train import main as train_main
    assert train_main([str(path), f"output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "huggingface-cli download" in err and str(path) in err, err
    assert not (tmp_path / "run").exists()
