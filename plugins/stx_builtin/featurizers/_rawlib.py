"""Numerical core of the raw-spectrum featurizer, vectorised over a batch of spectra.

Arrays are pixel-major, ``(npix, n)`` for a batch of ``n`` spectra, so that sparse products and
gathers run along contiguous spectra; there is no per-spectrum Python loop. Pure numpy at import
time; scipy is imported inside the functions that need it.

Conventions: ``good`` is a boolean "pixel carries information" array; flux and variance are 0 where
not good; ``zfac = 1 + v/c`` (observed = rest * zfac).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
#: Kernel rows whose extra Gaussian sigma is below this many pixels are the identity.
_MIN_SIGMA_PIX = 0.05
#: Half-width of the degradation kernel, in sigmas.
_KERNEL_NSIG = 4.0


# ------------------------------------------------------------------------------------ grids


def log_grid(wmin: float, wmax: float, dlog: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres and edges (Angstrom) of a log10-linear grid from ``wmin`` to ``wmax``."""
    l0 = math.log10(wmin)
    n = int(math.floor((math.log10(wmax) - l0) / dlog + 1e-9)) + 1
    centres = 10.0 ** (l0 + dlog * np.arange(n))
    edges = 10.0 ** (l0 + dlog * (np.arange(n + 1) - 0.5))
    return centres, edges


@dataclass(frozen=True)
class InputGrid:
    """An arm's wavelength grid, recognised as linear, log10-linear or general."""

    wave: np.ndarray  # (npix,) float64, increasing
    kind: str  # "linear" | "log" | "general"
    x0: float  # linear: lambda_0 (A); log: log10 lambda_0
    step: float  # linear: d lambda (A); log: d log10 lambda
    edges: np.ndarray  # (npix + 1,) pixel edges (A)
    width: np.ndarray  # (npix,) pixel widths (A)

    @property
    def npix(self) -> int:
        return int(self.wave.size)


def describe_grid(wave: np.ndarray) -> InputGrid:
    """Recognise ``wave`` as linear or log-linear to 1e-3 pixel (float32 wavelength columns pass)."""
    wave = np.asarray(wave, dtype=np.float64)
    n = wave.size
    if n < 2 or not np.all(np.diff(wave) > 0):
        raise ValueError("wavelengths must be strictly increasing with at least 2 pixels")
    i = np.arange(n)
    step = (wave[-1] - wave[0]) / (n - 1)
    if np.max(np.abs(wave - (wave[0] + step * i))) < 1e-3 * step:
        edges = wave[0] + step * (np.arange(n + 1) - 0.5)
        return InputGrid(wave, "linear", float(wave[0]), float(step), edges, np.diff(edges))
    lw = np.log10(wave)
    lstep = (lw[-1] - lw[0]) / (n - 1)
    if np.max(np.abs(lw - (lw[0] + lstep * i))) < 1e-3 * lstep:
        edges = 10.0 ** (lw[0] + lstep * (np.arange(n + 1) - 0.5))
        return InputGrid(wave, "log", float(lw[0]), float(lstep), edges, np.diff(edges))
    mid = 0.5 * (wave[1:] + wave[:-1])
    edges = np.concatenate([[wave[0] - (mid[0] - wave[0])], mid, [wave[-1] + (wave[-1] - mid[-1])]])
    return InputGrid(wave, "general", float("nan"), float("nan"), edges, np.diff(edges))


def edge_positions(grid: InputGrid, out_edges: np.ndarray, zfac: np.ndarray) -> np.ndarray:
    """Positions of the rest-frame ``out_edges`` (m+1,) in the input grid's pixel-edge coordinate
    (pixel i spans [i, i+1]) for each spectrum's ``zfac`` (n,): ``(m+1, n)`` float64 (pixel-major,
    like every array of this module), clipped to [0, npix] so that what lies outside the arm
    covers nothing."""
    zfac = np.asarray(zfac, dtype=np.float64)
    if grid.kind == "linear":
        p = (out_edges[:, None] * zfac[None, :] - grid.x0) / grid.step + 0.5
    elif grid.kind == "log":
        p = (np.log10(out_edges)[:, None] + np.log10(zfac)[None, :] - grid.x0) / grid.step + 0.5
    else:  # any increasing grid: pixel edges interpolated, all spectra in one call
        idx = np.arange(grid.npix + 1, dtype=np.float64)
        p = np.interp(out_edges[:, None] * zfac[None, :], grid.edges, idx)
    np.clip(p, 0.0, grid.npix, out=p)
    return p


# ------------------------------------------------------------------------------- resampling


