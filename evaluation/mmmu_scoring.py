"""MMMU's official answer parser and checker (pure functions), following MMMU-Benchmark/MMMU
`eval/eval_utils.py`: `parse_multi_choice_response`, `parse_open_response`, `eval_multi_choice`, `eval_open`.
lmms-eval's `lmms_eval/tasks/mmmu/utils.py` uses the same rules.

Multiple choice: strip `,.!?;:'` from the ends, pad with spaces; candidates are "(X)" letters, else " X "
letters, else (for responses longer than 5 words) options whose text occurs in the response; several
candidates -> the one occurring last; none -> a random option (the official `random.seed(42)` stream, drawn in
sample order: `MMMUChoiceRng`), counted as unparsed.
Open: the key sub-responses (after "could be", "so", "is", "thus", "therefore", "final", "answer", "result",
and "=" in the last sentence), plus every number in them; numbers normalised to floats rounded to 2 places,
strings lower-cased (a one-character string padded with a space on either side). Correct when a normalised
number equals a normalised answer or a normalised answer string is a substring of a normalised prediction.
"""
from __future__ import annotations

import random
import re

_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCIENTIFIC = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")


class MMMUChoiceRng:
    """The official parser's fallback: `random.choice` on a generator seeded 42, drawn in sample order."""

    def __init__(self, seed: int = 42) -> None:
        self.random = random.Random(seed)

    def choice(self, letters: list[str]) -> str:
        return self.random.choice(letters)


def parse_multi_choice(response: str, options: dict[str, str], rng: MMMUChoiceRng) -> tuple[str, bool]:
    """(predicted letter, parsed?) -- parsed is False when the letter is the random fallback."""
    for char in (",", ".", "!", "?", ";", ":", "'"):
        response = response.strip(char)
    response = f" {response} "
    letters = list(options)
    candidates = [c for c in letters if f"({c})" in response]
    bracketed, by_text = bool(candidates), False
    if not candidates:
        candidates = [c for c in letters if f" {c} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [c for c, text in options.items() if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return rng.choice(letters), False
    if len(candidates) == 1:
        return candidates[0], True
    if by_text:
        positions = [response.lower().rfind(options[c].lower()) for c in candidates]
    elif bracketed:
        positions = [response.rfind(f"({c})") for c in candidates]
    else:
        positions = [response.rfind(f" {c} ") for c in candidates]
    return candidates[positions.index(max(positions))], True


def is_number(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize(text: str) -> list[str | float]:
    text = text.strip()
    if is_number(text):
        return [round(float(text.replace(",", "")), 2)]
    text = text.lower()
    return [" " + text, text + " "] if len(text) == 1 else [text]


def extract_numbers(text: str) -> list[str]:
    return _NUM_COMMAS.findall(text) + _NUM_SCIENTIFIC.findall(text) + _NUM_SIMPLE.findall(text)


def key_subresponses(response: str) -> list[str]:
    response = response.strip().strip(".").lower()
    sentences = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for index, sentence in enumerate(sentences):
        indicators = _KEY_INDICATORS + (("=",) if index == len(sentences) - 1 else ())
        shortest = None
        for indicator in indicators:
            if indicator in sentence:
                tail = sentence.split(indicator)[-1].strip()
                if shortest is None or len(tail) < len(shortest):
                    shortest = tail
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list[str | float]:
    keys = key_subresponses(response)
    candidates = keys + [n for key in keys for n in extract_numbers(key)]
    return list({value for c in candidates for value in normalize(c)})


def open_correct(answers: str | list[str], predictions: list[str | float]) -> bool:
    gold = [value for a in ([answers] if isinstance(answers, str) else answers) for value in normalize(str(a))]
    for prediction in predictions:
        if isinstance(prediction, str):
            if any(isinstance(g, str) and g in prediction for g in gold):
                return True
        elif prediction in gold:
            return True
    return False
