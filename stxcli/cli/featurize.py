"""``stx featurize`` (survey files -> feature store) and ``stx store`` (inspect, concatenate)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Optional

import typer

from .. import console
from ..errors import StxError, UsageError
from .pretrain import parse_settings


#: Seconds between checkpoints of the finished-files list in a partial store (resume granularity).
CHECKPOINT_S = 5.0


def _resume_key(featurizer_key: str, paths: list[Path], opts: dict[str, Any]) -> str:
    blob = json.dumps({"f": featurizer_key, "inputs": [str(p.resolve()) for p in paths], "opts": opts},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _open_partial(partial: Path, resume_key: str) -> tuple[Any, list[dict[str, Any]]] | None:
    """Reopen an interrupted run's partial store when it belongs to the same command."""
    import h5py

    from ..store import StoreWriter

    try:
        f = h5py.File(partial, "a")
    except OSError:
        return None
    if f.attrs.get("resume_key") != resume_key:
        f.close()
        return None
    inputs = json.loads(f.attrs.get("inputs", "[]"))
    n_done = inputs[-1]["rows"][1] if inputs else 0
    for ds in (f["features"], f["ivar"], f["ids"], *f["meta"].values(), *f["quality"].values()):
        if ds.shape[0] > n_done:
            ds.resize(n_done, axis=0)
    w = StoreWriter.__new__(StoreWriter)
    w.path, w.f, w.dim = partial, f, int(f["features"].shape[1])
    return w, inputs


