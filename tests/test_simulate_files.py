"""Files written by stx simulate: real layouts, readers and astropy round trips, determinism, CLI."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from stx_builtin.simulate import catalogs, engine, observe, populations, writers


def _digest(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _cfg(survey: str, n: int, seed: int = 5, **kw) -> engine.SimConfig:
    return engine.SimConfig(survey=survey, n=n, seed=seed, mix=populations.parse_mix(survey),
                            phases=populations.PHASE_MIX[survey], snr=observe.parse_snr(None, survey), **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("sim")
    out = {}
    out["lamost"] = base / "lamost"
    engine.run(_cfg("lamost", 12), out["lamost"])
    out["lamost_table"] = base / "lamost_table"
    engine.run(_cfg("lamost", 6, layout="table"), out["lamost_table"])
    out["desi"] = base / "desi"
    engine.run(_cfg("desi", 14, per_file=8, id_offset=77), out["desi"])
    return out


def _truth(d: Path):
    from astropy.table import Table

    return Table.read(d / "truth.fits"), Table.read(d / "labels.fits")


def test_same_seed_gives_bit_identical_files_whatever_the_workers(runs, tmp_path):
    engine.run(_cfg("lamost", 12), tmp_path / "again", workers=2)
    assert _digest(tmp_path / "again") == _digest(runs["lamost"])
    engine.run(_cfg("desi", 14, per_file=8, id_offset=77), tmp_path / "desi_again", workers=1)
    assert _digest(tmp_path / "desi_again") == _digest(runs["desi"])
    engine.run(_cfg("lamost", 12, seed=6), tmp_path / "other")
    a, b = _digest(tmp_path / "other"), _digest(runs["lamost"])
    assert a.keys() != b.keys() or all(a[k] != b[k] for k in a if k.endswith(".fits"))


def test_lamost_image_layout_round_trips_through_the_reader_and_astropy(runs):
    from astropy.io import fits

    from stxcli.registry import get_registry, identify

    d = runs["lamost"]
    truth, labels = _truth(d)
    reg = get_registry()
    grid = observe.lamost_wave()
    for k, row in enumerate(truth[:4]):
        path = d / row["file"]
        reader = identify(path, reg)
        assert reader.name == "lamost"
        b = next(reader.read(path))
        assert b.meta.ids[0] == row["id"] == labels["id"][k]
        arm = b.arms[0]
        assert np.allclose(arm.wave, grid, atol=2e-3)
        with fits.open(path) as h:
            h.verify("exception")
            hdr, data = h[0].header, h[0].data
            assert data.shape == (5, observe.LAMOST_NPIX) and data.dtype == np.dtype(">f4")
            assert hdr["EXTEN0"] == "Flux, Inverse, Wavelength, Andmask, Ormask"
            assert hdr["COEFF0"] == 3.5682 and hdr["COEFF1"] == 1e-4 and hdr["VACUUM"] is True
            assert hdr["CTYPE1"] == "LINEAR" and hdr["CRVAL1"] == 3.5682  # the real files' misleading WCS
            assert hdr["SIMULATE"] is True and hdr["OBSID"] == int(row["id"])
            for key in ("RA", "DEC", "DESIG", "FIBERID", "SPID", "PLANID", "LMJD", "MJD", "CLASS", "SUBCLASS",
                        "Z", "Z_ERR", "SNRU", "SNRG", "SNRR", "SNRI", "SNRZ", "HELIO", "HELIO_RV", "FILENAME"):
                assert key in hdr, key
            good = ~arm.mask[0]
            assert np.array_equal(arm.flux[0][good], data[0][good].astype(np.float32))
            assert np.array_equal(arm.ivar[0][good], data[1][good].astype(np.float32))
            assert hdr["FILENAME"] == path.name
        assert abs(b.meta.snr["g"][0] - row["snr"]) < 0.02 * row["snr"] + 0.02
        # the header redshift is a pipeline-like estimate of the true radial velocity
        assert abs(b.meta.rv_kms[0] - row["rv_kms"]) < 5 * (3.0 + 60.0 / max(row["snr"], 1.0))


def test_lamost_table_layout_round_trips(runs):
    from astropy.io import fits

    from stxcli.registry import get_registry, identify

    d = runs["lamost_table"]
    truth, _ = _truth(d)
    path = d / truth["file"][0]
    with fits.open(path) as h:
        h.verify("exception")
        assert [x.name for x in h] == ["PRIMARY", "COADD"] and h[0].header["NAXIS"] == 0
        cols = h["COADD"].columns
        assert cols.names == ["FLUX", "IVAR", "WAVELENGTH", "ANDMASK", "ORMASK", "NORMALIZATION"]
        assert all(f == f"{observe.LAMOST_NPIX}E" for f in cols.formats)
        norm = h["COADD"].data["NORMALIZATION"][0]
        ivar = h["COADD"].data["IVAR"][0]
        assert 0.85 < np.median(norm[ivar > 0]) < 1.05
    b = next(identify(path, get_registry()).read(path))
    assert b.meta.ids[0] == truth["id"][0]
    assert np.allclose(b.arms[0].wave, observe.lamost_wave(), rtol=1e-6)


def test_desi_coadd_has_the_real_layout_and_round_trips(runs, shared):
    from astropy.io import fits

    from stxcli.registry import get_registry, identify

    d = runs["desi"]
    truth, labels = _truth(d)
    files = sorted((d / "spectra").glob("*.fits"))
    assert len(files) == 2
    with fits.open(shared / "desi-edr" / "coadd-sv3-dark-26065.fits") as real:
        real_names = [h.name for h in real]
        real_fm = [(c.name, c.format) for c in real["FIBERMAP"].columns]
        real_dtypes = {h.name: h.data.dtype.kind for h in real if h.name.endswith(("FLUX", "IVAR", "RESOLUTION"))}
    ids = []
    reg = get_registry()
    for f in files:
        with fits.open(f) as h:
            h.verify("exception")
            assert [x.name for x in h] == real_names
            assert [(c.name, c.format) for c in h["FIBERMAP"].columns] == real_fm
            for name, kind in real_dtypes.items():
                assert h[name].data.dtype.kind == kind
            n = len(h["FIBERMAP"].data)
            for arm, npix in (("B", 2751), ("R", 2326), ("Z", 2881)):
                assert h[f"{arm}_WAVELENGTH"].data.shape == (npix,)
                assert h[f"{arm}_RESOLUTION"].data.shape == (n, 11, npix)
                assert h[f"{arm}_MASK"].header["BZERO"] == 2**31  # uint32 stored as int32, like DESI
                res = h[f"{arm}_RESOLUTION"].data
                assert np.allclose(res.sum(axis=1)[:, 10:-10], 1.0, atol=1e-4)
            assert h[0].header["SIMULATE"] is True
        reader = identify(f, reg)
        assert reader.name == "desi"
        for b in reader.read(f, with_resolution=True):
            ids += list(b.meta.ids)
            for arm in b.arms:
                assert arm.resolution.shape[1] == 11
                r_expected = observe.desi_wave(arm.name) / (2.3548 * observe.desi_sigma_pix(arm.name) * 0.8)
                assert np.median(arm.resolving_power / r_expected) == pytest.approx(1.0, abs=0.06)
            assert np.all(b.meta.snr["r"] > 0)
    assert ids == list(truth["id"]) == list(labels["id"])
    assert int(truth["id"][0]) == engine.DESI_TARGETID_BASE + 77


def test_truth_and_label_tables(runs):
    for key in ("lamost", "desi"):
        truth, labels = _truth(runs[key])
        for col in ("id", "teff", "logg", "feh", "alpha_fe", "snr", "rv_kms", "teff_crb", "logg_crb", "feh_crb"):
            assert col in truth.colnames
        for col in ("id", "teff", "logg", "feh", "alpha_fe"):
            assert col in labels.colnames
        assert np.all(np.isfinite(truth["teff_crb"])) and np.all(truth["teff_crb"] > 0)
        assert np.all(truth["feh_crb"] < 1.0)
    meta = json.loads((runs["desi"] / "simulation.json").read_text())
    assert meta["config"]["seed"] == 5 and meta["n_spectra"] == 14


def test_catalog_label_systematics():
    n = 4000
    idx = np.arange(n)
    feh = np.where(idx % 2 == 0, 0.0, -2.0)
    truth = {"id": idx.astype(str), "teff": np.full(n, 5500.0), "logg": np.full(n, 4.3), "feh": feh,
             "alpha_fe": np.full(n, 0.1), "snr": np.full(n, 40.0)}
    lam = catalogs.catalog_labels("lamost", 1, idx, truth)
    desi = catalogs.catalog_labels("desi", 1, idx, truth)
    assert np.mean(lam["teff"] - truth["teff"]) == pytest.approx(50.0, abs=8.0)  # zero-point offset
    bias_mp = np.mean((lam["feh"] - feh)[feh < -1])
    bias_mr = np.mean((lam["feh"] - feh)[feh > -1])
    assert bias_mp - bias_mr == pytest.approx(0.15, abs=0.02)  # grows below [Fe/H] = -1
    assert np.std(lam["teff"] - truth["teff"]) > 2 * np.std(desi["teff"] - truth["teff"])
    assert abs(np.mean(desi["feh"] - feh)) < 0.005 and np.std(desi["feh"] - feh) == pytest.approx(0.03, rel=0.1)


def test_fits_cards_are_standard():
    from astropy.io import fits

    cards = [writers.card("OBSID", 900000001, "id"), writers.card("COEFF1", 1e-4), writers.card("Z", -6.4e-6),
             writers.card("NAME", "it's"), writers.card("FLAG", False), writers.card("COMMENT", comment="hello")]
    hdr = fits.Header.fromstring("".join(cards))
    assert hdr["OBSID"] == 900000001 and hdr["COEFF1"] == 1e-4 and hdr["Z"] == -6.4e-6
    assert hdr["NAME"] == "it's" and hdr["FLAG"] is False
    assert all(len(c) == 80 for c in cards)


def test_cli_simulate_json_and_errors(tmp_path, capsys):
    code, out, err = run_cli(["simulate", "--survey", "desi", "--n", "3", "--per-file", "2", "--seed", "2", "-j", "1",
                              "-o", tmp_path / "d", "--json", "--no-crb"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == 3 and summary["n_files"] == 2 and summary["teff_crb_median"] is None
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["labels.fits", "simulation.json", "spectra", "truth.fits"]
    code, out, err = run_cli(["simulate", "--survey", "desi", "--n", "3", "-o", tmp_path / "d"], capsys)
    assert code == 1 and "not empty" in err and "--force" in err
    code, _, err = run_cli(["simulate", "--n", "3", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "--survey" in err
    code, _, err = run_cli(["simulate", "--survey", "sdss", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "lamost or desi" in err
    code, _, err = run_cli(["simulate", "--survey", "lamost", "--snr", "abc", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "--snr" in err
    code, _, err = run_cli(["simulate", "--survey", "lamost", "--library", tmp_path, "-o", tmp_path / "x"], capsys)
    assert code == 2 and "--labels" in err
    code, _, err = run_cli(["simulate", "--survey", "lamost", "--mix", "thin=1,bulge=1", "-o", tmp_path / "x"], capsys)
    assert code == 2 and "--mix" in err
    assert not (tmp_path / "x").exists()  # nothing half-written
