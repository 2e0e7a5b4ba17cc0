"""One-spectrum files featurized together (``stxcli.coalesce``): consecutive small batches are
merged by layout, featurized as one, and cut back; the stream (markers included) comes back in
its order, with the features of the spectra one by one, to float32 rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stxcli.coalesce import Window, layout, merge, split, windows
from stxcli.pipeline import FileStart, build_featurizer, featurize_files, transform_stream
from stxcli.protocols import FeatureBatch
from stxcli.spectra import Arm, SpectrumBatch, SpectrumMeta


def _batch(n: int, npix: int, start: float, tag: int, extra: str = "obsid") -> SpectrumBatch:
    wave = start + np.arange(npix, dtype=np.float64)
    flux = np.full((n, npix), float(tag), np.float32) + np.arange(n, dtype=np.float32)[:, None]
    arm = Arm("lrs", wave, flux, np.ones((n, npix), np.float32), np.zeros((n, npix), bool), resolving_power=1800.0)
    meta = SpectrumMeta.empty(n, "lamost", f"f{tag}.fits")
    meta.extra[extra] = np.full(n, tag, np.int64)
    meta.snr["g"] = np.full(n, 10.0 + tag, np.float32)
    return SpectrumBatch([arm], meta)


class Echo:
    """A featurizer whose features are the first arm's flux; records the batch sizes it saw."""

    thread_safe = True
    dim = 5

    def __init__(self, row_independent: bool) -> None:
        self.row_independent = row_independent
        self.sizes: list[int] = []

    def transform(self, batch: SpectrumBatch) -> FeatureBatch:
        self.sizes.append(batch.n)
        f = np.ascontiguousarray(batch.arms[0].flux[:, :5])
        return FeatureBatch(f, np.ones_like(f), {"snr": f[:, 0].copy(), "flags": np.zeros(batch.n, np.int32)},
                            batch.meta, [f"{batch.n} spectra"])


def test_layout_tells_which_batches_can_share_one():
    a, b = _batch(1, 10, 4000.0, 1), _batch(1, 10, 4100.0, 2)
    assert layout(a) == layout(b)  # other grids of the same length: rows of a 2-D grid
    assert layout(_batch(1, 11, 4000.0, 3)) != layout(a)
    assert layout(_batch(1, 10, 4000.0, 3, extra="targetid")) != layout(a)
    c = _batch(1, 10, 4000.0, 4)
    c.arms[0].resolving_power = np.full(10, 2000.0)
    assert layout(c) != layout(a)
    c.arms[0].resolution = np.zeros((1, 11, 10), np.float32)
    assert layout(c) is None


def test_merge_keeps_a_shared_grid_and_stacks_different_ones():
    a, b, c = _batch(1, 10, 4000.0, 1), _batch(2, 10, 4000.0, 2), _batch(1, 10, 4100.0, 3)
    ab = merge([a, b])
    assert ab.n == 3 and ab.arms[0].wave.ndim == 1
    np.testing.assert_array_equal(ab.arms[0].flux[:, 0], [1, 2, 3])
    np.testing.assert_array_equal(ab.meta.extra["obsid"], [1, 2, 2])
    np.testing.assert_array_equal(ab.meta.snr["g"], [11, 12, 12])
    abc = merge([a, b, c])
    assert abc.arms[0].wave.shape == (4, 10)
    np.testing.assert_array_equal(abc.arms[0].wave[:, 0], [4000, 4000, 4000, 4100])
    abc.validate()


def test_a_window_groups_by_layout_and_gives_the_stream_back_in_order():
    items = [FileStart(Path("a"), None), _batch(1, 10, 4000.0, 1), FileStart(Path("b"), None),
             _batch(1, 12, 4000.0, 2), FileStart(Path("c"), None), _batch(1, 10, 4050.0, 3)]
    w = Window(items)
    assert [g.n for g in w.groups] == [2, 1]
    feat = Echo(True)
    w.results[:] = [feat.transform(g) for g in w.groups]
    out = list(w.expand())
    assert [type(x).__name__ for x in out] == ["FileStart", "FeatureBatch"] * 3
    assert [x.path.name for x in out[::2]] == ["a", "b", "c"]
    assert [int(x.features[0, 0]) for x in out[1::2]] == [1, 2, 3]
    assert [list(x.meta.extra["obsid"]) for x in out[1::2]] == [[1], [2], [3]]
    assert [x.notes for x in out[1::2]] == [["2 spectra"], ["1 spectra"], []]  # notes with the first piece


