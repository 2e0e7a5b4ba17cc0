"""The training loop shared by every head and adapter, and the pretrain / finetune drivers.

Data come from feature stores in contiguous chunks (never random row indexing): the rows a run
uses are a boolean mask per store (labelled, optionally subsampled with ``n_train``, split into
training and validation at random with a seed). When the selected training rows fit in
``cache_mb`` they are read once into memory; otherwise every epoch streams the store, shuffling
the chunk order and the rows within a buffer of chunks, so stores larger than memory train.

Loss: the heteroscedastic Gaussian negative log-likelihood in standardised label space,
averaged over the (star, label) pairs that have a label (masked loss), weighted per store, and
over ensemble members. Early stopping on the validation NLL restores the best epoch's weights.

torch is imported inside functions (keeps ``stx --help`` fast); ``stxcli.model`` likewise.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, console
from .errors import ModelFileError, StxError, UsageError
from .store import featurizer_identity  # noqa: F401 - re-exported: models and predict compare featurizers by it

#: Loop defaults; a head's or adapter's ``training_defaults()`` override them, the CLI overrides both.
LOOP_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "weight_decay": 0.0, "epochs": 100, "batch_size": 256,
                                 "patience": 10, "grad_clip": 5.0}
#: A run needs at least this many training and validation stars.
MIN_TRAIN, MIN_VAL = 10, 5
LOG_2PI = math.log(2 * math.pi)


@dataclass
class TrainOptions:
    """Options of one training run; ``None`` means: the head's / adapter's default."""

    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    patience: int | None = None
    grad_clip: float | None = None
    val_frac: float = 0.2
    n_train: int | None = None
    seed: int = 0
    augment_noise: float = 0.0
    device: str = "cpu"
    threads: int | None = None
    chunk_rows: int = 4096
    buffer_chunks: int = 8
    cache_mb: float = 2048.0
    min_delta: float = 1e-4
    calibrate_errors: bool = True

    def resolve(self, *defaults: dict[str, Any]) -> dict[str, Any]:
        out = dict(LOOP_DEFAULTS)
        for d in defaults:
            out.update({k: v for k, v in (d or {}).items() if k in LOOP_DEFAULTS})
        for k in LOOP_DEFAULTS:
            v = getattr(self, k)
            if v is not None:
                out[k] = v
        for k in ("epochs", "batch_size", "patience"):
            if int(out[k]) < 1:
                raise UsageError(f"--{k.replace('_', '-')} must be >= 1, got {out[k]}")
            out[k] = int(out[k])
        if not out["lr"] > 0:
            raise UsageError(f"--lr must be > 0, got {out['lr']}")
        if out["weight_decay"] < 0 or (out["grad_clip"] or 0) < 0:
            raise UsageError("--weight-decay and the gradient clip must be >= 0")
        if self.augment_noise < 0:
            raise UsageError(f"--augment-noise must be >= 0, got {self.augment_noise}")
        return out


# ------------------------------------------------------------------------------------- sources


class Source:
    """Rows of one feature store (or of in-memory arrays) and the loss weight of its stars."""

    name: str
    n: int
    dim: int
    weight: float
    featurizer: dict[str, Any]

    def read(self, start: int, stop: int, ivar: bool) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def labels(self, names: Sequence[str]) -> np.ndarray:
        """(n, L) float32 physical labels; NaN where missing (or where the store lacks one)."""
        raise NotImplementedError

    def label_names(self) -> list[str]:
        raise NotImplementedError

    def empty_rows(self) -> np.ndarray | None:
        """(n,) bool: the rows without any feature (flagged ``NO_OVERLAP``: a dead fibre, a
        spectrum off the grid), or None when every row has data. They are never trained on."""
        return None

    def units(self) -> dict[str, str]:
        return {}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "rows": self.n, "weight": self.weight}

    def close(self) -> None:
        pass


class StoreSource(Source):
    def __init__(self, path: str | Path, weight: float = 1.0) -> None:
        from .store import FeatureStore

        self.path = Path(path)
        self.store = FeatureStore.open(self.path)
        self.name, self.n, self.dim, self.weight = str(path), self.store.n, self.store.dim, float(weight)
        st = self.store
        self.featurizer = {"name": st.featurizer_name, "version": st.featurizer_version,
                           "config": st.featurizer_config, "key": st.featurizer_key}

    def read(self, start: int, stop: int, ivar: bool) -> tuple[np.ndarray, np.ndarray | None]:
        d = self.store.read(start, stop, fields=("features", "ivar") if ivar else ("features",))
        return d["features"], d.get("ivar")

    def label_names(self) -> list[str]:
        return self.store.label_names

    def units(self) -> dict[str, str]:
        return self.store.label_units

    def empty_rows(self) -> np.ndarray | None:
        from . import flags as F

        fl = self.store.quality.get("flags")
        if fl is None:
            return None
        empty = (np.asarray(fl) & F.NO_OVERLAP) != 0
        return empty if empty.any() else None

    def labels(self, names: Sequence[str]) -> np.ndarray:
        have = set(self.store.label_names)
        cols = [self.store.labels([n])[:, 0] if n in have else np.full(self.n, np.nan, np.float32)
                for n in names]
        return np.stack(cols, 1).astype(np.float32)

    def info(self) -> dict[str, Any]:
        return {"path": str(self.path), "checksum": self.store.checksum, "rows": self.n, "weight": self.weight}

    def close(self) -> None:
        self.store.close()


class ArraySource(Source):
    """In-memory arrays behaving as a store (tests, benchmarks, programmatic use)."""

    def __init__(self, features: np.ndarray, labels: dict[str, np.ndarray], ivar: np.ndarray | None = None,
                 weight: float = 1.0, name: str = "arrays", featurizer: dict[str, Any] | None = None) -> None:
        self.x = np.asarray(features, np.float32)
        self.iv = np.ones_like(self.x) if ivar is None else np.asarray(ivar, np.float32)
        self._labels = {k: np.asarray(v, np.float32) for k, v in labels.items()}
        self.name, self.n, self.dim, self.weight = name, self.x.shape[0], self.x.shape[1], float(weight)
        self.featurizer = featurizer or {"name": "arrays", "version": "0", "config": {}, "key": "arrays"}

    def read(self, start: int, stop: int, ivar: bool) -> tuple[np.ndarray, np.ndarray | None]:
        return self.x[start:stop], (self.iv[start:stop] if ivar else None)

    def label_names(self) -> list[str]:
        return sorted(self._labels)

    def labels(self, names: Sequence[str]) -> np.ndarray:
        return np.stack([self._labels.get(n, np.full(self.n, np.nan, np.float32)) for n in names], 1)


def open_stores(paths: Sequence[str | Path], weights: Sequence[float] | None = None) -> list[Source]:
    """Open stores for one run; they must share one featurizer config (an error names both)."""
    if weights is not None and len(weights) != len(paths):
        raise UsageError(f"--weights gives {len(weights)} value(s) for {len(paths)} store(s)")
    sources: list[Source] = []
    try:
        for i, p in enumerate(paths):
            w = 1.0 if weights is None else float(weights[i])
            if not w > 0:
                raise UsageError(f"store weight must be > 0, got {w} for {p}")
            src = StoreSource(p, w)
            sources.append(src)
            first = sources[0]
            if featurizer_identity(src.featurizer) != featurizer_identity(first.featurizer):
                raise StxError(f"{first.name} and {src.name} were made with different featurizer configs "
                               f"({_fdesc(first.featurizer)} vs {_fdesc(src.featurizer)}); "
                               f"featurize both with the same settings")
            if src.dim != first.dim:
                raise StxError(f"{first.name} has {first.dim} features, {src.name} has {src.dim}")
    except BaseException:
        for s in sources:
            s.close()
        raise
    return sources


def _fdesc(f: dict[str, Any]) -> str:
    return f"{f['name']} {f['version']} key {str(f['key'])[:12]}"


def check_featurizer(source: Source, featurizer: dict[str, Any], model_path: Any) -> None:
    if featurizer_identity(source.featurizer) != featurizer_identity(featurizer):
        raise ModelFileError(f"{source.name} was made with another featurizer config than model {model_path} "
                             f"({_fdesc(source.featurizer)} vs {_fdesc(featurizer)}); featurize it with "
                             f"the model's settings (see the manifest's featurizer entry)")


# ----------------------------------------------------------------------------------- the split


@dataclass
class Split:
    train: list[np.ndarray]  # one bool mask per source
    val: list[np.ndarray]

    @property
    def n_train(self) -> int:
        return int(sum(m.sum() for m in self.train))

    @property
    def n_val(self) -> int:
        return int(sum(m.sum() for m in self.val))


def make_split(sources: Sequence[Source], labels: Sequence[np.ndarray], *, val_frac: float,
               n_train: int | None, seed: int) -> Split:
    """Labelled rows (any label known) -> optional seeded subsample of ``n_train`` stars ->
    random validation fraction. ``n_train`` counts every star used (training + validation)."""
    if not 0 < val_frac < 1:
        raise UsageError(f"--val-frac must be between 0 and 1, got {val_frac}")
    labelled = [np.isfinite(y).any(1) for y in labels]
    offsets = np.cumsum([0] + [len(m) for m in labelled])
    idx = np.concatenate([np.flatnonzero(m) + offsets[i] for i, m in enumerate(labelled)])
    rng = np.random.default_rng(seed)
    have = len(idx)
    if n_train is not None:
        if n_train < 1:
            raise UsageError(f"--n-train must be >= 1, got {n_train}")
        if n_train > have:
            raise StxError(f"--n-train {n_train} asks for more stars than the {have} labelled ones available")
        idx = np.sort(rng.choice(idx, size=n_train, replace=False))
    n = len(idx)
    n_val = int(round(val_frac * n))
    if n_val < MIN_VAL or n - n_val < MIN_TRAIN:
        raise StxError(f"fewer stars than the split needs: {n} labelled star(s) give {n - n_val} training and "
                       f"{n_val} validation stars; need at least {MIN_TRAIN} and {MIN_VAL} "
                       f"(add stars or change --val-frac)")
    perm = rng.permutation(n)
    val_idx = idx[perm[:n_val]]
    train_idx = idx[perm[n_val:]]
    tr, va = [], []
    for i, m in enumerate(labelled):
        a = np.zeros(len(m), bool)
        b = np.zeros(len(m), bool)
        lo, hi = offsets[i], offsets[i + 1]
        a[train_idx[(train_idx >= lo) & (train_idx < hi)] - lo] = True
        b[val_idx[(val_idx >= lo) & (val_idx < hi)] - lo] = True
        tr.append(a)
        va.append(b)
    return Split(tr, va)


def check_labels(sources: Sequence[Source], names: Sequence[str], labels: Sequence[np.ndarray],
                 split: Split) -> None:
    """Every label needs known values among the training stars (an all-NaN column is an error)."""
    for j, name in enumerate(names):
        n_known = sum(int(np.isfinite(y[m, j]).sum()) for y, m in zip(labels, split.train))
        if n_known < 2:
            where = ", ".join(s.name for s in sources)
            raise StxError(f"label {name!r} has {n_known} known value(s) among the training stars of {where} "
                           f"(all NaN?)")


def choose_labels(sources: Sequence[Source], requested: Sequence[str] | None) -> list[str]:
    """The labels of a run: ``requested``, else those every store has (teff, logg, feh first)."""
    if requested:
        names = list(dict.fromkeys(requested))
        for n in names:
            holders = [s for s in sources if n in s.label_names()]
            if not holders:
                have = ", ".join(sorted({x for s in sources for x in s.label_names()})) or "none"
                raise StxError(f"label {n!r} is missing from {', '.join(s.name for s in sources)} "
                               f"(labels present: {have})")
        return names
    common = set(sources[0].label_names())
    for s in sources[1:]:
        common &= set(s.label_names())
    if not common:
        raise StxError(f"{', '.join(s.name for s in sources)}: no label column common to the store(s); "
                       f"featurize with --labels CATALOG or pass --labels")
    first = [n for n in ("teff", "logg", "feh") if n in common]
    return first + sorted(common - set(first))


# --------------------------------------------------------------------------------- row reading


class RowSet:
    """The selected rows of several sources, read chunk by chunk (contiguous slabs)."""

    def __init__(self, sources: Sequence[Source], masks: Sequence[np.ndarray], y_std: Sequence[np.ndarray],
                 chunk_rows: int, want_ivar: bool) -> None:
        self.sources, self.masks, self.y_std = list(sources), list(masks), list(y_std)
        self.want_ivar = want_ivar
        self.chunk_rows = chunk_rows
        self.chunks = self._plan(chunk_rows)
        self.n = int(sum(m.sum() for m in masks))
        self.dim = sources[0].dim
        #: (mean, scale) once :meth:`Batches.standardize` ran: rows come out standardised
        self.norm: tuple[np.ndarray, np.ndarray] | None = None

    def _plan(self, rows: int) -> list[tuple[int, int, int]]:
        out = []
        for i, src in enumerate(self.sources):
            for s in range(0, src.n, rows):
                e = min(s + rows, src.n)
                if self.masks[i][s:e].any():
                    out.append((i, s, e))
        return out

    def read_chunk(self, c: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        i, s, e = c
        m = self.masks[i][s:e]
        x, iv = self.sources[i].read(s, e, self.want_ivar)
        x = np.asarray(x, np.float32)[m]  # boolean indexing copies: safe to modify in place
        iv = None if iv is None else np.asarray(iv, np.float32)[m]
        if self.norm is not None:
            mean, scale = self.norm
            x -= mean
            x *= scale
            if iv is not None:
                iv /= scale * scale
        y = self.y_std[i][s:e][m]
        w = np.full(len(y), self.sources[i].weight, np.float32)
        return x, iv, y, w

    def iter_chunks(self, order: Sequence[int] | None = None, sparse_ok: bool = False):
        chunks = self.chunks
        if sparse_ok and self.n < 0.25 * sum(c[2] - c[1] for c in chunks):
            chunks = self._plan(256)  # a sparse selection: read only small slabs around its rows
        for k in (order if order is not None else range(len(chunks))):
            yield self.read_chunk(chunks[k])

    def materialize(self) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]:
        xs, ivs, ys, ws = [], [], [], []
        for x, iv, y, w in self.iter_chunks(sparse_ok=True):
            xs.append(x)
            ivs.append(iv)
            ys.append(y)
            ws.append(w)
        return (np.concatenate(xs), None if not self.want_ivar else np.concatenate(ivs),
                np.concatenate(ys), np.concatenate(ws))


class Batches:
    """Minibatches over a :class:`RowSet`, from memory (cached) or streamed per epoch."""

    def __init__(self, rows: RowSet, cache: bool, buffer_chunks: int = 8) -> None:
        import torch

        self.rows, self.cached, self.buffer_chunks = rows, cache, buffer_chunks
        if cache:
            x, iv, y, w = rows.materialize()
            self.t = [torch.from_numpy(x), None if iv is None else torch.from_numpy(iv),
                      torch.from_numpy(y), torch.from_numpy(w)]

    @classmethod
    def of_tensors(cls, x: Any, iv: Any, y: Any, w: Any) -> "Batches":
        """Cached batches of rows already in memory (no :class:`RowSet` behind them)."""
        b = cls.__new__(cls)
        b.rows, b.cached, b.buffer_chunks, b.t = None, True, 0, [x, iv, y, w]
        return b

    @property
    def n(self) -> int:
        return int(self.t[0].shape[0]) if self.cached else self.rows.n

    def standardize(self, mean: np.ndarray, scale: np.ndarray) -> None:
        """From now on yield standardised rows, ``(x - mean) * scale`` (and ivar / scale^2):
        done once here for the cached rows, per read for streamed ones, never per batch."""
        import torch

        if self.rows.norm is not None:
            raise RuntimeError("rows are already standardised")
        mean = np.asarray(mean, np.float32)
        scale = np.asarray(scale, np.float32)
        self.rows.norm = (mean, scale)
        if self.cached:
            s = torch.from_numpy(scale)
            self.t[0].sub_(torch.from_numpy(mean)).mul_(s)
            if self.t[1] is not None:
                self.t[1].div_(s * s)

    def epoch(self, rng: np.random.Generator, batch_size: int, shuffle: bool = True) -> Iterator[tuple]:
        import torch

        if self.cached:
            x, iv, y, w = self.t
            n = x.shape[0]
            perm = torch.from_numpy(rng.permutation(n)) if shuffle else None
            for s in range(0, n, batch_size):
                if perm is None:
                    sl = slice(s, s + batch_size)
                    yield x[sl], None if iv is None else iv[sl], y[sl], w[sl]
                else:
                    idx = perm[s:s + batch_size]
                    yield x[idx], None if iv is None else iv[idx], y[idx], w[idx]
            return
        nchunks = len(self.rows.chunks)
        order = rng.permutation(nchunks) if shuffle else np.arange(nchunks)
        carry: list[tuple] = []
        for b0 in range(0, nchunks, self.buffer_chunks):
            part = list(self.rows.iter_chunks(order[b0:b0 + self.buffer_chunks]))
            x = np.concatenate([p[0] for p in carry + part])
            iv = None if part[0][1] is None else np.concatenate([p[1] for p in carry + part])
            y = np.concatenate([p[2] for p in carry + part])
            w = np.concatenate([p[3] for p in carry + part])
            p = rng.permutation(len(x)) if shuffle else np.arange(len(x))
            last = b0 + self.buffer_chunks >= nchunks
            nfull = len(x) if last else (len(x) // batch_size) * batch_size
            for s in range(0, nfull, batch_size):
                idx = p[s:min(s + batch_size, nfull)]
                yield (torch.from_numpy(x[idx]), None if iv is None else torch.from_numpy(iv[idx]),
                       torch.from_numpy(y[idx]), torch.from_numpy(w[idx]))
            rest = p[nfull:]
            carry = [(x[rest], None if iv is None else iv[rest], y[rest], w[rest])] if len(rest) else []

    def chunks(self, size: int = 4096) -> Iterator[tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray]]:
        """The rows in store order as numpy chunks."""
        if self.cached:
            x, iv, y, w = self.t
            for s in range(0, x.shape[0], size):
                yield (x[s:s + size].numpy(), None if iv is None else iv[s:s + size].numpy(),
                       y[s:s + size].numpy(), w[s:s + size].numpy())
        else:
            yield from self.rows.iter_chunks()


def feature_stats(batches: Batches) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of every feature over the rows (float64 accumulators)."""
    s1 = s2 = None
    n = 0
    for x, _, _, _ in batches.chunks():
        x64 = x.astype(np.float64)
        mu = x64.mean(0)
        if s1 is None:
            s1, s2 = np.zeros_like(mu), np.zeros_like(mu)
        # Chan et al. parallel update of the mean and the sum of squared deviations
        m = len(x64)
        delta = mu - s1
        tot = n + m
        s2 += ((x64 - mu) ** 2).sum(0) + delta ** 2 * n * m / tot
        s1 += delta * m / tot
        n = tot
    if s1 is None:
        raise StxError("no training rows")
    return s1, np.sqrt(s2 / max(n - 1, 1))