def run_featurize(inputs: list[str], output: Path, *, featurizer: str = "raw",
                  settings: dict[str, Any] | None = None, format: str | None = None,
                  labels: Path | None = None, id_column: str = "id",
                  label_columns: list[str] | None = None, match_by: str = "id",
                  rv_column: str | None = None, workers: int = 1, chunk_size: int = 256,
                  threads: int | None = None, dask: Any = None, dask_partition: int | None = None, dask_retries: int = 2) -> dict[str, Any]:
    """Featurize ``inputs`` into the store ``output``; return the summary. Programmatic API of
    ``stx featurize`` (the demo and the tests call it).

    ``dask``: a scheduler address, ``"local"`` / ``"local:N"`` (a LocalCluster), or an open
    ``distributed.Client``; the files are then featurized in partitions on that cluster (see
    :mod:`stxcli.distributed`) and the store equals the single-process one.

    ``threads``: batches transformed at once in each process (thread-safe featurizers only; the
    store does not depend on it); None = the usable cores shared by the ``workers``."""
    import numpy as np

    from ..pipeline import (INPUT_DIGEST, build_featurizer, default_threads, expand_inputs, join_labels, map_files,
                            read_catalog)
    from ..store import StoreWriter, featurizer_key

    if match_by not in ("id", "file"):
        raise UsageError(f"--match-by must be 'id' or 'file', got {match_by!r}")
    if workers < 1:
        raise UsageError("--workers must be >= 1")
    if threads is not None and threads < 1:
        raise UsageError("--threads must be >= 1")
    if dask is not None and workers > 1:
        raise UsageError("--workers and --dask exclude each other; use --dask local:N for N local workers")
    output = Path(output)
    paths = expand_inputs(inputs)
    feat = build_featurizer(featurizer, settings or {})
    fconfig = feat.config()
    label_columns = list(label_columns or [])
    by_file = match_by == "file"

    # Read the catalog first: a bad catalog must fail before hours of featurizing.
    catalog = None
    rv_lookup = None
    if labels is not None:
        cols = label_columns + ([rv_column] if rv_column and rv_column not in label_columns else [])
        catalog = read_catalog(labels, id_column, cols, by_file=by_file)
        if rv_column:
            if by_file:
                raise UsageError("--rv-column needs --match-by id")
            rv_lookup = dict(zip(catalog[0].tolist(), catalog[1][rv_column].tolist()))
    elif label_columns or rv_column:
        raise UsageError("--label-columns / --rv-column need --labels CATALOG")

    fkey = featurizer_key(feat.name, feat.version, fconfig)
    if dask is not None:
        from ..distributed import featurize_on_dask
        from ..pipeline import sha256_file

        res = featurize_on_dask(dask, paths, output, feat, format=format, chunk_size=chunk_size,
                                catalog=catalog, rv_lookup=rv_lookup, label_columns=label_columns,
                                by_file=by_file, labels=labels, id_column=id_column, match_by=match_by,
                                job_opts={"format": format, "chunk": chunk_size, "rv": rv_column,
                                          "rv_catalog": sha256_file(Path(labels)) if rv_lookup else None},
                                partition_files=dask_partition, retries=dask_retries)
        summary = _summarize(output, res["n_spectra"], len(paths), feat, res["readers"], label_columns,
                             res["n_labelled"] if label_columns else None, res["checksum"], res["notes"])
        summary["dask"] = res["dask"]
        return summary
    rkey = _resume_key(fkey, paths, {"format": format, "chunk": chunk_size, "rv": rv_column,
                                     "labels": str(labels) if labels else None})
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    resumed = _open_partial(partial, rkey) if partial.exists() else None
    if resumed:
        writer, done = resumed
        console.info(f"resuming {output}: {len(done)} of {len(paths)} files already done")
    else:
        writer = StoreWriter(partial, featurizer_name=feat.name, featurizer_version=feat.version,
                             featurizer_config=fconfig, dim=feat.dim, axis=feat.axis())
        writer.f.attrs["resume_key"] = rkey
        done = []
    done_paths = {d["path"] for d in done}
    todo = [p for p in paths if str(p) not in done_paths]
    n_threads = threads if threads is not None else default_threads(workers)
    readers: dict[str, int] = {}
    notes: list[str] = []
    ok = False
    last_checkpoint = time.monotonic()
    try:
        with console.progress("featurize", total=len(paths)) as bar:
            bar.advance(len(paths) - len(todo))
            for res in map_files(todo, feat.name, fconfig, format=format, chunk_size=chunk_size,
                                 workers=workers, rv_lookup=rv_lookup, threads=n_threads):
                start = writer.n
                for fb in res.batches:
                    writer.append(fb)
                    notes.extend(fb.notes)
                done.append({"path": str(res.path), INPUT_DIGEST: res.digest, "reader": res.reader,
                             "rows": [start, writer.n]})
                if time.monotonic() - last_checkpoint > CHECKPOINT_S:
                    # HDF5 does not reuse an attribute's old space: rewriting the growing list
                    # after every file bloated stores by ~1 GB per 3,000 files.
                    writer.set_inputs(done)
                    writer.f.flush()
                    last_checkpoint = time.monotonic()
                readers[res.reader] = readers.get(res.reader, 0) + writer.n - start
                bar.advance(1)
                bar.update(status=f"{writer.n} spectra")
        writer.set_inputs(done)
        if writer.n == 0:
            raise StxError("no spectra were read from the inputs")
        ids = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in writer.f["ids"][:]])
        n_match = None
        if catalog is not None and label_columns:
            src = writer.f["meta/source_file"][:]
            src = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in src])
            keys, cat_values = catalog
            values, n_match = join_labels(ids, src, keys, {c: cat_values[c] for c in label_columns},
                                          by_file=by_file)
            if n_match == 0:
                other = "file" if match_by == "id" else "id"
                raise StxError(f"{labels}: no catalog row matches a spectrum by {match_by} "
                               f"(column {id_column!r}; e.g. spectrum id {ids[0]!r}); try --match-by {other}")
            writer.set_labels(values, {"catalog": str(labels), "id_column": id_column, "match_by": match_by,
                                       "n_matched": n_match})
        checksum = writer.finish()
        ok = True
    except KeyboardInterrupt:
        if writer.f.id.valid:
            writer.set_inputs(done)  # what a rerun may skip: every file fully appended
        writer.close()
        console.warn(f"interrupted: rerun the same command to resume ({len(done)} files done)")
        raise
    finally:
        if not ok:
            writer.close()
            # Keep the partial store only for an interruption; any error leaves nothing behind.
            import sys

            if not isinstance(sys.exc_info()[1], KeyboardInterrupt) and partial.exists():
                partial.unlink()
    output.parent.mkdir(parents=True, exist_ok=True)
    import os

    os.replace(partial, output)
    summary = _summarize(output, int(len(ids)), len(paths), feat, readers, label_columns, n_match, checksum, notes)
    summary["workers"], summary["threads"] = workers, n_threads
    return summary


def _summarize(output: Path, n_spectra: int, n_files: int, feat: Any, readers: dict[str, int],
               label_columns: list[str], n_match: int | None, checksum: str, notes: list[str]) -> dict[str, Any]:
    """Warn about flagged spectra, print the featurizer's notes, and build the summary."""
    from .. import flags as F
    from ..store import FeatureStore

    counts = dict.fromkeys(F.NAMES.values(), 0)
    with FeatureStore.open(output) as st:  # slab by slab: memory independent of the store's size
        if "flags" in st.f["quality"]:
            ds = st.f["quality/flags"]
            for s in range(0, ds.shape[0], 1 << 20):
                fl = ds[s:s + (1 << 20)]
                for bit, name in F.NAMES.items():
                    counts[name] += int(((fl & bit) != 0).sum())
    flag_counts = {name: c for name, c in counts.items() if c}
    for name, count in flag_counts.items():
        console.warn(f"{count} spectra flagged {name}")
    for note in sorted(set(notes)):
        console.info(note)
    return {"output": str(output), "n_spectra": n_spectra, "n_files": n_files, "dim": feat.dim,
            "featurizer": feat.name, "readers": readers, "flags": flag_counts,
            "labels": label_columns, "n_labelled": n_match, "checksum": checksum}


