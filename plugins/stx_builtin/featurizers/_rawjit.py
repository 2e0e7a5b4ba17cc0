"""Compiled (numba) kernels of the raw featurizer's common path, a spectrum or a block at a time.

The numpy path of :mod:`._rawlib` is vectorised over a batch: every step streams whole
``(npix, n)`` arrays through memory, a dozen passes per arm. These kernels do each spectrum's
per-pixel steps while its arm (tens of KB) sits in cache: cleaning and scaling, the resolution
kernel, the observed-frame rebinning and the arm combination (:func:`observed_arm`); the
rest-frame rebinning at the spectrum's velocity (:func:`rest_arm`, :func:`finish`); the continuum
shift, normalisation, validity and the SNR median (:func:`normalise`); and the line depths the
RV cross-correlation takes (:func:`rv_depth`). What stays batched in numpy is what a matrix
product does best: the continuum fit and the cross-correlation itself.

Each kernel mirrors the numpy path's arithmetic step for step, in float32 and in the same order
(sparse rows summed in stored order, no fused multiply-add: numba keeps IEEE semantics without
``fastmath``), so the features equal the numpy path's to float32 rounding (on the real DESI and
LAMOST files the tests compare, to the bit; the per-spectrum continuum means of
:func:`normalise` and :func:`rv_depth` are summed in float64, where numpy's einsum sums
float32). ``nogil``: the featurizer's threads run them in parallel. ``cache``: compiled once per
install (about 10 s, on the first batch that uses them), then loaded from numba's cache (about
0.7 s per process); in every process where numba has nowhere to write one (:data:`UNCACHED`).

Integer codes: grid kind 0 = linear, 1 = log10-linear; degradation mode 0 = none,
1 = every pixel of the batch good, 2 = few bad pixels (re-normalise only next to them),
3 = many (re-normalise everywhere), as :func:`._rawlib.renormalisation` chooses per batch.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)

#: ``error_model="numpy"``: a float division by zero gives inf/NaN as in numpy (the numpy path's
#: semantics) instead of a Python exception check in every inner loop.
_JIT = dict(nogil=True, error_model="numpy")
#: Kernels numba could not cache: it needs a writable ``__pycache__`` beside this file, a
#: writable user cache directory or ``$NUMBA_CACHE_DIR``; without any (a read-only install and
#: home) it refuses ``cache=True``, and they are compiled in every process instead.
UNCACHED: list[str] = []


def _kernel(fn):  # type: ignore[no-untyped-def]
    """``numba.njit`` with :data:`_JIT`, cached on disk where numba can."""
    try:
        return njit(cache=True, **_JIT)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        UNCACHED.append(fn.__name__)
        return njit(**_JIT)(fn)

DEG_NONE, DEG_ALLGOOD, DEG_SPARSE, DEG_DENSE = 0, 1, 2, 3
#: :func:`._rawlib.renormalisation`'s choice for a batch, as a degradation mode
DEG_MODES = {"none": DEG_ALLGOOD, "sparse": DEG_SPARSE, "dense": DEG_DENSE}


@_kernel
def scale_sums(flux, good, rows, asum, gsum):  # type: ignore[no-untyped-def]
    """Add each spectrum's sum of |flux| (float64) and count over its good pixels (one arm)."""
    npix = flux.shape[1]
    for i in range(rows.size):
        r = rows[i]
        s = 0.0
        g = 0
        for p in range(npix):
            if good[r, p]:
                s += abs(flux[r, p])
                g += 1
        asum[i] += s
        gsum[i] += g


#: Spectra convolved together: the kernel's rows are read once per block and the inner loops
#: run over the block's spectra (SIMD), as a sparse product over a pixel-major batch does. Large
#: enough that LLVM vectorises those loops rather than unrolling them.
_BLOCK = 64


#: Pixels per tile of the transposes between the spectrum-major input/output and the block.
_TILE = 64


