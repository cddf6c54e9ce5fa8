"""The tokenizer: the committed tiny one is exactly what the bundled corpus trains; special tokens are whole."""
import json

import pytest
from tokenizers import Tokenizer, models

from data.tokenizer import (CORPUS, MEDIA_TOKENS, OMNI_SPECIAL_TOKENS, TINY_TOKENIZER, build_tiny_tokenizer,
                            load_tokenizer)


def test_committed_tokenizer_is_reproduced_from_the_bundled_corpus(tmp_path):
    assert CORPUS.is_file() and 100_000 < CORPUS.stat().st_size < 400_000
    assert "Python Software Foundation" in (CORPUS.parent / "LICENSE.txt").read_text()
    rebuilt = json.loads(build_tiny_tokenizer(tmp_path / "tokenizer.json").read_text())
    committed = json.loads(TINY_TOKENIZER.read_text())
    assert rebuilt["model"]["vocab"] == committed["model"]["vocab"]
    assert rebuilt["model"]["merges"] == committed["model"]["merges"]
    assert len(committed["model"]["vocab"]) == 2048


def test_special_tokens_have_fixed_ids_and_stay_whole():
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<|endoftext|>", "<pad>")] == [0, 1, 2]
    assert [tokenizer.token_to_id(t) for t in OMNI_SPECIAL_TOKENS] == list(range(len(OMNI_SPECIAL_TOKENS)))
    text = "<role>HUMAN</role><image><imagePatch></image>Hi<role>ASSISTANT</role>Yes.<|endoftext|>"
    tokens = tokenizer.encode(text, add_special_tokens=False).tokens
    for token in ("<role>", "</role>", *MEDIA_TOKENS["image"], "<|endoftext|>"):
        assert token in tokens
    assert tokenizer.decode(tokenizer.encode("def f(x): return x ** 2").ids) == "def f(x): return x ** 2"


def test_english_text_compresses():
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    sentence = "Return a new list containing all items from the iterable in ascending order."
    assert len(tokenizer.encode(sentence).ids) < len(sentence) / 2.5


def test_tokenizers_without_the_omni_tokens_are_refused(tmp_path):
    plain = Tokenizer(models.BPE(unk_token="<unk>"))
    plain.add_special_tokens(["<unk>", "<|endoftext|>", "<pad>"])
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"tokenizer\.json lacks the special token\(s\) \['<image>', '<imagePatch>', "
                                         r"'</image>', '<video>', '</video>', '<audio>'"):
        load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"tokenizer\.json lacks the special token\(s\) \['<role>', '</role>'\]"):
        load_tokenizer(tmp_path / "tokenizer.json", kinds=())  # a text-only model needs no span tokens
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_tokenizer(tmp_path / "nowhere.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a tokenizers tokenizer.json"):
        load_tokenizer(tmp_path / "broken.json")
