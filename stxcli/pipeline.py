"""Survey files -> feature batches: input expansion, reader identification, featurization,
optional worker processes, and joining a labels catalog. Knows no concrete survey."""

from __future__ import annotations

import gc
import os
import sys
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import StxError, UsageError
from .modelfile import sha256_file  # noqa: F401 - re-exported (encoder files, label catalogs)
from .protocols import FeatureBatch, Featurizer
from .registry import get_registry, identify
from .spectra import SpectrumBatch

LIST_SUFFIXES = (".txt", ".lst", ".list")


def _known_extensions() -> tuple[str, ...]:
    exts: set[str] = set()
    for reader in get_registry().readers():
        exts.update(e.lower() for e in getattr(reader, "extensions", ()))
    return tuple(sorted(exts)) or (".fits", ".fits.gz", ".fit")


def expand_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files, directories (searched recursively for files with a known extension) and text files
    listing one path per line (relative to the list's folder). Order kept, duplicates dropped."""
    out: list[Path] = []
    seen: set[Path] = set()
    exts = None
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise StxError(f"{p}: no such file or directory")
        if p.is_dir():
            exts = exts or _known_extensions()
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.name.lower().endswith(exts))
            if not found:
                raise StxError(f"{p}: directory holds no spectrum files ({', '.join(exts)})")
            cands = found
        elif p.suffix.lower() in LIST_SUFFIXES:
            cands = []
            for line in p.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    q = Path(line) if Path(line).is_absolute() else p.parent / line
                    if not q.exists():
                        raise StxError(f"{p}: listed file {line} does not exist")
                    cands.append(q)
        else:
            cands = [p]
        for q in cands:
            key = q.resolve()
            if key not in seen:
                seen.add(key)
                out.append(q)
    if not out:
        raise UsageError("no input files given")
    return out


def build_featurizer(name: str, config: dict[str, Any] | None = None) -> Featurizer:
    factory = get_registry().get("featurizer", name)
    try:
        return factory(**(config or {}))
    except TypeError as exc:
        raise UsageError(f"featurizer {name!r}: bad configuration ({exc})") from exc


#: the digest a feature store records for each input file (``inputs[i]["xxh3_128"]``)
INPUT_DIGEST = "xxh3_128"


def input_digest(path: Path, block: int = 16 << 20) -> str:
    """XXH3-128 of a survey file's bytes, as hex (python-xxhash's ``xxh3_128().hexdigest()``).

    The digest only has to tell whether an input changed (provenance, resume); a 128-bit
    non-cryptographic hash does that at ~20 GB/s, where sha256 (~1.7 GB/s) cost a third of
    featurizing DESI coadds (a 500-spectrum coadd is 223 MB, mostly resolution matrices)."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileResult:
    """One featurized file. ``batches`` is a list from a worker process, or a lazy iterator in
    the calling process (memory stays one batch deep for files of any size); iterate it once."""

    path: Path
    digest: str  # input_digest() of the file
    reader: str
    batches: Iterable[FeatureBatch]


RvLookup = dict[str, float]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: the most transform threads chosen by default: each holds a batch of raw spectra in flight
#: (~100 MB for 256 DESI spectra), and past a few threads the GIL-held steps limit the gain
MAX_DEFAULT_THREADS = 8


def default_threads(workers: int = 1) -> int:
    """Transform threads per process when not given: the usable cores shared by ``workers``, at
    most :data:`MAX_DEFAULT_THREADS`."""
    return max(1, min(MAX_DEFAULT_THREADS, usable_cores() // max(1, workers)))


def _read_batches(path: Path, reader: Any, featurizer: Featurizer, chunk_size: int,
                  rv_lookup: RvLookup | None) -> Iterator[SpectrumBatch]:
    """The file's batches from ``reader``, checked, with catalog velocities filled in."""
    for batch in reader.read(path, chunk_size=chunk_size,
                             with_resolution=bool(getattr(featurizer, "needs_resolution", False))):
        try:
            batch.validate()
        except ValueError as exc:
            raise StxError(f"{path}: reader {reader.name} produced an invalid batch ({exc})") from exc
        if rv_lookup:
            ids = batch.meta.ids
            rv = np.array([rv_lookup.get(str(i), np.nan) for i in ids], dtype=np.float64)
            have = np.isfinite(rv)
            batch.meta.rv_kms = np.where(have, rv, batch.meta.rv_kms)
        yield batch


