"""The Dask backend (issue 7): a 2-worker LocalCluster gives the single-process store, retries a
failing partition, resumes after an interruption; nothing imports dask without --dask."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from stxcli import distributed as D
from stxcli.cli.featurize import run_featurize
from stxcli.errors import StxError, UsageError

from conftest import run_cli

distributed = pytest.importorskip("distributed")

N_LAMOST = 16
PER_PART = 3


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one task thread each (what CI's 2 cores can run), shared by the tests.

    Dask starts workers with OMP_NUM_THREADS=1; the raw featurizer's float32 matrix products give
    results 1 ulp apart with another OpenBLAS thread count, so for a bitwise comparison with the
    single-process run in this process the workers keep this process's BLAS environment."""
    import logging

    import dask

    with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}):
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address="127.0.0.1:0", silence_logs=logging.ERROR)
    c = distributed.Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared):
    """16 real LAMOST DR10 files with a DESI coadd (5 spectra, other metadata columns) in the
    middle, so parts differ in their columns; plus a label catalog with an ``rv`` column."""
    d = tmp_path_factory.mktemp("dask_inputs")
    lam = sorted((shared / "lamost-dr10-train" / "spectra").glob("*.fits.gz"))[:N_LAMOST]
    files = lam[:7] + [shared / "desi-edr" / "coadd-sv3-dark-26065.fits"] + lam[7:]
    lst = d / "files.txt"
    lst.write_text("\n".join(str(p) for p in files) + "\n")
    with open(shared / "lamost-dr10-train" / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    cat = d / "labels.csv"
    with open(cat, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["obsid", "teff", "logg", "feh", "rv"])
        for r in rows:  # rv in km/s from the catalogue redshift
            w.writerow([r["obsid"], r["teff"], r["logg"], r["feh"], float(r["z"]) * 299792.458])
    return {"list": lst, "catalog": cat, "n_files": len(files)}


def _kwargs(inputs):
    return dict(labels=inputs["catalog"], id_column="obsid", label_columns=["teff", "logg", "feh"],
                rv_column="rv")


@pytest.fixture(scope="module")
def single(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "single.h5"
    summary = run_featurize([str(inputs["list"])], out, **_kwargs(inputs))
    return out, summary


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def _assert_same_store(a: Path, b: Path) -> None:
    da, db = _datasets(a), _datasets(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert da[k].dtype == db[k].dtype, k
        if da[k].dtype.kind == "f":
            np.testing.assert_array_equal(da[k], db[k], err_msg=k)  # NaN == NaN here
        else:
            assert da[k].tolist() == db[k].tolist(), k
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        for attr in ("checksum", "featurizer_key", "featurizer_config", "complete"):
            assert fa.attrs[attr] == fb.attrs[attr], attr
        assert json.loads(fa.attrs["inputs"]) == json.loads(fb.attrs["inputs"])
        assert json.loads(fa.attrs.get("label_source", "{}")) == json.loads(fb.attrs.get("label_source", "{}"))
        for name in fa["labels"]:
            assert fa["labels"][name].attrs["unit"] == fb["labels"][name].attrs["unit"]


def test_equal_to_single_process(client, inputs, single, tmp_path):
    ref, ref_summary = single
    out = tmp_path / "dask.h5"
    summary = run_featurize([str(inputs["list"])], out, dask=client, dask_partition=PER_PART, **_kwargs(inputs))
    _assert_same_store(ref, out)
    dk = summary.pop("dask")
    local_only = ("workers", "threads")  # how the single-process run ran; the cluster's are in dk
    assert summary == {**{k: v for k, v in ref_summary.items() if k not in local_only}, "output": str(out)}
    n_parts = -(-inputs["n_files"] // PER_PART)
    assert dk["partitions"] == dk["computed"] == n_parts and dk["reused"] == dk["retried"] == 0
    assert dk["workers"] == 2 and dk["workers_used"] == 2
    # the row order is the input order: LAMOST files, the DESI coadd's 5 rows, LAMOST again
    with h5py.File(out) as f:
        survey = [s.decode() for s in f["meta/survey"][:]]
        inp = json.loads(f.attrs["inputs"])
        assert f["labels/teff"].shape == (N_LAMOST + 5,)
        assert np.isfinite(f["labels/teff"][:]).sum() == ref_summary["n_labelled"] == N_LAMOST
    assert survey[7:12] == ["desi"] * 5 and set(survey[:7] + survey[12:]) == {"lamost"}
    assert [d["rows"] for d in inp][6:9] == [[6, 7], [7, 12], [12, 13]]
    assert [p.name for p in tmp_path.iterdir()] == ["dask.h5"]  # parts folder removed


def test_retry_of_a_failing_partition(client, inputs, single, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(D.FAIL_ONCE_ENV, "1,3")
    out = tmp_path / "retry.h5"
    summary = run_featurize([str(inputs["list"])], out, dask=client, dask_partition=PER_PART, **_kwargs(inputs))
    assert summary["dask"]["retried"] == 2
    err = capsys.readouterr().err
    assert "partition 1 failed (RuntimeError: injected failure" in err and "retrying (1/2)" in err
    _assert_same_store(single[0], out)


def test_retries_exhausted_is_one_error(client, inputs, tmp_path, monkeypatch):
    monkeypatch.setenv(D.FAIL_ONCE_ENV, "2")
    out = tmp_path / "fail.h5"
    with pytest.raises(StxError, match=r"partition 2 .* failed on each of its 1 attempt\(s\); last error: RuntimeError"):
        run_featurize([str(inputs["list"])], out, dask=client, dask_partition=PER_PART, dask_retries=0,
                      **_kwargs(inputs))
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp.h5")]


def test_resume_after_interruption(client, inputs, single, tmp_path, monkeypatch):
    out = tmp_path / "resume.h5"
    calls = {"n": 0}
    real_add = D._Combiner.add

    def interrupted_add(self, part):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_add(self, part)

    monkeypatch.setattr(D._Combiner, "add", interrupted_add)
    with pytest.raises(KeyboardInterrupt):
        run_featurize([str(inputs["list"])], out, dask=client, dask_partition=PER_PART, **_kwargs(inputs))
    assert not out.exists()
    pdir = D.parts_dir_for(out)
    kept = sorted(p.name for p in pdir.glob("part-*.h5"))
    assert kept[:3] == ["part-000000.h5", "part-000001.h5", "part-000002.h5"]
    stamps = {n: (pdir / n).stat().st_mtime_ns for n in kept[:3]}
    monkeypatch.setattr(D._Combiner, "add", real_add)
    seen = {}
    real_done = D.part_is_done

    def spy(part):  # record the reused parts' mtimes at the moment the rerun decides
        ok = real_done(part)
        if ok:
            seen[Path(part.path).name] = Path(part.path).stat().st_mtime_ns
        return ok

    monkeypatch.setattr(D, "part_is_done", spy)
    summary = run_featurize([str(inputs["list"])], out, dask=client, dask_partition=PER_PART, **_kwargs(inputs))
    dk = summary["dask"]
    assert dk["reused"] >= 3 and dk["reused"] + dk["computed"] == dk["partitions"]
    assert all(seen[n] == t for n, t in stamps.items())  # reused as they were, not rewritten
    _assert_same_store(single[0], out)
    assert not pdir.exists()


def test_parts_of_another_config_are_not_reused(client, inputs, tmp_path, monkeypatch):
    lst = tmp_path / "few.txt"
    lst.write_text("\n".join(inputs["list"].read_text().split()[:4]) + "\n")
    out = tmp_path / "o.h5"
    real_add = D._Combiner.add

    def interrupt(self, part):
        raise KeyboardInterrupt

    monkeypatch.setattr(D._Combiner, "add", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_featurize([str(lst)], out, dask=client, dask_partition=2, settings={"target_r": 1500})
    assert (D.parts_dir_for(out) / "part-000000.h5").exists()
    monkeypatch.setattr(D._Combiner, "add", real_add)
    summary = run_featurize([str(lst)], out, dask=client, dask_partition=2)
    assert summary["dask"]["reused"] == 0 and summary["dask"]["computed"] == 2
    ref = run_featurize([str(lst)], tmp_path / "ref.h5")
    assert summary["checksum"] == ref["checksum"]


def test_data_error_is_not_retried(client, inputs, shared, tmp_path, capsys):
    src = (shared / "desi-edr" / "coadd-sv3-dark-26065.fits").read_bytes()
    bad = tmp_path / "trunc.fits"
    bad.write_bytes(src[: len(src) // 3])
    files = inputs["list"].read_text().split()
    lst = tmp_path / "with_bad.txt"
    lst.write_text("\n".join(files[:3] + [str(bad)] + files[3:6]) + "\n")
    out = tmp_path / "bad.h5"
    with pytest.raises(StxError, match="trunc.fits: truncated FITS file"):
        run_featurize([str(lst)], out, dask=client, dask_partition=2)
    assert "retrying" not in capsys.readouterr().err
    assert not out.exists()


def test_partitioning_and_targets(tmp_path):
    assert D.parse_target("local") == D.DaskTarget(None, None)
    assert D.parse_target("local:3") == D.DaskTarget(None, 3)
    assert D.parse_target(" tcp://10.0.0.5:8786 ") == D.DaskTarget("tcp://10.0.0.5:8786", None)
    for bad in ("", "local:0", "local:x"):
        with pytest.raises(UsageError):
            D.parse_target(bad)
    assert [D.files_per_part(n) for n in (1, 10, 64, 65, 1037, 100_000)] == [1, 1, 1, 2, 17, 64]
    files = []
    for i in range(7):
        p = tmp_path / f"f{i}.fits"
        p.write_bytes(b"x" * i)
        files.append(p)
    parts = D.make_parts(files, 3, tmp_path / "parts", "job")
    assert [len(p.files) for p in parts] == [3, 3, 1]
    assert [f for p in parts for f in p.files] == [str(f) for f in files]  # contiguous, in order
    assert parts[2].path == str(tmp_path / "parts" / "part-000002.h5")
    os.utime(files[4], ns=(1, 1))  # a changed file changes its partition's key only
    again = D.make_parts(files, 3, tmp_path / "parts", "job")
    assert [x.key == y.key for x, y in zip(parts, again)] == [True, False, True]
    with pytest.raises(UsageError):
        D.make_parts(files, 0, tmp_path, "job")


def test_missing_dask_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed -> ImportError
    with pytest.raises(StxError, match=r"stx\[dask\]"):
        with D.connect("local:1"):
            pass


def test_cli_local_cluster_and_option_errors(inputs, single, tmp_path, capsys):
    lst = tmp_path / "few.txt"
    lst.write_text("\n".join(inputs["list"].read_text().split()[:4]) + "\n")
    out = tmp_path / "cli.h5"
    code, stdout, _ = run_cli(["featurize", lst, "-o", out, "--dask", "local:2", "--json", "--labels",
                               inputs["catalog"], "--id-column", "obsid", "--rv-column", "rv"], capsys)
    assert code == 0
    summary = json.loads(stdout)
    assert summary["n_files"] == 4 and summary["dask"]["workers"] == 2 and summary["dask"]["partitions"] == 4
    with h5py.File(single[0]) as f:  # the same spectra as the first rows of the reference store
        rows = json.loads(f.attrs["inputs"])[3]["rows"][1]
        ref = f["features"][:rows]
    with h5py.File(out) as f:  # workers with one BLAS thread: equal to float32 rounding
        np.testing.assert_allclose(f["features"][:], ref, rtol=2e-6, atol=2e-6)
    code, _, err = run_cli(["featurize", lst, "-o", tmp_path / "x.h5", "--dask", "local", "--workers", "2"], capsys)
    assert code == 2 and "--dask local:N" in err
    code, _, err = run_cli(["featurize", lst, "-o", tmp_path / "x.h5", "--dask", "local:0"], capsys)
    assert code == 2 and err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_no_dask_import_without_the_option(inputs, tmp_path):
    lst = tmp_path / "one.txt"
    lst.write_text(inputs["list"].read_text().split()[0] + "\n")
    code = (
        "import sys\n"
        "from stxcli.cli.main import main\n"
        f"assert main(['featurize', {str(lst)!r}, '-o', {str(tmp_path / 'o.h5')!r}, '-q']) == 0\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('dask', 'distributed'))\n"
        "assert not bad, bad\n"
    )
    env = {**os.environ, "STX_LOAD_PLUGINS": "stx"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "o.h5").exists()


# ------------------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def model(single, tmp_path_factory):
    """A tiny MLP (3 epochs) trained on the reference store's 16 labelled stars: enough to
    compare predictions, not to be a good model."""
    from stxcli.cli.main import main

    out = tmp_path_factory.mktemp("model") / "m"
    assert main(["pretrain", str(single[0]), "-o", str(out), "--set", "hidden=8", "--epochs", "3",
                 "--val-frac", "0.33", "--threads", "1", "--quiet"]) == 0
    return out


def _fits_rows(path: Path):
    from astropy.io import fits

    with fits.open(path) as h:
        return h[1].data.copy(), h[1].header.copy(), h[0].header.copy()


def test_predict_equal_to_single_process(client, inputs, model, tmp_path, monkeypatch, capsys):
    from stxcli.predict import run_predict

    files = inputs["list"].read_text().split()
    ref = run_predict(model, files, tmp_path / "ref.fits")
    monkeypatch.setenv(D.FAIL_ONCE_ENV, "2")  # and one partition fails once on the way
    got = D.predict_on_dask(client, model, files, tmp_path / "dask.fits", partition_files=PER_PART)
    assert "partition 2 failed" in capsys.readouterr().err
    dk = got.pop("dask")
    assert dk["partitions"] == dk["computed"] == 6 and dk["retried"] == 1 and dk["workers_used"] == 2
    for k in ("n_spectra", "labels", "flags", "manifest_sha256", "inputs"):
        assert got[k] == ref[k], k
    a, ha, pa = _fits_rows(tmp_path / "ref.fits")
    b, hb, pb = _fits_rows(tmp_path / "dask.fits")
    assert a.columns.names == b.columns.names and a.dtype == b.dtype
    # every value and the row order; predictions to float32 rounding: a matrix product's last
    # bits may depend on how many rows it takes at once (MKL's blocking), and a partition's
    # chunks hold other rows than the single-process run's
    for c in a.columns.names:
        if a[c].dtype.kind == "f" and c not in ("ra", "dec", "snr"):
            np.testing.assert_allclose(a[c], b[c], rtol=1e-5, err_msg=c)
        else:
            np.testing.assert_array_equal(a[c], b[c], err_msg=c)
    assert {k: ha[k] for k in ha if not k.startswith("T")} == {k: hb[k] for k in hb if not k.startswith("T")}
    assert list(a["survey"][7:12]) == ["desi"] * 5 and len(a) == N_LAMOST + 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dask.fits", "ref.fits"]


def test_predict_resume_and_refusals(client, inputs, model, single, tmp_path, monkeypatch):
    files = inputs["list"].read_text().split()[:6]
    out = tmp_path / "p.fits"
    real = D._append_spool_part

    def interrupted(master, part, counts):
        if part.index == 1:
            raise KeyboardInterrupt
        real(master, part, counts)

    monkeypatch.setattr(D, "_append_spool_part", interrupted)
    with pytest.raises(KeyboardInterrupt):
        D.predict_on_dask(client, model, files, out, partition_files=2)
    assert not out.exists() and (D.parts_dir_for(out) / "part-000001.npz").exists()
    monkeypatch.setattr(D, "_append_spool_part", real)
    got = D.predict_on_dask(client, model, files, out, partition_files=2)
    assert got["dask"]["reused"] >= 2 and got["dask"]["reused"] + got["dask"]["computed"] == 3
    assert got["n_spectra"] == 6 and [p.name for p in tmp_path.iterdir()] == ["p.fits"]
    with pytest.raises(UsageError, match="without --dask"):
        D.predict_on_dask(client, model, [str(single[0])], tmp_path / "s.fits")
    with pytest.raises(UsageError, match="FITS"):
        D.predict_on_dask(client, model, files, tmp_path / "s.csv")


def test_small_slab_checksum_equals_the_store_checksum(tmp_path):
    """The store checksum is read in small slabs; its digest equals the one-shot definition (all
    ids joined, then features/ivar per 8192-row block) whatever the slab size (ids across slab
    edges, features/ivar across the block edge)."""
    import hashlib

    from stxcli.protocols import FeatureBatch
    from stxcli.spectra import SpectrumMeta
    from stxcli.store import StoreWriter, _checksum

    n, rng = 9000, np.random.default_rng(3)
    meta = SpectrumMeta.empty(n, "test", "f.fits")
    meta.ids = np.array([f"star-{i}-{'x' * (i % 7)}" for i in range(n)])
    feats = rng.normal(size=(n, 3)).astype(np.float32)
    ivar = rng.uniform(size=(n, 3)).astype(np.float32)
    fb = FeatureBatch(feats, ivar, {"snr": np.ones(n, np.float32), "flags": np.zeros(n, np.int32)}, meta)
    w = StoreWriter(tmp_path / "a.h5", featurizer_name="t", featurizer_version="0", featurizer_config={}, dim=3)
    w.append(fb)
    digest = w.finish()
    h = hashlib.sha256("\n".join(meta.ids).encode())
    for s0 in range(0, n, 8192):
        h.update(feats[s0:s0 + 8192].tobytes())
        h.update(ivar[s0:s0 + 8192].tobytes())
    assert digest == h.hexdigest()
    with h5py.File(tmp_path / "a.h5") as f:
        assert f.attrs["checksum"] == digest and bool(f.attrs["complete"])
        assert _checksum(f, slab_rows=700) == digest


def test_predict_cli_with_dask(inputs, model, tmp_path, capsys):
    files = inputs["list"].read_text().split()[:2]
    out = tmp_path / "cli.fits"
    code, stdout, err = run_cli(["predict", model, *files, "-o", out, "--dask", "local:1", "--json"], capsys)
    assert code == 0, err
    s = json.loads(stdout)
    assert s["n_spectra"] == 2 and s["dask"]["workers"] == 1 and s["dask"]["partitions"] == 2
    ref, _, _ = _fits_rows(out)
    assert list(ref.columns.names[:3]) == ["id", "survey", "source_file"] and np.isfinite(ref["teff"]).all()
    code, _, err = run_cli(["predict", model, *files, "-o", tmp_path / "x.fits", "--dask", "local:1",
                            "--prefix", "p_"], capsys)
    assert code == 2 and "input-catalog options" in err


def test_relative_paths_from_another_folder(client, inputs, tmp_path, monkeypatch):
    """The workers run in another folder (as remote workers do): relative inputs and output are
    the client's; the store records the paths as given, like the single-process run."""
    import shutil

    (tmp_path / "in").mkdir()
    for f in inputs["list"].read_text().split()[6:9]:  # LAMOST, LAMOST, the DESI coadd
        shutil.copy(f, tmp_path / "in" / Path(f).name)
    monkeypatch.chdir(tmp_path)
    ref = run_featurize(["in"], Path("ref.h5"))
    got = run_featurize(["in"], Path("out") / "dask.h5", dask=client, dask_partition=1)
    assert got["dask"]["partitions"] == 3 and got["checksum"] == ref["checksum"]
    _assert_same_store(tmp_path / "ref.h5", tmp_path / "out" / "dask.h5")
    with h5py.File(tmp_path / "out" / "dask.h5") as f:
        assert {s.decode() for s in f["meta/source_file"][:]} == {str(Path("in") / p.name)
                                                                 for p in (tmp_path / "in").iterdir()}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dask.h5"]
