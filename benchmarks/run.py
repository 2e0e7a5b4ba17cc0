"""Run the benchmark suite and render docs/benchmarks.md from the results.

    python benchmarks/run.py [--quick] [--only featurize,models,...] [--workdir DIR] [--render-only]

Each benchmark is one script, benchmarks/bench_NAME.py, run in its own process (working directory:
``--workdir``, default /tmp/stx-bench/{quick,full}, where benchmarks with resumable work directories
keep them); it measures its baseline in the same run, prints ratios and writes
benchmarks/results/NAME[-quick].json with the machine it ran on. A benchmark that fails is
reported and the others still run; the exit status is 1 when any failed. The run's outcome goes
to benchmarks/results/run[-quick].json. This script then writes docs/benchmarks.md from every
JSON in benchmarks/results/: per benchmark a table of its figures (measured, baseline, ratio,
target, met?), the machine and date, plots (docs/img/bench_*.png) and every value below.
Benchmarks are opt-in: the test suite never runs them.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
DOC = REPO / "docs" / "benchmarks.md"
IMG = REPO / "docs" / "img"
ORDER = ["featurize", "memory", "models", "simulate", "encoder", "distributed", "accuracy", "real",
         "encoder_accuracy"]
MAX_DUMP = 150
FLAT = 1.25  # "memory stays flat": peak at the largest input over peak at the smallest


def scripts(folder: Path | None = None) -> dict[str, Path]:
    """``{name: path}`` of every ``bench_NAME.py`` in ``folder`` (default: this one), in run order."""
    found = {p.stem[len("bench_"):]: p for p in sorted((folder or HERE).glob("bench_*.py"))}
    return dict(sorted(found.items(), key=lambda kv: (ORDER.index(kv[0]) if kv[0] in ORDER else 99, kv[0])))


def run_all(todo: dict[str, Path], quick: bool, workdir: Path, timeout: float | None = None,
            out: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Run each script in its own process; a failure (non-zero exit, time-out, a crash) is
    recorded and the next one runs. Returns ``{name: {"exit": code, "seconds": s, "error": ...}}``."""
    workdir.mkdir(parents=True, exist_ok=True)
    outcome: dict[str, dict[str, Any]] = {}
    for name, script in todo.items():
        out(f"== {name}: {script.name}{' --quick' if quick else ''}")
        t0 = time.perf_counter()
        rec: dict[str, Any] = {}
        try:
            res = subprocess.run([sys.executable, str(script), *(["--quick"] if quick else [])],
                                 cwd=workdir, timeout=timeout)
            rec["exit"] = res.returncode
            if res.returncode != 0:
                rec["error"] = f"exit status {res.returncode}"
        except subprocess.TimeoutExpired:
            rec.update(exit=None, error=f"timed out after {timeout:.0f} s")
        except OSError as exc:
            rec.update(exit=None, error=str(exc))
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        outcome[name] = rec
        out(f"== {name}: {'ok' if rec['exit'] == 0 else 'FAILED (' + rec['error'] + ')'} in {rec['seconds']:.0f} s")
    return outcome


# ----------------------------------------------------------------------------------- rendering


@dataclass
class Row:
    figure: str
    measured: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None


def _get(d: Any, *keys: Any) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _num(v: Any, digits: int = 3) -> str:
    if v is None:
        return "?"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _rate(v: Any) -> str:
    return f"{_num(v)} spectra/s" if v is not None else "?"


