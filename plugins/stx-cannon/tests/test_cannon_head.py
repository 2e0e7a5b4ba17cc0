"""stx-cannon's own tests: training equals thecannon's ``CannonModel.train``, the torch test step
equals thecannon's ``infer_labels`` (zero starting guess) star by star, the label-vector
Jacobian, the head through the stx CLI (pretrain, predict) on spectra made by a quadratic
model, and its one-line errors. Needs stx, stx-cannon and thecannon 0.7.3 installed.

Run: ``pytest plugins/stx-cannon/tests``.
"""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("TheCannon")

torch.set_num_threads(1)
LABELS = ["teff", "logg", "feh"]


@pytest.fixture(autouse=True)
def _with_plugin(monkeypatch):
    from stxcli.registry import get_registry

    monkeypatch.setenv("STX_LOAD_PLUGINS", "stx,stx-cannon")
    monkeypatch.delenv("STX_DISABLE_PLUGINS", raising=False)
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()
    from stxcli import console

    console.set_quiet(False)  # --json / --quiet set a process-wide flag; leave it as found


def quadratic_spectra(n: int, seed: int, d: int = 40, miss: float = 0.02):
    """Spectra that are exactly the Cannon's model (quadratic in scaled labels) plus noise of a
    per-star SNR, with 2 % missing pixels (flux 1, ivar 0, as stx's raw featurizer writes them)."""
    rng = np.random.default_rng(seed)
    teff, logg, feh = rng.uniform(4500, 6500, n), rng.uniform(1.5, 4.8, n), rng.uniform(-2.0, 0.4, n)
    z = np.stack([(np.log10(teff) - 3.74) / 0.05, logg - 3.0, (feh + 0.8) / 0.7], 1)
    iu = np.triu_indices(3)
    v = np.hstack([z, (z[:, :, None] * z[:, None, :])[:, iu[0], iu[1]]])
    coef = np.random.default_rng(7).normal(size=(9, d)) * 0.03
    snr = rng.uniform(30, 150, n)
    sig = np.repeat(1 / snr[:, None], d, 1)
    flux = 1 + v @ coef + rng.normal(size=(n, d)) * sig
    ivar = 1 / sig**2
    bad = rng.random((n, d)) < miss
    flux[bad], ivar[bad] = 1.0, 0.0
    return flux.astype(np.float32), ivar.astype(np.float32), {"teff": teff, "logg": logg, "feh": feh}, snr


def write_store(path, n, seed, **kw):
    from stxcli.store import write_store_arrays

    f, iv, labels, snr = quadratic_spectra(n, seed, **kw)
    write_store_arrays(path, f, iv, [f"{seed}-{i}" for i in range(n)], labels, featurizer_name="raw",
                       featurizer_version="test", featurizer_config={"grid": "synthetic"},
                       quality={"snr": snr.astype(np.float32), "flags": np.zeros(n, np.int32)},
                       meta={"ra": np.zeros(n), "dec": np.zeros(n)})
    return path


def _thecannon():
    import matplotlib

    with matplotlib.rc_context():  # thecannon sets usetex at import time
        from TheCannon.dataset import Dataset
        from TheCannon.model import CannonModel
    return Dataset, CannonModel


def _dataset(flux, ivar, labels, test_flux=None, test_ivar=None):
    Dataset, _ = _thecannon()
    tf = flux if test_flux is None else test_flux
    ti = ivar if test_ivar is None else test_ivar
    with contextlib.redirect_stdout(io.StringIO()):  # thecannon prints progress
        ds = Dataset(np.arange(flux.shape[1], dtype=float), np.arange(len(flux)), flux.astype(np.float64).copy(),
                     ivar.astype(np.float64).copy(), labels, np.arange(len(tf)), tf.astype(np.float64).copy(),
                     ti.astype(np.float64).copy())
    ds.set_label_names(["a", "b", "c"][: labels.shape[1]])
    return ds


