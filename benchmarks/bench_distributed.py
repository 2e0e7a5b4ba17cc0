"""Scale-out with Dask (issue 7): throughput with 1 and 2 Dask workers next to one process and the
local process pool (``--workers 2``), and peak memory as the input grows 10x.

    python benchmarks/bench_distributed.py [--quick]

Two workloads of real data: LAMOST DR10 files (one spectrum per file: per-file costs dominate)
and DESI coadds of 200 spectra tiled from the real EDR rows (per-spectrum costs dominate). Every
configuration runs in a fresh process (cluster start-up included in ``wall_s``; ``run_s`` is the
featurize call alone). Peak memory: the client's and the largest worker's VmHWM. The per-spectrum
and per-file costs measured here feed the projection in docs/scaling.md.
Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, write  # noqa: E402

LAMOST = SHARED / "lamost-dr10-train" / "spectra"


def _peak_mb() -> float:
    """This process's own high-water mark (VmHWM). ru_maxrss would carry the parent's peak
    across fork + exec on Linux, and Dask's worker processes are started that way."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024.0
    raise RuntimeError("no VmHWM in /proc/self/status")


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (user + system)."""
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def child(mode: str, files: Path, out: Path, workers: int) -> dict[str, Any]:
    """One configuration, run in this (fresh) process; returns what it measured."""
    import os

    os.environ.setdefault("STX_LOAD_PLUGINS", "stx")
    from stxcli import console
    from stxcli import distributed as D
    from stxcli.cli.featurize import run_featurize

    console.set_quiet(True)
    res: dict[str, Any] = {"mode": mode, "workers": workers}
    t0 = time.perf_counter()
    if mode in ("single", "pool"):
        t1, c1 = time.perf_counter(), _cpu_s()
        s = run_featurize([str(files)], out, workers=workers)
        res["run_s"] = time.perf_counter() - t1
        res["cpu_s"] = _cpu_s() - c1  # pool: the workers are children, counted when they exit
        res["client_peak_mb"] = _peak_mb()
    else:
        import logging

        import distributed

        combine = {"s": 0.0}
        real_add = D._Combiner.add

        def timed_add(self: Any, part: Any) -> None:
            t = time.perf_counter()
            real_add(self, part)
            combine["s"] += time.perf_counter() - t

        D._Combiner.add = timed_add  # type: ignore[method-assign]
        real_finish = D._finish

        def timed_finish(w: Any, *a: Any) -> str:  # the checksum pass over the combined store
            t = time.perf_counter()
            out = real_finish(w, *a)
            combine["finish_s"] = time.perf_counter() - t
            return out

        D._finish = timed_finish  # type: ignore[assignment]
        cluster = distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
        client = distributed.Client(cluster)
        res["cluster_start_s"] = time.perf_counter() - t0
        w1 = client.run(_cpu_s)
        t1, c1 = time.perf_counter(), _cpu_s()
        s = run_featurize([str(files)], out, dask=client)
        res["run_s"] = time.perf_counter() - t1
        c2, w2 = _cpu_s(), client.run(_cpu_s)
        res["client_cpu_s"] = c2 - c1
        res["cpu_s"] = res["client_cpu_s"] + sum(w2[k] - w1[k] for k in w1)
        res["task_cpu_s"] = s["dask"]["task_cpu_seconds"]
        res["combine_s"] = combine["s"]
        res["finish_s"] = combine["finish_s"]
        res["task_s"] = s["dask"]["task_seconds"]
        res["partitions"] = s["dask"]["partitions"]
        res["client_peak_mb"] = _peak_mb()
        peaks = client.run(_peak_mb)
        res["worker_peak_mb"] = max(peaks.values())
        client.close()
        cluster.close()
    res["wall_s"] = time.perf_counter() - t0
    res["n_spectra"] = s["n_spectra"]
    res["n_files"] = s["n_files"]
    res["checksum"] = s["checksum"]
    res["store_mb"] = out.stat().st_size / 1e6
    res["loadavg_1min"] = os.getloadavg()[0]  # other processes on the machine slow every figure
    return res


def run_child(mode: str, files: Path, out: Path, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--files", str(files), "--out", str(out),
           "--workers", str(workers)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    out.unlink()
    res["spectra_per_s"] = res["n_spectra"] / res["run_s"]
    res["cpu_ms_per_spectrum"] = 1e3 * res["cpu_s"] / res["n_spectra"]
    print(f"  {mode:6s} x{workers}: {res['n_files']:5d} files {res['n_spectra']:6d} spectra  "
          f"run {res['run_s']:6.2f} s  wall {res['wall_s']:6.2f} s  {res['spectra_per_s']:7.1f}/s  "
          f"cpu {res['cpu_ms_per_spectrum']:6.1f} ms/spectrum  "
          f"client {res['client_peak_mb']:.0f} MB  worker {res.get('worker_peak_mb', 0):.0f} MB  "
          f"load {res['loadavg_1min']:.1f}", flush=True)
    return res


def file_list(td: Path, name: str, files: list[Path]) -> Path:
    p = td / f"{name}.txt"
    p.write_text("\n".join(str(f) for f in files) + "\n")
    return p


def configs(td: Path, files: Path, tag: str) -> dict[str, Any]:
    runs = {f"{m}{w}": run_child(m, files, td / f"{tag}-{m}{w}.h5", w)
            for m, w in (("single", 1), ("pool", 2), ("dask", 1), ("dask", 2))}
    checks = {r["checksum"] for k, r in runs.items() if k.startswith(("single", "pool"))}
    runs["note"] = ("single/pool ran with the default BLAS threads, dask workers with OMP_NUM_THREADS=1; "
                    f"single and pool checksums agree: {len(checks) == 1}")
    return runs


def combine_alone(td: Path, total: int = 12800, dim: int = 3535) -> dict[str, Any]:
    """The client's per-spectrum cost of appending parts of 200, 1,600 and 6,400 rows to the
    output and of the final checksum pass, measured alone (synthetic features; no workers)."""
    import h5py
    import numpy as np

    from stxcli import distributed as D
    from stxcli.protocols import FeatureBatch
    from stxcli.spectra import SpectrumMeta
    from stxcli.store import StoreWriter, _copy_rows

    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"spectra": total, "dim": dim}
    for rows in (200, 1600, 6400):
        parts = []
        for k in range(total // rows):
            meta = SpectrumMeta.empty(rows, "test", f"f{k}.fits")
            meta.extra["targetid"] = np.arange(rows, dtype=np.int64)
            w = StoreWriter(td / f"part{k}.h5", featurizer_name="t", featurizer_version="0",
                            featurizer_config={}, dim=dim)
            w.append(FeatureBatch(rng.random((rows, dim), dtype=np.float32), np.ones((rows, dim), np.float32),
                                  {"snr": np.ones(rows, np.float32), "flags": np.zeros(rows, np.int32)}, meta))
            w.finish()
            parts.append(td / f"part{k}.h5")
        w = StoreWriter(td / "combined.h5", featurizer_name="t", featurizer_version="0", featurizer_config={},
                        dim=dim)
        t0 = time.perf_counter()
        for p in parts:
            with h5py.File(p, "r") as src:
                _copy_rows(src, w, chunk_rows=D.SLAB_ROWS)
        t1 = time.perf_counter()
        D._finish(w)
        t2 = time.perf_counter()
        out[f"parts_of_{rows}"] = {"append_ms_per_spectrum": 1e3 * (t1 - t0) / total,
                                   "checksum_ms_per_spectrum": 1e3 * (t2 - t1) / total}
        for p in parts:
            p.unlink()
        (td / "combined.h5").unlink()
        print(f"  combine alone, parts of {rows:5d} rows: append {out[f'parts_of_{rows}']['append_ms_per_spectrum']:.3f}"
              f" ms, checksum {out[f'parts_of_{rows}']['checksum_ms_per_spectrum']:.3f} ms per spectrum", flush=True)
    return out


def derived(r: dict[str, Any]) -> dict[str, Any]:
    """Per-spectrum and per-file costs from a 2-worker Dask run."""
    return {"task_s_per_spectrum": r["task_s"] / r["n_spectra"],
            "task_cpu_s_per_spectrum": r["task_cpu_s"] / r["n_spectra"],
            "task_s_per_file": r["task_s"] / r["n_files"],
            "client_cpu_s_per_spectrum": r["client_cpu_s"] / r["n_spectra"],
            "combine_s_per_spectrum": r["combine_s"] / r["n_spectra"],
            "finish_s_per_spectrum": r["finish_s"] / r["n_spectra"],
            "store_bytes_per_spectrum": r["store_mb"] * 1e6 / r["n_spectra"],
            "cluster_start_s": r["cluster_start_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.files), Path(args.out), args.workers)))
        return
    from bench_featurize import make_coadd

    # The big inputs are the throughput runs; the 10x-smaller ones are run with 2 Dask workers only.
    lam_small, lam_big = (20, 200) if args.quick else (60, 600)
    desi_rows = 200
    desi_small, desi_big, desi_huge = 1, 10, 40
    lamost = sorted(LAMOST.glob("*.fits.gz"))
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        print("LAMOST DR10, one spectrum per file", flush=True)
        lam_runs = configs(td, file_list(td, "lam_big", lamost[:lam_big]), "lam")
        lam_small_run = run_child("dask", file_list(td, "lam_small", lamost[:lam_small]), td / "ls.h5", 2)
        print(f"DESI coadds, {desi_rows} spectra per file", flush=True)
        coadds = [make_coadd(td / f"c{i:03d}.fits", desi_rows, id_offset=i)
                  for i in range(desi_big if args.quick else desi_huge)]
        desi_runs = configs(td, file_list(td, "desi_big", coadds[:desi_big]), "desi")
        desi_small_run = run_child("dask", file_list(td, "desi_small", coadds[:desi_small]), td / "ds.h5", 2)
        # a third point, 4x further: the client's slabs reach their cap at 1024 rows
        desi_huge_run = (None if args.quick else
                         run_child("dask", file_list(td, "desi_huge", coadds), td / "dh.h5", 2))
        print("client-side combine alone", flush=True)
        combine = combine_alone(td)
    mem = {"lamost": {"small": lam_small_run, "big": lam_runs["dask2"]},
           "desi": {"small": desi_small_run, "big": desi_runs["dask2"]}}
    if desi_huge_run is not None:
        mem["desi_40x"] = {"small": desi_small_run, "big": desi_huge_run}
    for v in mem.values():
        v["input_ratio"] = v["big"]["n_spectra"] / v["small"]["n_spectra"]
        v["client_peak_ratio"] = v["big"]["client_peak_mb"] / v["small"]["client_peak_mb"]
        v["worker_peak_ratio"] = v["big"]["worker_peak_mb"] / v["small"]["worker_peak_mb"]
    res = {
        "throughput": {"lamost_1_per_file": lam_runs, "desi_200_per_file": desi_runs},
        "costs": {"lamost": derived(lam_runs["dask2"]), "desi": derived(desi_runs["dask2"])},
        "memory_10x": mem,
        "combine_alone": combine,
        "quick": args.quick,
    }
    write("distributed" + ("-quick" if args.quick else ""), res)


if __name__ == "__main__":
    main()
