"""The two training CLIs end to end: tools/train.py then tools/probe_tiers.py on its run."""
import json

from tools.probe_tiers import main as probe_main
from tools.train import main as train_main


def test_train_then_probe_tiers(tmp_path, capsys):
    run = tmp_path / "run"
    assert train_main(["configs/train/tiny-ordmoe-text.yaml", f"output_dir={run}", "steps=6", "log_every=3",
                       "data.batch_size=4", "data.seq_len=32", "--no-progress"]) == 0
    assert (run / "checkpoints" / "latest").read_text() == "step-00000006"
    capsys.readouterr()
    assert probe_main([str(run), "--max-batches", "1", "--scopes", "all", "deep"]) == 0
    out = capsys.readouterr().out
    assert "| all | 3 | 13-16 |" in out and "| deep | 2 | 5-8 |" in out
    report = json.loads((run / "tier_probe" / "tier_probe.json").read_text())
    assert [(s["scope"], s["tier"]) for s in report["scores"]] == [("all", 1), ("all", 2), ("all", 3),
                                                                    ("deep", 1), ("deep", 2), ("deep", 3)]
    assert (run / "tier_probe" / "tier_probe.png").stat().st_size > 0


def test_config_errors_are_reported_not_raised(tmp_path, capsys):
    assert train_main(["configs/train/tiny-ordmoe-text.yaml", "objective.rewards=[0.0,0.5,1.0]"]) == 2
    err = capsys.readouterr().err
    assert "strictly decreasing" in err and "tiny-ordmoe-text.yaml" in err
    assert train_main(["configs/train/tiny-ordmoe-text.yaml", "objective.tiers.plan=best"]) == 2
    assert "must be one of" in capsys.readouterr().err


def test_demo_builds_its_data_and_trains_the_tiny_omni_model(tmp_path, capsys):
    from tools.demo import main as demo_main

    assert demo_main([f"output_dir={tmp_path / 'demo'}", f"data_dir={tmp_path / 'data'}", "steps=2", "log_every=1",
                      "--no-progress"]) == 0
    assert (tmp_path / "data" / "train_shards" / "sizes.json").is_file()
    out = capsys.readouterr().out
    assert "| all | 3 | 13-16 |" in out and '"skipped_samples": 0' in out
    assert (tmp_path / "demo" / "tier_probe" / "tier_probe.png").is_file()


def test_check_lists_inputs_not_written_yet_and_training_refuses_them(tmp_path, capsys):
    """An earlier stage not trained, shards and a manifest not written: `--check` names each with what writes
    it (exit 0, nothing written); the run itself refuses on the first, in one line (exit 2). A shard directory
    that exists but is empty is a real error for both."""
    args = ["configs/train/tiny-omni-sft-ordmoe.yaml", f"output_dir={tmp_path / 'run'}",
            f"init_from={tmp_path / 'align'}", f"data.shards={tmp_path / 'shards'}",
            f"data.eval_manifest={tmp_path / 'eval.jsonl'}"]
    assert train_main([*args, "--check"]) == 0
    missing = [line for line in capsys.readouterr().out.splitlines() if line.startswith("- ")]
    assert len(missing) == 2, missing  # init_from; then both data inputs in one line
    assert "init_from" in missing[0] and "run the previous stage first" in missing[0]
    assert "shard directory not found" in missing[1] and "eval.jsonl': no such file" in missing[1]
    assert train_main(args) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    (tmp_path / "shards").mkdir()
    assert train_main([*args[:2], f"data.shards={tmp_path / 'shards'}", "--check"]) == 2
    assert "no .tar" in capsys.readouterr().err
