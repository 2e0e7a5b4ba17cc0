"""Real library spectra (MILES) observed LAMOST-like and DESI-like, and the shipped example."""

from __future__ import annotations

import csv
import hashlib
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from stx_builtin.simulate import example, library, observe


@pytest.fixture(scope="module")
def miles_dir(tmp_path_factory, shared):
    """Five real MILES files (a G dwarf, a K giant, an M dwarf, an F star, a metal-poor star) and
    their labels, plus one unlabelled file."""
    d = tmp_path_factory.mktemp("miles")
    (d / "spectra").mkdir()
    ids = ["m0001", "m0002", "m0003", "m0004", "m0005", "m0407"]  # m0407 has no labels
    rows = [r for r in csv.DictReader(open(shared / "miles" / "labels.csv")) if r["miles_id"] in ids]
    for r in rows:
        shutil.copy(shared / "miles" / "spectra" / r["file"], d / "spectra" / r["file"])
    with open(d / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d


def test_miles_observed_desi_like(miles_dir, tmp_path, capsys):
    code, out, err = run_cli(["simulate", "--survey", "desi", "--library", miles_dir / "spectra", "--labels",
                              miles_dir / "labels.csv", "--seed", "3", "-j", "1", "-o", tmp_path / "md", "--json"],
                             capsys)
    assert code == 0, err
    assert "have no teff/logg/feh" in err  # m0407 is left out, with a warning
    from astropy.io import fits
    from astropy.table import Table

    from stxcli.registry import get_registry, identify

    truth = Table.read(tmp_path / "md" / "truth.fits")
    labels = Table.read(tmp_path / "md" / "labels.fits")
    assert len(truth) == 5
    assert list(truth["source_id"]) == [f"MILES_res2.50_star_{m}V" for m in ("m0001", "m0002", "m0003", "m0004", "m0005")]
    ref = {r["miles_id"]: r for r in csv.DictReader(open(miles_dir / "labels.csv"))}
    assert truth["teff"][0] == float(ref["m0001"]["teff"]) and labels["feh"][1] == float(ref["m0002"]["feh"])
    assert np.all(np.isfinite(truth["teff_crb"]))
    f = tmp_path / "md" / truth["file"][0]
    with fits.open(f) as h:
        # MILES stops at 7410 A (air): the Z arm is entirely uncovered, the R arm partly
        assert np.all(h["Z_IVAR"].data == 0) and np.all(h["Z_MASK"].data & observe.DESI_MASK["ALLBADPIX"])
        rw, riv = h["R_WAVELENGTH"].data, h["R_IVAR"].data
        assert np.all(riv[:, rw > 7425] == 0) and np.mean(riv[:, rw < 7380] > 0) > 0.95
        assert np.mean(h["B_IVAR"].data > 0) > 0.95
    b = next(identify(f, get_registry()).read(f))
    assert list(b.meta.ids) == list(truth["id"])
    # the observed spectrum is the real star: it correlates with the MILES flux resampled to R
    miles_flux = fits.getdata(miles_dir / "spectra" / ref["m0001"]["file"])
    from stxcli.spectra import air_to_vacuum

    wv = air_to_vacuum(3540.5 + 0.9 * np.arange(miles_flux.size))
    arm = b.arms[1]
    sel = ~arm.mask[0] & (arm.wave < 7300)
    shift = 1.0 + truth["rv_kms"][0] / 299792.458
    ref_flux = np.interp(arm.wave[sel] / shift, wv, miles_flux)
    assert np.corrcoef(arm.flux[0][sel], ref_flux)[0, 1] > 0.8


def test_miles_observed_lamost_like(miles_dir, tmp_path):
    lib, counts = library.load_library(miles_dir / "spectra", miles_dir / "labels.csv")
    assert counts == {"read": 6, "labelled": 5, "skipped_no_labels": 1}
    from stx_builtin.simulate import engine, populations

    cfg = engine.SimConfig(survey="lamost", n=lib.n, seed=4, mix=populations.parse_mix("lamost"))
    engine.run(cfg, tmp_path / "ml", lib=lib)
    from astropy.io import fits

    for f in sorted((tmp_path / "ml" / "spectra").glob("*.fits")):
        data = fits.getdata(f)
        wave, ivar = data[2], data[1]
        assert np.all(ivar[wave > 7425] == 0)  # outside MILES
        assert np.mean(ivar[(wave > 4000) & (wave < 7300)] > 0) > 0.95


def test_library_without_resolution_needs_library_fwhm(tmp_path, shared):
    from astropy.io import fits

    from stxcli.errors import StxError

    d = tmp_path / "lib"
    d.mkdir()
    data = fits.getdata(shared / "miles" / "spectra" / "MILES_res2.50_star_m0001V.fits")
    h = fits.PrimaryHDU(data)
    h.header["CRVAL1"], h.header["CDELT1"], h.header["CRPIX1"] = 3540.5, 0.9, 1.0
    h.writeto(d / "star1.fits")
    (tmp_path / "lab.csv").write_text("id,teff,logg,feh\nstar1,5300,4.5,-0.7\n")
    with pytest.raises(StxError, match="--library-fwhm"):
        library.load_library(d, tmp_path / "lab.csv")
    lib, counts = library.load_library(d, tmp_path / "lab.csv", fwhm=2.5)
    assert lib.n == 1 and lib.ids[0] == "star1" and counts["labelled"] == 1


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_quick_example_is_fast_complete_and_bit_identical(tmp_path):
    t0 = time.perf_counter()
    paths = example.materialize_example(tmp_path / "ex", quick=True)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30.0  # 15 s target on an idle 2-core machine; margin for a loaded CI runner
    assert set(paths) == {"lamost", "desi_finetune", "desi_test", "miles_desi"}
    from astropy.table import Table

    from stxcli.registry import get_registry, identify

    r = example.recipe()
    sizes = {"lamost": r["lamost"]["quick_n"], "desi_finetune": r["desi_finetune"]["quick_n"],
             "desi_test": r["desi_test"]["quick_n"], "miles_desi": r["miles_desi"]["quick_n"]}
    all_ids = set()
    for key, p in paths.items():
        truth = Table.read(p / "truth.fits")
        labels = Table.read(p / "labels.fits")
        assert len(truth) == len(labels) == sizes[key]
        all_ids |= set(truth["id"])
        f = p / truth["file"][0]
        reader = identify(f, get_registry())
        assert reader.name == ("lamost" if key == "lamost" else "desi")
    assert len(all_ids) == sum(sizes.values())  # ids never collide between the sets
    meta = Table.read(paths["miles_desi"] / "truth.fits")
    assert all(s.startswith("m") for s in meta["source_id"])
    again = example.materialize_example(tmp_path / "ex2", quick=True)
    assert _digest(tmp_path / "ex") == _digest(tmp_path / "ex2")
    assert again["lamost"] == tmp_path / "ex2" / "lamost"


def test_shipped_data_is_small():
    from stx_builtin.simulate.synth import _data_path

    folder = Path(str(_data_path("calibration.npz"))).parent.parent
    total = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert total < 8 * 1024 * 1024