@_kernel
def observed_arm(flux, ivar, good, rows, inv_scale, deg_mode, k_ptr, k_idx, k_val, k2_val,
                 width, width2, allgood, o_ptr, o_idx, o_val, o2_val, j0, thr,
                 a_out, b_out, v_out, has_good, s_fi, s_i):  # type: ignore[no-untyped-def]
    """One arm of the spectra ``rows`` (n_all, npix) -> the rebinning inputs and the observed frame.

    Per spectrum: flux scaled by ``inv_scale`` and variance ``inv_scale^2 / ivar`` (0 where not
    ``good``); the normalised convolution with the CSR kernel ``K`` (and ``K^2`` for the
    variance) as ``deg_mode`` says; then ``a = flux*width``, ``b = good*width``, ``v = var*width^2``
    written spectrum-major to ``a_out``/``b_out``/``v_out`` (len(rows), npix; ``b_out`` only when
    not ``allgood``: it is the pixel widths then), and rebinned by the
    zero-velocity overlap matrix ``O`` (CSR, output bins ``j0..``) into the pixel-major
    inverse-variance sums ``s_fi``/``s_i`` (m, len(rows)) where the bin's good coverage reaches
    ``thr``. ``allgood``: every pixel of the batch is good (the bin coverage is then ``O @ width``,
    which ``b = width`` gives as well). ``has_good``: the spectrum kept a good pixel.

    Spectra go in blocks of :data:`_BLOCK`, pixel-major inside the block (tiled transposes in and
    out), so that every sparse row is read once per block and its loops run over the block."""
    npix = flux.shape[1]
    nbin = o_ptr.size - 1
    nrow = rows.size
    fb = np.empty((npix, _BLOCK), np.float32)  # cleaned input block (every entry written below)
    vb = np.empty((npix, _BLOCK), np.float32)
    gb = np.empty((npix, _BLOCK), np.float32)  # 1 = good
    ab = np.empty((npix, _BLOCK), np.float32)  # outputs a, b, v of the block
    bb = np.empty((npix, _BLOCK), np.float32)
    wb = np.empty((npix, _BLOCK), np.float32)
    num = np.empty(_BLOCK, np.float32)
    vn = np.empty(_BLOCK, np.float32)
    kb = np.empty(_BLOCK, np.float32)
    sd = np.empty(_BLOCK, np.float32)
    ng = np.empty(_BLOCK, np.int64)
    nbad = np.empty(npix + 1, np.int64)
    for i0 in range(0, nrow, _BLOCK):
        nb = min(_BLOCK, nrow - i0)
        if nb < _BLOCK:
            fb[:] = _F0
            vb[:] = _F0
            gb[:] = _F0
        nbad[:] = 0
        for p0 in range(0, npix, _TILE):
            p1 = min(p0 + _TILE, npix)
            for s in range(nb):
                r = rows[i0 + s]
                sc = inv_scale[i0 + s]
                sc2 = sc * sc
                for p in range(p0, p1):
                    if good[r, p]:
                        fb[p, s] = flux[r, p] * sc
                        vb[p, s] = sc2 / ivar[r, p]
                        gb[p, s] = _F1
                    else:
                        fb[p, s] = _F0
                        vb[p, s] = _F0
                        gb[p, s] = _F0
                        nbad[p + 1] += 1
        for p in range(npix):  # cumulative: bad pixels of the block below pixel p
            nbad[p + 1] += nbad[p]
        ng[:] = 0
        for p in range(npix):
            wp = width[p]
            w2p = width2[p]
            ar = ab[p]
            br = bb[p]
            vo = wb[p]
            gr = gb[p]
            if deg_mode == DEG_NONE:
                fr = fb[p]
                vr = vb[p]
                for s in range(_BLOCK):
                    ar[s] = fr[s] * wp
                for s in range(_BLOCK):
                    vo[s] = vr[s] * w2p
                for s in range(_BLOCK):
                    br[s] = wp if gr[s] > _F0 else _F0
                for s in range(_BLOCK):
                    ng[s] += gr[s] > _F0
                continue
            num[:] = _F0
            vn[:] = _F0
            kb[:] = _F0
            q0 = k_ptr[p]
            q1 = k_ptr[p + 1]
            # sparse mode: no bad pixel of the block under this row of K leaves kb at 0 (untouched)
            weigh = deg_mode == DEG_DENSE or (deg_mode == DEG_SPARSE and q1 > q0
                                              and nbad[k_idx[q1 - 1] + 1] > nbad[k_idx[q0]])
            for q in range(q0, q1):
                c = k_idx[q]
                w = k_val[q]
                w2 = k2_val[q]
                fr = fb[c]  # row views: the loops over the block vectorise
                vr = vb[c]
                for s in range(_BLOCK):
                    num[s] += w * fr[s]
                for s in range(_BLOCK):
                    vn[s] += w2 * vr[s]
                if weigh:
                    gc = gb[c]
                    if deg_mode == DEG_SPARSE:  # kernel weight on bad pixels
                        for s in range(_BLOCK):
                            kb[s] += w * (_F1 - gc[s])
                    else:  # kernel weight on good pixels
                        for s in range(_BLOCK):
                            kb[s] += w * gc[s]
            if deg_mode == DEG_ALLGOOD:
                for s in range(_BLOCK):
                    ar[s] = num[s] * wp
                for s in range(_BLOCK):
                    vo[s] = vn[s] * w2p
                for s in range(_BLOCK):
                    br[s] = wp
                for s in range(_BLOCK):
                    ng[s] += 1
                continue
            for s in range(_BLOCK):
                fp = num[s]
                vp = vn[s]
                gp = gr[s] > _F0
                if deg_mode == DEG_DENSE or kb[s] > _F0:  # (sparse: next to a bad pixel)
                    den = kb[s] if deg_mode == DEG_DENSE else _F1 - kb[s]
                    ok = gp and den >= _HALF
                    safe = den if ok else _F1
                    fp = fp / safe if ok else _F0
                    vp = vp / (safe * safe) if ok else _F0
                    gp = ok
                ar[s] = fp * wp
                vo[s] = vp * w2p
                br[s] = wp if gp else _F0
                ng[s] += gp
        for s in range(nb):
            has_good[i0 + s] = ng[s] > 0
        # the observed frame, over the block
        for j in range(nbin):
            num[:] = _F0
            sd[:] = _F0
            vn[:] = _F0
            for q in range(o_ptr[j], o_ptr[j + 1]):
                c = o_idx[q]
                w = o_val[q]
                w2 = o2_val[q]
                ar = ab[c]
                vo = wb[c]
                for s in range(_BLOCK):
                    num[s] += w * ar[s]
                if allgood:
                    wc = w * width[c]
                    for s in range(_BLOCK):
                        sd[s] += wc
                else:
                    br = bb[c]
                    for s in range(_BLOCK):
                        sd[s] += w * br[s]
                for s in range(_BLOCK):
                    vn[s] += w2 * vo[s]
            fo = s_fi[j0 + j]
            io = s_i[j0 + j]
            t = thr[j]
            for s in range(nb):
                if vn[s] > _F0 and sd[s] >= t:
                    iv = sd[s] / vn[s]
                    fo[i0 + s] += iv * num[s]
                    io[i0 + s] += iv * sd[s]
        # the block back to spectrum-major, for the rest-frame pass
        for p0 in range(0, npix, _TILE):
            p1 = min(p0 + _TILE, npix)
            for s in range(nb):
                i = i0 + s
                for p in range(p0, p1):
                    a_out[i, p] = ab[p, s]
                    v_out[i, p] = wb[p, s]
                if not allgood:
                    for p in range(p0, p1):
                        b_out[i, p] = bb[p, s]


