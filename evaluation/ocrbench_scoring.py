"""OCRBench's matching rule (pure functions), as the official scripts score it.

Official rule (Yuliang-Liu/MultimodalOCR `OCRBench/scripts/*.py`, identical in VLMEvalKit
`vlmeval/dataset/image_vqa.py` `OCRBench.evaluate` and lmms-eval `lmms_eval/tasks/ocrbench/utils.py`): a
sample scores 1 when any of its ground-truth answers is a substring of the prediction, after
- HME100k (handwritten mathematical expressions): strip, newlines to spaces, then every space removed;
  case-sensitive (LaTeX is);
- every other dataset: lower case, strip, newlines to spaces.
The score is the number of samples matched, out of 1000, with the per-category table (the six text
recognition categories summed into "Text Recognition", as the official report prints it).

The one difference between the public harnesses is full-width folding, and it is large (on one set of
predictions 583 vs 661 points): lmms-eval folds full-width ASCII (U+FF01-U+FF5E) and the ideographic space
(U+3000) to ASCII in prediction and answer before matching (`_fold_fullwidth_ascii`, not HME100k); the
official scripts and VLMEvalKit do not. `fold_fullwidth=True` is the `lmms-eval` protocol, False the
`vlmevalkit` (official) one.
"""
from __future__ import annotations

TEXT_RECOGNITION = ("Regular Text Recognition", "Irregular Text Recognition", "Artistic Text Recognition",
                    "Handwriting Recognition", "Digit String Recognition", "Non-Semantic Text Recognition")
REPORTED_CATEGORIES = ("Text Recognition", "Scene Text-centric VQA", "Doc-oriented VQA", "Key Information Extraction",
                       "Handwritten Mathematical Expression Recognition")
HME_DATASET = "HME100k"


def fold_fullwidth(text: str) -> str:
    """Full-width ASCII -> ASCII and the ideographic space -> a space; nothing else (no NFKC)."""
    return "".join(" " if ch == "\u3000" else chr(ord(ch) - 0xFEE0) if "\uff01" <= ch <= "\uff5e" else ch
                   for ch in text)


def ocrbench_match(prediction: str, answers: str | list[str], dataset: str, fold: bool = False) -> bool:
    """Whether one prediction scores its point."""
    answers = [answers] if isinstance(answers, str) else list(answers)
    if dataset == HME_DATASET:
        squeeze = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
        return any(squeeze(answer) in squeeze(prediction) for answer in answers)
    norm = (lambda s: fold_fullwidth(s).lower().strip().replace("\n", " ")) if fold else \
        (lambda s: s.lower().strip().replace("\n", " "))
    return any(norm(str(answer)) in norm(prediction) for answer in answers)


def ocrbench_points(categories: list[str], matched: list[bool]) -> dict[str, int]:
    """Points per reported category (the official five rows) and their sum under "Final Score"."""
    points = dict.fromkeys(REPORTED_CATEGORIES, 0)
    for category, hit in zip(categories, matched):
        row = "Text Recognition" if category in TEXT_RECOGNITION else category
        if row not in points:
            raise ValueError(f"unknown OCRBench category {category!r}")
        points[row] += int(hit)
    points["Final Score"] = sum(points[c] for c in REPORTED_CATEGORIES)
    return points
