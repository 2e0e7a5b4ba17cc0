"""LoRA: zero-init equals the base, merge equals unmerged, only adapter tensors train,
save/load round trip through the peft-like files, target module matching."""

from __future__ import annotations

import json

import pytest
import torch

from stxcli.errors import UsageError
from stxcli.model import make_adapter, make_head
from stxcli.modelfile import ModelDir, write_model_dir

torch.set_num_threads(1)


def _base(ensemble=1):
    torch.manual_seed(0)
    return make_head("mlp", {"hidden": [16, 8], "ensemble": ensemble}).build(12, 3).eval()


def _perturb_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_zero_init_equals_base():
    import copy

    base = _base(ensemble=2)
    x = torch.randn(20, 12)
    ref = base(x)
    lora = make_adapter("lora", {"r": 3, "lora_alpha": 6})
    model = lora.attach(copy.deepcopy(base)).eval()
    out = model(x)
    torch.testing.assert_close(out[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(out[1], ref[1], rtol=0, atol=0)


def test_only_adapter_tensors_trainable_and_count():
    base = _base()
    lora = make_adapter("lora", {"r": 2})
    model = lora.attach(base)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    groups = lora.param_groups(model)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in model.parameters() if p.requires_grad}
    # r * (in + out) per adapted layer: 12->16, 16->8, 8->6
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 2 * ((12 + 16) + (16 + 8) + (8 + 6))
    # a training step changes the adapter and nothing else
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    _perturb_b(model)
    opt = torch.optim.SGD([p for g in groups for p in g["params"]], lr=0.1)
    loss = model(torch.randn(5, 12))[0].pow(2).sum()
    loss.backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n


def test_merged_equals_unmerged():
    base = _base(ensemble=2)
    lora = make_adapter("lora", {"r": 4, "lora_alpha": 2.0})
    model = lora.attach(base).eval()
    _perturb_b(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.mul_(3.0)
    x = torch.randn(50, 12)
    merged = lora.merge(model).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    a, b = model(x), merged(x)
    assert not torch.allclose(a[0], _base(ensemble=2)(x)[0], atol=1e-3)  # the adapter does something
    torch.testing.assert_close(b[0], a[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=0, atol=1e-5)
    # merging leaves the unmerged model intact
    torch.testing.assert_close(model(x)[0], a[0], rtol=0, atol=0)


def test_save_load_round_trip_exact(tmp_path):
    import copy

    base = _base()
    lora = make_adapter("lora", {"r": 2, "lora_alpha": 4, "target_modules": ["out"]})
    model = lora.attach(copy.deepcopy(base))
    _perturb_b(model)
    state = lora.state_dict(model)
    assert set(state) == {"base_model.model.members.0.out.lora_A.weight",
                          "base_model.model.members.0.out.lora_B.weight"}
    write_model_dir(tmp_path / "a", {"kind": "x"}, tensors={"adapter_model.safetensors": state},
                    json_files={"adapter_config.json": lora.adapter_config()})
    md = ModelDir(tmp_path / "a")
    cfg = md.json("adapter_config.json")
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4.0
    assert cfg["target_modules"] == ["members.0.out"] and cfg["lora_dropout"] == 0.0
    again = make_adapter("lora", lora.config())
    model2 = again.attach(copy.deepcopy(base))
    again.load_state_dict(model2, {k: torch.from_numpy(v) for k, v in md.tensors("adapter_model.safetensors").items()})
    for k, v in again.state_dict(model2).items():
        assert torch.equal(v, state[k])
    x = torch.randn(9, 12)
    torch.testing.assert_close(model2.eval()(x)[0], model.eval()(x)[0], rtol=0, atol=0)
    with pytest.raises(KeyError):
        again.load_state_dict(model2, {"base_model.model.members.0.out.lora_A.weight": state[
            "base_model.model.members.0.out.lora_A.weight"]})


def test_target_module_matching():
    base = _base(ensemble=2)
    lora = make_adapter("lora", {"target_modules": "members\\.1\\.layers\\..*"})
    lora.attach(base)
    assert lora.adapter_config()["target_modules"] == ["members.1.layers.0", "members.1.layers.1"]
    lora2 = make_adapter("lora", {"target_modules": "layers.1,out"})
    lora2.attach(_base(ensemble=2))
    assert lora2.adapter_config()["target_modules"] == ["members.0.layers.1", "members.0.out",
                                                        "members.1.layers.1", "members.1.out"]
    with pytest.raises(UsageError, match="match no linear layer"):
        make_adapter("lora", {"target_modules": ["attention"]}).attach(_base())
    with pytest.raises(UsageError):
        make_adapter("lora", {"r": 0})
    json.dumps(lora.adapter_config())  # JSON-able
