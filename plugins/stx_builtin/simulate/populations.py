"""Stellar populations: labels of a Galactic mix of thin disk, thick disk and halo stars.

Each star is drawn independently from its own counter-based random numbers (:mod:`.rng`), so
star ``i`` is the same whatever the sample size.

Components (metallicity distribution, [alpha/Fe] sequence, ages, radial-velocity dispersion):

=========  =====================  ==================================  ==========  ========
component  [Fe/H]                 [alpha/Fe]                          age (Gyr)   sigma_RV
=========  =====================  ==================================  ==========  ========
thin       N(-0.05, 0.22)          0.0 .. +0.10 (low-alpha sequence)  1-10        25 km/s
thick      N(-0.55, 0.28)          +0.30 below [Fe/H] = -1 -> ~0.05   9-12        50 km/s
halo       N(-1.55, 0.50)          +0.30 (+0.10 scatter)              11-13       120 km/s
=========  =====================  ==================================  ==========  ========

Evolutionary phases follow isochrone-like Teff-logg sequences that move with metallicity and
age: main sequence up to an age- and metallicity-dependent turn-off (``T_TO = 6000 - 250 [Fe/H]
+ 180 (10 - age)``), subgiant branch, red giant branch (``Teff = 4700 + 330 (logg - 2.5)
- 60 (logg - 2.5)^2 - 200 [Fe/H]``, hotter when metal-poor), red clump for [Fe/H] > -0.8 and a
horizontal branch (5400-7500 K) for metal-poor stars. The survey mixes differ on purpose:
LAMOST-like is disk-dominated (3 % halo), DESI-like (fainter, higher latitude) has 25 % halo.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stxcli.errors import UsageError

from . import rng

COMPONENTS = ("thin", "thick", "halo")
PHASES = ("ms", "sgb", "rgb", "clump")

MIXES: dict[str, dict[str, float]] = {
    "lamost": {"thin": 0.80, "thick": 0.17, "halo": 0.03},
    "desi": {"thin": 0.45, "thick": 0.30, "halo": 0.25},
}
#: Fractions of main sequence, subgiants, red giants, clump/HB stars per survey.
PHASE_MIX: dict[str, tuple[float, float, float, float]] = {
    "lamost": (0.58, 0.10, 0.22, 0.10),
    "desi": (0.55, 0.10, 0.25, 0.10),
}
_FEH = {"thin": (-0.05, 0.22, -1.3, 0.55), "thick": (-0.55, 0.28, -2.0, 0.3), "halo": (-1.55, 0.50, -3.8, -0.3)}
_AGE = {"thin": (1.0, 10.0), "thick": (9.0, 12.0), "halo": (11.0, 13.0)}
_SIGMA_RV = {"thin": 25.0, "thick": 50.0, "halo": 120.0}


@dataclass
class Population:
    """Labels of ``n`` stars (arrays of length n)."""

    index: np.ndarray  # int64 star index in the run
    teff: np.ndarray
    logg: np.ndarray
    feh: np.ndarray
    alpha_fe: np.ndarray
    component: np.ndarray  # int: index into COMPONENTS
    phase: np.ndarray  # int: index into PHASES
    rv_kms: np.ndarray

    @property
    def n(self) -> int:
        return int(self.index.size)


def parse_mix(spec: str) -> dict[str, float]:
    """``lamost``, ``desi`` or ``thin=0.6,thick=0.3,halo=0.1`` (normalised to 1)."""
    spec = spec.strip().lower()
    if spec in MIXES:
        return dict(MIXES[spec])
    out = {c: 0.0 for c in COMPONENTS}
    try:
        for part in spec.split(","):
            key, val = part.split("=")
            key = key.strip()
            if key not in out:
                raise ValueError(key)
            out[key] = float(val)
    except ValueError:
        raise UsageError(
            f"--mix {spec!r}: expected 'lamost', 'desi' or weights like 'thin=0.6,thick=0.3,halo=0.1'"
        ) from None
    total = sum(out.values())
    if total <= 0 or any(v < 0 for v in out.values()):
        raise UsageError(f"--mix {spec!r}: weights must be >= 0 and not all 0")
    return {k: v / total for k, v in out.items()}


def logg_main_sequence(teff: np.ndarray) -> np.ndarray:
    """Zero-age main-sequence log g as a function of Teff."""
    nodes_t = np.array([3000.0, 3500, 4000, 4500, 5000, 5500, 5800, 6200, 6800, 7500, 9000, 12000, 20000])
    nodes_g = np.array([5.00, 4.85, 4.70, 4.62, 4.57, 4.50, 4.44, 4.32, 4.20, 4.12, 4.05, 4.05, 4.00])
    return np.interp(teff, nodes_t, nodes_g)


def teff_rgb(logg: np.ndarray, feh: np.ndarray) -> np.ndarray:
    x = logg - 2.5
    return 4700.0 + 330.0 * x - 60.0 * x * x - 200.0 * feh


def sample(n: int, seed: int, *, mix: dict[str, float], phases: tuple[float, float, float, float],
           teff_range: tuple[float, float] = (3500.0, 7500.0), start: int = 0) -> Population:
    """Labels of stars ``start .. start + n - 1`` of a run with this seed."""
    idx = np.arange(start, start + n, dtype=np.int64)
    u = rng.uniform(seed, rng.LABELS, idx, 12)
    z = rng.normal(seed, rng.LABELS + 100, idx, 6)
    tmin, tmax = teff_range
    # component and phase
    cum = np.cumsum([mix.get(c, 0.0) for c in COMPONENTS])
    comp = np.minimum(np.searchsorted(cum / cum[-1], u[:, 0], side="right"), 2)
    pcum = np.cumsum(phases)
    phase = np.minimum(np.searchsorted(pcum / pcum[-1], u[:, 1], side="right"), 3)

    mu = np.array([_FEH[c][0] for c in COMPONENTS])[comp]
    sd = np.array([_FEH[c][1] for c in COMPONENTS])[comp]
    lo = np.array([_FEH[c][2] for c in COMPONENTS])[comp]
    hi = np.array([_FEH[c][3] for c in COMPONENTS])[comp]
    feh = np.clip(mu + sd * z[:, 0], lo, hi)

    alpha = np.where(comp == 0, np.clip(-0.10 * feh, 0.0, 0.10),
                     np.where(comp == 1, np.clip(0.05 - 0.25 * feh, 0.05, 0.30), 0.30))
    alpha = alpha + np.where(comp == 2, 0.10, 0.03) * z[:, 1]
    alpha = np.clip(alpha, -0.2, 0.6)

    a_lo = np.array([_AGE[c][0] for c in COMPONENTS])[comp]
    a_hi = np.array([_AGE[c][1] for c in COMPONENTS])[comp]
    age = a_lo + (a_hi - a_lo) * u[:, 2]
    t_to = np.clip(6000.0 - 250.0 * feh + 180.0 * (10.0 - age), 5600.0, 7800.0)

    teff = np.empty(n)
    logg = np.empty(n)
    # main sequence: Teff skewed towards the turn-off (magnitude-limited samples favour F/G)
    ms = phase == 0
    top = np.maximum(np.minimum(t_to, tmax), tmin + 1.0)
    teff_ms = tmin + (top - tmin) * u[:, 3] ** 0.6
    evol = u[:, 4] ** 3 * np.clip((teff_ms - 5000.0) / (top - 5000.0 + 1.0), 0.0, 1.0)
    teff[ms] = teff_ms[ms]
    logg[ms] = (logg_main_sequence(teff_ms) - 0.35 * evol + 0.05 * z[:, 2])[ms]
    # subgiants: from the turn-off (logg 4.0) to the base of the giant branch (logg 3.6)
    sg = phase == 1
    base = teff_rgb(np.full(n, 3.6), feh)
    f = u[:, 5]
    teff[sg] = (t_to - (t_to - base) * f)[sg]
    logg[sg] = (4.0 - 0.4 * f + 0.06 * z[:, 2])[sg]
    # red giant branch: more stars at low luminosity
    rg = phase == 2
    lg = 3.6 - 2.9 * u[:, 6] ** 1.6
    teff[rg] = (teff_rgb(lg, feh) + 60.0 * z[:, 3])[rg]
    logg[rg] = lg[rg]
    # red clump (metal-rich) or horizontal branch (metal-poor)
    cl = phase == 3
    rc = feh > -0.8
    t_clump = 4650.0 - 150.0 * feh + 80.0 * z[:, 3]
    t_hb = 5400.0 + 2100.0 * u[:, 7]
    teff[cl] = np.where(rc, t_clump, t_hb)[cl]
    logg[cl] = np.where(rc, 2.45 + 0.12 * z[:, 2], 2.5 + 0.3 * (t_hb - 5400.0) / 2100.0 + 0.1 * z[:, 2])[cl]

    teff = np.clip(teff, tmin, tmax)
    logg = np.clip(logg, 0.0, 5.2)
    sig = np.array([_SIGMA_RV[c] for c in COMPONENTS])[comp]
    rv = -10.0 + sig * z[:, 4]
    return Population(index=idx, teff=teff, logg=logg, feh=feh, alpha_fe=alpha,
                      component=comp.astype(np.int8), phase=phase.astype(np.int8), rv_kms=rv)
