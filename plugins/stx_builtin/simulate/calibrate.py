"""Fit the simulator's strength calibration on real LAMOST spectra (``tools/make_example_data.py``).

What is fitted (:class:`.synth.StrengthCalibration`)
----------------------------------------------------
* ``t_surface``: saturated line cores keep the residual flux ``B_lambda(t_surface Teff) /
  B_lambda(Teff)`` (Eddington-Barbier: they form where the photosphere is coolest), instead of
  the uncalibrated model's constant 3 %. Real strong lines (H alpha, the Ca II triplet, Mg b)
  are much shallower than a one-layer model makes them, more so in the red and in hot stars.
* ``r_scale``: a factor on the Doppler width of the curve of growth (microturbulence), which sets
  where lines saturate.
* per template row ``k`` (a metal-line group, a damping-wing group, H alpha / H beta / the other
  Balmer lines / Paschen as Doppler core, Stark and resonance wings, molecules, haze)
  ``log10 w_k += a_k + b_k (theta - 0.9) + c_k (logg - 4)``: an astrophysical log gf per line
  group with first-order corrections of the one-layer photosphere's temperature and pressure
  dependence. Rows the data do not constrain (TiO, Ca II H&K below the featurizer's 3900 A) stay
  at zero through the prior.

How
---
Real spectra: the "calibration half" of ``lamost-dr10-train`` (even OBSID, 521 F/G stars with
their LASP labels), featurized by the default ``raw`` featurizer. Simulated spectra: noiseless
LAMOST-like spectra at the same labels ([alpha/Fe] from the population's trend), without radial
velocity, extinction, flux-calibration distortion or tellurics, featurized the same way. The
objective is the weighted mean squared difference of the two feature vectors (weights
``1 / (1/ivar + 0.01^2)``: a 1 % model floor so that bright stars do not dominate; telluric bands
left out) plus a weak Gaussian prior on the corrections (0.5 dex on ``a``, 1 dex per unit theta
on ``b``, 0.25 dex per dex on ``c``).

The featurized simulation is a long chain (synthesis, LSF, resampling, spline continuum); the fit
runs a differentiable copy of the synthesis and the LSF in torch and models the featurized
spectrum as the pipeline's own output at the current parameters times the change of the LSF-
convolved line spectrum: ``f(p) = f_pipe(p0) * M s(p) / M s(p0)``. The continuum placement is
thereby held at its value for ``p0``; each outer iteration re-runs the real pipeline at the new
parameters (:func:`simulate_features`) and refits, so the result is the pipeline's own fixed
point. Everything is deterministic (float32, one torch thread, L-BFGS).

The other half of the DR10 stars (odd OBSID) and every MILES star are never used here: they are
the checks (benchmarks/bench_sim_realism.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import observe, synth

#: Model floor of the objective's weights (relative flux).
SIGMA_SYS = 0.01
#: Prior widths of the corrections: a (dex), b (dex per unit theta), c (dex per dex of logg).
PRIOR_SIGMA = (0.5, 1.0, 0.25)
#: Weight of the prior relative to the mean squared residual in units of (1 %)^2.
PRIOR_WEIGHT = 1e-3
#: Telluric bands left out of the objective (A, vacuum): the simulation has none here.
TELLURIC_BANDS = ((6860.0, 6930.0), (7160.0, 7345.0), (7585.0, 7710.0), (8120.0, 8360.0))
#: Wavelength window of the high-resolution grid the fit synthesises (covers the raw features).
HIRES_WINDOW = (3860.0, 8860.0)


def default_alpha(feh: np.ndarray) -> np.ndarray:
    """[alpha/Fe] of a star of this [Fe/H] where a catalogue gives none (the disk/halo trend)."""
    return np.clip(0.05 - 0.25 * np.asarray(feh, dtype=np.float64), 0.0, 0.3)


@dataclass
class TrainingSet:
    """Featurized real spectra and their labels (teff, logg, feh, alpha_fe columns)."""

    features: np.ndarray  # (n, d) float32
    ivar: np.ndarray  # (n, d) float32
    labels: np.ndarray  # (n, 4) float64
    ids: np.ndarray  # (n,) str

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def load_lamost_dr10(folder: Path, featurizer: Any, *, half: str = "even") -> TrainingSet:
    """The real LAMOST DR10 stars of ``folder`` (``labels.csv`` + ``spectra/``) whose OBSID is
    even (``half="even"``, the calibration half), odd, or ``"all"``; featurized one by one."""
    import csv

    from stx_builtin.readers.lamost import LamostReader

    rows = list(csv.DictReader(open(folder / "labels.csv")))
    parity = {"even": 0, "odd": 1, "all": None}[half]
    rows = [r for r in rows if parity is None or int(r["obsid"]) % 2 == parity]
    reader = LamostReader()
    feats, ivars = [], []
    for r in rows:
        fb = featurizer.transform(next(reader.read(folder / r["file"])))
        feats.append(fb.features[0])
        ivars.append(fb.ivar[0])
    lab = np.array([[float(r["teff"]), float(r["logg"]), float(r["feh"])] for r in rows])
    lab = np.c_[lab, default_alpha(lab[:, 2])]
    return TrainingSet(features=np.array(feats, dtype=np.float32), ivar=np.array(ivars, dtype=np.float32),
                       labels=lab, ids=np.array([r["obsid"] for r in rows]))


def simulate_features(labels: np.ndarray, featurizer: Any, *, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Noiseless LAMOST-like spectra at ``labels`` (n, 4), at rest, without extinction,
    calibration distortion or tellurics, featurized by ``featurizer`` (with the strength
    calibration in force: see :func:`.synth.strength_override`)."""
    from stxcli.spectra import Arm, SpectrumBatch, SpectrumMeta

    model = observe.model_for("lamost")
    labels = np.asarray(labels, dtype=np.float64)
    feats, ivars = [], []
    for s in range(0, labels.shape[0], chunk):
        lab = labels[s:s + chunk]
        m = lab.shape[0]
        hires = synth.synthesize(lab[:, 0], lab[:, 1], lab[:, 2], lab[:, 3])
        p = observe.draw_params("lamost", 1, np.arange(m), observe.SnrSpec(100.0, 0.0, 100.0, 100.0), np.zeros(m))
        for arr in (p.cal, p.ebv, p.dichroic, p.airmass, p.pwv):
            arr[:] = 0.0
        p.lsf_scale[:] = 1.0
        f = model.noiseless(hires, p)["lrs"].astype(np.float64)
        f /= np.median(f, axis=1, keepdims=True)
        meta = SpectrumMeta.empty(m, "lamost", "simulated")
        meta.rv_kms = np.zeros(m)
        arm = Arm(name="lrs", wave=model.wave, flux=f.astype(np.float32), ivar=(1e4 / f**2).astype(np.float32),
                  mask=np.zeros(f.shape, dtype=bool), resolving_power=1800.0)
        fb = featurizer.transform(SpectrumBatch(arms=[arm], meta=meta).validate())
        feats.append(fb.features)
        ivars.append(fb.ivar)
    return np.concatenate(feats), np.concatenate(ivars)


