"""Reading benchmark tables (VLMEvalKit TSV / xlsx, parquet, CSV) with errors that name file and column."""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any

from evaluation.benchmark import DataError


def read_table(path: str | Path, required: tuple[str, ...] = ()):
    """A pandas DataFrame of `path` (.tsv, .xlsx, .csv, .parquet); every column of `required` must exist."""
    import pandas as pd
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    readers = {".tsv": lambda p: pd.read_csv(p, sep="\t", keep_default_na=False, dtype=str),
               ".csv": lambda p: pd.read_csv(p, keep_default_na=False, dtype=str),
               ".xlsx": lambda p: pd.read_excel(p, keep_default_na=False, dtype=str),
               ".parquet": pd.read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unknown table format (expected {', '.join(readers)})")
    try:
        table = reader(path)
    except Exception as err:  # noqa: BLE001 -- pandas/pyarrow raise many types for a damaged file
        raise DataError(f"{path}: cannot be read as {path.suffix} ({type(err).__name__}: {err})") from None
    require_columns(table.columns, required, path)
    return table


def require_columns(columns: Any, required: tuple[str, ...], source: str | Path) -> None:
    missing = [c for c in required if c not in set(columns)]
    if missing:
        raise DataError(f"{source}: missing column(s) {', '.join(repr(c) for c in missing)} "
                        f"(has {', '.join(map(str, columns))})")


def decode_base64_image(value: str, source: str) -> bytes:
    """VLMEvalKit's `image` column: a base64-encoded image file."""
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as err:
        raise DataError(f"{source}: the image is not valid base64 ({err})") from None


def cell_text(value: Any) -> str:
    """A table cell as text: NaN / None -> "" (pandas reads empty option cells as NaN in parquet)."""
    if value is None:
        return ""
    if isinstance(value, float) and value != value:
        return ""
    return str(value)
