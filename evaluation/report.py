"""The report: Markdown + JSON laid out like the paper's tables (one row per model or tier path, one column
per benchmark, an average), a PNG bar chart, and per benchmark its protocol, counts and categories.

The average is over the benchmarks a row has a number for, each as a percentage of its full mark (OCRBench's
/1000 counts as /10, as OpenCompass averages it); a row missing some says how many it averages. Error rates
(WER, CER: `Score.higher_is_better` False) are shown but not averaged. A
benchmark without data is listed with where its files were expected; one not scored (MM-Vet without a
judge) prints "not scored", never a number.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.benchmark import Score


@dataclass
class ReportRow:
    label: str  # e.g. "runs/demo" or "runs/demo [tier 2: ranks 5-8]"
    scores: dict[str, Score] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # fingerprint, path, tier

    def average(self) -> tuple[float | None, int]:
        """Mean percentage of the scored benchmarks where higher is better (an error rate such as WER would
        pull an accuracy average the wrong way), and how many there are."""
        values = [s.value / s.full_mark * 100 for s in self.scores.values()
                  if s.value is not None and s.higher_is_better]
        return (sum(values) / len(values) if values else None), len(values)


@dataclass
class Report:
    benchmarks: list[str]  # column order
    protocol: str
    rows: list[ReportRow] = field(default_factory=list)
    missing: dict[str, str] = field(default_factory=dict)  # benchmark -> expected location
    failed: dict[str, str] = field(default_factory=dict)  # benchmark -> error (bad data files)

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "benchmarks": self.benchmarks, "missing": self.missing,
                "failed": self.failed,
                "rows": [{"label": r.label, "info": r.info, "average": r.average()[0], "averaged_over": r.average()[1],
                          "scores": {b: s.to_json() for b, s in r.scores.items()}} for r in self.rows]}


def cell(score: Score | None, benchmark: str, report: Report) -> str:
    if score is None:
        return "missing" if benchmark in report.missing else ("error" if benchmark in report.failed else "-")
    if score.value is None:
        return "not scored"
    return f"{score.value:.1f}" if score.full_mark != 1 else f"{score.value:.4f}"


def to_markdown(report: Report) -> str:
    columns = report.benchmarks
    lines = [f"Protocol: `{report.protocol}`", "",
             "| model | " + " | ".join(columns) + " | avg |", "|---" * (len(columns) + 2) + "|"]
    for row in report.rows:
        average, count = row.average()
        averageable = sum(1 for b in columns if b not in row.scores or row.scores[b].higher_is_better)
        avg = "-" if average is None else f"{average:.1f}" + ("" if count == averageable else f" ({count}/{averageable})")
        lines.append(f"| {row.label} | " + " | ".join(cell(row.scores.get(b), b, report) for b in columns)
                     + f" | {avg} |")
    lines += ["", "| benchmark | metric | protocol | samples | unparsed | errors | note |", "|---|---|---|---|---|---|---|"]
    for row in report.rows:
        for name in columns:
            s = row.scores.get(name)
            if s is not None:
                label = name if len(report.rows) == 1 else f"{name} ({row.label})"
                lines.append(f"| {label} | {s.metric} | {s.protocol} | {s.count} | {s.unparsed} | {s.errors} | "
                             f"{s.note} |")
    if report.missing:
        lines += ["", "Missing data (the other benchmarks ran):", ""]
        lines += [f"- {name}: {where}" for name, where in report.missing.items()]
    if report.failed:
        lines += ["", "Failed (bad data files):", ""]
        lines += [f"- {name}: {error}" for name, error in report.failed.items()]
    for row in report.rows:
        for name in columns:
            s = row.scores.get(name)
            if s is not None and s.categories:
                title = name if len(report.rows) == 1 else f"{name}, {row.label}"
                lines += ["", f"#### {title}: per category ({s.metric})", "", "| category | value |", "|---|---|"]
                lines += [f"| {k} | {v:.2f} |" for k, v in s.categories.items()]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str | Path) -> dict[str, Path]:
    """`report.md`, `report.json`, `report.png` in `out_dir` (each written atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "json": out / "report.json", "png": out / "report.png"}
    _write_atomic(paths["md"], to_markdown(report))
    _write_atomic(paths["json"], json.dumps(report.to_json(), indent=2, ensure_ascii=False) + "\n")
    plot_report(report, paths["png"])
    return paths


def plot_report(report: Report, path: str | Path) -> None:
    """Grouped bars: benchmarks on the x axis (percent of full mark), one bar per row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = report.benchmarks + ["avg"]
    width = 0.8 / max(len(report.rows), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(columns) + 2), 3.8))
    for i, row in enumerate(report.rows):
        values = [(s.value / s.full_mark * 100) if (s := row.scores.get(b)) is not None and s.value is not None
                  else 0.0 for b in report.benchmarks]
        values.append(row.average()[0] or 0.0)
        ax.bar([x + i * width for x in range(len(columns))], values, width, label=row.label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(columns))], columns, rotation=20)
    ax.set_ylabel("% of full mark")
    ax.set_title(f"protocol: {report.protocol}")
    ax.grid(axis="y", alpha=0.3)
    if report.rows:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).stem}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
