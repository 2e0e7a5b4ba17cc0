"""Residual, full and auto adapters; fine-tuning end to end on a shifted target domain."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from stxcli.errors import PluginError, UsageError
from stxcli.model import load_model, make_adapter, make_head
from stxcli.train import TrainOptions, finetune, pretrain

from _models_util import synth, write_synth

torch.set_num_threads(1)


def _base():
    torch.manual_seed(0)
    return make_head("mlp", {"hidden": [16, 8], "ensemble": 2}).build(12, 3).eval()


@pytest.mark.parametrize("use", ["hidden", "features", "both"])
def test_residual_zero_init_equals_base_and_trains_alone(use):
    base = _base()
    x = torch.randn(30, 12)
    ref = base(x)
    res = make_adapter("residual", {"input": use, "hidden": [5]})
    model = res.attach(copy.deepcopy(base))
    model.train()
    out = model(x)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("delta.") for n in trainable)
    assert not model.base.training  # the frozen base never runs in training mode
    in_dim = {"hidden": 16, "features": 12, "both": 28}[use]
    assert model.delta[0].in_features == in_dim
    # save/load round trip
    with torch.no_grad():
        for p in model.delta.parameters():
            p.normal_()
    state = res.state_dict(model)
    again = make_adapter("residual", res.config())
    m2 = again.attach(copy.deepcopy(base))
    again.load_state_dict(m2, {k: v.clone() for k, v in state.items()})
    torch.testing.assert_close(m2(x)[0], model(x)[0], rtol=0, atol=0)
    assert res.adapter_config()["adapter_type"] == "residual"


def test_residual_from_frozen_rows_equals_its_forward():
    """Training reads the frozen base's outputs once (frozen_rows) and continues from them
    (forward_from_frozen): the same mean and log-variance as the module's own forward, for an
    ensemble of 2 (member-major order) and a trained correction."""
    torch.manual_seed(0)
    base = make_head("mlp", {"hidden": [16, 8], "ensemble": 2}).build(40, 3).eval()
    model = make_adapter("residual", {"hidden": [5]}).attach(copy.deepcopy(base))
    with torch.no_grad():
        for p in model.delta.parameters():
            p.normal_()
    x = torch.randn(30, 40)
    c = model.frozen_rows(x)
    assert c.shape == (30, 2 * 2 * 3 + 16)
    for got, ref in zip(model.forward_from_frozen(c), model(x)):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    for use in ("features", "both"):  # the correction reads the features: no cache (it would copy them)
        assert make_adapter("residual", {"input": use}).attach(copy.deepcopy(base)).frozen_rows(x) is None
    # a ridge base's "hidden state" is the features themselves: no cache either
    ridge = make_head("ridge", {}).build(12, 3)
    assert make_adapter("residual", {}).attach(ridge).frozen_rows(torch.randn(3, 12)) is None


def test_residual_on_ridge_needs_features():
    ridge = make_head("ridge", {}).build(12, 3)
    model = make_adapter("residual", {"input": "features"}).attach(ridge)
    assert model(torch.randn(4, 12))[0].shape == (1, 4, 3)


def test_full_layer_decay_groups():
    base = _base()
    full = make_adapter("full", {"layer_decay": 0.5})
    model = full.attach(base)
    assert all(p.requires_grad for p in model.parameters())
    groups = full.param_groups(model)
    scales = {g["lr_scale"]: sum(p.numel() for p in g["params"]) for g in groups}
    # depth keys: layers.0 (12*16+16), layers.1 (16*8+8), out (8*6+6), twice (two members)
    assert scales == {0.25: 2 * (12 * 16 + 16), 0.5: 2 * (16 * 8 + 8), 1.0: 2 * (8 * 6 + 6)}
    assert sum(scales.values()) == sum(p.numel() for p in model.parameters())
    with pytest.raises(UsageError):
        make_adapter("full", {"layer_decay": 0})


def test_auto_choose_per_label():
    auto = make_adapter("auto", {"candidates": "residual,lora,full"})
    scores = {"residual": {"teff": 3.0, "feh": 0.1}, "lora": {"teff": 2.0, "feh": 0.1},
              "full": {"teff": 2.5, "feh": 0.2}}
    assert auto.choose(scores) == {"teff": "lora", "feh": "residual"}  # tie -> first candidate
    with pytest.raises(UsageError):
        make_adapter("auto", {"metric": "nll"})


def test_unknown_adapter():
    with pytest.raises(PluginError, match="no adapter named 'nope'"):
        make_adapter("nope")


@pytest.fixture(scope="module")
def domains(tmp_path_factory):
    d = tmp_path_factory.mktemp("ft")
    write_synth(d / "src.h5", 600)
    # target: shifted features and an [Fe/H] zero-point the source does not know
    write_synth(d / "tgt.h5", 260, seed=9, shift=0.01, feh_offset=0.3)
    write_synth(d / "test.h5", 200, seed=10, shift=0.01, feh_offset=0.3)
    pretrain([d / "src.h5"], d / "base", head_config={"hidden": [32, 32]}, opts=TrainOptions(epochs=60, seed=0))
    return d


def _mae(model_dir, d):
    from stxcli.store import FeatureStore

    with FeatureStore.open(d / "test.h5") as st:
        x = st.read(0, st.n)["features"]
        y = st.labels(["teff", "logg", "feh"])
    p = load_model(model_dir).predict(x)
    return np.abs(p["value"] - y).mean(0), p


def test_finetuning_beats_zero_shot_and_auto_uses_chosen(domains, tmp_path):
    d = domains
    zero, _ = _mae(d / "base", d)
    opts = TrainOptions(n_train=200, seed=3)
    maes = {}
    for a in ("residual", "lora", "full"):
        s = finetune(d / "base", d / "tgt.h5", tmp_path / a, adapter=a, opts=opts)
        assert s["n_train"] + s["n_val"] == 200 and s["trainable_params"] > 0
        maes[a], _ = _mae(tmp_path / a, d)
        assert maes[a][2] < 0.6 * zero[2], (a, maes[a], zero)  # the [Fe/H] zero-point is learnt
    s = finetune(d / "base", d / "tgt.h5", tmp_path / "auto", adapter="auto", opts=opts)
    man = json.loads((tmp_path / "auto" / "manifest.json").read_text())
    sel = man["adapter"]["selection"]
    assert set(sel) == {"teff", "logg", "feh"} and set(man["adapter"]["scores"]) == {"residual", "lora", "full"}
    for lab, cand in sel.items():
        assert man["adapter"]["scores"][cand][lab] == min(man["adapter"]["scores"][c][lab] for c in sel.values())
    assert man["training"]["n_target_stars"] == 200
    # each label is predicted by its chosen adapter, identical to that adapter trained alone
    _, pa = _mae(tmp_path / "auto", d)
    for j, lab in enumerate(["teff", "logg", "feh"]):
        _, pc = _mae(tmp_path / sel[lab], d)
        np.testing.assert_allclose(pa["value"][:, j], pc["value"][:, j], rtol=1e-6)
    # the target-only baseline: same architecture, same stars, no pre-training
    s = finetune(d / "base", d / "tgt.h5", tmp_path / "scratch", scratch=True, opts=opts)
    m = json.loads((tmp_path / "scratch" / "manifest.json").read_text())
    assert m["kind"] == "pretrained" and m["training"]["from_scratch"] is True
    assert m["head"]["config"]["hidden"] == [32, 32]


def test_finetune_guards(domains, tmp_path):
    from stxcli.errors import ModelFileError, StxError

    d = domains
    write_synth(tmp_path / "other.h5", 100, config={"grid": "other"})
    with pytest.raises(ModelFileError, match="another featurizer config"):
        finetune(d / "base", tmp_path / "other.h5", tmp_path / "o", adapter="lora")
    with pytest.raises(StxError, match="fewer stars than the split needs"):
        finetune(d / "base", d / "tgt.h5", tmp_path / "o", adapter="lora", opts=TrainOptions(n_train=12))
    f, iv, ids, lab = synth(80)
    del lab["logg"]
    from stxcli.store import write_store_arrays

    write_store_arrays(tmp_path / "nologg.h5", f, iv, ids, lab, featurizer_name="raw", featurizer_version="test",
                       featurizer_config={"grid": "synthetic"})
    with pytest.raises(StxError, match="label\\(s\\) logg of model .* are missing"):
        finetune(d / "base", tmp_path / "nologg.h5", tmp_path / "o", adapter="lora")
    assert not (tmp_path / "o").exists()


def test_documented_plugin_examples_work(domains, tmp_path, monkeypatch):
    """The head and adapter examples of docs/models.md, registered as plugins, train and predict."""
    import re
    import types
    from pathlib import Path

    import stxcli.registry as R
    from stxcli.plugins import PluginInfo, load_plugins

    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 2
    mods = []
    for i, code in enumerate(blocks):
        mod = types.ModuleType(f"doc_example_{i}")
        exec(compile(code, f"docs/models.md example {i}", "exec"), mod.__dict__)
        mods.append((PluginInfo(f"doc-{i}", mod.__name__, "docs", "0"), mod))
    reg = R.Registry(load_plugins(extra=mods))
    monkeypatch.setattr(R, "get_registry", lambda: reg)
    d = domains
    pretrain([d / "src.h5"], tmp_path / "lin", head="linear", opts=TrainOptions(epochs=5))
    s = finetune(tmp_path / "lin", d / "tgt.h5", tmp_path / "bit", adapter="bitfit", opts=TrainOptions(epochs=5))
    assert s["trainable_params"] == 3  # the three biases of the linear layer
    _, p = _mae(tmp_path / "bit", d)
    assert np.isfinite(p["value"]).all()


def test_auto_candidates_checked_before_training(domains, tmp_path):
    with pytest.raises(PluginError, match="no adapter named 'nope'"):
        finetune(domains / "base", domains / "tgt.h5", tmp_path / "o", adapter="auto",
                 adapter_config={"candidates": "residual,nope"})
    with pytest.raises(UsageError, match="own candidate"):
        finetune(domains / "base", domains / "tgt.h5", tmp_path / "o", adapter="auto",
                 adapter_config={"candidates": "auto"})
    assert not (tmp_path / "o").exists()


def test_residual_trains_from_the_frozen_cache_as_from_features(domains, tmp_path, monkeypatch):
    """stx finetune --adapter residual trains from the base's outputs computed once: the same
    model (to float32 rounding) as running the frozen base on every batch."""
    import stxcli.train as T

    d = domains
    opts = TrainOptions(n_train=200, seed=3, epochs=15)
    used = []
    real = T.frozen_cache
    monkeypatch.setattr(T, "frozen_cache", lambda *a: used.append(real(*a)) or used[-1])
    s1 = finetune(d / "base", d / "tgt.h5", tmp_path / "cached", adapter="residual", opts=opts)
    assert used and used[0] is not None  # the cache was taken
    monkeypatch.setattr(T, "frozen_cache", lambda *a: None)
    s2 = finetune(d / "base", d / "tgt.h5", tmp_path / "plain", adapter="residual", opts=opts)
    _, p1 = _mae(tmp_path / "cached", d)
    _, p2 = _mae(tmp_path / "plain", d)
    np.testing.assert_allclose(p1["value"], p2["value"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(p1["err"], p2["err"], rtol=1e-3)
    runs = [json.loads((tmp_path / k / "manifest.json").read_text())["training"]["runs"]["residual"]
            for k in ("cached", "plain")]
    assert runs[0]["frozen_cache_s"] > 0 and runs[1]["frozen_cache_s"] is None
    assert runs[0]["train_time_s"] >= runs[0]["frozen_cache_s"]
    # noise augmentation changes the base's input every batch: no cache
    used.clear()
    monkeypatch.setattr(T, "frozen_cache", lambda *a: used.append(1) or real(*a))
    finetune(d / "base", d / "tgt.h5", tmp_path / "noisy", adapter="residual",
             opts=TrainOptions(n_train=200, seed=3, epochs=2, augment_noise=1.0))
    assert not used
