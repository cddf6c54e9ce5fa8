"""Speech benchmarks: every registered ASR test set read from a fixture in its release layout (real clips
where the repository has them), known predictions scored exactly, the processor fed end to end."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from evaluation import BENCHMARKS
from evaluation.benchmark import MissingData, Result
from evaluation.speech import ASR_PROMPT, SpeechRecognition
from evaluation.speech_releases import ReleaseError

DATA_ASSETS = Path(__file__).resolve().parents[2] / "data" / "assets"
TEST_ASSETS = Path(__file__).resolve().parents[1] / "assets"
QUILTER = "MISTER QUILTER IS THE APOSTLE OF THE MIDDLE CLASSES AND WE ARE GLAD TO WELCOME HIS GOSPEL"
DASHWOOD = "and mister john dashwood had then leisure to consider how much there might be prudently in his power to do for them"
ILL_DISPOSED = "he was not an ill disposed young man"
AISHELL = "甚至 出现 交易 几乎 停滞 的 情况"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source, target)
    return target


def _stereo_44k(source: Path, target: Path) -> Path:
    """The same speech at 44.1 kHz in two channels (the processor must resample and down-mix it)."""
    wave, rate = sf.read(source, dtype="float32")
    up = np.interp(np.arange(int(len(wave) * 44100 / rate)) * rate / 44100, np.arange(len(wave)), wave)
    target.parent.mkdir(parents=True, exist_ok=True)
    sf.write(target, np.stack([up, 0.5 * up], axis=1).astype(np.float32), 44100)
    return target


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("speech")
    # LibriSpeech: <split>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt beside the flac files
    for split in ("test-clean", "test-other"):
        chapter = root / "LibriSpeech" / split / "1272" / "128104"
        _copy(DATA_ASSETS / "1272-128104-0000.flac", chapter / "1272-128104-0000.flac")
        _write(chapter / "1272-128104.trans.txt", f"1272-128104-0000 {QUILTER}\n")
    # AISHELL-1: one transcript file for every split, per-speaker wav folders; an untranscribed clip
    aishell = root / "data_aishell"
    _write(aishell / "transcript" / "aishell_transcript_v0.8.txt",
           f"BAC009S0002W0122 而 对 楼市 成交 抑制 作用 最 大 的 限 购\nBAC009S0764W0121 {AISHELL}\n")
    _copy(DATA_ASSETS / "BAC009S0764W0121.wav", aishell / "wav" / "test" / "S0764" / "BAC009S0764W0121.wav")
    _copy(DATA_ASSETS / "BAC009S0764W0121.wav", aishell / "wav" / "test" / "S0764" / "BAC009S0764W0999.wav")
    # AISHELL-2: Kaldi wav.scp + trans.txt per device; the iOS copy is 44.1 kHz stereo
    for device in ("Android", "iOS", "Mic"):
        folder = root / "AISHELL-DEV-TEST-SET" / device / "test"
        utterance = f"{device[0]}T0764W0121"
        wav = folder / "wav" / "T0764" / f"{utterance}.wav"
        if device == "iOS":
            _stereo_44k(DATA_ASSETS / "BAC009S0764W0121.wav", wav)
        else:
            _copy(DATA_ASSETS / "BAC009S0764W0121.wav", wav)
        _write(folder / "wav.scp", f"{utterance}\twav/T0764/{utterance}.wav\n")
        _write(folder / "trans.txt", f"{utterance}\t{AISHELL.replace(' ', '')}\n")
    # Multilingual LibriSpeech (English is LibriVox): transcripts.txt + audio/<speaker>/<book>/<id>.flac
    mls = root / "mls_english" / "test"
    lines = []
    for number, text in (("0870", DASHWOOD), ("0880", ILL_DISPOSED)):
        source = (TEST_ASSETS if number == "0870" else DATA_ASSETS) / f"sense_and_sensibility_{number}.wav"
        wave, rate = sf.read(source, dtype="float32")
        target = mls / "audio" / "4020" / "1001" / f"4020_1001_00{number}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        sf.write(target, wave, rate)
        lines.append(f"4020_1001_00{number}\t{text}")
    _write(mls / "transcripts.txt", "\n".join(lines) + "\n")
    return root


def _speech_benchmarks() -> list[str]:
    return BENCHMARKS.group("speech")


@pytest.mark.parametrize("name", _speech_benchmarks())
def test_every_speech_benchmark_reads_its_release_or_says_where_it_is_missing(name, data_root, tmp_path):
    benchmark = BENCHMARKS.get(name)(data_root)
    assert isinstance(benchmark, SpeechRecognition)
    if name.startswith("mls-") and name != "mls-english":
        with pytest.raises(MissingData, match=f"mls_{name[4:]}/test"):
            list(benchmark.samples())
        return
    samples = list(benchmark.samples())
    assert samples, name
    for sample in samples:
        assert sample.conversation == [{"role": "user", "content": f"{ASR_PROMPT}\n<audio>"}]
        assert len(sample.audios) == 1 and Path(sample.audios[0]).is_file()
    # known predictions: the references themselves score 0; an empty transcript is all deletions
    perfect = [Result(s.id, s.answer, s.answer, s.meta) for s in samples]
    assert benchmark.score(perfect).value == 0.0
    failed = [Result(s.id, None, s.answer, s.meta, error="decode failed") for s in samples]
    score = benchmark.score(failed)
    assert (score.value, score.errors) == (100.0, len(samples))


def test_librispeech_scores_whisper_normalised_wer(data_root):
    benchmark = BENCHMARKS.get("librispeech-test-clean")(data_root)
    [sample] = list(benchmark.samples())
    assert (sample.id, sample.answer) == ("1272-128104-0000", QUILTER)
    hypothesis = "Mr. Quilter is the apostle of the middle classes, and we're glad to welcome his gospel."
    score = benchmark.score([Result(sample.id, hypothesis, sample.answer, sample.meta)])
    # "Mr." -> "mister" (equal); "we're" -> "we are": "are" stays, nothing else differs
    assert score.value == 0.0 and score.metric == "WER (%)"
    score = benchmark.score([Result(sample.id, "mister quilter is the apostle of the middle class", sample.answer,
                                    sample.meta)])
    assert score.value == pytest.approx(100 * 9 / 17)  # 1 substitution + 8 deletions over 17 words


def test_aishell_scores_characters_and_skips_untranscribed_audio(data_root):
    benchmark = BENCHMARKS.get("aishell1-test")(data_root)
    [sample] = list(benchmark.samples())
    assert benchmark.untranscribed == 1  # BAC009S0764W0999.wav has no transcript line, as in the release
    score = benchmark.score([Result(sample.id, "甚至出现交易几乎停止的情况。", sample.answer, sample.meta)])
    assert score.metric == "CER (%)" and score.value == pytest.approx(100 / 13)


def test_mls_reads_transcripts_and_audio_tree(data_root):
    samples = list(BENCHMARKS.get("mls-english")(data_root).samples())
    assert [s.id for s in samples] == ["4020_1001_000870", "4020_1001_000880"]
    assert samples[1].answer == ILL_DISPOSED


def test_real_clips_become_model_inputs(data_root, processor):
    """LibriSpeech, AISHELL-1, AISHELL-2 (44.1 kHz stereo) and LibriVox clips through the shared processor."""
    for name in ("librispeech-test-clean", "aishell1-test", "aishell2-ios", "mls-english"):
        for sample in BENCHMARKS.get(name)(data_root).samples():
            example = processor(sample.processor_input(), generation=True)
            seconds = sf.info(sample.audios[0]).duration
            # Whisper encoder frames: 50 per second of 16 kHz mono audio, whatever the file's rate and channels
            assert example["audio_frames_per_clip"].item() == pytest.approx(50 * seconds, abs=1), name


def test_a_transcript_line_without_audio_names_the_file_and_line(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1272" / "128104"
    _copy(DATA_ASSETS / "1272-128104-0000.flac", chapter / "1272-128104-0000.flac")
    transcript = _write(chapter / "1272-128104.trans.txt", f"1272-128104-0000 {QUILTER}\n1272-128104-0001 NOT HERE\n")
    with pytest.raises(ReleaseError, match=f"{transcript}:2: utterance 1272-128104-0001 names no audio file"):
        list(BENCHMARKS.get("librispeech-test-clean")(tmp_path).samples())


def test_kaldi_transcript_id_missing_from_wav_scp(tmp_path):
    folder = tmp_path / "AISHELL-DEV-TEST-SET" / "Mic" / "test"
    _copy(DATA_ASSETS / "BAC009S0764W0121.wav", folder / "wav" / "a.wav")
    _write(folder / "wav.scp", "MT1 wav/a.wav\n")
    trans = _write(folder / "trans.txt", "MT1 你好\n\nMT2 再见\n")
    with pytest.raises(ReleaseError, match=f"{trans}:3: utterance MT2 names no audio file"):
        list(BENCHMARKS.get("aishell2-mic")(tmp_path).samples())
    _write(folder / "trans.txt", "MT1\n")
    with pytest.raises(ReleaseError, match="trans.txt:1: expected '<utterance-id> <text>'"):
        list(BENCHMARKS.get("aishell2-mic")(tmp_path).samples())
