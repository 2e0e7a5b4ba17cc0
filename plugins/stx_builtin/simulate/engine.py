"""Run a simulation: chunks of stars, optionally in parallel, streamed to disk.

A run is a list of *units* (LAMOST-like: up to ``chunk`` one-star files; DESI-like: one coadd file
of up to ``per_file`` spectra). Each unit is a pure function of the configuration and its star
indices: labels and observation parameters come from counter-based random numbers
(:mod:`.rng`), noise from per-star generators seeded by (seed, star index). Units run in worker
processes (forked after the templates are built, so they share them; one BLAS thread each) and
write their files directly into the run's temporary directory; the main process only gathers the per-star truth rows, then writes
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
from . import library as library_mod

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
                 seed: int, post_noise: Callable[[observe.Observed], None] | None = None,
                 ) -> tuple[observe.Observed, dict[str, np.ndarray], np.ndarray]:
    """Noiseless observation, noise and (with_crb) Cramer-Rao bounds of one sub-batch.
    ``post_noise`` may mask pixels (e.g. outside a library's coverage) before the bounds."""
    group = crb.GROUP if with_crb else 1
    clean = model.noiseless(hires, p, group)
    if with_crb:
        nominal, jac = {}, {}
        for a, rows in clean.items():
            nominal[a], jac[a] = crb.split_jacobian(rows)
    else:
        nominal, jac = clean, {}
    obs = model.add_noise(nominal, p, seed)
    if post_noise is not None:
        post_noise(obs)
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


def run_unit(cfg: SimConfig, unit: int, start: int, stop: int, out_dir: str,
             lib: "library_mod.Library | None" = None) -> dict[str, np.ndarray]:
    """Simulate stars ``start .. stop - 1`` and write their file(s) into ``out_dir``; return the
    per-star truth columns. With ``lib`` (the library rows of this unit) the spectra are the
    library's, observed through the same model."""
    from threadpoolctl import threadpool_limits

    # one BLAS thread: workers do not oversubscribe the cores, and every unit computes the same
    # bytes whether it runs in this process or in a worker
    with threadpool_limits(limits=1):
        return _run_unit(cfg, unit, start, stop, out_dir, lib)


def _run_unit(cfg: SimConfig, unit: int, start: int, stop: int, out_dir: str,
              lib: "library_mod.Library | None") -> dict[str, np.ndarray]:
    model = get_model(cfg.survey) if lib is None else library_mod.library_model(cfg.survey, lib)
    spectra_dir = Path(out_dir) / "spectra"
    parts: list[dict[str, Any]] = []
    smooth = library_mod.smoothing_matrix(lib) if (lib is not None and cfg.with_crb) else None
    for s0 in range(start, stop, SUB_BATCH):
        s1 = min(s0 + SUB_BATCH, stop)
        if lib is None:
            pop = populations.sample(s1 - s0, cfg.seed, mix=cfg.mix, phases=cfg.phases, teff_range=cfg.teff_range,
                                     start=s0)
            p = observe.draw_params(cfg.survey, cfg.seed, pop.index, cfg.snr, pop.rv_kms)
            hires = synth_rows(pop.teff, pop.logg, pop.feh, pop.alpha_fe, cfg.with_crb)
            obs, nominal, bounds = observe_rows(model, hires, p, cfg.with_crb, cfg.seed)
            parts.append({"pop": pop, "p": p, "obs": obs, "crb": bounds})
        else:
            parts.append(_library_part(cfg, model, lib.subset(slice(s0 - start, s1 - start)), s0, smooth))
    if cfg.survey == "lamost":
        truth = _write_lamost(cfg, model, parts, spectra_dir)
    else:
        truth = _write_desi(cfg, model, parts, spectra_dir, unit)
    if lib is not None:
        truth["source_id"] = np.concatenate([part["source_id"] for part in parts])
    return truth


def _library_part(cfg: SimConfig, model: observe.SurveyModel, lib: "library_mod.Library", start: int,
                  smooth: Any) -> dict[str, Any]:
    idx = np.arange(start, start + lib.n, dtype=np.int64)
    rv = library_mod.draw_rv(cfg.seed, idx)
    pop = populations.Population(index=idx, teff=lib.teff, logg=lib.logg, feh=lib.feh, alpha_fe=lib.alpha_fe,
                                 component=np.full(lib.n, -1, np.int8), phase=np.full(lib.n, -1, np.int8), rv_kms=rv)
    p = observe.draw_params(cfg.survey, cfg.seed, idx, cfg.snr, rv)
    hires, cov = library_mod.to_hires(lib)
    if cfg.with_crb:  # the library spectrum times the model's relative response to each label
        model_rows = observe.apply_matrix(smooth, synth_rows(lib.teff, lib.logg, lib.feh, lib.alpha_fe, True))
        g = model_rows.reshape(lib.n, crb.GROUP, -1)
        stacked = hires[:, None, :] * (g / np.maximum(g[:, :1, :], 1e-30))
        rows = stacked.reshape(lib.n * crb.GROUP, -1).astype(np.float32)
    else:
        rows = hires
    flat = observe.ObsParams(**{**p.__dict__, "ebv": np.zeros(lib.n), "cal": np.zeros_like(p.cal),
                                "dichroic": np.zeros(lib.n), "airmass": np.zeros(lib.n), "pwv": np.zeros(lib.n)})
    covered = {a: v > 0.999 for a, v in model.noiseless(cov, flat, 1).items()}

    def mask_uncovered(obs: observe.Observed) -> None:
        for a, ok in covered.items():
            obs.ivar[a][~ok] = 0.0
            obs.flux[a][~ok] = 0.0
            obs.mask[a][~ok] = True
            if obs.bits[a].dtype == np.uint32:
                obs.bits[a][~ok] |= observe.DESI_MASK["ALLBADPIX"]

    obs, nominal, bounds = observe_rows(model, rows, p, cfg.with_crb, cfg.seed, post_noise=mask_uncovered)
    return {"pop": pop, "p": p, "obs": obs, "crb": bounds, "source_id": lib.ids}


def _truth_common(pop: populations.Population, p: observe.ObsParams, bounds: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "index": pop.index, "teff": pop.teff, "logg": pop.logg, "feh": pop.feh, "alpha_fe": pop.alpha_fe,
        "rv_kms": pop.rv_kms, "teff_crb": bounds[:, 0], "logg_crb": bounds[:, 1], "feh_crb": bounds[:, 2],
        "alpha_fe_crb": bounds[:, 3],
        "component": np.where(pop.component >= 0, np.array(populations.COMPONENTS + ("",))[pop.component], "library"),
        "phase": np.where(pop.phase >= 0, np.array(populations.PHASES + ("",))[pop.phase], "library"),
        "ebv": p.ebv, "lsf_scale": p.lsf_scale,
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


def run(cfg: SimConfig, out_dir: Path, *, workers: int = 1, progress: Callable[[int], None] | None = None,
        lib: "library_mod.Library | None" = None, extra_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Simulate ``cfg`` (or observe the library ``lib``) into ``out_dir`` (created atomically).
    Returns a summary."""
    from stxcli.io import atomic_dir

    if lib is not None:
        cfg.n = lib.n
        cfg.chunk = max(cfg.chunk, -(-lib.n // max(workers, 1)))  # a library unit builds its own model
    cfg.validate()
    plan = units(cfg)
    with atomic_dir(out_dir) as tmp:
        (tmp / "spectra").mkdir()
        results = list(_map_units(cfg, plan, str(tmp), workers, progress, lib))
        truth = {k: np.concatenate([r[k] for r in results]) for k in results[0]}
        finish(cfg, tmp, truth, extra_meta, library=lib is not None)
    return summary(cfg, out_dir, truth)


def _map_units(cfg: SimConfig, plan: list[tuple[int, int, int]], tmp: str, workers: int,
               progress: Callable[[int], None] | None, lib: "library_mod.Library | None"):
    def sub(s: int, e: int) -> "library_mod.Library | None":
        return None if lib is None else lib.subset(slice(s, e))

    if workers <= 1 or len(plan) == 1:
        for u, s, e in plan:
            r = run_unit(cfg, u, s, e, tmp, sub(s, e))
            if progress:
                progress(e - s)
            yield r
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    if lib is None:  # built once here; forked workers share them
        synth.build_templates()
        get_model(cfg.survey)
    ctx = mp.get_context("fork") if hasattr(os, "fork") else mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
        futures = [ex.submit(run_unit, cfg, u, s, e, tmp, sub(s, e)) for u, s, e in plan]
        for fut, (_, s, e) in zip(futures, plan):
            r = fut.result()
            if progress:
                progress(e - s)
            yield r


#: Typical uncertainties of a stellar library's compiled labels (MILES: Cenarro et al. 2007).
LIBRARY_LABEL_ERR = {"teff": 80.0, "logg": 0.2, "feh": 0.15, "alpha_fe": np.nan}


def finish(cfg: SimConfig, tmp: Path, truth: dict[str, np.ndarray], extra_meta: dict[str, Any] | None = None,
           library: bool = False) -> None:
    """Write truth.fits, labels.fits and simulation.json into the run directory. For a library
    run the catalog labels are the library's own labels (they are also the truth)."""
    order = ["id", "teff", "logg", "feh", "alpha_fe", "snr", "rv_kms", "teff_crb", "logg_crb", "feh_crb", "alpha_fe_crb"]
    cols = {k: truth[k] for k in order if k in truth}
    cols.update({k: v for k, v in truth.items() if k not in cols})
    meta = {"SURVEY": cfg.survey, "SIMSEED": cfg.seed, "SIMVERS": VERSION, "ORIGIN": "stx simulate"}
    catalogs.write_table(tmp / "truth.fits", cols, meta)
    if library:
        lab = {"id": truth["id"], "source_id": truth["source_id"]}
        for k in catalogs.LABEL_COLUMNS:
            lab[k] = truth[k]
            lab[f"{k}_err"] = np.full(truth["id"].size, LIBRARY_LABEL_ERR[k])
        lab["snr"] = truth["snr"]
        src = "library catalog labels"
    else:
        lab = catalogs.catalog_labels(cfg.survey, cfg.seed, truth["index"], truth)
        src = f"{cfg.survey}-like catalog"
    catalogs.write_table(tmp / "labels.fits", lab, {**meta, "LABELSRC": src})
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
