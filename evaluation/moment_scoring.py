"""DiDeMo moment retrieval scoring: R@1 at IoU 0.5 / 0.7 and mIoU, with the official span rules.

Protocol (`PROTOCOL`), following LisaAnne/LocalizingMoments `utils/eval.py` (`iou`, `rank`,
`eval_predictions`) and its `data/README.md`:
- a video is cut into 5-second segments (the last one may be shorter; videos were truncated to 30 s, so 6
  segments, 5 for videos under 25 s); a moment is a pair of *inclusive* segment indices `(start, end)`:
  `(1, 3)` is seconds 5 to 20;
- IoU of two moments counts segments: `(min(e1, e2) + 1 - max(s1, s2)) / (max(e1, e2) + 1 - min(s1, s2))`;
- every query has several annotators' moments (usually 4); the ground truth is their agreement, as the
  official code takes it: a query's IoU is the mean of the 3 best IoUs of the prediction against the
  annotators' moments, and its rank the mean of the 3 best ranks;
- mIoU is the mean of the per-query IoUs; R@1 at IoU t is the share of queries whose IoU is at least t.
  `rank@1` is the official exact-moment recall for a single predicted moment (the official code ranks all
  21 candidate moments; a generative model names one, so every other moment ranks after it).
A prediction in seconds is turned into segments as the annotators marked them: the segment that holds
the start, the segment that holds the end (an end on a boundary closes the segment before it). An answer
with no span in it scores IoU 0 and is counted as unparsed.
"""
from __future__ import annotations

import math
import re
from typing import Literal, Sequence

import numpy as np

PROTOCOL = "DiDeMo official (LocalizingMoments eval.py): 5-s segments, inclusive, top-3 annotator agreement"
SEGMENT_SECONDS = 5.0
IOU_THRESHOLDS = (0.5, 0.7)
AGREEMENT = 3  # the official code averages the 3 best of the annotators' moments
Moment = tuple[int, int]
Unit = Literal["seconds", "segments"]

_NUMBER = r"(\d+(?:\.\d+)?)"
_SPAN = re.compile(_NUMBER + r"\s*(s|sec|secs|seconds?)?\s*(?:-|–|—|to|and|,)\s*" + _NUMBER
                   + r"\s*(s|sec|secs|seconds?|segments?)?", re.IGNORECASE)


def iou(prediction: Moment, truth: Moment) -> float:
    """IoU of two moments in inclusive segment indices (the official `iou`)."""
    intersection = max(0, min(prediction[1], truth[1]) + 1 - max(prediction[0], truth[0]))
    union = max(prediction[1], truth[1]) + 1 - min(prediction[0], truth[0])
    return intersection / union


def seconds_to_moment(start: float, end: float, num_segments: int = 6) -> Moment:
    """Seconds -> the inclusive segment indices an annotator would have marked."""
    start, end = sorted((max(0.0, start), max(0.0, end)))
    first = min(int(start // SEGMENT_SECONDS), num_segments - 1)
    last = min(max(math.ceil(end / SEGMENT_SECONDS) - 1, first), num_segments - 1)
    return first, last


def parse_moment(answer: str, unit: Unit = "seconds", num_segments: int = 6) -> Moment | None:
    """The first `a - b` / `a to b` / `(a, b)` span in a model answer, as a moment; None when there is none.

    `unit` is what the prompt asked for; a unit written in the answer ("12s", "segments 1 to 3") wins."""
    if unit not in ("seconds", "segments"):
        raise ValueError(f"unit must be 'seconds' or 'segments', got {unit!r}")
    match = _SPAN.search(answer)
    if match is None:
        return None
    start, start_unit, end, end_unit = match.groups()
    written = (end_unit or start_unit or "").lower()
    in_segments = written.startswith("segment") or (not written and (
        unit == "segments" or re.search(r"\bsegments?\b", answer, re.IGNORECASE) is not None))
    if in_segments:
        first, last = sorted((int(float(start)), int(float(end))))
        return min(first, num_segments - 1), min(last, num_segments - 1)
    return seconds_to_moment(float(start), float(end), num_segments)


def query_scores(prediction: Moment | None, truths: Sequence[Moment]) -> tuple[float, float]:
    """(IoU, rank) of one query: the means over the `AGREEMENT` best annotators (official rules)."""
    if not truths:
        raise ValueError("a query needs at least one annotated moment")
    if prediction is None:
        return 0.0, math.inf
    ious = sorted(iou(prediction, tuple(t)) for t in truths)
    ranks = sorted(1 if tuple(t) == tuple(prediction) else math.inf for t in truths)
    return float(np.mean(ious[-AGREEMENT:])), float(np.mean(ranks[:AGREEMENT]))


def score_moments(predictions: Sequence[Moment | None], truths: Sequence[Sequence[Moment]]) -> dict[str, float]:
    """R@1 at IoU 0.5 and 0.7, mIoU and official rank@1 over all queries (fractions in [0, 1])."""
    if len(predictions) != len(truths):
        raise ValueError(f"{len(predictions)} predictions but {len(truths)} ground-truth queries")
    if not truths:
        raise ValueError("no queries to score")
    scores = [query_scores(p, t) for p, t in zip(predictions, truths)]
    ious = np.array([s[0] for s in scores])
    out = {f"R@1,IoU={t}": float(np.mean(ious >= t - 1e-9)) for t in IOU_THRESHOLDS}
    out["mIoU"] = float(ious.mean())
    out["rank@1"] = float(np.mean([s[1] <= 1 for s in scores]))
    out["unparsed"] = float(sum(p is None for p in predictions))
    return out
