"""The paper's speech benchmarks (Table 3): ASR on LibriSpeech, AISHELL-1, AISHELL-2 and Multilingual
LibriSpeech, each read from its release layout (evaluation/speech_releases.py), scored by corpus-level
WER (CER for Chinese) after Whisper's normalisers (evaluation/asr_scoring.py).

The prompt is Ming-Lite-Omni's ASR instruction (inclusionAI/Ming README, "Audio tasks / ASR":
the user turn holds the text "Please recognize the language of this speech and transcribe it. Format: oral."
followed by the audio). Audio at any sample rate or channel count is resampled to 16 kHz mono by the
processor (data/media.py `load_audio`); an undecodable file is an error of that one utterance.
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from typing import ClassVar

from evaluation.asr_scoring import CHARACTER_LANGUAGES, PROTOCOL, score_asr
from evaluation.benchmark import BENCHMARKS, Benchmark, Result, Sample, Score
from evaluation.speech_releases import Utterance, read_aishell1, read_kaldi_dir, read_librispeech, read_mls

ASR_PROMPT = "Please recognize the language of this speech and transcribe it. Format: oral."


def asr_sample(utterance: Utterance, language: str) -> Sample:
    return Sample(id=utterance.id, conversation=[{"role": "user", "content": f"{ASR_PROMPT}\n<audio>"}],
                  answer=utterance.reference, audios=[str(utterance.audio)], meta={"language": language})


class SpeechRecognition(Benchmark):
    """An ASR test set: subclasses set `language` and `locations` and read their release in `utterances()`."""

    modality = "speech"
    max_new_tokens = 128  # the longest LibriSpeech test utterance (35 s) has about 90 words
    language: ClassVar[str] = "en"

    @abstractmethod
    def utterances(self) -> list[Utterance]:
        """The test set's utterances (audio path + reference transcript), read from its release layout."""

    def samples(self) -> Iterator[Sample]:
        for utterance in self.utterances():
            yield asr_sample(utterance, self.language)

    def score(self, results: list[Result]) -> Score:
        if not results:
            raise ValueError(f"{self.name}: no results to score")
        language = results[0].meta.get("language", self.language)
        # a failed utterance has no transcript: scored as an empty one (all deletions), counted in `errors`
        asr = score_asr([str(r.answer) for r in results], [r.prediction or "" for r in results], language)
        characters = language in CHARACTER_LANGUAGES
        value = 100 * (asr.cer if characters else asr.wer)
        return Score(benchmark=self.name, protocol=PROTOCOL, metric="CER (%)" if characters else "WER (%)",
                     value=value, count=len(results), errors=sum(r.prediction is None for r in results),
                     higher_is_better=False,
                     extra={"wer": 100 * asr.wer, "cer": 100 * asr.cer, "substitutions": asr.substitutions,
                            "deletions": asr.deletions, "insertions": asr.insertions,
                            "reference_tokens": asr.reference_tokens, "empty_hypotheses": asr.empty_hypotheses})


def _register_librispeech(split: str) -> None:
    @BENCHMARKS.register(f"librispeech-{split}")
    class LibriSpeech(SpeechRecognition):
        locations = (f"LibriSpeech/{split}", f"librispeech/{split}", split)
        release = f"openslr.org/12: {split}.tar.gz, unpacked"

        def utterances(self) -> list[Utterance]:
            return read_librispeech(self.locate())


for _split in ("test-clean", "test-other"):
    _register_librispeech(_split)


@BENCHMARKS.register("aishell1-test")
class Aishell1(SpeechRecognition):
    language = "zh"
    locations = ("data_aishell", "aishell1/data_aishell", "AISHELL-1/data_aishell", "aishell1")
    release = "openslr.org/33: data_aishell.tgz, unpacked, with the wav/test/*.tar.gz files unpacked in place"

    def utterances(self) -> list[Utterance]:
        utterances, self.untranscribed = read_aishell1(self.locate(), "test")
        return utterances


def _register_aishell2(device: str) -> None:
    @BENCHMARKS.register(f"aishell2-{device.lower()}")
    class Aishell2(SpeechRecognition):
        language = "zh"
        locations = (f"AISHELL-DEV-TEST-SET/{device}/test", f"aishell2/{device}/test",
                     f"AISHELL-2/AISHELL-DEV-TEST-SET/{device}/test")
        release = "AISHELL-2 dev/test sets (aishelltech.com), unpacked: <device>/test/{wav.scp,trans.txt,wav/}"

        def utterances(self) -> list[Utterance]:
            return read_kaldi_dir(self.locate())


for _device in ("Android", "iOS", "Mic"):
    _register_aishell2(_device)

MLS_LANGUAGES = {"english": "en", "german": "de", "dutch": "nl", "french": "fr", "spanish": "es", "italian": "it",
                 "portuguese": "pt", "polish": "pl"}


def _register_mls(name: str, code: str) -> None:
    @BENCHMARKS.register(f"mls-{name}")
    class MultilingualLibriSpeech(SpeechRecognition):
        language = code
        locations = (f"mls_{name}/test", f"mls_{name}_opus/test", f"mls/mls_{name}/test")
        release = f"openslr.org/94: mls_{name}.tar.gz (flac) or mls_{name}_opus.tar.gz, unpacked"

        def utterances(self) -> list[Utterance]:
            return read_mls(self.locate())


for _name, _code in MLS_LANGUAGES.items():
    _register_mls(_name, _code)

