"""The spectral transformer encoder, its training, encoder directories and the `transformer`
featurizer (issue 5). Tiny encoders on a few hundred synthetic spectra; the CLI test runs on real
LAMOST DR10 files from ../shared."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stxcli.errors import ModelFileError, StxError, UsageError
from stxcli.store import FeatureStore, write_store_arrays
from stx_builtin.encoder.config import EncoderConfig
from stx_builtin.encoder.io import WEIGHTS, load_encoder, read_manifest, save_encoder
from stx_builtin.encoder.model import SpectralEncoder, contiguous_chunk_mask, random_gaps
from stx_builtin.encoder.train import TrainOptions, lr_factor, run_train, train_encoder

from conftest import run_cli

N_PIX = 414  # the raw grid 5000-5500 A at 1e-4 dex
TINY = {"width": 32, "depth": 2, "heads": 2}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def synth(n: int, n_pix: int = N_PIX, seed: int = 0, gaps: bool = True):
    """Continuum-normalised spectra with 24 Gaussian absorption lines whose depth follows a
    latent 'metallicity' z and whose width a latent broadening; white noise (sigma 0.01); every
    7th spectrum has a 30-pixel gap (ivar 0, flux 1)."""
    rng = np.random.default_rng(seed)
    x = np.arange(n_pix)
    line_rng = np.random.default_rng(123)  # the same line list for every call
    centers = np.linspace(10, n_pix - 10, 24) + line_rng.uniform(-3, 3, 24)
    strength = line_rng.uniform(0.2, 1.0, 24)
    z = rng.uniform(0, 1, n)
    w = rng.uniform(1.5, 3.0, n)
    prof = np.exp(-0.5 * ((x[None, None, :] - centers[None, :, None]) / w[:, None, None]) ** 2)
    flux = 1 - (((0.1 + 0.6 * z)[:, None] * strength[None, :])[..., None] * prof).sum(1)
    flux = np.clip(flux, 0.05, None) + rng.normal(0, 0.01, (n, n_pix))
    ivar = np.full((n, n_pix), 1e4, np.float32)
    if gaps:
        for i in range(0, n, 7):
            s = rng.integers(0, n_pix - 30)
            ivar[i, s:s + 30] = 0
            flux[i, s:s + 30] = 1.0
    return flux.astype(np.float32), ivar, z.astype(np.float32)


def raw_config() -> dict:
    from stxcli.pipeline import build_featurizer

    return build_featurizer("raw", {"wmin": 5000.0, "wmax": 5500.0}).config()


@pytest.fixture(scope="module")
def syn_store(tmp_path_factory) -> Path:
    f, iv, z = synth(400)
    p = tmp_path_factory.mktemp("enc") / "syn.h5"
    from stxcli.pipeline import build_featurizer

    raw = build_featurizer("raw", {"wmin": 5000.0, "wmax": 5500.0})
    assert raw.dim == N_PIX
    write_store_arrays(p, f, iv, [f"s{i}" for i in range(len(f))], {"feh": z}, featurizer_name="raw",
                       featurizer_version=raw.version, featurizer_config=raw.config(), axis=raw.axis())
    return p


FAST = dict(epochs=15, batch_size=16, lr=2e-3, patience=15)


@pytest.fixture(scope="module")
def trained(syn_store, tmp_path_factory):
    """A tiny encoder trained on the synthetic store through run_train (the CLI's code path)."""
    out = tmp_path_factory.mktemp("enc") / "encoder"
    summary = run_train(syn_store, out, TINY, TrainOptions(**FAST))
    return out, summary


# ---------------------------------------------------------------------------------- masking


@pytest.mark.parametrize("n_tokens,frac,chunk", [(353, 0.4, 10), (41, 0.3, 4), (100, 0.25, 7), (10, 0.5, 10)])
def test_mask_covers_the_configured_fraction_in_contiguous_chunks(n_tokens, frac, chunk):
    g = torch.Generator().manual_seed(0)
    m = contiguous_chunk_mask(500, n_tokens, frac, chunk, g)
    want = round(frac * n_tokens)
    assert m.dtype == torch.bool and m.shape == (500, n_tokens)
    assert (m.sum(1) == want).all()
    # runs of masked tokens: at most ceil(want/chunk) of them (adjacent chunks may touch)
    edges = torch.diff(torch.cat([torch.zeros(500, 1, dtype=torch.int8), m.to(torch.int8)], 1), dim=1)
    runs = (edges == 1).sum(1)
    assert (runs >= 1).all() and (runs <= math.ceil(want / min(chunk, want))).all()
    # placement is random: rows differ and every token is masked somewhere
    assert len({tuple(r.tolist()) for r in m[:50]}) >= min(40, n_tokens - want + 1)
    assert m.any(0).all()


def test_mask_zero_fraction_and_bad_values():
    assert not contiguous_chunk_mask(4, 30, 0.0, 5).any()
    assert contiguous_chunk_mask(4, 30, 1.0, 5).all()
    with pytest.raises(ValueError):
        contiguous_chunk_mask(4, 30, 1.5, 5)


def test_random_gaps_only_remove_pixels():
    iv = torch.ones(200, 300)
    g = torch.Generator().manual_seed(3)
    out = random_gaps(iv, 0.5, 3, 40, 0.05, g)
    hit = (out == 0).any(1)
    assert set(torch.unique(out).tolist()) <= {0.0, 1.0}
    assert 0.35 < hit.float().mean() < 0.65  # about half of the rows
    assert torch.equal(random_gaps(iv, 0.0, 3, 40, 0.05, g), iv)


# ---------------------------------------------------------------------------- tokenisation


def test_prepare_zscores_over_valid_pixels_and_zero_fills_the_rest():
    cfg = EncoderConfig(n_pix=45, patch=20, stride=10)
    assert (cfg.n_patches, cfg.n_padded, cfg.n_tokens) == (4, 50, 5)
    enc = SpectralEncoder(cfg)
    flux = torch.ones(1, 45)
    flux[0, :5] = torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0])  # valid pixels: 44 x 1 ... see below
    ivar = torch.ones(1, 45)
    ivar[0, 40:] = 0
    flux[0, 40:] = float("nan")  # whatever sits in a masked pixel must not matter
    values, valid, log_std = enc.prepare(flux, ivar)
    v = np.r_[[1.0, 3.0, 1.0, 3.0, 1.0], np.ones(35)]  # the 40 valid pixels
    mean, std = v.mean(), v.std()
    assert log_std.item() == pytest.approx(math.log10(std), rel=1e-5)
    assert values.shape == (1, 4, 20) and valid.shape == (1, 4, 20)
    assert values[0, 0, 1].item() == pytest.approx((3 - mean) / std, rel=1e-5)
    # patch 3 covers pixels 30..49: 30..39 valid, 40..44 masked, 45..49 padding
    assert valid[0, 3].tolist() == [True] * 10 + [False] * 10
    assert torch.isfinite(values).all() and (values[0, 3, 10:] == 0).all()
    # overlapping patches share pixels: patch 1 starts at pixel 10 = patch 0's 11th pixel
    assert torch.equal(values[0, 1, :10], values[0, 0, 10:])


