"""Bad configs and CLI calls, one row each: refused with exit code 2, one line naming the file and the key,
no traceback, and the output directory not created (or, for an existing run, not changed by one byte).

Each row goes through the CLI's `main(argv)` in this process (starting Python with torch and
transformers costs ~8 s per process on 2 cores); the rows marked `SUBPROCESS` also run as real
`python -m tools.X` processes, so the exit code and stderr are the ones a shell sees.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools import model_info, probe_tiers, train

REPO = Path(__file__).resolve().parents[2]
TOOLS = {"train": train.main, "model_info": model_info.main, "probe_tiers": probe_tiers.main}
TEXT = "configs/train/tiny-ordmoe-text.yaml"
SMALL = ["steps=2", "data.batch_size=2", "data.seq_len=16", "log_every=1", "--no-progress"]
SUBPROCESS = {"base_cycle", "model_info_plan_nope"}  # plus the read-only and second-trainer tests below

# (id, tool, argv, substrings the one-line message must hold: the file, the key).
# {out}: a fresh output_dir that must not be created; {run}: a finished 2-step run (must not change);
# {files}: a directory of crafted inputs (see `files` below).
CASES = [
    # --- the config file and overrides
    ("config_missing", "train", ["{files}/nope.yaml"], ["nope.yaml", "not found"]),
    ("yaml_syntax", "train", ["{files}/syntax.yaml", "output_dir={out}"], ["syntax.yaml", "not valid YAML"]),
    ("yaml_top_level_list", "train", ["{files}/list.yaml"], ["list.yaml", "mapping"]),
    ("base_cycle", "train", ["{files}/cycle_a.yaml", "output_dir={out}"], ["cycle_b.yaml", "base", "cycle_a.yaml"]),
    ("base_missing", "train", ["{files}/base_missing.yaml"], ["base_missing.yaml", "base", "not_there.yaml"]),
    ("base_not_a_name", "train", ["{files}/base_list.yaml"], ["base_list.yaml", "base"]),
    ("unknown_key", "train", [TEXT, "stpes=3", "output_dir={out}"], [TEXT, "stpes", "did you mean 'steps'"]),
    ("wrong_type", "train", [TEXT, "steps=many", "output_dir={out}"], [TEXT, "steps"]),
    ("override_without_value", "train", [TEXT, "steps"], ["steps", "key=value"]),
    ("steps_zero", "train", [TEXT, "steps=0", "output_dir={out}"], [TEXT, "steps"]),
    ("grad_accum_zero", "train", [TEXT, "grad_accum=0", "output_dir={out}"], [TEXT, "grad_accum"]),
    ("keep_checkpoints_zero", "train", [TEXT, "keep_checkpoints=0", "output_dir={out}"], [TEXT, "keep_checkpoints"]),
    ("save_every_negative", "train", [TEXT, "save_every=-1", "output_dir={out}"], [TEXT, "save_every"]),
    ("batch_size_zero", "train", [TEXT, "data.batch_size=0", "output_dir={out}"], [TEXT, "data.batch_size"]),
    ("batch_size_negative", "train", [TEXT, "data.batch_size=-4", "output_dir={out}"], [TEXT, "data.batch_size"]),
    ("seq_len_zero", "train", [TEXT, "data.seq_len=0", "output_dir={out}"], [TEXT, "data.seq_len"]),
    ("lr_zero", "train", [TEXT, "optim.lr=0", "output_dir={out}"], [TEXT, "optim.lr"]),
    ("rewards_increasing", "train", [TEXT, "objective.rewards=[0.0,0.5,1.0]", "output_dir={out}"],
     [TEXT, "rewards"]),
    ("plan_unknown", "train", [TEXT, "objective.tiers.plan=best", "output_dir={out}"], [TEXT, "objective.tiers.plan"]),
    # --- the model
    ("model_missing", "train", [TEXT, "model=configs/models/nope.yaml", "output_dir={out}"],
     [TEXT, "model", "nope.yaml"]),
    ("model_dir_without_config", "train", [TEXT, "model={files}", "output_dir={out}"], [TEXT, "model"]),
    ("backbone_typo", "train", [TEXT, "model={files}/typo_backbone.yaml", "output_dir={out}"],
     ["typo_backbone.yaml", "backbone.name", "Did you mean 'ling-lite'"]),
    ("backbone_unknown_field", "train", [TEXT, "model={files}/unknown_field.yaml", "output_dir={out}"],
     ["unknown_field.yaml", "hidden_sise"]),
    ("model_tokenizer_missing", "train", ["{files}/omni_manifest.yaml", "model={files}/omni_no_tokenizer_file.yaml",
                                          "output_dir={out}"], ["omni_no_tokenizer_file.yaml", "tokenizer", "nope.json"]),
    ("tiers_more_than_experts", "train", [TEXT, "objective.tiers.num_tiers=5", "output_dir={out}"],
     [TEXT, "objective.tiers", "C=5", "16 experts"]),
    ("tiers_more_than_experts_mixtral", "train",
     [TEXT, "model=configs/models/tiny-mixtral.yaml", "objective.tiers.num_tiers=5", "output_dir={out}"],
     [TEXT, "objective.tiers", "8 experts"]),
    ("tier_layers_outside_model", "train", [TEXT, "objective.tiers.layers=[0,7]", "output_dir={out}"],
     [TEXT, "objective.tiers", "MoE layer"]),
    ("freeze_unknown_prefix", "train", [TEXT, "freeze=[vision_tower]", "output_dir={out}"],
     [TEXT, "freeze", "vision_tower"]),
    # --- tokenizer and data
    ("tokenizer_missing", "train", [TEXT, "data.tokenizer={files}/nope.json", "output_dir={out}"],
     [TEXT, "data.tokenizer", "nope.json"]),
    ("tokenizer_torn", "train", [TEXT, "data.tokenizer={files}/torn_tokenizer.json", "output_dir={out}"],
     [TEXT, "data.tokenizer", "torn_tokenizer.json"]),
    ("corpus_missing", "train", [TEXT, "data.corpus={files}/nope.txt", "output_dir={out}"],
     [TEXT, "data.corpus", "nope.txt"]),
    ("text_model_with_manifest", "train", ["{files}/omni_manifest.yaml", "model=configs/models/tiny-ling-lite.yaml",
                                           "output_dir={out}"], ["omni_manifest.yaml", "tokenizer"]),
    ("manifest_missing", "train", ["{files}/omni_manifest.yaml", "data.manifest={files}/nope.jsonl",
                                   "output_dir={out}"], ["omni_manifest.yaml", "data.manifest", "nope.jsonl"]),
    ("manifest_empty", "train", ["{files}/omni_manifest.yaml", "data.manifest={files}/empty.jsonl",
                                 "output_dir={out}"], ["omni_manifest.yaml", "data.manifest", "empty.jsonl"]),
    ("manifest_bad_json", "train", ["{files}/omni_manifest.yaml", "data.manifest={files}/bad.jsonl",
                                    "output_dir={out}"], ["omni_manifest.yaml", "data.manifest", "bad.jsonl:2"]),
    ("eval_manifest_missing", "train", ["{files}/omni_manifest.yaml", "data.eval_manifest={files}/nope.jsonl",
                                        "output_dir={out}"], ["omni_manifest.yaml", "data.eval_manifest"]),
    ("shard_dir_empty", "train", ["{files}/omni_shards.yaml", "data.shards={files}/empty_shards", "output_dir={out}"],
     ["omni_shards.yaml", "data.shards", "empty_shards"]),
    ("shard_dir_missing", "train", ["{files}/omni_shards.yaml", "data.shards={files}/no_shards", "output_dir={out}"],
     ["omni_shards.yaml", "data.shards", "no_shards"]),
    ("mixture_shards_missing", "train", ["{files}/omni_mixture.yaml", "output_dir={out}"],
     ["omni_mixture.yaml", "data.mixture[0].shards", "empty_shards"]),
    # --- output directory
    ("output_dir_empty", "train", [TEXT, "output_dir="], [TEXT, "output_dir", "empty"]),
    ("output_dir_dot", "train", [TEXT, "output_dir=."], [TEXT, "output_dir", "current directory"]),
    ("output_dir_parent", "train", [TEXT, "output_dir=.."], [TEXT, "output_dir", "current directory"]),
    ("output_dir_is_a_file", "train", [TEXT, "output_dir={files}/a_file"], [TEXT, "output_dir", "a_file", "is a file"]),
    ("output_dir_under_a_file", "train", [TEXT, "output_dir={files}/a_file/run"], [TEXT, "output_dir", "a_file"]),
    ("output_dir_foreign_files", "train", [TEXT, "output_dir={files}/foreign"], [TEXT, "output_dir", "notes.txt"]),
    # --- device
    ("device_cuda_without_gpu", "train", [TEXT, "device=cuda", "output_dir={out}"], [TEXT, "device", "cuda"]),
    ("device_cuda_index", "train", [TEXT, "device=cuda:7", "output_dir={out}"], [TEXT, "device", "cuda:7"]),
    ("device_garbage", "train", [TEXT, "device=gpu0", "output_dir={out}"], [TEXT, "device", "gpu0"]),
    # --- an existing run: resume rules
    ("resume_another_model", "train", [TEXT, "model=configs/models/tiny-mixtral.yaml", "output_dir={run}"],
     [TEXT, "output_dir", "model config", "backbone.name"]),
    ("resume_another_batch_size", "train", [TEXT, "data.batch_size=4", "output_dir={run}"],
     [TEXT, "output_dir", "data.batch_size: 2 -> 4"]),
    ("resume_another_seq_len", "train", [TEXT, "data.seq_len=32", "output_dir={run}"],
     [TEXT, "output_dir", "data.seq_len: 16 -> 32"]),
    ("resume_another_tier_plan", "train", [TEXT, "objective.tiers.plan=high_only", "output_dir={run}"],
     [TEXT, "output_dir", "objective.tiers.plan"]),
    ("resume_another_seed", "train", [TEXT, "seed=5", "output_dir={run}"], [TEXT, "output_dir", "seed: 0 -> 5"]),
    ("resume_false_over_checkpoints", "train", [TEXT, "resume=false", "output_dir={run}"],
     [TEXT, "output_dir", "resume=false", "overwrite=true"]),
    # --- model_info
    ("model_info_plan_nope", "model_info", ["configs/models/tiny-ling-lite.yaml", "--tiers", "3", "--plan", "nope"],
     ["--plan", "nope"]),
    ("model_info_tiers_zero", "model_info", ["configs/models/tiny-ling-lite.yaml", "--tiers", "0"], ["--tiers"]),
    ("model_info_tiers_text", "model_info", ["configs/models/tiny-ling-lite.yaml", "--tiers", "three"], ["--tiers"]),
    ("model_info_tiers_impossible", "model_info", ["configs/models/tiny-ling-lite.yaml", "--tiers", "5"],
     ["tiny-ling-lite.yaml", "--tiers 5", "C*K"]),
    ("model_info_backbone_typo", "model_info", ["{files}/typo_backbone.yaml"], ["typo_backbone.yaml", "ling-lite"]),
    ("model_info_missing", "model_info", ["{files}/nope.yaml"], ["nope.yaml"]),
    # --- probe_tiers (on the finished run: writes no report when refused)
    ("probe_max_batches_zero", "probe_tiers", ["{run}", "--max-batches", "0"], ["--max-batches"]),
    ("probe_batch_size_zero", "probe_tiers", ["{run}", "--batch-size", "0"], ["--batch-size"]),
    ("probe_one_tier", "probe_tiers", ["{run}", "--tiers", "1"], ["--tiers"]),
    ("probe_plan_nope", "probe_tiers", ["{run}", "--plan", "nope"], ["--plan"]),
    ("probe_scope_nope", "probe_tiers", ["{run}", "--scopes", "middle"], ["--scopes", "middle"]),
    ("probe_scope_outside_model", "probe_tiers", ["{run}", "--scopes", "0,7", "--max-batches", "1"],
     ["{run}", "--scopes", "MoE layer"]),
    ("probe_tiers_impossible", "probe_tiers", ["{run}", "--tiers", "6", "--max-batches", "1"], ["{run}", "--tiers 6"]),
    ("probe_not_a_run", "probe_tiers", ["{files}/foreign"], ["foreign"]),
    ("probe_device_garbage", "probe_tiers", ["{run}", "--device", "gpu0"], ["--device", "gpu0"]),
]


def tree_hash(path: Path) -> str | None:
    """Names, modes and bytes of every file under `path` (None when it does not exist)."""
    if not path.exists():
        return None
    digest = hashlib.sha256()
    for item in sorted(path.rglob("*")):
        digest.update(f"{item.relative_to(path)}:{stat.S_IMODE(item.lstat().st_mode)}".encode())
        if item.is_file():
            digest.update(item.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Crafted inputs: broken YAML, base cycles, bad model configs, torn tokenizers, bad manifests."""
    root = tmp_path_factory.mktemp("inputs")
    text = (REPO / TEXT).resolve()
    omni_model = (REPO / "configs/models/tiny-omni.yaml").resolve()
    write = lambda name, content: (root / name).write_text(content)  # noqa: E731
    write("syntax.yaml", "steps: [1, 2\nmodel: x\n")
    write("list.yaml", "- steps\n- 3\n")
    write("cycle_a.yaml", "base: cycle_b.yaml\nsteps: 3\n")
    write("cycle_b.yaml", "base: cycle_a.yaml\n")
    write("base_missing.yaml", "base: not_there.yaml\n")
    write("base_list.yaml", "base: [a.yaml]\n")
    write("typo_backbone.yaml", f"base: {(REPO / 'configs/models/tiny-ling-lite.yaml').resolve()}\n"
                                "backbone: {name: ling-lit}\n")
    write("unknown_field.yaml", "backbone: {name: ling-lite, config: {hidden_sise: 64}}\n")
    write("omni_no_tokenizer_file.yaml", f"base: {omni_model}\ntokenizer: {root}/nope.json\n")
    tokenizer = (REPO / "configs/tokenizers/tiny-omni/tokenizer.json").read_text()
    write("torn_tokenizer.json", tokenizer[: len(tokenizer) // 2])
    write("empty.jsonl", "")
    write("bad.jsonl", '{"caption": "a", "image": "x.png"}\n{"caption": \n')
    write("good.jsonl", '{"conversation": [{"role": "user", "text": "hi"}, {"role": "assistant", "text": "yo"}]}\n')
    (root / "empty_shards").mkdir()
    write("a_file", "not a directory\n")
    (root / "foreign").mkdir()
    write("foreign/notes.txt", "someone else's files\n")
    common = f"model: {omni_model}\nobjective: {{name: ntp}}\noutput_dir: {root}/never\n"
    write("omni_manifest.yaml", common + f"data: {{kind: manifest, manifest: {root}/good.jsonl}}\n")
    write("omni_shards.yaml", common + f"data: {{kind: shards, shards: {root}/empty_shards}}\n")
    write("omni_mixture.yaml", common + f"data: {{kind: shards, mixture: [{{name: a, shards: {root}/empty_shards}}, "
                                        f"{{name: b, shards: {root}/no_shards}}]}}\n")
    assert text.is_file()
    return root


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real 2-step run of the tiny text config (checkpoints, run.json, metrics)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    deterministic = torch.are_deterministic_algorithms_enabled()
    assert train.main([TEXT, *SMALL, "save_every=1", f"output_dir={run}"]) == 0
    torch.use_deterministic_algorithms(deterministic)
    assert (run / "checkpoints" / "latest").is_file()
    return run


def expand(items: list[str], **paths: Path) -> list[str]:
    return [item.format(**{k: str(v) for k, v in paths.items()}) for item in items]


def run_in_process(tool: str, argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        code = TOOLS[tool](argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    return code, capsys.readouterr().err


def run_subprocess(tool: str, argv: list[str], env: dict | None = None,
                   prefix: tuple[str, ...] = ()) -> tuple[int, str]:
    done = subprocess.run([*prefix, sys.executable, "-m", f"tools.{tool}", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)
    return done.returncode, done.stderr


def check_refusal(code: int, err: str, expected: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert lines, "no message"
    message = lines[-1]
    assert len(message) < 1500, message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_config_or_call_is_refused_and_writes_nothing(case, files, finished_run, tmp_path, capsys):
    name, tool, argv, expected = case
    out = tmp_path / "out"
    paths = {"out": out, "run": finished_run, "files": files}
    argv, expected = expand(argv, **paths), expand(expected, **paths)
    watched = [out, finished_run, files]
    before = [tree_hash(p) for p in watched]
    cwd_before = sorted(p.name for p in REPO.iterdir())
    code, err = run_in_process(tool, argv, capsys)
    check_refusal(code, err, expected)
    if name in SUBPROCESS:
        code, err = run_subprocess(tool, argv)
        check_refusal(code, err, expected)
    assert [tree_hash(p) for p in watched] == before, "a refused run changed a directory"
    assert sorted(p.name for p in REPO.iterdir()) == cwd_before, "a refused run wrote into the working directory"


def test_the_table_covers_at_least_40_cases():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_read_only_output_dir_is_refused(tmp_path):
    """As root, permission bits are not enforced: the row runs as `nobody` (setpriv), as a real process."""
    base = Path(tempfile_dir())
    try:
        locked = base / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        argv = [TEXT, f"output_dir={locked}/run"]
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("running as root without setpriv: cannot make a directory read-only for this user")
            env = {**os.environ, "HOME": str(base)}
            nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
            probe = subprocess.run([*nobody, sys.executable, "-c", "import tools.train"], cwd=REPO,
                                   capture_output=True, env=env)
            if probe.returncode != 0:  # e.g. a clone inside root's private mktemp directory
                pytest.skip(f"user nobody cannot read this checkout ({REPO}) to run the trainer")
            code, err = run_subprocess("train", argv, env=env, prefix=nobody)
        else:
            code, err = run_subprocess("train", argv)
        check_refusal(code, err, [TEXT, "output_dir", "not writable"])
        assert not (locked / "run").exists()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def tempfile_dir() -> str:
    """A directory every user can enter (pytest's tmp_path is private to root)."""
    import tempfile
    path = tempfile.mkdtemp(prefix="ordmoe-ro-")
    os.chmod(path, 0o755)
    return path


def test_check_prints_the_plan_and_writes_nothing(finished_run, tmp_path, capsys):
    out = tmp_path / "new"
    assert train.main([TEXT, *SMALL, f"output_dir={out}", "--check"]) == 0
    printed = capsys.readouterr().out
    assert "LingLiteForCausalLM" in printed and "tier 3: ranks 13-16" in printed and "a new run" in printed
    assert not out.exists()
    before = tree_hash(finished_run)
    assert train.main([TEXT, *SMALL, f"output_dir={finished_run}", "steps=4", "--check"]) == 0
    assert "resume from step-00000002" in capsys.readouterr().out
    assert tree_hash(finished_run) == before
    record = json.loads((finished_run / "run.json").read_text())
    assert record["batch"]["batch_size"] == 2 and record["tokenizer"]["sha256"]
