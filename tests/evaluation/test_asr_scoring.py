"""ASR scoring: Whisper normalisation, Chinese characters, corpus-level (not per-utterance mean) WER."""
import pytest

from evaluation.asr_scoring import normalize, score_asr, tokens


@pytest.mark.parametrize("reference, hypothesis", [
    ("I have twenty-five apples.", "i have 25 apples"),  # numbers
    ("It won't rain, we're sure.", "it will not rain we are sure"),  # contractions
    ("The colour of the theatre", "the color of the theater"),  # British spellings
    ("Mr. Quilter is the apostle", "mister quilter is the apostle"),  # titles
    ("Uh, hello there!", "hello there"),  # fillers and punctuation
])
def test_english_normalisation_makes_equivalent_texts_error_free(reference, hypothesis):
    assert normalize(reference, "en") == normalize(hypothesis, "en")
    assert score_asr([reference], [hypothesis], "en").wer == 0.0


def test_chinese_punctuation_removed_then_characters():
    assert tokens("甚至 出现 交易，几乎“停滞”的情况。", "zh") == list("甚至出现交易几乎停滞的情况")
    assert tokens("用ＡＩ2测试！", "zh") == ["用", "ai2", "测", "试"]  # full-width folded, a Latin run is one token
    # AISHELL's word-segmented reference against an unsegmented, punctuated hypothesis: 1 substitution in 13
    score = score_asr(["甚至 出现 交易 几乎 停滞 的 情况"], ["甚至出现交易几乎停止的情况。"], "zh")
    assert (score.substitutions, score.deletions, score.insertions, score.reference_tokens) == (1, 0, 0, 13)
    assert score.cer == score.wer == pytest.approx(1 / 13)


def test_empty_hypothesis_is_all_deletions():
    score = score_asr(["he was not an ill disposed young man", "good morning"], ["", "good morning"], "en")
    assert (score.deletions, score.reference_tokens, score.empty_hypotheses) == (8, 10, 1)
    assert score.wer == pytest.approx(0.8)


def test_spoken_digit_sequences_join_as_whisper_joins_them():
    assert normalize("one two three", "en") == "123"  # Whisper's own rule: one token, not three
    assert score_asr(["one two three"], ["1 2 3"], "en").wer == 3.0  # 1 substitution + 2 insertions over 1 token


def test_wer_is_corpus_level_not_a_mean_of_utterances():
    # utterance 1: 1 error in 1 word (100 %); utterance 2: 0 errors in 9 words. Corpus: 1 / 10, mean would be 50 %.
    references = ["yes", "the quick brown fox jumps over the lazy dog"]
    hypotheses = ["no", "the quick brown fox jumps over the lazy dog"]
    assert score_asr(references, hypotheses, "en").wer == pytest.approx(0.1)


def test_cer_counts_characters_of_the_normalised_text():
    score = score_asr(["hello world"], ["hello word"], "en")
    assert score.wer == pytest.approx(0.5)
    assert score.cer == pytest.approx(1 / 11)  # one deleted letter out of 11 characters (space included)


def test_other_languages_use_the_basic_normaliser():
    assert normalize("Ça, c'est TRÈS bien !", "fr") == "ça c est très bien"  # diacritics kept, punctuation gone
    assert normalize("Er sagte: „Guten Tag“.", "de") == "er sagte guten tag"
    score = score_asr(["guten tag meine damen"], ["Guten Tag, meine Damen!"], "de")
    assert score.wer == 0.0


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score_asr(["a", "b"], ["a"], "en")
