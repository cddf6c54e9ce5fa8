"""MMStar (1500 vision-indispensable multiple-choice questions): the release parquet or VLMEvalKit's TSV.

- Release (`Lin-Chen/MMStar` `mmstar.parquet`): `index`, `question` with the options written into it
  ("...\\nOptions: A: x, B: y, C: z, D: w"), `image` (encoded bytes), `answer`, `category`, `l2_category`.
- VLMEvalKit `MMStar.tsv`: options in columns `A`..`D`, base64 `image`, `category`, `l2-category`.

Scoring per protocol:
- `vlmevalkit`: `can_infer` exact matching; Overall = accuracy over samples, per `category` accuracy
  (`vlmeval/dataset/utils/multiple_choice.py` `report_acc`);
- `lmms-eval`: `lmms_eval/tasks/mmstar/utils.py`: `extract_mcq_answer` letters; each category's value is the mean
  of its l2-categories' accuracies and `average` the mean over all l2-categories (`mmstar_aggregate_results`).
"""
from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator

from evaluation.benchmark import BENCHMARKS, Benchmark, DataError, Result, Sample, Score
from evaluation.choice_accuracy import accuracy_score, extracted_letters, mean, vlmevalkit_letter
from evaluation.choice_scoring import lmms_eval_mcq_letter
from evaluation.tables import cell_text, read_table
from evaluation.vlmevalkit_tsv import mcq_results_from_table, read_vlmevalkit_tsv, vlmevalkit_mcq_prompt

LMMS_EVAL_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"
_INLINE_OPTIONS = re.compile(r"([A-D]): (.*?)(?=, [A-D]: |$)", re.S)


def split_inline_options(question: str) -> tuple[str, dict[str, str]]:
    """The release's "stem\\nOptions: A: x, B: y" -> ("stem", {"A": "x", "B": "y"})."""
    stem, marker, tail = question.rpartition("Options:")
    if not marker:
        return question.strip(), {}
    return stem.strip(), {letter: text.strip() for letter, text in _INLINE_OPTIONS.findall(tail.strip())}


@BENCHMARKS.register("mmstar")
class MMStar(Benchmark):
    modality = "image"
    max_new_tokens = 32
    locations = ("MMStar.tsv", "MMStar/mmstar.parquet", "mmstar.parquet")
    release = "VLMEvalKit's MMStar.tsv or the mmstar.parquet of huggingface.co/datasets/Lin-Chen/MMStar"

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        rows = self._parquet_rows(path) if path.suffix == ".parquet" else self._tsv_rows(path)
        for index, question, full_question, options, image, row in rows:
            if self.protocol == "lmms-eval":  # the release question (options inline) + post prompt
                text = full_question.strip() + LMMS_EVAL_POST_PROMPT
            else:
                text = vlmevalkit_mcq_prompt(question, options)
            yield Sample(id=index, conversation=[{"role": "user", "content": "<image>\n" + text}],
                         answer=cell_text(row["answer"]).strip(), images=[image],
                         meta={"options": options, "category": cell_text(row.get("category")) or None,
                               "l2_category": cell_text(row.get("l2_category", row.get("l2-category"))) or None})

    def _tsv_rows(self, path):
        for row in read_vlmevalkit_tsv(path, ("index", "question", "answer", "image", "A", "B", "category")):
            options, question = row["options"], cell_text(row["question"])
            inline = question + "\nOptions: " + ", ".join(f"{k}: {v}" for k, v in options.items())
            yield row["index"], question, inline, options, row["images"][0], row

    def _parquet_rows(self, path):
        table = read_table(path, ("index", "question", "image", "answer", "category", "l2_category"))
        for number, row in enumerate(table.to_dict("records")):
            image = row["image"]
            image = image.get("bytes") if isinstance(image, dict) else image
            if not isinstance(image, (bytes, bytearray)) or not image:
                raise DataError(f"{path} row {number} (index {row['index']}): `image` holds no encoded image bytes")
            question, options = split_inline_options(cell_text(row["question"]))
            if not options:
                raise DataError(f"{path} row {number} (index {row['index']}): no 'Options: A: ...' in `question`")
            yield cell_text(row["index"]), question, cell_text(row["question"]), options, bytes(image), row

    def score(self, results: list[Result]) -> Score:
        if self.protocol != "lmms-eval":
            hits, unparsed = extracted_letters(results, vlmevalkit_letter)
            return accuracy_score(self.name, "VLMEvalKit MMStar: can_infer option matching (exact_matching, no "
                                             "judge), accuracy over samples", results, hits, unparsed)
        hits, unparsed = extracted_letters(results, lambda r: lmms_eval_mcq_letter(r.prediction) or None)
        by_l2: dict[tuple[str, str], list[bool]] = defaultdict(list)
        for result, hit in zip(results, hits):
            by_l2[(str(result.meta.get("category")), str(result.meta.get("l2_category")))].append(hit)
        l2 = {key: mean(v) * 100 for key, v in by_l2.items()}
        categories: dict[str, list[float]] = defaultdict(list)
        for (category, _), value in l2.items():
            categories[category].append(value)
        return Score(self.name, "lmms-eval mmstar: extract_mcq_answer; mean of l2-category accuracies",
                     "accuracy (%)", mean(list(l2.values())),
                     categories={k: mean(v) for k, v in sorted(categories.items())}, count=len(results),
                     unparsed=unparsed, extra={"l2_category": {k[1]: v for k, v in sorted(l2.items())}})

    def results_from_table(self, table, source: str) -> list[Result]:
        return mcq_results_from_table(table, source, {"category": ("category",),
                                                      "l2_category": ("l2-category", "l2_category")})
