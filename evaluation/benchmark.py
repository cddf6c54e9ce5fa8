"""What a benchmark is: samples in, predictions out, one score. The interface every adapter follows.

One benchmark = one registered adapter class (timm style):

    @BENCHMARKS.register("ai2d")
    class AI2D(Benchmark):
        modality = "image"
        max_new_tokens = 16
        locations = ("AI2D_TEST.tsv",)              # relative to --data-root; the first that exists wins
        def samples(self) -> Iterator[Sample]: ...  # reads the public release format
        def score(self, results) -> Score: ...      # calls a pure scorer (evaluation/*_scoring.py)

- `samples()` yields `Sample`s: media (paths, bytes or decoded objects; the processor decodes them, so a
  corrupt image is an error of that one sample), the conversation the model sees (the benchmark's prompt for
  `self.protocol`), the ground truth and whatever the scorer needs in `meta`.
- `score(results)` turns `Result`s (a sample's id, answer and meta with the model's prediction) into a
  `Score`. Results carry their own ground truth, so stored predictions re-score without data or model.
- Missing data raises `MissingData` naming the expected location; a malformed file raises `DataError` naming
  the file and the column / record.
- `protocol` is `vlmevalkit` or `lmms-eval`: the harness whose prompt and scoring rules are followed, where
  the two differ (a benchmark following one rule set for both says so in `Score.protocol`).
"""
from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

from models.registry import Registry

Modality = Literal["image", "video", "speech", "demo"]  # the groups --benchmarks accepts
PROTOCOLS = ("vlmevalkit", "lmms-eval")


class MissingData(FileNotFoundError):
    """A benchmark's files are not under --data-root; the message names where they are expected."""


class DataError(ValueError):
    """A benchmark file is malformed; the message names the file and the column, record or key at fault."""


def read_json(path: Path, expect: type | None = None) -> Any:
    """A benchmark's JSON file; `expect` (dict or list) is the container its release format has."""
    if not path.is_file():
        raise MissingData(f"{path}: not found")
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if expect is not None and not isinstance(records, expect):
        shape = "a mapping of id -> record" if expect is dict else "a list of records"
        raise DataError(f"{path}: expected {shape}, got {type(records).__name__}")
    return records


def require(record: Any, keys: tuple[str, ...], where: str) -> None:
    """Every key of `keys` in `record`, else a DataError naming the record (`where`) and the missing keys."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}")


@dataclass
class Sample:
    """One question of a benchmark, in the processor's terms (data/processor.py) plus its ground truth."""

    id: str
    conversation: list[dict[str, str]]  # [{"role": "user", "content": "<image>\nQuestion ..."}], markers in order
    answer: Any  # ground truth: an option letter, a string, a list of accepted strings, a number, ...
    images: list[Any] = field(default_factory=list)  # path, bytes, or PIL image
    videos: list[Any] = field(default_factory=list)  # path, frame array or data.media.VideoClip
    audios: list[Any] = field(default_factory=list)  # path, bytes or float32 16 kHz waveform
    meta: dict[str, Any] = field(default_factory=dict)  # category, options, question type, ... (JSON-serialisable)

    def processor_input(self) -> dict[str, Any]:
        return {"id": self.id, "conversation": self.conversation, "images": self.images, "videos": self.videos,
                "audios": self.audios}


@dataclass
class Result:
    """A sample's prediction with its ground truth: what scorers read and the cache stores (one JSONL line)."""

    id: str
    prediction: str | None  # None when the sample failed (see `error`)
    answer: Any
    meta: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why no prediction exists: a corrupt image, a prompt too long, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> "Result":
        return cls(id=str(row["id"]), prediction=row.get("prediction"), answer=row.get("answer"),
                   meta=row.get("meta") or {}, error=row.get("error"))


