"""Multiple-choice answer extraction and accuracy, as VLMEvalKit and lmms-eval score it (pure functions).

VLMEvalKit (`vlmeval/utils/matching_util.py` `can_infer_option` / `can_infer_text`, used by
`vlmeval/dataset/utils/multiple_choice.py` `extract_answer_from_item` under the `exact_matching` policy):
1. a refusal phrase ("Cannot determine the answer", ...) -> "Z" (no option: wrong);
2. replace `.()[],:;!*#{}` by spaces and split on whitespace; when exactly one option letter is among the
   tokens and it is one of the last five tokens, that letter; when no option letter but a lone "Z", "Z";
3. "the (correct) answer is X" -> X;
4. else, when the answer is at most twice as long as all option texts together and exactly one option text
   (case-insensitive) occurs in it, that option;
5. else unparsed: without a judge model VLMEvalKit scores it "Z", i.e. wrong (counted as unparsed here).

lmms-eval: MMStar's `exact_match` uses `lmms_eval/tasks/_task_utils/mcq_extract.py` `extract_mcq_answer`
(candidate letters in several formats, ranked start > end > phrase > (A) > A. > A: > A) > "A " > any, the last
occurrence winning within a format); AI2D's `MultiChoiceRegexFilter` takes a leading "X." and the
`exact_match` metric compares it, case- and punctuation-insensitively, with the letter.
"""
from __future__ import annotations

import re
import string
from collections.abc import Mapping

VLMEVALKIT_REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                       "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = re.compile(r"[.()\[\],:;!*#{}]")
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
REFUSED = "Z"  # VLMEvalKit's "no option" answer


def vlmevalkit_option_letter(prediction: str, options: Mapping[str, str]) -> str | None:
    """Steps 1-3: the option letter a prediction names, "Z" for a refusal, None when it names none."""
    if "Failed to obtain answer via API" in prediction:
        return None
    if any(refusal in prediction for refusal in VLMEVALKIT_REFUSALS):
        return REFUSED
    tokens = _SEPARATORS.sub(" ", prediction).split()
    named = [letter for letter in options if letter in tokens]
    if len(named) == 1:
        if tokens.index(named[0]) > len(tokens) - 5:  # the letter must be among the last five tokens
            return named[0]
    elif not named and tokens.count(REFUSED) == 1:
        return REFUSED
    match = _ANSWER_IS.search(prediction)
    if match and match.group(1).upper() in options:
        return match.group(1).upper()
    return None


def vlmevalkit_option_text(prediction: str, options: Mapping[str, str]) -> str | None:
    """Step 4: the one option whose text occurs in a not-too-long prediction."""
    answer = prediction.lower()
    if len(answer) > 2 * sum(len(str(text)) for text in options.values()):
        return None
    found = [letter for letter, text in options.items() if str(text).lower() in answer]
    return found[0] if len(found) == 1 else None


def vlmevalkit_choice(prediction: str | None, options: Mapping[str, str]) -> str | None:
    """VLMEvalKit's `can_infer`: a letter of `options`, "Z", or None (unparsed)."""
    if prediction is None:
        return None
    prediction = str(prediction)
    return vlmevalkit_option_letter(prediction, options) or vlmevalkit_option_text(prediction, options)


# ---- lmms-eval ------------------------------------------------------------------------------------------------
_PHRASES = ("the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
            "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
            "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select",
            "i pick", "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4, "right_paren": 3,
             "space": 2, "fallback": 0}


def lmms_eval_mcq_letter(prediction: str | None, letters: tuple[str, ...] = ("A", "B", "C", "D")) -> str:
    """lmms-eval's `extract_mcq_answer`: the best-ranked candidate letter, "" when there is none."""
    if not prediction or not prediction.strip():
        return ""
    text = prediction.strip()
    for char in ",.!?;:'\"":
        text = text.strip(char)
    text = f" {text} "
    candidates: list[tuple[int, int, str]] = []  # (priority, position, letter)
    for kind, pattern in (("parentheses", "({})"), ("period", "{}."), ("colon", "{}:"), ("right_paren", "{})"),
                          ("space", "{} ")):
        for letter in letters:
            if pattern.format(letter) in text:
                candidates.append((_PRIORITY[kind], text.rfind(pattern.format(letter)), letter))
    lower = text.lower()
    for phrase in _PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for letter in letters:
                position = text.find(letter, at + len(phrase))
                if position != -1:
                    candidates.append((_PRIORITY["phrase"], position, letter))
    stripped = text.strip()
    for letter in letters:
        if stripped.startswith(letter) and (len(stripped) == 1 or not stripped[1].isalpha()):
            candidates.append((_PRIORITY["start"], 0, letter))
        if stripped.endswith(letter) and (len(stripped) == 1 or not stripped[-2].isalpha()):
            candidates.append((_PRIORITY["end"], len(text) - 1, letter))
    if not candidates:
        candidates = [(_PRIORITY["fallback"], text.rfind(letter), letter) for letter in letters if letter in text]
    if not candidates:
        return ""
    return max(candidates, key=lambda c: (c[0], c[1]))[2]


def lmms_eval_leading_letter(prediction: str | None) -> str:
    """lmms-eval AI2D's `MultiChoiceRegexFilter` + `exact_match` (ignore case and punctuation): a leading
    "X." becomes X; otherwise the whole response, upper-cased and stripped of punctuation, must be the letter."""
    if prediction is None:
        return ""
    match = re.match(r"^\s*([A-Z])\.", prediction)
    value = match.group(1) if match else prediction
    return value.translate(str.maketrans("", "", string.punctuation)).strip().upper()


def option_letters(count: int) -> tuple[str, ...]:
    return tuple(string.ascii_uppercase[:count])
