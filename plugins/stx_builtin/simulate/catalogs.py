"""Truth catalog and survey "catalog labels" with realistic systematics.

* ``truth.fits``: the labels used to simulate each spectrum, its SNR, radial velocity and the
  Cramer-Rao bound of every label (:mod:`.crb`), plus provenance (component, phase, file, row).
* ``labels.fits``: what a survey pipeline would publish for these stars:

  - **LAMOST-like** (pipeline labels): Teff zero-point offset +50 K, an [Fe/H] bias growing below
    [Fe/H] = -1 (+0.15 dex per dex: LASP-like pipelines overestimate metal-poor stars), a small
    log g offset for giants, and scatter ``sqrt(floor^2 + (k / SNR)^2)`` (floor 50 K, 0.10, 0.06,
    0.05 dex; k = 2000 K, 3, 2, 1.5);
  - **DESI-like** (fine-tuning labels "from a high-resolution survey"): no bias, scatter 30 K,
    0.05, 0.03, 0.03 dex.

Both share the columns ``id, teff, logg, feh, alpha_fe`` (+ ``*_err``, ``snr``) with ``id`` equal to
the id stx's reader gives the spectrum (OBSID as text for LAMOST, TARGETID as text for DESI).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stxcli.io import atomic_file

from . import rng

LABEL_COLUMNS = ("teff", "logg", "feh", "alpha_fe")

#: survey -> per label (bias function, scatter floor, scatter per 1/SNR)
SYSTEMATICS = {
    "lamost": {"floor": (50.0, 0.10, 0.06, 0.05), "k_snr": (2000.0, 3.0, 2.0, 1.5)},
    "desi": {"floor": (30.0, 0.05, 0.03, 0.03), "k_snr": (0.0, 0.0, 0.0, 0.0)},
}


def survey_bias(survey: str, teff: np.ndarray, logg: np.ndarray, feh: np.ndarray, alpha_fe: np.ndarray) -> np.ndarray:
    """(n, 4) systematic offsets of the survey's catalog labels."""
    n = teff.size
    b = np.zeros((n, 4))
    if survey == "lamost":
        b[:, 0] = 50.0
        b[:, 1] = np.where(logg < 3.5, 0.08, 0.0)
        b[:, 2] = 0.15 * np.clip(-1.0 - feh, 0.0, None) - 0.02
        b[:, 3] = -0.3 * (alpha_fe - 0.1)  # a compressed [alpha/Fe] scale
    return b


def catalog_labels(survey: str, seed: int, index: np.ndarray, truth: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Survey catalog labels of stars ``index`` given their true labels and SNR."""
    sysm = SYSTEMATICS[survey]
    z = rng.normal(seed, rng.CATALOG, index, 4)
    snr = np.maximum(truth["snr"], 1.0)
    bias = survey_bias(survey, truth["teff"], truth["logg"], truth["feh"], truth["alpha_fe"])
    out: dict[str, np.ndarray] = {"id": truth["id"]}
    for j, lab in enumerate(LABEL_COLUMNS):
        sig = np.sqrt(sysm["floor"][j] ** 2 + (sysm["k_snr"][j] / snr) ** 2)
        out[lab] = truth[lab] + bias[:, j] + sig * z[:, j]
        out[f"{lab}_err"] = sig
    out["snr"] = truth["snr"]
    return out


def write_table(path: Path, columns: dict[str, np.ndarray], meta: dict[str, object] | None = None) -> None:
    """Write a FITS binary table atomically (string columns as fixed-width text)."""
    from astropy.io import fits

    cols = []
    for name, arr in columns.items():
        a = np.asarray(arr)
        if a.dtype.kind in "US":
            width = max(1, int(max((len(str(x)) for x in a), default=1)))
            cols.append(fits.Column(name=name, format=f"{width}A", array=a.astype(f"U{width}")))
        elif a.dtype.kind == "b":
            cols.append(fits.Column(name=name, format="L", array=a))
        elif a.dtype.kind in "iu":
            cols.append(fits.Column(name=name, format="K", array=a.astype(np.int64)))
        else:
            cols.append(fits.Column(name=name, format="D", array=a.astype(np.float64)))
    hdu = fits.BinTableHDU.from_columns(cols)
    for k, v in (meta or {}).items():
        hdu.header[k] = v
    with atomic_file(path) as tmp:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp)
