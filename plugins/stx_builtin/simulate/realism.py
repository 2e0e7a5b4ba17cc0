"""Helpers to compare simulated and real spectra (used by the tests, the benchmark and the figure).

* :func:`observe_one`: one star with given labels, radial velocity and SNR observed through a
  survey model (no calibration distortion or extinction, so that shapes compare directly);
* :func:`normalize`: a continuum-normalised flux (upper envelope of the median-smoothed spectrum,
  the same recipe for real and simulated spectra; masked pixels interpolated);
* :func:`correlation`: Pearson correlation of two normalised spectra over common good pixels.
"""

from __future__ import annotations

import numpy as np

from . import observe, synth


def observe_one(survey: str, teff: float, logg: float, feh: float, alpha_fe: float, *, rv_kms: float = 0.0,
                snr: float = 100.0, seed: int = 1, model: observe.SurveyModel | None = None,
                hires: np.ndarray | None = None) -> observe.Observed:
    """One spectrum (the synthetic one, or ``hires`` on the simulator grid) observed with noise."""
    model = model or observe.model_for(survey)
    if hires is None:
        hires = synth.synthesize(np.array([teff]), np.array([logg]), np.array([feh]), np.array([alpha_fe]))
    p = observe.draw_params(survey, seed, np.array([0]), observe.SnrSpec(snr, 0.0, snr, snr), np.array([rv_kms]))
    p.cal[:] = 0.0
    p.ebv[:] = 0.0
    p.dichroic[:] = 0.0
    clean = model.noiseless(hires, p)
    return model.add_noise(clean, p, seed)


def normalize(flux: np.ndarray, ivar: np.ndarray, width: int = 51) -> np.ndarray:
    """Continuum-normalised flux of one spectrum (1-D)."""
    from scipy.ndimage import maximum_filter1d, median_filter, uniform_filter1d

    good = (ivar > 0) & np.isfinite(flux)
    if good.sum() < 10:
        return np.full(flux.shape, np.nan)
    idx = np.arange(flux.size)
    f = np.interp(idx, idx[good], flux[good])
    cont = uniform_filter1d(maximum_filter1d(median_filter(f, 7, mode="nearest"), width, mode="nearest"), 2 * width,
                            mode="nearest")
    return f / np.where(cont > 0, cont, np.nan)


def correlation(wave_a: np.ndarray, norm_a: np.ndarray, good_a: np.ndarray, wave_b: np.ndarray, norm_b: np.ndarray,
                good_b: np.ndarray, lo: float = 4000.0, hi: float = 8800.0) -> float:
    """Pearson correlation of two normalised spectra on ``wave_a`` (``b`` interpolated)."""
    nb = np.interp(wave_a, wave_b, norm_b)
    gb = np.interp(wave_a, wave_b, good_b.astype(float)) > 0.999
    sel = good_a & gb & (wave_a > lo) & (wave_a < hi) & np.isfinite(norm_a) & np.isfinite(nb)
    return float(np.corrcoef(norm_a[sel], nb[sel])[0, 1])
