"""Reading and featurizing DESI coadds, against specutils measured in the same run.

    python benchmarks/bench_featurize.py [--quick]

Figures (issue 2): DESI read >= 2.5x faster than specutils' SpectrumList.read on a 500-spectrum
coadd built from the real EDR files; read + raw featurization faster than specutils' read alone;
>= 3,000 spectra/s featurizing with 2 workers on 2 cores; peak memory of featurizing that file
under half of specutils' read; `stx --help` within 0.3 s of `python -c pass`.

What is timed:
- ``read``: the DESI reader into arrays vs ``SpectrumList.read`` (alternating with the next, 12
  rounds, best of each).
- ``read_and_featurize``: the figure as the issue states it, read + raw featurization of the
  coadd into feature arrays (``stxcli.pipeline.featurize_file``: the reader, the batch check and
  the featurizer at 1 BLAS thread, 256 spectra per batch as ``stx featurize`` reads them), with
  ``threads`` batches featurized at once as ``stx featurize`` does by default (the usable cores:
  2 on the issue's machine) and with 1 thread (``stx_s_1_thread``); specutils' read has no
  parallel mode (it is one numpy/astropy pass per HDU). With a
  featurizer that has seen the file's grids before (its kernels, rebinning matrices and RV
  templates are built once per run: ``featurizer_setup_s`` is that one-time cost). The same file
  through the whole ``stx featurize`` (``end_to_end_s``) adds what specutils' read does not do:
  the digest of the input file (``input_digest_s``: XXH3-128, ``sha256_s`` for what SHA-256 would
  cost; the coadd is 223 MB, 80 % resolution matrices),
  identifying the file, and writing and checksumming the store.
- ``featurize_rate``: ``stx featurize`` of 4 coadds of 1,000 spectra: 1 process and 1 thread;
  1 process and 2 threads (``--threads 2``, the default on 2 cores); 2 worker processes of 1
  thread each (``-j 2``). The issue's "2 workers on 2 cores" is the best of the two parallel
  modes, both are recorded.
- ``featurize_rate_live_only``: the coadds above tile the 5 EDR rows, of which 3 are dead fibres
  (ivar 0 everywhere, skipped by the featurizer); this is read + featurize of a coadd of the 2
  live rows only, one process: the cost of a spectrum that has data, with the numpy path and
  with the compiled kernels (``STX_KERNELS=compiled``, loaded before timing). Every other timing
  runs the numpy path: ``STX_KERNELS=auto`` (the default) runs it on jobs this size.
- ``lamost_files``: ``stx featurize`` of real one-spectrum LAMOST DR10 ``.fits.gz`` files
  (``../shared/data/lamost-dr10-train``; 400, or 100 with ``--quick``) in one process with 1
  thread, with the default threads and with 2 worker processes, next to astropy opening each
  file and reading its COADD table alone (``fits.open`` + the FLUX, IVAR, WAVELENGTH columns).
- ``peak_memory_mb``: VmHWM of a fresh process running ``stx featurize`` on the 500-spectrum
  coadd vs one running specutils' read; stx as it runs by default (``STX_KERNELS=auto``: too
  few spectra to load the compiled kernels) and with ``STX_KERNELS=compiled``.
The 1-minute load average before and after is recorded: above the core count, other jobs shared
the machine and every time is inflated. Writes benchmarks/results/featurize.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, best_of, kernels, loadavg, peak_rss_mb, specutils_alone, write  # noqa: E402

EDR = SHARED / "desi-edr" / "coadd-sv3-dark-26065.fits"
CHUNK = 256  # spectra per batch, as stx featurize reads them


def make_coadd(out: Path, n_rows: int, src: Path = EDR, id_offset: int = 0, live_only: bool = False) -> Path:
    """A coadd with ``n_rows`` spectra made by tiling the real EDR rows (TARGETIDs made unique);
    ``live_only``: tile only the rows with data (ivar > 0 somewhere in the b arm)."""
    from astropy.io import fits

    with fits.open(src) as hdul:
        nsrc = len(hdul["FIBERMAP"].data)
        rows = np.flatnonzero((hdul["B_IVAR"].data > 0).any(axis=1)) if live_only else np.arange(nsrc)
        idx = rows[np.arange(n_rows) % rows.size]
        new = fits.HDUList()
        for hdu in hdul:
            if isinstance(hdu, fits.PrimaryHDU):
                new.append(fits.PrimaryHDU(header=hdu.header))
            elif isinstance(hdu, fits.BinTableHDU):
                if len(hdu.data) == nsrc:
                    data = hdu.data[idx].copy()
                    if "TARGETID" in data.columns.names:
                        data["TARGETID"] = data["TARGETID"] + id_offset + np.arange(n_rows) * 1000
                    new.append(fits.BinTableHDU(data=data, header=hdu.header))
                else:
                    new.append(hdu.copy())
            elif hdu.data is not None and hdu.data.ndim >= 2 and hdu.data.shape[0] == nsrc:
                new.append(fits.ImageHDU(data=hdu.data[idx], header=hdu.header, name=hdu.name))
            else:
                new.append(hdu.copy())
        new.writeto(out, overwrite=True)
    return out


def desi_reader():
    from stxcli.registry import get_registry

    return get_registry().get("reader", "desi")


def read_stx(path: Path) -> int:
    return sum(b.n for b in desi_reader().read(path, chunk_size=CHUNK))


def live_fraction(path: Path) -> float:
    n = live = 0
    for b in desi_reader().read(path, chunk_size=CHUNK):
        n += b.n
        live += int(np.any([(a.ivar > 0).any(axis=1) for a in b.arms], axis=0).sum())
    return live / n


def read_specutils(path: Path) -> int:
    from specutils import SpectrumList

    sl = SpectrumList.read(path, format="DESI coadd")
    return sl[0].flux.shape[0]


def read_and_featurize(path: Path, featurizer, threads: int = 1) -> int:
    from stxcli.pipeline import featurize_file

    return sum(fb.features.shape[0] for fb in featurize_file(path, featurizer, chunk_size=CHUNK,
                                                             reader=desi_reader(), threads=threads))


def featurize(paths: list[Path], workers: int, out: Path, threads: int | None = 1) -> int:
    from stxcli import console
    from stxcli.cli.featurize import run_featurize

    console.set_quiet(True)
    return run_featurize([str(p) for p in paths], out, workers=workers, threads=threads)["n_spectra"]


def read_astropy_lamost(paths: list[Path]) -> int:
    from astropy.io import fits

    n = 0
    for p in paths:
        with fits.open(p) as h:
            t = h["COADD"].data
            n += int(np.asarray(t["FLUX"][0]).size > 0 and np.asarray(t["IVAR"][0]).size > 0
                      and np.asarray(t["WAVELENGTH"][0]).size > 0)
    return n


def lamost_files(n: int, td: Path) -> dict[str, object]:
    """stx featurize of ``n`` real LAMOST DR10 files (1 thread, default threads, 2 processes)
    next to astropy's open + read of the same files, alternating over 3 rounds."""
    from stxcli.pipeline import default_threads

    paths = sorted((SHARED / "lamost-dr10-train" / "spectra").glob("*.fits*"))[:n]
    if len(paths) < n:
        raise RuntimeError(f"expected {n} LAMOST DR10 files, found {len(paths)}")
    assert read_astropy_lamost(paths[:5]) == 5
    featurize(paths[:5], 1, td / "warm.h5")
    t_ast = t1 = td_ = t2 = math.inf
    for _ in range(3):  # alternating rounds, best of each (a slow spell falls on all alike)
        t_ast = min(t_ast, best_of(lambda: read_astropy_lamost(paths), repeat=1))
        t1 = min(t1, best_of(lambda: featurize(paths, 1, td / "l1.h5", threads=1), repeat=1))
        td_ = min(td_, best_of(lambda: featurize(paths, 1, td / "ld.h5", threads=None), repeat=1))
        t2 = min(t2, best_of(lambda: featurize(paths, 2, td / "l2.h5", threads=1), repeat=1))
    return {"n_files": n, "astropy_read_files_per_s": n / t_ast, "stx_1_thread_files_per_s": n / t1,
            "stx_default_files_per_s": n / td_, "default_threads": default_threads(),
            "stx_2_processes_files_per_s": n / t2, "ratio_1_thread_over_astropy_read": t1 / t_ast,
            "what": "stx featurize (identify, read, raw featurization, store) against astropy's open "
                    "and read of the COADD table alone"}


