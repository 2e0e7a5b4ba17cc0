"""Shared steps of the accuracy benchmarks (bench_accuracy.py, bench_real.py).

Every step is a real ``stx`` command run in-process (as ``stx demo`` does), so the benchmarks
measure exactly what users run; each command's wall time is recorded. Outputs that already exist
in the work directory (simulated sets, feature stores) are reused, so strategies share one
featurized store and a re-run only redoes the training.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

LABELS = ("teff", "logg", "feh")
ADAPTERS = ("residual", "lora", "full", "auto")
#: Metrics copied from an evaluate report for each label and subset.
KEYS = ("n", "mae", "bias", "scatter", "frac_1sigma", "frac_2sigma", "median_crb", "scatter_over_crb")
#: (command, seconds) of every stx command run.
STEP_TIMES: list[tuple[str, float]] = []


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def stx(*args: object) -> dict[str, Any]:
    """Run ``stx ARGS --json`` in-process; return its JSON summary (raise on failure)."""
    from stxcli import console
    from stxcli.cli.main import main

    argv = [str(a) for a in args] + ["--json"]
    out, err = io.StringIO(), io.StringIO()
    quiet = console._state["quiet"]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    finally:
        console.set_quiet(quiet)
        STEP_TIMES.append((str(args[0]), time.perf_counter() - t0))
    if code != 0:
        raise SystemExit(f"failed ({code}): stx {' '.join(argv)}\n{err.getvalue()[-2000:]}")
    text = out.getvalue().strip()
    return json.loads(text) if text.startswith(("{", "[")) else {}


def step_times() -> dict[str, float]:
    tot: dict[str, float] = {}
    for cmd, sec in STEP_TIMES:
        tot[cmd] = round(tot.get(cmd, 0.0) + sec, 1)
    return tot


def simulate(out: Path, *args: object) -> dict[str, Any]:
    """``stx simulate ... -o OUT`` unless OUT already holds a finished simulation."""
    done = out / "simulation.json"
    if done.exists():
        log(f"reuse {out}")
        return json.loads(done.read_text())
    log(f"simulate {out.name}: {' '.join(map(str, args))}")
    return stx("simulate", *args, "-o", out, "-j", 2, "--force")


def featurize(inputs: Sequence[object], out: Path, labels: Path, id_column: str,
              extra: Sequence[object] = ()) -> Path:
    """``stx featurize`` (raw featurizer, 2 workers) unless the store exists."""
    if out.exists():
        log(f"reuse {out}")
        return out
    log(f"featurize -> {out.name}")
    stx("featurize", *inputs, "-o", out, "--labels", labels, "--id-column", id_column, "--workers", 2, *extra)
    return out


def file_list(folder: Path, out: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".fits", ".fits.gz", ".fit")))
    out.write_text("\n".join(str(p) for p in files) + "\n")
    return out


def labelled_rows(store: Path) -> np.ndarray:
    """Rows of a store with every label finite."""
    from stxcli.store import FeatureStore

    with FeatureStore.open(store) as st:
        y = st.labels(list(LABELS))
    return np.flatnonzero(np.isfinite(y).all(1))


def n_rows(store: Path) -> int:
    from stxcli.store import FeatureStore

    with FeatureStore.open(store) as st:
        return int(st.n)


def subset(store: Path, rows: np.ndarray, out: Path) -> Path:
    from stxcli.store import subset_store

    subset_store(store, np.sort(rows), out)
    return out


def have_cannon() -> bool:
    from stxcli.registry import get_registry

    return "cannon" in get_registry().names("head")


def train(strategy: str, base: Path | None, ft: Path, out: Path, *, seed: int, threads: int,
          pre_epochs: int, ft_epochs: int, val_frac: float) -> dict[str, Any]:
    """Train one strategy on the fine-tuning store ``ft``; return trainable params, stars, seconds."""
    common = ["--seed", seed, "--val-frac", val_frac]
    t0 = time.perf_counter()
    if strategy in ADAPTERS:
        s = stx("finetune", base, ft, "--adapter", strategy, "-o", out, "--epochs", ft_epochs,
                "--threads", threads, *common)
    elif strategy == "scratch-mlp":
        s = stx("finetune", base, ft, "--scratch", "-o", out, "--epochs", pre_epochs, "--threads", threads, *common)
    elif strategy in ("ridge", "cannon"):
        s = stx("pretrain", ft, "--head", strategy, "-o", out, "--labels", ",".join(LABELS),
                "--threads", threads, *common)
    else:
        raise ValueError(strategy)
    n = s.get("n_target_stars")
    if n is None and s.get("n_train") is not None:
        n = int(s["n_train"]) + int(s.get("n_val") or 0)
    info = {"n_target": n, "trainable_params": s.get("trainable_params", s.get("n_params")),
            "train_s": round(time.perf_counter() - t0, 2)}
    if strategy == "auto":
        info["auto_choice"] = s.get("selection")
    return info


def model_info(model: Path) -> dict[str, Any]:
    """Target stars, trainable parameters, training time (the model's own record) and, for auto,
    the adapter chosen per label, from a model directory's manifest."""
    m = json.loads((model / "manifest.json").read_text())
    t = m.get("training") or {}
    n = t.get("n_target_stars")
    if n is None and t.get("n_train") is not None:
        n = int(t["n_train"]) + int(t.get("n_val") or 0)
    info = {"n_target": n, "trainable_params": t.get("trainable_params"), "train_time_s": t.get("train_time_s")}
    sel = (m.get("adapter") or {}).get("selection")
    if sel:
        info["auto_choice"] = sel
    return info


def train_or_reuse(strategy: str, base: Path | None, ft: Path, out: Path, **kw: Any) -> dict[str, Any]:
    """:func:`train` unless ``out`` already holds a finished model (an interrupted run resumed)."""
    if (out / "manifest.json").exists():
        log(f"  reuse {out.name}")
        return {**model_info(out), "train_s": None, "reused": True}
    return {**train(strategy, base, ft, out, **kw), **model_info(out)}


def predict(model: Path, store: Path, out: Path) -> Path:
    stx("predict", model, store, "-o", out)
    return out


def evaluate(pred: Path, truth: Path, out: Path, id_column: str = "id") -> dict[str, Any]:
    return stx("evaluate", pred, truth, "-o", out, "--no-plots", "--id-column", id_column)


def stack_catalogs(parts: Iterable[Path], out: Path) -> Path:
    """Concatenate prediction catalogs (k-fold test folds) into one for a single evaluation."""
    from astropy.io import fits
    from astropy.table import Table, vstack

    tabs = []
    for p in parts:
        with fits.open(p) as hdul:
            hdu = hdul["PREDICTIONS"] if "PREDICTIONS" in hdul else next(h for h in hdul if h.is_image is False)
            tabs.append(Table(hdu.data))
    t = vstack(tabs, metadata_conflicts="silent")
    hdu = fits.BinTableHDU(t, name="PREDICTIONS")
    fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(out, overwrite=True)
    return out


def _pick(m: dict[str, Any] | None) -> dict[str, Any] | None:
    if not m or not m.get("n"):
        return None
    return {k: m.get(k) for k in KEYS if m.get(k) is not None}


def metrics(report: dict[str, Any]) -> dict[str, Any]:
    """Per label: overall, [Fe/H] < -1 / >= -1 (true [Fe/H]) and per-SNR-bin metrics."""
    split = report.get("feh_split") or {}
    out: dict[str, Any] = {"n_stars": report.get("n_stars")}
    for lab in LABELS:
        d: dict[str, Any] = {"all": _pick((report.get("overall") or {}).get(lab))}
        for key in ("feh<-1", "feh>=-1"):
            d[key] = _pick((split.get(key) or {}).get(lab))
        d["snr_bins"] = {b["name"]: _pick((b.get("metrics") or {}).get(lab)) for b in report.get("snr_bins") or []}
        out[lab] = d
    return out


def mae(row: dict[str, Any], lab: str, subset_key: str = "all") -> float | None:
    m = (row["metrics"].get(lab) or {}).get(subset_key)
    return None if not m else m.get("mae")


def add_ratios(rows: list[dict[str, Any]], group_keys: Sequence[str]) -> None:
    """``mae_ratio``: each row's MAE over the zero-shot and ridge MAE of its group (same run)."""
    for r in rows:
        group = [x for x in rows if all(x.get(k) == r.get(k) for k in group_keys)]
        ratios: dict[str, Any] = {}
        for ref in ("zero-shot", "ridge"):
            ref_rows = [x for x in group if x["strategy"] == ref]
            if not ref_rows and ref == "zero-shot":
                # zero-shot has no fine-tuning size: match on every key but n_ft
                ref_rows = [x for x in rows if x["strategy"] == ref and all(
                    x.get(k) == r.get(k) for k in group_keys if k != "n_ft")]
            if not ref_rows or r["strategy"] == ref:
                continue
            ratios[f"to_{ref}"] = {}
            for lab in LABELS:
                ratios[f"to_{ref}"][lab] = {}
                for sk in ("all", "feh<-1", "feh>=-1"):
                    a, b = mae(r, lab, sk), mae(ref_rows[0], lab, sk)
                    ratios[f"to_{ref}"][lab][sk] = None if a is None or not b else round(a / b, 3)
        r["mae_ratio"] = ratios


def fmt(v: float | None, lab: str) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if lab == "teff" else f"{v:.3f}"


def markdown_table(rows: list[dict[str, Any]], lead: Sequence[str], key: str = "metrics") -> str:
    """MAE / robust scatter per label (all, [Fe/H]<-1, >=-1), sigma/CRB and 1-sigma fraction."""
    head = list(lead) + ["strategy", "params"]
    for lab in LABELS:
        head += [f"{lab} MAE / scat", f"{lab} MP", f"{lab} MR", f"{lab} <1σ", f"{lab} σ/CRB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.get(k, "")) for k in lead] + [r["strategy"], str(r.get("trainable_params") or "-")]
        for lab in LABELS:
            m = r[key][lab]
            a, mp, mr = m.get("all") or {}, m.get("feh<-1") or {}, m.get("feh>=-1") or {}
            cells.append(f"{fmt(a.get('mae'), lab)} / {fmt(a.get('scatter'), lab)}")
            cells.append(fmt(mp.get("mae"), lab))
            cells.append(fmt(mr.get("mae"), lab))
            f1 = a.get("frac_1sigma")
            cells.append("-" if f1 is None else f"{f1:.2f}")
            sc = a.get("scatter_over_crb")
            cells.append("-" if sc is None else f"{sc:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def snr_table(rows: list[dict[str, Any]], lead: Sequence[str], lab: str) -> str:
    """MAE of one label per SNR bin (columns) for each row."""
    bins = list(dict.fromkeys(b for r in rows for b in r["metrics"][lab]["snr_bins"]))
    lines = ["| " + " | ".join([*lead, "strategy", *bins]) + " |", "|" + "---|" * (len(lead) + 1 + len(bins))]
    for r in rows:
        cells = [str(r.get(k, "")) for k in lead] + [r["strategy"]]
        for b in bins:
            m = r["metrics"][lab]["snr_bins"].get(b)
            cells.append("-" if not m else f"{fmt(m.get('mae'), lab)} (σ/CRB {m.get('scatter_over_crb', float('nan')):.1f})"
                         if m.get("scatter_over_crb") is not None else fmt(m.get("mae"), lab))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":  # render a result file's tables as markdown (for docs/results.md)
    doc = json.loads(Path(sys.argv[1]).read_text())
    lead = ["base", "n_ft"] if doc["benchmark"].startswith("real") else ["n_ft"]
    print(markdown_table(doc["rows"], lead))
    if doc["rows"] and "metrics_in_domain" in doc["rows"][0]:
        print("\nIn the pre-training Teff domain\n")
        print(markdown_table(doc["rows"], lead, key="metrics_in_domain"))
    for lab in LABELS:
        print(f"\nMAE per SNR bin, {lab}\n")
        print(snr_table(doc["rows"], lead, lab))
