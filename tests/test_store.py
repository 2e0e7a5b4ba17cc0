"""Feature store: round trips, chunked reads, concatenation, checksums, errors."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from stxcli.errors import StxError
from stxcli.store import FeatureStore, concat_stores, featurizer_key, write_store_arrays


def _arrays(n=50, d=7, seed=0):
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)).astype(np.float32)
    iv = rng.uniform(0.5, 2, size=(n, d)).astype(np.float32)
    iv[0, :3] = 0
    ids = [f"s{i}" for i in range(n)]
    labels = {"teff": rng.uniform(4000, 7000, n).astype(np.float32), "feh": rng.normal(size=n).astype(np.float32)}
    labels["feh"][5] = np.nan
    return f, iv, ids, labels


def test_round_trip_and_chunks(tmp_path):
    f, iv, ids, labels = _arrays()
    p = tmp_path / "a.h5"
    checksum = write_store_arrays(p, f, iv, ids, labels, featurizer_name="raw", featurizer_version="1",
                                  featurizer_config={"dlog": 1e-4}, axis=np.arange(7.0))
    with FeatureStore.open(p) as st:
        assert (st.n, st.dim) == (50, 7)
        assert st.checksum == checksum
        np.testing.assert_array_equal(st.read(10, 20)["features"], f[10:20])
        np.testing.assert_array_equal(st.read()["ivar"], iv)
        assert list(st.ids) == ids
        assert st.label_names == ["feh", "teff"]
        assert st.label_units == {"feh": "dex", "teff": "K"}
        lab = st.labels(["teff", "feh"])
        np.testing.assert_array_equal(lab[:, 0], labels["teff"])
        assert np.isnan(lab[5, 1])
        chunks = list(st.iter_chunks(chunk_rows=16, labels=["teff"]))
        assert [c["start"] for c in chunks] == [0, 16, 32, 48]
        np.testing.assert_array_equal(np.concatenate([c["features"] for c in chunks]), f)
        assert st.featurizer_config == {"dlog": 1e-4}
        assert st.featurizer_key == featurizer_key("raw", "1", {"dlog": 1e-4})
        np.testing.assert_array_equal(st.axis, np.arange(7.0))
        with pytest.raises(StxError, match="logg"):
            st.labels(["logg"])
    # the file opens with h5py alone, as documented
    with h5py.File(p) as h:
        assert h["features"].chunks[0] <= 256 and h.attrs["format"] == "stx-feature-store"


def test_featurizer_key_sensitive_to_config():
    assert featurizer_key("raw", "1", {"a": 1}) != featurizer_key("raw", "1", {"a": 2})
    assert featurizer_key("raw", "1", {"a": 1, "b": 2}) == featurizer_key("raw", "1", {"b": 2, "a": 1})


def test_concat(tmp_path):
    f1, iv1, ids1, lab1 = _arrays(30, seed=1)
    f2, iv2, ids2, _ = _arrays(20, seed=2)
    ids2 = [f"t{i}" for i in range(20)]
    write_store_arrays(tmp_path / "a.h5", f1, iv1, ids1, {"teff": lab1["teff"]}, featurizer_config={"x": 1})
    write_store_arrays(tmp_path / "b.h5", f2, iv2, ids2, None, featurizer_config={"x": 1})
    concat_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "c.h5")
    with FeatureStore.open(tmp_path / "c.h5") as st:
        assert st.n == 50
        np.testing.assert_array_equal(st.read()["features"], np.concatenate([f1, f2]))
        lab = st.labels(["teff"])[:, 0]
        np.testing.assert_array_equal(lab[:30], lab1["teff"])
        assert np.isnan(lab[30:]).all()
        assert list(st.ids[28:32]) == ["s28", "s29", "t0", "t1"]


def test_concat_refuses_different_featurizer(tmp_path):
    f, iv, ids, _ = _arrays(8)
    write_store_arrays(tmp_path / "a.h5", f, iv, ids, featurizer_config={"x": 1})
    write_store_arrays(tmp_path / "b.h5", f, iv, ids, featurizer_config={"x": 2})
    with pytest.raises(StxError, match="different featurizer"):
        concat_stores([tmp_path / "a.h5", tmp_path / "b.h5"], tmp_path / "c.h5")
    assert not (tmp_path / "c.h5").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_not_a_store(tmp_path):
    p = tmp_path / "x.h5"
    with h5py.File(p, "w") as h:
        h["a"] = [1]
    with pytest.raises(StxError, match="not an stx feature store"):
        FeatureStore.open(p)
    (tmp_path / "t.h5").write_text("hello")
    with pytest.raises(StxError, match="not an HDF5"):
        FeatureStore.open(tmp_path / "t.h5")
    with pytest.raises(StxError, match="no such"):
        FeatureStore.open(tmp_path / "missing.h5")


def test_subset(tmp_path):
    from stxcli.store import subset_store

    f, iv, ids, labels = _arrays(20)
    write_store_arrays(tmp_path / "a.h5", f, iv, ids, labels, featurizer_config={"x": 1},
                       quality={"snr": np.arange(20, dtype=np.float32)})
    subset_store(tmp_path / "a.h5", np.array([7, 2, 2, 11]), tmp_path / "s.h5")
    with FeatureStore.open(tmp_path / "s.h5") as st, FeatureStore.open(tmp_path / "a.h5") as a:
        assert list(st.ids) == ["s2", "s7", "s11"]
        np.testing.assert_array_equal(st.read()["features"], f[[2, 7, 11]])
        np.testing.assert_array_equal(st.quality["snr"], [2, 7, 11])
        np.testing.assert_array_equal(st.labels(["teff"])[:, 0], labels["teff"][[2, 7, 11]])
        assert st.featurizer_key == a.featurizer_key
    with pytest.raises(StxError, match="out of range"):
        subset_store(tmp_path / "a.h5", np.array([25]), tmp_path / "t.h5")


def test_read_into_reuses_one_buffer_and_utf8_strings(tmp_path):
    f, iv, ids, labels = _arrays(n=23, d=5)
    ids[3] = "Ondřej-β"  # non-ASCII ids survive both string modes
    p = tmp_path / "u.h5"
    write_store_arrays(p, f, iv, ids, labels, featurizer_name="raw", featurizer_version="1", featurizer_config={})
    with FeatureStore.open(p) as st:
        buf = np.full((10, 5), -1.0, np.float32)
        got = []
        for s in range(0, st.n, 10):
            x = st.read_into("features", s, min(s + 10, st.n), buf)
            assert np.shares_memory(x, buf)
            got.append(x.copy())
        np.testing.assert_array_equal(np.concatenate(got), f)
        np.testing.assert_array_equal(st.read_into("ivar", 20, 23, buf), iv[20:23])
        with pytest.raises(ValueError, match="buffer"):
            st.read_into("features", 0, 11, buf)  # too few rows
        with pytest.raises(ValueError, match="buffer"):
            st.read_into("features", 0, 5, np.zeros((10, 5)))  # float64
        raw = st.read(0, st.n, fields=("ids",), utf8=True)["ids"]
        assert raw.dtype.kind == "S" and raw[3].decode("utf-8") == "Ondřej-β"
        assert list(st.read(0, st.n, fields=("ids",))["ids"]) == ids


def _batches(seed=0):
    """Batches of 1-5 rows; one lacks a quality column, one has an extra meta column and a band."""
    from stxcli.protocols import FeatureBatch
    from stxcli.spectra import SpectrumMeta

    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate([1, 3, 1, 5, 2, 1, 4]):
        m = SpectrumMeta.empty(n, "lamost", f"file{i}.fits", 0)
        m.ra = rng.uniform(0, 360, n)
        if i == 3:
            m.extra["obsid"] = np.arange(n, dtype=np.int64) + 100
            m.snr["g"] = np.full(n, 25.0, np.float32)
        q = {"snr": rng.uniform(5, 50, n).astype(np.float32), "flags": np.full(n, i, np.int32)}
        if i != 2:
            q["rv_kms"] = rng.normal(0, 30, n).astype(np.float32)
        out.append(FeatureBatch(rng.normal(size=(n, 4)).astype(np.float32),
                                rng.uniform(1, 2, (n, 4)).astype(np.float32), q, m))
    return out


def _dump(path):
    with h5py.File(path) as h:
        out = {}
        h.visititems(lambda k, v: out.__setitem__(k, v[()]) if isinstance(v, h5py.Dataset) else None)
        return out


def test_buffered_writer_equals_row_by_row_writes(tmp_path):
    """Rows buffered and written in blocks give the same datasets as one write per batch,
    including columns some batches lack (filled as a per-batch write would fill them)."""
    from stxcli.store import StoreWriter

    stores = {}
    for label, rows in (("each", 1), ("block", 6), ("all", 10_000)):
        p = tmp_path / f"{label}.h5"
        w = StoreWriter(p, featurizer_name="raw", featurizer_version="1", featurizer_config={}, dim=4,
                        buffer_rows=rows)
        ranges = [w.append(fb) for fb in _batches()]
        assert ranges[0] == (0, 1) and ranges[-1] == (13, 17) and w.n == 17
        stores[label] = (w.finish(), _dump(p))
    (c1, d1), (c2, d2), (c3, d3) = stores.values()
    assert c1 == c2 == c3
    assert d1.keys() == d2.keys() == d3.keys()
    for k in d1:
        for other in (d2, d3):
            a, b = d1[k], other[k]
            if a.dtype.kind == "f":
                np.testing.assert_array_equal(a, b, err_msg=k)
            else:
                assert list(a) == list(b), k
    assert np.isnan(d1["quality/rv_kms"][4]) and np.isfinite(d1["quality/rv_kms"][5])  # batch 2 lacks it
    assert list(d1["meta/obsid"][:5]) == [-1] * 5 and list(d1["meta/obsid"][5:10]) == [100, 101, 102, 103, 104]


def test_buffered_rows_are_visible_through_f_and_dropped_on_close(tmp_path):
    from stxcli.store import StoreWriter

    w = StoreWriter(tmp_path / "a.h5", featurizer_name="raw", featurizer_version="1", featurizer_config={},
                    dim=4, buffer_rows=1000)
    for fb in _batches()[:2]:
        w.append(fb)
    assert w.n == 4 and w._f["features"].shape[0] == 0  # still buffered
    assert w.f["ids"].shape[0] == 4  # reaching the file writes them first
    w.append(_batches()[3])
    w.close()  # an aborted run: the buffered batch is not written
    with h5py.File(tmp_path / "a.h5") as h:
        assert h["features"].shape[0] == 4


def _store_in_blocks(path, n, d, block, seed=0):
    """A store whose features lie in runs of ``block`` rows: features and ivar (row chunks of 4)
    rewritten ``block`` rows at a time, alternately, with HDF5's chunk cache off (with it, small
    chunks wait in the cache and are placed together when it is flushed)."""
    from stxcli import store as S
    from stxcli.protocols import FeatureBatch
    from stxcli.spectra import SpectrumMeta

    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, d)).astype(np.float32)
    old = S.ROW_CHUNK
    S.ROW_CHUNK = 4
    try:
        w = S.StoreWriter(path, featurizer_name="raw", featurizer_version="1", featurizer_config={}, dim=d,
                          buffer_rows=block)
        for s in range(0, n, block):
            e = min(n, s + block)
            m = SpectrumMeta.empty(e - s, "test", "mem", s)
            w.append(FeatureBatch(f[s:e], np.ones((e - s, d), np.float32), {"flags": np.zeros(e - s, np.int32)}, m))
        w.finish()
    finally:
        S.ROW_CHUNK = old
    with h5py.File(path, "a", rdcc_nbytes=0) as h:
        iv = h["ivar"][:]
        del h["features"], h["ivar"]
        for name in ("features", "ivar"):
            h.create_dataset(name, shape=(n, d), dtype="f4", chunks=(4, d))
        for s in range(0, n, block):
            h["features"][s:s + block] = f[s:s + block]
            h["ivar"][s:s + block] = iv[s:s + block]
    return f


def test_mapped_rows_equal_reads_and_stop_at_runs(tmp_path):
    p = tmp_path / "runs.h5"
    f = _store_in_blocks(p, 30, 5, block=12)  # runs [0, 12) [12, 24) [24, 30)
    with FeatureStore.open(p) as st:
        runs = st.runs("features")
        assert [(a, b) for a, b, _ in runs] == [(0, 12), (12, 24), (24, 30)]
        for s, e in ((0, 12), (3, 9), (12, 24), (25, 30), (29, 30)):
            v = st.mapped("features", s, e)
            np.testing.assert_array_equal(v, f[s:e])
            np.testing.assert_array_equal(v, st.f["features"][s:e])
        assert st.mapped("features", 10, 14) is None  # crosses a run's end
        v = st.mapped("features", 0, 4)
        v[:] = 7.0  # copy-on-write: the file never changes
    with FeatureStore.open(p) as st:
        np.testing.assert_array_equal(st.read(0, 4)["features"], f[:4])


def test_filtered_or_foreign_layouts_are_not_mapped(tmp_path):
    p = tmp_path / "a.h5"
    _store_in_blocks(p, 10, 3, block=10)
    with h5py.File(p, "a") as h:
        data = h["features"][:]
        del h["features"]
        h.create_dataset("features", data=data, chunks=(4, 3), compression="gzip")
    with FeatureStore.open(p) as st:
        assert st.runs("features") is None and st.mapped("features", 0, 2) is None
        assert st.runs("ivar") is not None


def test_chunk_bounds_stop_at_run_ends():
    from stxcli.predict import chunk_bounds

    assert list(chunk_bounds(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    runs = [(0, 6, 0), (6, 10, 999)]
    assert list(chunk_bounds(10, 4, runs)) == [(0, 4), (4, 6), (6, 10)]
    assert list(chunk_bounds(0, 4, [])) == []
