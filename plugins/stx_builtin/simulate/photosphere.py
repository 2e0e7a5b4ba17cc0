"""A one-point photosphere per star: gas and electron pressure, continuous opacity, ionisation.

Everything the line strengths need is evaluated at one representative layer (temperature
``T = T_LINE * Teff``, continuum optical depth ``TAU_REF``), vectorised over stars:

* Saha ionisation ``N_II / N_I = Phi(T) / Pe`` with ``Phi = (U_II/U_I) 0.6666 T**2.5 10**(-theta chi)``
  (Pe in dyn cm^-2; Gray, *Stellar Photospheres*, eq. 1.22), theta = 5040 / T;
* continuous opacity at 5000 A per hydrogen nucleus: H- bound-free (``N(H-)/N(H I) = 0.75 Pe
  T**-2.5 10**(0.754 theta)`` times 3.5e-17 cm^2), hydrogen bound-free from n = 3..8 (Kramers
  cross-sections, Boltzmann populations, stimulated emission) and Thomson scattering;
* hydrostatic equilibrium ``Pg = TAU_REF g / kappa`` and charge conservation (H plus the main
  metal donors, scaled by [Fe/H] and [alpha/Fe]) solved together by a damped fixed point in
  ``log Pg`` around a bisection in ``log Pe``.

Logg enters the spectrum only through ``Pe`` and ``Pg`` (ionisation balance, H- opacity, pressure
broadening), as in real photospheres. The layer is a deliberate simplification: no temperature
gradient, no H2 or CO. It reproduces the known trends (solar Pe ~ 10-100 dyn cm^-2, hydrogen
ionised above ~10^4 K, H- giving way to H bound-free near 8000 K).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .atoms import DONORS, ELEMENTS, HE_H

K_B = 1.380649e-16  # erg / K
M_H = 1.6735e-24  # g
#: Temperature of the line-forming layer relative to Teff.
T_LINE = 0.9
#: Continuum optical depth of the layer.
TAU_REF = 0.5
_SIGMA_HMINUS = 3.5e-17  # cm^2, H- bound-free near 5000 A
_SIGMA_THOMSON = 6.652e-25
_LAMBDA_REF = 5000.0
_CHI_H = ELEMENTS["H"][2]
_MEAN_MASS = (1.0 + 4.0 * HE_H) * M_H * 1.02  # g per H nucleus (metals add ~2 %)
_N_ITER = 16
_N_NEWTON = 2


def saha_phi(t: np.ndarray, chi: float | np.ndarray, u_ratio: float | np.ndarray) -> np.ndarray:
    """``N_II / N_I * Pe`` (dyn cm^-2) for ionisation potential ``chi`` (eV)."""
    theta = 5040.0 / t
    return u_ratio * 0.6666 * t**2.5 * 10.0 ** (-theta * chi)


def hminus_per_hi(t: np.ndarray, pe: np.ndarray) -> np.ndarray:
    theta = 5040.0 / t
    return 0.75 * pe * t**-2.5 * 10.0 ** (0.754 * theta)


def hbf_per_hi(t: np.ndarray, lam: float = _LAMBDA_REF) -> np.ndarray:
    """Hydrogen bound-free cross-section per neutral H atom at ``lam`` (levels n = 3..8 that can
    absorb there), with the stimulated-emission factor."""
    theta = 5040.0 / t
    out = np.zeros_like(t)
    for n in range(2, 9):
        if lam > 911.76 * n * n:
            continue
        chi_n = _CHI_H * (1.0 - 1.0 / n**2)
        pop = n * n * 10.0 ** (-theta * chi_n) / 2.0
        out += pop * 1.044e-26 * lam**3 / n**5
    return out * (1.0 - 10.0 ** (-theta * 12398.4 / lam))


@dataclass
class Layer:
    """The line-forming layer of ``n`` stars (arrays of length n)."""

    t: np.ndarray  # K
    pe: np.ndarray  # dyn cm^-2
    pg: np.ndarray  # dyn cm^-2
    f_hi: np.ndarray  # neutral fraction of hydrogen
    kappa: np.ndarray  # continuous opacity per H nucleus at 5000 A (cm^2)
    ne: np.ndarray  # electron density (cm^-3)

    @property
    def theta(self) -> np.ndarray:
        return 5040.0 / self.t


_DONOR_A = np.array([10.0 ** (d[0] - 12.0) for d in DONORS])
_DONOR_CHI = np.array([d[1] for d in DONORS])
_DONOR_U = np.array([d[2] for d in DONORS])
_DONOR_ALPHA = np.array([d[3] for d in DONORS])


def _donor_terms(t: np.ndarray, ms: np.ndarray, als: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Abundances (n, D) and Saha factors (n, D) of H (column 0) and the metal donors."""
    phi = np.concatenate([saha_phi(t, _CHI_H, 0.5)[:, None],
                          saha_phi(t[:, None], _DONOR_CHI[None, :], _DONOR_U[None, :])], axis=1)
    ab = np.concatenate([np.ones((t.size, 1)),
                         _DONOR_A[None, :] * np.where(_DONOR_ALPHA[None, :], als[:, None], ms[:, None])], axis=1)
    return ab, phi