def _transform(featurizer: Featurizer, batch: SpectrumBatch) -> FeatureBatch:
    with _single_threaded_blas():  # per batch, not across a yield: the consumer keeps its threads
        return featurizer.transform(batch)


def _pooled_transform(featurizer: Featurizer, batch: SpectrumBatch) -> FeatureBatch:
    return featurizer.transform(batch)  # BLAS limited by transform_stream, in the caller's thread


#: batches of fewer spectra are transformed in the calling thread, not on the pool: for files of
#: one spectrum (LAMOST, MILES) the hand-over and the GIL made 2 threads slower than 1 (143 against
#: 164-190 files/s on LAMOST DR10)
MIN_POOLED_ROWS = 16


@dataclass
class _Running:
    """A window of small batches in :func:`transform_stream`'s queue, with its groups' futures."""

    window: Any  # stxcli.coalesce.Window
    futures: list[Any]  # concurrent.futures.Future, one per group


def transform_stream(featurizer: Featurizer, items: Iterable[Any], threads: int = 1) -> Iterator[Any]:
    """Each :class:`SpectrumBatch` of ``items`` replaced by its features, in order; anything else
    passes through. With ``threads > 1`` and a ``thread_safe`` featurizer, up to ``threads``
    batches are transformed at once on a thread pool (numpy releases the GIL in the heavy steps)
    while the caller's thread reads the next batch and consumes the results; the output is the
    same, in the same order. Memory: ``threads + 1`` batches in flight instead of one.

    For a ``row_independent`` featurizer, runs of batches of fewer than :data:`MIN_POOLED_ROWS`
    spectra (one-spectrum files) are featurized together, in :class:`~stxcli.coalesce.Window` s
    of about :data:`~stxcli.coalesce.WINDOW_ROWS` spectra, and cut back into the original
    batches (:mod:`stxcli.coalesce`); the groups of a window go to the pool like any batch."""
    from .coalesce import Window, windows

    if getattr(featurizer, "row_independent", False):
        items = windows(items, MIN_POOLED_ROWS)
    if threads <= 1 or not getattr(featurizer, "thread_safe", False):
        with long_lived_frozen():
            for it in items:
                if isinstance(it, Window):
                    it.results[:] = [_transform(featurizer, g) for g in it.groups]
                    yield from it.expand()
                else:
                    yield _transform(featurizer, it) if isinstance(it, SpectrumBatch) else it
        return
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    prepare = getattr(featurizer, "prepare", None)
    if callable(prepare):
        prepare()  # shared caches built once, not raced for by the first batches
    pending: deque[Any] = deque()
    pooled: set[Future] = set()  # the futures still on the pool (not those done inline)

    def start(batch: SpectrumBatch) -> Future:
        if batch.n >= MIN_POOLED_ROWS:
            fut = ex.submit(_pooled_transform, featurizer, batch)
            pooled.add(fut)
            return fut
        done: Future = Future()  # a few spectra: handing them over costs more
        done.set_result(_pooled_transform(featurizer, batch))
        return done

    def running(x: Any) -> bool:
        if isinstance(x, _Running):
            return any(f in pooled for f in x.futures)
        return isinstance(x, Future) and x in pooled

    def hand_over(x: Any) -> Iterator[Any]:
        if isinstance(x, _Running):
            pooled.difference_update(x.futures)
            x.window.results[:] = [f.result() for f in x.futures]
            yield from x.window.expand()
        elif isinstance(x, Future):
            pooled.discard(x)
            yield x.result()
        else:
            yield x

    # OpenBLAS at 1 thread while the pool runs (its setting is process-wide), set here once: the
    # caller's code between results then also sees BLAS at 1 thread, while OpenMP (torch in
    # stx predict) keeps its threads
    with long_lived_frozen(), _single_threaded_blas(user_api="blas"), \
            ThreadPoolExecutor(threads, thread_name_prefix="stx-featurize") as ex:
        try:
            for it in items:
                if isinstance(it, Window):
                    pending.append(_Running(it, [start(g) for g in it.groups]))
                elif isinstance(it, SpectrumBatch):
                    pending.append(start(it))
                else:
                    pending.append(it)
                # hand over, in order: anything at the head that is not still on the pool, and pool
                # results (waiting for them) while more than ``threads`` run or too much is queued
                while pending and (len(pooled) > threads or len(pending) > threads + 1 or not running(pending[0])):
                    yield from hand_over(pending.popleft())
            while pending:
                yield from hand_over(pending.popleft())
        finally:  # an error or an abandoned generator: no thread keeps working on freed data
            for x in pending:
                for f in x.futures if isinstance(x, _Running) else [x]:
                    if isinstance(f, Future):
                        f.cancel()


