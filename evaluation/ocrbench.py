"""OCRBench (1000 questions, 29 datasets) from its release: `OCRBench/OCRBench.json` + `OCRBench_Images/`.

`OCRBench.json` (Yuliang-Liu/MultimodalOCR) is a list of records `{dataset_name, id, image_path, question,
answers (a string or a list), type}`, `image_path` relative to the image folder. The prompt is the question
alone (the official scripts, VLMEvalKit and lmms-eval add nothing); scoring in evaluation/ocrbench_scoring.py.
"""
from __future__ import annotations

from collections.abc import Iterator

from evaluation.benchmark import BENCHMARKS, Benchmark, Result, Sample, Score, read_json, require
from evaluation.ocrbench_scoring import REPORTED_CATEGORIES, ocrbench_match, ocrbench_points

FIELDS = ("dataset_name", "id", "image_path", "question", "answers", "type")
IMAGE_DIRS = ("OCRBench_Images", "images")  # else image_path is relative to the JSON's folder


@BENCHMARKS.register("ocrbench")
class OCRBench(Benchmark):
    modality = "image"
    max_new_tokens = 128  # lmms-eval's generation_kwargs (KIE and HME answers are long)
    locations = ("OCRBench/OCRBench.json", "OCRBench.json")
    release = "OCRBench.json and OCRBench_Images/ from github.com/Yuliang-Liu/MultimodalOCR (OCRBench)"

    def samples(self) -> Iterator[Sample]:
        path = self.locate()
        records = read_json(path, list)
        images = next((path.parent / d for d in IMAGE_DIRS if (path.parent / d).is_dir()), path.parent)
        for number, record in enumerate(records):
            require(record, FIELDS, f"{path} record {number}")
            answers = record["answers"]
            # ids repeat across source datasets: the position is the sample id (VLMEvalKit's TSV `index` too)
            yield Sample(id=str(number), answer=answers if isinstance(answers, list) else [answers],
                         conversation=[{"role": "user", "content": "<image>\n" + record["question"]}],
                         images=[str(images / record["image_path"])],
                         meta={"dataset": record["dataset_name"], "category": record["type"],
                               "source_id": record["id"]})

    def score(self, results: list[Result]) -> Score:
        fold = self.protocol == "lmms-eval"
        matched = [r.prediction is not None and ocrbench_match(r.prediction, r.answer, r.meta["dataset"], fold)
                   for r in results]
        points = ocrbench_points([r.meta["category"] for r in results], matched)
        rule = ("lmms-eval ocrbench: substring match after full-width folding (HME100k: case-sensitive, spaces "
                "removed)" if fold else "official OCRBench / VLMEvalKit: substring match, no full-width folding "
                "(HME100k: case-sensitive, spaces removed)")
        return Score(self.name, rule, "score (/1000)", float(points["Final Score"]), full_mark=1000.0,
                     categories={c: float(points[c]) for c in REPORTED_CATEGORIES}, count=len(results),
                     note="" if len(results) == 1000 else f"{len(results)} of 1000 questions")
