"""The omni tokenizer: a `tokenizers` byte-level BPE with the multimodal placeholder and chat-role tokens.

Tiny configs use one this repository trains itself on its bundled corpus (data/corpus/, Python standard
library docstrings, PSF licence): `build_tiny_tokenizer()` regenerates the committed
configs/tokenizers/tiny-omni/tokenizer.json (`python -m data.tokenizer`). Full-size models use their
release `tokenizer.json` (Ling / Ming) unchanged; `load_tokenizer` checks that the tokens the model uses
exist in it and names the missing ones with the file.

Special tokens (Ming-Lite-Omni's names): `<image>` / `<imagePatch>` / `</image>` spans, `<video>` ...
`</video>` and `<audio>` / `<audioPatch>` / `</audio>`, the role markers `<role>` / `</role>` (turns read
`<role>HUMAN</role>...`, `<role>ASSISTANT</role>...`, `<role>SYSTEM</role>...`), `<|role_end|>` (Ling-2.0 ends
every turn with it) and `<|endoftext|>` (eos, closes an assistant turn in Ming's Ling-lite format, and the
release's pad token). The Ming release has no `<videoPatch>`: its processor marks video frames with
`<imagePatch>` inside `<video>` ... `</video>` (processing_bailingmm.py `_expand_video_tokens`), and so does
ours with any tokenizer without `<videoPatch>`. Our tiny tokenizer has `<videoPatch>`, `<pad>` and `<unk>`
as well; its first three ids are fixed: `<unk>` 0, `<|endoftext|>` 1, `<pad>` 2 (configs/models/tiny-omni.yaml
relies on them).
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "data" / "corpus" / "stdlib_docstrings.txt"
TINY_TOKENIZER = REPO / "configs" / "tokenizers" / "tiny-omni" / "tokenizer.json"
TINY_VOCAB_SIZE = 2048

BASE_TOKENS = ("<unk>", "<|endoftext|>", "<pad>")
MEDIA_TOKENS = {  # kind -> (start, patch, end): <image> + N x <imagePatch> + </image>
    "image": ("<image>", "<imagePatch>", "</image>"),
    "video": ("<video>", "<videoPatch>", "</video>"),
    "audio": ("<audio>", "<audioPatch>", "</audio>"),
}
IMAGE_PATCH = "<imagePatch>"  # also the video patch token of tokenizers without <videoPatch> (the Ming release)
ROLE_TOKENS = ("<role>", "</role>")
ROLE_END = "<|role_end|>"  # Ling-2.0's end of turn; Ming-Lite-Omni's Ling-lite tokenizer need not have it
OMNI_SPECIAL_TOKENS = BASE_TOKENS + ROLE_TOKENS + tuple(t for span in MEDIA_TOKENS.values() for t in span) + (ROLE_END,)
EOS_TOKEN, PAD_TOKEN = "<|endoftext|>", "<pad>"

# Standard-library modules whose docstrings make the corpus: English technical prose under the PSF licence.
CORPUS_MODULES = ("abc", "argparse", "asyncio", "base64", "bisect", "calendar", "collections", "contextlib", "csv",
                  "dataclasses", "datetime", "decimal", "difflib", "email", "enum", "fractions", "functools",
                  "gettext", "glob", "gzip", "hashlib", "heapq", "html", "http.client", "inspect", "io", "ipaddress",
                  "itertools", "json", "logging", "mailbox", "os", "pathlib", "pickle", "pprint", "random", "re",
                  "shutil", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile",
                  "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "zipfile")


def extract_docstring_corpus(out_file: str | Path = CORPUS, modules: tuple[str, ...] = CORPUS_MODULES,
                             max_bytes: int = 300_000) -> Path:
    """Write the docstrings (>= 200 characters, deduplicated, one paragraph-separated document each) of
    `modules` and their public members, up to `max_bytes`. How data/corpus/ was made (once; the text
    depends on the Python version, so the committed file is the reference)."""
    docs: dict[str, None] = {}
    size = 0
    for name in modules:
        module = importlib.import_module(name)
        for _, member in [(name, module)] + sorted(inspect.getmembers(module), key=lambda item: item[0]):
            doc = inspect.getdoc(member) or ""
            length = len(doc.encode("utf-8")) + 2
            if len(doc) >= 200 and doc not in docs and size + length <= max_bytes:
                docs[doc] = None
                size += length
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return out


def train_tokenizer(corpus: str | Path, out_file: str | Path, vocab_size: int = TINY_VOCAB_SIZE,
                    special_tokens: tuple[str, ...] = OMNI_SPECIAL_TOKENS) -> Path:
    """Byte-level BPE on a text file (deterministic for a given corpus); special tokens get the first ids."""
    corpus = Path(corpus)
    if not corpus.is_file() or corpus.stat().st_size == 0:
        raise FileNotFoundError(f"tokenizer corpus missing or empty: {corpus}")
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train([str(corpus)], trainer)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out))
    return out


def build_tiny_tokenizer(out_file: str | Path = TINY_TOKENIZER, corpus: str | Path = CORPUS) -> Path:
    """Regenerate the tiny-omni tokenizer from the bundled corpus."""
    return train_tokenizer(corpus, out_file, TINY_VOCAB_SIZE)


def load_tokenizer(path: str | Path, kinds: tuple[str, ...] = tuple(MEDIA_TOKENS)) -> Tokenizer:
    """Any `tokenizer.json` (ours, or a Ling/Ming release's) with the tokens a model of media `kinds` uses."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception on malformed JSON
        raise ValueError(f"{path}: not a tokenizers tokenizer.json ({err})") from None
    check_special_tokens(tokenizer, path, kinds)
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, source: str | Path, kinds: tuple[str, ...] = tuple(MEDIA_TOKENS)) -> None:
    """eos, the role markers and the span tokens of `kinds` must each be one token of the vocabulary."""
    media_token_ids(tokenizer, source, kinds)
    missing = [token for token in (EOS_TOKEN, *ROLE_TOKENS) if tokenizer.token_to_id(token) is None]
    if missing:
        raise ValueError(f"{source} lacks the special token(s) {missing}: add them (tokenizer.add_special_tokens) "
                         f"and resize the model's embeddings")


