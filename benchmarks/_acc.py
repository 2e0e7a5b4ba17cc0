"""Shared steps of the accuracy benchmarks (bench_accuracy.py, bench_real.py).

Every step is a real ``stx`` command run in-process (as ``stx demo`` does), so the benchmarks
measure exactly what users run; each command's wall time is recorded. :func:`configure` sets the
torch device (``--device`` of pretrain / finetune / predict), the worker processes (``-j`` of
simulate and featurize) and the torch CPU threads once for a run.

Resuming: every output that already exists in the work directory is reused instead of redone:
simulated sets (``simulation.json``, checked against the requested size and seed), feature
stores and subsets (written atomically), model directories (``manifest.json``), prediction
catalogs and evaluate reports, the last two only when newer than what they were made from (a
retrained model is predicted and scored again). So a run killed part-way continues where it was.
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
#: Run settings (see :func:`configure`).
SETTINGS: dict[str, Any] = {"device": "cpu", "workers": 2, "threads": 2}


def configure(*, device: str = "cpu", workers: int = 2, threads: int | None = None) -> dict[str, Any]:
    """Set the torch device, the simulate / featurize worker processes and the torch CPU threads
    (default: ``workers``) of every later step; fail early when CUDA is asked for and missing."""
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise SystemExit(f"--device must be cpu or cuda, got {device!r}")
    if workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {workers}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device")
    SETTINGS.update(device=device, workers=int(workers), threads=int(threads or workers))
    return dict(SETTINGS)


def accelerator() -> dict[str, Any]:
    """torch version and, on CUDA, the GPU's name, memory and the CUDA version (for the report)."""
    import torch

    out: dict[str, Any] = {"device": SETTINGS["device"], "torch": torch.__version__,
                           "workers": SETTINGS["workers"], "torch_threads": SETTINGS["threads"]}
    if SETTINGS["device"].startswith("cuda"):
        dev = torch.device(SETTINGS["device"])
        props = torch.cuda.get_device_properties(dev)
        out.update(gpu=torch.cuda.get_device_name(dev), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   cuda=torch.version.cuda)
    return out


