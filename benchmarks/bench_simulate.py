"""Simulator speed and realism figures (issue 3). Not run by the tests.

    python benchmarks/bench_simulate.py [--n-100k 100000] [--quick]

Measures, through the same code path as ``stx simulate`` (engine.run, files written to a temporary
directory on the same disk, then deleted):

* LAMOST-like rate (spectra/s) with 2 workers, with and without the Cramer-Rao bounds;
* DESI-like rate with 2 workers;
* the time for 100,000 LAMOST-like spectra with 2 workers (target: under 5 minutes), unless
  ``--n-100k 0`` (``--quick`` runs 10,000 and extrapolates, saying so);
* the quick example's materialisation time (target: under 15 s);
* realism: the correlation of continuum-normalised flux between a simulated solar-type
  LAMOST-like spectrum and real LAMOST DR1 stars of similar and of very different labels.

The load average before and after each timing is recorded: the machine is shared, and other
processes slow the wall-clock figures down. The CPU seconds of the run (this process and its
workers) are recorded too, with the wall time the same work takes on two otherwise idle cores
(``cpu_seconds / 2``; the two workers keep both cores busy). Writes
benchmarks/results/simulate.json (``--quick``: simulate-quick.json).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SHARED, write  # noqa: E402

sys.path.insert(0, str(REPO / "plugins"))
os.environ.setdefault("STX_LOAD_PLUGINS", "stx")


def _cfg(survey: str, n: int, seed: int = 11, with_crb: bool = True):
    from stx_builtin.simulate import engine, observe, populations

    return engine.SimConfig(survey=survey, n=n, seed=seed, mix=populations.parse_mix(survey),
                            phases=populations.PHASE_MIX[survey], snr=observe.parse_snr(None, survey), with_crb=with_crb)


def timed_run(survey: str, n: int, workers: int, with_crb: bool = True) -> dict[str, float]:
    from stx_builtin.simulate import engine

    import resource

    def cpu() -> float:
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime

    tmp = Path(tempfile.mkdtemp(prefix="stx-bench-sim-", dir=os.environ.get("STX_BENCH_TMP")))
    try:
        load0 = os.getloadavg()[0]
        c0 = cpu()
        t0 = time.perf_counter()
        engine.run(_cfg(survey, n, with_crb=with_crb), tmp / "out", workers=workers)
        dt = time.perf_counter() - t0
        cpu_s = cpu() - c0  # this process and its (finished) worker processes
        size = sum(p.stat().st_size for p in (tmp / "out").rglob("*") if p.is_file())
        return {"n": n, "workers": workers, "with_crb": with_crb, "seconds": round(dt, 2),
                "spectra_per_s": round(n / dt, 1), "cpu_seconds": round(cpu_s, 2),
                "cpu_ms_per_spectrum": round(1e3 * cpu_s / n, 3),
                # what the same CPU work takes when the two cores are not shared with other jobs
                "idle_2core_spectra_per_s": round(n / (cpu_s / 2.0), 1),
                "bytes_written": size, "load_before": round(load0, 2), "load_after": round(os.getloadavg()[0], 2)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def realism() -> dict[str, float]:
    from stx_builtin.simulate import observe
    from stx_builtin.simulate import realism as rl
    from stxcli.registry import get_registry

    reader = get_registry().get("reader", "lamost")
    rows = {r["obsid"]: r for r in csv.DictReader(open(SHARED / "lamost-dr1" / "labels.csv"))}
    model = observe.model_for("lamost")
    out = {}
    for obsid, r in rows.items():
        if float(r["snrg"]) < 15:
            continue
        b = next(reader.read(SHARED / "lamost-dr1" / "spectra" / r["filename"]))
        a = b.arms[0]
        s = rl.observe_one("lamost", 5650.0, 4.45, -0.1, 0.03, rv_kms=float(b.meta.rv_kms[0]), snr=80.0, model=model)
        ns = rl.normalize(s.flux["lrs"][0], s.ivar["lrs"][0])
        nr = rl.normalize(a.flux[0], a.ivar[0])
        cc = rl.correlation(a.wave, nr, a.ivar[0] > 0, model.wave, ns, s.ivar["lrs"][0] > 0)
        out[f"{obsid} ({float(r['teff']):.0f} K, logg {float(r['logg']):.2f}, [Fe/H] {float(r['feh']):+.2f})"] = round(cc, 3)
        print(f"corr(simulated 5650 K / 4.45 / -0.10, real {obsid}: {r['teff']} K, {r['logg']}, {r['feh']}) = {cc:.3f}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-100k", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="smaller runs (10,000 for the 100k figure, extrapolated)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    from stx_builtin.simulate import example

    n_rate = 2000 if args.quick else 4000
    result: dict[str, object] = {"workers": args.workers}
    result["lamost"] = timed_run("lamost", n_rate, args.workers)
    print("lamost", result["lamost"])
    result["lamost_no_crb"] = timed_run("lamost", n_rate, args.workers, with_crb=False)
    print("lamost, no CRB", result["lamost_no_crb"])
    result["desi"] = timed_run("desi", n_rate // 4, args.workers)
    print("desi", result["desi"])
    n_big = 10_000 if args.quick else args.n_100k
    if n_big:
        big = timed_run("lamost", n_big, args.workers)
        big["seconds_for_100k"] = round(big["seconds"] * 100_000 / n_big, 1)
        big["idle_2core_seconds_for_100k"] = round(big["cpu_seconds"] / 2.0 * 100_000 / n_big, 1)
        big["extrapolated"] = n_big != 100_000
        result["lamost_100k"] = big
        print("lamost 100k", big)
    tmp = Path(tempfile.mkdtemp(prefix="stx-bench-ex-"))
    try:
        t0 = time.perf_counter()
        example.materialize_example(tmp / "ex", quick=True)
        result["example_quick_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        example.materialize_example(tmp / "ex_full", quick=False, workers=args.workers)
        result["example_full_seconds"] = round(time.perf_counter() - t0, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["realism_correlation_solar_type_sim_vs_dr1"] = realism()
    write("simulate-quick" if args.quick else "simulate", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
