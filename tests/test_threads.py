"""Featurizing with threads (``stx featurize --threads``, ``pipeline.transform_stream``): the same
features in the same order as one thread, errors surface, BLAS limits are restored, and a
featurizer that does not declare itself thread-safe is never called from two threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from stxcli import pipeline
from stxcli.cli.featurize import run_featurize
from stxcli.pipeline import FileStart, build_featurizer, featurize_file, featurize_files, transform_stream
from stxcli.protocols import FeatureBatch
from stxcli.store import FeatureStore

from conftest import interrupt_input_digest, run_cli


@pytest.fixture(scope="module")
def mixed_files(shared):
    """A DESI coadd (several batches at chunk 2) between one-spectrum LAMOST files."""
    lam = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:3]
    desi = shared / "desi-edr" / "coadd-sv3-dark-26065.fits"
    return [lam[0], desi, lam[1], lam[2]]


def _stream(paths, threads, chunk=2):
    feat = build_featurizer("raw", {})
    out = []
    for item in featurize_files(paths, feat, chunk_size=chunk, threads=threads):
        out.append(("file", item.path.name) if isinstance(item, FileStart) else item)
    return out


def test_threads_give_the_same_stream_as_one(mixed_files):
    one = _stream(mixed_files, 1)
    many = _stream(mixed_files, 3)
    assert len(one) == len(many) and len(one) > len(mixed_files) + 2  # the coadd is several batches
    for a, b in zip(one, many):
        if isinstance(a, tuple):
            assert a == b
            continue
        assert isinstance(b, FeatureBatch)
        assert list(a.meta.ids) == list(b.meta.ids)
        np.testing.assert_array_equal(a.features, b.features)
        np.testing.assert_array_equal(a.ivar, b.ivar)
        for k in a.quality:
            np.testing.assert_array_equal(a.quality[k], b.quality[k])
    assert [x for x in one if isinstance(x, tuple)] == [("file", p.name) for p in mixed_files]


def test_store_does_not_depend_on_threads(mixed_files, tmp_path, capsys):
    sums = {}
    for t in (1, 2):
        out = tmp_path / f"t{t}.h5"
        code, o, err = run_cli(["featurize", *mixed_files, "-o", out, "--threads", t, "--chunk-size", 3,
                                "--json", "-q"], capsys)
        assert code == 0, err
        import json

        summary = json.loads(o)
        assert summary["threads"] == t and summary["workers"] == 1
        sums[t] = summary["checksum"]
        with FeatureStore.open(out) as st:
            assert st.checksum == summary["checksum"]
    assert sums[1] == sums[2]


def test_threads_must_be_positive(mixed_files, tmp_path, capsys):
    code, _, err = run_cli(["featurize", mixed_files[0], "-o", tmp_path / "x.h5", "--threads", 0], capsys)
    assert code == 2 and "--threads must be >= 1" in err
    assert not (tmp_path / "x.h5").exists()


def test_default_threads_share_the_cores_among_workers(monkeypatch):
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 8)
    assert pipeline.default_threads(1) == 8
    assert pipeline.default_threads(3) == 2
    assert pipeline.default_threads(16) == 1
    monkeypatch.setattr(pipeline, "usable_cores", lambda: 64)
    assert pipeline.default_threads(1) == pipeline.MAX_DEFAULT_THREADS == 8


class _Batchy:
    """Stands in for a SpectrumBatch-consuming featurizer: records the calling threads."""

    name, version, needs_resolution = "batchy", "0", False

    def __init__(self, thread_safe, fail_at=None):
        self.thread_safe = thread_safe
        self.fail_at = fail_at
        self.threads: set[int] = set()
        self.calls = 0
        self.lock = threading.Lock()

    def transform(self, batch):
        with self.lock:
            self.calls += 1
            k = self.calls
        self.threads.add(threading.get_ident())
        if self.fail_at is not None and k == self.fail_at:
            raise ValueError(f"batch {k} is bad")
        return batch.meta.source_row.copy()


def _batches(shared, n_rows=12, chunk=2):
    from stxcli.registry import get_registry

    reader = get_registry().get("reader", "desi")
    path = shared / "desi-edr" / "coadd-sv3-dark-26065.fits"
    return list(reader.read(path, chunk_size=chunk)), path


def test_not_thread_safe_runs_inline(shared):
    batches, _ = _batches(shared)
    feat = _Batchy(thread_safe=False)
    out = list(transform_stream(feat, batches, threads=4))
    assert feat.threads == {threading.get_ident()}
    np.testing.assert_array_equal(np.concatenate(out), np.concatenate([b.meta.source_row for b in batches]))


def test_thread_safe_runs_on_the_pool_in_order(shared, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_POOLED_ROWS", 1)  # the real files' batches are small
    batches, _ = _batches(shared, chunk=1)
    feat = _Batchy(thread_safe=True)
    items = ["start", *batches, "middle", *batches, "end"]
    out = list(transform_stream(feat, items, threads=3))
    assert threading.get_ident() not in feat.threads and len(feat.threads) >= 1
    assert out[0] == "start" and out[len(batches) + 1] == "middle" and out[-1] == "end"
    rows = [b.meta.source_row for b in batches]
    for got, want in zip(out[1:len(batches) + 1] + out[len(batches) + 2:-1], rows + rows):
        np.testing.assert_array_equal(got, want)


def test_small_batches_stay_in_the_calling_thread_and_in_order(shared, monkeypatch):
    monkeypatch.setattr(pipeline, "MIN_POOLED_ROWS", 2)
    big, _ = _batches(shared, chunk=2)  # batches of 2, 2 and 1 spectra
    small = [b for b in big if b.n < 2]
    assert small and len(small) < len(big)
    feat = _Batchy(thread_safe=True)
    items = [*big, "x", *big]
    out = list(transform_stream(feat, items, threads=2))
    assert len(out) == len(items) and out[len(big)] == "x"
    rows = [b.meta.source_row for b in big]
    for got, want in zip(out[:len(big)] + out[len(big) + 1:], rows + rows):
        np.testing.assert_array_equal(got, want)
    assert threading.get_ident() in feat.threads and len(feat.threads) >= 2  # the pool did the rest


def test_queue_stays_bounded_behind_a_slow_pool_batch(shared, monkeypatch):
    """Inline results behind a batch still on the pool do not pile up: when the first result is
    handed over, at most threads + 2 items have been taken from the input (flat memory over a
    survey of one-spectrum files)."""
    import time

    monkeypatch.setattr(pipeline, "MIN_POOLED_ROWS", 2)
    big, _ = _batches(shared, chunk=2)
    first, small = big[0], [b for b in big if b.n == 1] * 40

    class Slow(_Batchy):
        def transform(self, batch):
            if batch.n >= 2:
                time.sleep(0.2)
            return super().transform(batch)

    taken = []

    def items():
        for i, b in enumerate([first, *small]):
            taken.append(i)
            yield b

    gen = transform_stream(Slow(thread_safe=True), items(), threads=2)
    np.testing.assert_array_equal(next(gen), first.meta.source_row)
    assert len(taken) <= 2 + 2
    assert len(list(gen)) == 40


def test_an_error_in_a_thread_surfaces_in_order(shared):
    batches, _ = _batches(shared, chunk=1)
    feat = _Batchy(thread_safe=True, fail_at=3)
    got = []
    with pytest.raises(ValueError, match="batch 3 is bad"):
        for x in transform_stream(feat, batches, threads=2):
            got.append(x)
    assert len(got) == 2  # the two batches before the bad one, nothing after it


def _blas_threads():
    from threadpoolctl import threadpool_info

    return {(i["filepath"], i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}


class _BlasSpy(_Batchy):
    def transform(self, batch):
        self.seen = getattr(self, "seen", []) + [{n for _, n in _blas_threads()}]
        return super().transform(batch)


def test_blas_at_one_thread_in_the_pool_and_restored_after(shared):
    from threadpoolctl import threadpool_limits

    batches, _ = _batches(shared, chunk=1)
    with threadpool_limits(limits=2, user_api="blas"):  # a known starting point on any machine
        before = _blas_threads()
        for threads in (1, 3):
            feat = _BlasSpy(thread_safe=True)
            out = list(transform_stream(feat, batches, threads=threads))
            assert len(out) == len(batches)
            assert feat.seen and all(s == {1} for s in feat.seen)
            assert _blas_threads() == before  # restored, also after the pool's threads


def test_featurize_file_threads_equal(shared):
    feat = build_featurizer("raw", {})
    path = shared / "desi-edr" / "coadd-sv3-dark-26065.fits"
    a = np.concatenate([fb.features for fb in featurize_file(path, feat, chunk_size=2)])
    b = np.concatenate([fb.features for fb in featurize_file(path, feat, chunk_size=2, threads=2)])
    np.testing.assert_array_equal(a, b)


def test_interrupted_threaded_run_resumes(tmp_path, shared, monkeypatch):
    from stxcli import console

    console.set_quiet(True)
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits.gz"))[:5]
    args = [str(p) for p in files]
    clean = run_featurize(args, tmp_path / "clean.h5", threads=1)
    calls = interrupt_input_digest(monkeypatch, at=3)
    out = tmp_path / "t.h5"
    with pytest.raises(KeyboardInterrupt):
        run_featurize(args, out, threads=3)
    calls["n"] = 10  # no more interruptions
    again = run_featurize(args, out, threads=3)
    assert again["checksum"] == clean["checksum"]


def test_many_one_spectrum_files_in_one_process_equal_worker_processes(shared, tmp_path, capsys):
    """One process merges consecutive one-spectrum files into batches (stxcli.coalesce), and so
    does each worker process within its task of consecutive files: the stores are the same bytes
    (LAMOST's velocities are in its headers), and no hint sends users to --workers."""
    import json

    files = sorted((shared / "lamost-dr10-train" / "spectra").glob("*.fits*"))[:70]
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(str(p) for p in files))
    sums = []
    for extra in ([], ["--workers", 2]):
        code, out, err = run_cli(["featurize", lst, "-o", tmp_path / f"s{len(extra)}.h5", "--json", *extra], capsys)
        assert code == 0, err
        assert "--workers" not in err
        sums.append(json.loads(out)["checksum"])
    assert sums[0] == sums[1]