def test_module_names_for_adapters():
    names = dict(SpectralEncoder(EncoderConfig(n_pix=60, **TINY)).named_modules())
    for i in range(TINY["depth"]):
        for sub in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            assert isinstance(names[f"blocks.{i}.{sub}"], torch.nn.Linear)


def test_architecture_is_validated():
    with pytest.raises(ValueError, match="multiple of heads"):
        EncoderConfig(n_pix=100, width=30, heads=4)
    with pytest.raises(ValueError, match="shorter than one patch"):
        EncoderConfig(n_pix=10)
    with pytest.raises(ValueError, match="unknown encoder setting"):
        EncoderConfig.from_dict({"n_pix": 100, "widht": 3})


def test_lr_schedule_warmup_then_cosine():
    assert lr_factor(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, 10, 0.1) == pytest.approx(0.1)


# -------------------------------------------------------------------------------- training


def test_pretrain_loss_counts_only_valid_pixels_of_masked_patches():
    cfg = EncoderConfig(n_pix=60, patch=20, stride=10, **TINY)
    enc = SpectralEncoder(cfg)
    f, iv, _ = synth(3, n_pix=60, gaps=False)
    iv[1, 10:25] = 0
    tm = torch.zeros(3, cfg.n_patches, dtype=torch.bool)
    tm[:, 1] = True  # pixels 10..29
    out = enc.pretrain_losses(torch.from_numpy(f), torch.from_numpy(iv), tm)
    assert out["n_masked_px"].item() == 20 + 5 + 20
    # the loss is the MSE of the decoder's output on those pixels, computed by hand
    values, valid, log_std = enc.prepare(torch.from_numpy(f), torch.from_numpy(iv))
    pred = enc.decoder(enc.encode(values, valid, log_std, tm)[:, 1:])
    sel = valid & tm[..., None]
    assert out["mse"].item() == pytest.approx(((pred - values)[sel] ** 2).mean().item(), rel=1e-5)


