"""Readers for the public release layouts of the paper's speech test sets (Table 3).

Each reader takes the directory of one test set, exactly as its release unpacks, and returns its
utterances (id, audio file, reference transcript) in a stable order:

- LibriSpeech (openslr 12): `test-clean/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt`, one line
  `<utterance-id> <TRANSCRIPT>` per `<utterance-id>.flac` in the same folder.
- AISHELL-1 (openslr 33): `data_aishell/transcript/aishell_transcript_v0.8.txt` (`<id> <word-segmented
  text>`, every split in one file) and `data_aishell/wav/test/<speaker>/<id>.wav`. Test audio with no
  transcript line is skipped, as the official Kaldi recipe (`egs/aishell/s5/local/aishell_data_prep.sh`)
  drops it; the count is reported.
- AISHELL-2 test sets (`AISHELL-DEV-TEST-SET/{Android,iOS,Mic}/test/`): Kaldi `wav.scp` (`<id> <path>`,
  relative to that folder) and `trans.txt` (`<id> <text>`).
- Multilingual LibriSpeech (openslr 94): `mls_<language>/test/transcripts.txt` (`<id>\\t<text>`, id =
  `<speaker>_<book>_<n>`) and `audio/<speaker>/<book>/<id>.flac` (`.opus` in the Opus release).

A transcript line that names no audio file, or a malformed line, is an error naming the file and line.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

AUDIO_SUFFIXES = (".flac", ".wav", ".opus", ".mp3", ".ogg")


class ReleaseError(ValueError):
    """The test set's files do not follow its release layout; the message names the file and the line."""


@dataclass(frozen=True)
class Utterance:
    id: str
    audio: Path
    reference: str


def _lines(path: Path) -> list[tuple[int, str, str]]:
    """(line number, id, rest) of a `<id> <text>` file; blank lines skipped, an id with no text is an error."""
    if not path.is_file():
        raise ReleaseError(f"{path}: file not found")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) < 2:
            raise ReleaseError(f"{path}:{number}: expected '<utterance-id> <text>', got {line.strip()!r:.80}")
        out.append((number, parts[0], parts[1].strip()))
    return out


def _audio_file(folder: Path, stem: str) -> Path | None:
    for suffix in AUDIO_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _missing_audio(transcript: Path, number: int, utterance: str, where: Path) -> ReleaseError:
    return ReleaseError(f"{transcript}:{number}: utterance {utterance} names no audio file "
                        f"(looked for {where}/{utterance}{{{','.join(AUDIO_SUFFIXES)}}})")


def read_librispeech(split_dir: str | Path) -> list[Utterance]:
    """A LibriSpeech split folder (e.g. `LibriSpeech/test-clean`)."""
    root = Path(split_dir)
    transcripts = sorted(root.glob("*/*/*.trans.txt"))
    if not transcripts:
        raise ReleaseError(f"{root}: no <speaker>/<chapter>/*.trans.txt files (LibriSpeech layout)")
    out = []
    for transcript in transcripts:
        for number, utterance, text in _lines(transcript):
            audio = _audio_file(transcript.parent, utterance)
            if audio is None:
                raise _missing_audio(transcript, number, utterance, transcript.parent)
            out.append(Utterance(utterance, audio, text))
    return out


def read_aishell1(root: str | Path, split: str = "test") -> tuple[list[Utterance], int]:
    """AISHELL-1 (`data_aishell/` or its parent): (utterances of `split`, audio files with no transcript)."""
    base = Path(root)
    if (base / "data_aishell").is_dir():
        base = base / "data_aishell"
    transcript = base / "transcript" / "aishell_transcript_v0.8.txt"
    texts = {utterance: (number, text) for number, utterance, text in _lines(transcript)}
    wav_dir = base / "wav" / split
    wavs = sorted(wav_dir.glob("*/*.wav"))
    if not wavs:
        raise ReleaseError(f"{wav_dir}: no <speaker>/*.wav files (unpack the per-speaker tar.gz files there)")
    out = [Utterance(w.stem, w, texts[w.stem][1]) for w in wavs if w.stem in texts]
    return out, len(wavs) - len(out)


def read_kaldi_dir(folder: str | Path, transcript_name: str = "trans.txt") -> list[Utterance]:
    """A Kaldi-style data folder: `wav.scp` + a transcript file (AISHELL-2's `trans.txt`, Kaldi's `text`)."""
    base = Path(folder)
    scp, transcript = base / "wav.scp", base / transcript_name
    paths = {}
    for number, utterance, location in _lines(scp):
        if location.endswith("|"):
            raise ReleaseError(f"{scp}:{number}: piped commands are not supported; give a file path")
        path = Path(location)
        paths[utterance] = path if path.is_absolute() else base / path
    out = []
    for number, utterance, text in _lines(transcript):
        audio = paths.get(utterance)
        if audio is None:
            raise ReleaseError(f"{transcript}:{number}: utterance {utterance} names no audio file (not in {scp})")
        if not audio.is_file():
            raise ReleaseError(f"{transcript}:{number}: utterance {utterance}: its audio {audio} (from {scp}) "
                               f"does not exist")
        out.append(Utterance(utterance, audio, text))
    return out


def read_mls(split_dir: str | Path) -> list[Utterance]:
    """A Multilingual LibriSpeech split folder (e.g. `mls_german/test`)."""
    base = Path(split_dir)
    transcript = base / "transcripts.txt"
    out = []
    for number, utterance, text in _lines(transcript):
        parts = utterance.split("_")
        if len(parts) != 3:
            raise ReleaseError(f"{transcript}:{number}: utterance id {utterance!r} is not <speaker>_<book>_<n>")
        folder = base / "audio" / parts[0] / parts[1]
        audio = _audio_file(folder, utterance)
        if audio is None:
            raise _missing_audio(transcript, number, utterance, folder)
        out.append(Utterance(utterance, audio, text))
    return out