class _GcSpy(_Batchy):
    def transform(self, batch):
        import gc

        self.frozen = getattr(self, "frozen", []) + [gc.get_freeze_count() > 0]
        return super().transform(batch)


def test_transforms_run_with_the_old_objects_frozen_and_thawed_after(shared):
    """The cyclic GC skips the objects that existed before the stream (torch's, astropy's) while
    it runs, and gets them back after; nested streams thaw only at the outermost exit."""
    import gc

    batches, _ = _batches(shared, chunk=1)
    assert gc.get_freeze_count() == 0
    for threads in (1, 3):
        feat = _GcSpy(thread_safe=True)
        out = list(transform_stream(feat, batches, threads=threads))
        assert len(out) == len(batches) and feat.frozen and all(feat.frozen)
        assert gc.get_freeze_count() == 0
    with pipeline.long_lived_frozen():
        frozen = gc.get_freeze_count()
        assert frozen > 0
        with pipeline.long_lived_frozen():
            junk = [[]]
            junk[0].append(junk)  # a cycle made inside is still collected inside
            del junk
            assert gc.collect() >= 1
        assert gc.get_freeze_count() == frozen  # the inner exit did not thaw
    assert gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError), pipeline.long_lived_frozen():
        raise RuntimeError("boom")
    assert gc.get_freeze_count() == 0


