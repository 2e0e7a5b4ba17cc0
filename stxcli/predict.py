"""``stx predict``: a model directory + survey files, feature stores or an input catalog -> a FITS
catalog of labels with uncertainties and quality flags.

Streaming: rows are predicted chunk by chunk and spooled to a temporary HDF5 file beside the
output; the FITS binary table is then written in one pass (header, packed big-endian records,
padding), so memory stays flat however many spectra come in. An input catalog is the exception:
its output is that catalog, row for row, with the prediction columns appended (held in memory,
a few numbers per row). Every output is written atomically.

Output columns (lower case): id, survey, source_file, source_row, targetid / obsid where the
inputs carry them, ra, dec, for each label L: L and L_err (TUNIT K or dex), snr, flags (int32,
:mod:`stxcli.flags`: the featurizer's LOW_SNR, HEAVY_MASK, ... plus OUT_OF_DOMAIN and
OUT_OF_LABEL_RANGE: a label more than 1 sigma beyond the training range). Header: MODEL,
MODELSHA (manifest sha256), STXVER, and the flag bits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, console
from . import flags as F
from .coalesce import columns_signature
from .errors import FormatError, ModelFileError, StxError, UnknownFormat, UsageError
from .io import atomic_file

STORE_SUFFIXES = (".h5", ".hdf5")
CATALOG_SUFFIXES = (".csv", ".ecsv")
PATH_COLUMNS = ("path", "file", "filename", "spectrum", "spec_file", "fits_file")
ROW_COLUMNS = ("row", "source_row", "hdu_row")
TARGETID_COLUMNS = ("targetid",)
ID_EXTRAS = ("targetid", "obsid")
HDU_NAME = "PREDICTIONS"


# ------------------------------------------------------------------------------- the chunk stream


@dataclass
class Chunk:
    """Features of ``n`` spectra plus the per-spectrum columns that travel to the output."""

    features: np.ndarray
    columns: dict[str, np.ndarray]  # id, survey, source_file, source_row, ra, dec, targetid, ...
    snr: np.ndarray
    flags: np.ndarray
    #: the features' ivar: a model whose encoder reads raw spectra masks ivar-0 pixels
    ivar: np.ndarray | None = None


def _col(d: dict[str, np.ndarray], key: str, n: int, fill: Any, dtype: Any) -> np.ndarray:
    v = d.get(key)
    if v is None:
        return np.full(n, fill, dtype=dtype)
    return np.asarray(v).astype(dtype, copy=False)


def _text(v: Any, n: int) -> np.ndarray:
    """A string column as it came (UTF-8 ``S`` bytes from a store stay bytes), or "" fill."""
    if v is None:
        return np.full(n, "", dtype=str)
    v = np.asarray(v)
    return v if v.dtype.kind in ("S", "U") else v.astype(str)


def _columns_from(ids: np.ndarray, meta: dict[str, Any], n: int) -> dict[str, np.ndarray]:
    cols = {"id": _text(ids, n),
            "survey": _text(meta.get("survey"), n),
            "source_file": _text(meta.get("source_file"), n),
            "source_row": _col(meta, "source_row", n, -1, np.int64)}
    for k in ID_EXTRAS:
        if k in meta:
            cols[k] = np.asarray(meta[k]).astype(np.int64)
    cols["ra"] = _col(meta, "ra", n, np.nan, np.float64)
    cols["dec"] = _col(meta, "dec", n, np.nan, np.float64)
    return cols


#: rows of a store's ids, meta and quality columns read at once when predicting (a few MB)
META_ROWS = 65536


def chunk_bounds(n: int, chunk_rows: int, runs: Sequence[tuple[int, int, int]] | None = None
                 ) -> Iterator[tuple[int, int]]:
    """``[s, e)`` row ranges of at most ``chunk_rows`` covering ``0..n`` in order, none crossing
    the end of one of ``runs`` (``(row0, row1, offset)``, as :meth:`FeatureStore.runs`)."""
    ends = sorted({r1 for _, r1, _ in runs or ()} | {n})
    s, k = 0, 0
    while s < n:
        while ends[k] <= s:
            k += 1
        e = min(s + chunk_rows, ends[k])
        yield s, e
        s = e


def needs_ivar(model: Any) -> bool:
    """Whether ``model`` reads the features' ivar (an encoder in front masks ivar-0 pixels): only
    then do chunks carry it."""
    return bool(getattr(model, "needs_ivar", False))


def store_chunks(path: Path, model: Any, chunk_rows: int) -> Iterator[Chunk]:
    from .store import FeatureStore
    from .train import StoreSource, check_featurizer

    src = StoreSource(path)
    try:
        check_featurizer(src, model.featurizer, model.mdir.path)
        if src.dim != model.input_dim:
            raise ModelFileError(f"{path}: {src.dim} features, model {model.mdir.path} expects {model.input_dim}")
        st: FeatureStore = src.store
        with_ivar = needs_ivar(model)
        # Features straight from the file's pages where they lie back to back (the model
        # standardises them into its own buffer: one pass instead of a copy and a pass), chunks
        # cut at the runs' ends; else one reused buffer (each chunk is consumed before the next).
        runs = None if with_ivar else st.runs("features")
        shape = (min(chunk_rows, max(st.n, 1)), st.dim)
        buf = None  # made when a slab cannot be mapped
        ibuf = np.empty(shape, dtype=np.float32) if with_ivar else None
        blk_s = blk_e = 0
        blk: dict[str, Any] = {}
        for s, e in chunk_bounds(st.n, chunk_rows, runs):
            x = st.mapped("features", s, e) if runs else None
            if x is None:
                buf = np.empty(shape, dtype=np.float32) if buf is None else buf
                x = st.read_into("features", s, e, buf)
            iv = None if ibuf is None else st.read_into("ivar", s, e, ibuf)
            if not (blk_s <= s and e <= blk_e):  # a dozen small columns: read many chunks' worth at once
                blk_s, blk_e = s, min(st.n, s + max(chunk_rows, META_ROWS))
                blk = st.read(blk_s, blk_e, fields=("ids", "quality", "meta"), utf8=True)  # the FITS table wants bytes
            a, b = s - blk_s, e - blk_s
            n = e - s
            q = {k: v[a:b] for k, v in blk["quality"].items()}
            meta = {k: v[a:b] for k, v in blk["meta"].items()}
            yield Chunk(x, _columns_from(blk["ids"][a:b], meta, n),
                        _col(q, "snr", n, np.nan, np.float32), _col(q, "flags", n, 0, np.int32), iv)
    finally:
        src.close()


def model_featurizer(model: Any) -> Any:
    """The featurizer the model was trained with, rebuilt from the manifest and checked."""
    from .pipeline import build_featurizer, searching_assets
    from .registry import get_registry
    from .store import featurizer_key
    from .train import featurizer_identity

    f = model.featurizer
    if f["name"] not in get_registry().items["featurizer"]:
        known = ", ".join(get_registry().names("featurizer")) or "none"
        raise ModelFileError(f"{model.mdir.path}: the model needs featurizer {f['name']!r}, which is not "
                             f"installed (installed: {known})")
    with searching_assets(model.mdir.assets()):
        feat = build_featurizer(f["name"], f["config"])
    key = featurizer_key(feat.name, feat.version, feat.config())
    # compared by identity: a featurizer config may also say where a file lies (the encoder's path)
    if featurizer_identity({"name": feat.name, "version": feat.version, "config": feat.config(), "key": key}) \
            != featurizer_identity(f):
        now = feat.config()
        diff = sorted(k for k in set(now) | set(f["config"]) if now.get(k) != f["config"].get(k))
        what = f"config differs in: {', '.join(diff)}" if diff else f"version {f['version']} -> {feat.version}"
        raise ModelFileError(f"{model.mdir.path}: installed featurizer {feat.name} {feat.version} does not "
                             f"reproduce the model's ({what}): features would differ")
    return feat


#: spectra read from a survey file at a time when predicting from files: the raw arrays of a
#: DESI coadd are ~0.4 MB per spectrum, so reading --chunk-size (4096) of them at once cost GBs
READ_ROWS = 256


def _chunk_of(batches: list[Any], need_ivar: bool = True) -> Chunk:
    """One chunk from consecutive feature batches (of one file or several with the same
    :func:`_schema`); the features' ivar only when ``need_ivar`` (a model with an encoder front
    reads it; for others its copy is wasted)."""
    cols: dict[str, list[np.ndarray]] = {}
    for fb in batches:
        m, n = fb.meta, fb.features.shape[0]
        meta = {"id": m.ids, "survey": np.full(n, m.survey), "source_file": m.source_file,
                "source_row": m.source_row, "ra": m.ra, "dec": m.dec, **m.extra,
                "snr": _col(fb.quality, "snr", n, np.nan, np.float32),
                "flags": _col(fb.quality, "flags", n, 0, np.int32)}
        for k, v in meta.items():
            cols.setdefault(k, []).append(np.asarray(v))
    if len(batches) == 1:
        fb = batches[0]
        x, iv = fb.features, (fb.ivar if need_ivar else None)
        c = {k: v[0] for k, v in cols.items()}
    else:
        x = np.concatenate([fb.features for fb in batches])
        iv = np.concatenate([fb.ivar for fb in batches]) if need_ivar else None
        c = {k: np.concatenate(v) for k, v in cols.items() if len(v) == len(batches)}
    n = x.shape[0]
    snr, flags = c.pop("snr"), c.pop("flags")
    return Chunk(x, _columns_from(c.pop("id"), c, n), snr, flags, iv)


def _schema(fb: Any) -> tuple[Any, ...]:
    """What must agree for feature batches to share a chunk: the reader's extra columns (names,
    kinds, shapes) and the feature width; batches of different readers start a new chunk."""
    return fb.features.shape[1], columns_signature(fb.meta.extra)


def file_chunks(paths: Sequence[Path], feat: Any, fmt: str | None, chunk_rows: int,
                threads: int = 1, readers: dict[Path, Any] | None = None,
                need_ivar: bool = True) -> Iterator[Chunk]:
    """Featurize survey files on the fly: read ``READ_ROWS`` spectra at a time (memory stays
    that of a few hundred raw spectra per thread whatever the file holds), ``threads`` batches at
    once (:func:`stxcli.pipeline.transform_stream`), and predict ``chunk_rows`` at a time. Small
    files share chunks while their columns agree (:func:`_schema`): one model call per file cost
    one-spectrum files (LAMOST) a quarter of their time; a chunk of at least ``READ_ROWS`` spectra
    ends with its file, so that large files (DESI coadds) are predicted while the pool featurizes
    the next (one chunk of 4 coadds left the model's whole work to the end). Chunks carry the
    features' ivar only when ``need_ivar``."""
    from .pipeline import FileStart, featurize_files

    pending: list[Any] = []
    rows = 0
    schema = None
    for item in featurize_files(paths, feat, format=fmt, chunk_size=min(chunk_rows, READ_ROWS), threads=threads,
                                readers=readers):
        if isinstance(item, FileStart):
            if rows >= READ_ROWS:  # a file's worth: predicted while the pool featurizes the next
                yield _chunk_of(pending, need_ivar)
                pending, rows = [], 0
            continue
        s = _schema(item)
        if pending and s != schema:
            yield _chunk_of(pending, need_ivar)
            pending, rows = [], 0
        schema = s
        pending.append(item)
        rows += item.features.shape[0]
        if rows >= chunk_rows:
            yield _chunk_of(pending, need_ivar)
            pending, rows = [], 0
    if pending:
        yield _chunk_of(pending, need_ivar)


# ----------------------------------------------------------------------------- the predictions


def _model_outputs(model: Any, x: np.ndarray, ivar: np.ndarray | None, device: str) -> dict[str, np.ndarray]:
    if needs_ivar(model):  # an encoder in front reads raw spectra and their ivar
        return model.predict(x, device=device, ivar=ivar)
    return model.predict(x, device=device)


def predict_chunk(model: Any, ch: Chunk, device: str) -> dict[str, np.ndarray]:
    """Prediction columns for one chunk: L, L_err per label, snr, flags.

    A spectrum flagged ``NO_OVERLAP`` has no feature at all (a dead fibre, an arm off the grid):
    it is not run through the model, and its labels and errors are NaN (a value made from the
    featurizer's fill would be a number with no data behind it); its flags say why."""
    n = len(ch.flags)
    empty = (np.asarray(ch.flags) & F.NO_OVERLAP) != 0
    if not empty.any():
        p = _model_outputs(model, ch.features, ch.ivar, device)
    else:
        keep = np.flatnonzero(~empty)
        L = len(model.specs)
        p = {"value": np.full((n, L), np.nan), "err": np.full((n, L), np.nan),
             "out_of_domain": np.zeros(n, bool)}
        if keep.size:
            q = _model_outputs(model, ch.features[keep], None if ch.ivar is None else ch.ivar[keep], device)
            for k, v in q.items():
                p[k][keep] = v
    flags = ch.flags.astype(np.int32).copy()
    flags[p["out_of_domain"]] |= F.OUT_OF_DOMAIN
    out: dict[str, np.ndarray] = {}
    beyond = np.zeros(len(flags), bool)
    for j, s in enumerate(model.specs):
        v, e = p["value"][:, j], p["err"][:, j]
        beyond |= (v + e < s.lo) | (v - e > s.hi)  # beyond the training range by more than 1 sigma
        out[s.name] = v.astype(np.float32)
        out[f"{s.name}_err"] = p["err"][:, j].astype(np.float32)
    flags[beyond] |= F.OUT_OF_LABEL_RANGE
    out["snr"] = ch.snr.astype(np.float32)
    out["flags"] = flags
    return out


# -------------------------------------------------------------------------- streaming FITS table


@dataclass
class Spool:
    """Column chunks spooled to raw files in a temporary folder (flat memory), then written out as
    one FITS binary table. Each chunk is one file of its columns' bytes back to back; where each
    lies (dtype, offset, shape) stays in memory. Strings are kept as UTF-8 bytes; their FITS width
    is the longest seen. A column missing from some chunks gets its fill value there.

    (Raw bytes rather than ``.npz``: with the zip container's per-array headers, CRCs and parsing,
    spooling and writing 40,000 rows took 73 ms, 4 % of ``stx predict`` from a store; now 27 ms.)"""

    folder: Path
    n: int = 0
    order: list[str] = field(default_factory=list)
    dtypes: dict[str, np.dtype] = field(default_factory=dict)
    str_width: dict[str, int] = field(default_factory=dict)
    files: list[tuple[Path, int, dict[str, tuple[np.dtype, int, tuple[int, ...]]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=False)

    def append(self, cols: dict[str, np.ndarray]) -> None:
        m = len(next(iter(cols.values())))
        layout: dict[str, tuple[np.dtype, int, tuple[int, ...]]] = {}
        path = self.folder / f"c{len(self.files):07d}.bin"
        with open(path, "wb") as fh:
            at = 0
            for k, v in cols.items():
                v = np.asarray(v)
                if v.dtype.kind in ("U", "S", "O"):
                    v = np.char.encode(v.astype(str), "utf-8") if v.dtype.kind != "S" else v
                    self.str_width[k] = max(self.str_width.get(k, 1), v.dtype.itemsize)
                elif k not in self.dtypes:
                    self.dtypes[k] = v.dtype
                if k not in self.order:
                    self.order.append(k)
                v = np.ascontiguousarray(v)
                fh.write(v.tobytes() if v.dtype.kind == "S" else memoryview(v).cast("B"))
                layout[k] = (v.dtype, at, v.shape)
                at += v.nbytes
        self.files.append((path, m, layout))
        self.n += m

    def close(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=True)

    def write_fits(self, out: Path, order: Sequence[str], units: dict[str, str],
                   header: dict[str, tuple[Any, str]]) -> None:
        from astropy.io import fits

        cols, dtypes = [], []
        for k in order:
            if k in self.str_width:
                w = self.str_width[k]
                cols.append(fits.Column(name=k, format=f"{w}A"))
                dtypes.append((k, f"S{w}"))
            else:
                code, be = _fits_format(self.dtypes[k])
                cols.append(fits.Column(name=k, format=code, unit=units.get(k) or None))
                dtypes.append((k, be))
        hdu = fits.BinTableHDU.from_columns(fits.ColDefs(cols), nrows=0, name=HDU_NAME)
        th = hdu.header
        th["NAXIS2"] = self.n
        for key, (val, comment) in header.items():
            th[key] = (val, comment)
        rec = np.dtype(dtypes)
        if rec.itemsize != th["NAXIS1"]:
            raise StxError(f"internal error: record size {rec.itemsize} != NAXIS1 {th['NAXIS1']}")
        ph = fits.PrimaryHDU().header
        for key, (val, comment) in header.items():
            ph[key] = (val, comment)
        with open(out, "wb") as fh:
            fh.write(ph.tostring().encode("ascii"))
            fh.write(th.tostring().encode("ascii"))
            size = 0
            for path, m, layout in self.files:
                buf = np.zeros(m, dtype=rec)
                raw = path.read_bytes()
                for k in order:
                    if k in layout:
                        dt, off, shape = layout[k]
                        buf[k] = np.frombuffer(raw, dtype=dt, count=math.prod(shape), offset=off).reshape(shape)
                    elif k not in self.str_width:
                        buf[k] = _fill_for(self.dtypes[k])
                data = buf.tobytes()
                fh.write(data)
                size += len(data)
            fh.write(b"\0" * ((-size) % 2880))


def write_catalog(spool: Spool, path: Path, model: Any) -> int:
    """The spooled predictions as the output catalog at ``path``: ids first, then each label and
    its error (TUNIT from the model), SNR and flags, with the model's header cards; the number of
    rows. No spectrum at all is an error."""
    if spool.n == 0:
        raise StxError("no spectra to predict")
    order = [c for c in ("id", "survey", "source_file", "source_row", *ID_EXTRAS, "ra", "dec") if c in spool.order]
    units: dict[str, str] = {}
    for s in model.specs:
        order += [s.name, f"{s.name}_err"]
        units[s.name] = units[f"{s.name}_err"] = s.unit
    order += ["snr", "flags"]
    spool.write_fits(path, order, units, header_cards(model))
    return spool.n


def _fill_for(dtype: np.dtype) -> Any:
    if dtype.kind == "f":
        return np.nan
    if dtype.kind in ("i", "u"):
        return -1
    if dtype.kind == "b":
        return False
    return None


def _fits_format(dtype: np.dtype) -> tuple[str, str]:
    dt = np.dtype(dtype)
    table = {("f", 4): ("E", ">f4"), ("f", 8): ("D", ">f8"), ("i", 2): ("I", ">i2"), ("i", 4): ("J", ">i4"),
             ("i", 8): ("K", ">i8"), ("u", 1): ("B", "u1"), ("b", 1): ("L", "i1")}
    key = (dt.kind, dt.itemsize)
    if key not in table:
        raise StxError(f"internal error: no FITS format for dtype {dt}")
    return table[key]


def header_cards(model: Any) -> dict[str, tuple[Any, str]]:
    cards: dict[str, tuple[Any, str]] = {
        "MODEL": (model.mdir.name[:68], "stx model name"),
        "MODELSHA": (model.mdir.manifest_sha256, ""),  # 64 hex digits: no room for a comment
        "MODELKND": (model.mdir.kind, "pretrained or finetuned"),
        "STXVER": (__version__, "stx version"),
        "LABELS": (",".join(model.label_names)[:68], "predicted labels"),
    }
    for bit, name in F.NAMES.items():
        cards[f"FLAG{bit.bit_length() - 1}"] = (name, f"flags bit {bit.bit_length() - 1} (value {bit})")
    return cards


# ---------------------------------------------------------------------------------- the command


def classify_inputs(inputs: Sequence[str], readers: dict[Path, Any] | None = None
                    ) -> tuple[list[Path], list[Path], Path | None]:
    """(stores, survey files, catalog) from the command's INPUT arguments. A lone FITS input is
    identified here (a spectrum file or an input catalog?), its reader put in ``readers`` when
    given (not identified twice); with several inputs none can be a catalog, and FITS files are
    identified as they are read, each just before its reader opens it: probing 10^5 LAMOST files
    up front took minutes before the progress bar started, and decompressed every file twice
    (the probe's bytes are kept for the reader that follows it, not for 10^5 files later)."""
    from .pipeline import expand_inputs
    from .registry import get_registry, identify

    stores, files, catalogs = [], [], []
    rest: list[str] = []
    lone = len(inputs) == 1
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            raise StxError(f"{p}: no such file or directory")
        name = p.name.lower()
        if p.is_file() and name.endswith(STORE_SUFFIXES):
            stores.append(p)
        elif p.is_file() and name.endswith(CATALOG_SUFFIXES):
            catalogs.append(p)
        elif p.is_file() and name.endswith((".fits", ".fit", ".fits.gz")) and lone:
            try:
                reader = identify(p, get_registry())
                rest.append(raw)
                if readers is not None:
                    readers[p] = reader
            except FormatError:
                if _is_catalog(p):
                    catalogs.append(p)
                else:
                    raise
        else:
            rest.append(raw)
    if rest:
        files = expand_inputs(rest)
    if catalogs and (len(catalogs) > 1 or stores or files):
        raise UsageError("an input catalog must be the only INPUT (its rows define the output rows)")
    return stores, files, (catalogs[0] if catalogs else None)


def _is_catalog(p: Path) -> bool:
    from astropy.io import fits

    try:
        with fits.open(p, memmap=False) as hdul:
            for h in hdul[1:]:
                if isinstance(h, fits.BinTableHDU | fits.TableHDU):
                    names = {c.lower() for c in h.columns.names}
                    return bool(names & set(PATH_COLUMNS))
    except (OSError, ValueError):
        return False
    return False


def run_predict(model_path: str | Path, inputs: Sequence[str], output: str | Path, *,
                format: str | None = None, chunk_rows: int = 4096, device: str = "cpu",
                threads: int | None = None, path_column: str | None = None,
                row_column: str | None = None, targetid_column: str | None = None,
                prefix: str = "") -> dict[str, Any]:
    """Programmatic ``stx predict``; returns the summary."""
    import torch

    from .model import load_model

    if chunk_rows < 1:
        raise UsageError("--chunk-size must be >= 1")
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be >= 1")
        torch.set_num_threads(threads)
    from .pipeline import default_threads

    feat_threads = threads if threads is not None else default_threads()
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StxError("--device cuda: no CUDA device is available to torch")
    output = Path(output)
    if not output.name.lower().endswith((".fits", ".fit")):
        raise UsageError(f"-o {output}: the output is a FITS table (name it .fits)")
    model = load_model(model_path).to(device)
    readers: dict[Path, Any] = {}
    stores, files, catalog = classify_inputs(inputs, readers)
    t0 = time.perf_counter()
    if catalog is not None:
        n, flag_counts = _predict_catalog(model, catalog, output, format=format, chunk_rows=chunk_rows,
                                          device=device, path_column=path_column, row_column=row_column,
                                          targetid_column=targetid_column, prefix=prefix, threads=feat_threads)
    else:
        if prefix:
            raise UsageError("--prefix applies to an input catalog only")
        feat = model_featurizer(model) if files else None
        n, flag_counts = _predict_stream(model, stores, files, feat, output, format=format,
                                         chunk_rows=chunk_rows, device=device, threads=feat_threads,
                                         readers=readers)
    dt = time.perf_counter() - t0
    for name, count in flag_counts.items():
        if name in ("OUT_OF_DOMAIN", "OUT_OF_LABEL_RANGE") and count:
            console.warn(f"{count} of {n} spectra flagged {name}")
    return {"output": str(output), "model": str(model_path), "model_kind": model.mdir.kind,
            "manifest_sha256": model.mdir.manifest_sha256, "n_spectra": n, "labels": model.label_names,
            "flags": flag_counts, "time_s": round(dt, 3), "spectra_per_s": round(n / dt, 1) if dt > 0 else None,
            "inputs": {"stores": [str(s) for s in stores], "files": len(files),
                       "catalog": str(catalog) if catalog else None}}


def _count_flags(counts: dict[str, int], flags: np.ndarray) -> None:
    for bit, name in F.NAMES.items():
        c = int(((flags & bit) != 0).sum())
        if c:
            counts[name] = counts.get(name, 0) + c


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` inside (None: unchanged), restored after."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _predict_stream(model: Any, stores: list[Path], files: list[Path], feat: Any, output: Path, *,
                    format: str | None, chunk_rows: int, device: str, threads: int = 1,
                    readers: dict[Path, Any] | None = None) -> tuple[int, dict[str, int]]:
    from .pipeline import long_lived_frozen

    def chunks() -> Iterator[Chunk]:
        for s in stores:
            yield from store_chunks(s, model, chunk_rows)
        if files:
            # while a pool of ``threads`` featurizes on as many cores, the model runs on this
            # thread alone: its own threads would only contend with the pool's and spin between
            # chunks (measured on DESI coadds, 2 cores: 6 % less CPU, 5 % less time). Each chunk
            # is handed on once the next is ready, so the last one is known: the pool is done by
            # then, and the model has every thread for it (the run's tail, a file's worth)
            pooled = threads > 1 and getattr(feat, "thread_safe", False) and device == "cpu"
            last = None
            with _torch_threads(1 if pooled else None):
                for ch in file_chunks(files, feat, format, chunk_rows, threads, readers,
                                      need_ivar=needs_ivar(model)):
                    if last is not None:
                        yield last
                    last = ch
            if last is not None:
                yield last

    counts: dict[str, int] = {}
    with atomic_file(output) as tmp:
        spool = Spool(tmp.with_name(tmp.name + ".spool"))
        try:
            with console.progress("predict", total=None) as bar, closing(chunks()) as stream, \
                    long_lived_frozen():
                try:
                    for ch in stream:
                        if ch.features.shape[1] != model.input_dim:
                            raise ModelFileError(f"features have {ch.features.shape[1]} columns, model expects "
                                                 f"{model.input_dim}")
                        pred = predict_chunk(model, ch, device)
                        _count_flags(counts, pred["flags"])
                        spool.append({**ch.columns, **pred})
                        bar.advance(len(ch.snr))
                except UnknownFormat as exc:  # files are identified as they are read (classify_inputs)
                    if _is_catalog(exc.path):
                        raise UsageError(f"{exc.path}: an input catalog must be the only INPUT (its rows define "
                                         f"the output rows)") from exc
                    raise
            n = write_catalog(spool, tmp, model)
        finally:
            spool.close()
    return n, counts


# ------------------------------------------------------------------------------- input catalogs


def _pick(colnames: list[str], given: str | None, candidates: Sequence[str], what: str) -> str | None:
    lower = {c.lower(): c for c in colnames}
    if given:
        if given in colnames:
            return given
        if given.lower() in lower:
            return lower[given.lower()]
        raise StxError(f"input catalog has no {what} column {given!r} (columns: {', '.join(colnames)})")
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


def _read_catalog(path: Path) -> Any:
    """The input catalog as an astropy Table, names and types as the user wrote them (it is
    written back out with the predictions appended)."""
    from astropy.table import Table

    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv"}.get(path.suffix.lower())
    try:
        return Table.read(path, format=fmt) if fmt else Table.read(path)
    except Exception as exc:  # astropy raises many kinds for a bad table
        raise StxError(f"{path}: cannot read the input catalog ({type(exc).__name__}: {exc})") from exc


def _predict_catalog(model: Any, catalog: Path, output: Path, *, format: str | None, chunk_rows: int,
                     device: str, path_column: str | None, row_column: str | None,
                     targetid_column: str | None, prefix: str, threads: int = 1) -> tuple[int, dict[str, int]]:
    from .pipeline import FileStart, featurize_files

    cat = _read_catalog(catalog)
    names = list(cat.colnames)
    pcol = _pick(names, path_column, PATH_COLUMNS, "path")
    if pcol is None:
        raise StxError(f"{catalog}: no column of spectrum paths (looked for {', '.join(PATH_COLUMNS)}; "
                       f"use --path-column)")
    rcol = _pick(names, row_column, ROW_COLUMNS, "row")
    tcol = _pick(names, targetid_column, TARGETID_COLUMNS, "targetid") if rcol is None or targetid_column else None
    n = len(cat)
    pred_names = []
    for s in model.specs:
        pred_names += [f"{prefix}{s.name}", f"{prefix}{s.name}_err"]
    pred_names += [f"{prefix}snr", f"{prefix}flags"]
    clash = [c for c in pred_names if c.lower() in {x.lower() for x in names}]
    if clash:
        raise UsageError(f"{catalog}: already has column(s) {', '.join(clash)}; use --prefix (e.g. --prefix pred_)")
    paths = [str(v).strip() for v in np.asarray(cat[pcol])]
    rows = np.asarray(cat[rcol]).astype(np.int64) if rcol else None
    tids = np.asarray(cat[tcol]).astype(np.int64) if tcol else None
    resolved = []
    for i, p in enumerate(paths):
        q = Path(p)
        if not q.is_absolute() and not q.exists() and (catalog.parent / q).exists():
            q = catalog.parent / q
        if not q.exists():
            raise StxError(f"{catalog}: row {i}: spectrum file {p} not found")
        resolved.append(q)
    feat = model_featurizer(model)
    out = {s.name: np.full(n, np.nan, np.float32) for s in model.specs}
    out.update({f"{s.name}_err": np.full(n, np.nan, np.float32) for s in model.specs})
    out["snr"] = np.full(n, np.nan, np.float32)
    out["flags"] = np.zeros(n, np.int32)
    done = np.zeros(n, bool)
    by_file: dict[Path, list[int]] = {}
    for i, q in enumerate(resolved):
        by_file.setdefault(q, []).append(i)
    counts: dict[str, int] = {}
    pend: list[tuple[np.ndarray, Chunk]] = []  # rows matched, predicted chunk_rows at a time across files
    n_pend = 0

    def flush() -> None:
        nonlocal n_pend
        if not pend:
            return
        ci = np.concatenate([p[0] for p in pend])
        parts = [p[1] for p in pend]
        ch = parts[0] if len(parts) == 1 else Chunk(
            np.concatenate([c.features for c in parts]), {}, np.concatenate([c.snr for c in parts]),
            np.concatenate([c.flags for c in parts]), np.concatenate([c.ivar for c in parts]))
        pred = predict_chunk(model, ch, device)
        for c, v in pred.items():
            out[c][ci] = v
        done[ci] = True
        pend.clear()
        n_pend = 0

    with console.progress("predict", total=len(by_file)) as bar:
        q, want = None, np.zeros(0, np.int64)
        # one stream over the files: one-spectrum files are featurized together (stxcli.coalesce)
        for fb in featurize_files(list(by_file), feat, format=format, chunk_size=min(chunk_rows, READ_ROWS),
                                  threads=threads):
            if isinstance(fb, FileStart):
                if q is not None:
                    bar.advance(1)
                q, want = fb.path, np.asarray(by_file[fb.path])
                continue
            m = fb.meta
            k = fb.features.shape[0]
            if rows is not None:
                key_file, key_cat = np.asarray(m.source_row, np.int64), rows[want]
            elif tids is not None:
                if "targetid" not in m.extra:
                    raise StxError(f"{q}: spectra carry no TARGETID to match column {tcol!r}")
                key_file, key_cat = np.asarray(m.extra["targetid"], np.int64), tids[want]
            else:
                if k != 1 or fb.meta.source_row[0] != 0:
                    raise StxError(f"{q}: file holds several spectra; give a row or TARGETID column "
                                   f"(--row-column / --targetid-column)")
                key_file, key_cat = np.zeros(1, np.int64), np.zeros(len(want), np.int64)
            pos = {int(v): j for j, v in enumerate(key_file)}
            hit = [(ci, pos[int(kc)]) for ci, kc in zip(want, key_cat) if int(kc) in pos]
            if not hit:
                continue
            ci = np.array([h[0] for h in hit])
            fj = np.array([h[1] for h in hit])
            pend.append((ci, Chunk(fb.features[fj], {}, _col(fb.quality, "snr", k, np.nan, np.float32)[fj],
                                   _col(fb.quality, "flags", k, 0, np.int32)[fj], fb.ivar[fj])))
            n_pend += ci.size
            if n_pend >= chunk_rows:
                flush()
        if q is not None:
            bar.advance(1)
        flush()
    if not done.all():
        i = int(np.flatnonzero(~done)[0])
        raise StxError(f"{catalog}: {int((~done).sum())} row(s) match no spectrum in their file "
                       f"(e.g. row {i}: {paths[i]})")
    _count_flags(counts, out["flags"])
    from astropy.io import fits
    from astropy.table import Table

    table = Table(cat, copy=True)
    units = {s.name: s.unit for s in model.specs}
    for c, v in out.items():
        table[f"{prefix}{c}"] = v
    hdu = fits.table_to_hdu(table)
    hdu.name = HDU_NAME
    for c in out:  # TUNIT set directly: astropy drops 'dex', which is not a FITS-standard unit
        base = c[:-4] if c.endswith("_err") else c
        if units.get(base):
            hdu.header[f"TUNIT{table.colnames.index(prefix + c) + 1}"] = units[base]
    for key, (val, comment) in header_cards(model).items():
        hdu.header[key] = (val, comment)
    with atomic_file(output) as tmp:
        fits.HDUList([fits.PrimaryHDU(), hdu]).writeto(tmp)
    return n, counts
