"""Raw-spectrum MLPs versus encoder-embedding MLPs, zero-shot and fine-tuned, split at [Fe/H] = -1.

    python benchmarks/bench_encoder_accuracy.py [--work DIR] [--encoder DIR] [--encoder-epochs 10]
        [--n-finetune 150] [--adapter residual] [--quick] [--encoder-adapters]
        [--target-files LIST --target-labels CSV --target-id-column COL --target-match-by id|file]
    python benchmarks/bench_encoder_accuracy.py --demo-workdir stx-demo [--threads 1]

``--encoder-adapters`` adds, for the embedding model, the adapters that reach into the encoder
(``stx finetune --set target=...`` on the RAW fine-tuning store, docs/models.md): LoRA on the
head only (the default), LoRA on the encoder (head frozen), LoRA on encoder + head, and full
fine-tuning of encoder + head. ``--demo-workdir DIR`` runs just that comparison on the example
data of a finished ``stx demo`` (full or ``--quick``) workdir: its LAMOST-like pretrained embedding
model, its DESI-like fine-tuning and test stores (raw and transformer) and the test truth; results
in benchmarks/results/encoder_adapters.json.

The paper's comparison (issue 5), run entirely through the stx CLI, on real data by default:

* source: the 1,037 real LAMOST DR10 spectra with LASP labels (../shared/data/lamost-dr10-train;
  no star below [Fe/H] = -1 there, like LAMOST itself);
* target: the MILES library stars (../shared/data/miles; Cenarro et al. 2007 labels, 119 stars
  below [Fe/H] = -1), or any labelled target given with --target-*, e.g. simulated DESI spectra.

Steps: `stx featurize` (raw) both sets; `stx encoder train` on the source raw store (unless
--encoder); `stx encoder embed` both; then for each feature type `stx pretrain` on the source,
`stx predict` + `stx evaluate` on the target test stars (zero-shot), `stx finetune --adapter A
--n-train N` on a seeded subset of target stars, predict + evaluate the same test stars. The
target stars are split once (seeded) into a fine-tuning set and a disjoint test set.
Writes benchmarks/results/encoder_accuracy.json (MAE, bias, robust scatter per label, overall and
per [Fe/H] regime, with the number of fine-tuning stars and trainable parameters).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, write  # noqa: E402

LABELS = ("teff", "logg", "feh")


CACHE: Path | None = None


def stx(*args: object, key: str | None = None) -> dict:
    """Run the real CLI (the console script's entry function) and parse its --json output. With
    ``key``, the summary is kept in WORK/key.json and a rerun skips the command (resume)."""
    if key and CACHE and (CACHE / f"{key}.json").exists():
        return json.loads((CACHE / f"{key}.json").read_text())
    cmd = [sys.executable, "-c", "from stxcli.cli.main import run; run()", *[str(a) for a in args]]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"failed ({res.returncode}): stx {' '.join(map(str, args))}\n{res.stderr}")
    print(f"  stx {args[0]} {args[1] if len(args) > 1 else ''}: {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    out = res.stdout.strip()
    summary = json.loads(out) if out.startswith(("{", "[")) else {}
    if key and CACHE:
        (CACHE / f"{key}.json").write_text(json.dumps(summary))
    return summary


def file_list(folder: Path, out: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".fits", ".fits.gz", ".fit")))
    out.write_text("\n".join(str(p) for p in files) + "\n")
    return out


def split_store(src: Path, ft: Path, test: Path, n_ft: int, seed: int) -> tuple[int, int]:
    """Rows with all labels -> a seeded fine-tuning subset and the disjoint rest (same featurizer
    identity, so the stores stay compatible with models made on the source)."""
    from stxcli.store import FeatureStore, write_store_arrays

    with FeatureStore.open(src) as st:
        d = st.read(fields=("features", "ivar", "ids", "quality"))
        y = st.labels(list(LABELS))
        ok = np.flatnonzero(np.isfinite(y).all(1))
        perm = np.random.default_rng(seed).permutation(ok)
        n_ft = min(n_ft, len(perm) // 2)
        for path, rows in ((ft, np.sort(perm[:n_ft])), (test, np.sort(perm[n_ft:]))):
            write_store_arrays(path, d["features"][rows], d["ivar"][rows], d["ids"][rows],
                               {k: y[rows, i] for i, k in enumerate(LABELS)},
                               featurizer_name=st.featurizer_name, featurizer_version=st.featurizer_version,
                               featurizer_config=st.featurizer_config,
                               quality={k: v[rows] for k, v in d["quality"].items()}, axis=st.axis,
                               survey="target")
    return n_ft, len(perm) - n_ft


def truth_csv(store: Path, out: Path) -> Path:
    from stxcli.store import FeatureStore

    with FeatureStore.open(store) as st:
        ids, y = st.ids, st.labels(list(LABELS))
    lines = ["id," + ",".join(LABELS)] + [f"{i}," + ",".join(f"{v:.6g}" for v in row) for i, row in zip(ids, y)]
    out.write_text("\n".join(lines) + "\n")
    return out


def metrics(report: dict) -> dict:
    """Per label MAE / bias / robust scatter: overall and per [Fe/H] regime (split on the truth)."""
    split = report.get("feh_split") or {}
    out = {"n": report.get("n_stars")}
    for name, sub in (("overall", report["overall"]), ("feh<-1", split.get("feh<-1")),
                      ("feh>=-1", split.get("feh>=-1"))):
        out[name] = {lab: _pick((sub or {}).get(lab)) for lab in LABELS}
    return out


def _pick(m: dict | None) -> dict:
    m = m or {}
    return {k: m.get(k) for k in ("n", "mae", "bias", "scatter")}


#: (name, adapter, --set options, fine-tuning store kind): head-only LoRA vs the encoder adapters
ENCODER_STRATEGIES = (
    ("lora (head)", "lora", [], "emb"),
    ("lora (encoder)", "lora", ["target=encoder"], "raw"),
    ("lora (encoder+head)", "lora", ["target=encoder+head"], "raw"),
    ("full (encoder+head)", "full", ["target=encoder+head"], "raw"),
)


def encoder_adapters(w: Path, base: Path, stores: dict[str, dict[str, Path]], truth: Path, seed: int,
                     extra: list[str], tag: str = "") -> dict:
    """Zero-shot and every ENCODER_STRATEGIES run of the embedding model ``base``: fine-tune on
    ``stores[kind]["ft"]``, predict ``stores[kind]["test"]``, evaluate against ``truth``."""
    out: dict = {}
    stx("predict", base, stores["emb"]["test"], "-o", w / f"zs_enc{tag}.fits", *extra, "--json",
        key=f"predict_zs_enc{tag}")
    zs = stx("evaluate", w / f"zs_enc{tag}.fits", truth, "-o", w / f"zs_enc{tag}_report", "--no-plots", "--json",
             key=f"evaluate_zs_enc{tag}")
    out["zero-shot"] = {"n_target_stars": 0, "trainable_params": 0, "train_time_s": 0.0, **metrics(zs)}
    runs = []
    for name, adapter, sets, kind in ENCODER_STRATEGIES:  # every fine-tuning first, then predictions
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "-")
        model = w / f"encft{tag}_{slug}"
        t0 = time.perf_counter()
        ft = stx("finetune", base, stores[kind]["ft"], "--adapter", adapter, *[a for v in sets for a in ("--set", v)],
                 "-o", model, "--seed", seed, *extra, "--json", key=f"finetune_enc{tag}_{slug}")
        runs.append((name, adapter, sets, kind, slug, model, ft, time.perf_counter() - t0))
    for name, adapter, sets, kind, slug, model, ft, t_ft in runs:
        stx("predict", model, stores[kind]["test"], "-o", w / f"{model.name}.fits", *extra, "--json",
            key=f"predict_enc{tag}_{slug}")
        rep = stx("evaluate", w / f"{model.name}.fits", truth, "-o", w / f"{model.name}_report", "--no-plots",
                  "--json", key=f"evaluate_enc{tag}_{slug}")
        out[name] = {"adapter": adapter, "settings": sets, "input": kind,
                     "n_target_stars": ft.get("n_target_stars"), "trainable_params": ft.get("trainable_params"),
                     "epochs_run": ft.get("epochs_run"), "best_epoch": ft.get("best_epoch"),
                     "train_time_s": ft.get("train_time_s", round(t_ft, 1)), **metrics(rep)}
    return out


def demo_main(args: argparse.Namespace) -> None:
    """``--demo-workdir``: the encoder-adapter comparison on a finished stx demo workdir."""
    d = args.demo_workdir
    f = d / "features"
    need = [d / "models" / "base-transformer", d / "data" / "desi" / "test" / "truth.fits",
            *(f / f"desi_{s}-{k}.h5" for s in ("finetune", "test") for k in ("raw", "transformer"))]
    missing = [str(p) for p in need if not p.exists()]
    if missing:
        raise SystemExit(f"not a finished stx demo workdir (missing {', '.join(missing)}); run `stx demo -w {d}`")
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    global CACHE
    CACHE = w
    t0 = time.perf_counter()
    stores = {"raw": {"ft": f / "desi_finetune-raw.h5", "test": f / "desi_test-raw.h5"},
              "emb": {"ft": f / "desi_finetune-transformer.h5", "test": f / "desi_test-transformer.h5"}}
    extra = ["--threads", str(args.threads)] if args.threads else []
    res = encoder_adapters(w, d / "models" / "base-transformer", stores, d / "data" / "desi" / "test" / "truth.fits",
                           args.seed, extra)
    info = stx("encoder", "info", d / "encoder", "--json")
    demo = json.loads((d / "demo.json").read_text()) if (d / "demo.json").exists() else {}
    write("encoder_adapters", {
        "command": "python benchmarks/bench_encoder_accuracy.py " + " ".join(sys.argv[1:]),
        "data": f"stx demo{' --quick' if demo.get('quick') else ''} example data: simulated LAMOST-like "
                "pre-training stars, DESI-like fine-tuning and test stars",
        "demo_workdir": str(d), "threads": args.threads, "seed": args.seed,
        "encoder": {"sha256": info.get("encoder_sha256"), "architecture": info.get("architecture"),
                    "n_params": info.get("n_params")},
        "results": res, "seconds": round(time.perf_counter() - t0, 1),
    })


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("bench-encoder-accuracy"))
    ap.add_argument("--encoder", type=Path, help="use this encoder instead of training one")
    ap.add_argument("--encoder-epochs", type=int, default=10)
    ap.add_argument("--n-finetune", type=int, default=150)
    ap.add_argument("--adapter", default="residual")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 encoder epochs, width 64")
    ap.add_argument("--target-files", type=Path, help="list of target spectrum files (default: MILES)")
    ap.add_argument("--target-labels", type=Path)
    ap.add_argument("--target-id-column", default="file")
    ap.add_argument("--target-match-by", default="file")
    ap.add_argument("--encoder-adapters", action="store_true",
                    help="also fine-tune the embedding model's encoder (LoRA head / encoder / both, full)")
    ap.add_argument("--demo-workdir", type=Path, help="only the encoder-adapter comparison, on a stx demo workdir")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of each stx command")
    args = ap.parse_args()
    if args.demo_workdir is not None:
        if args.work == Path("bench-encoder-accuracy"):
            args.work = Path("bench-encoder-adapters")
        return demo_main(args)
    global CACHE
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    CACHE = w
    t_start = time.perf_counter()

    src_raw, tgt_raw = w / "source_raw.h5", w / "target_raw.h5"
    if not src_raw.exists():
        stx("featurize", file_list(SHARED / "lamost-dr10-train" / "spectra", w / "source.txt"), "-o", src_raw,
            "--labels", SHARED / "lamost-dr10-train" / "labels.csv", "--id-column", "obsid", "--json")
    if not tgt_raw.exists():
        files = args.target_files or file_list(SHARED / "miles" / "spectra", w / "target.txt")
        labels = args.target_labels or SHARED / "miles" / "labels.csv"
        stx("featurize", files, "-o", tgt_raw, "--labels", labels, "--id-column", args.target_id_column,
            "--match-by", args.target_match_by, "--json")
    n_ft, n_test = split_store(tgt_raw, w / "ft_raw.h5", w / "test_raw.h5", args.n_finetune, args.seed)
    truth = truth_csv(w / "test_raw.h5", w / "truth.csv")

    enc = args.encoder
    enc_summary: dict = {}
    if enc is None:
        enc = w / "encoder"
        extra = ["--width", "64", "--epochs", "2"] if args.quick else ["--epochs", args.encoder_epochs]
        enc_summary = stx("encoder", "train", src_raw, "-o", enc, *extra, "--seed", args.seed, "--json",
                          key="encoder_train")
    info = stx("encoder", "info", enc, "--json")
    for name in ("source", "ft", "test"):
        stx("encoder", "embed", w / f"{name}_raw.h5", "--encoder", enc, "-o", w / f"{name}_emb.h5", "--json",
            key=f"embed_{name}")

    results: dict = {}
    for kind in ("raw", "emb"):
        base = w / f"base_{kind}"
        pre = stx("pretrain", w / f"source_{kind}.h5", "-o", base, "--labels", ",".join(LABELS),
                  "--seed", args.seed, "--json", key=f"pretrain_{kind}")
        stx("predict", base, w / f"test_{kind}.h5", "-o", w / f"zs_{kind}.fits", "--json", key=f"predict_zs_{kind}")
        zs = stx("evaluate", w / f"zs_{kind}.fits", truth, "-o", w / f"zs_{kind}_report", "--json",
                 key=f"evaluate_zs_{kind}")
        ft = stx("finetune", base, w / f"ft_{kind}.h5", "--adapter", args.adapter, "-o", w / f"ft_{kind}",
                 "--seed", args.seed, "--json", key=f"finetune_{kind}_{args.adapter}")
        stx("predict", w / f"ft_{kind}", w / f"test_{kind}.h5", "-o", w / f"ft_{kind}.fits", "--json",
            key=f"predict_ft_{kind}_{args.adapter}")
        fr = stx("evaluate", w / f"ft_{kind}.fits", truth, "-o", w / f"ft_{kind}_report", "--json",
                 key=f"evaluate_ft_{kind}_{args.adapter}")
        results[kind] = {"pretrain": {k: pre.get(k) for k in ("n_train", "n_val", "trainable_params", "n_params")
                                      if k in pre},
                         "zero_shot": metrics(zs),
                         "finetuned": {"adapter": args.adapter,
                                       "n_target_stars": ft.get("n_target_stars", ft.get("n_train")),
                                       "trainable_params": ft.get("trainable_params"), **metrics(fr)}}

    if args.encoder_adapters:
        stores = {k: {"ft": w / f"ft_{k}.h5", "test": w / f"test_{k}.h5"} for k in ("raw", "emb")}
        results["emb"]["encoder_adapters"] = encoder_adapters(w, w / "base_emb", stores, truth, args.seed, [])

    write("encoder_accuracy", {
        "command": "python benchmarks/bench_encoder_accuracy.py " + " ".join(sys.argv[1:]),
        "source": "lamost-dr10-train (real, LASP labels)",
        "target": str(args.target_files or "miles (real, Cenarro et al. 2007 labels)"),
        "n_finetune_pool": n_ft, "n_test": n_test, "seed": args.seed,
        "encoder": {"path": str(enc), "sha256": info.get("encoder_sha256"), "architecture": info.get("architecture"),
                    "n_params": info.get("n_params"), "best_val_mse": info.get("best_val_mse"),
                    "val_mse_predicting_mean": info.get("val_mse_predicting_mean"),
                    "train_seconds": enc_summary.get("seconds")},
        "results": results, "seconds": round(time.perf_counter() - t_start, 1),
    })


if __name__ == "__main__":
    main()
