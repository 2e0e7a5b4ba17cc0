"""The raw featurizer: hand-computed values, round trips and the real survey files."""

from __future__ import annotations

import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest

from stxcli import flags as F
from stxcli.errors import StxError, UsageError
from stxcli.protocols import FeatureBatch
from stxcli.spectra import C_KMS, Arm, SpectrumBatch, SpectrumMeta, air_to_vacuum
from stx_builtin.featurizers import _rawlib as L
from stx_builtin.featurizers.raw import RawFeaturizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not DATA.exists():
    DATA = Path("../shared/data")


# ------------------------------------------------------------------------------------ helpers


def make_batch(wave, flux, ivar=None, *, rv=np.nan, r=None, mask=None, extra=None) -> SpectrumBatch:
    """One-arm batch; ``flux`` (n, npix) or (npix,)."""
    flux = np.atleast_2d(np.asarray(flux, dtype=np.float32))
    n, npix = flux.shape
    ivar = np.full_like(flux, 1e4) if ivar is None else np.broadcast_to(
        np.asarray(ivar, dtype=np.float32), flux.shape).copy()
    mask = np.zeros(flux.shape, bool) if mask is None else mask
    meta = SpectrumMeta.empty(n, "test", "mem")
    meta.rv_kms = np.broadcast_to(np.asarray(rv, dtype=np.float64), (n,)).copy()
    if extra:
        meta.extra.update(extra)
    return SpectrumBatch([Arm("a", np.asarray(wave, dtype=np.float64), flux, ivar, mask, resolving_power=r)], meta)


def gauss_pixels(edges: np.ndarray, centre: float, sigma: float) -> np.ndarray:
    """Pixel averages of a unit-area Gaussian over pixels with the given edges."""
    from scipy.special import ndtr

    cdf = ndtr((edges - centre) / sigma)
    return np.diff(cdf) / np.diff(edges)


def linear_grid(w0: float, w1: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    wave = np.arange(w0, w1 + step / 2, step)
    edges = np.concatenate([wave - step / 2, [wave[-1] + step / 2]])
    return wave, edges


def fwhm_of(x: np.ndarray, y: np.ndarray) -> float:
    """FWHM of a single positive peak by linear interpolation of the half-maximum crossings."""
    i = int(np.argmax(y))
    half = y[i] / 2
    lo = i
    while y[lo] > half:
        lo -= 1
    hi = i
    while y[hi] > half:
        hi += 1
    xl = np.interp(half, [y[lo], y[lo + 1]], [x[lo], x[lo + 1]])
    xr = np.interp(half, [y[hi], y[hi - 1]], [x[hi], x[hi - 1]])
    return float(xr - xl)


# --------------------------------------------------------------------------- contract / config


def test_registered_through_the_entry_point():
    from stxcli.registry import get_registry

    assert get_registry().get("featurizer", "raw") is RawFeaturizer
    assert RawFeaturizer.name == "raw" and RawFeaturizer.version and RawFeaturizer.description
    assert RawFeaturizer.needs_resolution is False


def test_default_grid_and_axis():
    f = RawFeaturizer()
    ax = f.axis()
    assert f.dim == ax.size == 3535
    assert ax[0] == pytest.approx(3900.0)
    assert ax[-1] == pytest.approx(8800.0, abs=1.0)
    np.testing.assert_allclose(np.diff(np.log10(ax)), 1e-4, rtol=1e-9)


def test_config_round_trip_is_complete_and_identical():
    f = RawFeaturizer(wmin=4000, wmax=7000, dlog=2e-4, target_r=2000, rv="estimate", cont_iter=3,
                      use_resolution_matrix=True, snr_min=3)
    cfg = f.config()
    params = set(inspect.signature(RawFeaturizer.__init__).parameters) - {"self"}
    assert set(cfg) == params  # every option spelled out
    assert json.loads(json.dumps(cfg)) == cfg  # plain JSON values
    g = RawFeaturizer(**json.loads(json.dumps(cfg)))
    assert g == f and g.config() == cfg and g.dim == f.dim
    assert g.needs_resolution is True and RawFeaturizer().needs_resolution is False
    assert RawFeaturizer() != f
    d = RawFeaturizer().config()
    assert d["wmin"] == 3900.0 and d["wmax"] == 8800.0 and d["dlog"] == 1e-4 and d["target_r"] == 1800.0
    assert d["rv"] == "auto" and d["assume_source_r"] is None and d["heavy_mask_frac"] == 0.5
    # the same features from the rebuilt featurizer
    wave, _ = linear_grid(3800, 9000, 1.0)
    rng = np.random.default_rng(3)
    batch = make_batch(wave, 1 + 0.05 * rng.standard_normal((2, wave.size)), 400.0, rv=[12.0, -40.0], r=3000.0)
    a = RawFeaturizer(**RawFeaturizer(rv="meta").config()).transform(batch)
    b = RawFeaturizer(rv="meta").transform(batch)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.ivar, b.ivar)


@pytest.mark.parametrize("bad", [
    dict(rv="guess"), dict(continuum="poly"), dict(wmin=5000, wmax=4000), dict(dlog=0), dict(target_r=-5),
    dict(cont_iter=0), dict(cont_bin=1.5), dict(min_coverage=1.5), dict(heavy_mask_frac=2), dict(wmin="abc"),
    dict(use_resolution_matrix="yes"), dict(dlog=1e-9),
])
def test_bad_config_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        RawFeaturizer(**bad)


def test_unknown_option_is_a_type_error():
    with pytest.raises(TypeError):
        RawFeaturizer(wavelength_min=3000)


# ------------------------------------------------------------------------------- normalisation


def test_flat_spectrum_stays_one():
    wave, _ = linear_grid(3700, 9200, 0.8)
    fb = RawFeaturizer(rv="none").transform(make_batch(wave, np.full((2, wave.size), 5.0), 100.0, r=1800.0))
    assert fb.features.shape == (2, 3535) and fb.features.dtype == np.float32 and fb.ivar.dtype == np.float32
    assert (fb.ivar > 0).all()
    np.testing.assert_allclose(fb.features, 1.0, atol=1e-5)
    # ivar scales with continuum^2 (flux 5 -> 1): output bins hold ~1.15-2.5 input pixels of ivar 100
    assert fb.ivar.min() > 100 * 25 and fb.ivar.max() < 100 * 25 * 3.0
    assert fb.quality["flags"].tolist() == [0, 0]
    assert fb.quality["masked_frac"].tolist() == [0.0, 0.0]