def featurize_file(path: Path, featurizer: Featurizer, *, format: str | None = None,
                   chunk_size: int = 1024, rv_lookup: RvLookup | None = None,
                   reader: Any = None, threads: int = 1) -> Iterator[FeatureBatch]:
    """Read one file with its identified reader (or ``reader``, already identified: probing a
    file parses all its headers, tens of ms for a DESI coadd) and featurize it batch by batch,
    ``threads`` batches at a time (:func:`transform_stream`).

    BLAS runs single-threaded while featurizing: results then do not depend on the thread count
    (one process, threads, a pool or a Dask cluster give identical stores), and N workers on N
    cores do not each start N threads."""
    if reader is None:
        reader = identify(path, get_registry(), format)
    _keep_freed_memory()
    yield from transform_stream(featurizer, _read_batches(path, reader, featurizer, chunk_size, rv_lookup),
                                threads)


@dataclass
class FileStart:
    """Marks where a file's batches begin in :func:`featurize_files`' stream."""

    path: Path
    reader: Any


def featurize_files(paths: Sequence[Path], featurizer: Featurizer, *, format: str | None = None,
                    chunk_size: int = 1024, rv_lookup: RvLookup | None = None,
                    threads: int = 1, readers: dict[Path, Any] | None = None
                    ) -> Iterator[FileStart | FeatureBatch]:
    """All files' feature batches as one stream, each file's preceded by its :class:`FileStart`:
    with threads the pool keeps working across file boundaries (files of a few batches, or of
    one spectrum, do not drain it). ``readers``: files already identified (a DESI coadd's probe
    parses ~20 headers), used when ``format`` is not given."""
    _keep_freed_memory()

    def items() -> Iterator[Any]:
        reg = get_registry()
        for p in paths:
            known = None if format is not None or readers is None else readers.get(Path(p))
            reader = known if known is not None else identify(p, reg, format)
            yield FileStart(Path(p), reader)
            yield from _read_batches(Path(p), reader, featurizer, chunk_size, rv_lookup)

    return transform_stream(featurizer, items(), threads)


_asset_dirs: ContextVar[tuple[Path, ...]] = ContextVar("stx_asset_dirs", default=())


def asset_dirs() -> tuple[Path, ...]:
    """Folders a featurizer searches for the files its config names (an encoder directory,
    found by its recorded sha256) when they are not where the config says: while the core
    rebuilds a model's featurizers, that model directory's ``assets/`` (:func:`searching_assets`)."""
    return _asset_dirs.get()


@contextmanager
def searching_assets(dirs: Sequence[Path]) -> Iterator[None]:
    """:func:`asset_dirs` gives ``dirs`` (first) inside the block."""
    token = _asset_dirs.set(tuple(Path(d) for d in dirs) + _asset_dirs.get())
    try:
        yield
    finally:
        _asset_dirs.reset(token)


_blas_state: dict[str, Any] = {}
_malloc_state: dict[str, bool] = {}
_frozen = {"depth": 0}
_frozen_lock = threading.Lock()


@contextmanager
def long_lived_frozen() -> Iterator[None]:
    """Python's cyclic garbage collector leaves alone the objects that exist on entry, until the
    outermost such block exits (``gc.freeze``/``gc.unfreeze``). The modules a run imports (torch,
    astropy, numba: some 300,000 objects) are otherwise traversed by every full collection that
    a streaming run's allocations trigger: 90 ms each, about 8 % of stx predict from DESI coadds.
    Objects made inside are collected as usual; old objects that become cyclic garbage inside
    wait for the exit."""
    with _frozen_lock:
        _frozen["depth"] += 1
        if _frozen["depth"] == 1:
            gc.freeze()
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen["depth"] -= 1
            if _frozen["depth"] == 0:
                gc.unfreeze()


