"""Accuracy on simulated data: pre-train on LAMOST-like stars, fine-tune and test on DESI-like stars.

    python benchmarks/bench_accuracy.py [--work DIR] [--device cpu|cuda] [--workers N]
        [--n-pretrain 100000] [--n-finetune 100,300,1000,3000] [--n-test 10000]
        [--hidden 256,128] [--pre-epochs 60] [--ft-epochs 80] [--pre-batch-size N]
        [--result NAME] [--quick]

Issue 6's accuracy benchmark, run entirely through the stx CLI (in-process). The defaults are the
issue's sizes (100,000 pre-training stars; 100, 300, 1,000 and 3,000 fine-tuning stars; 10,000
test stars): about 7 minutes on a 16-core machine with one H100 (``--device cuda --workers 16``),
hours on 2 CPU cores. A smaller local check (``--n-pretrain 3000 --n-finetune 100,300 --n-test
1000 --result accuracy-small``) writes its own result file.

1. ``stx simulate``: N_pre LAMOST-like stars (pre-training; their catalog labels carry the
   simulated LAMOST systematics), a pool of DESI-like fine-tuning stars (catalog labels) and a
   separate DESI-like test set (scored against its truth, which carries Cramer-Rao bounds; the
   two training sets skip the bounds, which nothing reads: same spectra, 1.7x faster).
2. ``stx featurize`` (raw) each set once; nested seeded subsets of the fine-tuning pool
   (the first N of one permutation), so every strategy of a size sees the same stars.
3. ``stx pretrain`` an MLP on the LAMOST-like store; zero-shot ``stx predict`` on the test set.
4. For each size N: ``stx finetune --adapter residual|lora|full|auto``, ``stx finetune --scratch``
   (the same MLP trained on the N target stars alone), ``stx pretrain --head ridge`` and, when the
   stx-cannon plugin is installed, ``--head cannon`` on the same N stars; predict; evaluate.
5. Writes benchmarks/results/accuracy[-quick].json (or ``--result NAME``): per row MAE, bias,
   robust scatter, 1/2-sigma fractions, scatter/CRB, overall, split at true [Fe/H] = -1 and per
   SNR bin; MAE ratios to zero-shot and ridge measured in this run; the issue's target checks
   (at 1,000 target stars); learning curves and the scratch / fine-tuned MAE ratio per size; the
   machine (CPU cores, GPU) and wall seconds per stage.

Every stage logs its start and its wall time (flushed), so a killed run's log says where it was;
rerun with the same ``--work`` to continue: finished outputs are reused (see _acc.py).
"""

from __future__ import annotations

