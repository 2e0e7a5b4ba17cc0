"""Shared helpers for the opt-in benchmarks: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "date": time.strftime("%Y-%m-%d")}


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def loadavg() -> float:
    """1-minute load average (a value above the core count: other jobs shared the CPU)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls (seconds)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


@contextmanager
def kernels(setting: str) -> Iterator[None]:
    """``$STX_KERNELS`` (the raw featurizer's compiled kernels: ``auto``, ``compiled`` or
    ``numpy``) set to ``setting`` in this process for the block, and restored after it."""
    before = os.environ.get("STX_KERNELS")
    os.environ["STX_KERNELS"] = setting
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("STX_KERNELS", None)
        else:
            os.environ["STX_KERNELS"] = before


def peak_rss_mb(code: str, env: dict[str, str] | None = None) -> float:
    """Peak resident memory (MB) of a fresh Python process running ``code`` (``env``: variables
    added to this process's environment)."""
    # VmHWM is this process's own high-water mark; ru_maxrss would carry over the parent's
    # (the benchmark's) peak across fork + exec on Linux.
    probe = (code + "\nfor line in open('/proc/self/status'):\n"
             "    if line.startswith('VmHWM'): print('PEAK', int(line.split()[1]) / 1024.0)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO,
                         env=None if env is None else {**os.environ, **env})
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("PEAK")][-1]
    return float(line.split()[1])


def quick_name(name: str, argv: list[str] | None = None) -> str:
    """``name`` with ``-quick`` appended when the script runs with ``--quick`` (so a smoke run
    never overwrites the committed full-size results, whatever name the script passes)."""
    argv = sys.argv[1:] if argv is None else argv
    if "--quick" in argv and not name.endswith("-quick"):
        return name + "-quick"
    return name


# Runs ``stx ARGS...`` in this interpreter and, at exit (normal, error or SystemExit), writes the
# process's own VmHWM (kB) to the file named by STX_BENCH_PEAK_FILE.
_PEAK_LAUNCHER = """
import atexit, os, runpy, sys
def _peak():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            open(os.environ['STX_BENCH_PEAK_FILE'], 'w').write(line.split()[1])
atexit.register(_peak)
sys.argv = ['stx', *sys.argv[1:]]
runpy.run_module('stxcli', run_name='__main__')
"""


def run_stx_peak(args: list[str], workdir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``stx ARGS`` in a child process; return its wall time, exit status and peak resident
    memory (VmHWM of that process alone: ``ru_maxrss`` of a child would carry the parent's peak
    over fork + exec). Raises RuntimeError with the child's stderr when it fails."""
    peak_file = Path(workdir) / f".peak-{os.getpid()}-{time.monotonic_ns()}"
    child_env = {**os.environ, **(env or {}), "STX_BENCH_PEAK_FILE": str(peak_file)}
    load = loadavg()
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-c", _PEAK_LAUNCHER, *args], capture_output=True, text=True,
                         cwd=REPO, env=child_env)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"stx {' '.join(args)} exited {res.returncode}: {res.stderr[-2000:]}")
    try:
        peak_mb = int(peak_file.read_text()) / 1024.0
    finally:
        peak_file.unlink(missing_ok=True)
    return {"wall_s": round(wall, 2), "peak_mb": round(peak_mb, 1), "load_before": load,
            "load_after": loadavg(), "stdout": res.stdout}


def write(name: str, result: dict[str, Any]) -> Path:
    """Write ``results/NAME.json`` (``NAME-quick.json`` under ``--quick``) with the machine and
    the command line, and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = quick_name(name)
    result = {"benchmark": name, "machine": machine(), **result}
    result.setdefault("command", " ".join(["python", _rel(Path(sys.argv[0])), *sys.argv[1:]]))
    result.setdefault("quick", name.endswith("-quick"))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return path


def raw_model(workdir: Path, n_spectra: int = 500, hidden: tuple[int, ...] = (512, 256),
              threads: int = 2, seed: int = 0) -> Path:
    """A pre-trained MLP on ``raw`` DESI features, for benchmarks that predict from survey files.

    Made through stx itself: a coadd of ``n_spectra`` spectra tiled from the real EDR rows
    (:func:`bench_featurize.make_coadd`), random labels joined by TARGETID (speed does not depend
    on the values), ``stx featurize`` and a 2-epoch ``stx pretrain``. Returns the model directory."""
    from astropy.io import fits
    import numpy as np

    from bench_featurize import make_coadd  # type: ignore[import-not-found]
    from stxcli import console
    from stxcli.cli.featurize import run_featurize
    from stxcli.train import TrainOptions, pretrain

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    coadd = make_coadd(workdir / "model-train-coadd.fits", n_spectra, id_offset=7)
    with fits.open(coadd) as hdul:
        tid = np.asarray(hdul["FIBERMAP"].data["TARGETID"], dtype=np.int64)
    rng = np.random.default_rng(seed)
    lines = ["id,teff,logg,feh"] + [f"{t},{te:.1f},{lg:.3f},{fe:.3f}" for t, te, lg, fe in
                                    zip(tid, rng.uniform(4000, 7000, tid.size), rng.uniform(1, 5, tid.size),
                                        rng.uniform(-2, 0.5, tid.size))]
    (workdir / "model-labels.csv").write_text("\n".join(lines) + "\n")
    console.set_quiet(True)
    try:
        store = workdir / "model-train.h5"
        run_featurize([str(coadd)], store, labels=workdir / "model-labels.csv", id_column="id",
                      label_columns=["teff", "logg", "feh"])
        out = workdir / "raw-model"
        pretrain([store], out, head_config={"hidden": list(hidden), "dropout": 0.0},
                 opts=TrainOptions(epochs=2, patience=3, threads=threads, seed=seed))
    finally:
        console.set_quiet(False)
    coadd.unlink()
    store.unlink()
    return out


_SPECUTILS_ALONE = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from bench_featurize import read_specutils
files = sys.argv[2:]
read_specutils(files[0])  # imports and first touch, untimed
t0 = time.perf_counter()
n = sum(read_specutils(f) for f in files)
print(json.dumps({"s": time.perf_counter() - t0, "n": n}))
"""


def specutils_alone(files: list[Path]) -> tuple[float, int]:
    """specutils' read of ``files`` in a fresh process of its own (warmed by one untimed read):
    (seconds, spectra). In bench_models' process, after torch and stx's pool have run,
    specutils read 4 live coadds in 0.76-0.95 s; alone, 0.66 s (2026-12-07)."""
    res = subprocess.run([sys.executable, "-c", _SPECUTILS_ALONE, str(REPO / "benchmarks"),
                          *map(str, files)], capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(f"specutils read in its own process exited {res.returncode}: {res.stderr[-2000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    return float(out["s"]), int(out["n"])