def test_loss_decreases_and_beats_predicting_the_mean(trained):
    out, summary = trained
    hist = read_manifest(out)["training"]["history"]
    assert len(hist) == FAST["epochs"]
    assert hist[-1]["val_mse"] < 0.5 * hist[0]["val_mse"]
    assert hist[-1]["train_mse"] < hist[0]["train_mse"]
    # reconstructing masked chunks beats filling them with the spectrum's mean (z = 0) by far
    assert summary["best_val_mse"] < 0.3 * summary["val_mse_predicting_mean"]


def test_training_is_deterministic_on_cpu(syn_store):
    opts = dict(epochs=1, batch_size=32, lr=2e-3, max_rows=120)
    with FeatureStore.open(syn_store) as st:
        cfg = EncoderConfig(n_pix=st.dim, **TINY)
        a = train_encoder(st, cfg, TrainOptions(**opts)).model.state_dict()
        b = train_encoder(st, cfg, TrainOptions(**opts)).model.state_dict()
        c = train_encoder(st, cfg, TrainOptions(**opts, seed=1)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_training_refuses_a_store_not_made_by_raw(tmp_path):
    f, iv, _ = synth(50)
    p = tmp_path / "other.h5"
    write_store_arrays(p, f, iv, [str(i) for i in range(50)], featurizer_name="transformer")
    with pytest.raises(StxError, match="made by the 'raw' featurizer"):
        run_train(p, tmp_path / "enc", TINY, TrainOptions(epochs=1))
    with pytest.raises(UsageError, match="needs --device cuda"):
        TrainOptions(amp=True).check()


# ------------------------------------------------------------------------ embeddings, files


def test_embeddings_deterministic_and_batch_independent(trained):
    out, _ = trained
    enc, _ = load_encoder(out)
    f, iv, _ = synth(70, seed=9)
    xf, xi = torch.from_numpy(f), torch.from_numpy(iv)
    with torch.no_grad():
        a = enc(xf, xi)
        b = enc(xf, xi)
        parts = torch.cat([enc(xf[:13], xi[:13]), enc(xf[13:], xi[13:])])
    assert a.shape == (70, TINY["width"])
    assert torch.equal(a, b)
    torch.testing.assert_close(parts, a, rtol=0, atol=1e-5)


def test_saved_encoder_reloads_to_identical_outputs(tmp_path):
    torch.manual_seed(0)
    enc = SpectralEncoder(EncoderConfig(n_pix=N_PIX, **TINY)).eval()
    man = save_encoder(tmp_path / "e", enc, {"raw_featurizer": {"name": "raw", "config": {}}})
    again, m2 = load_encoder(tmp_path / "e")
    assert m2["weights"]["sha256"] == man["weights"]["sha256"]
    f, iv, _ = synth(20, seed=4)
    with torch.no_grad():
        for pooling in ("mean", "attention"):
            assert torch.equal(enc(torch.from_numpy(f), torch.from_numpy(iv), pooling),
                               again(torch.from_numpy(f), torch.from_numpy(iv), pooling))


def test_values_under_masked_pixels_are_never_used(trained):
    out, _ = trained
    enc, _ = load_encoder(out)
    f, iv, _ = synth(10, seed=2, gaps=False)
    iv[:, 100:130] = 0
    g = f.copy()
    g[:, 100:130] = np.array([np.nan, np.inf, -1e30, 7.0, 0.0, 1e30] * 5, np.float32)
    with torch.no_grad():
        for pooling in ("mean", "attention"):
            a = enc(torch.from_numpy(f), torch.from_numpy(iv), pooling)
            b = enc(torch.from_numpy(g), torch.from_numpy(iv), pooling)
            assert torch.isfinite(b).all() and torch.equal(a, b)


#: largest allowed embedding change from a 10-pixel gap, as a fraction of the median distance
#: between the embeddings of different spectra. Measured: 0.23 for the fixture's encoder; 0.42 for
#: the same encoder untrained, 0.6 after only 6 epochs (robustness to gaps is learned, from the
#: gap augmentation and the masked-token objective).
MASK_TOL = 0.35


def test_masking_a_few_pixels_changes_the_embedding_little(trained):
    out, _ = trained
    enc, _ = load_encoder(out)
    f, iv, _ = synth(60, seed=7, gaps=False)
    iv2 = iv.copy()
    iv2[:, 205:215] = 0  # a 10-pixel gap (2.4% of the spectrum)
    with torch.no_grad():
        a = enc(torch.from_numpy(f), torch.from_numpy(iv)).numpy()
        b = enc(torch.from_numpy(f), torch.from_numpy(iv2)).numpy()
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)[np.triu_indices(len(a), 1)]
    change = np.linalg.norm(b - a, axis=1)
    assert np.median(change) > 0  # the gap is seen ...
    assert np.median(change) < MASK_TOL * np.median(d)  # ... but the spectrum stays itself


