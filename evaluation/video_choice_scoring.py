"""Multiple-choice answer rules of the video benchmarks' official evaluation scripts (pure functions).

- Video-MME (`eval_your_results.py` of the Video-MME release, also lmms-eval's and VLMEvalKit's
  `extract_characters_regex`): answer prefixes ("The best answer is", ...) removed, an answer of more than
  10 words without any of A-D is unparsed, otherwise the first A-D anywhere in the text. The official prefix
  list has two missing commas, so "The best option isThe correct option is" and "Best answer:Best option:"
  are single (never matching) prefixes; kept as they are, since they decide which letter is found first.
- LongVideoBench (`eval.py` of the LongVideoBench release, `extract_characters_regex_lvb`): the same
  prefixes (plus "The correct answer", "The correct option"), then the first A-F, as an option index.
- MVBench (OpenGVLab Ask-Anything `mvbench.ipynb`, `check_ans`): the model answers after the assistant
  prefix "Best option:(" and "(" is put back in front of its answer; the answer's first word (dots removed)
  must be inside the ground truth's "(x)", or the other way round. Our prompt cannot end inside the
  assistant turn, so `mvbench_correct` puts the "(" back only when the answer does not start with one.
"""
from __future__ import annotations

import re

VIDEOMME_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                     "The best option is" "The correct option is", "Best answer:" "Best option:", "Answer:",
                     "Option:")  # noqa: ISC001 -- the official list's missing commas, kept (see the docstring)
LONGVIDEOBENCH_PREFIXES = VIDEOMME_PREFIXES + ("The correct answer", "The correct option")


def _strip_prefixes(text: str, prefixes: tuple[str, ...]) -> str:
    text = text.strip()
    for prefix in prefixes:
        text = text.replace(prefix, "")
    return text


def videomme_letter(prediction: str | None) -> str | None:
    """Video-MME's `extract_characters_regex`: "A".."D", or None when the official rule finds none."""
    text = _strip_prefixes(prediction or "", VIDEOMME_PREFIXES)
    if len(text.split()) > 10 and not re.search("[ABCD]", text):
        return None
    match = re.search(r"[ABCD]", text)
    return match[0] if match else None


def longvideobench_index(prediction: str | None) -> int | None:
    """LongVideoBench's `extract_characters_regex_lvb`: the option index (A=0 .. F=5), or None."""
    text = _strip_prefixes(prediction or "", LONGVIDEOBENCH_PREFIXES)
    if len(text.split()) > 10 and not re.search("[ABCDE]", text):
        return None
    match = re.search(r"[ABCDEF]", text)
    return "ABCDEF".index(match[0]) if match else None


def mvbench_correct(prediction: str | None, truth: str) -> bool:
    """MVBench's `check_ans` on `(` + answer; `truth` is the official "(A) option text" form."""
    answer = (prediction or "").strip()
    if not answer:
        return False
    if not answer.startswith("("):
        answer = "(" + answer  # the official answer prompt "Best option:(" ends with it
    option = answer.lower().split(" ")[0].replace(".", "")
    truth_option = truth.lower().split(" ")[0]
    return option in truth_option or truth_option in option
