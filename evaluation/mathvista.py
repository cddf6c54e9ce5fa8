"""MathVista (testmini, 1000 problems) from its release: `MathVista/testmini.json` + `MathVista/images/`.

`testmini.json` (lupantech/MathVista `data/testmini.json`) maps pid -> `{question, image, choices, unit,
precision, answer, question_type ("multi_choice" | "free_form"), answer_type ("text" | "integer" | "float" |
"list"), metadata {source, category, task, context, grade, skills, ...}}`, and `query` in the Hugging Face
copy; `image` is relative to the JSON's folder. The prompt is `query` when present, else the official
zero-shot query (`evaluation/build_query.py`: question with unit, "Choices:" with "(A) x", the hint).
Scoring: evaluation/mathvista_scoring.py; accuracy (%) overall and per `task`.
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

from evaluation.benchmark import BENCHMARKS, Benchmark, Result, Sample, Score, read_json, require
from evaluation.choice_accuracy import mean
from evaluation.mathvista_scoring import mathvista_correct, normalize_extracted, official_extraction, rule_extraction

FIELDS = ("question", "image", "answer", "question_type", "answer_type")


def official_hint(question_type: str, answer_type: str, precision) -> str:
    """`build_query.py`'s hint for shot_type "solution" (the zero-shot query of the release)."""
    if question_type == "multi_choice":
        return "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    if answer_type == "integer":
        return ("Hint: Please answer the question requiring an integer answer and provide the final value, e.g., "
                "1, 2, 3, at the end.")
    if answer_type == "float" and int(precision or 0) == 1:
        return ("Hint: Please answer the question requiring a floating-point number with one decimal place and "
                "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    if answer_type == "float":
        return ("Hint: Please answer the question requiring a floating-point number with two decimal places and "
                "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    return ("Hint: Please answer the question requiring a Python list as an answer and provide the final list, "
            "e.g., [1, 2, 3], [1.2, 1.3, 1.4], at the end.")


def official_query(record: dict) -> str:
    question = f"Question: {record['question']}" + (f" (Unit: {record['unit']})" if record.get("unit") else "")
    parts = [official_hint(record["question_type"], record["answer_type"], record.get("precision")), question]
    if record.get("choices"):
        parts.append("Choices:\n" + "\n".join(f"({chr(ord('A') + i)}) {c}" for i, c in enumerate(record["choices"])))
    return "\n".join(parts)


@BENCHMARKS.register("mathvista")
class MathVista(Benchmark):
    modality = "image"
    max_new_tokens = 512  # answers end with the value after a short solution
    locations = ("MathVista/testmini.json", "MathVista/data/testmini.json", "testmini.json")
    release = "data/testmini.json + images/ of github.com/lupantech/MathVista (or its Hugging Face copy)"

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        records = read_json(path, dict)
        for pid, record in records.items():
            require(record, FIELDS, f"{path} pid {pid}")
            query = record.get("query") or official_query(record)
            meta = {k: record.get(k) for k in ("choices", "question_type", "answer_type", "precision")}
            meta.update(task=(record.get("metadata") or {}).get("task"))
            yield Sample(id=str(pid), conversation=[{"role": "user", "content": "<image>\n" + query}],
                         answer=str(record["answer"]), images=[str(path.parent / record["image"])], meta=meta)

    def score(self, results: list[Result]) -> Score:
        hits, unparsed = [], 0
        by_task: dict[str, list[bool]] = defaultdict(list)
        for r in results:
            m = r.meta
            response = (r.prediction or "").strip()
            extraction = official_extraction(response, m["question_type"], m["answer_type"], m["choices"])
            if extraction is None:
                extraction = rule_extraction(response, m["question_type"], m["answer_type"], m["choices"])
            unparsed += r.prediction is not None and extraction == ""
            normalized = normalize_extracted(extraction, m["choices"], m["question_type"], m["answer_type"],
                                             m["precision"])
            hit = r.prediction is not None and mathvista_correct(normalized, str(r.answer))
            hits.append(hit)
            by_task[str(m.get("task"))].append(hit)
        return Score(self.name, "MathVista official normalisation (calculate_score.py); rule-based extraction "
                                "(official quick rules, then option letter / last number / last list; no GPT-4 "
                                "extractor)", "accuracy (%)", mean(hits) * 100,
                     categories={k: mean(v) * 100 for k, v in sorted(by_task.items())}, count=len(results),
                     unparsed=unparsed)