def test_tampered_or_swapped_weights_are_refused(trained, tmp_path):
    import shutil

    out, _ = trained
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    w = bad / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="differs from the manifest"):
        load_encoder(bad)
    # weights and manifest both replaced consistently, but not the encoder recorded elsewhere
    with pytest.raises(ModelFileError, match="not the encoder the features were made with"):
        load_encoder(out, expected_sha256="0" * 64)
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="unreadable"):
        load_encoder(bad)
    with pytest.raises(ModelFileError, match="no such encoder"):
        load_encoder(tmp_path / "missing")


# ------------------------------------------------------------------------------- featurizer


def test_featurizer_config_round_trip_and_refusals(trained):
    from stxcli.pipeline import build_featurizer

    out, summary = trained
    feat = build_featurizer("transformer", {"encoder": str(out)})
    cfg = feat.config()
    assert cfg["encoder_sha256"] == summary["encoder_sha256"]
    assert cfg["raw"] == raw_config() and cfg["pooling"] == "mean" and feat.dim == TINY["width"]
    again = build_featurizer("transformer", json.loads(json.dumps(cfg)))
    assert again.config() == cfg
    with pytest.raises(ModelFileError, match="not the encoder"):
        build_featurizer("transformer", {**cfg, "encoder_sha256": "ab" * 32})
    with pytest.raises(UsageError, match="needs an encoder"):
        build_featurizer("transformer", {})
    with pytest.raises(UsageError, match="grid"):
        build_featurizer("transformer", {"encoder": str(out), "raw.wmax": 5600.0})
    # a raw setting that keeps the grid may be overridden
    est = build_featurizer("transformer", {"encoder": str(out), "raw.rv": "estimate"})
    assert est.config()["raw"]["rv"] == "estimate"


def test_stx_encoder_train_then_featurize_end_to_end(shared, tmp_path, capsys):
    """Real LAMOST DR10 files -> raw store -> `stx encoder train` -> `stx featurize --featurizer
    transformer --set encoder=DIR`; the embeddings equal the encoder applied to the raw store."""
    files = sorted((shared / "lamost-dr10" / "spectra").glob("*.fits*"))[:24]
    assert len(files) == 24
    lst = tmp_path / "files.txt"
    lst.write_text("\n".join(str(p) for p in files) + "\n")
    raw_h5, emb_h5, enc_dir = tmp_path / "raw.h5", tmp_path / "emb.h5", tmp_path / "enc"
    code, out, err = run_cli(["featurize", lst, "-o", raw_h5, "--set", "wmin=5000", "--set", "wmax=5500",
                              "--labels", shared / "lamost-dr10" / "labels.csv", "--id-column", "obsid",
                              "--json"], capsys)
    assert code == 0, err
    code, out, err = run_cli(["encoder", "train", raw_h5, "-o", enc_dir, "--width", "16", "--depth", "1",
                              "--heads", "2", "--epochs", "2", "--batch-size", "8", "--json"], capsys)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["n_train"] + summary["n_val"] == 24 and summary["epochs_run"] == 2
    code, out, err = run_cli(["encoder", "info", enc_dir, "--json"], capsys)
    assert code == 0 and json.loads(out)["encoder_sha256"] == summary["encoder_sha256"]
    code, out, err = run_cli(["featurize", lst, "-o", emb_h5, "--featurizer", "transformer",
                              "--set", f"encoder={enc_dir}", "--json"], capsys)
    assert code == 0, err
    with FeatureStore.open(emb_h5) as st, FeatureStore.open(raw_h5) as raw:
        assert (st.n, st.dim) == (24, 16) and st.featurizer_name == "transformer"
        cfg = st.featurizer_config
        assert cfg["encoder_sha256"] == summary["encoder_sha256"] and cfg["raw"] == raw.featurizer_config
        emb, r = st.read(), raw.read()
        assert list(st.ids) == list(raw.ids)
    enc, _ = load_encoder(enc_dir)
    with torch.no_grad():
        want = enc(torch.from_numpy(r["features"]), torch.from_numpy(r["ivar"])).numpy()
    np.testing.assert_allclose(emb["features"], want, rtol=0, atol=1e-5)
    assert (emb["ivar"] == 1).all()
    # `stx encoder embed` on the raw store makes the same store without re-reading the files
    code, out, err = run_cli(["encoder", "embed", raw_h5, "--encoder", enc_dir, "-o", tmp_path / "emb2.h5",
                              "--json"], capsys)
    assert code == 0, err
    with FeatureStore.open(tmp_path / "emb2.h5") as e2, FeatureStore.open(emb_h5) as e1, \
            FeatureStore.open(raw_h5) as raw:
        assert e2.featurizer_key == e1.featurizer_key and list(e2.ids) == list(e1.ids)
        np.testing.assert_allclose(e2.read()["features"], emb["features"], rtol=0, atol=1e-5)
        np.testing.assert_array_equal(e2.labels(["teff", "feh"]), raw.labels(["teff", "feh"]))
        assert np.isfinite(e2.labels(["teff"])).sum() == 24
        np.testing.assert_array_equal(e2.quality["snr"], raw.quality["snr"])
        assert e2.inputs == raw.inputs
    # a tampered encoder: one-line error, exit 1, no output
    w = enc_dir / WEIGHTS
    w.write_bytes(w.read_bytes()[:-100])
    code, out, err = run_cli(["featurize", lst, "-o", tmp_path / "x.h5", "--featurizer", "transformer",
                              "--set", f"encoder={enc_dir}"], capsys)
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1 and "sha256" in err
    assert not (tmp_path / "x.h5").exists()


