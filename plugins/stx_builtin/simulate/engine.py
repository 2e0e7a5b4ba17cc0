"""Run a simulation: chunks of stars, optionally in parallel, streamed to disk.

A run is a list of *units* (LAMOST-like: up to ``chunk`` one-star files; DESI-like: one coadd file
of up to ``per_file`` spectra). Each unit is a pure function of the configuration and its star
indices: labels and observation parameters come from counter-based random numbers
(:mod:`.rng`), noise from per-star generators seeded by (seed, star index). Units run in worker
processes (``spawn``, one BLAS thread each) and write their files directly into the run's
temporary directory; the main process only gathers the per-star truth rows, then writes
``truth.fits``, ``labels.fits`` and ``simulation.json`` and renames the directory into place
(:func:`stxcli.io.atomic_dir`). The same seed gives bit-identical files for any ``--workers``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from stxcli.errors import StxError, UsageError

from . import catalogs, crb, observe, populations, rng, synth, writers

VERSION = "1.0.0"
LAMOST_OBSID_BASE = 900_000_000
DESI_TARGETID_BASE = 39_990_000_000_000_000
#: Stars per synthesis sub-batch (bounds memory: 5 x 48 x 22,490 float32 = 22 MB).
SUB_BATCH = 48


@dataclass
class SimConfig:
    """Everything that determines a run's output (written to simulation.json)."""

    survey: str  # "lamost" | "desi"
    n: int
    seed: int = 1
    mix: dict[str, float] = field(default_factory=lambda: dict(populations.MIXES["lamost"]))
    phases: tuple[float, float, float, float] = populations.PHASE_MIX["lamost"]
    snr: observe.SnrSpec = field(default_factory=lambda: observe.SNR_DEFAULT["lamost"])
    teff_range: tuple[float, float] = (3500.0, 7500.0)
    layout: str = "image"  # LAMOST: image | table
    per_file: int = 500  # DESI spectra per coadd file
    chunk: int = 64  # LAMOST stars per unit
    id_offset: int = 0
    with_crb: bool = True
    name: str = "sim"

    def validate(self) -> None:
        if self.survey not in ("lamost", "desi"):
            raise UsageError(f"--survey {self.survey!r}: expected lamost or desi")
        if self.n < 1:
            raise UsageError("--n must be at least 1")
        if self.layout not in ("image", "table"):
            raise UsageError(f"--layout {self.layout!r}: expected image or table")
        if not (1000.0 <= self.teff_range[0] < self.teff_range[1] <= 50000.0):
            raise UsageError(f"--teff-range {self.teff_range}: expected MIN,MAX with 1000 <= MIN < MAX <= 50000")
        if self.seed < 0:
            raise UsageError("--seed must be >= 0")

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["snr"] = asdict(self.snr)
        return d


# ------------------------------------------------------------------------------- the models

_MODELS: dict[str, observe.SurveyModel] = {}


def get_model(survey: str) -> observe.SurveyModel:
    if survey not in _MODELS:
        _MODELS[survey] = observe.model_for(survey)
    return _MODELS[survey]


def units(cfg: SimConfig) -> list[tuple[int, int, int]]:
    """(unit number, first star, end) of a run."""
    size = cfg.per_file if cfg.survey == "desi" else cfg.chunk
    return [(k, s, min(s + size, cfg.n)) for k, s in enumerate(range(0, cfg.n, size))]


# --------------------------------------------------------------------------- one sub-batch


def synth_rows(teff: np.ndarray, logg: np.ndarray, feh: np.ndarray, alpha_fe: np.ndarray, with_crb: bool) -> np.ndarray:
    """High-resolution spectra: per star the labels (and, with_crb, one step in each label)."""
    labs = crb.stack_perturbed(teff, logg, feh, alpha_fe) if with_crb else (teff, logg, feh, alpha_fe)
    w = synth.weights(*labs)
    r = synth.doppler_ratio(labs[0], labs[1])
    return synth.flux_from_weights(w, labs[0], r)


def observe_rows(model: observe.SurveyModel, hires: np.ndarray, p: observe.ObsParams, with_crb: bool,
                 seed: int) -> tuple[observe.Observed, dict[str, np.ndarray], np.ndarray]:
    """Noiseless observation, noise and (with_crb) Cramer-Rao bounds of one sub-batch."""
    group = crb.GROUP if with_crb else 1
    clean = model.noiseless(hires, p, group)
    if with_crb:
        nominal, jac = {}, {}
        for a, rows in clean.items():
            nominal[a], jac[a] = crb.split_jacobian(rows)
    else:
        nominal, jac = clean, {}
    obs = model.add_noise(nominal, p, seed)
    if with_crb:
        s = obs.scale
        bounds = crb.cramer_rao([jac[a] * s[:, None, None] for a in model.arms], [obs.ivar[a] for a in model.arms],
                                [nominal[a] * s[:, None] for a in model.arms], model.nuisance())
    else:
        bounds = np.full((p.n, len(crb.LABELS)), np.nan)
    return obs, nominal, bounds


