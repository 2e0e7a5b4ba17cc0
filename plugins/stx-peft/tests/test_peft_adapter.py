"""stx-peft's own tests: the peft-lora adapter against the stx Adapter protocol and against the
built-in ``lora`` it mirrors (same weights -> same outputs, same file keys), its files load in
plain peft, and the CLI runs it end to end. Self-contained: needs stx, stx-peft and peft installed.

Run: ``pytest plugins/stx-peft/tests``.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _with_plugin(monkeypatch):
    """Built-ins plus this distribution, whatever else is installed; a fresh registry."""
    from stxcli.registry import get_registry

    monkeypatch.setenv("STX_LOAD_PLUGINS", "stx,stx-peft")
    monkeypatch.delenv("STX_DISABLE_PLUGINS", raising=False)
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()
    from stxcli import console

    console.set_quiet(False)  # --json / --quiet set a process-wide flag; leave it as found


def _base(ensemble: int = 2, in_dim: int = 12):
    from stxcli.model import make_head

    torch.manual_seed(0)
    return make_head("mlp", {"hidden": [16, 8], "ensemble": ensemble}).build(in_dim, 3).eval()


def _randomise_lora(model, seed: int = 1) -> None:
    """Non-zero B (and rescaled A) so the adapter changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_A" in n:
                p.mul_(2.0)


def _adapter(name: str, **cfg):
    from stxcli.model import make_adapter

    return make_adapter(name, cfg)


def test_registered_from_its_own_distribution():
    from stxcli.registry import get_registry

    reg = get_registry()
    assert "peft-lora" in reg.names("adapter")
    item = reg.items["adapter"]["peft-lora"]
    assert item.plugin.distribution == "stx-peft" and item.plugin.name == "peft-lora"
    assert "lora" in reg.names("adapter")  # the built-ins are still there


def test_zero_init_equals_base_and_only_lora_trains():
    base = _base()
    x = torch.randn(30, 12)
    ref = base(x)
    ad = _adapter("peft-lora", r=2, lora_alpha=4)
    model = ad.attach(copy.deepcopy(base)).eval()
    out = model(x)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    groups = ad.param_groups(model)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    # r * (in + out) per adapted layer, two members of 12->16->8->6: the built-in's count
    per_member = 2 * ((12 + 16) + (16 + 8) + (8 + 6))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * per_member
    stx = _adapter("lora", r=2, lora_alpha=4).attach(copy.deepcopy(base))
    assert sum(p.numel() for p in stx.parameters() if p.requires_grad) == 2 * per_member


def test_same_weights_same_outputs_as_builtin_lora():
    base = _base()
    stx_ad = _adapter("lora", r=3, lora_alpha=5.0)
    stx = stx_ad.attach(copy.deepcopy(base)).eval()
    _randomise_lora(stx)
    w = stx_ad.state_dict(stx)
    peft_ad = _adapter("peft-lora", r=3, lora_alpha=5.0)
    pm = peft_ad.attach(copy.deepcopy(base)).eval()
    assert set(peft_ad.state_dict(pm)) == set(w)  # same file keys: base_model.model.<m>.lora_X.weight
    peft_ad.load_state_dict(pm, w)
    x = torch.randn(64, 12)
    a, b = stx(x), pm(x)
    assert not torch.allclose(a[0], base(x)[0], atol=1e-3)  # the weights do something
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-5)
    # merged: a plain head again, equal to the unmerged output and to the built-in's merge
    merged = peft_ad.merge(pm).eval()
    assert type(merged) is type(base)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(x)[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(merged(x)[0], stx_ad.merge(stx)(x)[0], rtol=0, atol=1e-5)


def test_target_modules_follow_peft_rules():
    base = _base()
    ad = _adapter("peft-lora", target_modules=["out"])  # a list: exact names or name suffixes
    ad.attach(copy.deepcopy(base))
    assert sorted(ad.adapter_config()["target_modules"]) == ["out"]
    pm = _adapter("peft-lora", target_modules=r"members\.1\.layers\.[01]").attach(copy.deepcopy(base))
    adapted = sorted({n.split(".lora_")[0] for n, p in pm.named_parameters() if p.requires_grad})
    assert adapted == ["base_model.model.members.1.layers.0", "base_model.model.members.1.layers.1"]
    from stxcli.errors import UsageError

    with pytest.raises(UsageError, match="target_modules"):
        _adapter("peft-lora", target_modules="nothing_like_this").attach(copy.deepcopy(base))
    with pytest.raises(UsageError, match="not supported"):  # act is the activation, not a layer
        _adapter("peft-lora", target_modules=r"members\.1\.(layers\.0|act)").attach(copy.deepcopy(base))
    with pytest.raises(UsageError, match="r must be"):
        _adapter("peft-lora", r=0)


def test_save_load_round_trip_and_plain_peft_reads_the_folder(tmp_path):
    from peft import PeftModel

    from stxcli.modelfile import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ModelDir, write_model_dir

    base = _base()
    ad = _adapter("peft-lora", r=2)
    pm = ad.attach(copy.deepcopy(base)).eval()
    _randomise_lora(pm, seed=3)
    cfg = {**ad.adapter_config(), "stx_adapter": {"name": ad.name, "config": ad.config()}}
    write_model_dir(tmp_path / "m", {"kind": "test"}, tensors={ADAPTER_WEIGHTS: ad.state_dict(pm)},
                    json_files={ADAPTER_CONFIG: cfg})
    saved = json.loads((tmp_path / "m" / ADAPTER_CONFIG).read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 2 and saved["bias"] == "none"
    tensors = {k: torch.from_numpy(np.array(v)) for k, v in ModelDir(tmp_path / "m").tensors(ADAPTER_WEIGHTS).items()}
    ad2 = _adapter("peft-lora", **saved["stx_adapter"]["config"])
    pm2 = ad2.attach(copy.deepcopy(base)).eval()
    ad2.load_state_dict(pm2, tensors)
    for k, v in ad.state_dict(pm).items():
        assert torch.equal(ad2.state_dict(pm2)[k], v), k
    x = torch.randn(10, 12)
    assert torch.equal(pm2(x)[0], pm(x)[0])
    # the same folder through peft alone (it warns about the extra stx_adapter key)
    with pytest.warns(UserWarning, match="stx_adapter"):
        plain = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "m")).eval()
    torch.testing.assert_close(plain(x)[0], pm(x)[0], rtol=0, atol=0)
    # strict loading: a missing tensor or a wrong shape is an error
    with pytest.raises(KeyError):
        ad2.load_state_dict(pm2, dict(list(tensors.items())[1:]))
    bad = dict(tensors)
    k0 = next(iter(bad))
    bad[k0] = torch.zeros(tuple(s + 1 for s in bad[k0].shape))
    with pytest.raises(ValueError):
        ad2.load_state_dict(pm2, bad)


