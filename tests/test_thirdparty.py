"""The third-party example plugins, used as a user would after `pip install -e plugins/<name>`
(CI installs every plugins/*/pyproject.toml): each is its own distribution registered through the
`stx` entry-point group. Skipped, with the reason, where a distribution is not installed.

- stx-peft (adapter `peft-lora`, LoRA through the peft library): `stx plugins` lists it with its
  distribution, `stx finetune --adapter peft-lora` and `stx predict` work, and with the LoRA
  weights of a trained built-in `lora` adapter copied in, its outputs equal stx's LoRA.
- stx-cannon (head `cannon`, trained by thecannon 0.7.3): `stx pretrain --head cannon` and
  `stx predict` work, and its torch test step equals thecannon's on a few stars.

Their own, longer tests live in plugins/<name>/tests/.
"""

from __future__ import annotations

import copy
import json
from importlib.metadata import PackageNotFoundError, distribution

import numpy as np
import pytest
import torch

from _models_util import synth, write_synth
from conftest import run_cli

torch.set_num_threads(1)
FAST = ["--threads", "1", "--quiet"]


def _installed(dist: str) -> bool:
    try:
        distribution(dist)
    except PackageNotFoundError:
        return False
    return True


needs_peft = pytest.mark.skipif(not _installed("stx-peft"),
                                reason="stx-peft is not installed (pip install -e plugins/stx-peft)")
needs_cannon = pytest.mark.skipif(not _installed("stx-cannon"),
                                  reason="stx-cannon is not installed (pip install -e plugins/stx-cannon)")


@pytest.fixture
def thirdparty(monkeypatch, fresh_registry):
    """The built-ins plus the two example distributions (conftest loads the built-ins only)."""
    monkeypatch.setenv("STX_LOAD_PLUGINS", "stx,stx-peft,stx-cannon")
    from stxcli.registry import get_registry

    get_registry.cache_clear()
    yield
    get_registry.cache_clear()
    from stxcli import console

    console.set_quiet(False)  # --json / --quiet set a process-wide flag that later in-process commands inherit


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from stxcli.cli.main import main

    d = tmp_path_factory.mktemp("thirdparty")
    write_synth(d / "src.h5", 300)
    write_synth(d / "tgt.h5", 120, seed=4, shift=0.01, feh_offset=0.3)
    assert main(["pretrain", str(d / "src.h5"), "-o", str(d / "base"), "--set", "hidden=16,16",
                 "--epochs", "40", *FAST]) == 0
    return d


@needs_peft
def test_stx_plugins_lists_peft_lora(thirdparty, capsys):
    code, out, err = run_cli(["plugins", "--json"], capsys)
    assert code == 0, err
    rows = [r for r in json.loads(out) if r["kind"] == "adapter" and r["name"] == "peft-lora"]
    assert len(rows) == 1, out
    assert rows[0]["distribution"] == "stx-peft" and rows[0]["status"] == "ok" and rows[0]["plugin"] == "peft-lora"