def test_split_cuts_every_per_spectrum_array():
    from dataclasses import fields

    parts = [_batch(2, 10, 4000.0, 1), _batch(3, 10, 4000.0, 2)]
    for k, p in enumerate(parts):
        p.meta.rv_kms = np.arange(p.n, dtype=np.float64) + 10 * k
        p.meta.ra = np.full(p.n, 100.0 + k)
    fb = Echo(True).transform(merge(parts))
    a, b = split(fb, [2, 3])
    for piece, orig in ((a, parts[0]), (b, parts[1])):  # every metadata field comes back, row for row
        for f in fields(SpectrumMeta):
            x, y = getattr(piece.meta, f.name), getattr(orig.meta, f.name)
            if isinstance(y, dict):
                assert x.keys() == y.keys() and all(np.array_equal(x[q], y[q]) for q in y), f.name
            else:
                x, y = np.asarray(x), np.asarray(y)
                assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), f.name
    assert a.features.shape == (2, 5) and b.features.shape == (3, 5)
    assert list(b.meta.source_file) == ["f2.fits"] * 3 and list(b.meta.extra["obsid"]) == [2, 2, 2]
    np.testing.assert_array_equal(b.quality["snr"], [2, 3, 4])


def test_windows_leave_large_batches_and_markers_outside_runs_alone():
    big = _batch(40, 10, 4000.0, 9)
    items = [FileStart(Path("x"), None), big, FileStart(Path("y"), None), _batch(1, 10, 4000.0, 1),
             FileStart(Path("z"), None), _batch(1, 10, 4000.0, 2), big]
    out = list(windows(items, small=16, rows=64))
    assert isinstance(out[0], FileStart) and out[1] is big and isinstance(out[2], FileStart)
    assert isinstance(out[3], Window) and [type(x).__name__ for x in out[3].items] == \
        ["SpectrumBatch", "FileStart", "SpectrumBatch"]
    assert out[4] is big and len(out) == 5
    assert sum(isinstance(w, Window) for w in windows([_batch(1, 10, 4000.0, k) for k in range(10)], 16, rows=4)) == 3


@pytest.mark.parametrize("threads", [1, 2])
def test_only_row_independent_featurizers_get_merged_batches(threads):
    items = [_batch(1, 10, 4000.0, k) for k in range(20)] + [_batch(30, 10, 4000.0, 99)]
    plain = Echo(False)
    out_plain = list(transform_stream(plain, items, threads=threads))
    assert sorted(plain.sizes) == sorted([1] * 20 + [30])
    merged = Echo(True)
    out_merged = list(transform_stream(merged, items, threads=threads))
    assert sorted(merged.sizes) == [20, 30]
    assert [x.features.shape[0] for x in out_merged] == [x.features.shape[0] for x in out_plain]
    for a, b in zip(out_plain, out_merged):
        np.testing.assert_array_equal(a.features, b.features)
        assert list(a.meta.ids) == list(b.meta.ids)


def _one_by_one(feat):
    """``feat`` without its ``row_independent`` flag: the stream featurized batch by batch."""
    class Alone:
        thread_safe = True
        name, version, dim = feat.name, feat.version, feat.dim

        def transform(self, batch):
            return feat.transform(batch)

        def prepare(self):
            feat.prepare()
    return Alone()


@pytest.mark.parametrize("threads", [1, 2])
def test_real_one_spectrum_files_featurize_together_as_one_by_one(shared, threads):
    """LAMOST DR10 (several grid lengths), DR1 images and MILES between them, a DESI coadd in the
    middle: the same stream, markers and all, as featurizing each file alone; the same bits
    where velocities are known (LAMOST's Z), to rounding where MILES' are estimated (the
    cross-correlation's BLAS product rounds differently for another batch size)."""
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:24]
    files += sorted((shared / "lamost-dr1" / "spectra").glob("*.fits"))[:6]
    files.insert(10, shared / "desi-edr" / "coadd-sv3-dark-26065.fits")
    files += sorted((shared / "miles" / "spectra").glob("*.fits"))[:6]
    feat = build_featurizer("raw", {})
    seen: list[int] = []
    real = feat.transform
    feat.transform = lambda b: seen.append(b.n) or real(b)  # type: ignore[method-assign]
    together = list(featurize_files(files, feat, threads=threads))
    assert max(seen) > 8  # files were merged
    alone = list(featurize_files(files, _one_by_one(feat), threads=threads))
    assert len(together) == len(alone) == 2 * len(files)
    n_exact = 0
    for a, b in zip(alone, together):
        assert type(a) is type(b)
        if isinstance(a, FileStart):
            assert a.path == b.path
            continue
        assert list(a.meta.ids) == list(b.meta.ids) and list(a.meta.source_file) == list(b.meta.source_file)
        np.testing.assert_array_equal(b.quality["flags"], a.quality["flags"])
        if a.meta.survey == "lamost" or a.meta.survey == "desi":
            n_exact += 1
            np.testing.assert_array_equal(b.features, a.features)
            np.testing.assert_array_equal(b.ivar, a.ivar)
            np.testing.assert_array_equal(b.quality["snr"], a.quality["snr"])
            continue
        np.testing.assert_allclose(b.features, a.features, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.ivar, a.ivar, rtol=1e-4)
        np.testing.assert_allclose(b.quality["snr"], a.quality["snr"], rtol=1e-5)
        np.testing.assert_allclose(b.quality["rv_kms"], a.quality["rv_kms"], atol=1e-3)
    assert n_exact == 31
