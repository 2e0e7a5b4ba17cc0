"""Observation models: DESI resolution from the EDR files, SNR, noise, Cramer-Rao bounds."""

from __future__ import annotations

import numpy as np
import pytest

from stx_builtin.simulate import crb, engine, observe, realism, synth


def test_desi_resolution_constants_match_the_edr_resolution_matrices(shared):
    files = sorted((shared / "desi-edr").glob("coadd-*.fits"))
    measured = observe.measure_desi_resolution(files)
    for arm, (wave, sigma) in measured.items():
        ok = np.isfinite(sigma)
        ok[:5] = ok[-5:] = False
        model = observe.desi_sigma_pix(arm, wave)
        rel = np.abs(model[ok] / sigma[ok] - 1.0)
        # a quadratic per arm: the trend, not the pixel-to-pixel wiggles of the Z-arm coadd kernels
        assert np.median(rel) < 0.025 and np.percentile(rel, 95) < 0.12, arm
    # the resolving power the issue quotes: R 2300-3800 (B), 3800-5100 (R), 4600-5700 (Z), within 10 %
    for arm, (lo, hi) in {"b": (2300, 3800), "r": (3800, 5100), "z": (4600, 5700)}.items():
        w = observe.desi_wave(arm)
        r = w / (2.3548 * observe.desi_sigma_pix(arm) * 0.8)
        assert r.min() > 0.9 * lo and r.max() < 1.1 * hi


def test_resolution_matrix_storage_matches_desispec_convention():
    sig = np.full((1, 40), 1.0)
    k = observe.resolution_band(sig)
    dia = observe.band_to_dia(k)
    import scipy.sparse as sp

    offsets = np.arange(5, -6, -1)
    m = sp.dia_matrix((dia[0], offsets), shape=(40, 40)).toarray()
    x = np.zeros(40)
    x[20] = 1.0
    # the dense matrix applied to a delta gives the same as the band product
    assert np.allclose(m @ x, observe.apply_band(k, x[None, :].astype(np.float32))[0], atol=1e-6)
    assert np.allclose(m[20, 15:26], k[0, 20], atol=1e-7)  # row 20 is pixel 20's kernel
    assert m.sum(axis=1)[5:-5] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("survey", ["lamost", "desi"])
def test_realised_snr_equals_target(survey):
    model = observe.model_for(survey)
    n = 6
    teff = np.linspace(4200, 6800, n)
    hires = synth.synthesize(teff, np.full(n, 4.3), np.full(n, -0.3), np.full(n, 0.1))
    target = np.array([8.0, 15.0, 30.0, 60.0, 120.0, 200.0])
    p = observe.draw_params(survey, 4, np.arange(n), observe.SNR_DEFAULT[survey], np.zeros(n))
    p.snr = target
    obs = model.add_noise(model.noiseless(hires, p), p, 4)
    got = obs.snr["g"] if survey == "lamost" else obs.snr["r"]
    assert got == pytest.approx(target, rel=0.06)
    # the noise is what ivar says: chi^2 per pixel ~ 1 against the noiseless flux
    arm = "lrs" if survey == "lamost" else "r"
    clean = model.noiseless(hires, p)[arm] * obs.scale[:, None]
    good = ~obs.mask[arm]
    chi2 = ((obs.flux[arm] - clean) ** 2 * obs.ivar[arm])[good]
    if survey == "lamost":  # sky residuals add a little in the red
        chi2 = ((obs.flux[arm] - clean) ** 2 * obs.ivar[arm])[:, model.wave < 5500][good[:, model.wave < 5500]]
    assert np.mean(chi2) == pytest.approx(1.0, abs=0.08)


def test_cramer_rao_bound_scales_as_one_over_snr():
    model = observe.model_for("lamost")
    labels = (np.array([5200.0]), np.array([4.4]), np.array([-0.4]), np.array([0.15]))
    hires = engine.synth_rows(*labels, with_crb=True)
    out = []
    for snr in (20.0, 40.0, 80.0):
        p = observe.draw_params("lamost", 7, np.array([0]), observe.SnrSpec(snr, 0.0, snr, snr), np.array([12.0]))
        _, _, bounds = engine.observe_rows(model, hires, p, True, 7)
        out.append(bounds[0])
    out = np.array(out)
    assert np.all(np.isfinite(out))
    ratio = out[:-1] / out[1:]  # doubling the SNR halves the bound
    assert ratio == pytest.approx(2.0, rel=0.06)
    # plausible magnitudes at SNR 40 for a K dwarf at R ~ 1800 (tens of K, a few hundredths of a dex)
    assert 3.0 < out[1, 0] < 150.0 and 0.005 < out[1, 2] < 0.2