@dataclass
class Score:
    """A benchmark's score. `value` is the headline number of the paper's tables; None means not scored (e.g.
    MM-Vet without a judge), which the report prints as "not scored", never as a number."""

    benchmark: str
    protocol: str  # the rule set followed, named precisely (e.g. "VLMEvalKit MMStar: option extraction ...")
    metric: str  # what `value` is, e.g. "accuracy (%)", "score (/1000)"
    value: float | None
    full_mark: float = 100.0  # the best possible value (OCRBench: 1000); the report's average uses value/full_mark
    categories: dict[str, float] = field(default_factory=dict)  # per-category / per-split values, same unit
    count: int = 0  # samples scored
    unparsed: int = 0  # predictions the official rule could not map to an answer (scored as its rule says)
    errors: int = 0  # samples with no prediction (corrupt media, ...): scored wrong, counted here
    note: str = ""  # e.g. "not scored: no judge configured"
    extra: dict[str, Any] = field(default_factory=dict)  # anything else worth reporting (e.g. sub-metrics)
    higher_is_better: bool = True  # False for error rates (WER, CER): the report lists them but never averages them

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if out["value"] is not None and not math.isfinite(out["value"]):
            out["value"] = None
        return out


class Benchmark(ABC):
    """Base class of the registered adapters; subclasses set the class attributes and implement `samples`
    and `score`."""

    name: ClassVar[str] = ""  # set by the registry decorator's key (BENCHMARKS.register)
    modality: ClassVar[Modality] = "image"
    max_new_tokens: ClassVar[int] = 32
    locations: ClassVar[tuple[str, ...]] = ()  # candidate paths under --data-root, first match wins
    release: ClassVar[str] = ""  # where users get the files (printed when they are missing)

    def __init__(self, data_root: str | Path, protocol: str = "vlmevalkit") -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
        self.data_root = Path(data_root)
        self.protocol = protocol

    def locate(self) -> Path:
        """The benchmark's file or directory under `data_root`, or `MissingData` naming where it is expected."""
        for relative in self.locations:
            if (self.data_root / relative).exists():
                return self.data_root / relative
        expected = " or ".join(str(self.data_root / p) for p in self.locations)
        raise MissingData(f"{self.name}: data not found; expected {expected}" + (f" ({self.release})" if self.release else ""))

    @abstractmethod
    def samples(self) -> Iterator[Sample]:
        """The benchmark's samples, read from its release under `data_root`."""

    @abstractmethod
    def score(self, results: list[Result]) -> Score:
        """The official score of `results` under `self.protocol`."""

    def results_from_table(self, table: Any, source: str) -> list[Result]:
        """Results from a VLMEvalKit prediction table (a pandas DataFrame of its `.xlsx` / `.tsv` with a
        `prediction` column), for `tools/eval.py --rescore`; benchmarks whose rows carry the ground truth
        override this."""
        raise DataError(f"{source}: {self.name} does not read VLMEvalKit prediction tables; rescore a predictions "
                        f"JSONL written by tools/eval.py instead")


class _BenchmarkRegistry(Registry):
    """`BENCHMARKS.register(name)` also writes the key into the class's `name`."""

    def register(self, name: str):
        add = super().register(name)

        def decorator(cls):
            cls.name = name
            return add(cls)
        return decorator

    def group(self, modality: str) -> list[str]:
        return [n for n in self.names() if self.get(n).modality == modality]

    def select(self, spec: str) -> list[str]:
        """`"all"`, a modality group (`"image"`, `"video"`, `"speech"`), or comma-separated names / groups."""
        names: list[str] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            if part == "all":
                chosen = self.names()
            elif part in get_args(Modality):
                chosen = self.group(part)
            else:
                self.get(part)  # unknown names fail with the registry's did-you-mean message
                chosen = [part]
            names += [n for n in chosen if n not in names]
        if not names:
            raise KeyError(f"--benchmarks {spec!r} selects no benchmark; known: {', '.join(self.names())}")
        return names


BENCHMARKS: _BenchmarkRegistry = _BenchmarkRegistry("benchmark")