import argparse
import sys
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
    ap.add_argument("--device", default="cpu", help="torch device of pretrain / finetune / predict: cpu or cuda")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of stx simulate and stx featurize")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: --workers)")
    ap.add_argument("--n-pretrain", type=int, default=100_000, help="LAMOST-like pre-training stars")
    ap.add_argument("--n-finetune", default="100,300,1000,3000", help="fine-tuning sizes (DESI-like stars)")
    ap.add_argument("--n-pool", type=int, help="DESI-like fine-tuning pool simulated (default: the largest "
                    "size; the sizes are nested subsets of it)")
    ap.add_argument("--n-test", type=int, default=10_000, help="DESI-like test stars")
    ap.add_argument("--hidden", default="256,128", help="MLP widths")
    ap.add_argument("--pre-epochs", type=int, default=60, help="maximum epochs of pretrain and of the "
                    "target-only MLP (early stopping on the validation split)")
    ap.add_argument("--ft-epochs", type=int, default=80, help="maximum fine-tuning epochs (early stopping)")
    ap.add_argument("--pre-batch-size", type=int, help="minibatch of the pre-training (default: stx's, 256)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cannon", action="store_true", help="skip the Cannon baseline even when installed")
    ap.add_argument("--result", help="result name: benchmarks/results/NAME.json (default accuracy, "
                    "accuracy-quick with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="600 / 100,300 / 300 stars, 15 epochs (a smoke test in a few minutes)")
    args = ap.parse_args()
    if args.quick:
        args.n_pretrain, args.n_finetune, args.n_test, args.n_pool = 600, "100,300", 300, 300
        args.pre_epochs = args.ft_epochs = 15
    sizes = parse_sizes(args.n_finetune)
    n_pool = args.n_pool or max(sizes)
    settings = _acc.configure(device=args.device, workers=args.workers, threads=args.threads)
    result_name = args.result or ("accuracy-quick" if args.quick else "accuracy")
    w = (args.work or Path("bench-accuracy-quick" if args.quick else "bench-accuracy")).resolve()
    (w / "features").mkdir(parents=True, exist_ok=True)
    stage = _acc.Stages()
    log(f"accuracy benchmark: {args.n_pretrain} pre-training, sizes {sizes} (pool {n_pool}), {args.n_test} test "
        f"stars; device {settings['device']}, {settings['workers']} workers, {settings['threads']} torch threads; "
        f"work {w}")

    # 1. data (seeds and id offsets keep the three sets distinct)
    with stage("simulate"):
        _acc.simulate(w / "lamost", "--survey", "lamost", "--id-offset", 0, n=args.n_pretrain, seed=11, crb=False)
        _acc.simulate(w / "desi_ft", "--survey", "desi", "--id-offset", 10_000_000, n=max(n_pool, *sizes),
                      seed=12, crb=False)
        _acc.simulate(w / "desi_test", "--survey", "desi", "--id-offset", 20_000_000, n=args.n_test, seed=13)
    # 2. features
    with stage("featurize"):
        stores = {k: _acc.featurize([w / k / "spectra"], w / "features" / f"{k}.h5", w / k / "labels.fits", "id")
                  for k in ("lamost", "desi_ft", "desi_test")}
        pool = _acc.labelled_rows(stores["desi_ft"])
        perm = np.random.default_rng(args.seed).permutation(pool)
        sizes = [n for n in sizes if n <= perm.size]
        ft_stores = {n: _acc.subset(stores["desi_ft"], perm[:n], w / "features" / f"desi_ft_{n}.h5") for n in sizes}
    truth = w / "desi_test" / "truth.fits"

    # 3. pre-train + zero-shot
    base = w / "models" / "base"
    with stage("pretrain"):
        log(f"pretrain on {args.n_pretrain} LAMOST-like stars")
        pre = _acc.pretrain([stores["lamost"]], base, hidden=args.hidden, epochs=args.pre_epochs, seed=args.seed,
                            batch_size=args.pre_batch_size)
        log(f"  {pre.get('n_target')} stars, {pre.get('trainable_params')} weights, "
            f"{pre.get('train_time_s') or 0:.0f} s of training")
    rows: list[dict[str, Any]] = []
    (w / "pred").mkdir(exist_ok=True)

    def score(strategy: str, n: int, model: Path, info: dict[str, Any]) -> None:
        pred = _acc.predict(model, stores["desi_test"], w / "pred" / f"{strategy}-{n}.fits")
        rep = _acc.evaluate(pred, truth, w / "reports" / f"{strategy}-{n}")
        rows.append({"n_ft": n, "strategy": strategy, **info, "metrics": _acc.metrics(rep)})
        log(f"  {strategy:12s} N={n:5d}: MAE " + ", ".join(f"{lab} {_acc.fmt(_acc.mae(rows[-1], lab), lab)}"
                                                         for lab in LABELS)
            + f" (train {info.get('train_s') or 0:.0f} s)")

    with stage("zero-shot"):
        score("zero-shot", 0, base, {"n_target": 0, "trainable_params": 0, "train_s": 0.0})
    strategies = [*ADAPTERS, "scratch-mlp", "ridge"]
    cannon = _acc.have_cannon() and not args.no_cannon
    if cannon:
        strategies.append("cannon")
    # 4. every strategy at every size
    for n in sizes:
        with stage(f"N={n}"):
            for s in strategies:
                log(f"N={n}: {s}")
                out = w / "models" / f"{s}-{n}"
                info = _acc.train_or_reuse(s, base, ft_stores[n], out, seed=args.seed, pre_epochs=args.pre_epochs,
                                           ft_epochs=args.ft_epochs, val_frac=0.2)
                score(s, n, out, info)
    _acc.add_ratios(rows, ["n_ft"])
    issue_sizes = (args.n_pretrain == 100_000 and args.n_test == 10_000
                   and set(sizes) >= {100, 300, 1000, 3000})
    machine = settings["device"] + (f" ({_acc.accelerator().get('gpu')})" if settings["device"] != "cpu" else "")
    result = {
        "command": "python benchmarks/bench_accuracy.py " + " ".join(sys.argv[1:]),
        "quick": args.quick,
        "note": (("the issue's sizes: " if issue_sizes else "reduced sizes (issue: 100,000 / 100-3,000 / 10,000): ")
                 + f"pre-training on {args.n_pretrain} simulated LAMOST-like stars, fine-tuning on {sizes} "
                 f"DESI-like stars, test on {args.n_test} DESI-like stars; MLP hidden={args.hidden}, "
                 f"{args.pre_epochs} pre-training / {args.ft_epochs} fine-tuning epochs at most (early stopping on "
                 f"a 20 % validation split of the given stars); torch on {machine}"),
        "issue_sizes": issue_sizes,
        "sizes": {"n_pretrain": args.n_pretrain, "n_finetune": sizes, "n_pool": int(perm.size),
                  "n_test": _acc.n_rows(stores["desi_test"])},
        "labels": {"pretrain": "LAMOST-like catalog labels (simulated LAMOST systematics)",
                   "finetune": "DESI-like catalog labels", "test": "truth (with Cramer-Rao bounds)"},
        "hidden": args.hidden, "epochs": {"pretrain": args.pre_epochs, "finetune": args.ft_epochs},
        "pre_batch_size": args.pre_batch_size or "stx default (256)",
        "seed": args.seed, "threads": settings["threads"], "workers": settings["workers"],
        "accelerator": _acc.accelerator(), "cannon": cannon,
        "times": ("train_s: wall seconds of the stx command in this run (null: the model was reused from an "
                  "interrupted run in the same work directory); train_time_s: the training's own time, "
                  "from the model's manifest"),
        "pretrain": {k: pre.get(k) for k in ("n_target", "trainable_params", "train_time_s", "train_s", "epochs_run",
                                             "best_epoch", "stopped_early") if k in pre},
        "rows": rows,
        "checks": checks(rows, sizes),
        "learning_curves": _acc.learning_curves(rows, sizes),
        "pretraining_gain": _acc.pretraining_gain(rows, sizes),
        "seconds": {**stage.seconds, "total": stage.total(), "by_command": _acc.step_times(),
                    "note": "wall seconds per stage of this invocation (a stage whose outputs were reused from "
                            "an earlier run in the same work directory costs ~0 here)"},
    }
    write(result_name, result)
    print(_acc.markdown_table(rows, ["n_ft"]), file=sys.stderr)


if __name__ == "__main__":
    main()