class Stages:
    """Wall time per stage, logged (flushed) when each stage starts and ends, so that the log of a
    killed run still tells where it was and what each finished stage cost."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        log(f"== {name} (at {time.perf_counter() - self.t0:.0f} s)")
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            self.seconds[name] = round(self.seconds.get(name, 0.0) + dt, 1)
            log(f"== {name}: {dt:.1f} s (total {time.perf_counter() - self.t0:.0f} s)")

    def total(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


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


def simulate(out: Path, *args: object, n: int | None = None, seed: int | None = None,
             crb: bool = True) -> dict[str, Any]:
    """``stx simulate ... -o OUT -j WORKERS`` unless OUT already holds a finished simulation (of
    ``n`` stars with ``seed``, when given: another one is an error, not silently reused).
    ``crb=False`` skips the Cramer-Rao bounds (same spectra and labels, about 1.7x faster): for
    sets whose truth is never scored."""
    done = out / "simulation.json"
    if done.exists():
        cfg = json.loads(done.read_text()).get("config") or {}
        for key, want in (("n", n), ("seed", seed)):
            if want is not None and cfg.get(key) != want:
                raise SystemExit(f"{out} holds a simulation with {key}={cfg.get(key)}, this run asks for "
                                 f"{want}: use another --work directory")
        log(f"reuse {out}")
        return json.loads(done.read_text())
    extra: list[object] = [] if n is None else ["-n", n]
    extra += [] if seed is None else ["--seed", seed]
    extra += [] if crb else ["--no-crb"]
    log(f"simulate {out.name}: {' '.join(map(str, [*args, *extra]))} ({SETTINGS['workers']} workers)")
    return stx("simulate", *args, *extra, "-o", out, "-j", SETTINGS["workers"], "--force")


#: Below this many files one ``stx featurize --workers N`` is used; from it on, :func:`featurize`
#: splits the files over N ``stx featurize`` processes (see there).
SPLIT_FILES = 2000


def featurize(inputs: Sequence[object], out: Path, labels: Path, id_column: str,
              extra: Sequence[object] = ()) -> Path:
    """``stx featurize`` (raw featurizer, WORKERS processes) unless the store exists (stores are
    written atomically; an interrupted featurize resumes from its partial file).

    A single directory of at least :data:`SPLIT_FILES` files (the one-star LAMOST files) is split
    into WORKERS contiguous runs of its sorted files, each featurized by its own ``stx featurize``
    process into a part store, and the parts joined in order by ``stx store concat`` (the rows in
    the order one process gives). With one star per file, ``stx featurize --workers N`` is limited
    by its single writing process (about 15-20 ms per file here: one HDF5 append per file), so
    more workers did not help; separate processes write in parallel (what ``--dask`` does)."""
    if out.exists():
        log(f"reuse {out}")
        return out
    n = SETTINGS["workers"]
    files: list[Path] = []
    if n > 1 and len(inputs) == 1 and Path(str(inputs[0])).is_dir():
        files = sorted(p for p in Path(str(inputs[0])).iterdir() if p.name.endswith((".fits", ".fits.gz", ".fit")))
    if len(files) >= SPLIT_FILES:
        return _featurize_split(files, out, labels, id_column, extra, n)
    log(f"featurize -> {out.name} ({n} workers)")
    stx("featurize", *inputs, "-o", out, "--labels", labels, "--id-column", id_column,
        "--workers", n, *extra)
    return out


def _featurize_split(files: list[Path], out: Path, labels: Path, id_column: str, extra: Sequence[object],
                     n: int) -> Path:
    import os
    import shutil
    import subprocess

    parts_dir = out.parent / f"{out.stem}.parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    log(f"featurize -> {out.name}: {len(files)} files in {n} parallel stx featurize processes")
    t0 = time.perf_counter()
    procs: list[tuple[Path, subprocess.Popen, Any]] = []
    parts: list[Path] = []
    for k, chunk in enumerate(np.array_split(np.arange(len(files)), n)):
        if chunk.size == 0:
            continue
        part = parts_dir / f"part{k:03d}.h5"
        parts.append(part)
        if part.exists():  # finished by an earlier, interrupted run (written atomically)
            continue
        lst = parts_dir / f"part{k:03d}.txt"
        lst.write_text("".join(f"{files[i].resolve()}\n" for i in chunk))
        errf = open(parts_dir / f"part{k:03d}.log", "w")
        cmd = [sys.executable, "-c", "from stxcli.cli.main import run; run()", "featurize", str(lst),
               "-o", str(part), "--labels", str(labels), "--id-column", id_column, "--workers", "1", "-q",
               *map(str, extra)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
        procs.append((part, subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf, env=env), errf))
    failed = []
    for part, proc, errf in procs:
        code = proc.wait()
        errf.close()
        if code != 0:
            failed.append(f"{part.name} (exit {code}): {(parts_dir / (part.stem + '.log')).read_text()[-500:]}")
    STEP_TIMES.append(("featurize", time.perf_counter() - t0))
    if failed:
        raise SystemExit("featurize failed:\n" + "\n".join(failed))
    log(f"  {len(parts)} parts in {time.perf_counter() - t0:.0f} s; concat")
    stx("store", "concat", *parts, "-o", out)
    shutil.rmtree(parts_dir)
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
    """The given rows of ``store`` as a new store (reused when it exists and is newer than ``store``
    with the same ids: the subsets are seeded, so a rerun asks for the same rows)."""
    from stxcli.store import FeatureStore, subset_store

    rows = np.sort(rows)
    if _fresh(out, store):
        with FeatureStore.open(store) as st, FeatureStore.open(out) as sub:
            if np.array_equal(np.asarray(st.ids[rows]), np.asarray(sub.ids[:])):
                return out
    subset_store(store, rows, out)
    return out


def _fresh(out: Path, *sources: Path) -> bool:
    """``out`` exists and is at least as new as every source (make's rule)."""
    if not out.exists():
        return False
    t = out.stat().st_mtime
    return all(t >= s.stat().st_mtime for s in sources if s.exists())


def have_cannon() -> bool:
    from stxcli.registry import get_registry

    return "cannon" in get_registry().names("head")


def _torch_opts() -> list[object]:
    return ["--device", SETTINGS["device"], "--threads", SETTINGS["threads"]]


def train(strategy: str, base: Path | None, ft: Path, out: Path, *, seed: int,
          pre_epochs: int, ft_epochs: int, val_frac: float, threads: int | None = None) -> dict[str, Any]:
    """Train one strategy on the fine-tuning store ``ft``; return trainable params, stars, seconds.
    (``threads`` is accepted for older callers; :func:`configure` sets it.)"""
    common = ["--seed", seed, "--val-frac", val_frac, *_torch_opts()]
    t0 = time.perf_counter()
    if strategy in ADAPTERS:
        s = stx("finetune", base, ft, "--adapter", strategy, "-o", out, "--epochs", ft_epochs, *common)
    elif strategy == "scratch-mlp":
        s = stx("finetune", base, ft, "--scratch", "-o", out, "--epochs", pre_epochs, *common)
    elif strategy in ("ridge", "cannon"):
        s = stx("pretrain", ft, "--head", strategy, "-o", out, "--labels", ",".join(LABELS), *common)
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
    for k in ("epochs_run", "best_epoch", "stopped_early"):  # gradient-trained models (not ridge / Cannon)
        if t.get(k) is not None:
            info[k] = t[k]
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


def pretrain(stores: Sequence[Path], out: Path, *, hidden: str, epochs: int, seed: int,
             batch_size: int | None = None, extra: Sequence[object] = ()) -> dict[str, Any]:
    """``stx pretrain`` of the MLP on ``stores`` unless ``out`` holds a finished model; returns
    :func:`model_info` plus the wall time of the command (None when reused)."""
    if (out / "manifest.json").exists():
        log(f"reuse {out}")
        return {**model_info(out), "train_s": None, "reused": True}
    t0 = time.perf_counter()
    bs: list[object] = [] if batch_size is None else ["--batch-size", batch_size]
    stx("pretrain", *stores, "-o", out, "--labels", ",".join(LABELS), "--set", f"hidden={hidden}",
        "--epochs", epochs, "--seed", seed, *bs, *_torch_opts(), *extra)
    return {**model_info(out), "train_s": round(time.perf_counter() - t0, 2)}


def predict(model: Path, store: Path, out: Path) -> Path:
    """``stx predict`` on the run's device, unless ``out`` is newer than the model and the store."""
    if _fresh(out, model / "manifest.json", store):
        return out
    stx("predict", model, store, "-o", out, "--device", SETTINGS["device"], "--threads", SETTINGS["threads"])
    return out


def evaluate(pred: Path, truth: Path, out: Path, id_column: str = "id") -> dict[str, Any]:
    """``stx evaluate`` (no plots) unless ``out/report.json`` is newer than the predictions."""
    if _fresh(out / "report.json", pred, truth):
        return json.loads((out / "report.json").read_text())
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


def fold_mae(preds: Sequence[Path], truth: Path, id_column: str = "id") -> dict[str, list[float | None]]:
    """Per label, the MAE of each prediction catalog (one per test fold) against ``truth``, matched
    on ``id_column`` (stars without a finite prediction and truth are left out, as evaluate does)."""
    import warnings

    from astropy.table import Table

    with warnings.catch_warnings():  # 'dex' is no FITS unit: astropy warns on every read
        warnings.simplefilter("ignore")
        t = Table.read(truth)
        cats = [Table.read(p, hdu="PREDICTIONS") for p in preds]
    ids = np.asarray(t[id_column])
    order = np.argsort(ids)
    out: dict[str, list[float | None]] = {lab: [] for lab in LABELS}
    for c in cats:
        pid = np.asarray(c["id"])
        pos = np.searchsorted(ids, pid, sorter=order).clip(0, ids.size - 1)
        idx = order[pos]
        found = ids[idx] == pid
        for lab in LABELS:
            r = np.asarray(c[lab], float)[found] - np.asarray(t[lab], float)[idx[found]]
            r = r[np.isfinite(r)]
            out[lab].append(round(float(np.mean(np.abs(r))), 4) if r.size else None)
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


def learning_curves(rows: list[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """Overall MAE per label, strategy and fine-tuning size (zero-shot: the same at every size)."""
    out: dict[str, Any] = {}
    for lab in LABELS:
        curves: dict[str, dict[str, float | None]] = {}
        for r in rows:
            if r["strategy"] == "zero-shot":
                curves["zero-shot"] = {str(n): mae(r, lab) for n in sizes}
            else:
                curves.setdefault(r["strategy"], {})[str(r["n_ft"])] = mae(r, lab)
        out[lab] = curves
    return out


def pretraining_gain(rows: list[dict[str, Any]], sizes: Sequence[int]) -> dict[str, Any]:
    """Per size and label: the best fine-tuned model (lowest overall MAE among the adapters), the
    target-only MLP trained from scratch on the same stars, and ``scratch_over_best`` (> 1: the
    pre-training still pays at this size; about 1 or below: it has stopped paying)."""
    out: dict[str, Any] = {}
    for n in sizes:
        ft = [r for r in rows if r["n_ft"] == n and r["strategy"] in ADAPTERS]
        sc = next((r for r in rows if r["n_ft"] == n and r["strategy"] == "scratch-mlp"), None)
        if not ft or sc is None:
            continue
        d: dict[str, Any] = {}
        for lab in LABELS:
            best = min(ft, key=lambda r: mae(r, lab) or float("inf"))
            b, s_ = mae(best, lab), mae(sc, lab)
            d[lab] = {"best_finetuned": best["strategy"], "mae_best_finetuned": b, "mae_scratch": s_,
                      "scratch_over_best": None if not b or s_ is None else round(s_ / b, 3)}
        out[str(n)] = d
    return out


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
