"""The demo's held-out split (data/demo_data.py `eval.jsonl`) as registered benchmarks, one per task.

`--data-root` is the demo dataset directory (`runs/demo_data`). Each benchmark takes the held-out records of
its kind, asks the record's own question (the assistant turn is the ground truth) and scores:

| benchmark | task | score | chance |
|---|---|---|---|
| `demo-shapes` | how many circles (1-4) | accuracy (%) | 25 % |
| `demo-words` | which word is written (6 words) | accuracy (%) | 16.7 % |
| `demo-beeps` | how many beeps (1-4) | accuracy (%) | 25 % |
| `demo-motion` | which way the square moves (2 ways) | accuracy (%) | 50 % |
| `demo-speech` | transcribe real (and espeak-ng) speech | WER (%) | 100 % (no transcript) |

Accuracy is an exact match of the answer's first line, lower-cased, trimmed of surrounding punctuation.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import ClassVar

from data.demo_data import NUMBERS, WORDS
from evaluation.asr_scoring import PROTOCOL as ASR_PROTOCOL
from evaluation.asr_scoring import score_asr
from evaluation.benchmark import BENCHMARKS, Benchmark, DataError, MissingData, Result, Sample, Score

MEDIA_FIELDS = {"image": "images", "audio": "audios", "video": "videos"}


def normalised_answer(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0].strip().strip(".,!?;:'\"").strip().lower() if lines else ""


class DemoBenchmark(Benchmark):
    modality = "demo"
    max_new_tokens = 8
    locations = ("eval.jsonl",)
    release = "python -m tools.make_demo_data (make demo builds it in runs/demo_data)"
    kinds: ClassVar[tuple[str, ...]] = ()  # the record id prefixes this task takes
    answers: ClassVar[tuple[str, ...]] = ()  # every answer the generator can give (chance = 1 / len)

    @property
    def chance(self) -> float:
        return 100.0 / len(self.answers)

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        found = 0
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err})") from None
            if str(record.get("id", "")).split("-")[0] not in self.kinds:
                continue
            turns = [t for t in record.get("conversation", []) if t.get("role") != "assistant"]
            if not turns or "answer" not in record:
                raise DataError(f"{path}:{number}: record {record.get('id')} needs a user turn and an `answer`")
            media = {key: [str(path.parent / record[field])] for field, key in MEDIA_FIELDS.items() if field in record}
            found += 1
            yield Sample(id=str(record["id"]), conversation=turns, answer=str(record["answer"]),
                         meta={"kind": str(record["id"]).split("-")[0]}, **media)
        if not found:
            raise MissingData(f"{self.name}: {path} holds no held-out {'/'.join(self.kinds)} records")

    def score(self, results: list[Result]) -> Score:
        correct = [normalised_answer(r.prediction) == normalised_answer(str(r.answer)) for r in results]
        return Score(benchmark=self.name, protocol="exact match of the first line (case and punctuation ignored)",
                     metric="accuracy (%)", value=100.0 * sum(correct) / len(results), count=len(results),
                     extra={"chance": self.chance})


@BENCHMARKS.register("demo-shapes")
class DemoShapes(DemoBenchmark):
    kinds = ("shapes",)
    answers = tuple(NUMBERS[1:5])


@BENCHMARKS.register("demo-words")
class DemoWords(DemoBenchmark):
    kinds = ("ocr",)
    answers = tuple(WORDS)


@BENCHMARKS.register("demo-beeps")
class DemoBeeps(DemoBenchmark):
    kinds = ("beeps",)
    answers = tuple(NUMBERS[1:5])


@BENCHMARKS.register("demo-motion")
class DemoMotion(DemoBenchmark):
    kinds = ("motion",)
    answers = ("left to right", "right to left")
    max_new_tokens = 8


@BENCHMARKS.register("demo-speech")
class DemoSpeech(DemoBenchmark):
    kinds = ("speech", "tts")
    max_new_tokens = 32

    @property
    def chance(self) -> float:
        return 100.0  # an empty transcript: every reference word deleted

    def score(self, results: list[Result]) -> Score:
        asr = score_asr([str(r.answer) for r in results], [r.prediction or "" for r in results], "en")
        return Score(benchmark=self.name, protocol=ASR_PROTOCOL, metric="WER (%)", value=100 * asr.wer,
                     count=len(results), higher_is_better=False, extra={"chance": self.chance, "cer": 100 * asr.cer})
