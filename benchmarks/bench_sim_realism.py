"""Sim-to-real: the simulator with and without its line-strength calibration, checked on real stars.

    python benchmarks/bench_sim_realism.py [--work DIR] [--n-train 3000] [--workers 2] [--mlp] [--ladder] [--quick]

Two simulators: ``uncalibrated`` (the model before the strength calibration: constant 3 % line
cores, no per-group corrections, its own SED correction; :func:`synth.strength_override` with
None) and ``calibrated`` (what ``stx simulate`` ships, fitted by tools/make_example_data.py on the
even-OBSID half of the real LAMOST DR10 stars; see docs/simulator.md).

1. **Spectra** (no training): noiseless LAMOST-like spectra at the LASP labels of the real DR10
   stars, and spectra at MILES resolution at the MILES labels, featurized like the real ones by
   the default ``raw`` featurizer. Reported: the weighted mean squared difference (units of
   (1 %)^2, the fit's objective) on the calibration half and the held-out half (odd OBSID), and
   the median real / simulated ratio of Lick-like line indices (realism.INDICES) by Teff class.
   MILES is never used by the calibration (its continuum shape only, by the SED correction).
   ``--ladder``: the diagnosis, the same objective with more and more of the calibration free.
2. **Zero-shot** (the real test): per simulator, ``stx simulate --survey lamost --n N --seed 11``
   (truth labels), ``stx featurize``, ``stx pretrain --head ridge`` (``--mlp``: also a small MLP),
   ``stx predict`` on the 1,037 real DR10 spectra (LASP labels) and on the 709 MILES stars
   observed DESI-like (``stx simulate --survey desi --library``, no bounds, seed 14; the same
   files for both simulators). Bias (median of predicted - catalogue) and MAE per label.

Writes benchmarks/results/sim_realism[-quick].json. Every step runs in-process (the uncalibrated
simulator is the calibrated one's code with the calibration switched off for that call).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, loadavg, write  # noqa: E402

LABELS = ("teff", "logg", "feh")
VARIANTS = ("uncalibrated", "calibrated")
TEFF_CLASSES = (("4000-5200", 4000, 5200), ("5200-5800", 5200, 5800), ("5800-6300", 5800, 6300),
                ("6300-7800", 6300, 7800))
MILES_CLASSES = (("M <4000", 0, 4000), ("K 4000-5200", 4000, 5200), ("G 5200-6000", 5200, 6000),
                 ("F 6000-7500", 6000, 7500), ("A/B >7500", 7500, 1e9))


def log(msg: str) -> None:
    print(f"[sim_realism {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stx(*args: object) -> dict[str, Any]:
    """``stx ARGS --json`` in-process; its JSON summary."""
    from stxcli import console
    from stxcli.cli.main import main

    argv = [str(a) for a in args] + ["--json"]
    out, err = io.StringIO(), io.StringIO()
    quiet = console._state["quiet"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        console.set_quiet(quiet)
    if code != 0:
        raise SystemExit(f"failed ({code}): stx {' '.join(argv)}\n{err.getvalue()[-2000:]}")
    text = out.getvalue().strip()
    return json.loads(text) if text.startswith(("{", "[")) else {}


def calibration(variant: str) -> Any:
    from stx_builtin.simulate import synth

    return None if variant == "uncalibrated" else synth.strength_calibration()


# ------------------------------------------------------------------------------ 1. spectra


def _miles(featurizer: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Real MILES features (fits1d reader, 2.5 A FWHM) and labels (teff, logg, feh, alpha)."""
    from stx_builtin.readers.fits1d import Fits1dReader
    from stx_builtin.simulate.calibrate import default_alpha

    rows = [r for r in csv.DictReader(open(SHARED / "miles" / "labels.csv")) if r["teff"] and r["logg"] and r["feh"]]
    reader = Fits1dReader()
    feats = np.array([featurizer.transform(next(reader.read(SHARED / "miles" / "spectra" / r["file"]))).features[0]
                      for r in rows])
    lab = np.array([[float(r["teff"]), float(r["logg"]), float(r["feh"])] for r in rows])
    return feats, np.c_[lab, default_alpha(lab[:, 2])], np.array([r["miles_id"] for r in rows])


