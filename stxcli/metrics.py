"""Accuracy metrics for predicted stellar labels (pure numpy).

Conventions (the same in ``stx evaluate``, ``stx demo`` and the benchmarks):

- residual = predicted - true, per star and label; a star counts for a label when both values are
  finite;
- ``mae``: mean |residual|; ``bias``: median residual; ``scatter``: robust scatter,
  1.4826 x the median absolute deviation of the residuals from their median (equals the standard
  deviation for Gaussian residuals, and ignores outliers);
- ``frac_1sigma`` / ``frac_2sigma``: fraction of stars with |residual| < 1 (2) x the predicted
  uncertainty ``<label>_err`` (calibration: a well-calibrated Gaussian error gives 0.683 / 0.954);
  only stars with a finite, positive uncertainty count (``n_sigma``);
- ``scatter_over_crb``: when the truth carries a Cramer-Rao bound ``<label>_crb`` per star, the
  robust scatter of residual / bound (1 = the model reaches the bound; > 1 = it is that many times
  worse); ``median_crb`` is the median bound of the same stars;
- subsets: ``overall``; ``feh_split`` = ``feh < -1`` (metal-poor) and ``feh >= -1``, split on the
  TRUE [Fe/H] (``None`` when the truth has no ``feh``); ``snr_bins`` = half-open bins
  ``lo <= snr < hi`` with configurable edges (default 0, 10, 20, 40, 80, inf).

Every number in the result is a plain float/int or ``None`` (empty subset, or no uncertainties):
the dict is JSON-safe as is (non-finite values are never emitted; an infinite bin edge is ``None``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: 1 / Phi^-1(0.75): turns a median absolute deviation into a Gaussian standard deviation.
MAD_TO_SIGMA = 1.4826
DEFAULT_SNR_EDGES: tuple[float, ...] = (0.0, 10.0, 20.0, 40.0, 80.0, float("inf"))
#: The metal-poor boundary on the true [Fe/H].
FEH_SPLIT = -1.0
#: Display units of the standard labels; unknown labels have no unit.
UNITS = {"teff": "K", "logg": "dex", "feh": "dex"}
DISPLAY_NAMES = {"teff": "Teff", "logg": "log g", "feh": "[Fe/H]"}

METRIC_KEYS = ("n", "mae", "bias", "scatter", "n_sigma", "frac_1sigma", "frac_2sigma",
               "median_crb", "scatter_over_crb")


def unit(label: str) -> str:
    return UNITS.get(label, "")


def display_name(label: str) -> str:
    return DISPLAY_NAMES.get(label, label)


def _f(x: float | np.floating) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


def mae(residual: np.ndarray) -> float:
    """Mean absolute residual (NaN for an empty array)."""
    r = np.asarray(residual, dtype=np.float64)
    return float(np.mean(np.abs(r))) if r.size else float("nan")


def bias(residual: np.ndarray) -> float:
    """Median residual (NaN for an empty array)."""
    r = np.asarray(residual, dtype=np.float64)
    return float(np.median(r)) if r.size else float("nan")


def robust_scatter(residual: np.ndarray) -> float:
    """1.4826 x median(|r - median(r)|) (NaN for an empty array)."""
    r = np.asarray(residual, dtype=np.float64)
    if not r.size:
        return float("nan")
    return float(MAD_TO_SIGMA * np.median(np.abs(r - np.median(r))))


def within_sigma(residual: np.ndarray, sigma: np.ndarray, k: float) -> float:
    """Fraction of |residual| < k * sigma among entries with a finite, positive sigma
    (NaN when there are none)."""
    r = np.asarray(residual, dtype=np.float64)
    s = np.asarray(sigma, dtype=np.float64)
    ok = np.isfinite(s) & (s > 0) & np.isfinite(r)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(r[ok]) < k * s[ok]))


def label_metrics(pred: np.ndarray, true: np.ndarray, err: np.ndarray | None = None,
                  crb: np.ndarray | None = None) -> dict[str, float | int | None]:
    """All metrics of one label on one subset. Stars where pred or true is not finite are
    dropped; ``err`` / ``crb`` (per star, same length) are optional."""
    pred = np.asarray(pred, dtype=np.float64)
    true = np.asarray(true, dtype=np.float64)
    ok = np.isfinite(pred) & np.isfinite(true)
    res = pred[ok] - true[ok]
    out: dict[str, float | int | None] = {
        "n": int(res.size), "mae": _f(mae(res)), "bias": _f(bias(res)),
        "scatter": _f(robust_scatter(res)),
        "n_sigma": 0, "frac_1sigma": None, "frac_2sigma": None,
        "median_crb": None, "scatter_over_crb": None,
    }
    if err is not None:
        e = np.asarray(err, dtype=np.float64)[ok]
        good = np.isfinite(e) & (e > 0)
        out["n_sigma"] = int(good.sum())
        out["frac_1sigma"] = _f(within_sigma(res, e, 1.0))
        out["frac_2sigma"] = _f(within_sigma(res, e, 2.0))
    if crb is not None:
        c = np.asarray(crb, dtype=np.float64)[ok]
        good = np.isfinite(c) & (c > 0)
        if good.any():
            out["median_crb"] = _f(np.median(c[good]))
            out["scatter_over_crb"] = _f(robust_scatter(res[good] / c[good]))
    return out


def parse_snr_edges(text: str) -> tuple[float, ...]:
    """Parse ``"0,10,20,inf"`` into strictly increasing edges (ValueError otherwise)."""
    try:
        edges = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as exc:
        raise ValueError(f"SNR bin edges must be numbers separated by commas, got {text!r}") from exc
    check_snr_edges(edges)
    return edges


def check_snr_edges(edges: Sequence[float]) -> None:
    e = np.asarray(edges, dtype=np.float64)
    if e.size < 2 or np.isnan(e).any() or not np.all(np.diff(e) > 0):
        raise ValueError(f"SNR bin edges must be at least two strictly increasing numbers, got {list(edges)}")


def _edge(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def bin_name(lo: float, hi: float) -> str:
    def fmt(v: float) -> str:
        return "inf" if np.isinf(v) else f"{v:g}"

    return f"{fmt(lo)}-{fmt(hi)}"


def _subset(pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], labels: Sequence[str],
            mask: np.ndarray | None) -> dict[str, dict[str, Any]]:
    out = {}
    for lab in labels:
        p, t = np.asarray(pred[lab]), np.asarray(truth[lab])
        e = pred.get(f"{lab}_err")
        c = truth.get(f"{lab}_crb")
        if mask is not None:
            p, t = p[mask], t[mask]
            e = None if e is None else np.asarray(e)[mask]
            c = None if c is None else np.asarray(c)[mask]
        out[lab] = label_metrics(p, t, e, c)
    return out


def summarize(pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray], labels: Sequence[str],
              snr: np.ndarray | None = None, *,
              snr_edges: Sequence[float] = DEFAULT_SNR_EDGES) -> dict[str, Any]:
    """Metrics of every label, overall, by metal-poor split and by SNR bin.

    ``pred`` maps each label to predicted values and optionally ``<label>_err`` to predicted
    uncertainties; ``truth`` maps each label to true values, optionally ``<label>_crb`` to
    Cramer-Rao bounds and ``feh`` (used for the split even when ``feh`` is not in ``labels``).
    All arrays are row-aligned (same star in the same row). ``snr`` is per star, optional.

    Returns ``{"labels", "units", "n_stars", "overall": {label: metrics}, "feh_split": {"feh<-1":
    ..., "feh>=-1": ...} | None, "snr_bins": [{"name", "lo", "hi", "n", "metrics"}] | None,
    "snr_edges", "notes"}`` (metrics as in :func:`label_metrics`).
    """
    labels = list(labels)
    if not labels:
        raise ValueError("no labels to evaluate")
    n = None
    for src, name in [(pred, lab) for lab in labels] + [(truth, lab) for lab in labels]:
        if name not in src:
            raise KeyError(f"label {name!r} is missing")
        size = np.asarray(src[name]).shape[0]
        if n is None:
            n = size
        elif size != n:
            raise ValueError(f"arrays of different lengths ({n} and {size} for {name!r})")
    assert n is not None
    check_snr_edges(snr_edges)
    notes: list[str] = []

    result: dict[str, Any] = {
        "labels": labels,
        "units": {lab: unit(lab) for lab in labels},
        "n_stars": int(n),
        "overall": _subset(pred, truth, labels, None),
        "feh_split": None,
        "snr_bins": None,
        "snr_edges": [_edge(x) for x in snr_edges],
        "notes": notes,
    }

    if "feh" in truth:
        feh = np.asarray(truth["feh"], dtype=np.float64)
        result["feh_split"] = {
            "feh<-1": _subset(pred, truth, labels, feh < FEH_SPLIT),
            "feh>=-1": _subset(pred, truth, labels, feh >= FEH_SPLIT),
        }
    else:
        notes.append("the truth has no feh column: no metal-poor split ([Fe/H] < -1 vs >= -1)")

    if snr is not None:
        s = np.asarray(snr, dtype=np.float64)
        if s.shape[0] != n:
            raise ValueError(f"snr has {s.shape[0]} rows, labels have {n}")
        bins = []
        for lo, hi in zip(snr_edges[:-1], snr_edges[1:]):
            m = (s >= lo) & (s < hi)
            bins.append({"name": bin_name(lo, hi), "lo": _edge(lo), "hi": _edge(hi), "n": int(m.sum()),
                         "metrics": _subset(pred, truth, labels, m)})
        result["snr_bins"] = bins
        outside = int((~np.isfinite(s) | (s < snr_edges[0]) | (s >= snr_edges[-1])).sum())
        if outside:
            notes.append(f"{outside} stars have an SNR outside the bins or not finite")
    else:
        notes.append("no SNR given: no per-SNR-bin metrics")
    return result
