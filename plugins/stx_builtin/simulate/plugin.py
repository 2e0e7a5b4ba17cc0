"""The ``stx simulate`` command (a built-in plugin: registered through ``register_commands``).

Only typer and stxcli are imported here; numpy, scipy and astropy load when the command runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import typer

from stxcli.hookspecs import hookimpl

HELP = """Simulate LAMOST-like or DESI-like survey files with truth and catalog labels.

Writes OUT/spectra/ (real LAMOST LRS image or table layout, or DESI coadd files), OUT/truth.fits
(true labels, SNR, RV, Cramer-Rao bounds), OUT/labels.fits (survey catalog labels with realistic
systematics) and OUT/simulation.json. With --library PATH --labels CATALOG, real library spectra
(e.g. MILES) are observed through the same survey model instead. With --example, writes the
shipped example data set (LAMOST-like, DESI-like fine-tune/test, MILES observed DESI-like).
The same seed gives bit-identical files, whatever --workers.
"""


def _parse_range(text: str) -> tuple[float, float]:
    from stxcli.errors import UsageError

    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"--teff-range {text!r}: expected MIN,MAX, e.g. 3500,7500") from None
    return lo, hi


def simulate(
    out: Path = typer.Option(..., "-o", "--out", help="Output directory (created; must be new or empty unless --force)."),
    survey: Optional[str] = typer.Option(None, "--survey", help="lamost or desi."),
    n: int = typer.Option(1000, "--n", "-n", help="Number of stars to simulate."),
    mix: Optional[str] = typer.Option(None, "--mix", help="Population mix: lamost, desi or thin=0.6,thick=0.3,halo=0.1 "
                                                          "(default: the survey's)."),
    snr: Optional[str] = typer.Option(None, "--snr", help="SNR distribution: lamost, desi, a number (30), a range "
                                                          "(10:100) or lognormal:MEDIAN,SIGMA (default: the survey's)."),
    seed: int = typer.Option(1, "--seed", help="Random seed: the same seed gives identical files."),
    teff_range: str = typer.Option("3500,7500", "--teff-range", help="Teff range of the population, MIN,MAX (K)."),
    layout: str = typer.Option("image", "--layout", help="LAMOST file layout: image (DR1-DR8) or table (DR9+ COADD)."),
    per_file: int = typer.Option(500, "--per-file", help="DESI spectra per coadd file."),
    id_offset: int = typer.Option(0, "--id-offset", help="Added to every OBSID / TARGETID (keeps sets distinct)."),
    library_path: Optional[Path] = typer.Option(None, "--library", help="Observe real library spectra under PATH "
                                                                       "(read with stx's readers) instead of simulating."),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Label catalog of --library (CSV or FITS: id/file, "
                                                                  "teff, logg, feh, optional alpha_fe)."),
    library_fwhm: Optional[float] = typer.Option(None, "--library-fwhm", help="Library resolution FWHM (A) when the files "
                                                                             "do not say."),
    library_format: Optional[str] = typer.Option(None, "--library-format", help="Reader for --library (default: detect)."),
    example: bool = typer.Option(False, "--example", help="Write the shipped example data set into OUT."),
    quick: bool = typer.Option(False, "--quick", help="With --example: a small version (seconds)."),
    no_crb: bool = typer.Option(False, "--no-crb", help="Skip the Cramer-Rao bounds (about 1.5x faster)."),
    workers: int = typer.Option(0, "--workers", "-j", help="Worker processes (0: one per core, at most 8)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    from stxcli import console
    from stxcli.errors import UsageError

    from . import engine, observe, populations

    console.set_quiet(quiet or json_out)
    n_workers = workers if workers > 0 else min(os.cpu_count() or 1, 8)
    engine.check_out_dir(out, force)
    if example:
        from .example import materialize_example

        paths = materialize_example(out, quick=quick, workers=n_workers)
        result: dict[str, Any] = {"example": str(out), "quick": quick, "sets": {k: str(v) for k, v in paths.items()}}
        _report(result, json_out)
        return
    if quick:
        raise UsageError("--quick only applies to --example")
    if survey is None:
        raise UsageError("--survey is required (lamost or desi), or use --example")
    survey = survey.strip().lower()
    if survey not in ("lamost", "desi"):
        raise UsageError(f"--survey {survey!r}: expected lamost or desi")
    if (library_path is None) != (labels is None):
        raise UsageError("--library and --labels go together")
    cfg = engine.SimConfig(
        survey=survey, n=n, seed=seed, mix=populations.parse_mix(mix or survey), phases=populations.PHASE_MIX[survey],
        snr=observe.parse_snr(snr, survey), teff_range=_parse_range(teff_range), layout=layout.strip().lower(),
        per_file=per_file, id_offset=id_offset, with_crb=not no_crb,
    )
    if per_file < 1:
        raise UsageError("--per-file must be at least 1")
    lib = None
    extra: dict[str, Any] = {}
    if library_path is not None:
        from . import library

        lib, counts = library.load_library(library_path, labels, fwhm=library_fwhm, fmt=library_format)
        if counts["skipped_no_labels"]:
            console.warn(f"{counts['skipped_no_labels']} of {counts['read']} library spectra have no teff/logg/feh in "
                         f"{labels} and are left out")
        extra = {"library": str(library_path), "library_labels": str(labels), "library_counts": counts}
    total = lib.n if lib is not None else cfg.n
    with console.progress(f"simulate {survey}", total) as bar:
        summary = engine.run(cfg, out, workers=n_workers, progress=bar.advance, lib=lib, extra_meta=extra)
    summary["workers"] = n_workers
    if lib is not None:
        summary["library_counts"] = extra["library_counts"]
    _report(summary, json_out)


def _report(result: dict[str, Any], json_out: bool) -> None:
    from stxcli import console

    if json_out:
        console.print_json(result)
        return
    from rich.table import Table

    t = Table(title="stx simulate", show_header=False)
    for k, v in result.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, list):
            v = ", ".join(f"{x:.3g}" if isinstance(x, float) else str(x) for x in v)
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        t.add_row(str(k), str(v))
    console.out().print(t)


@hookimpl
def register_commands(app: Any) -> None:
    app.command("simulate", help=HELP)(simulate)