def _simulate_miles(labels: np.ndarray, featurizer: Any) -> np.ndarray:
    """Simulated spectra at MILES resolution (2.5 A FWHM, the MILES air grid) featurized as MILES."""
    from stx_builtin.simulate import observe, synth
    from stxcli.spectra import Arm, SpectrumBatch, SpectrumMeta, air_to_vacuum

    vac = air_to_vacuum(3540.5 + 0.9 * np.arange(4300))
    m = observe.gaussian_resampler(vac, np.full(vac.size, 2.5), log_pixels=False)
    out = []
    for s in range(0, labels.shape[0], 64):
        lab = labels[s:s + 64]
        f = observe.apply_matrix(m, synth.synthesize(*lab.T)).astype(np.float64)
        f /= np.median(f, axis=1, keepdims=True)
        meta = SpectrumMeta.empty(f.shape[0], "miles", "simulated")
        meta.rv_kms = np.zeros(f.shape[0])
        arm = Arm(name="m", wave=vac, flux=f.astype(np.float32), ivar=(1e4 / f**2).astype(np.float32),
                  mask=np.zeros(f.shape, bool), resolving_power=vac / 2.5)
        out.append(featurizer.transform(SpectrumBatch(arms=[arm], meta=meta).validate()).features)
    return np.concatenate(out)


def _index_table(wave: np.ndarray, real: np.ndarray, real_ivar: np.ndarray, sim: np.ndarray, teff: np.ndarray,
                 classes: tuple[tuple[str, float, float], ...]) -> dict[str, Any]:
    from stx_builtin.simulate import realism

    ir = realism.line_indices(wave, np.where(real_ivar > 0, real, np.nan))
    is_ = realism.line_indices(wave, sim)
    out: dict[str, Any] = {}
    for k, nm in enumerate(realism.INDEX_NAMES):
        row: dict[str, Any] = {}
        for cname, lo, hi in (("all", 0, 1e9), *classes):
            sel = (teff >= lo) & (teff < hi) & np.isfinite(ir[:, k])
            if sel.sum() < 5:
                continue
            r, s = float(np.median(ir[sel, k])), float(np.median(is_[sel, k]))
            row[cname] = {"n": int(sel.sum()), "real": round(r, 3), "sim": round(s, 3),
                          "ratio": round(r / s, 3) if s != 0 else None}
        out[nm] = row
    return out


