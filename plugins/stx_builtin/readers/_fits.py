"""Shared FITS plumbing of the built-in readers (not a plugin: no entry point).

Every reader opens its file through :func:`open_fits`, which turns the many ways a FITS file can
be broken (missing, not FITS, truncated, bad gzip stream, an HDU that is not there) into one
:class:`~stxcli.errors.FormatError` line that names the file. astropy is imported inside the
functions so that importing a reader module stays cheap.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.errors import FormatError, StxError

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


def require_hdu(hdul: Any, name: str, path: Path) -> Any:
    """The HDU called ``name`` or a FormatError naming the file and what it has instead."""
    try:
        return hdul[name]
    except KeyError:
        have = ", ".join(str(h.name) for h in hdul) or "none"
        raise FormatError(f"{path}: HDU {name!r} is missing (file has: {have})") from None


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
    """Mask NaN/inf flux or ivar and negative ivar on top of ``bad`` (in place where possible).

    Returns ``(flux, ivar, mask, n_bad_input)``: bad pixels get ``flux = ivar = 0``;
    ``n_bad_input`` (int64 per spectrum) counts the pixels whose *input* flux or ivar was NaN,
    inf or (ivar) negative, so a caller can flag and warn instead of crashing.
    """
    nonfinite = ~np.isfinite(flux) | ~np.isfinite(ivar) | (ivar < 0)
    n_bad_input = nonfinite.sum(axis=1, dtype=np.int64)
    mask = bad | nonfinite | (ivar == 0)
    flux[mask] = 0.0
    ivar[mask] = 0.0
    return flux, ivar, mask, n_bad_input


def median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-spectrum median of ``flux * sqrt(ivar)`` over good pixels; 0 where none is good."""
    s = flux * np.sqrt(ivar)
    s[mask] = np.nan
    out = np.zeros(flux.shape[0], dtype=np.float32)
    has = ~mask.all(axis=1)
    if has.any():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            out[has] = np.nanmedian(s[has], axis=1)
    return out
