"""`make demo`: train the tiny omni model with OrdMoE and with the `ntp` baseline on the CPU, then evaluate both.

1. builds the demo dataset (shapes, words, beeps, moving squares, real speech, text) as shards plus a
   held-out split (data/demo_data.py);
2. trains `configs/train/demo-omni.yaml` (tiny-omni: tiny Ling-lite with Ming's modality routers, a
   Qwen2.5-VL vision tower, a Whisper encoder) with OrdMoE, C = 3, into `runs/demo`;
3. trains the same model, data and schedule with the plain next-token objective (C = 1) into `runs/demo_ntp`;
4. probes every tier of the OrdMoE run on the held-out samples (tier 1 > tier 2 > tier 3 ?);
5. runs `tools/eval.py --benchmarks demo` (evaluation/demo.py: one registered benchmark per task) on both
   runs and prints one table, chance level beside each task, plus `runs/demo/demo_eval.png`.
Any `key=value` arguments override both training configs (e.g. `steps=100`); `data_dir=` moves the dataset,
`samples_per_kind=` sizes it, `output_dir=` moves the OrdMoE run (the baseline goes beside it, `<dir>_ntp`).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from data.demo_data import build_demo_data  # noqa: E402
from evaluation import BENCHMARKS  # noqa: E402
from tools import eval as eval_tool  # noqa: E402
from tools import probe_tiers, train  # noqa: E402

CONFIG = "configs/train/demo-omni.yaml"
OUTPUT = "runs/demo"
DATA = "runs/demo_data"
SAMPLES_PER_KIND = 40  # 25 % held out: about 10 questions per task
BASELINE = ["objective.name=ntp", "objective.tiers.num_tiers=1"]


def _take(overrides: list[str], key: str, default: str) -> tuple[str, list[str]]:
    value = next((o.split("=", 1)[1] for o in overrides if o.startswith(f"{key}=")), default)
    return value, [o for o in overrides if not o.startswith(f"{key}=")]


def main(argv: list[str] | None = None) -> int:
    overrides = list(sys.argv[1:] if argv is None else argv)
    data, overrides = _take(overrides, "data_dir", DATA)
    per_kind, overrides = _take(overrides, "samples_per_kind", str(SAMPLES_PER_KIND))
    output, overrides = _take(overrides, "output_dir", OUTPUT)
    baseline = f"{output.rstrip('/')}_ntp"
    common = [f"data.shards={data}/train_shards", f"data.eval_manifest={data}/eval.jsonl", *overrides]
    if not (Path(data) / "eval.jsonl").is_file():
        print(f"== 0/5 building the demo dataset in {data} ({per_kind} samples per kind)")
        build_demo_data(data, samples_per_kind=int(per_kind))
    print(f"== 1/5 training {CONFIG} (tiny omni model, OrdMoE with C = 3) on the CPU -> {output}")
    if status := train.main([CONFIG, f"output_dir={output}", *common]):
        return status
    print(f"\n== 2/5 training the ntp baseline (same model, data and schedule, C = 1) -> {baseline}")
    if status := train.main([CONFIG, f"output_dir={baseline}", *BASELINE, *common]):
        return status
    print("\n== 3/5 per-tier log-likelihood of the OrdMoE run on the held-out samples")
    if status := probe_tiers.main([output]):
        return status
    print("\n== 4/5 tools/eval.py on the held-out split (registered demo benchmarks), both runs")
    reports = {}
    for label, run in (("ntp", baseline), ("ordmoe", output)):
        if status := eval_tool.main([run, "--benchmarks", "demo", "--data-root", data, "--output", f"{run}/eval",
                                     "--no-progress"]):
            return status
        reports[label] = json.loads(Path(run, "eval", "report.json").read_text())
    table = demo_table(reports)
    print("\n== 5/5 what each run learned (held-out split)\n")
    print(table)
    Path(output, "demo_eval.md").write_text(table + "\n")
    plot_demo(reports, Path(output, "demo_eval.png"))
    print(f"\ntable: {output}/demo_eval.md, plot: {output}/demo_eval.png; logs: {output}/metrics.jsonl, TensorBoard: "
          f"{output}/tensorboard, tier probe: {output}/tier_probe/tier_probe.png")
    return 0


def _scores(report: dict) -> dict[str, dict]:
    return report["rows"][0]["scores"] if report.get("rows") else {}


def demo_table(reports: dict[str, dict]) -> str:
    """Markdown: one row per demo task, chance beside the two runs (None where the task had no held-out data)."""
    names = BENCHMARKS.group("demo")
    lines = ["| task | metric | samples | chance | " + " | ".join(reports) + " |",
             "|---|---|---|---|" + "---|" * len(reports)]
    for name in names:
        scores = [_scores(r).get(name) for r in reports.values()]
        first = next((s for s in scores if s), None)
        if first is None:
            lines.append(f"| {name} | - | 0 | - | " + " | ".join("no held-out data" for _ in reports) + " |")
            continue
        cells = [f"{s['value']:.1f}" if s and s["value"] is not None else "-" for s in scores]
        lines.append(f"| {name} | {first['metric']} | {first['count']} | {first['extra']['chance']:.1f} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_demo(reports: dict[str, dict], path: Path) -> None:
    names = [n for n in BENCHMARKS.group("demo") if any(n in _scores(r) for r in reports.values())]
    figure, axis = plt.subplots(figsize=(1.8 * max(len(names), 1) + 2, 3.6))
    width = 0.8 / (len(reports) + 1)
    for column, (label, values) in enumerate([("chance", None), *reports.items()]):
        heights = []
        for name in names:
            score = next((_scores(r)[name] for r in reports.values() if name in _scores(r)), None)
            if values is None:
                heights.append(score["extra"]["chance"] if score else 0.0)
            else:
                mine = _scores(values).get(name)
                heights.append(mine["value"] if mine and mine["value"] is not None else 0.0)
        axis.bar([i + column * width for i in range(len(names))], heights, width, label=label,
                 color="lightgrey" if values is None else None)
    axis.set_xticks([i + width * len(reports) / 2 for i in range(len(names))],
                    [f"{n}\n({'WER' if n == 'demo-speech' else 'acc'} %)" for n in names], fontsize=8)
    axis.set_ylabel("% (WER: lower is better)")
    axis.set_title("tiny omni model on the demo's held-out split")
    axis.legend(fontsize=8)
    figure.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    figure.savefig(tmp, dpi=120)
    plt.close(figure)
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
