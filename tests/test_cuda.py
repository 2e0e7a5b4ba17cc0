"""The same commands on a CUDA device (`--device cuda`): skipped where torch sees no GPU (CI).

Run on a GPU machine with ``python -m pytest tests/test_cuda.py``. What must hold there: a model
trained on the GPU predicts on the CPU what it predicts on the GPU; training on the GPU learns as
well as on the CPU; every built-in adapter fine-tunes on the GPU; the encoder trains there in
mixed precision and embeds what the CPU embeds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import run_cli
from _models_util import write_synth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

LABELS = ["teff", "logg", "feh"]


def _cat(path):
    from astropy.table import Table

    t = Table.read(path, hdu="PREDICTIONS")
    return np.stack([np.asarray(t[lab], float) for lab in LABELS], 1), \
        np.stack([np.asarray(t[f"{lab}_err"], float) for lab in LABELS], 1)


def _truth(path):
    from stxcli.store import FeatureStore

    with FeatureStore.open(path) as st:
        return st.labels(LABELS).astype(float)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    write_synth(d / "src.h5", 3000, d=64)
    write_synth(d / "tgt.h5", 400, d=64, seed=4, shift=0.01, feh_offset=0.3)
    write_synth(d / "test.h5", 600, d=64, seed=5, shift=0.01, feh_offset=0.3)
    return d


def _pretrain(work, out, device, capsys):
    code, o, err = run_cli(["pretrain", work / "src.h5", "-o", out, "--set", "hidden=64,64", "--epochs", "40",
                            "--device", device, "--seed", "1", "--json"], capsys)
    assert code == 0, err
    return json.loads(o)


def test_pretrain_on_cuda_predicts_the_same_on_cpu_and_learns_like_cpu(work, capsys, tmp_path):
    s_gpu = _pretrain(work, tmp_path / "gpu", "cuda", capsys)
    s_cpu = _pretrain(work, tmp_path / "cpu", "cpu", capsys)
    for tag, dev in (("on-gpu", "cuda"), ("on-cpu", "cpu")):
        code, o, err = run_cli(["predict", tmp_path / "gpu", work / "src.h5", "-o", tmp_path / f"p-{tag}.fits",
                                "--device", dev, "--json"], capsys)
        assert code == 0, err
    v_gpu, e_gpu = _cat(tmp_path / "p-on-gpu.fits")
    v_cpu, e_cpu = _cat(tmp_path / "p-on-cpu.fits")
    # TF32 matmuls may be on for CUDA: agreement to float32-ish precision, not bit-for-bit
    np.testing.assert_allclose(v_gpu, v_cpu, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(e_gpu, e_cpu, rtol=1e-2, atol=1e-3)
    # the GPU-trained and the CPU-trained model reach a similar training-set error
    code, o, err = run_cli(["predict", tmp_path / "cpu", work / "src.h5", "-o", tmp_path / "pc.fits"], capsys)
    assert code == 0, err
    y = _truth(work / "src.h5")
    mae_gpu = np.abs(v_gpu - y).mean(0)
    mae_cpu = np.abs(_cat(tmp_path / "pc.fits")[0] - y).mean(0)
    assert (mae_gpu < 1.5 * mae_cpu + np.array([5.0, 0.02, 0.02])).all(), (mae_gpu, mae_cpu)


@pytest.mark.parametrize("adapter", ["residual", "lora", "full", "auto"])
def test_every_adapter_finetunes_on_cuda(work, capsys, tmp_path, adapter):
    base = work / "base-gpu"
    if not base.exists():
        _pretrain(work, base, "cuda", capsys)
    code, o, err = run_cli(["predict", base, work / "test.h5", "-o", tmp_path / "zs.fits", "--device", "cuda"],
                           capsys)
    assert code == 0, err
    code, o, err = run_cli(["finetune", base, work / "tgt.h5", "--adapter", adapter, "-o", tmp_path / "ft",
                            "--epochs", "60", "--device", "cuda", "--seed", "0", "--json"], capsys)
    assert code == 0, err
    code, o, err = run_cli(["predict", tmp_path / "ft", work / "test.h5", "-o", tmp_path / "ft.fits",
                            "--device", "cuda"], capsys)
    assert code == 0, err
    y = _truth(work / "test.h5")
    zs = np.abs(_cat(tmp_path / "zs.fits")[0] - y).mean(0)
    ft = np.abs(_cat(tmp_path / "ft.fits")[0] - y).mean(0)
    assert ft[2] < zs[2], f"{adapter}: [Fe/H] MAE {ft[2]:.3f} not below zero-shot {zs[2]:.3f}"


def test_encoder_trains_on_cuda_with_amp_and_embeds_like_cpu(capsys, tmp_path):
    from stxcli.store import write_store_arrays

    rng = np.random.default_rng(0)
    n, d = 256, 400
    x = (1 + 0.05 * np.sin(np.arange(d) / 7.0)[None] * rng.uniform(0.5, 1.5, (n, 1))
         + rng.normal(0, 0.01, (n, d))).astype(np.float32)
    iv = np.full((n, d), 1e4, np.float32)
    iv[:, 100:120] = 0
    write_store_arrays(tmp_path / "raw.h5", x, iv, [f"s{i}" for i in range(n)], {},
                       featurizer_name="raw", featurizer_version="test", featurizer_config={"grid": "t"})
    code, o, err = run_cli(["encoder", "train", tmp_path / "raw.h5", "-o", tmp_path / "enc", "--width", "32",
                            "--depth", "2", "--heads", "2", "--epochs", "3", "--device", "cuda", "--amp",
                            "--json"], capsys)
    assert code == 0, err
    summary = json.loads(o)
    assert summary["epochs_run"] >= 1
    from stx_builtin.encoder.io import load_encoder

    enc, _ = load_encoder(tmp_path / "enc")
    xt, it = torch.from_numpy(x), torch.from_numpy(iv)
    with torch.no_grad():
        e_cpu = enc.float().cpu().eval()(xt, it).numpy()
        e_gpu = enc.cuda()(xt.cuda(), it.cuda()).cpu().numpy()
    assert np.isfinite(e_cpu).all()
    np.testing.assert_allclose(e_gpu, e_cpu, rtol=1e-2, atol=1e-2 * float(np.abs(e_cpu).max()))