def _band_snr(wave: np.ndarray, flux: np.ndarray, ivar: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    bands = {"u": (3700, 4000), "g": (4000, 5500), "r": (5500, 6900), "i": (6900, 8500), "z": (8500, 9100)}
    out = {}
    for b, (lo, hi) in bands.items():
        sel = (wave >= lo) & (wave < hi)
        out[b] = observe._median_snr(flux, ivar, mask, sel)
    return out


# -------------------------------------------------------------------------------- one unit


def run_unit(cfg: SimConfig, unit: int, start: int, stop: int, out_dir: str) -> dict[str, np.ndarray]:
    """Simulate stars ``start .. stop - 1`` and write their file(s) into ``out_dir``; return the
    per-star truth columns."""
    model = get_model(cfg.survey)
    spectra_dir = Path(out_dir) / "spectra"
    parts: list[dict[str, Any]] = []
    for s0 in range(start, stop, SUB_BATCH):
        s1 = min(s0 + SUB_BATCH, stop)
        pop = populations.sample(s1 - s0, cfg.seed, mix=cfg.mix, phases=cfg.phases, teff_range=cfg.teff_range, start=s0)
        p = observe.draw_params(cfg.survey, cfg.seed, pop.index, cfg.snr, pop.rv_kms)
        hires = synth_rows(pop.teff, pop.logg, pop.feh, pop.alpha_fe, cfg.with_crb)
        obs, nominal, bounds = observe_rows(model, hires, p, cfg.with_crb, cfg.seed)
        parts.append({"pop": pop, "p": p, "obs": obs, "crb": bounds})
    if cfg.survey == "lamost":
        return _write_lamost(cfg, model, parts, spectra_dir)
    return _write_desi(cfg, model, parts, spectra_dir, unit)


def _truth_common(pop: populations.Population, p: observe.ObsParams, bounds: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "index": pop.index, "teff": pop.teff, "logg": pop.logg, "feh": pop.feh, "alpha_fe": pop.alpha_fe,
        "rv_kms": pop.rv_kms, "teff_crb": bounds[:, 0], "logg_crb": bounds[:, 1], "feh_crb": bounds[:, 2],
        "alpha_fe_crb": bounds[:, 3], "component": np.array(populations.COMPONENTS)[pop.component],
        "phase": np.array(populations.PHASES)[pop.phase], "ebv": p.ebv, "lsf_scale": p.lsf_scale,
        "snr_target": p.snr, "ra": p.ra, "dec": p.dec,
    }


def _write_lamost(cfg: SimConfig, model: observe.SurveyModel, parts: list[dict[str, Any]], spectra_dir: Path) -> dict[str, np.ndarray]:
    assert isinstance(model, observe.LamostModel)
    wave = model.wave
    cols: list[dict[str, np.ndarray]] = []
    for part in parts:
        pop, p, obs = part["pop"], part["p"], part["obs"]
        flux, ivar, mask, andmask = obs.flux["lrs"], obs.ivar["lrs"], obs.mask["lrs"], obs.bits["lrs"]
        snr = _band_snr(wave, flux, ivar, mask)
        names = writers.lamost_names(pop.index, cfg.seed)
        obsid = LAMOST_OBSID_BASE + cfg.id_offset + pop.index
        rv_err = 3.0 + 60.0 / np.maximum(snr["g"], 1.0)
        rv_est = pop.rv_kms + rv_err * rng.normal(cfg.seed, rng.OBS + 200, pop.index, 1)[:, 0]
        normalized = None
        if cfg.layout == "table":
            cont = synth.continuum(pop.teff, wave) * model.multiplicative(p) * obs.scale[:, None].astype(np.float32)
            normalized = np.where(mask, 0.0, flux / np.maximum(cont, 1e-30)).astype(np.float32)
        for i in range(pop.n):
            meta = {
                "filename": names["filename"][i], "obsid": int(obsid[i]), "seed": cfg.seed, "index": int(pop.index[i]),
                "version": VERSION, "lmjd": int(names["lmjd"][i]), "planid": names["planid"][i],
                "ra": p.ra[i], "dec": p.dec[i], "fiber": int(names["fiber"][i]), "spid": int(names["spid"][i]),
                "exptime": p.exptime[i], "helio_rv": -10.0 * np.cos(np.radians(p.ra[i])),
                "subclass": writers.subclass(float(pop.teff[i])), "z": rv_est[i] / observe.C_KMS,
                "z_err": rv_err[i] / observe.C_KMS,
                **{f"snr_{b}": snr[b][i] for b in "ugriz"},
            }
            data = writers.lamost_file_bytes(meta, flux[i], ivar[i], wave, andmask[i],
                                             normalized[i] if normalized is not None else flux[i], cfg.layout)
            (spectra_dir / names["filename"][i]).write_bytes(data)
        t = _truth_common(pop, p, part["crb"])
        t.update({"id": obsid.astype(str), "snr": snr["g"], "snr_g": snr["g"], "snr_r": snr["r"],
                  "file": np.char.add("spectra/", names["filename"]), "row": np.zeros(pop.n, dtype=np.int64)})
        cols.append(t)
    return {k: np.concatenate([c[k] for c in cols]) for k in cols[0]}


def _write_desi(cfg: SimConfig, model: observe.SurveyModel, parts: list[dict[str, Any]], spectra_dir: Path,
                unit: int) -> dict[str, np.ndarray]:
    assert isinstance(model, observe.DesiModel)
    cat = {k: np.concatenate([getattr(part["pop"], k) for part in parts]) for k in ("index", "teff", "rv_kms")}
    pcat = {k: np.concatenate([getattr(part["p"], k) for part in parts]) for k in ("ra", "dec", "ebv", "exptime", "lsf_scale")}
    n = cat["index"].size
    arms: dict[str, dict[str, np.ndarray]] = {}
    for a in model.arms:
        flux = np.concatenate([part["obs"].flux[a] for part in parts])
        ivar = np.concatenate([part["obs"].ivar[a] for part in parts])
        bits = np.concatenate([part["obs"].bits[a] for part in parts])
        res = np.concatenate([observe.band_to_dia(model.kernels(part["p"])[a]) for part in parts])
        arms[a] = {"wave": model.wave[a], "flux": flux, "ivar": ivar, "mask": bits, "resolution": res}
    snr = {a: np.concatenate([part["obs"].snr[a] for part in parts]) for a in model.arms}
    scale = np.concatenate([part["obs"].scale for part in parts])
    targetid = DESI_TARGETID_BASE + cfg.id_offset + cat["index"]
    fname = f"coadd-sim-bright-{unit:05d}.fits"
    # r magnitude from the flux scale: scale multiplies a continuum normalised to 1 at 5500 A
    rmag = 22.5 - 2.5 * np.log10(np.maximum(scale * 1e-17 * 5500.0**2 / 2.998e18 / 3.631e-29, 1e-12))
    gr = np.clip(0.6 - (cat["teff"] - 5800.0) / 2500.0, -0.3, 1.6)
    fm = writers.desi_fibermap(targetid, pcat["ra"], pcat["dec"], pcat["ebv"], rmag, gr, pcat["exptime"], cat["index"])
    efm = {"TARGETID": targetid, "NIGHT": np.full(n, 20230101 + unit % 28), "EXPID": 200000 + cat["index"],
           "MJD": np.full(n, 59945.3 + unit), "TILEID": np.full(n, 40000 + unit), "EXPTIME": pcat["exptime"],
           "PETAL_LOC": (cat["index"] // 500) % 10, "FIBER": cat["index"] % 5000, "PLATE_RA": pcat["ra"],
           "PLATE_DEC": pcat["dec"], "FIBER_RA": pcat["ra"], "FIBER_DEC": pcat["dec"],
           "PSF_TO_FIBER_SPECFLUX": np.full(n, 0.78), "LAMBDA_REF": np.full(n, 5400.0)}
    scores = {"TARGETID": targetid}
    for a in model.arms:
        scores[f"MEDIAN_COADD_SNR_{a.upper()}"] = snr[a]
        scores[f"MEDIAN_COADD_FLUX_{a.upper()}"] = np.median(arms[a]["flux"], axis=1)
    primary = {"SPGRP": "healpix", "SPGRPVAL": unit, "HPXPIXEL": unit, "HPXNSIDE": 64, "HPXNEST": True,
               "SURVEY": "main", "PROGRAM": "bright", "SPECPROD": "stx-sim", "ORIGIN": "stx simulate",
               "SIMULATE": (True, "simulated DESI-like spectra (stx simulate)"), "SIMSEED": cfg.seed,
               "SIMVERS": VERSION}
    writers.write_desi_coadd(spectra_dir / fname, fibermap=fm, exp_fibermap=efm, arms=arms, scores=scores, primary=primary)
    truth = {k: np.concatenate([_truth_common(part["pop"], part["p"], part["crb"])[k] for part in parts])
             for k in _truth_common(parts[0]["pop"], parts[0]["p"], parts[0]["crb"])}
    truth.update({"id": targetid.astype(str), "snr": snr["r"], "snr_b": snr["b"], "snr_r": snr["r"], "snr_z": snr["z"],
                  "file": np.full(n, f"spectra/{fname}"), "row": np.arange(n, dtype=np.int64)})
    return truth


# ------------------------------------------------------------------------------------ a run


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def run(cfg: SimConfig, out_dir: Path, *, workers: int = 1, progress: Callable[[int], None] | None = None,
        unit_fn: Callable[..., dict[str, np.ndarray]] | None = None, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Simulate ``cfg`` into ``out_dir`` (created atomically). Returns a summary."""
    from stxcli.io import atomic_dir

    cfg.validate()
    plan = units(cfg)
    fn = unit_fn or run_unit
    with atomic_dir(out_dir) as tmp:
        (tmp / "spectra").mkdir()
        results = list(_map_units(fn, cfg, plan, str(tmp), workers, progress))
        truth = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        finish(cfg, tmp, truth, extra_meta)
    return summary(cfg, out_dir, truth)


def _map_units(fn: Callable[..., dict[str, np.ndarray]], cfg: SimConfig, plan: list[tuple[int, int, int]], tmp: str,
               workers: int, progress: Callable[[int], None] | None):
    if workers <= 1 or len(plan) == 1:
        for u, s, e in plan:
            r = fn(cfg, u, s, e, tmp)
            if progress:
                progress(e - s)
            yield r
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    for k in saved:
        os.environ[k] = "1"  # spawned workers inherit: one BLAS thread per process
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init) as ex:
            futures = [ex.submit(fn, cfg, u, s, e, tmp) for u, s, e in plan]
            for fut, (_, s, e) in zip(futures, plan):
                r = fut.result()
                if progress:
                    progress(e - s)
                yield r
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def finish(cfg: SimConfig, tmp: Path, truth: dict[str, np.ndarray], extra_meta: dict[str, Any] | None = None) -> None:
    """Write truth.fits, labels.fits and simulation.json into the run directory."""
    order = ["id", "teff", "logg", "feh", "alpha_fe", "snr", "rv_kms", "teff_crb", "logg_crb", "feh_crb", "alpha_fe_crb"]
    cols = {k: truth[k] for k in order if k in truth}
    cols.update({k: v for k, v in truth.items() if k not in cols})
    meta = {"SURVEY": cfg.survey, "SIMSEED": cfg.seed, "SIMVERS": VERSION, "ORIGIN": "stx simulate"}
    catalogs.write_table(tmp / "truth.fits", cols, meta)
    labels_survey = cfg.survey if cfg.survey in catalogs.SYSTEMATICS else "desi"
    lab = catalogs.catalog_labels(labels_survey, cfg.seed, truth["index"], truth)
    catalogs.write_table(tmp / "labels.fits", lab, {**meta, "LABELSRC": f"{labels_survey}-like catalog"})
    doc = {"stx_simulate_version": VERSION, "config": cfg.to_json(), "n_spectra": int(truth["id"].size),
           "files": sorted({str(f) for f in truth["file"]}) if truth["file"].size <= 2000 else None,
           "n_files": int(np.unique(truth["file"]).size)}
    if extra_meta:
        doc.update(extra_meta)
    (tmp / "simulation.json").write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def summary(cfg: SimConfig, out_dir: Path, truth: dict[str, np.ndarray]) -> dict[str, Any]:
    def pct(a: np.ndarray) -> list[float]:
        a = a[np.isfinite(a)]
        return [float(x) for x in np.percentile(a, [5, 50, 95])] if a.size else []

    return {
        "survey": cfg.survey, "n": int(truth["id"].size), "seed": cfg.seed, "out": str(out_dir),
        "n_files": int(np.unique(truth["file"]).size), "snr_p5_p50_p95": pct(truth["snr"]),
        "feh_below_minus1": float(np.mean(truth["feh"] < -1.0)),
        "teff_crb_median": float(np.nanmedian(truth["teff_crb"])) if np.isfinite(truth["teff_crb"]).any() else None,
        "feh_crb_median": float(np.nanmedian(truth["feh_crb"])) if np.isfinite(truth["feh_crb"]).any() else None,
    }


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not force:
        if out.is_dir() and any(out.iterdir()):
            raise StxError(f"{out}: output directory exists and is not empty (use --force to replace it)")
        if not out.is_dir():
            raise StxError(f"{out}: exists and is not a directory")
