"""The README's security model, checked on the sources: nothing the code reads from an untrusted file
(checkpoints, releases, shards, benchmark data, predictions) can execute code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "encoders", "data", "training", "evaluation", "tools", "benchmarks")
SOURCES = sorted(p for package in PACKAGES for p in (REPO / package).rglob("*.py"))

# (what, pattern that must not occur in any source file)
FORBIDDEN = [
    ("pickle", re.compile(r"^\s*(import pickle|from pickle|import dill|import cloudpickle)|pickle\.loads?\(", re.M)),
    ("trust_remote_code", re.compile(r"trust_remote_code\s*=\s*True")),
    ("yaml.load (use safe_load)", re.compile(r"yaml\.(load|unsafe_load|full_load)\(")),
    ("numpy.load with pickles", re.compile(r"allow_pickle\s*=\s*True")),
    ("shell=True (pipe: URLs are webdataset's, from trusted configs)", re.compile(r"shell\s*=\s*True")),
    ("exec", re.compile(r"(?<![\w.])exec\(")),
    ("timm/transformers loads without weights_only", re.compile(r"load_state_dict\(str\([^)]*\)\)")),
]


@pytest.mark.parametrize("what, pattern", FORBIDDEN, ids=[w for w, _ in FORBIDDEN])
def test_no_source_executes_what_it_reads(what, pattern):
    hits = [f"{path.relative_to(REPO)}:{source[:m.start()].count(chr(10)) + 1}"
            for path in SOURCES for source in [path.read_text()] for m in pattern.finditer(source)]
    assert not hits, f"{what}: {hits}"


def call_arguments(source: str, start: int) -> str:
    """The text between the parentheses of the call opening at `start` (balanced)."""
    depth = 0
    for i in range(start, len(source)):
        depth += {"(": 1, ")": -1}.get(source[i], 0)
        if depth == 0:
            return source[start + 1:i]
    return source[start + 1:]


def test_every_torch_load_is_weights_only():
    hits = [f"{path.relative_to(REPO)}:{source[:m.start()].count(chr(10)) + 1}"
            for path in SOURCES for source in [path.read_text()] for m in re.finditer(r"torch\.load\(", source)
            if "weights_only=True" not in call_arguments(source, m.end() - 1)]
    assert not hits, hits


def test_eval_only_on_our_own_expressions():
    """`eval` appears once: models/checkpoint.py formats shape expressions written in that file."""
    hits = [(path.relative_to(REPO), line) for path in SOURCES
            for line in path.read_text().splitlines() if re.search(r"(?<![\w.])eval\(", line)]
    assert [str(p) for p, _ in hits] in ([], ["models/checkpoint.py"]), hits
    assert all("our own expressions" in line for _, line in hits)


def test_sources_were_found():
    assert len(SOURCES) > 40