def sample_rows(batches: Batches, max_rows: int, rng: np.random.Generator, ivar: bool = False) -> Any:
    """Up to ``max_rows`` rows, read as whole chunks in random order (with ``ivar``: the pair
    ``(rows, their ivar)``; the batches must hold the ivar)."""
    if batches.cached:
        x, iv = batches.t[0], batches.t[1]
        n = x.shape[0]
        if n > max_rows:
            idx = np.sort(rng.choice(n, max_rows, replace=False))
            x, iv = x[idx], (iv[idx] if ivar else None)
        return (x.numpy(), iv.numpy()) if ivar else x.numpy()
    out, ivs, got = [], [], 0
    order = rng.permutation(len(batches.rows.chunks))
    for x, iv, _, _ in batches.rows.iter_chunks(order):
        out.append(x[: max_rows - got])
        if ivar:
            ivs.append(iv[: max_rows - got])
        got += len(out[-1])
        if got >= max_rows:
            break
    return (np.concatenate(out), np.concatenate(ivs)) if ivar else np.concatenate(out)


# ------------------------------------------------------------------------------------ the loss


def gaussian_nll(mean: Any, logvar: Any, y: Any, w: Any | None = None) -> Any:
    """Masked heteroscedastic Gaussian NLL.

    ``mean``/``logvar`` are (K, B, L) (or (B, L)), ``y`` (B, L) with NaN for a missing label,
    ``w`` (B,) per-star weights. Each present (star, label) pair contributes
    ``0.5 * (log 2 pi + logvar + (y - mean)^2 / exp(logvar))``, weighted by its star's weight; the
    result is the weighted mean over present pairs and over members."""
    import torch

    if mean.dim() == 2:
        mean, logvar = mean.unsqueeze(0), logvar.unsqueeze(0)
    present = torch.isfinite(y)
    y0 = torch.where(present, y, torch.zeros_like(y))
    per = 0.5 * (LOG_2PI + logvar + (y0 - mean) ** 2 * torch.exp(-logvar))
    wm = present.to(mean.dtype)
    if w is not None:
        wm = wm * w.to(mean.dtype)[:, None]
    denom = wm.sum() * mean.shape[0]
    return (per * wm).sum() / denom.clamp_min(1e-12)


