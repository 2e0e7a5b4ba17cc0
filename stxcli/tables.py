"""Catalog tables (FITS or CSV) read without type guessing, and a vectorised id join.

Used wherever stx reads a user's catalog: label catalogs for ``stx featurize``, truth tables for
``stx evaluate``, input catalogs for ``stx predict``. Column names are matched case-insensitively
(stored lower-case); CSV ids keep their exact text, because a 17-digit DESI TARGETID does not
survive a float and an id with a leading zero does not survive an integer.
"""

from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FormatError, StxError

_NULL_STRINGS = ("", "nan", "NaN", "NAN", "na", "NA", "N/A", "null", "NULL", "None", "--")


@dataclass
class Table:
    """A table read from disk: lower-cased column name -> 1-d array (numbers as float64 or int,
    text as str)."""

    path: Path
    columns: dict[str, np.ndarray]
    source: str  # e.g. "HDU PREDICTIONS" or "CSV"
    #: CSV only: the stripped text of every column, so that ids keep their exact spelling
    #: (a 17-digit DESI TARGETID does not survive a float, nor does a leading zero).
    text: dict[str, np.ndarray] = field(default_factory=dict)
    n_rows: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_rows = len(next(iter(self.columns.values()))) if self.columns else 0

    def ids(self, name: str, what: str) -> np.ndarray:
        """Column ``name`` as stripped id strings (StxError when the column is absent)."""
        if name not in self.columns:
            raise StxError(f"{self.path}: {what} has no column {name!r} (columns: {', '.join(self.columns)})")
        if name in self.text:
            return self.text[name]
        return id_strings(self.columns[name])

    def numeric(self, name: str) -> np.ndarray | None:
        col = self.columns.get(name)
        if col is None or not np.issubdtype(col.dtype, np.number) or np.issubdtype(col.dtype, np.complexfloating):
            return None
        return col.astype(np.float64)


# ----------------------------------------------------------------------------- reading tables

def _is_fits(path: Path) -> bool:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            return fh.read(9) == b"SIMPLE  ="
    except (OSError, EOFError):
        return False


def _lower_columns(names: list[str], path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for n in names:
        key = n.strip().lower()
        if key in out:
            raise FormatError(f"{path}: columns {out[key]!r} and {n!r} differ only in case")
        out[key] = n
    return out


def _fits_columns(hdu: Any, path: Path) -> dict[str, np.ndarray]:
    data = hdu.data
    cols: dict[str, np.ndarray] = {}
    if data is None:
        return cols
    for key, name in _lower_columns(list(data.columns.names), path).items():
        arr = np.asarray(data[name])
        if arr.ndim != 1:
            continue  # vector columns (e.g. spectra) are not labels
        if arr.dtype.kind in "SU":
            arr = np.char.strip(arr.astype(str))
        elif arr.dtype.kind == "b":
            arr = arr.astype(np.int8)
        else:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        cols[key] = arr
    return cols


def read_fits_table(path: Path, prefer: str | None = None) -> Table:
    """The HDU named ``prefer`` if present, else the first table HDU."""
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            hdus = [h for h in hdul if isinstance(h, (fits.BinTableHDU, fits.TableHDU))]
            if not hdus:
                raise FormatError(f"{path}: no table HDU in this FITS file")
            chosen = next((h for h in hdus if prefer and h.name.upper() == prefer.upper()), hdus[0])
            cols = _fits_columns(chosen, path)
            source = f"HDU {chosen.name or hdul.index_of(chosen)}"
    except FormatError:
        raise
    except (OSError, ValueError, TypeError) as exc:
        raise FormatError(f"{path}: cannot read the FITS table: {exc}") from exc
    if not cols:
        raise FormatError(f"{path}: the table ({source}) has no columns")
    return Table(path, cols, source)


def _csv_column(text: np.ndarray) -> np.ndarray:
    """Numbers as float64 (empty / NaN-like cells -> NaN) when every cell parses, else the text."""
    null = np.isin(text, _NULL_STRINGS)
    try:
        return np.where(null, "nan", text).astype(np.float64)
    except ValueError:
        return text


def read_csv_table(path: Path) -> Table:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if not header:
                raise FormatError(f"{path}: empty CSV file (no header line)")
            rows = [r for r in reader if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FormatError(f"{path}: cannot read the CSV table: {exc}") from exc
    bad = next((i for i, r in enumerate(rows) if len(r) != len(header)), None)
    if bad is not None:
        raise FormatError(f"{path}: data line {bad + 1} has {len(rows[bad])} fields, the header has {len(header)}")
    names = _lower_columns(header, path)
    cols, text = {}, {}
    for j, key in enumerate(names):
        text[key] = np.char.strip(np.asarray([r[j] for r in rows], dtype=str))
        cols[key] = _csv_column(text[key])
    return Table(path, cols, "CSV", text)


def read_table(path: Path, prefer_hdu: str | None = None) -> Table:
    if not path.exists():
        raise StxError(f"{path}: no such file")
    if path.is_dir():
        raise StxError(f"{path}: is a directory, expected a FITS or CSV table")
    if _is_fits(path):
        return read_fits_table(path, prefer_hdu)
    name = path.name.lower()
    if name.endswith((".fits", ".fit", ".fts", ".fits.gz", ".fit.gz")):
        raise FormatError(f"{path}: not a FITS file (no SIMPLE card)")
    return read_csv_table(path)


# ----------------------------------------------------------------------------- joining

def id_strings(col: np.ndarray) -> np.ndarray:
    """Ids as stripped strings; integral floats (e.g. 123.0 from a CSV or FITS float column)
    become '123' so that they match integer ids."""
    if col.dtype.kind in "iu":
        return col.astype(str)
    if col.dtype.kind == "f":
        integral = np.isfinite(col) & (np.floor(col) == col) & (np.abs(col) < 2**53)
        out = col.astype(str)
        out[integral] = col[integral].astype(np.int64).astype(str)
        out[~np.isfinite(col)] = ""
        return out
    return np.char.strip(col.astype(str))


def join_ids(pred_ids: np.ndarray, truth_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (pred_rows, truth_rows) of every pred row whose id is in the truth (truth ids
    must be unique; pred ids may repeat). Vectorised: sort + searchsorted."""
    order = np.argsort(truth_ids, kind="stable")
    sorted_ids = truth_ids[order]
    pos = np.searchsorted(sorted_ids, pred_ids)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    hit = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == pred_ids) if len(sorted_ids) else np.zeros(len(pred_ids), bool)
    pred_rows = np.flatnonzero(hit)
    return pred_rows, order[pos_c[hit]]
