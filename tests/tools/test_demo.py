"""`make demo` in shortened form: two tiny training runs (OrdMoE and the ntp baseline) on the same demo data,
then tools/eval.py on the held-out split: the two-run table (chance beside each task) and its PNG exist."""
import json

from evaluation import BENCHMARKS
from tools import demo


def test_demo_trains_both_objectives_and_evaluates_them(tmp_path):
    output, data = tmp_path / "demo", tmp_path / "demo_data"
    status = demo.main([f"output_dir={output}", f"data_dir={data}", "samples_per_kind=4", "steps=2", "save_every=2",
                        "log_every=1", "data.num_workers=0"])
    assert status == 0
    table = (output / "demo_eval.md").read_text()
    header, rule, *rows = table.strip().splitlines()
    assert header == "| task | metric | samples | chance | ntp | ordmoe |"
    assert [row.split("|")[1].strip() for row in rows] == BENCHMARKS.group("demo")
    assert (output / "demo_eval.png").stat().st_size > 0
    for run in (output, tmp_path / "demo_ntp"):
        report = json.loads((run / "eval" / "report.json").read_text())
        assert set(report["benchmarks"]) == set(BENCHMARKS.group("demo"))
    ntp_config = (tmp_path / "demo_ntp" / "train_config.yaml").read_text()
    assert "ntp" in ntp_config and "num_tiers: 1" in ntp_config