def startup(cmds: list[list[str]], repeat: int = 9) -> list[float]:
    """Median wall time of each command, run in turn ``repeat`` times (alternating, so a slow
    spell of the machine falls on all of them alike)."""
    times: list[list[float]] = [[] for _ in cmds]
    for _ in range(repeat):
        for cmd, ts in zip(cmds, times):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=True)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    args = ap.parse_args()
    from stxcli.pipeline import build_featurizer, default_threads, input_digest, sha256_file

    n_read = 100 if args.quick else 500
    n_per_file, n_files = (200, 2) if args.quick else (1000, 4)
    load_before = loadavg()
    # These jobs (hundreds to 4,000 spectra, under 5,000 with data) are ones where the default
    # STX_KERNELS=auto runs the numpy path in a fresh process; the compiled kernels are timed
    # apart (featurize_rate_live_only) and the memory figure runs fresh processes with each.
    with tempfile.TemporaryDirectory() as td, kernels("numpy"):
        td = Path(td)
        coadd = make_coadd(td / "coadd-500.fits", n_read)
        assert read_stx(coadd) == n_read == read_specutils(coadd)
        feat = build_featurizer("raw", {})
        t_first = best_of(lambda: read_and_featurize(coadd, feat), repeat=1)  # builds the caches
        threads = default_threads()
        # each a tenth of a second or less: on a shared VM a slow spell of a second or two decides
        # a best of 5, so the four alternate, 12 rounds, and each keeps its best
        t_spec = t_stx = t_rf1 = t_rf = math.inf
        for _ in range(12):
            t_spec = min(t_spec, best_of(lambda: read_specutils(coadd), repeat=1))
            t_stx = min(t_stx, best_of(lambda: read_stx(coadd), repeat=1))
            t_rf1 = min(t_rf1, best_of(lambda: read_and_featurize(coadd, feat), repeat=1))
            t_rf = min(t_rf, best_of(lambda: read_and_featurize(coadd, feat, threads), repeat=1))
        # and in processes of its own: the baseline is specutils' quickest read, wherever it ran
        t_spec_own = min(specutils_alone([coadd])[0] for _ in range(3))
        t_spec_same = t_spec
        t_spec = min(t_spec, t_spec_own)
        t_sha = best_of(lambda: sha256_file(coadd), repeat=3)
        t_dig = best_of(lambda: input_digest(coadd), repeat=3)
        t_e2e = best_of(lambda: featurize([coadd], 1, td / "one.h5"), repeat=3)

        live = make_coadd(td / "live.fits", n_per_file, live_only=True)
        t_live = best_of(lambda: read_and_featurize(live, feat), repeat=3)
        with kernels("compiled"):
            read_and_featurize(live, feat)  # numba's import and the kernels' load, once per process
            t_live_compiled = best_of(lambda: read_and_featurize(live, feat), repeat=3)
        live.unlink()

        files = [make_coadd(td / f"c{i}.fits", n_per_file, id_offset=i) for i in range(n_files)]
        n_total = n_per_file * n_files
        t_w1 = best_of(lambda: featurize(files, 1, td / "w1.h5"), repeat=2)
        t_t2 = best_of(lambda: featurize(files, 1, td / "t2.h5", threads=2), repeat=2)
        t_w2 = best_of(lambda: featurize(files, 2, td / "w2.h5"), repeat=2)

        lam = lamost_files(100 if args.quick else 400, td)

        mem_spec = peak_rss_mb(f"from specutils import SpectrumList; "
                               f"sl = SpectrumList.read({str(coadd)!r}, format='DESI coadd')")
        mem_code = ("from stxcli import console; console.set_quiet(True)\n"
                    "from stxcli.cli.featurize import run_featurize\n"
                    f"run_featurize([{str(coadd)!r}], {str(td / 'mem.h5')!r})")
        mem_stx = peak_rss_mb(mem_code, env={"STX_KERNELS": "auto"})  # the default
        (td / "mem.h5").unlink()
        mem_stx_compiled = peak_rss_mb(mem_code, env={"STX_KERNELS": "compiled"})
        mem_base = peak_rss_mb("import numpy, astropy.io.fits, h5py")
        frac = live_fraction(coadd)

    t_pass, t_help = startup([[sys.executable, "-c", "pass"], [sys.executable, "-m", "stxcli", "--help"]])
    res = {
        "n_spectra_read": n_read,
        "live_fraction": frac,
        "read": {"specutils_s": t_spec, "stx_s": t_stx, "speedup": t_spec / t_stx, "target": 2.5,
                 "specutils_same_process_s": t_spec_same, "specutils_own_process_s": t_spec_own,
                 "note": "specutils timed in this process and in fresh ones of its own (warmed by "
                         "one untimed read); the quicker is the baseline of every ratio to it"},
        "read_and_featurize": {
            "what": f"read + raw featurization into arrays (featurize_file, {threads} thread(s) as stx featurize "
                    f"uses by default here, 1 BLAS thread each, warm featurizer)",
            "threads": threads, "stx_s": t_rf, "ratio_to_specutils_read": t_rf / t_spec, "target": "< 1",
            "stx_s_1_thread": t_rf1, "ratio_1_thread": t_rf1 / t_spec,
            "featurizer_setup_s": t_first - t_rf,
            "end_to_end_s": t_e2e, "end_to_end_ratio_to_specutils_read": t_e2e / t_spec,
            "end_to_end_what": "stx featurize of the file: identify, digest of the input, read, featurize, "
                               "write and checksum the store, fresh featurizer",
            "input_digest_s": t_dig, "sha256_s": t_sha,
        },
        "featurize_rate": {"n_spectra": n_total, "files": n_files,
                           "workers1_spectra_per_s": n_total / t_w1,
                           "threads2_spectra_per_s": n_total / t_t2,
                           "processes2_spectra_per_s": n_total / t_w2,
                           "workers2_spectra_per_s": n_total / min(t_t2, t_w2),
                           "workers2_mode": "1 process x 2 threads" if t_t2 <= t_w2 else "2 processes x 1 thread",
                           "parallel_speedup": t_w1 / min(t_t2, t_w2), "target_workers2": 3000},
        "featurize_rate_live_only": {"n_spectra": n_per_file, "spectra_per_s": n_per_file / t_live,
                                     "compiled_spectra_per_s": n_per_file / t_live_compiled,
                                     "compiled_speedup": t_live / t_live_compiled,
                                     "what": "read + featurize, one process, 1 thread, every spectrum with data; "
                                             "spectra_per_s with the numpy path, compiled_spectra_per_s with "
                                             "the compiled kernels (loaded beforehand)"},
        "lamost_files": lam,
        "peak_memory_mb": {"specutils_read": mem_spec, "stx_featurize": mem_stx,
                           "imports_only_baseline": mem_base, "ratio": mem_stx / mem_spec, "target": "< 0.5",
                           "stx_featurize_compiled_kernels": mem_stx_compiled,
                           "ratio_compiled_kernels": mem_stx_compiled / mem_spec,
                           "note": "stx_featurize: the default STX_KERNELS=auto, which on 500 spectra "
                                   "never loads the compiled kernels; compiled_kernels: "
                                   "STX_KERNELS=compiled (numba's import and machine code, ~110 MB "
                                   "resident, 70 MB of it LLVM's shared library)"},
        "startup": {"python_pass_s": t_pass, "stx_help_s": t_help, "difference_s": t_help - t_pass,
                    "target_s": 0.3},
        "load_average": {"before": load_before, "after": loadavg()},
        "quick": args.quick,
    }
    write("featurize" + ("-quick" if args.quick else ""), res)


if __name__ == "__main__":
    main()