def _solve_pe(pg: np.ndarray, ab: np.ndarray, phi: np.ndarray, pe0: np.ndarray | None = None) -> np.ndarray:
    """Charge conservation ``Pe = Pg n_e / (1 + He + n_e)`` (n_e per H nucleus) by Newton
    iterations in ``log Pe`` (the residual is monotonic in Pe)."""
    lpe = np.log(pe0) if pe0 is not None else np.log(np.sqrt(pg) * 1e-2)
    lpg = np.log(pg)
    for _ in range(_N_NEWTON):
        pe = np.exp(lpe)
        x = phi / (pe[:, None] + phi)
        ne = (ab * x).sum(axis=1)
        dne = -(ab * x * (1.0 - x)).sum(axis=1)  # d ne / d ln Pe
        # g(lpe) = lpe - ln Pg - ln ne + ln(1 + He + ne) = 0
        g = lpe - lpg - np.log(ne) + np.log(1.0 + HE_H + ne)
        dg = 1.0 - dne / ne + dne / (1.0 + HE_H + ne)
        lpe = np.minimum(lpe - np.clip(g / dg, -3.0, 3.0), lpg)
    return np.exp(lpe)


def kappa_per_h(t: np.ndarray, pe: np.ndarray, pg: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Continuous opacity per H nucleus (cm^2) at 5000 A, the neutral H fraction and n_e."""
    phi_h = saha_phi(t, _CHI_H, 0.5)
    f_hi = pe / (pe + phi_h)
    n_tot = pg / (K_B * t)
    ne = pe / (K_B * t)
    n_h = (n_tot - ne) / (1.0 + HE_H)
    kap = f_hi * (_SIGMA_HMINUS * hminus_per_hi(t, pe) + hbf_per_hi(t)) + _SIGMA_THOMSON * ne / n_h
    return kap, f_hi, ne


def solve_layer(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray, alpha_fe: np.ndarray,
                t_factor: float = T_LINE) -> Layer:
    """Pressures, opacity and ionisation of the layer at ``T = t_factor * Teff`` of each star
    (metal lines form near ``T_LINE * Teff``; the hydrogen wings deeper, near ``Teff``)."""
    teff, logg, feh, alpha_fe = (np.asarray(a, dtype=np.float64) for a in (teff, logg, feh, alpha_fe))
    t = t_factor * teff
    g = 10.0**logg
    ab, phi = _donor_terms(t, 10.0**feh, 10.0 ** (feh + alpha_fe))
    log_pg = np.log10(1.0e5 * (g / 2.74e4) ** 0.6)
    pe = None
    for _ in range(_N_ITER):
        pg = 10.0**log_pg
        pe = _solve_pe(pg, ab, phi, pe)
        kap, _, _ = kappa_per_h(t, pe, pg)
        target = np.log10(TAU_REF * g * _MEAN_MASS / kap)
        log_pg = 0.5 * (log_pg + np.clip(target, -2.0, 9.0))
    pg = 10.0**log_pg
    pe = _solve_pe(pg, ab, phi, pe)
    kap, f_hi, ne = kappa_per_h(t, pe, pg)
    return Layer(t=t, pe=pe, pg=pg, f_hi=f_hi, kappa=kap, ne=ne)


def neutral_fraction(layer: Layer, chi_ion: float, u_ratio: float) -> np.ndarray:
    """Fraction of an element in the neutral stage (two stages)."""
    phi = saha_phi(layer.t, chi_ion, u_ratio)
    return layer.pe / (layer.pe + phi)
