"""Accuracy on simulated data: pre-train on LAMOST-like stars, fine-tune and test on DESI-like stars.

    python benchmarks/bench_accuracy.py [--work DIR] [--n-pretrain 5000] [--n-finetune 100,300,1000,3000]
        [--n-test 2000] [--hidden 256,128] [--pre-epochs 60] [--ft-epochs 80] [--threads 2] [--quick]

Issue 6's accuracy benchmark, run entirely through the stx CLI (in-process):

1. ``stx simulate``: N_pre LAMOST-like stars (pre-training; their catalog labels carry the
   simulated LAMOST systematics), a pool of DESI-like fine-tuning stars (catalog labels) and a
   separate DESI-like test set (scored against its truth, which carries Cramer-Rao bounds).
   The issue's sizes are 100k / 3,000 / 10k; the defaults here fit a shared 2-core machine.
2. ``stx featurize`` (raw) each set once; nested seeded subsets of the fine-tuning pool
   (the first N of one permutation), so every strategy of a size sees the same stars.
3. ``stx pretrain`` an MLP on the LAMOST-like store; zero-shot ``stx predict`` on the test set.
4. For each size N: ``stx finetune --adapter residual|lora|full|auto``, ``stx finetune --scratch``
   (the same MLP trained on the N target stars alone), ``stx pretrain --head ridge`` and, when the
   stx-cannon plugin is installed, ``--head cannon`` on the same N stars; predict; evaluate.
5. Writes benchmarks/results/accuracy[-quick].json: per row MAE, bias, robust scatter, 1/2-sigma
   fractions, scatter/CRB, overall, split at true [Fe/H] = -1 and per SNR bin; MAE ratios to
   zero-shot and ridge measured in this run; and the issue's target checks.
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
from _acc import ADAPTERS, LABELS, log  # noqa: E402
from _common import write  # noqa: E402


def parse_sizes(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


def checks(rows: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    """The issue's targets, evaluated on overall MAE: with 1,000 target stars (or the largest size
    below) every fine-tuned model beats zero-shot on every label; the MLP beats ridge."""
    n_ref = max([n for n in sizes if n <= 1000] or [min(sizes)])
    zs = next(r for r in rows if r["strategy"] == "zero-shot")
    out: dict[str, Any] = {"n_target_for_check": n_ref, "finetuned_beats_zero_shot": {}, "mlp_beats_ridge": {}}
    for a in ADAPTERS:
        r = next((x for x in rows if x["strategy"] == a and x["n_ft"] == n_ref), None)
        if r is None:
            continue
        out["finetuned_beats_zero_shot"][a] = {lab: bool(_acc.mae(r, lab) < _acc.mae(zs, lab)) for lab in LABELS}
    out["all_finetuned_beat_zero_shot"] = all(all(v.values()) for v in out["finetuned_beats_zero_shot"].values())
    for n in sizes:
        ridge = next((x for x in rows if x["strategy"] == "ridge" and x["n_ft"] == n), None)
        if ridge is None:
            continue
        d: dict[str, Any] = {}
        for who in ("scratch-mlp", "best-finetuned"):
            if who == "best-finetuned":
                cands = [x for x in rows if x["n_ft"] == n and x["strategy"] in ADAPTERS]
                d[who] = {lab: bool(min(_acc.mae(x, lab) for x in cands) < _acc.mae(ridge, lab)) for lab in LABELS}
            else:
                r = next((x for x in rows if x["strategy"] == who and x["n_ft"] == n), None)
                if r is not None:
                    d[who] = {lab: bool(_acc.mae(r, lab) < _acc.mae(ridge, lab)) for lab in LABELS}
        # zero-shot MLP (no target star) against ridge trained on n target stars
        d["zero-shot"] = {lab: bool(_acc.mae(zs, lab) < _acc.mae(ridge, lab)) for lab in LABELS}
        out["mlp_beats_ridge"][str(n)] = d
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, help="work directory (data, stores, models); default bench-accuracy[-quick]")
    ap.add_argument("--n-pretrain", type=int, default=5000, help="LAMOST-like pre-training stars (issue: 100000)")
    ap.add_argument("--n-finetune", default="100,300,1000",
                    help="fine-tuning sizes (DESI-like stars; the issue adds 3000: about 25 more minutes here)")
    ap.add_argument("--n-pool", type=int, default=3000,
                    help="DESI-like fine-tuning pool simulated (the sizes are nested subsets of it)")
    ap.add_argument("--n-test", type=int, default=2000, help="DESI-like test stars (issue: 10000)")
    ap.add_argument("--hidden", default="256,128", help="MLP widths")
    ap.add_argument("--pre-epochs", type=int, default=60)
    ap.add_argument("--ft-epochs", type=int, default=80)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cannon", action="store_true", help="skip the Cannon baseline even when installed")
    ap.add_argument("--quick", action="store_true",
                    help="600 / 100,300 / 300 stars, 15 epochs (a smoke test in a few minutes)")
    args = ap.parse_args()
    if args.quick:
        args.n_pretrain, args.n_finetune, args.n_test, args.n_pool = 600, "100,300", 300, 300
        args.pre_epochs = args.ft_epochs = 15
    sizes = parse_sizes(args.n_finetune)
    w = (args.work or Path("bench-accuracy-quick" if args.quick else "bench-accuracy")).resolve()
    (w / "features").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. data (seeds and id offsets keep the three sets distinct)
    sims = {
        "lamost": _acc.simulate(w / "lamost", "--survey", "lamost", "-n", args.n_pretrain, "--seed", 11,
                                "--id-offset", 0),
        "desi_ft": _acc.simulate(w / "desi_ft", "--survey", "desi", "-n", max(args.n_pool, *sizes), "--seed", 12,
                                 "--id-offset", 10_000_000),
        "desi_test": _acc.simulate(w / "desi_test", "--survey", "desi", "-n", args.n_test, "--seed", 13,
                                   "--id-offset", 20_000_000),
    }
    t_sim = time.perf_counter() - t_start
    # 2. features
    t0 = time.perf_counter()
    stores = {k: _acc.featurize([w / k / "spectra"], w / "features" / f"{k}.h5", w / k / "labels.fits", "id")
              for k in sims}
    t_feat = time.perf_counter() - t0
    pool = _acc.labelled_rows(stores["desi_ft"])
    perm = np.random.default_rng(args.seed).permutation(pool)
    sizes = [n for n in sizes if n <= perm.size]
    ft_stores = {n: _acc.subset(stores["desi_ft"], perm[:n], w / "features" / f"desi_ft_{n}.h5") for n in sizes}
    truth = w / "desi_test" / "truth.fits"

    # 3. pre-train + zero-shot
    base = w / "models" / "base"
    log(f"pretrain on {args.n_pretrain} LAMOST-like stars")
    t0 = time.perf_counter()
    pre = _acc.model_info(base) if (base / "manifest.json").exists() else _acc.stx("pretrain", stores["lamost"], "-o", base, "--labels", ",".join(LABELS), "--set",
                   f"hidden={args.hidden}", "--epochs", args.pre_epochs, "--seed", args.seed, "--threads", args.threads)
    t_pre = time.perf_counter() - t0
    rows: list[dict[str, Any]] = []

    def score(strategy: str, n: int, model: Path, info: dict[str, Any]) -> None:
        pred = _acc.predict(model, stores["desi_test"], w / "pred" / f"{strategy}-{n}.fits")
        rep = _acc.evaluate(pred, truth, w / "reports" / f"{strategy}-{n}")
        rows.append({"n_ft": n, "strategy": strategy, **info, "metrics": _acc.metrics(rep)})
        m = rows[-1]["metrics"]
        log(f"  {strategy:12s} N={n:5d}: MAE " + ", ".join(f"{lab} {_acc.fmt(_acc.mae(rows[-1], lab), lab)}"
                                                         for lab in LABELS) + f" ({info.get('train_s') or 0:.0f} s)")
        del m

    (w / "pred").mkdir(exist_ok=True)
    score("zero-shot", 0, base, {"n_target": 0, "trainable_params": 0, "train_s": 0.0})
    strategies = [*ADAPTERS, "scratch-mlp", "ridge"]
    cannon = _acc.have_cannon() and not args.no_cannon
    if cannon:
        strategies.append("cannon")
    # 4. every strategy at every size
    for n in sizes:
        for s in strategies:
            log(f"N={n}: {s}")
            out = w / "models" / f"{s}-{n}"
            info = _acc.train_or_reuse(s, base, ft_stores[n], out, seed=args.seed, threads=args.threads,
                              pre_epochs=args.pre_epochs, ft_epochs=args.ft_epochs, val_frac=0.2)
            score(s, n, out, info)
    _acc.add_ratios(rows, ["n_ft"])
    result = {
        "command": "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "note": (f"sizes scaled to a shared 2-core machine: pre-training on {args.n_pretrain} simulated "
                 f"LAMOST-like stars (issue: 100,000), test on {args.n_test} DESI-like stars (issue: 10,000); "
                 f"MLP hidden={args.hidden}, {args.pre_epochs} pre-training / {args.ft_epochs} fine-tuning "
                 "epochs at most (early stopping on a 20 % validation split of the given stars)"),
        "sizes": {"n_pretrain": args.n_pretrain, "n_finetune": sizes, "n_pool": int(perm.size), "n_test": _acc.n_rows(stores["desi_test"])},
        "labels": {"pretrain": "LAMOST-like catalog labels (simulated LAMOST systematics)",
                   "finetune": "DESI-like catalog labels", "test": "truth (with Cramer-Rao bounds)"},
        "hidden": args.hidden, "epochs": {"pretrain": args.pre_epochs, "finetune": args.ft_epochs},
        "seed": args.seed, "threads": args.threads, "cannon": cannon,
        "times": ("train_s: wall seconds of the stx command in this run (null: the model was reused from an "
                  "interrupted run in the same work directory); train_time_s: the training's own time, "
                  "from the model's manifest; both on a shared, loaded machine"),
        "pretrain": {k: pre.get(k) for k in ("n_train", "n_val", "n_target", "trainable_params", "train_time_s")
                     if k in pre},
        "rows": rows,
        "checks": checks(rows, sizes),
        "seconds": {"simulate": round(t_sim, 1), "featurize": round(t_feat, 1), "pretrain": round(t_pre, 1),
                    "total": round(time.perf_counter() - t_start, 1), "by_command": _acc.step_times()},
    }
    write("accuracy-quick" if args.quick else "accuracy", result)
    print(_acc.markdown_table(rows, ["n_ft"]), file=sys.stderr)


if __name__ == "__main__":
    main()
