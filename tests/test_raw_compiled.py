"""The raw featurizer's compiled kernels (``_rawjit``) against its numpy path, the reference.

Both paths run the same steps in the same float32 order; they must agree to float32 rounding on
real survey files and on batches that reach every branch of the kernels (bad pixels few and
many, NaN input, dead fibres, no resolution matching, no velocity shift, linear and log grids).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stx_builtin.featurizers import _rawjit as J
from stx_builtin.featurizers import raw as R
from stx_builtin.featurizers.raw import RawFeaturizer

from test_raw_featurizer import DATA, _read_all, linear_grid, make_batch


def _count_kernel_calls(monkeypatch) -> list[int]:
    """A list that grows by one per call of the first compiled kernel (``observed_arm``)."""
    calls: list[int] = []
    real = J.observed_arm

    def spy(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(J, "observed_arm", spy)
    return calls


def _both(featurizer: RawFeaturizer, batch, monkeypatch):
    """(numpy, compiled) outputs of one batch; fails unless the compiled path really ran."""
    monkeypatch.setenv("STX_KERNELS", "numpy")
    ref = featurizer.transform(batch)
    monkeypatch.setenv("STX_KERNELS", "compiled")
    calls = _count_kernel_calls(monkeypatch)
    out = featurizer.transform(batch)
    assert calls, "the compiled path did not run"
    return ref, out


def _assert_same(ref, out) -> None:
    np.testing.assert_array_equal(ref.ivar > 0, out.ivar > 0)
    np.testing.assert_allclose(out.features, ref.features, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(out.ivar, ref.ivar, rtol=2e-5, atol=0)
    for k in ("masked_frac", "flags"):
        np.testing.assert_array_equal(out.quality[k], ref.quality[k])
    for k in ("snr", "rv_kms", "rv_ccf"):
        np.testing.assert_allclose(out.quality[k], ref.quality[k], rtol=1e-5, atol=1e-6)
    assert out.notes == ref.notes


REAL = {
    "desi-sv3": ("desi-edr", "coadd-sv3-dark-26065.fits"),
    "desi-sv1": ("desi-edr", "coadd-5-169-thru20210419.fits"),
    "lamost-dr1": ("lamost-dr1/spectra", "*.fits"),
    "lamost-later": ("lamost-later", "spec-*.fits*"),
    "lamost-dr10": ("lamost-dr10/spectra", "*.fits.gz"),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_files_equal_the_numpy_path(name, monkeypatch):
    folder, pattern = REAL[name]
    paths = sorted((DATA / folder).glob(pattern))[:3]
    assert paths, f"no {pattern} in {DATA / folder}"
    for path in paths:
        ref, out = _both(RawFeaturizer(), _read_all(path), monkeypatch)
        _assert_same(ref, out)
        assert (out.ivar > 0).any()


def _noisy(n: int, wave: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lines = 1 - 0.4 * np.exp(-0.5 * ((wave[None, :] - rng.uniform(4000, 8600, (40, 1))) / 2.0) ** 2).sum(0)
    flux = (rng.uniform(0.5, 5, (n, 1)) * lines * (1 + 0.02 * rng.standard_normal((n, wave.size))))
    ivar = rng.uniform(500, 5000, (n, 1)) * np.ones(wave.size)
    return flux.astype(np.float32), ivar.astype(np.float32)


@pytest.mark.parametrize("case", ["allgood", "few-bad", "many-bad", "dead-nan", "tiny-ivar", "no-degrade",
                                  "at-rest", "known-rv", "log-grid", "two-arms"])
def test_every_kernel_branch_equals_the_numpy_path(case, monkeypatch):
    n = 70  # more than one block of the kernels, and a partial one
    wave, _ = linear_grid(3700, 9200, 0.8)
    if case == "log-grid":
        wave = 10 ** np.arange(np.log10(3700), np.log10(9200), 6.9e-5)
    flux, ivar = _noisy(n, wave, seed=len(case))
    rng = np.random.default_rng(1)
    mask = np.zeros(flux.shape, bool)
    rv = np.full(n, np.nan)
    kw: dict = {}
    if case == "few-bad":  # < 5 % of the pixels: re-normalised next to them only
        mask[rng.random(flux.shape) < 0.01] = True
        ivar[:, :30] = 0
    elif case == "many-bad":  # > 5 %: re-normalised everywhere
        mask[rng.random(flux.shape) < 0.2] = True
    elif case == "dead-nan":
        ivar[[3, 40]] = 0
        flux[7, 100:120] = np.nan
        ivar[9, 2000] = np.inf
    elif case == "tiny-ivar":  # variances that overflow float32: no information, bad pixels in both paths
        ivar[5, 500] = ivar[6, 2000:2003] = ivar[11, 1000] = 1e-44
    elif case == "no-degrade":
        kw["target_r"] = None
    elif case == "at-rest":
        kw["rv"] = "none"
    elif case == "known-rv":
        rv = rng.uniform(-300, 300, n)
        rv[::3] = np.nan
    f = RawFeaturizer(**kw)
    r = None if kw.get("target_r", 1800) is None else 4000.0
    if case == "two-arms":
        from stxcli.spectra import Arm

        batch = make_batch(wave, flux, ivar, rv=rv, r=r, mask=mask)
        w2, _ = linear_grid(5600, 9800, 0.9)
        f2, i2 = _noisy(n, w2, seed=99)
        batch.arms.append(Arm("b", w2, f2, i2, None, resolving_power=3000.0))
    else:
        batch = make_batch(wave, flux, ivar, rv=rv, r=r, mask=mask)
    ref, out = _both(f, batch, monkeypatch)
    _assert_same(ref, out)
    live = np.ones(n, bool)
    if case == "dead-nan":
        live[[3, 40]] = False
        assert (out.ivar[~live] == 0).all()
    assert (out.ivar[live] > 0).sum(axis=1).min() > 1000


@pytest.mark.parametrize("case", ["allgood", "few-bad", "many-bad", "tiny-ivar"])
def test_the_band_convolution_equals_the_stored_entries(case, monkeypatch):
    """observed_arm convolves with K as a band (zeros between its stored entries); without the
    band it sums K's stored entries. Both must give the same bits, in every re-normalisation
    mode; a spectrum whose scaled variance overflows (ivar ~ 1e-44) must not let the band's
    zeros turn its infinity into NaN next to it."""
    import inspect

    wave, _ = linear_grid(3700, 9200, 0.8)
    flux, ivar = _noisy(40, wave, seed=7)
    rng = np.random.default_rng(2)
    mask = np.zeros(flux.shape, bool)
    if case == "few-bad":
        mask[rng.random(flux.shape) < 0.01] = True
    elif case == "many-bad":
        mask[rng.random(flux.shape) < 0.2] = True
    elif case == "tiny-ivar":
        ivar[5, 500] = ivar[6, 2000:2003] = 1e-44
    calls = []
    real = J.observed_arm
    monkeypatch.setattr(J, "observed_arm", lambda *a: (calls.append([np.copy(x) if isinstance(x, np.ndarray)
                                                                      else x for x in a]), real(*a))[1])
    monkeypatch.setenv("STX_KERNELS", "compiled")
    RawFeaturizer().transform(make_batch(wave, flux, ivar, r=4000.0, mask=mask))
    names = list(inspect.signature(real.py_func).parameters)
    (args,) = calls
    assert args[names.index("band")].shape[0] > 0  # the band was used
    assert args[names.index("deg_mode")] == J.DEG_ALLGOOD  # matching on: each row picks its mode
    outs = [names.index(k) for k in ("a_out", "b_out", "v_out", "has_good", "s_fi", "s_i")]
    if case == "tiny-ivar":  # the featurizer drops these pixels first; the kernel's own guard is checked here
        good = args[names.index("good")]
        assert not good[5, 500] and not good[6, 2000:2003].any()
        good[5, 500] = good[6, 2000:2003] = True
    got = []
    for band, h in ((args[names.index("band")], args[names.index("h")]), (np.zeros((0, wave.size), np.float32), 0)):
        a = [np.copy(x) if isinstance(x, np.ndarray) else x for x in args]
        a[names.index("band")], a[names.index("h")] = band, h
        real(*a)
        got.append([a[i] for i in outs])
    for x, y in zip(*got):
        assert x.tobytes() == y.tobytes()
    if case == "tiny-ivar":
        assert np.isinf(got[0][2][5]).any() and not np.isnan(got[0][2]).any()


def test_the_continuum_kernel_equals_the_batched_fit():
    """70 spectra (two blocks of 32 and a partial one), with masked stretches and one empty."""
    from stx_builtin.featurizers import _rawlib as L

    f = RawFeaturizer()
    model = f._model()
    m, n = f.dim, 70
    rng = np.random.default_rng(5)
    x = np.linspace(0, 1, m)
    cont = (1 + 0.5 * x[None, :] - 0.3 * x[None, :] ** 2) * rng.uniform(0.5, 2, (n, 1))
    flux = (cont * (1 - 0.4 * (rng.random((n, m)) < 0.05)) * (1 + 0.01 * rng.standard_normal((n, m))))
    ivar = np.full((n, m), 100.0, np.float32)
    ivar[3, 500:900] = 0
    ivar[10] = 0
    ivar[rng.random((n, m)) < 0.02] = 0
    flux = np.where(ivar > 0, flux, 0).astype(np.float32)
    ref = L.fit_continuum(model, np.ascontiguousarray(flux.T), np.ascontiguousarray(ivar.T) > 0, f.cont_iter,
                          f.cont_clip_lo, f.cont_clip_hi, zeroed=True).T
    got = f._continuum_compiled(flux, ivar)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
    assert np.abs(got[10]).max() < 1e-6  # no data: the penalty alone, a zero continuum
    # a system that is not positive definite (a negative penalty, no data): NaN and counted
    out = np.zeros((2, m), np.float32)
    bad = J.continuum(np.zeros((2, m), np.float32), np.zeros((2, m), np.float32), model.nbin, *model.csr("prod"),
                      model.d_of_pair, model.pairs_k, -model.pen_band, *model.csr("bin"), *model.csr("bin_t"),
                      *model.csr("basis"), 3, 2.0, 3.0, out)
    assert bad == 2 and np.isnan(out).all()


def test_select_gives_the_kth_smallest_as_partition_does():
    rng = np.random.default_rng(3)
    for trial in range(300):
        n = int(rng.integers(1, 60)) if trial < 250 else int(rng.integers(1000, 4000))
        values = rng.standard_normal(n).astype(np.float32)
        if trial % 3 == 0:  # many ties
            values = np.round(values).astype(np.float32)
        k = int(rng.integers(0, n))
        buf = np.concatenate([values, np.float32([np.inf, -np.inf])])  # past n: never looked at
        got = J._select(buf, n, k)
        assert got == np.partition(values, k)[k]
        assert np.array_equal(np.sort(buf[:n]), np.sort(values))  # a permutation of the input
        assert k == 0 or buf[:k].max() <= got
        assert buf[n] == np.inf and buf[n + 1] == -np.inf


def test_a_kernel_band_is_its_rows_diagonals():
    import scipy.sparse as sp

    from stx_builtin.featurizers._rawlib import Degrader

    k = sp.csr_matrix(np.array([[0.5, 0.25, 0, 0], [0.25, 0.5, 0.25, 0], [0, 0, 0.5, 0.5], [0, 0, 0.2, 0.8]],
                               np.float32))
    band, h = Degrader(k, k.multiply(k).tocsr(), 1.0).band
    assert h == 1 and band.shape == (4, 4)  # offsets -1..1, rows padded to a multiple of 4
    np.testing.assert_array_equal(band, np.float32([[0, 0.25, 0, 0.2], [0.5, 0.5, 0.5, 0.8], [0.25, 0.25, 0.5, 0], [0, 0, 0, 0]]))
    unsorted = sp.csr_matrix((np.float32([0.25, 0.5, 1.0, 1.0, 1.0]), [1, 0, 1, 2, 3], [0, 2, 3, 4, 5]))
    assert unsorted.indices[0] == 1  # stored out of column order: no band (its sums would round otherwise)
    assert Degrader(unsorted, unsorted, 1.0).band[0].shape == (0, 4)


def test_what_the_kernels_do_not_cover_takes_the_numpy_path(monkeypatch):
    monkeypatch.setenv("STX_KERNELS", "compiled")
    wave, _ = linear_grid(3700, 9200, 0.8)
    flux, ivar = _noisy(1, wave, seed=3)  # one spectrum: the kernels already pay
    batch = make_batch(wave, flux, ivar, r=4000.0)
    assert RawFeaturizer()._compiled_grids(batch, None) is not None
    assert RawFeaturizer(continuum="none")._compiled_grids(batch, None) is None
    irregular = np.sort(np.random.default_rng(0).uniform(3700, 9200, wave.size))
    assert RawFeaturizer()._compiled_grids(make_batch(irregular, flux, ivar, r=4000.0), None) is None
    # MILES: a linear grid in air, converted to vacuum, is neither linear nor log-linear
    miles = _read_all(DATA / "miles" / "spectra" / "MILES_res2.50_star_m0001V.fits")
    assert RawFeaturizer()._compiled_grids(miles, None) is None
    desi = _read_all(DATA / "desi-edr" / "coadd-sv3-dark-26065.fits", with_resolution=True)
    assert RawFeaturizer()._compiled_grids(desi, None) is not None
    assert RawFeaturizer(use_resolution_matrix=True)._compiled_grids(desi, None) is None
    monkeypatch.setenv("STX_KERNELS", "numpy")
    assert RawFeaturizer()._compiled_grids(batch, None) is None
    assert RawFeaturizer()._compiled_grids(desi, None) is None
    monkeypatch.setenv("STX_KERNELS", "Compiled ")  # case and spaces are forgiven
    assert RawFeaturizer()._compiled_grids(batch, None) is not None


def test_a_bad_kernels_setting_is_a_usage_error(monkeypatch):
    from stxcli.errors import UsageError

    monkeypatch.setenv("STX_KERNELS", "fast")
    with pytest.raises(UsageError, match="STX_KERNELS must be one of auto, compiled, numpy, got 'fast'"):
        RawFeaturizer()


def test_the_numpy_setting_never_imports_numba(tmp_path):
    """STX_KERNELS=numpy never loads numba (about 110 MB resident), nor does the default (auto)
    on a small job; compiled loads it at the first batch."""
    import subprocess
    import sys

    code = ("import sys, numpy as np\n"
            "sys.path.insert(0, 'tests')\n"
            "from test_raw_featurizer import linear_grid, make_batch\n"
            "from stx_builtin.featurizers.raw import RawFeaturizer\n"
            "wave, _ = linear_grid(3700, 9200, 0.8)\n"
            "fb = RawFeaturizer().transform(make_batch(wave, np.ones((20, wave.size)), r=4000.0))\n"
            "print((fb.ivar > 0).any(axis=1).all(), 'numba' in sys.modules)")
    root = Path(__file__).resolve().parents[1]
    for setting, numba_loaded in (("numpy", "False"), ("auto", "False"), ("compiled", "True")):
        env = {**__import__("os").environ, "STX_KERNELS": setting}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", numba_loaded], (setting, out.stdout)


def test_auto_turns_to_the_kernels_after_enough_spectra(monkeypatch):
    """auto: numpy for a process's first AUTO_AFTER_ROWS spectra with data, the kernels after;
    the features do not change when it turns."""
    monkeypatch.delenv("STX_KERNELS", raising=False)
    monkeypatch.setattr(R, "AUTO_AFTER_ROWS", 30)
    monkeypatch.setattr(R, "_rows_seen", 0)
    calls = _count_kernel_calls(monkeypatch)
    wave, _ = linear_grid(3700, 9200, 0.8)
    flux, ivar = _noisy(20, wave, seed=5)
    batch = make_batch(wave, flux, ivar, r=4000.0)
    f = RawFeaturizer()
    outs = []
    for expect_kernels in (False, False, True, True):  # 0, 20, 40, 60 spectra seen before each
        outs.append(f.transform(batch))
        assert bool(calls) == expect_kernels
        calls.clear()
    assert R._rows_seen == 80
    for out in outs[1:]:
        _assert_same(outs[0], out)


def test_kernels_compile_uncached_where_numba_cannot_cache(monkeypatch, capsys):
    """A read-only install with a read-only home: numba refuses cache=True ("no locator
    available"). The kernels are then compiled per process, with one warning saying what to do,
    instead of the import failing."""
    real = J.njit

    def njit(*args, cache=False, **kw):
        if cache:
            raise RuntimeError("cannot cache function 'f': no locator available for file 'x.py'")
        return real(*args, **kw)

    monkeypatch.setattr(J, "njit", njit)
    monkeypatch.setattr(J, "UNCACHED", [])

    def double(x):
        return 2 * x

    f = J._kernel(double)
    assert f(21) == 42 and J.UNCACHED == ["double"]
    monkeypatch.setattr(R, "_warned_uncached", [])
    assert R._kernels_module() is J and R._kernels_module() is J
    err = capsys.readouterr().err
    assert err.count("numba found no writable cache") == 1 and "NUMBA_CACHE_DIR" in err


@pytest.mark.parametrize("kernels", ["numpy", "compiled"])
def test_a_spectrum_does_not_depend_on_its_batch(kernels, monkeypatch):
    """Each spectrum picks its own re-normalisation (none, next to few bad pixels, everywhere)
    and rebinning denominator (covered width when all its pixels are good): featured alone or
    in any batch, its features are the same bits (one-spectrum files are featurized together,
    stxcli.coalesce; a Dask partition or a chunk size must not change a store). Velocities are
    given: the cross-correlation's BLAS product may round differently for another batch size."""
    wave, _ = linear_grid(3700, 9200, 0.8)
    flux, ivar = _noisy(6, wave, seed=11)
    rng = np.random.default_rng(3)
    mask = np.zeros(flux.shape, bool)
    mask[1, rng.random(wave.size) < 0.01] = True  # few bad: sparse
    mask[2, rng.random(wave.size) < 0.2] = True  # many bad: dense
    mask[4, 100:160] = True
    ivar[5, :40] = 0
    rv = np.array([12.0, -30.0, 5.0, 0.0, 80.0, -3.0])
    monkeypatch.setenv("STX_KERNELS", kernels)
    f = RawFeaturizer()
    whole = f.transform(make_batch(wave, flux, ivar, rv=rv, r=4000.0, mask=mask))
    for rows in ([0], [1], [2], [0, 3], [2, 5, 1], [4, 0]):
        part = f.transform(make_batch(wave, flux[rows], ivar[rows], rv=rv[rows], r=4000.0, mask=mask[rows]))
        for k, i in enumerate(rows):
            np.testing.assert_array_equal(part.features[k], whole.features[i], err_msg=f"{rows} row {i}")
            np.testing.assert_array_equal(part.ivar[k], whole.ivar[i], err_msg=f"{rows} row {i}")
            assert part.quality["snr"][k] == whole.quality["snr"][i]