def spectra_stage(quick: bool) -> dict[str, Any]:
    from stx_builtin.featurizers.raw import RawFeaturizer
    from stx_builtin.simulate import calibrate, synth

    fz = RawFeaturizer()
    wave = fz.axis()
    dr10 = calibrate.load_lamost_dr10(SHARED / "lamost-dr10-train", fz, half="all")
    odd = np.array([int(i) % 2 == 1 for i in dr10.ids])
    snr = {r["obsid"]: float(r["snrg"]) for r in csv.DictReader(open(SHARED / "lamost-dr10-train" / "labels.csv"))}
    good = np.array([snr[i] > 30 for i in dr10.ids])
    weights = calibrate.objective_weights(dr10, wave)
    miles_f, miles_lab, _ = _miles(fz)
    miles_iv = np.ones_like(miles_f)
    if quick:
        keep = np.arange(dr10.n) % 5 == 0
        dr10 = calibrate.TrainingSet(dr10.features[keep], dr10.ivar[keep], dr10.labels[keep], dr10.ids[keep])
        odd, good, weights = odd[keep], good[keep], weights[keep]
        mk = np.arange(miles_lab.shape[0]) % 5 == 0
        miles_f, miles_lab, miles_iv = miles_f[mk], miles_lab[mk], miles_iv[mk]
    out: dict[str, Any] = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        with synth.strength_override(calibration(v)):
            sim = calibrate.simulate_features(dr10.labels, fz)[0]
            sim_m = _simulate_miles(miles_lab, fz)
        res = {
            "objective_calibration_half": round(calibrate.mean_sq_residual(dr10.features[~odd], sim[~odd],
                                                                            weights[~odd]), 3),
            "objective_held_out_half": round(calibrate.mean_sq_residual(dr10.features[odd], sim[odd], weights[odd]), 3),
            "dr10_held_out_indices": _index_table(wave, dr10.features[odd & good], dr10.ivar[odd & good],
                                                  sim[odd & good], dr10.labels[odd & good, 0], TEFF_CLASSES),
            "miles_indices": _index_table(wave, miles_f, miles_iv, sim_m, miles_lab[:, 0], MILES_CLASSES),
        }
        out[v] = res
        log(f"spectra {v}: objective {res['objective_calibration_half']} (calibration half) / "
            f"{res['objective_held_out_half']} (held-out half) ({time.perf_counter() - t0:.0f} s)")
    out["n_dr10"] = {"calibration_half": int((~odd).sum()), "held_out_half": int(odd.sum()),
                     "held_out_snr_gt_30": int((odd & good).sum())}
    out["n_miles"] = int(miles_lab.shape[0])
    return out


def ladder_stage() -> dict[str, Any]:
    """The diagnosis: the fit's objective with more and more of the calibration free (one outer
    iteration each; the shipped calibration is the last rung with two)."""
    from stx_builtin.featurizers.raw import RawFeaturizer
    from stx_builtin.simulate import calibrate, synth

    fz = RawFeaturizer()
    wave = fz.axis()
    fit = calibrate.load_lamost_dr10(SHARED / "lamost-dr10-train", fz, half="even")
    held = calibrate.load_lamost_dr10(SHARED / "lamost-dr10-train", fz, half="odd")
    w_held = calibrate.objective_weights(held, wave)
    ts = synth.build_templates()
    zero = np.zeros(ts.k)
    rungs: list[tuple[str, Any]] = [
        ("uncalibrated", None),
        ("Eddington-Barbier cores, t_surface 0.75 (nothing fitted)",
         synth.StrengthCalibration(a=zero, b=zero, c=zero, theta_range=(0.6, 1.3), logg_range=(1.5, 4.8),
                                   r_scale=1.0, t_surface=0.75)),
    ]
    for free, name in (("", "t_surface and r_scale fitted"), ("a", "+ one log gf per template row")):
        cal, _ = calibrate.fit_strength(fit, fz, free=free, n_outer=1, log=log)
        rungs.append((name, cal))
    rungs.append(("+ Teff and log g slopes (shipped)", synth.strength_calibration()))
    out = []
    for name, cal in rungs:
        with synth.strength_override(cal):
            held_sim = calibrate.simulate_features(held.labels, fz)[0]
            fit_sim = calibrate.simulate_features(fit.labels, fz)[0]
        row = {"model": name,
               "objective_calibration_half": round(calibrate.mean_sq_residual(
                   fit.features, fit_sim, calibrate.objective_weights(fit, wave)), 3),
               "objective_held_out_half": round(calibrate.mean_sq_residual(held.features, held_sim, w_held), 3)}
        if cal is not None:
            row.update(t_surface=round(cal.t_surface, 3), r_scale=round(cal.r_scale, 3))
        out.append(row)
        log(f"ladder: {row}")
    return {"rungs": out}


# ----------------------------------------------------------------------------- 2. zero-shot


def _pred_table(path: Path) -> dict[str, dict[str, float]]:
    from astropy.table import Table

    t = Table.read(path)
    return {str(i): {lab: float(t[lab][k]) for lab in LABELS} for k, i in enumerate(t["id"])}


