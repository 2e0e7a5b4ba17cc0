"""The Cannon's torch module and its training through thecannon (imported lazily by the plugin).

Label space: the head sees stx's standardised labels ``y``; thecannon scales them once more,
``l = (y - pivots) / scales`` (its percentile pivots and scales), and the spectral model is
quadratic in ``l``. Feature space: the module undoes stx's feature standardisation
(``f = z / flux_scale + flux_mean``) so the model, its scatters and thecannon's fixed scatter
grid and ivar floor live in flux units, as thecannon expects.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch
from torch import nn

from stxcli.errors import StxError

#: thecannon's test step: a pixel without data gets flux 1 and sigma 100 (``infer_labels``).
MISSING_SIGMA2 = 1.0e4
#: thecannon's training floor on ivar ("make sure no ivar goes below ... 0.01", ``_train_model``).
IVAR_FLOOR = 0.01


def thecannon_train_model() -> Any:
    """``TheCannon.train_model``, imported without letting thecannon's import-time
    ``rc('text', usetex=True)`` leak into the process's matplotlib settings."""
    import matplotlib

    try:
        with matplotlib.rc_context():
            from TheCannon import train_model
    except ImportError as exc:
        raise StxError(f"the cannon head needs thecannon 0.7.3 (pip install thecannon==0.7.3): {exc}") from exc
    return train_model


def thecannon_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("thecannon")
    except PackageNotFoundError:
        return "?"


def n_terms(n_labels: int) -> int:
    """Length of the Cannon's label vector ``[1, l, triu(l l^T)]``."""
    return 1 + n_labels + n_labels * (n_labels + 1) // 2


