"""The generic 1-D FITS reader on real MILES stars and on small WCS variants built here."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

import stx_builtin.readers.fits1d as fits1d_mod
from stx_builtin.readers.fits1d import Fits1dReader, estimate_noise
from stxcli.errors import FormatError
from stxcli.registry import probe_file
from stxcli.spectra import air_to_vacuum

from _readers_util import truncate

READER = Fits1dReader()
MILES = ("MILES_res2.50_star_m0001V.fits", "MILES_res2.50_star_m0221V.fits", "MILES_res2.50_star_m0748V.fits")


def read_one(path: Path):
    batches = list(READER.read(Path(path)))
    assert len(batches) == 1 and batches[0].n == 1 and len(batches[0].arms) == 1
    return batches[0], batches[0].arms[0]


def write_spectrum(path: Path, flux: np.ndarray, extra_hdus: tuple = (), **keys) -> Path:
    hdr = fits.Header()
    for k, v in keys.items():
        hdr[k.replace("_", "-") if k == "DC_FLAG" else k] = v
    fits.HDUList([fits.PrimaryHDU(flux, hdr), *extra_hdus]).writeto(path)
    return path


def noisy(n: int, seed: int = 0) -> np.ndarray:
    """A flat spectrum with 1 % noise (a noiseless one has no scatter to estimate ivar from)."""
    return (1.0 + 0.01 * np.random.default_rng(seed).normal(size=n)).astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    monkeypatch.setattr(fits1d_mod, "_warned", set())


# ---------------------------------------------------------------------------------------- MILES


@pytest.mark.parametrize("name", MILES)
def test_miles_air_grid_to_vacuum_and_estimated_ivar(shared, name):
    path = shared / "miles" / "spectra" / name
    b, arm = read_one(path)
    with fits.open(path) as h:
        raw = h[0].data.astype(np.float64)
    i = np.arange(4300)
    np.testing.assert_allclose(arm.wave, air_to_vacuum(3540.5 + 0.9 * i), rtol=0, atol=1e-9)
    assert arm.wave[0] == pytest.approx(3541.51, abs=0.01)  # +1.0 A at 3540 A in vacuum
    np.testing.assert_array_equal(arm.flux[0], raw.astype(np.float32))
    # no error array: constant ivar from 1.4826 * MAD(diff(flux)) / sqrt(2), by hand
    d = np.diff(raw)
    sigma = 1.4826 * np.median(np.abs(d - np.median(d))) / np.sqrt(2)
    np.testing.assert_allclose(arm.ivar[0], 1.0 / sigma**2, rtol=1e-5)
    assert not arm.mask.any()
    np.testing.assert_allclose(arm.resolving_power, arm.wave / 2.5)  # FWHM = 2.5 A
    m = b.meta
    assert m.ids[0] == name.removesuffix(".fits") and m.survey == "miles"
    assert m.extra["ivar_estimated"][0] and m.extra["air_assumed"][0]
    assert m.snr["all"][0] == pytest.approx(np.median(raw) / sigma, rel=1e-4)
    assert np.isnan(m.rv_kms[0]) and np.isnan(m.ra[0])


def test_miles_ids_match_the_labels_catalogue_file_stems(shared):
    rows = list(csv.DictReader(open(shared / "miles" / "labels.csv")))
    stems = {r["file"].removesuffix(".fits") for r in rows}
    for name in MILES:
        b, _ = read_one(shared / "miles" / "spectra" / name)
        assert b.meta.ids[0] in stems


def test_warns_once_per_process(shared, capsys):
    for name in MILES[:2]:
        read_one(shared / "miles" / "spectra" / name)
    err = capsys.readouterr().err
    assert err.count("ivar estimated from the flux scatter") == 1
    assert err.count("taken as air") == 1


def test_estimate_noise_of_white_noise():
    rng = np.random.default_rng(3)
    flux = 10.0 + rng.normal(0.0, 0.5, 20000)
    assert estimate_noise(flux) == pytest.approx(0.5, rel=0.03)


# ------------------------------------------------------------------------------ WCS variants


def test_linear_vacuum_wave_in_nm_with_crpix(tmp_path):
    flux = noisy(100)
    p = write_spectrum(tmp_path / "s.fits", flux, CRVAL1=500.0, CDELT1=0.1, CRPIX1=11.0, CTYPE1="WAVE", CUNIT1="nm")
    b, arm = read_one(p)
    # pixel i (0-based) is FITS pixel i+1: lambda = 500 nm + 0.1 nm * (i + 1 - 11)
    np.testing.assert_allclose(arm.wave, 10 * (500.0 + 0.1 * (np.arange(100) + 1 - 11)))
    assert arm.wave[10] == pytest.approx(5000.0)
    assert not b.meta.extra["air_assumed"][0]
    assert arm.resolving_power is None


def test_iraf_log10_dcflag_and_cd1_1(tmp_path):
    p = write_spectrum(tmp_path / "s.fits", noisy(50),
                       CRVAL1=3.6, CD1_1=1e-4, DC_FLAG=1, VACUUM=True)
    _, arm = read_one(p)
    np.testing.assert_allclose(arm.wave, 10 ** (3.6 + 1e-4 * np.arange(50)))


def test_fits_standard_wave_log(tmp_path):
    p = write_spectrum(tmp_path / "s.fits", noisy(30),
                       CRVAL1=4000.0, CDELT1=0.5, CRPIX1=1.0, CTYPE1="WAVE-LOG")
    _, arm = read_one(p)
    # Greisen et al. 2006: lambda = CRVAL1 * exp(CDELT1 * (p - CRPIX1) / CRVAL1)
    assert arm.wave[10] == pytest.approx(4000.0 * np.exp(0.5 * 10 / 4000.0), rel=1e-12)  # 4005.00313
    assert arm.wave[10] == pytest.approx(4005.003127, abs=1e-5)


def test_awav_ctype_and_airorvac_keys(tmp_path):
    flux = noisy(20)
    _, air = read_one(write_spectrum(tmp_path / "a.fits", flux, CRVAL1=6000.0, CDELT1=1.0, CTYPE1="AWAV"))
    np.testing.assert_allclose(air.wave, air_to_vacuum(6000.0 + np.arange(20)))
    # Morton (2000) by hand at s2 = (1e4/6000)**2: n - 1 = 1e-8 * (8342.54 + 2406147/127.222 + 15998/36.122)
    assert air.wave[0] - 6000.0 == pytest.approx(6000.0 * 2.76984e-4, abs=1e-3)  # 1.6619 A
    b, vac = read_one(write_spectrum(tmp_path / "v.fits", flux, CRVAL1=6000.0, CDELT1=1.0, AIRORVAC="vac"))
    np.testing.assert_allclose(vac.wave, 6000.0 + np.arange(20))
    assert not b.meta.extra["air_assumed"][0]


def test_error_extensions_give_ivar(tmp_path):
    flux = np.linspace(1.0, 2.0, 40).astype(np.float32)
    err = np.full(40, 0.1, np.float32)
    err[5] = 0.0
    p = write_spectrum(tmp_path / "e.fits", flux, (fits.ImageHDU(err, name="ERR"),), CRVAL1=5000.0, CDELT1=1.0)
    b, arm = read_one(p)
    np.testing.assert_allclose(arm.ivar[0][arm.ivar[0] > 0], 100.0, rtol=1e-5)
    assert arm.mask[0, 5] and arm.ivar[0, 5] == 0
    assert not b.meta.extra["ivar_estimated"][0]
    ivar = np.full(40, 4.0, np.float32)
    p = write_spectrum(tmp_path / "i.fits", flux, (fits.ImageHDU(ivar, name="IVAR"),), CRVAL1=5000.0, CDELT1=1.0)
    _, arm = read_one(p)
    np.testing.assert_array_equal(arm.ivar[0], 4.0)


def test_nan_flux_is_masked_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    flux = (1.0 + 0.01 * rng.normal(size=200)).astype(np.float32)
    flux[[3, 50, 51]] = np.nan
    flux[100] = np.inf
    b, arm = read_one(write_spectrum(tmp_path / "n.fits", flux, CRVAL1=5000.0, CDELT1=1.0))
    assert b.meta.extra["n_bad_input"][0] == 4
    assert arm.mask[0, [3, 50, 51, 100]].all() and arm.mask[0].sum() == 4
    assert np.isfinite(arm.flux).all() and (arm.ivar[0][~arm.mask[0]] > 0).all()


# ---------------------------------------------------------------------------- identify, errors


def test_identify_is_honest(shared, tmp_path):
    assert READER.identify(probe_file(shared / "miles" / "spectra" / MILES[0]))
    # LAMOST DR1: CTYPE1 = 'LINEAR' with log10 CRVAL1, but a (5, N) image: not claimed
    assert not READER.identify(probe_file(shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-005.fits"))
    assert not READER.identify(probe_file(shared / "lamost-dr10" / "spectra" / "spec-59522-GACII052N48B2_sp09-006.fits.gz"))
    assert not READER.identify(probe_file(shared / "desi-edr" / "coadd-sv3-dark-26065.fits"))
    flux = noisy(10)
    assert not READER.identify(probe_file(write_spectrum(tmp_path / "a.fits", flux)))  # no WCS
    assert not READER.identify(probe_file(write_spectrum(tmp_path / "b.fits", flux, CRVAL1=1.0, CDELT1=1.0, CTYPE1="RA---TAN")))
    assert not READER.identify(probe_file(write_spectrum(tmp_path / "c.fits", flux, CRVAL1=1.0, CDELT1=1.0, CUNIT1="deg")))
    ext = tmp_path / "d.fits"
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(flux, fits.Header({"CRVAL1": 5000.0, "CDELT1": 1.0}))]).writeto(ext)
    assert READER.identify(probe_file(ext))  # spectrum in the first extension after an empty primary
    _, arm = read_one(ext)
    assert arm.wave[0] == pytest.approx(air_to_vacuum(5000.0))


def test_errors_are_one_line_format_errors(shared, tmp_path):
    cases = {
        "cut": truncate(shared / "miles" / "spectra" / MILES[0], tmp_path / "cut.fits", 0.5),
        "decreasing": write_spectrum(tmp_path / "dec.fits", np.arange(10, dtype=np.float32), CRVAL1=5000.0, CDELT1=-1.0),
        "flat": write_spectrum(tmp_path / "flat.fits", np.ones(10, np.float32), CRVAL1=5000.0, CDELT1=1.0),
        "2d": shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-005.fits",
        "missing": tmp_path / "absent.fits",
    }
    expected = {"cut": "truncated", "decreasing": "no increasing wavelength grid", "flat": "no measurable scatter",
                "2d": "expected a 1-D array", "missing": "no such file"}
    for key, path in cases.items():
        with pytest.raises(FormatError) as err:
            list(READER.read(path))
        msg = str(err.value)
        assert str(path) in msg and expected[key] in msg and "\n" not in msg, (key, msg)


# ------------------------------------------------------- the raw byte path against astropy's


def _batch(path):
    (b,) = list(Fits1dReader().read(Path(path)))
    return b


def _same_batch(a, b, where):
    for x, y in zip(a.arms, b.arms):
        for name in ("wave", "flux", "ivar", "mask"):
            u, v = getattr(x, name), getattr(y, name)
            assert u.dtype == v.dtype and u.shape == v.shape, (where, name)
            np.testing.assert_array_equal(u, v, err_msg=f"{where} {name}")
        rp_a, rp_b = x.resolving_power, y.resolving_power
        assert (rp_a is None) == (rp_b is None)
        if rp_a is not None:
            np.testing.assert_array_equal(rp_a, rp_b)
    assert a.meta.survey == b.meta.survey
    for name in ("ids", "source_file", "source_row", "ra", "dec", "rv_kms"):
        np.testing.assert_array_equal(getattr(a.meta, name), getattr(b.meta, name), err_msg=f"{where} {name}")
    for d1, d2 in ((a.meta.snr, b.meta.snr), (a.meta.extra, b.meta.extra)):
        assert d1.keys() == d2.keys()
        for k in d1:
            np.testing.assert_array_equal(d1[k], d2[k], err_msg=f"{where} {k}")


def test_raw_path_equals_astropy_path(shared, tmp_path, monkeypatch):
    """The reader reads the file's bytes itself (headers scanned, the image a numpy view): the
    very same batch as through astropy, on real MILES stars and on a spectrum with an error HDU."""
    files = sorted((shared / "miles" / "spectra").glob("*.fits"))[::10]
    src = files[0]
    with fits.open(src) as h:
        flux = h[0].data.astype(np.float32)
        hdr = h[0].header.copy()
    with_err = tmp_path / "with_err.fits"
    fits.HDUList([fits.PrimaryHDU(flux, hdr), fits.ImageHDU(np.full_like(flux, 0.01), name="ERR")]).writeto(with_err)
    files.append(with_err)
    assert all(fits1d_mod._raw_hdus(f) is not None for f in files)
    raw = {f: _batch(f) for f in files}
    monkeypatch.setattr(fits1d_mod, "_raw_hdus", lambda path: None)  # astropy only
    for f in files:
        _same_batch(raw[f], _batch(f), f)
    assert not raw[with_err].meta.extra["ivar_estimated"][0]


def test_raw_path_declines_scaled_images(shared, tmp_path):
    src = sorted((shared / "miles" / "spectra").glob("*.fits"))[0]
    with fits.open(src) as h:
        hdu = fits.PrimaryHDU(h[0].data.astype(np.float64), h[0].header.copy())
    hdu.scale("int32", bscale=1e-6, bzero=0.0)
    dst = tmp_path / "scaled.fits"
    hdu.writeto(dst)
    assert fits1d_mod._raw_hdus(dst) is None
