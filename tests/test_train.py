"""The training loop: masked NLL by hand, splits, contiguous chunk reads, learning, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stxcli.errors import StxError
from stxcli.train import (ArraySource, Batches, RowSet, TrainOptions, feature_stats, gaussian_nll,
                          make_split, open_stores, pretrain)

from _models_util import synth, write_synth

torch.set_num_threads(1)


def test_masked_nll_by_hand():
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
    logvar = torch.tensor([[0.0, math.log(4.0)], [math.log(0.25), 0.0]])
    y = torch.tensor([[1.0, float("nan")], [2.5, 1.0]])
    w = torch.tensor([1.0, 3.0])
    # present pairs: (0,0): r=1 var=1; (1,0): r=.5 var=.25; (1,1): r=2 var=1
    terms = [(1.0, 0.5 * (math.log(2 * math.pi) + 0.0 + 1.0)),
             (3.0, 0.5 * (math.log(2 * math.pi) + math.log(0.25) + 0.25 / 0.25)),
             (3.0, 0.5 * (math.log(2 * math.pi) + 0.0 + 4.0))]
    expect = sum(wt * t for wt, t in terms) / sum(wt for wt, _ in terms)
    got = gaussian_nll(mean, logvar, y, w)
    assert math.isclose(float(got), expect, rel_tol=1e-6)
    # an ensemble of two identical members gives the same value; a NaN label adds no gradient
    got2 = gaussian_nll(mean.expand(2, 2, 2), logvar.expand(2, 2, 2), y, w)
    assert math.isclose(float(got2), expect, rel_tol=1e-6)
    m = mean.clone().requires_grad_(True)
    gaussian_nll(m, logvar, y, w).backward()
    assert float(m.grad[0, 1]) == 0.0 and torch.isfinite(m.grad).all()


def test_split_counts_subsample_and_errors():
    y = [np.ones((100, 2), np.float32), np.ones((50, 2), np.float32)]
    y[0][:10] = np.nan  # 10 unlabelled stars are never used
    src = [ArraySource(np.zeros((100, 3)), {}), ArraySource(np.zeros((50, 3)), {})]
    sp = make_split(src, y, val_frac=0.2, n_train=None, seed=0)
    assert sp.n_train + sp.n_val == 140 and sp.n_val == 28
    for tr, va, yy in zip(sp.train, sp.val, y):
        assert not (tr & va).any() and not (tr & ~np.isfinite(yy).any(1)).any()
    sub = make_split(src, y, val_frac=0.2, n_train=60, seed=1)
    assert (sub.n_train, sub.n_val) == (48, 12)
    again = make_split(src, y, val_frac=0.2, n_train=60, seed=1)
    assert all((a == b).all() for a, b in zip(sub.train, again.train))
    with pytest.raises(StxError, match="more stars than the 140 labelled"):
        make_split(src, y, val_frac=0.2, n_train=141, seed=0)
    with pytest.raises(StxError, match="fewer stars than the split needs"):
        make_split(src, y, val_frac=0.2, n_train=12, seed=0)


class _Recording(ArraySource):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads = []

    def read(self, start, stop, ivar):
        self.reads.append((start, stop))
        return super().read(start, stop, ivar)


def test_streaming_reads_contiguous_chunks_and_covers_each_row_once():
    f, iv, _, lab = synth(1000, d=5)
    src = _Recording(f, lab, iv)
    mask = np.zeros(1000, bool)
    mask[::3] = True
    y = np.arange(1000, dtype=np.float32)[:, None]  # the row number travels as the "label"
    rows = RowSet([src], [mask], [y], chunk_rows=64, want_ivar=True)
    b = Batches(rows, cache=False, buffer_chunks=3)
    seen = []
    for x, ivb, yb, wb in b.epoch(np.random.default_rng(0), batch_size=50):
        assert x.shape[0] == ivb.shape[0] == yb.shape[0] <= 50
        seen.append(yb[:, 0].numpy())
    seen = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(seen), np.flatnonzero(mask).astype(np.float32))
    assert not np.array_equal(seen, np.sort(seen))  # shuffled
    assert all(e - s <= 64 and s % 64 == 0 for s, e in src.reads)  # whole contiguous chunks only
    # the in-memory path yields the same rows and the same features
    c = Batches(RowSet([src], [mask], [y], 64, True), cache=True)
    xs, ys = zip(*[(x.numpy(), yy.numpy()) for x, _, yy, _ in c.epoch(np.random.default_rng(0), 50)])
    order = np.argsort(np.concatenate(ys)[:, 0])
    np.testing.assert_array_equal(np.concatenate(xs)[order], f[mask])


def test_feature_stats_match_numpy():
    f, iv, _, lab = synth(333, d=7)
    src = ArraySource(f, lab, iv)
    mask = np.ones(333, bool)
    for cache in (True, False):
        b = Batches(RowSet([src], [mask], [np.zeros((333, 1), np.float32)], 50, False), cache=cache)
        m, s = feature_stats(b)
        np.testing.assert_allclose(m, f.astype(np.float64).mean(0), rtol=1e-10)
        np.testing.assert_allclose(s, f.astype(np.float64).std(0, ddof=1), rtol=1e-8)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    write_synth(d / "a.h5", 400)
    write_synth(d / "b.h5", 100, seed=5)
    write_synth(d / "other.h5", 50, config={"grid": "different"})
    return d


def test_mlp_learns_better_than_the_mean(stores, tmp_path):
    s = pretrain([stores / "a.h5"], tmp_path / "m", head_config={"hidden": [32, 32]},
                 opts=TrainOptions(epochs=80, patience=15, seed=0, cache_mb=0))  # streamed from the store
    f, _, _, lab = synth(400)  # the same rows: the validation labels' spread is the mean predictor's MAE
    for name, spread in (("teff", 3000 / 4), ("logg", 4 / 4), ("feh", 3 / 4)):  # MAE of a uniform about its mean
        assert s["validation"][name]["mae"] < 0.25 * spread, (name, s["validation"][name])


def test_same_seed_identical_weights(stores, tmp_path):
    from stxcli.modelfile import ModelDir

    opts = dict(epochs=3, seed=7, augment_noise=0.5)
    pretrain([stores / "a.h5"], tmp_path / "x", head_config={"hidden": [8], "dropout": 0.1}, opts=TrainOptions(**opts))
    pretrain([stores / "a.h5"], tmp_path / "y", head_config={"hidden": [8], "dropout": 0.1}, opts=TrainOptions(**opts))
    pretrain([stores / "a.h5"], tmp_path / "z", head_config={"hidden": [8], "dropout": 0.1},
             opts=TrainOptions(**{**opts, "seed": 8}))
    tx, ty, tz = (ModelDir(tmp_path / k).tensors("model.safetensors") for k in "xyz")
    assert tx.keys() == ty.keys()
    for k in tx:
        np.testing.assert_array_equal(tx[k], ty[k])
    assert not np.array_equal(tx["head.members.0.out.weight"], tz["head.members.0.out.weight"])


def test_several_stores_and_mismatch(stores, tmp_path):
    import json

    s = pretrain([stores / "a.h5", stores / "b.h5"], tmp_path / "m", weights=[1.0, 0.5], head="ridge")
    assert s["n_train"] + s["n_val"] == 500
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert [st["weight"] for st in man["training"]["stores"]] == [1.0, 0.5]
    with pytest.raises(StxError, match=r"a\.h5 and .*other\.h5 were made with different featurizer configs"):
        open_stores([stores / "a.h5", stores / "other.h5"])
    assert not (tmp_path / "n").exists()


def test_label_errors(stores, tmp_path):
    from stxcli.store import write_store_arrays

    with pytest.raises(StxError, match="label 'alpha_fe' is missing"):
        pretrain([stores / "a.h5"], tmp_path / "m", labels=["teff", "alpha_fe"], opts=TrainOptions(epochs=1))
    f, iv, ids, lab = synth(50)
    lab["logg"] = np.full(50, np.nan)
    lab["feh"][:45] = np.nan  # 5 known values: teff and feh rows are labelled, logg never
    write_store_arrays(tmp_path / "nan.h5", f, iv, ids, lab, featurizer_name="raw",
                       featurizer_version="test", featurizer_config={"grid": "synthetic"})
    with pytest.raises(StxError, match="label 'logg' has 0 known value"):
        pretrain([tmp_path / "nan.h5"], tmp_path / "m", opts=TrainOptions(epochs=1))
    assert not (tmp_path / "m").exists()


def test_domain_model_flags_outliers():
    from stxcli.model import DomainModel

    rng = np.random.default_rng(0)
    basis = rng.normal(size=(3, 50))
    z = rng.normal(size=(2000, 3)) @ basis + 0.05 * rng.normal(size=(2000, 50))
    dm = DomainModel.fit(z[:1000], z[1000:], n_components=3, quantile=0.99)
    inside = dm.outside(torch.from_numpy(z[1000:].astype(np.float32))).mean()
    assert inside < 0.03
    off_plane = rng.normal(size=(100, 50)).astype(np.float32)  # far from the 3-d subspace
    far_along = (10 * rng.normal(size=(100, 3)) @ basis).astype(np.float32)  # on it, but far out
    assert dm.outside(torch.from_numpy(off_plane)).all()
    assert dm.outside(torch.from_numpy(far_along)).mean() > 0.9
    # the scores equal their definition, computed directly
    zz = z[1000:1100]
    dz = zz - dm.center
    p = dz @ dm.components.T.astype(np.float64)
    d2, resid = dm.scores_np(zz)
    np.testing.assert_allclose(d2, (p * p / dm.eigvals).mean(1), rtol=1e-4)
    np.testing.assert_allclose(resid, ((dz * dz).sum(1) - (p * p).sum(1)) / 50, rtol=1e-3)


def test_standardised_rows_cached_and_streamed_agree():
    f, iv, _, lab = synth(300, d=6)
    src = ArraySource(f, lab, iv * np.linspace(0.5, 2, 6, dtype=np.float32))
    mask = np.ones(300, bool)
    mean, scale = f.mean(0), (1 / f.std(0)).astype(np.float32)
    got = {}
    for cache in (True, False):
        b = Batches(RowSet([src], [mask], [np.zeros((300, 1), np.float32)], 64, True), cache=cache)
        b.standardize(mean, scale)
        xs, ivs = zip(*[(x, v) for x, v, _, _ in b.chunks()])
        got[cache] = (np.concatenate(xs), np.concatenate(ivs))
        with pytest.raises(RuntimeError):
            b.standardize(mean, scale)  # never twice
    for x, v in got.values():
        np.testing.assert_allclose(x, (f - mean) * scale, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(v, src.iv / scale**2, rtol=1e-5)  # sigma scales with the feature


def test_training_runs_with_the_old_objects_frozen(monkeypatch):
    """fit_gradient trains with the objects that existed before frozen for the cyclic GC (its
    full collections of torch's objects were 7 % of a fine-tune), and thaws them after."""
    import gc

    import stxcli.train as T

    seen = []
    monkeypatch.setattr(T, "_fit_gradient", lambda *a: seen.append(gc.get_freeze_count()) or "done")
    assert gc.get_freeze_count() == 0
    assert T.fit_gradient(None, [], None, None, {}, None, "cpu", "t") == "done"
    assert seen and seen[0] > 0 and gc.get_freeze_count() == 0
