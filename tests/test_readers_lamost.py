"""The LAMOST reader on the real DR1, DR6/DR7 and DR10 files, plus broken copies of them."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stx_builtin.readers.lamost import LAMOST_LRS_R, LamostReader
from stxcli.errors import FormatError
from stxcli.spectra import C_KMS

from _readers_util import truncate

READER = LamostReader()


def read_one(path: Path):
    batches = list(READER.read(Path(path)))
    assert len(batches) == 1 and batches[0].n == 1
    b = batches[0]
    assert [a.name for a in b.arms] == ["lrs"]
    return b, b.arms[0]


def coeff_grid(n: int, c0: float = 3.5682, c1: float = 1e-4) -> np.ndarray:
    return 10.0 ** (c0 + c1 * np.arange(n))


# ----------------------------------------------------------------------------------- DR1 image


def test_dr1_all_files_equal_raw_image(shared):
    files = sorted((shared / "lamost-dr1" / "spectra").glob("*.fits"))
    assert len(files) == 24
    for f in files:
        b, arm = read_one(f)
        with fits.open(f) as h:
            raw = h[0].data.astype(np.float64)
            hdr = h[0].header
        flux, ivar, row2, andmask = raw[0], raw[1], raw[2], raw[3]
        expected_mask = (ivar == 0) | (andmask != 0)
        np.testing.assert_array_equal(arm.mask[0], expected_mask)
        good = ~expected_mask
        np.testing.assert_array_equal(arm.flux[0][good], flux[good].astype(np.float32))
        np.testing.assert_array_equal(arm.ivar[0][good], ivar[good].astype(np.float32))
        assert np.all(arm.ivar[0][~good] == 0) and np.all(arm.flux[0][~good] == 0)
        # DR1 row 2 is a normalised flux (median 1), never the wavelength
        assert arm.wave.shape == (3904,)
        np.testing.assert_allclose(arm.wave, coeff_grid(3904), rtol=0, atol=1e-6)
        assert not np.allclose(arm.wave, row2)
        assert 3699.9 < arm.wave[0] < 3700.1 and 9088 < arm.wave[-1] < 9089.5
        assert arm.resolving_power == LAMOST_LRS_R
        m = b.meta
        assert m.survey == "lamost"
        assert m.ids[0] == f.name[: -len(".fits")]  # no OBSID in DR1: the FILENAME stem
        assert m.extra["obsid"][0] == -1
        assert m.rv_kms[0] == pytest.approx(C_KMS * hdr["Z"])
        assert m.snr["g"][0] == pytest.approx(hdr["SN_G"], abs=1e-4)
        assert m.snr["z"][0] == pytest.approx(hdr["SN_Z"], abs=1e-4)
        assert m.ra[0] == pytest.approx(hdr["RA"]) and m.dec[0] == pytest.approx(hdr["DEC"])
        assert m.source_file[0] == str(f) and m.source_row[0] == 0
        assert m.extra["n_bad_input"][0] == 0


def test_dr1_andmask_file_masks_those_pixels(shared):
    f = shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-117.fits"
    _, arm = read_one(f)
    with fits.open(f) as h:
        andmask = h[0].data[3]
    assert (andmask != 0).mean() > 0.2  # SOURCE.md: 29 % of pixels set in this file
    assert np.all(arm.mask[0][andmask != 0])


def test_rv_is_cz_and_agrees_with_catalogue_rv(shared):
    """Sanity check of sign and size: LAMOST Z is a redshift; c*Z equals the DR1 catalogue rv."""
    rows = list(csv.DictReader(open(shared / "lamost-dr1" / "labels.csv")))
    agree = 0
    for r in rows:
        b, _ = read_one(shared / "lamost-dr1" / "spectra" / r["filename"])
        assert b.meta.ids[0] == r["filename"].removesuffix(".fits")
        if abs(b.meta.rv_kms[0] - float(r["rv"])) < 0.01:
            agree += 1
    assert len(rows) == 20
    assert agree >= 18  # two catalogue rows come from another reduction (differ by 13-22 km/s)


# ------------------------------------------------------------------------------ DR6/DR7 image


@pytest.mark.parametrize(
    "name, obsid",
    [("spec-57287-KP193637N444141V03_sp10-161.fits.gz", 359910161), ("spec-58397-EG014118N254444M01_sp03-031.fits", 677503031)],
)
def test_later_image_row2_is_wavelength(shared, name, obsid):
    f = shared / "lamost-later" / name
    b, arm = read_one(f)
    with fits.open(f) as h:
        raw = h[0].data
        hdr = h[0].header
    np.testing.assert_array_equal(arm.wave, raw[2].astype(np.float64))
    np.testing.assert_allclose(arm.wave, coeff_grid(3909, hdr["COEFF0"], hdr["COEFF1"]), atol=3e-3)
    good = ~arm.mask[0]
    np.testing.assert_array_equal(arm.flux[0][good], raw[0][good])
    np.testing.assert_array_equal(arm.mask[0], (raw[1] == 0) | (raw[3] != 0))
    assert b.meta.ids[0] == str(obsid) and b.meta.extra["obsid"][0] == obsid
    assert b.meta.snr["r"][0] == pytest.approx(hdr["SNRR"], abs=1e-3)
    assert b.meta.rv_kms[0] == pytest.approx(C_KMS * hdr["Z"])


# ------------------------------------------------------------------------------- DR10 table


def test_dr10_all_files_equal_coadd_columns(shared):
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))
    assert len(files) == 40
    labels = {int(r["obsid"]): r for r in csv.DictReader(open(shared / "lamost-dr10" / "labels.csv"))}
    n_coeff_checked = 0
    for f in files:
        b, arm = read_one(f)
        with fits.open(f) as h:
            row = h["COADD"].data[0]
            hdr = h[0].header
            flux, ivar, wave, andmask = (np.asarray(row[c], dtype=np.float64) for c in ("FLUX", "IVAR", "WAVELENGTH", "ANDMASK"))
        np.testing.assert_array_equal(arm.wave, wave)
        np.testing.assert_array_equal(arm.mask[0], (ivar == 0) | (andmask != 0))
        good = ~arm.mask[0]
        np.testing.assert_array_equal(arm.flux[0][good], flux[good].astype(np.float32))
        np.testing.assert_array_equal(arm.ivar[0][good], ivar[good].astype(np.float32))
        if hdr["COEFF0"] > 0 and wave.size != 3820:  # the 3820-pixel file has COEFF = -9999
            # the float32 column agrees with 10**(COEFF0 + COEFF1 i) to 3e-7 relative (SOURCE.md):
            # at most 0.0028 A at 9100 A (0.1 km/s), not 1e-3 A; about 1e-3 A at the blue end
            np.testing.assert_allclose(wave, coeff_grid(wave.size, hdr["COEFF0"], hdr["COEFF1"]), rtol=3.2e-7, atol=0)
            assert abs(wave[0] - coeff_grid(1, hdr["COEFF0"])[0]) < 1.1e-3
            n_coeff_checked += 1
        obsid = int(hdr["OBSID"])
        lab = labels[obsid]
        assert b.meta.ids[0] == str(obsid)
        assert b.meta.ra[0] == pytest.approx(float(lab["ra"]), abs=1e-5)
        assert b.meta.dec[0] == pytest.approx(float(lab["dec"]), abs=1e-5)
        # header Z can differ from the v0 catalogue by a few km/s (SOURCE.md), never in sign or scale
        assert abs(b.meta.rv_kms[0] - C_KMS * float(lab["z"])) < 10.0
        assert b.meta.snr["g"][0] == pytest.approx(hdr["SNRG"], abs=1e-3)
    assert n_coeff_checked == 39


def test_dr10_special_files(shared):
    d = shared / "lamost-dr10" / "spectra"
    _, arm = read_one(d / "spec-59523-GAC051N40M1_sp03-140.fits.gz")
    assert arm.wave.size == 3820 and arm.wave[-1] == pytest.approx(8914.6, abs=0.05)
    # NORMALIZATION shorter than FLUX: read lengths per column, the spectrum keeps 3909 pixels
    _, arm = read_one(d / "spec-59674-HD141736N112006M01_sp06-144.fits.gz")
    assert arm.flux.shape == (1, 3909)
    # NORM = 0 (NORMALIZATION column all -9999): irrelevant to the spectrum
    _, arm = read_one(d / "spec-59614-EG033855N024548V02_sp12-179.fits.gz")
    assert arm.flux.shape[1] > 3800 and np.isfinite(arm.flux).all()


# ------------------------------------------------------------------------ content detection


def _copy_without(src: Path, dst: Path, *keys: str) -> Path:
    with fits.open(src) as h:
        hdul = fits.HDUList([hh.copy() for hh in h])
    for k in keys:
        del hdul[0].header[k]
    hdul.writeto(dst)
    return dst


def test_layout_detected_by_content_without_exten0(shared, tmp_path):
    dr1 = _copy_without(shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-007.fits", tmp_path / "a.fits", "EXTEN0")
    _, arm = read_one(dr1)
    np.testing.assert_allclose(arm.wave, coeff_grid(3904), atol=1e-6)  # row 2 is no grid
    dr7 = _copy_without(shared / "lamost-later" / "spec-58397-EG014118N254444M01_sp03-031.fits", tmp_path / "b.fits", "EXTEN0")
    _, arm = read_one(dr7)
    with fits.open(dr7) as h:
        np.testing.assert_array_equal(arm.wave, h[0].data[2].astype(np.float64))


def test_gzip_and_plain_copies_read_identically(shared, tmp_path):
    src = shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-018.fits"
    gz = tmp_path / "spec.fits.gz"
    gz.write_bytes(gzip.compress(src.read_bytes()))
    _, a = read_one(src)
    bz, b = read_one(gz)
    np.testing.assert_array_equal(a.flux, b.flux)
    np.testing.assert_array_equal(a.wave, b.wave)
    assert bz.meta.ids[0] == "spec-55862-B6212_sp06-018"


# ---------------------------------------------------------------------------------- failures


def test_nan_and_inf_input_are_masked_and_counted(shared, tmp_path):
    src = shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-018.fits"
    with fits.open(src) as h:
        data = h[0].data.copy()
        hdr = h[0].header.copy()
    good = np.flatnonzero(data[1] > 0)
    data[0, good[:5]] = np.nan
    data[1, good[5:8]] = np.inf
    data[1, good[8:10]] = -1.0
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "nan.fits")
    b, arm = read_one(tmp_path / "nan.fits")
    assert b.meta.extra["n_bad_input"][0] == 10
    assert arm.mask[0][good[:10]].all()
    assert np.isfinite(arm.flux).all() and np.isfinite(arm.ivar).all()
    assert (arm.ivar[0][good[:10]] == 0).all()


def test_missing_file(tmp_path):
    with pytest.raises(FormatError, match="no such file"):
        list(READER.read(tmp_path / "nope.fits"))


@pytest.mark.parametrize(
    "rel", ["lamost-dr1/spectra/spec-55862-B6212_sp06-018.fits", "lamost-dr10/spectra/spec-59522-GACII052N48B2_sp09-006.fits.gz"]
)
def test_truncated_file_is_format_error(shared, tmp_path, rel):
    src = shared / rel
    dst = truncate(src, tmp_path / src.name)
    with pytest.raises(FormatError) as err:
        list(READER.read(dst))
    msg = str(err.value)
    assert str(dst) in msg and "truncated" in msg and "\n" not in msg


def test_wrong_layouts_are_format_errors(shared, tmp_path):
    src = shared / "lamost-dr1" / "spectra" / "spec-55862-B6212_sp06-018.fits"
    with fits.open(src) as h:
        hdr = h[0].header.copy()
        data = h[0].data[:3].copy()
    fits.PrimaryHDU(data, hdr).writeto(tmp_path / "three_rows.fits")
    with pytest.raises(FormatError, match="three_rows.fits.*expected \\(5, N\\)"):
        list(READER.read(tmp_path / "three_rows.fits"))
    src10 = shared / "lamost-dr10" / "spectra" / "spec-59522-GACII052N48B2_sp09-006.fits.gz"
    with fits.open(src10) as h:
        cols = [c for c in h["COADD"].columns if c.name != "IVAR"]
        phdr = h[0].header.copy()
        for k in ("NAXIS1", "NAXIS2"):  # stale keys of the real files (NAXIS = 0)
            phdr.remove(k, ignore_missing=True)
        primary = fits.PrimaryHDU(header=phdr)
        fits.HDUList([primary, fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(tmp_path / "noivar.fits")
    with pytest.raises(FormatError, match="noivar.fits.*IVAR"):
        list(READER.read(tmp_path / "noivar.fits"))


# ------------------------------------------------------- the raw byte path against astropy's


def _every_real_lamost_file(shared):
    files = []
    for sub in ("lamost-dr1", "lamost-later", "lamost-dr10"):
        files += sorted(p for p in (shared / sub).rglob("*.fits*"))
    files += sorted((shared / "lamost-dr10-train" / "spectra").glob("*.fits*"))[::25]
    return files


def test_raw_path_equals_astropy_path_on_every_layout(shared, monkeypatch):
    """The reader reads both layouts from the file's bytes (headers scanned without astropy);
    through astropy it gives the very same batch: arrays, grid, mask and every metadata value."""
    files = _every_real_lamost_file(shared)
    assert len(files) > 100
    raw = {f: read_one(f)[0] for f in files}
    monkeypatch.setattr(LamostReader, "_read_raw", lambda self, path: None)  # astropy only
    kinds = set()
    for f in files:
        a, b = raw[f], read_one(f)[0]
        kinds.add("table" if "COADD" in [h.name for h in fits.open(f)] else "image")
        for x, y in zip(a.arms, b.arms):
            for name in ("wave", "flux", "ivar", "mask"):
                u, v = getattr(x, name), getattr(y, name)
                assert u.dtype == v.dtype and u.shape == v.shape, (f, name)
                np.testing.assert_array_equal(u, v, err_msg=f"{f} {name}")
        for name in ("ids", "source_file", "source_row", "ra", "dec", "rv_kms"):
            np.testing.assert_array_equal(getattr(a.meta, name), getattr(b.meta, name), err_msg=f"{f} {name}")
        assert a.meta.snr.keys() == b.meta.snr.keys() and a.meta.extra.keys() == b.meta.extra.keys()
        for d1, d2 in ((a.meta.snr, b.meta.snr), (a.meta.extra, b.meta.extra)):
            for k in d1:
                np.testing.assert_array_equal(d1[k], d2[k], err_msg=f"{f} {k}")
    assert kinds == {"table", "image"}


def test_raw_path_declines_what_it_cannot_read(shared, tmp_path):
    """A COADD column with TSCAL goes to astropy (which applies the scale): None from the raw
    path, the same spectrum from read()."""
    src = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits*"))[0]
    with fits.open(src) as h:
        hdr0 = h[0].header.copy()
        for k in ("NAXIS1", "NAXIS2"):  # stray in the real primary header (NAXIS = 0)
            hdr0.remove(k, ignore_missing=True)
        t = h["COADD"]
        cols = []
        for c in t.columns:
            v = np.asarray(t.data[c.name])
            if c.name == "FLUX":
                cols.append(fits.Column(name=c.name, format=c.format, bscale=2.0, bzero=0.0, array=v))
            else:
                cols.append(fits.Column(name=c.name, format=c.format, array=v))
    dst = tmp_path / "scaled.fits"
    fits.HDUList([fits.PrimaryHDU(header=hdr0), fits.BinTableHDU.from_columns(cols, name="COADD")]).writeto(dst)
    with fits.open(dst) as h:
        assert "TSCAL1" in h["COADD"].header
    assert READER._read_raw(dst) is None
    a, b = read_one(src)[1], read_one(dst)[1]
    np.testing.assert_allclose(b.flux, a.flux, rtol=1e-6)
    np.testing.assert_array_equal(b.ivar, a.ivar)
