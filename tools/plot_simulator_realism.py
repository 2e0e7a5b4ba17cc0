#!/usr/bin/env python
"""Figure docs/img/simulator-vs-real.png: simulated spectra next to real ones of similar labels.

Usage (from the repository root, ../shared/data beside the repo)::

    python tools/plot_simulator_realism.py [--shared ../shared/data] [-o docs/img/simulator-vs-real.png]

Panels (continuum-normalised flux, the same normalisation for real and simulated spectra):

1-3. Real LAMOST DR1 spectra (a K dwarf, a subgiant and an A star of plate B6212, read with stx's
     LAMOST reader) and LAMOST-like spectra simulated at their catalogue labels, radial velocity
     and g-band SNR.
4-5. Real MILES stars (a G dwarf and an M dwarf) observed DESI-like (B and R arms) next to
     DESI-like spectra simulated at the MILES labels, same SNR and radial velocity.

Each panel's legend gives the correlation of the two normalised spectra. The figure shows the
simulator's known limits too: one-layer line strengths, no molecules other than TiO and CH,
smooth blue haze below 4200 A.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "plugins"))

LAMOST_STARS = ("906129", "906205", "906018")  # K dwarf, subgiant, A star (DR1 obsid)
MILES_STARS = ("G dwarf", 5777.0, 4.44, 0.0), ("M dwarf", 3600.0, 4.8, 0.0)


def main(argv: list[str] | None = None) -> int:
    import os

    os.environ.setdefault("STX_LOAD_PLUGINS", "stx")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stx_builtin.simulate import library, observe, realism
    from stxcli.registry import get_registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("-o", "--out", type=Path, default=REPO / "docs" / "img" / "simulator-vs-real.png")
    args = ap.parse_args(argv)

    reg = get_registry()
    lamost = reg.get("reader", "lamost")
    rows = {r["obsid"]: r for r in csv.DictReader(open(args.shared / "lamost-dr1" / "labels.csv"))}
    fig, axes = plt.subplots(5, 1, figsize=(13, 15))
    lmodel = observe.LamostModel()
    for ax, obsid in zip(axes[:3], LAMOST_STARS):
        r = rows[obsid]
        b = next(lamost.read(args.shared / "lamost-dr1" / "spectra" / r["filename"]))
        arm = b.arms[0]
        w, f, iv = arm.wave, arm.flux[0], arm.ivar[0]
        teff, logg, feh = float(r["teff"]), float(r["logg"]), float(r["feh"])
        sim = realism.observe_one("lamost", teff, logg, feh, library.default_alpha(np.array([feh]))[0],
                                  rv_kms=float(b.meta.rv_kms[0]), snr=float(r["snrg"]), model=lmodel)
        ws, fs, ivs = lmodel.wave, sim.flux["lrs"][0], sim.ivar["lrs"][0]
        nr, ns = realism.normalize(f, iv), realism.normalize(fs, ivs)
        cc = realism.correlation(w, nr, iv > 0, ws, ns, ivs > 0)
        ax.plot(w, nr, "k", lw=0.6, label=f"real LAMOST DR1 obsid {obsid}: {teff:.0f} K, log g {logg:.2f}, "
                                           f"[Fe/H] {feh:+.2f}, SNR_g {float(r['snrg']):.0f}")
        ax.plot(ws, ns + 0.6, "C3", lw=0.6, label=f"simulated LAMOST-like, same labels/RV/SNR (+0.6); corr = {cc:.2f}")
        ax.set_xlim(3800, 9000)
        ax.set_ylim(-0.1, 2.0)
        ax.legend(loc="lower right", fontsize=8)
        ax.set_ylabel("normalised flux")
    # MILES stars observed DESI-like versus simulated DESI-like at the MILES labels
    import csv as _csv

    mrows = [m for m in _csv.DictReader(open(args.shared / "miles" / "labels.csv")) if m["teff"] and m["logg"] and m["feh"]]
    from astropy.io import fits

    from stxcli.spectra import air_to_vacuum

    for ax, (name, t0, g0, f0) in zip(axes[3:], MILES_STARS):
        m = min(mrows, key=lambda q: abs(float(q["teff"]) - t0) / 150 + abs(float(q["logg"]) - g0) / 0.3
                + abs(float(q["feh"]) - f0) / 0.2)
        flux = np.asarray(fits.getdata(args.shared / "miles" / "spectra" / m["file"]), dtype=np.float64)
        wave = air_to_vacuum(3540.5 + 0.9 * np.arange(flux.size))
        teff, logg, feh = float(m["teff"]), float(m["logg"]), float(m["feh"])
        lib = library.Library(ids=np.array([m["miles_id"]]), wave=wave, flux=flux[None, :], fwhm=np.full(wave.size, 2.5),
                              teff=np.array([teff]), logg=np.array([logg]), feh=np.array([feh]),
                              alpha_fe=library.default_alpha(np.array([feh])))
        dmodel = library.library_model("desi", lib)
        hires, _ = library.to_hires(lib)
        real = realism.observe_one("desi", teff, logg, feh, 0.0, rv_kms=-20.0, snr=40.0, model=dmodel, hires=hires)
        sim = realism.observe_one("desi", teff, logg, feh, lib.alpha_fe[0], rv_kms=-20.0, snr=40.0, model=dmodel)
        ccs = []
        for k, a in enumerate(("b", "r")):
            w = dmodel.wave[a]
            cov = w < wave[-1] - 5
            nr = realism.normalize(real.flux[a][0], real.ivar[a][0])
            ns = realism.normalize(sim.flux[a][0], sim.ivar[a][0])
            ccs.append(realism.correlation(w, nr, (real.ivar[a][0] > 0) & cov, w, ns, sim.ivar[a][0] > 0, 3600, 7400))
            ax.plot(w[cov], nr[cov], "k", lw=0.5, label=(f"real MILES {m['miles_id']} ({name}: {teff:.0f} K, log g "
                                                        f"{logg:.2f}, [Fe/H] {feh:+.2f}) observed DESI-like, SNR 40")
                    if k == 0 else None)
            ax.plot(w[cov], ns[cov] + 0.6, "C0", lw=0.5, label="simulated DESI-like at the MILES labels (+0.6); "
                    f"corr B = {ccs[0]:.2f}" if k == 0 else None)
        ax.set_xlim(3600, 7450)
        ax.set_ylim(-0.1, 2.0)
        ax.legend(loc="lower right", fontsize=8, title=f"corr R = {ccs[1]:.2f}", title_fontsize=8)
        ax.set_ylabel("normalised flux")
    axes[-1].set_xlabel("vacuum wavelength (A)")
    fig.suptitle("stx simulate: simulated spectra (colour) against real spectra of similar labels (black)", fontsize=11)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=80)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
