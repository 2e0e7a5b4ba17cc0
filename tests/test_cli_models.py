"""pretrain / finetune / predict through the CLI: end to end on small stores and on real LAMOST
DR10 files, and every failure of the issue's list as a one-line error with no output."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from conftest import run_cli
from _models_util import synth, write_synth

torch.set_num_threads(1)

LABELS = ["teff", "logg", "feh"]
FAST = ["--epochs", "3", "--threads", "1"]


def _table(path):
    from astropy.io import fits
    from astropy.table import Table

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'dex' is not a FITS-standard unit string
        with fits.open(path) as h:
            h.verify("exception")
            hdr = h["PREDICTIONS"].header
        return Table.read(path, hdu="PREDICTIONS"), hdr


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    write_synth(d / "src.h5", 300)
    write_synth(d / "tgt.h5", 120, seed=4, shift=0.01, feh_offset=0.3)
    return d


@pytest.fixture(scope="module")
def base(work):
    from stxcli.cli.main import main

    code = main(["pretrain", str(work / "src.h5"), "-o", str(work / "base"), "--set", "hidden=16,16",
                 "--epochs", "60", "--threads", "1", "--quiet"])
    assert code == 0
    return work / "base"


def test_pretrain_predict_store_fits(work, base, capsys, tmp_path):
    from stxcli.model import load_model
    from stxcli.modelfile import sha256_file
    from stxcli.store import FeatureStore

    code, out, err = run_cli(["predict", base, work / "tgt.h5", "-o", tmp_path / "p.fits", "--json",
                              "--chunk-size", "50"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n_spectra"] == 120 and summary["labels"] == LABELS
    t, hdr = _table(tmp_path / "p.fits")
    assert t.colnames == ["id", "survey", "source_file", "source_row", "ra", "dec", "teff", "teff_err",
                          "logg", "logg_err", "feh", "feh_err", "snr", "flags"]
    assert str(t["teff"].unit) == "K" and str(t["teff_err"].unit) == "K"
    assert str(t["feh"].unit) == "dex" and str(t["logg_err"].unit) == "dex"
    assert t["flags"].dtype.kind == "i" and t["flags"].dtype.itemsize == 4 and len(t) == 120
    assert hdr["MODELSHA"] == sha256_file(base / "manifest.json") and hdr["MODEL"] == "base"
    assert hdr["STXVER"] and hdr["FLAG5"] == "OUT_OF_DOMAIN"
    with FeatureStore.open(work / "tgt.h5") as st:
        x = st.read(0, st.n)["features"]
        ids = list(st.ids)
    ref = load_model(base).predict(x)
    assert list(t["id"]) == ids
    for j, lab in enumerate(LABELS):  # streamed in chunks of 50, same numbers as one batch
        np.testing.assert_allclose(t[lab], ref["value"][:, j], rtol=1e-6)
        np.testing.assert_allclose(t[f"{lab}_err"], ref["err"][:, j], rtol=1e-5)
        assert (np.asarray(t[f"{lab}_err"]) > 0).all()
    np.testing.assert_allclose(t["snr"], 50.0)
    # --model form, and several stores in one catalog
    code, out, err = run_cli(["predict", "--model", base, work / "tgt.h5", work / "src.h5", "-o",
                              tmp_path / "q.fits", "--quiet"], capsys)
    assert code == 0, err
    assert len(_table(tmp_path / "q.fits")[0]) == 420


def test_predict_mapped_and_read_paths_agree(work, base, capsys, tmp_path, monkeypatch):
    """Features mapped from the file (the default) or read through h5py (a compressed copy of
    the store cannot be mapped), meta read in blocks smaller than a chunk or larger: one catalog."""
    import h5py
    import shutil

    import stxcli.predict as P

    comp = tmp_path / "comp.h5"
    shutil.copy(work / "tgt.h5", comp)
    with h5py.File(comp, "a") as h:
        data = h["features"][:]
        del h["features"]
        h.create_dataset("features", data=data, chunks=(16, data.shape[1]), compression="gzip")
    tables = []
    for store, meta_rows in ((work / "tgt.h5", 65536), (work / "tgt.h5", 7), (comp, 7)):
        monkeypatch.setattr(P, "META_ROWS", meta_rows)
        out = tmp_path / f"p{len(tables)}.fits"
        code, _, err = run_cli(["predict", base, store, "-o", out, "--chunk-size", "30", "--quiet"], capsys)
        assert code == 0, err
        tables.append(_table(out)[0])
    for t in tables[1:]:
        for col in tables[0].colnames:
            assert list(t[col]) == list(tables[0][col]), col


def test_folded_first_layer_equals_the_plain_path(work, base):
    """predict computes the head's first layer and the domain projections in one product: the
    same values, errors and out-of-domain flags as running the head and the domain scores apart."""
    from stxcli.model import load_model
    from stxcli.store import FeatureStore

    with FeatureStore.open(work / "tgt.h5") as st:
        x = st.read(0, st.n)["features"]
    x[:5] *= 40.0  # far off the training features: out of the domain
    model = load_model(base)
    assert model._fold("cpu") is not None
    folded = model.predict(x)
    plain_model = load_model(base)
    plain_model._folded["cpu"] = None  # the head's own forward and DomainModel.scores
    plain = plain_model.predict(x)
    np.testing.assert_allclose(folded["value"], plain["value"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(folded["err"], plain["err"], rtol=1e-5)
    assert folded["out_of_domain"][:5].all()
    np.testing.assert_array_equal(folded["out_of_domain"], plain["out_of_domain"])


@pytest.mark.parametrize("adapter", ["residual", "lora", "full", "auto"])
def test_finetune_each_adapter_then_predict(work, base, capsys, tmp_path, adapter):
    code, out, err = run_cli(["finetune", base, work / "tgt.h5", "--adapter", adapter, "-o", tmp_path / "ft",
                              "--n-train", "100", "--json", *FAST], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["kind"] == "finetuned" and s["n_train"] + s["n_val"] == 100 and s["trainable_params"] > 0
    assert set(s["validation"]) >= {"zero_shot"}
    code, out, err = run_cli(["predict", tmp_path / "ft", work / "tgt.h5", "-o", tmp_path / "p.fits", "--quiet"],
                             capsys)
    assert code == 0, err
    t, hdr = _table(tmp_path / "p.fits")
    assert len(t) == 120 and np.isfinite(np.asarray(t["feh"])).all() and hdr["MODELKND"] == "finetuned"


def test_scratch_baseline(work, base, capsys, tmp_path):
    code, out, err = run_cli(["finetune", base, work / "tgt.h5", "--scratch", "-o", tmp_path / "s", "--json",
                              "--n-train", "100", *FAST], capsys)
    assert code == 0, err
    assert json.loads(out)["kind"] == "pretrained"


def _fails(capsys, args, code_expected=1, match=None):
    code, out, err = run_cli(args, capsys)
    assert code == code_expected, (code, err)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and (lines[0].startswith("error:") or "Error" in lines[0]), err
    if match:
        assert match in lines[0], lines[0]
    return lines[0]


def test_failures_are_one_line_with_no_output(work, base, capsys, tmp_path):
    import shutil

    from stxcli.store import write_store_arrays

    out = tmp_path / "m"
    _fails(capsys, ["pretrain", work / "src.h5", "--labels", "teff,alpha_fe", "-o", out, *FAST],
           match="label 'alpha_fe' is missing")
    f, iv, ids, lab = synth(60)
    lab["logg"][:] = np.nan
    write_store_arrays(tmp_path / "nan.h5", f, iv, ids, lab, featurizer_name="raw", featurizer_version="test",
                       featurizer_config={"grid": "synthetic"})
    _fails(capsys, ["pretrain", tmp_path / "nan.h5", "-o", out, *FAST], match="label 'logg' has 0 known")
    _fails(capsys, ["finetune", base, work / "tgt.h5", "--adapter", "lora", "--n-train", "12", "-o", out, *FAST],
           match="fewer stars than the split needs")
    _fails(capsys, ["finetune", base, work / "tgt.h5", "--adapter", "nope", "-o", out, *FAST],
           match="no adapter named 'nope'")
    _fails(capsys, ["finetune", base, work / "tgt.h5", "-o", out, *FAST], code_expected=2, match="--adapter")
    (tmp_path / "empty").mkdir()
    _fails(capsys, ["predict", tmp_path / "empty", work / "tgt.h5", "-o", tmp_path / "p.fits"],
           match="manifest.json is missing")
    write_synth(tmp_path / "other.h5", 30, config={"grid": "another"})
    _fails(capsys, ["predict", base, tmp_path / "other.h5", "-o", tmp_path / "p.fits"],
           match="another featurizer config")
    shutil.copytree(base, tmp_path / "tampered")
    w = tmp_path / "tampered" / "model.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    _fails(capsys, ["predict", tmp_path / "tampered", work / "tgt.h5", "-o", tmp_path / "p.fits"],
           match="tampered with or truncated")
    assert not out.exists() and not (tmp_path / "p.fits").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


# --------------------------------------------------------------- real LAMOST DR10 files, end to end


@pytest.fixture(scope="module")
def dr10(shared, tmp_path_factory):
    from stxcli.cli.featurize import run_featurize

    d = tmp_path_factory.mktemp("dr10")
    src = shared / "lamost-dr10"
    files = sorted(str(p) for p in (src / "spectra").glob("*.fits*"))
    run_featurize(files, d / "dr10.h5", labels=src / "labels.csv", id_column="obsid", label_columns=LABELS)
    return d, src, files


def test_real_files_store_and_catalog_agree(dr10, capsys, monkeypatch):
    d, src, files = dr10
    code, out, err = run_cli(["pretrain", d / "dr10.h5", "-o", d / "m", "--set", "hidden=8", "--val-frac",
                              "0.25", *FAST, "--quiet"], capsys)
    assert code == 0, err
    assert run_cli(["predict", d / "m", d / "dr10.h5", "-o", d / "store.fits", "--quiet"], capsys)[0] == 0
    code, out, err = run_cli(["predict", d / "m", *files, "-o", d / "files.fits", "--quiet"], capsys)
    assert code == 0, err
    a, _ = _table(d / "store.fits")
    b, _ = _table(d / "files.fits")
    assert len(a) == len(b) == 40 and "obsid" in a.colnames and a["survey"][0] == "lamost"
    np.testing.assert_array_equal(a["obsid"], b["obsid"])
    for lab in LABELS:  # featurized on the fly with the manifest's featurizer: the same numbers (to
        # float32 rounding: the model runs on 1 thread beside the featurizing pool, on all for a store,
        # and oneDNN's product sums in another order then; atol for an [Fe/H] near 0)
        np.testing.assert_allclose(a[lab], b[lab], rtol=1e-5, atol=1e-6)
    import stxcli.pipeline as pipeline
    import stxcli.registry as registry

    import stxcli.fitsio as fitsio

    probed, unzipped = [], []
    real_probe, (real_unzip, unzip_errors) = registry.probe_file, fitsio._gunzip()
    monkeypatch.setattr(registry, "probe_file", lambda p: probed.append(p) or real_probe(p))
    monkeypatch.setattr(fitsio, "_gunzip", lambda: (lambda b: unzipped.append(1) or real_unzip(b), unzip_errors))
    code, out, err = run_cli(["predict", d / "m", *files, "-o", d / "t1.fits", "--threads", 1, "--quiet"], capsys)
    assert code == 0, err
    assert len(probed) == len(files)  # each file identified once, just before its reader reads it:
    assert len(unzipped) == sum(f.endswith(".gz") for f in files) > 0  # so decompressed once
    assert pipeline.identify is registry.identify
    code, out, err = run_cli(["predict", d / "m", *files, "-o", d / "t3.fits", "--threads", 3, "--quiet"], capsys)
    assert code == 0, err
    t1, _ = _table(d / "t1.fits")
    t3, _ = _table(d / "t3.fits")
    for col in ("obsid", "snr", "flags"):  # featurizing threads change nothing
        np.testing.assert_array_equal(t1[col], t3[col])
    for lab in LABELS:  # (torch's own thread count may reorder sums in the MLP)
        np.testing.assert_allclose(t1[lab], t3[lab], rtol=1e-6)
    # the labels catalog (a `file` column relative to it) as input: row for row, columns appended
    _fails(capsys, ["predict", d / "m", src / "labels.csv", "-o", d / "cat.fits"], code_expected=2,
           match="--prefix")
    code, out, err = run_cli(["predict", "--model", d / "m", src / "labels.csv", "-o", d / "cat.fits",
                              "--prefix", "pred_", "--quiet"], capsys)
    assert code == 0, err
    c, hdr = _table(d / "cat.fits")
    from astropy.table import Table

    cat = Table.read(src / "labels.csv")
    assert list(c.colnames[:len(cat.colnames)]) == cat.colnames and len(c) == len(cat)
    np.testing.assert_array_equal(c["obsid"], cat["obsid"])
    by_obsid = {int(o): i for i, o in enumerate(a["obsid"])}
    idx = [by_obsid[int(o)] for o in c["obsid"]]
    for lab in LABELS:
        np.testing.assert_allclose(c[f"pred_{lab}"], np.asarray(a[lab])[idx], rtol=1e-5, atol=1e-6)
        assert str(c[f"pred_{lab}_err"].unit) == str(a[f"{lab}_err"].unit)
    assert hdr["MODELSHA"]


def test_flag_bits_by_hand():
    """predict_chunk: featurizer flags travel; OUT_OF_DOMAIN from the domain model;
    OUT_OF_LABEL_RANGE when a value is more than 1 sigma beyond the training range."""
    from types import SimpleNamespace

    from stxcli import flags as F
    from stxcli.model import LabelSpec
    from stxcli.predict import Chunk, predict_chunk

    specs = [LabelSpec("teff", "K", "log10", 3.7, 0.05, 4000.0, 7000.0),
             LabelSpec("feh", "dex", "identity", -0.5, 0.5, -2.5, 0.5)]
    value = np.array([[5000, 0.0], [3950, 0.0], [3900, 0.0], [5000, 0.7], [5000, 0.0]])
    err = np.array([[50, 0.1], [100, 0.1], [50, 0.1], [50, 0.1], [50, 0.1]])
    ood = np.array([False, False, False, False, True])
    model = SimpleNamespace(specs=specs, predict=lambda x, device: {"value": value, "err": err, "out_of_domain": ood})
    ch = Chunk(np.zeros((5, 3), np.float32), {}, np.full(5, 20, np.float32),
               np.array([F.LOW_SNR, 0, 0, F.HEAVY_MASK, 0], np.int32))
    out = predict_chunk(model, ch, "cpu")
    # row 1: 3950 + 100 >= 4000: within 1 sigma of the range; row 2: 3900 + 50 < 4000: beyond
    assert out["flags"].tolist() == [F.LOW_SNR, 0, F.OUT_OF_LABEL_RANGE, F.HEAVY_MASK | F.OUT_OF_LABEL_RANGE,
                                     F.OUT_OF_DOMAIN]
    np.testing.assert_array_equal(out["teff"], value[:, 0].astype(np.float32))
    np.testing.assert_array_equal(out["feh_err"], err[:, 1].astype(np.float32))
    assert out["flags"].dtype == np.int32


def test_far_features_flagged_out_of_domain(work, base, capsys, tmp_path):
    from stxcli.store import FeatureStore, write_store_arrays

    with FeatureStore.open(work / "src.h5") as st:
        x = st.read(0, 40)["features"]
        ids = list(st.ids[:40])
    far = x.copy()
    far[20:] += np.random.default_rng(0).normal(0, 1.0, far[20:].shape).astype(np.float32)  # noise 100x
    write_store_arrays(tmp_path / "far.h5", far, np.ones_like(far), ids, featurizer_name="raw",
                       featurizer_version="test", featurizer_config={"grid": "synthetic"},
                       quality={"flags": np.r_[np.zeros(20, np.int32), np.full(20, 1, np.int32)]})
    code, out, err = run_cli(["predict", base, tmp_path / "far.h5", "-o", tmp_path / "p.fits", "--json"], capsys)
    assert code == 0, err
    t, _ = _table(tmp_path / "p.fits")
    f = np.asarray(t["flags"])
    assert ((f[20:] & 32) != 0).all() and ((f[20:] & 1) != 0).all()  # OUT_OF_DOMAIN, LOW_SNR carried
    assert ((f[:20] & 32) == 0).mean() >= 0.9
    assert "OUT_OF_DOMAIN" in err and json.loads(out)["flags"]["OUT_OF_DOMAIN"] >= 20


def test_rows_without_data_get_nan_and_skip_the_model():
    """A NO_OVERLAP row has no feature: predict_chunk runs the model on the other rows only and
    gives the empty ones NaN labels and errors, no OUT_OF_DOMAIN, their own flags kept."""
    from types import SimpleNamespace

    from stxcli import flags as F
    from stxcli.model import LabelSpec
    from stxcli.predict import Chunk, predict_chunk

    specs = [LabelSpec("teff", "K", "log10", 3.7, 0.05, 4000.0, 7000.0)]
    seen = []

    def predict(x, device):
        seen.append(x.copy())
        return {"value": 5000.0 + x[:, :1], "err": np.full((len(x), 1), 50.0),
                "out_of_domain": np.ones(len(x), bool)}

    model = SimpleNamespace(specs=specs, predict=predict)
    x = np.arange(5, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    flags = np.array([0, F.NO_OVERLAP | F.HEAVY_MASK, 0, F.NO_OVERLAP, F.LOW_SNR], np.int32)
    out = predict_chunk(model, Chunk(x, {}, np.zeros(5, np.float32), flags), "cpu")
    assert len(seen) == 1 and seen[0][:, 0].tolist() == [0, 2, 4]  # the empty rows never reach it
    np.testing.assert_array_equal(out["teff"], np.array([5000, np.nan, 5002, np.nan, 5004], np.float32))
    assert np.isnan(out["teff_err"][[1, 3]]).all() and (out["teff_err"][[0, 2, 4]] == 50).all()
    od = F.OUT_OF_DOMAIN
    assert out["flags"].tolist() == [od, F.NO_OVERLAP | F.HEAVY_MASK, od, F.NO_OVERLAP, F.LOW_SNR | od]
    # every row empty: the model is not called at all
    seen.clear()
    out = predict_chunk(model, Chunk(x[:2], {}, np.zeros(2, np.float32), np.full(2, F.NO_OVERLAP, np.int32)), "cpu")
    assert not seen and np.isnan(out["teff"]).all()


def test_empty_rows_in_a_store_predict_nan_and_are_not_trained_on(work, base, capsys, tmp_path):
    """Through the CLI: a store whose rows 3 and 7 are flagged NO_OVERLAP predicts NaN there and
    the model's values elsewhere; pretraining on it leaves those labelled rows out, with a warning."""
    from stxcli import flags as F
    from stxcli.model import load_model
    from stxcli.store import write_store_arrays

    f, iv, ids, labels = synth(60, seed=9)
    fl = np.zeros(60, np.int32)
    fl[[3, 7]] = F.NO_OVERLAP
    f[[3, 7]] = 1.0  # the featurizer's fill
    write_store_arrays(tmp_path / "dead.h5", f, iv, ids, labels, featurizer_name="raw", featurizer_version="test",
                       featurizer_config={"grid": "synthetic"}, quality={"flags": fl})
    code, out, err = run_cli(["predict", base, tmp_path / "dead.h5", "-o", tmp_path / "p.fits", "--json"], capsys)
    assert code == 0, err
    t, _ = _table(tmp_path / "p.fits")
    ref = load_model(base).predict(f)
    for j, lab in enumerate(LABELS):
        v = np.asarray(t[lab])
        assert np.isnan(v[[3, 7]]).all() and np.isnan(np.asarray(t[f"{lab}_err"])[[3, 7]]).all()
        keep = np.setdiff1d(np.arange(60), [3, 7])
        np.testing.assert_allclose(v[keep], ref["value"][keep, j], rtol=1e-5)
    assert json.loads(out)["flags"]["NO_OVERLAP"] == 2
    code, out, err = run_cli(["pretrain", tmp_path / "dead.h5", "-o", tmp_path / "m", "--set", "hidden=8",
                              "--epochs", "2", "--threads", "1", "--json"], capsys)
    assert code == 0, err
    assert "2 labelled star(s) have no valid feature (NO_OVERLAP) and are left out" in err
    assert json.loads(out)["n_train"] + json.loads(out)["n_val"] == 58


