"""tools/eval.py end to end on a tiny omni run trained here: report, cache (no regeneration), resume after a
kill, tier rows, a missing benchmark reported with its expected location while the others run."""
import base64
import csv
import json
from pathlib import Path

import pytest

import evaluation.runner as runner
from models.config import from_dict
from tools.eval import main as eval_main
from training.config import TrainConfig
from training.loop import train

ASSETS = Path(__file__).resolve().parents[2] / "data" / "assets"


def write_tsv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """tiny-omni trained for 2 steps: a real run directory with a self-describing checkpoint."""
    out = tmp_path_factory.mktemp("run")
    train(from_dict(TrainConfig, {
        "model": "configs/models/tiny-omni.yaml", "output_dir": str(out), "steps": 2, "log_every": 1,
        "data": {"kind": "text", "tokenizer": "configs/tokenizers/tiny-omni/tokenizer.json", "seq_len": 32,
                 "batch_size": 2}, "objective": {"name": "ntp"}}, source="test"), show_progress=False)
    return out


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarks")
    diagram = base64.b64encode((ASSETS / "ai2d_00002168.png").read_bytes()).decode()
    photo = base64.b64encode((ASSETS / "coco_000000039769.png").read_bytes()).decode()
    options = {"A": "Polyp forming", "B": "Zygote", "C": "Branching", "D": "Planula"}
    write_tsv(root / "AI2D_TEST.tsv", [dict(index=i, question=q, **options, answer="B", image=diagram if i == 0 else "0")
                                       for i, q in enumerate(["Ovum and sperm make what?", "What is formed?",
                                                              "Which stage comes next?"])])
    write_tsv(root / "MMStar.tsv", [dict(index=i, question=q, A="1", B="2", C="3", D="4", answer="B",
                                         category="fine-grained perception", **{"l2-category": "object counting"},
                                         image=photo if i == 0 else "0")
                                    for i, q in enumerate(["How many cats?", "How many remotes?"])])
    return root


def run_eval(run, root, out, *extra):
    return eval_main([str(run), "--benchmarks", "ai2d,mmstar,ocrbench", "--data-root", str(root), "--output", str(out),
                      "--batch-size", "2", "--no-progress", *extra])


def test_report_then_cache_then_resume(trained_run, data_root, tmp_path, monkeypatch, capsys):
    real, calls = runner.generate_batch, {"n": 0}

    def counted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 and kill["armed"]:
            raise KeyboardInterrupt("killed midway")
        return real(*args, **kwargs)

    kill = {"armed": True}
    monkeypatch.setattr(runner, "generate_batch", counted)
    with pytest.raises(KeyboardInterrupt):  # killed during the second batch of ai2d
        run_eval(trained_run, data_root, tmp_path)
    kill["armed"], calls["n"] = False, 0
    assert run_eval(trained_run, data_root, tmp_path) == 0
    assert calls["n"] == 2  # resumed: the last ai2d sample (1 batch) and mmstar's two (1 batch)

    report = json.loads((tmp_path / "report.json").read_text())
    (row,) = report["rows"]
    assert set(row["scores"]) == {"ai2d", "mmstar"} and row["scores"]["ai2d"]["count"] == 3
    assert "ocrbench" in report["missing"] and str(data_root / "OCRBench" / "OCRBench.json") in report["missing"]["ocrbench"]
    markdown = (tmp_path / "report.md").read_text()
    assert "| model | ai2d | mmstar | ocrbench | avg |" in markdown and "| missing |" in markdown
    assert (tmp_path / "report.png").stat().st_size > 0

    calls["n"] = 0
    capsys.readouterr()
    assert run_eval(trained_run, data_root, tmp_path) == 0
    assert calls["n"] == 0  # a finished run re-scores from the cache without generating
    assert json.loads((tmp_path / "report.json").read_text())["rows"][0]["scores"] == row["scores"]

    # our own predictions re-score without model or data
    (stored,) = (tmp_path / "predictions").glob("*/ai2d.vlmevalkit.jsonl")
    assert eval_main(["--rescore", str(stored), "--benchmarks", "ai2d", "--output", str(tmp_path / "rescored")]) == 0
    rescored = json.loads((tmp_path / "rescored" / "report.json").read_text())["rows"][0]["scores"]["ai2d"]
    assert rescored == row["scores"]["ai2d"]


def test_tiers_add_one_row_per_tier_path(trained_run, data_root, tmp_path):
    assert eval_main([str(trained_run), "--benchmarks", "mmstar", "--data-root", str(data_root), "--output",
                      str(tmp_path), "--limit", "1", "--tiers", "3", "--no-progress"]) == 0
    rows = json.loads((tmp_path / "report.json").read_text())["rows"]
    assert [r["info"]["tier"] for r in rows] == [None, 2, 3]
    assert "tier 1/3: standard routing" in rows[0]["label"] and "tier 3/3 (uniform, ranks 13-16)" in rows[2]["label"]
    assert len({r["info"]["fingerprint"] for r in rows}) == 3 and all(r["scores"]["mmstar"]["count"] == 1 for r in rows)


def test_unknown_benchmark_and_missing_model_are_one_line_errors(tmp_path, capsys):
    assert eval_main([str(tmp_path / "nope"), "--benchmarks", "mmstr"]) == 2
    assert "Did you mean 'mmstar'" in capsys.readouterr().err
    assert eval_main([str(tmp_path / "nope"), "--benchmarks", "mmstar"]) == 2
    assert "no such run, checkpoint or export directory" in capsys.readouterr().err


def test_frames_reach_the_video_benchmarks_only_and_zero_is_refused(tmp_path, monkeypatch, capsys):
    import types

    import evaluation.suite as suite
    from evaluation.benchmark import MissingData
    built = {}

    def no_data(benchmark, limit):
        built[benchmark.name] = getattr(benchmark, "num_frames", None)
        raise MissingData(f"{benchmark.name}: not here")
    monkeypatch.setattr(suite, "load_samples", no_data)
    subject = types.SimpleNamespace(label="m", fingerprint="f", model=None, processor=None)
    report, _ = suite.evaluate(subject, ["mvbench", "ai2d"], tmp_path, tmp_path / "out", num_frames=8)
    assert built == {"mvbench": 8, "ai2d": None} and set(report.missing) == {"mvbench", "ai2d"}
    suite.evaluate(subject, ["mvbench"], tmp_path, tmp_path / "out")
    assert built["mvbench"] == 128  # the paper's default
    with pytest.raises(SystemExit) as exit_info:
        eval_main([str(tmp_path), "--benchmarks", "mvbench", "--frames", "0"])
    assert exit_info.value.code == 2 and "--frames: must be >= 1" in capsys.readouterr().err
