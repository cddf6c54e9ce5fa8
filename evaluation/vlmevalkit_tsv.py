"""VLMEvalKit's benchmark TSVs (`~/LMUData/<NAME>.tsv`) as samples, and its multiple-choice prompt.

A row has `index`, `question`, option columns `A`, `B`, ... (empty cells are absent options), `answer`, an
`image` cell holding a base64 image file, or, to save space, the `index` of another row whose image it shares
(a value of at most 64 characters: `vlmeval/dataset/image_base.py` `ImageBaseDataset.prepare_tsv`), or a
Python list literal of base64 images; optionally `hint`, `category`, `l2-category`.
"""
from __future__ import annotations

import ast
import string
from pathlib import Path
from typing import Any

from evaluation.benchmark import DataError
from evaluation.tables import cell_text, decode_base64_image, read_table

SHORT_REFERENCE = 64  # VLMEvalKit: an image cell of at most 64 characters names another row's index


def read_vlmevalkit_tsv(path: Path, required: tuple[str, ...] = ("index", "question", "answer", "image")) -> list[dict]:
    """The rows as dicts with `images` (list of bytes) resolved, options as `options` {letter: text}."""
    table = read_table(path, required)
    rows = table.to_dict("records")
    by_index = {cell_text(row["index"]): cell_text(row["image"]) for row in rows}
    out = []
    for number, row in enumerate(rows, 2):  # line 1 is the header
        index = cell_text(row["index"])
        where = f"{path} line {number} (index {index})"
        value = by_index[index]
        if 0 < len(value) <= SHORT_REFERENCE:
            if value not in by_index or len(by_index[value]) <= SHORT_REFERENCE:
                raise DataError(f"{where}: `image` refers to row {value!r}, which has no image of its own")
            value = by_index[value]
        if not value:
            raise DataError(f"{where}: empty `image` cell")
        encoded = ast.literal_eval(value) if value.startswith("[") else [value]
        row = dict(row, index=index, images=[decode_base64_image(v, where) for v in encoded],
                   options=options_of(row))
        out.append(row)
    return out


def options_of(row: dict[str, Any]) -> dict[str, str]:
    """`{letter: text}` of the non-empty option columns A, B, C, ..., in order (VLMEvalKit `build_choices`)."""
    return {letter: cell_text(row[letter]) for letter in string.ascii_uppercase
            if letter in row and cell_text(row[letter]) != ""}


def vlmevalkit_mcq_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    """`vlmeval/dataset/image_mcq.py` `ImageMCQDataset.build_prompt` (text part)."""
    prompt = f"Hint: {hint}\n" if hint else ""
    prompt += f"Question: {question}\n"
    if options:
        prompt += "Options:\n" + "".join(f"{letter}. {text}\n" for letter, text in options.items())
        prompt += "Please select the correct answer from the options above. \n"
    return prompt


def mcq_results_from_table(table: Any, source: str, meta_columns: dict[str, tuple[str, ...]]) -> list:
    """Results from a VLMEvalKit multiple-choice prediction table (`index`, `answer`, options, `prediction`).
    `meta_columns`: meta key -> the column names it may have (VLMEvalKit writes `l2-category` or `l2_category`)."""
    from evaluation.benchmark import Result
    from evaluation.tables import require_columns
    require_columns(table.columns, ("index", "answer", "prediction"), source)
    results = []
    for row in table.to_dict("records"):
        meta: dict[str, Any] = {"options": options_of(row)}
        for key, names in meta_columns.items():
            meta[key] = next((cell_text(row[n]) for n in names if n in row and cell_text(row[n])), None)
        results.append(Result(cell_text(row["index"]), cell_text(row["prediction"]), cell_text(row["answer"]).strip(),
                              meta))
    return results
