"""MathVista's answer extraction and normalisation (pure functions), after lupantech/MathVista
`evaluation/extract_answer.py` `extract_answer` and `evaluation/calculate_score.py`
`normalize_extracted_answer` / `safe_equal`.

Extraction, in the official order: an empty response -> ""; a multiple-choice response that is one of the
choices; a response that parses as the integer / float asked for; `The answer is "x".` (the official
`quick_extract`). The official next step is a GPT-4 extractor; without a judge we apply rules instead (as
VLMEvalKit's `post_check` does before its judge): for multiple choice the option letter by VLMEvalKit's
`can_infer`, for numbers the last number in the response, for lists the last `[...]`. What none of these finds
is "" (unparsed, counted).
Normalisation: multiple choice: a "(X)" letter or a bare letter -> that choice's text, anything else -> the
choice closest in Levenshtein distance (so "" picks the shortest choice, as officially); integer:
`str(int(float(x)))`; float: `str(round(float(x), precision))`; list: `str(x)`. Correct when equal to the
answer string.
"""
from __future__ import annotations

import re
import string

from rapidfuzz.distance import Levenshtein

from evaluation.choice_scoring import vlmevalkit_choice

_QUICK = re.compile(r'The answer is "(.*)"\.')
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+")
_LIST = re.compile(r"\[[^\[\]]*\]")


def official_extraction(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str | None:
    """The official rule steps; None when they find nothing (the official code would ask GPT-4 next)."""
    if response == "":
        return ""
    if question_type == "multi_choice" and choices and response in choices:
        return response
    if answer_type == "integer":
        try:
            return str(int(response))
        except ValueError:
            pass
    if answer_type == "float":
        try:
            return str(float(response))
        except ValueError:
            pass
    match = _QUICK.search(response)
    return match.group(1) if match else None


def rule_extraction(response: str, question_type: str, answer_type: str, choices: list[str] | None) -> str:
    """Our judge-free stand-in for the GPT-4 step (see the module docstring); "" when nothing is found."""
    if question_type == "multi_choice" and choices:
        letter = vlmevalkit_choice(response, dict(zip(string.ascii_uppercase, choices)))
        return letter if letter and letter != "Z" else ""
    if answer_type in ("integer", "float"):
        numbers = _NUMBER.findall(response)
        return numbers[-1].replace(",", "") if numbers else ""
    if answer_type == "list":
        lists = _LIST.findall(response)
        return lists[-1] if lists else ""
    return ""


def normalize_extracted(extraction: str | None, choices: list[str] | None, question_type: str, answer_type: str,
                        precision: int | float | None) -> str | None:
    if question_type == "multi_choice":
        extraction = "" if extraction is None else str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        if letter:
            extraction = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices or []))]
        if extraction in letters:
            return choices[letters.index(extraction)]
        distances = [Levenshtein.distance(extraction, choice) for choice in choices]
        return choices[distances.index(min(distances))]
    try:
        if answer_type == "integer":
            return str(int(float(extraction)))
        if answer_type == "float":
            # the release parquet stores precision as a float (2.0); round() needs an int
            return str(round(float(extraction), int(precision or 0)))
        if answer_type == "list":
            return str(extraction)
    except (TypeError, ValueError):
        return None
    return extraction


def mathvista_correct(normalized: str | None, answer: str) -> bool:
    return normalized is not None and normalized == answer