def test_file_groups_cut_the_inputs_in_order_by_count_and_size(tmp_path):
    sizes = [10, 10, 10, 50, 10, 200, 10, 10]
    paths = []
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}.fits"
        p.write_bytes(b"x" * n)
        paths.append(p)
    paths.insert(5, tmp_path / "missing.fits")  # unreadable: counted as large, alone
    groups = list(pipeline.file_groups(paths, max_files=3, max_bytes=60))
    assert [[p.name for p in g] for g in groups] == [
        ["f0.fits", "f1.fits", "f2.fits"],  # three files: the count
        ["f3.fits", "f4.fits"],  # 50 + 10 = 60 bytes: the size
        ["missing.fits"],
        ["f5.fits"],  # larger than a group: alone
        ["f6.fits", "f7.fits"],
    ]
    assert list(pipeline.file_groups([])) == []


def test_a_worker_task_featurizes_its_files_as_one_stream(shared, monkeypatch):
    """A worker process's task (here run in this process) merges its one-spectrum files into
    batches as one process does, and hands back one result per file, in order, each with its
    own rows."""
    files = sorted((shared / "lamost-dr10-train" / "spectra").glob("*.fits*"))[:12]
    pipeline._init_worker("raw", {}, None, 1024, None)
    feat = pipeline._worker_state["featurizer"]
    sizes: list[int] = []
    real = feat.transform

    def spy(batch):
        sizes.append(batch.n)
        return real(batch)

    monkeypatch.setattr(feat, "transform", spy)
    results = pipeline._run_group(files)
    merged = list(sizes)
    sizes.clear()
    list(featurize_files(files, feat, chunk_size=1024))  # one process over the same files
    assert merged == sizes and sum(merged) == 12 and len(merged) < 6  # windows by layout: [9, 2, 1]
    assert [r.path for r in results] == files
    for r in results:
        assert isinstance(r.batches, list) and sum(fb.features.shape[0] for fb in r.batches) == 1
        assert all(fb.meta.source_file[0] == str(r.path) for fb in r.batches)
