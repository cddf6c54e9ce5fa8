"""Where a run's numbers go: JSON lines (every logged step), TensorBoard, and PNG plots at the end.

`metrics.jsonl` reads as one run however often it was resumed: each start appends a `start` or `resume`
event naming the step it continues from (`begin_attempt`), and the rows of steps after that one, which
the resumed run logs again, are moved to `metrics.replayed.jsonl` (kept, with the attempt they came
from); TensorBoard hides the same steps (`purge_step`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
REPLAYED = "metrics.replayed.jsonl"
ATTEMPT_EVENTS = ("start", "resume")


class RunLog:
    def __init__(self, output_dir: str | Path, tensorboard: bool = True) -> None:
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS
        self._file = self.path.open("a")
        self._writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            resumed = last_attempt(self.path)  # events of replayed steps are hidden, as their JSON rows are
            purge = resumed["step"] + 1 if resumed and resumed["event"] == "resume" else None
            self._writer = SummaryWriter(str(self.dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._writer is not None:
            self._writer.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def last_attempt(path: str | Path) -> dict[str, Any] | None:
    """The latest `start` / `resume` event of a metrics file (None for a file without one)."""
    path = Path(path)
    rows = read_metrics(path) if path.is_file() else []
    return next((r for r in reversed(rows) if r.get("event") in ATTEMPT_EVENTS and "attempt" in r), None)


def begin_attempt(output_dir: str | Path, step: int, event: dict[str, Any]) -> int:
    """Start attempt N of a run continuing from `step`: rows logged after `step` by earlier attempts (which
    this one replays) move to `metrics.replayed.jsonl`, then the event is appended. Returns how many moved."""
    from training.checkpoint import write_atomic

    path = Path(output_dir) / METRICS
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # the half-written last line of a killed trainer
            continue
    attempt = sum(1 for r in rows if r.get("event") in ATTEMPT_EVENTS and "attempt" in r) + 1
    kept = [r for r in rows if r.get("step", 0) <= step]
    replayed = [r for r in rows if r.get("step", 0) > step]
    if replayed:
        with (Path(output_dir) / REPLAYED).open("a") as f:
            f.writelines(json.dumps({**r, "replayed_by_attempt": attempt}) + "\n" for r in replayed)
    event = {"step": step, **event, "attempt": attempt, "replayed_rows_moved": len(replayed)}
    write_atomic(path, "".join(json.dumps(r) + "\n" for r in [*kept, event]))  # old log or new, never half
    return len(replayed)


def plot_training_curves(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Loss parts and per-tier log-likelihoods against the step, one panel each."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    panels = [("loss", ["loss", "ntp"]), ("rank loss / balance", ["erl", "bal"]),
              ("mean token log-prob per tier", sorted({k for r in rows for k in r if k.startswith("logp_tier")}))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if key in r]
            if points:
                ax.plot(*zip(*points), label=key, marker="." if len(points) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
