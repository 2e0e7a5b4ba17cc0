"""The ``full`` adapter: every weight of the pre-trained head trainable, gently.

A few hundred target stars must not wreck the pre-trained solution, so full fine-tuning uses a
learning rate ten times below pre-training (1e-4 by default), early stopping on the validation
split, and optional layer-wise learning-rate decay: with ``layer_decay = d`` the output layer
trains at the full rate and each layer below at ``d`` times the rate of the one above (ensemble
members share the schedule; parameters outside linear layers train at the full rate).

Config: ``layer_decay`` (default 1.0 = none). Saved as ``adapter_config.json`` +
``adapter_model.safetensors`` holding the whole fine-tuned head (keys ``head.*``); the base
still provides the feature normalisation and the label standardisation.
"""

from __future__ import annotations

import re
from typing import Any

from stxcli.errors import UsageError
from stxcli.hookspecs import hookimpl


class FullAdapter:
    name = "full"
    version = "1.0"
    description = "full fine-tuning: low learning rate, optional layer-wise decay, early stopping"

    def __init__(self, layer_decay: float = 1.0) -> None:
        self.layer_decay = float(layer_decay)
        if not 0 < self.layer_decay <= 1:
            raise UsageError(f"layer_decay must be in (0, 1], got {layer_decay}")

    def config(self) -> dict[str, Any]:
        return {"layer_decay": self.layer_decay}

    def attach(self, base: Any) -> Any:
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def param_groups(self, model: Any) -> list[dict[str, Any]]:
        from torch import nn

        linear = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        keys: list[str] = []
        for n, _ in linear:  # depth of a layer, ensemble members folded together
            k = re.sub(r"^members\.\d+\.", "", n)
            if k not in keys:
                keys.append(k)
        groups: dict[float, list[Any]] = {}
        seen: set[int] = set()
        for n, m in linear:
            depth = keys.index(re.sub(r"^members\.\d+\.", "", n))
            scale = self.layer_decay ** (len(keys) - 1 - depth)
            for p in m.parameters():
                groups.setdefault(scale, []).append(p)
                seen.add(id(p))
        rest = [p for p in model.parameters() if id(p) not in seen]
        if rest:
            groups.setdefault(1.0, []).extend(rest)
        return [{"params": ps, "lr_scale": s} for s, ps in sorted(groups.items())]

    def state_dict(self, model: Any) -> dict[str, Any]:
        return {f"head.{k}": v for k, v in model.state_dict().items()}

    def load_state_dict(self, model: Any, tensors: dict[str, Any]) -> None:
        extra = [k for k in tensors if not k.startswith("head.")]
        if extra:
            raise KeyError(f"unexpected tensor(s) {extra[:3]}")
        model.load_state_dict({k[len("head."):]: v for k, v in tensors.items()}, strict=True)

    def merge(self, model: Any) -> Any:
        return model

    def adapter_config(self) -> dict[str, Any]:
        return {"adapter_type": "full", **self.config()}

    def training_defaults(self) -> dict[str, Any]:
        return {"lr": 1e-4, "weight_decay": 1e-4, "epochs": 300, "batch_size": 64, "patience": 20}


@hookimpl
def register_adapters(register: Any) -> None:
    register(FullAdapter)
