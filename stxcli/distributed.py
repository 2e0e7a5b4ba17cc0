"""The optional Dask backend: run ``stx featurize`` (and the same machinery for ``stx predict``)
over a ``dask.distributed`` cluster.

How a run works
---------------
1. The input files (already expanded, in input order) are cut into *partitions*: contiguous runs
   of ``files_per_part`` files, so partition ``i`` precedes partition ``i + 1`` in the output.
2. Each partition is one Dask task. The worker featurizes its files and writes its own *part*
   (a complete feature store) atomically into the parts folder beside the output,
   ``.<output name>.parts/part-000012.h5``. The folder must be visible to every worker (on a
   multi-machine cluster: a shared file system).
3. A part carries a *part key*: the sha256 of the job (featurizer identity, reader options) and of
   its files (resolved path, size, modification time). A rerun reuses every part whose key matches
   (resume after an interruption) and recomputes the rest.
4. A partition that fails with an unexpected error (a lost worker, a flaky file system, memory) is
   resubmitted up to ``retries`` times, with a warning each time. A :class:`StxError` (a bad input
   file, a wrong option) fails the same way every time, so it is not retried: the run stops with
   that error; finished parts are kept for the rerun.
5. As partitions finish (``as_completed``), the client appends every part whose predecessors are
   all done to the combined store, in partition order, then joins labels, computes the checksum and
   renames the result onto the output (atomic). The rows, ids, features, metadata, labels and the
   ``inputs`` attribute equal those of the single-process run. The parts folder is removed.

Nothing here imports dask at module level; ``stx`` imports this module only when ``--dask`` is
given. Dask is the optional extra ``stx[dask]``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import console
from .errors import StxError, UsageError

#: Test hook: comma-separated partition indices that fail once (with a RuntimeError) before they
#: succeed; read by the client and handed to the tasks, so it works on any cluster.
FAIL_ONCE_ENV = "STX_DASK_FAIL_ONCE"
INSTALL_HINT = "pip install 'stx[dask]'"
#: Parts per partition are chosen from the number of files only (never from the cluster size),
#: so a rerun on a different cluster still finds its finished parts.
TARGET_PARTITIONS = 64
MAX_FILES_PER_PART = 64


# ------------------------------------------------------------------------------------ the cluster

#: Environment of local worker processes. Dask's default also sets MALLOC_TRIM_THRESHOLD_=65536,
#: which turns off glibc's adaptive mmap threshold: every large numpy temporary is then a fresh
#: mmap, and featurizing costs 2-2.7x the CPU (measured on the raw featurizer, DESI coadds). One
#: BLAS/OpenMP thread per worker process is kept (one task thread each: no oversubscription).
WORKER_ENV = {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1}


@dataclass(frozen=True)
class DaskTarget:
    """Where to run: a scheduler ``address``, or a LocalCluster of ``n_workers`` (None = one per
    core) when ``address`` is None."""

    address: str | None
    n_workers: int | None = None

    def describe(self) -> str:
        if self.address is not None:
            return self.address
        return f"local:{self.n_workers}" if self.n_workers else "local"


def parse_target(spec: str) -> DaskTarget:
    """``local``, ``local:N`` or a scheduler address (``tcp://host:8786``, ``host:8786``)."""
    s = str(spec).strip()
    if not s:
        raise UsageError("--dask expects a scheduler address or local[:N]")
    if s == "local":
        return DaskTarget(None, None)
    if s.startswith("local:"):
        raw = s.split(":", 1)[1]
        try:
            n = int(raw)
        except ValueError:
            raise UsageError(f"--dask local:N expects a number of workers, got {raw!r}") from None
        if n < 1:
            raise UsageError("--dask local:N needs N >= 1")
        return DaskTarget(None, n)
    return DaskTarget(s, None)


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise StxError(f"--dask needs the optional dependency dask[distributed] ({exc}); "
                       f"install it with: {INSTALL_HINT}") from exc
    return distributed


def _is_client(obj: Any) -> bool:
    return hasattr(obj, "submit") and hasattr(obj, "scheduler_info")


@contextmanager
def connect(target: "str | DaskTarget | Any") -> Iterator[Any]:
    """A ``distributed.Client`` for ``target``. A Client passed in is used as it is and left open
    (tests and programs that keep one cluster for many runs); one made here is closed after."""
    if _is_client(target):
        yield target
        return
    if isinstance(target, str):
        target = parse_target(target)
    distributed = _import_distributed()
    if target.address is None:
        import logging

        import dask

        try:
            with dask.config.set({"distributed.nanny.pre-spawn-environ": WORKER_ENV}):
                cluster = distributed.LocalCluster(n_workers=target.n_workers, threads_per_worker=1,
                                                   processes=True, dashboard_address="127.0.0.1:0",
                                                   silence_logs=logging.ERROR)
        except Exception as exc:
            raise StxError(f"cannot start a local Dask cluster ({type(exc).__name__}: {exc})") from exc
        client = distributed.Client(cluster)
        try:
            yield client
        finally:
            client.close()
            cluster.close()
        return
    try:
        client = distributed.Client(target.address, timeout="20s")
    except (OSError, TimeoutError) as exc:
        raise StxError(f"cannot reach the Dask scheduler at {target.address} ({exc})") from exc
    try:
        yield client
    finally:
        client.close()


def n_workers(client: Any) -> int:
    return len(client.scheduler_info().get("workers", {}))


# ------------------------------------------------------------------------------------- partitions


@dataclass(frozen=True)
class Part:
    """One partition: its position, its files (in input order), its part file and its key."""

    index: int
    files: tuple[str, ...]
    path: str
    key: str


def files_per_part(n_files: int) -> int:
    """About :data:`TARGET_PARTITIONS` partitions, at most :data:`MAX_FILES_PER_PART` files each
    (1e5 files: 1,563 partitions of 64)."""
    return max(1, min(MAX_FILES_PER_PART, -(-n_files // TARGET_PARTITIONS)))


def _file_stamp(path: Path) -> list[Any]:
    st = path.stat()
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def make_parts(paths: Sequence[Path], per_part: int, parts_dir: Path, job_key: str,
               suffix: str = ".h5") -> list[Part]:
    """Contiguous partitions of ``paths``; each key covers the job and its files' stamps."""
    if per_part < 1:
        raise UsageError("--dask-partition must be >= 1 file")
    parts = []
    for i, s in enumerate(range(0, len(paths), per_part)):
        files = [Path(p) for p in paths[s:s + per_part]]
        blob = json.dumps({"job": job_key, "files": [_file_stamp(p) for p in files]}, sort_keys=True)
        parts.append(Part(i, tuple(str(p) for p in files), str(parts_dir / f"part-{i:06d}{suffix}"),
                          hashlib.sha256(blob.encode()).hexdigest()))
    return parts


def parts_dir_for(output: Path) -> Path:
    return output.with_name(f".{output.name}.parts")


# ------------------------------------------------------------------------- running the partitions


@dataclass
class RunStats:
    partitions: int = 0
    reused: int = 0
    computed: int = 0
    retried: int = 0
    seconds_in_tasks: float = 0.0
    cpu_in_tasks: float = 0.0
    workers: int = 0
    task_info: list[dict[str, Any]] = field(default_factory=list)


def run_parts(client: Any, parts: Sequence[Part], task: Callable[..., dict[str, Any]],
              task_args: tuple[Any, ...], *, is_done: Callable[[Part], bool],
              on_ready: Callable[[Part], None], retries: int = 2, description: str = "dask",
              unit_of: Callable[[Part], int] = lambda p: len(p.files),
              status: Callable[[], str] = lambda: "") -> RunStats:
    """Run ``task(part, *task_args)`` for every part not already done, on ``client``.

    ``on_ready(part)`` is called in partition order, as soon as a part and all parts before it
    are finished (reused parts included). Unexpected errors are retried ``retries`` times; a
    :class:`StxError` is raised at once. On any failure or interruption the outstanding tasks are
    cancelled and the finished parts stay on disk.
    """
    distributed = _import_distributed()
    stats = RunStats(partitions=len(parts), workers=n_workers(client))
    finished = [False] * len(parts)
    todo = []
    for p in parts:
        if is_done(p):
            finished[p.index] = True
            stats.reused += 1
        else:
            todo.append(p)
    next_ready = 0
    attempts: dict[int, int] = {}
    futures: dict[Any, Part] = {}

    def submit(p: Part) -> Any:
        fut = client.submit(task, p, *task_args, pure=False, key=f"stx-part-{p.index}-{os.urandom(4).hex()}")
        futures[fut] = p
        return fut

    def flush() -> None:
        nonlocal next_ready
        while next_ready < len(parts) and finished[next_ready]:
            on_ready(parts[next_ready])
            next_ready += 1

    total = sum(unit_of(p) for p in parts)
    with console.progress(description, total=total) as bar:
        try:
            bar.advance(sum(unit_of(p) for p in parts if finished[p.index]))
            flush()
            ac = distributed.as_completed([submit(p) for p in todo])
            for fut in ac:
                p = futures.pop(fut)
                if fut.status in ("error", "cancelled"):
                    # "cancelled" without our asking is the cluster's doing (a lost worker, a
                    # scheduler-side cancel racing a rerun): retried like any unexpected failure.
                    exc = (fut.exception() if fut.status == "error"
                           else RuntimeError("the Dask task was cancelled by the cluster"))
                    if isinstance(exc, StxError):
                        raise exc
                    n = attempts.get(p.index, 0) + 1
                    attempts[p.index] = n
                    if n > retries:
                        raise StxError(f"partition {p.index} ({p.files[0]} ...) failed on each of its {n} "
                                       f"attempt(s); last error: {type(exc).__name__}: {exc}") from exc
                    stats.retried += 1
                    console.warn(f"partition {p.index} failed ({type(exc).__name__}: {exc}); "
                                 f"retrying ({n}/{retries})")
                    ac.add(submit(p))
                    continue
                if fut.status != "finished":
                    raise StxError(f"partition {p.index}: the Dask task ended as {fut.status!r}")
                info = fut.result()
                stats.task_info.append(info)
                stats.seconds_in_tasks += float(info.get("seconds", 0.0))
                stats.cpu_in_tasks += float(info.get("cpu_seconds", 0.0))
                stats.computed += 1
                finished[p.index] = True
                bar.advance(unit_of(p))
                flush()
                bar.update(status=status())
        except BaseException:
            client.cancel(list(futures))
            raise
    if next_ready != len(parts):  # every task returned, so this is a bug, not a user error
        raise RuntimeError(f"only {next_ready} of {len(parts)} partitions were combined")
    return stats


# ---------------------------------------------------------------------------------- featurize


@dataclass(frozen=True)
class FeaturizeJob:
    """What every featurize task needs besides its part (sent once per task; small)."""

    featurizer: str
    version: str
    config: dict[str, Any]
    format: str | None
    chunk_size: int
    parts_dir: str
    fail_once: tuple[int, ...] = ()
    cwd: str = ""


_local = threading.local()
_malloc_tuned = False


def _tune_malloc() -> None:
    """Undo Dask's MALLOC_TRIM_THRESHOLD_ on workers started by ``dask worker`` (whose environment
    this client does not control): with it glibc maps and unmaps every large numpy temporary, and
    featurizing costs 2-2.7x the CPU. A high trim threshold and a 32 MB mmap threshold restore
    glibc's usual behaviour (measured: the CPU time of an unset variable). glibc only; elsewhere
    nothing to undo."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        return
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is not None:
        mallopt(-1, 128 << 20)  # M_TRIM_THRESHOLD
        mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD


def _featurizer_for(job: FeaturizeJob) -> Any:
    """One featurizer per worker thread and configuration (building one can load weights)."""
    from .pipeline import build_featurizer
    from .store import featurizer_key

    # No torch.set_num_threads here: Dask's nanny starts workers with OMP_NUM_THREADS=1 (and
    # MKL/OpenBLAS likewise), so a featurizer that uses torch gets one thread per task without
    # every worker paying the torch import.
    _tune_malloc()
    cache = getattr(_local, "featurizers", None)
    if cache is None:
        cache = _local.featurizers = {}
    key = json.dumps([job.featurizer, job.config], sort_keys=True, default=str)
    if key not in cache:
        cache[key] = build_featurizer(job.featurizer, job.config)
    feat = cache[key]
    here = featurizer_key(feat.name, feat.version, feat.config())
    if here != featurizer_key(job.featurizer, job.version, job.config):
        raise StxError(f"featurizer {job.featurizer!r} on worker {os.getpid()} is version {feat.version} with "
                       f"another configuration than the client's {job.version} (different stx or plugin "
                       "versions on the workers?)")
    return feat


def _opened_path(given: str, cwd: str) -> Path:
    """The file a worker opens: a relative input path is relative to the client's working folder
    (a remote worker runs elsewhere; the folder must be visible at the same path)."""
    p = Path(given)
    return p if p.is_absolute() or not cwd else Path(cwd) / p


def _as_given(values: Any, opened: Path, given: str) -> np.ndarray:
    """Readers record the path they opened as ``source_file``; put back the path the user gave, as
    the single-process run records it."""
    v = np.asarray(values)
    if str(opened) == given:
        return v
    v = v.astype(str)
    return np.where(v == str(opened), given, v)


def _maybe_fail(part: Part, job: "FeaturizeJob | PredictJob") -> None:
    if part.index in job.fail_once:
        marker = Path(job.parts_dir) / f".failed-once-{part.index}"
        if not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected failure of partition {part.index} ({FAIL_ONCE_ENV})")


def featurize_part(part: Part, job: FeaturizeJob, rv_lookup: dict[str, float] | None) -> dict[str, Any]:
    """The Dask task: featurize ``part.files`` into the part store ``part.path`` (atomic)."""
    from .io import atomic_file
    from .pipeline import INPUT_DIGEST, featurize_files, file_results
    from .store import StoreWriter

    t0, c0 = time.perf_counter(), time.process_time()
    _maybe_fail(part, job)
    feat = _featurizer_for(job)
    opened = [_opened_path(f, job.cwd) for f in part.files]
    with atomic_file(part.path) as tmp:
        w = StoreWriter(tmp, featurizer_name=feat.name, featurizer_version=feat.version,
                        featurizer_config=feat.config(), dim=feat.dim, axis=feat.axis())
        try:
            inputs, notes = [], set()
            # the partition's files as one stream: one-spectrum files (LAMOST) merge into batches
            stream = featurize_files(opened, feat, format=job.format, chunk_size=job.chunk_size,
                                     rv_lookup=rv_lookup)
            for f, p, res in zip(part.files, opened, file_results(stream)):
                start = w.n
                for fb in res.batches:
                    fb.meta.source_file = _as_given(fb.meta.source_file, p, f)
                    w.append(fb)
                    notes.update(fb.notes)
                inputs.append({"path": f, INPUT_DIGEST: res.digest, "reader": res.reader, "rows": [start, w.n]})
            w.set_inputs(inputs)
            w.f.attrs["part_key"] = part.key
            w.f.attrs["notes"] = json.dumps(sorted(notes))
            n = w.n
            w.finish()
        finally:
            w.close()
    return {"index": part.index, "n": n, "files": len(part.files), "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0,
            "worker": f"{socket.gethostname()}:{os.getpid()}"}


def part_is_done(part: Part) -> bool:
    """A complete part file whose key matches (a resumed run skips it)."""
    p = Path(part.path)
    if not p.exists():
        return False
    import h5py

    try:
        with h5py.File(p, "r") as f:
            return bool(f.attrs.get("complete", False)) and f.attrs.get("part_key") == part.key
    except OSError:
        return False


#: Rows per read when the client copies parts and checksums the combined store: about 14 MB at
#: 3535 features, so the client's memory does not grow with the input (the store's own
#: ``finish`` reads 8192-row slabs and every id at once: 2 x 116 MB plus O(N) strings).
SLAB_ROWS = 1024


def _finish(w: Any) -> str:
    """:meth:`StoreWriter.finish`: the checksum is computed slab by slab, memory stays flat."""
    return w.finish()


class _Combiner:
    """Appends parts in order to the combined store and joins labels part by part (memory stays
    one part's worth, whatever the total)."""

    def __init__(self, tmp: Path, feat: Any, catalog: tuple[np.ndarray, dict[str, np.ndarray]] | None,
                 label_columns: list[str], by_file: bool) -> None:
        from .store import StoreWriter

        self.w = StoreWriter(tmp, featurizer_name=feat.name, featurizer_version=feat.version,
                             featurizer_config=feat.config(), dim=feat.dim, axis=feat.axis())
        self.label_columns, self.by_file = label_columns, by_file
        self.keys = catalog[0] if catalog is not None else None
        self.values = {c: catalog[1][c] for c in label_columns} if catalog is not None else {}
        self.inputs: list[dict[str, Any]] = []
        self.notes: set[str] = set()
        self.readers: dict[str, int] = {}
        self.n_match = 0
        self.join = catalog is not None and bool(label_columns)
        if self.join:
            from .store import LABEL_UNITS

            for c in label_columns:
                ds = self.w.f.create_dataset(f"labels/{c}", shape=(0,), maxshape=(None,), dtype="f4",
                                             chunks=(65536,))
                ds.attrs["unit"] = LABEL_UNITS.get(c, "")

    def add(self, part: Part) -> None:
        import h5py

        from .pipeline import join_labels
        from .store import _as_str_array, _copy_rows

        with h5py.File(part.path, "r") as src:
            off = self.w.n
            _copy_rows(src, self.w, chunk_rows=SLAB_ROWS)
            for d in json.loads(src.attrs["inputs"]):
                d["rows"] = [d["rows"][0] + off, d["rows"][1] + off]
                self.inputs.append(d)
                self.readers[d["reader"]] = self.readers.get(d["reader"], 0) + d["rows"][1] - d["rows"][0]
            self.notes.update(json.loads(src.attrs.get("notes", "[]")))
            if self.join and src["features"].shape[0]:
                ids = _as_str_array(src["ids"][:])
                files = _as_str_array(src["meta/source_file"][:])
                values, matched = join_labels(ids, files, self.keys, self.values, by_file=self.by_file)
                self.n_match += matched
                for c, v in values.items():
                    ds = self.w.f[f"labels/{c}"]
                    ds.resize(off + len(v), axis=0)
                    ds[off:] = v


def _warn_kept(parts: Sequence[Part], pdir: Path, is_done: Callable[[Part], bool]) -> None:
    done = sum(1 for p in parts if is_done(p))
    console.warn(f"interrupted: {done} of {len(parts)} partitions are kept in {pdir}; "
                 "rerun the same command to resume")


def _reraise_with_kept(exc: StxError, parts: Sequence[Part], pdir: Path,
                       is_done: Callable[[Part], bool]) -> None:
    """Re-raise ``exc``, saying where the finished parts wait for a rerun (if any do)."""
    done = sum(1 for p in parts if is_done(p))
    if done:
        raise type(exc)(f"{exc} [{done} of {len(parts)} finished partitions are kept in "
                        f"{pdir} for a rerun]") from exc
    raise exc


def featurize_on_dask(dask: "str | DaskTarget | Any", paths: list[Path], output: Path, feat: Any, *,
                      format: str | None, chunk_size: int,
                      catalog: tuple[np.ndarray, dict[str, np.ndarray]] | None,
                      rv_lookup: dict[str, float] | None, label_columns: list[str], by_file: bool,
                      labels: Path | None, id_column: str, match_by: str, job_opts: dict[str, Any],
                      partition_files: int | None = None, retries: int = 2) -> dict[str, Any]:
    """The ``--dask`` path of :func:`stxcli.cli.featurize.run_featurize` (which prepared the
    inputs, the featurizer and the catalog). Writes ``output``; returns the summary fields that
    differ from the single-process run's computation (``ids`` count, readers, notes, dask stats)."""
    from .io import atomic_file
    from .store import featurizer_key

    if retries < 0:
        raise UsageError("--dask-retries must be >= 0")
    fconfig = feat.config()
    fkey = featurizer_key(feat.name, feat.version, fconfig)
    job_key = json.dumps({"featurizer": fkey, **job_opts}, sort_keys=True, default=str)
    per_part = partition_files or files_per_part(len(paths))
    pdir = parts_dir_for(output.absolute())  # the workers write there, from their own folders
    parts = make_parts(paths, per_part, pdir, job_key)
    fail_once = tuple(int(x) for x in os.environ.get(FAIL_ONCE_ENV, "").split(",") if x.strip())
    job = FeaturizeJob(feat.name, feat.version, fconfig, format, chunk_size, str(pdir), fail_once, os.getcwd())

    with connect(dask) as client:
        pdir.mkdir(parents=True, exist_ok=True)
        address = getattr(client, "scheduler", None)
        address = getattr(address, "address", None) or str(dask)
        # A large catalog travels to each worker once, not with every task. A random key
        # (hash=False): with the content hash, a rerun on the same cluster after an interruption
        # scattered under the key the interrupted run was still releasing, and the scheduler then
        # dropped the new copy ("Could not find data"), so every task of the rerun was cancelled.
        rv_arg = client.scatter([rv_lookup], broadcast=True, hash=False)[0] if rv_lookup else None
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(output) as tmp:
            comb = _Combiner(tmp, feat, catalog, label_columns, by_file)
            try:
                done_before = {p.index for p in parts if part_is_done(p)}
                if done_before:
                    console.info(f"resuming {output}: {len(done_before)} of {len(parts)} partitions already done")
                stats = run_parts(client, parts, featurize_part, (job, rv_arg),
                                  is_done=lambda p: p.index in done_before,
                                  on_ready=comb.add, retries=retries, description="featurize",
                                  status=lambda: f"{comb.w.n} spectra")
                if comb.w.n == 0:
                    raise StxError("no spectra were read from the inputs")
                if comb.join and comb.n_match == 0:
                    other = "file" if match_by == "id" else "id"
                    first = comb.w.f["ids"][0]
                    first = first.decode() if isinstance(first, bytes) else str(first)
                    raise StxError(f"{labels}: no catalog row matches a spectrum by {match_by} "
                                   f"(column {id_column!r}; e.g. spectrum id {first!r}); try --match-by {other}")
                if comb.join:
                    comb.w.f.attrs["label_source"] = json.dumps(
                        {"catalog": str(labels), "id_column": id_column, "match_by": match_by,
                         "n_matched": comb.n_match})
                comb.w.set_inputs(comb.inputs)
                n = comb.w.n
                checksum = _finish(comb.w)
            except KeyboardInterrupt:
                _warn_kept(parts, pdir, part_is_done)
                raise
            except StxError as exc:
                _reraise_with_kept(exc, parts, pdir, part_is_done)
            finally:
                comb.w.close()
    shutil.rmtree(pdir, ignore_errors=True)
    return {"n_spectra": n, "checksum": checksum, "readers": comb.readers, "notes": sorted(comb.notes),
            "n_labelled": comb.n_match if comb.join else None,
            "dask": {"scheduler": address, "workers": stats.workers, "partitions": stats.partitions,
                     "files_per_partition": per_part, "reused": stats.reused, "computed": stats.computed,
                     "workers_used": len({i["worker"] for i in stats.task_info}),
                     "retried": stats.retried, "task_seconds": round(stats.seconds_in_tasks, 3),
                     "task_cpu_seconds": round(stats.cpu_in_tasks, 3)}}


# ------------------------------------------------------------------------------------ predict


@dataclass(frozen=True)
class PredictJob:
    """What every predict task needs: the model directory (visible to the workers) and options."""

    model: str
    manifest_sha256: str
    format: str | None
    chunk_rows: int
    device: str
    parts_dir: str
    fail_once: tuple[int, ...] = ()
    cwd: str = ""


def _model_for(job: PredictJob) -> tuple[Any, Any]:
    """The model and its featurizer, loaded once per worker thread."""
    from .errors import ModelFileError
    from .model import load_model
    from .predict import model_featurizer

    _tune_malloc()
    cache = getattr(_local, "models", None)
    if cache is None:
        cache = _local.models = {}
    key = (job.model, job.manifest_sha256, job.device)
    if key not in cache:
        model = load_model(job.model).to(job.device)
        if model.mdir.manifest_sha256 != job.manifest_sha256:
            raise ModelFileError(f"{job.model}: the model directory a worker sees differs from the "
                                 "client's (another copy, or changed during the run)")
        cache[key] = (model, model_featurizer(model))
    return cache[key]


def predict_part(part: Part, job: PredictJob) -> dict[str, Any]:
    """The Dask task: featurize ``part.files`` with the model's featurizer, predict, and save the
    output columns chunk by chunk (exactly the chunks the single-process run appends to its spool)
    in the part file ``part.path`` (``.npz``, atomic). Predictions are a few numbers per spectrum:
    a partition's fit in memory."""
    from .errors import ModelFileError
    from .io import atomic_file
    from .predict import file_chunks, needs_ivar, predict_chunk

    t0, c0 = time.perf_counter(), time.process_time()
    _maybe_fail(part, job)
    model, feat = _model_for(job)
    arrays: dict[str, np.ndarray] = {}
    sizes: list[int] = []
    for f in part.files:
        p = _opened_path(f, job.cwd)
        # chunk by chunk, as one process does
        for ch in file_chunks([p], feat, job.format, job.chunk_rows, need_ivar=needs_ivar(model)):
            if ch.features.shape[1] != model.input_dim:
                raise ModelFileError(f"features have {ch.features.shape[1]} columns, model expects "
                                     f"{model.input_dim}")
            if "source_file" in ch.columns:
                ch.columns["source_file"] = _as_given(ch.columns["source_file"], p, f)
            cols = {**ch.columns, **predict_chunk(model, ch, job.device)}
            for k, v in cols.items():
                v = np.asarray(v)
                arrays[f"c{len(sizes):06d}.{k}"] = v.astype(str) if v.dtype.kind == "O" else v
            sizes.append(len(ch.snr))
    meta = {"part_key": part.key, "chunks": [[int(m), [k.split(".", 1)[1] for k in arrays
                                                      if k.startswith(f"c{i:06d}.")]]
                                             for i, m in enumerate(sizes)]}
    with atomic_file(part.path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, __meta__=np.array(json.dumps(meta)), **arrays)
    return {"index": part.index, "n": int(sum(sizes)), "files": len(part.files),
            "seconds": time.perf_counter() - t0,
            "cpu_seconds": time.process_time() - c0, "worker": f"{socket.gethostname()}:{os.getpid()}"}


def _npz_meta(path: str | Path) -> dict[str, Any] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["__meta__"]))
    except (OSError, ValueError, KeyError):
        return None


def predict_part_is_done(part: Part) -> bool:
    meta = _npz_meta(part.path) if Path(part.path).exists() else None
    return meta is not None and meta.get("part_key") == part.key


def _append_spool_part(master: Any, part: Part, counts: dict[str, int]) -> None:
    """Append a part's chunks to the master spool, in order, as the single-process run would."""
    from .predict import _count_flags

    with np.load(part.path, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        for i, (_, names) in enumerate(meta["chunks"]):
            cols = {k: z[f"c{i:06d}.{k}"] for k in names}
            master.append(cols)
            _count_flags(counts, cols["flags"])


def predict_on_dask(dask: "str | DaskTarget | Any", model_path: str | Path, inputs: Sequence[str],
                    output: str | Path, *, format: str | None = None, chunk_rows: int = 4096,
                    device: str = "cpu", partition_files: int | None = None,
                    retries: int = 2) -> dict[str, Any]:
    """``stx predict --dask``: survey files are partitioned across the workers; each partition
    featurizes and predicts its files into a part spool; the parts are combined in order into the
    FITS catalog, which equals the single-process one. Feature stores and input catalogs are
    predicted in one process (featurizing is the costly step), so they are refused here."""
    from .io import atomic_file
    from .model import load_model
    from .predict import Spool, classify_inputs, write_catalog

    if chunk_rows < 1:
        raise UsageError("--chunk-size must be >= 1")
    if retries < 0:
        raise UsageError("--dask-retries must be >= 0")
    output = Path(output)
    if not output.name.lower().endswith((".fits", ".fit")):
        raise UsageError(f"-o {output}: the output is a FITS table (name it .fits)")
    stores, files, catalog = classify_inputs(inputs)
    if stores or catalog is not None:
        raise UsageError("--dask distributes survey files; predict feature stores and input catalogs "
                         "without --dask")
    model = load_model(model_path)
    job_key = json.dumps({"model": model.mdir.manifest_sha256, "format": format, "chunk": chunk_rows},
                         sort_keys=True)
    per_part = partition_files or files_per_part(len(files))
    pdir = parts_dir_for(output.absolute())
    parts = make_parts(files, per_part, pdir, job_key, suffix=".npz")
    fail_once = tuple(int(x) for x in os.environ.get(FAIL_ONCE_ENV, "").split(",") if x.strip())
    job = PredictJob(str(Path(model_path).resolve()), model.mdir.manifest_sha256, format, chunk_rows, device,
                     str(pdir), fail_once, os.getcwd())
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    with connect(dask) as client:
        pdir.mkdir(parents=True, exist_ok=True)
        address = getattr(getattr(client, "scheduler", None), "address", None) or str(dask)
        with atomic_file(output) as tmp:
            spool_path = tmp.with_name(tmp.name + ".spool")
            spool = Spool(spool_path)
            try:
                done_before = {p.index for p in parts if predict_part_is_done(p)}
                if done_before:
                    console.info(f"resuming {output}: {len(done_before)} of {len(parts)} partitions already done")
                stats = run_parts(client, parts, predict_part, (job,), is_done=lambda p: p.index in done_before,
                                  on_ready=lambda p: _append_spool_part(spool, p, counts), retries=retries,
                                  description="predict", status=lambda: f"{spool.n} spectra")
                n = write_catalog(spool, tmp, model)
            except KeyboardInterrupt:
                _warn_kept(parts, pdir, predict_part_is_done)
                raise
            except StxError as exc:
                _reraise_with_kept(exc, parts, pdir, predict_part_is_done)
            finally:
                spool.close()
                if spool_path.is_dir():
                    shutil.rmtree(spool_path, ignore_errors=True)
                elif spool_path.exists():
                    spool_path.unlink()
    shutil.rmtree(pdir, ignore_errors=True)
    dt = time.perf_counter() - t0
    for name, count in counts.items():
        if name in ("OUT_OF_DOMAIN", "OUT_OF_LABEL_RANGE") and count:
            console.warn(f"{count} of {n} spectra flagged {name}")
    return {"output": str(output), "model": str(model_path), "model_kind": model.mdir.kind,
            "manifest_sha256": model.mdir.manifest_sha256, "n_spectra": n, "labels": model.label_names,
            "flags": counts, "time_s": round(dt, 3), "spectra_per_s": round(n / dt, 1) if dt > 0 else None,
            "inputs": {"stores": [], "files": len(files), "catalog": None},
            "dask": {"scheduler": address, "workers": stats.workers, "partitions": stats.partitions,
                     "files_per_partition": per_part, "reused": stats.reused, "computed": stats.computed,
                     "workers_used": len({i["worker"] for i in stats.task_info}),
                     "retried": stats.retried, "task_seconds": round(stats.seconds_in_tasks, 3),
                     "task_cpu_seconds": round(stats.cpu_in_tasks, 3)}}
