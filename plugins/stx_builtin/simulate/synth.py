"""Fast synthetic stellar spectra: opacity templates combined by a matrix product, exponentiated.

Model
-----
On a vacuum log-lambda grid (3550-10000 A, step 2e-5 dex, 13.8 km/s per pixel) the flux is::

    F = B_lambda(Teff) C(lambda, Teff) * (R + (1 - R) * exp(-tau_s) * (1 - A(tau_l; r)))
    tau_l = W_l(labels) @ T_l          (metal lines)
    tau_s = W_s(labels) @ T_s          (smooth opacity: wings, hydrogen, molecules, haze)
    R = B_lambda(t_surface Teff) / B_lambda(Teff)   (residual flux of saturated cores)

The templates ``T`` (K x pixels) are built once per process (about 0.5 s, then cached): each row
is the opacity of one group of lines *relative to the continuum* at a reference temperature
(theta0 = 5040 / T = 1); ``W`` (stars x K) carries everything that depends on the labels, from a
one-point photosphere (:mod:`.photosphere`). Both products are plain matrix multiplications.

* **metal lines** from the Gaia-ESO v6 list (shipped, vacuum) plus a few strong lines blueward of
  4200 A, grouped by (alpha element or not, ion stage, first ionisation potential in 0.75 eV bins,
  excitation potential in 0.5 eV bins). A line's integrated opacity is
  ``(pi e^2 / m c^2) lambda^2 gf N_lower / N_H / kappa_c``; the weight of a group is
  ``10**([Fe/H] (+ [alpha/Fe])) * f_ion(T, Pe) * 10**(-(theta - theta0) chi_group) / kappa_c``:
  Saha ionisation and Boltzmann excitation with logg entering through ``Pe``.
* **curve of growth**: real metal lines (Doppler width b ~ 2 km/s) are narrower than a pixel, so
  a pixel's absorption is the Gaussian curve of growth ``A = r F(tau_l / r)`` with
  ``r = b sqrt(pi) / pixel`` (``F`` the Gaussian-profile equivalent width in Doppler units, in a
  closed form accurate to 4 %): linear for weak lines, ``~ sqrt(ln tau)`` once saturated, so
  metal-rich lines stop growing and metal-poor lines fade linearly. ``b`` includes thermal
  broadening and a gravity-dependent microturbulence.
* **damping wings** of strong lines (Mg b, Na D, Ca II H&K and the triplet, the strongest Fe I):
  Lorentzian far wings whose width follows van der Waals broadening (``~ sqrt(Pg f_HI) T^0.3``,
  the square root being calibrated) and a Stark term (``~ n_e``), so they grow with gravity;
* **hydrogen**: Balmer and Paschen series (n <= 30) with Doppler cores and linear-Stark far wings
  (``~ n_e lambda^-5/2`` Holtsmark wings) and resonance wings, populations ``n^2 10**(-theta chi_n) f_HI`` evaluated
  in a deeper layer (T = Teff), and the Balmer bound-free continuum below 3647 A: the Balmer
  lines peak near 9000-10000 K where hydrogen ionisation and H bound-free opacity take over;
* **molecules**: TiO bands (heads degrading to the red, dissociation equilibrium
  ``~ A_Ti A_O sqrt(Pg) 10**(D0 theta) T^-1.5``) and the CH G band (carbon partly locked in CO in
  cool stars); both with a fixed pseudo-random rotational fine structure;
* a smooth **blue line haze** (the many weak lines the list leaves out, below 4200 A), scaled
  like the neutral iron-peak lines and saturating (HAZE_MAX);
* the **continuum** ``B_lambda C``: Planck times an empirical correction measured on MILES stars
  (:func:`continuum`), evaluated on 50 A nodes.

The C_* / GAMMA_* constants below were set once by comparing Lick-like indices and continuum-
normalised spectra with MILES stars of known labels and with the LAMOST DR1 spectra
(docs/simulator.md); they are not fitted per star. On top of them the shipped **strength
calibration** (:class:`StrengthCalibration`, fitted by :mod:`.calibrate` on real LAMOST DR10
spectra) sets ``t_surface`` of the core residual ``R``, a factor on the curve-of-growth width and
a log-strength correction per template row with Teff and log g slopes; switched off
(:func:`strength_override` with None) the model is the uncalibrated one, with ``R = R_CORE``.

Not modelled: a temperature structure (one layer), NLTE, rotation, chromospheric emission,
isotopes beyond the list's solar mix, CN/MgH/CaH bands, convective shifts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from . import atoms
from .photosphere import Layer, neutral_fraction, saha_phi, solve_layer

LOG_STEP = 2e-5
WAVE_MIN = 3550.0
WAVE_MAX = 10000.0
THETA0 = 1.0
#: Temperature of the layer forming the hydrogen lines, relative to Teff (their wings form deep).
T_HYDROGEN = 1.0
KAPPA_REF = 1e-24
SIGMA_PIX = 0.5
H_SIGMA_PIX = 0.7
R_CORE = 0.03
_PI_E2_MC2 = 8.85e-21  # (pi e^2 / m c^2) in cm, with lambda in A -> integrated opacity in A

# Calibration constants (set once, by comparing with MILES and LAMOST DR1 stars; see docs).
C_LINE = 0.12
C_H = 1.0
C_STARK = 0.06
GAMMA_VDW = 0.0025  # A, damping HWHM at Pg f_HI = 1e5 dyn cm^-2, 5000 K, 5000 A
GAMMA_STARK = 0.0003  # A at n_e = 1e14 cm^-3
NE_REF = 1e14
C_TIO = 5.0
C_CH = 0.35
C_HAZE = 1.0
C_HRES = 0.02  # A, resonance-broadening HWHM of the Balmer lines at Pg f_HI = 1e5, 5000 K
C_PASCHEN = 0.3  # Paschen lines relative to the one-layer estimate (LAMOST DR1 A stars)
C_BJ = 0.2  # scale of the Balmer bound-free opacity (Balmer jump of A stars, MILES)
#: The haze weight saturates at HAZE_MAX times its solar value (cool giants stay grey-ish).
HAZE_MAX = 3.0
C_CO = 0.1  # fraction of carbon in CO at solar labels
#: The haze template is flat below this wavelength (where the line list stops) and falls above.
HAZE_EDGE = 4200.0
#: Reference labels of the molecular and haze weights (where the weight is the C_ constant).
TIO_REF = (3600.0, 4.7, 0.0, 0.0)
CH_REF = (5000.0, 4.5, 0.0, 0.0)
HAZE_REF = (5777.0, 4.44, 0.0, 0.0)

# Template kinds
LINE, WING, H_CORE, H_WING, BALMER_CONT, TIO, CH, HAZE, H_RES = range(9)
KIND_NAMES = ("line", "wing", "h_core", "h_wing", "balmer_cont", "tio", "ch", "haze", "h_res")

#: Hydrogen lines sharing template rows, by upper level: H alpha, H beta, the rest of the Balmer
#: series; the Paschen series.
H_GROUPS = {2: ((3, 3), (4, 4), (5, 30)), 3: ((4, 30),)}
_IP_EDGES = np.array([5.0, 5.75, 6.5, 7.25, 8.0])
_EXC_EDGES = np.arange(0.5, 6.01, 0.5)
#: A line gets a damping-wing template when its integrated opacity at solar labels exceeds this (A).
_STRONG_S = 1.0
_WING_HALF_A = 60.0


@dataclass(frozen=True)
class Grid:
    log_wave: np.ndarray  # (npix,) float64
    wave: np.ndarray  # (npix,) float64, vacuum A

    @property
    def npix(self) -> int:
        return int(self.wave.size)


@lru_cache(maxsize=1)
def hires_grid() -> Grid:
    n = int(np.ceil(np.log10(WAVE_MAX / WAVE_MIN) / LOG_STEP)) + 1
    lw = np.log10(WAVE_MIN) + LOG_STEP * np.arange(n)
    return Grid(log_wave=lw, wave=10.0**lw)


@dataclass(frozen=True)
class TemplateSet:
    """The opacity templates and what each weight depends on (arrays of length K).

    Rows ``[:n_line]`` are metal-line groups (curve-of-growth absorption), the others smooth
    opacity (exponential attenuation)."""

    templates: np.ndarray  # (K, npix) float32
    n_line: int
    kind: np.ndarray  # int
    alpha: np.ndarray  # bool: abundance follows [alpha/Fe]
    ion: np.ndarray  # 1 or 2 (0 for non-metal kinds)
    chi_ion: np.ndarray  # eV, representative first ionisation potential
    u_ratio: np.ndarray  # U_II / U_I
    chi_exc: np.ndarray  # eV, representative excitation (hydrogen: level energy)

    @property
    def k(self) -> int:
        return int(self.kind.size)


# ----------------------------------------------------------------------------------- line data


@dataclass(frozen=True)
class LineList:
    wave: np.ndarray  # vacuum A
    symbol: np.ndarray  # str
    ion: np.ndarray
    chi: np.ndarray
    loggf: np.ndarray


def _data_path(name: str):
    from importlib.resources import files

    return files("stx_builtin") / "data" / "simulate" / name


@lru_cache(maxsize=1)
def load_linelist() -> LineList:
    """The shipped Gaia-ESO v6 subset plus the strong lines blueward of 4200 A."""
    from stxcli.spectra import air_to_vacuum

    with _data_path("linelist_ges_v6.npz").open("rb") as fh:
        z = np.load(fh)
        symbols = z["symbols"].astype(str)
        wave = z["wave_vac"]
        sym = symbols[z["element"]]
        ion, chi, loggf = z["ion"].astype(int), z["chi"].astype(float), z["loggf"].astype(float)
    blue = atoms.BLUE_LINES
    wave = np.concatenate([wave, air_to_vacuum(np.array([b[0] for b in blue]))])
    sym = np.concatenate([sym, np.array([b[1] for b in blue])])
    ion = np.concatenate([ion, np.array([b[2] for b in blue])])
    chi = np.concatenate([chi, np.array([b[3] for b in blue])])
    loggf = np.concatenate([loggf, np.array([b[4] for b in blue])])
    order = np.argsort(wave, kind="stable")
    return LineList(wave=wave[order], symbol=sym[order], ion=ion[order], chi=chi[order], loggf=loggf[order])


# ------------------------------------------------------------------------------ template build


def _gauss_deposit(out: np.ndarray, rows: np.ndarray, pos: np.ndarray, area: np.ndarray, sigma: float) -> None:
    """Add pixel-integrated Gaussians of total ``area`` (in pixel units) centred at fractional
    pixel ``pos`` to rows ``rows`` of ``out``."""
    from scipy.special import ndtr

    npix = out.shape[1]
    half = int(np.ceil(4 * sigma)) + 1
    base = np.floor(pos).astype(np.int64)
    flat = out.reshape(-1)
    for d in range(-half, half + 1):
        j = base + d
        frac = ndtr((j + 0.5 - pos) / sigma) - ndtr((j - 0.5 - pos) / sigma)
        ok = (j >= 0) & (j < npix)
        np.add.at(flat, rows[ok] * npix + j[ok], (area[ok] * frac[ok]).astype(out.dtype))


def _lorentz_wings(out_row: np.ndarray, grid: Grid, centers: np.ndarray, strength: np.ndarray,
                   gamma_core: float, half_width: float) -> None:
    """Add ``strength / pi / (dlam^2 + gamma_core^2) * (lambda / 5000)^2`` over +-half_width A."""
    for c, s in zip(centers, strength):
        lo, hi = np.searchsorted(grid.wave, [c - half_width, c + half_width])
        d = grid.wave[lo:hi] - c
        out_row[lo:hi] += (s / np.pi / (d * d + gamma_core**2) * (c / 5000.0) ** 2).astype(out_row.dtype)


def _pixel_position(grid: Grid, wave: np.ndarray) -> np.ndarray:
    return (np.log10(wave) - grid.log_wave[0]) / LOG_STEP


def _band(grid: Grid, head: float, length: float, to_red: bool, rng: np.random.Generator) -> np.ndarray:
    """A molecular band: a sharp head, an exponential envelope away from it, fine structure."""
    from scipy.special import expit

    w = grid.wave
    x = (w - head) if to_red else (head - w)
    env = np.where(x >= 0, np.exp(-np.clip(x, 0, None) / length), 0.0)
    env *= expit(x / 0.4)  # head rounded over ~1 A
    env[x > 6 * length] = 0.0
    sel = np.flatnonzero(env > 1e-4)
    if sel.size == 0:
        return env
    # rotational fine structure: lines every ~0.7 A with random strengths, 0.15 A wide
    lo, hi = w[sel[0]], w[sel[-1]]
    centers = np.arange(lo, hi, 0.7) + rng.uniform(-0.3, 0.3, size=int(np.ceil((hi - lo) / 0.7)))[: np.arange(lo, hi, 0.7).size]
    amps = rng.uniform(0.2, 1.0, size=centers.size)
    fine = np.zeros_like(w)
    for c, a in zip(centers, amps):
        i0, i1 = np.searchsorted(w, [c - 0.6, c + 0.6])
        fine[i0:i1] += a * np.exp(-0.5 * ((w[i0:i1] - c) / 0.15) ** 2)
    fine /= max(fine[sel].mean(), 1e-9)
    return env * (0.35 + 0.65 * fine)


def _metal_line_strength(ll: LineList) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Integrated opacity (A) of each line at theta0 relative to kappa_ref, excluding the
    label-dependent ionisation fraction; and the per-line element constants."""
    el = atoms.element_arrays(ll.symbol)
    u = np.where(ll.ion == 1, el["u1"], el["u2"])
    s = _PI_E2_MC2 * ll.wave**2 * 10.0 ** (ll.loggf + el["a_sun"] - 12.0 - THETA0 * ll.chi) / u / KAPPA_REF
    return s, el


