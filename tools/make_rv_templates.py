#!/usr/bin/env python
"""Build the radial-velocity templates of the raw featurizer from real MILES stars.

Writes ``plugins/stx_builtin/data/templates/miles_rv.npz``: seven real MILES v9.1 stars spanning
the HR diagram (A, F, solar G, metal-poor F/G turn-off, K giant, K dwarf, M dwarf), chosen as the
labelled star nearest to each target point in (Teff/300 K, log g/0.3, [Fe/H]/0.2). The fluxes are
stored UNCHANGED on the native MILES pixels (4300 pixels, air wavelength CRVAL1 + CDELT1 * i,
FWHM 2.5 A, rest frame): the featurizer converts air -> vacuum, degrades to its target resolving
power, resamples and continuum-normalises them at run time with exactly the same code it applies to
the spectra, so templates and spectra always match whatever the featurizer configuration.

Usage (from the repository root)::

    python tools/make_rv_templates.py [../shared/data/miles] [-o plugins/stx_builtin/data/templates/miles_rv.npz]

MILES: Sanchez-Blazquez et al. 2006, MNRAS 371, 703; Falcon-Barroso et al. 2011, A&A 532, A95;
stellar parameters Cenarro et al. 2007, MNRAS 374, 664. Files from the sdss/mangadap repository
(BSD-3-Clause); see ../shared/data/miles/SOURCE.md.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

#: (label, Teff, log g, [Fe/H]) of the template target points.
TARGETS = [
    ("A", 9500.0, 4.0, 0.0),
    ("F", 7000.0, 4.0, 0.0),
    ("G", 5750.0, 4.4, 0.0),
    ("FG-metal-poor", 6000.0, 4.0, -2.0),
    ("K-giant", 4800.0, 2.5, 0.0),
    ("K-dwarf", 4800.0, 4.6, 0.0),
    ("M-dwarf", 3600.0, 4.8, 0.0),
]


def pick(rows: list[dict[str, str]], teff: float, logg: float, feh: float) -> dict[str, str]:
    def dist(r: dict[str, str]) -> float:
        return (((float(r["teff"]) - teff) / 300.0) ** 2 + ((float(r["logg"]) - logg) / 0.3) ** 2
                + ((float(r["feh"]) - feh) / 0.2) ** 2)

    return min(rows, key=dist)


def main() -> None:
    from astropy.io import fits

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("miles", nargs="?", default="../shared/data/miles")
    ap.add_argument("-o", "--output", default="plugins/stx_builtin/data/templates/miles_rv.npz")
    args = ap.parse_args()
    root = Path(args.miles)
    with open(root / "labels.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["teff"] and r["logg"] and r["feh"]]
    chosen = [pick(rows, t, g, z) for _, t, g, z in TARGETS]
    fluxes, crval, cdelt, fwhm = [], None, None, None
    for r in chosen:
        with fits.open(root / "spectra" / r["file"]) as hdul:
            h = hdul[0].header
            key = (float(h["CRVAL1"]), float(h["CDELT1"]), float(h["CRPIX1"]), float(h["FWHM"]))
            if crval is None:
                crval, cdelt, crpix, fwhm = key
                if crpix != 1.0:
                    raise SystemExit(f"{r['file']}: CRPIX1 = {crpix}, expected 1")
            elif key != (crval, cdelt, 1.0, fwhm):
                raise SystemExit(f"{r['file']}: wavelength grid or FWHM differs from the first template")
            fluxes.append(np.asarray(hdul[0].data, dtype=np.float32))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        flux=np.stack(fluxes),
        crval1_air=np.float64(crval),
        cdelt1=np.float64(cdelt),
        fwhm=np.float64(fwhm),
        kind=np.array([t[0] for t in TARGETS]),
        miles_id=np.array([r["miles_id"] for r in chosen]),
        teff=np.array([float(r["teff"]) for r in chosen]),
        logg=np.array([float(r["logg"]) for r in chosen]),
        feh=np.array([float(r["feh"]) for r in chosen]),
    )
    for (kind, *_), r in zip(TARGETS, chosen):
        print(f"{kind:14s} {r['miles_id']}  Teff {r['teff']:>5s}  logg {r['logg']:>5s}  [Fe/H] {r['feh']:>5s}")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
