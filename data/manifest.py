"""JSONL manifests of multimodal samples (the format tools/make_shards.py reads), as a resumable batch stream.

One sample per line: `{"id"?, "conversation": [{"role", "content"}] | "caption": str, "image" | "images",
"audio" | "audios", "video" | "videos"}` with media paths relative to the manifest. Samples are decoded
and processed on the fly; a sample that cannot be (corrupt media, a marker without its media, too long)
is skipped and counted by reason, never fatal. The stream position is (epoch, samples consumed), so a
restart continues with the next unseen sample of the same seeded order.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from data.media import MediaError
from data.processor import ProcessorError

MEDIA_FIELDS = {"image": "images", "audio": "audios", "video": "videos"}
CAPTION_PROMPTS = {"images": "<image>\nDescribe the image.", "videos": "<video>\nDescribe the video.",
                   "audios": "<audio>\nTranscribe the audio."}


class ManifestError(ValueError):
    """A manifest line is not a sample; the message names the file and the line."""


def read_manifest(path: str | Path) -> list[dict[str, Any]]:
    """Samples with media paths made absolute and captions turned into a one-exchange conversation."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path}")
    samples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}:{number}: not JSON ({err.msg})") from None
        samples.append(to_sample(record, path.parent, f"{path.name}:{number}"))
    return samples


def to_sample(record: dict[str, Any], root: Path, where: str) -> dict[str, Any]:
    """A manifest record -> a processor sample (`id`, `conversation`, media lists of absolute paths)."""
    if not isinstance(record, dict):
        raise ManifestError(f"{where}: a sample must be a JSON object")
    sample: dict[str, Any] = {"id": str(record.get("id", where))}
    for single, plural in MEDIA_FIELDS.items():
        items = record.get(plural, [record[single]] if single in record else [])
        sample[plural] = [str(root / item) for item in items]
    if "conversation" in record:
        sample["conversation"] = record["conversation"]
    elif "caption" in record:
        kind = next((k for k in ("images", "videos", "audios") if sample[k]), None)
        prompt = CAPTION_PROMPTS[kind] if kind else "Write a sentence."
        sample["conversation"] = [{"role": "user", "content": prompt},
                                  {"role": "assistant", "content": record["caption"]}]
    else:
        raise ManifestError(f"{where}: needs `conversation` or `caption`")
    for key in ("answer", "question"):
        if key in record:
            sample[key] = record[key]
    return sample


class ManifestBatches:
    """Processed, collated batches over a manifest, epoch after epoch, skipping and counting bad samples."""

    def __init__(self, samples: list[dict[str, Any]], process: Callable[[dict], dict], collate: Callable[[list], dict],
                 batch_size: int, seed: int = 0, shuffle: bool = True) -> None:
        if not samples:
            raise ValueError("the manifest has no samples")
        self.samples, self.process, self.collate = samples, process, collate
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.epoch, self.position = 0, 0  # position: samples of this epoch already consumed
        self.skipped: Counter[str] = Counter()  # reason -> count
        self.last_skip = ""  # the most recent reason, in full (names the sample)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            order = self._order(self.epoch)
            examples = []
            while self.position < len(order):
                sample = self.samples[int(order[self.position])]
                self.position += 1
                try:
                    examples.append(self.process(sample))
                except (MediaError, ProcessorError) as err:
                    self.skipped[type(err).__name__] += 1
                    self.last_skip = str(err)
                    continue
                if len(examples) == self.batch_size:
                    yield self.collate(examples)
                    examples = []
            self.epoch, self.position = self.epoch + 1, 0  # a ragged tail joins no batch: equal batch shapes

    def _order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(len(self.samples))
        return torch.randperm(len(self.samples), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"data seed changed since the checkpoint ({state['seed']} -> {self.seed})")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self.skipped = Counter(state.get("skipped", {}))
