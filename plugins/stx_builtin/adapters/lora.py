"""The ``lora`` adapter: low-rank updates ``W + (lora_alpha / r) B A`` on the frozen head's
linear layers, with the configuration fields and file layout of the peft library.

Config (``--set key=value`` on ``stx finetune --adapter lora``):

* ``r``: rank (default 4); ``lora_alpha``: scale numerator (default 8, i.e. scaling alpha/r = 2);
* ``lora_dropout``: dropout on the LoRA branch's input (default 0);
* ``target_modules``: which linear layers: ``all`` (default), a list of module names or name
  suffixes (``out`` = every member's output layer, ``layers.0`` = every first layer), or a
  regular expression matched against the full module name (peft's rules).

``B`` starts at zero, so the untrained adapter equals the base. Saved apart from the base as
``adapter_config.json`` (peft ``LoraConfig`` fields) + ``adapter_model.safetensors`` with peft's
key names (``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``), so one base model
serves many adapters. For prediction the update is merged into the weights.
"""

from __future__ import annotations

import copy
from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl

PREFIX = "base_model.model."


class LoraAdapter:
    name = "lora"
    version = "1.0"
    description = "low-rank updates on the frozen head's linear layers (peft layout), mergeable"

    def __init__(self, r: int = 4, lora_alpha: float = 8.0, lora_dropout: float = 0.0,
                 target_modules: Any = "all") -> None:
        self.r = int(r)
        if self.r < 1:
            raise UsageError(f"r must be >= 1, got {r}")
        self.lora_alpha = float(lora_alpha)
        self.lora_dropout = float(lora_dropout)
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"lora_dropout must be in [0, 1), got {lora_dropout}")
        if isinstance(target_modules, str) and "," in target_modules:
            target_modules = [t for t in target_modules.split(",") if t]
        self.target_modules = target_modules
        self._resolved: list[str] = []

    def config(self) -> dict[str, Any]:
        return {"r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": self.target_modules}

    def attach(self, base: Any) -> Any:
        from ._layers import LoraLinear, freeze, linear_names, match_targets, set_submodule

        names = match_targets(base, self.target_modules)
        if not names:
            raise UsageError(f"lora: target_modules {self.target_modules!r} match no linear layer "
                             f"(layers: {', '.join(linear_names(base))})")
        freeze(base)
        for n in names:
            set_submodule(base, n, LoraLinear(base.get_submodule(n), self.r, self.lora_alpha, self.lora_dropout))
        self._resolved = names
        return base

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        from ._layers import lora_layers

        params = []
        for _, m in lora_layers(model):
            params += [m.lora_A.weight, m.lora_B.weight]
        return [{"params": params, "weight_decay": 0.0}]

    def state_dict(self, model: Any) -> dict[str, Any]:
        from ._layers import lora_layers

        out = {}
        for n, m in lora_layers(model):
            out[f"{PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach()
            out[f"{PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach()
        return out

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        import torch

        from ._layers import lora_layers

        expected = self.state_dict(model)
        missing = sorted(set(expected) - set(tensors))
        extra = sorted(set(tensors) - set(expected))
        if missing or extra:
            raise KeyError(f"missing {missing[:2]} unexpected {extra[:2]}")
        with torch.no_grad():
            for n, m in lora_layers(model):
                for part in ("lora_A", "lora_B"):
                    t = tensors[f"{PREFIX}{n}.{part}.weight"]
                    w = getattr(m, part).weight
                    if tuple(t.shape) != tuple(w.shape):
                        raise ValueError(f"{n}.{part}: shape {tuple(t.shape)} != {tuple(w.shape)}")
                    w.copy_(t)

    def merge(self, model: Any) -> Any:
        """A copy of the module with every LoRA layer folded into a plain ``nn.Linear``."""
        from ._layers import lora_layers, set_submodule

        merged = copy.deepcopy(model)
        for n, m in lora_layers(merged):
            set_submodule(merged, n, m.merged())
        return merged

    def adapter_config(self) -> dict[str, Any]:
        return {"peft_type": "LORA", "task_type": None, "r": self.r, "lora_alpha": self.lora_alpha,
                "lora_dropout": self.lora_dropout, "target_modules": list(self._resolved),
                "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
                "modules_to_save": None, "inference_mode": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
                "base_model_name_or_path": None, "revision": None}

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-3, "weight_decay": 0.0, "epochs": 300, "batch_size": 64, "patience": 20}


@hookimpl
def register_adapters(register: Any) -> None:
    register(LoraAdapter)