def test_cramer_rao_matches_hand_computed_fisher_for_a_linear_model():
    # one label, one arm, flux = 1 + a * x with a nuisance scale: hand-computable bound
    npix = 50
    x = np.linspace(-1, 1, npix)
    jac = x[None, None, :] * np.ones((1, 4, 1))  # the 4 labels get the same derivative direction
    jac[0, 1:] = np.stack([np.sin(3 * x), np.cos(5 * x), x**3])  # make the Fisher matrix invertible
    nominal = np.ones((1, npix))
    ivar = np.full((1, npix), 4.0)
    basis = np.ones((1, npix))  # nuisance: overall scale
    got = crb.cramer_rao([jac], [ivar], [nominal], [basis])[0]
    d = np.concatenate([jac[0], basis * nominal], axis=0)
    f = d @ np.diag(ivar[0]) @ d.T
    expected = np.sqrt(np.diag(np.linalg.inv(f))[:4])
    assert got == pytest.approx(expected, rel=1e-6)


def test_lamost_sensitivity_matches_independent_real_files(shared):
    """The shipped LAMOST sensitivity (from lamost-dr10-train) agrees with the 40 other DR10 files."""
    from astropy.io import fits

    grid = observe.lamost_wave()
    rows = []
    for f in sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz")):
        with fits.open(f) as h:
            d = h[1].data
            flux, ivar, wave = (np.asarray(d[c][0], dtype=float) for c in ("FLUX", "IVAR", "WAVELENGTH"))
        if flux.size != grid.size or np.max(np.abs(wave - grid)) > 0.01:
            continue
        x = flux * ivar
        rows.append(x / np.median(x[(grid > 6000) & (grid < 6500)]))
    med = np.median(np.array(rows), axis=0)
    sens = observe.calibration()["lamost_sens"]
    sel = (grid > 3900) & (grid < 8900)
    assert np.corrcoef(np.log(np.clip(med[sel], 1e-3, None)), np.log(sens[sel]))[0, 1] > 0.9
    # the dichroic dip near 5800 A and the fall-off to the blue are there
    blue, dip, red = (np.median(sens[(grid > a) & (grid < b)]) for a, b in ((5300, 5500), (5750, 5850), (6100, 6300)))
    assert dip < blue and dip < red and np.median(sens[grid < 4000]) < 0.2 * red


def test_solar_type_simulation_resembles_a_real_solar_type_lamost_star_more_than_others(shared):
    """Printed by benchmarks/bench_simulate.py too: continuum-normalised correlations."""
    import csv

    from stxcli.registry import get_registry

    reader = get_registry().get("reader", "lamost")
    rows = {r["obsid"]: r for r in csv.DictReader(open(shared / "lamost-dr1" / "labels.csv"))}
    model = observe.model_for("lamost")
    sim = realism.observe_one("lamost", 5650.0, 4.45, -0.1, 0.03, rv_kms=0.0, snr=80.0, model=model)
    ns = realism.normalize(sim.flux["lrs"][0], sim.ivar["lrs"][0])
    corr = {}
    for obsid in ("906087", "906129", "906018", "906044", "906155"):  # G5, G/K dwarfs; A stars; a cool K dwarf
        b = next(reader.read(shared / "lamost-dr1" / "spectra" / rows[obsid]["filename"]))
        a = b.arms[0]
        # put the simulation at the real star's velocity (same continuum recipe for both)
        s = realism.observe_one("lamost", 5650.0, 4.45, -0.1, 0.03, rv_kms=float(b.meta.rv_kms[0]), snr=80.0, model=model)
        ns = realism.normalize(s.flux["lrs"][0], s.ivar["lrs"][0])
        nr = realism.normalize(a.flux[0], a.ivar[0])
        corr[obsid] = realism.correlation(a.wave, nr, a.ivar[0] > 0, model.wave, ns, s.ivar["lrs"][0] > 0)
    similar = min(corr["906087"], corr["906129"])  # 5566 K / 5226 K dwarfs, [Fe/H] ~ 0
    different = max(corr["906018"], corr["906044"], corr["906155"])  # 7793 K, 8658 K, 4230 K
    assert similar > different + 0.05, corr
