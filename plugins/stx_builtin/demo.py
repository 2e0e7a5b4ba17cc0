"""``stx demo``: the whole pipeline on the example data shipped in the package.

What a user would run, in order: materialize the example survey files (simulated LAMOST-like
pre-training stars, DESI-like fine-tuning and test stars, real MILES stars observed DESI-like),
featurize them (raw spectra, and embeddings of an encoder trained here on the LAMOST-like set),
pretrain an MLP, predict zero-shot, fine-tune with every adapter, train the target-only baselines
(an MLP from scratch and ridge on the same fine-tuning stars), predict and evaluate. Each step is a
real ``stx`` command run in-process, so the demo exercises exactly what users run.

Prints the comparison table in the shape of the paper's (feature type x strategy; MAE and robust
scatter per label, overall and for metal-poor / metal-rich stars; number of target stars,
trainable parameters and train time per row) and writes ``demo.json`` and plots into the work
directory.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path
from typing import Any

import typer

from stxcli.hookspecs import hookimpl

LABELS = ("teff", "logg", "feh")
STRATEGIES = ("zero-shot", "residual", "lora", "full", "auto", "scratch-mlp", "ridge")
SUBSETS = (("all", "all"), ("feh<-1", "[Fe/H]<-1"), ("feh>=-1", "[Fe/H]>=-1"))


#: Teff range of the simulated LAMOST-like pre-training stars; MILES stars outside are not tested.
TEFF_RANGE = (3500, 7500)
#: MLP widths: the paper's scale is larger; this keeps the demo within minutes on 2 CPU cores.
HIDDEN = "256,128"
#: Small models train fastest on one thread, and a second OpenMP thread spinning on a busy core
#: made fine-tuning ~3x slower on a shared 2-core machine.
THREADS = ["--threads", "1"]
#: (command, seconds) of every stx command the demo ran, for the time report.
STEP_TIMES: list[tuple[str, float]] = []


def stx(args: list[str]) -> dict[str, Any]:
    """Run one ``stx ... --json`` command in-process; return its JSON summary."""
    from stxcli.cli.main import main
    from stxcli.errors import StxError

    from stxcli import console

    out, err = io.StringIO(), io.StringIO()
    quiet = console._state["quiet"]
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main([str(a) for a in args] + ["--json"])
    finally:
        console.set_quiet(quiet)
        STEP_TIMES.append((" ".join(str(a) for a in args[:1]), time.perf_counter() - t0))
    if code != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("error:")]
        raise StxError(f"demo step `stx {' '.join(map(str, args[:2]))}` failed: "
                       f"{lines[-1][7:] if lines else err.getvalue().strip()[-300:]}")
    return json.loads(out.getvalue())


class Demo:
    def __init__(self, workdir: Path, quick: bool, seed: int) -> None:
        self.work = workdir
        self.quick = quick
        self.seed = seed
        self.rows: list[dict[str, Any]] = []
        self.notes: set[str] = set()
        self.timings: dict[str, float] = {}

    def log(self, msg: str) -> None:
        from stxcli import console

        console.info(f"[demo] {msg}")

    # ---------------------------------------------------------------------------------- steps
    def data(self) -> dict[str, Path]:
        from stx_builtin.simulate.example import materialize_example

        self.log("writing the example survey files" + (" (quick)" if self.quick else ""))
        return materialize_example(self.work / "data", quick=self.quick, workers=2)

    def featurize(self, sets: dict[str, Path]) -> dict[str, dict[str, Path]]:
        from stxcli import console
        from stxcli.cli.featurize import run_featurize

        stores: dict[str, dict[str, Path]] = {"raw": {}}
        fdir = self.work / "features"
        for key, folder in sets.items():
            self.log(f"featurize {key} (raw)")
            with _quiet(console):
                run_featurize(_spectra(folder), fdir / f"{key}-raw.h5", labels=folder / "labels.fits",
                              id_column="id", label_columns=list(LABELS), workers=2)
            stores["raw"][key] = fdir / f"{key}-raw.h5"
        self.log("train the spectral transformer encoder on the LAMOST-like raw features")
        enc = self.work / "encoder"
        epochs = 1 if self.quick else 6
        stx(["encoder", "train", stores["raw"]["lamost"], "-o", enc, "--epochs", epochs, "--seed", self.seed,
             "--width", 64, "--depth", 2, "--heads", 4])
        stores["transformer"] = {}
        for key, folder in sets.items():
            self.log(f"featurize {key} (transformer)")
            with _quiet(console):
                run_featurize(_spectra(folder), fdir / f"{key}-transformer.h5", featurizer="transformer",
                              settings={"encoder": str(enc)}, labels=folder / "labels.fits",
                              id_column="id", label_columns=list(LABELS))
            stores["transformer"][key] = fdir / f"{key}-transformer.h5"
        return stores

    def split_miles(self, stores: dict[str, dict[str, Path]]) -> None:
        """Real MILES stars inside the pre-training domain (TEFF_RANGE, as the simulated
        LAMOST-like set): half for fine-tuning, half for testing (alternate rows)."""
        import numpy as np

        from stxcli.store import FeatureStore, subset_store

        for feat, d in stores.items():
            with FeatureStore.open(d["miles_desi"]) as st:
                teff = st.labels(["teff"])[:, 0]
            rows = np.flatnonzero((teff >= TEFF_RANGE[0]) & (teff <= TEFF_RANGE[1]))
            self.notes.add(f"MILES block: {rows.size} of {teff.size} stars with {TEFF_RANGE[0]} <= Teff <= "
                           f"{TEFF_RANGE[1]} K (the pre-training domain); hotter and cooler stars left out")
            # quick: two thirds fine-tune (the split needs >= 15 stars), else alternate halves
            test = np.zeros(rows.size, bool)
            test[2::3 if self.quick else 2] = True
            subset_store(d["miles_desi"], rows[~test], self.work / "features" / f"miles_ft-{feat}.h5")
            subset_store(d["miles_desi"], rows[test], self.work / "features" / f"miles_test-{feat}.h5")
            d["miles_ft"] = self.work / "features" / f"miles_ft-{feat}.h5"
            d["miles_test"] = self.work / "features" / f"miles_test-{feat}.h5"

    def block(self, name: str, feat: str, base: Path, ft: Path, test: Path, truth: Path,
              val_frac: float = 0.2) -> None:
        m = self.work / "models" / name / feat
        ep = ["--epochs", 10 if self.quick else 60, "--seed", self.seed, "--val-frac", val_frac, *THREADS]
        ft_ep = ["--epochs", 10 if self.quick else 80, "--seed", self.seed, "--val-frac", val_frac, *THREADS]
        runs: list[tuple[str, Path, dict[str, Any]]] = [("zero-shot", base, {"n_target": 0, "trainable": 0,
                                                                             "train_s": 0.0})]
        for adapter in ("residual", "lora", "full", "auto"):
            self.log(f"{name}/{feat}: fine-tune ({adapter})")
            t0 = time.perf_counter()
            s = stx(["finetune", base, ft, "--adapter", adapter, "-o", m / adapter, *ft_ep])
            runs.append((adapter, m / adapter, _train_info(s, time.perf_counter() - t0)))
        self.log(f"{name}/{feat}: target-only MLP from scratch")
        t0 = time.perf_counter()
        s = stx(["finetune", base, ft, "--scratch", "-o", m / "scratch", *ep])
        runs.append(("scratch-mlp", m / "scratch", _train_info(s, time.perf_counter() - t0)))
        self.log(f"{name}/{feat}: ridge on the target stars")
        t0 = time.perf_counter()
        s = stx(["pretrain", ft, "--head", "ridge", "-o", m / "ridge", "--seed", self.seed, "--val-frac", val_frac,
                 *THREADS])
        runs.append(("ridge", m / "ridge", _train_info(s, time.perf_counter() - t0)))
        for strategy, model, info in runs:
            pred = m / f"pred-{strategy}.fits"
            stx(["predict", model, test, "-o", pred, *THREADS])
            plots = [] if strategy in ("zero-shot", "auto") else ["--no-plots"]  # plots cost ~2 s each
            rep = stx(["evaluate", pred, truth, "-o", m / f"report-{strategy}", *plots])
            self.rows.append({"block": name, "features": feat, "strategy": strategy, **info,
                              "metrics": _metrics(rep), "report": str(m / f"report-{strategy}")})

    def run(self) -> dict[str, Any]:
        t_all = time.perf_counter()
        t0 = time.perf_counter()
        sets = self.data()
        self.timings["example data"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stores = self.featurize(sets)
        self.timings["featurize + encoder"] = time.perf_counter() - t0
        self.split_miles(stores)
        for feat in ("raw", "transformer"):
            d = stores[feat]
            base = self.work / "models" / f"base-{feat}"
            self.log(f"pretrain the MLP on LAMOST-like {feat} features")
            t0 = time.perf_counter()
            stx(["pretrain", d["lamost"], "-o", base, "--epochs", 20 if self.quick else 60, "--seed", self.seed,
                 "--set", f"hidden={HIDDEN}", *THREADS])
            self.timings[f"pretrain-{feat}"] = time.perf_counter() - t0
            self.block("desi-sim", feat, base, d["desi_finetune"], d["desi_test"],
                       sets["desi_test"] / "truth.fits")
            # Few real stars: in quick mode a third of the fine-tuning half validates.
            self.block("miles-desi", feat, base, d["miles_ft"], d["miles_test"],
                       sets["miles_desi"] / "truth.fits", val_frac=0.34 if self.quick else 0.2)
        steps: dict[str, float] = {}
        for cmd, sec in STEP_TIMES:
            steps[cmd] = round(steps.get(cmd, 0.0) + sec, 2)
        self.timings.update({f"all {k}": v for k, v in steps.items()})
        result = {"quick": self.quick, "seed": self.seed, "workdir": str(self.work), "notes": sorted(self.notes),
                  "rows": self.rows,
                  "timings": self.timings, "total_s": time.perf_counter() - t_all}
        return result


def _spectra(folder: Path) -> list[str]:
    """The survey files of an example set: its ``spectra/`` folder (beside truth and labels)."""
    return [str(folder / "spectra")]


@contextlib.contextmanager
def _quiet(console: Any) -> Any:
    prev = console._state["quiet"]
    console.set_quiet(True)
    try:
        yield
    finally:
        console.set_quiet(prev)


def _train_info(summary: dict[str, Any], seconds: float) -> dict[str, Any]:
    """Number of target stars (training + validation), trainable parameters, wall time."""
    n = summary.get("n_target_stars")
    if n is None and summary.get("n_train") is not None:
        n = int(summary["n_train"]) + int(summary.get("n_val") or 0)
    return {"n_target": n, "trainable": summary.get("trainable_params"), "train_s": round(seconds, 2)}


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    """MAE, robust scatter and n per label for all stars and the [Fe/H] split (true [Fe/H])."""
    split = report.get("feh_split") or {}
    subsets = {"all": report.get("overall") or {}, "feh<-1": split.get("feh<-1") or {},
               "feh>=-1": split.get("feh>=-1") or {}}
    out: dict[str, Any] = {}
    for lab in LABELS:
        out[lab] = {}
        for key, _ in SUBSETS:
            m = subsets[key].get(lab) if subsets[key] else None
            out[lab][key] = None if not m or not m.get("n") else {
                "mae": m.get("mae"), "scatter": m.get("scatter"), "n": m.get("n")}
    return out


def print_tables(result: dict[str, Any]) -> None:
    from rich.table import Table

    from stxcli import console

    con = console.out()
    for block in dict.fromkeys(r["block"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["block"] == block]
        for lab in LABELS:
            unit = "K" if lab == "teff" else "dex"
            t = Table(title=f"{block}: {lab} ({unit}), MAE / robust scatter", title_justify="left")
            for col in ("features", "strategy", "n_tgt", "params", "train s"):
                t.add_column(col, justify="right" if col in ("n_tgt", "params", "train s") else "left")
            for _, title in SUBSETS:
                t.add_column(title, justify="right")
            for r in rows:
                cells = []
                for key, _ in SUBSETS:
                    m = (r["metrics"].get(lab) or {}).get(key)
                    cells.append("-" if not m or m["mae"] is None else
                                 f"{_fmt(m['mae'], lab)} / {_fmt(m['scatter'], lab)} (n={m['n']})")
                t.add_row(r["features"], r["strategy"], str(r["n_target"] if r["n_target"] is not None else "-"),
                          str(r["trainable"] if r["trainable"] is not None else "-"), f"{r['train_s']:.1f}", *cells)
            con.print(t)


def _fmt(v: float | None, lab: str) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}" if lab == "teff" else f"{v:.3f}"


def plot(result: dict[str, Any], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    blocks = list(dict.fromkeys(r["block"] for r in result["rows"]))
    fig = Figure(figsize=(4.2 * len(LABELS), 3.4 * len(blocks)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(blocks), len(LABELS), squeeze=False)
    for i, block in enumerate(blocks):
        rows = [r for r in result["rows"] if r["block"] == block]
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        feats = list(dict.fromkeys(r["features"] for r in rows))
        for j, lab in enumerate(LABELS):
            ax = axes[i][j]
            width = 0.8 / max(len(feats), 1)
            for k, feat in enumerate(feats):
                vals = []
                for s in strategies:
                    r = next((x for x in rows if x["strategy"] == s and x["features"] == feat), None)
                    m = (r["metrics"].get(lab) or {}).get("all") if r else None
                    vals.append(m["mae"] if m and m["mae"] is not None else float("nan"))
                ax.bar([x + k * width for x in range(len(strategies))], vals, width, label=feat)
            ax.set_xticks([x + width * (len(feats) - 1) / 2 for x in range(len(strategies))])
            ax.set_xticklabels(strategies, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{block}: {lab} MAE", fontsize=9)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@hookimpl
def register_commands(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        workdir: Path = typer.Option(Path("stx-demo"), "--workdir", "-w", help="Where the data, stores, models and reports go."),
        quick: bool = typer.Option(False, "--quick", help="A small version (under a minute; used in CI)."),
        seed: int = typer.Option(0, "--seed", help="Random seed for every step."),
        json_out: bool = typer.Option(False, "--json", help="Print the result table as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress messages."),
    ) -> None:
        """Run the whole pipeline on the built-in example data and print the comparison table.

        Featurize (raw and transformer), pretrain on simulated LAMOST-like stars, predict zero-shot,
        fine-tune with residual, LoRA, full and auto, train the target-only MLP and ridge baselines,
        predict and evaluate on simulated DESI-like stars and on real MILES stars observed DESI-like.
        """
        from stxcli import console
        from stxcli.io import atomic_file

        console.set_quiet(quiet or json_out)
        workdir.mkdir(parents=True, exist_ok=True)
        result = Demo(workdir, quick, seed).run()
        with atomic_file(workdir / "demo.json") as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
        with atomic_file(workdir / "demo_mae.png") as tmp:
            plot(result, tmp)
        if json_out:
            console.print_json(result)
        else:
            print_tables(result)
            for note in result["notes"]:
                console.out().print(f"note: {note}")
            console.out().print(f"wrote {workdir / 'demo.json'}, {workdir / 'demo_mae.png'} and per-model "
                                f"reports under {workdir / 'models'} ({result['total_s']:.0f} s)")
