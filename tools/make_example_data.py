#!/usr/bin/env python
"""Regenerate everything the simulator ships in ``plugins/stx_builtin/data/simulate/``.

One documented command (from the repository root, with ../shared/data beside the repo)::

    python tools/make_example_data.py [--shared ../shared/data]

It writes, deterministically:

* ``linelist_ges_v6.npz``: the Gaia-ESO v6 atomic line list subset of
  ``../shared/data/linelists/ges_atomic.csv`` (16,816 lines, Heiter et al. 2021, A&A 645, A106),
  wavelengths converted from air to vacuum with :func:`stxcli.spectra.air_to_vacuum`, stored as
  vacuum wavelength (float64), element symbol index, ion stage, excitation (eV) and log gf.
* ``calibration.npz``: survey calibration measured on real files:
  - ``lamost_sens``: the LAMOST relative sensitivity ``median(flux * ivar)`` per pixel of the
    1e-4 dex grid (normalised at 6000-6500 A) over the real DR10 F/G stars of
    ``lamost-dr10-train`` (dichroic dip, blue fall-off and sky-line dips included);
  - ``lamost_badfrac``: the fraction of those spectra with ``ivar == 0`` per pixel;
  - ``desi_bgvar_b/r/z``: the DESI background variance per pixel (sky + read noise, in
    (1e-17 erg/s/cm2/A)^2 for a 1000 s coadd) = median of ``1 / ivar`` over the live faint fibres
    of the DESI EDR coadds, scaled by ``COADD_EXPTIME / 1000``;
  - ``strength_*``: the line-strength calibration (:mod:`stx_builtin.simulate.calibrate`): core
    residual temperature, curve-of-growth width and per-template log-strength corrections,
    fitted on the even-OBSID half of ``lamost-dr10-train`` (the odd half and MILES stay checks;
    several minutes of CPU), with the SED correction measured on uncalibrated lines in force;
  - ``sed_*``: the continuum (SED) correction, the median ratio of smoothed real MILES spectra
    to smoothed simulated ones (with the strength calibration) per Teff node;
    ``sed_logcorr_uncalibrated`` the same measured on uncalibrated lines (used whenever the
    strength calibration is switched off: the simulator as it was before it);
* ``miles_subset.npz``: real MILES v9.1 stars (air wavelengths 3540.5 + 0.9 i, float32 flux,
  labels) chosen to span the HR diagram and [Fe/H], for the example's real-star set;
* ``example_recipe.json``: the seeds, sizes and observation settings of the example data set
  (``stx simulate --example DIR`` rebuilds it bit-identically from these files).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "plugins" / "stx_builtin" / "data" / "simulate"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "plugins"))


def make_linelist(shared: Path) -> Path:
    from stxcli.spectra import air_to_vacuum

    rows = list(csv.DictReader(open(shared / "linelists" / "ges_atomic.csv")))
    symbols = sorted({r["element"] for r in rows}, key=lambda s: int(next(r["z"] for r in rows if r["element"] == s)))
    index = {s: i for i, s in enumerate(symbols)}
    wave_air = np.array([float(r["wavelength_air_A"]) for r in rows])
    out = OUT / "linelist_ges_v6.npz"
    np.savez_compressed(
        out,
        wave_vac=air_to_vacuum(wave_air),
        element=np.array([index[r["element"]] for r in rows], dtype=np.uint8),
        ion=np.array([int(r["ion"]) for r in rows], dtype=np.uint8),
        chi=np.array([float(r["chi_eV"]) for r in rows], dtype=np.float32),
        loggf=np.array([float(r["loggf"]) for r in rows], dtype=np.float32),
        symbols=np.array(symbols),
    )
    return out


def _lamost_grid() -> np.ndarray:
    return 10.0 ** (3.5682 + 1e-4 * np.arange(3909))


def make_calibration(shared: Path) -> dict[str, np.ndarray]:
    """LAMOST sensitivity / bad-pixel fraction and the DESI background variance (see module doc)."""
    from astropy.io import fits

    grid = _lamost_grid()
    sens, bad = [], []
    for f in sorted((shared / "lamost-dr10-train" / "spectra").glob("*.fits.gz")):
        with fits.open(f) as h:
            d = h[1].data
            flux, ivar, wave = (np.asarray(d[c][0], dtype=np.float64) for c in ("FLUX", "IVAR", "WAVELENGTH"))
        if flux.size != grid.size or np.max(np.abs(wave - grid)) > 0.01:
            continue  # only the standard 3909-pixel grid
        x = flux * ivar
        ref = np.median(x[(grid > 6000) & (grid < 6500)])
        if not np.isfinite(ref) or ref <= 0:
            continue
        sens.append(x / ref)
        bad.append(ivar == 0)
    sens_med = np.median(np.array(sens), axis=0)
    out = {
        "lamost_wave": grid,
        "lamost_sens": np.clip(sens_med, 1e-3, None).astype(np.float32),
        "lamost_badfrac": np.mean(np.array(bad), axis=0).astype(np.float32),
        "lamost_nstars": np.array(len(sens)),
    }
    per_arm: dict[str, list[np.ndarray]] = {"b": [], "r": [], "z": []}
    for f in ("coadd-sv3-dark-26065.fits", "coadd-5-169-thru20210419.fits"):
        with fits.open(shared / "desi-edr" / f) as h:
            exptime = np.asarray(h["FIBERMAP"].data["COADD_EXPTIME"], dtype=float)
            for arm in per_arm:
                ivar = np.asarray(h[f"{arm.upper()}_IVAR"].data, dtype=np.float64)
                out[f"desi_wave_{arm}"] = np.asarray(h[f"{arm.upper()}_WAVELENGTH"].data, dtype=np.float64)
                for i in range(ivar.shape[0]):
                    if exptime[i] > 0 and (ivar[i] > 0).mean() > 0.9:
                        v = np.where(ivar[i] > 0, 1.0 / np.where(ivar[i] > 0, ivar[i], 1.0), np.nan)
                        per_arm[arm].append(v * exptime[i] / 1000.0)
    for arm, rows in per_arm.items():
        v = np.nanmedian(np.array(rows), axis=0)
        v = np.where(np.isfinite(v), v, np.nanmedian(v))
        out[f"desi_bgvar_{arm}"] = v.astype(np.float32)
    out["desi_nfibres"] = np.array(len(per_arm["b"]))
    return out


MILES_CRVAL, MILES_CDELT, MILES_NPIX, MILES_FWHM = 3540.5, 0.9, 4300, 2.5


def _miles_table(shared: Path) -> list[dict[str, str]]:
    rows = list(csv.DictReader(open(shared / "miles" / "labels.csv")))
    return [r for r in rows if r["teff"] and r["logg"] and r["feh"]]


def _miles_flux(shared: Path, rows: list[dict[str, str]]) -> np.ndarray:
    from astropy.io import fits

    return np.array([np.asarray(fits.getdata(shared / "miles" / "spectra" / r["file"]), dtype=np.float64) for r in rows])


def make_strength_calibration(shared: Path) -> tuple[dict[str, np.ndarray], "object"]:
    """Fit the line-strength calibration on the calibration half (even OBSID) of the real
    LAMOST DR10 stars (needs the LAMOST calibration and an SED correction in calibration.npz)."""
    from stx_builtin.featurizers.raw import RawFeaturizer
    from stx_builtin.simulate import calibrate, synth

    featurizer = RawFeaturizer()
    data = calibrate.load_lamost_dr10(shared / "lamost-dr10-train", featurizer, half="even")
    cal, info = calibrate.fit_strength(data, featurizer, log=lambda m: print("  " + m, flush=True))
    out = {
        "strength_a": cal.a.astype(np.float32), "strength_b": cal.b.astype(np.float32),
        "strength_c": cal.c.astype(np.float32),
        "strength_theta_range": np.array(cal.theta_range), "strength_logg_range": np.array(cal.logg_range),
        "strength_r_scale": np.array(cal.r_scale), "strength_t_surface": np.array(cal.t_surface),
        "strength_signature": synth.template_signature(synth.build_templates()),
        "strength_nstars": np.array(data.n),
        "strength_objective": np.array([h["objective"] for h in info["history"]]),
    }
    # the shipped values are float32: the calibration in force is the one read back
    cal = synth.StrengthCalibration(a=out["strength_a"].astype(float), b=out["strength_b"].astype(float),
                                    c=out["strength_c"].astype(float), theta_range=cal.theta_range,
                                    logg_range=cal.logg_range, r_scale=cal.r_scale, t_surface=cal.t_surface)
    return out, cal


def make_sed_correction(shared: Path) -> dict[str, np.ndarray]:
    """Median log ratio of smoothed real MILES to smoothed simulated spectra (same labels, MILES
    resolution) per Teff node, on 50 A wavelength nodes, 0 at 5500 A."""
    from scipy.ndimage import median_filter

    from stx_builtin.simulate import observe, synth
    from stxcli.spectra import air_to_vacuum

    rows = _miles_table(shared)
    lab = np.array([[float(r["teff"]), float(r["logg"]), float(r["feh"])] for r in rows])
    real = _miles_flux(shared, rows)
    vac = air_to_vacuum(MILES_CRVAL + MILES_CDELT * np.arange(MILES_NPIX))
    synth.USE_SED_CORRECTION = False
    m = observe.gaussian_resampler(vac, np.full(vac.size, MILES_FWHM), log_pixels=False)
    alpha = np.clip(0.05 - 0.25 * lab[:, 2], 0.0, 0.3)
    sim = np.concatenate([observe.apply_matrix(m, synth.synthesize(*lab[i:i + 64].T, alpha[i:i + 64]))
                          for i in range(0, len(lab), 64)])
    synth.USE_SED_CORRECTION = True
    nodes_w = np.arange(3550.0, 7401.0, 50.0)  # includes 5500 A, where the ratio is set to 0
    def smooth(f: np.ndarray) -> np.ndarray:
        sm = median_filter(f, size=(1, 101), mode="nearest")
        return np.array([[np.median(row[np.abs(vac - w) < 25.0]) for w in nodes_w] for row in sm])
    ok = np.all(real > 0, axis=1) & np.all(np.isfinite(real), axis=1)
    ratio = np.log10(np.clip(smooth(real[ok]), 1e-30, None) / np.clip(smooth(sim[ok]), 1e-30, None))
    ratio -= ratio[:, [np.argmin(np.abs(nodes_w - 5500.0))]]
    lt = np.log10(lab[ok, 0])
    nodes_t = np.arange(np.log10(3300.0), np.log10(12500.0), 0.015)
    corr = np.full((nodes_t.size, nodes_w.size), np.nan)
    for i, t in enumerate(nodes_t):
        sel = np.abs(lt - t) < 0.02
        if sel.sum() >= 3:
            corr[i] = np.median(ratio[sel], axis=0)
    good = np.flatnonzero(np.isfinite(corr[:, 0]))
    for i in range(nodes_t.size):  # nodes without stars take the nearest node's curve
        if not np.isfinite(corr[i, 0]):
            corr[i] = corr[good[np.argmin(np.abs(good - i))]]
    # a continuum correction, not a spectrum: at most a factor 3 (the few M stars' blue ends are
    # noisy), smoothed over neighbouring Teff nodes
    corr = np.clip(corr, -0.5, 0.5)
    corr = np.vstack([corr[:1], (corr[:-2] + 2 * corr[1:-1] + corr[2:]) / 4.0, corr[-1:]])
    return {"sed_logteff": nodes_t, "sed_wave": nodes_w, "sed_logcorr": corr.astype(np.float32),
            "sed_nstars": np.array(int(ok.sum()))}


def make_miles_subset(shared: Path, n: int = 150) -> Path:
    """Real MILES stars spread over (Teff, log g, [Fe/H]) by farthest-point sampling (deterministic)."""
    rows = _miles_table(shared)
    lab = np.array([[float(r["teff"]), float(r["logg"]), float(r["feh"])] for r in rows])
    x = np.c_[np.log10(lab[:, 0]) / 0.02, lab[:, 1] / 0.4, lab[:, 2] / 0.25]
    chosen = [int(np.argmin(np.abs(lab[:, 0] - 5777) + 100 * np.abs(lab[:, 1] - 4.44) + 100 * np.abs(lab[:, 2])))]
    dist = np.linalg.norm(x - x[chosen[0]], axis=1)
    while len(chosen) < n:
        k = int(np.argmax(dist))
        chosen.append(k)
        dist = np.minimum(dist, np.linalg.norm(x - x[k], axis=1))
    chosen.sort()
    sub = [rows[i] for i in chosen]
    flux = _miles_flux(shared, sub).astype(np.float32)
    out = OUT / "miles_subset.npz"
    np.savez_compressed(
        out, flux=flux, crval=MILES_CRVAL, cdelt=MILES_CDELT, fwhm=MILES_FWHM,
        miles_id=np.array([r["miles_id"] for r in sub]), filename=np.array([r["file"] for r in sub]),
        teff=lab[chosen, 0], logg=lab[chosen, 1], feh=lab[chosen, 2],
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    args = ap.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    for fn in (make_linelist,):
        path = fn(args.shared)
        print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} kB)")
    calib = make_calibration(args.shared)
    path = OUT / "calibration.npz"
    np.savez_compressed(path, **calib)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} kB): LAMOST sensitivity from "
          f"{int(calib['lamost_nstars'])} DR10 stars, DESI background from {int(calib['desi_nfibres'])} fibres")
    from stx_builtin.simulate import synth

    # the strength fit runs with an SED correction in force (the featurizer's continuum placement
    # depends on the continuum's shape): first the one measured on uncalibrated lines, then, once
    # the strengths are fitted, the shipped one measured on calibrated lines
    with synth.strength_override(None):
        sed0 = make_sed_correction(args.shared)
    calib.update(sed0, sed_logcorr_uncalibrated=sed0["sed_logcorr"])
    np.savez_compressed(path, **calib)
    synth._sed_table.cache_clear()
    strength, cal = make_strength_calibration(args.shared)  # needs the LAMOST calibration above
    calib.update(strength)
    obj = calib["strength_objective"]
    print(f"strength calibration from {int(calib['strength_nstars'])} DR10 stars (objective {obj[0]:.2f} -> "
          f"{obj[-1]:.2f}, t_surface {float(calib['strength_t_surface']):.3f}, r_scale "
          f"{float(calib['strength_r_scale']):.3f})")
    with synth.strength_override(cal):  # the shipped SED correction is measured on calibrated spectra
        calib.update(make_sed_correction(args.shared))
    np.savez_compressed(path, **calib)
    synth._sed_table.cache_clear()
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} kB): + SED correction from "
          f"{int(calib['sed_nstars'])} MILES stars")
    path = make_miles_subset(args.shared)
    print(f"wrote {path.relative_to(REPO)} ({path.stat().st_size / 1024:.0f} kB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
