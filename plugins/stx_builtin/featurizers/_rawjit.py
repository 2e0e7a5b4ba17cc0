"""Compiled (numba) kernels of the raw featurizer's common path, a spectrum at a time.

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
1 = every pixel of the spectrum good, 2 = few bad pixels (re-normalise only next to them),
3 = many (re-normalise everywhere), chosen per spectrum by :data:`._rawlib.SPARSE_BAD_FRAC`
(the caller passes 0 or 1: no resolution matching, or matching with the mode each row picks).
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


@_kernel
def scale_sums(flux, ivar, good, rows, asum, gsum, ivmin):  # type: ignore[no-untyped-def]
    """Add each spectrum's sum of |flux| (float64) and count over its good pixels (one arm), and
    give its smallest good ivar (inf without a good pixel)."""
    npix = flux.shape[1]
    for i in range(rows.size):
        r = rows[i]
        s = 0.0
        g = 0
        lo = np.float32(np.inf)
        for p in range(npix):
            if good[r, p]:
                s += abs(flux[r, p])
                g += 1
                lo = min(lo, ivar[r, p])
        asum[i] += s
        gsum[i] += g
        ivmin[i] = lo


@_kernel
def observed_arm(flux, ivar, good, rows, inv_scale, deg_mode, bad_frac, k_ptr, k_idx, k_val, k2_val, band, h,
                 width, width2, allgood, o_ptr, o_idx, o_val, o2_val, o_c0, o_w, j0, thr,
                 a_out, b_out, v_out, has_good, clean, s_fi, s_i):  # type: ignore[no-untyped-def]
    """One arm of the spectra ``rows`` (n_all, npix) -> the rebinning inputs and the observed frame.

    Per spectrum: flux scaled by ``inv_scale`` and variance ``inv_scale^2 / ivar`` (0 where not
    ``good``); the normalised convolution with the CSR kernel ``K`` (and ``K^2`` for the
    variance) as ``deg_mode`` says (0: none; else each spectrum's own mode, dense above
    ``bad_frac`` bad pixels, :data:`._rawlib.SPARSE_BAD_FRAC`); then ``a = flux*width``,
    ``b = good*width``, ``v = var*width^2`` written to ``a_out``/``b_out``/``v_out`` (len(rows), npix; ``b_out`` only when not
    ``allgood``: it is the pixel widths then), and rebinned by the zero-velocity overlap matrix
    ``O`` (CSR, output bins ``j0..``) into the spectrum-major inverse-variance sums
    ``s_fi``/``s_i`` (len(rows), m) where the bin's good coverage reaches ``thr``. ``allgood``:
    every pixel of the batch is good (the bin coverage is then ``O @ width``, which ``b = width``
    gives as well). ``has_good``: the spectrum kept a good pixel; ``clean``: it kept all.

    Everything runs along one spectrum's pixels, where the loops vectorise and no transpose of
    the batch is needed:

    - ``band`` (W, npix) is ``K`` as a band, ``band[t, p] = K[p, p + t - h]``, W a multiple of 4
      (:attr:`._rawlib.Degrader.band`; W = 0: none). The convolution takes four band rows per
      pass over the pixels, summing each row of K in its stored order with zeros between, which
      add nothing.
    - ``o_c0``/``o_w`` are O's rows as runs of consecutive columns padded to one length
      (:func:`._rawlib.fixed_width_rows`; ``o_w`` with 0 rows: none): a loop of fixed length per
      bin, with no branch on each row's length.
    - A spectrum whose scaled flux or variance is not finite (0 * inf would be NaN) takes K's and
      O's stored entries alone, as the numpy path does."""
    npix = flux.shape[1]
    nbin = o_ptr.size - 1
    nrow = rows.size
    nw = band.shape[0]
    pad = h if nw > 0 else 0
    hi = nw - 1 - h  # the band reaches h pixels below and hi above its row
    fpad = np.zeros(pad + npix + nw, np.float32)  # f at fpad[pad + c]; the padding stays 0
    vpad = np.zeros(pad + npix + nw, np.float32)
    gpad = np.zeros(pad + npix + nw, np.float32)  # 1 = good
    num = np.empty(npix, np.float32)
    vn = np.empty(npix, np.float32)
    kb = np.empty(npix, np.float32)
    cb = np.empty(npix + 1, np.int64)  # bad pixels below pixel p
    for i in range(nrow):
        r = rows[i]
        sc = inv_scale[i]
        sc2 = sc * sc
        nbad = 0
        ninf = 0
        for p in range(npix):  # loads first, then selects: the loop vectorises
            gq = good[r, p]
            fq = flux[r, p] * sc
            vq = sc2 / ivar[r, p]
            fq = fq if gq else _F0
            vq = vq if gq else _F0
            fpad[pad + p] = fq
            vpad[pad + p] = vq
            gpad[pad + p] = _F1 if gq else _F0
            nbad += not gq
            ninf += (abs(fq) == np.inf) | (abs(vq) == np.inf) | (fq != fq) | (vq != vq)
        mode = deg_mode
        if mode != DEG_NONE:  # the spectrum's own re-normalisation: no other spectrum changes its bits
            mode = DEG_ALLGOOD if nbad == 0 else (DEG_DENSE if nbad > bad_frac * npix else DEG_SPARSE)
        if mode == DEG_NONE:
            for p in range(npix):
                num[p] = fpad[pad + p]
            for p in range(npix):
                vn[p] = vpad[pad + p]
        elif nw > 0 and ninf == 0:
            num[:] = _F0
            vn[:] = _F0
            for t in range(0, nw, 4):  # four band rows per pass, summed in order
                k0 = band[t]
                k1 = band[t + 1]
                k2 = band[t + 2]
                k3 = band[t + 3]
                f0 = fpad[t: t + npix]
                f1 = fpad[t + 1: t + 1 + npix]
                f2 = fpad[t + 2: t + 2 + npix]
                f3 = fpad[t + 3: t + 3 + npix]
                v0 = vpad[t: t + npix]
                v1 = vpad[t + 1: t + 1 + npix]
                v2 = vpad[t + 2: t + 2 + npix]
                v3 = vpad[t + 3: t + 3 + npix]
                for p in range(npix):
                    w0 = k0[p]
                    w1 = k1[p]
                    w2 = k2[p]
                    w3 = k3[p]
                    num[p] = (((num[p] + w0 * f0[p]) + w1 * f1[p]) + w2 * f2[p]) + w3 * f3[p]
                    vn[p] = (((vn[p] + (w0 * w0) * v0[p]) + (w1 * w1) * v1[p]) + (w2 * w2) * v2[p]) + (w3 * w3) * v3[p]
            if mode == DEG_DENSE:  # kernel weight on good pixels
                kb[:] = _F0
                for t in range(nw):
                    kt = band[t]
                    g0 = gpad[t: t + npix]
                    for p in range(npix):
                        kb[p] += kt[p] * g0[p]
        else:  # K's stored entries only
            for p in range(npix):
                sn = _F0
                sv = _F0
                sk = _F0
                for q in range(k_ptr[p], k_ptr[p + 1]):
                    c = pad + k_idx[q]
                    w = k_val[q]
                    sn += w * fpad[c]
                    sv += k2_val[q] * vpad[c]
                    if mode == DEG_DENSE:
                        sk += w * gpad[c]
                num[p] = sn
                vn[p] = sv
                kb[p] = sk
        ng = 0
        if mode == DEG_NONE or mode == DEG_ALLGOOD:
            for p in range(npix):
                a_out[i, p] = num[p] * width[p]
            for p in range(npix):
                v_out[i, p] = vn[p] * width2[p]
            if not allgood:
                for p in range(npix):
                    b_out[i, p] = width[p] if gpad[pad + p] > _F0 else _F0
            ng = npix - nbad
        elif mode == DEG_DENSE:
            for p in range(npix):
                den = kb[p]
                ok = gpad[pad + p] > _F0 and den >= _HALF
                safe = den if ok else _F1
                a_out[i, p] = (num[p] / safe if ok else _F0) * width[p]
                v_out[i, p] = (vn[p] / (safe * safe) if ok else _F0) * width2[p]
                b_out[i, p] = width[p] if ok else _F0
                ng += ok
        else:  # sparse: re-normalise the rows whose kernel meets a bad pixel
            for p in range(npix):
                a_out[i, p] = num[p] * width[p]
            for p in range(npix):
                v_out[i, p] = vn[p] * width2[p]
            for p in range(npix):
                b_out[i, p] = width[p] if gpad[pad + p] > _F0 else _F0
            ng = npix - nbad
            if nbad > 0:
                cb[0] = 0
                for p in range(npix):
                    cb[p + 1] = cb[p] + (gpad[pad + p] == _F0)
                nxt = 0  # rows below were looked at
                for c in range(npix):
                    if gpad[pad + c] > _F0:
                        continue
                    p0 = max(nxt, c - hi) if nw > 0 else nxt
                    p1 = min(npix, c + h + 1) if nw > 0 else npix
                    for p in range(p0, p1):
                        q0 = k_ptr[p]
                        q1 = k_ptr[p + 1]
                        if q1 == q0 or cb[k_idx[q1 - 1] + 1] == cb[k_idx[q0]]:
                            continue
                        sk = _F0
                        for q in range(q0, q1):
                            sk += k_val[q] * (_F1 - gpad[pad + k_idx[q]])
                        if sk > _F0:
                            den = _F1 - sk
                            was = gpad[pad + p] > _F0
                            ok = was and den >= _HALF
                            safe = den if ok else _F1
                            a_out[i, p] = (num[p] / safe if ok else _F0) * width[p]
                            v_out[i, p] = (vn[p] / (safe * safe) if ok else _F0) * width2[p]
                            b_out[i, p] = width[p] if ok else _F0
                            ng -= was and not ok
                    nxt = max(nxt, p1)
        has_good[i] = ng > 0
        clean[i] = ng == npix
        # the observed frame: O's rows as fixed-width runs (no branch on each row's length) where
        # there are and the spectrum is finite (0 * inf would be NaN), else its stored entries
        nfin = 0
        for p in range(npix):
            nfin += (abs(a_out[i, p]) < np.inf) & (abs(v_out[i, p]) < np.inf)
        if o_w.shape[0] > 0 and nfin == npix:
            for j in range(nbin):
                c0 = o_c0[j]
                sn = _F0
                sd = _F0
                sv = _F0
                for t in range(o_w.shape[0]):
                    w = o_w[t, j]
                    c = c0 + t
                    sn += w * a_out[i, c]
                    if allgood:
                        sd += w * width[c]
                    else:
                        sd += w * b_out[i, c]
                    sv += (w * w) * v_out[i, c]
                if sv > _F0 and sd >= thr[j]:
                    iv = sd / sv
                    s_fi[i, j0 + j] += iv * sn
                    s_i[i, j0 + j] += iv * sd
            continue
        for j in range(nbin):
            sn = _F0
            sd = _F0
            sv = _F0
            for q in range(o_ptr[j], o_ptr[j + 1]):
                c = o_idx[q]
                w = o_val[q]
                sn += w * a_out[i, c]
                if allgood:
                    sd += w * width[c]
                else:
                    sd += w * b_out[i, c]
                sv += o2_val[q] * v_out[i, c]
            if sv > _F0 and sd >= thr[j]:
                iv = sd / sv
                s_fi[i, j0 + j] += iv * sn
                s_i[i, j0 + j] += iv * sd


