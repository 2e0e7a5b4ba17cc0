"""Adapters that reach into the spectral encoder (issue 5): LoRA on the encoder's attention/MLP
layers and full fine-tuning of encoder + head, trained on RAW target features; model files,
`stx predict`, the location- and device-free featurizer identity. Tiny encoder (2 blocks, width
32) on a few hundred synthetic spectra; one test predicts real LAMOST DR10 files."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from stxcli.errors import ModelFileError, StxError, UsageError
from stxcli.store import FeatureStore, write_store_arrays

from conftest import run_cli

RAW_CFG = {"wmin": 5000.0, "wmax": 5500.0}
TINY = {"width": 32, "depth": 2, "heads": 2}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def synth(n: int, n_pix: int, seed: int, depth: float = 1.0):
    """Continuum-normalised spectra with 24 Gaussian lines whose depth follows [Fe/H]; ``depth``
    scales every line (the 'other survey'); every 9th spectrum has a 25-pixel gap (ivar 0)."""
    rng = np.random.default_rng(seed)
    x = np.arange(n_pix)
    lines = np.random.default_rng(123)
    centers = np.linspace(10, n_pix - 10, 24) + lines.uniform(-3, 3, 24)
    strength = lines.uniform(0.2, 1.0, 24)
    feh = rng.uniform(-2.5, 0.5, n)
    z = (feh + 2.5) / 3
    w = rng.uniform(1.5, 3.0, n)
    prof = np.exp(-0.5 * ((x[None, None, :] - centers[None, :, None]) / w[:, None, None]) ** 2)
    flux = 1 - depth * (((0.1 + 0.6 * z)[:, None] * strength[None, :])[..., None] * prof).sum(1)
    flux = np.clip(flux, 0.05, None) + rng.normal(0, 0.01, (n, n_pix))
    ivar = np.full((n, n_pix), 1e4, np.float32)
    for i in range(0, n, 9):
        s = rng.integers(0, n_pix - 25)
        ivar[i, s:s + 25] = 0
        flux[i, s:s + 25] = 1.0
    return flux.astype(np.float32), ivar, feh.astype(np.float32)


def _raw():
    from stxcli.pipeline import build_featurizer

    return build_featurizer("raw", RAW_CFG)


def raw_store(path: Path, n: int, seed: int, depth: float = 1.0, raw=None) -> Path:
    raw = raw or _raw()
    f, iv, feh = synth(n, raw.dim, seed, depth)
    write_store_arrays(path, f, iv, [f"s{seed}-{i}" for i in range(n)], {"feh": feh}, featurizer_name="raw",
                       featurizer_version=raw.version, featurizer_config=raw.config(), axis=raw.axis(),
                       quality={"snr": np.full(n, 100.0, np.float32), "flags": np.zeros(n, np.int32)})
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Source raw store (300 spectra) -> tiny encoder -> embeddings -> MLP head on [Fe/H];
    a target raw store (200 spectra, lines 1.3x deeper) and its embeddings."""
    from stx_builtin.encoder.train import TrainOptions as EncOpts, run_train
    from stx_builtin.featurizers.transformer import embed_store
    from stxcli.train import TrainOptions, pretrain

    d = tmp_path_factory.mktemp("encadapt")
    raw_store(d / "src_raw.h5", 300, 0)
    raw_store(d / "tgt_raw.h5", 200, 1, depth=1.3)
    run_train(d / "src_raw.h5", d / "enc", TINY, EncOpts(epochs=4, batch_size=16, lr=2e-3))
    embed_store(d / "src_raw.h5", d / "src_emb.h5", encoder=d / "enc")
    embed_store(d / "tgt_raw.h5", d / "tgt_emb.h5", encoder=d / "enc")
    pretrain([d / "src_emb.h5"], d / "base", head_config={"hidden": [32]}, opts=TrainOptions(epochs=60, seed=0))
    return d


def _rows(path: Path):
    with FeatureStore.open(path) as st:
        return st.read()


def _front_net(d: Path, adapter: str, cfg: dict):
    """(adapter, FrontNet, base StxNet, featurizer) freshly attached, untrained."""
    from stxcli.model import FrontNet, StxNet, front_featurizer, load_base_net, make_adapter
    from stxcli.modelfile import ModelDir

    bdir = ModelDir(d / "base")
    base, _ = load_base_net(bdir)
    feat = front_featurizer(bdir.manifest["featurizer"], "test")
    ad = make_adapter(adapter, cfg)
    head = ad.attach(copy.deepcopy(base.head))
    front = ad.attach_encoder(feat.front())
    return ad, FrontNet(front, StxNet(head, base.feature_mean, base.feature_scale)), base, feat


