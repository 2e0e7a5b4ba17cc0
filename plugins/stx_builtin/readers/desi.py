"""DESI coadd and spectra files (healpix and tile), read in row chunks with flat memory.

Layout: ``FIBERMAP`` (one row per spectrum: TARGETID, TARGET_RA, TARGET_DEC, ...) and, per arm
``X`` in b, r, z: ``X_WAVELENGTH`` (npix,), ``X_FLUX``/``X_IVAR`` (nspec, npix) float32,
``X_MASK`` (nspec, npix) uint32 stored as int32 + BZERO (a CompImageHDU in spectra files), and
``X_RESOLUTION`` (nspec, ndiag, npix).

How it is read
--------------
The file is opened once, memory-mapped, with integer images left unscaled. Each chunk of rows is
a slice of the memory map (or a ``section`` of the decompressed tiles of a compressed HDU, as the
spectra files' masks are), converted once to native float32. FIBERMAP's three columns are read
from a memory map of the table rows at their TFORM offsets. No astropy Table is built, no HDU is
loaded whole, and ``X_RESOLUTION`` is read only when ``with_resolution=True``. A pixel is bad
when its mask is non-zero (the physical uint32 value, BZERO applied), its ivar is <= 0, or
flux/ivar are NaN/inf.

Resolving power
---------------
Measured from the file's resolution matrices, per arm and per pixel, on up to 8 rows with valid
kernels (sum > 0.5) taken from at most 4 contiguous blocks of 16 rows spread over the file:
the Gaussian-equivalent FWHM is ``2.3548 * sqrt(second moment of the kernel)`` pixels times the
pixel width, R = lambda / FWHM, and the per-pixel median over those rows is the arm's
``resolving_power`` (npix,). Dead fibres have all-zero kernels and are skipped; a pixel without
any valid kernel takes the value of the nearest pixel that has one. If no sampled row has a valid
kernel the arm's ``resolving_power`` is None (never a made-up value).

Metadata
--------
``ids = str(TARGETID)`` in coadd files. Spectra (per-exposure) files, recognised by an ``EXPID``
column in FIBERMAP without the coadd's ``COADD_NUMEXP``, hold several rows per TARGETID: each row is
kept as its own spectrum with ``id = "TARGETID:ROW"`` (ROW = row in the file), so ids stay unique;
``extra["targetid"]`` (int64) carries the TARGETID for catalogue joins in both kinds.
``rv_kms`` is NaN (DESI redshifts are in companion catalogues). ``snr`` per arm (b, r, z) is the
median of ``flux * sqrt(ivar)`` over the good pixels among every 8th pixel (about 300 samples
per arm; the sort behind an all-pixel median was the costliest step of a read); 0 for an arm
with no good pixel, e.g. one whose ivar is 0 everywhere. That is a per-spectrum situation: the
spectrum is kept, fully masked in that arm. ``extra["n_bad_input"]`` counts NaN/inf/negative-ivar
input pixels over the arms.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.errors import FormatError
from stxcli.hookspecs import hookimpl
from stxcli.protocols import PRIORITY_SURVEY, FileProbe
from stxcli.spectra import Arm, SpectrumBatch, SpectrumMeta

from ._fits import (SNR_STRIDE, ImageRows, RawHdu, clean_flux_ivar, file_map, is_plain_file, masked_median,
                    median_snr, native_f32, open_fits, raw_columns_plain, raw_hdu, raw_image, raw_table_columns,
                    require_hdu, scan_headers, table_column_names, table_columns)

ARMS = ("b", "r", "z")
_FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))
_N_RESOLUTION_ROWS = 8


class DesiReader:
    name = "desi"
    version = "1.0.0"
    priority = PRIORITY_SURVEY
    extensions = (".fits", ".fits.gz")
    description = "DESI coadd and spectra files (healpix or tile): FIBERMAP + B/R/Z arms"

    # ------------------------------------------------------------------------- identify
    def identify(self, probe: FileProbe) -> bool:
        fm = probe.hdu("FIBERMAP")
        if fm is None or fm.kind != "bintable" or "TARGETID" not in fm.columns:
            return False
        names = {h.name for h in probe.hdus}
        return any({f"{a.upper()}_WAVELENGTH", f"{a.upper()}_FLUX", f"{a.upper()}_IVAR"} <= names for a in ARMS)

    # ----------------------------------------------------------------------------- read
    def read(self, path: Path, *, chunk_size: int = 1024, with_resolution: bool = False) -> Iterator[SpectrumBatch]:
        path = Path(path)
        if chunk_size < 1:
            raise ValueError("chunk_size must be >= 1")
        hdus = _scan_plain(path)
        if hdus is not None:
            yield from self._read_plain(path, hdus, chunk_size, with_resolution)
            return
        with open_fits(path, raw_scaling=True) as hdul:
            fm = require_hdu(hdul, "FIBERMAP", path)
            cols = {c.upper() for c in fm.columns.names}
            for c in ("TARGETID", "TARGET_RA", "TARGET_DEC"):
                if c not in cols:
                    raise FormatError(f"{path}: FIBERMAP lacks column {c}")
            nspec = int(fm.header["NAXIS2"])
            per_exposure = "EXPID" in cols and "COADD_NUMEXP" not in cols
            arms = [a for a in ARMS if f"{a.upper()}_FLUX" in hdul]
            if not arms:
                raise FormatError(f"{path}: no B/R/Z_FLUX HDU (not a DESI spectra or coadd file)")
            filemap = file_map(path)
            layout = {a: self._arm_layout(hdul, a, nspec, path, filemap, with_resolution) for a in arms}
            rpower = {a: self._resolving_power(layout[a], nspec) for a in arms}
            fibermap = table_columns(hdul, "FIBERMAP", ("TARGETID", "TARGET_RA", "TARGET_DEC"), path)
            for start in range(0, nspec, chunk_size):
                stop = min(start + chunk_size, nspec)
                yield self._chunk(path, fibermap(start, stop), layout, rpower, start, stop, per_exposure,
                                  with_resolution)

    def _read_plain(self, path: Path, hdus: list[RawHdu], chunk_size: int, with_resolution: bool
                    ) -> Iterator[SpectrumBatch]:
        """:meth:`read` of an uncompressed file from its scanned headers: every array is a view
        into one memory map of the file at the offsets the scan found."""
        fm = raw_hdu(hdus, "FIBERMAP", path)
        cols = table_column_names(fm)
        for c in ("TARGETID", "TARGET_RA", "TARGET_DEC"):
            if c not in cols:
                raise FormatError(f"{path}: FIBERMAP lacks column {c}")
        nspec = int(fm.header.get("NAXIS2", 0))
        per_exposure = "EXPID" in cols and "COADD_NUMEXP" not in cols
        names = {h.name for h in hdus}
        arms = [a for a in ARMS if f"{a.upper()}_FLUX" in names]
        if not arms:
            raise FormatError(f"{path}: no B/R/Z_FLUX HDU (not a DESI spectra or coadd file)")
        filemap = file_map(path)
        assert filemap is not None
        layout = {}
        for a in arms:
            X = a.upper()
            wh = raw_hdu(hdus, f"{X}_WAVELENGTH", path)
            wave = np.array(raw_image(wh, filemap, path), dtype=np.float64).ravel()
            if "BSCALE" in wh.header or "BZERO" in wh.header:
                wave = wave * float(wh.header.get("BSCALE", 1.0)) + float(wh.header.get("BZERO", 0.0))
            lay: dict[str, Any] = {"name": a, "wave": wave}
            for kind in ("FLUX", "IVAR", "MASK", "RESOLUTION"):
                key = f"{X}_{kind}"
                if key not in names and kind in ("MASK", "RESOLUTION"):
                    if kind == "RESOLUTION" and with_resolution:
                        raise FormatError(f"{path}: HDU {key!r} is missing (resolution matrix requested)")
                    lay[kind] = None
                    continue
                rows = ImageRows.from_raw(raw_hdu(hdus, key, path), path, filemap)
                self._check_shape(rows, nspec, wave.size, key, X, path)
                lay[kind] = rows
            layout[a] = lay
        rpower = {a: self._resolving_power(layout[a], nspec) for a in arms}
        fibermap = raw_table_columns(fm, ("TARGETID", "TARGET_RA", "TARGET_DEC"), path, filemap)
        for start in range(0, nspec, chunk_size):
            stop = min(start + chunk_size, nspec)
            yield self._chunk(path, fibermap(start, stop), layout, rpower, start, stop, per_exposure,
                              with_resolution)

    @staticmethod
    def _check_shape(rows: ImageRows, nspec: int, npix: int, key: str, X: str, path: Path) -> None:
        if not rows.shape or rows.shape[0] != nspec or rows.shape[-1] != npix:
            raise FormatError(
                f"{path}: {key} has shape {rows.shape}, expected ({nspec}, ..., {npix}) "
                f"(FIBERMAP rows, {X}_WAVELENGTH pixels)"
            )

    def _arm_layout(self, hdul: Any, arm: str, nspec: int, path: Path, filemap: np.ndarray | None,
                    with_resolution: bool) -> dict[str, Any]:
        X = arm.upper()
        wave = np.asarray(require_hdu(hdul, f"{X}_WAVELENGTH", path).data, dtype=np.float64).ravel()
        out: dict[str, Any] = {"name": arm, "wave": wave}
        for kind in ("FLUX", "IVAR", "MASK", "RESOLUTION"):
            key = f"{X}_{kind}"
            if kind == "MASK" and key not in hdul:
                out[kind] = None  # optional: mask from ivar only
                continue
            if kind == "RESOLUTION" and key not in hdul:
                if with_resolution:
                    raise FormatError(f"{path}: HDU {key!r} is missing (resolution matrix requested)")
                out[kind] = None
                continue
            rows = ImageRows(hdul, key, path, filemap)
            self._check_shape(rows, nspec, wave.size, key, X, path)
            out[kind] = rows
        return out

    def _resolving_power(self, lay: dict[str, Any], nspec: int) -> np.ndarray | None:
        """R per pixel from up to _N_RESOLUTION_ROWS rows with valid kernels, read as a few
        contiguous blocks spread over the file (one slice each, not row by row)."""
        hdu = lay["RESOLUTION"]
        if hdu is None or nspec == 0:
            return None
        block = min(nspec, 2 * _N_RESOLUTION_ROWS)
        starts = np.unique(np.linspace(0, nspec - block, min(4, max(1, nspec // block))).round().astype(int))
        kept: list[np.ndarray] = []
        n_valid = 0
        for a in starts:
            view = hdu(int(a), int(a) + block)  # a memory-map view: nothing read yet
            # cheap pre-filter on a few samples of the central diagonal (about 0.3-0.6 for a
            # real kernel, 0 for a dead fibre), then convert only the rows that pass
            centre = np.asarray(view[:, view.shape[1] // 2, :: max(1, view.shape[2] // 64)], dtype=np.float32)
            rows = np.flatnonzero(centre.max(axis=1) > 0.05)[: _N_RESOLUTION_ROWS - n_valid]
            if rows.size:
                res = native_f32(view[rows])
                ok = res.sum(axis=1).max(axis=1) > 0.5  # at least one valid kernel in the row
                kept.append(res[ok])
                n_valid += int(ok.sum())
            if n_valid >= _N_RESOLUTION_ROWS:
                break
        if not kept:
            return None
        res = np.concatenate(kept)[:_N_RESOLUTION_ROWS]
        return resolving_power_from_resolution(res, lay["wave"]) if len(res) else None

    def _chunk(self, path: Path, fibermap: dict[str, np.ndarray], layout: dict[str, dict[str, Any]],
               rpower: dict[str, Any], start: int, stop: int, per_exposure: bool,
               with_resolution: bool) -> SpectrumBatch:
        n = stop - start
        arms: list[Arm] = []
        n_bad = np.zeros(n, dtype=np.int64)
        snr: dict[str, np.ndarray] = {}
        for a, lay in layout.items():
            flux = native_f32(lay["FLUX"](start, stop))
            ivar = native_f32(lay["IVAR"](start, stop))
            if lay["MASK"] is not None:
                raw = lay["MASK"](start, stop)
                zero = lay["MASK"].zero_raw
                if raw.dtype.kind in "iu" and float(zero).is_integer():
                    zero = raw.dtype.type(int(zero))
                bad = raw != zero
            else:
                bad = np.zeros(flux.shape, dtype=bool)
            flux, ivar, mask, nb = clean_flux_ivar(flux, ivar, bad)
            n_bad += nb
            snr[a] = median_snr(flux, ivar, mask, stride=SNR_STRIDE)
            res = native_f32(lay["RESOLUTION"](start, stop)) if with_resolution else None
            arms.append(Arm(name=a, wave=lay["wave"], flux=flux, ivar=ivar, mask=mask,
                            resolving_power=rpower[a], resolution=res))
        tid = fibermap["TARGETID"].astype(np.int64, copy=False)
        rows = np.arange(start, stop, dtype=np.int64)
        if per_exposure:
            ids = np.char.add(np.char.add(tid.astype(str), ":"), rows.astype(str))
        else:
            ids = tid.astype(str)
        meta = SpectrumMeta(
            ids=ids,
            survey="desi",
            source_file=np.full(n, str(path)),
            source_row=rows,
            ra=fibermap["TARGET_RA"].astype(np.float64, copy=False),
            dec=fibermap["TARGET_DEC"].astype(np.float64, copy=False),
            rv_kms=np.full(n, np.nan),
            snr=snr,
            extra={"targetid": tid, "n_bad_input": n_bad},
        )
        return SpectrumBatch(arms=arms, meta=meta)


def _scan_plain(path: Path) -> list[RawHdu] | None:
    """The scanned headers of an uncompressed DESI file without tile-compressed HDUs, or None
    (gzip files, the spectra files' compressed masks, anything the scan cannot parse): those are
    read through astropy, which also gives the error for a broken file."""
    try:
        if not path.is_file() or not is_plain_file(path):
            return None
        hdus = scan_headers(path)
    except (OSError, FormatError):
        return None
    if any(h.compressed for h in hdus):
        return None
    fm = [h for h in hdus if h.name == "FIBERMAP"]
    if fm and not raw_columns_plain(fm[0], ("TARGETID", "TARGET_RA", "TARGET_DEC")):
        return None  # scaled or unusual columns: astropy's table access
    return hdus


def resolving_power_from_resolution(res: np.ndarray, wave: np.ndarray) -> np.ndarray | None:
    """Per-pixel R = lambda / FWHM from DESI resolution matrices ``res`` (nrow, ndiag, npix).

    The kernel of pixel j is ``res[:, :, j]`` over the diagonal offsets ``ndiag//2 .. -ndiag//2``;
    its second moment gives a Gaussian-equivalent sigma (pixels), FWHM = 2.3548 sigma times the
    local pixel width. Rows whose kernel sum is <= 0.5 (dead fibres: all zeros) are ignored;
    the result is the median over the valid rows, or None when no row is valid.
    """
    ndiag = res.shape[1]
    k = np.arange(ndiag // 2, -(ndiag // 2) - 1, -1, dtype=res.dtype)
    s = res.sum(axis=1)  # (nrow, npix)
    valid = s > 0.5
    if not valid.any():
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.einsum("d,rdp->rp", k, res) / s
        var = np.einsum("d,rdp->rp", k * k, res) / s - m1 * m1
        dw = np.gradient(wave)
        rp = wave[None, :] / (_FWHM_PER_SIGMA * np.sqrt(var) * dw[None, :])
    bad = ~valid | ~np.isfinite(rp) | (var <= 0)
    out = masked_median(rp.T, bad.T)  # per pixel, over the valid rows
    if np.isnan(out).any():  # a pixel with no valid kernel: nearest valid pixel's value
        good = np.flatnonzero(~np.isnan(out))
        if good.size == 0:
            return None
        idx = np.interp(np.arange(out.size), good, good).round().astype(int)
        out = out[idx]
    return out.astype(np.float64)


@hookimpl
def register_readers(register: Any) -> None:
    register(DesiReader())
