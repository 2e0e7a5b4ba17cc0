"""Compiled (numba) kernels of the raw featurizer's common path, a spectrum at a time.

The numpy path of :mod:`._rawlib` is vectorised over a batch: every step streams whole
``(npix, n)`` arrays through memory, a dozen passes per arm. These kernels do each spectrum's
per-pixel steps while its arm (tens of KB) sits in cache: cleaning and scaling, the resolution
kernel, the observed-frame rebinning and the arm combination (:func:`observed_arm`); the
rest-frame rebinning at the spectrum's velocity (:func:`rest_arm`, :func:`finish`); the continuum
shift, normalisation, validity and the SNR median (:func:`normalise`); the line depths the
RV cross-correlation takes (:func:`rv_depth`); and the continuum fit (:func:`continuum`),
:data:`BLOCK` spectra at a time, its loops running across them. What stays batched in numpy is
what a matrix product does best: the cross-correlation itself.

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
    nw_o = o_w.shape[0]
    sn_j = np.empty(nbin, np.float32)
    sv_j = np.empty(nbin, np.float32)
    sd_j = np.empty(nbin, np.float32)
    sd_w = np.zeros(nbin, np.float32)  # what the pixel widths cover, summed as for a spectrum
    for t in range(nw_o):
        for j in range(nbin):
            sd_w[j] += o_w[t, j] * width[o_c0[j] + t]
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
        if nw_o > 0 and nfin == npix:
            # tap by tap across the bins (indexed loads LLVM partly turns into gathers), each bin's sums in tap order;
            # a spectrum with every pixel good covers what the pixel widths do (``sd_w``)
            a_row = a_out[i]
            v_row = v_out[i]
            sn_j[:] = _F0
            sv_j[:] = _F0
            full = allgood or clean[i]
            if full:
                sd_j[:] = sd_w
            else:
                sd_j[:] = _F0
            for t in range(nw_o):
                wt = o_w[t]
                for j in range(nbin):
                    c = o_c0[j] + t
                    w = wt[j]
                    sn_j[j] += w * a_row[c]
                    sv_j[j] += (w * w) * v_row[c]
                if not full:
                    b_row = b_out[i]
                    for j in range(nbin):
                        sd_j[j] += wt[j] * b_row[o_c0[j] + t]
            for j in range(nbin):
                sv = sv_j[j]
                sd = sd_j[j]
                if sv > _F0 and sd >= thr[j]:
                    iv = sd / sv
                    s_fi[i, j0 + j] += iv * sn_j[j]
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
def _select(a, n, k):  # type: ignore[no-untyped-def]
    """The ``k``-th smallest of ``a[:n]`` (finite values), found in place by quickselect (Hoare
    partitions around a median of three): afterwards ``a[:k]`` holds values not above it. The
    value ``np.partition`` gives, without its copy (2-3x quicker on a spectrum's pixels)."""
    lo = 0
    hi = n - 1
    while hi > lo:
        mid = (lo + hi) >> 1
        if a[mid] < a[lo]:
            a[mid], a[lo] = a[lo], a[mid]
        if a[hi] < a[lo]:
            a[hi], a[lo] = a[lo], a[hi]
        if a[hi] < a[mid]:
            a[hi], a[mid] = a[mid], a[hi]
        pivot = a[mid]
        i = lo
        j = hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if k <= j:
            hi = j
        elif k >= i:
            lo = i
        else:  # j < k < i: a[k] equals the pivot
            break
    return a[k]


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
        upper = _select(buf, nv, h)
        if nv % 2 == 1:
            med = float(upper)
        else:  # the largest of the h smaller values
            lower = buf[0]
            for j in range(1, h):
                lower = max(lower, buf[j])
            med = 0.5 * (float(lower) + float(upper))
        snr[i] = med if np.isfinite(med) else 0.0


#: spectra the continuum fit and the CCF depths take at a time: each spectrum's sums stay in
#: order, and the loops over the block vectorise (one AVX-512 register of float32)
BLOCK = 32


@_kernel
def rv_depth(flux, ivar, cont, tell, cont_floor, x, valid):  # type: ignore[no-untyped-def]
    """The cross-correlation's input from spectrum-major observed-frame ``flux``/``ivar``/``cont``
    (n, m), in the same layout: line depth ``x = clip(1 - flux/cont, -1, 1)`` where ``valid``
    (ivar > 0, continuum above ``cont_floor`` times its mean over the good pixels, not in a
    ``tell`` band), 0 elsewhere."""
    n, m = flux.shape
    for i in range(n):
        acc = 0.0
        ng = 0
        for j in range(m):
            if ivar[i, j] > _F0:
                acc += cont[i, j]
                ng += 1
        cref = acc / ng if ng > 0 else np.nan
        floor = np.float32(cont_floor * cref) if (np.isfinite(cref) and cref > 0) else np.float32(np.inf)
        for j in range(m):
            c = cont[i, j]
            ok = (not tell[j]) and ivar[i, j] > _F0 and c > floor
            valid[i, j] = ok
            d = _F1 - flux[i, j] / (c if ok else _F1)
            x[i, j] = min(max(d, -_F1), _F1) if ok else _F0


@_kernel
def continuum(flux, ivar, nbin, p_ptr, p_idx, p_val, d_of_pair, k_of_pair, pen_band, b_ptr, b_idx, b_val,
              bt_ptr, bt_idx, bt_val, s_ptr, s_idx, s_val, n_iter, clip_lo, clip_hi, cont):  # type: ignore[no-untyped-def]
    """:func:`._rawlib.fit_continuum` of spectrum-major ``flux``/``ivar`` (n, m) (flux 0 where ivar
    is not > 0), :data:`BLOCK` spectra at a time, into ``cont`` (n, m); returns how many spectra
    met a matrix that is not positive definite (their continuum is NaN; the numpy path's LAPACK
    call raises then).

    The sparse products of the numpy path are the CSR matrices passed here, each summed in its
    stored order in float32 as scipy does: ``P`` (``p_*``: pair products by bin), ``B`` (``b_*``:
    basis by bin), ``B^T`` (``bt_*``) and the basis at the pixels (``s_*``). The banded Cholesky
    solve is LAPACK's unblocked ``dpbtf2`` and ``dpbtrs`` (reference order, in float64, without
    the reference code's skips of zero entries, which change nothing for finite values), so the
    coefficients equal the numpy path's to float64 rounding; the clipping statistics sum in
    float32 in bin order, as numpy's reductions over the batch axis do. Every loop over the block
    runs its full length (a partial block's spare lanes fit zero weights and are not written), so
    that it vectorises."""
    n, m = flux.shape
    mb = bt_ptr.size - 1
    nb = b_ptr.size - 1
    npairs = p_ptr.size - 1
    kd = pen_band.shape[0] - 1
    B = BLOCK
    gb = np.zeros((mb, B), np.float32)
    fb = np.zeros((mb, B), np.float32)
    w = np.empty((mb, B), np.float32)
    wf = np.empty((mb, B), np.float32)
    rr = np.empty((mb, B), np.float32)
    cb = np.empty((mb, B), np.float32)
    gram = np.empty((npairs, B), np.float32)
    ab = np.empty((kd + 1, nb, B))
    x = np.empty((nb, B))
    coef = np.empty((nb, B), np.float32)
    bad = np.empty(B, np.bool_)
    ss = np.empty(B, np.float32)
    sw = np.empty(B, np.float32)
    lo = np.empty(B, np.float32)
    hi = np.empty(B, np.float32)
    out = np.empty(B, np.float32)
    clo = np.float32(-clip_lo)
    chi = np.float32(clip_hi)
    failed = 0
    for i0 in range(0, n, B):
        nk = min(B, n - i0)  # lanes in use (a run-time count: the loops over it vectorise)
        # bin sums of the good pixels and their flux (consecutive adds, as numpy's bin_sums)
        for s in range(nk):
            i = i0 + s
            for b in range(mb):
                p0 = b * nbin
                p1 = min(p0 + nbin, m)
                g = _F1 if ivar[i, p0] > _F0 else _F0
                f = flux[i, p0]
                for p in range(p0 + 1, p1):
                    g += _F1 if ivar[i, p] > _F0 else _F0
                    f += flux[i, p]
                gb[b, s] = g
                fb[b, s] = f / g if g > _F0 else _F0
        for b in range(mb):
            _copy(gb[b], w[b], nk)
        bad[:] = False
        for it in range(max(1, n_iter)):
            for q in range(npairs):  # P @ w: the band of B^T diag(w) B
                _sparse_row(p_ptr[q], p_ptr[q + 1], p_idx, p_val, w, gram[q], nk)
            for b in range(mb):
                wr, fr, wfr = w[b], fb[b], wf[b]
                for s in range(nk):
                    wfr[s] = wr[s] * fr[s]
            for k in range(nb):  # B @ (w * fb): the right-hand sides
                _sparse_row(b_ptr[k], b_ptr[k + 1], b_idx, b_val, wf, out, nk)
                xk = x[k]
                for s in range(nk):
                    xk[s] = out[s]
            for d in range(kd + 1):
                for k in range(nb):
                    ab[d, k, :] = pen_band[d, k]
            for q in range(npairs):
                abr, gr = ab[d_of_pair[q], k_of_pair[q]], gram[q]
                for s in range(nk):
                    abr[s] += gr[s]
            # dpbtf2 (lower): L L^T = A in place; a pivot <= 0 marks the spectrum failed
            for j in range(nb):
                kn = min(kd, nb - 1 - j)
                a0 = ab[0, j]
                for s in range(nk):
                    ajj = a0[s]
                    pos = ajj > 0.0
                    bad[s] |= not pos
                    a0[s] = math.sqrt(ajj if pos else 1.0)
                for t in range(1, kn + 1):
                    at = ab[t, j]
                    for s in range(nk):
                        at[s] *= 1.0 / a0[s]
                for c in range(kn):  # dsyr: A[j+1:, j+1:] -= v v^T, v = ab[1:kn+1, j]
                    vc = ab[1 + c, j]
                    for t in range(c, kn):
                        vt, dst = ab[1 + t, j], ab[t - c, j + 1 + c]
                        for s in range(nk):
                            dst[s] += vt[s] * -vc[s]
            # dpbtrs: L y = b, then L^T x = y (dtbsv, reference order)
            for j in range(nb):
                kn = min(kd, nb - 1 - j)
                xj, a0 = x[j], ab[0, j]
                for s in range(nk):
                    xj[s] /= a0[s]
                for t in range(1, kn + 1):
                    xt, at = x[j + t], ab[t, j]
                    for s in range(nk):
                        xt[s] -= xj[s] * at[s]
            for j in range(nb - 1, -1, -1):
                kn = min(kd, nb - 1 - j)
                xj = x[j]
                for t in range(kn, 0, -1):
                    xt, at = x[j + t], ab[t, j]
                    for s in range(nk):
                        xj[s] -= at[s] * xt[s]
                a0 = ab[0, j]
                for s in range(nk):
                    xj[s] /= a0[s]
            for k in range(nb):
                xk, ck = x[k], coef[k]
                for s in range(nk):
                    ck[s] = np.float32(xk[s])
            if it == n_iter - 1:
                break
            # clip bins whose relative residual is off by more than clip_lo/clip_hi times its rms
            ss[:] = _F0
            sw[:] = _F0
            for b in range(mb):
                cbr, rrr, fr, wr = cb[b], rr[b], fb[b], w[b]
                _sparse_row(bt_ptr[b], bt_ptr[b + 1], bt_idx, bt_val, coef, cbr, nk)
                for s in range(nk):
                    cv = cbr[s]
                    inv = _F1 / (cv if cv > _F0 else _F1)
                    r = fr[s] * (inv if cv > _F0 else _F0) - _F1
                    rrr[s] = r
                    ss[s] += (r * wr[s]) * r
                    sw[s] += wr[s]
            for s in range(nk):
                rms = np.float32(np.sqrt(ss[s] / max(sw[s], _F1)))
                lo[s] = clo * rms
                hi[s] = chi * rms
            for b in range(mb):
                cbr, rrr, gr, wr = cb[b], rr[b], gb[b], w[b]
                for s in range(nk):
                    r = rrr[s]
                    keep = (r > lo[s]) & (r < hi[s]) & (gr[s] > _F0) & (cbr[s] > _F0)
                    wr[s] = gr[s] if keep else _F0
        for p in range(m):  # the continuum at the pixels
            _sparse_row(s_ptr[p], s_ptr[p + 1], s_idx, s_val, coef, out, nk)
            for s in range(nk):
                cont[i0 + s, p] = out[s]
        for s in range(nk):
            if bad[s]:
                failed += 1
                cont[i0 + s, :] = np.nan
    return failed


@_kernel
def _copy(src, dst, nk):  # type: ignore[no-untyped-def]
    for s in range(nk):
        dst[s] = src[s]


@_kernel
def _sparse_row(t0, t1, idx, val, x, out, nk):  # type: ignore[no-untyped-def]
    """``out[:nk] = sum_t val[t] * x[idx[t], :nk]`` over ``t0..t1`` in order, float32 (one row of a
    CSR product, as scipy sums it, for ``nk`` spectra at once)."""
    for s in range(nk):
        out[s] = _F0
    for t in range(t0, t1):
        a = val[t]
        xr = x[idx[t]]
        for s in range(nk):
            out[s] += a * xr[s]
