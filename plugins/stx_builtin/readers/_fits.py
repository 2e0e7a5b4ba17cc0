"""Shared FITS plumbing of the built-in readers (not a plugin: no entry point).

Every reader opens its file through :func:`open_fits`, which turns the many ways a FITS file can
be broken (missing, not FITS, truncated, bad gzip stream, an HDU that is not there) into one
:class:`~stxcli.errors.FormatError` line that names the file. astropy is imported inside the
functions so that importing a reader module stays cheap.
"""

from __future__ import annotations

import re
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.errors import FormatError, StxError
from stxcli.fitsio import RawHdu, read_file_bytes, scan_buffer, scan_headers  # noqa: F401 - the readers' import point

#: Exceptions astropy / gzip / numpy raise on a broken file (converted to FormatError).
BROKEN_FILE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    EOFError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    zlib.error,
)

_FITS_SUFFIXES = (".fits", ".fit", ".fts")
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz")


def file_stem(name: str | Path) -> str:
    """The file name without directory, compression and FITS suffixes:
    ``spectra/spec-1-x.fits.gz`` -> ``spec-1-x``; ``MILES_res2.50_star_m0001V.fits`` ->
    ``MILES_res2.50_star_m0001V``."""
    base = Path(str(name).strip()).name
    low = base.lower()
    for suf in _COMPRESSION_SUFFIXES:
        if low.endswith(suf):
            base, low = base[: -len(suf)], low[: -len(suf)]
            break
    for suf in _FITS_SUFFIXES:
        if low.endswith(suf):
            base = base[: -len(suf)]
            break
    return base