def _keep_freed_memory() -> None:
    """Once per process, on glibc: serve allocations below 32 MB from the heap and trim it only
    above 256 MB free. By default glibc maps every array above its (adaptive) threshold with mmap
    and unmaps it on free, and trims the heap top soon after, so each batch's temporaries (a few
    MB each) are page-faulted and zeroed by the kernel again: 15-20 % of featurizing time on a
    DESI coadd. The cost is that up to 256 MB of freed memory stays with the process. (Setting the
    trim threshold alone would be worse: any setting freezes the adaptive mmap threshold at 128
    kB.) Elsewhere a no-op."""
    if _malloc_state or not sys.platform.startswith("linux"):
        return
    _malloc_state["done"] = True
    import ctypes
    import platform

    if platform.libc_ver()[0] != "glibc":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)
    mallopt(m_trim_threshold, 256 << 20)


@contextmanager
def _single_threaded_blas(user_api: str | None = None) -> Iterator[None]:
    """``threadpoolctl``'s limit to 1 thread (of ``user_api``, None = BLAS and OpenMP), from a
    controller kept between batches: building one scans every loaded shared library (1.5-15 ms,
    per batch before), so it is rebuilt only when Python modules were imported since (the way a
    native library gets loaded, e.g. torch by a featurizer on first use). Set and restored by the
    same thread: OpenBLAS's setting is process-wide, and restoring it from another thread of a
    pool was seen to leave it at 1 (OpenBLAS 0.3.30/0.3.31)."""
    from threadpoolctl import ThreadpoolController

    n_modules = len(sys.modules)
    if _blas_state.get("n_modules") != n_modules:
        _blas_state["controller"] = ThreadpoolController()
        _blas_state["n_modules"] = len(sys.modules)
    limiter = _blas_state["controller"].limit(limits=1, user_api=user_api)
    try:
        yield
    finally:
        limiter.restore_original_limits()


# ------------------------------------------------------------------------------ worker processes

_worker_state: dict[str, Any] = {}


def _init_worker(name: str, config: dict[str, Any], format: str | None, chunk_size: int,
                 rv_lookup: RvLookup | None, inherited: bool = False, threads: int = 1) -> None:
    """Build this process's featurizer, or (``inherited``: a forked worker) keep the one the parent
    built and prepared before forking."""
    _worker_state.update(format=format, chunk_size=chunk_size, rv_lookup=rv_lookup, threads=threads)
    if inherited and _worker_state.get("featurizer") is not None:
        return
    _worker_state["featurizer"] = build_featurizer(name, config)


def _prepare_for_fork(first: Path, format: str | None) -> None:
    """Do once, before forking, what every worker would otherwise do on its first file: import
    the reader's dependencies (identifying a file imports astropy) and let the featurizer build
    what does not depend on the input (an optional ``prepare()``: the raw featurizer's continuum
    basis and RV templates, and its scipy imports; a featurizer that starts threads, e.g. torch,
    must not do that here). Errors are left to the worker that meets the file."""
    try:
        identify(first, get_registry(), format)
    except StxError:
        pass
    prepare = getattr(_worker_state["featurizer"], "prepare", None)
    if callable(prepare):
        prepare()


#: a worker process's task: consecutive files up to this many, or this many input bytes (a
#: large file is a task of its own). One file per task left one-spectrum files (LAMOST) unmerged:
#: 2 processes featurized 272 files/s where one process, merging them, did 620.
GROUP_FILES = 64
GROUP_BYTES = 64 << 20


def file_groups(paths: Sequence[Path], max_files: int = GROUP_FILES, max_bytes: int = GROUP_BYTES
                ) -> Iterator[list[Path]]:
    """``paths`` cut, in order, into runs of at most ``max_files`` files and about ``max_bytes``
    (a file that reaches it alone is a run of its own; a file that cannot be read counts as
    large, and its error comes from the worker that meets it). Lazy: the pool's feeder thread
    stats the files while the workers run (one stat a file; on a network file system that is
    not free)."""
    cur: list[Path] = []
    size = 0
    for p in paths:
        try:
            n = os.stat(p).st_size
        except OSError:
            n = max_bytes
        if cur and (len(cur) >= max_files or size + n > max_bytes):
            yield cur
            cur, size = [], 0
        cur.append(Path(p))
        size += n
    if cur:
        yield cur


def _run_group(paths: list[Path]) -> list[FileResult]:
    """A worker process's task: consecutive files featurized as one stream (one-spectrum files
    merge into batches, :func:`transform_stream`), returned file by file, in full."""
    st = _worker_state
    stream = featurize_files(paths, st["featurizer"], format=st["format"], chunk_size=st["chunk_size"],
                             rv_lookup=st["rv_lookup"], threads=st["threads"])
    return [FileResult(r.path, r.digest, r.reader, list(r.batches)) for r in file_results(stream)]