def rows_featurize(d: dict[str, Any]) -> list[Row]:
    rows = []
    r = d.get("read")
    if r:
        rows.append(Row(f"read a {_num(d.get('n_spectra_read'))}-spectrum DESI coadd", f"{_num(r['stx_s'])} s",
                        f"specutils {_num(r['specutils_s'])} s", f"{r['speedup']:.2f}x faster", ">= 2.5x faster",
                        r["speedup"] >= 2.5))
    r = d.get("read_and_featurize")
    if r and d.get("read"):
        how = f", {r['threads']} threads" if r.get("threads", 1) > 1 else ""
        rows.append(Row(f"read + raw featurize that coadd{how}", f"{_num(r['stx_s'])} s",
                        f"specutils read alone {_num(d['read']['specutils_s'])} s"
                        + (f"; stx 1 thread {r['ratio_1_thread']:.2f}x" if "ratio_1_thread" in r else ""),
                        f"{r['ratio_to_specutils_read']:.2f}x the time", "< 1x", r["ratio_to_specutils_read"] < 1))
    r = d.get("featurize_rate")
    if r:
        mode = f" ({r['workers2_mode']})" if "workers2_mode" in r else ""
        rows.append(Row(f"featurize {_num(r['n_spectra'])} spectra, 2 workers{mode}", _rate(r["workers2_spectra_per_s"]),
                        f"1 worker {_rate(r['workers1_spectra_per_s'])}", f"{r['parallel_speedup']:.2f}x",
                        f">= {_num(r.get('target_workers2', 3000))} spectra/s",
                        r["workers2_spectra_per_s"] >= r.get("target_workers2", 3000)))
    r = d.get("featurize_rate_live_only")
    if r and "compiled_spectra_per_s" in r:
        rows.append(Row(f"read + featurize {_num(r['n_spectra'])} spectra with data, 1 thread, compiled kernels",
                        _rate(r["compiled_spectra_per_s"]), f"numpy path {_rate(r['spectra_per_s'])}",
                        f"{r['compiled_speedup']:.2f}x", "", None))
    r = d.get("lamost_files")
    if r:
        rows.append(Row(f"featurize {r['n_files']} LAMOST DR10 files, 1 process",
                        f"{_num(r['stx_1_thread_files_per_s'])} files/s",
                        f"astropy open + read alone {_num(r['astropy_read_files_per_s'])} files/s; "
                        f"2 processes {_num(r['stx_2_processes_files_per_s'])} files/s",
                        f"{r['ratio_1_thread_over_astropy_read']:.2f}x the time", "", None))
    r = d.get("peak_memory_mb")
    if r:
        rows.append(Row("peak memory, featurize that coadd", f"{r['stx_featurize']:.0f} MB",
                        f"specutils read {r['specutils_read']:.0f} MB", f"{r['ratio']:.2f}x", "< 0.5x",
                        r["ratio"] < 0.5))
        if "stx_featurize_compiled_kernels" in r:
            rows.append(Row("the same, `STX_KERNELS=compiled` (numba loaded)",
                            f"{r['stx_featurize_compiled_kernels']:.0f} MB",
                            f"specutils read {r['specutils_read']:.0f} MB", f"{r['ratio_compiled_kernels']:.2f}x",
                            "", None))
    r = d.get("startup")
    if r:
        rows.append(Row("`stx --help`", f"{r['stx_help_s']:.2f} s", f"`python -c pass` {r['python_pass_s']:.2f} s",
                        f"+{r['difference_s']:.2f} s", f"<= +{r.get('target_s', 0.3)} s",
                        r["difference_s"] <= r.get("target_s", 0.3)))
    return rows