@contextmanager
def open_fits(path: Path, *, raw_scaling: bool = False) -> Iterator[Any]:
    """Open ``path`` read-only with memory mapping and check it is complete.

    All HDU headers are read up front (cheap), which makes astropy seek past every data
    block: a truncated file is detected here, not half-way through a read. ``raw_scaling``
    returns integer images unscaled (BZERO/BSCALE not applied), which lets a memory-mapped
    ``section`` read them (astropy refuses to memory-map scaled images).

    Any failure while the file is open is re-raised as one :class:`FormatError` line.
    """
    from astropy.io import fits

    path = Path(path)
    if not path.exists():
        raise FormatError(f"{path}: no such file")
    if path.is_dir():
        raise FormatError(f"{path}: is a directory, not a spectrum file")
    hdul = None
    try:
        _check_compressed_stream(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hdul = fits.open(
                path, mode="readonly", memmap=True, lazy_load_hdus=False,
                do_not_scale_image_data=raw_scaling,
            )
        for w in caught:
            msg = str(w.message)
            if "truncated" in msg.lower():
                raise FormatError(f"{path}: truncated FITS file ({msg})")
        if len(hdul) == 0:
            raise FormatError(f"{path}: FITS file has no HDU")
        yield hdul
    except StxError:
        raise
    except BROKEN_FILE_ERRORS as exc:
        raise FormatError(f"{path}: corrupt or unreadable FITS file ({type(exc).__name__}: {exc})") from exc
    finally:
        if hdul is not None:
            hdul.close()


def _check_compressed_stream(path: Path) -> None:
    """A gzip/bzip2 file must decompress to its end marker: astropy silently stops at the last
    complete HDU of a cut-off stream, which would make a truncated file look like a wrong layout.
    Costs one decompression pass (small for the single-spectrum files that come compressed)."""
    import bz2
    import gzip

    with open(path, "rb") as fh:
        magic = fh.read(3)
    opener = gzip.open if magic[:2] == b"\x1f\x8b" else bz2.open if magic == b"BZh" else None
    if opener is None:
        return
    try:
        with opener(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise FormatError(f"{path}: truncated or corrupt compressed file ({exc})") from exc


def require_hdu(hdul: Any, name: str, path: Path) -> Any:
    """The HDU called ``name`` or a FormatError naming the file and what it has instead."""
    try:
        return hdul[name]
    except KeyError:
        have = ", ".join(str(h.name) for h in hdul) or "none"
        raise FormatError(f"{path}: HDU {name!r} is missing (file has: {have})") from None


_TFORM = re.compile(r"^\s*(\d*)([LXBIJKAEDCMPQ])")
_TFORM_BYTES = {"L": 1, "B": 1, "I": 2, "J": 4, "K": 8, "A": 1, "E": 4, "D": 8, "C": 8, "M": 16, "P": 8, "Q": 16}
_TFORM_DTYPE = {"B": "u1", "I": ">i2", "J": ">i4", "K": ">i8", "E": ">f4", "D": ">f8"}


class _BadTform(ValueError):
    """A TFORM this module cannot lay out (its column index is ``args[0]``)."""


def _tform_walk(hdr: Any) -> tuple[list[tuple[str, int, int, str | None]], int]:
    """Each column of a binary table header as (name upper-cased, byte offset in a row, element
    count, big-endian numpy dtype or None for a non-numeric or scaled (TSCAL/TZERO) column), and
    the row width the TFORMs add up to. Raises :class:`_BadTform` for a TFORM it cannot size."""
    cols = []
    pos = 0
    for j in range(1, int(hdr.get("TFIELDS", 0)) + 1):
        m = _TFORM.match(str(hdr.get(f"TFORM{j}", "")))
        if m is None:
            raise _BadTform(j)
        rep = int(m.group(1)) if m.group(1) else 1
        code = m.group(2)
        numeric = code in _TFORM_DTYPE and f"TSCAL{j}" not in hdr and f"TZERO{j}" not in hdr
        cols.append((str(hdr.get(f"TTYPE{j}", "")).strip().upper(), pos, rep, _TFORM_DTYPE[code] if numeric else None))
        pos += (rep + 7) // 8 if code == "X" else rep * _TFORM_BYTES[code]
    return cols, pos


def _column_layout(hdr: Any) -> tuple[dict[str, tuple[int, str | None]], int]:
    """Per column name (upper case): (byte offset in a row, native-readable dtype or None for a
    vector, scaled or non-numeric column), and the row width the TFORMs add up to. Raises
    :class:`_BadTform` for a TFORM it cannot size."""
    cols, pos = _tform_walk(hdr)
    return {name: (off, dtype if count == 1 else None) for name, off, count, dtype in cols}, pos


def is_plain_file(path: Path) -> bool:
    """True for an uncompressed FITS file (raw bytes can be memory-mapped at header offsets)."""
    with open(path, "rb") as fh:
        return fh.read(6) == b"SIMPLE"


def table_columns(hdul: Any, extname: str, names: tuple[str, ...], path: Path) -> Any:
    """A function ``rows(start, stop) -> {name: native array}`` for scalar numeric columns of a
    binary table.

    For an uncompressed file the columns are read straight from a memory map of the table's
    rows at the offsets given by its TFORMs (no astropy ``FITS_rec``, whose 70-column setup costs
    more than reading a DESI FIBERMAP). Otherwise, or for columns with TSCAL/TZERO or vector
    formats, astropy's table access is used.
    """
    hdu = require_hdu(hdul, extname, path)
    hdr = hdu.header
    try:
        offsets, pos = _column_layout(hdr)
    except _BadTform:
        offsets, pos = {}, -1
    fast = (
        pos == int(hdr.get("NAXIS1", -2))
        and all(n in offsets and offsets[n][1] is not None for n in names)
        and is_plain_file(path)
    )
    if fast:
        nrows = int(hdr["NAXIS2"])
        dtype = np.dtype({"names": list(names), "formats": [offsets[n][1] for n in names],
                          "offsets": [offsets[n][0] for n in names], "itemsize": pos})
        mm = np.memmap(path, dtype=dtype, mode="r", offset=int(hdu.fileinfo()["datLoc"]), shape=(nrows,))

        def rows(start: int, stop: int) -> dict[str, np.ndarray]:
            block = mm[start:stop]
            return {n: block[n].astype(block[n].dtype.newbyteorder("="), copy=True) for n in names}

        return rows
    data = hdu.data

    def rows_astropy(start: int, stop: int) -> dict[str, np.ndarray]:
        return {n: np.array(data[n][start:stop]) for n in names}

    return rows_astropy


_BITPIX_DTYPE = {8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class ImageRows:
    """Row access (first numpy axis) to one image HDU without loading the whole HDU.

    In an uncompressed file the HDU's data block is a view, at the offset astropy found
    (``fileinfo()['datLoc']``) and with the dtype and shape of its header, into ``filemap``, one
    numpy memory map of the whole file shared by all HDUs: a slice costs nothing until its pages
    are read, and no astropy per-HDU setup is paid. For a compressed HDU (or a gzip file, where
    ``filemap`` is None) ``hdu.section`` decompresses only the tiles needed. Values are raw:
    BZERO/BSCALE are *not* applied (open the file with ``raw_scaling=True`` so the ``section``
    path is raw too); ``zero_raw`` is the raw value whose physical value is 0.
    """

    def __init__(self, hdul: Any, name: str, path: Path, filemap: np.ndarray | None) -> None:
        from astropy.io import fits

        hdu = require_hdu(hdul, name, path)
        hdr = hdu.header
        naxis = int(hdr.get("NAXIS", 0))
        self.name = name
        self.shape: tuple[int, ...] = tuple(int(hdr[f"NAXIS{j}"]) for j in range(naxis, 0, -1))
        bscale, bzero = float(hdr.get("BSCALE", 1.0)), float(hdr.get("BZERO", 0.0))
        self.zero_raw = -bzero / bscale
        self._hdu = hdu
        self._view: np.ndarray | None = None
        bitpix = int(hdr.get("BITPIX", 0))
        if filemap is not None and not isinstance(hdu, fits.CompImageHDU) and bitpix in _BITPIX_DTYPE and self.shape:
            offset = int(hdu.fileinfo()["datLoc"])  # HDUList.fileinfo re-serialises every header
            dtype = np.dtype(_BITPIX_DTYPE[bitpix])
            if offset + dtype.itemsize * int(np.prod(self.shape)) > filemap.size:
                raise FormatError(f"{path}: HDU {name} extends past the end of the file (truncated)")
            self._view = np.ndarray(self.shape, dtype=dtype, buffer=filemap, offset=offset)

    @classmethod
    def from_raw(cls, hdu: RawHdu, path: Path, filemap: np.ndarray) -> ImageRows:
        """The same access for an HDU found by :func:`scan_headers` (an uncompressed image)."""
        obj = cls.__new__(cls)
        obj.name = hdu.name
        obj.shape = hdu.shape
        bscale, bzero = float(hdu.header.get("BSCALE", 1.0)), float(hdu.header.get("BZERO", 0.0))
        obj.zero_raw = -bzero / bscale
        obj._hdu = None
        obj._view = raw_image(hdu, filemap, path)
        return obj

    def __call__(self, start: int, stop: int) -> np.ndarray:
        if self._view is not None:
            return self._view[start:stop]
        return np.asarray(self._hdu.section[start:stop])


def file_map(path: Path) -> np.ndarray | None:
    """A read-only numpy memory map of an uncompressed file's bytes, or None (compressed)."""
    return np.memmap(path, dtype=np.uint8, mode="r") if is_plain_file(path) else None


def header_float(header: Any, *keys: str, missing: tuple[float, ...] = ()) -> float:
    """The first of ``keys`` present in ``header`` as a float; NaN when absent, blank,
    not numeric or equal to one of the ``missing`` sentinels (e.g. -9999)."""
    for key in keys:
        if key not in header:
            continue
        val = header[key]
        if isinstance(val, bool):
            continue
        try:
            f = float(val)
        except (TypeError, ValueError):
            continue
        if not np.isfinite(f) or f in missing:
            return float("nan")
        return f
    return float("nan")


def header_str(header: Any, key: str) -> str:
    val = header.get(key)
    if val is None or isinstance(val, bool):
        return ""
    return str(val).strip()


def native_f32(a: Any) -> np.ndarray:
    """``a`` as a C-contiguous, native-endian float32 array (one copy at most)."""
    return np.ascontiguousarray(a, dtype=np.float32)


def clean_flux_ivar(flux: np.ndarray, ivar: np.ndarray, bad: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Mask NaN/inf flux or ivar and negative ivar on top of ``bad``; modifies its arguments.

    Returns ``(flux, ivar, mask, n_bad_input)``: ``mask = bad | ivar <= 0 | non-finite`` and
    masked pixels get ``flux = ivar = 0``; ``n_bad_input`` (int64 per spectrum) counts the pixels
    whose *input* flux or ivar was NaN, inf or (ivar) negative, so a caller can flag and warn
    instead of crashing. Rows are screened with two sums (NaN/inf propagate) and a minimum, and
    only suspect rows are examined pixel by pixel, which keeps clean data fast.
    """
    n_bad_input = np.zeros(flux.shape[0], dtype=np.int64)
    if flux.size == 0:
        return flux, ivar, bad, n_bad_input
    with np.errstate(over="ignore", invalid="ignore"):
        # NaN/inf flux make the row sum non-finite; NaN or negative ivar fail min >= 0 and
        # +inf ivar fails a finite max
        suspect = ~np.isfinite(flux.sum(axis=1)) | ~(ivar.min(axis=1) >= 0) | ~np.isfinite(ivar.max(axis=1))
    rows = np.flatnonzero(suspect)
    if rows.size:
        nonfinite = ~np.isfinite(flux[rows]) | ~np.isfinite(ivar[rows]) | (ivar[rows] < 0)
        n_bad_input[rows] = nonfinite.sum(axis=1)
        bad[rows] |= nonfinite
        ivar[rows] = np.where(nonfinite, np.float32(0), ivar[rows])
    mask = bad
    np.logical_or(mask, ivar <= 0, out=mask)
    np.copyto(flux, 0.0, where=mask)
    np.copyto(ivar, 0.0, where=mask)
    return flux, ivar, mask, n_bad_input


def masked_median(values: np.ndarray, bad: np.ndarray) -> np.ndarray:
    """Row-wise median of ``values`` (n, m) over the entries where ``bad`` is False; NaN for a
    row with no good entry. Sort-based and vectorised (about twice as fast as ``nanmedian``)."""
    s = np.where(bad, np.inf, values)
    s.sort(axis=1)
    k = (~bad).sum(axis=1)
    lo = np.maximum((k - 1) // 2, 0)[:, None]
    hi = np.minimum(k // 2, values.shape[1] - 1)[:, None]
    out = 0.5 * (np.take_along_axis(s, lo, axis=1)[:, 0] + np.take_along_axis(s, hi, axis=1)[:, 0])
    out[k == 0] = np.nan
    return out


#: median_snr evaluates the median on every SNR_STRIDE-th pixel (see its docstring).
SNR_STRIDE = 8


def median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, stride: int = 1) -> np.ndarray:
    """Per-spectrum median of ``flux * sqrt(ivar)`` over good pixels; 0 where none is good.

    ``stride > 1`` takes the median over every ``stride``-th pixel only: for a spectrum of a few
    thousand pixels that is still hundreds of samples (a median within a few per cent of the full
    one) at a fraction of the sorting cost, which matters for files of 10^5 spectra.
    """
    f, i, m = (flux, ivar, mask) if stride == 1 else (flux[:, ::stride], ivar[:, ::stride], mask[:, ::stride])
    snr = masked_median(f * np.sqrt(i), m).astype(np.float32)
    if stride > 1:  # rows whose good pixels all fall between the samples: use every pixel
        redo = np.flatnonzero(np.isnan(snr) & ~mask.all(axis=1))
        if redo.size:
            snr[redo] = masked_median(flux[redo] * np.sqrt(ivar[redo]), mask[redo])
    snr[np.isnan(snr)] = 0.0
    return snr


# ------------------------------------------------------------------ direct header scan

def vector_columns(hdu: RawHdu, names: tuple[str, ...]) -> dict[str, tuple[int, int, str]] | None:
    """``name -> (byte offset in a row, element count, big-endian dtype)`` for the numeric,
    unscaled (vector or scalar) columns ``names`` of a binary table HDU, or None when one of them
    is absent, scaled, not numeric or the layout does not add up to NAXIS1 (the caller then
    reads the file through astropy)."""
    hdr = hdu.header
    if str(hdr.get("XTENSION", "")).strip() != "BINTABLE":
        return None
    try:
        cols, pos = _tform_walk(hdr)
    except _BadTform:
        return None
    out = {name: (off, count, dtype) for name, off, count, dtype in cols if name in names}
    if pos != int(hdr.get("NAXIS1", -1)) or any(n not in out or out[n][2] is None for n in names):
        return None
    return out  # type: ignore[return-value]


def raw_hdu(hdus: list[RawHdu], name: str, path: Path) -> RawHdu:
    """The HDU called ``name`` or the FormatError of :func:`require_hdu`."""
    for h in hdus:
        if h.name == name:
            return h
    have = ", ".join(h.name for h in hdus) or "none"
    raise FormatError(f"{path}: HDU {name!r} is missing (file has: {have})")


def raw_image(hdu: RawHdu, filemap: np.ndarray, path: Path) -> np.ndarray:
    """A view into ``filemap`` of an image HDU's raw (big-endian, unscaled) data."""
    bitpix = int(hdu.header.get("BITPIX", 0))
    if bitpix not in _BITPIX_DTYPE or not hdu.shape:
        raise FormatError(f"{path}: HDU {hdu.name} is not an image (BITPIX {bitpix}, shape {hdu.shape})")
    return np.ndarray(hdu.shape, dtype=np.dtype(_BITPIX_DTYPE[bitpix]), buffer=filemap, offset=hdu.data_offset)


def raw_table_columns(hdu: RawHdu, names: tuple[str, ...], path: Path, filemap: np.ndarray) -> Any:
    """:func:`table_columns` for a scanned HDU: ``rows(start, stop) -> {name: native array}`` read
    at the TFORM offsets; only scalar, unscaled numeric columns (what a DESI FIBERMAP's TARGETID,
    TARGET_RA, TARGET_DEC are)."""
    hdr = hdu.header
    try:
        offsets, pos = _column_layout(hdr)
    except _BadTform as bad:
        j = bad.args[0]
        raise FormatError(f"{path}: {hdu.name}: unsupported TFORM{j} {hdr.get(f'TFORM{j}')!r}") from None
    if pos != int(hdr.get("NAXIS1", -1)):
        raise FormatError(f"{path}: {hdu.name}: column widths ({pos}) do not add up to NAXIS1")
    for n in names:
        if n not in offsets:
            raise FormatError(f"{path}: {hdu.name} lacks column {n}")
        if offsets[n][1] is None:
            raise FormatError(f"{path}: {hdu.name} column {n} is not a plain numeric scalar")
    nrows = int(hdr.get("NAXIS2", 0))
    dtype = np.dtype({"names": list(names), "formats": [offsets[n][1] for n in names],
                      "offsets": [offsets[n][0] for n in names], "itemsize": pos})
    table = np.ndarray((nrows,), dtype=dtype, buffer=filemap, offset=hdu.data_offset)

    def rows(start: int, stop: int) -> dict[str, np.ndarray]:
        block = table[start:stop]
        return {n: block[n].astype(block[n].dtype.newbyteorder("="), copy=True) for n in names}

    return rows


def raw_columns_plain(hdu: RawHdu, names: tuple[str, ...]) -> bool:
    """Whether :func:`raw_table_columns` can read ``names`` of ``hdu`` (absent columns count as
    plain: reading them is the error the caller reports)."""
    try:
        offsets, pos = _column_layout(hdu.header)
    except _BadTform:
        return False
    return pos == int(hdu.header.get("NAXIS1", -1)) and all(offsets[n][1] is not None for n in names if n in offsets)


def table_column_names(hdu: RawHdu) -> set[str]:
    return {str(hdu.header.get(f"TTYPE{j}", "")).strip().upper() for j in range(1, int(hdu.header.get("TFIELDS", 0)) + 1)}
