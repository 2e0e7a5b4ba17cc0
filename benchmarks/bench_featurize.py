"""Reading and featurizing DESI coadds, against specutils measured in the same run.

    python benchmarks/bench_featurize.py [--quick]

Figures (issue 2): DESI read >= 2.5x faster than specutils' SpectrumList.read on a 500-spectrum
coadd built from the real EDR files; read + raw featurization faster than specutils' read alone;
>= 3,000 spectra/s featurizing with 2 workers on 2 cores; peak memory of featurizing that file
under half of specutils' read; `stx --help` within 0.3 s of `python -c pass`.
Writes benchmarks/results/featurize.json.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED, best_of, peak_rss_mb, write  # noqa: E402

EDR = SHARED / "desi-edr" / "coadd-sv3-dark-26065.fits"


def make_coadd(out: Path, n_rows: int, src: Path = EDR, id_offset: int = 0) -> Path:
    """A coadd with ``n_rows`` spectra made by tiling the real EDR rows (TARGETIDs made unique)."""
    from astropy.io import fits

    with fits.open(src) as hdul:
        nsrc = len(hdul["FIBERMAP"].data)
        idx = np.arange(n_rows) % nsrc
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


def read_stx(path: Path) -> int:
    from stxcli.registry import get_registry

    reader = get_registry().get("reader", "desi")
    return sum(b.n for b in reader.read(path))


def read_specutils(path: Path) -> int:
    from specutils import SpectrumList

    sl = SpectrumList.read(path, format="DESI coadd")
    return sl[0].flux.shape[0]


def featurize(paths: list[Path], workers: int, out: Path) -> int:
    from stxcli import console
    from stxcli.cli.featurize import run_featurize

    console.set_quiet(True)
    return run_featurize([str(p) for p in paths], out, workers=workers)["n_spectra"]


def startup(cmd: list[str], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    args = ap.parse_args()
    n_read = 100 if args.quick else 500
    n_per_file, n_files = (200, 2) if args.quick else (1000, 4)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        coadd = make_coadd(td / "coadd-500.fits", n_read)
        assert read_stx(coadd) == n_read == read_specutils(coadd)
        t_spec = best_of(lambda: read_specutils(coadd))
        t_stx = best_of(lambda: read_stx(coadd))
        t_stx_feat = best_of(lambda: featurize([coadd], 1, td / "one.h5"), repeat=2)

        files = [make_coadd(td / f"c{i}.fits", n_per_file, id_offset=i) for i in range(n_files)]
        n_total = n_per_file * n_files
        t_w1 = best_of(lambda: featurize(files, 1, td / "w1.h5"), repeat=1)
        t_w2 = best_of(lambda: featurize(files, 2, td / "w2.h5"), repeat=1)

        mem_spec = peak_rss_mb(f"from specutils import SpectrumList; "
                               f"sl = SpectrumList.read({str(coadd)!r}, format='DESI coadd')")
        mem_stx = peak_rss_mb("from stxcli import console; console.set_quiet(True)\n"
                              "from stxcli.cli.featurize import run_featurize\n"
                              f"run_featurize([{str(coadd)!r}], {str(td / 'mem.h5')!r})")
        mem_base = peak_rss_mb("import numpy, astropy.io.fits, h5py")

    t_pass = startup([sys.executable, "-c", "pass"])
    t_help = startup([sys.executable, "-m", "stxcli", "--help"])
    res = {
        "n_spectra_read": n_read,
        "read": {"specutils_s": t_spec, "stx_s": t_stx, "speedup": t_spec / t_stx, "target": 2.5},
        "read_and_featurize": {"stx_s": t_stx_feat, "ratio_to_specutils_read": t_stx_feat / t_spec,
                               "target": "< 1"},
        "featurize_rate": {"n_spectra": n_total, "files": n_files,
                           "workers1_spectra_per_s": n_total / t_w1, "workers2_spectra_per_s": n_total / t_w2,
                           "parallel_speedup": t_w1 / t_w2, "target_workers2": 3000},
        "peak_memory_mb": {"specutils_read": mem_spec, "stx_featurize": mem_stx,
                           "imports_only_baseline": mem_base, "ratio": mem_stx / mem_spec, "target": "< 0.5"},
        "startup": {"python_pass_s": t_pass, "stx_help_s": t_help, "difference_s": t_help - t_pass,
                    "target_s": 0.3},
        "quick": args.quick,
    }
    write("featurize" + ("-quick" if args.quick else ""), res)


if __name__ == "__main__":
    main()