def rows_models(d: dict[str, Any]) -> list[Row]:
    rows = []
    r = d.get("pretrain")
    if r:
        rows.append(Row(f"pretrain epoch, {_num(d.get('n_train'))} x {_num(d.get('dim'))}", f"{r['stx_epoch_s']:.2f} s",
                        f"bare torch loop {r['bare_epoch_s']:.2f} s", f"{r['ratio_stx_over_bare']:.2f}x",
                        f"<= {r['target_max_ratio']}x", r["ratio_stx_over_bare"] <= r["target_max_ratio"]))
    r = d.get("predict")
    if r:
        rows.append(Row("predict from a feature store", _rate(r["stx_spectra_per_s"]),
                        f"bare inference {_rate(r['bare_spectra_per_s'])}", f"{r['ratio_stx_over_bare']:.2f}x",
                        f">= {r['target_min_ratio']}x", r["ratio_stx_over_bare"] >= r["target_min_ratio"]))
    ft = d.get("finetune") or {}
    for name, r in ft.items():
        if not isinstance(r, dict):
            continue
        rows.append(Row(f"fine-tune epoch, {name} ({_num(r['trainable_params'])} trainable, {_num(r['n_train'])} stars)",
                        _rate(r["stx_epoch_spectra_per_s"]), f"bare torch loop {_rate(r['bare_spectra_per_s'])}",
                        f"{r['ratio_stx_epoch_over_bare']:.2f}x the time",
                        f"<= {r['target_max_ratio']}x (pretrain's)", r["ratio_stx_epoch_over_bare"] <= r["target_max_ratio"]))
    for key in ("predict_files", "predict_files_live_only"):
        r = d.get(key)
        if not r:
            continue
        live = r.get("live_fraction")
        what = "" if live is None else f", {100 * live:.0f} % with data"
        rows.append(Row(f"predict from {r['n_files']} DESI coadds ({_num(r['n_spectra'])} spectra{what}), end to end",
                        f"{r['stx_predict_s']:.2f} s ({_rate(r['stx_spectra_per_s'])})",
                        f"specutils read alone {r['specutils_read_s']:.2f} s"
                        + (f"; numpy kernels {r['ratio_numpy_kernels_over_specutils_read']:.2f}x"
                           if "ratio_numpy_kernels_over_specutils_read" in r else ""),
                        f"{r['ratio_stx_over_specutils_read']:.2f}x the time", "< 1x",
                        r["ratio_stx_over_specutils_read"] < r.get("target_max_ratio", 1.0)))
    r = d.get("predict_lamost_files")
    if r:
        rows.append(Row(f"predict from {r['n_files']} one-spectrum LAMOST DR10 files, end to end",
                        f"{r['stx_predict_s']:.2f} s ({r['stx_files_per_s']:.0f} files/s)",
                        f"astropy read alone {r['astropy_read_s']:.2f} s",
                        f"{r['ratio_stx_over_astropy_read']:.2f}x the time", "", None))
    return rows


def rows_memory(d: dict[str, Any]) -> list[Row]:
    rows = []
    runs = d.get("runs") or []
    if not runs:
        return rows
    lo, hi = runs[0], runs[-1]
    label = {"featurize": "stx featurize", "predict_store": "stx predict from the store",
             "predict_files": "stx predict from the coadd files"}
    per_file = f", files of {_num(d['rows_per_file'])}" if d.get("rows_per_file") else ""
    for cmd, f in (d.get("flat") or {}).items():
        rows.append(Row(f"peak memory, {label.get(cmd, cmd)}{per_file if cmd != 'predict_store' else ''}", f"{hi[cmd]['peak_mb']:.0f} MB at {_num(hi['n_spectra'])} spectra",
                        f"{lo[cmd]['peak_mb']:.0f} MB at {_num(lo['n_spectra'])}",
                        f"{f['ratio_largest_over_smallest']:.2f}x", f"< {f['target_max_ratio']}x (flat)",
                        f["ratio_largest_over_smallest"] < f["target_max_ratio"]))
    dm = hi.get("data_mb", {})
    rows.append(Row(f"holding {_num(hi['n_spectra'])} spectra in memory instead",
                    f"features + ivar {dm.get('features_and_ivar_float32', 0) / 1e3:.1f} GB",
                    f"coadd files {dm.get('coadd_files', 0) / 1e3:.1f} GB", "", "", None))
    return rows


