"""Predicting from survey files: spectra are read a few hundred at a time and grouped into
prediction chunks within a file, in order, with every column carried."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import stxcli.pipeline as pipeline
from stxcli import predict as P
from stxcli.protocols import FeatureBatch
from stxcli.spectra import SpectrumMeta


def _fake_featurize_files(calls):
    """featurize_files' stream for a.fits (7 spectra) and b.fits (3), ``chunk_size`` per batch."""
    def featurize_files(paths, feat, *, format=None, chunk_size=1024, rv_lookup=None, threads=1, readers=None):
        for path in paths:
            calls.append((Path(path).name, chunk_size))
            yield pipeline.FileStart(Path(path), None)
            total = 7 if Path(path).name == "a.fits" else 3
            for s in range(0, total, chunk_size):
                n = min(chunk_size, total - s)
                m = SpectrumMeta.empty(n, "desi", str(path), s)
                m.extra["targetid"] = np.arange(s, s + n, dtype=np.int64) + (1000 if total == 7 else 2000)
                x = np.arange(s, s + n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
                q = {"snr": np.full(n, 10.0 + s, np.float32), "flags": np.full(n, s, np.int32)}
                yield FeatureBatch(x, x + 1, q, m)
    return featurize_files


def test_file_chunks_read_small_batches_and_group_them_per_file(monkeypatch):
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
