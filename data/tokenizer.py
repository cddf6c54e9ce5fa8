"""The omni tokenizer: a `tokenizers` BPE with the multimodal placeholder and chat-role tokens.

The tiny configs use one this repository trains on its offline corpus (`build_omni_tokenizer`,
committed as configs/tokenizers/tiny-omni/tokenizer.json); full-size models use their official
`tokenizer.json` (the same tokens must exist in it: `check_special_tokens` says which are missing).
"""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer

from data.text import SPECIAL_TOKENS, build_docstring_corpus

# Ming-Lite-Omni style spans: <image> + N x <imagePatch> + </image>, likewise video and audio.
MEDIA_TOKENS = {
    "image": ("<image>", "<imagePatch>", "</image>"),
    "video": ("<video>", "<videoPatch>", "</video>"),
    "audio": ("<audio>", "<audioPatch>", "</audio>"),
}
ROLE_TOKENS = ("<role>", "</role>")
OMNI_SPECIAL_TOKENS = SPECIAL_TOKENS + ROLE_TOKENS + tuple(t for span in MEDIA_TOKENS.values() for t in span)


def build_omni_tokenizer(out_dir: str | Path, vocab_size: int = 2048) -> Path:
    """Train the tiny-config tokenizer on the offline corpus; returns the tokenizer.json path."""
    _, path = build_docstring_corpus(out_dir, vocab_size=vocab_size, special_tokens=OMNI_SPECIAL_TOKENS)
    return path


def load_tokenizer(path: str | Path) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tokenizer = Tokenizer.from_file(str(path))
    check_special_tokens(tokenizer, path)
    return tokenizer


def check_special_tokens(tokenizer: Tokenizer, source: str | Path) -> None:
    missing = [t for t in OMNI_SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{source} lacks the special token(s) {missing}: add them (tokenizer.add_special_tokens) "
                         f"and resize the model's embeddings")