def test_several_inputs_are_identified_as_read_and_a_catalog_among_them_is_a_usage_error(dr10, capsys, tmp_path):
    """With several INPUTs each FITS file is identified just before it is read: a FITS input
    catalog among them is a usage error saying a catalog must be the only INPUT (exit 2), a file
    no reader knows is a data error (exit 1); neither leaves an output."""
    from astropy.table import Table

    d, src, files = dr10
    code, _, err = run_cli(["pretrain", d / "dr10.h5", "-o", tmp_path / "m", "--set", "hidden=8", "--val-frac",
                            "0.25", *FAST, "--quiet"], capsys)
    assert code == 0, err
    Table({"path": [files[0]]}).write(tmp_path / "cat.fits")
    _fails(capsys, ["predict", tmp_path / "m", *files[:2], tmp_path / "cat.fits", "-o", tmp_path / "o.fits"],
           code_expected=2, match="cat.fits: an input catalog must be the only INPUT")
    (tmp_path / "junk.fits").write_bytes(b"SIMPLE  =" + b" " * 2871)
    _fails(capsys, ["predict", tmp_path / "m", *files[:2], tmp_path / "junk.fits", "-o", tmp_path / "o.fits"],
           code_expected=1, match="junk.fits: ")
    assert not (tmp_path / "o.fits").exists()
