"""Featurize many one-spectrum files together: consecutive small batches merged into one.

A LAMOST or MILES file holds one spectrum, and a featurizer's fixed costs per batch (the
continuum fit's iterations, the RV cross-correlation, the grid matrices, Python between numpy
calls) then dominate: the raw featurizer took 1.8 ms per LAMOST DR10 spectrum one at a time
and 0.8 ms in batches of 64. :func:`windows` gathers consecutive small batches of a stream (and
the markers between them, in order) into a :class:`Window`; the window groups its batches by
:func:`layout` (what must agree for spectra to share a batch: arm names and pixel counts,
resolving power, metadata columns) and makes one batch per group (:func:`merge`). After the
featurizer has run on each group, :meth:`Window.expand` gives the stream back, each original
batch's features cut out of its group's (:func:`split`), with the markers where they were.

Only featurizers that declare ``row_independent = True`` (each spectrum's features do not
depend on the other spectra of its batch) get merged batches; the features then equal those
of the batches one by one to float32 rounding (BLAS sums in another order for another batch
size).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from .protocols import FeatureBatch
from .spectra import Arm, SpectrumBatch, SpectrumMeta

#: a window holds small batches until it has this many spectra
WINDOW_ROWS = 64


def columns_signature(columns: dict[str, Any]) -> tuple[Any, ...]:
    """Names, kinds and shapes of per-spectrum columns (a reader's ``meta.extra``): what must agree
    for rows of two batches to be stacked into one array per column."""
    return tuple((k, np.asarray(v).dtype.kind, np.asarray(v).shape[1:]) for k, v in sorted(columns.items()))


def layout(batch: SpectrumBatch) -> tuple[Any, ...] | None:
    """What must agree for two batches to be featurized as one; None: never merged (per-spectrum
    resolution matrices, which are large and only come in large batches anyway)."""
    arms = []
    for a in batch.arms:
        if a.resolution is not None:
            return None
        rp = a.resolving_power
        if rp is not None and np.ndim(rp) > 0:
            r = np.asarray(rp)
            rp = (r.dtype.str, r.shape, r.tobytes())
        elif rp is not None:
            rp = float(rp)
        arms.append((a.name, int(a.flux.shape[1]), rp))
    m = batch.meta
    return m.survey, tuple(arms), tuple(sorted(m.snr)), columns_signature(m.extra)


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def merge(batches: list[SpectrumBatch]) -> SpectrumBatch:
    """One batch of the spectra of ``batches`` (same :func:`layout`), in order. An arm whose
    grids all agree keeps one 1-D grid; otherwise each spectrum's grid is a row of a 2-D one."""
    if len(batches) == 1:
        return batches[0]
    arms = []
    for k, a0 in enumerate(batches[0].arms):
        arms_k = [b.arms[k] for b in batches]
        if all(a.wave.ndim == 1 and np.array_equal(a.wave, a0.wave) for a in arms_k):
            wave = a0.wave
        else:
            wave = np.concatenate([np.broadcast_to(a.wave, (a.n, a.wave.shape[-1])) for a in arms_k])
        arms.append(Arm(name=a0.name, wave=wave, flux=_cat([a.flux for a in arms_k]),
                        ivar=_cat([a.ivar for a in arms_k]), mask=_cat([a.mask for a in arms_k]),
                        resolving_power=a0.resolving_power))
    return SpectrumBatch(arms=arms, meta=_meta_from([b.meta for b in batches], _cat))


def _meta_from(ms: list[SpectrumMeta], arrays: Callable[[list[np.ndarray]], np.ndarray]) -> SpectrumMeta:
    """A :class:`SpectrumMeta` whose every per-spectrum array (a field, or an entry of a dict
    field: snr bands, extra columns, the same keys within a layout) is ``arrays`` of that array
    in each of ``ms``; the survey (one per layout) is the first's. Every field is walked, so that
    one added later is not dropped."""
    out: dict[str, Any] = {}
    for f in fields(SpectrumMeta):
        first = getattr(ms[0], f.name)
        if isinstance(first, str):
            out[f.name] = first
        elif isinstance(first, dict):
            out[f.name] = {k: arrays([np.asarray(getattr(m, f.name)[k]) for m in ms]) for k in first}
        else:
            out[f.name] = arrays([np.asarray(getattr(m, f.name)) for m in ms])
    return SpectrumMeta(**out)


def split(fb: FeatureBatch, sizes: list[int]) -> list[FeatureBatch]:
    """``fb`` cut into consecutive batches of ``sizes`` rows; the notes go with the first."""
    if len(sizes) == 1:
        return [fb]
    out, a = [], 0
    for k, n in enumerate(sizes):
        sl = slice(a, a + n)
        out.append(FeatureBatch(fb.features[sl], fb.ivar[sl], {q: v[sl] for q, v in fb.quality.items()},
                                _meta_from([fb.meta], lambda arrs, sl=sl: arrs[0][sl]), list(fb.notes) if k == 0 else []))
        a += n
    return out


@dataclass
class Window:
    """Consecutive small batches and the markers between them (``items``, in order), as
    ``groups``: one merged batch per layout. ``results`` (one per group) are set by the caller
    after featurizing each group; :meth:`expand` then gives the stream back."""

    items: list[Any]
    groups: list[SpectrumBatch] = field(default_factory=list)
    results: list[FeatureBatch | None] = field(default_factory=list)
    _where: list[tuple[int, int] | None] = field(default_factory=list)  # per item: (group, index in it)
    _sizes: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        members: dict[Any, int] = {}
        parts: list[list[SpectrumBatch]] = []
        for it in self.items:
            if not isinstance(it, SpectrumBatch):
                self._where.append(None)
                continue
            g = members.setdefault(layout(it), len(parts))
            if g == len(parts):
                parts.append([])
            self._where.append((g, len(parts[g])))
            parts[g].append(it)
        self.groups = [merge(p) for p in parts]
        self._sizes = [[b.n for b in p] for p in parts]
        self.results = [None] * len(parts)

    def expand(self) -> Iterator[Any]:
        pieces = [split(r, s) for r, s in zip(self.results, self._sizes) if r is not None]
        if len(pieces) != len(self.groups):
            raise RuntimeError("a window was expanded before every group was featurized")
        for it, where in zip(self.items, self._where):
            yield it if where is None else pieces[where[0]][where[1]]


def windows(items: Iterable[Any], small: int, rows: int = WINDOW_ROWS) -> Iterator[Any]:
    """``items`` with runs of batches of fewer than ``small`` spectra (that :func:`layout` allows
    to merge) gathered into :class:`Window` s of about ``rows`` spectra; markers (anything not a
    batch) inside a run stay in its window, in place; other batches pass through."""
    win: list[Any] = []
    n = 0
    for it in items:
        if isinstance(it, SpectrumBatch) and it.n < small and layout(it) is not None:
            win.append(it)
            n += it.n
            if n >= rows:
                yield Window(win)
                win, n = [], 0
        elif isinstance(it, SpectrumBatch):
            if win:
                yield Window(win)
                win, n = [], 0
            yield it
        elif win:
            win.append(it)
        else:
            yield it
    if win:
        yield Window(win)