def test_registered_from_its_own_distribution():
    from stxcli.registry import get_registry

    reg = get_registry()
    item = reg.items["head"]["cannon"]
    assert item.plugin.distribution == "stx-cannon"
    head = reg.get("head", "cannon")(**{"steps": 12, "calibrate": "false"})
    assert head.closed_form and head.config() == {"steps": 12, "calibrate": False, "max_stars": 20000}


def test_training_equals_thecannon_train():
    from stx_cannon._model import train_pixels

    _, CannonModel = _thecannon()
    f, iv, lab, _ = quadratic_spectra(120, 0, d=12)
    y = np.stack([lab[k] for k in LABELS], 1)
    y = (y - y.mean(0)) / y.std(0)
    ours = train_pixels(f, iv, y)
    ref = CannonModel(2, useErrors=False)
    with contextlib.redirect_stdout(io.StringIO()):
        ref.train(_dataset(f, iv, y))
    np.testing.assert_allclose(ours["theta"], ref.coeffs, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours["scatter"], ref.scatters, rtol=1e-10)
    np.testing.assert_allclose(ours["pivots"], ref.pivots)
    np.testing.assert_allclose(ours["scales"], ref.scales)
    assert np.all(ours["scatter"] > 0)


def test_label_vector_and_jacobian():
    from stx_cannon._model import CannonNet

    net = CannonNet(5, 3)
    l = torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64)
    v, j = net.label_vector(l)
    a, b, c = 0.3, -1.2, 2.0  # thecannon's order: l, then l_p l_q for p <= q (np.triu_indices)
    expected = [a, b, c, a * a, a * b, a * c, b * b, b * c, c * c]
    torch.testing.assert_close(v[0], torch.tensor(expected, dtype=torch.float64))
    jac = torch.autograd.functional.jacobian(lambda t: net.label_vector(t[None])[0][0], l[0])
    torch.testing.assert_close(j[0], jac)


def _trained_net(tmp_path, n=300, calibrate=False, d=40):
    from stxcli.model import load_model
    from stxcli.train import TrainOptions, pretrain

    write_store(tmp_path / "tr.h5", n, 0, d=d)
    pretrain([tmp_path / "tr.h5"], tmp_path / "m", head="cannon", head_config={"calibrate": calibrate},
             opts=TrainOptions(threads=1))
    return load_model(tmp_path / "m")


def test_forward_equals_thecannon_test_step(tmp_path):
    """The vectorised torch test step against thecannon's infer_labels (scipy curve_fit from the
    zero label guess), star by star: labels and their errors, with each star's own ivar and with
    the per-pixel training noise that predict uses."""
    lm = _trained_net(tmp_path)
    net = lm.nets[0]
    cn = net.head
    f, iv, lab, _ = quadratic_spectra(6, 5)
    z = net.standardize(torch.from_numpy(f))
    _, CannonModel = _thecannon()
    ref = CannonModel(2, useErrors=False)
    ref.coeffs, ref.scatters = cn.theta.detach().numpy(), np.sqrt(cn.s2.detach().numpy())
    ref.pivots, ref.scales = cn.pivots.numpy(), cn.scales.numpy()
    flux = cn.flux(z).numpy()
    noise_iv = np.broadcast_to(1 / cn.noise_var.numpy(), flux.shape)
    for star_ivar, our_ivar in ((iv, torch.from_numpy(iv) / net.feature_scale**2), (noise_iv, None)):
        ds = _dataset(flux, star_ivar, np.zeros((len(flux), 3)))
        with contextlib.redirect_stdout(io.StringIO()):
            errs, _ = ref.infer_labels(ds, starting_guess=np.zeros(3))
        with torch.no_grad():
            mean, logvar = cn(z, our_ivar)
        # thecannon's labels: scales * l + pivots; its errors: sqrt(diag cov) of the scaled l
        np.testing.assert_allclose(mean[0].numpy(), ds.test_label_vals, atol=2e-5)
        np.testing.assert_allclose(np.exp(0.5 * logvar[0].numpy()) / cn.scales.numpy(), errs, rtol=1e-3)
    # and the physical predictions are close to the truth (the data follow the Cannon's model)
    p = lm.predict(f)
    np.testing.assert_allclose(p["value"][:, 0], lab["teff"], atol=150)