def resample_sums(a: np.ndarray, b: np.ndarray | None, v: np.ndarray, p: np.ndarray, npix: int,
                  grid: InputGrid | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact overlap sums of a flux-conserving rebinning (pixel-major arrays).

    ``a = flux*good*width``, ``b = good*width`` and ``v = var*good*width**2`` are C-contiguous
    ``(npix, n)`` arrays (finite everywhere); ``p`` ``(m+1, n)`` holds the output bin edges in
    input pixel coordinates (see :func:`edge_positions`). With ``o_ij`` the fraction of input
    pixel i inside output bin j, returns ``(m, n)`` arrays ``num_j = sum_i o_ij a_i``,
    ``den_j = sum_i o_ij b_i`` and ``vnum_j = sum_i o_ij^2 v_i``: the mean flux density is
    ``num/den`` with variance ``vnum/den**2``, the exact propagation of independent pixel variances
    through the rebinning weights (bad pixels drop out and the good ones are re-weighted).
    ``b=None`` means every pixel is good (``b`` = the pixel widths): ``den`` is then the width the
    bin covers, computed from ``p`` and ``grid`` without a gather.

    Each output bin starts in pixel ``ka = floor(p_j)`` and spans at most ``nslot`` pixels; slot s
    (pixel ``ka + s``) overlaps it by ``min(d, 1) - u`` for s = 0 and ``clip(d - s, 0, 1)`` after,
    with ``u = p_j - ka`` and ``d = p_{j+1} - ka``: a handful of gathers over the whole batch. A slot
    past the last pixel has weight 0 (``p`` is clipped to [0, npix]), so its gather index is
    simply clipped.
    """
    n = a.shape[1]
    if b is None and grid is None:
        raise ValueError("resample_sums: b=None needs the grid")
    pa, pb = p[:-1], p[1:]
    ka = np.floor(pa)
    u = (pa - ka).astype(np.float32)
    d = (pb - ka).astype(np.float32)  # >= u; the bin ends d pixels after pixel ka's start
    nslot = max(1, int(math.ceil(float(d.max()))) if d.size else 1)
    ka = ka.astype(np.int64)
    if ka.shape[1] != n:  # shared positions (m+1, 1) broadcast over the batch
        shape = (ka.shape[0], n)
        ka, u, d = (np.ascontiguousarray(np.broadcast_to(q, shape)) for q in (ka, u, d))
    fa, fv = np.ravel(a), np.ravel(v)  # views: the arrays are C-contiguous
    fb = None if b is None else np.ravel(b)
    base = ka
    base *= n
    base += np.arange(n, dtype=np.int64)[None, :]  # flat index = pixel*n + column
    tmp = np.empty(base.shape, np.float32)
    o = np.minimum(d, np.float32(1.0))
    o -= u
    num = np.take(fa, base, mode="clip")
    num *= o
    den = None
    if fb is not None:
        den = np.take(fb, base, mode="clip")
        den *= o
    o *= o
    vnum = np.take(fv, base, mode="clip")
    vnum *= o
    for s in range(1, nslot):
        np.subtract(d, np.float32(s), out=o)
        np.clip(o, np.float32(0.0), np.float32(1.0), out=o)
        base += n
        np.take(fa, base, mode="clip", out=tmp)
        tmp *= o
        num += tmp
        if fb is not None:
            np.take(fb, base, mode="clip", out=tmp)
            tmp *= o
            den += tmp
        o *= o
        np.take(fv, base, mode="clip", out=tmp)
        tmp *= o
        vnum += tmp
    if den is None:
        assert grid is not None
        den = covered_width(grid, p)
        if den.shape[1] != n:
            den = np.ascontiguousarray(np.broadcast_to(den, num.shape))
    return num, den, vnum


def covered_width(grid: InputGrid, p: np.ndarray) -> np.ndarray:
    """Width (A) of the input grid inside each output bin, ``(m, n)`` float32, from the bin edges'
    pixel positions ``p`` (m+1, n) clipped to [0, npix]: the rebinning denominator of a spectrum
    whose pixels are all good."""
    if grid.kind == "linear":
        return (np.diff(p, axis=0) * grid.step).astype(np.float32)
    k = np.minimum(p.astype(np.int64), grid.npix - 1)
    cw = grid.edges - grid.edges[0]
    w = cw[k]
    w += (p - k) * grid.width[k]
    return np.diff(w, axis=0).astype(np.float32)


def resample_matrix(grid: InputGrid, out_edges: np.ndarray) -> Any:
    """The rebinning at zero velocity as a sparse ``(m, npix)`` overlap matrix ``O``
    (``num = O @ a``, ``vnum = (O*O) @ v``): the observed-frame pass, one product per arm."""
    import scipy.sparse as sp

    p = edge_positions(grid, out_edges, np.ones(1))[:, 0]
    m = p.size - 1
    pa, pb = p[:-1], p[1:]
    ka = np.floor(pa).astype(np.int64)
    nslot = max(1, int(math.ceil(float((pb - ka).max()))))
    rows, cols, vals = [], [], []
    for s in range(nslot):
        i = ka + s
        o = np.minimum(pb, i + 1) - np.maximum(pa, i)
        keep = (o > 0) & (i < grid.npix)
        rows.append(np.flatnonzero(keep))
        cols.append(i[keep])
        vals.append(o[keep])
    return sp.csr_matrix((np.concatenate(vals).astype(np.float32),
                          (np.concatenate(rows), np.concatenate(cols))), shape=(m, grid.npix))


def fixed_width_rows(m: Any) -> tuple[np.ndarray, np.ndarray]:
    """A CSR matrix whose rows each store a run of consecutive columns, in order, as ``(c0, w)``:
    row j's entries are ``w[t, j]`` at columns ``c0[j] + t``, zero-padded to the longest run (the
    padding's columns stay inside the matrix). Empty ``w`` (0 rows) where a row is empty or not
    such a run."""
    indptr, indices = m.indptr, m.indices
    nrow, ncol = m.shape
    lens = np.diff(indptr)
    row = np.repeat(np.arange(nrow), lens)
    t = np.arange(indices.size) - np.repeat(indptr[:-1], lens)
    c0 = indices[indptr[:-1].clip(max=max(indices.size - 1, 0))] if indices.size else np.zeros(nrow, np.int64)
    if lens.size == 0 or lens.min() < 1 or np.any(indices != c0[row] + t):
        return np.zeros(nrow, np.int64), np.zeros((0, nrow), np.float32)
    width = int(lens.max())
    c0 = np.minimum(c0, ncol - width).astype(np.int64)  # a run near the end starts earlier, padded before
    w = np.zeros((width, nrow), np.float32)
    w[indices - c0[row], row] = m.data
    return c0, w


# ----------------------------------------------------------------------- resolution matching


def _gauss_pixel_weights(lam: np.ndarray, sigma: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Fraction of a Gaussian (centre ``lam``, ``sigma`` A) falling in [lo, hi] (all broadcast)."""
    from scipy.special import ndtr

    s = np.maximum(sigma, 1e-30)
    return ndtr((hi - lam) / s) - ndtr((lo - lam) / s)


def kernel_sigma(wave: np.ndarray, r_source: np.ndarray, r_target: float) -> np.ndarray:
    """Extra Gaussian sigma (A) that takes resolving power ``r_source`` to ``r_target``:
    ``sqrt(sigma_target^2 - sigma_source^2)``, 0 where the source is already as coarse."""
    s_t = wave / (r_target * FWHM_PER_SIGMA)
    s_s = wave / (np.asarray(r_source, dtype=np.float64) * FWHM_PER_SIGMA)
    return np.sqrt(np.clip(s_t * s_t - s_s * s_s, 0.0, None))


@dataclass
class Degrader:
    """A fixed degradation kernel for one arm grid: ``K`` (rows normalised to 1) and ``K**2``."""

    k: Any  # scipy.sparse.csr_matrix (npix, npix) float32
    k2: Any
    max_sigma_pix: float

    @cached_property
    def band(self) -> tuple[np.ndarray, int]:
        """``K`` as a band, ``(band, h)`` with ``band[t, p] = K[p, p + t - h]`` (0 where K stores
        nothing), as the compiled kernel convolves. An empty band (0 rows) where a row's entries
        are not stored in ascending column order: a band sums each row in column order, which must
        be the stored order for the two to round alike."""
        indptr, indices = self.k.indptr, self.k.indices
        npix = indptr.size - 1
        row = np.repeat(np.arange(npix), np.diff(indptr))
        if indices.size == 0 or np.any((np.diff(indices) <= 0) & (np.diff(row) == 0)):
            return np.zeros((0, npix), np.float32), 0
        off = indices - row
        h = int(max(0, -off.min()))
        width = h + max(0, int(off.max())) + 1
        band = np.zeros((-(-width // 4) * 4, npix), np.float32)  # rows: a multiple of 4, the kernel's stride
        band[off + h, row] = self.k.data
        return band, h


def build_degrader(grid: InputGrid, sigma: np.ndarray) -> Degrader | None:
    """The Gaussian convolution with per-pixel ``sigma`` (A) as a banded sparse matrix whose row i
    integrates the Gaussian centred on pixel i over each input pixel. None when every row is the
    identity (the source is nowhere sharper than the target)."""
    import scipy.sparse as sp

    sig_pix = sigma / grid.width
    ident = sig_pix < _MIN_SIGMA_PIX
    if ident.all():
        return None
    npix = grid.npix
    h = int(math.ceil(_KERNEL_NSIG * float(sig_pix[~ident].max()))) + 1
    offs = np.arange(-h, h + 1)
    i = np.arange(npix)[:, None]
    j = i + offs[None, :]
    inside = (j >= 0) & (j < npix)
    jc = np.clip(j, 0, npix - 1)
    w = _gauss_pixel_weights(grid.wave[:, None], sigma[:, None], grid.edges[jc], grid.edges[jc + 1])
    w = np.where(inside, w, 0.0)
    w[ident, :] = 0.0
    w[ident, h] = 1.0
    w /= w.sum(axis=1, keepdims=True)
    keep = w > 1e-7
    rows = np.broadcast_to(i, j.shape)[keep]
    k = sp.csr_matrix((w[keep].astype(np.float32), (rows, j[keep])), shape=(npix, npix))
    k2 = k.multiply(k).tocsr()
    return Degrader(k, k2, float(sig_pix.max()))


def _normalised(num: np.ndarray, den: np.ndarray, vnum: np.ndarray, good: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ok = good & (den >= 0.5)
    safe = np.where(ok, den, np.float32(1.0))
    f_out = np.where(ok, num / safe, np.float32(0.0)).astype(np.float32)
    v_out = np.where(ok, vnum / (safe * safe), np.float32(0.0)).astype(np.float32)
    return f_out, ok, v_out


#: How :func:`apply_degrader` re-normalises a spectrum after the convolution, decided per spectrum
#: (the compiled kernels decide the same), so that a spectrum's features do not depend on the other
#: spectra of its batch: not at all when every pixel is good, next to its bad pixels only when at
#: most this fraction of them is bad, everywhere above it. The choice fixes the result's rounding.
SPARSE_BAD_FRAC = 0.05


def apply_degrader(deg: Degrader, flux: np.ndarray, good: np.ndarray, var: np.ndarray, *,
                   zeroed: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Normalised convolution of pixel-major ``(npix, n)`` arrays: ``flux' = K(f g) / K(g)``,
    ``var' = K^2(var g) / K(g)^2``.

    Masked pixels drop out of their neighbours' sums, which are re-weighted by the kernel weight
    of the good pixels; a pixel stays good when it was good and at least half of its kernel weight
    sits on good pixels. ``zeroed=True`` says ``flux`` and ``var`` are already 0 where not good.

    The rows of K sum to 1, so ``K(g) = 1 - K(1 - g)`` differs from 1 only near bad pixels: for a
    spectrum with few of them (:data:`SPARSE_BAD_FRAC`, per spectrum), ``K(1 - g)`` is a sparse
    product and only the entries it touches are re-normalised (and zeroed where not good); a
    spectrum with many is re-normalised everywhere, by a dense ``K(g)``."""
    import scipy.sparse as sp

    npix = good.shape[0]
    ngood = np.count_nonzero(good, axis=0)
    if not zeroed and (ngood < npix).any():
        flux = np.where(good, flux, np.float32(0.0))
        var = np.where(good, var, np.float32(0.0))
    num = deg.k @ flux
    vnum = deg.k2 @ var
    ok = good.copy()
    nbad = npix - ngood
    dense = np.flatnonzero(nbad > SPARSE_BAD_FRAC * npix)
    if dense.size:
        f_d, ok_d, v_d = _normalised(num[:, dense], deg.k @ good[:, dense].astype(np.float32), vnum[:, dense],
                                     good[:, dense])
        num[:, dense], ok[:, dense], vnum[:, dense] = f_d, ok_d, v_d
    sparse = np.flatnonzero((nbad > 0) & (nbad <= SPARSE_BAD_FRAC * npix))
    if sparse.size:
        gs = good[:, sparse]
        r, c = np.divmod(np.flatnonzero(~gs), sparse.size)  # (np.nonzero is ~10x slower on 2-D)
        bad = sp.csr_matrix((np.ones(r.size, np.float32), (r, c)), shape=gs.shape)
        kb = (deg.k @ bad).tocoo()
        rr, cc = kb.row, sparse[kb.col]
        den = np.float32(1.0) - kb.data.astype(np.float32)
        okk = good[rr, cc] & (den >= 0.5)
        safe = np.where(okk, den, np.float32(1.0))
        num[rr, cc] = np.where(okk, num[rr, cc] / safe, np.float32(0.0))
        vnum[rr, cc] = np.where(okk, vnum[rr, cc] / (safe * safe), np.float32(0.0))
        ok[rr, cc] = okk
    return num, ok, vnum


def sigma_from_resolution(res: np.ndarray) -> np.ndarray:
    """Per-spectrum, per-pixel Gaussian-equivalent LSF sigma (pixels) of DESI resolution matrices
    ``res`` (n, ndiag, npix): the second moment of row i of each band matrix, i.e. of the weights
    the matrix gives input pixels ``i + off`` (``off = ndiag//2 - d`` for diagonal d, the layout of
    ``desispec.resolution.Resolution``). The small negative wings are kept: second moments add
    under convolution only when they are the kernel's true moments. Returned pixel-major
    ``(npix, n)``; NaN where a row is dead (kernel sum <= 0.5)."""
    n, ndiag, npix = res.shape
    offs = ndiag // 2 - np.arange(ndiag)
    s0 = np.zeros((n, npix))
    s1 = np.zeros((n, npix))
    s2 = np.zeros((n, npix))
    cols = np.arange(npix)
    for d, off in enumerate(offs):
        c = cols + off
        inside = (c >= 0) & (c < npix)
        w = np.where(inside[None, :], res[:, d, np.clip(c, 0, npix - 1)], 0.0).astype(np.float64)
        s0 += w
        s1 += w * off
        s2 += w * off * off
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / s0
        var = s2 / s0 - mean * mean
    out = np.sqrt(np.clip(var, 0.0, None))
    out[~(s0 > 0.5) | ~np.isfinite(out)] = np.nan
    return np.ascontiguousarray(out.T)


def degrade_per_spectrum(grid: InputGrid, sigma: np.ndarray, flux: np.ndarray, good: np.ndarray,
                         var: np.ndarray, chunk: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normalised convolution of :func:`apply_degrader` with a kernel sigma (A) per pixel and
    spectrum, ``sigma`` (npix, n): banded taps vectorised over the batch, in column chunks. The
    Gaussian's CDF is evaluated once per pixel edge offset and differenced into the tap weights.
    Spectra without a good pixel are returned as they are."""
    from scipy.special import ndtr

    npix, n = flux.shape
    f_out = np.array(flux, dtype=np.float32)
    v_out = np.array(var, dtype=np.float32)
    ok = good.copy()
    sig_pix = sigma / grid.width[:, None]
    active = np.flatnonzero(good.any(axis=0) & (sig_pix >= _MIN_SIGMA_PIX).any(axis=0))
    if active.size == 0:
        return f_out, ok, v_out
    h = int(math.ceil(_KERNEL_NSIG * float(np.nanmax(sig_pix[:, active])))) + 1
    rows = np.arange(npix)
    f32 = np.float32
    for c0 in range(0, active.size, chunk):
        cols = active[c0: c0 + chunk]
        ident = sig_pix[:, cols] < _MIN_SIGMA_PIX
        inv_s = np.where(ident, 0.0, 1.0 / np.where(ident, 1.0, sigma[:, cols])).astype(f32)
        g = good[:, cols].astype(f32)
        fg = flux[:, cols] * g
        vg = var[:, cols] * g
        shape = inv_s.shape
        wsum, num, den, vnum = (np.zeros(shape, f32) for _ in range(4))
        # distance (A) from each pixel centre to the lower edge of its tap -h
        dist = (grid.edges[np.clip(rows - h, 0, npix)] - grid.wave).astype(f32)[:, None]
        cdf_lo = ndtr(dist * inv_s)
        for off in range(-h, h + 1):
            c = rows + off
            inside = ((c >= 0) & (c < npix))[:, None]
            cc = np.clip(c, 0, npix - 1)
            dist = (grid.edges[np.clip(c + 1, 0, npix)] - grid.wave).astype(f32)[:, None]
            cdf_hi = ndtr(dist * inv_s)
            w = np.where(inside, cdf_hi - cdf_lo, f32(0.0))
            w = np.where(ident, f32(1.0 if off == 0 else 0.0), w)
            cdf_lo = cdf_hi
            wsum += w
            num += w * fg[cc]
            den += w * g[cc]
            w *= w
            vnum += w * vg[cc]
        f_out[:, cols], ok[:, cols], v_out[:, cols] = _normalised(
            num / wsum, den / wsum, vnum / (wsum * wsum), good[:, cols])
    return f_out, ok, v_out


# ---------------------------------------------------------------------------------- continuum


@dataclass
class ContinuumModel:
    """A penalised cubic B-spline continuum on a fixed output grid, fitted to a whole batch at once.

    The fit runs on bins of ``nbin`` pixels (the mean of the good pixels of each bin, weighted by
    their number): the continuum varies on the knot scale, hundreds of pixels, so binning changes
    it negligibly and makes the clipping iterations ``nbin`` times cheaper. The normal equations of
    every spectrum come from one matrix product: with bin weights ``W`` (mb, n) and the products of
    overlapping basis functions ``P`` (mb, npairs), ``B^T diag(w) B`` is ``P^T @ W``. The systems
    are banded (cubic B-splines overlap their 3 neighbours), so all n of them are solved at once as
    one block-diagonal banded system by a single LAPACK banded Cholesky call. A second-difference
    penalty (a P-spline) bridges gaps linearly, so masked stretches never make the system singular.
    """

    basis: np.ndarray  # (m, nb) float32, at the pixels
    nbin: int
    starts: np.ndarray  # first pixel of each bin
    basis_bin_t: np.ndarray  # (nb, mb) float32, bin means of the basis
    pairs_k: np.ndarray
    pairs_l: np.ndarray
    prod_t: np.ndarray  # (npairs, mb) float32
    penalty: np.ndarray  # (nb, nb) float64
    nb: int = field(init=False)
    pen_band: np.ndarray = field(init=False)  # (4, nb): penalty[j + d, j] (lower band storage)
    # sparse copies (each basis function spans 4 knot intervals: ~85 % of the dense entries are 0)
    prod_sp: Any = field(init=False)  # csr of prod_t
    bin_sp: Any = field(init=False)  # csr of basis_bin_t (nb, mb)
    bin_t_sp: Any = field(init=False)  # csr of basis_bin_t.T (mb, nb)
    basis_sp: Any = field(init=False)  # csr of basis (m, nb)
    d_of_pair: np.ndarray = field(init=False)  # band row (l - k) of each pair

    def __post_init__(self) -> None:
        import scipy.sparse as sp

        self.nb = int(self.basis.shape[1])
        band = np.zeros((4, self.nb))
        for d in range(4):
            band[d, : self.nb - d] = np.diagonal(self.penalty, -d)
        self.pen_band = band
        self.prod_sp = sp.csr_matrix(self.prod_t)
        self.bin_sp = sp.csr_matrix(self.basis_bin_t)
        self.bin_t_sp = sp.csr_matrix(np.ascontiguousarray(self.basis_bin_t.T))
        self.basis_sp = sp.csr_matrix(self.basis)
        self.d_of_pair = np.ascontiguousarray(self.pairs_l - self.pairs_k, dtype=np.int64)

    def csr(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(indptr, indices, data) of ``prod``, ``bin``, ``bin_t`` or ``basis`` (the ``*_sp``
        matrices), for the compiled continuum fit, which sums them in the same stored order."""
        m = getattr(self, f"{name}_sp")
        return m.indptr, m.indices, m.data


def build_continuum_model(log_wave: np.ndarray, knot_dlog: float, nbin: int = 1,
                          smooth: float = 1.0) -> ContinuumModel:
    """Cubic B-splines with uniform knots every ``knot_dlog`` (in log10 lambda) over the grid."""
    from scipy.interpolate import BSpline

    lo, hi = float(log_wave[0]), float(log_wave[-1])
    nint = max(1, int(round((hi - lo) / knot_dlog)))
    inner = np.linspace(lo, hi, nint + 1)
    k = 3
    t = np.concatenate([[lo] * k, inner, [hi] * k])
    x = np.clip(log_wave, lo, hi)
    basis = np.ascontiguousarray(BSpline.design_matrix(x, t, k).toarray(), dtype=np.float32)
    nb = basis.shape[1]
    starts = np.arange(0, basis.shape[0], nbin)
    counts = np.diff(np.append(starts, basis.shape[0]))
    bbin = np.add.reduceat(basis.astype(np.float64), starts, axis=0) / counts[:, None]
    kk, ll = [], []
    for a in range(nb):
        for b in range(a, min(nb, a + k + 1)):
            kk.append(a)
            ll.append(b)
    pk, pl = np.array(kk), np.array(ll)
    prod_t = np.ascontiguousarray((bbin[:, pk] * bbin[:, pl]).T, dtype=np.float32)
    dmat = np.diff(np.eye(nb), n=2, axis=0)
    penalty = smooth * (dmat.T @ dmat) + 1e-6 * np.eye(nb)
    return ContinuumModel(basis, int(nbin), starts, np.ascontiguousarray(bbin.T, dtype=np.float32),
                          pk, pl, prod_t, penalty)


def fit_continuum(model: ContinuumModel, flux: np.ndarray, good: np.ndarray, n_iter: int,
                  clip_lo: float, clip_hi: float, *, zeroed: bool = False) -> np.ndarray:
    """Iteratively sigma-clipped spline continuum of each column of ``flux`` (m, n).

    Start from all good pixels (bins weighted by their number of good pixels); after each fit drop
    bins whose relative residual ``flux/cont - 1`` is below ``-clip_lo`` or above ``+clip_hi``
    times the spectrum's rms relative residual over the bins kept (absorption lines go first: the
    fit climbs to the upper envelope). Returns the continuum at every pixel, (m, n) float32 (may be
    <= 0 where the data are; the caller floors it). ``zeroed=True`` says ``flux`` is already 0 where
    ``good`` is False.
    """
    from scipy.linalg import solveh_banded

    g = good.astype(np.float32)
    if model.nbin > 1:
        gb = bin_sums(g, model.nbin)
        fsum = bin_sums(flux if zeroed else np.where(good, flux, np.float32(0.0)), model.nbin)
        fb = np.zeros_like(fsum)
        np.divide(fsum, gb, out=fb, where=gb > 0)
    else:
        gb, fb = g, flux
    has = gb > 0
    w = gb
    n = flux.shape[1]
    nb = model.nb
    d_of_pair = model.d_of_pair
    ab = np.empty((4, n, nb))
    coef_t = np.zeros((nb, n))
    for it in range(max(1, n_iter)):
        gram_t = model.prod_sp @ w  # (npairs, n): the band of B^T diag(w) B
        rhs_t = model.bin_sp @ (w * fb)  # (nb, n)
        ab[:] = model.pen_band[:, None, :]
        ab[d_of_pair, :, model.pairs_k] += gram_t  # each (d, k) once
        x = solveh_banded(ab.reshape(4, n * nb), np.ascontiguousarray(rhs_t.T, dtype=np.float64).ravel(),
                          lower=True, overwrite_ab=True, overwrite_b=True)
        coef_t = np.ascontiguousarray(x.reshape(n, nb).T, dtype=np.float32)
        if it == n_iter - 1:
            break
        cb = model.bin_t_sp @ coef_t
        pos = cb > 0
        inv = np.zeros_like(cb)
        np.divide(np.float32(1.0), cb, out=inv, where=pos)
        r = fb * inv
        r -= np.float32(1.0)
        rw = r * w
        rms = np.sqrt(np.einsum("ij,ij->j", rw, r) / np.maximum(w.sum(axis=0), 1.0)).astype(np.float32)
        keep = r > -clip_lo * rms
        keep &= r < clip_hi * rms
        keep &= has
        keep &= pos
        w = gb * keep
    return model.basis_sp @ coef_t


def bin_sums(x: np.ndarray, nbin: int) -> np.ndarray:
    """Sums of consecutive blocks of ``nbin`` rows of ``x`` (m, n) (the last block may be shorter):
    ``np.add.reduceat`` over rows, by reshaping (several times faster on wide arrays)."""
    m = x.shape[0]
    full = m // nbin
    out = np.empty((-(-m // nbin),) + x.shape[1:], dtype=x.dtype)
    if full:
        np.sum(x[: full * nbin].reshape((full, nbin) + x.shape[1:]), axis=1, out=out[:full])
    if full * nbin < m:
        np.sum(x[full * nbin:], axis=0, out=out[full])
    return out


def shift_rows(values: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Each column of ``values`` (m, n) (pixel-major) shifted by ``shift`` (n,) pixels, returned
    spectrum-major: ``out[c, j] = values[j + shift[c], c]`` by linear interpolation, the first/last
    pixel repeated beyond the ends. Each output row is two contiguous slices of one transposed,
    edge-padded copy: no per-pixel gather."""
    from numpy.lib.stride_tricks import sliding_window_view

    m, n = values.shape
    shift = np.asarray(shift, dtype=np.float64)
    k = np.floor(shift)
    frac = (shift - k).astype(np.float32)[:, None]
    k = k.astype(np.int64)
    pad = (int(np.abs(k).max()) if n else 0) + 2
    vt = np.empty((n, m + 2 * pad), np.float32)
    vt[:, pad: pad + m] = values.T
    vt[:, :pad] = vt[:, pad: pad + 1]
    vt[:, pad + m:] = vt[:, pad + m - 1: pad + m]
    win = sliding_window_view(vt, m, axis=1)
    rows = np.arange(n)
    lo = win[rows, pad + k]
    out = win[rows, pad + k + 1]
    out -= lo
    out *= frac
    out += lo
    return out


# ------------------------------------------------------------------------------------ RV (CCF)

#: Observed-frame telluric bands (vacuum A) left out of the cross-correlation: O2 B, H2O, O2 A, H2O.
TELLURIC_BANDS = ((6865.0, 6935.0), (7165.0, 7345.0), (7590.0, 7710.0), (8120.0, 8360.0))


@dataclass
class CcfBank:
    """Templates shifted by every lag, as matrices ready for one product each: rows ``(template,
    lag)`` of ``sh_t``, columns the grid pixels ``j0..j1`` where any shifted template is non-zero.
    Pixels in ``off`` (the telluric bands: never correlated) are zero in ``sh2``, whose column sums
    over the other pixels are ``sh2_total`` and whose cumulative sums down the pixels are
    ``sh2_cum`` (row j: the pixels before j)."""

    sh_t: np.ndarray  # (T * nlag, j1 - j0) float32
    sh2: np.ndarray  # (j1 - j0, T * nlag) float32: sh ** 2, 0 on the ``off`` pixels
    sh2_total: np.ndarray  # (T * nlag,) float32
    sh2_cum: np.ndarray  # (j1 - j0 + 1, T * nlag) float64
    on: np.ndarray  # (j1 - j0,) bool: not ``off``
    lags: np.ndarray
    ntemplates: int
    j0: int
    j1: int


#: Above this many runs of invalid pixels per pixel the CCF template norms are one dense product
#: (a run costs one difference of cumulative sums per template and lag, ~150 times less than
#: a spectrum's share of the product).
_DENSE_RUNS_FRAC = 0.02


def ccf_bank(tmpl: np.ndarray, max_lag: int, off: np.ndarray | None = None) -> CcfBank:
    """Shift the template line depths ``tmpl`` (T, m) by lags -max_lag..max_lag; ``off`` (m,) marks
    pixels the spectra never use (see :class:`CcfBank`)."""
    nt, m = tmpl.shape
    lags = np.arange(-max_lag, max_lag + 1)
    nl = lags.size
    sh = np.zeros((m, nt, nl), dtype=np.float32)
    for li, lag in enumerate(lags):
        if lag >= 0:
            sh[lag:, :, li] = tmpl[:, : m - lag].T
        else:
            sh[: m + lag, :, li] = tmpl[:, -lag:].T
    sh = sh.reshape(m, nt * nl)
    used = np.flatnonzero(np.any(sh != 0, axis=1))
    j0, j1 = (int(used[0]), int(used[-1]) + 1) if used.size else (0, 0)
    sh = sh[j0:j1]
    on = np.ones(j1 - j0, bool) if off is None else ~np.asarray(off, bool)[j0:j1]
    sh2 = sh * sh
    sh2[~on] = 0.0
    cum = np.zeros((sh2.shape[0] + 1, sh2.shape[1]))
    np.cumsum(sh2, axis=0, dtype=np.float64, out=cum[1:])
    return CcfBank(np.ascontiguousarray(sh.T), sh2, sh2.sum(axis=0, dtype=np.float64).astype(np.float32),
                   cum, on, lags, nt, j0, j1)


def ccf_velocity(x: np.ndarray, gx: np.ndarray, bank: CcfBank, dlog: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Velocity (km/s) of each spectrum by cross-correlation with templates on a log10 grid.

    Spectrum-major inputs: ``x`` (n, m) float32, the line depth ``1 - flux/continuum`` of the
    observed-frame spectra, 0 where ``gx`` (n, m) bool is False (which it is on the bank's ``off``
    pixels); ``bank``: rest-frame template line depths shifted by each lag. The normalised CCF
    ``sum x_j t_{j-L} / sqrt(sum x^2 * sum gx t_{j-L}^2)`` (sums over the templates' range) comes
    from a matrix product and the template norms: their totals less each run of invalid pixels'
    part, a difference of cumulative sums (a masked stretch costs what one pixel does), or one
    dense product where the runs are many (scattered bad pixels); the best template and lag win and a
    parabola through the log-CCF (a Gaussian peak) refines the lag. Returns (v_kms, peak_ccf,
    at_edge); the peak is 0 for a spectrum without lines (rms depth below 1e-4: no velocity
    information).
    """
    from stxcli.spectra import C_KMS

    x = x[:, bank.j0: bank.j1]
    gx = gx[:, bank.j0: bank.j1]
    n, mj = x.shape
    nt, lags = bank.ntemplates, bank.lags
    nl = lags.size
    num = (x @ bank.sh_t.T).reshape(n, nt, nl)
    invalid = np.zeros((n, mj + 2), bool)  # a pixel of padding at each end
    np.logical_and(~gx, bank.on[None, :], out=invalid[:, 1:-1])
    # where a run of invalid pixels starts and where it has ended: in each row (and so in the
    # whole array, row by row) they alternate, a start first (bool, not np.diff: 9x quicker)
    edge = np.flatnonzero(invalid[:, 1:] != invalid[:, :-1])
    spec, a = np.divmod(edge[0::2], mj + 1)
    b = edge[1::2] % (mj + 1)
    if a.size <= _DENSE_RUNS_FRAC * n * mj:
        tnorm = np.broadcast_to(bank.sh2_total.astype(np.float64), (n, nt * nl)).copy()
        if a.size:
            part = bank.sh2_cum[b] - bank.sh2_cum[a]  # (runs, T * nlag), runs in spectrum order
            first = np.flatnonzero(np.r_[True, spec[1:] != spec[:-1]])
            tnorm[spec[first]] -= np.add.reduceat(part, first, axis=0)
        tnorm = tnorm.astype(np.float32)
    else:
        tnorm = gx.astype(np.float32) @ bank.sh2
    tnorm = tnorm.reshape(n, nt, nl)
    # the subtraction leaves rounding residue (~1e-7 of the total) where no valid pixel meets the
    # template: such lags carry no information
    tnorm = np.where(tnorm > 1e-5 * bank.sh2_total.reshape(nt, nl)[None], tnorm, 0.0)
    xnorm = np.einsum("ij,ij->i", x, x)[:, None, None]
    ngood = np.count_nonzero(gx, axis=1)[:, None, None]
    xnorm = np.where(xnorm > 1e-8 * np.maximum(ngood, 1), xnorm, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        cc = np.where((tnorm > 0) & (xnorm > 0), num / np.sqrt(tnorm * xnorm), 0.0)
    flat = cc.reshape(n, -1)
    best = np.argmax(flat, axis=1)
    bt, bl = np.divmod(best, nl)
    rows = np.arange(n)
    peak = flat[rows, best]
    at_edge = (bl == 0) | (bl == nl - 1)
    y0 = peak
    ym = cc[rows, bt, np.clip(bl - 1, 0, nl - 1)]
    yp = cc[rows, bt, np.clip(bl + 1, 0, nl - 1)]
    with np.errstate(divide="ignore", invalid="ignore"):
        pos = (ym > 0) & (y0 > 0) & (yp > 0)
        lm, l0, lp = (np.log(np.where(pos, q, 1.0)) for q in (ym, y0, yp))
        dg = 0.5 * (lm - lp) / (lm - 2 * l0 + lp)
        dq = 0.5 * (ym - yp) / (ym - 2 * y0 + yp)
        delta = np.where(pos, dg, dq)
    delta = np.where(np.isfinite(delta) & ~at_edge, np.clip(delta, -0.5, 0.5), 0.0)
    shift = (lags[bl] + delta) * dlog
    v = C_KMS * (10.0 ** shift - 1.0)
    return v, peak.astype(np.float64), at_edge
