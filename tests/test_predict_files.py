"""Predicting from survey files: spectra are read a few hundred at a time and grouped into
prediction chunks, across files while their columns agree, in order, with every column carried."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import stxcli.pipeline as pipeline
from stxcli import predict as P
from stxcli.protocols import FeatureBatch
from stxcli.spectra import SpectrumMeta


def _fake_featurize_files(calls, b_extra=None):
    """featurize_files' stream for a.fits (7 spectra) and b.fits (3), ``chunk_size`` per batch;
    ``b_extra``: one more extra column b.fits' batches carry (another reader's)."""
    def featurize_files(paths, feat, *, format=None, chunk_size=1024, rv_lookup=None, threads=1, readers=None):
        for path in paths:
            calls.append((Path(path).name, chunk_size))
            yield pipeline.FileStart(Path(path), None)
            total = 7 if Path(path).name == "a.fits" else 3
            for s in range(0, total, chunk_size):
                n = min(chunk_size, total - s)
                m = SpectrumMeta.empty(n, "desi", str(path), s)
                m.extra["targetid"] = np.arange(s, s + n, dtype=np.int64) + (1000 if total == 7 else 2000)
                if b_extra and total == 3:
                    m.extra[b_extra] = np.full(n, 7, np.int64)
                x = np.arange(s, s + n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
                q = {"snr": np.full(n, 10.0 + s, np.float32), "flags": np.full(n, s, np.int32)}
                yield FeatureBatch(x, x + 1, q, m)
    return featurize_files


def test_file_chunks_read_small_batches_and_group_them(monkeypatch):
    calls: list = []
    monkeypatch.setattr(pipeline, "featurize_files", _fake_featurize_files(calls))
    monkeypatch.setattr(P, "READ_ROWS", 2)
    chunks = list(P.file_chunks([Path("a.fits"), Path("b.fits")], feat=None, fmt=None, chunk_rows=3))
    assert calls == [("a.fits", 2), ("b.fits", 2)]  # min(chunk_rows, READ_ROWS) spectra per read
    # a.fits: 7 spectra read 2+2+2+1 -> chunks of 4 (2+2 >= 3) and 3 (2+1); b.fits: 3 -> one chunk
    assert [len(c.snr) for c in chunks] == [4, 3, 3]
    a = np.concatenate([c.features[:, 0] for c in chunks[:2]])
    np.testing.assert_array_equal(a, np.arange(7))
    np.testing.assert_array_equal(chunks[0].ivar, chunks[0].features + 1)
    np.testing.assert_array_equal(chunks[1].columns["targetid"], [1004, 1005, 1006])
    np.testing.assert_array_equal(chunks[1].columns["source_row"], [4, 5, 6])
    np.testing.assert_array_equal(chunks[0].snr, [10, 10, 12, 12])
    np.testing.assert_array_equal(chunks[1].flags, [4, 4, 6])
    assert list(chunks[2].columns["source_file"]) == ["b.fits"] * 3
    assert list(chunks[0].columns["id"]) == [f"a.fits:{i}" for i in range(4)]


def test_file_chunks_span_files_while_their_columns_agree(monkeypatch):
    """One-spectrum files (LAMOST) would otherwise cost a model call each: a chunk fills across
    files, every row keeping its own file and row; a file whose reader gives other columns starts
    a new chunk, so no column is dropped or filled."""
    monkeypatch.setattr(P, "READ_ROWS", 2)
    monkeypatch.setattr(pipeline, "featurize_files", _fake_featurize_files([]))
    chunks = list(P.file_chunks([Path("a.fits"), Path("b.fits")], feat=None, fmt=None, chunk_rows=5))
    # a: 2+2+2 -> 6 (>= 5); then a's last 1 and b's 2+1 -> 4, across the two files
    assert [len(c.snr) for c in chunks] == [6, 4]
    assert list(chunks[1].columns["source_file"]) == ["a.fits"] + ["b.fits"] * 3
    np.testing.assert_array_equal(chunks[1].columns["source_row"], [6, 0, 1, 2])
    np.testing.assert_array_equal(chunks[1].columns["targetid"], [1006, 2000, 2001, 2002])
    np.testing.assert_array_equal(chunks[1].features[:, 0], [6, 0, 1, 2])

    # a file of READ_ROWS spectra or more ends its chunk: it is predicted while the next is featurized
    chunks = list(P.file_chunks([Path("a.fits"), Path("b.fits")], feat=None, fmt=None, chunk_rows=100))
    assert [len(c.snr) for c in chunks] == [7, 3]
    monkeypatch.setattr(P, "READ_ROWS", 8)
    chunks = list(P.file_chunks([Path("a.fits"), Path("b.fits")], feat=None, fmt=None, chunk_rows=100))
    assert [len(c.snr) for c in chunks] == [10]
    monkeypatch.setattr(P, "READ_ROWS", 2)

    monkeypatch.setattr(pipeline, "featurize_files", _fake_featurize_files([], b_extra="obsid"))
    chunks = list(P.file_chunks([Path("a.fits"), Path("b.fits")], feat=None, fmt=None, chunk_rows=5))
    assert [len(c.snr) for c in chunks] == [6, 1, 3]
    assert "obsid" not in chunks[1].columns
    np.testing.assert_array_equal(chunks[2].columns["obsid"], [7, 7, 7])


def test_the_model_runs_on_one_thread_while_a_pool_featurizes(monkeypatch, tmp_path):
    """With a pool of featurizing threads (a thread-safe featurizer, threads > 1), each chunk is
    predicted with torch at one thread (its own threads would contend with the pool's) but the
    last, which comes once the pool is done; store chunks and runs without a pool keep torch's
    setting, which is restored after."""
    import torch

    calls: list = []
    monkeypatch.setattr(pipeline, "featurize_files", _fake_featurize_files(calls))
    seen: list = []

    def outputs(model, x, ivar, device):
        seen.append(torch.get_num_threads())
        n = len(x)
        return {"value": np.zeros((n, 1)), "err": np.ones((n, 1)), "out_of_domain": np.zeros(n, bool)}

    monkeypatch.setattr(P, "_model_outputs", outputs)

    class Model:
        input_dim = 4
        specs = [type("S", (), {"name": "teff", "unit": "K", "lo": -1.0, "hi": 1.0})()]

    monkeypatch.setattr(P, "header_cards", lambda model: {})
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for safe, threads, expect in ((True, 2, [1, 2]), (False, 2, [2, 2]), (True, 1, [2, 2])):
            feat = type("F", (), {"thread_safe": safe})()
            seen.clear()
            n, _ = P._predict_stream(Model(), [], [Path("a.fits"), Path("b.fits")], feat,
                                     tmp_path / f"out-{safe}-{threads}.fits", format=None, chunk_rows=4,
                                     device="cpu", threads=threads)
            assert n == 10 and seen == expect, (safe, threads, seen)  # chunks: a.fits 4, then 3 + b.fits 3
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_spool_writes_every_chunk_with_fills_and_the_widest_strings(tmp_path):
    """The streamed catalog: chunks spooled as raw bytes, one FITS table in order; a column a
    chunk lacks gets its fill (NaN, -1); strings take the widest width seen, UTF-8 kept."""
    from astropy.io import fits

    spool = P.Spool(tmp_path / "sp")
    spool.append({"id": np.array(["a", "bb"]), "teff": np.array([5000.5, 6000.25], np.float32),
                  "flags": np.array([1, 2], np.int32)})
    spool.append({"id": np.array(["ccc-é"]), "teff": np.array([4500.0], np.float32),
                  "flags": np.array([4], np.int32), "targetid": np.array([2**40 + 3], np.int64),
                  "ra": np.array([10.125])})
    spool.append({"id": np.array([b"d"]), "teff": np.array([7000.0], np.float32), "flags": np.array([8], np.int32)})
    out = tmp_path / "c.fits"
    order = ["id", "targetid", "ra", "teff", "flags"]
    spool.write_fits(out, order, {"teff": "K"}, {"MODEL": ("m", "")})
    spool.close()
    assert not (tmp_path / "sp").exists()
    with fits.open(out) as h:
        t = h[1].data
        assert h[1].header["NAXIS2"] == 4 and h[1].columns["teff"].unit == "K" and h[0].header["MODEL"] == "m"
        assert list(t.names) == order and h[1].columns["id"].format == "6A"  # "ccc-é" is 6 UTF-8 bytes
        assert [bytes(v).decode() if isinstance(v, bytes) else v for v in t["id"]] == ["a", "bb", "ccc-é", "d"]
        np.testing.assert_array_equal(t["teff"], [5000.5, 6000.25, 4500.0, 7000.0])
        np.testing.assert_array_equal(t["flags"], [1, 2, 4, 8])
        np.testing.assert_array_equal(t["targetid"], [-1, -1, 2**40 + 3, -1])
        assert np.isnan(t["ra"][[0, 1, 3]]).all() and t["ra"][2] == 10.125