class CannonNet(nn.Module):
    """A trained Cannon: ``forward(z) -> (mean, logvar)``, each ``(1, B, L)``, standardised
    label space. ``theta`` (D, P) and ``s2`` (D,) are the fitted model (parameters that do not
    train: gradient fine-tuning is not what the Cannon does); the rest are fixed buffers."""

    def __init__(self, in_dim: int, n_labels: int, steps: int = 30) -> None:
        super().__init__()
        d, L, p = in_dim, n_labels, n_terms(n_labels)
        self.n_labels, self.steps = L, int(steps)
        f64 = torch.float64
        self.theta = nn.Parameter(torch.zeros(d, p, dtype=f64), requires_grad=False)
        self.s2 = nn.Parameter(torch.zeros(d, dtype=f64), requires_grad=False)
        self.register_buffer("noise_var", torch.full((d,), MISSING_SIGMA2, dtype=f64))
        self.register_buffer("flux_mean", torch.zeros(d, dtype=f64))
        self.register_buffer("flux_scale", torch.ones(d, dtype=f64))
        self.register_buffer("pivots", torch.zeros(L, dtype=f64))
        self.register_buffer("scales", torch.ones(L, dtype=f64))
        self.register_buffer("err_scale", torch.ones(L, dtype=f64))
        iu = torch.triu_indices(L, L)
        self.register_buffer("_iu_p", iu[0].clone(), persistent=False)
        self.register_buffer("_iu_q", iu[1].clone(), persistent=False)

    # ------------------------------------------------------------------------- label vectors

    def label_vector(self, l: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``v(l) = [l, l_p l_q for p <= q]`` (B, Q) without the leading 1, and ``dv/dl``
        (B, Q, L); the order of thecannon's ``_get_lvec`` (``np.triu_indices``)."""
        p, q = self._iu_p, self._iu_q
        L = self.n_labels
        v = torch.cat([l, l[:, p] * l[:, q]], dim=1)
        eye = torch.eye(L, dtype=l.dtype, device=l.device)
        jq = eye[p][None] * l[:, q, None] + eye[q][None] * l[:, p, None]  # (B, T, L)
        j = torch.cat([eye.expand(l.shape[0], L, L), jq], dim=1)
        return v, j

    # ------------------------------------------------------------------------------ inference

    def flux(self, z: torch.Tensor) -> torch.Tensor:
        return z.to(torch.float64) / self.flux_scale + self.flux_mean

    def infer(self, f: torch.Tensor, ivar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The test step on flux-unit spectra ``f`` (B, D): scaled labels ``l`` (B, L) and their
        covariance (B, L, L). ``ivar`` (B, D), flux units, or None for ``noise_var``."""
        theta, s2 = self.theta, self.s2
        t = theta[:, 1:]  # (D, Q)
        if ivar is None:
            w = 1.0 / (self.noise_var + s2)  # (D,), the same for every star
            r0 = f - theta[:, 0]
            a = (r0 * w) @ t
            m = (t.T * w) @ t  # (Q, Q)
            m = m.expand(f.shape[0], *m.shape)
            c = (r0 * r0 * w).sum(1)
        else:
            ivar = ivar.to(torch.float64)
            bad = ivar <= 0
            f = torch.where(bad, torch.ones_like(f), f)
            sig2 = torch.where(bad, torch.full_like(ivar, MISSING_SIGMA2), 1.0 / ivar.clamp_min(1e-300))
            w = 1.0 / (sig2 + s2)  # (B, D)
            r0 = f - theta[:, 0]
            a = (r0 * w) @ t
            qq = t.shape[1]
            m = (w @ (t[:, :, None] * t[:, None, :]).reshape(t.shape[0], qq * qq)).reshape(-1, qq, qq)
            c = (r0 * r0 * w).sum(1)

        def chi2(v: torch.Tensor) -> torch.Tensor:
            return c - 2.0 * (v * a).sum(1) + (v * (m @ v[:, :, None])[:, :, 0]).sum(1)

        B, L = f.shape[0], self.n_labels
        eye = torch.eye(L, dtype=f.dtype, device=f.device)
        l = torch.zeros(B, L, dtype=f.dtype, device=f.device)  # thecannon's zero guess: the pivots
        v, j = self.label_vector(l)
        cur = chi2(v)
        lam = torch.full((B,), 1e-3, dtype=f.dtype, device=f.device)
        for _ in range(self.steps):
            mj = m @ j  # (B, Q, L)
            h = j.transpose(1, 2) @ mj  # J^T C^-1 J, (B, L, L)
            g = (j.transpose(1, 2) @ ((m @ v[:, :, None])[:, :, 0] - a)[:, :, None])[:, :, 0]
            damp = h + lam[:, None, None] * torch.diag_embed(torch.diagonal(h, dim1=1, dim2=2)) + 1e-12 * eye
            step = torch.linalg.solve(damp, -g)
            l_new = l + step
            v_new, j_new = self.label_vector(l_new)
            new = chi2(v_new)
            ok = torch.isfinite(new) & (new <= cur)
            l = torch.where(ok[:, None], l_new, l)
            v = torch.where(ok[:, None], v_new, v)
            j = torch.where(ok[:, None, None], j_new, j)
            cur = torch.where(ok, new, cur)
            lam = torch.where(ok, (lam * 0.1).clamp_min(1e-10), (lam * 10.0).clamp_max(1e10))
        h = j.transpose(1, 2) @ (m @ j)
        cov = torch.linalg.inv(h + 1e-12 * eye)
        return l, cov

    def forward(self, z: torch.Tensor, ivar: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Standardised features ``z`` (B, D) (``ivar`` optional, in the units of ``z``) ->
        mean and log-variance (1, B, L) in standardised label space."""
        if torch.is_grad_enabled() and (self.theta.requires_grad or self.s2.requires_grad):
            raise StxError("cannon: the Cannon is fitted in closed form and its coefficients do not train by "
                           "gradient (adapter full); train a cannon on the target stars instead "
                           "(stx pretrain TARGET.h5 --head cannon)")
        f = self.flux(z)
        iv = None if ivar is None else ivar.to(torch.float64) * self.flux_scale**2
        l, cov = self.infer(f, iv)
        mean = self.pivots + self.scales * l
        var = torch.diagonal(cov, dim1=1, dim2=2) * (self.scales * self.err_scale) ** 2
        logvar = torch.log(var.clamp_min(1e-300))
        return mean.to(z.dtype)[None], logvar.to(z.dtype)[None]


# ----------------------------------------------------------------------------------- training


def train_pixels(flux: np.ndarray, ivar: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """thecannon's training on flux (N, D), ivar (N, D), labels (N, L): its pivots and scales,
    label vectors and, pixel by pixel, its regression with the scatter search (what
    ``CannonModel.train`` runs, without copying the label vectors once per pixel)."""
    tm = thecannon_train_model()
    flux = np.asarray(flux, np.float64)
    ivar = np.array(ivar, np.float64)  # a copy: the floor is applied in place, as thecannon does
    y = np.asarray(y, np.float64)
    ivar[ivar < IVAR_FLOOR] = IVAR_FLOOR
    pivots, scales = tm.get_pivots_and_scales(y)
    if not (np.all(np.isfinite(scales)) and np.all(scales > 0)):
        raise StxError("cannon: a label has no spread among the training stars (its 2.5-97.5 percentile "
                       "range is zero)")
    lvec = tm._get_lvec(y, pivots, scales, derivs=False)
    d = flux.shape[1]
    theta = np.empty((d, lvec.shape[1]))
    scatter = np.empty(d)
    for jpix in range(d):
        try:
            coeff, _, _, _, s = tm._do_one_regression(jpix, flux[:, jpix], ivar[:, jpix], lvec)
        except Exception as exc:  # thecannon prints and then fails on a singular pixel
            raise StxError(f"cannon: thecannon's regression failed at feature {jpix} "
                           f"({type(exc).__name__}: {exc}); too few or degenerate training stars?") from exc
        theta[jpix], scatter[jpix] = coeff, s
    return {"theta": theta, "scatter": np.real(scatter).astype(np.float64), "pivots": np.asarray(pivots),
            "scales": np.asarray(scales)}


def set_model(module: CannonNet, trained: dict[str, np.ndarray], *, flux_mean: np.ndarray,
              flux_scale: np.ndarray, noise_var: np.ndarray) -> None:
    with torch.no_grad():
        module.theta.copy_(torch.from_numpy(trained["theta"]))
        module.s2.copy_(torch.from_numpy(trained["scatter"] ** 2))
        module.pivots.copy_(torch.from_numpy(trained["pivots"]))
        module.scales.copy_(torch.from_numpy(trained["scales"]))
        module.flux_mean.copy_(torch.from_numpy(np.asarray(flux_mean, np.float64)))
        module.flux_scale.copy_(torch.from_numpy(np.asarray(flux_scale, np.float64)))
        module.noise_var.copy_(torch.from_numpy(np.asarray(noise_var, np.float64)))
        module.err_scale.fill_(1.0)


def typical_noise_var(ivar: np.ndarray) -> np.ndarray:
    """Per pixel, the median noise variance ``1/ivar`` of the stars that have data there
    (thecannon's missing-pixel variance where none has)."""
    iv = np.asarray(ivar, np.float64)
    with np.errstate(divide="ignore"):
        var = np.where(iv > 0, 1.0 / np.where(iv > 0, iv, 1.0), np.nan)
    have = np.isfinite(var).any(0)
    out = np.full(iv.shape[1], MISSING_SIGMA2)
    if have.any():
        out[have] = np.nanmedian(var[:, have], axis=0)
    return out


def _training_rows(data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The training stars' raw features, ivar, standardised labels and weights, and the
    feature standardisation ``(mean, scale)`` the core applied.

    The head protocol's ``FitData.iter_train()`` yields standardised features without ivar; the
    Cannon needs each star's ivar (and flux units), so the same rows are read again through the
    core's ``RowSet`` with ivar and without standardisation (contiguous chunks, as every core read).
    """
    from stxcli.train import RowSet

    rows = getattr(getattr(data, "train", None), "rows", None)
    if rows is None or not hasattr(rows, "masks") or not hasattr(rows, "norm"):
        raise StxError("cannon: this stx version's fit data give no access to the training rows' ivar "
                       "(stxcli.train.RowSet); stx-cannon needs an update")
    d = rows.dim
    mean, scale = rows.norm if rows.norm is not None else (np.zeros(d, np.float32), np.ones(d, np.float32))
    rs = RowSet(rows.sources, rows.masks, rows.y_std, rows.chunk_rows, want_ivar=True)
    xs, ivs, ys, ws = [], [], [], []
    for x, iv, y, w in rs.iter_chunks(sparse_ok=True):
        xs.append(x)
        ivs.append(iv)
        ys.append(y)
        ws.append(w)
    if not xs:
        raise StxError("cannon: no training rows")
    return (np.concatenate(xs), np.concatenate(ivs), np.concatenate(ys), np.concatenate(ws),
            np.asarray(mean, np.float64), np.asarray(scale, np.float64))


def robust_sigma(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def fit_head(module: CannonNet, data: Any, *, calibrate: bool, max_stars: int) -> dict[str, Any]:
    """The ``cannon`` head's closed-form fit (see the package docstring)."""
    t0 = time.perf_counter()
    x, iv, y, w, fmean, fscale = _training_rows(data)
    full = np.isfinite(y).all(1)
    n_drop = int((~full).sum())
    x, iv, y, w = x[full], iv[full], y[full], w[full]
    n, L = y.shape
    if n > max_stars:
        raise StxError(f"cannon: {n} training stars exceed max_stars={max_stars} (the Cannon holds them in "
                       f"memory); use --n-train or --set max_stars=N")
    need = 2 * n_terms(L)
    if n < need:
        raise StxError(f"cannon: {n} training star(s) have every label; the quadratic model in {L} labels "
                       f"needs at least {need}")
    wrel = w / w.mean()
    iv_eff = iv * wrel[:, None]  # store weights act as ivar multipliers
    trained = train_pixels(x, iv_eff, y)
    set_model(module, trained, flux_mean=fmean, flux_scale=fscale,
              noise_var=typical_noise_var(iv))
    info: dict[str, Any] = {
        "thecannon_version": thecannon_version(), "n_stars": n, "n_dropped_missing_label": n_drop,
        "n_features": int(x.shape[1]), "median_scatter": float(np.median(trained["scatter"])),
        "pivots": trained["pivots"].tolist(), "scales": trained["scales"].tolist(),
        "noise": "training: each star's ivar; prediction: per-pixel median training noise variance",
    }
    if calibrate:
        info["err_scale"] = calibrate_errors(module, data)
    info["train_time_s"] = round(time.perf_counter() - t0, 3)
    return info


def calibrate_errors(module: CannonNet, data: Any) -> list[float | None]:
    """Per label, the robust scatter of ``(y - mean) / sigma`` over the validation stars; the
    errors are multiplied by it (None, factor 1, where fewer than 5 stars have the label)."""
    zs = []
    with torch.no_grad():
        for x, y, _ in data.iter_val():
            mean, logvar = module(torch.from_numpy(np.ascontiguousarray(x, np.float32)))
            zs.append((y - mean[0].numpy()) / np.exp(0.5 * logvar[0].numpy()))
    if not zs:
        return [None] * module.n_labels
    z = np.concatenate(zs)
    out: list[float | None] = []
    for k in range(module.n_labels):
        col = z[:, k][np.isfinite(z[:, k])]
        out.append(robust_sigma(col) if col.size >= 5 else None)
    with torch.no_grad():
        module.err_scale.copy_(torch.tensor([1.0 if s is None or s <= 0 else s for s in out], dtype=torch.float64))
    return out
