"""Writers of the real survey file layouts.

LAMOST (one star per file, written as raw FITS bytes: astropy's per-file overhead would dominate
100,000 files; tests read every layout back with astropy and with stx's LAMOST reader):

* ``image`` (DR6/DR7 style): one PrimaryHDU, big-endian float32 (5, 3909) image whose rows are
  ``EXTEN0 = 'Flux, Inverse, Wavelength, Andmask, Ormask'``; the DR7 header keys (OBSID,
  FILENAME, RA, DEC, DESIG, FIBERID, SPID, PLANID, LMJD, MJD, CLASS, SUBCLASS, Z, Z_ERR, ZFLAG,
  SNRU..SNRZ, HELIO, HELIO_RV, VACUUM, WFITTYPE, COEFF0, COEFF1, the misleading CRVAL1/CD1_1 with
  CTYPE1 = 'LINEAR', ...).
* ``table`` (DR9+ style): an empty PrimaryHDU with the header keys, and a one-row ``COADD``
  binary table with ``FLUX, IVAR, WAVELENGTH, ANDMASK, ORMASK, NORMALIZATION`` (``3909E``).

Every file says what it is: ``ORIGIN = 'stx simulate'``, ``DATA_V = 'SIMULATED'``, ``SIMULATE =
T`` and the seed, so a simulated file is never mistaken for a real one.

DESI: a coadd file written with astropy: ``FIBERMAP`` (the 70 columns of a healpix coadd),
``EXP_FIBERMAP``, per arm ``X_WAVELENGTH`` (float64), ``X_FLUX``, ``X_IVAR`` (float32, BUNIT as in
DESI), ``X_MASK`` (uint32 stored as int32 + BZERO), ``X_RESOLUTION`` (float32, 11 diagonals) and
``SCORES``, EXTNAMEs as in the EDR files.
"""

from __future__ import annotations

import datetime as _dt
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from .observe import LAMOST_COEFF0, LAMOST_COEFF1

BLOCK = 2880

# ------------------------------------------------------------------------------ FITS cards


def _fmt_value(v: Any) -> str:
    if isinstance(v, (bool, np.bool_)):
        return f"{'T' if v else 'F':>20}"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):>20d}"
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f):
            raise ValueError("FITS header values must be finite")
        s = f"{f:.12G}"
        if "E" in s:
            mant, exp = s.split("E")
            if "." not in mant:
                mant += ".0"
            s = f"{mant}E{exp}"
        elif "." not in s:
            s += ".0"
        return f"{s:>20}"
    text = str(v).replace("'", "''")
    return f"'{text:<8}'"


@lru_cache(maxsize=8192)
def _card_cached(key: str, value: Any, comment: str) -> str:
    return _card(key, value, comment)


def card(key: str, value: Any = None, comment: str = "") -> str:
    """One 80-character header card (``COMMENT`` when key is COMMENT)."""
    try:
        return _card_cached(key, value, comment)
    except TypeError:  # unhashable value
        return _card(key, value, comment)


def _card(key: str, value: Any = None, comment: str = "") -> str:
    """One 80-character header card (``COMMENT`` when key is COMMENT; value None = key only)."""
    if key == "COMMENT":
        return f"COMMENT {comment}"[:80].ljust(80)
    body = f"{key:<8}= {_fmt_value(value)}"
    if comment:
        body = f"{body} / {comment}"
    if len(body) > 80:
        body = body[:80]
    return body.ljust(80)


def header_bytes(cards: list[str]) -> bytes:
    text = "".join(cards) + "END".ljust(80)
    pad = (-len(text)) % BLOCK
    return (text + " " * pad).encode("ascii")


def data_bytes(raw: bytes) -> bytes:
    return raw + b"\0" * ((-len(raw)) % BLOCK)


# --------------------------------------------------------------------------------- LAMOST

