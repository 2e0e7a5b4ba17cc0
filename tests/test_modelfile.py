"""Model directories: sha256 of every file, verified loads, clear one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from stxcli.errors import ModelFileError
from stxcli.modelfile import MANIFEST, ModelDir, sha256_file, write_model_dir

from _models_util import write_synth


def _write(tmp_path):
    t = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array([1, 2], dtype=np.int64)}
    sha = write_model_dir(tmp_path / "m", {"kind": "pretrained", "name": "x"},
                          tensors={"w.safetensors": t}, json_files={"sub/c.json": {"k": 1}})
    return tmp_path / "m", t, sha


def test_round_trip_and_hashes(tmp_path):
    path, t, sha = _write(tmp_path)
    md = ModelDir(path)
    assert md.manifest_sha256 == sha == sha256_file(path / MANIFEST)
    assert md.manifest["format"] == "stx-model" and md.name == "x"
    assert set(md.manifest["files"]) == {"w.safetensors", "sub/c.json"}
    assert md.manifest["files"]["w.safetensors"] == sha256_file(path / "w.safetensors")
    got = md.tensors("w.safetensors")
    for k in t:
        np.testing.assert_array_equal(got[k], t[k])
        assert got[k].dtype == t[k].dtype
    assert md.json("sub/c.json") == {"k": 1}
    md.verify()


def test_torch_tensors_saved_without_pickle(tmp_path):
    w = torch.randn(3, 4)
    write_model_dir(tmp_path / "m", {"kind": "pretrained"}, tensors={"w.safetensors": {"w": w}})
    raw = (tmp_path / "m" / "w.safetensors").read_bytes()
    assert b"pickle" not in raw and not raw.startswith(b"PK")  # safetensors: 8-byte header length + JSON
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8:8 + header_len])["w"]["dtype"] == "F32"
    np.testing.assert_array_equal(ModelDir(tmp_path / "m").tensors("w.safetensors")["w"], w.numpy())


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_tampered_weights(tmp_path, damage):
    path, _, _ = _write(tmp_path)
    f = path / "w.safetensors"
    raw = bytearray(f.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
        f.write_bytes(bytes(raw))
    elif damage == "truncate":
        f.write_bytes(bytes(raw[:-4]))
    else:
        f.unlink()
    with pytest.raises(ModelFileError, match="w.safetensors") as ei:
        ModelDir(path).tensors("w.safetensors")
    assert "\n" not in str(ei.value)


def test_directory_errors(tmp_path):
    with pytest.raises(ModelFileError, match="no such model directory"):
        ModelDir(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="manifest.json is missing"):
        ModelDir(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / MANIFEST).write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        ModelDir(tmp_path / "bad")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / MANIFEST).write_text(json.dumps({"format": "something"}))
    with pytest.raises(ModelFileError, match="not an stx model"):
        ModelDir(tmp_path / "other")
    path, _, _ = _write(tmp_path)
    with pytest.raises(ModelFileError, match="lists no file"):
        ModelDir(path).tensors("other.safetensors")


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        write_model_dir(tmp_path / "m", {"kind": "pretrained", "bad": object()},
                        tensors={"w.safetensors": {"a": np.zeros(2, np.float32)}})
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- whole models (tiny MLP)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from stxcli.train import TrainOptions, pretrain

    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("mf")
    write_synth(d / "src.h5", 200)
    pretrain([d / "src.h5"], d / "base", head_config={"hidden": [16]}, opts=TrainOptions(epochs=3))
    return d


def test_load_model_and_tamper(tiny_model, tmp_path):
    import shutil

    from stxcli.model import load_model

    m = load_model(tiny_model / "base")
    assert m.label_names == ["teff", "logg", "feh"]
    man = json.loads((tiny_model / "base" / MANIFEST).read_text())
    for key in ("featurizer", "head", "labels", "training", "validation", "stx_version", "files", "domain"):
        assert key in man
    assert man["training"]["stores"][0]["checksum"]
    assert man["head"]["config"]["hidden"] == [16]
    shutil.copytree(tiny_model / "base", tmp_path / "t")
    f = tmp_path / "t" / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    f.write_bytes(bytes(raw))
    with pytest.raises(ModelFileError, match="sha256 does not match"):
        load_model(tmp_path / "t")


def test_missing_plugin_named(tiny_model, tmp_path):
    import shutil

    from stxcli.model import load_model

    shutil.copytree(tiny_model / "base", tmp_path / "t")
    mp = tmp_path / "t" / MANIFEST
    man = json.loads(mp.read_text())
    man["head"]["name"] = "transformer-head-not-installed"
    mp.write_text(json.dumps(man))
    with pytest.raises(ModelFileError, match="needs head 'transformer-head-not-installed', which is not installed"):
        load_model(tmp_path / "t")


def test_finetuned_reference_and_embedding(tiny_model, tmp_path):
    import shutil

    from stxcli.model import load_model
    from stxcli.train import TrainOptions, finetune

    write_synth(tmp_path / "tgt.h5", 60, seed=3)
    shutil.copytree(tiny_model / "base", tmp_path / "base")
    opts = TrainOptions(epochs=2)
    finetune(tmp_path / "base", tmp_path / "tgt.h5", tmp_path / "ref", adapter="lora", opts=opts)
    finetune(tmp_path / "base", tmp_path / "tgt.h5", tmp_path / "emb", adapter="lora", opts=opts, embed_base=True)
    ref = json.loads((tmp_path / "ref" / MANIFEST).read_text())["base"]
    assert ref["embedded"] is False and ref["path"] == "../base"
    assert ref["manifest_sha256"] == sha256_file(tmp_path / "base" / MANIFEST)
    emb = json.loads((tmp_path / "emb" / MANIFEST).read_text())
    assert emb["base"]["path"] == "base" and "base/model.safetensors" in emb["files"]
    x = np.random.default_rng(0).normal(1, 0.1, (5, 24)).astype(np.float32)
    a = load_model(tmp_path / "ref").predict(x)["value"]
    b = load_model(tmp_path / "emb").predict(x)["value"]
    np.testing.assert_array_equal(a, b)
    # a referenced base that changed is refused; the embedded copy keeps working
    man = json.loads((tmp_path / "base" / MANIFEST).read_text())
    man["name"] = "changed"
    (tmp_path / "base" / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ModelFileError, match="base model manifest sha256 differs"):
        load_model(tmp_path / "ref")
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(ModelFileError, match="base model is not found"):
        load_model(tmp_path / "ref")
    np.testing.assert_array_equal(load_model(tmp_path / "emb").predict(x)["value"], b)