@_kernel
def rest_arm(a, b, v, allgood, kind, x0, step, cw, width, edges, log_edges, j0, j1, minc_w, zfac,
             lzfac, s_fi, s_i):  # type: ignore[no-untyped-def]
    """One arm's exact flux-conserving rebinning onto the output bins ``j0..j1`` at each
    spectrum's ``zfac``, added to the spectrum-major inverse-variance sums ``s_fi``/``s_i``
    (n, m): :func:`._rawlib.edge_positions`, :func:`._rawlib.resample_sums` (bin coverage from
    the pixel positions when ``allgood``, :func:`._rawlib.covered_width`) and the arm
    accumulation of the numpy path, for one spectrum at a time."""
    n, npix = a.shape
    fnp = float(npix)
    for i in range(n):
        z = zfac[i]
        lz = lzfac[i]
        zf = np.float32(z)
        if kind == 0:
            pa = (edges[j0] * z - x0) / step + 0.5
        else:
            pa = (log_edges[j0] + lz - x0) / step + 0.5
        pa = min(max(pa, 0.0), fnp)
        for j in range(j0, j1):
            if kind == 0:
                pb = (edges[j + 1] * z - x0) / step + 0.5
            else:
                pb = (log_edges[j + 1] + lz - x0) / step + 0.5
            pb = min(max(pb, 0.0), fnp)
            kf = math.floor(pa)
            u = np.float32(pa - kf)
            d = np.float32(pb - kf)
            k = int(kf)
            o = min(d, _F1) - u
            c = min(k, npix - 1)
            sn = a[i, c] * o
            sv = v[i, c] * (o * o)
            sd = _F0 if allgood else b[i, c] * o
            s = 1
            while np.float32(s) < d:
                o = min(d - np.float32(s), _F1)
                c = min(k + s, npix - 1)
                sn += a[i, c] * o
                sv += v[i, c] * (o * o)
                if not allgood:
                    sd += b[i, c] * o
                s += 1
            if allgood:
                if kind == 0:
                    sd = np.float32((pb - pa) * step)
                else:
                    ka = min(int(pa), npix - 1)
                    kb = min(int(pb), npix - 1)
                    sd = np.float32((cw[kb] + (pb - kb) * width[kb]) - (cw[ka] + (pa - ka) * width[ka]))
            pa = pb
            if sv > _F0 and sd >= minc_w[j] * zf:
                iv = sd / sv
                s_fi[i, j] += iv * sn
                s_i[i, j] += iv * sd