def register(app: typer.Typer) -> None:
    @app.command("featurize")
    def featurize(
        inputs: list[str] = typer.Argument(..., help="Spectrum files, directories, or text files listing paths."),
        output: Path = typer.Option(..., "-o", "--output", help="Feature store to write (HDF5)."),
        featurizer: str = typer.Option("raw", "--featurizer", "-f", help="Featurizer plugin (see `stx plugins`)."),
        settings: Optional[list[str]] = typer.Option(None, "--set", help="Featurizer option key=value (repeatable), e.g. --set target_r=1800."),
        format: Optional[str] = typer.Option(None, "--format", help="Force a reader instead of identifying each file."),
        labels: Optional[Path] = typer.Option(None, "--labels", help="Catalog (FITS or CSV) with labels to join."),
        id_column: str = typer.Option("id", "--id-column", help="Catalog column matched against spectrum ids (or file names)."),
        label_columns: str = typer.Option("teff,logg,feh", "--label-columns", help="Comma-separated catalog columns to store as labels."),
        match_by: str = typer.Option("id", "--match-by", help="'id': catalog ids equal spectrum ids (OBSID, TARGETID); 'file': catalog holds file names."),
        rv_column: Optional[str] = typer.Option(None, "--rv-column", help="Catalog column with radial velocities (km/s) used for the rest frame."),
        workers: int = typer.Option(1, "--workers", "-j", help="Worker processes, parallel over runs of consecutive files (up to 64 files or 64 MB each; one-spectrum files are merged into batches within a run). On 2 cores one process with --threads is as fast (docs/featurize.md)."),
        threads: Optional[int] = typer.Option(None, "--threads", help="Batches featurized at once in each process, in threads (parallel within and across files). Default: the usable CPU cores divided by --workers. The store does not depend on it."),
        chunk_size: int = typer.Option(256, "--chunk-size", help="Spectra per batch when reading large files (memory ~0.3 MB per spectrum in a batch)."),
        dask: Optional[str] = typer.Option(None, "--dask", help="Run on a Dask cluster: a scheduler address (tcp://host:8786) or local[:N] for N local worker processes. Needs the extra stx[dask]; the parts folder beside the output must be visible to every worker."),
        dask_partition: Optional[int] = typer.Option(None, "--dask-partition", help="Files per Dask partition (default: about 64 partitions, at most 64 files each)."),
        dask_retries: int = typer.Option(2, "--dask-retries", help="Times a failed Dask partition is resubmitted (data errors are not retried)."),
        json_out: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
    ) -> None:
        """Read survey spectra and write a feature store (HDF5) on a common grid.

        Each file's format is identified from its content (LAMOST LRS, DESI coadd/spectra, 1-D FITS);
        an interrupted run resumes where it stopped when started again with the same arguments.
        With --dask the files are split into partitions run on a Dask cluster; each writes its own
        part, failed partitions are retried, a rerun skips finished parts, and the combined store
        equals the single-process one (same row order).

        Example: stx featurize ../shared/data/lamost-dr10/spectra -o dr10.h5 --labels labels.csv --id-column obsid
        """
        console.set_quiet(quiet or json_out)
        cols = [c.strip() for c in label_columns.split(",") if c.strip()] if labels else []
        summary = run_featurize(inputs, output, featurizer=featurizer, settings=parse_settings(settings),
                                format=format, labels=labels, id_column=id_column, label_columns=cols,
                                match_by=match_by, rv_column=rv_column, workers=workers, chunk_size=chunk_size,
                                threads=threads, dask=dask, dask_partition=dask_partition, dask_retries=dask_retries)
        console.print_summary("featurize", summary, json_out)

    store_app = typer.Typer(help="Inspect and combine feature stores.", no_args_is_help=True)
    app.add_typer(store_app, name="store")

    @store_app.command("info")
    def store_info(path: Path = typer.Argument(..., help="Feature store."),
                   json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Summarise a feature store: rows, dimension, featurizer, labels, flags."""
        from ..store import FeatureStore

        with FeatureStore.open(path) as st:
            summary = st.summary()
        console.print_summary("store", summary, json_out)

    @store_app.command("concat")
    def store_concat(paths: list[Path] = typer.Argument(..., help="Stores made with the same featurizer config."),
                     output: Path = typer.Option(..., "-o", "--output", help="Store to write."),
                     json_out: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """Concatenate feature stores (same featurizer config required)."""
        from ..store import FeatureStore, concat_stores

        if len(paths) < 2:
            raise UsageError("give at least two stores to concatenate")
        concat_stores(paths, output)
        with FeatureStore.open(output) as st:
            summary = st.summary()
        console.print_summary("store", summary, json_out)
