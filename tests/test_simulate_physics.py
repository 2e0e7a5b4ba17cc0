"""Physics of the simulator: curve of growth, Balmer peak, TiO, photosphere, populations, RNG."""

from __future__ import annotations

import numpy as np
import pytest

from stx_builtin.simulate import atoms, observe, photosphere, populations, rng, synth


def _ew(flux: np.ndarray, lo: float, hi: float) -> np.ndarray:
    w = synth.hires_grid().wave
    s = (w > lo) & (w < hi)
    return ((1.0 - flux[:, s]) * np.gradient(w)[s]).sum(axis=1)


def test_line_depths_grow_with_metallicity_and_saturate():
    feh = np.array([-2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5])
    n = feh.size
    f = synth.synthesize(np.full(n, 5000.0), np.full(n, 4.5), feh, np.zeros(n), normalized=True)
    for lo, hi in ((5266.0, 5276.0), (5160.0, 5190.0), (5000.0, 5500.0)):  # Fe I 5270 blend, Mg b, a window
        ew = _ew(f, lo, hi)
        assert np.all(np.diff(ew) > 0), (lo, ew)  # deeper with [Fe/H]
        slope = np.diff(np.log10(ew)) / 0.5  # d log EW / d [Fe/H]
        assert slope[0] > 1.5 * slope[-1], (lo, slope)  # saturation: metal-rich lines stop growing
        assert slope[-1] < 0.45
    # an isolated weak line (Fe I 6082.7 air) is on the linear part of the curve of growth at low [Fe/H]
    weak = _ew(f, 6084.0, 6085.2)
    assert np.log10(weak[2] / weak[1]) / 0.5 == pytest.approx(0.9, abs=0.12)


def test_curve_of_growth_closed_form_matches_the_integral():
    # W / (b sqrt(pi)) of a Gaussian-profile line, by direct numerical integration
    u = np.linspace(-8, 8, 20001)
    for x in (0.01, 1.0, 10.0, 1e3, 1e5):
        exact = np.trapezoid(1.0 - np.exp(-x * np.exp(-u * u)), u) / np.sqrt(np.pi)
        r = np.array([1.0], dtype=np.float32)
        approx = synth.line_absorption(np.array([[x]], dtype=np.float32), r)[0, 0]
        assert approx == pytest.approx(min(exact, 1.0), rel=0.05)
    # weak limit: absorption equals the optical depth whatever r
    a = synth.line_absorption(np.array([[1e-4]], dtype=np.float32), np.array([0.25], dtype=np.float32))
    assert a[0, 0] == pytest.approx(1e-4, rel=1e-3)


def _hydrogen_only(teff: np.ndarray, logg: float) -> np.ndarray:
    ts = synth.build_templates()
    n = teff.size
    w = synth.weights(teff, np.full(n, logg), np.zeros(n), np.zeros(n), ts)
    hyd = np.isin(ts.kind, [synth.H_CORE, synth.H_WING, synth.H_RES])
    w[:, ~hyd] = 0.0
    return synth.flux_from_weights(w, teff, synth.doppler_ratio(teff, np.full(n, logg)), ts, normalized=True)


def test_balmer_lines_peak_near_9000_to_10000_K():
    teff = np.array([5000.0, 6000, 7000, 8000, 8500, 9000, 9500, 10000, 11000, 12000, 14000, 16000])
    f = _hydrogen_only(teff, 4.0)
    for lo, hi in ((4830.0, 4895.0), (4075.0, 4130.0)):  # H beta, H delta
        ew = _ew(f, lo, hi)
        peak = teff[np.argmax(ew)]
        assert 8500.0 <= peak <= 11000.0, (lo, dict(zip(teff, ew.round(2))))
        assert ew[0] < 0.4 * ew.max() and ew[-1] < ew.max()


def test_cool_stars_show_tio_and_warm_stars_do_not():
    teff = np.array([3500.0, 3800.0, 4500.0, 5500.0])
    n = teff.size
    f = synth.synthesize(teff, np.full(n, 4.7), np.zeros(n), np.zeros(n), normalized=True)
    w = synth.hires_grid().wave
    cont = f[:, (w > 7030) & (w < 7052)].mean(axis=1)
    band = f[:, (w > 7058) & (w < 7140)].mean(axis=1)  # TiO gamma band head at 7054 A (air)
    depth = 1.0 - band / cont
    assert depth[0] > 0.5 and depth[1] > 0.1
    assert depth[2] < 0.03 and depth[3] < 0.01
    assert np.all(np.diff(depth) < 0)


def test_gravity_sensitive_strong_lines():
    f = synth.synthesize(np.full(2, 4800.0), np.array([4.6, 2.0]), np.zeros(2), np.zeros(2), normalized=True)
    na_d = _ew(f, 5885.0, 5905.0)
    ca_t = _ew(f, 8530.0, 8555.0)
    assert na_d[0] > na_d[1] * 1.2  # pressure-broadened Na D wings: dwarf > giant
    assert ca_t[1] > ca_t[0] * 1.1  # Ca II triplet (ion, low Pe): giant > dwarf


