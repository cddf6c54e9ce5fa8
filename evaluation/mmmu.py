"""MMMU (validation, 900 questions over 30 subjects) from the release parquet files.

Layout (huggingface.co/datasets/MMMU/MMMU): `MMMU/<Subject>/validation-00000-of-00001.parquet` with `id`,
`question`, `options` (a Python list literal; "[]" for open questions), `answer` (a letter; for open questions
a string or a list literal of accepted strings), `question_type` ("multiple-choice" | "open"), `image_1` ..
`image_7` (`{"bytes": ...}`), `subfield`. `<image n>` markers in the question and options are the places of
the images: each becomes the processor's `<image>` marker, its image passed in that order.

Prompt: `vlmevalkit` protocol: the official MMMU format (`eval/configs/llava1.5.yaml`: "{question}\\n\\n(A) x\\n
(B) y\\n\\nAnswer with the option's letter from the given choices directly." / "{question}\\n\\nAnswer the
question using a single word or phrase."); `lmms-eval`: `lmms_eval/tasks/mmmu/utils.py` ("{question}\\nA. x\\n
B. y\\n\\nAnswer with the option's letter ..."). Both are scored with the official parser (mmmu_scoring.py);
VLMEvalKit's own MMMU scoring (MCQ matching after turning open questions into two options) is not used.
"""
from __future__ import annotations

import ast
import re
import string
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from evaluation.benchmark import BENCHMARKS, Benchmark, DataError, MissingData, Result, Sample, Score
from evaluation.choice_accuracy import mean
from evaluation.mmmu_scoring import MMMUChoiceRng, open_correct, parse_multi_choice, parse_open
from evaluation.tables import cell_text, read_table

IMAGE_MARKER = re.compile(r"<image (\d+)>")
MULTI_CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
OPEN_PROMPT = "Answer the question using a single word or phrase."
COLUMNS = ("id", "question", "options", "answer", "question_type", "image_1")


@BENCHMARKS.register("mmmu")
class MMMU(Benchmark):
    modality = "image"
    max_new_tokens = 32
    locations = ("MMMU",)
    release = "the per-subject validation parquet files of huggingface.co/datasets/MMMU/MMMU"
    split = "validation"

    def files(self) -> list[Path]:
        root = self.locate()
        files = sorted(root.glob(f"*/{self.split}-*.parquet"))
        if not files:
            raise MissingData(f"{self.name}: no {root}/<Subject>/{self.split}-*.parquet files ({self.release})")
        return files

    def samples(self) -> Iterator[Sample]:
        for path in self.files():
            for row in read_table(path, COLUMNS).to_dict("records"):
                yield self._sample(row, path)

    def _sample(self, row: dict, path: Path) -> Sample:
        where = f"{path} (id {row['id']})"
        try:
            options = ast.literal_eval(cell_text(row["options"]) or "[]")
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: `options` is not a list literal: {row['options']!r:.80}") from None
        letters = dict(zip(string.ascii_uppercase, (str(o) for o in options)))
        kind = cell_text(row["question_type"])
        images: list[bytes] = []

        def place(text: str) -> str:
            def one(match: re.Match) -> str:
                image = row.get(f"image_{match.group(1)}")
                image = image.get("bytes") if isinstance(image, dict) else image
                if not image:
                    raise DataError(f"{where}: the text names <image {match.group(1)}> but "
                                    f"`image_{match.group(1)}` is empty")
                images.append(bytes(image))
                return "<image>"
            return IMAGE_MARKER.sub(one, text)

        question = place(cell_text(row["question"]))
        placed = {k: place(v) for k, v in letters.items()}
        if not images:  # no marker: the first image goes before the question
            question = "<image>\n" + question
            images.append(bytes(row["image_1"]["bytes"] if isinstance(row["image_1"], dict) else row["image_1"]))
        if kind == "multiple-choice":
            if self.protocol == "lmms-eval":
                body = "\n".join(f"{k}. {v}" for k, v in placed.items())
                text = f"{question}\n{body}\n\n{MULTI_CHOICE_PROMPT}"
            else:
                body = "".join(f"({k}) {v}\n" for k, v in placed.items())
                text = f"{question}\n\n{body}\n{MULTI_CHOICE_PROMPT}"
        else:
            text = f"{question}\n\n{OPEN_PROMPT}"
        answer = cell_text(row["answer"])
        if kind != "multiple-choice" and answer.startswith("["):
            try:
                answer = [str(a) for a in ast.literal_eval(answer)]  # several accepted answers
            except (ValueError, SyntaxError):
                pass
        subject = path.parent.name
        return Sample(id=cell_text(row["id"]), conversation=[{"role": "user", "content": text}], answer=answer,
                      images=images, meta={"question_type": kind, "options": letters, "subject": subject})

    def score(self, results: list[Result]) -> Score:
        rng = MMMUChoiceRng()
        hits, unparsed = [], 0
        by_subject: dict[str, list[bool]] = defaultdict(list)
        for result in results:
            prediction = result.prediction or ""
            if result.meta["question_type"] == "multiple-choice":
                letter, parsed = parse_multi_choice(prediction, result.meta["options"], rng)
                unparsed += not parsed and result.prediction is not None
                hit = result.prediction is not None and letter == result.answer
            else:
                hit = result.prediction is not None and open_correct(result.answer, parse_open(prediction))
            hits.append(hit)
            by_subject[result.meta["subject"]].append(hit)
        return Score(self.name, "official MMMU parser (eval/eval_utils.py), random fallback seeded 42",
                     "accuracy (%)", mean(hits) * 100, categories={k: mean(v) * 100 for k, v in sorted(by_subject.items())},
                     count=len(results), unparsed=unparsed)
