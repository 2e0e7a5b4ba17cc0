"""The ``ridge`` head: closed-form ridge regression, the baseline next to every result.

Per label ``l`` it minimises, over the training stars that have that label (store weights ``w``),

    sum_i w_i (y_il - x_i . beta_l - b_l)^2 / sum_i w_i  +  alpha_l |beta_l|^2

(intercept not penalised) on standardised features and labels, by solving the normal equations
accumulated chunk by chunk (one pass over the store, float64 accumulators). ``alpha_l`` is
chosen per label from ``alphas`` by validation mean squared error; the predicted variance per
label is the validation (else training) mean squared residual at that alpha. Saved in the
same model-directory format as the MLP (a linear layer plus a log-variance per label).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from stxcli.errors import StxError, UsageError
from stxcli.hookspecs import hookimpl

DEFAULT_ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class RidgeHead:
    name = "ridge"
    version = "1.0"
    description = "closed-form ridge regression (alpha chosen per label on validation)"
    closed_form = True

    def __init__(self, alphas: Any = DEFAULT_ALPHAS) -> None:
        if isinstance(alphas, (int, float)):
            alphas = [alphas]
        elif isinstance(alphas, str):
            alphas = [a for a in alphas.replace(" ", "").split(",") if a]
        try:
            self.alphas = [float(a) for a in alphas]
        except (TypeError, ValueError):
            raise UsageError(f"alphas: expected numbers, got {alphas!r}") from None
        if not self.alphas or any(a < 0 for a in self.alphas):
            raise UsageError(f"alphas must be non-negative numbers, got {alphas!r}")

    def config(self) -> dict[str, Any]:
        return {"alphas": list(self.alphas)}

    def build(self, in_dim: int, n_labels: int) -> Any:
        from ._nets import RidgeNet

        return RidgeNet(in_dim, n_labels)

    def fit(self, module: Any, data: Any) -> dict[str, Any]:
        import torch

        stats = normal_equations(data.iter_train(), data.n_labels)
        coefs = solve_ridge(stats, self.alphas)  # (n_alpha, L, D + 1)
        val = residual_mse(data.iter_val(), coefs, data.n_labels)
        train = residual_mse(data.iter_train(), coefs, data.n_labels)
        have_val = np.isfinite(val).all(axis=0)
        score = np.where(have_val[None, :], val, train)
        best = np.argmin(score, axis=0)  # per label
        L = data.n_labels
        w = np.stack([coefs[best[l], l] for l in range(L)])  # (L, D + 1)
        mse = np.array([score[best[l], l] for l in range(L)])
        with torch.no_grad():
            module.linear.weight.copy_(torch.from_numpy(w[:, :-1].astype(np.float32)))
            module.linear.bias.copy_(torch.from_numpy(w[:, -1].astype(np.float32)))
            module.logvar.copy_(torch.from_numpy(np.log(np.maximum(mse, 1e-12)).astype(np.float32)))
        return {"alpha": [self.alphas[b] for b in best], "mse_standardised": mse.tolist(),
                "variance_from": ["validation" if h else "training" for h in have_val]}


def normal_equations(chunks: Any, n_labels: int) -> dict[str, Any]:
    """Accumulate ``[X 1]^T W [X 1]`` and ``[X 1]^T W y`` per label over (x, y, w) chunks.

    Rows with every label share one Gram matrix; a label's extra matrix is kept only when some
    rows miss other labels (so memory stays one D x D matrix in the common case)."""
    g_all = None
    g_extra: dict[int, np.ndarray] = {}
    b = None
    sw = np.zeros(n_labels)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = []
    n_rows = 0
    for x, y, w in chunks:
        x = np.asarray(x, np.float32)
        n, d = x.shape
        n_rows += n
        w = np.asarray(w, np.float32)
        if rows is not None:  # kept while fewer rows than features: the SVD path is then cheaper
            rows = rows + [(x.copy(), np.asarray(y, np.float64).copy(), w.copy())] if n_rows < d else None
        xa = np.empty((n, d + 1), np.float32)
        xa[:, :d], xa[:, d] = x, 1.0
        m = np.isfinite(y)
        if g_all is None:
            g_all = np.zeros((d + 1, d + 1))
            b = np.zeros((n_labels, d + 1))
        full = m.all(1)
        if full.any():
            xf = xa[full] * np.sqrt(w[full])[:, None]
            g_all += (xf.T @ xf).astype(np.float64)
        for l in range(n_labels):
            part = m[:, l] & ~full
            if part.any():
                xp = xa[part] * np.sqrt(w[part])[:, None]
                g_extra[l] = g_extra.get(l, 0.0) + (xp.T @ xp).astype(np.float64)
            sel = m[:, l]
            b[l] += (xa[sel].T @ (w[sel] * y[sel, l]).astype(np.float32)).astype(np.float64)
            sw[l] += float(w[sel].sum())
    if g_all is None:
        raise StxError("ridge: no training rows")
    if (sw <= 0).any():
        raise StxError("ridge: a label has no training value")
    return {"g_all": g_all, "g_extra": g_extra, "b": b, "sw": sw, "rows": rows}


def solve_ridge(stats: dict[str, Any], alphas: list[float]) -> np.ndarray:
    """Coefficients ``(n_alpha, L, D + 1)`` (the last column is the intercept).

    The intercept is removed by centring (weighted means from the accumulated sums); labels
    known on the same rows share one centred Gram matrix, so each alpha costs one Cholesky
    factorisation (torch, float64) per group of labels."""
    if stats.get("rows"):
        return _solve_ridge_svd(stats["rows"], stats["b"].shape[0], alphas)
    import torch

    g_all, g_extra, b = stats["g_all"], stats["g_extra"], stats["b"]
    L, d1 = b.shape
    d = d1 - 1
    out = np.zeros((len(alphas), L, d1))
    groups: dict[int, list[int]] = {}
    for l in range(L):  # labels known on the same rows share a Gram matrix and a weight sum
        groups.setdefault(-1 if l not in g_extra else l, []).append(l)
    for key, labels in groups.items():
        g = g_all if key == -1 else g_all + g_extra[key]
        wsum = g[d, d]
        mx = g[:d, d] / wsum
        gc = torch.from_numpy(g[:d, :d] - wsum * np.outer(mx, mx))
        my = b[labels, d] / wsum  # (n,)
        rhs = torch.from_numpy((b[labels, :d] - wsum * my[:, None] * mx[None, :]).T.copy())  # (d, n)
        eye = torch.eye(d, dtype=torch.float64)
        for ia, alpha in enumerate(alphas):
            a = gc + (alpha * wsum) * eye
            chol, info = torch.linalg.cholesky_ex(a)
            if int(info) == 0:
                beta = torch.cholesky_solve(rhs, chol).numpy()
            else:  # singular (alpha = 0 with collinear features): the minimum-norm solution
                beta = torch.linalg.lstsq(a, rhs, driver="gelsd").solution.numpy()
            for j, l in enumerate(labels):
                out[ia, l, :d] = beta[:, j]
                out[ia, l, d] = my[j] - mx @ beta[:, j]
    return out


def _solve_ridge_svd(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_labels: int,
                     alphas: list[float]) -> np.ndarray:
    """The same solution as the centred normal equations, from a thin SVD of the (weighted,
    centred) training rows: O(n^2 d) once per label instead of a D x D Cholesky per alpha, for
    the common few-stars case (n < D). Zero singular values get zero weight (the minimum-norm
    solution, as ``lstsq`` gives for alpha = 0)."""
    import torch

    x = np.concatenate([r[0] for r in rows]).astype(np.float64)
    y = np.concatenate([r[1] for r in rows])
    w = np.concatenate([r[2] for r in rows]).astype(np.float64)
    d = x.shape[1]
    out = np.zeros((len(alphas), n_labels, d + 1))
    for l in range(n_labels):
        ok = np.isfinite(y[:, l])
        wl = w[ok]
        wsum = wl.sum()
        mx = (wl[:, None] * x[ok]).sum(0) / wsum
        my = float((wl * y[ok, l]).sum() / wsum)
        sq = np.sqrt(wl)
        xc = sq[:, None] * (x[ok] - mx)
        yc = sq * (y[ok, l] - my)
        # torch's LAPACK: several times faster than numpy's on this wide matrix here
        u, sv, vt = (t.numpy() for t in torch.linalg.svd(torch.from_numpy(xc), full_matrices=False))
        uty = u.T @ yc
        keep = sv > sv.max(initial=0.0) * max(xc.shape) * np.finfo(np.float64).eps
        for ia, alpha in enumerate(alphas):
            f = np.zeros_like(sv)
            f[keep] = sv[keep] / (sv[keep] ** 2 + alpha * wsum)
            beta = vt.T @ (f * uty)
            out[ia, l, :d] = beta
            out[ia, l, d] = my - mx @ beta
    return out


def residual_mse(chunks: Any, coefs: np.ndarray, n_labels: int) -> np.ndarray:
    """Weighted mean squared residual ``(n_alpha, L)``; NaN where a label has no row."""
    sse = np.zeros(coefs.shape[:2])
    sw = np.zeros(n_labels)
    w_lin = coefs[:, :, :-1].astype(np.float32)
    icpt = coefs[:, :, -1]
    for x, y, w in chunks:
        pred = np.einsum("nd,ald->anl", np.asarray(x, np.float32), w_lin) + icpt[:, None, :]
        m = np.isfinite(y)
        r = np.where(m[None], pred - np.where(m, y, 0)[None], 0.0)
        sse += (np.asarray(w)[None, :, None] * r * r).sum(1)
        sw += (np.asarray(w)[:, None] * m).sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sw > 0, sse / np.maximum(sw, 1e-300), np.nan)


@hookimpl
def register_heads(register: Any) -> None:
    register(RidgeHead)