def test_smooth_continuum_with_lines_is_normalised_to_the_upper_envelope():
    wave, edges = linear_grid(3700, 9200, 0.5)
    cont = 2.0 * (wave / 5000.0) ** -2.0  # a steep power law
    centres = np.random.default_rng(0).uniform(3950, 8750, 120)  # many absorption lines
    depth = sum(0.4 * 2.5 * gauss_pixels(edges, lam, 1.5) for lam in centres)
    flux = cont * (1 - np.clip(depth, 0, 0.9))
    fb = RawFeaturizer(rv="none").transform(make_batch(wave, flux, 1e6, r=1800.0))
    feat = fb.features[0]
    ax = RawFeaturizer().axis()
    far = np.all(np.abs(ax[:, None] - centres[None, :]) > 8.0, axis=1)  # continuum pixels
    assert far.sum() > 300
    assert np.median(np.abs(feat[far] - 1)) < 0.005
    assert np.abs(feat[far] - 1).max() < 0.03


def test_continuum_near_zero_is_masked_not_divided():
    wave, _ = linear_grid(3700, 9200, 1.0)
    # a smooth continuum falling to 0 at 3700 A: below cont_floor (5 %) of its mean (~9) at < ~4280 A
    flux = 10.0 * np.clip((wave - 3700.0) / 1300.0, 0, 1) ** 4
    zero = np.zeros_like(wave)  # a spectrum of zeros (with ivar > 0): no continuum anywhere
    fb = RawFeaturizer(rv="none").transform(make_batch(wave, np.stack([flux, zero]), 1.0, r=1800.0))
    ax = RawFeaturizer().axis()
    assert np.isfinite(fb.features).all() and np.isfinite(fb.ivar).all()
    assert (fb.ivar[0, ax < 4200] == 0).all() and (fb.features[0, ax < 4200] == 1.0).all()
    assert (fb.ivar[0, ax > 4400] > 0).all()
    assert np.abs(fb.features[0, ax > 5600] - 1).max() < 0.003  # away from the kink at 5000 A
    assert fb.quality["flags"][1] & F.NO_OVERLAP and (fb.ivar[1] == 0).all()


# ------------------------------------------------------------------------------- rest frame


@pytest.mark.parametrize("v", [87.0, -250.0])
@pytest.mark.parametrize("pipeline", ["bare", "default"])
def test_shifted_lines_land_at_rest(v, pipeline):
    lines = [4500.0, 6000.0, 8000.0]
    zf = 1 + v / C_KMS
    wave, edges = linear_grid(3700, 9200, 0.5)
    depth = sum(0.5 * 2.0 * math.sqrt(2 * math.pi) * gauss_pixels(edges, lam * zf, 2.0 * zf) for lam in lines)
    flux = 3.0 * (1 - depth)
    if pipeline == "bare":
        f = RawFeaturizer(rv="meta", target_r=None, continuum="none")
        base = 3.0
    else:
        f = RawFeaturizer(rv="meta")
        base = 1.0
    fb = f.transform(make_batch(wave, flux, 1e6, rv=v, r=5000.0))
    assert fb.quality["rv_kms"][0] == pytest.approx(v)
    assert not fb.quality["flags"][0] & F.RV_ESTIMATED
    feat = fb.features[0]
    j = np.arange(feat.size)
    for lam in lines:
        expect = (math.log10(lam) - math.log10(3900.0)) / 1e-4
        win = np.abs(j - expect) <= 12
        d = base - feat[win]
        centroid = float((d * j[win]).sum() / d.sum())
        assert abs(centroid - expect) < 0.1, (lam, centroid, expect)


def test_rv_modes():
    wave, _ = linear_grid(3700, 9200, 1.0)
    flux = np.ones((2, wave.size))
    batch = make_batch(wave, flux, 100.0, rv=[30.0, np.nan], r=1800.0)
    with pytest.raises(StxError, match="rv='meta'"):
        RawFeaturizer(rv="meta").transform(batch)
    fb = RawFeaturizer(rv="none").transform(batch)
    assert fb.quality["rv_kms"].tolist() == [0.0, 0.0] and not (fb.quality["flags"] & F.RV_ESTIMATED).any()
    fb = RawFeaturizer(rv="auto").transform(batch)
    assert fb.quality["rv_kms"][0] == 30.0
    assert fb.quality["flags"][0] & F.RV_ESTIMATED == 0 and fb.quality["flags"][1] & F.RV_ESTIMATED
    # a featureless spectrum has no CCF peak: said so, velocity 0
    assert fb.quality["rv_kms"][1] == 0.0 and fb.quality["rv_ccf"][1] == 0.0
    assert any("no CCF peak" in n for n in fb.notes)
    fb = RawFeaturizer(rv="estimate").transform(batch)
    assert (fb.quality["flags"] & F.RV_ESTIMATED).all()
    with pytest.raises(StxError, match="redshift"):
        RawFeaturizer().transform(make_batch(wave, flux[:1], 1.0, rv=0.3 * C_KMS * 2, r=1800.0))


def _miles(star: str) -> tuple[np.ndarray, np.ndarray]:
    from astropy.io import fits

    path = DATA / "miles" / "spectra" / f"MILES_res2.50_star_{star}V.fits"
    with fits.open(path) as hdul:
        h = hdul[0].header
        flux = np.asarray(hdul[0].data, dtype=np.float64)
        wave_air = h["CRVAL1"] + h["CDELT1"] * (np.arange(flux.size) + 1 - h["CRPIX1"])
    return air_to_vacuum(wave_air), flux