def objective_weights(data: TrainingSet, wave: np.ndarray) -> np.ndarray:
    """Per-pixel weights of the objective (0 where masked or telluric)."""
    ok = np.ones(wave.size, dtype=bool)
    for lo, hi in TELLURIC_BANDS:
        ok &= ~((wave > lo) & (wave < hi))
    iv = data.ivar.astype(np.float64)
    w = np.where(iv > 0, 1.0 / (1.0 / np.where(iv > 0, iv, 1.0) + SIGMA_SYS**2), 0.0)
    return (w * ok[None, :]).astype(np.float32)


def mean_sq_residual(real: np.ndarray, sim: np.ndarray, weights: np.ndarray) -> float:
    """Weighted mean squared difference in units of (1 %)^2."""
    return float((weights * (real - sim) ** 2).sum() / weights.sum() * 1e4)


# ----------------------------------------------------------------------- differentiable model


class TorchSynth:
    """The synthesis (:func:`.synth.flux_from_weights`, normalised) and the LAMOST LSF onto the
    featurizer's grid, in torch, with the calibration as differentiable parameters."""

    def __init__(self, labels: np.ndarray, wave: np.ndarray, theta_range: tuple[float, float],
                 logg_range: tuple[float, float]) -> None:
        import torch

        ts = synth.build_templates()
        grid = synth.hires_grid()
        hsel = (grid.wave > HIRES_WINDOW[0]) & (grid.wave < HIRES_WINDOW[1])
        self.k, self.n_line = ts.k, ts.n_line
        self.templates = torch.from_numpy(np.ascontiguousarray(ts.templates[:, hsel]))
        m = observe.gaussian_resampler(wave, wave / observe.lamost_resolving_power(wave), log_pixels=True)
        m = m[:, np.flatnonzero(hsel)].tocoo()
        self.matrix = torch.sparse_coo_tensor(np.vstack([m.row, m.col]), m.data.astype(np.float32), m.shape,
                                              check_invariants=False).coalesce()
        lab = np.asarray(labels, dtype=np.float64)
        with synth.strength_override(None):
            w0 = synth.weights(lab[:, 0], lab[:, 1], lab[:, 2], lab[:, 3], ts)
            r0 = synth.doppler_ratio(lab[:, 0], lab[:, 1])
        self.w0 = torch.from_numpy(w0.astype(np.float32))
        self.r0 = torch.from_numpy(r0.astype(np.float32))
        self.theta_range, self.logg_range = theta_range, logg_range
        th = np.clip(5040.0 / lab[:, 0], *theta_range) - synth.THETA_PIVOT
        lg = np.clip(lab[:, 1], *logg_range) - synth.LOGG_PIVOT
        self.th = torch.from_numpy(th.astype(np.float32))[:, None]
        self.lg = torch.from_numpy(lg.astype(np.float32))[:, None]
        # the core residual's wavelength: synth's core nodes, held over their runs of pixels
        core_wave = synth.expand_core(synth._core_nodes()[None, :].astype(np.float64))[0][hsel]
        self.x = torch.from_numpy(np.multiply.outer(1.0 / lab[:, 0], 1.4387769e8 / core_wave).astype(np.float32))

    def params(self, cal: synth.StrengthCalibration | None = None) -> list[Any]:
        """Leaf tensors (a, b, c, log r_scale, logit t_surface) starting at ``cal``."""
        import torch

        z = np.zeros(self.k)
        a, b, c = (z, z, z) if cal is None else (cal.a, cal.b, cal.c)
        rs, tsurf = (1.0, 0.75) if cal is None else (cal.r_scale, cal.t_surface)
        vals = [np.asarray(v, dtype=np.float32) for v in (a, b, c)]
        vals += [np.float32(np.log(rs)), np.float32(np.log(tsurf / (1.0 - tsurf)))]
        return [torch.tensor(v, requires_grad=True) for v in vals]

    def calibration(self, p: list[Any]) -> synth.StrengthCalibration:
        a, b, c, lrs, lts = (v.detach().numpy().astype(np.float64) for v in p)
        return synth.StrengthCalibration(a=a, b=b, c=c, theta_range=self.theta_range, logg_range=self.logg_range,
                                         r_scale=float(np.exp(lrs)), t_surface=float(1.0 / (1.0 + np.exp(-lts))))

    def line_spectrum(self, p: list[Any], idx: np.ndarray) -> Any:
        """High-resolution normalised flux (len(idx), window pixels): synth's formula."""
        import torch

        a, b, c, lrs, lts = p
        w = self.w0[idx] * torch.pow(10.0, a[None] + self.th[idx] * b[None] + self.lg[idx] * c[None])
        tau_l = w[:, :self.n_line] @ self.templates[:self.n_line]
        r = (self.r0[idx] * torch.exp(lrs))[:, None]
        x = tau_l / r
        ca, cb, cc = synth._COG
        f = x / (1.0 + x / (cb + cc * torch.sqrt(torch.log1p(x / ca) + 1e-12)))
        absorb = torch.clamp(r * f, max=1.0)
        tau_s = w[:, self.n_line:] @ self.templates[self.n_line:]
        xb = self.x[idx]
        core = torch.expm1(xb) / torch.expm1(xb / torch.sigmoid(lts))
        return core + (1.0 - core) * torch.exp(-tau_s) * (1.0 - absorb)

    def observed(self, p: list[Any], idx: np.ndarray) -> Any:
        """The line spectrum through the LAMOST LSF on the featurizer's grid."""
        import torch

        return torch.sparse.mm(self.matrix, self.line_spectrum(p, idx).T).T


