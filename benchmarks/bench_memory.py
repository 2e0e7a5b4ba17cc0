"""Peak memory of ``stx featurize`` and ``stx predict`` as the input grows 10x (issues 4 and 6).

    python benchmarks/bench_memory.py [--quick] [--sizes 10000,100000] [--rows-per-file 5000]
        [--workdir DIR] [--threads 2]

Inputs: one DESI coadd of ``--rows-per-file`` spectra tiled from the real EDR rows
(:func:`bench_featurize.make_coadd`), hard-linked N / rows-per-file times under different names, so
10^5 spectra (about 45 GB of coadds) take the disk space of one file; stx sees distinct files
(paths are not resolved through hard links). The model is a raw-feature MLP (3535-512-256-6) made
by :func:`_common.raw_model`.

For each size N, three commands run in a fresh child process each, and their peak resident memory
(VmHWM) is read:

* ``stx featurize FILES -o store.h5`` (one process, the default);
* ``stx predict MODEL store.h5`` (from the feature store);
* ``stx predict MODEL FILES`` (end to end: the files are featurized on the fly).

Figures: peak at the largest N over peak at the smallest (flat memory: close to 1; target
< 1.25), next to the size of the data (the coadds, and the features + inverse variances the
store holds: what holding it all in memory would take). Writes benchmarks/results/memory.json
(``--quick``: 10^4 vs 2x10^4 spectra in files of 1,000, memory-quick.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import loadavg, raw_model, run_stx_peak, write  # noqa: E402

BYTES_PER_SPECTRUM = 450_000  # a DESI coadd row: flux, ivar, mask, 11-diagonal resolution, 3 arms
FLAT_TARGET = 1.25


def link_files(base: Path, folder: Path, n_files: int) -> Path:
    """``n_files`` hard links of ``base`` in ``folder`` and a list file naming them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(n_files):
        p = folder / f"coadd-{i:04d}.fits"
        if not p.exists():
            os.link(base, p)
        names.append(p.name)
    listing = folder / "files.txt"
    listing.write_text("\n".join(names) + "\n")
    return listing


def measure_size(model: Path, base: Path, rows_per_file: int, n: int, work: Path,
                 threads: int) -> dict[str, Any]:
    n_files = n // rows_per_file
    folder = work / f"n{n}"
    listing = link_files(base, folder, n_files)
    store = folder / "store.h5"
    runs: dict[str, Any] = {}
    r = run_stx_peak(["featurize", str(listing), "-o", str(store), "-q", "--json"], work)
    summary = json.loads(r.pop("stdout"))
    if summary["n_spectra"] != n:
        raise RuntimeError(f"featurize wrote {summary['n_spectra']} spectra, expected {n}")
    runs["featurize"] = {**r, "spectra_per_s": round(n / r["wall_s"], 1)}
    store_bytes = store.stat().st_size
    for name, src in (("predict_store", store), ("predict_files", listing)):
        out = folder / f"{name}.fits"
        r = run_stx_peak(["predict", str(model), str(src), "-o", str(out), "-q", "--json",
                          "--threads", str(threads)], work)
        got = json.loads(r.pop("stdout"))["n_spectra"]
        if got != n:
            raise RuntimeError(f"{name}: {got} predictions, expected {n}")
        runs[name] = {**r, "spectra_per_s": round(n / r["wall_s"], 1),
                      "catalog_mb": round(out.stat().st_size / 1e6, 1)}
        out.unlink()
    with __import__("h5py").File(store, "r") as h:
        dim = int(h["features"].shape[1])
    shutil.rmtree(folder)
    return {
        "n_spectra": n, "n_files": n_files, "rows_per_file": rows_per_file, "dim": dim,
        "data_mb": {"coadd_files": round(n_files * base.stat().st_size / 1e6, 1),
                    "features_and_ivar_float32": round(n * dim * 4 * 2 / 1e6, 1),
                    "store_file": round(store_bytes / 1e6, 1)},
        **runs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10^4 vs 2x10^4 spectra, files of 1,000")
    ap.add_argument("--sizes", help="comma-separated numbers of spectra (default 10000,100000)")
    ap.add_argument("--rows-per-file", type=int, help="spectra per coadd file (default 5000)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of stx predict")
    ap.add_argument("--workdir", type=Path, help="parent of the temporary work directory")
    args = ap.parse_args()
    rows = args.rows_per_file or (1000 if args.quick else 5000)
    sizes = [int(s) for s in (args.sizes or ("10000,20000" if args.quick else "10000,100000")).split(",")]
    if len(sizes) < 2 or any(s % rows for s in sizes):
        sys.exit(f"--sizes: at least two sizes, each a multiple of --rows-per-file ({rows})")
    sizes.sort()

    work = Path(tempfile.mkdtemp(prefix="stx-bench-memory-", dir=args.workdir))
    # One coadd on disk, plus the largest store and catalog at a time.
    need = rows * BYTES_PER_SPECTRUM + sizes[-1] * 3600 * 8 * 1.2 + 500e6
    free = shutil.disk_usage(work).free
    if free < need:
        shutil.rmtree(work)
        sys.exit(f"{work.parent}: {free / 1e9:.1f} GB free, this run needs about {need / 1e9:.1f} GB "
                 f"(--workdir elsewhere, or smaller --sizes)")
    try:
        from bench_featurize import make_coadd

        base = make_coadd(work / "base.fits", rows, id_offset=11)
        model = raw_model(work / "model", threads=args.threads)
        per_size = [measure_size(model, base, rows, n, work, args.threads) for n in sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lo, hi = per_size[0], per_size[-1]
    flat = {}
    for cmd in ("featurize", "predict_store", "predict_files"):
        flat[cmd] = {
            f"peak_mb_{lo['n_spectra']}": lo[cmd]["peak_mb"], f"peak_mb_{hi['n_spectra']}": hi[cmd]["peak_mb"],
            "ratio_largest_over_smallest": round(hi[cmd]["peak_mb"] / lo[cmd]["peak_mb"], 3),
            "target_max_ratio": FLAT_TARGET,
            "peak_over_features_in_memory": round(hi[cmd]["peak_mb"] / hi["data_mb"]["features_and_ivar_float32"], 4),
            "peak_over_coadds_in_memory": round(hi[cmd]["peak_mb"] / hi["data_mb"]["coadd_files"], 5),
        }
    write("memory", {
        "sizes": sizes, "rows_per_file": rows, "threads": args.threads,
        "flat": flat, "runs": per_size, "load_at_end": loadavg(),
        "note": "each command runs in its own process; peak_mb is that process's VmHWM; "
                "coadd files are hard links of one tiled coadd (identical spectra, distinct files); "
                "featurize runs one process (the default); data_mb is what holding the inputs or "
                "the features in memory would take",
    })


if __name__ == "__main__":
    main()