# m0001 K dwarf [Fe/H] -0.75, m0002 K giant, m0100, m0300: none of them is an RV template
@pytest.mark.parametrize("star,v", [("m0001", 87.0), ("m0002", 87.0), ("m0101", -143.0), ("m0300", 87.0)])
def test_rv_estimate_recovers_injected_shift_on_real_miles_star(star, v):
    wave, flux = _miles(star)
    batch = make_batch(wave * (1 + v / C_KMS), flux, 1e4, r=wave / 2.5)
    fb = RawFeaturizer().transform(batch)
    assert fb.quality["flags"][0] & F.RV_ESTIMATED
    assert abs(float(fb.quality["rv_kms"][0]) - v) < 10.0
    assert fb.quality["rv_ccf"][0] > 0.5
    assert any("estimated by cross-correlation" in n for n in fb.notes)


# ---------------------------------------------------------------------- resolution matching


def test_degrading_r5000_line_to_r1800_gives_the_expected_fwhm():
    wave, _ = linear_grid(5950, 6050, 0.05)
    grid = L.describe_grid(wave)
    assert grid.kind == "linear"
    sig_src = 6000.0 / 5000.0 / L.FWHM_PER_SIGMA
    line = gauss_pixels(grid.edges, 6000.0, sig_src)[:, None].astype(np.float32)
    assert fwhm_of(wave, line[:, 0]) == pytest.approx(1.2, rel=0.01)
    deg = L.build_degrader(grid, L.kernel_sigma(wave, np.full(wave.size, 5000.0), 1800.0))
    good = np.ones(line.shape, bool)
    out, ok, var = L.apply_degrader(deg, line, good, np.full(line.shape, 1e-4, np.float32))
    assert ok.all()
    assert fwhm_of(wave, out[:, 0]) == pytest.approx(6000.0 / 1800.0, rel=0.03)
    assert out.sum() == pytest.approx(line.sum(), rel=1e-3)  # the kernel conserves flux
    # variance through the squared kernel: white noise loses variance by sum(k^2)
    assert var[wave.size // 2, 0] < 1e-4 / 10


def test_degrading_with_per_pixel_r_and_not_where_already_coarser():
    wave, edges = linear_grid(4000, 8000, 0.1)
    grid = L.describe_grid(wave)
    r_src = wave / 1.2  # FWHM 1.2 A everywhere, like a library with constant FWHM
    y = (gauss_pixels(edges, 4600.0, 1.2 / L.FWHM_PER_SIGMA) + gauss_pixels(edges, 7200.0, 1.2 / L.FWHM_PER_SIGMA))
    deg = L.build_degrader(grid, L.kernel_sigma(wave, r_src, 1800.0))
    out, _, _ = L.apply_degrader(deg, y[:, None].astype(np.float32), np.ones((wave.size, 1), bool),
                                 np.ones((wave.size, 1), np.float32))
    for lam in (4600.0, 7200.0):
        sel = np.abs(wave - lam) < 20
        assert fwhm_of(wave[sel], out[sel, 0]) == pytest.approx(lam / 1800.0, rel=0.03)
    assert L.build_degrader(grid, L.kernel_sigma(wave, np.full(wave.size, 1500.0), 1800.0)) is None
    # at the featurizer level: a source coarser than the target is left alone
    wv, _ = linear_grid(3700, 9200, 1.0)
    rng = np.random.default_rng(5)
    batch = make_batch(wv, 1 + 0.1 * rng.standard_normal(wv.size), 100.0, r=1500.0)
    a = RawFeaturizer(rv="none").transform(batch)
    b = RawFeaturizer(rv="none", target_r=None).transform(batch)
    np.testing.assert_array_equal(a.features, b.features)


def test_missing_resolving_power_needs_an_explicit_assumption():
    wave, _ = linear_grid(3700, 9200, 1.0)
    batch = make_batch(wave, np.ones(wave.size), 100.0, r=None)
    with pytest.raises(StxError, match="assume_source_r"):
        RawFeaturizer(rv="none").transform(batch)
    fb = RawFeaturizer(rv="none", assume_source_r=1800.0).transform(batch)
    assert np.isfinite(fb.features).all()
    assert RawFeaturizer(rv="none", target_r=None).transform(batch).features.shape == (1, 3535)


def _band_matrix(n: int, npix: int, sigma_pix: float, ndiag: int = 11) -> np.ndarray:
    offs = ndiag // 2 - np.arange(ndiag)
    k = np.exp(-0.5 * (offs / sigma_pix) ** 2)
    k /= k.sum()
    return np.broadcast_to(k[None, :, None], (n, ndiag, npix)).astype(np.float32).copy()


def test_sigma_from_resolution_matrix_and_per_spectrum_degradation():
    wave, _ = linear_grid(5900, 6100, 0.2)
    res = _band_matrix(2, wave.size, 1.5)
    res[1] = 0.0  # a dead fibre
    sig = L.sigma_from_resolution(res)
    assert sig.shape == (wave.size, 2)
    offs = np.arange(-5, 6)
    k = np.exp(-0.5 * (offs / 1.5) ** 2)
    expect = math.sqrt((k * offs**2).sum() / k.sum())  # the truncated kernel's own second moment
    np.testing.assert_allclose(sig[10:-10, 0], expect, rtol=1e-5)
    assert np.isnan(sig[:, 1]).all()
    # a per-spectrum kernel taking a FWHM-1.2 A line to R = 1800
    grid = L.describe_grid(wave)
    line = gauss_pixels(grid.edges, 6000.0, 1.2 / L.FWHM_PER_SIGMA).astype(np.float32)
    sigma = L.kernel_sigma(wave, wave / 1.2, 1800.0)[:, None] * np.ones((1, 2))
    sigma[:, 1] = 0.0  # second spectrum: no degradation
    f = np.stack([line, line], axis=1)
    out, ok, _ = L.degrade_per_spectrum(grid, sigma, f, np.ones(f.shape, bool), np.ones(f.shape, np.float32))
    assert fwhm_of(wave, out[:, 0]) == pytest.approx(6000.0 / 1800.0, rel=0.03)
    np.testing.assert_allclose(out[:, 1], line, rtol=1e-6)


def test_use_resolution_matrix_end_to_end():
    wave, edges = linear_grid(3700, 9200, 0.8)
    sig_pix = 0.7  # a DESI-like kernel
    flux = 1 - 0.5 * 2.0 * math.sqrt(2 * math.pi) * gauss_pixels(edges, 6000.0, 2.0)
    batch = make_batch(wave, np.stack([flux, flux]), 100.0, rv=0.0, r=None)
    batch.arms[0].resolution = _band_matrix(2, wave.size, sig_pix)
    f = RawFeaturizer(use_resolution_matrix=True, rv="meta")
    fb = f.transform(batch)
    assert f.needs_resolution and np.isfinite(fb.features).all() and (fb.ivar > 0).mean() > 0.99
    # same as the fixed Gaussian path given the equivalent resolving power
    r_equiv = wave / (L.FWHM_PER_SIGMA * float(L.sigma_from_resolution(batch.arms[0].resolution)[2000, 0]) * 0.8)
    batch.arms[0].resolving_power = r_equiv
    fb2 = RawFeaturizer(rv="meta").transform(batch)
    np.testing.assert_allclose(fb.features, fb2.features, atol=2e-3)


# ------------------------------------------------------------------------------- resampling


def test_resampling_conserves_flux_on_an_irregular_grid():
    rng = np.random.default_rng(7)
    widths = rng.uniform(0.3, 2.0, 800)
    edges = 5000.0 + np.concatenate([[0.0], np.cumsum(widths)])
    wave = 0.5 * (edges[1:] + edges[:-1])
    grid = L.describe_grid(wave)
    assert grid.kind == "general"
    flux = rng.uniform(0.5, 3.0, (wave.size, 3)).astype(np.float32)
    w = grid.width[:, None].astype(np.float32)
    out_edges = np.sort(rng.uniform(grid.edges[0], grid.edges[-1], 301))
    out_edges[0], out_edges[-1] = grid.edges[0], grid.edges[-1]
    p = L.edge_positions(grid, out_edges, np.ones(3))
    num, den, vnum = L.resample_sums(flux * w, np.ones_like(flux) * w, np.ones_like(flux) * w * w, p, wave.size)
    np.testing.assert_allclose(num.sum(axis=0), (flux * w).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(den[:, 0], np.diff(out_edges), rtol=1e-4)  # the bins are fully covered
    # the sparse zero-velocity matrix is the same operator
    o = L.resample_matrix(grid, out_edges)
    np.testing.assert_allclose(o @ (flux * w), num, rtol=1e-5, atol=1e-6)


def test_featurizer_resampling_preserves_the_integral():
    wave, edges = linear_grid(3800, 9000, 0.7)
    rng = np.random.default_rng(11)
    flux = rng.uniform(0.5, 2.0, wave.size)
    fb = RawFeaturizer(rv="none", target_r=None, continuum="none").transform(make_batch(wave, flux, 1.0))
    f = RawFeaturizer()
    out_edges = 10 ** (math.log10(3900.0) + 1e-4 * (np.arange(f.dim + 1) - 0.5))
    got = float((fb.features[0] * np.diff(out_edges)).sum())
    cum = np.concatenate([[0.0], np.cumsum(flux * 0.7)])
    expect = float(np.diff(np.interp(out_edges[[0, -1]], edges, cum))[0])
    assert got == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("offset", [0.0, 0.4])
def test_white_noise_variance_through_a_2x_coarser_grid(offset):
    dl_in, dl_out, wmin, wmax = 0.5e-4, 1e-4, 5000.0, 5400.0
    l0 = math.log10(wmin)
    i = np.arange(-200, 2 * int((math.log10(wmax) - l0) / dl_out) + 200)
    wave = 10 ** (l0 + dl_in * (i - 0.5 + offset))  # aligned: 2 input pixels per output pixel
    n, sigma = 3000, 0.1
    rng = np.random.default_rng(1)
    flux = (1.0 + sigma * rng.standard_normal((n, wave.size))).astype(np.float32)
    f = RawFeaturizer(wmin=wmin, wmax=wmax, rv="none", target_r=None, continuum="none")
    fb = f.transform(make_batch(wave, flux, 1 / sigma**2))
    pred_var = 1.0 / fb.ivar.mean(axis=0)
    emp_var = fb.features.var(axis=0)
    if offset == 0.0:
        # exactly two pixels per bin: the variance is halved, and the ivar says so
        np.testing.assert_allclose(pred_var, sigma**2 / 2, rtol=1e-3)
    else:
        # three pixels with overlaps (0.6, 1, 0.4): var = sigma^2 * (0.36 + 1 + 0.16) / 4
        np.testing.assert_allclose(pred_var, sigma**2 * 1.52 / 4, rtol=1e-3)
    assert np.mean(emp_var) / np.mean(pred_var) == pytest.approx(1.0, abs=0.01)
    assert np.abs(emp_var / pred_var - 1).max() < 0.12  # each pixel from 3000 draws


def test_exact_rebinning_at_zero_velocity_equals_the_fixed_matrix_pass():
    # rv="none" takes the cached sparse zero-velocity rebinning; a velocity of 1e-9 km/s takes the
    # per-spectrum exact rebinning and the continuum shift: both must give the same features
    wave, _ = linear_grid(3600, 9800, 0.8)
    rng = np.random.default_rng(12)
    flux = (1 + 0.05 * rng.standard_normal((3, wave.size))) * (wave / 5000.0) ** -1
    mask = rng.random(flux.shape) < 0.02
    batch = make_batch(wave, flux, 400.0, rv=1e-9, r=3000.0, mask=mask)
    a = RawFeaturizer(rv="none").transform(batch)
    b = RawFeaturizer(rv="meta").transform(batch)
    np.testing.assert_array_equal(a.ivar > 0, b.ivar > 0)
    np.testing.assert_allclose(a.features, b.features, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(a.ivar, b.ivar, rtol=2e-4)


def test_overlapping_arms_combine_by_inverse_variance():
    dl = 1e-4
    l0 = math.log10(4000.0)
    w1 = 10 ** (l0 + dl * np.arange(0, 1800))  # 4000-5989 A, on the output pixel centres
    w2 = 10 ** (l0 + dl * np.arange(1500, 3000))  # 5590-7977 A
    meta = SpectrumMeta.empty(1, "test", "mem")
    arms = [
        Arm("b", w1, np.full((1, w1.size), 1.0, np.float32), np.full((1, w1.size), 4.0, np.float32),
            np.zeros((1, w1.size), bool)),
        Arm("r", w2, np.full((1, w2.size), 2.0, np.float32), np.full((1, w2.size), 1.0, np.float32),
            np.zeros((1, w2.size), bool)),
    ]
    f = RawFeaturizer(wmin=4000.0, wmax=7900.0, rv="none", target_r=None, continuum="none")
    fb = f.transform(SpectrumBatch(arms, meta))
    ax = f.axis()
    only1 = ax < w2[0] - 2
    both = (ax > w2[0] + 2) & (ax < w1[-1] - 2)
    only2 = ax > w1[-1] + 2
    np.testing.assert_allclose(fb.features[0, only1], 1.0, rtol=1e-6)
    np.testing.assert_allclose(fb.ivar[0, only1], 4.0, rtol=1e-4)
    np.testing.assert_allclose(fb.features[0, both], (1.0 * 4 + 2.0 * 1) / 5, rtol=1e-6)
    np.testing.assert_allclose(fb.ivar[0, both], 5.0, rtol=1e-4)
    np.testing.assert_allclose(fb.features[0, only2], 2.0, rtol=1e-6)
    np.testing.assert_allclose(fb.ivar[0, only2], 1.0, rtol=1e-4)
    assert both.sum() > 250


# ---------------------------------------------------------------------------- bad input, flags


def test_nan_and_inf_input_never_leave_and_are_flagged():
    wave, _ = linear_grid(3700, 9200, 1.0)
    rng = np.random.default_rng(2)
    flux = (1 + 0.01 * rng.standard_normal((4, wave.size))).astype(np.float32)
    ivar = np.full(flux.shape, 1e4, np.float32)
    flux[0, 100:140] = np.nan
    ivar[0, 2000:2010] = np.inf
    flux[1, 3000] = -np.inf
    flux[2, :] = np.nan  # nothing usable
    before = (flux.copy(), ivar.copy())
    batch = make_batch(wave, flux, ivar, rv=0.0, r=1800.0)
    fb = RawFeaturizer().transform(batch)
    assert np.isfinite(fb.features).all() and np.isfinite(fb.ivar).all()
    assert np.isfinite(fb.quality["snr"]).all() and np.isfinite(fb.quality["rv_kms"]).all()
    fl = fb.quality["flags"]
    assert [bool(x & F.BAD_INPUT) for x in fl] == [True, True, True, False]
    assert fl[2] & F.NO_OVERLAP and fl[2] & F.HEAVY_MASK and not fl[0] & F.NO_OVERLAP
    assert (fb.features[2] == 1.0).all() and (fb.ivar[2] == 0).all()
    # the batch given is not modified
    np.testing.assert_array_equal(batch.arms[0].flux, before[0])
    np.testing.assert_array_equal(batch.arms[0].ivar, before[1])
    # a reader that already masked NaN says so in meta.extra
    b2 = make_batch(wave, flux[3:], 1e4, rv=0.0, r=1800.0, extra={"n_bad_input": np.array([3])})
    assert RawFeaturizer().transform(b2).quality["flags"][0] & F.BAD_INPUT


def test_spectrum_outside_the_grid_is_no_overlap():
    wave, _ = linear_grid(9500, 10500, 1.0)
    fb = RawFeaturizer().transform(make_batch(wave, np.ones((1, wave.size)), 100.0, r=1800.0))
    q = fb.quality
    assert q["flags"][0] & F.NO_OVERLAP and q["flags"][0] & F.HEAVY_MASK and q["flags"][0] & F.LOW_SNR
    assert q["masked_frac"][0] == 1.0 and q["snr"][0] == 0.0 and q["rv_kms"][0] == 0.0
    assert (fb.features == 1.0).all() and (fb.ivar == 0).all()
    # continuum "none": missing pixels are 0 with ivar 0
    fb = RawFeaturizer(continuum="none", rv="none").transform(make_batch(wave, np.ones((1, wave.size)), 1.0, r=1800.0))
    assert (fb.features == 0.0).all() and (fb.ivar == 0).all()


def test_heavy_mask_and_low_snr_thresholds():
    wave, _ = linear_grid(3700, 9200, 1.0)
    rng = np.random.default_rng(4)
    flux = (1 + 0.5 * rng.standard_normal((2, wave.size))).astype(np.float32)
    ivar = np.full(flux.shape, 4.0, np.float32)  # per-pixel S/N ~2-3
    mask = np.zeros(flux.shape, bool)
    mask[1, wave < 6800] = True  # ~60 per cent of the grid
    fb = RawFeaturizer(rv="none").transform(make_batch(wave, flux, ivar, r=1800.0, mask=mask))
    q = fb.quality
    assert q["flags"][0] & F.LOW_SNR and not q["flags"][0] & F.HEAVY_MASK
    expect = math.log(6800 / 3900) / math.log(8800 / 3900)  # 68 per cent of the log grid
    assert q["flags"][1] & F.HEAVY_MASK and q["masked_frac"][1] == pytest.approx(expect, abs=0.003)
    assert 1.5 < q["snr"][0] < 5.0
    fb = RawFeaturizer(rv="none", heavy_mask_frac=0.7, snr_min=1.0).transform(
        make_batch(wave, flux, ivar, r=1800.0, mask=mask))
    assert not (fb.quality["flags"] & (F.HEAVY_MASK | F.LOW_SNR)).any()


def test_per_spectrum_grids_equal_separate_batches():
    wa, _ = linear_grid(3700, 3700 + 3908 * 1.4, 1.4)
    wb = 10 ** (3.5682 + 1e-4 * np.arange(3909))  # a LAMOST grid
    rng = np.random.default_rng(8)
    fa = 1 + 0.02 * rng.standard_normal(wa.size)
    fbb = 1 + 0.02 * rng.standard_normal(wb.size)[: wa.size]
    wave2d = np.stack([wa, wb[: wa.size]])
    batch = make_batch(wave2d, np.stack([fa, fbb]), 400.0, rv=[10.0, -20.0], r=1800.0)
    f = RawFeaturizer()
    both = f.transform(batch)
    one = f.transform(make_batch(wa, fa, 400.0, rv=10.0, r=1800.0))
    two = f.transform(make_batch(wb[: wa.size], fbb, 400.0, rv=-20.0, r=1800.0))
    np.testing.assert_allclose(both.features[0], one.features[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.features[1], two.features[0], rtol=1e-5, atol=1e-6)


def test_empty_batch():
    wave, _ = linear_grid(3700, 9200, 1.0)
    fb = RawFeaturizer().transform(make_batch(wave, np.zeros((0, wave.size)), 1.0, rv=np.zeros(0), r=1800.0))
    assert isinstance(fb, FeatureBatch) and fb.features.shape == (0, 3535) and fb.quality["flags"].shape == (0,)


# ------------------------------------------------------------------------- real survey files


def _read_all(path: Path, **kw) -> SpectrumBatch:
    from stxcli.registry import get_registry, identify

    reader = identify(path, get_registry())
    batches = [b.validate() for b in reader.read(path, **kw)]
    assert len(batches) == 1
    return batches[0]


def test_real_lamost_desi_and_miles_files_on_one_grid():
    f = RawFeaturizer()
    lam10 = sorted((DATA / "lamost-dr10" / "spectra").glob("*.fits.gz"))[0]
    lam1 = sorted((DATA / "lamost-dr1" / "spectra").glob("*.fits"))[0]
    desi = DATA / "desi-edr" / "coadd-sv3-dark-26065.fits"
    miles = DATA / "miles" / "spectra" / "MILES_res2.50_star_m0001V.fits"
    out = {}
    for key, path in [("dr10", lam10), ("dr1", lam1), ("desi", desi), ("miles", miles)]:
        batch = _read_all(path)
        fb = f.transform(batch)
        assert fb.features.shape == (batch.n, f.dim) and fb.ivar.shape == fb.features.shape
        assert np.isfinite(fb.features).all() and np.isfinite(fb.ivar).all() and (fb.ivar >= 0).all()
        for k in ("snr", "masked_frac", "flags", "rv_kms", "rv_ccf"):
            assert fb.quality[k].shape == (batch.n,) and np.isfinite(fb.quality[k]).all()
        assert fb.quality["flags"].dtype == np.int32 and fb.quality["snr"].dtype == np.float32
        out[key] = (batch, fb)
    for key in ("dr10", "dr1"):  # LAMOST: velocity from the header, a good star spectrum
        batch, fb = out[key]
        assert fb.quality["rv_kms"][0] == pytest.approx(batch.meta.rv_kms[0], abs=1e-3)
        assert fb.quality["flags"][0] & (F.RV_ESTIMATED | F.NO_OVERLAP | F.HEAVY_MASK) == 0
        arm = batch.arms[0]
        inside = (arm.wave > 3900) & (arm.wave < 8800)
        assert fb.quality["masked_frac"][0] == pytest.approx((arm.ivar[0, inside] == 0).mean(), abs=0.005)
        valid = fb.ivar[0] > 0
        assert 0.9 < np.median(fb.features[0, valid]) < 1.05
    batch, fb = out["desi"]
    dead = np.array([not any((a.ivar[i] > 0).any() for a in batch.arms) for i in range(batch.n)])
    assert dead.any() and not dead.all()
    fl = fb.quality["flags"]
    assert all(bool(x & F.NO_OVERLAP) == d for x, d in zip(fl, dead))
    assert (fb.ivar[dead] == 0).all() and (fb.ivar[~dead] > 0).any(axis=1).all()
    assert (fl[~dead] & F.RV_ESTIMATED).all()  # DESI coadds carry no velocity
    batch, fb = out["miles"]
    assert fb.quality["flags"][0] & F.RV_ESTIMATED and abs(fb.quality["rv_kms"][0]) < 15  # MILES is at rest
    assert 0.15 < fb.quality["masked_frac"][0] < 0.25  # MILES stops at 7410 A


def test_real_desi_with_resolution_matrix():
    path = DATA / "desi-edr" / "coadd-sv3-dark-26065.fits"
    f = RawFeaturizer(use_resolution_matrix=True)
    batch = _read_all(path, with_resolution=True)
    assert all(a.resolution is not None for a in batch.arms)
    fb = f.transform(batch)
    ref = RawFeaturizer().transform(_read_all(path))
    assert np.isfinite(fb.features).all()
    np.testing.assert_array_equal(fb.quality["flags"] & F.NO_OVERLAP, ref.quality["flags"] & F.NO_OVERLAP)
    both = (fb.ivar > 0) & (ref.ivar > 0)
    # the per-fibre LSF differs from the file median only a little: a few per cent of the noise
    d = np.abs(fb.features[both] - ref.features[both]) * np.sqrt(ref.ivar[both])
    assert np.median(d) < 0.05


# ------------------------------------------------------- fast paths equal their dense references


def _dense_degrade(deg, flux, good, var):
    """The reference normalised convolution: three dense products, every pixel re-normalised."""
    g = good.astype(np.float32)
    return L._normalised(deg.k @ (flux * g), deg.k @ g, deg.k2 @ (var * g), good)


def _desi_like_degrader():
    wave, _ = linear_grid(5000, 5400, 0.8)
    grid = L.describe_grid(wave)
    return grid, L.build_degrader(grid, L.kernel_sigma(wave, np.full(wave.size, 4000.0), 1800.0))


def test_degrader_near_masked_pixels_equals_the_dense_normalisation():
    grid, deg = _desi_like_degrader()
    npix = grid.npix
    rng = np.random.default_rng(3)
    flux = rng.uniform(0.5, 1.5, (npix, 4)).astype(np.float32)
    var = rng.uniform(0.01, 0.02, (npix, 4)).astype(np.float32)
    good = np.ones((npix, 4), bool)
    good[200, 0] = False  # one pixel
    good[300:340, 1] = False  # a run
    good[:5, 2] = False  # at the arm's edge
    # column 3: all good
    fz, vz = np.where(good, flux, 0), np.where(good, var, 0)
    f, ok, v = L.apply_degrader(deg, fz, good, vz, zeroed=True)
    rf, rok, rv = _dense_degrade(deg, flux, good, var)
    np.testing.assert_array_equal(ok, rok)
    np.testing.assert_allclose(f, rf, rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(v, rv, rtol=2e-6, atol=1e-10)
    assert (f[~ok] == 0).all() and (v[~ok] == 0).all()
    # by hand: a constant stays constant next to a masked pixel; the pixel itself is dropped;
    # its neighbour's variance is the kernel-weighted sum over the good pixels / their weight^2
    c, cg = np.full((npix, 1), 2.0, np.float32), np.ones((npix, 1), bool)
    cg[200] = False
    cf, cok, cv = L.apply_degrader(deg, np.where(cg, c, 0), cg, np.where(cg, 1.0, 0).astype(np.float32), zeroed=True)
    assert not cok[200, 0] and cok[199, 0] and cok[201, 0]
    np.testing.assert_allclose(cf[cok], 2.0, rtol=1e-6)
    row = deg.k[201].toarray()[0].astype(np.float64)
    w_good = row.sum() - row[200]
    assert cv[201, 0] == pytest.approx(((row**2).sum() - row[200] ** 2) / w_good**2, rel=1e-5)


def test_degrader_with_many_bad_pixels_takes_the_dense_path_and_agrees():
    grid, deg = _desi_like_degrader()
    rng = np.random.default_rng(4)
    flux = rng.uniform(0.5, 1.5, (grid.npix, 3)).astype(np.float32)
    good = rng.random(flux.shape) > 0.2  # 20 % bad: above the sparse threshold
    f, ok, v = L.apply_degrader(deg, flux, good, flux.copy())
    rf, rok, rv = _dense_degrade(deg, flux, good, flux)
    np.testing.assert_array_equal(ok, rok)
    np.testing.assert_allclose(f, rf, rtol=1e-6)
    np.testing.assert_allclose(v, rv, rtol=1e-6)


def test_delta_line_through_the_degrader_is_the_kernel_column():
    grid, deg = _desi_like_degrader()
    delta = np.zeros((grid.npix, 1), np.float32)
    delta[250] = 1.0
    f, ok, _ = L.apply_degrader(deg, delta, np.ones_like(delta, bool), np.ones_like(delta))
    np.testing.assert_allclose(f[:, 0], deg.k[:, 250].toarray()[:, 0], rtol=1e-6, atol=1e-9)
    assert f.sum() == pytest.approx(1.0, rel=1e-4)  # rows sum to 1 and the kernel is symmetric


@pytest.mark.parametrize("kind", ["linear", "log", "general"])
def test_rebinning_of_an_all_good_piece_needs_no_gathered_width(kind):
    rng = np.random.default_rng(9)
    if kind == "linear":
        wave = 5000.0 + 0.8 * np.arange(600)
    elif kind == "log":
        wave = 10 ** (3.7 + 6e-5 * np.arange(600))
    else:
        wave = 5000.0 + np.cumsum(rng.uniform(0.5, 1.2, 600))
    grid = L.describe_grid(wave)
    assert grid.kind == kind
    n = 5
    flux = rng.uniform(0.5, 2.0, (grid.npix, n)).astype(np.float32)
    w = grid.width.astype(np.float32)[:, None]
    a, b, v = flux * w, np.ones_like(flux) * w, flux * w * w
    out_edges = 10 ** (math.log10(wave[0]) - 0.001 + 1e-4 * np.arange(int((math.log10(wave[-1]) + 0.002
                                                                          - math.log10(wave[0])) / 1e-4)))
    zf = 1 + rng.uniform(-300, 300, n) / C_KMS
    p = L.edge_positions(grid, out_edges, zf)
    ref = L.resample_sums(a, b, v, p, grid.npix)
    got = L.resample_sums(a, None, v, p, grid.npix, grid)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=2e-5)  # bins past the arm: 0 both
    np.testing.assert_allclose(got[2], ref[2], rtol=1e-6, atol=1e-7)
    assert (got[1][:5] == 0).all() and got[1].max() > 0


def _dense_continuum(model, flux, good, n_iter, clip_lo, clip_hi):
    """The reference fit: n dense (nb x nb) normal-equation solves per iteration (the old code)."""
    g = good.astype(np.float32)
    gb = np.add.reduceat(g, model.starts, axis=0)
    fsum = np.add.reduceat(flux * g, model.starts, axis=0)
    fb = np.zeros_like(fsum)
    np.divide(fsum, gb, out=fb, where=gb > 0)
    w, n = gb, flux.shape[1]
    off = model.pairs_k != model.pairs_l
    for it in range(n_iter):
        gram = (model.prod_t @ w).T
        rhs = (model.basis_bin_t @ (w * fb)).T
        a = np.broadcast_to(model.penalty, (n, model.nb, model.nb)).copy()
        a[:, model.pairs_k, model.pairs_l] += gram
        a[:, model.pairs_l[off], model.pairs_k[off]] += gram[:, off]
        coef = np.linalg.solve(a, rhs.astype(np.float64)[:, :, None])[:, :, 0]
        if it == n_iter - 1:
            break
        cb = model.basis_bin_t.T @ np.ascontiguousarray(coef.T, dtype=np.float32)
        inv = np.zeros_like(cb)
        np.divide(np.float32(1.0), cb, out=inv, where=cb > 0)
        r = fb * inv - 1
        rms = np.sqrt(np.einsum("ij,ij->j", r * w, r) / np.maximum(w.sum(axis=0), 1.0))
        w = gb * ((r > -clip_lo * rms) & (r < clip_hi * rms) & (gb > 0) & (inv > 0))
    return model.basis @ np.ascontiguousarray(coef.T, dtype=np.float32)


def test_banded_continuum_solve_equals_the_dense_normal_equations():
    f = RawFeaturizer()
    model = L.build_continuum_model(np.log10(f.axis()), 0.02, 4)
    ax = f.axis()
    rng = np.random.default_rng(6)
    cont = (ax / 5000.0)[:, None] ** rng.uniform(-3, 1, 6)[None, :]
    lines = 1 - 0.5 * (rng.random((ax.size, 6)) < 0.03)
    flux = (cont * lines * (1 + 0.01 * rng.standard_normal((ax.size, 6)))).astype(np.float32)
    good = np.ones(flux.shape, bool)
    good[1000:1400, 2] = False  # a gap bridged by the penalty
    good[:, 5] = False  # nothing at all: the penalty alone, a zero continuum
    flux[~good] = 0
    got = L.fit_continuum(model, flux, good, 5, 2.0, 3.0, zeroed=True)
    ref = _dense_continuum(model, flux, good, 5, 2.0, 3.0)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
    assert np.abs(got[:, 5]).max() < 1e-6


@pytest.mark.parametrize("frac", [0.01, 0.5])  # runs below / above the dense-norm threshold
def test_ccf_template_norms_by_runs_and_dense_agree(frac):
    rng = np.random.default_rng(8)
    m, nt, n = 600, 3, 4
    tmpl = np.clip(rng.normal(0.0, 0.2, (nt, m)), 0, None).astype(np.float32)
    off = np.zeros(m, bool)
    off[100:130] = True  # a telluric band
    bank = L.ccf_bank(tmpl, 6, off=off)
    shift = np.array([2, -3, 0, 5])
    x = np.stack([np.roll(tmpl[i % nt], s) for i, s in enumerate(shift)], axis=1).astype(np.float32)
    gx = (rng.random((m, n)) > frac) & ~off[:, None]
    gx[200:260, 1] = False  # a masked stretch: one run
    gx[-40:, 3] = False  # and one to the end
    x = x * gx
    v, peak, edge = L.ccf_velocity(np.ascontiguousarray(x.T), np.ascontiguousarray(gx.T), bank, 1e-4)
    # the reference: every norm from one dense product over the valid pixels
    sl = slice(bank.j0, bank.j1)
    sh = bank.sh_t.T
    num = x[sl].T @ sh
    tn = gx[sl].T.astype(np.float32) @ (sh * sh)
    cc = num / np.sqrt(tn * np.einsum("ij,ij->j", x[sl], x[sl])[:, None])
    best = cc.argmax(axis=1)
    assert np.allclose(peak, cc[np.arange(n), best], rtol=1e-5)
    lag = bank.lags[best % bank.lags.size]
    np.testing.assert_array_equal(lag, shift)
    assert (np.abs(v - C_KMS * (10 ** (shift * 1e-4) - 1)) < 0.5 * C_KMS * 1e-4 * math.log(10)).all()


def test_spectra_without_data_skip_the_work_and_match_a_live_only_batch():
    wave, _ = linear_grid(3700, 9200, 1.0)
    rng = np.random.default_rng(10)
    flux = (1 + 0.02 * rng.standard_normal((5, wave.size))).astype(np.float32)
    ivar = np.full(flux.shape, 2500.0, np.float32)
    ivar[[1, 3]] = 0.0  # dead fibres
    flux[3] = np.nan  # and one of them with NaN flux
    mixed = RawFeaturizer().transform(make_batch(wave, flux, ivar, rv=[10.0, np.nan, -20.0, np.nan, np.nan], r=1800.0))
    live = RawFeaturizer().transform(make_batch(wave, flux[[0, 2, 4]], ivar[[0, 2, 4]], rv=[10.0, -20.0, np.nan], r=1800.0))
    np.testing.assert_array_equal(mixed.features[[0, 2, 4]], live.features)
    np.testing.assert_array_equal(mixed.ivar[[0, 2, 4]], live.ivar)
    for k in ("snr", "masked_frac", "rv_kms", "rv_ccf", "flags"):
        np.testing.assert_array_equal(mixed.quality[k][[0, 2, 4]], live.quality[k])
    q = mixed.quality
    assert (mixed.features[[1, 3]] == 1.0).all() and (mixed.ivar[[1, 3]] == 0).all()
    assert (q["masked_frac"][[1, 3]] == 1.0).all() and (q["snr"][[1, 3]] == 0).all()
    assert (q["rv_kms"][[1, 3]] == 0).all() and (q["rv_ccf"][[1, 3]] == 0).all()
    for i in (1, 3):
        assert q["flags"][i] & F.NO_OVERLAP and q["flags"][i] & F.HEAVY_MASK and q["flags"][i] & F.LOW_SNR
        assert not q["flags"][i] & F.RV_ESTIMATED
    assert q["flags"][3] & F.BAD_INPUT and not q["flags"][1] & F.BAD_INPUT
    assert "2 spectra without data: no RV estimated (0 used)" in mixed.notes
    # a batch of dead spectra only
    dead = RawFeaturizer().transform(make_batch(wave, flux[[1, 3]], ivar[[1, 3]], r=1800.0))
    assert (dead.features == 1.0).all() and (dead.quality["flags"] & F.NO_OVERLAP).all()


def test_shift_rows_by_hand():
    values = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [3.0, 40.0]], np.float32)  # (m=4, n=2)
    out = L.shift_rows(values, np.array([0.25, -1.5]))
    # column 0 read a quarter pixel up; column 1 read 1.5 pixels down, the first pixel repeated
    np.testing.assert_allclose(out[0], [0.25, 1.25, 2.25, 3.0], rtol=1e-6)
    np.testing.assert_allclose(out[1], [10.0, 10.0, 15.0, 25.0], rtol=1e-6)
    assert out.shape == (2, 4) and out.flags.c_contiguous


def test_prepare_builds_the_input_independent_parts_and_changes_nothing():
    wave, _ = linear_grid(3700, 9200, 1.0)
    rng = np.random.default_rng(13)
    batch = make_batch(wave, 1 + 0.02 * rng.standard_normal((2, wave.size)), 2500.0, r=1800.0)
    f = RawFeaturizer()
    f.prepare()
    assert f._cont_model is not None and f._ccf_bank is not None
    np.testing.assert_array_equal(f.transform(batch).features, RawFeaturizer().transform(batch).features)
    # a grid the RV templates do not cover: prepare says nothing, the estimate still fails loudly
    g = RawFeaturizer(wmin=8000.0, wmax=9000.0)
    g.prepare()
    with pytest.raises(StxError, match="does not overlap the RV templates"):
        g.transform(make_batch(linear_grid(7900, 9100, 1.0)[0], np.ones(1201), 100.0, r=1800.0))