def fit_strength(data: TrainingSet, featurizer: Any, *, free: str = "abc", n_outer: int = 2, lbfgs_steps: int = 3,
                 max_iter: int = 40, chunk: int = 96, threads: int = 1,
                 log: Callable[[str], None] = print) -> tuple[synth.StrengthCalibration, dict[str, Any]]:
    """Fit the strength calibration to ``data`` (see the module doc); returns it and a record
    (objective per outer iteration, seconds). ``free`` names the per-row corrections that are
    fitted (``""``: only t_surface and r_scale; ``"a"``: plus one log gf per row; the default
    ``"abc"`` adds the Teff and log g slopes): the diagnosis of docs/simulator.md."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    wave = featurizer.axis()
    lab = data.labels
    theta_range = (float(5040.0 / lab[:, 0].max()), float(5040.0 / lab[:, 0].min()))
    logg_range = (float(max(lab[:, 1].min(), 1.5)), float(lab[:, 1].max()))
    model = TorchSynth(lab, wave, theta_range, logg_range)
    wts = objective_weights(data, wave)
    w_t, real_t = torch.from_numpy(wts), torch.from_numpy(data.features.astype(np.float32))
    norm = float(wts.sum()) / 1e4
    chunks = [np.arange(i, min(i + chunk, data.n)) for i in range(0, data.n, chunk)]
    p = model.params(None)
    for v, name in zip(p[:3], "abc"):
        if name not in free:
            v.requires_grad_(False)
    fitted = [v for v in p if v.requires_grad]
    history: list[dict[str, float]] = []

    def pipeline(cal: synth.StrengthCalibration | None) -> np.ndarray:
        with synth.strength_override(cal):
            return simulate_features(lab, featurizer)[0]

    with synth.strength_override(None):
        history.append({"stage": "uncalibrated", "objective": mean_sq_residual(data.features, pipeline(None), wts)})
    log(f"uncalibrated: {history[-1]['objective']:.3f}")
    cal = model.calibration(p)
    for outer in range(n_outer):
        feat0 = pipeline(cal)
        history.append({"stage": f"outer {outer} start", "objective": mean_sq_residual(data.features, feat0, wts)})
        log(f"outer {outer}: pipeline objective {history[-1]['objective']:.3f}")
        with torch.no_grad():
            base = torch.cat([model.observed(p, ix) for ix in chunks])
        ratio0 = torch.from_numpy(feat0) / base
        opt = torch.optim.LBFGS(fitted, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

        def closure() -> float:
            opt.zero_grad()
            total = 0.0
            for ix in chunks:
                pred = ratio0[ix] * model.observed(p, ix)
                loss = (w_t[ix] * (real_t[ix] - pred) ** 2).sum() / norm
                loss.backward()
                total += float(loss.detach())
            prior = sum((v**2).sum() / s**2 for v, s in zip(p[:3], PRIOR_SIGMA)) * PRIOR_WEIGHT
            if prior.requires_grad:
                prior.backward()
            return total + float(prior.detach())

        for step in range(lbfgs_steps):
            loss = float(opt.step(closure))
            log(f"  L-BFGS step {step}: objective + prior {loss:.3f}, r_scale {float(torch.exp(p[3].detach())):.3f}, "
                f"t_surface {float(torch.sigmoid(p[4].detach())):.3f} ({time.perf_counter() - t0:.0f} s)")
        cal = model.calibration(p)
    history.append({"stage": "calibrated", "objective": mean_sq_residual(data.features, pipeline(cal), wts)})
    log(f"calibrated: pipeline objective {history[-1]['objective']:.3f}")
    return cal, {"history": history, "seconds": round(time.perf_counter() - t0, 1), "n_stars": data.n, "free": free,
                 "theta_range": theta_range, "logg_range": logg_range}