# ------------------------------------------------------------------------------ the loop itself


@dataclass
class FitData:
    """What a closed-form head's ``fit`` sees: standardised numpy chunks ``(x, y, w)`` of the
    training and validation rows (labels standardised, NaN where missing)."""

    train: Batches
    val: Batches
    n_labels: int

    @staticmethod
    def _iter(b: Batches) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        for x, _, y, w in b.chunks():
            yield x, y, w

    def iter_train(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self._iter(self.train)

    def iter_val(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return self._iter(self.val)


@dataclass
class FitResult:
    epochs_run: int = 0
    best_epoch: int = 0
    stopped_early: bool = False
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0
    closed_form: dict[str, Any] | None = None
    #: seconds of the one pass computing a frozen base's outputs (:func:`frozen_cache`; part of
    #: ``train_time_s``), None when training ran the base every batch
    frozen_cache_s: float | None = None


def setup_torch(opts: TrainOptions) -> str:
    """Check the device, set the threads; returns the device string (see :func:`announce`)."""
    import torch

    if opts.threads is not None:
        if opts.threads < 1:
            raise UsageError(f"--threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(opts.threads)
    dev = opts.device
    if dev not in ("cpu", "cuda") and not dev.startswith("cuda:"):
        raise UsageError(f"--device must be cpu or cuda, got {dev!r}")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise StxError("--device cuda: no CUDA device is available to torch")
    return dev


def announce(device: str) -> None:
    """State the device and the threads used on stderr (once the inputs are known to be good)."""
    import torch

    where = f" ({torch.cuda.get_device_name(torch.device(device))})" if device.startswith("cuda") else ""
    console.info(f"training on {device}{where} with {torch.get_num_threads()} CPU thread(s)")


@dataclass
class PredStats:
    nll: float
    mean: np.ndarray  # (N, L) standardised
    var: np.ndarray
    y: np.ndarray  # (N, L) standardised truth, NaN where missing


def predict_rows(net: Any, batches: Batches, device: str, batch_size: int | None = None) -> PredStats:
    """Run ``net`` on every row in eval mode (standardised features, or raw features + ivar for
    a net with an encoder front): the ensemble-combined mean/var and the NLL."""
    import torch

    from .model import combine_members

    was = net.training
    net.eval()
    means, vars_, ys = [], [], []
    tot, den = 0.0, 0.0
    front = bool(getattr(net, "needs_ivar", False))
    step = batch_size or getattr(net, "row_batch", 4096)  # a front (encoder) takes few rows at once
    with torch.no_grad():
        for x, iv, y, w in batches.chunks(step):
            parts = []
            for s in range(0, len(x), step):
                xt = torch.from_numpy(np.ascontiguousarray(x[s:s + step])).to(device)
                ivt = torch.from_numpy(np.ascontiguousarray(iv[s:s + step])).to(device) if front else None
                parts.append(net.forward_rows(xt, ivt))
            mu, lv = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts], 1),
                                                       torch.cat([p[1] for p in parts], 1))
            m, v = combine_members(mu, lv)
            yt = torch.from_numpy(y).to(device)
            wt = torch.from_numpy(w).to(device)
            nll = gaussian_nll(m, v.log(), yt, wt)
            present = (torch.isfinite(yt).float() * wt[:, None]).sum().item()
            tot += nll.item() * present
            den += present
            means.append(m.cpu().numpy())
            vars_.append(v.cpu().numpy())
            ys.append(y)
    net.train(was)
    return PredStats(tot / max(den, 1e-12), np.concatenate(means), np.concatenate(vars_), np.concatenate(ys))