@_kernel
def finish(s_fi, s_i):  # type: ignore[no-untyped-def]
    """The inverse-variance mean ``s_fi/s_i`` and ``s_i`` in place; 0/0 where there is none or a
    sum is not finite (``_finish_combination`` of the numpy path)."""
    n, m = s_fi.shape
    for i in range(n):
        for j in range(m):
            si = s_i[i, j]
            if si > _F0 and si < np.inf:
                f = s_fi[i, j] / si
                if np.isfinite(f):
                    s_fi[i, j] = f
                    continue
            s_fi[i, j] = _F0
            s_i[i, j] = _F0


@_kernel
def normalise(flux, ivar, cont, shift, cont_floor, fill, valid, snr):  # type: ignore[no-untyped-def]
    """Spectrum-major rest-frame ``flux``/``ivar`` (n, m) -> features and their ivar, in place.

    Per spectrum: the observed-frame continuum ``cont`` (n, m) shifted by ``shift`` pixels (linear
    interpolation, the end pixels repeated: ``_rawlib.shift_rows``); pixels whose continuum is
    not above ``cont_floor`` times its mean over the good pixels are not valid; flux/cont and
    ivar*cont^2; non-finite results not valid; invalid pixels get ``fill`` and ivar 0. ``snr``:
    the median of feature*sqrt(ivar) over the valid pixels (0 without one)."""
    n, m = flux.shape
    c = np.empty(m, np.float32)
    buf = np.empty(m, np.float32)
    for i in range(n):
        sh = shift[i]
        kf = math.floor(sh)
        frac = np.float32(sh - kf)
        k = int(kf)
        csum = 0.0
        ng = 0
        for j in range(m):
            lo = cont[i, min(max(j + k, 0), m - 1)]
            hi = cont[i, min(max(j + k + 1, 0), m - 1)]
            cj = (hi - lo) * frac + lo
            c[j] = cj
            if ivar[i, j] > _F0:
                csum += cj
                ng += 1
        cref = csum / ng if ng > 0 else np.nan
        floor = np.float32(cont_floor * cref) if (np.isfinite(cref) and cref > 0) else np.float32(np.inf)
        nv = 0
        for j in range(m):
            iv = ivar[i, j]
            ok = iv > _F0 and c[j] > floor
            safe = c[j] if ok else _F1
            fe = flux[i, j] / safe
            fv = iv * safe
            fv *= safe
            ok = ok and np.isfinite(fe) and fv > _F0 and fv < np.inf
            valid[i, j] = ok
            if ok:
                flux[i, j] = fe
                ivar[i, j] = fv
                buf[nv] = fe * np.sqrt(fv)
                nv += 1
            else:
                flux[i, j] = fill
                ivar[i, j] = _F0
        if nv == 0:
            snr[i] = 0.0
            continue
        h = nv // 2
        part = np.partition(buf[:nv], h)
        med = float(part[h]) if nv % 2 == 1 else 0.5 * (float(part[:h].max()) + float(part[h]))
        snr[i] = med if np.isfinite(med) else 0.0



@_kernel
def rv_depth(flux, ivar, cont, tell, cont_floor, x, valid):  # type: ignore[no-untyped-def]
    """The cross-correlation's input from the observed frame, pixel-major ``(m, n)``: line depth
    ``x = clip(1 - flux/cont, -1, 1)`` where ``valid`` (ivar > 0, continuum above ``cont_floor``
    times its mean over the good pixels, not in a ``tell`` band), 0 elsewhere. Two passes over
    the rows (the per-spectrum mean, then the depths), each running along the batch."""
    m, n = flux.shape
    acc = np.zeros(n)
    ng = np.zeros(n, np.int64)
    for i in range(m):
        for j in range(n):
            if ivar[i, j] > _F0:
                acc[j] += cont[i, j]
                ng[j] += 1
    floor = np.empty(n, np.float32)
    for j in range(n):
        cref = acc[j] / ng[j] if ng[j] > 0 else np.nan
        floor[j] = np.float32(cont_floor * cref) if (np.isfinite(cref) and cref > 0) else np.float32(np.inf)
    for i in range(m):
        off = tell[i]
        for j in range(n):
            c = cont[i, j]
            ok = (not off) and ivar[i, j] > _F0 and c > floor[j]
            valid[i, j] = ok
            d = _F1 - flux[i, j] / (c if ok else _F1)
            x[i, j] = min(max(d, -_F1), _F1) if ok else _F0
