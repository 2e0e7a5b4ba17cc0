"""Survey observation models: what LAMOST and DESI do to a stellar spectrum.

Both models take high-resolution rest-frame spectra (:mod:`.synth` grid) and return, per arm, the
noiseless observed flux; :meth:`SurveyModel.add_noise` then draws the noise, masks and artefacts.
The expensive steps are shared linear operators built once per process:

* a radial-velocity shift per star on the log-lambda grid (fractional pixel, linear interpolation);
* **LAMOST-like**: one sparse matrix (pixel-integrated Gaussian LSF + resampling) onto the real
  LAMOST grid ``10**(3.5682 + 1e-4 i)``, i = 0..3908 (3700-9099 A), at a resolving power
  ``R(lambda) = 1800 + 250 (lambda - 6000) / 3000`` times a per-fibre factor (0.92-1.08,
  applied as a small extra blur on the output grid);
* **DESI-like**: per arm (B 3600-5800, R 5760-7620, Z 7520-9824 A, 0.8 A pixels, the real grids)
  a pixel-integration matrix, then the star's own 11-diagonal resolution matrix: a Gaussian of
  ``sigma(lambda)`` pixels measured on the DESI EDR coadds (:data:`DESI_SIGMA_PIX`, see
  :func:`measure_desi_resolution`; R 2250-3700 in B, 3850-5150 in R, 4300-5600 in Z) times a
  per-fibre factor (0.95-1.05). The matrix written to the file is the one applied.

Then, multiplicatively, interstellar extinction (Cardelli et al. 1989, R_V = 3.1), a smooth random
flux-calibration distortion (Legendre terms, plus the LAMOST dichroic join near 5800 A) and
telluric bands (O2 A and B, H2O; 30 % residuals in LAMOST and 10 % in DESI, whose pipelines
correct most of them).

Noise
-----
* LAMOST: ``var = f / (A * S(lambda))`` with ``S`` the real LAMOST sensitivity (median of
  ``flux * ivar`` over 833 DR10 F/G stars: blue fall-off, dichroic dip, sky-line dips) and ``A``
  set so that the median of ``f * sqrt(ivar)`` over 4000-5500 A equals the star's g-band SNR.
  Red sky-subtraction residuals at the sky lines, bad-pixel runs (probability from the real
  ivar = 0 fraction per pixel), zero-ivar spectrum ends.
* DESI: ``var = V_bg(lambda) * 1000 s / t_exp + f / G(lambda)``, ``V_bg`` the background variance
  measured on the live fibres of the EDR coadds (sky lines, read noise) and ``G`` the
  electrons per flux unit (8.6 m2 mirror, smooth throughput); the flux scale is set so that the
  median per-pixel SNR of the R arm equals the star's SNR. The brightest sky-line pixels get
  ``BRIGHTSKY`` and ivar 0, cosmic-ray hits ``COSMIC`` (desispec specmask bits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from stxcli.errors import StxError

from . import rng
from .synth import LOG_STEP, hires_grid

C_KMS = 299792.458

# ------------------------------------------------------------------------------------- grids

LAMOST_COEFF0 = 3.5682
LAMOST_COEFF1 = 1e-4
LAMOST_NPIX = 3909
#: DESI arms: first wavelength, step, pixels (the real EDR grids).
DESI_ARMS: dict[str, tuple[float, float, int]] = {
    "b": (3600.0, 0.8, 2751),
    "r": (5760.0, 0.8, 2326),
    "z": (7520.0, 0.8, 2881),
}
#: DESI resolution: Gaussian-equivalent sigma in pixels, quadratic in x = -1 .. 1 across the arm,
#: fitted to the median of the second moments of the resolution matrices of the live fibres of
#: ../shared/data/desi-edr (both coadds); residual rms 0.006, 0.013, 0.036 pixel.
DESI_SIGMA_PIX: dict[str, tuple[float, float, float]] = {
    "b": (0.8456, -0.0079, -0.0025),
    "r": (0.7983, -0.0033, -0.0093),
    "z": (0.9094, 0.0160, 0.0367),
}
DESI_NDIAG = 11
#: Strength of the telluric bands left in LAMOST spectra (the real DR1-DR10 files show weak
#: residual O2/H2O bands: the pipeline's flux calibration removes most of them).
LAMOST_TELLURIC = 0.3
#: desispec specmask bits used by the simulator.
DESI_MASK = {"SOMEBADPIX": 1, "ALLBADPIX": 2, "COSMIC": 4, "BRIGHTSKY": 32}


def lamost_wave() -> np.ndarray:
    return 10.0 ** (LAMOST_COEFF0 + LAMOST_COEFF1 * np.arange(LAMOST_NPIX))


def desi_wave(arm: str) -> np.ndarray:
    start, step, n = DESI_ARMS[arm]
    return start + step * np.arange(n)


def lamost_resolving_power(wave: np.ndarray) -> np.ndarray:
    return 1800.0 + 250.0 * (wave - 6000.0) / 3000.0


def desi_sigma_pix(arm: str, wave: np.ndarray | None = None) -> np.ndarray:
    w = desi_wave(arm) if wave is None else wave
    x = (w - w[0]) / (w[-1] - w[0]) * 2.0 - 1.0
    c = DESI_SIGMA_PIX[arm]
    return c[0] + c[1] * x + c[2] * x * x


def measure_desi_resolution(paths: list) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per arm, (wavelength, median sigma in pixels) over the live fibres of DESI files: the
    second moment of each pixel's kernel in the resolution matrix (rows with kernel sum > 0.5)."""
    from astropy.io import fits

    out: dict[str, list[np.ndarray]] = {a: [] for a in DESI_ARMS}
    waves: dict[str, np.ndarray] = {}
    for p in paths:
        with fits.open(p) as h:
            for arm in DESI_ARMS:
                res = np.asarray(h[f"{arm.upper()}_RESOLUTION"].data, dtype=np.float64)
                waves[arm] = np.asarray(h[f"{arm.upper()}_WAVELENGTH"].data, dtype=np.float64)
                k = np.arange(res.shape[1] // 2, -(res.shape[1] // 2) - 1, -1, dtype=np.float64)
                for row in res:
                    s = row.sum(axis=0)
                    if np.median(s) < 0.5:
                        continue
                    s = np.where(s > 0.5, s, np.nan)
                    m1 = (k[:, None] * row).sum(axis=0) / s
                    var = (k[:, None] ** 2 * row).sum(axis=0) / s - m1 * m1
                    out[arm].append(np.sqrt(np.clip(var, 0.0, None)))
    return {a: (waves[a], np.nanmedian(np.array(v), axis=0)) for a, v in out.items() if v}


# ----------------------------------------------------------------------------- calibration data


def calibration() -> dict[str, np.ndarray]:
    """The shipped calibration arrays (:func:`.synth.calibration_file`); its absence is an error
    here: the survey models cannot work without it."""
    from .synth import _data_path, calibration_file

    z = calibration_file()
    if z is None:
        raise StxError(f"simulator calibration file is missing ({_data_path('calibration.npz')}); reinstall stx")
    return z


# --------------------------------------------------------------------------- linear operators


def _shift_int(src: np.ndarray, k: int, out: np.ndarray) -> None:
    """``out[:, j] = src[:, clip(j - k)]`` by slicing."""
    n = src.shape[1]
    k = max(-n + 1, min(n - 1, k))
    if k >= 0:
        out[:, k:] = src[:, : n - k]
        out[:, :k] = src[:, :1]
    else:
        out[:, : n + k] = src[:, -k:]
        out[:, n + k:] = src[:, -1:]


def shift_rows_grouped(flux: np.ndarray, shift_pix: np.ndarray, group: int) -> np.ndarray:
    """Shift each row of ``flux`` (m, N) by ``shift_pix`` pixels towards larger index (redshift for
    positive values; linear interpolation, edges held constant). Consecutive blocks of ``group``
    rows share one shift (a star and its Jacobian rows)."""
    m, n = flux.shape
    out = np.empty_like(flux)
    tmp = np.empty((group, n), dtype=flux.dtype)
    for s in range(0, m, group):
        sh = float(shift_pix[s // group])
        ki = int(np.floor(sh))
        ai = flux.dtype.type(sh - ki)
        blk = flux[s:s + group]
        o = out[s:s + group]
        _shift_int(blk, ki, o)
        if ai != 0:
            t = tmp[: blk.shape[0]]
            _shift_int(blk, ki + 1, t)
            o *= 1 - ai
            t *= ai
            o += t
    return out


def _ranges(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row numbers and column indices of the ranges ``lo[i] .. hi[i] - 1`` (vectorised)."""
    counts = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(lo.size), counts)
    starts = np.repeat(lo - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return rows, starts + np.arange(rows.size)


def _csr(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
    import scipy.sparse as sp

    m = sp.csr_matrix((vals.astype(np.float32), (rows, cols)), shape=shape)
    m.sum_duplicates()
    return m


def gaussian_resampler(out_wave: np.ndarray, fwhm_out: np.ndarray, *, log_pixels: bool,
                       in_fwhm: np.ndarray | None = None) -> Any:
    """Sparse matrix (len(out_wave), N_hires) integrating a Gaussian LSF of FWHM ``fwhm_out``
    (A, per output pixel) over each output pixel (log-uniform pixels when ``log_pixels``, else
    linear). ``in_fwhm`` (A, per output pixel) is the resolution the input already has: the
    kernel is widened only by ``sqrt(fwhm_out**2 - in_fwhm**2)`` (0 where the input is coarser)."""
    from scipy.special import ndtr

    g = hires_grid()
    lw = g.log_wave
    n_out = out_wave.size
    if log_pixels:
        dx = np.log10(out_wave[1] / out_wave[0])
        lo_edge, hi_edge = np.log10(out_wave) - dx / 2, np.log10(out_wave) + dx / 2
    else:
        d = np.gradient(out_wave)
        lo_edge, hi_edge = np.log10(out_wave - d / 2), np.log10(out_wave + d / 2)
    fwhm = np.asarray(fwhm_out, dtype=np.float64)
    if in_fwhm is not None:
        fwhm = np.sqrt(np.clip(fwhm**2 - np.asarray(in_fwhm, dtype=np.float64) ** 2, 0.0, None))
    sigma = np.maximum(fwhm / 2.3548 / (out_wave * np.log(10.0)), 0.25 * LOG_STEP)  # log10 units
    half = (hi_edge - lo_edge) / 2 + 4.5 * sigma
    j_lo = np.searchsorted(lw, np.log10(out_wave) - half)
    j_hi = np.searchsorted(lw, np.log10(out_wave) + half)
    rows, cols = _ranges(j_lo, j_hi)
    x = lw[np.clip(cols, 0, lw.size - 1)]
    s = sigma[rows]
    vals = ndtr((hi_edge[rows] - x) / s) - ndtr((lo_edge[rows] - x) / s)
    tot = np.bincount(rows, weights=vals, minlength=n_out)
    vals = vals / np.where(tot > 0, tot, 1.0)[rows]
    ok = (cols >= 0) & (cols < lw.size)
    return _csr(rows[ok], cols[ok], vals[ok], (n_out, lw.size))


def box_resampler(out_wave: np.ndarray) -> Any:
    """Sparse matrix averaging the high-resolution flux over each (linear) output pixel."""
    g = hires_grid()
    lw = g.log_wave
    edges_hi = 10.0 ** np.concatenate([lw - LOG_STEP / 2, lw[-1:] + LOG_STEP / 2])  # (N+1,)
    d = np.gradient(out_wave)
    lo, hi = out_wave - d / 2, out_wave + d / 2
    k_lo = np.searchsorted(edges_hi, lo) - 1
    k_hi = np.searchsorted(edges_hi, hi)
    rows, cols = _ranges(k_lo, k_hi)
    cols_c = np.clip(cols, 0, lw.size - 1)
    overlap = np.clip(np.minimum(hi[rows], edges_hi[cols_c + 1]) - np.maximum(lo[rows], edges_hi[cols_c]), 0.0, None)
    tot = np.bincount(rows, weights=overlap, minlength=out_wave.size)
    vals = overlap / np.where(tot > 0, tot, 1.0)[rows]
    ok = (cols >= 0) & (cols < lw.size) & (vals > 0)
    return _csr(rows[ok], cols[ok], vals[ok], (out_wave.size, lw.size))


def apply_matrix(m: Any, flux: np.ndarray) -> np.ndarray:
    """``(m @ flux.T).T`` as a C-contiguous float32 array."""
    return np.ascontiguousarray((m @ flux.T).T, dtype=np.float32)


def blur_rows(flux: np.ndarray, sigma_pix: np.ndarray, half: int = 3) -> np.ndarray:
    """Convolve each row with its own small Gaussian (sigma in output pixels, may be 0)."""
    m, n = flux.shape
    d = np.arange(-half, half + 1, dtype=np.float64)
    s = np.maximum(np.asarray(sigma_pix, dtype=np.float64), 1e-3)[:, None]
    k = np.exp(-0.5 * (d[None, :] / s) ** 2)
    k /= k.sum(axis=1, keepdims=True)
    pad = np.pad(flux, ((0, 0), (half, half)), mode="edge")
    out = np.zeros_like(flux)
    for i, dd in enumerate(range(-half, half + 1)):
        out += k[:, i:i + 1].astype(flux.dtype) * pad[:, half + dd:half + dd + n]
    return out


def resolution_band(sigma_pix: np.ndarray, ndiag: int = DESI_NDIAG) -> np.ndarray:
    """Row kernels (m, npix, ndiag): Gaussian weights of output pixel i on input i + d,
    d = -(ndiag//2) .. ndiag//2, normalised per row. ``sigma_pix`` is (m, npix)."""
    h = ndiag // 2
    d = np.arange(-h, h + 1, dtype=np.float32)
    k = np.exp(-0.5 * (d[None, None, :] / sigma_pix[:, :, None].astype(np.float32)) ** 2)
    k /= k.sum(axis=2, keepdims=True)
    return k


def apply_band(k: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """``out[i] = sum_d k[i, d] flux[i + d]`` per row (zero padding)."""
    m, n, nd = k.shape
    h = nd // 2
    pad = np.zeros((flux.shape[0], n + 2 * h), dtype=flux.dtype)
    pad[:, h:h + n] = flux
    out = np.zeros_like(flux)
    for j in range(nd):
        out += k[:, :, j] * pad[:, j:j + n]
    return out


def band_to_dia(k: np.ndarray) -> np.ndarray:
    """Row kernels (m, npix, ndiag) to DESI's resolution storage (m, ndiag, npix): diagonal
    ``j`` (offset ``ndiag//2 - j``) holds ``M[p - off, p]`` at column ``p`` (scipy dia_matrix
    convention used by desispec)."""
    m, n, nd = k.shape
    h = nd // 2
    out = np.zeros((m, nd, n), dtype=np.float32)
    for j in range(nd):
        off = h - j  # column - row
        # element (row r = p - off, column p) is the weight of input p for output r: k[r, d=off]
        if off >= 0:
            out[:, j, off:] = k[:, : n - off, h + off]
        else:
            out[:, j, :off] = k[:, -off:, h + off]
    return out


# ------------------------------------------------------------------ multiplicative effects


def extinction_curve(wave: np.ndarray, r_v: float = 3.1) -> np.ndarray:
    """A_lambda / E(B-V), Cardelli, Clayton & Mathis (1989)."""
    x = 1e4 / np.asarray(wave, dtype=np.float64)  # 1/micron
    out = np.empty_like(x)
    ir = x < 1.1
    xi = x[ir]
    out[ir] = (0.574 * xi**1.61 - 0.527 * xi**1.61 / r_v)
    y = x[~ir] - 1.82
    a = 1 + 0.17699 * y - 0.50447 * y**2 - 0.02427 * y**3 + 0.72085 * y**4 + 0.01979 * y**5 - 0.77530 * y**6 + 0.32999 * y**7
    b = 1.41338 * y + 2.28305 * y**2 + 1.07233 * y**3 - 5.38434 * y**4 - 0.62251 * y**5 + 5.30260 * y**6 - 2.09002 * y**7
    out[~ir] = a + b / r_v
    return out * r_v


#: Telluric bands (vacuum A): start, end, depth at unit strength, blue-edge sharpness (A).
TELLURIC_O2 = ((6869.0, 6920.0, 0.25, 2.0), (7596.0, 7700.0, 0.75, 1.5))
TELLURIC_H2O = ((6470.0, 6580.0, 0.03, 20.0), (7160.0, 7340.0, 0.12, 15.0), (8130.0, 8350.0, 0.12, 15.0),
                (8950.0, 9250.0, 0.25, 20.0), (9270.0, 9800.0, 0.45, 20.0))


def _band_profile(wave: np.ndarray, bands: tuple[tuple[float, float, float, float], ...]) -> np.ndarray:
    from scipy.special import expit

    out = np.zeros_like(wave, dtype=np.float64)
    for lo, hi, depth, edge in bands:
        rise = expit((wave - lo) / edge)
        fall = expit(-(wave - hi) / (3 * edge))
        tail = np.exp(-np.clip(wave - lo, 0, None) / (hi - lo))
        out += depth * rise * fall * (0.4 + 0.6 * tail)
    return out


def telluric(wave: np.ndarray, o2: np.ndarray, h2o: np.ndarray) -> np.ndarray:
    """Transmission (n, npix) for O2 column ``o2`` (airmass) and H2O strength ``h2o``."""
    po2 = _band_profile(wave, TELLURIC_O2)
    ph2o = _band_profile(wave, TELLURIC_H2O)
    return np.exp(-(o2[:, None] * po2[None, :] + h2o[:, None] * ph2o[None, :]))


def legendre_distortion(wave: np.ndarray, coeffs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``exp(sum_k c_k P_k(x))``, k = 1..K, x = -1..1 over [lo, hi]: (n, npix)."""
    from numpy.polynomial import legendre

    x = np.clip((wave - lo) / (hi - lo) * 2.0 - 1.0, -1.2, 1.2)
    basis = np.stack([legendre.legval(x, np.eye(coeffs.shape[1] + 1)[k + 1]) for k in range(coeffs.shape[1])])
    return np.exp(coeffs @ basis)


def legendre_basis(wave: np.ndarray, degree: int, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    """(degree + 1, npix) Legendre polynomials over the span of ``wave`` (CRB nuisance terms)."""
    from numpy.polynomial import legendre

    lo = wave[0] if lo is None else lo
    hi = wave[-1] if hi is None else hi
    x = (wave - lo) / (hi - lo) * 2.0 - 1.0
    return np.stack([legendre.legval(x, np.eye(degree + 1)[k]) for k in range(degree + 1)])


# --------------------------------------------------------------------- observation parameters


@dataclass
class ObsParams:
    """Per-star observation parameters (arrays of length n)."""

    index: np.ndarray
    snr: np.ndarray
    rv_kms: np.ndarray
    lsf_scale: np.ndarray  # resolving power factor of the fibre
    ebv: np.ndarray
    cal: np.ndarray  # (n, 3) Legendre coefficients of the calibration distortion
    dichroic: np.ndarray
    airmass: np.ndarray
    pwv: np.ndarray
    sky_resid: np.ndarray
    exptime: np.ndarray
    ra: np.ndarray
    dec: np.ndarray
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return int(self.index.size)


@dataclass(frozen=True)
class SnrSpec:
    """SNR distribution: lognormal (median, sigma_ln) clipped to [lo, hi], or a fixed value."""

    median: float
    sigma_ln: float
    lo: float
    hi: float

    def draw(self, u: np.ndarray) -> np.ndarray:
        from scipy.special import ndtri

        if self.sigma_ln == 0:
            return np.full(u.shape, self.median)
        return np.clip(self.median * np.exp(self.sigma_ln * ndtri(u)), self.lo, self.hi)


SNR_DEFAULT = {"lamost": SnrSpec(30.0, 0.75, 5.0, 200.0), "desi": SnrSpec(20.0, 0.70, 3.0, 150.0)}


def parse_snr(spec: str | None, survey: str) -> SnrSpec:
    """``lamost``/``desi`` (the survey's distribution), ``30`` (fixed), ``10:100`` (log-uniform
    range, as a lognormal covering it) or ``lognormal:MEDIAN,SIGMA``."""
    from stxcli.errors import UsageError

    if spec is None or spec.strip() == "" or spec.strip().lower() == "default":
        return SNR_DEFAULT[survey]
    s = spec.strip().lower()
    try:
        if s in SNR_DEFAULT:
            return SNR_DEFAULT[s]
        if s.startswith("lognormal:"):
            med, sig = (float(v) for v in s.split(":", 1)[1].split(","))
            return SnrSpec(med, sig, 1.0, 1e4)
        if ":" in s:
            lo, hi = (float(v) for v in s.split(":"))
            if not 0 < lo < hi:
                raise ValueError
            return SnrSpec(float(np.sqrt(lo * hi)), float(np.log(hi / lo) / 4.0), lo, hi)
        v = float(s)
        if v <= 0:
            raise ValueError
        return SnrSpec(v, 0.0, v, v)
    except ValueError:
        raise UsageError(f"--snr {spec!r}: expected 'lamost', 'desi', a number (30), a range (10:100) "
                         "or 'lognormal:MEDIAN,SIGMA'") from None


def draw_params(survey: str, seed: int, index: np.ndarray, snr: SnrSpec, rv_kms: np.ndarray) -> ObsParams:
    """Observation parameters of stars ``index`` (a pure function of seed and index)."""
    u = rng.uniform(seed, rng.OBS, index, 16)
    z = rng.normal(seed, rng.OBS + 100, index, 8)
    n = index.size
    lamost = survey == "lamost"
    ebv = -np.log(u[:, 1]) * (0.12 if lamost else 0.03)
    cal = z[:, :3] * (np.array([0.06, 0.03, 0.02]) if lamost else np.array([0.02, 0.01, 0.005]))
    # sky positions: LAMOST towards the anticentre / low latitude, DESI at high latitude
    ra = 360.0 * u[:, 2]
    dec = np.degrees(np.arcsin(np.clip(2 * u[:, 3] - 1, -1, 1)))
    dec = (np.clip(dec, -10.0, 60.0) if lamost else np.clip(dec, -20.0, 80.0))
    return ObsParams(
        index=index, snr=snr.draw(u[:, 0]), rv_kms=rv_kms,
        lsf_scale=(0.92 + 0.16 * u[:, 4]) if lamost else (0.95 + 0.10 * u[:, 4]),
        ebv=ebv, cal=cal, dichroic=0.02 * z[:, 3] if lamost else np.zeros(n),
        airmass=1.0 + 0.8 * u[:, 5], pwv=np.exp(0.5 * z[:, 4]),
        sky_resid=0.03 * np.abs(z[:, 5]) if lamost else 0.005 * np.abs(z[:, 5]),
        exptime=(1500.0 + 1500.0 * np.round(u[:, 6] * 2)) if lamost else (600.0 + 1400.0 * u[:, 6]),
        ra=ra, dec=dec,
        extra={"u_flux": u[:, 7], "u_mask": u[:, 8], "u_ends": u[:, 9:11], "u_fiber": u[:, 11]},
    )


# ----------------------------------------------------------------------------------- models


@dataclass
class Observed:
    """Per arm (name -> (n, npix)) flux, ivar, mask (bool) and survey bit masks, plus the flux
    scale used and the per-star SNR actually realised."""

    flux: dict[str, np.ndarray]
    ivar: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]
    bits: dict[str, np.ndarray]
    scale: np.ndarray  # (n,) multiplier from model flux to file flux
    snr: dict[str, np.ndarray]


class SurveyModel:
    name: str
    arms: tuple[str, ...]

    def waves(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def noiseless(self, hires: np.ndarray, p: ObsParams, group: int = 1) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def add_noise(self, clean: dict[str, np.ndarray], p: ObsParams, seed: int) -> Observed:
        raise NotImplementedError

    def nuisance(self) -> list[np.ndarray]:
        """Per arm, the (k, npix) multiplicative nuisance basis of the Cramer-Rao bound (the
        fitter does not know the calibration distortion)."""
        raise NotImplementedError


def _rv_shift_pix(rv_kms: np.ndarray) -> np.ndarray:
    return np.log10(1.0 + rv_kms / C_KMS) / LOG_STEP


class LamostModel(SurveyModel):
    name = "lamost"
    arms = ("lrs",)

    def __init__(self, *, in_fwhm: np.ndarray | None = None, lsf_boost: float = 1.08) -> None:
        self.wave = lamost_wave()
        self.r_base = lamost_resolving_power(self.wave) * lsf_boost
        self.lsf_boost = lsf_boost
        self.matrix = gaussian_resampler(self.wave, self.wave / self.r_base, log_pixels=True, in_fwhm=in_fwhm)
        cal = calibration()
        self.sens = cal["lamost_sens"].astype(np.float64)
        self.badfrac = cal["lamost_badfrac"].astype(np.float64)
        self.ext = extinction_curve(self.wave)
        self.g_band = (self.wave > 4000.0) & (self.wave < 5500.0)
        self.sky = _sky_pattern(self.wave, 1800.0)
        self.basis = legendre_basis(self.wave, 3)

    def waves(self) -> dict[str, np.ndarray]:
        return {"lrs": self.wave}

    def sigma_extra_pix(self, p: ObsParams) -> np.ndarray:
        """Extra blur (output pixels) that brings the boosted base LSF to the fibre's R."""
        sig_base = 1.0 / (self.r_base.mean() * 2.3548 * np.log(10) * LAMOST_COEFF1)
        ratio2 = (self.lsf_boost / p.lsf_scale) ** 2
        return sig_base * np.sqrt(np.clip(ratio2 - 1.0, 0.0, None))

    def multiplicative(self, p: ObsParams) -> np.ndarray:
        w = self.wave
        m = 10.0 ** (-0.4 * p.ebv[:, None] * self.ext[None, :])
        m *= legendre_distortion(w, p.cal, 3700.0, 9100.0)
        m *= 1.0 + p.dichroic[:, None] * np.tanh((w - 5800.0) / 40.0)[None, :]
        m *= telluric(w, LAMOST_TELLURIC * p.airmass, LAMOST_TELLURIC * p.pwv)
        return m.astype(np.float32)

    def noiseless(self, hires: np.ndarray, p: ObsParams, group: int = 1) -> dict[str, np.ndarray]:
        shifted = shift_rows_grouped(hires, _rv_shift_pix(p.rv_kms), group)
        out = apply_matrix(self.matrix, shifted)
        out = blur_rows(out, np.repeat(self.sigma_extra_pix(p), group))
        out *= np.repeat(self.multiplicative(p), group, axis=0)
        return {"lrs": out}

    def nuisance(self) -> list[np.ndarray]:
        return [self.basis]

    def add_noise(self, clean: dict[str, np.ndarray], p: ObsParams, seed: int) -> Observed:
        f = clean["lrs"].astype(np.float64)
        n, npix = f.shape
        # flux scale: realistic LAMOST file values (median 5 .. 9000)
        level = 10.0 ** (1.0 + 2.8 * p.extra["u_flux"])
        med = np.median(f[:, (self.wave > 6000) & (self.wave < 6500)], axis=1)
        scale = level / np.maximum(med, 1e-30)
        f = f * scale[:, None]
        # photon-like noise with the real LAMOST sensitivity, SNR_g as drawn
        a = p.snr**2 / np.median(f[:, self.g_band] * self.sens[self.g_band], axis=1)
        var = f / (a[:, None] * self.sens[None, :])
        var = np.maximum(var, 1e-6 * np.median(var, axis=1, keepdims=True))
        flux = np.empty((n, npix), dtype=np.float32)
        ivar = np.empty((n, npix), dtype=np.float32)
        mask = np.zeros((n, npix), dtype=bool)
        andmask = np.zeros((n, npix), dtype=np.float32)
        for i in range(n):
            g = rng.star_generator(seed, rng.NOISE, int(p.index[i]))
            sig = np.sqrt(var[i])
            noise = g.standard_normal(npix) * sig
            # red sky-subtraction residuals: the sky-line pattern, over- or under-subtracted
            resid = p.sky_resid[i] * g.standard_normal() * self.sky * np.median(f[i])
            fi = f[i] + noise + resid
            bad = _lamost_bad_pixels(g, self.badfrac, p.extra["u_ends"][i])
            flagged = _run(g, npix, 40, 400) if g.random() < 0.02 else np.zeros(npix, bool)
            bad |= flagged
            iv = 1.0 / var[i]
            iv[bad] = 0.0
            fi[bad & ~flagged] = 0.0
            flux[i], ivar[i], mask[i] = fi, iv, bad
            andmask[i] = flagged.astype(np.float32)
        snr = _median_snr(flux, ivar, mask, self.g_band)
        return Observed(flux={"lrs": flux}, ivar={"lrs": ivar}, mask={"lrs": mask}, bits={"lrs": andmask},
                        scale=scale, snr={"g": snr})


def _run(g: np.random.Generator, npix: int, min_len: int, max_len: int) -> np.ndarray:
    """One contiguous run of flagged pixels at a random place."""
    out = np.zeros(npix, dtype=bool)
    start = int(g.integers(0, npix))
    length = int(g.integers(min_len, max_len))
    out[start:start + length] = True
    return out


def _lamost_bad_pixels(g: np.random.Generator, badfrac: np.ndarray, u_ends: np.ndarray) -> np.ndarray:
    """Zero-ivar pixels: a few short runs placed where real LAMOST spectra have them, and often
    the first / last pixels (end of the detector coverage)."""
    npix = badfrac.size
    bad = np.zeros(npix, dtype=bool)
    n_runs = g.poisson(2.0)
    if n_runs:
        p = badfrac / badfrac.sum()
        starts = g.choice(npix, size=n_runs, p=p)
        lengths = 1 + g.geometric(0.2, size=n_runs)
        for s, ln in zip(starts, lengths):
            bad[s:s + ln] = True
    if u_ends[0] < 0.5:
        bad[: int(1 + 12 * u_ends[0])] = True
    if u_ends[1] < 0.4:
        bad[npix - int(1 + 60 * u_ends[1]):] = True
    return bad


def _median_snr(flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray, sel: np.ndarray | slice) -> np.ndarray:
    """Per-row median of ``flux * sqrt(ivar)`` over unmasked pixels of ``sel`` (0 if none)."""
    x = (flux[:, sel] * np.sqrt(ivar[:, sel])).astype(np.float64)
    bad = mask[:, sel]
    x[bad] = np.inf
    x.sort(axis=1)
    k = (~bad).sum(axis=1)
    lo = np.maximum((k - 1) // 2, 0)[:, None]
    hi = np.maximum(k // 2, 0)[:, None]
    hi = np.minimum(hi, x.shape[1] - 1)
    out = 0.5 * (np.take_along_axis(x, lo, axis=1)[:, 0] + np.take_along_axis(x, hi, axis=1)[:, 0])
    out[k == 0] = 0.0
    return out.astype(np.float32)


def _sky_pattern(wave: np.ndarray, resolving_power: float) -> np.ndarray:
    """Relative sky-line strength on ``wave`` at the given resolving power (0 outside lines),
    from the DESI background variance (its excess over a running median is the sky lines)."""
    from scipy.ndimage import median_filter

    cal = calibration()
    ws, vs = [], []
    for arm in ("b", "r", "z"):
        w, v = cal[f"desi_wave_{arm}"], cal[f"desi_bgvar_{arm}"].astype(np.float64)
        excess = np.clip(v / median_filter(v, 61, mode="nearest") - 1.0, 0.0, None)
        ws.append(w)
        vs.append(excess)
    w = np.concatenate(ws)
    v = np.concatenate(vs)
    order = np.argsort(w)
    w, v = w[order], v[order]
    fwhm = wave / resolving_power
    sig = fwhm / 2.3548
    # Gaussian smoothing at the target resolution (coarse: on the DESI grid, 0.8 A pixels)
    out = np.zeros_like(wave)
    for i0 in range(0, wave.size, 512):
        sl = slice(i0, i0 + 512)
        d = (w[None, :] - wave[sl, None]) / sig[sl, None]
        k = np.exp(-0.5 * d * d)
        out[sl] = (k * v[None, :]).sum(1) / np.maximum(k.sum(1), 1e-12)
    out[wave < 5500.0] = 0.0
    return out / max(out.max(), 1e-12)


class DesiModel(SurveyModel):
    name = "desi"
    arms = ("b", "r", "z")

    def __init__(self, *, in_fwhm: dict[str, np.ndarray] | None = None) -> None:
        cal = calibration()
        self.wave = {a: desi_wave(a) for a in self.arms}
        self.box = {a: box_resampler(self.wave[a]) for a in self.arms}
        self.sigma = {a: desi_sigma_pix(a) for a in self.arms}
        if in_fwhm is not None:  # the input is coarser: the effective resolution is the input's
            for a in self.arms:
                s_in = in_fwhm[a] / 2.3548 / 0.8
                self.sigma[a] = np.sqrt(self.sigma[a] ** 2 + np.clip(s_in**2 - self.sigma[a] ** 2, 0.0, None))
        self.bgvar = {a: cal[f"desi_bgvar_{a}"].astype(np.float64) for a in self.arms}
        self.ext = {a: extinction_curve(self.wave[a]) for a in self.arms}
        self.gain = {a: _desi_electrons_per_flux(self.wave[a]) for a in self.arms}
        self.bright_sky = {a: self._bright_sky(a) for a in self.arms}
        self.basis = {a: legendre_basis(self.wave[a], 2) for a in self.arms}

    def _bright_sky(self, arm: str) -> np.ndarray:
        from scipy.ndimage import median_filter

        v = self.bgvar[arm]
        return v > 12.0 * median_filter(v, 61, mode="nearest")

    def waves(self) -> dict[str, np.ndarray]:
        return dict(self.wave)

    def star_sigma(self, arm: str, p: ObsParams) -> np.ndarray:
        return self.sigma[arm][None, :] / p.lsf_scale[:, None]

    def multiplicative(self, arm: str, p: ObsParams) -> np.ndarray:
        w = self.wave[arm]
        m = 10.0 ** (-0.4 * p.ebv[:, None] * self.ext[arm][None, :])
        m *= legendre_distortion(w, p.cal, 3600.0, 9824.0)
        m *= telluric(w, 0.1 * p.airmass, 0.1 * p.pwv)
        return m.astype(np.float32)

    def noiseless(self, hires: np.ndarray, p: ObsParams, group: int = 1,
                  kernels: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        shifted = shift_rows_grouped(hires, _rv_shift_pix(p.rv_kms), group)
        out = {}
        for a in self.arms:
            f = apply_matrix(self.box[a], shifted)
            k = kernels[a] if kernels is not None else resolution_band(self.star_sigma(a, p))
            f = apply_band(np.repeat(k, group, axis=0) if group > 1 else k, f)
            f *= np.repeat(self.multiplicative(a, p), group, axis=0)
            out[a] = f
        return out

    def kernels(self, p: ObsParams) -> dict[str, np.ndarray]:
        return {a: resolution_band(self.star_sigma(a, p)) for a in self.arms}

    def nuisance(self) -> list[np.ndarray]:
        return [self.basis[a] for a in self.arms]

    def add_noise(self, clean: dict[str, np.ndarray], p: ObsParams, seed: int) -> Observed:
        n = p.n
        t = p.exptime / 1000.0
        # flux scale so that the median per-pixel SNR of the R arm is the star's SNR
        fr = clean["r"].astype(np.float64)
        vr = self.bgvar["r"][None, :] / t[:, None]
        gr = self.gain["r"][None, :] * t[:, None]
        s2 = (p.snr**2)[:, None]
        fpos = np.maximum(fr, 1e-30)
        a_pix = (s2 * fpos / gr + np.sqrt((s2 * fpos / gr) ** 2 + 4 * fpos**2 * s2 * vr)) / (2 * fpos**2)
        scale = np.median(a_pix, axis=1)
        flux, ivar, mask, bits, snr = {}, {}, {}, {}, {}
        gens = [rng.star_generator(seed, rng.NOISE, int(i)) for i in p.index]
        for a in self.arms:
            f = clean[a].astype(np.float64) * scale[:, None]
            var = self.bgvar[a][None, :] / t[:, None] + np.clip(f, 0.0, None) / (self.gain[a][None, :] * t[:, None])
            npix = f.shape[1]
            fl = np.empty((n, npix), dtype=np.float32)
            iv = np.empty((n, npix), dtype=np.float32)
            mk = np.zeros((n, npix), dtype=bool)
            bt = np.zeros((n, npix), dtype=np.uint32)
            for i in range(n):
                g = gens[i]
                noise = g.standard_normal(npix) * np.sqrt(var[i])
                b = np.zeros(npix, dtype=np.uint32)
                b[self.bright_sky[a]] |= DESI_MASK["BRIGHTSKY"]
                n_cr = g.poisson(1.5)
                if n_cr:
                    pos = g.integers(0, npix, size=n_cr)
                    for q in pos:
                        b[q:q + 2] |= DESI_MASK["COSMIC"]
                bad = b != 0
                fi = f[i] + noise
                ivi = 1.0 / var[i]
                ivi[bad] = 0.0
                fl[i], iv[i], mk[i], bt[i] = fi, ivi, bad, b
            flux[a], ivar[a], mask[a], bits[a] = fl, iv, mk, bt
            snr[a] = _median_snr(fl, iv, mk, slice(None))
        return Observed(flux=flux, ivar=ivar, mask=mask, bits=bits, scale=scale, snr=snr)


def _desi_electrons_per_flux(wave: np.ndarray) -> np.ndarray:
    """Electrons per 0.8 A pixel per 1e-17 erg/s/cm2/A in 1000 s: 8.6 m2 mirror, photon energy,
    a smooth total throughput peaking at 0.45 near 7000 A."""
    area = 8.6e4  # cm2
    energy = 6.626e-27 * 2.998e18 / wave  # erg per photon
    thr = 0.45 * np.exp(-(((wave - 7000.0) / 3000.0) ** 2))
    return 1e-17 * 0.8 * area * 1000.0 / energy * thr


def model_for(survey: str) -> SurveyModel:
    if survey == "lamost":
        return LamostModel()
    if survey == "desi":
        return DesiModel()
    raise StxError(f"unknown survey {survey!r} (lamost, desi)")
