"""JSONL manifest -> WebDataset tar shards that stock `webdataset` (and img2dataset-style readers) read.

Each sample becomes one tar group under its key: the sample record as `.json` (conversation or caption,
plus the member names of its media) and each media file under its own extension, numbered when a
sample has several of a kind (`img0.png`, `img1.jpg`, `aud0.flac`, `vid0.mp4`). Every media file is
decoded while writing; a sample whose media cannot be decoded, or whose key is empty or already taken, is
reported with its manifest line and left out. `sizes.json` (samples per shard) and `stats.json` (counts
per modality, skipped samples with their reasons) are written next to the shards.

Nothing is destroyed: the output directory must be empty or one this writer wrote before (its marker file
`.make_shards.json` lists what it wrote); replacing earlier shards needs `overwrite`, and only the files the
marker lists are ever deleted. A directory holding other `.tar` files is refused even then (they would be
read as part of the dataset). The new shards are written into a temporary directory first and moved into
place only when at least one sample was written, so a manifest of only bad lines leaves the old shards as
they were.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm import tqdm

from data.manifest import MEDIA_FIELDS, ManifestError
from data.media import MediaError, load_audio, load_image, load_video

MEMBER_PREFIX = {"images": "img", "audios": "aud", "videos": "vid"}
LOADERS = {"images": load_image, "audios": load_audio, "videos": lambda source, name: load_video(source, 1, name)}


@dataclass
class ShardStats:
    written: int = 0
    shards: dict[str, int] = field(default_factory=dict)  # shard file name -> samples
    modalities: Counter = field(default_factory=Counter)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {"line", "id", "reason"}


MARKER = ".make_shards.json"
TMP_PREFIX = ".tmp-make-shards-"


class NothingWritten(ManifestError):
    """Every manifest line was left out; the output directory is unchanged. `stats.skipped` says why."""

    def __init__(self, message: str, stats: ShardStats) -> None:
        super().__init__(message)
        self.stats = stats


def write_shards(manifest: str | Path, out_dir: str | Path, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 workers: int = 0, overwrite: bool = False, show_progress: bool = True) -> ShardStats:
    """Write `out_dir/shard-%06d.tar` from `manifest`; returns what was written and what was skipped.

    `workers` processes read and validate media in parallel; shards are still written in manifest order,
    so the output does not depend on `workers`. See the module docstring for what `out_dir` may hold.
    """
    manifest, out = Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    if max_samples < 1 or max_bytes < 1 or workers < 0:
        raise ManifestError(f"max_samples and max_bytes must be >= 1 and workers >= 0, got {max_samples}, "
                            f"{max_bytes}, {workers}")
    previous = claim_directory(out, overwrite)
    tmp = out / f"{TMP_PREFIX}{os.getpid()}"
    tmp.mkdir(parents=True)
    try:
        stats = _write(manifest, tmp, max_samples, max_bytes, workers, show_progress)
        if stats.written == 0:
            raise NothingWritten(f"nothing written: all {len(stats.skipped)} manifest line(s) of {manifest} were left "
                                 f"out{'; ' + stats.skipped[0]['reason'] if stats.skipped else ''}"
                                 f"{'; ' + out.name + ' is unchanged' if previous else ''}", stats)
        written = sorted(p.name for p in tmp.iterdir())
        _write_marker(out, sorted(set(written) | set(previous)))  # a crash from here on leaves nothing unlisted
        for name in previous:
            (out / name).unlink(missing_ok=True)
        for name in written:
            os.replace(tmp / name, out / name)
        _write_marker(out, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats


def claim_directory(out: Path, overwrite: bool) -> list[str]:
    """The files an earlier run of this writer left in `out` (to be replaced); refuses what is not ours."""
    if out.exists() and not out.is_dir():
        raise ManifestError(f"{out} is a file, not a directory")
    if not out.exists():
        return []
    for stale in out.glob(f"{TMP_PREFIX}*"):  # a crashed run's temporary shards: ours by name
        shutil.rmtree(stale, ignore_errors=True)
    marker = out / MARKER
    try:
        ours = json.loads(marker.read_text())["files"] if marker.is_file() else []
    except (json.JSONDecodeError, KeyError, TypeError):
        raise ManifestError(f"{marker} is damaged; delete the directory's shards yourself") from None
    others = sorted(p.name for p in out.iterdir() if p.name != MARKER and p.name not in ours)
    foreign_shards = [name for name in others if name.endswith((".tar", ".tar.gz", ".tgz"))]
    if foreign_shards:
        raise ManifestError(f"{out} holds {len(foreign_shards)} shard(s) make_shards did not write "
                            f"({', '.join(foreign_shards[:3])}): they would be read as part of this dataset; choose "
                            f"another directory (files make_shards did not write are never deleted)")
    if others and not overwrite:
        raise ManifestError(f"{out} holds files make_shards did not write ({', '.join(others[:3])}); choose an empty "
                            f"directory or overwrite (they are kept)")
    if ours and not overwrite:
        shards = [name for name in ours if name.endswith(".tar")]
        raise ManifestError(f"{out} already holds {len(shards)} shard(s); choose another directory or overwrite")
    return ours


def _write_marker(out: Path, files: list[str]) -> None:
    tmp = out / f"{MARKER}.tmp"
    tmp.write_text(json.dumps({"tool": "make_shards", "files": files}, indent=1))
    os.replace(tmp, out / MARKER)


def _write(manifest: Path, out: Path, max_samples: int, max_bytes: int, workers: int,
           show_progress: bool) -> ShardStats:
    stats = ShardStats()
    lines = [(number, line) for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    prepare = partial(_prepare, root=manifest.parent)
    first_line: dict[str, int] = {}  # key -> the manifest line that took it
    with ExitStack() as stack:
        sink = stack.enter_context(wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_samples,
                                                   maxsize=max_bytes, verbose=0))
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers)) if workers > 0 else None
        prepared = pool.imap(prepare, lines, chunksize=8) if pool else map(prepare, lines)
        for number, group, error in tqdm(prepared, total=len(lines), desc="shards", disable=not show_progress):
            if error is None and group["__key__"] in first_line:
                error = (f"duplicate key {group['__key__']!r} (line {first_line[group['__key__']]} has it; keys are "
                         f"ids with '.' and '/' made '_')")
            if error is not None:
                stats.skipped.append({"line": number, "reason": error})
                continue
            first_line[group["__key__"]] = number
            sink.write(group)
            shard = Path(sink.fname).name
            stats.shards[shard] = stats.shards.get(shard, 0) + 1
            stats.written += 1
            record = json.loads(group["json"])
            stats.modalities.update([kind for kind in MEMBER_PREFIX if record.get(kind)] or ["text"])
    if stats.written == 0:
        return stats
    (out / "sizes.json").write_text(json.dumps(stats.shards, indent=1))
    (out / "stats.json").write_text(json.dumps({"written": stats.written, "modalities": dict(stats.modalities),
                                                "skipped": stats.skipped}, indent=1))
    return stats


def _prepare(numbered_line: tuple[int, str], root: Path) -> tuple[int, dict[str, Any] | None, str | None]:
    """(line number, tar group or None, reason it was left out or None); runs in the worker processes."""
    number, line = numbered_line
    try:
        return number, _sample_group(json.loads(line), root, number), None
    except Exception as err:  # noqa: BLE001 -- one bad line is left out with its reason, whatever it raised
        return number, None, f"{type(err).__name__}: {err}"


def _sample_group(record: dict[str, Any], root: Path, number: int) -> dict[str, Any]:
    """One manifest record -> the dict `ShardWriter.write` takes (`__key__`, `json`, media members)."""
    if not isinstance(record, dict) or not ("conversation" in record or "caption" in record):
        raise ManifestError(f"line {number}: needs `conversation` or `caption`")
    key = str(record.get("id", f"sample{number:08d}")).strip().replace(".", "_").replace("/", "_")
    if not key:
        raise ManifestError(f"line {number}: empty `id` (it becomes the sample's key in the tar)")
    group: dict[str, Any] = {"__key__": key}
    out = {k: v for k, v in record.items() if k not in MEDIA_FIELDS and k not in MEDIA_FIELDS.values()}
    for single, plural in MEDIA_FIELDS.items():
        paths = record.get(plural, [record[single]] if single in record else [])
        paths = [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(path, str) and path for path in paths):
            raise ManifestError(f"line {number}: `{plural}` must be a list of file paths")
        members = []
        for index, relative in enumerate(paths):
            path = root / relative
            if not path.is_file():
                raise MediaError(f"line {number}: {path} does not exist")
            data = path.read_bytes()
            LOADERS[plural](data, f"{path} (line {number})")  # validate: decodes, or raises MediaError
            member = f"{MEMBER_PREFIX[plural]}{index}{path.suffix.lower()}"
            group[member] = data
            members.append(member)
        if members:
            out[plural] = members
    group["json"] = json.dumps(out, ensure_ascii=False).encode("utf-8")
    return group
