"""Accuracy on real stars: pre-train on simulated and/or real LAMOST, fine-tune and test on MILES.

    python benchmarks/bench_real.py [--work DIR] [--device cpu|cuda] [--workers N]
        [--sim-store STORE | --n-sim 5000] [--folds 3] [--sizes 50,100,200,all]
        [--adapters residual,lora,full,auto] [--hidden 256,128] [--pre-epochs 60] [--ft-epochs 80]
        [--result NAME] [--quick]

Issue 6's real-data benchmark, run entirely through the stx CLI (in-process):

* sources (pre-training), one raw featurizer config for all:
  (a) ``sim``: simulated LAMOST-like stars (``stx simulate --survey lamost``, catalog labels; or
  the store bench_accuracy.py made, via --sim-store), (b) ``real``: the 1,037 real LAMOST DR10
  stars of ../shared/data/lamost-dr10-train with their LASP pipeline labels, (c) ``both``:
  ``stx pretrain`` on the two stores together;
* target: the real MILES stars (../shared/data/miles, Cenarro et al. 2007 labels) observed
  DESI-like by ``stx simulate --library`` (709 stars with Teff, log g and [Fe/H]);
* k-fold on the target: the stars are split once (seeded) into k folds; for each fold the other
  folds are the fine-tuning pool, of which nested seeded subsets of 50, 100, 200 and all stars
  are used. For each size, every base is fine-tuned with each adapter, and the target-only
  baselines (the same MLP from scratch, ridge, the Cannon when installed) are trained on the same
  stars. The k test folds' predictions are stacked, so each star is predicted exactly once per
  row, and evaluated once (MAE, bias, robust scatter, 1/2-sigma fractions, [Fe/H] split,
  SNR bins; the simulator's model CRBs for the MILES stars);
* zero-shot rows: each base predicts every MILES star as is;
* sim-to-real on the source side: the simulation-pretrained base predicts the 1,037 real LAMOST
  DR10 spectra, scored against their LASP labels.

Writes benchmarks/results/real[-quick].json (or ``--result NAME``) with MAE ratios to zero-shot
(same base) and to ridge (same size) measured in this run, and per row the MAE of each test fold
(``fold_mae``: the fold-to-fold spread that says which differences are noise). Every stage logs
its wall time as it ends; a rerun with the same ``--work`` reuses what is finished (see _acc.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _acc  # noqa: E402
from _acc import LABELS, log  # noqa: E402
from _common import SHARED, write  # noqa: E402

BASES = ("sim", "real", "both")
#: Teff range (K) of the simulated pre-training population; 13 % of the MILES stars are hotter.
TEFF_DOMAIN = (3500.0, 7500.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work directory; default bench-real[-quick]")
    ap.add_argument("--device", default="cpu", help="torch device of pretrain / finetune / predict: cpu or cuda")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of stx simulate and stx featurize")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: --workers)")
    ap.add_argument("--shared", type=Path, default=SHARED, help="the shared data folder (miles/, "
                    "lamost-dr10-train/); on a machine where the stores are already in --work/features, only "
                    "lamost-dr10-train/labels.csv is read from it")
    ap.add_argument("--result", help="result name: benchmarks/results/NAME.json (default real, real-quick with "
                    "--quick)")
    ap.add_argument("--sim-store", type=Path, help="raw feature store of simulated LAMOST-like stars to reuse "
                    "(e.g. bench-accuracy/features/lamost.h5); default: simulate --n-sim stars")
    ap.add_argument("--n-sim", type=int, default=5000, help="simulated LAMOST-like stars when --sim-store is not given")
    ap.add_argument("--folds", type=int, default=3, help="k of the k-fold split of the MILES stars")
    ap.add_argument("--sizes", default="50,100,200,all", help="fine-tuning sizes per fold ('all': the whole pool)")
    ap.add_argument("--adapters", default="residual,lora,full,auto", help="adapters to fine-tune each base "
                    "with (auto trains the three candidates on its own split, so costs about their sum)")
    ap.add_argument("--hidden", default="256,128")
    ap.add_argument("--pre-epochs", type=int, default=60)
    ap.add_argument("--ft-epochs", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cannon", action="store_true")
    ap.add_argument("--quick", action="store_true", help="2 folds, sizes 50,all, residual only, 15 epochs, "
                    "600 simulated stars")
    args = ap.parse_args()
    if args.quick:
        args.folds, args.sizes, args.adapters, args.n_sim = 2, "50,all", "residual", 600
        args.pre_epochs = args.ft_epochs = 15
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()]
    settings = _acc.configure(device=args.device, workers=args.workers, threads=args.threads)
    w = (args.work or Path("bench-real-quick" if args.quick else "bench-real")).resolve()
    fdir = w / "features"
    fdir.mkdir(parents=True, exist_ok=True)
    stage = _acc.Stages()
    log(f"real-data benchmark: {args.folds} folds, sizes {args.sizes}, adapters {adapters}; device "
        f"{settings['device']}, {settings['workers']} workers, {settings['threads']} torch threads; work {w}")

    # --- data and features
    t_start = time.perf_counter()
    shared = args.shared.resolve()
    _acc.simulate(w / "miles_desi", "--survey", "desi", "--library", shared / "miles" / "spectra",
                  "--labels", shared / "miles" / "labels.csv", "--id-offset", 30_000_000, seed=14)
    miles_store = _acc.featurize([w / "miles_desi" / "spectra"], fdir / "miles_desi.h5",
                                 w / "miles_desi" / "labels.fits", "id")
    truth = w / "miles_desi" / "truth.fits"
    truth_dom = w / "truth_in_domain.fits"  # the MILES stars inside the pre-training Teff range
    if not truth_dom.exists():
        from astropy.table import Table

        t = Table.read(truth)
        t[(t["teff"] >= TEFF_DOMAIN[0]) & (t["teff"] <= TEFF_DOMAIN[1])].write(truth_dom, overwrite=True)
    dr10 = shared / "lamost-dr10-train"
    real_store = fdir / "lamost_dr10.h5"
    if not real_store.exists():  # listing the spectra only when they are needed
        _acc.featurize([_acc.file_list(dr10 / "spectra", w / "dr10_files.txt")], real_store, dr10 / "labels.csv",
                       "obsid")
    if args.sim_store is not None:
        sim_store = args.sim_store.resolve()
        sim_info = f"reused {sim_store}"
    else:
        _acc.simulate(w / "lamost_sim", "--survey", "lamost", "--id-offset", 0, n=args.n_sim, seed=11, crb=False)
        sim_store = _acc.featurize([w / "lamost_sim" / "spectra"], fdir / "lamost_sim.h5",
                                   w / "lamost_sim" / "labels.fits", "id")
        sim_info = f"stx simulate --survey lamost -n {args.n_sim} --seed 11"
    stage.seconds["data_and_features"] = t_data = round(time.perf_counter() - t_start, 1)
    log(f"== data and features: {t_data:.1f} s")

    # --- bases
    sources = {"sim": [sim_store], "real": [real_store], "both": [sim_store, real_store]}
    bases: dict[str, Path] = {}
    pre_info: dict[str, Any] = {}
    with stage("pretrain"):
        for b in BASES:
            bases[b] = w / "models" / f"base-{b}"
            log(f"pretrain base '{b}'")
            info = _acc.pretrain(sources[b], bases[b], hidden=args.hidden, epochs=args.pre_epochs, seed=args.seed)
            pre_info[b] = {"stores": [str(p) for p in sources[b]],
                           **{k: info.get(k) for k in ("n_target", "trainable_params", "train_time_s", "train_s")
                              if k in info}}

    rows: list[dict[str, Any]] = []
    (w / "pred").mkdir(exist_ok=True)

    def add(base: str, strategy: str, size: str, pred: Path, info: dict[str, Any]) -> None:
        rep = _acc.evaluate(pred, truth, w / "reports" / f"{base}-{strategy}-{size}")
        dom = _acc.evaluate(pred, truth_dom, w / "reports" / f"{base}-{strategy}-{size}-in-domain")
        rows.append({"base": base, "n_ft": size, "strategy": strategy, **info, "metrics": _acc.metrics(rep),
                     "metrics_in_domain": _acc.metrics(dom)})
        log(f"  {base:5s} {strategy:12s} N={size:>4s}: MAE " + ", ".join(
            f"{lab} {_acc.fmt(_acc.mae(rows[-1], lab), lab)}" for lab in LABELS))

    # --- zero-shot on every MILES star
    with stage("zero-shot"):
        for b in BASES:
            add(b, "zero-shot", "0", _acc.predict(bases[b], miles_store, w / "pred" / f"zs-{b}.fits"),
                {"n_target": 0, "trainable_params": 0, "train_s": 0.0})

    # --- k-fold fine-tuning
    t0 = time.perf_counter()
    stars = _acc.labelled_rows(miles_store)
    perm = np.random.default_rng(args.seed).permutation(stars)
    folds = np.array_split(perm, args.folds)
    size_names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    target_only = ["scratch-mlp", "ridge"] + (["cannon"] if _acc.have_cannon() and not args.no_cannon else [])
    runs = [(b, a) for b in BASES for a in adapters] + [("target-only", t) for t in target_only]
    parts: dict[tuple[str, str, str], list[Path]] = {}
    infos: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for k, test_rows in enumerate(folds):
        pool = np.concatenate([f for j, f in enumerate(folds) if j != k])  # in the seeded order
        test = _acc.subset(miles_store, test_rows, fdir / f"fold{k}-test.h5")
        with stage(f"fold {k}"):
            for size in size_names:
                n = pool.size if size == "all" else int(size)
                if n > pool.size:
                    raise SystemExit(f"size {n} > the {pool.size} stars of a fold's pool")
                ft = _acc.subset(miles_store, pool[:n], fdir / f"fold{k}-ft{size}.h5")
                for b, strategy in runs:
                    log(f"fold {k} N={size}: {b} {strategy}")
                    out = w / "models" / f"fold{k}" / f"{b}-{strategy}-{size}"
                    info = _acc.train_or_reuse(strategy, bases["sim" if b == "target-only" else b], ft, out,
                                               seed=args.seed, pre_epochs=args.pre_epochs,
                                               ft_epochs=args.ft_epochs, val_frac=0.2)
                    key = (b, strategy, size)
                    parts.setdefault(key, []).append(
                        _acc.predict(out, test, w / "pred" / f"fold{k}-{b}-{strategy}-{size}.fits"))
                    infos.setdefault(key, []).append(info)
    for (b, strategy, size), preds in parts.items():
        inf = infos[(b, strategy, size)]
        stacked = _acc.stack_catalogs(preds, w / "pred" / f"kfold-{b}-{strategy}-{size}.fits")
        secs = [i.get("train_s") for i in inf]
        add(b, strategy, size, stacked, {
            "n_target": round(float(np.mean([i["n_target"] for i in inf])), 1),
            "trainable_params": inf[0]["trainable_params"],
            "train_s": None if None in secs else round(float(sum(secs)), 1),
            "train_time_s": round(float(sum(i.get("train_time_s") or 0.0 for i in inf)), 1),
            "fold_mae": _acc.fold_mae(preds, truth),
            **({"auto_choice": [i.get("auto_choice") for i in inf]} if strategy == "auto" else {})})
    t_kfold = time.perf_counter() - t0
    # ratios: fine-tuned rows against the same base's zero-shot; everything against ridge of the same size
    for r in rows:
        r["mae_ratio"] = {}
        for ref, match in (("zero-shot", lambda x: x["base"] == r["base"]),
                           ("ridge", lambda x: x["n_ft"] == r["n_ft"])):
            refr = next((x for x in rows if x["strategy"] == ref and match(x)), None)
            if refr is None or refr is r:
                continue
            r["mae_ratio"][f"to_{ref}"] = {lab: {sk: (None if _acc.mae(r, lab, sk) is None or not _acc.mae(refr, lab, sk)
                                                      else round(_acc.mae(r, lab, sk) / _acc.mae(refr, lab, sk), 3))
                                                 for sk in ("all", "feh<-1", "feh>=-1")} for lab in LABELS}

    # --- sim-to-real on the source side: simulation-pretrained base on real LAMOST DR10
    pred = _acc.predict(bases["sim"], real_store, w / "pred" / "sim-on-dr10.fits")
    rep = _acc.evaluate(pred, dr10 / "labels.csv", w / "reports" / "sim-on-dr10", id_column="obsid")
    source_side = {"model": "base 'sim'", "data": "1,037 real LAMOST DR10 spectra, LASP labels",
                   "metrics": _acc.metrics(rep)}
    log("sim -> real LAMOST DR10: MAE " + ", ".join(
        f"{lab} {_acc.fmt((source_side['metrics'][lab]['all'] or {}).get('mae'), lab)}" for lab in LABELS))

    result = {
        "command": "python benchmarks/bench_real.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "note": (f"{args.folds}-fold on the MILES stars; fine-tuning sizes {args.sizes} per fold (nested seeded "
                 f"subsets of the fold's pool, 20 % of them for validation / early stopping); MLP hidden="
                 f"{args.hidden}; the k test folds' predictions are stacked and evaluated once"),
        "sources": {"sim": sim_info, "real": "lamost-dr10-train (1,037 real stars, LASP labels)",
                    "both": "stx pretrain on the sim and real stores together (weight 1 each)"},
        "target": "MILES (real, Cenarro et al. 2007 labels) observed DESI-like: stx simulate --survey desi "
                  "--library ../shared/data/miles/spectra --labels ../shared/data/miles/labels.csv --seed 14",
        "in_domain": f"metrics_in_domain: the MILES stars with {TEFF_DOMAIN[0]:.0f} <= Teff <= {TEFF_DOMAIN[1]:.0f} K "
                     "(the simulated pre-training range), same predictions",
        "n_target_stars": int(stars.size), "folds": args.folds, "fold_sizes": [int(f.size) for f in folds],
        "sizes": size_names, "adapters": adapters, "target_only": target_only,
        "hidden": args.hidden, "epochs": {"pretrain": args.pre_epochs, "finetune": args.ft_epochs},
        "seed": args.seed, "threads": settings["threads"], "workers": settings["workers"],
        "accelerator": _acc.accelerator(), "pretrain": pre_info,
        "fold_mae": "per row and label: overall MAE of each test fold (the same models' predictions, fold by fold)",
        "rows": rows, "sim_to_real_source": source_side,
        "seconds": {**stage.seconds, "kfold": round(t_kfold, 1),
                    "total": stage.total(), "by_command": _acc.step_times(),
                    "note": "wall seconds of this invocation (stages reused from an earlier run in the same work "
                            "directory cost ~0 here)"},
    }
    write(args.result or ("real-quick" if args.quick else "real"), result)
    print(_acc.markdown_table(rows, ["base", "n_ft"]), file=sys.stderr)


if __name__ == "__main__":
    main()
