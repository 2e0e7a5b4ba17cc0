"""Plain 1-D FITS spectra with a linear or log-linear wavelength WCS (stellar libraries, user files).

What is claimed (``identify``, headers only): the first HDU with data is a 1-D image (``NAXIS = 1``;
the primary, or the first image extension after an empty primary) whose header has ``CRVAL1`` and
``CDELT1`` or ``CD1_1``, and whose ``CTYPE1`` (if any) is a wavelength axis (``WAVE``, ``AWAV``,
``LAMBDA``, ``LINEAR``, with an optional ``-LOG``) and ``CUNIT1`` (if any) a length. LAMOST's
(5, N) images are 2-D and are never claimed.

Wavelength of pixel ``i`` (0-based; ``p = i + 1`` is the FITS pixel), ``x = CRVAL1 + CD * (p - CRPIX1)``
with ``CD = CD1_1`` or ``CDELT1`` (``CRPIX1`` defaults to 1):

* ``DC-FLAG = 1`` (IRAF): ``lambda = 10**x``;
* ``CTYPE1 = 'WAVE-LOG'``/``'AWAV-LOG'``: the FITS standard (Greisen et al. 2006)
  ``lambda = CRVAL1 * exp(CD * (p - CRPIX1) / CRVAL1)`` when CRVAL1 is a wavelength (> 100); when
  CRVAL1 < 5 the file follows the common log10 convention instead and ``lambda = 10**x``;
* otherwise linear, ``lambda = x``.

Units from ``CUNIT1`` (Angstrom, nm, um, m; Angstrom when absent).

Air or vacuum: ``CTYPE1`` starting with ``AWAV`` is air and ``WAVE`` vacuum; otherwise the
``AIRORVAC`` (``air``/``vac``) or ``VACUUM`` (T/F) keys decide. When nothing says, the grid is
taken as **air** (the convention of ground-based optical stellar libraries such as MILES) and
``meta.extra["air_assumed"]`` is True. Air wavelengths are converted to vacuum with
:func:`stxcli.spectra.air_to_vacuum`.

Inverse variance: from an image extension of the same length named ``IVAR`` (inverse variance),
``VAR``/``VARIANCE`` or ``ERR``/``ERROR``/``SIGMA``/``UNCERTAINTY`` (1-sigma). Without one (MILES
has none) a constant noise is estimated per spectrum from the flux itself,
``sigma = 1.4826 * MAD(diff(flux)) / sqrt(2)`` over good pixels, ``ivar = 1/sigma**2``, and
``meta.extra["ivar_estimated"]`` is True. For well-sampled spectra with real line structure at the
pixel scale this over-estimates the noise (a conservative, lower SNR). The first such file of a
process also gives one ``warning:`` line on stderr (as does the first assumed-air file); the
per-spectrum flags are what a caller counts.

Resolving power: ``FWHM`` header key (Angstrom, e.g. MILES 2.5) gives ``R = lambda / FWHM`` per
pixel (on the vacuum grid); without it ``resolving_power`` is None.

``id`` is the file stem (``MILES_res2.50_star_m0001V``); RA/Dec from ``RA``/``DEC`` when numeric;
``rv_kms`` NaN; ``snr["all"]`` the median of ``flux * sqrt(ivar)``; ``extra["n_bad_input"]`` counts
NaN/inf flux pixels (masked, never a crash).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stxcli import console
from stxcli.errors import FormatError, StxError
from stxcli.hookspecs import hookimpl
from stxcli.protocols import PRIORITY_GENERIC, FileProbe, HduInfo
from stxcli.spectra import Arm, SpectrumBatch, SpectrumMeta, air_to_vacuum

from ._fits import (_BITPIX_DTYPE, clean_flux_ivar, file_stem, header_float, header_str, median_snr, native_f32,
                    open_fits, raw_image, read_file_bytes, scan_buffer)

_WAVE_CTYPES = ("WAVE", "AWAV", "LAMBDA", "LINEAR", "WAVELENGTH", "ANGSTROM", "")
_UNITS = {"": 1.0, "ANGSTROM": 1.0, "ANGSTROMS": 1.0, "A": 1.0, "AA": 1.0, "NM": 10.0, "UM": 1e4,
          "MICRON": 1e4, "MICRONS": 1e4, "M": 1e10}
_IVAR_HDUS = ("IVAR",)
_VAR_HDUS = ("VAR", "VARIANCE")
_SIGMA_HDUS = ("ERR", "ERROR", "SIGMA", "UNCERTAINTY", "NOISE")
_warned: set[str] = set()


def _base_ctype(ctype: str) -> tuple[str, bool]:
    ctype = ctype.strip().upper()
    is_log = ctype.endswith("-LOG")
    base = ctype[:-4] if is_log else ctype
    return base.rstrip("-"), is_log


def _spectral_header_ok(hdr: Any) -> bool:
    if "CRVAL1" not in hdr or ("CDELT1" not in hdr and "CD1_1" not in hdr):
        return False
    base, _ = _base_ctype(header_str(hdr, "CTYPE1"))
    if base not in _WAVE_CTYPES:
        return False
    return header_str(hdr, "CUNIT1").upper() in _UNITS


def _spectrum_hdu_info(hdus: tuple[HduInfo, ...]) -> HduInfo | None:
    """The HDU holding the spectrum: the primary if it has data, else the first image HDU."""
    for h in hdus:
        if h.kind in ("primary", "image") and h.shape:
            return h
    return None


class Fits1dReader:
    name = "fits1d"
    version = "1.0.0"
    priority = PRIORITY_GENERIC
    extensions = (".fits", ".fits.gz", ".fit", ".fit.gz", ".fts")
    description = "Plain 1-D FITS spectra with a linear or log-linear wavelength WCS (e.g. MILES)"

    # ------------------------------------------------------------------------- identify
    def identify(self, probe: FileProbe) -> bool:
        h = _spectrum_hdu_info(probe.hdus)
        return h is not None and len(h.shape) == 1 and h.shape[0] > 1 and _spectral_header_ok(h.cards)

    # ----------------------------------------------------------------------------- read
    def read(self, path: Path, *, chunk_size: int = 1024, with_resolution: bool = False) -> Iterator[SpectrumBatch]:
        path = Path(path)
        raw = _raw_hdus(path)
        if raw is not None:
            yield self._read_hdus(raw, path)
            return
        with open_fits(path) as hdul:
            batch = self._read_hdus(hdul, path)
        yield batch

    def _read_hdus(self, hdul: Any, path: Path) -> SpectrumBatch:
        """The spectrum of an opened file: ``hdul`` is astropy's HDUList or :func:`_raw_hdus`'."""
        hdu = next((h for h in hdul if h.is_image and h.data is not None and h.data.size > 0), None)
        if hdu is None:
            raise FormatError(f"{path}: no image HDU with data")
        if hdu.data.ndim != 1:
            raise FormatError(f"{path}: spectrum HDU has shape {hdu.data.shape}, expected a 1-D array")
        hdr = hdu.header
        if not _spectral_header_ok(hdr):
            raise FormatError(
                f"{path}: no usable wavelength WCS (need CRVAL1 and CDELT1 or CD1_1; CTYPE1="
                f"{header_str(hdr, 'CTYPE1')!r}, CUNIT1={header_str(hdr, 'CUNIT1')!r})"
            )
        flux = native_f32(hdu.data)[None, :]
        npix = flux.shape[1]
        wave, air_assumed = wcs_wavelength(hdr, npix, path)
        ivar, estimated = self._ivar(hdul, hdu, flux, path)
        flux, ivar, mask, n_bad = clean_flux_ivar(flux, ivar, np.zeros(flux.shape, dtype=bool))
        if estimated:
            _warn_once("ivar", f"{path.name}: no error array; ivar estimated from the flux scatter "
                       "(flagged per spectrum in meta.extra['ivar_estimated']; not repeated for further files)")
        if air_assumed:
            _warn_once("air", f"{path.name}: no air/vacuum keyword; wavelengths taken as air and converted "
                       "to vacuum (flagged in meta.extra['air_assumed']; not repeated for further files)")
        fwhm = header_float(hdr, "FWHM")
        rpower = wave / fwhm if np.isfinite(fwhm) and fwhm > 0 else None
        snr = median_snr(flux, ivar, mask)
        meta = SpectrumMeta(
            ids=np.array([file_stem(path)]),
            survey=header_str(hdr, "TPLLIB").lower() or "fits1d",
            source_file=np.array([str(path)]),
            source_row=np.zeros(1, dtype=np.int64),
            ra=np.array([header_float(hdr, "RA")]),
            dec=np.array([header_float(hdr, "DEC")]),
            rv_kms=np.array([np.nan]),
            snr={"all": snr},
            extra={
                "ivar_estimated": np.array([estimated]),
                "air_assumed": np.array([air_assumed]),
                "n_bad_input": n_bad,
            },
        )
        arm = Arm(name="spec", wave=wave, flux=flux, ivar=ivar, mask=mask, resolving_power=rpower)
        return SpectrumBatch(arms=[arm], meta=meta).validate()

    def _ivar(self, hdul: Any, hdu: Any, flux: np.ndarray, path: Path) -> tuple[np.ndarray, bool]:
        npix = flux.shape[1]
        for h in hdul:
            if h is hdu or not h.is_image or h.data is None:
                continue
            name = str(h.name).upper()
            kind = "ivar" if name in _IVAR_HDUS else "var" if name in _VAR_HDUS else "sigma" if name in _SIGMA_HDUS else None
            if kind is None:
                continue
            arr = native_f32(h.data).ravel()
            if arr.size != npix:
                raise FormatError(f"{path}: {name} HDU has {arr.size} pixels, the spectrum {npix}")
            with np.errstate(divide="ignore", invalid="ignore"):
                if kind == "ivar":
                    ivar = arr
                elif kind == "var":
                    ivar = np.where(arr > 0, 1.0 / arr, 0.0)
                else:
                    ivar = np.where(arr > 0, 1.0 / (arr * arr), 0.0)
            return native_f32(ivar)[None, :], False
        sigma = estimate_noise(np.asarray(hdu.data, dtype=np.float64))  # at the file's precision
        if not (np.isfinite(sigma) and sigma > 0):
            raise FormatError(f"{path}: no error array and the flux has no measurable scatter; cannot estimate ivar")
        return np.full(flux.shape, 1.0 / sigma**2, dtype=np.float32), True


class _RawImage:
    """An HDU of a scanned file as :meth:`Fits1dReader._read_hdus` reads astropy's: ``name``,
    ``header`` (a dict of parsed values), ``is_image`` and ``data`` (a big-endian view, None
    without data)."""

    def __init__(self, name: str, header: dict[str, Any], is_image: bool, data: np.ndarray | None) -> None:
        self.name, self.header, self.is_image, self.data = name, header, is_image, data


def _raw_hdus(path: Path) -> list[_RawImage] | None:
    """The file's HDUs from its bytes (decompressed once, headers scanned without astropy, image
    data as numpy views): several times cheaper than astropy's HDUList for a small spectrum file.
    None, so that astropy reads the file and words any error, when an image is scaled (BSCALE,
    BZERO, BLANK), tile-compressed or of an unknown BITPIX, or the file is not plain FITS."""
    try:
        data = read_file_bytes(path)
        scanned = scan_buffer(data, path)
    except StxError:
        return None
    out = []
    for r in scanned:
        h = r.header
        is_image = r.index == 0 or str(h.get("XTENSION", "")).strip().upper() == "IMAGE"
        arr = None
        if is_image and r.shape:
            if r.compressed or any(k in h for k in ("BSCALE", "BZERO", "BLANK")) or h.get("BITPIX") not in _BITPIX_DTYPE:
                return None
            arr = raw_image(r, data, path)
        elif r.compressed:
            return None
        out.append(_RawImage(r.name, h, is_image, arr))
    return out


def _warn_once(key: str, message: str) -> None:
    """One stderr warning per process and kind (the per-spectrum flags carry the counts)."""
    if key not in _warned:
        _warned.add(key)
        console.warn(message)


def estimate_noise(flux: np.ndarray) -> float:
    """Robust per-pixel noise of one spectrum: 1.4826 * MAD of neighbour differences / sqrt(2)."""
    f = np.asarray(flux, dtype=np.float64)
    d = np.diff(f)
    d = d[np.isfinite(d)]
    if d.size < 3:
        return float("nan")
    mad = np.median(np.abs(d - np.median(d)))
    return float(1.4826 * mad / np.sqrt(2.0))


def wcs_wavelength(hdr: Any, npix: int, path: Path) -> tuple[np.ndarray, bool]:
    """Vacuum wavelengths (Angstrom) of a 1-D spectrum from its header, and whether air was
    assumed for lack of any air/vacuum keyword."""
    crval = header_float(hdr, "CRVAL1")
    cd = header_float(hdr, "CD1_1")
    if not np.isfinite(cd):
        cd = header_float(hdr, "CDELT1")
    crpix = header_float(hdr, "CRPIX1")
    crpix = 1.0 if not np.isfinite(crpix) else crpix
    if not (np.isfinite(crval) and np.isfinite(cd) and cd != 0):
        raise FormatError(f"{path}: CRVAL1/CDELT1 (or CD1_1) missing or zero")
    base, is_log = _base_ctype(header_str(hdr, "CTYPE1"))
    p = np.arange(1, npix + 1, dtype=np.float64)
    x = crval + cd * (p - crpix)
    dcflag = header_float(hdr, "DC-FLAG")
    if dcflag == 1 or (is_log and crval < 5):
        wave = 10.0**x
    elif is_log:
        if crval <= 100:
            raise FormatError(f"{path}: CTYPE1 {header_str(hdr, 'CTYPE1')!r} with CRVAL1 = {crval}: "
                              "neither a wavelength nor a log10 wavelength")
        wave = crval * np.exp(cd * (p - crpix) / crval)
    else:
        wave = x
    wave = wave * _UNITS[header_str(hdr, "CUNIT1").upper()]
    if not (np.all(np.isfinite(wave)) and np.all(np.diff(wave) > 0) and 500.0 < wave[0] and wave[-1] < 3e5):
        raise FormatError(f"{path}: the WCS gives no increasing wavelength grid in 500-300000 A "
                          f"({wave[0]:.4g}..{wave[-1]:.4g})")
    air, assumed = _is_air(hdr, base)
    return (air_to_vacuum(wave) if air else wave), assumed


def _is_air(hdr: Any, ctype_base: str) -> tuple[bool, bool]:
    """(air?, assumed?) from CTYPE1, AIRORVAC or VACUUM."""
    if ctype_base == "AWAV":
        return True, False
    if ctype_base == "WAVE":
        return False, False
    airorvac = header_str(hdr, "AIRORVAC").lower()
    if airorvac.startswith("air"):
        return True, False
    if airorvac.startswith("vac"):
        return False, False
    if "VACUUM" in hdr and isinstance(hdr["VACUUM"], bool):
        return (not hdr["VACUUM"]), False
    return True, True


@hookimpl
def register_readers(register: Any) -> None:
    register(Fits1dReader())