def test_cli_pretrain_predict_accuracy_and_calibration(tmp_path, capsys):
    import matplotlib
    from astropy.table import Table

    from stxcli.cli.main import main

    usetex = matplotlib.rcParams["text.usetex"]
    write_store(tmp_path / "tr.h5", 400, 0)
    write_store(tmp_path / "te.h5", 300, 1)
    code = main(["pretrain", str(tmp_path / "tr.h5"), "--head", "cannon", "-o", str(tmp_path / "m"),
                 "--json", "--quiet", "--threads", "1"])
    s = json.loads(capsys.readouterr().out)
    assert code == 0 and s["n_train"] == 320 and s["trainable_params"] == 40 * (10 + 1)
    man = json.loads((tmp_path / "m" / "manifest.json").read_text())
    info = man["training"]["closed_form"]
    assert man["head"]["distribution"] == "stx-cannon" and info["thecannon_version"] == "0.7.3"
    assert info["n_stars"] == 320 and len(info["err_scale"]) == 3
    assert matplotlib.rcParams["text.usetex"] == usetex  # thecannon's rc settings did not leak
    assert main(["predict", str(tmp_path / "m"), str(tmp_path / "te.h5"), "-o", str(tmp_path / "p.fits"),
                 "--quiet"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'dex' is not a FITS-standard unit string
        t = Table.read(tmp_path / "p.fits", hdu="PREDICTIONS")
    _, _, lab, _ = quadratic_spectra(300, 1)
    res = {k: np.asarray(t[k]) - lab[k] for k in LABELS}
    # noise-limited accuracy on Cannon-like spectra (SNR 30-150, 40 pixels)
    assert np.median(np.abs(res["teff"])) < 40 and np.median(np.abs(res["logg"])) < 0.06
    assert np.median(np.abs(res["feh"])) < 0.05
    for k in LABELS:  # calibrated errors: about 68 % of the residuals within 1 sigma
        within = np.mean(np.abs(res[k]) < np.asarray(t[f"{k}_err"]))
        assert 0.5 < within < 0.85, (k, within)


def test_errors_are_one_line(tmp_path, capsys):
    from stxcli.cli.main import main

    write_store(tmp_path / "small.h5", 30, 0)
    code = main(["pretrain", str(tmp_path / "small.h5"), "--head", "cannon", "-o", str(tmp_path / "m"), "--quiet",
                 "--val-frac", "0.5"])  # 15 training stars for 10 coefficients per pixel
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "needs at least 20" in err[0], err
    assert not (tmp_path / "m").exists()
    write_store(tmp_path / "tr.h5", 100, 0)
    code = main(["pretrain", str(tmp_path / "tr.h5"), "--head", "cannon", "--set", "max_stars=50", "-o",
                 str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1 and "max_stars=50" in err[0]
    code = main(["pretrain", str(tmp_path / "tr.h5"), "--head", "cannon", "--set", "steps=0", "-o",
                 str(tmp_path / "m"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "steps must be >= 1" in err[-1]


def test_gradient_adapters_refuse_a_cannon_base(tmp_path, capsys):
    """The Cannon is fitted in closed form: lora/residual find no linear layer, full would train
    its coefficients by gradient; each is a one-line error and writes nothing."""
    from stxcli.cli.main import main

    write_store(tmp_path / "tr.h5", 100, 0, d=12)
    assert main(["pretrain", str(tmp_path / "tr.h5"), "--head", "cannon", "-o", str(tmp_path / "m"), "--quiet"]) == 0
    capsys.readouterr()
    for adapter, message in (("full", "fitted in closed form"), ("lora", "match no linear layer"),
                             ("residual", "no linear layer")):
        code = main(["finetune", str(tmp_path / "m"), str(tmp_path / "tr.h5"), "--adapter", adapter, "-o",
                     str(tmp_path / adapter), "--epochs", "2", "--quiet", "--threads", "1"])
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error:")]
        assert code != 0 and len(err) == 1 and message in err[0], (adapter, err)
        assert not (tmp_path / adapter).exists()