def rows_simulate(d: dict[str, Any]) -> list[Row]:
    rows = []
    r = d.get("lamost_100k")
    if r:
        extra = " (extrapolated)" if r.get("extrapolated") else ""
        rows.append(Row(f"simulate 100,000 LAMOST-like spectra with CRBs, {r.get('workers', '?')} workers",
                        f"{r['seconds_for_100k']:.0f} s{extra}", f"idle-core estimate {_num(r.get('idle_2core_seconds_for_100k'))} s",
                        "", "< 300 s", r["seconds_for_100k"] < 300))
    for key, what in (("lamost", "LAMOST-like with CRBs"), ("lamost_no_crb", "LAMOST-like without CRBs"),
                      ("desi", "DESI-like with CRBs")):
        r = d.get(key)
        if r:
            rows.append(Row(f"simulate {what}", _rate(r["spectra_per_s"]), "", "", "", None))
    if d.get("example_quick_seconds") is not None:
        rows.append(Row("materialise the quick example data", f"{d['example_quick_seconds']:.1f} s", "", "", "< 15 s",
                        d["example_quick_seconds"] < 15))
    return rows


def rows_encoder(d: dict[str, Any]) -> list[Row]:
    rows = []
    raw = _get(d, "raw_lamost_files", "spectra_per_s")
    for key, what in (("embed_1_thread", "embed, 1 thread"), ("embed_2_threads", "embed, 2 threads"),
                      ("transformer_featurizer_files_1_thread", "transformer featurizer on files, 1 thread")):
        v = _get(d, key, "spectra_per_s")
        if v is not None:
            rows.append(Row(what, _rate(v), f"raw featurizer {_rate(raw)}" if raw else "",
                            f"{raw / v:.0f}x slower" if raw else "", "", None))
    v = _get(d, "pretrain_2_threads", "spectra_per_s")
    if v is not None:
        rows.append(Row("encoder pretraining, 2 threads", _rate(v), "", "", "", None))
    return rows


def rows_distributed(d: dict[str, Any]) -> list[Row]:
    rows = []
    for work, modes in (d.get("throughput") or {}).items():
        base = _get(modes, "single1", "spectra_per_s")
        for mode in ("pool2", "dask1", "dask2"):
            v = _get(modes, mode, "spectra_per_s")
            if v is not None and base:
                rows.append(Row(f"{work}: {mode}", _rate(v), f"one process {_rate(base)}", f"{v / base:.2f}x", "", None))
    for work, m in (d.get("memory_10x") or {}).items():
        if isinstance(m, dict) and "worker_peak_ratio" in m:
            rows.append(Row(f"{work}: worker peak memory, input x{_num(m.get('input_ratio'))}",
                            f"{_get(m, 'big', 'worker_peak_mb') or 0:.0f} MB", f"{_get(m, 'small', 'worker_peak_mb') or 0:.0f} MB",
                            f"{m['worker_peak_ratio']:.2f}x", f"< {FLAT}x (flat)", m["worker_peak_ratio"] < FLAT))
    return rows


def _acc_rows(rows: list[dict[str, Any]], metric_key: str = "metrics") -> dict[tuple[str, str], dict[str, float]]:
    """{(strategy, n_ft): {label: MAE}} from an accuracy JSON's rows (base prefixed when present)."""
    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        m = r.get(metric_key) or {}
        strat = f"{r['base']}/{r['strategy']}" if r.get("base") else r["strategy"]
        out[(strat, str(r["n_ft"]))] = {lab: v["all"]["mae"] for lab, v in m.items()
                                        if isinstance(v, dict) and "all" in v}
    return out


FINETUNED = ("residual", "lora", "full", "auto")


def rows_accuracy(d: dict[str, Any]) -> list[Row]:
    rows = []
    checks = d.get("checks") or {}
    n_check = checks.get("n_target_for_check")
    if "all_finetuned_beat_zero_shot" in checks:
        rows.append(Row(f"every fine-tuned model beats zero-shot on every label ({n_check} stars)",
                        str(checks["all_finetuned_beat_zero_shot"]), "zero-shot", "", "True",
                        bool(checks["all_finetuned_beat_zero_shot"])))
    maes = _acc_rows(d.get("rows") or [])
    sizes = sorted({int(n) for (_, n) in maes if n.isdigit() and int(n) > 0})
    if not sizes:
        return rows
    n = str(n_check if n_check in sizes else sizes[-1])
    zero = maes.get(("zero-shot", "0"), {})
    for lab in zero:
        cands = {s: maes[(s, n)][lab] for s in FINETUNED if (s, n) in maes and lab in maes[(s, n)]}
        if not cands:
            continue
        best = min(cands, key=cands.get)
        ridge = maes.get(("ridge", n), {}).get(lab)
        rows.append(Row(f"{lab} MAE, best fine-tuned ({best}), {n} stars", _num(cands[best]),
                        f"zero-shot {_num(zero[lab])}" + (f"; ridge {_num(ridge)}" if ridge is not None else ""),
                        f"{cands[best] / zero[lab]:.2f}x zero-shot" + (f", {cands[best] / ridge:.2f}x ridge" if ridge else ""),
                        "< 1x both", cands[best] < zero[lab] and (ridge is None or cands[best] < ridge)))
    return rows