def test_photosphere_trends():
    teff = np.array([5777.0, 4500.0, 4500.0, 15000.0])
    logg = np.array([4.44, 4.6, 1.5, 4.0])
    lay = photosphere.solve_layer(teff, logg, np.zeros(4), np.zeros(4))
    assert 1.0 < lay.pe[0] < 100.0 and 1e4 < lay.pg[0] < 3e5  # solar-like pressures (dyn cm^-2)
    assert lay.pe[2] < 0.2 * lay.pe[1]  # giants: lower electron pressure
    assert lay.f_hi[0] > 0.99 and lay.f_hi[3] < 0.1  # hydrogen ionised in B stars
    fe = atoms.ELEMENTS["Fe"]
    f_fe = photosphere.neutral_fraction(lay, fe[2], fe[5] / fe[4])
    assert 0.02 < f_fe[0] < 0.3  # iron mostly ionised in the Sun


def test_saha_hand_value():
    # Phi(5040 K) for chi = 7.9 eV, U ratio 1: 0.6666 * 5040**2.5 * 10**-7.9
    expected = 0.6666 * 5040.0**2.5 * 10 ** (-7.9)
    assert photosphere.saha_phi(np.array([5040.0]), 7.9, 1.0)[0] == pytest.approx(expected, rel=1e-12)


def test_population_mixes_and_alpha_trend():
    lam = populations.sample(20000, 3, mix=populations.MIXES["lamost"], phases=populations.PHASE_MIX["lamost"])
    desi = populations.sample(20000, 3, mix=populations.MIXES["desi"], phases=populations.PHASE_MIX["desi"])
    assert np.mean(lam.feh < -1.0) < 0.07
    assert np.mean(desi.feh < -1.0) > 0.15
    assert np.mean(desi.feh < -1.0) > 3 * np.mean(lam.feh < -1.0)
    mp = desi.alpha_fe[desi.feh < -1.2].mean()
    mr = desi.alpha_fe[desi.feh > 0.0].mean()
    assert mp == pytest.approx(0.3, abs=0.05) and mr < 0.06
    assert lam.teff.min() >= 3500.0 and lam.teff.max() <= 7500.0
    giants = lam.logg < 3.5
    assert 0.2 < giants.mean() < 0.45
    # isochrone-like: metal-poor giants are hotter at the same gravity
    rgb = (lam.phase == 2) & (np.abs(lam.logg - 2.5) < 0.3)
    mp_t = lam.teff[rgb & (lam.feh < -0.6)].mean()
    mr_t = lam.teff[rgb & (lam.feh > 0.0)].mean()
    assert mp_t > mr_t + 80.0


def test_parse_mix_and_snr():
    assert populations.parse_mix("thin=2,thick=1,halo=1") == {"thin": 0.5, "thick": 0.25, "halo": 0.25}
    from stxcli.errors import UsageError

    with pytest.raises(UsageError):
        populations.parse_mix("disk=1")
    s = observe.parse_snr("10:100", "lamost")
    assert s.lo == 10 and s.hi == 100 and s.median == pytest.approx(np.sqrt(1000))
    assert observe.parse_snr("30", "desi").draw(np.array([0.1, 0.9])).tolist() == [30.0, 30.0]
    with pytest.raises(UsageError):
        observe.parse_snr("-5", "desi")


def test_random_streams_depend_on_seed_and_index_only():
    a = populations.sample(100, 11, mix=populations.MIXES["desi"], phases=populations.PHASE_MIX["desi"])
    b = populations.sample(300, 11, mix=populations.MIXES["desi"], phases=populations.PHASE_MIX["desi"])
    c = populations.sample(50, 11, mix=populations.MIXES["desi"], phases=populations.PHASE_MIX["desi"], start=50)
    for k in ("teff", "logg", "feh", "alpha_fe", "rv_kms"):
        assert np.array_equal(getattr(a, k), getattr(b, k)[:100])
        assert np.array_equal(getattr(a, k)[50:], getattr(c, k))
    u1 = rng.uniform(5, rng.OBS, np.arange(1000), 2)
    assert not np.array_equal(u1, rng.uniform(6, rng.OBS, np.arange(1000), 2))
    assert abs(u1.mean() - 0.5) < 0.03 and abs(np.corrcoef(u1[:, 0], u1[:, 1])[0, 1]) < 0.1


def test_continuum_is_planck_times_the_measured_correction(monkeypatch):
    wave = synth.hires_grid().wave
    teff = np.array([3400.0, 5777.0, 12000.0])
    monkeypatch.setattr(synth, "USE_SED_CORRECTION", False)
    plain = synth.continuum(teff)
    assert np.max(np.abs(plain / synth.planck(teff, wave) - 1.0)) < 1e-3  # node interpolation
    monkeypatch.setattr(synth, "USE_SED_CORRECTION", True)
    corrected = synth.continuum(teff)
    at_5500 = np.argmin(np.abs(wave - 5500.0))
    assert corrected[:, at_5500] == pytest.approx(1.0, abs=2e-3)  # Planck and correction are 1 at 5500 A
    ratio = corrected / plain
    assert np.all(np.isfinite(ratio)) and 0.3 < ratio.min() and ratio.max() < 3.2  # at most a factor ~3
    assert np.allclose(ratio[:, wave > 7500], ratio[:, [np.argmin(np.abs(wave - 7500))]], rtol=2e-3)  # flat beyond MILES
