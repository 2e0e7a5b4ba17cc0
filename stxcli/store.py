"""The HDF5 feature store.

Layout (format ``stx-feature-store`` version 1; open it with h5py alone, see docs/formats.md)::

    /features          (N, D) float32, chunked by rows so training reads contiguous slabs
    /ivar              (N, D) float32, 0 = missing feature
    /axis              (D,)   float64, the feature axis (e.g. rest-frame vacuum wavelength), optional
    /ids               (N,)   utf-8 strings
    /meta/<name>       (N,)   survey, source_file, source_row, ra, dec, rv_kms, and survey extras
    /quality/<name>    (N,)   snr, masked_frac, flags (int32, stxcli.flags), rv_kms, ...
    /labels/<name>     (N,)   float32, NaN where unknown; attribute ``unit``
    root attributes:   format, format_version, featurizer, featurizer_version,
                       featurizer_config (JSON), featurizer_key, stx_version, created,
                       inputs (JSON list of {path, xxh3_128, reader, rows}), label_source (JSON),
                       checksum (sha256 of ids + features + ivar), complete
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .errors import StxError
from .io import jsonable

FORMAT = "stx-feature-store"
FORMAT_VERSION = 1
ROW_CHUNK = 256
LABEL_UNITS = {"teff": "K", "logg": "dex", "feh": "dex", "alpha_fe": "dex", "mh": "dex"}

def _str_dtype() -> Any:
    import h5py

    return h5py.string_dtype("utf-8")


def featurizer_key(name: str, version: str, config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a featurizer's identity: equal keys, equal features."""
    blob = json.dumps({"name": name, "version": version, "config": config}, sort_keys=True,
                      separators=(",", ":"), default=jsonable)
    return hashlib.sha256(blob.encode()).hexdigest()


def featurizer_identity(entry: dict[str, Any]) -> str:
    """What makes two featurizer entries (``name``, ``version``, ``config``, ``key``) give the
    same numbers. A featurizer whose config also says *where* or *on what device* (the
    ``transformer``'s encoder path) offers ``identity_config(config)``: the part that determines
    the numbers, hashed here; for any other, or one not installed, it is the recorded ``key``."""
    from .registry import get_registry

    name = str(entry.get("name"))
    reg = get_registry()
    if name in reg.items["featurizer"]:
        ident = getattr(reg.get("featurizer", name), "identity_config", None)
        if callable(ident):
            return featurizer_key(name, str(entry.get("version")), ident(dict(entry.get("config") or {})))
    return str(entry.get("key"))