#: Spectral type scale used for SUBCLASS (Teff of the subclass).
_SPT = [("B5", 15000), ("A0", 9600), ("A5", 8100), ("F0", 7200), ("F5", 6500), ("G0", 5900), ("G5", 5600),
        ("K0", 5200), ("K3", 4700), ("K5", 4400), ("K7", 4000), ("M0", 3800), ("M2", 3500), ("M4", 3200)]


def subclass(teff: float) -> str:
    t = np.array([s[1] for s in _SPT], dtype=float)
    return _SPT[int(np.argmin(np.abs(t - teff)))][0]


def lamost_names(index: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Plate / spectrograph / fibre layout of LAMOST-like star ``index`` (4000 fibres a plate)."""
    plate = index // 4000
    spid = (index % 4000) // 250 + 1
    fiber = index % 250 + 1
    lmjd = 57000 + (seed % 1000) + plate
    planid = np.array([f"SIM{seed % 10000:04d}P{p:05d}" for p in plate])
    fname = np.array([f"spec-{m}-{pl}_sp{s:02d}-{f:03d}.fits" for m, pl, s, f in zip(lmjd, planid, spid, fiber)])
    return {"plate": plate, "spid": spid, "fiber": fiber, "lmjd": lmjd, "planid": planid, "filename": fname}


def _desig(ra: float, dec: float) -> str:
    h = ra / 15.0
    hh, mm = int(h), int((h - int(h)) * 60)
    ss = ((h - hh) * 60 - mm) * 60
    sign = "+" if dec >= 0 else "-"
    d = abs(dec)
    dd, dm = int(d), int((d - int(d)) * 60)
    ds = ((d - dd) * 60 - dm) * 60
    return f"LAMOST J{hh:02d}{mm:02d}{ss:05.2f}{sign}{dd:02d}{dm:02d}{ds:04.1f}"


def _date_of(lmjd: int) -> str:
    d = _dt.datetime(1858, 11, 17) + _dt.timedelta(days=int(lmjd) - 1)
    return d.strftime("%Y-%m-%dT%H:%M:%S")


def lamost_header(meta: dict[str, Any], layout: str, npix: int) -> list[str]:
    """Primary header cards of a LAMOST-like file (both layouts share the keys)."""
    c = []
    if layout == "image":
        c += [card("SIMPLE", True, "conforms to FITS standard"), card("BITPIX", -32),
              card("NAXIS", 2, "Number of array dimensions"), card("NAXIS1", npix), card("NAXIS2", 5),
              card("EXTEND", True)]
    else:
        c += [card("SIMPLE", True, "conforms to FITS standard"), card("BITPIX", 8),
              card("NAXIS", 0, "Number of array dimensions"), card("EXTEND", True)]
    c += [
        card("COMMENT", comment="--------FILE INFORMATION"),
        card("FILENAME", meta["filename"]),
        card("OBSID", int(meta["obsid"]), "Unique number ID of this spectrum"),
        card("AUTHOR", "stx simulate", "Who compiled the information"),
        card("DATA_V", "SIMULATED", "Data release version: a simulated spectrum"),
    ]
    if layout == "image":
        c += [card("EXTEN0", "Flux, Inverse, Wavelength, Andmask, Ormask"),
              card("N_EXTEN", 1, "The extension number"), card("EXTNAME", "Flux", "The extension name")]
    else:
        c += [card("N_EXTEN", 2, "The amount of extension"),
              card("NORM", 1, "1 if there exists a normalized spectrum")]
    c += [
        card("ORIGIN", "stx simulate", "LAMOST-like spectrum simulated by stx"),
        card("DATE", _date_of(meta["lmjd"] + 400), "Time when this HDU is created (UTC)"),
        card("SIMULATE", True, "This spectrum is simulated (stx simulate)"),
        card("SIMSEED", int(meta["seed"]), "stx simulate seed"),
        card("SIMINDEX", int(meta["index"]), "Star index in the simulated sample"),
        card("SIMVERS", meta["version"], "stx simulate version"),
        card("COMMENT", comment="--------TELESCOPE PARAMETERS"),
        card("TELESCOP", "LAMOST", "Simulated GuoShouJing Telescope observation"),
        card("LONGITUD", 117.58, "[deg] Longitude of site"),
        card("LATITUDE", 40.39, "[deg] Latitude of site"),
        card("COMMENT", comment="--------OBSERVATION PARAMETERS"),
        card("DATE-OBS", _date_of(meta["lmjd"]), "The observation median UTC"),
        card("LMJD", int(meta["lmjd"]), "Local Modified Julian Day"),
        card("MJD", int(meta["lmjd"]) - 1, "Modified Julian Day"),
        card("PLANID", meta["planid"], "Plan ID in use"),
        card("RA", round(float(meta["ra"]), 6), "[deg] Right ascension of object"),
        card("DEC", round(float(meta["dec"]), 6), "[deg] Declination of object"),
        card("DESIG", _desig(float(meta["ra"]), float(meta["dec"])), "Designation of LAMOST target"),
        card("FIBERID", int(meta["fiber"]), "Fiber ID of Object"),
        card("OBJTYPE", "star", "Object type from input catalog"),
        card("TSOURCE", "STXSIM", "Name of input catalog"),
        card("FIBERTYP" if layout == "image" else "FIB_TYPE", "Obj", "Fiber type of object"),
        card("FIBERMAS" if layout == "image" else "FIB_MASK", 0, "Bitmask of warning values, 0 means all is well"),
        card("EXPTIME", round(float(meta["exptime"]), 2), "[s] Minimum of exposure time for all cameras"),
        card("COMMENT", comment="--------SPECTROGRAPH PARAMETERS"),
        card("SPID", int(meta["spid"]), "Spectrograph ID"),
        card("COMMENT", comment="--------DATA REDUCTION PARAMETERS"),
        card("HELIO", True, "Heliocentric correction"),
        card("HELIO_RV", round(float(meta["helio_rv"]), 5), "[km/s] Heliocentric correction"),
        card("VACUUM", True, "Wavelengths are in vacuum"),
        card("NWORDER", 2, "Number of linear-log10 coefficients"),
        card("WFITTYPE", "LOG-LINEAR", "Linear-log10 dispersion"),
        card("COEFF0", LAMOST_COEFF0, "Central wavelength (log10) of first pixel"),
        card("COEFF1", LAMOST_COEFF1, "Log10 dispersion per pixel"),
        card("CRVAL1", LAMOST_COEFF0, "Central wavelength (log10) of first pixel"),
        card("CD1_1", LAMOST_COEFF1, "Log10 dispersion per pixel"),
        card("CRPIX1", 1, "Starting pixel (1-indexed)"),
        card("CTYPE1", "LINEAR"),
        card("DC-FLAG", 1, "Log-linear flag"),
        card("COMMENT", comment="--------SPECTRA ANALYSIS RESULTS"),
        card("VERSPIPE", "stx-sim", "Version of Pipeline"),
        card("CLASS", "STAR", "Class of object"),
        card("SUBCLASS", meta["subclass"], "Subclass of object"),
        card("Z", round(float(meta["z"]), 8), "Redshift of object"),
        card("Z_ERR", round(float(meta["z_err"]), 8), "Redshift error of object"),
        card("ZFLAG", "LASP", "Which method computes the redshift"),
    ]
    for band in "UGRIZ":
        c.append(card(f"SNR{band}", round(float(meta[f"snr_{band.lower()}"]), 2), f"SNR of {band.lower()} filter"))
    return c


def lamost_file_bytes(meta: dict[str, Any], flux: np.ndarray, ivar: np.ndarray, wave: np.ndarray,
                      andmask: np.ndarray, normalized: np.ndarray, layout: str) -> bytes:
    npix = flux.size
    if layout == "image":
        img = np.stack([flux, ivar, wave.astype(np.float32), andmask, andmask]).astype(">f4")
        return header_bytes(lamost_header(meta, "image", npix)) + data_bytes(img.tobytes())
    if layout != "table":
        raise ValueError(f"unknown LAMOST layout {layout!r}")
    names = ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION")
    arrays = (flux, ivar, wave, andmask, andmask, normalized)
    ext = [card("XTENSION", "BINTABLE", "Binary table extension"), card("BITPIX", 8), card("NAXIS", 2),
           card("NAXIS1", 4 * npix * len(names), "Number of bytes per row"), card("NAXIS2", 1, "Number of rows"),
           card("PCOUNT", 0), card("GCOUNT", 1), card("TFIELDS", len(names), "Number of columns in table"),
           card("EXTNAME", "COADD", "The extension name")]
    for i, nm in enumerate(names, start=1):
        ext += [card(f"TTYPE{i}", nm), card(f"TFORM{i}", f"{npix}E")]
    row = b"".join(np.asarray(a, dtype=">f4").tobytes() for a in arrays)
    return (header_bytes(lamost_header(meta, "table", npix)) + header_bytes(ext) + data_bytes(row))


# ----------------------------------------------------------------------------------- DESI

#: FIBERMAP columns of a DESI healpix coadd (name, FITS format), in the EDR order.
FIBERMAP_COLUMNS = (
    ("TARGETID", "K"), ("COADD_FIBERSTATUS", "J"), ("TARGET_RA", "D"), ("TARGET_DEC", "D"), ("PMRA", "E"),
    ("PMDEC", "E"), ("REF_EPOCH", "E"), ("FA_TARGET", "K"), ("FA_TYPE", "B"), ("OBJTYPE", "3A"),
    ("SUBPRIORITY", "D"), ("OBSCONDITIONS", "J"), ("RELEASE", "I"), ("BRICKNAME", "8A"), ("BRICKID", "J"),
    ("BRICK_OBJID", "J"), ("MORPHTYPE", "4A"), ("EBV", "E"), ("FLUX_G", "E"), ("FLUX_R", "E"), ("FLUX_Z", "E"),
    ("FLUX_W1", "E"), ("FLUX_W2", "E"), ("FLUX_IVAR_G", "E"), ("FLUX_IVAR_R", "E"), ("FLUX_IVAR_Z", "E"),
    ("FLUX_IVAR_W1", "E"), ("FLUX_IVAR_W2", "E"), ("FIBERFLUX_G", "E"), ("FIBERFLUX_R", "E"),
    ("FIBERFLUX_Z", "E"), ("FIBERTOTFLUX_G", "E"), ("FIBERTOTFLUX_R", "E"), ("FIBERTOTFLUX_Z", "E"),
    ("MASKBITS", "I"), ("SERSIC", "E"), ("SHAPE_R", "E"), ("SHAPE_E1", "E"), ("SHAPE_E2", "E"), ("REF_ID", "K"),
    ("REF_CAT", "2A"), ("GAIA_PHOT_G_MEAN_MAG", "E"), ("GAIA_PHOT_BP_MEAN_MAG", "E"),
    ("GAIA_PHOT_RP_MEAN_MAG", "E"), ("PARALLAX", "E"), ("PHOTSYS", "1A"), ("PRIORITY_INIT", "K"),
    ("NUMOBS_INIT", "K"), ("SV3_DESI_TARGET", "K"), ("SV3_BGS_TARGET", "K"), ("SV3_MWS_TARGET", "K"),
    ("SV3_SCND_TARGET", "K"), ("DESI_TARGET", "K"), ("BGS_TARGET", "K"), ("MWS_TARGET", "K"), ("PLATE_RA", "D"),
    ("PLATE_DEC", "D"), ("COADD_NUMEXP", "I"), ("COADD_EXPTIME", "E"), ("COADD_NUMNIGHT", "I"),
    ("COADD_NUMTILE", "I"), ("MEAN_DELTA_X", "E"), ("RMS_DELTA_X", "E"), ("MEAN_DELTA_Y", "E"),
    ("RMS_DELTA_Y", "E"), ("MEAN_FIBER_RA", "D"), ("STD_FIBER_RA", "E"), ("MEAN_FIBER_DEC", "D"),
    ("STD_FIBER_DEC", "E"), ("MEAN_PSF_TO_FIBER_SPECFLUX", "E"),
)
EXP_FIBERMAP_COLUMNS = (
    ("TARGETID", "K"), ("PRIORITY", "J"), ("SUBPRIORITY", "D"), ("NIGHT", "J"), ("EXPID", "J"), ("MJD", "D"),
    ("TILEID", "J"), ("EXPTIME", "D"), ("PETAL_LOC", "I"), ("DEVICE_LOC", "J"), ("LOCATION", "K"), ("FIBER", "J"),
    ("FIBERSTATUS", "J"), ("FIBERASSIGN_X", "E"), ("FIBERASSIGN_Y", "E"), ("LAMBDA_REF", "E"), ("PLATE_RA", "D"),
    ("PLATE_DEC", "D"), ("NUM_ITER", "K"), ("FIBER_X", "D"), ("FIBER_Y", "D"), ("DELTA_X", "D"), ("DELTA_Y", "D"),
    ("FIBER_RA", "D"), ("FIBER_DEC", "D"), ("PSF_TO_FIBER_SPECFLUX", "D"),
)
_FLUX_BUNIT = "10**-17 erg/(s cm2 Angstrom)"
_IVAR_BUNIT = "10**+34 (s2 cm4 Angstrom2) / erg2"
#: DESI_TARGET bit MWS_ANY (2**62) and MWS_TARGET bit MWS_BROAD (2**0) of the main survey.
MWS_ANY = 1 << 62
MWS_BROAD = 1


def _fits_dtype(fmt: str) -> Any:
    return {"K": np.int64, "J": np.int32, "I": np.int16, "B": np.uint8, "D": np.float64, "E": np.float32}.get(fmt)


def _table_hdu(columns: tuple[tuple[str, str], ...], values: dict[str, np.ndarray], n: int, extname: str) -> Any:
    from astropy.io import fits

    cols = []
    for name, fmt in columns:
        if name in values:
            arr = np.asarray(values[name])
        elif fmt.endswith("A"):
            arr = np.full(n, "")
        else:
            arr = np.zeros(n, dtype=_fits_dtype(fmt))
        if fmt.endswith("A"):
            arr = np.asarray(arr).astype(str)
        else:
            arr = arr.astype(_fits_dtype(fmt))
        cols.append(fits.Column(name=name, format=fmt, array=arr))
    hdu = fits.BinTableHDU.from_columns(cols)
    hdu.header["EXTNAME"] = extname
    return hdu


def write_desi_coadd(path: Path, *, fibermap: dict[str, np.ndarray], exp_fibermap: dict[str, np.ndarray],
                     arms: dict[str, dict[str, np.ndarray]], scores: dict[str, np.ndarray],
                     primary: dict[str, Any]) -> None:
    """Write one DESI coadd file. ``arms[a]`` holds wave, flux, ivar, mask (uint32), resolution."""
    from astropy.io import fits

    n = len(fibermap["TARGETID"])
    ph = fits.PrimaryHDU()
    for k, v in primary.items():
        ph.header[k] = v
    hdus = [ph, _table_hdu(FIBERMAP_COLUMNS, fibermap, n, "FIBERMAP"),
            _table_hdu(EXP_FIBERMAP_COLUMNS, exp_fibermap, len(exp_fibermap["TARGETID"]), "EXP_FIBERMAP")]
    for a in ("b", "r", "z"):
        d = arms[a]
        X = a.upper()
        w = fits.ImageHDU(np.asarray(d["wave"], dtype=np.float64), name=f"{X}_WAVELENGTH")
        w.header["BUNIT"] = "Angstrom"
        f = fits.ImageHDU(np.asarray(d["flux"], dtype=np.float32), name=f"{X}_FLUX")
        f.header["BUNIT"] = _FLUX_BUNIT
        iv = fits.ImageHDU(np.asarray(d["ivar"], dtype=np.float32), name=f"{X}_IVAR")
        iv.header["BUNIT"] = _IVAR_BUNIT
        m = fits.ImageHDU(np.asarray(d["mask"], dtype=np.uint32), name=f"{X}_MASK")
        r = fits.ImageHDU(np.asarray(d["resolution"], dtype=np.float32), name=f"{X}_RESOLUTION")
        hdus += [w, f, iv, m, r]
    sc_cols = tuple((k, "K" if k == "TARGETID" else "E") for k in scores)
    hdus.append(_table_hdu(sc_cols, scores, n, "SCORES"))
    fits.HDUList(hdus).writeto(path, output_verify="exception")


def desi_fibermap(targetid: np.ndarray, ra: np.ndarray, dec: np.ndarray, ebv: np.ndarray, rmag: np.ndarray,
                  gr: np.ndarray, exptime: np.ndarray, index: np.ndarray) -> dict[str, np.ndarray]:
    """FIBERMAP values of simulated Milky Way Survey targets (photometry from the r magnitude and
    a g - r colour; nanomaggies as in the Legacy Surveys)."""
    n = targetid.size

    def nmgy(mag: np.ndarray) -> np.ndarray:
        return 10.0 ** (-0.4 * (mag - 22.5))

    gmag, zmag = rmag + gr, rmag - 0.5 * gr
    return {
        "TARGETID": targetid, "COADD_FIBERSTATUS": np.zeros(n, np.int32), "TARGET_RA": ra, "TARGET_DEC": dec,
        "REF_EPOCH": np.full(n, 2015.5), "FA_TARGET": np.full(n, MWS_ANY, np.int64), "FA_TYPE": np.full(n, 4),
        "OBJTYPE": np.full(n, "TGT"), "SUBPRIORITY": (index % 9973) / 9973.0, "OBSCONDITIONS": np.full(n, 516),
        "RELEASE": np.full(n, 9010), "BRICKNAME": np.array([f"{int(r * 10) % 3600:04d}p{int(abs(d) * 10) % 900:03d}" for r, d in zip(ra, dec)]),
        "BRICKID": (index % 600000).astype(np.int32), "BRICK_OBJID": (index % 5000).astype(np.int32),
        "MORPHTYPE": np.full(n, "PSF"), "EBV": ebv,
        "FLUX_G": nmgy(gmag), "FLUX_R": nmgy(rmag), "FLUX_Z": nmgy(zmag),
        "FLUX_IVAR_G": np.full(n, 400.0), "FLUX_IVAR_R": np.full(n, 300.0), "FLUX_IVAR_Z": np.full(n, 100.0),
        "FIBERFLUX_G": 0.78 * nmgy(gmag), "FIBERFLUX_R": 0.78 * nmgy(rmag), "FIBERFLUX_Z": 0.78 * nmgy(zmag),
        "FIBERTOTFLUX_G": 0.78 * nmgy(gmag), "FIBERTOTFLUX_R": 0.78 * nmgy(rmag), "FIBERTOTFLUX_Z": 0.78 * nmgy(zmag),
        "REF_CAT": np.full(n, "G2"), "REF_ID": index.astype(np.int64),
        "GAIA_PHOT_G_MEAN_MAG": rmag + 0.1, "GAIA_PHOT_BP_MEAN_MAG": rmag + 0.45, "GAIA_PHOT_RP_MEAN_MAG": rmag - 0.45,
        "PHOTSYS": np.full(n, "S"), "PRIORITY_INIT": np.full(n, 1500), "NUMOBS_INIT": np.full(n, 1),
        "DESI_TARGET": np.full(n, MWS_ANY, np.int64), "MWS_TARGET": np.full(n, MWS_BROAD, np.int64),
        "PLATE_RA": ra, "PLATE_DEC": dec, "COADD_NUMEXP": np.ones(n, np.int16), "COADD_EXPTIME": exptime,
        "COADD_NUMNIGHT": np.ones(n, np.int16), "COADD_NUMTILE": np.ones(n, np.int16),
        "MEAN_FIBER_RA": ra, "MEAN_FIBER_DEC": dec, "MEAN_PSF_TO_FIBER_SPECFLUX": np.full(n, 0.78),
    }
