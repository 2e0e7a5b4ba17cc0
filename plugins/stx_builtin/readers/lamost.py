"""LAMOST low-resolution (LRS) spectra, every layout, detected per file by content.

Layouts
-------
* **image** (DR1-DR8): one PrimaryHDU holding a (5, N) float32 image. ``EXTEN0`` names the rows.
  Rows 0, 1, 3 are flux, inverse variance and and-mask in every release; row 2 differs: in DR1
  (``EXTEN0 = 'Flux Inverse Subcontinuum Andmask Ormask'``) it is a continuum-normalised flux,
  in DR6/DR7 (``'Flux, Inverse, Wavelength, Andmask, Ormask'``) it is the wavelength. Row 2 is
  used as the wavelength only when ``EXTEN0`` names it so *and* its content is a plausible,
  increasing grid that agrees with ``COEFF0``/``COEFF1`` to 1 A; otherwise the grid is
  ``10**(COEFF0 + COEFF1 * i)``. Without ``EXTEN0`` the same content test decides.
* **table** (DR9 onwards): HDU 1 ``COADD``, one row of vector columns ``FLUX, IVAR, WAVELENGTH,
  ANDMASK, ORMASK, NORMALIZATION``. Lengths are read per column (NORMALIZATION may be shorter
  than FLUX; it is not used). The grid is the ``WAVELENGTH`` column (some files are on a
  3820-pixel grid whose header WFITTYPE/COEFF are -9999).

The header's CRVAL1/CD1_1 with ``CTYPE1 = 'LINEAR'`` are log10 values and are never used.
Wavelengths are vacuum and heliocentric (``VACUUM = T``, ``HELIO = T``); no conversion is made.

Per spectrum
------------
* one arm ``"lrs"``, resolving power 1800 (LAMOST LRS nominal, a scalar);
* mask = ``ivar == 0 | ANDMASK != 0`` (the and-mask flags pixels bad in *every* exposure;
  the or-mask, bad in at least one, is not used) plus NaN/inf input, counted in
  ``meta.extra["n_bad_input"]``;
* ``id`` = ``str(OBSID)``; DR1 files have no OBSID, there ``id`` is the FILENAME stem
  (``spec-55862-B6212_sp06-005``) and ``extra["obsid"] = -1``;
* ``rv_kms = c * Z``: LAMOST ``Z`` is a redshift; ``c*Z`` equals the catalogue ``rv`` (checked
  on the DR1 labels);
* ``snr`` bands u, g, r, i, z from ``SNRU..SNRZ`` (DR6+) or ``SN_U..SN_Z`` (DR1).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.errors import FormatError
from stxcli.hookspecs import hookimpl
from stxcli.protocols import PRIORITY_SURVEY, FileProbe
from stxcli.spectra import C_KMS, Arm, SpectrumBatch, SpectrumMeta

from ._fits import (clean_flux_ivar, file_stem, header_float, header_str, native_f32, open_fits, raw_image,
                    read_file_bytes, require_hdu, scan_buffer, table_column_names, vector_columns)

#: Nominal resolving power of the LAMOST low-resolution spectrographs.
LAMOST_LRS_R = 1800.0
BANDS = ("u", "g", "r", "i", "z")
_MISSING = (-9999.0, -999.0)
_TABLE_COLUMNS = ("FLUX", "IVAR", "WAVELENGTH")


def _is_lamost_header(hdr: Any) -> bool:
    tel = header_str(hdr, "TELESCOP").upper()
    origin = header_str(hdr, "ORIGIN").upper()
    author = header_str(hdr, "AUTHOR").upper()
    return tel == "LAMOST" or "LAMOST" in origin or author.startswith("LAMOST")


def _exten0_rows(hdr: Any) -> list[str]:
    """Row names from ``EXTEN0`` ('Flux, Inverse, Wavelength, ...'), lower-case."""
    text = header_str(hdr, "EXTEN0")
    return [t.lower() for t in re.split(r"[,\s]+", text) if t]


class LamostReader:
    name = "lamost"
    version = "1.0.0"
    priority = PRIORITY_SURVEY
    extensions = (".fits", ".fits.gz", ".fit", ".fit.gz")
    description = "LAMOST LRS spectra: DR1-DR8 5-row image and DR9+ COADD binary table (.fits, .fits.gz)"

    # ------------------------------------------------------------------------- identify
    def identify(self, probe: FileProbe) -> bool:
        if not probe.hdus:
            return False
        primary = probe.hdus[0]
        if not _is_lamost_header(primary.cards):
            return False
        coadd = probe.hdu("COADD")
        if coadd is not None and coadd.kind == "bintable":
            return all(c in coadd.columns for c in _TABLE_COLUMNS)
        # single-HDU image: numpy shape (5, N)
        return primary.kind == "primary" and len(primary.shape) == 2 and primary.shape[0] == 5 and primary.shape[1] > 100

    # ----------------------------------------------------------------------------- read
    def read(self, path: Path, *, chunk_size: int = 1024, with_resolution: bool = False) -> Iterator[SpectrumBatch]:
        """One batch of one spectrum (a LAMOST LRS file holds a single spectrum)."""
        path = Path(path)
        fast = self._read_raw(path)
        if fast is not None:
            hdr, (flux, ivar, wave, andmask) = fast
            yield self._batch(hdr, path, flux, ivar, wave, andmask)
            return
        with open_fits(path) as hdul:
            hdr = hdul[0].header
            if "COADD" in hdul:
                flux, ivar, wave, andmask = self._read_table(hdul, path)
            elif hdul[0].data is not None and hdul[0].data.ndim == 2 and hdul[0].data.shape[0] == 5:
                flux, ivar, wave, andmask = self._read_image(hdul[0], path)
            else:
                shape = None if hdul[0].data is None else hdul[0].data.shape
                raise FormatError(
                    f"{path}: not a LAMOST LRS layout (no COADD table and primary data shape {shape}, "
                    "expected (5, N))"
                )
            batch = self._batch(hdr, path, flux, ivar, wave, andmask)
        yield batch

    def _batch(self, hdr: Any, path: Path, flux: np.ndarray, ivar: np.ndarray, wave: np.ndarray,
               andmask: np.ndarray) -> SpectrumBatch:
        flux, ivar = native_f32(flux)[None, :], native_f32(ivar)[None, :]
        bad = (np.asarray(andmask) != 0)[None, :]
        flux, ivar, mask, n_bad = clean_flux_ivar(flux, ivar, bad)
        meta = self._meta(hdr, path, n_bad)
        arm = Arm(name="lrs", wave=wave, flux=flux, ivar=ivar, mask=mask, resolving_power=LAMOST_LRS_R)
        return SpectrumBatch(arms=[arm], meta=meta).validate()

    def _read_raw(self, path: Path) -> tuple[dict[str, Any], tuple[np.ndarray, ...]] | None:
        """Either layout read from the file's bytes (decompressed once), its headers scanned
        without astropy: several times faster than opening a one-spectrum ``.fits.gz`` through
        astropy, which dominated featurizing LAMOST files. None for anything else (a scaled
        image, a table whose columns are not plain numeric vectors: those go through astropy,
        which reports what is wrong); the same checks and messages as :meth:`_read_table` and
        :meth:`_read_image` otherwise."""
        data = read_file_bytes(path)
        hdus = scan_buffer(data, path)
        coadd = next((h for h in hdus if h.name == "COADD"), None)
        if coadd is None:
            h = hdus[0].header
            if (h.get("BITPIX") != -32 or h.get("NAXIS") != 2 or h.get("NAXIS2") != 5 or "BSCALE" in h
                    or "BZERO" in h or int(h.get("NAXIS1", 0)) <= 0):
                return None
            return h, self._read_image(_Image(raw_image(hdus[0], data, path), h), path)
        has_andmask = "ANDMASK" in table_column_names(coadd)
        cols = vector_columns(coadd, _TABLE_COLUMNS + (("ANDMASK",) if has_andmask else ()))
        if cols is None:
            return None
        if int(coadd.header.get("NAXIS2", 0)) < 1:
            raise FormatError(f"{path}: COADD table has no row")

        def col(name: str) -> np.ndarray:
            off, count, dtype = cols[name]
            return np.frombuffer(data, dtype=dtype, count=count, offset=coadd.data_offset + off)

        return hdus[0].header, _table_arrays(col, has_andmask, path)

    def _read_table(self, hdul: Any, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        hdu = require_hdu(hdul, "COADD", path)
        names = [n.upper() for n in hdu.columns.names]
        missing = [c for c in _TABLE_COLUMNS if c not in names]
        if missing:
            raise FormatError(f"{path}: COADD table lacks column(s) {', '.join(missing)}")
        data = hdu.data
        if data is None or len(data) < 1:
            raise FormatError(f"{path}: COADD table has no row")

        def col(name: str) -> np.ndarray:
            return np.asarray(data[name][0]).ravel()  # per-column length (they may differ)

        return _table_arrays(col, "ANDMASK" in names, path)

    def _read_image(self, hdu: Any, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        data = np.asarray(hdu.data)
        hdr = hdu.header
        npix = data.shape[1]
        rows = _exten0_rows(hdr)
        coeff_wave = _coeff_grid(hdr, npix)
        row2 = data[2].astype(np.float64)
        row2_says_wave = len(rows) >= 3 and rows[2].startswith("wave")
        row2_named_other = len(rows) >= 3 and not row2_says_wave
        if row2_says_wave:
            if not _plausible_grid(row2, coeff_wave):
                raise FormatError(
                    f"{path}: EXTEN0 names row 2 the wavelength but it is not an increasing grid "
                    "matching COEFF0/COEFF1"
                )
            wave = row2
        elif not row2_named_other and _plausible_grid(row2, coeff_wave):
            wave = row2  # no EXTEN0: the content says row 2 is a wavelength grid
        else:
            if coeff_wave is None:
                raise FormatError(f"{path}: no wavelength (row 2 is {rows[2] if rows else 'unnamed'}; COEFF0/COEFF1 missing)")
            wave = coeff_wave
        _check_grid(wave, path, "wavelength grid")
        return data[0], data[1], wave, data[3]

    def _meta(self, hdr: Any, path: Path, n_bad: np.ndarray) -> SpectrumMeta:
        obsid_f = header_float(hdr, "OBSID")
        obsid = int(obsid_f) if np.isfinite(obsid_f) else -1
        fname = header_str(hdr, "FILENAME")
        sid = str(obsid) if obsid >= 0 else file_stem(fname or path.name)
        z = header_float(hdr, "Z", missing=_MISSING)
        snr = {}
        for band in BANDS:
            v = header_float(hdr, f"SNR{band.upper()}", f"SN_{band.upper()}", missing=_MISSING)
            snr[band] = np.array([v], dtype=np.float32)
        return SpectrumMeta(
            ids=np.array([sid]),
            survey="lamost",
            source_file=np.array([str(path)]),
            source_row=np.zeros(1, dtype=np.int64),
            ra=np.array([header_float(hdr, "RA", missing=_MISSING)]),
            dec=np.array([header_float(hdr, "DEC", missing=_MISSING)]),
            rv_kms=np.array([C_KMS * z]),
            snr=snr,
            extra={"obsid": np.array([obsid], dtype=np.int64), "n_bad_input": n_bad},
        )


def _table_arrays(col: Any, has_andmask: bool, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """FLUX, IVAR, WAVELENGTH (float64) and ANDMASK (zeros when absent) of the COADD table's row,
    ``col(name)`` reading one column (from astropy or from the file's bytes), checked alike."""
    flux, ivar, wave = col("FLUX"), col("IVAR"), col("WAVELENGTH").astype(np.float64)
    andmask = col("ANDMASK") if has_andmask else np.zeros(flux.shape, np.float32)
    npix = flux.size
    for nm, arr in (("IVAR", ivar), ("WAVELENGTH", wave), ("ANDMASK", andmask)):
        if arr.size != npix:
            raise FormatError(f"{path}: COADD column {nm} has {arr.size} elements, FLUX has {npix}")
    _check_grid(wave, path, "WAVELENGTH column")
    return flux, ivar, wave, andmask


class _Image:
    """An image HDU's data and header, as :meth:`LamostReader._read_image` reads them."""

    def __init__(self, data: np.ndarray, header: dict[str, Any]) -> None:
        self.data, self.header = data, header


def _coeff_grid(hdr: Any, npix: int) -> np.ndarray | None:
    c0 = header_float(hdr, "COEFF0", missing=_MISSING)
    c1 = header_float(hdr, "COEFF1", missing=_MISSING)
    if not (np.isfinite(c0) and np.isfinite(c1)) or not (3.0 < c0 < 4.5 and 0 < c1 < 1e-2):
        return None
    return 10.0 ** (c0 + c1 * np.arange(npix, dtype=np.float64))


def _plausible_grid(w: np.ndarray, ref: np.ndarray | None) -> bool:
    if not np.all(np.isfinite(w)) or not (2000.0 < w[0] < w[-1] < 12000.0) or not np.all(np.diff(w) > 0):
        return False
    return ref is None or bool(np.max(np.abs(w - ref)) < 1.0)


def _check_grid(w: np.ndarray, path: Path, what: str) -> None:
    if w.size < 2 or not np.all(np.isfinite(w)) or not np.all(np.diff(w) > 0) or not (1000.0 < w[0] < 20000.0):
        raise FormatError(f"{path}: {what} is not a finite increasing optical wavelength grid")


@hookimpl
def register_readers(register: Any) -> None:
    register(LamostReader())
