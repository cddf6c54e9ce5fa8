"""Accuracy of multiple-choice results, per protocol, with per-category tables (pure functions)."""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

from evaluation.benchmark import Result, Score
from evaluation.choice_scoring import REFUSED, vlmevalkit_choice


def extracted_letters(results: list[Result], extract: Callable[[Result], str | None]) -> tuple[list[bool], int]:
    """Hit per result and the number of predictions the rule could not map to an option (scored wrong)."""
    hits, unparsed = [], 0
    for result in results:
        letter = extract(result) if result.prediction is not None else None
        if result.prediction is not None and (letter is None or letter == ""):
            unparsed += 1
        hits.append(letter is not None and letter != REFUSED and letter == str(result.answer).strip())
    return hits, unparsed


def vlmevalkit_letter(result: Result) -> str | None:
    return vlmevalkit_choice(result.prediction, result.meta.get("options") or {})


def mean(values: list[bool] | list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def accuracy_score(benchmark: str, protocol: str, results: list[Result], hits: list[bool], unparsed: int,
                   group: str | None = "category", average_of: str | None = None) -> Score:
    """Overall accuracy (%) and per-`group` accuracy. `average_of`: the overall value is the mean of the
    per-`average_of` accuracies instead of the mean over samples (lmms-eval MMStar)."""
    categories: dict[str, list[bool]] = defaultdict(list)
    subgroups: dict[str, list[bool]] = defaultdict(list)
    for result, hit in zip(results, hits):
        if group and result.meta.get(group) is not None:
            categories[str(result.meta[group])].append(hit)
        if average_of and result.meta.get(average_of) is not None:
            subgroups[str(result.meta[average_of])].append(hit)
    value = mean(hits) * 100
    extra: dict = {}
    if average_of:
        per_sub = {k: mean(v) * 100 for k, v in sorted(subgroups.items())}
        value = mean(list(per_sub.values())) if per_sub else 0.0
        extra[average_of] = per_sub
    return Score(benchmark, protocol, "accuracy (%)", value, categories={k: mean(v) * 100 for k, v in
                                                                        sorted(categories.items())},
                 count=len(results), unparsed=unparsed, extra=extra)
