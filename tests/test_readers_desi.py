"""The DESI reader on the real EDR coadd/spectra files, tiled copies, and broken copies."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from stx_builtin.readers.desi import ARMS, DesiReader, resolving_power_from_resolution
from stxcli.errors import FormatError

from _readers_util import tile_desi, truncate

READER = DesiReader()
FILES = ("coadd-sv3-dark-26065.fits", "coadd-5-169-thru20210419.fits", "spectra-sv3-dark-26065.fits")


def concat(batches, arm: int, attr: str) -> np.ndarray:
    return np.concatenate([getattr(b.arms[arm], attr) for b in batches])


def meta_cat(batches, attr: str) -> np.ndarray:
    return np.concatenate([getattr(b.meta, attr) for b in batches])


@pytest.mark.parametrize("name", FILES)
def test_arrays_equal_raw_astropy_read(shared, name):
    path = shared / "desi-edr" / name
    batches = list(READER.read(path, with_resolution=True))
    assert len(batches) == 1
    b = batches[0]
    assert [a.name for a in b.arms] == list(ARMS)
    with fits.open(path) as h:
        fm = h["FIBERMAP"].data
        n = len(fm)
        assert b.n == n == 5
        for arm in b.arms:
            X = arm.name.upper()
            flux, ivar, mask = h[f"{X}_FLUX"].data, h[f"{X}_IVAR"].data, h[f"{X}_MASK"].data
            np.testing.assert_array_equal(arm.wave, h[f"{X}_WAVELENGTH"].data)
            assert arm.flux.dtype == np.float32 and arm.flux.dtype.isnative and arm.flux.flags.c_contiguous
            expected_mask = (mask != 0) | (ivar == 0)
            np.testing.assert_array_equal(arm.mask, expected_mask)
            good = ~expected_mask
            np.testing.assert_array_equal(arm.flux[good], flux[good])
            np.testing.assert_array_equal(arm.ivar[good], ivar[good])
            assert (arm.flux[~good] == 0).all() and (arm.ivar[~good] == 0).all()
            np.testing.assert_array_equal(arm.resolution, h[f"{X}_RESOLUTION"].data)
            assert arm.resolving_power.shape == arm.wave.shape
        np.testing.assert_array_equal(b.meta.extra["targetid"], fm["TARGETID"])
        np.testing.assert_array_equal(b.meta.ra, fm["TARGET_RA"])
        np.testing.assert_array_equal(b.meta.dec, fm["TARGET_DEC"])
        per_exposure = name.startswith("spectra")
        expected_ids = [f"{t}:{i}" if per_exposure else str(t) for i, t in enumerate(fm["TARGETID"])]
        assert list(b.meta.ids) == expected_ids
    assert b.meta.survey == "desi"
    assert np.isnan(b.meta.rv_kms).all()
    np.testing.assert_array_equal(b.meta.source_row, np.arange(5))
    assert set(b.meta.source_file) == {str(path)}
    assert (b.meta.extra["n_bad_input"] == 0).all()
    b.validate()  # the core's own consistency check agrees


def test_resolution_not_read_unless_asked(shared):
    (b,) = READER.read(shared / "desi-edr" / FILES[0])
    assert all(a.resolution is None for a in b.arms)
    assert all(a.resolving_power is not None for a in b.arms)


def test_snr_is_median_over_good_sampled_pixels(shared):
    path = shared / "desi-edr" / FILES[0]
    (b,) = READER.read(path)
    with fits.open(path) as h:
        for arm in b.arms:
            X = arm.name.upper()
            flux, ivar, mask = h[f"{X}_FLUX"].data, h[f"{X}_IVAR"].data, h[f"{X}_MASK"].data
            for i in range(5):
                sel = slice(None, None, 8)
                good = (mask[i][sel] == 0) & (ivar[i][sel] > 0)
                s = flux[i][sel][good] * np.sqrt(ivar[i][sel][good])
                expected = float(np.median(s)) if s.size else 0.0
                assert arm.name in b.meta.snr
                assert b.meta.snr[arm.name][i] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    # fibres 0, 1, 3 of this healpix file have ivar 0 everywhere: kept, fully masked, SNR 0
    for arm in b.arms:
        assert arm.mask[[0, 1, 3]].all() and (b.meta.snr[arm.name][[0, 1, 3]] == 0).all()
        assert b.meta.snr[arm.name][2] > 0


def test_dead_arm_is_per_spectrum_not_a_crash(shared):
    # tile coadd: 4 of 5 fibres have all-zero ivar (and all-zero resolution) in every arm
    (b,) = READER.read(shared / "desi-edr" / FILES[1])
    for arm in b.arms:
        assert arm.mask[:4].all() and not arm.mask[4].all()
        assert np.isfinite(arm.resolving_power).all()


# ---------------------------------------------------------------------------- resolving power


def gaussian_resolution(sigma_pix: np.ndarray, ndiag: int = 11) -> np.ndarray:
    """A DESI-style (ndiag, npix) band of normalised Gaussian kernels, offsets ndiag//2..-ndiag//2."""
    k = np.arange(ndiag // 2, -(ndiag // 2) - 1, -1)[:, None]
    r = np.exp(-0.5 * (k / sigma_pix[None, :]) ** 2)
    return (r / r.sum(axis=0)).astype(np.float32)


def test_resolving_power_of_gaussian_kernels_by_hand():
    npix = 200
    wave = 5000.0 + 0.8 * np.arange(npix)
    sigma = np.full(npix, 1.1)
    res = np.stack([gaussian_resolution(sigma), np.zeros((11, npix), np.float32), gaussian_resolution(sigma)])
    r = resolving_power_from_resolution(res, wave)
    # the sampled Gaussian's second moment is sigma**2 to < 1e-4 for sigma = 1.1 px and 11 taps
    expected = wave / (2.0 * np.sqrt(2.0 * np.log(2.0)) * 1.1 * 0.8)
    np.testing.assert_allclose(r, expected, rtol=2e-3)
    assert r[0] == pytest.approx(5000.0 / (2.35482 * 0.88), rel=2e-3)  # 2412.9
    assert resolving_power_from_resolution(np.zeros((3, 11, npix), np.float32), wave) is None


def test_measured_resolving_power_is_desi_like(shared):
    (b,) = READER.read(shared / "desi-edr" / FILES[0])
    med = {a.name: float(np.median(a.resolving_power)) for a in b.arms}
    # DESI: R about 2000-3200 (b), 3200-4100 (r), 4100-5100 (z); this file measures 2940, 4460, 4970
    assert 2300 < med["b"] < 3500 and 3300 < med["r"] < 5000 and 4100 < med["z"] < 5800
    assert med["b"] < med["r"] < med["z"]


# ---------------------------------------------------------------------------------- chunking


@pytest.fixture(scope="module")
def tiled(tmp_path_factory, shared) -> Path:
    return tile_desi(shared / "desi-edr" / FILES[0], tmp_path_factory.mktemp("desi") / "coadd-35.fits", 7)


def test_chunks_concatenate_to_single_batch(tiled):
    whole = list(READER.read(tiled, chunk_size=1000, with_resolution=True))
    parts = list(READER.read(tiled, chunk_size=8, with_resolution=True))
    assert len(whole) == 1 and whole[0].n == 35
    assert [p.n for p in parts] == [8, 8, 8, 8, 3]
    for ai in range(3):
        for attr in ("flux", "ivar", "mask", "resolution"):
            np.testing.assert_array_equal(concat(parts, ai, attr), concat(whole, ai, attr))
        np.testing.assert_array_equal(parts[0].arms[ai].resolving_power, whole[0].arms[ai].resolving_power)
    for attr in ("ids", "source_row", "ra", "dec"):
        np.testing.assert_array_equal(meta_cat(parts, attr), meta_cat(whole, attr))
    np.testing.assert_array_equal(meta_cat(parts, "source_row"), np.arange(35))
    for band in ARMS:
        np.testing.assert_array_equal(np.concatenate([p.meta.snr[band] for p in parts]), whole[0].meta.snr[band])
    with fits.open(tiled) as h:
        np.testing.assert_array_equal(meta_cat(parts, "ids"), h["FIBERMAP"].data["TARGETID"].astype(str))
        np.testing.assert_array_equal(concat(parts, 2, "flux")[~concat(parts, 2, "mask")],
                                      h["Z_FLUX"].data[~concat(parts, 2, "mask")])


def test_memory_stays_flat_with_small_chunks(tiled):
    """Reading in chunks of 5 holds one chunk at a time: the traced peak is a fraction of a whole read."""

    def peak(chunk: int) -> int:
        tracemalloc.start()
        for batch in READER.read(tiled, chunk_size=chunk, with_resolution=True):
            del batch
        _, p = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return p

    whole, small = peak(1000), peak(5)
    assert small < 0.35 * whole, (small, whole)


# ---------------------------------------------------------------------------------- failures


def _rewrite(src: Path, dst: Path, edit) -> Path:
    with fits.open(src) as h:
        hdul = fits.HDUList([hh.copy() for hh in h])
    edit(hdul)
    hdul.writeto(dst)
    return dst


def test_missing_hdu_names_it(shared, tmp_path):
    dst = _rewrite(shared / "desi-edr" / FILES[0], tmp_path / "c.fits", lambda h: h.pop(h.index_of("R_IVAR")))
    with pytest.raises(FormatError, match=r"c\.fits: HDU 'R_IVAR' is missing"):
        list(READER.read(dst))


def test_missing_resolution_only_matters_when_asked(shared, tmp_path):
    dst = _rewrite(shared / "desi-edr" / FILES[0], tmp_path / "c.fits", lambda h: h.pop(h.index_of("B_RESOLUTION")))
    (b,) = READER.read(dst)
    assert b.arms[0].resolving_power is None and b.arms[1].resolving_power is not None
    with pytest.raises(FormatError, match="B_RESOLUTION"):
        list(READER.read(dst, with_resolution=True))


def test_row_count_mismatch(shared, tmp_path):
    def cut(h):
        h["Z_FLUX"].data = h["Z_FLUX"].data[:4]

    dst = _rewrite(shared / "desi-edr" / FILES[0], tmp_path / "c.fits", cut)
    with pytest.raises(FormatError, match=r"Z_FLUX has shape \(4, 2881\)"):
        list(READER.read(dst))


def test_nan_flux_and_bad_ivar_are_masked_and_counted(shared, tmp_path):
    def poison(h):
        h["B_FLUX"].data[2, 100:103] = np.nan
        h["R_FLUX"].data[2, 7] = np.inf
        h["Z_IVAR"].data[4, 50:52] = -1.0
        h["Z_IVAR"].data[4, 60] = np.nan

    dst = _rewrite(shared / "desi-edr" / FILES[0], tmp_path / "c.fits", poison)
    (b,) = READER.read(dst)
    np.testing.assert_array_equal(b.meta.extra["n_bad_input"], [0, 0, 4, 0, 3])
    assert b.arms[0].mask[2, 100:103].all() and b.arms[1].mask[2, 7] and b.arms[2].mask[4, [50, 51, 60]].all()
    for arm in b.arms:
        assert np.isfinite(arm.flux).all() and np.isfinite(arm.ivar).all() and (arm.ivar >= 0).all()
    assert np.isfinite(b.meta.snr["b"]).all()


def test_truncated_and_missing_files(shared, tmp_path):
    dst = truncate(shared / "desi-edr" / FILES[0], tmp_path / "cut.fits", 0.5)
    with pytest.raises(FormatError, match=r"cut\.fits: truncated"):
        list(READER.read(dst))
    with pytest.raises(FormatError, match="no such file"):
        list(READER.read(tmp_path / "absent.fits"))
    (tmp_path / "junk.fits").write_bytes(b"SIMPLE  =                    T" + b"\0" * 100)
    with pytest.raises(FormatError, match=r"junk\.fits"):
        list(READER.read(tmp_path / "junk.fits"))


# ---------------------------------------------------------------------- direct header scan


@pytest.mark.parametrize("name", FILES)
def test_header_scan_finds_what_astropy_finds(shared, name):
    from stxcli.fitsio import card_value as _card_value, scan_headers  # the scanner lives in the core

    path = shared / "desi-edr" / name
    hdus = scan_headers(path)
    with fits.open(path) as h:
        assert [x.name for x in hdus] == [hh.name for hh in h]
        for raw, hh in zip(hdus, h):
            if raw.compressed:  # the spectra files' tile-compressed masks: read through astropy
                assert isinstance(hh, fits.CompImageHDU)
                continue
            assert raw.data_offset == hh.fileinfo()["datLoc"]
            naxis = hh.header["NAXIS"]
            assert raw.shape == tuple(hh.header[f"NAXIS{j}"] for j in range(naxis, 0, -1))
            for key in ("BITPIX", "NAXIS", "EXTNAME", "BZERO", "BSCALE", "TFIELDS", "TTYPE1", "TFORM1"):
                if key in hh.header:
                    assert raw.header[key] == hh.header[key], key
    assert _card_value(" 'O''Brien '          / a quote") == "O'Brien"
    assert _card_value("                 1.5D3 / exp") == 1500.0
    assert _card_value("                     T") is True and _card_value("  -32 / bits") == -32


def test_plain_and_astropy_paths_read_the_same(tiled, tmp_path):
    import gzip
    import shutil

    gz = tmp_path / "coadd-35.fits.gz"  # gzip: read through astropy
    with open(tiled, "rb") as src, gzip.open(gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    a = list(READER.read(tiled, chunk_size=16, with_resolution=True))
    b = list(READER.read(gz, chunk_size=16, with_resolution=True))
    assert [x.n for x in a] == [x.n for x in b] == [16, 16, 3]
    for ai in range(3):
        for attr in ("wave", "resolving_power"):
            np.testing.assert_array_equal(getattr(a[0].arms[ai], attr), getattr(b[0].arms[ai], attr))
        for attr in ("flux", "ivar", "mask", "resolution"):
            np.testing.assert_array_equal(concat(a, ai, attr), concat(b, ai, attr))
    for attr in ("ids", "ra", "dec", "source_row"):
        np.testing.assert_array_equal(meta_cat(a, attr), meta_cat(b, attr))


def test_scaled_fibermap_column_falls_back_to_astropy(shared, tmp_path):
    """A TARGETID stored with TZERO (unsigned 64-bit) is not a plain column for the direct path:
    the file is read through astropy, with the same result."""
    src = shared / "desi-edr" / FILES[0]

    def unsigned(h):
        fm = h["FIBERMAP"]
        cols = [fits.Column(name=c.name, format=c.format, array=fm.data[c.name]) if c.name != "TARGETID"
                else fits.Column(name="TARGETID", format="K", bzero=2**63,
                                 array=np.asarray(fm.data["TARGETID"]).astype(np.uint64))
                for c in fm.columns]
        h["FIBERMAP"] = fits.BinTableHDU.from_columns(cols, header=fm.header, name="FIBERMAP")

    dst = _rewrite(src, tmp_path / "u.fits", unsigned)
    (b,) = READER.read(dst)
    (ref,) = READER.read(src)
    np.testing.assert_array_equal(b.meta.extra["targetid"], ref.meta.extra["targetid"])
    np.testing.assert_array_equal(b.arms[0].flux, ref.arms[0].flux)