def _write_store(path, n, seed, shift=0.0, d=24):
    from stxcli.store import write_store_arrays

    rng = np.random.default_rng(seed)
    teff, logg, feh = rng.uniform(4000, 7000, n), rng.uniform(1, 5, n), rng.uniform(-2.5, 0.5, n)
    z = np.stack([(np.log10(teff) - 3.74) / 0.07, logg - 3, feh + 1], 1)
    a = np.random.default_rng(42).normal(size=(3, d))
    f = (1 + 0.1 * np.tanh(z @ a / 2) + shift + rng.normal(0, 0.01, (n, d))).astype(np.float32)
    write_store_arrays(path, f, np.full((n, d), 1e4, np.float32), [f"s{seed}-{i}" for i in range(n)],
                       {"teff": teff, "logg": logg, "feh": feh}, featurizer_name="raw",
                       featurizer_version="test", featurizer_config={"grid": "synthetic"},
                       quality={"snr": np.full(n, 50.0, np.float32), "flags": np.zeros(n, np.int32)},
                       meta={"ra": np.zeros(n), "dec": np.zeros(n)})


def test_cli_finetune_and_predict(tmp_path, capsys):
    from stxcli.cli.main import main

    _write_store(tmp_path / "src.h5", 200, 0)
    _write_store(tmp_path / "tgt.h5", 80, 4, shift=0.01)
    fast = ["--threads", "1", "--quiet"]
    assert main(["pretrain", str(tmp_path / "src.h5"), "-o", str(tmp_path / "base"), "--set", "hidden=16",
                 "--epochs", "10", *fast]) == 0
    capsys.readouterr()
    code = main(["finetune", str(tmp_path / "base"), str(tmp_path / "tgt.h5"), "--adapter", "peft-lora",
                 "--set", "r=2", "-o", str(tmp_path / "ft"), "--epochs", "3", "--json", *fast])
    out = capsys.readouterr().out
    assert code == 0
    s = json.loads(out)
    assert s["adapter"] == "peft-lora" and s["trainable_params"] == 2 * ((24 + 16) + (16 + 6))
    man = json.loads((tmp_path / "ft" / "manifest.json").read_text())
    assert man["adapter"]["distribution"] == "stx-peft"
    assert main(["predict", str(tmp_path / "ft"), str(tmp_path / "tgt.h5"), "-o", str(tmp_path / "p.fits"),
                 *fast]) == 0
    from astropy.table import Table

    t = Table.read(tmp_path / "p.fits", hdu="PREDICTIONS")
    assert len(t) == 80 and np.isfinite(np.asarray(t["teff"])).all()