def rows_real(d: dict[str, Any]) -> list[Row]:
    rows = []
    maes = _acc_rows(d.get("rows") or [])
    if not maes:
        return rows
    sizes = [n for (_, n) in maes]
    n = "all" if "all" in sizes else max((s for s in sizes if s.isdigit()), key=int)
    labels = list(dict.fromkeys(lab for v in maes.values() for lab in v))
    for lab in labels:
        tuned = {s: v[lab] for (s, k), v in maes.items() if k == n and lab in v and s.split("/")[-1] in FINETUNED}
        zero = {s: v[lab] for (s, k), v in maes.items() if s.endswith("zero-shot") and lab in v}
        if not tuned:
            continue
        best = min(tuned, key=tuned.get)
        scratch = {s: v[lab] for (s, k), v in maes.items() if k == n and lab in v and s.split("/")[-1] in ("scratch-mlp", "ridge")}
        base = min(scratch, key=scratch.get) if scratch else None
        z = min(zero, key=zero.get) if zero else None
        baseline = "; ".join(x for x in (f"{base} {_num(scratch[base])}" if base else "",
                                         f"{z} {_num(zero[z])}" if z else "") if x)
        rows.append(Row(f"{lab} MAE, best fine-tuned ({best}), {n} MILES stars", _num(tuned[best]), baseline,
                        f"{tuned[best] / scratch[base]:.2f}x {base}" if base else "", "", None))
    return rows


def rows_encoder_accuracy(d: dict[str, Any]) -> list[Row]:
    rows = []
    res = d.get("results") or {}
    for lab in ("teff", "logg", "feh"):
        for kind, r in res.items():
            zs, ft = _get(r, "zero_shot", "overall", lab, "mae"), _get(r, "finetuned", "overall", lab, "mae")
            if zs is None or ft is None:
                continue
            ad = _get(r, "finetuned", "adapter") or "fine-tuned"
            rows.append(Row(f"{lab} MAE, {kind} features, {ad} ({_num(_get(r, 'finetuned', 'n_target_stars'))} stars)",
                            _num(ft), f"zero-shot {_num(zs)}", f"{ft / zs:.2f}x", "", None))
    return rows


EXTRACT: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "featurize": rows_featurize, "models": rows_models, "memory": rows_memory, "simulate": rows_simulate,
    "encoder": rows_encoder, "distributed": rows_distributed, "accuracy": rows_accuracy, "real": rows_real,
    "encoder_accuracy": rows_encoder_accuracy,
}


def base_name(stem: str) -> str:
    return stem[:-len("-quick")] if stem.endswith("-quick") else stem


def figure_rows(stem: str, data: dict[str, Any]) -> list[Row]:
    fn = EXTRACT.get(base_name(stem))
    if fn is None:
        return []
    try:
        return fn(data)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:  # an older JSON form
        return [Row("(figures not extracted)", f"{type(exc).__name__}: {exc}")]


def _met(v: bool | None, load: float | None = None) -> str:
    out = "" if v is None else ("yes" if v else "**no**")
    return f"{out} (load {load:.1f})" if out and load else out


NO_TIMINGS = ("accuracy", "real", "encoder_accuracy")