@needs_peft
def test_peft_lora_finetune_predict_and_equal_to_stx_lora(thirdparty, work, capsys, tmp_path):
    from stxcli.model import combine_members, decode_labels, load_base_net, load_model, make_adapter
    from stxcli.modelfile import ModelDir
    from stxcli.store import FeatureStore

    # the CLI end to end with the third-party adapter
    code, out, err = run_cli(["finetune", work / "base", work / "tgt.h5", "--adapter", "peft-lora", "-o",
                              tmp_path / "peft", "--n-train", "100", "--epochs", "3", "--json", *FAST], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["adapter"] == "peft-lora" and s["n_train"] + s["n_val"] == 100
    assert s["trainable_params"] == 4 * ((24 + 16) + (16 + 16) + (16 + 6))  # r=4 on 24-16-16-6
    acfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert acfg["peft_type"] == "LORA" and acfg["stx_adapter"]["distribution"] == "stx-peft"
    code, out, err = run_cli(["predict", tmp_path / "peft", work / "tgt.h5", "-o", tmp_path / "p.fits", "--json",
                              "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_spectra"] == 120

    # a trained built-in lora adapter; its A and B copied into peft-lora give the same outputs
    code, _, err = run_cli(["finetune", work / "base", work / "tgt.h5", "--adapter", "lora", "-o", tmp_path / "lora",
                            "--n-train", "100", "--epochs", "20", "--lr", "1e-2", *FAST], capsys)
    assert code == 0, err
    stx_model = load_model(tmp_path / "lora", merge=False)
    base, specs = load_base_net(ModelDir(work / "base"))
    stx_w = {k: torch.from_numpy(np.array(v))
             for k, v in ModelDir(tmp_path / "lora").tensors("adapter_model.safetensors").items()}
    assert any(float(v.abs().max()) > 0 for k, v in stx_w.items() if "lora_B" in k)  # it trained
    peft_ad = make_adapter("peft-lora", {})
    peft_head = peft_ad.attach(copy.deepcopy(base.head)).eval()
    peft_ad.load_state_dict(peft_head, stx_w)
    with FeatureStore.open(work / "tgt.h5") as st:
        x = torch.from_numpy(st.read(0, st.n)["features"])
    z = base.standardize(x)
    with torch.no_grad():
        ref = stx_model.nets[0].head(z)
        got = peft_head(z)
        merged = peft_ad.merge(peft_head)(z)
        zero_shot = base.head(z)
    assert not torch.allclose(ref[0], zero_shot[0], atol=1e-3)  # the adapter changes the output
    for a in (got, merged):
        torch.testing.assert_close(a[0], ref[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(a[1], ref[1], rtol=0, atol=1e-5)
    # and in physical units, against stx predict's merged lora model
    m, v = combine_members(*got)
    value, _ = decode_labels(specs, m.numpy(), v.numpy())
    np.testing.assert_allclose(value, load_model(tmp_path / "lora").predict(x.numpy())["value"], rtol=1e-5, atol=1e-5)


@needs_cannon
def test_cannon_head_cli_and_thecannon_test_step(thirdparty, capsys, tmp_path):
    import contextlib
    import io

    import matplotlib

    from stxcli.model import load_model

    write_synth(tmp_path / "tr.h5", 200, seed=1, d=16)
    code, out, err = run_cli(["pretrain", tmp_path / "tr.h5", "--head", "cannon", "-o", tmp_path / "cannon",
                              "--json", *FAST], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["trainable_params"] == 16 * (10 + 1)  # theta (D x 10) and the scatter per pixel
    code, out, err = run_cli(["plugins", "--json"], capsys)
    assert [r["distribution"] for r in json.loads(out) if r["kind"] == "head" and r["name"] == "cannon"] == ["stx-cannon"]
    code, out, err = run_cli(["predict", tmp_path / "cannon", tmp_path / "tr.h5", "-o", tmp_path / "p.fits",
                              "--json", "--quiet"], capsys)
    assert code == 0, err
    assert json.loads(out)["n_spectra"] == 200

    # the torch test step against thecannon's own (scipy curve_fit from the zero label guess)
    lm = load_model(tmp_path / "cannon")
    net = lm.nets[0]
    cn = net.head
    f, iv, _, _ = synth(5, d=16, seed=9)
    with matplotlib.rc_context():
        from TheCannon.dataset import Dataset
        from TheCannon.model import CannonModel
    ref = CannonModel(2, useErrors=False)
    ref.coeffs, ref.scatters = cn.theta.detach().numpy(), np.sqrt(cn.s2.detach().numpy())
    ref.pivots, ref.scales = cn.pivots.numpy(), cn.scales.numpy()
    z = net.standardize(torch.from_numpy(f))
    flux = cn.flux(z).numpy()
    iv64 = iv.astype(np.float64)
    with contextlib.redirect_stdout(io.StringIO()):
        ds = Dataset(np.arange(16.0), np.arange(5), flux.copy(), iv64.copy(), np.zeros((5, 3)), np.arange(5),
                     flux.copy(), iv64.copy())
        ds.set_label_names(["teff", "logg", "feh"])
        ref.infer_labels(ds, starting_guess=np.zeros(3))
    with torch.no_grad():
        mean, _ = cn(z, torch.from_numpy(iv) / net.feature_scale**2)
    np.testing.assert_allclose(mean[0].numpy(), ds.test_label_vals, atol=2e-5)
