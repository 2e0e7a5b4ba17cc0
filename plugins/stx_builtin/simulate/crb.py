"""Cramer-Rao bounds of the labels from the Fisher information of each simulated spectrum.

For every star the simulator evaluates the noiseless observed spectrum at its labels and at one
forward step in each label (:data:`STEPS`): the same synthesis, RV shift, LSF, resampling,
extinction, calibration distortion and telluric absorption as the written spectrum. The finite
differences give the Jacobian ``J`` (labels x pixels) in file flux units. The design matrix adds,
per arm, the multiplicative nuisance terms ``f * P_k(lambda)`` (Legendre polynomials: the overall
scale and the calibration distortion are unknown to anyone fitting the spectrum). With the
spectrum's ivar (0 on masked pixels)::

    F = D^T diag(ivar) D,   CRB(label) = sqrt((F^-1)[label, label])

(the bound for an unbiased estimator that also fits the nuisance terms). The radial velocity is
taken as known. Columns are scaled to unit diagonal before inversion; nuisance terms of an arm without usable
pixels are left out, and a label without information gets NaN.
"""

from __future__ import annotations

import numpy as np

LABELS = ("teff", "logg", "feh", "alpha_fe")
STEPS = {"teff": 25.0, "logg": 0.03, "feh": 0.03, "alpha_fe": 0.03}
#: Rows per star in the stacked evaluation: the labels, then one step in each label.
GROUP = 1 + len(LABELS)


def stack_perturbed(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray, alpha_fe: np.ndarray) -> tuple[np.ndarray, ...]:
    """Label arrays of length ``GROUP * n``: per star the labels, then +step in each label."""
    base = np.stack([teff, logg, feh, alpha_fe], axis=1).astype(np.float64)  # (n, 4)
    rows = np.repeat(base[:, None, :], GROUP, axis=1)  # (n, GROUP, 4)
    for j, lab in enumerate(LABELS):
        rows[:, 1 + j, j] += STEPS[lab]
    flat = rows.reshape(-1, 4)
    return flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3]


def split_jacobian(stacked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(GROUP n, npix) noiseless rows -> nominal (n, npix) and Jacobian (n, 4, npix)."""
    m, npix = stacked.shape
    g = stacked.reshape(m // GROUP, GROUP, npix)
    nominal = g[:, 0]
    steps = np.array([STEPS[lab] for lab in LABELS], dtype=np.float64)
    jac = (g[:, 1:].astype(np.float64) - nominal[:, None, :]) / steps[None, :, None]
    return np.ascontiguousarray(nominal), jac


def cramer_rao(jac: list[np.ndarray], ivar: list[np.ndarray], nominal: list[np.ndarray],
               nuisance: list[np.ndarray]) -> np.ndarray:
    """Per star the (4,) Cramer-Rao bounds; inputs are per arm: Jacobian (n, 4, npix) and
    nominal flux (n, npix) in file units, ivar (n, npix), nuisance basis (k, npix)."""
    n = jac[0].shape[0]
    n_lab = len(LABELS)
    n_nui = sum(b.shape[0] for b in nuisance)
    p = n_lab + n_nui
    fisher = np.zeros((n, p, p))
    col = n_lab
    for j, iv, f0, basis in zip(jac, ivar, nominal, nuisance):
        iv = iv.astype(np.float64)
        nb = basis.shape[0]
        nui = f0[:, None, :].astype(np.float64) * basis[None, :, :]  # (n, nb, npix)
        d = np.concatenate([j, nui], axis=1)  # (n, 4 + nb, npix)
        block = np.einsum("nak,nk,nbk->nab", d, iv, d, optimize=True)
        idx = list(range(n_lab)) + list(range(col, col + nb))
        fisher[np.ix_(np.arange(n), idx, idx)] += block
        col += nb
    out = np.full((n, n_lab), np.nan)
    diag = np.einsum("nii->ni", fisher).copy()
    # parameters without information (an arm with no usable pixel) decouple: unit diagonal
    empty = ~(diag > 0)
    idx = np.arange(p)
    fisher[:, idx, idx] = np.where(empty, 1.0, diag)
    scale = 1.0 / np.sqrt(np.einsum("nii->ni", fisher))
    fs = fisher * scale[:, :, None] * scale[:, None, :]
    try:
        inv = np.linalg.inv(fs)
    except np.linalg.LinAlgError:
        inv = np.linalg.pinv(fs)
    var = np.einsum("nii->ni", inv)[:, :n_lab] * scale[:, :n_lab] ** 2
    good = (var > 0) & ~empty[:, :n_lab] & np.isfinite(var)
    out[good] = np.sqrt(var[good])
    return out