def _as_str_array(a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.dtype.kind in ("S", "O"):
        return np.array([x.decode() if isinstance(x, bytes) else str(x) for x in arr], dtype=str)
    return arr.astype(str)


def _as_utf8_array(a: Any) -> np.ndarray:
    """Strings read from h5py (bytes objects for UTF-8 variable-length data) as an ``S`` array."""
    arr = np.asarray(a)
    if arr.dtype.kind == "S":
        return arr
    if arr.dtype.kind == "O" and all(isinstance(x, bytes) for x in arr[:1]):
        try:
            return arr.astype("S")
        except (TypeError, ValueError):
            pass
    return np.char.encode(_as_str_array(arr), "utf-8")


class StoreWriter:
    """Appends feature batches to a new HDF5 file (normally a temporary path)."""

    #: rows held in memory before one write per dataset (a survey of one-star files would
    #: otherwise cost ~20 small HDF5 writes per spectrum: ~18 ms, a cap of ~55 files/s)
    BUFFER_ROWS = 2048
    buffer_rows = BUFFER_ROWS

    def __init__(self, path: Path, *, featurizer_name: str, featurizer_version: str,
                 featurizer_config: dict[str, Any], dim: int, axis: np.ndarray | None = None,
                 buffer_rows: int | None = None) -> None:
        import h5py

        self.path = Path(path)
        self.f = h5py.File(self.path, "w")
        self.dim = dim
        self.buffer_rows = buffer_rows or self.BUFFER_ROWS
        a = self.f.attrs
        a["format"], a["format_version"] = FORMAT, FORMAT_VERSION
        a["featurizer"], a["featurizer_version"] = featurizer_name, featurizer_version
        a["featurizer_config"] = json.dumps(featurizer_config, sort_keys=True, default=jsonable)
        a["featurizer_key"] = featurizer_key(featurizer_name, featurizer_version, featurizer_config)
        a["stx_version"] = __version__
        a["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        a["inputs"] = "[]"
        a["complete"] = False
        chunk = (ROW_CHUNK, dim)
        for name in ("features", "ivar"):
            self.f.create_dataset(name, shape=(0, dim), maxshape=(None, dim), dtype="f4", chunks=chunk)
        self.f.create_dataset("ids", shape=(0,), maxshape=(None,), dtype=_str_dtype(), chunks=(4096,))
        if axis is not None:
            self.f.create_dataset("axis", data=np.asarray(axis, dtype="f8"))
        self.f.create_group("meta")
        self.f.create_group("quality")
        self.f.create_group("labels")

    # The HDF5 file is reached through ``f``: any access from outside (a reader of what was
    # written, a resize, attributes) first writes the buffered rows, so it always sees them.
    @property
    def f(self) -> Any:
        if self._pending:
            self.flush()
        return self._f

    @f.setter
    def f(self, value: Any) -> None:
        self._f = value
        self._pending: list[Any] = []
        self._pending_rows = 0
        self._features_ds: Any = None

    @property
    def n(self) -> int:
        """Rows appended so far (written or buffered). The features dataset is looked up once
        (a lookup by name costs ~50 us, several times per one-star file)."""
        if self._features_ds is None:
            self._features_ds = self._f["features"]
        return int(self._features_ds.shape[0]) + self._pending_rows

    def _append(self, ds_path: str, values: np.ndarray) -> None:
        """Write ``values`` as the last rows of ``ds_path`` (created on first use, earlier rows
        filled); the features have already been resized to the new length."""
        values = np.asarray(values)
        if values.dtype.kind in ("U", "S", "O"):
            values = _as_str_array(values).astype(object)
            dtype: Any = _str_dtype()
        else:
            dtype = values.dtype
        f = self._f
        n = int(f["features"].shape[0])
        n0 = n - len(values)
        if ds_path not in f:
            shape = values.shape[1:]
            f.create_dataset(ds_path, shape=(n0,) + shape, maxshape=(None,) + shape, dtype=dtype,
                             chunks=(4096,) + shape, fillvalue=_fill(dtype))
        ds = f[ds_path]
        ds.resize(n, axis=0)
        ds[n0:n] = values

    def append(self, fb: Any) -> tuple[int, int]:
        """Append a :class:`~stxcli.protocols.FeatureBatch`; return its row range. Rows are
        buffered and written ``buffer_rows`` at a time (:meth:`flush`)."""
        n = fb.features.shape[0]
        if fb.features.shape[1] != self.dim:
            raise StxError(f"featurizer produced {fb.features.shape[1]} features, store has {self.dim}")
        start = self.n
        if n:
            self._pending.append(fb)
            self._pending_rows += n
            if self._pending_rows >= self.buffer_rows:
                self.flush()
        return start, start + n

    def flush(self) -> None:
        """Write the buffered batches: one resize and one write per dataset. A column that some
        batches lack gets its fill value (NaN, -1, False, "") there, as if written batch by batch."""
        batches, self._pending, self._pending_rows = self._pending, [], 0
        if not batches:
            return
        f = self._f
        start = int(f["features"].shape[0])
        total = sum(fb.features.shape[0] for fb in batches)
        for name in ("features", "ivar"):
            ds = f[name]
            ds.resize(start + total, axis=0)
            ds[start:] = np.concatenate([np.asarray(getattr(fb, name), dtype=np.float32) for fb in batches])
        cols: dict[str, list[tuple[int, np.ndarray]]] = {}

        def add(key: str, i: int, arr: Any) -> None:
            cols.setdefault(key, []).append((i, np.asarray(arr)))

        for i, fb in enumerate(batches):
            m, n = fb.meta, fb.features.shape[0]
            add("ids", i, m.ids)
            add("meta/survey", i, np.full(n, m.survey))
            add("meta/source_file", i, m.source_file)
            add("meta/source_row", i, np.asarray(m.source_row, dtype=np.int64))
            for col in ("ra", "dec", "rv_kms"):
                add(f"meta/{col}", i, np.asarray(getattr(m, col), dtype=np.float64))
            for band, arr in m.snr.items():
                add(f"meta/snr_{band}", i, np.asarray(arr, dtype=np.float32))
            for key, arr in m.extra.items():
                add(f"meta/{key}", i, arr)
            for key, arr in fb.quality.items():
                add(f"quality/{key}", i, arr)
        sizes = [fb.features.shape[0] for fb in batches]
        for key, parts in cols.items():
            if len(parts) == len(batches):
                values = _concat([a for _, a in parts])
            else:
                have = dict(parts)
                like = parts[0][1]
                values = _concat([have[i] if i in have else _filled(like, sizes[i]) for i in range(len(batches))])
            self._append(key, values)

    def set_inputs(self, inputs: list[dict[str, Any]]) -> None:
        self.f.attrs["inputs"] = json.dumps(inputs)

    def set_labels(self, labels: dict[str, np.ndarray], source: dict[str, Any] | None = None) -> None:
        for name, values in labels.items():
            if f"labels/{name}" in self.f:
                del self.f[f"labels/{name}"]
            ds = self.f.create_dataset(f"labels/{name}", data=np.asarray(values, dtype=np.float32))
            ds.attrs["unit"] = LABEL_UNITS.get(name, "")
        self.f.attrs["label_source"] = json.dumps(source or {})

    def finish(self) -> str:
        """Make every dataset N rows long, compute the checksum, mark complete; return it."""
        n = self.n
        for group in ("meta", "quality"):
            for ds in self.f[group].values():
                if ds.shape[0] != n:
                    ds.resize(n, axis=0)
        checksum = _checksum(self.f)
        self.f.attrs["checksum"] = checksum
        self.f.attrs["complete"] = True
        self.f.close()
        return checksum

    def close(self) -> None:
        """Close without finishing: rows still buffered are dropped (an aborted run)."""
        self._pending, self._pending_rows = [], 0
        if self._f.id.valid:
            self._f.close()


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    if any(p.dtype.kind in ("U", "S", "O") for p in parts):
        return np.concatenate([_as_str_array(p) for p in parts])
    return np.concatenate(parts)


def _filled(like: np.ndarray, n: int) -> np.ndarray:
    """``n`` rows of the fill value of ``like``'s column (what a missing batch reads as)."""
    if like.dtype.kind in ("U", "S", "O"):
        return np.full((n,) + like.shape[1:], "", dtype=str)
    return np.full((n,) + like.shape[1:], _fill(like.dtype), dtype=like.dtype)


def _fill(dtype: Any) -> Any:
    kind = np.dtype(dtype).kind
    if kind == "f":
        return np.nan
    if kind in ("i", "u"):
        return -1
    if kind == "b":
        return False
    return None


def _checksum(f: Any, chunk_rows: int = 8192, slab_rows: int = 1024) -> str:
    """sha256 of the ids (one ``"\n".join``), then features and ivar interleaved per block of
    ``chunk_rows`` rows. Read in slabs of ``slab_rows`` so memory stays flat for any N; the
    digest does not depend on ``slab_rows``."""
    h = hashlib.sha256()
    n = f["features"].shape[0]
    for s in range(0, n, slab_rows):
        h.update((("\n" if s else "") + "\n".join(_as_str_array(f["ids"][s:s + slab_rows]))).encode())
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        for name in ("features", "ivar"):
            for a in range(s, e, slab_rows):
                h.update(np.ascontiguousarray(f[name][a:min(a + slab_rows, e)]))  # the buffer: no bytes copy
    return h.hexdigest()


class FeatureStore:
    """Read access to a finished feature store. Use as a context manager."""

    def __init__(self, path: str | Path) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.exists():
            raise StxError(f"{self.path}: no such feature store")
        try:
            self.f = h5py.File(self.path, "r")
        except OSError as exc:
            raise StxError(f"{self.path}: not an HDF5 feature store ({exc})") from exc
        a = self.f.attrs
        if a.get("format") != FORMAT:
            self.f.close()
            raise StxError(f"{self.path}: not an stx feature store (format attribute missing)")
        if not bool(a.get("complete", False)):
            self.f.close()
            raise StxError(f"{self.path}: feature store is incomplete (an interrupted featurize run?)")

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        return cls(path)

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.close()

    # -- identity
    @property
    def n(self) -> int:
        return int(self.f["features"].shape[0])

    @property
    def dim(self) -> int:
        return int(self.f["features"].shape[1])

    @property
    def featurizer_name(self) -> str:
        return str(self.f.attrs["featurizer"])

    @property
    def featurizer_version(self) -> str:
        return str(self.f.attrs["featurizer_version"])

    @property
    def featurizer_entry(self) -> dict[str, Any]:
        """``name``, ``version``, ``config``, ``key``: the form model manifests record."""
        return {"name": self.featurizer_name, "version": self.featurizer_version,
                "config": self.featurizer_config, "key": self.featurizer_key}

    @property
    def featurizer_config(self) -> dict[str, Any]:
        return json.loads(self.f.attrs["featurizer_config"])

    @property
    def featurizer_key(self) -> str:
        return str(self.f.attrs["featurizer_key"])

    @property
    def checksum(self) -> str:
        return str(self.f.attrs["checksum"])

    @property
    def inputs(self) -> list[dict[str, Any]]:
        return json.loads(self.f.attrs.get("inputs", "[]"))

    # -- content
    @property
    def label_names(self) -> list[str]:
        return sorted(self.f["labels"].keys())

    @property
    def label_units(self) -> dict[str, str]:
        return {k: str(self.f["labels"][k].attrs.get("unit", "")) for k in self.label_names}

    @property
    def ids(self) -> np.ndarray:
        return _as_str_array(self.f["ids"][:])

    @property
    def axis(self) -> np.ndarray | None:
        return self.f["axis"][:] if "axis" in self.f else None

    def _group(self, name: str, start: int = 0, stop: int | None = None,
               utf8: bool = False) -> dict[str, np.ndarray]:
        out = {}
        for k, ds in self.f[name].items():
            v = ds[start:stop]
            if ds.dtype.kind in ("O", "S"):
                v = _as_utf8_array(v) if utf8 else _as_str_array(v)
            out[k] = v
        return out

    @property
    def quality(self) -> dict[str, np.ndarray]:
        return self._group("quality")

    @property
    def meta(self) -> dict[str, np.ndarray]:
        return self._group("meta")

    def read(self, start: int = 0, stop: int | None = None,
             fields: Sequence[str] = ("features", "ivar"), *, utf8: bool = False) -> dict[str, np.ndarray]:
        """A contiguous slab of rows ``[start, stop)``: ``features``, ``ivar``, ``ids``,
        ``quality``/``meta`` (dicts). Strings are ``str`` arrays, or with ``utf8=True`` the stored
        UTF-8 bytes (``S`` arrays) for a writer that wants bytes anyway (no decode + encode)."""
        out: dict[str, Any] = {}
        as_text = _as_utf8_array if utf8 else _as_str_array
        for fld in fields:
            if fld in ("features", "ivar"):
                out[fld] = self.f[fld][start:stop]
            elif fld == "ids":
                out[fld] = as_text(self.f["ids"][start:stop])
            elif fld in ("quality", "meta"):
                out[fld] = self._group(fld, start, stop, utf8=utf8)
            else:
                raise KeyError(f"unknown store field {fld!r}")
        return out

    def read_into(self, field: str, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        """Rows ``[start, stop)`` of ``features`` or ``ivar`` read into the first rows of ``out``
        (float32, C-contiguous, at least ``stop - start`` rows); returns that view. A reader that
        streams a big store reuses one buffer: a fresh array per slab of tens of MB is fresh
        memory from the kernel every time (page faults cost as much as the read itself)."""
        if field not in ("features", "ivar"):
            raise KeyError(f"read_into reads features or ivar, not {field!r}")
        n = stop - start
        if out.dtype != np.float32 or not out.flags.c_contiguous or out.shape[0] < n or out.shape[1:] != (self.dim,):
            raise ValueError(f"read_into: need a C-contiguous float32 buffer of >= {n} x {self.dim}")
        if n > 0:
            self.f[field].read_direct(out, np.s_[start:stop], np.s_[0:n])
        return out[:n]

    def runs(self, field: str = "features") -> list[tuple[int, int, int]] | None:
        """How ``features`` or ``ivar`` lie in the file: ``(row0, row1, byte_offset)`` for each run
        of rows stored back to back (a chunk layout where consecutive row chunks follow each other;
        stx's writer appends 2,048 rows at a time, so runs are at least that long), or None when
        the rows cannot be mapped (filters such as compression, a non-native dtype, an h5py
        without chunk queries, or a file that is not one plain file on disk)."""
        cache = self.__dict__.setdefault("_runs", {})
        if field not in cache:
            cache[field] = _runs_of(self.f[field])
        return cache[field]

    def mapped(self, field: str, start: int, stop: int) -> np.ndarray | None:
        """Rows ``[start, stop)`` of ``features`` or ``ivar`` as a read-only-in-practice view of the
        file's bytes (memory-mapped copy-on-write: nothing is copied unless written to, and
        writes never reach the file), or None when they do not lie in one run (:meth:`runs`).
        A streaming reader (``stx predict``) then standardises straight from the page cache
        instead of first copying every slab."""
        runs = self.runs(field)
        if runs is None or stop <= start:
            return None
        for r0, r1, off in runs:
            if r0 <= start and stop <= r1:
                # a map of these rows only, gone with the array: mapping the whole file once was as
                # fast, but every page read stayed in the process (peak RSS 1.6 GB predicting
                # from a 10^5-spectrum store, against 0.35 GB reading slabs or mapping per slab)
                return np.memmap(self.path, dtype=np.float32, mode="c", offset=off + (start - r0) * self.dim * 4,
                                 shape=(stop - start, self.dim))
        return None

    def labels(self, names: Sequence[str], start: int = 0, stop: int | None = None) -> np.ndarray:
        """float32 (rows, len(names)); NaN where a label is unknown."""
        missing = [n for n in names if n not in self.f["labels"]]
        if missing:
            have = ", ".join(self.label_names) or "none"
            raise StxError(f"{self.path}: label(s) {', '.join(missing)} not in the store (it has: {have})")
        cols = [self.f["labels"][n][start:stop] for n in names]
        return np.stack(cols, axis=1).astype(np.float32) if cols else np.zeros((0, 0), np.float32)

    def iter_chunks(self, chunk_rows: int = 4096, fields: Sequence[str] = ("features", "ivar"),
                    labels: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        for s in range(0, self.n, chunk_rows):
            e = min(s + chunk_rows, self.n)
            d = self.read(s, e, fields)
            d["start"], d["stop"] = s, e
            if labels:
                d["labels"] = self.labels(labels, s, e)
            yield d

    def summary(self) -> dict[str, Any]:
        q = self.quality
        flags = q.get("flags", np.zeros(self.n, np.int32))
        labels = {}
        for name in self.label_names:
            v = self.f["labels"][name][:]
            labels[name] = {"n": int(np.isfinite(v).sum()), "unit": self.label_units[name]}
        return {
            "path": str(self.path), "n": self.n, "dim": self.dim,
            "featurizer": self.featurizer_name, "featurizer_version": self.featurizer_version,
            "featurizer_key": self.featurizer_key, "checksum": self.checksum,
            "n_flagged": int((flags != 0).sum()), "labels": labels,
            "n_inputs": len(self.inputs),
        }


def _runs_of(ds: Any) -> list[tuple[int, int, int]] | None:
    """:meth:`FeatureStore.runs` of one (N, D) dataset."""
    n = int(ds.shape[0])
    try:
        if ds.dtype != np.dtype("<f4") or ds.ndim != 2 or ds.file.driver != "sec2" or ds.external:
            return None
        if n == 0:
            return []
        if ds.chunks is None:  # contiguous layout: one run
            off = ds.id.get_offset()
            return None if off is None else [(0, n, int(off))]
        if ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None \
                or ds.chunks[1] != ds.shape[1]:
            return None
        rows = int(ds.chunks[0])
        nbytes = rows * int(ds.shape[1]) * 4
        runs: list[list[int]] = []
        for i in range(-(-n // rows)):
            info = ds.id.get_chunk_info_by_coord((i * rows, 0))
            if info.byte_offset is None or info.size != nbytes or info.filter_mask:
                return None  # a chunk never written (fill value) or filtered
            off = int(info.byte_offset)
            r0, r1 = i * rows, min(n, (i + 1) * rows)
            if runs and runs[-1][1] == r0 and runs[-1][2] + (r0 - runs[-1][0]) * nbytes // rows == off:
                runs[-1][1] = r1
            else:
                runs.append([r0, r1, off])
        return [(a, b, c) for a, b, c in runs]
    except (AttributeError, TypeError, ValueError, KeyError, RuntimeError, OSError):
        return None


def write_store_arrays(path: str | Path, features: np.ndarray, ivar: np.ndarray, ids: Sequence[str],
                       labels: dict[str, np.ndarray] | None = None, *, featurizer_name: str = "test",
                       featurizer_version: str = "0", featurizer_config: dict[str, Any] | None = None,
                       quality: dict[str, np.ndarray] | None = None,
                       meta: dict[str, np.ndarray] | None = None, axis: np.ndarray | None = None,
                       survey: str = "test") -> str:
    """Write a complete store from in-memory arrays (tests, simulations, programmatic use);
    atomic; returns the checksum."""
    from .io import atomic_file
    from .protocols import FeatureBatch
    from .spectra import SpectrumMeta

    features = np.asarray(features, dtype=np.float32)
    n = features.shape[0]
    m = SpectrumMeta.empty(n, survey, "memory")
    m.ids = np.asarray(ids).astype(str)
    for k, v in (meta or {}).items():
        if hasattr(m, k) and k not in ("snr", "extra"):
            setattr(m, k, np.asarray(v))
        else:
            m.extra[k] = np.asarray(v)
    q = {"snr": np.full(n, np.nan, np.float32), "masked_frac": (np.asarray(ivar) <= 0).mean(1).astype(np.float32),
         "flags": np.zeros(n, np.int32)}
    q.update(quality or {})
    with atomic_file(path) as tmp:
        w = StoreWriter(tmp, featurizer_name=featurizer_name, featurizer_version=featurizer_version,
                        featurizer_config=featurizer_config or {}, dim=features.shape[1], axis=axis)
        try:
            w.append(FeatureBatch(features=features, ivar=np.asarray(ivar, np.float32), quality=q, meta=m))
            if labels:
                w.set_labels(labels, {"source": "arrays"})
            checksum = w.finish()
        finally:
            w.close()
    return checksum


def concat_stores(paths: Sequence[str | Path], out: str | Path) -> str:
    """Concatenate stores made with the same featurizer config into ``out`` (atomic).

    Labels present in only some stores are NaN for the others."""
    from .io import atomic_file

    stores = [FeatureStore.open(p) for p in paths]
    try:
        first = stores[0]
        for st in stores[1:]:
            if featurizer_identity(st.featurizer_entry) != featurizer_identity(first.featurizer_entry):
                raise StxError(f"cannot concatenate {first.path} and {st.path}: made with different "
                               f"featurizer configs ({first.featurizer_name} {first.featurizer_key[:12]} vs "
                               f"{st.featurizer_name} {st.featurizer_key[:12]})")
        label_names = sorted({n for st in stores for n in st.label_names})
        with atomic_file(out) as tmp:
            w = StoreWriter(tmp, featurizer_name=first.featurizer_name,
                            featurizer_version=first.featurizer_version,
                            featurizer_config=first.featurizer_config, dim=first.dim, axis=first.axis)
            try:
                labels: dict[str, list[np.ndarray]] = {n: [] for n in label_names}
                inputs: list[dict[str, Any]] = []
                for st in stores:
                    offset = w.n
                    _copy_rows(st.f, w)
                    for name in label_names:
                        labels[name].append(st.f["labels"][name][:] if name in st.f["labels"]
                                            else np.full(st.n, np.nan, np.float32))
                    inputs.extend({**d, "rows": [d["rows"][0] + offset, d["rows"][1] + offset]} if "rows" in d else d
                                  for d in st.inputs)
                w.set_inputs(inputs)
                w.set_labels({k: np.concatenate(v) for k, v in labels.items()},
                             {"concatenated": [str(p) for p in paths]})
                checksum = w.finish()
            finally:
                w.close()
        return checksum
    finally:
        for st in stores:
            st.close()


def _copy_rows(src: Any, w: StoreWriter, chunk_rows: int = 8192) -> None:
    n = src["features"].shape[0]
    n0 = w.n
    for name in ("features", "ivar"):
        ds = w.f[name]
        ds.resize(n0 + n, axis=0)
        for s in range(0, n, chunk_rows):
            ds[n0 + s:n0 + min(s + chunk_rows, n)] = src[name][s:s + chunk_rows]
    w._append("ids", _as_str_array(src["ids"][:]))
    for group in ("meta", "quality"):
        for key, ds in src[group].items():
            v = ds[:]
            w._append(f"{group}/{key}", _as_str_array(v) if ds.dtype.kind in ("O", "S") else v)


def subset_store(path: str | Path, rows: np.ndarray, out: str | Path) -> str:
    """Write the given rows (sorted, unique) of a store into a new store ``out`` (atomic),
    keeping the featurizer identity, labels, metadata and quality; return its checksum."""
    from .io import atomic_file

    rows = np.unique(np.asarray(rows, dtype=np.int64))
    with FeatureStore.open(path) as st, atomic_file(out) as tmp:
        if rows.size == 0 or rows[0] < 0 or rows[-1] >= st.n:
            raise StxError(f"{path}: row selection out of range (store has {st.n} rows)")
        w = StoreWriter(tmp, featurizer_name=st.featurizer_name, featurizer_version=st.featurizer_version,
                        featurizer_config=st.featurizer_config, dim=st.dim, axis=st.axis)
        try:
            for name in ("features", "ivar"):
                ds = w.f[name]
                ds.resize(rows.size, axis=0)
                ds[:] = st.f[name][:][rows]
            w._append("ids", st.ids[rows])
            for group in ("meta", "quality"):
                for key, values in st._group(group).items():
                    w._append(f"{group}/{key}", values[rows])
            w.set_inputs(st.inputs)
            w.set_labels({n: st.f["labels"][n][:][rows] for n in st.label_names},
                         {"subset_of": str(path), "n_rows": int(rows.size)})
            return w.finish()
        finally:
            w.close()
