"""stxcli.linear: predict's first-layer product through oneDNN, checked against F.linear."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from stxcli import linear


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    monkeypatch.delenv("STX_ONEDNN", raising=False)
    linear.onednn_usable.cache_clear()
    yield
    linear.onednn_usable.cache_clear()


def _data(n=300, d=517, h=96):
    g = torch.Generator().manual_seed(3)
    return torch.rand(n, d, generator=g) * 2 - 0.5, torch.randn(h, d, generator=g) * 0.05, torch.randn(h, generator=g)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_onednn_product_is_taken_and_agrees_with_f_linear():
    x, w, b = _data()
    assert linear.onednn_usable()
    fn = linear.linear_fn(w, b)
    with torch.no_grad():
        got, ref = fn(x), F.linear(x, w, b)
    assert got.shape == (300, 96) and got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # a strided view (predict hands on slices) gives the same rows
    torch.testing.assert_close(fn(x[::2]), got[::2], rtol=1e-6, atol=1e-6)


def test_switched_off_it_is_f_linear_exactly(monkeypatch):
    monkeypatch.setenv("STX_ONEDNN", "0")
    assert not linear.onednn_usable()
    x, w, b = _data()
    with torch.no_grad():
        assert torch.equal(linear.linear_fn(w, b)(x), F.linear(x, w, b))


def test_a_kernel_that_disagrees_on_the_probe_is_not_used(monkeypatch):
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: real(x, w, b) + 1e-3)
    assert not linear.onednn_usable()


def test_other_dtypes_take_f_linear():
    x, w, b = _data()
    w64, b64, x64 = w.double(), b.double(), x.double()
    with torch.no_grad():
        assert torch.equal(linear.linear_fn(w64, b64)(x64), F.linear(x64, w64, b64))
