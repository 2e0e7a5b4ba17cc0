"""PNG diagnostic plots for ``stx evaluate`` (matplotlib, Agg canvas, imported lazily).

No pyplot: every figure is a bare :class:`matplotlib.figure.Figure` on an Agg canvas, so nothing
global (backend, open figures) changes in the calling process.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import bias, display_name, robust_scatter, unit

PANEL = 3.6  # inches per panel
DPI = 110


def _axis_label(label: str, prefix: str = "") -> str:
    u = unit(label)
    name = f"{prefix}{display_name(label)}"
    return f"{name} [{u}]" if u else name


def _figure(ncols: int, nrows: int = 1) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL * ncols + 0.6, PANEL * nrows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _marker_size(n: int) -> float:
    return float(np.clip(3000.0 / max(n, 1), 0.5, 16.0))


def _scatter(ax: Any, x: np.ndarray, y: np.ndarray, c: np.ndarray | None = None, **kw: Any) -> Any:
    kw.setdefault("s", _marker_size(x.size))
    kw.setdefault("linewidths", 0)
    kw.setdefault("rasterized", True)
    if c is None:
        return ax.scatter(x, y, color="C0", alpha=0.6, **kw)
    if c.size:  # colour range from the bulk, so that a few outliers do not wash it out
        kw.setdefault("vmin", float(np.percentile(c, 1)))
        kw.setdefault("vmax", float(np.percentile(c, 99)))
    return ax.scatter(x, y, c=c, cmap="viridis", **kw)


def _finite(*arrays: np.ndarray | None) -> np.ndarray:
    ok = np.ones(np.asarray(arrays[0]).shape[0], dtype=bool)
    for a in arrays:
        if a is not None:
            ok &= np.isfinite(np.asarray(a, dtype=np.float64))
    return ok


def _stats_text(res: np.ndarray) -> str:
    return f"bias {bias(res):.4g}\nscatter {robust_scatter(res):.4g}\nN {res.size}"


def one_to_one(path: Path, pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
               labels: Sequence[str]) -> None:
    fig, axes = _figure(len(labels))
    for ax, lab in zip(axes[0], labels):
        t, p = np.asarray(truth[lab], float), np.asarray(pred[lab], float)
        ok = _finite(t, p)
        t, p = t[ok], p[ok]
        _scatter(ax, t, p)
        if t.size:
            lo, hi = float(min(t.min(), p.min())), float(max(t.max(), p.max()))
            pad = 0.03 * (hi - lo or 1.0)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="k", lw=0.8)
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            ax.text(0.04, 0.96, _stats_text(p - t), transform=ax.transAxes, va="top", fontsize=8)
        ax.set_xlabel(_axis_label(lab, "true "))
        ax.set_ylabel(_axis_label(lab, "predicted "))
        ax.set_aspect("equal", adjustable="box")
    fig.savefig(path, format="png")


def residual_vs_truth(path: Path, pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                      labels: Sequence[str]) -> None:
    fig, axes = _figure(len(labels))
    for ax, lab in zip(axes[0], labels):
        t, p = np.asarray(truth[lab], float), np.asarray(pred[lab], float)
        ok = _finite(t, p)
        t, res = t[ok], p[ok] - t[ok]
        _scatter(ax, t, res)
        ax.axhline(0.0, color="k", lw=0.8)
        if res.size:
            ax.text(0.04, 0.96, _stats_text(res), transform=ax.transAxes, va="top", fontsize=8)
        ax.set_xlabel(_axis_label(lab, "true "))
        ax.set_ylabel(_axis_label(lab, "residual "))
    fig.savefig(path, format="png")


def residual_vs_snr(path: Path, pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                    labels: Sequence[str], snr: np.ndarray) -> None:
    """Residual against SNR per label, coloured by the true [Fe/H] when the truth has it."""
    snr = np.asarray(snr, float)
    feh = np.asarray(truth["feh"], float) if "feh" in truth else None
    fig, axes = _figure(len(labels))
    mappable = None
    for ax, lab in zip(axes[0], labels):
        t, p = np.asarray(truth[lab], float), np.asarray(pred[lab], float)
        ok = _finite(t, p, snr, feh) & (snr > 0)
        mappable = _scatter(ax, snr[ok], p[ok] - t[ok], None if feh is None else feh[ok])
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("SNR")
        ax.set_ylabel(_axis_label(lab, "residual "))
    if feh is not None and mappable is not None:
        fig.colorbar(mappable, ax=list(axes[0]), label="true [Fe/H] [dex]")
    fig.savefig(path, format="png")


def kiel(path: Path, pred: Mapping[str, np.ndarray]) -> None:
    """Predicted Teff vs log g (both axes inverted), coloured by predicted [Fe/H] when present."""
    teff, logg = np.asarray(pred["teff"], float), np.asarray(pred["logg"], float)
    feh = np.asarray(pred["feh"], float) if "feh" in pred else None
    ok = _finite(teff, logg, feh)
    fig, axes = _figure(1)
    ax = axes[0][0]
    m = _scatter(ax, teff[ok], logg[ok], None if feh is None else feh[ok])
    if feh is not None:
        fig.colorbar(m, ax=ax, label="predicted [Fe/H] [dex]")
    ax.set_xlabel(_axis_label("teff", "predicted "))
    ax.set_ylabel(_axis_label("logg", "predicted "))
    if ok.any():  # inverted: hot stars left, giants up
        ax.invert_xaxis()
        ax.invert_yaxis()
    else:
        ax.set_xlim(1, 0)
        ax.set_ylim(1, 0)
    ax.set_title("predicted Kiel diagram")
    fig.savefig(path, format="png")


def write_plots(out_dir: Path, pred: Mapping[str, np.ndarray], truth: Mapping[str, np.ndarray],
                labels: Sequence[str], snr: np.ndarray | None = None) -> tuple[list[str], list[str]]:
    """Write every plot the data allow into ``out_dir``; return (file names, notes on skipped plots)."""
    out_dir = Path(out_dir)
    written, notes = [], []
    one_to_one(out_dir / "one_to_one.png", pred, truth, labels)
    written.append("one_to_one.png")
    residual_vs_truth(out_dir / "residual_vs_truth.png", pred, truth, labels)
    written.append("residual_vs_truth.png")
    if snr is not None:
        residual_vs_snr(out_dir / "residual_vs_snr.png", pred, truth, labels, snr)
        written.append("residual_vs_snr.png")
    else:
        notes.append("no SNR: residual_vs_snr.png not drawn")
    if "teff" in pred and "logg" in pred:
        kiel(out_dir / "kiel.png", pred)
        written.append("kiel.png")
    else:
        notes.append("predictions lack teff or logg: kiel.png not drawn")
    return written, notes