@_kernel
def rest_arm(a, b, v, clean, kind, x0, step, cw, width, edges, log_edges, j0, j1, minc_w, zfac,
             lzfac, s_fi, s_i):  # type: ignore[no-untyped-def]
    """One arm's exact flux-conserving rebinning onto the output bins ``j0..j1`` at each
    spectrum's ``zfac``, added to the spectrum-major inverse-variance sums ``s_fi``/``s_i``
    (n, m): :func:`._rawlib.edge_positions`, :func:`._rawlib.resample_sums` (bin coverage from
    the pixel positions for the spectra that are ``clean``, every pixel good, as
    :func:`._rawlib.covered_width`; ``b`` is read for the others only, and may have no rows when
    all are clean) and the arm accumulation of the numpy path, for one spectrum at a time."""
    n, npix = a.shape
    fnp = float(npix)
    for i in range(n):
        z = zfac[i]
        lz = lzfac[i]
        ag = clean[i]
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
            sd = _F0 if ag else b[i, c] * o
            s = 1
            while np.float32(s) < d:
                o = min(d - np.float32(s), _F1)
                c = min(k + s, npix - 1)
                sn += a[i, c] * o
                sv += v[i, c] * (o * o)
                if not ag:
                    sd += b[i, c] * o
                s += 1
            if ag:
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
