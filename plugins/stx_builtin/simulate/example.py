"""The example data set shipped with stx, as a recipe: regenerated bit-identically on demand.

Full spectra of thousands of stars cannot ship in a few MB (one LAMOST file is ~80 kB of
incompressible noise), so the package ships what determines them: ``example_recipe.json`` (seeds,
sizes, observation settings), the simulator's derived data, and 150 real MILES stars
(``miles_subset.npz``, float32, ~2 MB). :func:`materialize_example` (``stx simulate --example
DIR``, and ``stx demo``) writes::

    DIR/lamost/              LAMOST-like files (pre-training set), truth.fits, labels.fits
    DIR/desi/finetune/       one DESI-like coadd (fine-tuning set), truth.fits, labels.fits
    DIR/desi/test/           one DESI-like coadd (test set), truth.fits, labels.fits
    DIR/miles_desi/          real MILES stars observed DESI-like, truth.fits, labels.fits

The same machine and library versions give bit-identical files; ``quick=True`` writes a small
version (a few hundred spectra in all) in seconds for tests and CI.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from stxcli.io import atomic_dir

from . import engine, library, observe, populations
from .synth import _data_path


@lru_cache(maxsize=1)
def recipe() -> dict[str, Any]:
    with _data_path("example_recipe.json").open("r") as fh:
        return json.load(fh)


def miles_subset() -> library.Library:
    """The shipped real MILES stars (air wavelengths converted to vacuum)."""
    from stxcli.spectra import air_to_vacuum

    with _data_path("miles_subset.npz").open("rb") as fh:
        z = np.load(fh)
        flux = z["flux"].astype(np.float64)
        wave_air = float(z["crval"]) + float(z["cdelt"]) * np.arange(flux.shape[1])
        wave = air_to_vacuum(wave_air)
        fwhm = np.full(wave.size, float(z["fwhm"]))
        feh = z["feh"].astype(float)
        return library.Library(ids=z["miles_id"].astype(str), wave=wave, flux=flux, fwhm=fwhm,
                               teff=z["teff"].astype(float), logg=z["logg"].astype(float), feh=feh,
                               alpha_fe=library.default_alpha(feh))


def _config(spec: dict[str, Any], quick: bool) -> engine.SimConfig:
    survey = spec["survey"]
    return engine.SimConfig(
        survey=survey, n=int(spec["quick_n"] if quick else spec["n"]), seed=int(spec["seed"]),
        mix=populations.parse_mix(spec.get("mix", survey)), phases=populations.PHASE_MIX[survey],
        snr=observe.parse_snr(spec.get("snr", survey), survey), layout=spec.get("layout", "image"),
        per_file=int(spec.get("per_file", 500)), id_offset=int(spec.get("id_offset", 0)),
    )


def materialize_example(out_dir: Path, quick: bool = False, *, workers: int = 1) -> dict[str, Path]:
    """Write the example data set into ``out_dir`` (replaced atomically); return the set paths."""
    out_dir = Path(out_dir)
    r = recipe()
    paths = {
        "lamost": Path("lamost"), "desi_finetune": Path("desi") / "finetune", "desi_test": Path("desi") / "test",
        "miles_desi": Path("miles_desi"),
    }
    with atomic_dir(out_dir) as tmp:
        for key in ("lamost", "desi_finetune", "desi_test"):
            engine.run(_config(r[key], quick), tmp / paths[key], workers=workers, extra_meta={"example_set": key})
        spec = r["miles_desi"]
        lib = miles_subset()
        n = int(spec["quick_n"] if quick else spec["n"])
        sel = np.linspace(0, lib.n - 1, min(n, lib.n)).round().astype(int)
        cfg = _config({**spec, "n": sel.size, "quick_n": sel.size}, quick)
        engine.run(cfg, tmp / paths["miles_desi"], workers=workers, lib=lib.subset(sel),
                   extra_meta={"example_set": "miles_desi", "library": "MILES v9.1 subset (shipped)"})
        (tmp / "README.txt").write_text(_readme(quick))
    return {k: out_dir / v for k, v in paths.items()}


def _readme(quick: bool) -> str:
    return (
        "stx example data (simulated; regenerate with `stx simulate --example DIR"
        + (" --quick`" if quick else "`") + ")\n"
        "lamost/          LAMOST-like spectra (pre-training), truth.fits, labels.fits (LAMOST-like catalog labels)\n"
        "desi/finetune/   DESI-like coadd for fine-tuning, truth.fits, labels.fits (high-quality labels)\n"
        "desi/test/       DESI-like coadd for testing, truth.fits, labels.fits\n"
        "miles_desi/      real MILES stars (Sanchez-Blazquez et al. 2006; Falcon-Barroso et al. 2011) observed\n"
        "                 DESI-like; labels from Cenarro et al. 2007\n"
        "Every file carries SIMULATE = T in its primary header.\n"
    )
