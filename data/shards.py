"""JSONL manifest -> WebDataset tar shards that stock `webdataset` (and img2dataset-style readers) read.

Each sample becomes one tar group under its key: the sample record as `.json` (conversation or caption,
plus the member names of its media) and each media file under its own extension, numbered when a
sample has several of a kind (`img0.png`, `img1.jpg`, `aud0.flac`, `vid0.mp4`). Every media file is
decoded while writing; a sample whose media cannot be decoded is reported with its manifest line and
left out. `sizes.json` (samples per shard) and `stats.json` (counts per modality, skipped samples with
their reasons) are written next to the shards.
"""
from __future__ import annotations

import json
import multiprocessing
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


def write_shards(manifest: str | Path, out_dir: str | Path, max_samples: int = 1000, max_bytes: int = 1 << 30,
                 workers: int = 0, overwrite: bool = False, show_progress: bool = True) -> ShardStats:
    """Write `out_dir/shard-%06d.tar` from `manifest`; returns what was written and what was skipped.

    `workers` processes read and validate media in parallel; shards are still written in manifest order,
    so the output does not depend on `workers`. An `out_dir` that already holds shards is refused unless
    `overwrite` (stale shards of an earlier run would otherwise be read as part of this one).
    """
    manifest, out = Path(manifest), Path(out_dir)
    if not manifest.is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    existing = sorted(out.glob("*.tar")) if out.is_dir() else []
    if existing and not overwrite:
        raise ManifestError(f"{out} already holds {len(existing)} shard(s); choose another directory or overwrite")
    for stale in existing + [out / "sizes.json", out / "stats.json"]:
        stale.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    stats = ShardStats()
    lines = [(number, line) for number, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1)
             if line.strip()]
    prepare = partial(_prepare, root=manifest.parent)
    with ExitStack() as stack:
        sink = stack.enter_context(wds.ShardWriter(str(out / "shard-%06d.tar"), maxcount=max_samples,
                                                   maxsize=max_bytes, verbose=0))
        pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(workers)) if workers > 0 else None
        prepared = pool.imap(prepare, lines, chunksize=8) if pool else map(prepare, lines)
        for number, group, error in tqdm(prepared, total=len(lines), desc="shards", disable=not show_progress):
            if error is not None:
                stats.skipped.append({"line": number, "reason": error})
                continue
            sink.write(group)
            shard = Path(sink.fname).name
            stats.shards[shard] = stats.shards.get(shard, 0) + 1
            stats.written += 1
            record = json.loads(group["json"])
            stats.modalities.update([kind for kind in MEMBER_PREFIX if record.get(kind)] or ["text"])
    (out / "sizes.json").write_text(json.dumps(stats.shards, indent=1))
    (out / "stats.json").write_text(json.dumps({"written": stats.written, "modalities": dict(stats.modalities),
                                                "skipped": stats.skipped}, indent=1))
    return stats


def _prepare(numbered_line: tuple[int, str], root: Path) -> tuple[int, dict[str, Any] | None, str | None]:
    """(line number, tar group or None, reason it was left out or None); runs in the worker processes."""
    number, line = numbered_line
    try:
        return number, _sample_group(json.loads(line), root, number), None
    except (json.JSONDecodeError, ManifestError, MediaError, OSError) as err:
        return number, None, f"{type(err).__name__}: {err}"


def _sample_group(record: dict[str, Any], root: Path, number: int) -> dict[str, Any]:
    """One manifest record -> the dict `ShardWriter.write` takes (`__key__`, `json`, media members)."""
    if not isinstance(record, dict) or not ("conversation" in record or "caption" in record):
        raise ManifestError(f"line {number}: needs `conversation` or `caption`")
    key = str(record.get("id", f"sample{number:08d}")).replace(".", "_").replace("/", "_")
    group: dict[str, Any] = {"__key__": key}
    out = {k: v for k, v in record.items() if k not in MEDIA_FIELDS and k not in MEDIA_FIELDS.values()}
    for single, plural in MEDIA_FIELDS.items():
        paths = record.get(plural, [record[single]] if single in record else [])
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