@lru_cache(maxsize=1)
def build_templates() -> TemplateSet:
    """All opacity templates on the high-resolution grid (cached per process)."""
    grid = hires_grid()
    w = grid.wave
    ll = load_linelist()
    inside = (ll.wave > w[0] + 1.0) & (ll.wave < w[-1] - 1.0)
    ll = LineList(*(getattr(ll, f)[inside] for f in ("wave", "symbol", "ion", "chi", "loggf")))
    s, el = _metal_line_strength(ll)
    ip_bin = np.searchsorted(_IP_EDGES, el["chi1"])
    exc_bin = np.searchsorted(_EXC_EDGES, ll.chi)
    key = (el["alpha"].astype(np.int64) * 2 + (ll.ion - 1)) * 100 + ip_bin * 20 + exc_bin
    groups, inverse = np.unique(key, return_inverse=True)

    def wmean(v: np.ndarray) -> np.ndarray:  # strength-weighted group means
        return np.bincount(inverse, weights=s * v) / np.bincount(inverse, weights=s)

    g_alpha = np.bincount(inverse, weights=el["alpha"].astype(float)) > 0
    g_ion = (groups // 100) % 2 + 1
    g_chi_ion = wmean(el["chi1"])
    g_u = 10.0 ** wmean(np.log10(el["u2"] / el["u1"]))
    g_chi = wmean(ll.chi)
    n_groups = groups.size

    # strong lines get damping-wing templates: integrated opacity at solar labels > _STRONG_S A
    sun = solve_layer(np.array([5777.0]), np.array([4.44]), np.array([0.0]), np.array([0.0]))
    phi = saha_phi(sun.t[0], el["chi1"], el["u2"] / el["u1"])
    f_ion = np.where(ll.ion == 1, sun.pe[0] / (sun.pe[0] + phi), phi / (sun.pe[0] + phi))
    s_sun = C_LINE * s * f_ion * 10.0 ** (-(sun.theta[0] - THETA0) * ll.chi) * KAPPA_REF / sun.kappa[0]
    strong = s_sun > _STRONG_S
    wing_groups = np.unique(inverse[strong])

    rows: list[np.ndarray] = []
    meta: list[tuple[int, bool, int, float, float, float]] = []  # kind, alpha, ion, chi_ion, u, chi

    # metal line groups: pixel-integrated Gaussians of area S / dlam_pix (pixels)
    dlam_pix = ll.wave * np.log(10) * LOG_STEP
    line_block = np.zeros((n_groups, grid.npix), dtype=np.float32)
    _gauss_deposit(line_block, inverse.astype(np.int64), _pixel_position(grid, ll.wave), s / dlam_pix, SIGMA_PIX)
    rows.extend(line_block)
    for g in range(n_groups):
        meta.append((LINE, bool(g_alpha[g]), int(g_ion[g]), g_chi_ion[g], g_u[g], g_chi[g]))
    n_line = len(rows)

    # damping wings, one template per group holding strong lines
    for g in wing_groups:
        row = np.zeros(grid.npix, dtype=np.float32)
        sel = strong & (inverse == g)
        _lorentz_wings(row, grid, ll.wave[sel], s[sel], gamma_core=0.05, half_width=_WING_HALF_A)
        rows.append(row)
        meta.append((WING, bool(g_alpha[g]), int(g_ion[g]), g_chi_ion[g], g_u[g], g_chi[g]))

    # hydrogen: Doppler core, linear-Stark wing and resonance (self-broadening) wing per series
    for lower in (2, 3):
        lines = [ln for ln in atoms.hydrogen_lines(lower, 30) if w[0] < ln[0] < w[-1]]
        chi_l = atoms.CHI_H_LEVEL[lower]
        all_waves = np.array([ln[0] for ln in lines])
        all_nup = np.array([ln[1] for ln in lines], dtype=float)
        all_f = np.array([ln[2] for ln in lines])
        half = 300.0 if lower == 2 else 120.0
        # one set of rows per H_GROUPS entry (H alpha and H beta on their own: the calibration
        # corrects their strengths separately)
        for g_lo, g_hi in H_GROUPS[lower]:
            sel = (all_nup >= g_lo) & (all_nup <= g_hi)
            waves, nup, fosc = all_waves[sel], all_nup[sel], all_f[sel]
            s_h = _PI_E2_MC2 * waves**2 * fosc * lower**2 * 10.0 ** (-THETA0 * chi_l) / KAPPA_REF
            if lower == 3:
                s_h = s_h * C_PASCHEN
            core = np.zeros((1, grid.npix), dtype=np.float32)
            dpix = waves * np.log(10) * LOG_STEP
            _gauss_deposit(core, np.zeros(waves.size, dtype=np.int64), _pixel_position(grid, waves), s_h / dpix,
                           H_SIGMA_PIX)
            rows.append(core[0])
            meta.append((H_CORE, False, 0, 0.0, 1.0, chi_l))
            stark = np.zeros(grid.npix)
            for c, sh, d_n in zip(waves, s_h, nup**2 - lower**2):
                lo, hi = np.searchsorted(w, [c - half, c + half])
                dl = w[lo:hi] - c
                core_w = 0.1 * d_n * (c / 4861.0) ** 2
                k_n = (d_n * (c / 6563.0) ** 2) ** 1.5 * 1e-3
                stark[lo:hi] += sh * k_n * (dl * dl + core_w * core_w) ** -1.25
            rows.append(stark.astype(np.float32))
            meta.append((H_WING, False, 0, 0.0, 1.0, chi_l))
            res = np.zeros(grid.npix, dtype=np.float32)
            # resonance broadening acts on levels connected to the ground state: strongest for Balmer
            _lorentz_wings(res, grid, waves, s_h, gamma_core=0.1, half_width=half)
            rows.append(res)
            meta.append((H_RES, False, 0, 0.0, 1.0, chi_l))

    # Balmer bound-free continuum (n = 2) below the series limit
    lim = atoms.series_limit(2)
    from scipy.special import expit

    sigma2 = np.where(w < lim, 1.044e-26 * w**3 / 32.0, 0.0) * expit(-(w - lim) / 3.0)
    rows.append((sigma2 * 4.0 * 10.0 ** (-THETA0 * atoms.CHI_H_LEVEL[2]) / KAPPA_REF).astype(np.float32))
    meta.append((BALMER_CONT, False, 0, 0.0, 1.0, atoms.CHI_H_LEVEL[2]))

    # blue haze (the unlisted weak lines below 4200 A): smooth opacity rising to the blue
    haze = np.exp(-(w - 3600.0) / 350.0) * np.where(w < HAZE_EDGE, 1.0, np.exp(-(w - HAZE_EDGE) / 100.0))
    rows.append((haze / haze.max()).astype(np.float32))
    meta.append((HAZE, False, 0, 0.0, 1.0, 0.0))

    rng = np.random.default_rng(20240501)  # fixed: the fine structure is part of the model
    tio = np.zeros(grid.npix)
    for head, amp, length in atoms.TIO_BANDS:
        tio += amp * _band(grid, _air_to_vac(head), length, True, rng)
    rows.append((tio / tio.max()).astype(np.float32))
    meta.append((TIO, False, 0, 0.0, 1.0, 0.0))
    ch = _band(grid, _air_to_vac(atoms.CH_BAND[0]), atoms.CH_BAND[1], False, rng)
    rows.append((ch / ch.max()).astype(np.float32))
    meta.append((CH, False, 0, 0.0, 1.0, 0.0))

    m = list(zip(*meta))
    return TemplateSet(
        templates=np.ascontiguousarray(np.stack(rows)), n_line=n_line,
        kind=np.array(m[0], dtype=np.int64), alpha=np.array(m[1], dtype=bool), ion=np.array(m[2], dtype=np.int64),
        chi_ion=np.array(m[3], dtype=float), u_ratio=np.array(m[4], dtype=float), chi_exc=np.array(m[5], dtype=float),
    )


def _air_to_vac(w: float) -> float:
    from stxcli.spectra import air_to_vacuum

    return float(air_to_vacuum(np.array([w]))[0])


# ------------------------------------------------------------------------------------ weights


def _molecule_factor(layer: Layer, feh: np.ndarray, alpha_fe: np.ndarray, which: int) -> np.ndarray:
    t = layer.t
    if which == TIO:
        ti = atoms.ELEMENTS["Ti"]
        f_ti = neutral_fraction(layer, ti[2], ti[5] / ti[4])
        ab = 10.0 ** (2.0 * (feh + alpha_fe))
        # dissociation equilibrium gives ~Pg; the empirical sqrt(Pg) keeps M giants and M dwarfs
        # of equal Teff at similar TiO strength, as observed (MILES)
        return ab * f_ti * np.sqrt(layer.pg) * 10.0 ** (atoms.TIO_D0 * layer.theta) * t**-1.5 / layer.kappa
    c = atoms.ELEMENTS["C"]
    f_c = neutral_fraction(layer, c[2], c[5] / c[4]) * _free_carbon(layer, feh, alpha_fe)
    return 10.0**feh * f_c * layer.f_hi * layer.pg * 10.0 ** (atoms.CH_D0 * layer.theta) * t**-1.5 / layer.kappa


def _co_ratio(layer: Layer, feh: np.ndarray, alpha_fe: np.ndarray) -> np.ndarray:
    """N(CO) / N(free C) up to a constant: ~ A_O Pg 10**(D0(CO) theta) T**-1.5."""
    return 10.0 ** (feh + alpha_fe) * layer.pg * 10.0 ** (11.09 * layer.theta) * layer.t**-1.5


def _free_carbon(layer: Layer, feh: np.ndarray, alpha_fe: np.ndarray) -> np.ndarray:
    """Fraction of carbon not locked in CO (C_CO of it is locked at solar labels): the G band
    fades in M stars."""
    sun = solve_layer(*(np.array([v]) for v in HAZE_REF))
    ref = _co_ratio(sun, np.zeros(1), np.zeros(1))[0]
    r = C_CO / (1.0 - C_CO) * _co_ratio(layer, feh, alpha_fe) / ref
    return 1.0 / (1.0 + r)


def _haze_factor(layer: Layer, feh: np.ndarray) -> np.ndarray:
    fe = atoms.ELEMENTS["Fe"]
    return 10.0**feh * neutral_fraction(layer, fe[2], fe[5] / fe[4]) * 10.0 ** (-layer.theta * 1.5) / layer.kappa


@lru_cache(maxsize=4)
def _reference(which: int) -> float:
    ref = {TIO: TIO_REF, CH: CH_REF, HAZE: HAZE_REF}[which]
    layer = solve_layer(*(np.array([v]) for v in ref))
    feh, afe = np.array([ref[2]]), np.array([ref[3]])
    if which == HAZE:
        return float(_haze_factor(layer, feh)[0])
    return float(_molecule_factor(layer, feh, afe, which)[0])


def weights(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray, alpha_fe: np.ndarray,
            ts: TemplateSet | None = None) -> np.ndarray:
    """The (n, K) float32 template weights of stars with these labels."""
    ts = ts or build_templates()
    teff, logg, feh, alpha_fe = (np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (teff, logg, feh, alpha_fe))
    layer = solve_layer(teff, logg, feh, alpha_fe)
    t = layer.t[:, None]
    theta = layer.theta[:, None]
    pe = layer.pe[:, None]
    kap = (KAPPA_REF / layer.kappa)[:, None]
    n, k = teff.size, ts.k
    w = np.zeros((n, k))

    metal = (ts.kind == LINE) | (ts.kind == WING)
    ab = 10.0 ** (feh[:, None] + np.where(ts.alpha[metal], alpha_fe[:, None], 0.0))
    phi = saha_phi(t, ts.chi_ion[metal][None, :], ts.u_ratio[metal][None, :])
    f_ion = np.where(ts.ion[metal][None, :] == 1, pe / (pe + phi), phi / (pe + phi))
    wm = C_LINE * ab * f_ion * 10.0 ** (-(theta - THETA0) * ts.chi_exc[metal][None, :]) * kap
    # van der Waals ~ N_H T^0.3; the square root of Pg (instead of Pg) is empirical: the wings of
    # strong lines form deeper than the one-layer Pg says, more so in giants (MILES K giants)
    gamma = GAMMA_VDW * np.sqrt(layer.pg * layer.f_hi / 1e5) * (layer.t / 5000.0) ** 0.3 + GAMMA_STARK * layer.ne / NE_REF
    wm = np.where((ts.kind[metal] == WING)[None, :], wm * gamma[:, None], wm)
    w[:, metal] = wm

    hyd = (ts.kind == H_CORE) | (ts.kind == H_WING) | (ts.kind == H_RES) | (ts.kind == BALMER_CONT)
    deep = solve_layer(teff, logg, feh, alpha_fe, t_factor=T_HYDROGEN)
    wh = C_H * deep.f_hi[:, None] * 10.0 ** (-(deep.theta[:, None] - THETA0) * ts.chi_exc[hyd][None, :]) \
        * (KAPPA_REF / deep.kappa)[:, None]
    wh = np.where((ts.kind[hyd] == H_WING)[None, :], wh * (C_STARK * deep.ne / NE_REF)[:, None], wh)
    wh = np.where((ts.kind[hyd] == BALMER_CONT)[None, :], wh * C_BJ, wh)
    gamma_res = C_HRES * deep.pg * deep.f_hi / 1e5 * (5000.0 / deep.t)
    wh = np.where((ts.kind[hyd] == H_RES)[None, :], wh * gamma_res[:, None], wh)
    w[:, hyd] = wh

    for kd, c in ((TIO, C_TIO), (CH, C_CH)):
        sel = ts.kind == kd
        w[:, sel] = (c * _molecule_factor(layer, feh, alpha_fe, kd) / _reference(kd))[:, None]
    sel = ts.kind == HAZE
    x = _haze_factor(layer, feh) / _reference(HAZE)
    w[:, sel] = (C_HAZE * x / (1.0 + x / HAZE_MAX))[:, None]
    cal = strength_calibration()
    if cal is not None:
        w *= 10.0 ** cal.log_factor(teff, logg)
    return w.astype(np.float32)


# ------------------------------------------------------------------ strength calibration


@dataclass(frozen=True)
class StrengthCalibration:
    """Empirical corrections to the template weights, fitted on real LAMOST DR10 spectra
    (:mod:`.calibrate`, run by ``tools/make_example_data.py``; docs/simulator.md).

    Row ``k`` of the templates gets ``log10 w_k += a_k + b_k (theta - THETA_PIVOT) + c_k (logg -
    LOGG_PIVOT)`` with ``theta = 5040 / Teff`` and logg clipped to the ranges the fit saw (no
    extrapolated slopes): an astrophysical log gf per line group plus first-order corrections of
    the one-layer photosphere's temperature and pressure dependence. ``r_scale`` multiplies the
    curve-of-growth Doppler width (microturbulence); saturated line cores keep the residual flux
    ``B_lambda(t_surface Teff) / B_lambda(Teff)`` (Eddington-Barbier: they form at the top of the
    photosphere, so they are shallower in the red and in hot stars), instead of the constant
    :data:`R_CORE` of the uncalibrated model."""

    a: np.ndarray  # (K,)
    b: np.ndarray  # (K,)
    c: np.ndarray  # (K,)
    theta_range: tuple[float, float]
    logg_range: tuple[float, float]
    r_scale: float = 1.0
    t_surface: float = 0.75

    def log_factor(self, teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
        """(n, K) log10 weight corrections of stars with these labels."""
        th = np.clip(5040.0 / np.asarray(teff, dtype=np.float64), *self.theta_range) - THETA_PIVOT
        lg = np.clip(np.asarray(logg, dtype=np.float64), *self.logg_range) - LOGG_PIVOT
        return self.a[None, :] + th[:, None] * self.b[None, :] + lg[:, None] * self.c[None, :]


#: Pivots of the calibration's slopes (a G dwarf: theta 0.9 = 5600 K, logg 4.0).
THETA_PIVOT = 0.9
LOGG_PIVOT = 4.0
#: Whether the shipped strength calibration is applied (:func:`strength_override` sets a trial
#: one, or None for the uncalibrated model, for one block of code).
USE_STRENGTH_CALIBRATION = True
_OVERRIDE: list[StrengthCalibration | None] = []


def template_signature(ts: TemplateSet) -> np.ndarray:
    """(K, 4) float array identifying the template rows (kind, alpha, ion, excitation): a shipped
    calibration applies only to the templates it was fitted for."""
    return np.stack([ts.kind, ts.alpha, ts.ion, np.round(ts.chi_exc, 3)], axis=1).astype(np.float64)


def calibration_file() -> dict[str, np.ndarray] | None:
    """The arrays of the shipped ``calibration.npz`` (survey calibration, line strengths, SED
    correction), or None without the file. Read once per version of the file: the cache is keyed
    by its path and modification time, so a file rewritten by tools/make_example_data.py is read
    again."""
    import os

    path = _data_path("calibration.npz")
    if not path.is_file():
        return None
    try:
        mtime = os.stat(str(path)).st_mtime_ns
    except OSError:  # not a plain file on disk (a zipped install): its content cannot change
        mtime = None
    return _read_npz(path, str(path), mtime)


@lru_cache(maxsize=2)
def _read_npz(path: Any, key: str, mtime: int | None) -> dict[str, np.ndarray]:
    with path.open("rb") as fh:
        z = np.load(fh)
        return {k: z[k] for k in z.files}


@lru_cache(maxsize=1)
def _shipped_strength() -> StrengthCalibration | None:
    z = calibration_file()
    if z is None or "strength_a" not in z:
        return None
    sig = z["strength_signature"]
    if sig.shape != template_signature(build_templates()).shape or not np.allclose(
            sig, template_signature(build_templates())):
        from stxcli.errors import StxError

        raise StxError("the shipped strength calibration (data/simulate/calibration.npz) was fitted for other "
                       "opacity templates: rerun python tools/make_example_data.py")
    return StrengthCalibration(
        a=z["strength_a"].astype(float), b=z["strength_b"].astype(float), c=z["strength_c"].astype(float),
        theta_range=tuple(float(v) for v in z["strength_theta_range"]),
        logg_range=tuple(float(v) for v in z["strength_logg_range"]),
        r_scale=float(z["strength_r_scale"]), t_surface=float(z["strength_t_surface"]))


def strength_calibration() -> StrengthCalibration | None:
    """The strength calibration in force: a trial one (:func:`strength_override`), the shipped
    one, or None (switched off or not shipped)."""
    if _OVERRIDE:
        return _OVERRIDE[-1]
    return _shipped_strength() if USE_STRENGTH_CALIBRATION else None


class strength_override:
    """Context manager: synthesise with ``cal`` (None = uncalibrated) instead of the shipped
    strength calibration."""

    def __init__(self, cal: StrengthCalibration | None) -> None:
        self.cal = cal

    def __enter__(self) -> StrengthCalibration | None:
        _OVERRIDE.append(self.cal)
        return self.cal

    def __exit__(self, *exc: object) -> None:
        _OVERRIDE.pop()


# ----------------------------------------------------------------------------------- spectrum


def planck(teff: np.ndarray, wave: np.ndarray) -> np.ndarray:
    """B_lambda(Teff) normalised to 1 at 5500 A, (n, npix) float32."""
    teff = np.atleast_1d(np.asarray(teff, dtype=np.float64))
    c2 = 1.4387769e8
    inv_w = (c2 / wave).astype(np.float32)
    shape = ((5500.0 / wave) ** 5).astype(np.float32)
    scale = np.expm1(c2 / (5500.0 * teff))
    x = np.multiply.outer((1.0 / teff).astype(np.float32), inv_w)
    np.expm1(x, out=x)
    np.divide(shape[None, :], x, out=x)
    x *= scale.astype(np.float32)[:, None]
    return x


#: Whether :func:`continuum` applies the empirical SED correction (the calibration tool turns it
#: off while it measures the correction).
USE_SED_CORRECTION = True


@lru_cache(maxsize=1)
def _sed_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(log10 Teff nodes, wavelength nodes, log10 correction (n_teff, n_wave) of the calibrated
    line model, the same of the uncalibrated one) or None. Each correction was measured with its
    own line model (line blanketing moves the smoothed flux); a file without the second one
    uses the first for both."""
    z = calibration_file()
    if z is None or "sed_logteff" not in z:
        return None
    lc = z["sed_logcorr"].astype(float)
    lc0 = z["sed_logcorr_uncalibrated"].astype(float) if "sed_logcorr_uncalibrated" in z else lc
    return z["sed_logteff"].astype(float), z["sed_wave"].astype(float), lc, lc0


#: The continuum is evaluated on nodes every 50 A and interpolated linearly in log flux (the
#: Planck curve is smooth: the interpolation error is below 1e-3 at 3500 K).
_CONT_NODES = np.arange(3400.0, 10201.0, 50.0)


@lru_cache(maxsize=8)
def _node_interp(wave_key: tuple[float, float, int]) -> np.ndarray:
    """(n_nodes, npix) float32 linear-interpolation matrix from the continuum nodes to a grid."""
    wave = _GRIDS[wave_key]
    lw = _CONT_NODES
    j = np.clip(np.searchsorted(lw, wave) - 1, 0, lw.size - 2)
    u = np.clip((wave - lw[j]) / (lw[j + 1] - lw[j]), 0.0, 1.0)
    m = np.zeros((lw.size, wave.size), dtype=np.float32)
    cols = np.arange(wave.size)
    m[j, cols] = 1.0 - u
    m[j + 1, cols] += u
    return m


_GRIDS: dict[tuple[float, float, int], np.ndarray] = {}


def _grid_key(wave: np.ndarray) -> tuple[float, float, int]:
    key = (float(wave[0]), float(wave[-1]), int(wave.size))
    _GRIDS.setdefault(key, np.array(wave, dtype=np.float64))
    return key


def sed_correction_nodes(teff: np.ndarray) -> np.ndarray:
    """log10 of the empirical continuum correction on :data:`_CONT_NODES`, (n, n_nodes): the
    median ratio of smoothed real MILES to smoothed simulated spectra per Teff node, 0 at
    5500 A, flat outside the MILES range (the one measured with the line model in force:
    calibrated or not); zeros when switched off or not shipped."""
    teff = np.atleast_1d(np.asarray(teff, dtype=np.float64))
    table = _sed_table() if USE_SED_CORRECTION else None
    if table is None:
        return np.zeros((teff.size, _CONT_NODES.size))
    lt, lw, lc, lc0 = table
    if strength_calibration() is None:
        lc = lc0
    x = np.clip(np.log10(teff), lt[0], lt[-1])
    i = np.clip(np.searchsorted(lt, x) - 1, 0, lt.size - 2)
    t = ((x - lt[i]) / (lt[i + 1] - lt[i]))[:, None]
    nodes = lc[i] * (1.0 - t) + lc[i + 1] * t  # (n, len(lw))
    j = np.clip(np.searchsorted(lw, _CONT_NODES) - 1, 0, lw.size - 2)
    u = np.clip((_CONT_NODES - lw[j]) / (lw[j + 1] - lw[j]), 0.0, 1.0)
    return nodes[:, j] * (1.0 - u) + nodes[:, j + 1] * u


def continuum(teff: np.ndarray, wave: np.ndarray | None = None) -> np.ndarray:
    """The stellar continuum (n, npix) float32: Planck times the empirical SED correction,
    normalised to 1 at 5500 A (before the correction, which is 1 there too)."""
    wave = hires_grid().wave if wave is None else wave
    teff = np.atleast_1d(np.asarray(teff, dtype=np.float64))
    w = _CONT_NODES
    c2 = 1.4387769e8
    log_b = 5.0 * np.log(5500.0 / w)[None, :] + np.log(np.expm1(c2 / (5500.0 * teff)))[:, None] \
        - np.log(np.expm1(c2 / np.outer(teff, w)))
    log_c = (log_b + np.log(10.0) * sed_correction_nodes(teff)).astype(np.float32)
    out = log_c @ _node_interp(_grid_key(wave))
    np.exp(out, out=out)
    return out


def doppler_ratio(teff: np.ndarray, logg: np.ndarray) -> np.ndarray:
    """``r = b sqrt(pi) / pixel`` per star: thermal width of a mass-50 atom at T_LINE * Teff and
    a microturbulence growing towards low gravity and high Teff (~1 km/s in the Sun, ~2 km/s in
    red giants)."""
    teff = np.atleast_1d(np.asarray(teff, dtype=np.float64))
    logg = np.atleast_1d(np.asarray(logg, dtype=np.float64))
    v_th2 = 2.0 * 1.380649e-16 * 0.9 * teff / (50.0 * 1.6605e-24) / 1e10  # (km/s)^2
    xi = np.clip(1.0 + 0.35 * (4.44 - logg) + 3e-4 * (teff - 5777.0), 0.6, 3.0)
    b = np.sqrt(v_th2 + xi * xi)
    pixel_kms = 299792.458 * np.log(10.0) * LOG_STEP
    cal = strength_calibration()
    scale = 1.0 if cal is None else cal.r_scale
    return (scale * b * np.sqrt(np.pi) / pixel_kms).astype(np.float32)


#: Closed form of the Gaussian-profile curve of growth F(x) = W / (b sqrt(pi)) for a line of
#: central optical depth x (4 % accuracy from x = 1e-3 to 1e6; fitted to the exact integral).
_COG = (364.78, 2.2616, 0.70200)


def line_absorption(tau_l: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Pixel absorption ``min(1, r F(tau / r))`` (in place on ``tau_l``)."""
    a, b, c = _COG
    inv_r = (1.0 / r).astype(np.float32)[:, None]
    x = tau_l
    x *= inv_r  # x = tau / r
    den = x * np.float32(1.0 / a)
    den += np.float32(1.0)
    np.log(den, out=den)
    np.sqrt(den, out=den)
    den *= np.float32(c)
    den += np.float32(b)  # den = b + c sqrt(ln(1 + x/a))
    np.divide(x, den, out=den)
    den += np.float32(1.0)
    np.divide(x, den, out=x)  # F
    x /= inv_r
    np.minimum(x, np.float32(1.0), out=x)
    return x


def synthesize(teff, logg, feh, alpha_fe, *, normalized: bool = False) -> np.ndarray:
    """High-resolution rest-frame flux (n, npix) float32 on :func:`hires_grid`.

    ``normalized=True`` returns the line spectrum ``F / B_lambda`` (continuum 1)."""
    ts = build_templates()
    w = weights(teff, logg, feh, alpha_fe, ts)
    return flux_from_weights(w, teff, doppler_ratio(teff, logg), ts, normalized=normalized)


#: The core residual varies slowly with wavelength: it is evaluated once per CORE_STEP pixels
#: (3.2e-4 dex, 0.07 %) and held constant over them (changes < 2e-4 between steps).
CORE_STEP = 16


@lru_cache(maxsize=1)
def _core_nodes() -> np.ndarray:
    """Mean wavelength of each run of CORE_STEP high-resolution pixels (the last run may be shorter)."""
    w = hires_grid().wave
    n_full = w.size // CORE_STEP * CORE_STEP
    nodes = w[:n_full].reshape(-1, CORE_STEP).mean(axis=1)
    return np.concatenate([nodes, [w[n_full:].mean()]]) if n_full < w.size else nodes


def core_residual(teff: np.ndarray, t_surface: float, wave: np.ndarray | None = None) -> np.ndarray:
    """Residual flux of a saturated line core, ``B_lambda(t_surface Teff) / B_lambda(Teff)``
    (Eddington-Barbier with the surface temperature of the photosphere), float32: at ``wave``,
    or by default on the core nodes (n, n_nodes) (see :func:`expand_core`)."""
    wave = _core_nodes() if wave is None else np.asarray(wave, dtype=np.float64)
    x = np.multiply.outer(1.0 / np.atleast_1d(np.asarray(teff, dtype=np.float64)), 1.4387769e8 / wave)
    return (np.expm1(x) / np.expm1(x / t_surface)).astype(np.float32)


def expand_core(core: np.ndarray) -> np.ndarray:
    """Core residuals on the nodes (n, n_nodes) -> every high-resolution pixel (n, npix)."""
    npix = hires_grid().npix
    counts = np.full(core.shape[1], CORE_STEP)
    counts[-1] = npix - CORE_STEP * (core.shape[1] - 1)
    return np.repeat(core, counts, axis=1)


def _apply_core(s_: np.ndarray, core: np.ndarray) -> None:
    """In place ``s = r + (1 - r) s`` with ``r`` on the core nodes, broadcast over each run."""
    b, npix = s_.shape
    n_full = npix // CORE_STEP * CORE_STEP
    m = n_full // CORE_STEP
    main = s_[:, :n_full].reshape(b, m, CORE_STEP)  # a view: the runs of each row
    main *= (1.0 - core[:, :m])[:, :, None]
    main += core[:, :m, None]
    if n_full < npix:
        tail = s_[:, n_full:]
        tail *= (1.0 - core[:, m:])
        tail += core[:, m:]


def flux_from_weights(w: np.ndarray, teff: np.ndarray, r: np.ndarray, ts: TemplateSet | None = None, *,
                      normalized: bool = False, block: int = 8) -> np.ndarray:
    """Flux from template weights ``w`` (n, K) and curve-of-growth ratios ``r`` (n,).

    The two matrix products run on all rows at once; the element-wise steps run on blocks of
    ``block`` rows that stay in the CPU cache."""
    ts = ts or build_templates()
    k = ts.n_line
    w = np.asarray(w, dtype=np.float32)
    tau_l = w[:, :k] @ ts.templates[:k]
    tau_s = w[:, k:] @ ts.templates[k:]
    # the Jacobian rows share Teff: one continuum (and core residual) per distinct Teff
    t_u, inv = np.unique(np.atleast_1d(np.asarray(teff, dtype=np.float64)), return_inverse=True)
    cont = None if normalized else continuum(t_u)
    cal = strength_calibration()
    core = None if cal is None else core_residual(t_u, cal.t_surface)
    one = np.float32(1.0)
    for i in range(0, tau_l.shape[0], block):
        sl = slice(i, i + block)
        a = line_absorption(tau_l[sl], np.asarray(r)[sl])  # in place on tau_l
        np.subtract(one, a, out=a)
        s_ = tau_s[sl]
        np.negative(s_, out=s_)
        np.exp(s_, out=s_)
        s_ *= a  # s = exp(-tau_s) (1 - A): the line spectrum without a core floor
        if core is None:
            s_ *= np.float32(1.0 - R_CORE)
            s_ += np.float32(R_CORE)
        else:
            _apply_core(s_, core[inv[sl]])
        if cont is not None:
            s_ *= cont[inv[sl]]
    return tau_s
