"""The ``raw`` featurizer: any survey's spectra -> continuum-normalised flux on one rest-frame grid.

Steps, each vectorised over the batch (numerics in :mod:`._rawlib`):

1. **Clean.** Pixels that are masked, have ivar <= 0 or non-finite flux/ivar carry no
   information (NaN/inf input also sets ``BAD_INPUT``, as does a reader's
   ``meta.extra["n_bad_input"] > 0``). Each spectrum is scaled by its mean absolute good flux
   (all arms together) so physical units of any size are safe in float32.
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


@dataclass
class _Piece:
    """One arm (or the rows of an arm sharing one wavelength grid) ready for resampling."""

    grid: L.InputGrid
    cols: np.ndarray | None  # the batch columns (spectra) it holds; None = all
    a: np.ndarray  # (npix + PAD_ROWS, k) flux * good * width, zero-padded
    b: np.ndarray  # good * width
    v: np.ndarray  # var * good * width^2
    has_good: np.ndarray  # (k,) any good pixel


def _make_piece(grid: L.InputGrid, cols: np.ndarray | None, f: np.ndarray, g: np.ndarray,
                var: np.ndarray) -> _Piece:
    npix, k = f.shape
    w = grid.width.astype(np.float32)[:, None]
    a, b, v = L.padded(npix, k), L.padded(npix, k), L.padded(npix, k)
    np.multiply(g, w, out=b[:npix])
    np.multiply(f, b[:npix], out=a[:npix])
    np.multiply(var, b[:npix], out=v[:npix])
    v[:npix] *= w
    return _Piece(grid, cols, a, b, v, g.any(axis=0))


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
        self._cont_model: L.ContinuumModel | None = None
        self._grids: dict[bytes, L.InputGrid] = {}
        self._degraders: dict[bytes, L.Degrader | None] = {}
        self._zero_mats: dict[bytes, Any] = {}
        self._ccf_templates: np.ndarray | None = None
        self._ccf_bank: L.CcfBank | None = None

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
        sparse products and gathers run over contiguous spectra; the output is ``(n, dim)``."""
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

        # 1. clean + common per-spectrum scale
        cleaned = []
        bad_input = np.zeros(n, dtype=bool)
        asum = np.zeros(n)
        gsum = np.zeros(n)
        for arm in batch.arms:
            flux, ivar, good, nonfinite = self._clean(arm)
            bad_input |= nonfinite
            asum += np.abs(flux).sum(axis=0, dtype=np.float64)
            gsum += good.sum(axis=0)
            cleaned.append((flux, ivar, good))
        nbi = batch.meta.extra.get("n_bad_input") if batch.meta.extra else None
        if nbi is not None:
            bad_input |= np.asarray(nbi).reshape(-1)[:n] > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = asum / gsum
        scale = np.where(np.isfinite(scale) & (scale > 0), scale, 1.0)
        inv_scale = (1.0 / scale).astype(np.float32)

        # 2. resolution matching, per arm (and per grid inside an arm)
        pieces: list[_Piece] = []
        used_nominal = 0
        for k, arm in enumerate(batch.arms):
            flux, ivar, good = cleaned[k]
            cleaned[k] = None  # free each arm's copies as soon as its pieces exist
            flux *= inv_scale[None, :]
            var = ivar  # in place: 1/ivar where good
            np.divide(np.float32(1.0), ivar, out=var, where=good)
            var *= (inv_scale * inv_scale)[None, :]
            del ivar
            for cols, wave in self._row_groups(arm):
                grid = self._grid(wave)
                if cols is None:
                    f, g, vv = flux, good, var
                else:
                    f, g, vv = flux[:, cols], good[:, cols], var[:, cols]
                if self.target_r is not None:
                    f, g, vv, nominal = self._degrade(arm, grid, cols, f, g, vv)
                    used_nominal += nominal
                pieces.append(_make_piece(grid, cols, f, g, vv))
                del f, g, vv
            del flux, good, var
        if used_nominal:
            notes.append(f"resolution matrix missing for {used_nominal} arm(s): used their resolving_power")

        # 3. observed frame (fixed rebinning), continuum there, velocities
        flux_o, ivar_o = self._observed_frame(pieces, n)
        rv, est, empty = self._plan_velocities(batch, pieces)
        cont_o = None
        if self.continuum == "spline":
            cont_o = self._continuum(flux_o, ivar_o, self.cont_iter)
        ccf_peak = np.zeros(n)
        if est.any():
            rv[est], ccf_peak[est] = self._estimate_rv(flux_o[:, est], ivar_o[:, est],
                                                       None if cont_o is None else cont_o[:, est], notes)
        if empty.any():
            notes.append(f"{int(empty.sum())} spectra without data: no RV estimated (0 used)")
        flags[est] |= F.RV_ESTIMATED
        zfac = 1.0 + rv / C_KMS

        # 4. rest frame: exact rebinning at each spectrum's velocity, arms combined by ivar
        if np.all(zfac == 1.0):
            flux_r, ivar_r, cont_r = flux_o, ivar_o, cont_o
        else:
            del flux_o, ivar_o
            flux_r, ivar_r = self._rest_frame(pieces, zfac, n)
            cont_r = None if cont_o is None else L.shift_columns(cont_o, np.log10(zfac) / self.dlog)
            del cont_o
        del pieces

        # 5. continuum normalisation; 6. missing pixels, quality
        if cont_r is not None:
            feat, fivar, valid = self._normalise(flux_r, ivar_r, cont_r)
            fill = np.float32(1.0)
        else:
            feat = flux_r * scale.astype(np.float32)[None, :]
            fivar = ivar_r * (inv_scale * inv_scale)[None, :]
            valid = ivar_r > 0
            fill = np.float32(0.0)
        valid &= np.isfinite(feat)
        valid &= np.isfinite(fivar)
        valid &= fivar > 0
        feat = np.ascontiguousarray(np.where(valid, feat, fill).T, dtype=np.float32)
        fivar = np.ascontiguousarray(np.where(valid, fivar, np.float32(0.0)).T, dtype=np.float32)
        valid = np.ascontiguousarray(valid.T)
        nvalid = valid.sum(axis=1)
        masked_frac = (1.0 - nvalid / m).astype(np.float32)
        snr = _masked_median(feat * np.sqrt(fivar), valid).astype(np.float32)
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

    # ------------------------------------------------------------------------------ helpers

    @staticmethod
    def _clean(arm: Arm) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pixel-major copies ``(npix, n)``: flux and ivar zeroed where not good, good, and which
        spectra had non-finite input."""
        flux = np.asarray(arm.flux)
        ivar = np.asarray(arm.ivar)
        if flux.ndim != 2 or ivar.shape != flux.shape:
            raise StxError(f"raw featurizer: arm {arm.name}: flux/ivar must be (n, npix) of one shape")
        flux = np.array(flux.T, dtype=np.float32, order="C")  # always a copy: modified in place
        ivar = np.array(ivar.T, dtype=np.float32, order="C")
        fin = np.isfinite(flux)
        fin &= np.isfinite(ivar)
        nonfinite = ~fin.all(axis=0)
        good = fin
        good &= ivar > 0
        if arm.mask is not None:
            good &= ~np.asarray(arm.mask, dtype=bool).T
        if not good.all():
            flux = np.where(good, flux, np.float32(0.0))
            ivar = np.where(good, ivar, np.float32(0.0))
        return flux, ivar, good, nonfinite

    @staticmethod
    def _row_groups(arm: Arm) -> list[tuple[np.ndarray | None, np.ndarray]]:
        """(columns, wavelength) per distinct grid; columns None = the whole batch."""
        wave = np.asarray(arm.wave, dtype=np.float64)
        if wave.ndim == 1:
            return [(None, wave)]
        uniq, inverse = np.unique(wave, axis=0, return_inverse=True)
        if uniq.shape[0] == 1:
            return [(None, uniq[0])]
        inverse = np.asarray(inverse).reshape(-1)
        return [(np.flatnonzero(inverse == k), uniq[k]) for k in range(uniq.shape[0])]

    def _grid(self, wave: np.ndarray) -> L.InputGrid:
        key = _key(wave)
        grid = self._grids.get(key)
        if grid is None:
            try:
                grid = L.describe_grid(wave)
            except ValueError as exc:
                raise StxError(f"raw featurizer: {exc}") from exc
            _put(self._grids, key, grid)
        return grid

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

    def _degrade(self, arm: Arm, grid: L.InputGrid, cols: np.ndarray | None, f: np.ndarray, g: np.ndarray,
                 vv: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        assert self.target_r is not None
        if not g.any():  # nothing to degrade (e.g. dead fibres only): no resolution needed
            return f, g, vv, 0
        if self.use_resolution_matrix and arm.resolution is not None:
            res = np.asarray(arm.resolution)
            if cols is not None:
                res = res[cols]
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
        r_src = self._source_r(arm, grid)
        key = _key(grid.wave, r_src, np.array([self.target_r]))
        if key not in self._degraders:
            sigma = L.kernel_sigma(grid.wave, r_src, self.target_r)
            _put(self._degraders, key, L.build_degrader(grid, sigma))
        deg = self._degraders[key]
        nominal = int(self.use_resolution_matrix)  # asked for the matrix, the arm had none
        if deg is None:
            return f, g, vv, nominal
        f2, g2, v2 = L.apply_degrader(deg, f, g, vv)
        return f2, g2, v2, nominal

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
            key = _key(pc.grid.wave, self._edges[j0: j1 + 1])
            mats = self._zero_mats.get(key)
            if mats is None:
                o = L.resample_matrix(pc.grid, self._edges[j0: j1 + 1])
                mats = (o, o.multiply(o).tocsr())
                _put(self._zero_mats, key, mats)
            o, o2 = mats
            npix = pc.grid.npix
            num, den, vnum = o @ pc.a[:npix], o @ pc.b[:npix], o2 @ pc.v[:npix]
            width = np.diff(self._edges[j0: j1 + 1]).astype(np.float32)[:, None]
            self._accumulate(s_fi, s_i, pc.cols, j0, j1, num, den, vnum, width)
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
            num, den, vnum = L.resample_sums(pc.a, pc.b, pc.v, p, pc.grid.npix)
            width = (np.diff(edges)[:, None] * zf[None, :]).astype(np.float32)
            self._accumulate(s_fi, s_i, pc.cols, j0, j1, num, den, vnum, width)
        return _finish_combination(s_fi, s_i)

    def _accumulate(self, s_fi: np.ndarray, s_i: np.ndarray, cols: np.ndarray | None, j0: int, j1: int,
                    num: np.ndarray, den: np.ndarray, vnum: np.ndarray, width: np.ndarray) -> None:
        """Add one arm's rebinned sums as ``ivar * flux`` and ``ivar`` (bins whose good coverage is
        below ``min_coverage`` of their width are left out)."""
        ok = den >= np.float32(self.min_coverage) * width
        ok &= vnum > 0
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            iv = np.where(ok, den / np.where(ok, vnum, np.float32(1.0)), np.float32(0.0))
            fi = iv * num  # ivar * flux = (den^2/vnum) * (num/den)
            iv *= den
        if cols is None:
            s_fi[j0:j1] += fi
            s_i[j0:j1] += iv
        else:
            s_fi[j0:j1, cols] += fi
            s_i[j0:j1, cols] += iv

    def _continuum(self, flux: np.ndarray, ivar: np.ndarray, n_iter: int) -> np.ndarray:
        if self._cont_model is None:
            self._cont_model = L.build_continuum_model(np.log10(self._wave), self.cont_knot_dlog, self.cont_bin)
        return L.fit_continuum(self._cont_model, flux, ivar > 0, n_iter, self.cont_clip_lo, self.cont_clip_hi)

    def _normalise(self, flux: np.ndarray, ivar: np.ndarray, cont: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """flux/cont and ivar*cont^2 (m, n); pixels whose continuum is below ``cont_floor`` times
        the spectrum's mean continuum over its good pixels are not valid."""
        good = ivar > 0
        ng = good.sum(axis=0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cref = np.einsum("ij,ij->j", cont, good.astype(np.float32)) / ng
        floor = np.where(np.isfinite(cref) & (cref > 0), self.cont_floor * cref, np.inf).astype(np.float32)
        valid = good & (cont > floor[None, :])
        safe = np.where(valid, cont, np.float32(1.0))
        feat = flux / safe
        fivar = ivar * safe
        fivar *= safe
        return feat, fivar, valid

    def _plan_velocities(self, batch: SpectrumBatch, pieces: list[_Piece]
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Velocities known up front, and which spectra need an estimate (``est``) or cannot get
        one for lack of data (``empty``, velocity 0)."""
        n = batch.n
        meta_rv = np.asarray(batch.meta.rv_kms, dtype=np.float64).reshape(-1)
        if meta_rv.size != n:
            raise StxError("raw featurizer: meta.rv_kms has the wrong length")
        rv = np.zeros(n)
        none = np.zeros(n, bool)
        if self.rv == "none":
            return rv, none, none
        known = np.isfinite(meta_rv)
        if np.any(np.abs(meta_rv[known]) >= C_KMS / 2):
            raise StxError("raw featurizer: meta.rv_kms holds values beyond c/2; is it a redshift?")
        if self.rv == "meta":
            if not known.all():
                raise StxError(f"raw featurizer: rv='meta' but {int((~known).sum())} of {n} spectra have no "
                               f"radial velocity (use rv='auto' to estimate those, or give a catalog column)")
            return meta_rv.copy(), none, none
        need = ~known if self.rv == "auto" else np.ones(n, bool)
        rv[~need] = meta_rv[~need]
        has_data = np.zeros(n, bool)
        for pc in pieces:
            if pc.cols is None:
                has_data |= pc.has_good
            else:
                has_data[pc.cols[pc.has_good]] = True
        return rv, need & has_data, need & ~has_data

    def _estimate_rv(self, flux: np.ndarray, ivar: np.ndarray, cont: np.ndarray | None, notes: list[str]
                     ) -> tuple[np.ndarray, np.ndarray]:
        """CCF velocities (km/s) and peaks of observed-frame spectra ``(m, ne)`` against the MILES
        templates; 0 km/s (peak 0) where there is no positive peak. Counts go to ``notes``."""
        ne = flux.shape[1]
        if cont is None:  # continuum="none": a continuum for the cross-correlation only
            cont = self._continuum(flux, ivar, _RV_CONT_ITER)
        feat, _, valid = self._normalise(flux, ivar, cont)
        tell = np.zeros(self.dim, bool)
        for lo, hi in L.TELLURIC_BANDS:
            tell |= (self._wave >= lo) & (self._wave <= hi)
        valid &= ~tell[:, None]
        gx = np.ascontiguousarray(valid.T, dtype=np.float32)
        x = np.ascontiguousarray(np.clip(1.0 - feat, -1.0, 1.0).T, dtype=np.float32) * gx
        if self._ccf_bank is None:
            max_lag = int(math.ceil(math.log10(1.0 + self.rv_max_kms / C_KMS) / self.dlog)) + 1
            self._ccf_bank = L.ccf_bank(self._templates(), max_lag)
        v, peak, edge = L.ccf_velocity(x, gx, self._ccf_bank, self.dlog)
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
                f, good, var = L.apply_degrader(deg, f, good, var)
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


def _finish_combination(s_fi: np.ndarray, s_i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse-variance mean ``sum(ivar*flux)/sum(ivar)`` and ``sum(ivar)``; 0/0 where none."""
    ok = s_i > 0
    ok &= np.isfinite(s_i)
    ok &= np.isfinite(s_fi)
    with np.errstate(divide="ignore", invalid="ignore"):
        flux = np.where(ok, s_fi / np.where(ok, s_i, np.float32(1.0)), np.float32(0.0))
    return flux.astype(np.float32, copy=False), np.where(ok, s_i, np.float32(0.0))


def _masked_median(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Row medians of ``values`` over ``valid`` pixels (0 for a row without one)."""
    s = np.sort(np.where(valid, values, np.inf), axis=1)
    k = valid.sum(axis=1)
    rows = np.arange(values.shape[0])
    lo = s[rows, np.clip((k - 1) // 2, 0, None)]
    hi = s[rows, np.clip(k // 2, 0, values.shape[1] - 1)]
    med = np.where(k > 0, 0.5 * (lo + hi), 0.0)
    return np.where(np.isfinite(med), med, 0.0)


def _put(cache: dict, key: Any, value: Any) -> None:
    if len(cache) >= _CACHE_MAX:
        cache.pop(next(iter(cache)))
    cache[key] = value


@hookimpl
def register_featurizers(register: Any) -> None:
    register(RawFeaturizer)