def test_attention_pooling_needs_its_objective(syn_store, tmp_path):
    from stxcli.pipeline import build_featurizer

    run_train(syn_store, tmp_path / "e0", TINY, TrainOptions(epochs=1, aux_weight=0.0, max_rows=60))
    with pytest.raises(UsageError, match="without the attention-pooling objective"):
        build_featurizer("transformer", {"encoder": str(tmp_path / "e0"), "pooling": "attention"})
    feat = build_featurizer("transformer", {"encoder": str(tmp_path / "e0")})
    f, iv, _ = synth(5, seed=1, gaps=False)
    iv[2] = 0
    e, eiv = feat.embed(f, iv)
    assert e.shape == (5, TINY["width"]) and (eiv[2] == 0).all() and (e[2] == 0).all() and (eiv[[0, 1, 3, 4]] == 1).all()


def test_embed_store_needs_a_raw_store_the_installed_raw_reproduces(trained, syn_store, tmp_path):
    import h5py

    from stx_builtin.featurizers.transformer import embed_store

    out, _ = trained
    f, iv, _ = synth(20)
    other = tmp_path / "other.h5"
    write_store_arrays(other, f, iv, [str(i) for i in range(20)], featurizer_name="ridge-features")
    with pytest.raises(StxError, match="made by the 'raw' featurizer"):
        embed_store(other, tmp_path / "x.h5", encoder=out)
    summary = embed_store(syn_store, tmp_path / "ok.h5", encoder=out)
    assert summary["n_spectra"] == 400
    with FeatureStore.open(tmp_path / "ok.h5") as st:
        assert st.label_names == ["feh"] and st.dim == TINY["width"]
    # a store whose recorded raw config the installed raw featurizer would not reproduce
    import shutil

    forged = tmp_path / "forged.h5"
    shutil.copy(syn_store, forged)
    with h5py.File(forged, "a") as h:
        h.attrs["featurizer_key"] = "0" * 64
    with pytest.raises(StxError, match="no longer reproduces"):
        embed_store(forged, tmp_path / "y.h5", encoder=out)
    assert not (tmp_path / "x.h5").exists() and not (tmp_path / "y.h5").exists()


def test_featurizer_builds_the_torch_module_only_when_used(trained, tmp_path):
    """The parent of `stx featurize --workers N` builds the featurizer for its config and then
    forks: it must not have run torch ops (forking after them deadlocks the workers)."""
    import shutil

    from stxcli.pipeline import build_featurizer

    out, _ = trained
    enc_dir = tmp_path / "enc"
    shutil.copytree(out, enc_dir)
    feat = build_featurizer("transformer", {"encoder": str(enc_dir)})
    assert feat.dim == TINY["width"] and feat.config()["encoder_sha256"]
    assert feat._encoder is None
    # the weights are verified again when the module is built: a swap in between is caught
    w = enc_dir / WEIGHTS
    w.write_bytes(w.read_bytes()[:-8])
    f, iv, _ = synth(2)
    with pytest.raises(ModelFileError, match="sha256"):
        feat.embed(f, iv)