def _loads(d: Any, key: str = "") -> list[float]:
    if isinstance(d, dict):
        return [v for k, x in d.items() for v in _loads(x, k)]
    if isinstance(d, list):
        return [v for x in d for v in _loads(x, key)]
    if "load" in key.lower() and isinstance(d, (int, float)) and not isinstance(d, bool) and d == d:
        return [float(d)]
    return []


def overload(stem: str, data: dict[str, Any]) -> float | None:
    """The highest load average the run recorded, when it exceeded the machine's cores (other jobs
    shared the CPU, so its timings are unreliable); else None."""
    if base_name(stem) in NO_TIMINGS:
        return None
    loads, cores = _loads(data), _get(data, "machine", "cores")
    if loads and cores and max(loads) > cores:
        return max(loads)
    return None


def timing_row(r: Row) -> bool:
    return "peak memory" not in r.figure and not r.figure.startswith("holding")


def table(rows: list[Row], load: float | None = None) -> list[str]:
    out = ["| figure | measured | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r.figure, r.measured, r.baseline, r.ratio, r.target, _met(r.met, load if timing_row(r) else None)]
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return out


def _key(figure: str) -> str:
    """A figure's name without its sizes (a quick and a full run name the same figure alike)."""
    return re.sub(r"\d[\d,.]*", "#", figure).split(" (")[0]


def glance(loaded: dict[str, dict[str, Any]]) -> list[tuple[str, Row, float | None]]:
    """Rows with a target: the full run's, plus the quick run's figures that the full run lacks."""
    out = []
    for stem, d in loaded.items():
        if stem.startswith("run"):
            continue
        rows = [r for r in figure_rows(stem, d) if r.target]
        if stem.endswith("-quick") and base_name(stem) in loaded:
            have = {_key(r.figure) for r in figure_rows(base_name(stem), loaded[base_name(stem)])}
            rows = [r for r in rows if _key(r.figure) not in have]
        load = overload(stem, d)
        out += [(stem, r, load if timing_row(r) else None) for r in rows]
    return out




def _flatten(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    if isinstance(d, dict):
        for k, v in d.items():
            if k in ("machine", "benchmark"):
                continue
            rows.extend(_flatten(v, f"{prefix}{k}."))
    elif isinstance(d, list) and d and all(isinstance(x, (int, float, str, type(None))) for x in d):
        rows.append((prefix.rstrip("."), ", ".join(map(_fmt, d))))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            rows.extend(_flatten(v, f"{prefix}{i}."))
    else:
        rows.append((prefix.rstrip("."), _fmt(d)))
    return rows


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _order(stem: str) -> tuple[int, int, str]:
    b = base_name(stem)
    return (ORDER.index(b) if b in ORDER else 99, stem.endswith("-quick"), stem)


def plot_accuracy(data: dict[str, Any], path: Path) -> bool:
    """MAE against the number of target stars per strategy, one panel per label."""
    maes = _acc_rows(data.get("rows") or [])
    sizes = sorted({int(n) for (_, n) in maes if n.isdigit() and int(n) > 0})
    labels = list(maes.get(("zero-shot", "0"), {}))
    if len(sizes) < 2 or not labels:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = [s for s in ("residual", "lora", "full", "auto", "scratch-mlp", "ridge", "cannon")
                  if any((s, str(n)) in maes for n in sizes)]
    fig, axes = plt.subplots(1, len(labels), figsize=(4.2 * len(labels), 3.6))
    for ax, lab in zip(np.atleast_1d(axes), labels):
        for s in strategies:
            xs = [n for n in sizes if lab in maes.get((s, str(n)), {})]
            style = "--" if s in ("scratch-mlp", "ridge", "cannon") else "-"
            ax.plot(xs, [maes[(s, str(n))][lab] for n in xs], style, marker="o", ms=4, label=s)
        ax.axhline(maes[("zero-shot", "0")][lab], color="k", ls=":", lw=1, label="zero-shot")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(n) for n in sizes])
        ax.set_xlabel("target stars")
        ax.set_title(f"{lab} MAE")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    m = data.get("machine", {})
    fig.suptitle(f"Simulated LAMOST -> DESI: MAE on {_num(_get(data, 'sizes', 'n_test'))} test stars "
                 f"({m.get('date', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_memory(data: dict[str, Any], path: Path) -> bool:
    """Peak memory of each command at each size, beside what holding the data would take."""
    runs = data.get("runs") or []
    if len(runs) < 2:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cmds = [("featurize", "featurize"), ("predict_store", "predict (store)"), ("predict_files", "predict (files)")]
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = np.arange(len(cmds) + 2) + (i - (len(runs) - 1) / 2) * width
        vals = [r[c]["peak_mb"] for c, _ in cmds] + [r["data_mb"]["features_and_ivar_float32"],
                                                     r["data_mb"]["coadd_files"]]
        ax.bar(xs, vals, width, label=f"{_num(r['n_spectra'])} spectra")
    ax.set_xticks(np.arange(len(cmds) + 2), [t for _, t in cmds] + ["features + ivar\nin memory",
                                                                   "coadds\nin memory"])
    ax.set_yscale("log")
    ax.set_ylabel("MB (peak resident / data size)")
    ax.legend(fontsize=8)
    ax.set_title(f"Peak memory as the input grows ({data.get('machine', {}).get('date', '?')})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


PLOTS: dict[str, tuple[str, Callable[[dict[str, Any], Path], bool], str]] = {
    "accuracy": ("bench_accuracy.png", plot_accuracy, "MAE against the number of target stars"),
    "memory": ("bench_memory.png", plot_memory, "peak memory at each input size"),
}


def render(results: Path = RESULTS, doc: Path = DOC, img: Path = IMG) -> Path:
    """Write ``doc`` (and its plots in ``img``) from every JSON in ``results``."""
    files = sorted(results.glob("*.json"), key=lambda p: _order(p.stem))
    loaded = {p.stem: json.loads(p.read_text()) for p in files}
    lines = ["# Benchmark results", "",
             "Measured by `python benchmarks/run.py` (`--quick` for smaller inputs; each",
             "`benchmarks/bench_*.py` also runs alone); every figure is compared with a baseline measured in",
             "the same run. Raw JSON: `benchmarks/results/`. Machine and date are given per benchmark; the",
             "development machine has 2 CPU cores and was often shared with other jobs, so absolute times",
             "are pessimistic: read the ratios (benchmarks that record the load average say how busy it was).",
             "Accuracy results and what they mean: [results.md](results.md). This page is generated: edit",
             "`benchmarks/run.py`, not this file.", ""]
    for stem in ("run", "run-quick"):
        r = loaded.get(stem)
        if r:
            n, bad = len(r.get("benchmarks") or {}), r.get("failed") or []
            lines += [f"Last `{r.get('command', 'python benchmarks/run.py')}`: {n} benchmarks in "
                      f"{(r.get('seconds') or 0) / 60:.0f} min on {_get(r, 'machine', 'cores')} cores "
                      f"({_get(r, 'machine', 'date')}), "
                      + (f"failed: {', '.join(bad)}." if bad else "none failed.")
                      + f" See [{stem}](#{stem}).", ""]
    summary = glance(loaded)
    if summary:
        lines += ["## Targets at a glance", "",
                  "The figures with a target, from the full-size run where there is one, plus the quick run's",
                  "figures that the full run lacks. \"(load X)\": the run recorded a 1-minute load average X above",
                  "its cores, so other jobs shared the CPU and that timing (a ratio of two timings too: torch's",
                  "threads wait on each other when the cores are oversubscribed) may be off several-fold.", "",
                  "| benchmark | figure | measured | ratio | target | met? |", "|---|---|---|---|---|---|"]
        for stem, r, load in summary:
            lines.append(f"| [{stem}](#{stem}) | {r.figure} | {r.measured} | {r.ratio} | {r.target} | {_met(r.met, load)} |")
        lines.append("")
    for stem, data in loaded.items():
        m = data.get("machine", {})
        lines += [f"## {stem}", "", f"`benchmarks/results/{stem}.json`: {m.get('cpu', '?')}, "
                  f"{m.get('cores', '?')} cores, {m.get('date', '?')}"
                  + (f"; command: `{data['command']}`" if data.get("command") else ""), ""]
        if stem.startswith("run"):
            lines += ["| benchmark | exit | seconds | error |", "|---|---|---|---|"]
            for name, rec in (data.get("benchmarks") or {}).items():
                lines.append(f"| {name} | {rec.get('exit')} | {rec.get('seconds')} | {rec.get('error', '')} |")
            lines.append("")
            continue
        load = overload(stem, data)
        if load:
            lines += [f"Other jobs shared the CPU during this run: the 1-minute load average reached {load:.1f} "
                      f"on {_get(data, 'machine', 'cores')} cores, so its timings are lower bounds and their "
                      f"ratios unreliable.", ""]
        rows = figure_rows(stem, data)
        if rows:
            lines += table(rows, load) + [""]
        plot = PLOTS.get(base_name(stem))
        if plot and not stem.endswith("-quick"):
            fname, fn, caption = plot
            img.mkdir(parents=True, exist_ok=True)
            if fn(data, img / fname):
                lines += [f"![{caption}](img/{fname})", ""]
        values = _flatten(data)
        more = f" (the first {MAX_DUMP} of {len(values)}; the rest in the JSON)" if len(values) > MAX_DUMP else ""
        lines += [f"### {stem}: all values", "", f"Every value of the JSON{more}.", "",
                  "| key | value |", "|---|---|"]
        lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in values[:MAX_DUMP]]
        lines.append("")
    doc.write_text("\n".join(lines) + "\n")
    print(f"wrote {doc}", file=sys.stderr)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs for every benchmark")
    ap.add_argument("--only", help="comma-separated benchmark names (default: all)")
    ap.add_argument("--workdir", type=Path, help="working directory of the benchmarks "
                    "(default /tmp/stx-bench/quick or /tmp/stx-bench/full)")
    ap.add_argument("--timeout", type=float, help="seconds allowed per benchmark (default: none)")
    ap.add_argument("--render-only", action="store_true", help="only rewrite docs/benchmarks.md")
    ap.add_argument("--check", action="store_true", help="rewrite nothing; exit 1 when docs/benchmarks.md is "
                    "not the rendering of the result JSONs (run --render-only to update it)")
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of result JSONs to render "
                    "(default benchmarks/results)")
    args = ap.parse_args(argv)
    failed: list[str] = []
    if args.check:
        import tempfile

        with tempfile.TemporaryDirectory() as td:
            fresh = render(args.results, Path(td) / "benchmarks.md", Path(td) / "img").read_text()
        if fresh != DOC.read_text():
            print(f"{DOC.relative_to(REPO)} is stale: run python benchmarks/run.py --render-only", file=sys.stderr)
            return 1
        return 0
    if not args.render_only:
        todo = scripts()
        if args.only:
            names = [n.strip() for n in args.only.split(",")]
            unknown = [n for n in names if n not in todo]
            if unknown:
                ap.error(f"unknown benchmark(s): {', '.join(unknown)} (have: {', '.join(todo)})")
            todo = {n: todo[n] for n in names}
        workdir = args.workdir or Path("/tmp/stx-bench") / ("quick" if args.quick else "full")
        t0 = time.perf_counter()
        outcome = run_all(todo, args.quick, workdir.resolve(), args.timeout)
        failed = [n for n, r in outcome.items() if r["exit"] != 0]
        if not args.only:
            sys.path.insert(0, str(HERE))
            from _common import write

            write("run-quick" if args.quick else "run", {
                "benchmarks": outcome, "failed": failed, "seconds": round(time.perf_counter() - t0, 1),
                "command": " ".join(["python", "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])})
        print("== " + (f"failed: {', '.join(failed)}" if failed else f"all {len(outcome)} benchmarks ran"),
              file=sys.stderr if failed else sys.stdout)
    render(args.results)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