def media_token_ids(tokenizer: Tokenizer, source: str | Path,
                    kinds: tuple[str, ...] = tuple(MEDIA_TOKENS)) -> dict[str, tuple[int, int, int]]:
    """`{kind: (start id, patch id, end id)}` of the tokenizer's span tokens; video patches are `<videoPatch>`
    where the tokenizer has it, else `<imagePatch>` (the Ming release). Missing tokens are named with `source`."""
    out, missing = {}, []
    for kind in kinds:
        start, patch, end = MEDIA_TOKENS[kind]
        if kind == "video" and tokenizer.token_to_id(patch) is None:
            patch = IMAGE_PATCH
        ids = [tokenizer.token_to_id(token) for token in (start, patch, end)]
        missing += [token for token, i in zip((start, patch, end), ids) if i is None]
        out[kind] = tuple(ids)
    if missing:
        raise ValueError(f"{source} lacks the special token(s) {list(dict.fromkeys(missing))} of the "
                         f"{'/'.join(kinds)} spans: add them (tokenizer.add_special_tokens) and resize the model's "
                         f"embeddings")
    return out


def pad_token_id(tokenizer: Tokenizer) -> int:
    """`<pad>` where the tokenizer has it, else `<|endoftext|>` (the Ming / Ling releases' pad token)."""
    pad = tokenizer.token_to_id(PAD_TOKEN)
    return pad if pad is not None else tokenizer.token_to_id(EOS_TOKEN)


if __name__ == "__main__":
    print(f"wrote {build_tiny_tokenizer()}")
