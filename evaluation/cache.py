"""The prediction cache: one JSONL of `Result`s per (model fingerprint, benchmark, protocol).

    <output>/predictions/<fingerprint>/<benchmark>.<protocol>.jsonl         finished and merged (rank 0)
    <output>/predictions/<fingerprint>/<benchmark>.<protocol>.rank<r>.jsonl  appended while generating

Every rank appends its results batch by batch (flushed and fsynced), so a killed run loses at most the
batch in flight and resumes where it stopped; a torn last line is ignored. When all ranks are done, rank 0
merges the parts into the one file, atomically. A finished benchmark re-scores without generating.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from evaluation.benchmark import Result


class PredictionCache:
    def __init__(self, root: str | Path, fingerprint: str, benchmark: str, protocol: str) -> None:
        self.directory = Path(root) / "predictions" / fingerprint
        self.stem = f"{benchmark}.{protocol}"
        self.path = self.directory / f"{self.stem}.jsonl"

    def part(self, rank: int) -> Path:
        return self.directory / f"{self.stem}.rank{rank}.jsonl"

    def parts(self) -> list[Path]:
        return sorted(self.directory.glob(f"{self.stem}.rank*.jsonl"))

    def load(self) -> dict[str, Result]:
        """Every stored result by sample id: the merged file, then any parts of an interrupted run."""
        results: dict[str, Result] = {}
        for path in [self.path, *self.parts()]:
            if path.is_file():
                results.update((r.id, r) for r in read_results(path))
        return results

    def append(self, rank: int, results: list[Result]) -> None:
        if not results:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(self.part(rank))
        with self.part(rank).open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results))
            f.flush()
            os.fsync(f.fileno())

    def finish(self, results: list[Result]) -> None:
        """Write the merged file (in the given order) atomically, then drop the rank parts."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            f.write("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in results))
        os.replace(tmp, self.path)
        for part in self.parts():
            part.unlink()

    def write_model_card(self, card: dict[str, Any]) -> None:
        """What the fingerprint stands for (model path, tier path), next to its predictions."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / "model.json"
        if not path.is_file():
            tmp = path.with_name(".model.json.tmp")
            tmp.write_text(json.dumps(card, indent=2) + "\n")
            os.replace(tmp, path)


def _drop_torn_tail(path: Path) -> None:
    """Cut a line a kill left unfinished, so the next append starts on a line of its own."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = f.seek(0) or f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_results(path: str | Path) -> list[Result]:
    """Results of one JSONL file; a line cut short by a kill (only ever the last one) is skipped."""
    path = Path(path)
    results = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                continue  # the torn tail of an interrupted append
            raise ValueError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict) or "id" not in row:
            raise ValueError(f"{path}:{number}: a result needs an `id` (and `prediction`, `answer`)")
        results.append(Result.from_json(row))
    return results


def fingerprint(parts: dict[str, Any], files: list[Path] = ()) -> str:
    """A short content hash of a model: its resolved config (and anything else in `parts`) and the bytes
    of its weight files."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode())
    for path in files:
        with Path(path).open("rb") as f:
            while chunk := f.read(1 << 23):
                digest.update(chunk)
    return digest.hexdigest()[:16]