def _scores(pred: dict[str, dict[str, float]], truth: dict[str, tuple[float, float, float]],
            subsets: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, keep in subsets.items():
        ids = [i for i in truth if i in pred and keep(truth[i])]
        if not ids:
            continue
        p = np.array([[pred[i][lab] for lab in LABELS] for i in ids])
        t = np.array([truth[i] for i in ids])
        d = p - t
        out[name] = {"n": len(ids), **{lab: {"bias": round(float(np.median(d[:, j])), 3 if j else 0),
                                             "mae": round(float(np.mean(np.abs(d[:, j]))), 3 if j else 0)}
                                       for j, lab in enumerate(LABELS)}}
    return out


def zero_shot_stage(work: Path, n_train: int, workers: int, mlp: bool, epochs: int) -> dict[str, Any]:
    from stx_builtin.simulate import synth

    dr10 = SHARED / "lamost-dr10-train"
    stores = work / "features"
    stores.mkdir(parents=True, exist_ok=True)
    dr10_store = stores / "dr10.h5"
    if not dr10_store.exists():
        files = work / "dr10_files.txt"
        files.write_text("\n".join(str(dr10 / r["file"]) for r in csv.DictReader(open(dr10 / "labels.csv"))) + "\n")
        stx("featurize", files, "-o", dr10_store, "--labels", dr10 / "labels.csv", "--id-column", "obsid",
            "--workers", workers)
    miles_dir = work / "miles_desi"
    if not (miles_dir / "simulation.json").exists():
        stx("simulate", "--survey", "desi", "--library", SHARED / "miles" / "spectra", "--labels",
            SHARED / "miles" / "labels.csv", "--seed", 14, "--id-offset", 30_000_000, "--no-crb", "-o", miles_dir,
            "-j", workers, "--force")
    miles_store = stores / "miles_desi.h5"
    if not miles_store.exists():
        stx("featurize", miles_dir / "spectra", "-o", miles_store, "--labels", miles_dir / "truth.fits", "--workers",
            workers)
    truth_dr10 = {r["obsid"]: (float(r["teff"]), float(r["logg"]), float(r["feh"]))
                  for r in csv.DictReader(open(dr10 / "labels.csv"))}
    from astropy.table import Table

    tm = Table.read(miles_dir / "truth.fits")
    truth_miles = {str(i): (float(a), float(b), float(c))
                   for i, a, b, c in zip(tm["id"], tm["teff"], tm["logg"], tm["feh"])}
    dom = lambda t: 3500 <= t[0] <= 7500  # noqa: E731  the simulated training range
    dr10_sets = {"all": lambda t: True}
    odd_ids = {i for i in truth_dr10 if int(i) % 2 == 1}
    miles_sets = {"in_domain": dom, "in_domain_feh>=-1": lambda t: dom(t) and t[2] >= -1,
                  "in_domain_feh<-1": lambda t: dom(t) and t[2] < -1,
                  "in_domain_dwarfs": lambda t: dom(t) and t[1] >= 3.5,
                  "in_domain_giants": lambda t: dom(t) and t[1] < 3.5,
                  "in_domain_feh<-1_giants": lambda t: dom(t) and t[2] < -1 and t[1] < 3.0}
    heads = [("ridge", ["--head", "ridge"])]
    if mlp:
        heads.append(("mlp", ["--head", "mlp", "--set", "hidden=256,128", "--epochs", epochs, "--threads", workers]))
    out: dict[str, Any] = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        sim_dir = work / f"sim_{v}"
        with synth.strength_override(calibration(v)):
            if not (sim_dir / "simulation.json").exists():
                stx("simulate", "--survey", "lamost", "-n", n_train, "--seed", 11, "--no-crb", "-o", sim_dir,
                    "-j", workers, "--force")
        store = stores / f"sim_{v}.h5"
        if not store.exists():
            stx("featurize", sim_dir / "spectra", "-o", store, "--labels", sim_dir / "truth.fits", "--workers", workers)
        res: dict[str, Any] = {}
        for head, opts in heads:
            model = work / "models" / f"{head}_{v}"
            if not (model / "manifest.json").exists():
                stx("pretrain", store, "-o", model, *opts, "--seed", 0)
            pd = _pred_table(_predict(model, dr10_store, work / "pred" / f"{head}_{v}_dr10.fits"))
            pm = _pred_table(_predict(model, miles_store, work / "pred" / f"{head}_{v}_miles.fits"))
            held = {i: truth_dr10[i] for i in odd_ids}
            res[head] = {"dr10": {**_scores(pd, truth_dr10, dr10_sets),
                                  **_scores(pd, held, {"held_out_half": lambda t: True})},
                         "miles_desi": _scores(pm, truth_miles, miles_sets)}
            s = res[head]["dr10"]["all"]
            m = res[head]["miles_desi"]["in_domain"]
            log(f"zero-shot {head} {v}: DR10 bias/MAE "
                + ", ".join(f"{lab} {s[lab]['bias']}/{s[lab]['mae']}" for lab in LABELS)
                + "; MILES in domain " + ", ".join(f"{lab} {m[lab]['bias']}/{m[lab]['mae']}" for lab in LABELS))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        out[v] = res
    return out


def _predict(model: Path, store: Path, out: Path) -> Path:
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        stx("predict", model, store, "-o", out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work directory (default bench-sim-realism[-quick])")
    ap.add_argument("--n-train", type=int, default=3000, help="simulated LAMOST-like training stars per simulator")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--mlp", action="store_true", help="also a small MLP head (hidden 256,128)")
    ap.add_argument("--epochs", type=int, default=40, help="MLP epochs")
    ap.add_argument("--ladder", action="store_true", help="also refit the calibration with fewer free parts (the "
                    "diagnosis; ~10 min of CPU)")
    ap.add_argument("--quick", action="store_true", help="1/5 of the stars in the spectra stage, 600 training stars")
    args = ap.parse_args()
    if args.quick:
        args.n_train = min(args.n_train, 600)
    import torch

    torch.set_num_threads(args.workers)
    work = (args.work or Path("bench-sim-realism-quick" if args.quick else "bench-sim-realism")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from stx_builtin.simulate import synth

    cal = synth.strength_calibration()
    if cal is None:
        raise SystemExit("no strength calibration shipped: run python tools/make_example_data.py")
    t0 = time.perf_counter()
    load0 = loadavg()
    spectra = spectra_stage(args.quick)
    t_spec = time.perf_counter() - t0
    ladder = ladder_stage() if args.ladder else None
    zs = zero_shot_stage(work, args.n_train, args.workers, args.mlp, args.epochs)
    write("sim_realism", {
        "calibration": {"t_surface": cal.t_surface, "r_scale": cal.r_scale,
                        "rows": int(cal.a.size), "theta_range": list(cal.theta_range),
                        "logg_range": list(cal.logg_range),
                        "fitted_on": "lamost-dr10-train, even OBSID (calibration half)"},
        "spectra": spectra,
        **({"ladder": ladder} if ladder else {}),
        "zero_shot": {"n_train": args.n_train, "train_labels": "truth.fits of stx simulate --survey lamost --seed 11",
                      "dr10": "1,037 real LAMOST DR10 spectra, LASP labels (held_out_half: odd OBSID, not fitted)",
                      "miles_desi": "709 MILES stars observed DESI-like (seed 14, no bounds), Cenarro et al. labels; "
                                    "in_domain: 3500 <= Teff <= 7500 K (the training range)",
                      "bias": "median(predicted - catalogue)", **zs},
        "seconds": {"spectra": round(t_spec, 1), "total": round(time.perf_counter() - t0, 1)},
        "loadavg_start": load0, "loadavg_end": loadavg(),
    })


if __name__ == "__main__":
    main()
