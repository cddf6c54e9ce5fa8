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


# The special tokens of the Ming-Lite-Omni release tokenizer with their ids (inclusionAI/Ming d97e2f3,
# tokenizer_config.json `added_tokens_decoder`; 126084-126339 are `<|reserved_token_0|>` ... `_255|>`).
MING_RELEASE_SPECIAL_TOKENS = {
    126080: "<|startoftext|>", 126081: "<|endoftext|>", 126082: "[CLS]", 126083: "[gMASK]",
    **{126084 + i: f"<|reserved_token_{i}|>" for i in range(256)},
    126340: "<role>", 126341: "</role>", 126342: "<|arithmetic_start|>", 126343: "<|arithmetic_end|>",
    126344: "<|number_start|>", 126345: "<|number_end|>", 126346: "<imagePatch>", 126347: "<image>",
    126348: "</image>", 126349: "<video>", 126350: "</video>", 126351: "<gen_imagePatch>", 126352: "<gen_image>",
    126353: "</gen_image>", 126354: "<imageHere>", 126355: "<end_of_chunk>", 126356: "<end_of_audio>",
    126357: "<audioPatch>", 126358: "<audio>", 126359: "</audio>", 126360: "<gen_audioPatch>", 126361: "<gen_audio>",
    126362: "</gen_audio>", 126363: "<audioHere>", 126364: "<framePatch>", 126365: "<text>", 126366: "<asr>",
    126367: "<tts>",
}
MING_PAD_TOKEN_ID = 126081  # config.json llm_config.pad_token_id (special_tokens_map.json: pad = <|endoftext|>)


def write_ming_release_tokenizer(path, drop=()):
    """A byte-level BPE tokenizer.json whose added tokens sit at the release's ids (the base vocabulary is filler:
    the release's merges are not needed to test the special tokens)."""
    from tokenizers import decoders, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    first = min(MING_RELEASE_SPECIAL_TOKENS)
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({f"filler{i}": i for i in range(len(alphabet), first)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([MING_RELEASE_SPECIAL_TOKENS[i] for i in sorted(MING_RELEASE_SPECIAL_TOKENS)])
    for token in drop:  # a release with a token missing: rename it to something inert
        data = json.loads(tokenizer.to_str())
        for added in data["added_tokens"]:
            if added["content"] == token:
                added["content"] = f"<removed {token}>"
        tokenizer = Tokenizer.from_str(json.dumps(data))
    tokenizer.save(str(path))
    return path


def test_the_ming_release_tokenizer_is_taken_as_it_is(tmp_path):
    from data.tokenizer import media_token_ids, pad_token_id
    path = write_ming_release_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = load_tokenizer(path)  # no <videoPatch>, <unk>, <pad> or <|role_end|>: not needed
    assert all(tokenizer.token_to_id(token) == i for i, token in MING_RELEASE_SPECIAL_TOKENS.items())
    assert media_token_ids(tokenizer, path) == {"image": (126347, 126346, 126348), "video": (126349, 126346, 126350),
                                                "audio": (126358, 126357, 126359)}
    assert pad_token_id(tokenizer) == MING_PAD_TOKEN_ID


def test_a_missing_token_is_named_with_the_file_only_when_the_model_uses_it(tmp_path):
    path = write_ming_release_tokenizer(tmp_path / "tokenizer.json", drop=("<audioPatch>",))
    with pytest.raises(ValueError, match=r"tokenizer\.json lacks the special token\(s\) \['<audioPatch>'\] of the "
                                         r"image/video/audio spans"):
        load_tokenizer(path)
    assert load_tokenizer(path, kinds=("image", "video")).token_to_id("<image>") == 126347  # a vision-only model
