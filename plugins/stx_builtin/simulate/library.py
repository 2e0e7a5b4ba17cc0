"""Real library spectra (e.g. MILES) observed through the LAMOST-like and DESI-like models.

``stx simulate --library PATH --labels CATALOG`` reads every spectrum under PATH with stx's
readers (MILES: the ``fits1d`` reader, air wavelengths converted to vacuum), joins the label
catalog (Teff, log g, [Fe/H], optional [alpha/Fe]) by id, and observes each star exactly like a
simulated one: interpolated onto the simulator's rest-frame log-lambda grid, shifted by a random
radial velocity, degraded to the survey's resolution where the survey is coarser (the kernel
is widened by ``sqrt(FWHM_survey^2 - FWHM_library^2)``; where the library is coarser, e.g.
MILES' 2.5 A against DESI, its resolution is kept and the written DESI resolution matrix
describes that effective resolution), resampled, distorted (extinction, calibration, tellurics)
and given noise by the survey's SNR distribution. Output pixels outside the library's coverage
get ivar 0 (DESI: mask bit ALLBADPIX; the whole Z arm for MILES).

Truth catalog: the library labels, with ``source_id`` (the library's own id). The Cramer-Rao
bounds are *model* bounds: the simulator's relative Jacobian ``f_lib * d ln f_model / d label``
(model smoothed to the library resolution) with the star's ivar.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.errors import StxError

from . import observe, rng
from .synth import hires_grid

LIBRARY_RV_SIGMA = 30.0


@dataclass
class Library:
    """Library spectra with labels (arrays of length n; wave shared or per star)."""

    ids: np.ndarray  # str, the library's ids
    wave: np.ndarray  # (npix,) or (n, npix), vacuum A
    flux: np.ndarray  # (n, npix)
    fwhm: np.ndarray  # (npix,) or (n, npix), A
    teff: np.ndarray
    logg: np.ndarray
    feh: np.ndarray
    alpha_fe: np.ndarray

    @property
    def n(self) -> int:
        return int(self.ids.size)

    def subset(self, sel: np.ndarray | slice) -> "Library":
        return Library(
            ids=self.ids[sel], wave=self.wave[sel] if self.wave.ndim == 2 else self.wave,
            flux=self.flux[sel], fwhm=self.fwhm[sel] if self.fwhm.ndim == 2 else self.fwhm,
            teff=self.teff[sel], logg=self.logg[sel], feh=self.feh[sel], alpha_fe=self.alpha_fe[sel],
        )


def default_alpha(feh: np.ndarray) -> np.ndarray:
    """[alpha/Fe] where a catalog gives none: +0.3 below [Fe/H] = -1, falling to 0.05 at 0."""
    return np.clip(0.05 - 0.25 * feh, 0.05, 0.30)


def _stem(s: str) -> str:
    from stx_builtin.readers._fits import file_stem

    return file_stem(str(s))


def load_library(path: Path, labels_path: Path, *, fwhm: float | None = None,
                 fmt: str | None = None) -> tuple[Library, dict[str, int]]:
    """Read the spectra under ``path`` and join the label catalog; returns the library and counts
    (read, labelled, skipped)."""
    from stxcli.registry import get_registry, identify
    from stxcli.tables import read_table

    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    files = [f for f in files if f.suffix.lower() in (".fits", ".fit", ".gz")]
    if not files:
        raise StxError(f"{path}: no spectrum files (.fits) found")
    reg = get_registry()
    ids, waves, fluxes, fwhms = [], [], [], []
    for f in files:
        reader = identify(f, reg, fmt)
        for b in reader.read(f):
            arm = b.arms[0]
            for i in range(b.n):
                w = arm.wave_of(i).astype(np.float64)
                fl = arm.flux[i].astype(np.float64)
                if arm.resolving_power is not None:
                    fw = w / np.broadcast_to(np.asarray(arm.resolving_power, dtype=np.float64), w.shape)
                elif fwhm is not None:
                    fw = np.full(w.shape, float(fwhm))
                else:
                    raise StxError(f"{f}: the library resolution is unknown (no FWHM/R in the file); "
                                   "give it with --library-fwhm (A)")
                ids.append(str(b.meta.ids[i]))
                waves.append(w)
                fluxes.append(np.where(arm.mask[i], np.nan, fl))
                fwhms.append(fw)
    table = read_table(Path(labels_path))
    need = [c for c in ("teff", "logg", "feh") if c not in table.columns]
    if need:
        raise StxError(f"{labels_path}: the label catalog lacks column(s) {', '.join(need)} "
                       f"(columns: {', '.join(table.columns)})")
    key_col = next((c for c in ("id", "file", "filename", "source_id", "obsid", "targetid") if c in table.columns), None)
    if key_col is None:
        raise StxError(f"{labels_path}: no id column (id, file, filename, source_id, obsid or targetid) to join "
                       "the spectra by")
    keys = {_stem(k): j for j, k in enumerate(table.ids(key_col, "the label catalog"))}
    rows = np.array([keys.get(_stem(i), -1) for i in ids])
    teff = np.array([table.columns["teff"][r] if r >= 0 else np.nan for r in rows], dtype=float)
    logg = np.array([table.columns["logg"][r] if r >= 0 else np.nan for r in rows], dtype=float)
    feh = np.array([table.columns["feh"][r] if r >= 0 else np.nan for r in rows], dtype=float)
    if "alpha_fe" in table.columns:
        afe = np.array([table.columns["alpha_fe"][r] if r >= 0 else np.nan for r in rows], dtype=float)
        afe = np.where(np.isfinite(afe), afe, default_alpha(feh))
    else:
        afe = default_alpha(feh)
    ok = np.isfinite(teff) & np.isfinite(logg) & np.isfinite(feh)
    counts = {"read": len(ids), "labelled": int(ok.sum()), "skipped_no_labels": int((~ok).sum())}
    if not ok.any():
        raise StxError(f"{labels_path}: no spectrum under {path} matched a catalog row with teff, logg and feh "
                       f"(joined on column {key_col!r} against file stems like {ids[0]!r})")
    same = all(w.shape == waves[0].shape and np.array_equal(w, waves[0]) for w in waves)
    sel = np.flatnonzero(ok)
    lib = Library(
        ids=np.array(ids)[sel],
        wave=waves[0] if same else np.array([waves[i] for i in sel]),
        flux=np.array([fluxes[i] for i in sel]),
        fwhm=fwhms[0] if same else np.array([fwhms[i] for i in sel]),
        teff=teff[sel], logg=logg[sel], feh=feh[sel], alpha_fe=afe[sel],
    )
    return lib, counts


def to_hires(lib: Library) -> tuple[np.ndarray, np.ndarray]:
    """Library fluxes on the rest-frame high-resolution grid (linear interpolation, NaNs and the
    outside held at the nearest good value) and the coverage indicator (n, N) float32."""
    g = hires_grid().wave
    n = lib.n
    out = np.empty((n, g.size), dtype=np.float32)
    cov = np.zeros((n, g.size), dtype=np.float32)
    for i in range(n):
        w = lib.wave[i] if lib.wave.ndim == 2 else lib.wave
        f = lib.flux[i]
        good = np.isfinite(f)
        out[i] = np.interp(g, w[good], f[good])
        cov[i] = ((g >= w[good][0]) & (g <= w[good][-1])).astype(np.float32)
    return out, cov


def fwhm_on(lib: Library, wave: np.ndarray) -> np.ndarray:
    """The library's FWHM (A) interpolated on ``wave`` (median over stars when per star)."""
    w = lib.wave if lib.wave.ndim == 1 else lib.wave[0]
    fw = lib.fwhm if lib.fwhm.ndim == 1 else np.median(lib.fwhm, axis=0)
    return np.interp(wave, w, fw)


def library_model(survey: str, lib: Library) -> observe.SurveyModel:
    if survey == "lamost":
        return observe.LamostModel(in_fwhm=fwhm_on(lib, observe.lamost_wave()))
    return observe.DesiModel(in_fwhm={a: fwhm_on(lib, observe.desi_wave(a)) for a in observe.DESI_ARMS})


def smoothing_matrix(lib: Library) -> Any:
    """High-res -> high-res Gaussian smoothing to the library resolution (model Jacobian)."""
    g = hires_grid().wave
    return observe.gaussian_resampler(g, fwhm_on(lib, g), log_pixels=True)


def draw_rv(seed: int, index: np.ndarray) -> np.ndarray:
    return LIBRARY_RV_SIGMA * rng.normal(seed, rng.LIBRARY, index, 1)[:, 0]
