"""Heads: the MLP's output contract, ridge against numpy's least squares, label transforms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stxcli.errors import UsageError
from stxcli.model import (LabelSpec, combine_members, decode_labels, encode_labels, fit_label_specs,
                          make_head)

torch.set_num_threads(1)


def test_mlp_contract_and_config_round_trip():
    head = make_head("mlp", {"hidden": "32,16", "ensemble": 3, "dropout": 0.1})
    net = head.build(10, 4)
    x = torch.randn(7, 10)
    mean, logvar = net(x)
    assert mean.shape == logvar.shape == (3, 7, 4)
    m2, lv2, h = net.forward_hidden(x)
    assert h.shape == (7, net.hidden_dim) and net.hidden_dim == 3 * 16
    net.eval()
    torch.testing.assert_close(net(x)[0], net.forward_hidden(x)[0])
    assert head.config()["hidden"] == [32, 16]
    again = make_head("mlp", head.config())
    assert again.config() == head.config()
    # the log-variance stays within its soft bounds
    big = net.members[0].out.bias
    with torch.no_grad():
        big[4:] = 1e4
    assert float(net(x)[1][0].detach().max()) <= head.logvar_max + 1e-4


@pytest.mark.parametrize("ensemble", [1, 3])
def test_mlp_first_layer_then_the_rest_equals_forward(ensemble):
    net = make_head("mlp", {"hidden": "12,8", "ensemble": ensemble}).build(10, 2).eval()
    x = torch.randn(9, 10)
    w, b = net.first_layer()
    assert w.shape == (ensemble * 12, 10) and b.shape == (ensemble * 12,)
    extra = torch.randn(5, 10)  # rows appended after the first layer's (predict's domain projections)
    y = torch.nn.functional.linear(x, torch.cat([w, extra]), torch.cat([b, torch.zeros(5)]))
    mean, logvar = net.forward_from_first(y[:, :w.shape[0]])  # a strided view
    ref_mean, ref_logvar = net(x)
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(logvar, ref_logvar)


def test_mlp_first_layer_none_without_a_plain_first_linear():
    assert make_head("mlp", {"hidden": ""}).build(10, 2).first_layer() is None  # no hidden layer
    net = make_head("mlp", {"hidden": "8"}).build(10, 2)
    net.members[0].layers[0] = torch.nn.Sequential(torch.nn.Linear(10, 8))  # e.g. an unmerged adapter layer
    assert net.first_layer() is None


@pytest.mark.parametrize("bad", [{"hidden": "a,b"}, {"activation": "nope"}, {"ensemble": 0}, {"dropout": 1.5}])
def test_mlp_bad_config(bad):
    with pytest.raises(UsageError):
        make_head("mlp", bad)


def test_unknown_option_is_usage_error():
    with pytest.raises(UsageError, match="bad configuration"):
        make_head("mlp", {"widths": 3})


class _Data:
    """FitData stand-in: standardised (x, y, w) chunks."""

    def __init__(self, x, y, xv=None, yv=None, chunk=37):
        self.x, self.y, self.xv, self.yv, self.chunk = x, y, xv, yv, chunk
        self.n_labels = y.shape[1]

    def _it(self, x, y):
        for s in range(0, len(x), self.chunk):
            yield x[s:s + self.chunk], y[s:s + self.chunk], np.ones(len(x[s:s + self.chunk]), np.float32)

    def iter_train(self):
        return self._it(self.x, self.y)

    def iter_val(self):
        return self._it(self.xv, self.yv) if self.xv is not None else iter(())


def _ridge_lstsq(x, y, alpha):
    """min (1/n)|y - X b - c|^2 + alpha |b|^2 as an augmented least-squares problem."""
    n, d = x.shape
    a = np.zeros((n + d, d + 1))
    a[:n, :d], a[:n, d] = x, 1.0
    a[n:, :d] = math.sqrt(alpha * n) * np.eye(d)
    rhs = np.concatenate([y, np.zeros(d)])
    return np.linalg.lstsq(a, rhs, rcond=None)[0]


def test_ridge_equals_numpy_lstsq():
    rng = np.random.default_rng(1)
    n, d = 300, 12
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, 2)) + 0.3 + rng.normal(0, 0.5, (n, 2))).astype(np.float32)
    y[::7, 1] = np.nan  # label 1 missing for some stars: its fit uses only the rows that have it
    head = make_head("ridge", {"alphas": [0.05]})
    net = head.build(d, 2)
    info = head.fit(net, _Data(x, y))
    assert info["alpha"] == [0.05, 0.05]
    for j in range(2):
        ok = np.isfinite(y[:, j])
        ref = _ridge_lstsq(x[ok].astype(np.float64), y[ok, j].astype(np.float64), 0.05)
        np.testing.assert_allclose(net.linear.weight[j].detach().numpy(), ref[:d], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(float(net.linear.bias[j]), ref[d], rtol=1e-4, atol=1e-5)
    mean, logvar = net(torch.from_numpy(x))
    assert mean.shape == (1, n, 2) and logvar.shape == (1, n, 2)


def test_ridge_picks_alpha_on_validation():
    rng = np.random.default_rng(2)
    n, d = 60, 40  # few stars, many features: a large penalty must win on held-out data
    w = rng.normal(size=(d, 1))
    x, xv = rng.normal(size=(n, d)), rng.normal(size=(200, d))
    y = x @ w * 0.1 + rng.normal(0, 1, (n, 1))
    yv = xv @ w * 0.1 + rng.normal(0, 1, (200, 1))
    head = make_head("ridge", {"alphas": [1e-6, 10.0]})
    net = head.build(d, 1)
    info = head.fit(net, _Data(x.astype(np.float32), y.astype(np.float32), xv.astype(np.float32),
                               yv.astype(np.float32)))
    assert info["alpha"] == [10.0] and info["variance_from"] == ["validation"]
    pred = net(torch.from_numpy(xv.astype(np.float32)))[0][0, :, 0].detach().numpy()
    mse = float(np.mean((pred - yv[:, 0]) ** 2))
    assert math.isclose(float(np.exp(net.logvar.item())), mse, rel_tol=1e-3)


def test_label_transform_round_trip_and_delta_method():
    y = np.array([[4000.0, 1.0], [8000.0, 3.0], [np.nan, 5.0]])
    specs = fit_label_specs(["teff", "logg"], y, units={"teff": "K"})
    assert [s.transform for s in specs] == ["log10", "identity"]
    assert specs[0].lo == 4000 and specs[0].hi == 8000 and specs[1].unit == "dex"
    s0 = specs[0]
    assert math.isclose(s0.mean, (math.log10(4000) + math.log10(8000)) / 2)
    z = encode_labels(specs, y)
    assert np.isnan(z[2, 0])
    back, err = decode_labels(specs, z[:2], np.zeros((2, 2)))
    np.testing.assert_allclose(back, y[:2], rtol=1e-6)
    assert (err == 0).all()
    # delta method, by hand: Teff = 10**(m * std + mean); sigma_Teff = ln(10) Teff std sqrt(var)
    mean_s, var_s = np.array([[0.5, 0.0]]), np.array([[0.04, 0.25]])
    val, err = decode_labels(specs, mean_s, var_s)
    teff = 10 ** (0.5 * s0.std + s0.mean)
    assert math.isclose(val[0, 0], teff, rel_tol=1e-12)
    assert math.isclose(err[0, 0], math.log(10) * teff * s0.std * 0.2, rel_tol=1e-12)
    assert math.isclose(err[0, 1], specs[1].std * 0.5, rel_tol=1e-12)


def test_log10_of_non_positive_label_is_an_error():
    with pytest.raises(UsageError, match="identity"):
        fit_label_specs(["teff"], np.array([[5000.0], [-1.0]]))


def test_label_spec_dict_round_trip():
    s = LabelSpec("feh", "dex", "identity", -0.3, 0.4, -2.5, 0.5)
    assert LabelSpec.from_dict(s.to_dict()) == s


def test_ensemble_combination_by_hand():
    mean = torch.tensor([[[1.0]], [[3.0]]])  # K=2, B=1, L=1
    logvar = torch.log(torch.tensor([[[0.5]], [[1.5]]]))
    m, v = combine_members(mean, logvar)
    assert float(m) == 2.0
    assert math.isclose(float(v), (0.5 + 1.5) / 2 + 1.0, rel_tol=1e-6)  # aleatoric + spread (ddof 0)


def test_ridge_without_penalty_on_collinear_features():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(80, 5)).astype(np.float32)
    x = np.concatenate([x, x[:, :2]], 1)  # two duplicated columns: the Gram matrix is singular
    y = (x[:, :5] @ rng.normal(size=(5, 1)) + 1.0).astype(np.float32)
    head = make_head("ridge", {"alphas": [0.0]})
    net = head.build(7, 1)
    head.fit(net, _Data(x, y))
    pred = net(torch.from_numpy(x))[0][0, :, 0].detach().numpy()
    np.testing.assert_allclose(pred, y[:, 0], atol=1e-3)  # exact fit, as least squares gives


def test_ridge_svd_path_equals_normal_equations():
    """Few stars (n < D) take the SVD path; it must equal the D x D Cholesky solution, with
    weights, missing labels and alpha = 0 (minimum norm) included."""
    from stx_builtin.heads.ridge import normal_equations, solve_ridge

    rng = np.random.default_rng(5)
    n, d = 40, 60
    x = rng.normal(size=(n, d)).astype(np.float32)
    y = (x @ rng.normal(size=(d, 2)) + rng.normal(0, 0.1, (n, 2))).astype(np.float64)
    y[::7, 1] = np.nan
    w = rng.uniform(0.5, 2.0, n).astype(np.float32)
    chunks = [(x[:25], y[:25], w[:25]), (x[25:], y[25:], w[25:])]
    stats = normal_equations(iter(chunks), 2)
    assert stats["rows"] is not None
    alphas = [0.0, 0.01, 1.0]
    svd = solve_ridge(stats, alphas)
    chol = solve_ridge({**stats, "rows": None}, [0.01, 1.0])
    np.testing.assert_allclose(svd[1:], chol, rtol=1e-4, atol=1e-4)  # the Gram sums are float32 products
    # alpha = 0 with n < D: the minimum-norm interpolant, as numpy's lstsq on centred data
    # (the Gram path's float32 sums are off by O(1) here; the SVD path is exact)
    xd, wd = x.astype(np.float64), w.astype(np.float64)
    sw = np.sqrt(wd)
    mx = (wd[:, None] * xd).sum(0) / wd.sum()
    my = (wd * y[:, 0]).sum() / wd.sum()
    ref = np.linalg.lstsq(sw[:, None] * (xd - mx), sw * (y[:, 0] - my), rcond=None)[0]
    np.testing.assert_allclose(svd[0, 0, :d], ref, rtol=1e-9, atol=1e-10)
    # many stars: no rows kept, the Gram path is used
    big = normal_equations(iter([(np.tile(x, (2, 1)), np.tile(y, (2, 1)), np.tile(w, 2))]), 2)
    assert big["rows"] is None
