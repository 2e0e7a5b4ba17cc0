"""Helpers to compare simulated and real spectra (used by the tests, the benchmark and the figure).

* :func:`observe_one`: one star with given labels, radial velocity and SNR observed through a
  survey model (no calibration distortion or extinction, so that shapes compare directly);
* :func:`normalize`: a continuum-normalised flux (upper envelope of the median-smoothed spectrum,
  the same recipe for real and simulated spectra; masked pixels interpolated);
* :func:`correlation`: Pearson correlation of two normalised spectra over common good pixels;
* :func:`line_indices`: Lick-like equivalent widths of strong features (:data:`INDICES`) measured
  the same way on real and simulated continuum-normalised spectra.
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


#: Strong features as (name, band, blue side band, red side band), air wavelengths (A): the Lick
#: indices of Worthey et al. 1994 / Trager et al. 1998 (G4300 ... NaD), H alpha with Cohen-like
#: side bands, the Ca II triplet lines with the Cenarro et al. 2001 continuum windows.
INDICES: tuple[tuple[str, tuple[float, float], tuple[float, float], tuple[float, float]], ...] = (
    ("G4300", (4281.375, 4316.375), (4266.375, 4282.625), (4318.875, 4335.125)),
    ("Fe4383", (4369.125, 4420.375), (4359.125, 4370.375), (4442.875, 4455.375)),
    ("Hbeta", (4847.875, 4876.625), (4827.875, 4847.875), (4876.625, 4891.625)),
    ("Fe5015", (4977.750, 5054.000), (4946.500, 4977.750), (5054.000, 5065.250)),
    ("Mgb", (5160.125, 5192.625), (5142.625, 5161.375), (5191.375, 5206.375)),
    ("Fe5270", (5245.650, 5285.650), (5233.150, 5248.150), (5285.650, 5318.150)),
    ("Fe5335", (5312.125, 5352.125), (5304.625, 5315.875), (5353.375, 5363.375)),
    ("Fe5406", (5387.500, 5415.000), (5376.250, 5387.500), (5415.000, 5425.000)),
    ("NaD", (5876.875, 5909.375), (5860.625, 5875.625), (5922.125, 5948.125)),
    ("Halpha", (6553.000, 6573.000), (6515.000, 6535.000), (6585.000, 6605.000)),
    ("CaT8498", (8484.0, 8513.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    ("CaT8542", (8522.0, 8562.0), (8474.0, 8484.0), (8563.0, 8577.0)),
    ("CaT8662", (8642.0, 8682.0), (8619.0, 8642.0), (8700.0, 8725.0)),
)
INDEX_NAMES = tuple(i[0] for i in INDICES)


def line_indices(wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Equivalent widths (A) of :data:`INDICES`, (n, len(INDICES)): ``sum (1 - f / c) dlambda`` over
    the band, ``c`` the straight line through the side-band means. ``wave`` is vacuum; NaN flux
    (masked pixels) gives NaN for the indices it touches."""
    from stxcli.spectra import air_to_vacuum

    flux = np.atleast_2d(np.asarray(flux, dtype=np.float64))
    dw = np.gradient(wave)
    out = np.full((flux.shape[0], len(INDICES)), np.nan)
    for k, (_, band, blue, red) in enumerate(INDICES):
        b, bl, rd = (air_to_vacuum(np.array(x)) for x in (band, blue, red))
        sb = (wave > b[0]) & (wave < b[1])
        fb = flux[:, (wave > bl[0]) & (wave < bl[1])].mean(axis=1)
        fr = flux[:, (wave > rd[0]) & (wave < rd[1])].mean(axis=1)
        wb, wr = bl.mean(), rd.mean()
        cont = fb[:, None] + (fr - fb)[:, None] * (wave[sb] - wb) / (wr - wb)
        out[:, k] = ((1.0 - flux[:, sb] / cont) * dw[sb]).sum(axis=1)
    return out