# ------------------------------------------------------------------------------ LoRA, in memory


def test_zero_init_lora_on_the_encoder_gives_the_base_predictions_exactly(work):
    ad, net, base, feat = _front_net(work, "lora", {"target": "encoder+head"})
    r = _rows(work / "tgt_raw.h5")
    emb, _ = feat.embed(r["features"], r["ivar"])  # the base path: featurizer -> embeddings -> head
    net.eval()
    with torch.no_grad():
        for s in range(0, len(emb), feat.batch_size):  # same batches as the featurizer
            sl = slice(s, s + feat.batch_size)
            got_m, got_v = net(torch.from_numpy(r["features"][sl]), torch.from_numpy(r["ivar"][sl]))
            want_m, want_v = base(torch.from_numpy(emb[sl]))
            assert torch.equal(got_m, want_m) and torch.equal(got_v, want_v)


def test_only_the_lora_tensors_train_and_their_count(work):
    ad, net, _, _ = _front_net(work, "lora", {"target": "encoder", "r": 4})
    trainable = {n: p.numel() for n, p in net.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A.weight", "lora_B.weight")) for n in trainable)
    assert all(n.startswith("front.encoder.blocks.") for n in trainable)  # head frozen with target=encoder
    # per block, r * (in + out): qkv 32->96, proj 32->32, fc1 32->128, fc2 128->32
    per_block = 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    assert sum(trainable.values()) == 2 * per_block == 4096
    groups = ad.param_groups(net.head) + ad.encoder_param_groups(net.front)
    assert sum(p.numel() for g in groups for p in g["params"]) == 4096
    assert ad.encoder_adapter_config()["target_modules"] == [
        f"blocks.{b}.{m}" for b in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    # encoder + head: the head's LoRA too (layers.0: 32 embedding -> 32 hidden; out: 32 -> mean, logvar)
    _, net2, _, _ = _front_net(work, "lora", {"target": "encoder+head", "r": 4})
    n2 = sum(p.numel() for p in net2.parameters() if p.requires_grad)
    assert n2 == 4096 + 4 * (32 + 32) + 4 * (32 + 2)


# ------------------------------------------------------------------------- fine-tuning + files


@pytest.fixture(scope="module")
def lora_model(work):
    from stxcli.train import TrainOptions, finetune

    out = work / "lora_enc"
    s = finetune(work / "base", work / "tgt_raw.h5", out, adapter="lora",
                 adapter_config={"target": "encoder+head", "r": 4}, opts=TrainOptions(epochs=6, seed=1))
    return out, s


def test_encoder_lora_model_directory_and_manifest(work, lora_model):
    out, s = lora_model
    m = json.loads((out / "manifest.json").read_text())
    enc_sha = json.loads((work / "enc" / "manifest.json").read_text())["weights"]["sha256"]
    assert m["encoder"]["encoder_sha256"] == enc_sha and m["encoder"]["target"] == "encoder+head"
    assert m["featurizer"]["name"] == "raw" and m["input_dim"] == _raw().dim  # input: raw spectra
    assert s["trainable_params"] == m["training"]["trainable_params"] > 4096
    # peft-like layout for both parts; the base encoder is not copied
    for rel in ("adapter_config.json", "adapter_model.safetensors", "encoder/adapter_config.json",
                "encoder/adapter_model.safetensors"):
        assert rel in m["files"]
    assert not any(f.endswith("encoder.safetensors") for f in m["files"])
    from safetensors.numpy import load_file

    keys = sorted(load_file(str(out / "encoder" / "adapter_model.safetensors")))
    assert len(keys) == 16 and keys[0] == "base_model.model.blocks.0.attn.proj.lora_A.weight"
    cfg = json.loads((out / "encoder" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["stx_encoder"]["encoder_sha256"] == enc_sha


def test_merged_equals_unmerged_after_training(work, lora_model):
    from stxcli.model import load_model

    out, _ = lora_model
    r = _rows(work / "tgt_raw.h5")
    merged = load_model(out).predict(r["features"], ivar=r["ivar"])
    plain = load_model(out, merge=False).predict(r["features"], ivar=r["ivar"])
    np.testing.assert_allclose(merged["value"], plain["value"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(merged["err"], plain["err"], rtol=1e-4)
    base = load_model(work / "base").predict(_rows(work / "tgt_emb.h5")["features"])
    assert np.abs(merged["value"] - base["value"]).max() > 1e-3  # training changed something
    with pytest.raises(StxError, match="needs the features. ivar"):
        load_model(out).predict(r["features"])


def test_stx_predict_round_trip_from_a_raw_store(work, lora_model, tmp_path, capsys):
    from astropy.io import fits

    from stxcli.model import load_model

    out, _ = lora_model
    r = _rows(work / "tgt_raw.h5")
    code, _, err = run_cli(["predict", out, work / "tgt_raw.h5", "-o", tmp_path / "p.fits"], capsys)
    assert code == 0, err
    with fits.open(tmp_path / "p.fits") as h:
        got = np.asarray(h["PREDICTIONS"].data["feh"], np.float32)
        got_err = np.asarray(h["PREDICTIONS"].data["feh_err"], np.float32)
    want = load_model(out).predict(r["features"], ivar=r["ivar"])
    np.testing.assert_array_equal(got, want["value"][:, 0].astype(np.float32))
    np.testing.assert_array_equal(got_err, want["err"][:, 0].astype(np.float32))
    # the embedding store is not this model's input
    code, _, err = run_cli(["predict", out, work / "tgt_emb.h5", "-o", tmp_path / "q.fits"], capsys)
    assert code == 1 and "another featurizer config" in err and err.count("\n") == 1


def test_full_encoder_finetuning_changes_the_encoder_and_lowers_the_loss(work):
    from safetensors.numpy import load_file

    from stxcli.model import load_model
    from stxcli.train import TrainOptions, finetune

    out = work / "full_enc"
    s = finetune(work / "base", work / "tgt_raw.h5", out, adapter="full",
                 adapter_config={"target": "encoder+head"}, opts=TrainOptions(epochs=8, lr=1e-3, seed=0))
    m = json.loads((out / "manifest.json").read_text())
    hist = m["training"]["runs"]["full"]["history"]
    assert hist[-1]["train_nll"] < hist[0]["train_nll"]
    assert m["validation"]["finetuned"]["nll"] < m["validation"]["zero_shot"]["nll"]
    saved = load_file(str(out / "encoder" / "adapter_model.safetensors"))
    base = load_file(str(work / "enc" / "encoder.safetensors"))
    assert "encoder.blocks.0.attn.qkv.weight" in saved and not any(k.startswith("encoder.decoder.") for k in saved)
    changed = [k for k in saved if not np.array_equal(saved[k], base[k[len("encoder."):]])]
    assert len(changed) > len(saved) // 2
    # the lower encoder rate: group lr_scale 0.1 recorded in the config
    assert m["adapter"]["config"]["encoder_lr_scale"] == 0.1
    # trainable: every encoder tensor the mean-pooled embedding uses + the whole head
    enc_used = sum(v.size for v in saved.values())
    head = sum(v.size for v in load_file(str(out / "adapter_model.safetensors")).values())
    assert s["trainable_params"] == enc_used + head
    r = _rows(work / "tgt_raw.h5")
    p = load_model(out).predict(r["features"], ivar=r["ivar"])
    assert np.isfinite(p["value"]).all()


# --------------------------------------------------------------- encoder location and identity


def test_predicting_with_a_moved_encoder_directory(work, lora_model, tmp_path, monkeypatch, capsys):
    from stxcli.model import load_model
    from stxcli.train import featurizer_identity

    out, _ = lora_model
    r = _rows(work / "tgt_raw.h5")
    want = load_model(out).predict(r["features"], ivar=r["ivar"])["value"]
    moved = tmp_path / "elsewhere" / "enc_moved"
    moved.parent.mkdir()
    shutil.move(str(work / "enc"), moved)
    try:
        monkeypatch.delenv("STX_ENCODER_PATH", raising=False)
        with pytest.raises(ModelFileError, match="STX_ENCODER_PATH"):
            load_model(out)
        monkeypatch.setenv("STX_ENCODER_PATH", str(moved.parent))  # a folder of encoders
        np.testing.assert_array_equal(load_model(out).predict(r["features"], ivar=r["ivar"])["value"], want)
        code, _, err = run_cli(["predict", out, work / "tgt_raw.h5", "-o", tmp_path / "p.fits"], capsys)
        assert code == 0, err
        # embeddings made with the encoder at its new path are the base model's features still
        from stx_builtin.featurizers.transformer import embed_store

        embed_store(work / "tgt_raw.h5", tmp_path / "emb_moved.h5", encoder=moved)
        with FeatureStore.open(tmp_path / "emb_moved.h5") as a, FeatureStore.open(work / "tgt_emb.h5") as b:
            assert a.featurizer_config["encoder"] != b.featurizer_config["encoder"]
            assert a.featurizer_key != b.featurizer_key  # the stored key: path-dependent, as before
            ea = {"name": a.featurizer_name, "version": a.featurizer_version, "config": a.featurizer_config,
                  "key": a.featurizer_key}
            eb = {"name": b.featurizer_name, "version": b.featurizer_version, "config": b.featurizer_config,
                  "key": b.featurizer_key}
            assert featurizer_identity(ea) == featurizer_identity(eb)
            np.testing.assert_array_equal(a.read()["features"], b.read()["features"])
            n_emb = a.n
        # and stores embedded with the encoder at two paths concatenate (same identity)
        from stxcli.store import concat_stores

        concat_stores([tmp_path / "emb_moved.h5", work / "tgt_emb.h5"], tmp_path / "both.h5")
        with FeatureStore.open(tmp_path / "both.h5") as c:
            assert c.n == 2 * n_emb
        code, _, err = run_cli(["predict", work / "base", tmp_path / "emb_moved.h5", "-o", tmp_path / "b.fits"],
                               capsys)
        assert code == 0, err
    finally:
        shutil.move(str(moved), work / "enc")


def test_identity_ignores_path_and_device_not_what_makes_the_numbers(work):
    from stxcli.pipeline import build_featurizer
    from stxcli.train import featurizer_identity

    cfg = build_featurizer("transformer", {"encoder": str(work / "enc")}).config()
    assert "device" not in cfg  # a runtime knob now, like batch_size
    entry = {"name": "transformer", "version": "1", "config": cfg, "key": "x"}
    old = {**entry, "config": {**cfg, "device": "cuda", "encoder": "/some/old/place"}, "key": "y"}
    assert featurizer_identity(old) == featurizer_identity(entry)
    for k, v in (("pooling", "attention"), ("encoder_sha256", "0" * 64), ("raw", {**cfg["raw"], "cont_bin": 8})):
        assert featurizer_identity({**entry, "config": {**cfg, k: v}}) != featurizer_identity(entry)
    # featurizers without identity_config are compared by their recorded key
    assert featurizer_identity({"name": "raw", "version": "1", "config": {}, "key": "abc"}) == "abc"


def test_models_written_with_the_old_key_still_predict(work, tmp_path, capsys):
    """Before, the config (and so the key) held `device`: such a model predicts today's stores."""
    from stxcli.store import featurizer_key

    old = tmp_path / "old_base"
    shutil.copytree(work / "base", old)
    m = json.loads((old / "manifest.json").read_text())
    f = m["featurizer"]
    f["config"] = {**f["config"], "device": "cpu"}
    f["key"] = featurizer_key(f["name"], f["version"], f["config"])
    (old / "manifest.json").write_text(json.dumps(m))
    with FeatureStore.open(work / "tgt_emb.h5") as st:
        assert st.featurizer_key != f["key"]
    code, _, err = run_cli(["predict", old, work / "tgt_emb.h5", "-o", tmp_path / "p.fits"], capsys)
    assert code == 0, err


def test_a_tampered_encoder_is_refused(work, lora_model, tmp_path, capsys):
    out, _ = lora_model
    bad = tmp_path / "enc_bad"
    shutil.copytree(work / "enc", bad)
    w = bad / "encoder.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    model = tmp_path / "m"
    shutil.copytree(out, model)
    mpath = model / "manifest.json"
    m = json.loads(mpath.read_text())
    m["encoder"]["featurizer"]["config"]["encoder"] = str(bad)  # points at the tampered copy
    mpath.write_text(json.dumps(m))
    code, _, err = run_cli(["predict", model, work / "tgt_raw.h5", "-o", tmp_path / "p.fits"], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "sha256" in err
    assert not (tmp_path / "p.fits").exists()


# ------------------------------------------------------------------------------------ refusals


def test_wrong_target_stores_and_bases_are_one_line_errors(work, tmp_path, capsys):
    from stxcli.train import TrainOptions, finetune

    o = TrainOptions(epochs=1)
    with pytest.raises(StxError, match="made by the 'transformer' featurizer .*holds the embeddings.*raw"):
        finetune(work / "base", work / "tgt_emb.h5", tmp_path / "x", adapter="lora",
                 adapter_config={"target": "encoder"}, opts=o)
    from stxcli.pipeline import build_featurizer

    other = build_featurizer("raw", {**RAW_CFG, "cont_bin": 8})
    raw_store(tmp_path / "other_raw.h5", 40, 2, raw=other)
    with pytest.raises(StxError, match="another raw config than the encoder .*cont_bin"):
        finetune(work / "base", tmp_path / "other_raw.h5", tmp_path / "x", adapter="full",
                 adapter_config={"target": "encoder+head"}, opts=o)
    # a base trained on raw features has no encoder to reach into
    from stxcli.train import pretrain

    pretrain([work / "src_raw.h5"], tmp_path / "rawbase", head_config={"hidden": [8]}, opts=TrainOptions(epochs=1))
    with pytest.raises(UsageError, match="no encoder in front"):
        finetune(tmp_path / "rawbase", work / "tgt_raw.h5", tmp_path / "x", adapter="lora",
                 adapter_config={"target": "encoder"}, opts=o)
    with pytest.raises(UsageError, match="target must be one of"):
        finetune(work / "base", work / "tgt_raw.h5", tmp_path / "x", adapter="lora",
                 adapter_config={"target": "decoder"}, opts=o)
    with pytest.raises(UsageError, match="fine-tunes the encoder"):
        finetune(work / "base", work / "tgt_emb.h5", tmp_path / "x", adapter="auto",
                 adapter_config={"candidates": "residual,lora", "candidate_config": {"lora": {"target": "encoder"}}},
                 opts=o)
    # the head-only default still wants the embedding store, and says how to reach the encoder
    capsys.readouterr()
    code, _, err = run_cli(["finetune", work / "base", work / "tgt_raw.h5", "--adapter", "lora", "-q", "-o",
                            tmp_path / "y"], capsys)
    assert code == 1 and "another featurizer config" in err and "target=encoder" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_stx_finetune_cli_with_the_encoder(work, tmp_path, capsys):
    code, out, err = run_cli(["finetune", work / "base", work / "tgt_raw.h5", "--adapter", "lora", "--set",
                              "target=encoder", "--epochs", "2", "--json", "-o", tmp_path / "cli"], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert s["target"] == "encoder" and s["trainable_params"] == 4096 and s["n_target_stars"] == 200
    code, out, _ = run_cli(["finetune", "--help"], capsys)
    assert "target=encoder" in out


def test_predict_real_lamost_files_through_the_encoder(shared, work, lora_model, tmp_path, capsys):
    """Survey files are featurized with the model's raw featurizer and their ivar reaches the
    encoder: the catalog equals predicting the raw store of the same files."""
    from astropy.io import fits

    out, _ = lora_model
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits*"))[:6]
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(str(p) for p in files) + "\n")
    sets = [a for k, v in RAW_CFG.items() for a in ("--set", f"{k}={v}")]
    code, _, err = run_cli(["featurize", lst, "-o", tmp_path / "raw.h5", *sets], capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", out, lst, "-o", tmp_path / "a.fits"], capsys)
    assert code == 0, err
    code, _, err = run_cli(["predict", out, tmp_path / "raw.h5", "-o", tmp_path / "b.fits"], capsys)
    assert code == 0, err
    with fits.open(tmp_path / "a.fits") as a, fits.open(tmp_path / "b.fits") as b:
        da, db = a["PREDICTIONS"].data, b["PREDICTIONS"].data
        assert len(da) == 6
        np.testing.assert_allclose(da["feh"], db["feh"], rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_encoder_adapters_train_and_predict_on_cuda(work, tmp_path):
    """--device cuda: the encoder adapters train there, and the saved model predicts the same on
    the GPU and on the CPU."""
    from stxcli.model import load_model
    from stxcli.train import TrainOptions, finetune

    r = _rows(work / "tgt_raw.h5")
    for adapter, cfg in (("lora", {"target": "encoder+head"}), ("full", {"target": "encoder+head"})):
        out = tmp_path / adapter
        s = finetune(work / "base", work / "tgt_raw.h5", out, adapter=adapter, adapter_config=cfg,
                     opts=TrainOptions(epochs=3, device="cuda", seed=0))
        m = json.loads((out / "manifest.json").read_text())
        assert m["training"]["device"] == "cuda" and s["epochs_run"] == 3
        cpu = load_model(out).predict(r["features"], ivar=r["ivar"])
        gpu = load_model(out).to("cuda").predict(r["features"], device="cuda", ivar=r["ivar"])
        np.testing.assert_allclose(gpu["value"], cpu["value"], rtol=1e-3, atol=1e-3)
        assert (gpu["out_of_domain"] != cpu["out_of_domain"]).mean() <= 0.01  # round-off at a threshold


@pytest.mark.parametrize("target", ["head", "encoder+head"])
def test_embed_base_copies_the_encoder_and_predicts_without_it(shared, work, tmp_path, monkeypatch, capsys,
                                                               target):
    """--embed-base with a base trained on encoder embeddings: the encoder is copied into the
    model's assets/, and the model predicts survey files (which need the encoder: as the
    featurizer of a head-only model, as the front of an encoder one) to the same catalog with
    the original encoder gone and no STX_ENCODER_PATH."""
    from astropy.io import fits

    from stxcli.train import TrainOptions, finetune

    src = "tgt_raw.h5" if target == "encoder+head" else "tgt_emb.h5"
    out = tmp_path / "emb"
    finetune(work / "base", work / src, out, adapter="lora", adapter_config={"target": target, "r": 4},
             opts=TrainOptions(epochs=2, seed=1), embed_base=True)
    man = json.loads((out / "manifest.json").read_text())
    assert man["base"]["embedded"] and list(man["base"]["assets"]) == ["assets/encoder"]
    assert (out / "assets" / "encoder" / "manifest.json").is_file()
    assert any(k.startswith("assets/encoder/") for k in man["files"])  # hashed like every file
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(str(p) for p in sorted((shared / "lamost-dr10" / "spectra").glob("*.fits*"))[:4]))
    monkeypatch.delenv("STX_ENCODER_PATH", raising=False)
    code, _, err = run_cli(["predict", out, lst, "-o", tmp_path / "with.fits"], capsys)
    assert code == 0, err
    hidden = tmp_path / "hidden_enc"
    shutil.move(str(work / "enc"), hidden)
    try:
        code, _, err = run_cli(["predict", out, lst, "-o", tmp_path / "without.fits"], capsys)
        assert code == 0, err
        shutil.rmtree(out / "assets")  # the copy is what it used: without it, the one-line error
        code, _, err = run_cli(["predict", out, lst, "-o", tmp_path / "none.fits"], capsys)
        assert code != 0 and "STX_ENCODER_PATH" in err and not (tmp_path / "none.fits").exists()
    finally:
        shutil.move(str(hidden), work / "enc")
    with fits.open(tmp_path / "with.fits") as a, fits.open(tmp_path / "without.fits") as b:
        np.testing.assert_array_equal(a["PREDICTIONS"].data["feh"], b["PREDICTIONS"].data["feh"])


def test_embed_base_without_the_encoder_is_a_one_line_error(work, tmp_path, monkeypatch, capsys):
    """--embed-base cannot copy an encoder it cannot find: a one-line error, nothing written."""
    monkeypatch.delenv("STX_ENCODER_PATH", raising=False)
    hidden = tmp_path / "hidden_enc"
    shutil.move(str(work / "enc"), hidden)
    try:
        out = tmp_path / "emb"
        code, _, err = run_cli(["finetune", work / "base", work / "tgt_emb.h5", "--adapter", "residual",
                                "--embed-base", "-o", out, "--epochs", 1], capsys)
        assert code == 1 and err.strip().splitlines()[-1].startswith("error: ") and "STX_ENCODER_PATH" in err, err
        assert "training" not in err  # found missing before training, not after
        assert not out.exists()
    finally:
        shutil.move(str(hidden), work / "enc")
