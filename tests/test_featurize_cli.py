"""`stx featurize` end to end on the real survey files in ../shared (issue 2's done-when)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stxcli.cli.featurize import run_featurize
from stxcli.store import FeatureStore

from conftest import interrupt_input_digest, run_cli


@pytest.fixture(scope="module")
def stores(tmp_path_factory, shared):
    """Stores of every real layout, built once through the CLI."""
    d = tmp_path_factory.mktemp("stores")
    miles_files = sorted((shared / "miles" / "spectra").glob("*.fits"))[:12]
    lst = d / "miles.txt"
    lst.write_text("\n".join(str(p) for p in miles_files))
    jobs = {
        "dr10": [shared / "lamost-dr10" / "spectra", "--labels", shared / "lamost-dr10" / "labels.csv",
                 "--id-column", "obsid"],
        "dr1": [shared / "lamost-dr1" / "spectra", "--labels", shared / "lamost-dr1" / "labels.csv",
                "--id-column", "filename", "--match-by", "file"],
        "later": [shared / "lamost-later"],
        "miles": [lst, "--labels", shared / "miles" / "labels.csv", "--id-column", "file", "--match-by", "file"],
        "desi": [shared / "desi-edr"],
    }
    out = {}
    import subprocess
    import sys

    for name, args in jobs.items():
        path = d / f"{name}.h5"
        res = subprocess.run([sys.executable, "-m", "stxcli", "featurize", *map(str, args), "-o", str(path),
                              "--json"], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        out[name] = (path, json.loads(res.stdout))
    return out


def test_every_layout_on_one_grid(stores):
    dims, keys, axes = set(), set(), []
    for name, (path, summary) in stores.items():
        with FeatureStore.open(path) as st:
            dims.add(st.dim)
            keys.add(st.featurizer_key)
            axes.append(st.axis)
            f = st.read()["features"]
            assert np.isfinite(f).all() and np.isfinite(st.read()["ivar"]).all(), name
            assert st.n == summary["n_spectra"] > 0
    assert len(dims) == 1 and len(keys) == 1
    for a in axes[1:]:
        np.testing.assert_array_equal(a, axes[0])
    assert 3890 < axes[0][0] < 3910 and 8790 < axes[0][-1] < 8810


def test_readers_chosen_by_content(stores):
    assert stores["dr10"][1]["readers"] == {"lamost": 40}
    assert stores["dr1"][1]["readers"] == {"lamost": 24}
    assert stores["later"][1]["readers"] == {"lamost": 2}
    assert stores["miles"][1]["readers"] == {"fits1d": 12}
    assert stores["desi"][1]["readers"] == {"desi": 15}


def test_labels_joined(stores, shared):
    from astropy.table import Table

    cat = Table.read(shared / "lamost-dr10" / "labels.csv")
    with FeatureStore.open(stores["dr10"][0]) as st:
        ids = st.ids
        teff = st.labels(["teff"])[:, 0]
        assert st.label_names == ["feh", "logg", "teff"]
    want = {str(o): t for o, t in zip(cat["obsid"], cat["teff"])}
    np.testing.assert_allclose(teff, [want[i] for i in ids], rtol=1e-6)
    # DR1: 20 of 24 files have catalogue rows; the 4 others are NaN
    with FeatureStore.open(stores["dr1"][0]) as st:
        assert np.isfinite(st.labels(["feh"])[:, 0]).sum() == 20
    with FeatureStore.open(stores["miles"][0]) as st:
        assert np.isfinite(st.labels(["teff"])[:, 0]).sum() >= 11


def test_stores_concatenate(stores, tmp_path, capsys):
    paths = [p for p, _ in stores.values()]
    code, out, err = run_cli(["store", "concat", *paths, "-o", tmp_path / "all.h5", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n"] == sum(s["n_spectra"] for _, s in stores.values())
    assert summary["labels"]["teff"]["n"] >= 40 + 20


def test_desi_dead_fibres_are_flagged_not_fatal(stores):
    from stxcli import flags

    with FeatureStore.open(stores["desi"][0]) as st:
        q = st.quality
        assert ((q["flags"] & flags.NO_OVERLAP) != 0).sum() >= 1
        dead = (q["flags"] & flags.NO_OVERLAP) != 0
        assert (st.read()["ivar"][dead] == 0).all()


def test_label_catalog_errors(tmp_path, shared, capsys):
    base = ["featurize", shared / "lamost-dr10" / "spectra", "-o", tmp_path / "x.h5", "--labels", shared / "lamost-dr10" / "labels.csv"]
    code, _, err = run_cli(base + ["--id-column", "nope"], capsys)
    assert code == 1 and "nope" in err
    code, _, err = run_cli(base + ["--id-column", "obsid", "--label-columns", "teff,vsini"], capsys)
    assert code == 1 and "vsini" in err
    code, _, err = run_cli(base + ["--id-column", "obsid", "--match-by", "file"], capsys)
    assert code == 1 and "no catalog row matches" in err
    dup = tmp_path / "dup.csv"
    dup.write_text("obsid,teff,logg,feh\n1,5000,4,0\n1,5100,4,0\n")
    code, _, err = run_cli(base[:4] + ["--labels", dup, "--id-column", "obsid"], capsys)
    assert code == 1 and "duplicate" in err
    assert not (tmp_path / "x.h5").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["dup.csv"]


def test_interrupted_run_resumes_without_duplicates(tmp_path, shared, monkeypatch):
    from stxcli import console

    console.set_quiet(True)
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:6]
    args = [str(p) for p in files]
    clean = tmp_path / "clean.h5"
    run_featurize(args, clean)

    calls = interrupt_input_digest(monkeypatch, at=4)
    out = tmp_path / "resumed.h5"
    with pytest.raises(KeyboardInterrupt):
        run_featurize(args, out)
    assert not out.exists()
    partial = tmp_path / ".resumed.h5.partial"
    assert partial.exists()
    calls["n"] = 10  # no more interruptions; count the files still to do
    run_featurize(args, out)
    assert calls["n"] == 10 + 3  # three files were done before the interruption
    assert not partial.exists()
    with FeatureStore.open(clean) as a, FeatureStore.open(out) as b:
        assert list(a.ids) == list(b.ids)
        np.testing.assert_array_equal(a.read()["features"], b.read()["features"])
        assert a.checksum == b.checksum


def test_data_error_leaves_nothing(tmp_path, shared):
    from stxcli.errors import FormatError

    good = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:2]
    bad = tmp_path / "bad.fits"
    bad.write_bytes((shared / "desi-edr" / "coadd-sv3-dark-26065.fits").read_bytes()[:20000])
    with pytest.raises(FormatError):
        run_featurize([str(good[0]), str(bad), str(good[1])], tmp_path / "o.h5")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.fits"]


def test_worker_processes_give_identical_store(tmp_path, shared):
    from stxcli import console

    console.set_quiet(True)
    files = [str(p) for p in sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:4]]
    files.append(str(shared / "desi-edr" / "coadd-sv3-dark-26065.fits"))
    run_featurize(files, tmp_path / "one.h5")
    run_featurize(files, tmp_path / "two.h5", workers=2)
    with FeatureStore.open(tmp_path / "one.h5") as a, FeatureStore.open(tmp_path / "two.h5") as b:
        assert a.checksum == b.checksum
        assert list(a.meta["source_file"]) == list(b.meta["source_file"])


def test_store_records_each_input_file_digest(stores):
    """Every input file is recorded with its XXH3-128 digest, computed here from its bytes."""
    import xxhash

    from stxcli.store import FeatureStore

    path, _ = stores["desi"]
    with FeatureStore.open(path) as st:
        inputs = st.inputs
    assert inputs and all(set(d) == {"path", "xxh3_128", "reader", "rows"} for d in inputs)
    for d in inputs:
        want = xxhash.xxh3_128(open(d["path"], "rb").read()).hexdigest()
        assert d["xxh3_128"] == want and len(want) == 32
