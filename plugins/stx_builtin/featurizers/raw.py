"""The ``raw`` featurizer: any survey's spectra -> continuum-normalised flux on one rest-frame grid.

Steps, each vectorised over the batch (numerics in :mod:`._rawlib`; where a batch allows, the
per-pixel steps run as the compiled per-spectrum kernels of :mod:`._rawjit` instead, with the
same arithmetic and the same output: see :func:`kernels`):

1. **Clean.** Pixels that are masked, have ivar <= 0 or non-finite flux/ivar carry no
   information (NaN/inf input also sets ``BAD_INPUT``, as does a reader's
   ``meta.extra["n_bad_input"] > 0``). Each spectrum is scaled by its mean absolute good flux
   (all arms together) so physical units of any size are safe in float32. A spectrum without a
   single usable pixel (a dead fibre) skips every further step: missing-pixel fill, ``NO_OVERLAP``.
2. **Resolution matching** (``target_r``, default 1800, LAMOST LRS). Each arm is convolved with a
   Gaussian of per-pixel width ``sqrt(sigma_target^2 - sigma_source^2)`` (none where the source is
   already coarser), ``sigma = lambda / (2.3548 R)``, from ``arm.resolving_power`` (scalar or per
   pixel). An arm without one is an error unless ``assume_source_r`` says what to assume. With
   ``use_resolution_matrix=True`` the source sigma is measured per spectrum and pixel from DESI's
   resolution matrix (the second moment of each row of the band matrix: the LSF that fibre really
   had); arms without a matrix then use ``resolving_power``. The convolution is normalised (masked
   pixels drop out) and variance goes through the squared kernel. ``target_r=None`` skips this step.
3. **Rest frame.** ``lambda_rest = lambda_obs / (1 + v/c)`` with ``v`` from ``rv``:
   ``"auto"`` (default): ``meta.rv_kms`` where known, estimated where NaN (flag ``RV_ESTIMATED``);
   ``"meta"``: ``meta.rv_kms`` only, a missing value is an error; ``"estimate"``: always estimated;
   ``"none"``: no shift (spectra already at rest). The estimate cross-correlates the observed-frame
   spectrum (resampled and continuum-normalised like the features, telluric bands left out) with
   seven real MILES stars (A to M, one metal-poor; ``data/templates/miles_rv.npz``, made by
   ``tools/make_rv_templates.py``) prepared by this same pipeline, over lags up to ``rv_max_kms``,
   with a Gaussian peak refinement. ``quality["rv_kms"]`` is the velocity used,
   ``quality["rv_ccf"]`` the normalised CCF peak (0 where not estimated). A spectrum with no
   valid pixel or no positive CCF peak (e.g. featureless) gets 0 km/s, and ``notes`` count it,
   and the spectra whose peak is weak (< 0.2) or at the edge of the lag range.
4. **Flux-conserving resampling** onto the log10 grid ``wmin..wmax`` step ``dlog`` (default
   3900-8800 A, 1e-4 dex: 3535 pixels): each output pixel is the mean flux density of the good
   input pixels it overlaps, weighted by overlap; its variance is the exact propagation
   ``sum o^2 var / (sum o)^2``. An output pixel whose good coverage is below ``min_coverage`` of
   its width is masked. Arms are combined by inverse variance.
5. **Continuum** (``continuum="spline"``), fitted in the observed frame (on the zero-velocity
   rebinning, so it is the same for spectra with and without a known velocity) and carried to the
   rest frame by the velocity shift: a cubic P-spline with knots every ``cont_knot_dlog`` dex,
   fitted to bins of ``cont_bin`` pixels and refitted ``cont_iter`` times dropping bins below
   ``-cont_clip_lo`` or above ``+cont_clip_hi`` times the rms relative residual (so it climbs to
   the upper envelope). Where the continuum is below ``cont_floor`` times the spectrum's mean
   continuum, the pixel is masked: no division by about zero. Features = flux / continuum,
   ivar = ivar * continuum^2. ``continuum="none"`` keeps the flux (original units) and its ivar.
6. **Missing pixels** get feature 1.0 (the continuum; 0.0 with ``continuum="none"``) and ivar 0.
   Nothing non-finite ever leaves :meth:`RawFeaturizer.transform`.

Quality: ``snr`` (median of feature * sqrt(ivar) over valid pixels), ``masked_frac``, ``flags``
(``NO_OVERLAP`` when no valid pixel is left, ``HEAVY_MASK`` above ``heavy_mask_frac``, ``LOW_SNR``
below ``snr_min``, ``BAD_INPUT``, ``RV_ESTIMATED``), ``rv_kms``, ``rv_ccf``.

Templates: MILES (Sanchez-Blazquez et al. 2006, MNRAS 371, 703; Falcon-Barroso et al. 2011,
A&A 532, A95; parameters Cenarro et al. 2007, MNRAS 374, 664).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stxcli import flags as F
from stxcli.errors import StxError, UsageError
from stxcli.hookspecs import hookimpl
from stxcli.protocols import FeatureBatch
from stxcli.spectra import C_KMS, Arm, SpectrumBatch

from . import _rawlib as L

TEMPLATE_FILE = Path(__file__).resolve().parent.parent / "data" / "templates" / "miles_rv.npz"
RV_MODES = ("auto", "meta", "estimate", "none")
CONTINUUM_MODES = ("spline", "none")
#: Continuum iterations of the observed-frame pass used only for the RV cross-correlation.
_RV_CONT_ITER = 3
_CACHE_MAX = 64
#: Guards every lazily built cache (grids, kernels, rebinning matrices, continuum model, RV
#: templates and bank): ``transform`` may run in several threads at once (``thread_safe``), and
#: a half-built entry or the pair (bank, telluric mask) must never be seen by another thread.
#: Module-level, not per instance, so the featurizer stays picklable; builds are rare.
_BUILD_LOCK = threading.RLock()
#: With ``STX_KERNELS=auto`` a process turns to the kernels once it has featurized this many
#: spectra with data. Loading them (numba's import and their machine code) costs about 0.7 s
#: and 110 MB resident once per process, which they earn back over about 5,000 spectra (0.44 ->
#: 0.30 ms each on one thread, DESI coadds): a small job never loads them (a 500-spectrum coadd
#: took 2.7 s from the command line with them, 1.8 s without), a survey pays at most about twice
#: the best choice's start-up.
AUTO_AFTER_ROWS = 5000
KERNELS_ENV = "STX_KERNELS"
_KERNEL_MODES = ("auto", "compiled", "numpy")
_rows_seen = 0  # spectra with data featurized by this process (all instances), for "auto"
_warned_uncached: list[bool] = []


def kernels() -> str:
    """``$STX_KERNELS``: which implementation runs the raw featurizer's per-pixel steps, for
    batches that the compiled kernels of :mod:`._rawjit` cover. ``auto`` (default): numpy until
    the process has featurized :data:`AUTO_AFTER_ROWS` spectra with data, the kernels after;
    ``compiled``: the kernels from the first batch; ``numpy``: never the kernels (numba is not
    even imported). All three give the same features."""
    value = os.environ.get(KERNELS_ENV, "").strip().lower() or "auto"
    if value not in _KERNEL_MODES:
        raise UsageError(f"{KERNELS_ENV} must be one of {', '.join(_KERNEL_MODES)}, got {value!r}")
    return value


def _kernels_module() -> Any:
    """:mod:`._rawjit`, imported on first use (numba's import is the ~0.7 s that ``auto`` avoids on
    small jobs); the first time, a warning when numba has nowhere to cache the kernels."""
    from . import _rawjit

    with _BUILD_LOCK:
        if _rawjit.UNCACHED and not _warned_uncached:
            _warned_uncached.append(True)
            from stxcli import console

            console.warn("numba found no writable cache for the raw featurizer's compiled kernels (a read-only "
                         "install and home directory): they are compiled in every process (~10 s); set "
                         "NUMBA_CACHE_DIR to a writable folder, or STX_KERNELS=numpy")
    return _rawjit


def _turn_to_kernels(n_live: int) -> bool:
    """Whether a batch of ``n_live`` spectra with data goes to the kernels, by ``$STX_KERNELS``;
    counts the spectra for ``auto``."""
    global _rows_seen
    mode = kernels()
    if mode == "numpy":
        return False
    with _BUILD_LOCK:
        seen = _rows_seen
        _rows_seen += n_live
    # from one spectrum on (a one-star LAMOST file: 1.3x numpy's speed; one DESI spectrum: 2.6x)
    return n_live > 0 and (mode == "compiled" or seen >= AUTO_AFTER_ROWS)


@dataclass
class _Piece:
    """One arm (or the rows of an arm sharing one wavelength grid) ready for resampling."""

    grid: L.InputGrid
    cols: np.ndarray | None  # the batch columns (spectra) it holds; None = all
    a: np.ndarray  # (npix, k) flux * good * width
    b: np.ndarray | None  # good * width; None: every pixel is good (b = width)
    v: np.ndarray  # var * good * width^2
    has_good: np.ndarray  # (k,) any good pixel
    #: with ``b``: the columns whose every pixel is good. Their rebinning denominator is the covered
    #: width, as for a piece without ``b``, so that a spectrum's features do not depend on whether
    #: its batch holds spectra with bad pixels (to the bit: one-spectrum files are featurized
    #: together, ``stxcli.coalesce``)
    clean: np.ndarray | None = None


def _make_piece(grid: L.InputGrid, cols: np.ndarray | None, f: np.ndarray, g: np.ndarray,
                var: np.ndarray) -> _Piece:
    """``f`` and ``var`` (0 where ``g`` is False) are scaled in place when they are C-contiguous
    float32 (the featurizer's own arrays), else copied."""
    w = grid.width.astype(np.float32)[:, None]
    a = np.ascontiguousarray(f, dtype=np.float32)
    a *= w
    v = np.ascontiguousarray(var, dtype=np.float32)
    v *= w * w
    allgood = bool(g.all())
    b = None if allgood else np.multiply(g, w, dtype=np.float32)
    has_good = np.full(g.shape[1], g.shape[0] > 0) if allgood else g.any(axis=0)
    clean = None if allgood else np.flatnonzero(g.all(axis=0))
    return _Piece(grid, cols, a, b, v, has_good, clean)


def _pixel_major(a: Any, rows: np.ndarray | None, dtype: Any) -> np.ndarray:
    """A C-contiguous ``(npix, k)`` copy of the ``rows`` (None = all) of an ``(n, npix)`` array."""
    a = np.asarray(a)
    if rows is not None:
        a = a[rows]
    return np.array(a.T, dtype=dtype, order="C")


def _key(*arrays: Any) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        if a is None:
            h.update(b"none")
        else:
            arr = np.ascontiguousarray(np.asarray(a, dtype=np.float64))
            h.update(str(arr.shape).encode())
            h.update(arr.tobytes())
    return h.digest()


class RawFeaturizer:
    """Continuum-normalised flux on a common rest-frame log-lambda grid (see the module doc)."""

    name = "raw"
    version = "1.0"
    description = ("rest-frame, resolution-matched, flux-conserving resampled, continuum-normalised "
                   "flux on a log-lambda grid")
    needs_resolution = False
    #: ``transform`` may be called from several threads at once (each call works on its own
    #: arrays; the caches are filled under :data:`_BUILD_LOCK`), so ``stx featurize --threads``
    #: runs batches in parallel.
    thread_safe = True
    #: each spectrum's features depend on it alone: one-spectrum files are featurized together
    row_independent = True

    def __init__(
        self,
        wmin: float = 3900.0,
        wmax: float = 8800.0,
        dlog: float = 1e-4,
        target_r: float | None = 1800.0,
        assume_source_r: float | None = None,
        use_resolution_matrix: bool = False,
        rv: str = "auto",
        rv_max_kms: float = 1000.0,
        min_coverage: float = 0.5,
        continuum: str = "spline",
        cont_knot_dlog: float = 0.02,
        cont_bin: int = 4,
        cont_iter: int = 5,
        cont_clip_lo: float = 2.0,
        cont_clip_hi: float = 3.0,
        cont_floor: float = 0.05,
        snr_min: float = 5.0,
        heavy_mask_frac: float = 0.5,
    ) -> None:
        def num(name: str, value: Any, lo: float | None = None, hi: float | None = None,
                lo_open: bool = False) -> float:
            try:
                x = float(value)
            except (TypeError, ValueError):
                raise UsageError(f"raw featurizer: {name} must be a number, got {value!r}") from None
            if not math.isfinite(x) or (lo is not None and (x < lo or (lo_open and x == lo))) or (
                    hi is not None and x > hi):
                rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
                raise UsageError(f"raw featurizer: {name} = {value!r} is outside {rng}")
            return x

        self.wmin = num("wmin", wmin, 0.0, lo_open=True)
        self.wmax = num("wmax", wmax, 0.0, lo_open=True)
        self.dlog = num("dlog", dlog, 0.0, 0.1, lo_open=True)
        if self.wmax <= self.wmin:
            raise UsageError(f"raw featurizer: wmax ({self.wmax}) must exceed wmin ({self.wmin})")
        if (math.log10(self.wmax) - math.log10(self.wmin)) / self.dlog > 1e6:
            raise UsageError("raw featurizer: the grid would have more than 1e6 pixels")
        self.target_r = None if target_r is None else num("target_r", target_r, 0.0, lo_open=True)
        self.assume_source_r = (None if assume_source_r is None
                                else num("assume_source_r", assume_source_r, 0.0, lo_open=True))
        if not isinstance(use_resolution_matrix, (bool, np.bool_)):
            raise UsageError(f"raw featurizer: use_resolution_matrix must be true/false, got {use_resolution_matrix!r}")
        self.use_resolution_matrix = bool(use_resolution_matrix)
        self.needs_resolution = self.use_resolution_matrix
        if rv not in RV_MODES:
            raise UsageError(f"raw featurizer: rv must be one of {', '.join(RV_MODES)}, got {rv!r}")
        self.rv = str(rv)
        self.rv_max_kms = num("rv_max_kms", rv_max_kms, 0.0, C_KMS / 10, lo_open=True)
        self.min_coverage = num("min_coverage", min_coverage, 0.0, 1.0, lo_open=True)
        if continuum not in CONTINUUM_MODES:
            raise UsageError(f"raw featurizer: continuum must be one of {', '.join(CONTINUUM_MODES)}, "
                             f"got {continuum!r}")
        self.continuum = str(continuum)
        self.cont_knot_dlog = num("cont_knot_dlog", cont_knot_dlog, 0.0, lo_open=True)
        self.cont_bin = _int("cont_bin", cont_bin, 1)
        self.cont_iter = _int("cont_iter", cont_iter, 1)
        self.cont_clip_lo = num("cont_clip_lo", cont_clip_lo, 0.0, lo_open=True)
        self.cont_clip_hi = num("cont_clip_hi", cont_clip_hi, 0.0, lo_open=True)
        self.cont_floor = num("cont_floor", cont_floor, 0.0, 1.0)
        self.snr_min = num("snr_min", snr_min, 0.0)
        self.heavy_mask_frac = num("heavy_mask_frac", heavy_mask_frac, 0.0, 1.0)

        self._wave, self._edges = L.log_grid(self.wmin, self.wmax, self.dlog)
        self._log_edges = np.log10(self._edges)
        self._cont_model: L.ContinuumModel | None = None
        self._grids: dict[bytes, L.InputGrid] = {}
        self._degraders: dict[bytes, L.Degrader | None] = {}
        self._zero_mats: dict[bytes, Any] = {}
        self._ccf_templates: np.ndarray | None = None
        self._ccf_bank: L.CcfBank | None = None
        self._tell = np.zeros(self.dim, bool)
        kernels()  # a bad $STX_KERNELS is an error before any work, not at the first batch

    # ----------------------------------------------------------------------------- contract

    def config(self) -> dict[str, Any]:
        return {
            "wmin": self.wmin, "wmax": self.wmax, "dlog": self.dlog,
            "target_r": self.target_r, "assume_source_r": self.assume_source_r,
            "use_resolution_matrix": self.use_resolution_matrix,
            "rv": self.rv, "rv_max_kms": self.rv_max_kms,
            "min_coverage": self.min_coverage,
            "continuum": self.continuum, "cont_knot_dlog": self.cont_knot_dlog,
            "cont_bin": self.cont_bin, "cont_iter": self.cont_iter, "cont_clip_lo": self.cont_clip_lo,
            "cont_clip_hi": self.cont_clip_hi, "cont_floor": self.cont_floor,
            "snr_min": self.snr_min, "heavy_mask_frac": self.heavy_mask_frac,
        }

    @property
    def dim(self) -> int:
        return int(self._wave.size)

    def axis(self) -> np.ndarray:
        """Rest-frame vacuum wavelength (A) of each feature."""
        return self._wave.copy()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RawFeaturizer) and other.version == self.version and other.config() == self.config()

    def __hash__(self) -> int:
        return hash((self.name, self.version, json.dumps(self.config(), sort_keys=True)))

    def __repr__(self) -> str:
        return f"RawFeaturizer({', '.join(f'{k}={v!r}' for k, v in self.config().items())})"

    # ---------------------------------------------------------------------------- transform

    def transform(self, batch: SpectrumBatch) -> FeatureBatch:
        """Features of ``batch``. Internally every array is pixel-major ``(npix, n)`` so that the
        sparse products and gathers run over contiguous spectra; the output is ``(n, dim)``.
        Spectra without a single usable pixel in any arm skip every step: their output is the
        missing-pixel fill, flagged ``NO_OVERLAP``."""
        n = batch.n
        m = self.dim
        flags = np.zeros(n, dtype=np.int32)
        notes: list[str] = []
        if n == 0:
            q = {k: np.zeros(0, np.float32) for k in ("snr", "masked_frac", "rv_kms", "rv_ccf")}
            q["flags"] = np.zeros(0, np.int32)
            return FeatureBatch(np.zeros((0, m), np.float32), np.zeros((0, m), np.float32), q, batch.meta, notes)
        if not batch.arms:
            raise StxError("raw featurizer: the batch has no spectrograph arm")

        # 1. which pixels carry information, which spectra had NaN/inf, which have any data
        screened = [self._screen(arm) for arm in batch.arms]
        bad_input = np.zeros(n, dtype=bool)
        live_mask = np.zeros(n, dtype=bool)
        for good, nonfinite in screened:
            bad_input |= nonfinite
            live_mask |= good.any(axis=1)
        nbi = batch.meta.extra.get("n_bad_input") if batch.meta.extra else None
        if nbi is not None:
            bad_input |= np.asarray(nbi).reshape(-1)[:n] > 0
        live = None if live_mask.all() else np.flatnonzero(live_mask)
        rv, need = self._plan_velocities(batch)
        fill = np.float32(1.0 if self.continuum == "spline" else 0.0)

        # 2-6. the spectra with data
        ccf_peak = np.zeros(n)
        has_data = np.zeros(n, bool)
        est = np.zeros(n, bool)
        snr_l = None
        if live is None or live.size:
            grids = self._compiled_grids(batch, live)
            if grids is not None:
                feat_l, fivar_l, valid_l, snr_l = self._live_compiled(
                    batch, screened, live, grids, rv, need, has_data, est, ccf_peak, notes)
            else:
                feat_l, fivar_l, valid_l = self._live(batch, screened, live, rv, need, has_data, est, ccf_peak, notes)
        else:
            feat_l = fivar_l = np.zeros((0, m), np.float32)
            valid_l = np.zeros((0, m), bool)
        empty = need & ~has_data
        if empty.any():
            notes.append(f"{int(empty.sum())} spectra without data: no RV estimated (0 used)")
        flags[est] |= F.RV_ESTIMATED

        if live is None:
            feat, fivar, valid = feat_l, fivar_l, valid_l
        else:
            feat = np.full((n, m), fill, np.float32)
            fivar = np.zeros((n, m), np.float32)
            valid = np.zeros((n, m), bool)
            feat[live], fivar[live], valid[live] = feat_l, fivar_l, valid_l
        nvalid = np.count_nonzero(valid, axis=1)
        masked_frac = (1.0 - nvalid / m).astype(np.float32)
        snr = np.zeros(n, np.float32)
        if snr_l is None:
            snr_l = _masked_median(feat_l * np.sqrt(fivar_l), valid_l)
        snr_l = snr_l.astype(np.float32)
        if live is None:
            snr = snr_l
        else:
            snr[live] = snr_l
        flags[nvalid == 0] |= F.NO_OVERLAP
        flags[masked_frac > self.heavy_mask_frac] |= F.HEAVY_MASK
        flags[snr < self.snr_min] |= F.LOW_SNR
        flags[bad_input] |= F.BAD_INPUT
        if bad_input.any():
            notes.append(f"{int(bad_input.sum())} spectra had NaN/inf (or reader-counted bad) input pixels, masked")
        if (nvalid == 0).any():
            notes.append(f"{int((nvalid == 0).sum())} spectra have no valid pixel on the grid")
        quality = {
            "snr": snr,
            "masked_frac": masked_frac,
            "flags": flags,
            "rv_kms": rv.astype(np.float32),
            "rv_ccf": ccf_peak.astype(np.float32),
        }
        return FeatureBatch(features=feat, ivar=fivar, quality=quality, meta=batch.meta, notes=notes)

    def _compiled_grids(self, batch: SpectrumBatch, live: np.ndarray | None) -> list[L.InputGrid] | None:
        """Each arm's grid when the compiled kernels cover the batch, else None (the numpy path).
        They cover the common case: continuum on, one linear or log-linear grid per arm among the
        live spectra, and resolution matching (if any) from the arms' resolving power rather than
        per-spectrum resolution matrices; whether they run then depends on the batch's size and
        ``$STX_KERNELS`` (:func:`kernels`)."""
        if self.continuum != "spline" or not _turn_to_kernels(batch.n if live is None else live.size):
            return None
        grids = []
        for arm in batch.arms:
            groups = self._row_groups(arm, live)
            if len(groups) != 1:
                return None
            grid = self._grid(groups[0][1])
            if grid.kind == "general":
                return None
            if self.target_r is not None and self.use_resolution_matrix and arm.resolution is not None:
                return None
            grids.append(grid)
        return grids

    def _live_compiled(self, batch: SpectrumBatch, screened: list[tuple[np.ndarray, np.ndarray]],
                       live: np.ndarray | None, grids: list[L.InputGrid], rv: np.ndarray, need: np.ndarray,
                       has_data: np.ndarray, est: np.ndarray, ccf_peak: np.ndarray, notes: list[str]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`_live` by the compiled kernels of :mod:`._rawjit`, one spectrum at a time (the
        same steps, equal to float32 rounding), plus the SNR. The continuum fit and the RV
        cross-correlation stay batched matrix products."""
        J = _kernels_module()
        nl = batch.n if live is None else live.size
        rows = np.arange(batch.n, dtype=np.int64) if live is None else live.astype(np.int64)
        m = self.dim

        # 1. one scale per spectrum over all arms
        data = [(np.ascontiguousarray(arm.flux, dtype=np.float32), np.ascontiguousarray(arm.ivar, dtype=np.float32))
                for arm in batch.arms]
        asum = np.zeros(nl)
        gsum = np.zeros(nl, np.int64)
        ivmin = [np.empty(nl, np.float32) for _ in data]  # each arm's smallest good ivar per spectrum
        for (flux, ivar), (good, _), lo in zip(data, screened, ivmin):
            J.scale_sums(flux, ivar, good, rows, asum, gsum, lo)
        _, inv_scale = _scales(asum, gsum)
        screened = [(_without_overflow(good, ivar, rows, inv_scale, lo), nf)
                    for (good, nf), (_, ivar), lo in zip(screened, data, ivmin)]

        # 2-3. resolution matching and the observed frame, per arm
        s_fi = np.zeros((nl, m), np.float32)  # spectrum-major sums, transposed once below
        s_i = np.zeros((nl, m), np.float32)
        hd = np.zeros(nl, bool)
        pieces: list[tuple[L.InputGrid, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        used_nominal = 0
        none_i = np.zeros(1, np.int32)
        none_f = np.zeros(1, np.float32)
        for arm, grid, (flux, ivar), (good, _) in zip(batch.arms, grids, data, screened):
            npix = grid.npix
            ngood = int(np.count_nonzero(good if live is None else good[rows]))  # (no axis: 5x quicker)
            total = nl * npix
            allgood = ngood == total
            mode, deg = J.DEG_NONE, None
            if self.target_r is not None and ngood:
                deg, nominal = self._nominal_degrader(arm, grid)
                used_nominal += nominal
                if deg is not None:
                    mode = J.DEG_ALLGOOD  # each spectrum picks its re-normalisation (L.SPARSE_BAD_FRAC)
            k_arr = ((deg.k.indptr, deg.k.indices, deg.k.data, deg.k.data * deg.k.data, *deg.band) if deg is not None
                     else (none_i, none_i, none_f, none_f, np.zeros((0, npix), np.float32), 0))
            j0, j1 = self._bin_range(grid, 1.0, 1.0)
            j1 = max(j0, j1)
            edges = self._edges[j0: j1 + 1]
            if j1 > j0:
                o, _, _, runs = _cached(self._zero_mats, _key(grid.wave, edges),
                                        lambda: _zero_velocity_mats(grid, edges))
                o_arr = (o.indptr, o.indices, o.data, o.data * o.data, *runs)
            else:
                o_arr = (np.zeros(1, np.int32), none_i, none_f, none_f, np.zeros(0, np.int64),
                         np.zeros((0, 0), np.float32))
            thr = (self.min_coverage * np.diff(edges)).astype(np.float32)
            w = grid.width.astype(np.float32)
            a, v = (np.empty((nl, npix), np.float32) for _ in range(2))
            b = np.empty((0 if allgood else nl, npix), np.float32)  # the widths where all is good
            hg = np.empty(nl, bool)
            clean = np.empty(nl, bool)
            J.observed_arm(flux, ivar, good, rows, inv_scale, mode, L.SPARSE_BAD_FRAC, *k_arr,
                           w, w * w, allgood, *o_arr, j0, thr, a, b, v, hg, clean, s_fi, s_i)
            hd |= hg
            pieces.append((grid, a, b, v, clean))
            del a, b, v
        del data
        if used_nominal:
            notes.append(f"resolution matrix missing for {used_nominal} arm(s): used their resolving_power")
        J.finish(s_fi, s_i)
        # spectrum-major from here, as the kernels run: the continuum, the CCF's depths, the rest frame
        zfac, cont_o = self._velocities(s_fi, s_i, hd, live, rv, need, has_data, est, ccf_peak, notes,
                                        compiled=True)
        assert cont_o is not None  # continuum == "spline"

        # 4. rest frame, spectrum-major; 5-6. normalisation, missing pixels, SNR
        if np.all(zfac == 1.0):
            flux_r, ivar_r = s_fi, s_i
        else:
            del s_fi, s_i
            flux_r = np.zeros((nl, m), np.float32)
            ivar_r = np.zeros((nl, m), np.float32)
            minc_w = (self.min_coverage * np.diff(self._edges)).astype(np.float32)
            while pieces:  # each arm's arrays freed as soon as it is rebinned
                grid, a, b, v, clean = pieces.pop(0)
                j0, j1 = self._bin_range(grid, float(zfac.min()), float(zfac.max()))
                if j1 > j0:
                    J.rest_arm(a, b, v, clean, 0 if grid.kind == "linear" else 1, grid.x0, grid.step,
                               grid.edges - grid.edges[0], grid.width, self._edges, self._log_edges, j0, j1,
                               minc_w, zfac, np.log10(zfac), flux_r, ivar_r)
                del a, b, v
            J.finish(flux_r, ivar_r)
        del pieces
        valid = np.empty((nl, m), bool)
        snr = np.empty(nl)
        J.normalise(flux_r, ivar_r, cont_o, np.log10(zfac) / self.dlog,
                    float(self.cont_floor), np.float32(1.0), valid, snr)
        return flux_r, ivar_r, valid, snr

    def _live(self, batch: SpectrumBatch, screened: list[tuple[np.ndarray, np.ndarray]], live: np.ndarray | None,
              rv: np.ndarray, need: np.ndarray, has_data: np.ndarray, est: np.ndarray, ccf_peak: np.ndarray,
              notes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Steps 1-6 for the spectra ``live`` (None = all): ``(nl, dim)`` features, ivar and valid
        pixels. Fills ``rv``, ``has_data``, ``est`` and ``ccf_peak`` (length-n arrays) in place."""
        nl = batch.n if live is None else live.size

        # 1. pixel-major copies of the live spectra, zero where not good, one scale per spectrum
        arms: list[Any] = []
        asum = np.zeros(nl)
        gsum = np.zeros(nl)
        for arm, (good, _) in zip(batch.arms, screened):
            ft = _pixel_major(arm.flux, live, np.float32)
            gt = _pixel_major(good, live, bool)
            allgood = bool(gt.all())
            if not allgood:
                np.copyto(ft, np.float32(0.0), where=~gt)
            asum += np.abs(ft).sum(axis=0, dtype=np.float64)
            gsum += np.count_nonzero(gt, axis=0)
            arms.append((ft, gt, allgood))
        scale, inv_scale = _scales(asum, gsum)
        inv2 = (inv_scale * inv_scale)[None, :]

        # 2. resolution matching, per arm (and per grid inside an arm)
        pieces: list[_Piece] = []
        used_nominal = 0
        for k, arm in enumerate(batch.arms):
            ft, gt, allgood = arms[k]
            arms[k] = None  # free each arm's copies as soon as its pieces exist
            ft *= inv_scale[None, :]
            var = _pixel_major(arm.ivar, live, np.float32)
            with np.errstate(divide="ignore", over="ignore"):
                np.divide(np.broadcast_to(inv2, var.shape), var, out=var, where=gt)  # scaled 1/ivar
            if not allgood:
                np.copyto(var, np.float32(0.0), where=~gt)
            if var.size and var.max() == np.inf:  # an ivar so small its variance overflows: no information
                over = np.isinf(var)
                gt &= ~over
                ft[over] = 0.0
                var[over] = 0.0
                allgood = False
            for cols, wave in self._row_groups(arm, live):
                grid = self._grid(wave)
                if cols is None:
                    f, g, vv = ft, gt, var
                else:
                    f, g, vv = ft[:, cols], gt[:, cols], var[:, cols]
                if self.target_r is not None:
                    rows = live if cols is None else (cols if live is None else live[cols])
                    f, g, vv, nominal = self._degrade(arm, grid, rows, f, g, vv)
                    used_nominal += nominal
                pieces.append(_make_piece(grid, cols, f, g, vv))
                del f, g, vv
            del ft, gt, var
        if used_nominal:
            notes.append(f"resolution matrix missing for {used_nominal} arm(s): used their resolving_power")

        # 3. observed frame (fixed rebinning), continuum there, velocities
        flux_o, ivar_o = self._observed_frame(pieces, nl)
        hd = np.zeros(nl, bool)
        for pc in pieces:
            if pc.cols is None:
                hd |= pc.has_good
            else:
                hd[pc.cols[pc.has_good]] = True
        zfac, cont_o = self._velocities(flux_o, ivar_o, hd, live, rv, need, has_data, est, ccf_peak, notes)

        # 4. rest frame: exact rebinning at each spectrum's velocity, arms combined by ivar; from
        # here on spectrum-major (the output's layout): the continuum is shifted row by row
        if np.all(zfac == 1.0):
            flux_r, ivar_r = flux_o, ivar_o
            cont_r = None if cont_o is None else np.ascontiguousarray(cont_o.T)
        else:
            del flux_o, ivar_o
            flux_r, ivar_r = self._rest_frame(pieces, zfac, nl)
            cont_r = None if cont_o is None else L.shift_rows(cont_o, np.log10(zfac) / self.dlog)
            del cont_o
        del pieces
        flux_r = np.ascontiguousarray(flux_r.T)
        ivar_r = np.ascontiguousarray(ivar_r.T)

        # 5. continuum normalisation; 6. missing pixels
        if cont_r is not None:
            feat, fivar, valid = self._normalise(flux_r, ivar_r, cont_r, axis=1)
            fill = np.float32(1.0)
        else:
            feat = flux_r
            feat *= scale.astype(np.float32)[:, None]
            fivar = ivar_r
            fivar *= inv2.reshape(-1, 1)
            valid = ivar_r > 0
            fill = np.float32(0.0)
        with np.errstate(invalid="ignore"):
            valid &= np.isfinite(feat)
            valid &= fivar > 0  # also False for NaN
            valid &= fivar < np.inf
        invalid = ~valid
        np.copyto(feat, fill, where=invalid)
        np.copyto(fivar, np.float32(0.0), where=invalid)
        return feat, fivar, valid

    def _velocities(self, flux_o: np.ndarray, ivar_o: np.ndarray, hd: np.ndarray, live: np.ndarray | None,
                    rv: np.ndarray, need: np.ndarray, has_data: np.ndarray, est: np.ndarray, ccf_peak: np.ndarray,
                    notes: list[str], compiled: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
        """Step 3 after the observed-frame rebinning ``(m, nl)`` (``compiled``: spectrum-major
        ``(nl, m)``, the kernels' layout): the continuum there in the same layout (None with
        ``continuum="none"``) and each live spectrum's ``zfac``, estimated by cross-correlation where
        needed and possible (``hd``: the spectrum kept data). Fills ``rv``, ``has_data``, ``est``
        and ``ccf_peak`` (length-n arrays) in place."""
        nl = hd.size
        sel = slice(None) if live is None else live
        has_data[sel] = hd
        est_l = need[sel] & hd
        est[sel] = est_l
        cont_o = None
        if self.continuum == "spline":
            cont_o = (self._continuum_compiled(flux_o, ivar_o) if compiled
                      else self._continuum(flux_o, ivar_o, self.cont_iter))
        rv_l = rv[sel].copy()
        if est_l.any():
            ce = np.flatnonzero(est_l)
            full = ce.size == nl

            def some(a: np.ndarray) -> np.ndarray:
                return a if full else (a[ce] if compiled else a[:, ce])

            v, peak = self._estimate_rv(some(flux_o), some(ivar_o), None if cont_o is None else some(cont_o),
                                        notes, compiled and cont_o is not None)
            rv_l[ce] = v
            pk = np.zeros(nl)
            pk[ce] = peak
            ccf_peak[sel] = pk
        rv[sel] = rv_l
        return 1.0 + rv_l / C_KMS, cont_o

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _screen(arm: Arm) -> tuple[np.ndarray, np.ndarray]:
        """``good`` (n, npix), the pixels that carry information (finite flux and ivar, ivar > 0,
        not masked), and which spectra had non-finite input (n,). No copy of flux or ivar: rows
        are screened with two sums (NaN/inf propagate) and only suspect rows are examined pixel by
        pixel."""
        flux = np.asarray(arm.flux)
        ivar = np.asarray(arm.ivar)
        if flux.ndim != 2 or ivar.shape != flux.shape:
            raise StxError(f"raw featurizer: arm {arm.name}: flux/ivar must be (n, npix) of one shape")
        with np.errstate(over="ignore", invalid="ignore"):
            suspect = ~np.isfinite(flux.sum(axis=1)) | ~np.isfinite(ivar.sum(axis=1))
            good = ivar > 0
        if arm.mask is not None:
            mask = np.asarray(arm.mask, dtype=bool)
            if mask.shape != flux.shape:
                raise StxError(f"raw featurizer: arm {arm.name}: mask must have the shape of flux")
            good &= ~mask
        nonfinite = np.zeros(flux.shape[0], bool)
        rows = np.flatnonzero(suspect)
        if rows.size:
            fin = np.isfinite(flux[rows]) & np.isfinite(ivar[rows])
            nonfinite[rows] = ~fin.all(axis=1)
            good[rows] &= fin
        return good, nonfinite

    @staticmethod
    def _row_groups(arm: Arm, live: np.ndarray | None = None) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """(columns, wavelength) per distinct grid among the spectra ``live`` (None = all), the
        columns counted within ``live``; columns None = all of them."""
        wave = np.asarray(arm.wave, dtype=np.float64)
        if wave.ndim == 1:
            return [(None, wave)]
        if live is not None:
            wave = wave[live]
        uniq, inverse = np.unique(wave, axis=0, return_inverse=True)
        if uniq.shape[0] == 1:
            return [(None, uniq[0])]
        inverse = np.asarray(inverse).reshape(-1)
        return [(np.flatnonzero(inverse == k), uniq[k]) for k in range(uniq.shape[0])]

    def _grid(self, wave: np.ndarray) -> L.InputGrid:
        key = _key(wave)
        def build() -> L.InputGrid:
            try:
                return L.describe_grid(wave)
            except ValueError as exc:
                raise StxError(f"raw featurizer: {exc}") from exc

        return _cached(self._grids, key, build)

    def _source_r(self, arm: Arm, grid: L.InputGrid) -> np.ndarray:
        if arm.resolving_power is not None:
            r = np.broadcast_to(np.asarray(arm.resolving_power, dtype=np.float64), grid.wave.shape)
            if not (np.all(np.isfinite(r)) and np.all(r > 0)):
                raise StxError(f"raw featurizer: arm {arm.name}: resolving_power must be finite and > 0")
            return r
        if self.assume_source_r is not None:
            return np.full(grid.npix, self.assume_source_r)
        raise StxError(f"raw featurizer: arm {arm.name} has no resolving power; set assume_source_r "
                       f"(the R to assume) or target_r=None (no resolution matching)")

    def _degrade(self, arm: Arm, grid: L.InputGrid, rows: np.ndarray | None, f: np.ndarray, g: np.ndarray,
                 vv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """Resolution matching of one piece; ``f`` and ``vv`` are 0 where ``g`` is False, ``rows``
        are the piece's rows in the batch (None = all)."""
        assert self.target_r is not None
        if not g.any():  # nothing to degrade (e.g. dead fibres only): no resolution needed
            return f, g, vv, 0
        if self.use_resolution_matrix and arm.resolution is not None:
            res = np.asarray(arm.resolution)
            if rows is not None:
                res = res[rows]
            if res.ndim != 3 or res.shape[0] != f.shape[1] or res.shape[2] != grid.npix:
                raise StxError(f"raw featurizer: arm {arm.name}: resolution must be (n, ndiag, npix)")
            sig_src = L.sigma_from_resolution(res) * grid.width[:, None]
            dead = ~np.isfinite(sig_src)
            if dead.any():
                if arm.resolving_power is None and (dead & g).any():
                    raise StxError(f"raw featurizer: arm {arm.name}: resolution matrix has dead rows for "
                                   f"spectra with data and no resolving_power to use instead")
                nominal = (grid.wave / self._source_r(arm, grid) / L.FWHM_PER_SIGMA
                           if arm.resolving_power is not None else np.zeros(grid.npix))
                sig_src = np.where(dead, np.broadcast_to(nominal[:, None], sig_src.shape), sig_src)
            s_t = grid.wave[:, None] / (self.target_r * L.FWHM_PER_SIGMA)
            sigma = np.sqrt(np.clip(s_t * s_t - sig_src * sig_src, 0.0, None))
            f2, g2, v2 = L.degrade_per_spectrum(grid, sigma, f, g, vv)
            return f2, g2, v2, 0
        deg, nominal = self._nominal_degrader(arm, grid)
        if deg is None:
            return f, g, vv, nominal
        f2, g2, v2 = L.apply_degrader(deg, f, g, vv, zeroed=True)
        return f2, g2, v2, nominal

    def _nominal_degrader(self, arm: Arm, grid: L.InputGrid) -> tuple[L.Degrader | None, int]:
        """The cached fixed kernel from the arm's resolving power to ``target_r`` (None: the arm is
        nowhere sharper), and 1 when a resolution matrix was asked for but the arm has none."""
        assert self.target_r is not None
        r_src = self._source_r(arm, grid)
        key = _key(grid.wave, r_src, np.array([self.target_r]))
        deg = _cached(self._degraders, key,
                      lambda: L.build_degrader(grid, L.kernel_sigma(grid.wave, r_src, self.target_r)))
        return deg, int(self.use_resolution_matrix)

    # ----------------------------------------------------------------------- rest frame, RV

    def _bin_range(self, grid: L.InputGrid, zmin: float, zmax: float) -> tuple[int, int]:
        lo = grid.edges[0] / zmax
        hi = grid.edges[-1] / zmin
        m = self.dim
        j0 = int(np.clip(np.searchsorted(self._edges, lo, side="right") - 1, 0, m))
        j1 = int(np.clip(np.searchsorted(self._edges, hi, side="left"), 0, m))
        return j0, max(j0, j1)

    def _observed_frame(self, pieces: list[_Piece], n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every piece rebinned at zero velocity (one cached sparse product per arm grid) and the
        arms combined by inverse variance: ``(m, n)`` flux and ivar in the observed frame."""
        m = self.dim
        s_fi = np.zeros((m, n), dtype=np.float32)
        s_i = np.zeros((m, n), dtype=np.float32)
        for pc in pieces:
            j0, j1 = self._bin_range(pc.grid, 1.0, 1.0)
            if j1 <= j0:
                continue
            edges = self._edges[j0: j1 + 1]
            o, o2, covered, _ = _cached(self._zero_mats, _key(pc.grid.wave, edges),
                                        lambda: _zero_velocity_mats(pc.grid, edges))
            num, vnum = o @ pc.a, o2 @ pc.v
            den = covered if pc.b is None else o @ pc.b
            if pc.clean is not None and pc.clean.size:
                den[:, pc.clean] = covered
            thr = (self.min_coverage * np.diff(edges)).astype(np.float32)[:, None]
            self._accumulate(s_fi, s_i, pc.cols, j0, j1, num, den, vnum, thr)
        return _finish_combination(s_fi, s_i)

    def _rest_frame(self, pieces: list[_Piece], zfac: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Every piece rebinned exactly at its spectra's ``zfac`` and the arms combined by inverse
        variance: ``(m, n)`` flux and ivar in the rest frame."""
        m = self.dim
        s_fi = np.zeros((m, n), dtype=np.float32)
        s_i = np.zeros((m, n), dtype=np.float32)
        for pc in pieces:
            zf = zfac if pc.cols is None else zfac[pc.cols]
            j0, j1 = self._bin_range(pc.grid, float(zf.min()), float(zf.max()))
            if j1 <= j0:
                continue
            edges = self._edges[j0: j1 + 1]
            p = L.edge_positions(pc.grid, edges, zf)
            num, den, vnum = L.resample_sums(pc.a, pc.b, pc.v, p, pc.grid.npix, pc.grid)
            if pc.clean is not None and pc.clean.size:
                den[:, pc.clean] = L.covered_width(pc.grid, p if p.shape[1] == 1 else p[:, pc.clean])
            thr = np.multiply((self.min_coverage * np.diff(edges)).astype(np.float32)[:, None],
                              zf.astype(np.float32)[None, :])  # min_coverage x the bins' observed width
            self._accumulate(s_fi, s_i, pc.cols, j0, j1, num, den, vnum, thr)
        return _finish_combination(s_fi, s_i)

    def _accumulate(self, s_fi: np.ndarray, s_i: np.ndarray, cols: np.ndarray | None, j0: int, j1: int,
                    num: np.ndarray, den: np.ndarray, vnum: np.ndarray, thr: np.ndarray) -> None:
        """Add one arm's rebinned sums as ``ivar * flux`` and ``ivar``, leaving out bins whose good
        coverage ``den`` is below ``thr`` (``min_coverage`` times their width). ``num`` and
        ``vnum`` are overwritten."""
        ok = vnum > 0
        ok &= den >= thr
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iv = np.divide(np.broadcast_to(den, vnum.shape), vnum, out=vnum, where=ok)  # den / vnum
            np.copyto(iv, np.float32(0.0), where=~ok)
            fi = np.multiply(iv, num, out=num)  # ivar * flux = (den^2/vnum) * (num/den)
            iv *= den
        if cols is None:
            s_fi[j0:j1] += fi
            s_i[j0:j1] += iv
        else:
            s_fi[j0:j1, cols] += fi
            s_i[j0:j1, cols] += iv

    def prepare(self) -> None:
        """Build what does not depend on the input (the continuum basis, the RV templates and their
        shifted bank) and do the transform's imports, so that worker processes forked after this
        call inherit them instead of each building them on its first file. Templates that do not
        overlap the grid are an error only when a velocity has to be estimated."""
        import importlib

        for module in ("scipy.sparse", "scipy.special", "scipy.linalg"):  # the transform's lazy imports
            importlib.import_module(module)
        self._model()
        if self.rv in ("auto", "estimate"):
            try:
                self._bank()
            except StxError:
                pass

    def _model(self) -> L.ContinuumModel:
        with _BUILD_LOCK:
            if self._cont_model is None:
                self._cont_model = L.build_continuum_model(np.log10(self._wave), self.cont_knot_dlog, self.cont_bin)
            return self._cont_model

    def _bank(self) -> L.CcfBank:
        """The RV templates shifted by every lag (telluric bands left out), built once."""
        with _BUILD_LOCK:
            if self._ccf_bank is None:
                tell = np.zeros(self.dim, bool)
                for lo, hi in L.TELLURIC_BANDS:
                    tell |= (self._wave >= lo) & (self._wave <= hi)
                max_lag = int(math.ceil(math.log10(1.0 + self.rv_max_kms / C_KMS) / self.dlog)) + 1
                bank = L.ccf_bank(self._templates(), max_lag, off=tell)
                self._tell = tell  # before the bank: a thread that sees the bank sees its mask
                self._ccf_bank = bank
            return self._ccf_bank

    def _continuum(self, flux: np.ndarray, ivar: np.ndarray, n_iter: int) -> np.ndarray:
        return L.fit_continuum(self._model(), flux, ivar > 0, n_iter, self.cont_clip_lo, self.cont_clip_hi,
                               zeroed=True)  # the combination leaves flux 0 where ivar is 0

    def _continuum_compiled(self, flux: np.ndarray, ivar: np.ndarray) -> np.ndarray:
        """:meth:`_continuum` of spectrum-major ``(n, m)`` spectra by :func:`._rawjit.continuum`
        (the same fit, :data:`._rawjit.BLOCK` spectra at a time, without the GIL), spectrum-major."""
        mod = self._model()
        cont = np.empty(flux.shape, np.float32)
        failed = _kernels_module().continuum(
            flux, ivar, mod.nbin, *mod.csr("prod"), mod.d_of_pair, mod.pairs_k, mod.pen_band, *mod.csr("bin"),
            *mod.csr("bin_t"), *mod.csr("basis"), int(self.cont_iter), float(self.cont_clip_lo),
            float(self.cont_clip_hi), cont)
        if failed:  # what LAPACK's banded Cholesky says in the numpy path
            raise np.linalg.LinAlgError(f"continuum fit: {failed} normal matrices not positive definite")
        return cont

    def _normalise(self, flux: np.ndarray, ivar: np.ndarray, cont: np.ndarray, axis: int = 0
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """flux/cont and ivar*cont^2 (pixel-major (m, n) with ``axis=0``, spectrum-major (n, m) with
        ``axis=1``); pixels whose continuum is below ``cont_floor`` times the spectrum's mean
        continuum over its good pixels are not valid."""
        good = ivar > 0
        ng = np.count_nonzero(good, axis=axis)
        with np.errstate(divide="ignore", invalid="ignore"):
            cref = np.einsum("ij,ij->j" if axis == 0 else "ij,ij->i", cont, good.astype(np.float32)) / ng
        floor = np.where(np.isfinite(cref) & (cref > 0), self.cont_floor * cref, np.inf).astype(np.float32)
        valid = good
        valid &= cont > (floor[None, :] if axis == 0 else floor[:, None])
        safe = np.where(valid, cont, np.float32(1.0))
        feat = flux / safe
        fivar = ivar * safe
        fivar *= safe
        return feat, fivar, valid

    def _plan_velocities(self, batch: SpectrumBatch) -> tuple[np.ndarray, np.ndarray]:
        """Velocities known up front (0 elsewhere) and which spectra need an estimate; whether
        they get one depends on their having data."""
        n = batch.n
        meta_rv = np.asarray(batch.meta.rv_kms, dtype=np.float64).reshape(-1)
        if meta_rv.size != n:
            raise StxError("raw featurizer: meta.rv_kms has the wrong length")
        rv = np.zeros(n)
        none = np.zeros(n, bool)
        if self.rv == "none":
            return rv, none
        known = np.isfinite(meta_rv)
        if np.any(np.abs(meta_rv[known]) >= C_KMS / 2):
            raise StxError("raw featurizer: meta.rv_kms holds values beyond c/2; is it a redshift?")
        if self.rv == "meta":
            if not known.all():
                raise StxError(f"raw featurizer: rv='meta' but {int((~known).sum())} of {n} spectra have no "
                               f"radial velocity (use rv='auto' to estimate those, or give a catalog column)")
            return meta_rv.copy(), none
        need = ~known if self.rv == "auto" else np.ones(n, bool)
        rv[~need] = meta_rv[~need]
        return rv, need

    def _estimate_rv(self, flux: np.ndarray, ivar: np.ndarray, cont: np.ndarray | None, notes: list[str],
                     compiled: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """CCF velocities (km/s) and peaks of observed-frame spectra ``(m, ne)`` against the MILES
        templates; 0 km/s (peak 0) where there is no positive peak. Counts go to ``notes``.
        ``compiled``: spectrum-major ``(ne, m)`` inputs, the line depths by :func:`._rawjit.rv_depth`."""
        ne = flux.shape[0 if compiled else 1]
        if cont is None:  # continuum="none": a continuum for the cross-correlation only
            cont = self._continuum(flux, ivar, _RV_CONT_ITER)
        bank = self._bank()
        if compiled:  # the same depths in two passes instead of a dozen
            x = np.empty(flux.shape, np.float32)
            valid = np.empty(flux.shape, bool)
            _kernels_module().rv_depth(flux, ivar, cont, self._tell, float(self.cont_floor), x, valid)
        else:
            feat, _, valid = self._normalise(flux, ivar, cont)
            valid &= ~self._tell[:, None]
            x = np.subtract(np.float32(1.0), feat, out=feat)
            np.clip(x, np.float32(-1.0), np.float32(1.0), out=x)
            x *= valid
            x, valid = np.ascontiguousarray(x.T), np.ascontiguousarray(valid.T)  # as the kernels give them
        v, peak, edge = L.ccf_velocity(x, valid, bank, self.dlog)
        failed = ~(peak > 0)  # nothing on the grid to correlate, or no positive CCF peak
        weak = ~failed & ((peak < 0.2) | edge)
        extra = []
        if failed.any():
            extra.append(f"{int(failed.sum())} failed: no CCF peak, 0 used")
        if weak.any():
            extra.append(f"{int(weak.sum())} unreliable: CCF peak < 0.2 or at +-{self.rv_max_kms:g} km/s")
        notes.append(f"rv estimated by cross-correlation with MILES templates for {ne} spectra"
                     + (f" ({'; '.join(extra)})" if extra else ""))
        return np.where(failed, 0.0, v), np.where(failed, 0.0, peak)

    def _templates(self) -> np.ndarray:
        """Line depths (T, m) of the MILES RV templates, prepared by this featurizer's own steps."""
        if self._ccf_templates is not None:
            return self._ccf_templates
        from stxcli.spectra import air_to_vacuum

        if not TEMPLATE_FILE.exists():
            raise StxError(f"raw featurizer: RV template file {TEMPLATE_FILE} is missing (broken install?)")
        with np.load(TEMPLATE_FILE, allow_pickle=False) as z:
            flux = np.ascontiguousarray(np.asarray(z["flux"], dtype=np.float32).T)  # (npix, T)
            wave_air = float(z["crval1_air"]) + float(z["cdelt1"]) * np.arange(flux.shape[0])
            fwhm = float(z["fwhm"])
        wave = air_to_vacuum(wave_air)
        grid = L.describe_grid(wave)
        nt = flux.shape[1]
        good = np.isfinite(flux) & (flux > 0)
        f = np.where(good, flux, 0.0).astype(np.float32)
        var = good.astype(np.float32) * np.float32(1e-4)  # noiseless library: any small equal variance
        if self.target_r is not None:
            deg = L.build_degrader(grid, L.kernel_sigma(wave, wave / fwhm, self.target_r))
            if deg is not None:
                f, good, var = L.apply_degrader(deg, f, good, var, zeroed=True)
        pc = _make_piece(grid, None, f, good, var)
        flux_c, ivar_c = self._observed_frame([pc], nt)
        if not (ivar_c > 0).any(axis=0).all():
            raise StxError(f"raw featurizer: the grid {self.wmin:g}-{self.wmax:g} A does not overlap the RV "
                           f"templates ({wave[0]:.0f}-{wave[-1]:.0f} A): RV estimation is impossible; "
                           f"give velocities (rv='meta') or use rv='none'")
        cont = self._continuum(flux_c, ivar_c, max(self.cont_iter, _RV_CONT_ITER))
        feat, _, valid = self._normalise(flux_c, ivar_c, cont)
        depth = np.where(valid, np.clip(1.0 - feat, -1.0, 1.0), 0.0)
        self._ccf_templates = np.ascontiguousarray(depth.T, dtype=np.float32)
        return self._ccf_templates


def _int(name: str, value: Any, lo: int) -> int:
    ok = not isinstance(value, bool)
    try:
        ok = ok and float(value).is_integer() and int(value) >= lo
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UsageError(f"raw featurizer: {name} must be an integer >= {lo}, got {value!r}")
    return int(value)


def _without_overflow(good: np.ndarray, ivar: np.ndarray, rows: np.ndarray, inv_scale: np.ndarray,
                      ivmin: np.ndarray) -> np.ndarray:
    """``good`` (n_all, npix) without the pixels of spectra ``rows`` whose scaled variance
    ``inv_scale^2 / ivar`` overflows float32 (an ivar of ~1e-44 carries no information), as the
    numpy path drops them; ``ivmin``: each spectrum's smallest good ivar, so that only the rows
    where it overflows are looked at (a copy of ``good`` only then)."""
    sc2 = inv_scale * inv_scale
    with np.errstate(divide="ignore", over="ignore"):
        suspect = np.flatnonzero(sc2 / ivmin == np.inf)
    if not suspect.size:
        return good
    good = good.copy()
    for i in suspect:
        r = rows[i]
        with np.errstate(divide="ignore", over="ignore"):
            good[r] &= ~(sc2[i] / ivar[r] == np.inf)
    return good


def _scales(asum: np.ndarray, gsum: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each spectrum's scale, its mean absolute good flux ``asum / gsum`` over all arms (1 where
    that is not a positive number), and the float32 inverse the flux is multiplied by."""
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = asum / gsum
    scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
    return scale, (1.0 / scale).astype(np.float32)


def _finish_combination(s_fi: np.ndarray, s_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance mean ``sum(ivar*flux)/sum(ivar)`` and ``sum(ivar)``, in place; 0/0 where
    there is none or a sum is not finite."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        ok = s_i > 0
        ok &= s_i < np.inf
        flux = np.divide(s_fi, s_i, out=s_fi, where=ok)
        ok &= np.isfinite(flux)
    bad = ~ok
    np.copyto(flux, np.float32(0.0), where=bad)
    np.copyto(s_i, np.float32(0.0), where=bad)
    return flux, s_i


def _masked_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row medians of ``values`` over ``valid`` pixels (0 for a row without one); ``values`` is
    overwritten. Half of each row's invalid entries become -inf and the rest +inf, so the median of
    the valid ones sits at the fixed positions m//2 - 1 and m//2 of every row: one partition
    (selection, not a sort) and a minimum find it."""
    n, m = values.shape
    k = np.count_nonzero(valid, axis=1)
    if n == 0 or m == 0:
        return np.zeros(n)
    rows = np.flatnonzero(k < m)
    if rows.size:
        inv = ~valid[rows]
        rank = np.cumsum(inv, axis=1, dtype=np.int32)  # 1-based rank among the row's invalid
        neg = ((m - k[rows]) // 2).astype(np.int32)[:, None]
        sub = values[rows]
        np.copyto(sub, np.where(rank <= neg, np.float32(-np.inf), np.float32(np.inf)), where=inv)
        values[rows] = sub
    half = m // 2
    if half >= 1:
        values.partition(half - 1, axis=1)
        lo = values[:, half - 1].astype(np.float64)
        hi = values[:, half:].min(axis=1).astype(np.float64)
    else:
        lo = hi = values[:, 0].astype(np.float64)
    with np.errstate(invalid="ignore"):
        med = np.where(k % 2 == 1, hi if m % 2 == 1 else lo, 0.5 * (lo + hi))
    med = np.where(k > 0, med, 0.0)
    return np.where(np.isfinite(med), med, 0.0)


def _cached(cache: dict, key: Any, build: Any) -> Any:
    """``cache[key]``, built by ``build()`` and stored (the oldest of :data:`_CACHE_MAX` entries
    dropped) the first time, under :data:`_BUILD_LOCK`."""
    with _BUILD_LOCK:
        if key not in cache:
            value = build()
            if len(cache) >= _CACHE_MAX:
                cache.pop(next(iter(cache)))
            cache[key] = value
        return cache[key]


def _zero_velocity_mats(grid: L.InputGrid, edges: np.ndarray
                        ) -> tuple[Any, Any, np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """The rebinning of ``grid`` onto ``edges`` at zero velocity: the overlap matrix, its square
    (for the variance), the width each output bin covers, and the matrix's rows as the compiled
    kernels take them (:func:`._rawlib.fixed_width_rows`)."""
    o = L.resample_matrix(grid, edges)
    covered = (o @ grid.width.astype(np.float32)).astype(np.float32)[:, None]
    return o, o.multiply(o).tocsr(), covered, L.fixed_width_rows(o)


@hookimpl
def register_featurizers(register: Any) -> None:
    register(RawFeaturizer)