def file_results(stream: Iterator[Any]) -> Iterator[FileResult]:
    """:func:`featurize_files`' stream as one :class:`FileResult` per file, whose lazy
    ``batches`` run up to the next :class:`FileStart` (drained here if the caller did not)."""
    head = next(stream, None)
    while head is not None:
        start: FileStart = head
        state: dict[str, Any] = {"next": None, "done": False}

        def batches(state: dict[str, Any] = state) -> Iterator[FeatureBatch]:
            for item in stream:
                if isinstance(item, FileStart):
                    state["next"] = item
                    break
                yield item
            state["done"] = True

        gen = batches()
        yield FileResult(start.path, input_digest(start.path), start.reader.name, gen)
        if not state["done"]:
            for _ in gen:
                pass
        head = state["next"]


def map_files(paths: Sequence[Path], featurizer_name: str, featurizer_config: dict[str, Any], *,
              format: str | None = None, chunk_size: int = 1024, workers: int = 1,
              rv_lookup: RvLookup | None = None, threads: int = 1) -> Iterator[FileResult]:
    """Featurize files in input order, in ``workers`` processes (1 = this process), each
    transforming ``threads`` batches at a time; a worker takes consecutive files at a time
    (:func:`file_groups`)."""
    if workers <= 1:
        _init_worker(featurizer_name, featurizer_config, format, chunk_size, rv_lookup, threads=threads)
        yield from file_results(featurize_files(paths, _worker_state["featurizer"], format=format,
                                            chunk_size=chunk_size, rv_lookup=rv_lookup, threads=threads))
        return
    import multiprocessing as mp

    fork = hasattr(os, "fork")
    ctx = mp.get_context("fork" if fork else "spawn")
    if fork and paths:
        _init_worker(featurizer_name, featurizer_config, format, chunk_size, rv_lookup, threads=threads)
        _prepare_for_fork(Path(paths[0]), format)
    with ctx.Pool(workers, initializer=_init_worker,
                  initargs=(featurizer_name, featurizer_config, format, chunk_size, rv_lookup, fork,
                            threads)) as pool:
        for results in pool.imap(_run_group, file_groups(paths), chunksize=1):
            yield from results


def iter_feature_batches(paths: Sequence[Path], featurizer: Featurizer, *, format: str | None = None,
                         chunk_size: int = 1024) -> Iterator[tuple[Path, FeatureBatch]]:
    """Stream (path, FeatureBatch) over files in this process, with flat memory."""
    for p in paths:
        for fb in featurize_file(p, featurizer, format=format, chunk_size=chunk_size):
            yield p, fb


# -------------------------------------------------------------------------------- label catalogs


def read_catalog(path: str | os.PathLike[str], id_column: str, columns: Sequence[str], *,
                 by_file: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Catalog keys (ids as exact text, or file base names) and float64 columns.

    Column names are case-insensitive. A missing id or value column, or a duplicate id, is an
    error naming the catalog."""
    from .tables import read_table

    table = read_table(Path(path))
    keys = table.ids(id_column.lower(), "catalog")
    if by_file:
        keys = np.array([os.path.basename(k) for k in keys])
    values = {}
    for c in columns:
        v = table.numeric(c.lower())
        if v is None:
            what = "not numeric" if c.lower() in table.columns else "not found"
            raise StxError(f"{path}: label column {c!r} {what} (columns: {', '.join(table.columns)})")
        values[c] = v
    uniq, counts = np.unique(keys, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        raise StxError(f"{path}: {len(dup)} duplicate id(s) in column {id_column!r}, e.g. {dup[0]}")
    return keys, values


def join_labels(ids: np.ndarray, source_files: np.ndarray, keys: np.ndarray,
                values: dict[str, np.ndarray], *, by_file: bool) -> tuple[dict[str, np.ndarray], int]:
    """Label arrays (float32, NaN where absent) aligned to the store rows, and the match count."""
    from .tables import join_ids

    rows = (np.array([os.path.basename(str(f)) for f in source_files]) if by_file
            else np.asarray(ids).astype(str))
    row_idx, cat_idx = join_ids(rows, keys)
    out = {}
    for c, v in values.items():
        col = np.full(len(rows), np.nan, np.float32)
        col[row_idx] = v[cat_idx]
        out[c] = col
    return out, int(len(row_idx))
