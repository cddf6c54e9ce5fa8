"""Speech recognition scoring: corpus-level WER and CER, as Whisper's evaluation scores them.

Protocol (`PROTOCOL`): references and hypotheses are normalised first, then aligned by `jiwer` over the
whole test set at once (errors summed over every utterance, divided by the reference length summed over
every utterance; not a mean of per-utterance rates).

- English: Whisper's `EnglishTextNormalizer` (openai/whisper `whisper/normalizers/english.py`, from the
  `whisper-normalizer` package): lower case, spelled-out numbers to digits ("twenty five" -> "25"),
  contractions expanded ("won't" -> "will not"), British spellings to American ("colour" -> "color"),
  titles expanded ("mr" -> "mister"), punctuation and fillers ("uh", "um") removed.
- Chinese: punctuation (every Unicode `P*` character, full-width included) and whitespace removed, then
  split into characters (AISHELL's word segmentation plays no part); a run of Latin letters or digits inside
  Chinese text stays one token, lower-cased, as WeNet's and FunASR's `compute-wer` treat it.
- Other languages: Whisper's `BasicTextNormalizer` (lower case, brackets and punctuation removed,
  diacritics kept).
An empty hypothesis is all deletions; an empty reference (after normalisation) counts its insertions.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Sequence

import jiwer
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

PROTOCOL = "whisper-normalizer + jiwer corpus-level WER/CER (Chinese: characters)"
CHARACTER_LANGUAGES = ("zh", "yue", "ja")  # scored on characters: words are not space-delimited
_LATIN_RUN = re.compile(r"[0-9a-z]+")


@lru_cache(maxsize=None)
def _english() -> EnglishTextNormalizer:
    return EnglishTextNormalizer()


@lru_cache(maxsize=None)
def _basic() -> BasicTextNormalizer:
    return BasicTextNormalizer()


def _language(language: str) -> str:
    """ISO code of `language` ('en', 'en-US', 'English' -> 'en'; 'zh-CN', 'mandarin' -> 'zh')."""
    code = language.strip().lower().replace("_", "-").split("-")[0]
    names = {"english": "en", "chinese": "zh", "mandarin": "zh", "cantonese": "yue", "japanese": "ja"}
    return names.get(code, code)


def tokens(text: str, language: str) -> list[str]:
    """The units that WER counts: normalised words, or for Chinese characters."""
    code = _language(language)
    if code in CHARACTER_LANGUAGES:
        kept = "".join(c for c in unicodedata.normalize("NFKC", text).lower()
                       if not unicodedata.category(c).startswith("P") and not c.isspace())
        out: list[str] = []
        position = 0
        for match in _LATIN_RUN.finditer(kept):
            out.extend(kept[position:match.start()])
            out.append(match.group())
            position = match.end()
        out.extend(kept[position:])
        return out
    normalised = _english()(text) if code == "en" else _basic()(text)
    return normalised.split()


def normalize(text: str, language: str) -> str:
    """The normalised text, tokens joined by single spaces (what the error rates are computed on)."""
    return " ".join(tokens(text, language))


@dataclass
class AsrScore:
    wer: float  # word error rate (Chinese: over characters, so equal to `cer`)
    cer: float  # character error rate over the normalised text (spaces count, as in jiwer)
    substitutions: int
    deletions: int
    insertions: int
    reference_tokens: int
    utterances: int
    empty_hypotheses: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def score_asr(references: Sequence[str], hypotheses: Sequence[str], language: str) -> AsrScore:
    """Corpus-level WER and CER of `hypotheses` against `references` (same order, same length)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if not references:
        raise ValueError("no utterances to score")
    refs = [normalize(r, language) for r in references]
    hyps = [normalize(h, language) for h in hypotheses]
    words = jiwer.process_words(refs, hyps)
    reference_tokens = words.hits + words.substitutions + words.deletions
    errors = words.substitutions + words.deletions + words.insertions
    if _language(language) in CHARACTER_LANGUAGES:
        cer = errors / max(reference_tokens, 1)
    else:
        chars = jiwer.process_characters(refs, hyps)
        char_errors = chars.substitutions + chars.deletions + chars.insertions
        cer = char_errors / max(chars.hits + chars.substitutions + chars.deletions, 1)
    return AsrScore(wer=errors / max(reference_tokens, 1), cer=cer, substitutions=words.substitutions,
                    deletions=words.deletions, insertions=words.insertions, reference_tokens=reference_tokens,
                    utterances=len(refs), empty_hypotheses=sum(1 for h in hyps if not h))