def physical(specs: list[Any], ps: PredStats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Predicted value, 1-sigma error and truth (NaN where unknown) in physical units."""
    from .model import decode_labels

    value, err = decode_labels(specs, ps.mean, ps.var)
    truth, _ = decode_labels(specs, np.nan_to_num(ps.y), np.zeros_like(ps.y))
    truth[~np.isfinite(ps.y)] = np.nan
    return value, err, truth


def label_report(specs: list[Any], ps: PredStats) -> dict[str, Any]:
    """Per-label metrics in physical units (n, mae, bias, scatter, calibration) plus the NLL."""
    from .metrics import label_metrics

    value, err, truth = physical(specs, ps)
    out: dict[str, Any] = {"nll": float(ps.nll), "labels": {}}
    for j, s in enumerate(specs):
        out["labels"][s.name] = label_metrics(value[:, j], truth[:, j], err[:, j])
    return out


#: the fraction of a Gaussian within +-1 sigma: the quantile of |residual| / error that calibration matches
ONE_SIGMA = 0.6826894921370859
#: fewer validation stars than this for a label: its errors are left as the network gives them
MIN_CALIBRATION_STARS = 10


def error_calibration(specs: list[Any], ps: PredStats, enabled: bool = True) -> dict[str, Any]:
    """Per-label factors for the predicted 1-sigma errors, from the held-out (validation) stars.

    A network trained with a Gaussian NLL learns its variances on the training stars, where it
    fits better than on new ones (and early stopping, ensembles and small fine-tuning sets move
    them further), so its error bars are rarely calibrated on new stars. The factor ``k`` of a
    label is the 68.27th percentile of ``|residual| / error`` over the validation stars: errors
    scaled by ``k`` hold 68.27 % of those residuals within 1 sigma, as Gaussian errors should.
    Recorded with the validation fractions before and after; not applied (factor 1) when
    disabled or with fewer than ``MIN_CALIBRATION_STARS`` validation stars for the label."""
    value, err, truth = physical(specs, ps)
    out: dict[str, Any] = {"method": "validation 68.27th percentile of |residual|/error" if enabled else "off",
                           "min_stars": MIN_CALIBRATION_STARS, "labels": {}}
    for j, s in enumerate(specs):
        ok = np.isfinite(truth[:, j]) & np.isfinite(value[:, j]) & (err[:, j] > 0)
        n = int(ok.sum())
        entry: dict[str, Any] = {"n": n, "factor": 1.0}
        if n:
            z = np.abs(value[ok, j] - truth[ok, j]) / err[ok, j]
            entry["frac_1sigma_before"] = float(np.mean(z <= 1.0))
            if enabled and n >= MIN_CALIBRATION_STARS:
                k = float(np.quantile(z, ONE_SIGMA))
                if k > 0 and math.isfinite(k):
                    entry["factor"] = k
            entry["frac_1sigma_after"] = float(np.mean(z <= entry["factor"]))
        if enabled and n < MIN_CALIBRATION_STARS:
            entry["note"] = f"not calibrated: {n} validation stars (< {MIN_CALIBRATION_STARS})"
        out["labels"][s.name] = entry
    return out


def _clip(params: list[Any], max_norm: float) -> None:
    """Clip the global gradient norm, touching the gradients only when it is exceeded."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    total = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: one foreach kernel
    if total is not None:
        norm = total(grads)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if float(norm) > max_norm:
        coef = max_norm / (float(norm) + 1e-6)
        for g in grads:
            g.mul_(coef)


def fit_gradient(net: Any, param_groups: list[dict[str, Any]], train: Batches, val: Batches,
                 hp: dict[str, Any], opts: TrainOptions, device: str, title: str) -> FitResult:
    """AdamW on the masked NLL with early stopping on the validation NLL; restores the best
    epoch. Deterministic on CPU for a given seed and thread count. The objects that existed
    before (torch's own: some 300,000) are left alone by the cyclic GC meanwhile
    (:func:`stxcli.pipeline.long_lived_frozen`): its full collections took 7 % of a fine-tune."""
    from .pipeline import long_lived_frozen

    with long_lived_frozen():
        return _fit_gradient(net, param_groups, train, val, hp, opts, device, title)


def _fit_gradient(net: Any, param_groups: list[dict[str, Any]], train: Batches, val: Batches,
                  hp: dict[str, Any], opts: TrainOptions, device: str, title: str) -> FitResult:
    import torch

    params = [p for g in param_groups for p in g["params"]]
    if not params:
        raise StxError(f"{title}: nothing to train (no trainable parameters)")
    groups = [{"params": g["params"], "lr": hp["lr"] * float(g.get("lr_scale", 1.0)),
               "weight_decay": float(g.get("weight_decay", hp["weight_decay"]))} for g in param_groups]
    opt = torch.optim.AdamW(groups, lr=hp["lr"])
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, hp["patience"] // 3))
    rng = np.random.default_rng(opts.seed + 1)
    gen = torch.Generator(device=device).manual_seed(opts.seed + 2)
    res = FitResult()
    best = math.inf
    best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    bad = 0
    t0 = time.perf_counter()
    net.to(device)
    front = bool(getattr(net, "needs_ivar", False))  # raw features + ivar -> encoder -> head
    with console.progress(title, total=hp["epochs"]) as bar:
        for epoch in range(1, hp["epochs"] + 1):
            net.train()
            tot, nb = 0.0, 0
            te = time.perf_counter()
            for x, iv, y, w in train.epoch(rng, hp["batch_size"]):
                x = x.to(device, non_blocking=True)
                if iv is not None and (front or opts.augment_noise > 0):
                    iv = iv.to(device)
                if opts.augment_noise > 0 and iv is not None:
                    sigma = torch.where(iv > 0, iv.clamp_min(1e-30).rsqrt(), torch.zeros_like(iv))
                    x = x + opts.augment_noise * sigma * torch.randn(x.shape, generator=gen, device=device)
                mean, logvar = net.forward_rows(x, iv)
                loss = gaussian_nll(mean, logvar, y.to(device), w.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if hp["grad_clip"]:
                    _clip(params, float(hp["grad_clip"]))
                opt.step()
                tot += float(loss.detach())
                nb += 1
            t_train = time.perf_counter() - te
            vnll = predict_rows(net, val, device).nll
            if not math.isfinite(vnll):
                raise StxError(f"{title}: validation loss became {vnll} at epoch {epoch} (lower --lr?)")
            sched.step(vnll)
            res.history.append({"epoch": epoch, "train_nll": tot / max(nb, 1), "val_nll": vnll,
                                "train_s": round(t_train, 4), "epoch_s": round(time.perf_counter() - te, 4)})
            res.epochs_run = epoch
            if vnll < best - opts.min_delta:
                best, bad, res.best_epoch = vnll, 0, epoch
                best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
            else:
                bad += 1
            bar.advance(1)
            bar.update(status=f"loss {tot / max(nb, 1):.3f} val {vnll:.3f} best {best:.3f}@{res.best_epoch}")
            if bad >= hp["patience"]:
                res.stopped_early = True
                break
    net.load_state_dict(best_state)
    net.eval()
    res.train_time_s = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------------- run preparation


@dataclass
class Prepared:
    """Sources, labels, split and batches of one run."""

    sources: list[Source]
    label_names: list[str]
    y_phys: list[np.ndarray]
    split: Split
    specs: list[Any] = field(default_factory=list)
    train: Batches | None = None
    val: Batches | None = None

    def close(self) -> None:
        for s in self.sources:
            s.close()


def prepare(sources: list[Source], label_names: list[str], opts: TrainOptions) -> Prepared:
    y = [s.labels(label_names) for s in sources]
    for s, yi in zip(sources, y):
        empty = s.empty_rows()
        if empty is None:
            continue
        dropped = int((empty & np.isfinite(yi).any(1)).sum())
        yi[empty] = np.nan  # no data behind these rows: unlabelled for training
        if dropped:
            console.warn(f"{s.name}: {dropped} labelled star(s) have no valid feature (NO_OVERLAP) and are "
                         f"left out")
    split = make_split(sources, y, val_frac=opts.val_frac, n_train=opts.n_train, seed=opts.seed)
    check_labels(sources, label_names, y, split)
    return Prepared(sources, label_names, y, split)


def build_batches(prep: Prepared, specs: list[Any], opts: TrainOptions, need_ivar: bool = False) -> None:
    """Training and validation batches; ``need_ivar``: the model reads the features' ivar (an
    encoder front masks ivar-0 pixels), so both sets carry it."""
    from .model import encode_labels

    prep.specs = specs
    y_std = [encode_labels(specs, y) for y in prep.y_phys]
    want_ivar = opts.augment_noise > 0 or need_ivar
    dim = prep.sources[0].dim
    per_row = dim * 4 * (2 if want_ivar else 1)
    cache_train = prep.split.n_train * per_row <= opts.cache_mb * 2**20
    cache_val = (prep.split.n_train + prep.split.n_val) * per_row <= opts.cache_mb * 2**20
    rows_tr = RowSet(prep.sources, prep.split.train, y_std, opts.chunk_rows, want_ivar)
    rows_va = RowSet(prep.sources, prep.split.val, y_std, opts.chunk_rows, need_ivar)
    prep.train = Batches(rows_tr, cache_train, opts.buffer_chunks)
    prep.val = Batches(rows_va, cache_val and cache_train, opts.buffer_chunks)
    console.info(f"{prep.split.n_train} training and {prep.split.n_val} validation stars "
                 f"({'in memory' if cache_train else 'streamed from the store'})")


def fit_domain(train: Batches, val: Batches, seed: int, max_rows: int = 4096, net: Any = None,
               device: str = "cpu") -> Any:
    """The training-domain model from (standardised) training and validation rows; with ``net``
    (a :class:`~stxcli.model.FrontNet`), from its standardised embeddings of raw rows."""
    from .model import DomainModel

    rng = np.random.default_rng(seed + 3)
    if net is None:
        z_fit = sample_rows(train, max_rows, rng)
        z_cal = sample_rows(val, max_rows, rng)
    else:
        z_fit = _embed_rows(net, *sample_rows(train, max_rows, rng, ivar=True), device)
        z_cal = _embed_rows(net, *sample_rows(val, max_rows, rng, ivar=True), device)
    return DomainModel.fit(z_fit, z_cal, seed=seed)


def _embed_rows(net: Any, x: np.ndarray, iv: np.ndarray, device: str) -> np.ndarray:
    """A front net's standardised embeddings of raw rows, in its evaluation batches."""
    import torch

    was = net.training
    net.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(x), net.row_batch):
            out.append(net.embed(torch.from_numpy(np.ascontiguousarray(x[s:s + net.row_batch])).to(device),
                                 torch.from_numpy(np.ascontiguousarray(iv[s:s + net.row_batch])).to(device))
                       .cpu().numpy())
    net.train(was)
    return np.concatenate(out) if out else np.zeros((0, int(net.feature_mean.shape[0])), np.float32)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _options_record(opts: TrainOptions, hp: dict[str, Any]) -> dict[str, Any]:
    return {**hp, "val_frac": opts.val_frac, "n_train": opts.n_train, "seed": opts.seed,
            "augment_noise": opts.augment_noise, "chunk_rows": opts.chunk_rows}


# ------------------------------------------------------------------------------------ pretrain


def train_head(prep: Prepared, head_name: str, head_config: dict[str, Any], opts: TrainOptions,
               device: str, transforms: dict[str, str] | None, title: str) -> dict[str, Any]:
    """Fit label specs, feature normalisation, the head and the domain model on ``prep``.
    Returns the pieces :func:`save_pretrained` writes."""
    import torch

    from .model import StxNet, count_trainable, feature_norm, fit_label_specs, make_head

    y_train = np.concatenate([y[m] for y, m in zip(prep.y_phys, prep.split.train)])
    units = {}
    for s in prep.sources:
        units.update({k: v for k, v in s.units().items() if v})
    specs = fit_label_specs(prep.label_names, y_train, units=units, transforms=transforms)
    build_batches(prep, specs, opts)
    assert prep.train is not None and prep.val is not None
    head = make_head(head_name, head_config)
    hp = opts.resolve(getattr(head, "training_defaults", lambda: {})())
    mean, std = feature_stats(prep.train)
    fmean, fscale = feature_norm(mean, std)
    prep.train.standardize(fmean, fscale)
    prep.val.standardize(fmean, fscale)
    torch.manual_seed(opts.seed)
    module = head.build(prep.sources[0].dim, len(specs))
    net = StxNet(module, torch.from_numpy(fmean), torch.from_numpy(fscale))
    if getattr(head, "closed_form", False):
        t0 = time.perf_counter()
        info = head.fit(module, FitData(prep.train, prep.val, len(specs)))
        res = FitResult(closed_form=info, train_time_s=time.perf_counter() - t0)
        net.to(device)
        n_params = int(sum(p.numel() for p in module.parameters()))
    else:
        n_params = count_trainable(net)
        res = fit_gradient(net, [{"params": [p for p in net.parameters() if p.requires_grad]}],
                           prep.train, prep.val, hp, opts, device, title)
    ps = predict_rows(net, prep.val, device)
    val = label_report(specs, ps)
    domain = fit_domain(prep.train, prep.val, opts.seed)
    return {"net": net.cpu(), "head": head, "specs": specs, "fmean": fmean, "fscale": fscale, "fit": res,
            "hp": hp, "validation": val, "domain": domain, "trainable_params": n_params,
            "calibration": error_calibration(specs, ps, opts.calibrate_errors)}


def save_pretrained(out: Path, prep: Prepared, t: dict[str, Any], opts: TrainOptions, device: str, *,
                    name: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    import torch

    from .model import plugin_info
    from .modelfile import write_model_dir

    head = t["head"]
    feat = prep.sources[0].featurizer
    res: FitResult = t["fit"]
    manifest = {
        "kind": "pretrained",
        "name": name or Path(out).name,
        "created": _now(),
        "stx_version": __version__,
        "featurizer": feat,
        "featurizer_plugin": _maybe_plugin("featurizer", feat["name"]),
        "head": {**plugin_info("head", head.name), "config": head.config()},
        "input_dim": prep.sources[0].dim,
        "labels": [s.to_dict() for s in t["specs"]],
        "training": {
            "stores": [s.info() for s in prep.sources],
            "n_train": prep.split.n_train, "n_val": prep.split.n_val,
            "trainable_params": t["trainable_params"],
            "options": _options_record(opts, t["hp"]),
            "device": device, "threads": torch.get_num_threads(),
            "epochs_run": res.epochs_run, "best_epoch": res.best_epoch, "stopped_early": res.stopped_early,
            "train_time_s": round(res.train_time_s, 3), "history": res.history,
            "closed_form": res.closed_form,
            **(extra or {}),
        },
        "validation": t["validation"],
        "error_calibration": t["calibration"],
        "domain": t["domain"].info(),
    }
    net = t["net"]
    tensors = {f"head.{k}": v for k, v in net.head.state_dict().items()}
    tensors["norm.mean"], tensors["norm.scale"] = t["fmean"], t["fscale"]
    tensors.update(t["domain"].tensors())
    sha = write_model_dir(out, manifest, tensors={"model.safetensors": tensors})
    return summary(manifest, out, sha)


def _maybe_plugin(kind: str, name: str) -> dict[str, str] | None:
    from .model import plugin_info
    from .errors import PluginError

    try:
        return plugin_info(kind, name)
    except PluginError:  # stores written from arrays name no installed featurizer
        return None


def summary(manifest: dict[str, Any], out: Path, sha: str) -> dict[str, Any]:
    tr = manifest["training"]
    return {"model": str(out), "kind": manifest["kind"], "manifest_sha256": sha,
            "labels": [l["name"] for l in manifest["labels"]] if "labels" in manifest else None,
            "n_train": tr["n_train"], "n_val": tr["n_val"], "trainable_params": tr["trainable_params"],
            "epochs_run": tr.get("epochs_run"), "best_epoch": tr.get("best_epoch"),
            "train_time_s": tr.get("train_time_s"), "validation": _short_val(manifest["validation"]),
            "error_factors": {k: round(v["factor"], 4) for k, v in
                              (manifest.get("error_calibration") or {}).get("labels", {}).items()}}


def _short_val(v: dict[str, Any]) -> dict[str, Any]:
    if "labels" in v:
        return {k: {"mae": m["mae"], "scatter": m["scatter"]} for k, m in v["labels"].items()}
    return {name: _short_val(sub) for name, sub in v.items() if isinstance(sub, dict)}


def pretrain(stores: Sequence[str | Path], out: str | Path, *, head: str = "mlp",
             head_config: dict[str, Any] | None = None, labels: Sequence[str] | None = None,
             weights: Sequence[float] | None = None, transforms: dict[str, str] | None = None,
             opts: TrainOptions | None = None, name: str | None = None) -> dict[str, Any]:
    """``stx pretrain``: train a head on one or more stores and write a model directory."""
    opts = opts or TrainOptions()
    device = setup_torch(opts)
    sources = open_stores(stores, weights)
    try:
        prep = prepare(sources, choose_labels(sources, labels), opts)
        announce(device)
        t = train_head(prep, head, head_config or {}, opts, device, transforms, f"pretrain {head}")
        return save_pretrained(Path(out), prep, t, opts, device, name=name)
    finally:
        for s in sources:
            s.close()


# ------------------------------------------------------------------------------------ finetune


def finetune(base_path: str | Path, target: str | Path, out: str | Path, *, adapter: str = "lora",
             adapter_config: dict[str, Any] | None = None, opts: TrainOptions | None = None,
             embed_base: bool = False, scratch: bool = False, name: str | None = None) -> dict[str, Any]:
    """``stx finetune``: adapt a pretrained model to a target store (or, with ``scratch``, train
    the base's head architecture from scratch on the same target stars: the target-only baseline).

    An adapter with ``targets_encoder`` (``lora``/``full`` with ``target=encoder...``) fine-tunes
    the encoder in front of a head trained on encoder embeddings: the target store then holds the
    RAW features the encoder consumes (its featurizer's ``front_input()``), and the model becomes
    front (encoder + pooling) -> the head's standardisation -> head."""
    from .model import front_featurizer, load_base_net, make_adapter
    from .modelfile import ModelDir

    opts = opts or TrainOptions()
    out = Path(out)
    bdir = ModelDir(base_path)
    if bdir.kind != "pretrained":
        raise ModelFileError(f"{bdir.path}: fine-tune a pretrained model (this one is {bdir.kind})")
    base_net, specs = load_base_net(bdir)  # verifies every weight file and the plugins first
    sel = None
    front_feat = None
    if not scratch:
        sel = make_adapter(adapter, adapter_config)
        cand_cfg = getattr(sel, "candidate_config", {}) or {}
        for c in getattr(sel, "candidates", []) or []:  # a bad candidate fails now, not after hours
            if c == sel.name:
                raise UsageError(f"adapter {sel.name}: cannot be its own candidate")
            if getattr(make_adapter(c, cand_cfg.get(c)), "targets_encoder", False):
                raise UsageError(f"adapter {sel.name}: candidate {c} fine-tunes the encoder; {sel.name} "
                                 f"compares head adapters only (run the encoder adapter on its own)")
        if getattr(sel, "targets_encoder", False):
            front_feat = front_featurizer(bdir.manifest["featurizer"], f"model {bdir.path}")
    # what --embed-base copies besides the base, found before training (a missing encoder fails now)
    assets = _featurizer_assets(bdir, front_feat) if embed_base and not scratch else {}
    device = setup_torch(opts)
    sources = open_stores([target])
    try:
        if front_feat is not None:
            check_front_input(sources[0], front_feat, bdir)
        else:
            try:
                check_featurizer(sources[0], bdir.manifest["featurizer"], bdir.path)
            except ModelFileError as exc:
                if _has_front(bdir.manifest["featurizer"]["name"]) and sources[0].featurizer["name"] != \
                        bdir.manifest["featurizer"]["name"]:
                    raise ModelFileError(f"{exc}; to fine-tune the encoder on {sources[0].featurizer['name']} "
                                         f"features use --adapter lora or full with --set target=encoder+head") from exc
                raise
        names = [s.name for s in specs]
        missing = [n for n in names if n not in sources[0].label_names()]
        if missing:
            raise StxError(f"{sources[0].name}: label(s) {', '.join(missing)} of model {bdir.path} are missing "
                           f"from the store (it has: {', '.join(sources[0].label_names()) or 'none'})")
        prep = prepare(sources, names, opts)
        announce(device)
        if scratch:
            m = bdir.manifest
            transforms = {s.name: s.transform for s in specs}
            t = train_head(prep, m["head"]["name"], m["head"]["config"], opts, device, transforms,
                           f"scratch {m['head']['name']}")
            extra = {"from_scratch": True, "architecture_of": {"path": str(bdir.path),
                                                                "manifest_sha256": bdir.manifest_sha256}}
            return save_pretrained(out, prep, t, opts, device, name=name, extra=extra)
        build_batches(prep, specs, opts, need_ivar=front_feat is not None)
        return _finetune_adapters(bdir, base_net, specs, prep, sel, opts, device, out, embed_base, name,
                                  front_feat, assets)
    finally:
        for s in sources:
            s.close()


def _featurizer_assets(bdir: Any, front_feat: Any) -> dict[str, Path]:
    """The directories the base model's featurizer reads besides its settings (its factory's
    optional ``assets(config)``: a transformer base's encoder), by role, for ``--embed-base`` to
    copy: with them the fine-tuned model predicts on a machine that has only its directory."""
    from .pipeline import searching_assets
    from .registry import get_registry

    entry = bdir.manifest["featurizer"]
    if front_feat is not None:
        name, config = front_feat.name, front_feat.config()
    else:
        name, config = entry["name"], entry["config"]
    reg = get_registry()
    get = getattr(reg.get("featurizer", name), "assets", None) if name in reg.items["featurizer"] else None
    if not callable(get):
        return {}
    with searching_assets(bdir.assets()):
        found = {str(role): Path(path) for role, path in get(config).items()}
    for role, path in found.items():
        if not path.is_dir():
            raise ModelFileError(f"{bdir.path}: the base's featurizer {name} names {role} {path}, which is not a "
                                 f"directory: --embed-base cannot copy it")
    return found


def _has_front(featurizer_name: str) -> bool:
    """Whether the installed featurizer of that name has an encoder that adapters can reach."""
    from .registry import get_registry

    reg = get_registry()
    return featurizer_name in reg.items["featurizer"] and hasattr(reg.get("featurizer", featurizer_name), "front")


def check_front_input(source: Source, feat: Any, bdir: Any) -> None:
    """The target store of an encoder adapter must hold the features the encoder consumes: those
    of ``feat.front_input()`` (the raw featurizer the encoder was trained on); one-line errors."""
    want = feat.front_input()
    have = source.featurizer
    if featurizer_identity(have) == featurizer_identity(want):
        return
    if have["name"] != want["name"]:
        extra = (" (it holds the embeddings the head was trained on)" if have["name"] == bdir.manifest["featurizer"]["name"]
                 else "")
        raise StxError(f"{source.name} was made by the {have['name']!r} featurizer{extra}; an adapter that reaches "
                       f"into the encoder trains on the spectra the encoder reads: featurize the target stars with "
                       f"--featurizer {want['name']} and the encoder's {want['name']} config (stx encoder info ENCODER)")
    old, now = have.get("config") or {}, want.get("config") or {}
    diff = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
    what = f"config keys {', '.join(diff)} differ" if diff else f"version {have['version']} vs {want['version']}"
    raise StxError(f"{source.name} was made with another {want['name']} config than the encoder of model {bdir.path} "
                   f"({what}; store key {str(have['key'])[:12]}, encoder's {want['name']} key {str(want['key'])[:12]}); "
                   f"featurize the target stars with the encoder's settings")


def frozen_cache(head: Any, train: Batches, val: Batches, device: str) -> tuple[Any, Batches, Batches] | None:
    """Train an adapted head from what its frozen part gives each row, computed once.

    A head may offer ``frozen_rows(x) -> (B, C) | None`` (everything its frozen part computes
    from standardised features ``x``) and ``forward_from_frozen(c) -> (mean, logvar)``: the
    residual adapter's base never changes while it trains, so its outputs and hidden state need
    not be recomputed for every batch of every epoch. Taken when both row sets are cached in
    memory (the caller leaves out noise augmentation and encoder fronts, which change the base's
    input) and the head gives them; returns the module to train (its parameters are the head's)
    and the two row sets, else None."""
    import torch

    from .model import FromFrozen

    fr, ff = getattr(head, "frozen_rows", None), getattr(head, "forward_from_frozen", None)
    if not (callable(fr) and callable(ff) and train.cached and val.cached):
        return None
    out = []
    was = head.training
    head.eval()
    try:
        with torch.no_grad():
            for b in (train, val):
                x, _, y, w = b.t
                parts = []
                for s in range(0, max(x.shape[0], 1), 4096):
                    c = fr(x[s:s + 4096].to(device))
                    if c is None:
                        return None
                    parts.append(c.cpu())
                out.append(Batches.of_tensors(torch.cat(parts).contiguous(), None, y, w))
    finally:
        head.train(was)
    return FromFrozen(head), out[0], out[1]


def _train_adapter(adapter: Any, base_net: Any, prep: Prepared, opts: TrainOptions, device: str,
                   front_feat: Any = None) -> dict[str, Any]:
    import copy

    import torch

    from .model import FrontNet, StxNet, count_trainable

    torch.manual_seed(opts.seed)
    head = adapter.attach(copy.deepcopy(base_net.head))
    net: Any = StxNet(head, base_net.feature_mean, base_net.feature_scale)
    groups = adapter.param_groups(head)
    front = None
    if front_feat is not None:
        front = adapter.attach_encoder(front_feat.front())
        groups = groups + adapter.encoder_param_groups(front)
        net = FrontNet(front, net)
    hp = opts.resolve(adapter.training_defaults())
    n_params = count_trainable(net)
    fit_net, fit_train, fit_val = net, prep.train, prep.val
    t_cache = None
    if front is None and opts.augment_noise == 0:
        t0 = time.perf_counter()
        cached = frozen_cache(head, prep.train, prep.val, device)
        if cached is not None:
            fit_net, fit_train, fit_val = cached
            t_cache = time.perf_counter() - t0
    res = fit_gradient(fit_net, groups, fit_train, fit_val, hp, opts, device, f"finetune {adapter.name}")
    if t_cache is not None:
        res.frozen_cache_s = round(t_cache, 4)
        res.train_time_s += t_cache
    ps = predict_rows(net, prep.val, device)
    val = label_report(prep.specs, ps)
    net.cpu()
    return {"adapter": adapter, "net": net, "head": head, "front": front, "fit": res, "hp": hp,
            "validation": val, "trainable_params": n_params,
            "calibration": error_calibration(prep.specs, ps, opts.calibrate_errors)}


def _finetune_adapters(bdir: Any, base_net: Any, specs: list[Any], prep: Prepared, sel: Any,
                       opts: TrainOptions, device: str, out: Path, embed_base: bool,
                       name: str | None, front_feat: Any = None,
                       assets: dict[str, Path] | None = None) -> dict[str, Any]:
    import os

    from .model import ENCODER_FOLDER, FrontNet, make_adapter, plugin_info
    from .modelfile import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ASSETS, write_model_dir
    from .store import featurizer_key

    assert prep.train is not None and prep.val is not None
    if front_feat is None:
        prep.train.standardize(base_net.feature_mean.numpy(), base_net.feature_scale.numpy())
        prep.val.standardize(base_net.feature_mean.numpy(), base_net.feature_scale.numpy())
        zero_shot = label_report(specs, predict_rows(base_net.to(device), prep.val, device))
    else:  # raw rows: the (frozen, unadapted) encoder makes the embeddings the base head expects
        zero_shot = label_report(specs, predict_rows(FrontNet(front_feat.front(), base_net).to(device),
                                                     prep.val, device))
    base_net.cpu()
    candidates = list(getattr(sel, "candidates", []) or [])
    selector = bool(candidates)
    if selector:
        runs = {c: _train_adapter(make_adapter(c, (getattr(sel, "candidate_config", {}) or {}).get(c)),
                                  base_net, prep, opts, device) for c in candidates}
        metric = getattr(sel, "metric", "mae")
        scores = {c: {lab: _score(r["validation"], lab, metric) for lab in prep.label_names}
                  for c, r in runs.items()}
        choice = sel.choose(scores)
        used = [c for c in candidates if c in set(choice.values())]
        folders = {c: f"adapters/{c}/" for c in used}
    else:
        runs = {sel.name: _train_adapter(sel, base_net, prep, opts, device, front_feat)}
        scores, choice, used = None, None, [sel.name]
        folders = {sel.name: ""}
    if front_feat is None:
        domain = fit_domain(prep.train, prep.val, opts.seed)
    else:
        domain = fit_domain(prep.train, prep.val, opts.seed, net=runs[sel.name]["net"].to(device), device=device)
        runs[sel.name]["net"].cpu()

    tensors: dict[str, dict[str, Any]] = {"domain.safetensors": domain.tensors()}
    json_files: dict[str, Any] = {}
    for c in used:
        r = runs[c]
        ad = r["adapter"]
        entry = {**plugin_info("adapter", ad.name), "config": ad.config()}
        json_files[f"{folders[c]}{ADAPTER_CONFIG}"] = {**ad.adapter_config(), "stx_adapter": entry}
        tensors[f"{folders[c]}{ADAPTER_WEIGHTS}"] = ad.state_dict(r["head"])
        if r["front"] is not None:
            enc_rel = f"{folders[c]}{ENCODER_FOLDER}"
            json_files[f"{enc_rel}{ADAPTER_CONFIG}"] = {
                **ad.encoder_adapter_config(), "stx_adapter": entry,
                "stx_encoder": {"encoder_sha256": front_feat.encoder_sha256, "pooling": front_feat.pooling}}
            tensors[f"{enc_rel}{ADAPTER_WEIGHTS}"] = ad.encoder_state_dict(r["front"])
    base_entry: dict[str, Any] = {"manifest_sha256": bdir.manifest_sha256, "name": bdir.name,
                                  "embedded": embed_base}
    copy_dirs = {}
    if embed_base:
        base_entry["path"] = "base"
        copy_dirs["base"] = bdir.path
        copy_dirs.update({f"{ASSETS}/{role}": path for role, path in (assets or {}).items()})
        base_entry["assets"] = {f"{ASSETS}/{role}": {"role": role, "copied_from": str(path)}
                                for role, path in (assets or {}).items()}
    else:
        out_abs = out.resolve()
        base_entry["path"] = os.path.relpath(bdir.path.resolve(), out_abs)
        base_entry["abs_path"] = str(bdir.path.resolve())
    main = runs[used[0]] if not selector else None
    adapter_entry: dict[str, Any] = {**plugin_info("adapter", sel.name), "config": sel.config(),
                                     "folders": folders}
    if selector:
        adapter_entry.update({"selection": choice, "scores": scores, "metric": getattr(sel, "metric", "mae"),
                              "candidates": candidates})
    trainable = {c: runs[c]["trainable_params"] for c in runs}
    validation: dict[str, Any] = {"zero_shot": zero_shot}
    # each label's errors are calibrated on the validation predictions of the adapter that predicts it
    calibration = (runs[used[0]]["calibration"] if not selector else
                   {**runs[used[0]]["calibration"],
                    "labels": {lab: runs[choice[lab]]["calibration"]["labels"][lab] for lab in prep.label_names}})
    if selector:
        validation.update({f"candidate:{c}": runs[c]["validation"] for c in runs})
        validation["selected"] = _selected_report(runs, choice, prep.label_names)
    else:
        validation["finetuned"] = main["validation"]
    import torch

    manifest = {
        "kind": "finetuned",
        "name": name or out.name,
        "created": _now(),
        "stx_version": __version__,
        "featurizer": bdir.manifest["featurizer"],
        "base": base_entry,
        "adapter": adapter_entry,
        "labels": bdir.manifest["labels"],
        "training": {
            "stores": [s.info() for s in prep.sources],
            "n_train": prep.split.n_train, "n_val": prep.split.n_val,
            "n_target_stars": prep.split.n_train + prep.split.n_val,
            "trainable_params": (sum(trainable[c] for c in used) if selector else trainable[sel.name]),
            "trainable_params_per_adapter": trainable,
            "options": _options_record(opts, runs[used[0]]["hp"]),
            "device": device, "threads": torch.get_num_threads(),
            "runs": {c: {"options": _options_record(opts, r["hp"]),
                         "epochs_run": r["fit"].epochs_run, "best_epoch": r["fit"].best_epoch,
                         "stopped_early": r["fit"].stopped_early, "train_time_s": round(r["fit"].train_time_s, 3),
                         "frozen_cache_s": r["fit"].frozen_cache_s,
                         "history": r["fit"].history} for c, r in runs.items()},
            "epochs_run": sum(r["fit"].epochs_run for r in runs.values()),
            "best_epoch": None if selector else main["fit"].best_epoch,
            "train_time_s": round(sum(r["fit"].train_time_s for r in runs.values()), 3),
        },
        "validation": validation,
        "error_calibration": calibration,
        "domain": domain.info(),
    }
    if front_feat is not None:
        # the model's input is what the encoder reads: predict featurizes with it and checks stores
        # against it; the encoder is rebuilt from the base's featurizer entry (path found now)
        fcfg = front_feat.config()
        manifest["featurizer"] = prep.sources[0].featurizer
        manifest["input_dim"] = prep.sources[0].dim
        manifest["encoder"] = {
            "featurizer": {"name": front_feat.name, "version": str(front_feat.version), "config": fcfg,
                           "key": featurizer_key(front_feat.name, str(front_feat.version), fcfg)},
            **front_feat.front_info(), "folder": ENCODER_FOLDER,
            "target": getattr(sel, "target", "encoder"),
        }
    sha = write_model_dir(out, manifest, tensors=tensors, json_files=json_files, copy_dirs=copy_dirs)
    s = summary(manifest, out, sha)
    s["n_target_stars"] = prep.split.n_train + prep.split.n_val
    s["adapter"] = sel.name
    if front_feat is not None:
        s["target"] = manifest["encoder"]["target"]
    if selector:
        s["selection"] = choice
    return s


def _score(report: dict[str, Any], label: str, metric: str) -> float:
    m = report["labels"][label].get(metric)
    return float(m) if m is not None else math.inf


def _selected_report(runs: dict[str, Any], choice: dict[str, str], names: list[str]) -> dict[str, Any]:
    return {"labels": {lab: runs[choice[lab]]["validation"]["labels"][lab] for lab in names}}
